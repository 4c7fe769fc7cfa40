//! A password-guessing attack, end to end through the real binary: guesses
//! from one loopback address, the real user from another (127.0.0.0/8 is all
//! local), the proxy's `/metrics` counting the argon2 checks that ran.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use testkit::proxy::{AccountSpec, TestProxy};
use testkit::world::{LineClient, World};
use tokio::io::BufReader;
use tokio::net::TcpSocket;

const USER: &str = "sales@contoso.com";
const PASS: &str = "local-pass-9f3k";
const GUESSER: [u8; 4] = [127, 0, 0, 1];
const REAL_USER: [u8; 4] = [127, 0, 0, 2];

/// A hash nobody knows the password of, ten times the default argon2 work:
/// a check against it is sure to be running while a test looks.
const SLOW_HASH: &str = "$argon2id$v=19$m=19456,t=20,p=1$c29tZXNhbHRzb21lc2FsdA$Rmlyc3QgbG9naW4gbm8gb25lIGtub3dzIHRoaXMhIQ";

/// Starts the proxy with USER (an argon2 `password_hash`) holding a grant,
/// and `server` added to its `[server]` section.
async fn proxy(world: &World, server: &str) -> TestProxy {
    let account = AccountSpec {
        hashed: true,
        ..AccountSpec::device(USER, PASS)
    };
    let proxy = TestProxy::start_with(
        &world.endpoints,
        std::slice::from_ref(&account),
        "info",
        |text| text.replacen("[server]\n", &format!("[server]\n{server}\n"), 1),
    )
    .await;
    world.grant(&proxy, &account);
    proxy
}

/// A raw client whose connection comes from `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> LineClient {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let stream = socket.connect(to).await.expect("the proxy accepts");
    LineClient {
        stream: BufReader::new(stream),
    }
}

/// IMAP LOGIN at `imap` from `from`; the tagged answer.
async fn imap_login(imap: SocketAddr, from: [u8; 4], user: &str, pass: &str) -> String {
    let mut c = connect_from(from, imap).await;
    c.read().await;
    c.line(&format!("a LOGIN {user} {pass}")).await;
    c.until("a ").await.pop().unwrap()
}

/// SMTP AUTH PLAIN at `smtp` from `from`; the reply, and whether the proxy
/// then closed the connection (after a 421 only).
async fn smtp_auth(smtp: SocketAddr, from: [u8; 4], user: &str, pass: &str) -> (String, bool) {
    let mut c = connect_from(from, smtp).await;
    c.read().await;
    c.line("EHLO guesser").await;
    c.until("250 ").await;
    let blob = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
    c.line(&format!("AUTH PLAIN {blob}")).await;
    let reply = c.read().await.expect("a reply to AUTH");
    let closed = reply.starts_with("421") && c.closed().await;
    (reply, closed)
}

/// Runs `n` guesses at once from the guessing address, each on its own
/// connection through `login` (`imap_login`, or `smtp_auth`'s reply); their
/// answers.
async fn parallel_guesses<F, Fut>(n: usize, login: F) -> Vec<String>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    let guesses: Vec<_> = (0..n)
        .map(|i| tokio::spawn(login(format!("guess-{i}"))))
        .collect();
    let mut answers = Vec::new();
    for guess in guesses {
        answers.push(guess.await.unwrap());
    }
    answers
}

/// The argon2 checks that ran, over all their outcomes.
async fn password_checks(proxy: &TestProxy) -> f64 {
    let name = "xoauth2_proxy_password_checks_total";
    proxy.metric(name, &[]).await.unwrap_or(0.0)
}

