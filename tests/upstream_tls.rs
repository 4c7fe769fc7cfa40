//! The proxy's TLS towards the mail servers, through the real binary: a
//! provider's `ca_file` may pin the server's own certificate (self-signed,
//! CA:TRUE, as on-premises servers often have), and every certificate the
//! proxy refuses is reported with a sentence that says what to do, in the
//! log of `serve` and in `xoauth2-proxy check`. The CA-signed path is what
//! every other test runs.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use testkit::pki::{ServerCert, TestPki};
use testkit::proxy::{AccountSpec, TestProxy};
use testkit::smtp::UpstreamTls;
use testkit::world::{LineClient, World};

const USER: &str = "ops@contoso.com";
const PASS: &str = "local-pass-7Hq2";
const T: Duration = Duration::from_secs(5);

/// The mock world with both mail servers presenting `server`'s certificate,
/// and the proxy in front of them, its provider's `ca_file` set to `ca_file`.
async fn proxy_before(server: &TestPki, ca_file: &Path) -> (World, TestProxy) {
    let mut world = World::start().await;
    world.imap = testkit::imap::start(server, world.tokens.clone()).await;
    world.smtp = testkit::smtp::start(server, world.tokens.clone(), UpstreamTls::StartTls).await;
    world.endpoints.imap_port = world.imap.port();
    world.endpoints.smtp_port = world.smtp.port();
    world.endpoints.ca_file = ca_file.to_path_buf();
    let proxy = world.proxy(&[AccountSpec::device(USER, PASS)]).await;
    (world, proxy)
}

/// Logs in over IMAP; the tagged reply.
async fn imap_login(proxy: &TestProxy) -> String {
    LineClient::imap_login(proxy.imap_addr, USER, PASS).await
}

/// Says EHLO and logs in with AUTH PLAIN over SMTP; the last line of the
/// reply to AUTH.
async fn smtp_login(proxy: &TestProxy) -> String {
    let mut c = LineClient::connect(proxy.smtp_addr).await;
    reply(&mut c).await;
    c.line("EHLO client.example").await;
    reply(&mut c).await;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASS}"));
    c.line(&format!("AUTH PLAIN {plain}")).await;
    reply(&mut c).await
}

/// Reads one SMTP reply; its last line.
async fn reply(c: &mut LineClient) -> String {
    loop {
        let line = c.read().await.expect("an SMTP reply");
        if line.as_bytes().get(3) != Some(&b'-') {
            return line;
        }
    }
}

/// `xoauth2-proxy check`: whether it passed, and what it printed.
async fn check(proxy: &TestProxy) -> (bool, String) {
    let out = proxy.cli(&["check"]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_self_signed_ca_certificate_lets_imap_and_smtp_log_in() {
    let server = TestPki::serving(ServerCert::SELF_SIGNED_CA);
    let (world, proxy) = proxy_before(&server, &server.cert_pem_path).await;

    let imap = imap_login(&proxy).await;
    assert!(imap.starts_with("a OK"), "{imap}\n{}", proxy.logs());
    assert_eq!(
        world.imap.stats().auth_ok,
        1,
        "the pinned server saw the login"
    );
    let smtp = smtp_login(&proxy).await;
    assert_eq!(
        smtp,
        "235 2.7.0 Authentication successful",
        "{}",
        proxy.logs()
    );
    let (ok, said) = check(&proxy).await;
    assert!(ok, "{said}");
    assert_eq!(said.matches("logged in with XOAUTH2").count(), 2, "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_different_self_signed_certificate_is_refused_and_the_user_told_to_pin_it() {
    let pinned = TestPki::serving(ServerCert::SELF_SIGNED_CA);
    let server = TestPki::serving(ServerCert::SELF_SIGNED_CA);
    let (world, proxy) = proxy_before(&server, &pinned.cert_pem_path).await;
    let advice =
        "to trust exactly this certificate, pin it: put it in `ca_file` of provider `test`";

    let imap = imap_login(&proxy).await;
    assert!(imap.starts_with("a NO [UNAVAILABLE]"), "{imap}");
    proxy
        .wait_for_log(
            &format!(
                "TLS with localhost:{} failed: the server presents a CA certificate",
                world.imap.port()
            ),
            T,
        )
        .await;
    proxy.wait_for_log(advice, T).await;
    let smtp = smtp_login(&proxy).await;
    assert!(smtp.starts_with("421 4.4."), "{smtp}");
    assert_eq!(world.imap.stats().auth_ok, 0, "no login reached the server");

    let (ok, said) = check(&proxy).await;
    assert!(!ok, "{said}");
    assert_eq!(said.matches(advice).count(), 2, "IMAP and SMTP: {said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_and_wrong_name_certificates_are_refused_with_what_to_do() {
    let expired = ServerCert {
        expired: true,
        ..ServerCert::ISSUED
    };
    let other_names = ServerCert {
        names: &["mail.example.net", "10.0.0.25"],
        ..ServerCert::ISSUED
    };
    let renew = "failed: the server's certificate expired on 2021-01-01; renew it on the server, or correct this machine's clock if that is wrong";
    let names = |setting: &str| {
        format!(
            "failed: the server's certificate is not valid for `localhost` (it names mail.example.net, 10.0.0.25); set `{setting}` of provider `test` to one of those names, or pin the certificate in `ca_file` of provider `test`"
        )
    };
    for (cert, imap_sentence, smtp_sentence) in [
        (expired, renew.to_string(), renew.to_string()),
        (other_names, names("imap_server"), names("smtp_server")),
    ] {
        let server = TestPki::serving(cert);
        let (_world, proxy) = proxy_before(&server, &server.ca_pem_path).await;
        let imap = imap_login(&proxy).await;
        assert!(imap.starts_with("a NO [UNAVAILABLE]"), "{cert:?}: {imap}");
        proxy.wait_for_log(&imap_sentence, T).await;
        let smtp = smtp_login(&proxy).await;
        assert!(smtp.starts_with("421 4.4."), "{cert:?}: {smtp}");
        let (ok, said) = check(&proxy).await;
        assert!(!ok, "{said}");
        for sentence in [&imap_sentence, &smtp_sentence] {
            assert!(
                said.contains(sentence.as_str()),
                "{cert:?}: {sentence}\n{said}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_pin_is_accepted_with_one_warning_to_renew_it() {
    let server = TestPki::serving(ServerCert {
        expired: true,
        ..ServerCert::SELF_SIGNED_CA
    });
    let (_world, proxy) = proxy_before(&server, &server.cert_pem_path).await;

    for _ in 0..2 {
        let imap = imap_login(&proxy).await;
        assert!(imap.starts_with("a OK"), "{imap}\n{}", proxy.logs());
    }
    let warning = "the certificate of localhost expired on 2021-01-01; it is accepted because `ca_file` pins exactly this certificate, but renew it on the server and put the new one in `ca_file`";
    proxy.wait_for_log(warning, T).await;
    assert_eq!(proxy.logs().matches(warning).count(), 1, "{}", proxy.logs());
}