/// Waits until `n` password checks have started.
async fn checks_started(proxy: &TestProxy, n: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while password_checks(proxy).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no password check started; log:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hundreds_of_parallel_guesses_run_a_handful_of_checks_and_throttle_only_their_address() {
    let world = World::start().await;
    let proxy = proxy(
        &world,
        "max_failed_logins = 3\nmax_failed_logins_per_address = 10",
    )
    .await;

    let imap = proxy.imap_addr;
    let answers = parallel_guesses(200, |guess| async move {
        imap_login(imap, GUESSER, USER, &guess).await
    })
    .await;
    for answer in &answers {
        assert!(
            answer.starts_with("a NO [AUTHENTICATIONFAILED]"),
            "{answer}"
        );
    }
    let checks = password_checks(&proxy).await;
    assert!(
        (1.0..=3.0).contains(&checks),
        "{checks} argon2 checks for 200 guesses; max_failed_logins is 3"
    );
    let throttled = [("protocol", "imap"), ("outcome", "throttled")];
    let logins = proxy.metric("xoauth2_proxy_logins_total", &throttled).await;
    assert!(logins >= Some(197.0), "{logins:?}");

    // The right password, from the guessing address: refused as a guess is.
    let answer = imap_login(proxy.imap_addr, GUESSER, USER, PASS).await;
    assert!(
        answer.starts_with("a NO [AUTHENTICATIONFAILED]"),
        "{answer}"
    );
    // From another address, during the attack: the user logs in.
    let answer = imap_login(proxy.imap_addr, REAL_USER, USER, PASS).await;
    assert!(answer.starts_with("a OK"), "{answer}");

    // A reload builds new accounts; the counters stay.
    proxy.reload();
    proxy
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .await;
    let answer = imap_login(proxy.imap_addr, GUESSER, USER, PASS).await;
    assert!(
        answer.starts_with("a NO [AUTHENTICATIONFAILED]"),
        "still throttled after a reload: {answer}"
    );

    let logs = proxy.logs();
    let started = format!("throttling logins as {USER} from 127.0.0.1");
    assert_eq!(logs.matches(&started).count(), 1, "{logs}");
    assert!(!logs.contains(PASS) && !logs.contains("guess-"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_success_resets_the_count_of_failures() {
    let world = World::start().await;
    let proxy = proxy(&world, "max_failed_logins = 3").await;
    for round in 0..3 {
        for _ in 0..2 {
            let answer = imap_login(proxy.imap_addr, GUESSER, USER, "typo").await;
            assert!(
                answer.starts_with("a NO [AUTHENTICATIONFAILED]"),
                "{answer}"
            );
        }
        let answer = imap_login(proxy.imap_addr, GUESSER, USER, PASS).await;
        assert!(answer.starts_with("a OK"), "round {round}: {answer}");
    }
    // Six failures in all, never three in a row: never throttled.
    assert!(!proxy.logs().contains("throttling"), "{}", proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_and_known_usernames_cost_one_check_each_and_get_the_same_answer() {
    let world = World::start().await;
    let proxy = proxy(&world, "").await;
    let unknown = imap_login(proxy.imap_addr, GUESSER, "nobody@contoso.com", "guess").await;
    assert_eq!(password_checks(&proxy).await, 1.0, "the unknown username");
    let known = imap_login(proxy.imap_addr, GUESSER, USER, "guess").await;
    assert_eq!(password_checks(&proxy).await, 2.0, "the known username");
    assert_eq!(unknown, known);
    assert!(known.starts_with("a NO [AUTHENTICATIONFAILED]"), "{known}");
}

/// `password_checks = 1`, no queue, and a check that takes a while: one
/// login takes the slot, and the next is told to retry.
async fn proxy_with_a_busy_slot(world: &World) -> TestProxy {
    let proxy = proxy(world, "password_checks = 1\npassword_check_queue = 0").await;
    let config = std::fs::read_to_string(&proxy.config_path).unwrap();
    let slow = config
        .lines()
        .map(|line| match line.starts_with("password_hash") {
            true => format!("password_hash = \"{SLOW_HASH}\""),
            false => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&proxy.config_path, slow).unwrap();
    proxy.reload();
    proxy
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .await;
    let addr = proxy.imap_addr;
    tokio::spawn(async move {
        let mut c = connect_from(REAL_USER, addr).await;
        c.read().await;
        c.line(&format!("a LOGIN {USER} slow-guess")).await;
        c.until("a ").await
    });
    checks_started(&proxy, 1.0).await;
    proxy
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_check_queue_is_told_to_try_again_later_known_username_or_not() {
    let world = World::start().await;
    let proxy = proxy_with_a_busy_slot(&world).await;
    for user in [USER, "nobody@contoso.com"] {
        let answer = imap_login(proxy.imap_addr, GUESSER, user, "guess").await;
        assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{user}: {answer}");
    }
    let (reply, closed) = smtp_auth(proxy.smtp_addr, GUESSER, USER, "guess").await;
    assert!(reply.starts_with("421 4.7.0"), "{reply}");
    assert!(closed, "421 closes the connection");
    assert_eq!(password_checks(&proxy).await, 1.0, "only the slow one ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_guesses_are_throttled_by_address_too() {
    let world = World::start().await;
    let proxy = proxy(&world, "max_failed_logins = 2").await;
    let smtp = proxy.smtp_addr;
    let replies = parallel_guesses(50, |guess| async move {
        smtp_auth(smtp, GUESSER, USER, &guess).await.0
    })
    .await;
    for reply in &replies {
        assert!(reply.starts_with("535 5.7.8"), "{reply}");
    }
    let checks = password_checks(&proxy).await;
    assert!(checks <= 2.0, "{checks} argon2 checks for 50 guesses");
    let (reply, _) = smtp_auth(smtp, GUESSER, USER, PASS).await;
    assert!(
        reply.starts_with("535 5.7.8"),
        "the right password, throttled: {reply}"
    );
    let (reply, _) = smtp_auth(smtp, REAL_USER, USER, PASS).await;
    assert!(reply.starts_with("235"), "another address: {reply}");
}
