//! Checks the test mocks themselves (identity provider, IMAP upstream, imapflow
//! driver) without the proxy, so that a failing proxy test can trust them.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use testkit::idp::{DeviceOutcome, IdpMode, MockIdp};
use testkit::imap::{self, FailureStyle, MockImapUpstream};
use testkit::metrics;
use testkit::pki::TestPki;
use testkit::tokens::{Subject, TokenBook};
use testkit::xoauth2;

const TENANT: &str = "organizations";
const CLIENT: &str = "11111111-2222-3333-4444-555555555555";
const SECRET: &str = "s3cr3t~value.of.the.client.secret";
const PUBLIC_CLIENT: &str = "99999999-2222-3333-4444-555555555555";
const SCOPES: &str = "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access";
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn post(url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let resp = http().post(url).form(form).send().await.expect("POST");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

async fn idp() -> (TokenBook, MockIdp) {
    let tokens = TokenBook::default();
    let idp = MockIdp::start(tokens.clone()).await;
    idp.register_client(CLIENT, Some(SECRET));
    idp.register_client(PUBLIC_CLIENT, None);
    (tokens, idp)
}

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}

fn assert_ms_error(v: &Value, error: &str, code: u64) {
    assert_eq!(error_of(v), error, "{v}");
    assert_eq!(v["error_codes"][0].as_u64(), Some(code), "{v}");
    let desc = v["error_description"].as_str().unwrap();
    assert!(desc.starts_with(&format!("AADSTS{code}: ")), "{desc}");
    assert!(desc.contains("\r\nTrace ID: "), "{desc}");
    assert!(desc.contains("\r\nCorrelation ID: "), "{desc}");
    assert!(desc.contains("\r\nTimestamp: "), "{desc}");
    for key in ["timestamp", "trace_id", "correlation_id", "error_uri"] {
        assert!(v[key].is_string(), "{key} missing in {v}");
    }
}

async fn start_device(idp: &MockIdp, client: &str, secret: Option<&str>) -> String {
    let mut form = vec![("client_id", client), ("scope", SCOPES)];
    if let Some(s) = secret {
        form.push(("client_secret", s));
    }
    let (status, v) = post(&idp.device_code_url(TENANT), &form).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["verification_uri"], "https://microsoft.com/devicelogin");
    assert_eq!(v["interval"], 1);
    assert_eq!(v["expires_in"], 900);
    let user_code = v["user_code"].as_str().unwrap();
    assert!(v["message"].as_str().unwrap().contains(user_code));
    v["device_code"].as_str().unwrap().to_string()
}

async fn poll(idp: &MockIdp, device_code: &str) -> (u16, Value) {
    post(
        &idp.token_url(TENANT),
        &[
            ("grant_type", DEVICE_GRANT),
            ("client_id", CLIENT),
            ("client_secret", SECRET),
            ("device_code", device_code),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn device_code_pending_then_approved() {
    let (tokens, idp) = idp().await;
    idp.set_device_user("sales@contoso.com");
    idp.set_access_token_lifetime(Duration::from_secs(3));
    let code = start_device(&idp, CLIENT, Some(SECRET)).await;
    for _ in 0..2 {
        let (status, v) = poll(&idp, &code).await;
        assert_eq!(status, 400);
        assert_ms_error(&v, "authorization_pending", 70016);
    }
    let (status, v) = poll(&idp, &code).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3);
    assert_eq!(v["ext_expires_in"], 3);
    assert!(!v["scope"].as_str().unwrap().contains("offline_access"));
    assert!(
        v["scope"]
            .as_str()
            .unwrap()
            .contains("IMAP.AccessAsUser.All")
    );
    let access = v["access_token"].as_str().unwrap();
    assert!(access.len() > 1500);
    assert!(tokens.check("sales@contoso.com", access));
    assert!(!tokens.check("other@contoso.com", access));
    let refresh = v["refresh_token"].as_str().unwrap();
    assert_eq!(
        idp.valid_refresh_tokens("sales@contoso.com"),
        vec![refresh.to_string()]
    );
    // The device code is spent.
    let (status, v) = poll(&idp, &code).await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&v), "invalid_grant");

    let counts = idp.counts();
    assert_eq!(counts.device_code_requests, 1);
    assert_eq!(counts.device_polls, 4);
    assert_eq!(counts.failed, 1);
    let reqs = idp.requests();
    assert_eq!(reqs.len(), 5);
    assert!(
        reqs[0]
            .path
            .ends_with("/organizations/oauth2/v2.0/devicecode")
    );
    assert_eq!(reqs[0].grant_type, None);
    assert_eq!(reqs[0].scope.as_deref(), Some(SCOPES));
    assert_eq!(reqs[1].grant_type.as_deref(), Some(DEVICE_GRANT));
    assert!(
        reqs.iter()
            .all(|r| r.secret_presented && r.client_id.as_deref() == Some(CLIENT))
    );
    let secrets = idp.secrets_ever();
    for s in [SECRET, code.as_str(), access, refresh] {
        assert!(secrets.iter().any(|x| x == s));
    }
    // Expired access tokens are refused by the book.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(!tokens.check("sales@contoso.com", access));
}

#[tokio::test(flavor = "multi_thread")]
async fn device_code_slow_down_declined_expired() {
    let (_tokens, idp) = idp().await;

    idp.set_device_outcome(DeviceOutcome::SlowDownThenApprove);
    let code = start_device(&idp, CLIENT, None).await;
    let (s, v) = poll(&idp, &code).await;
    assert_eq!((s, error_of(&v)), (400, "slow_down"));
    let (s, v) = poll(&idp, &code).await;
    assert_eq!((s, error_of(&v)), (400, "authorization_pending"));
    let (s, v) = poll(&idp, &code).await;
    assert_eq!(s, 200, "{v}");

    idp.set_device_outcome(DeviceOutcome::Decline);
    let code = start_device(&idp, CLIENT, None).await;
    let (s, v) = poll(&idp, &code).await;
    assert_eq!(s, 400);
    assert_ms_error(&v, "authorization_declined", 65004);

    idp.set_device_outcome(DeviceOutcome::Expire);
    let code = start_device(&idp, CLIENT, None).await;
    let (s, v) = poll(&idp, &code).await;
    assert_eq!(s, 400);
    assert_ms_error(&v, "expired_token", 70019);

    // Real expiry, whatever the outcome.
    idp.set_device_outcome(DeviceOutcome::ApproveAfterPolls(0));
    idp.set_device_expires_in(0);
    idp.set_device_interval(5);
    let (status, v) = post(
        &idp.device_code_url(TENANT),
        &[("client_id", PUBLIC_CLIENT), ("scope", SCOPES)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["interval"], 5);
    let code = v["device_code"].as_str().unwrap();
    let (s, v) = post(
        &idp.token_url(TENANT),
        &[
            ("grant_type", DEVICE_GRANT),
            ("client_id", PUBLIC_CLIENT),
            ("device_code", code),
        ],
    )
    .await;
    assert_eq!((s, error_of(&v)), (400, "expired_token"));

    // A confidential client polling without its secret.
    idp.set_device_expires_in(900);
    idp.set_device_interval(1);
    let code = start_device(&idp, CLIENT, None).await;
    let (s, v) = post(
        &idp.token_url(TENANT),
        &[
            ("grant_type", DEVICE_GRANT),
            ("client_id", CLIENT),
            ("device_code", &code),
        ],
    )
    .await;
    assert_eq!(s, 401);
    assert_ms_error(&v, "invalid_client", 7000218);
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_tokens_rotate_and_revoke() {
    let (tokens, idp) = idp().await;
    let rt1 = idp.issue_refresh_token("sales@contoso.com");
    let refresh = |rt: String| {
        let url = idp.token_url(TENANT);
        async move {
            post(
                &url,
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", CLIENT),
                    ("client_secret", SECRET),
                    ("refresh_token", &rt),
                    ("scope", SCOPES),
                ],
            )
            .await
        }
    };
    let (s, v) = refresh(rt1.clone()).await;
    assert_eq!(s, 200, "{v}");
    let rt2 = v["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rt1, rt2);
    assert!(tokens.check("sales@contoso.com", v["access_token"].as_str().unwrap()));
    // The used one is gone.
    let (s, v) = refresh(rt1.clone()).await;
    assert_eq!(s, 400);
    assert_ms_error(&v, "invalid_grant", 70000);
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS70000: The provided value for the 'refresh_token' is not valid")
    );
    // The new one works (also with HTTP Basic client authentication).
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT}:{SECRET}"));
    let resp = http()
        .post(idp.token_url(TENANT))
        .header("Authorization", format!("Basic {basic}"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt2.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    let rt3 = v["refresh_token"].as_str().unwrap().to_string();
    let access = v["access_token"].as_str().unwrap().to_string();
    assert!(idp.requests().last().unwrap().basic_auth);
    assert!(idp.requests().last().unwrap().secret_presented);
    assert_eq!(idp.counts().refresh_grants, 3);

    idp.revoke_grants("Sales@Contoso.com");
    assert!(!tokens.check("sales@contoso.com", &access));
    let (s, v) = refresh(rt3).await;
    assert_eq!((s, error_of(&v)), (400, "invalid_grant"));
    assert!(idp.valid_refresh_tokens("sales@contoso.com").is_empty());
    assert_eq!(idp.counts().failed, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_credentials_and_client_errors() {
    let (tokens, idp) = idp().await;
    let url = idp.token_url("contoso.onmicrosoft.com");
    let (s, v) = post(
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", SECRET),
            ("scope", "https://outlook.office365.com/.default"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v.get("refresh_token").is_none());
    assert!(tokens.check("anyone@contoso.com", v["access_token"].as_str().unwrap()));
    assert_eq!(idp.counts().client_credentials_grants, 1);

    // Wrong secret.
    let (s, v) = post(
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", "the-secret-id-not-its-value"),
            ("scope", "https://outlook.office365.com/.default"),
        ],
    )
    .await;
    assert_eq!(s, 401);
    assert_ms_error(&v, "invalid_client", 7000215);
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215: Invalid client secret provided.")
    );
    // Unknown client.
    let (s, v) = post(
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "00000000-0000-0000-0000-000000000000"),
            ("client_secret", SECRET),
            ("scope", "https://outlook.office365.com/.default"),
        ],
    )
    .await;
    assert_eq!(s, 400);
    assert_ms_error(&v, "unauthorized_client", 700016);
    // A public client cannot use client credentials.
    let (s, v) = post(
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", PUBLIC_CLIENT),
            ("scope", "https://outlook.office365.com/.default"),
        ],
    )
    .await;
    assert_eq!((s, error_of(&v)), (401, "invalid_client"));
    // Client credentials need /.default; delegated scopes of two resources are refused.
    let (s, v) = post(
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", SECRET),
            ("scope", "https://outlook.office365.com/IMAP.AccessAsApp"),
        ],
    )
    .await;
    assert_eq!((s, error_of(&v)), (400, "invalid_scope"));
    let (s, v) = post(
        &idp.device_code_url(TENANT),
        &[
            ("client_id", CLIENT),
            (
                "scope",
                "User.Read https://outlook.office.com/IMAP.AccessAsUser.All",
            ),
        ],
    )
    .await;
    assert_eq!(s, 400);
    assert_ms_error(&v, "invalid_scope", 700022);
    // Secrets never recorded.
    assert!(!format!("{:?}", idp.requests()).contains(SECRET));
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_code_with_pkce() {
    let (tokens, idp) = idp().await;
    idp.set_device_user("pkce@contoso.com");
    let verifier = "a-verifier-of-sufficient-length-0123456789-abcdefghijkl";
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    let redirect = "http://127.0.0.1:9/callback";
    let resp = http()
        .get(idp.authorize_url(TENANT))
        .query(&[
            ("client_id", CLIENT),
            ("response_type", "code"),
            ("redirect_uri", redirect),
            ("scope", SCOPES),
            ("state", "xyz"),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with("http://127.0.0.1:9/callback?code="),
        "{location}"
    );
    assert!(location.contains("&state=xyz"));
    let code = location
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("code="))
        .unwrap()
        .to_string();
    let code = code.replace("%2E", ".");
    let url = idp.token_url(TENANT);
    let form = |verifier: &'static str, code: String| {
        vec![
            ("grant_type", "authorization_code".to_string()),
            ("client_id", CLIENT.to_string()),
            ("client_secret", SECRET.to_string()),
            ("code", code),
            ("redirect_uri", redirect.to_string()),
            ("code_verifier", verifier.to_string()),
        ]
    };
    let send = |f: Vec<(&'static str, String)>| {
        let url = url.clone();
        async move {
            let resp = http().post(&url).form(&f).send().await.unwrap();
            let s = resp.status().as_u16();
            (
                s,
                serde_json::from_str::<Value>(&resp.text().await.unwrap()).unwrap(),
            )
        }
    };
    let (s, v) = send(form("wrong-verifier", code.clone())).await;
    assert_eq!((s, error_of(&v)), (400, "invalid_grant"));
    let (s, v) = send(form(
        "a-verifier-of-sufficient-length-0123456789-abcdefghijkl",
        code.clone(),
    ))
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(tokens.check("pkce@contoso.com", v["access_token"].as_str().unwrap()));
    assert!(v["refresh_token"].is_string());
    // Single use.
    let (s, v) = send(form(
        "a-verifier-of-sufficient-length-0123456789-abcdefghijkl",
        code,
    ))
    .await;
    assert_eq!(s, 400);
    assert_ms_error(&v, "invalid_grant", 54005);
    // A seeded code.
    let seeded = idp.issue_authorization_code("seeded@contoso.com");
    let (s, v) = send(form("anything", seeded)).await;
    assert_eq!(s, 200, "{v}");
    assert!(tokens.check("seeded@contoso.com", v["access_token"].as_str().unwrap()));
    assert_eq!(idp.counts().authorization_code_grants, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn idp_failure_modes() {
    let (_tokens, idp) = idp().await;
    let rt = idp.issue_refresh_token("sales@contoso.com");
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", CLIENT),
        ("client_secret", SECRET),
        ("refresh_token", rt.as_str()),
    ];
    idp.set_mode(IdpMode::Unavailable);
    let resp = http()
        .post(idp.token_url(TENANT))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.text().await.unwrap().contains("<html>"));

    idp.set_mode(IdpMode::Garbage);
    let resp = http()
        .post(idp.token_url(TENANT))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(serde_json::from_str::<Value>(&resp.text().await.unwrap()).is_err());

    idp.set_mode(IdpMode::Error {
        status: 400,
        error: "invalid_grant".into(),
        code: 50173,
    });
    let (s, v) = post(&idp.token_url(TENANT), &form).await;
    assert_eq!(s, 400);
    assert_ms_error(&v, "invalid_grant", 50173);

    idp.set_mode(IdpMode::Hang);
    let started = std::time::Instant::now();
    let r = http()
        .post(idp.token_url(TENANT))
        .timeout(Duration::from_millis(400))
        .form(&form)
        .send()
        .await;
    assert!(r.is_err() && r.unwrap_err().is_timeout());
    assert!(started.elapsed() < Duration::from_secs(2));

    // The grant survived all of that; a delayed answer arrives after the delay.
    idp.set_mode(IdpMode::Normal);
    idp.set_response_delay(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let (s, _) = post(&idp.token_url(TENANT), &form).await;
    assert_eq!(s, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let counts = idp.counts();
    assert_eq!(counts.refresh_grants, 5);
    assert_eq!(counts.failed, 4);
    let statuses: Vec<u16> = idp.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 200, 400, 0, 200]);
}

async fn get_json(url: &str) -> Value {
    let text = http()
        .get(url)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

/// RFC 7662 introspection (what Dovecot's `oauth2` passdb asks) and the control
/// hooks the end-to-end suite drives the standalone IdP with.
#[tokio::test(flavor = "multi_thread")]
async fn introspection_and_control_hooks() {
    let (tokens, idp) = idp().await;
    let introspect = |token: String| {
        let url = format!("{}/introspect", idp.base_url());
        async move { post(&url, &[("token", token.as_str())]).await }
    };
    let mailbox = tokens.issue(
        Subject::Mailbox("sales@contoso.com".into()),
        Duration::from_secs(60),
    );
    let app = tokens.issue(Subject::App, Duration::from_secs(60));

    let (s, v) = introspect(mailbox.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["active"], true);
    assert_eq!(v["email"], "sales@contoso.com");
    assert!(v["exp"].as_u64().unwrap() > v["iat"].as_u64().unwrap());
    assert_eq!(
        introspect("not-a-token".into()).await.1,
        json!({"active": false})
    );
    // App-only tokens name the configured app mailbox, and are inactive without one.
    assert_eq!(introspect(app.clone()).await.1["active"], false);
    idp.set_app_mailbox(Some("notify@contoso.com"));
    assert_eq!(
        introspect(app.clone()).await.1["email"],
        "notify@contoso.com"
    );

    let control = |path: &str| format!("{}/control/{path}", idp.base_url());
    let rt = idp.issue_refresh_token("sales@contoso.com");
    let refresh_tokens = || async {
        get_json(&control("refresh-tokens?mailbox=sales%40contoso.com")).await["refresh_tokens"]
            .clone()
    };
    assert_eq!(refresh_tokens().await, json!([rt]));

    // Revoking access tokens only: the refresh token still works.
    let (s, _) = post(
        &control("revoke-access-tokens"),
        &[("mailbox", "sales@contoso.com")],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(introspect(mailbox.clone()).await.1["active"], false);
    assert_eq!(refresh_tokens().await, json!([rt]));
    // Revoking the grant: refresh tokens go too; app tokens stay.
    let fresh = tokens.issue(
        Subject::Mailbox("sales@contoso.com".into()),
        Duration::from_secs(60),
    );
    let (s, _) = post(&control("revoke"), &[("mailbox", "sales@contoso.com")]).await;
    assert_eq!(s, 200);
    assert_eq!(introspect(fresh).await.1["active"], false);
    assert_eq!(refresh_tokens().await, json!([]));
    assert_eq!(introspect(app).await.1["active"], true);

    let (s, _) = post(&control("device-user"), &[("mailbox", "ops@contoso.com")]).await;
    assert_eq!(s, 200);
    let code = start_device(&idp, CLIENT, Some(SECRET)).await;
    for _ in 0..2 {
        poll(&idp, &code).await;
    }
    let (s, v) = poll(&idp, &code).await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = introspect(v["access_token"].as_str().unwrap().to_string()).await;
    assert_eq!(v["email"], "ops@contoso.com");

    let counts = get_json(&control("counts")).await;
    assert_eq!(counts["introspections"], 8, "{counts}");
    assert_eq!(counts["introspections_active"], 4, "{counts}");
    assert_eq!(counts["device_polls"], 3, "{counts}");
    assert_eq!(idp.counts().introspections, 8);
    let requests = get_json(&control("requests")).await;
    assert_eq!(
        requests["requests"].as_array().unwrap().len(),
        4,
        "{requests}"
    );
    let secrets = get_json(&control("secrets")).await;
    assert!(
        secrets["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == &json!(rt))
    );
    let (s, _) = post(&control("nothing-here"), &[]).await;
    assert_eq!(s, 404);
}

// ---------------------------------------------------------------------------
// IMAP

type Tls = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

async fn imap_connect(pki: &TestPki, port: u16) -> Tls {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(5), pki.connector().connect(name, tcp))
        .await
        .unwrap()
        .unwrap();
    BufReader::new(tls)
}

async fn line(c: &mut Tls) -> String {
    let mut s = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_line(&mut s))
        .await
        .expect("IMAP line in time")
        .unwrap();
    s.trim_end().to_string()
}

async fn send(c: &mut Tls, text: &str) {
    c.get_mut()
        .write_all(format!("{text}\r\n").as_bytes())
        .await
        .unwrap();
    c.get_mut().flush().await.unwrap();
}

/// Sends a command; returns every line up to and including the tagged one.
async fn cmd(c: &mut Tls, tag: &str, text: &str) -> Vec<String> {
    send(c, &format!("{tag} {text}")).await;
    let mut lines = Vec::new();
    loop {
        let l = line(c).await;
        let done = l.starts_with(&format!("{tag} "));
        lines.push(l);
        if done {
            return lines;
        }
    }
}

async fn imap_setup() -> (TestPki, TokenBook, MockImapUpstream) {
    let pki = TestPki::new();
    let tokens = TokenBook::default();
    let up = imap::start(&pki, tokens.clone()).await;
    (pki, tokens, up)
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_xoauth2_inline_and_continuation() {
    let (pki, tokens, up) = imap_setup().await;
    let token = tokens.issue(
        Subject::Mailbox("sales@contoso.com".into()),
        Duration::from_secs(60),
    );

    let mut c = imap_connect(&pki, up.port()).await;
    assert!(
        line(&mut c)
            .await
            .starts_with("* OK The Microsoft Exchange IMAP4 service is ready.")
    );
    let caps = cmd(&mut c, "a1", "CAPABILITY").await;
    assert!(caps[0].contains("AUTH=XOAUTH2") && caps[0].contains("LOGINDISABLED"));
    assert_eq!(
        cmd(&mut c, "a2", "LOGIN sales@contoso.com pw").await,
        vec!["a2 NO LOGIN failed."]
    );
    assert_eq!(
        cmd(&mut c, "a3", "SELECT INBOX").await.last().unwrap(),
        "a3 BAD Command received in Invalid state."
    );
    // Wrong mailbox for the token → Microsoft style failure.
    let r = cmd(
        &mut c,
        "a4",
        &format!(
            "AUTHENTICATE XOAUTH2 {}",
            xoauth2("other@contoso.com", &token)
        ),
    )
    .await;
    assert_eq!(r, vec!["a4 NO AUTHENTICATE failed."]);
    let r = cmd(
        &mut c,
        "a5",
        &format!(
            "AUTHENTICATE XOAUTH2 {}",
            xoauth2("sales@contoso.com", &token)
        ),
    )
    .await;
    assert_eq!(r, vec!["a5 OK AUTHENTICATE completed."]);
    let caps = cmd(&mut c, "a6", "CAPABILITY").await;
    assert!(
        caps[0].contains("AUTH=PLAIN")
            && caps[0].contains("AUTH=XOAUTH2")
            && !caps[0].contains("LOGINDISABLED")
    );
    assert_eq!(
        cmd(&mut c, "a7", "NAMESPACE").await[0],
        r#"* NAMESPACE (("" "/")) NIL NIL"#
    );
    let r = cmd(&mut c, "a8", "LOGOUT").await;
    assert!(r[0].starts_with("* BYE"));

    // The two-step form, through `+ `.
    let mut c = imap_connect(&pki, up.port()).await;
    line(&mut c).await;
    send(&mut c, "b1 AUTHENTICATE XOAUTH2").await;
    assert_eq!(line(&mut c).await, "+");
    let payload = xoauth2("SALES@contoso.com", &token);
    assert!(payload.len() > 2000);
    send(&mut c, &payload).await;
    assert_eq!(line(&mut c).await, "b1 OK AUTHENTICATE completed.");
    let r = cmd(&mut c, "b2", "SELECT INBOX").await;
    assert_eq!(r.last().unwrap(), "b2 OK [READ-WRITE] SELECT completed.");
    assert!(r.contains(&"* 0 EXISTS".to_string()));

    // Synchronising APPEND literal, then FETCH it back.
    let msg = b"From: A <a@example.com>\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nhello\r\n";
    send(
        &mut c,
        &format!("b3 APPEND INBOX (\\Seen) {{{}}}", msg.len()),
    )
    .await;
    assert_eq!(line(&mut c).await, "+ Ready for additional command text.");
    c.get_mut().write_all(msg).await.unwrap();
    send(&mut c, "").await;
    let l = line(&mut c).await;
    assert_eq!(l, "* 1 EXISTS");
    assert_eq!(
        line(&mut c).await,
        "b3 OK [APPENDUID 14 1] APPEND completed."
    );
    send(
        &mut c,
        "b4 UID FETCH 1:* (FLAGS BODY.PEEK[]<0.4> ENVELOPE BODYSTRUCTURE)",
    )
    .await;
    let first = line(&mut c).await;
    assert!(
        first.starts_with("* 1 FETCH (UID 1 FLAGS (\\Seen) BODY[]<0> {4}"),
        "{first}"
    );
    let mut four = [0u8; 4];
    c.read_exact(&mut four).await.unwrap();
    assert_eq!(&four, b"From");
    let rest = line(&mut c).await;
    assert!(
        rest.contains(r#"ENVELOPE (NIL "hi" (("A" NIL "a" "example.com"))"#),
        "{rest}"
    );
    assert!(rest.contains(r#"BODYSTRUCTURE ("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 7 1 NIL NIL NIL NIL)"#), "{rest}");
    assert_eq!(line(&mut c).await, "b4 OK UID FETCH completed.");
    assert_eq!(
        cmd(&mut c, "b5", "UID SEARCH ALL").await,
        vec!["* SEARCH 1", "b5 OK UID SEARCH completed."]
    );
    assert_eq!(up.messages("sales@contoso.com"), vec![msg.to_vec()]);

    let stats = up.stats();
    assert_eq!(
        (stats.connections, stats.auth_ok, stats.auth_failed),
        (2, 2, 2)
    );
    assert_eq!(up.tokens_seen().len(), 3);
    assert_eq!(
        up.commands_seen(),
        vec![
            "CAPABILITY",
            "NAMESPACE",
            "LOGOUT",
            "SELECT",
            "APPEND",
            "UID FETCH",
            "UID SEARCH"
        ]
    );
    drop(c);
    up.wait_for_stats(|s| s.active == 0, Duration::from_secs(2))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_challenge_not_connected_hang_stopped() {
    let (pki, tokens, up) = imap_setup().await;
    let token = tokens.issue(
        Subject::Mailbox("sales@contoso.com".into()),
        Duration::from_secs(60),
    );

    up.set_failure_style(FailureStyle::Challenge);
    let mut c = imap_connect(&pki, up.port()).await;
    line(&mut c).await;
    send(
        &mut c,
        &format!(
            "c1 AUTHENTICATE XOAUTH2 {}",
            xoauth2("sales@contoso.com", "bogus")
        ),
    )
    .await;
    let challenge = line(&mut c).await;
    let b64 = challenge.strip_prefix("+ ").expect("a challenge");
    let json: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json["status"], "401");
    // Nothing more until the client answers.
    let mut s = String::new();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), c.read_line(&mut s))
            .await
            .is_err()
    );
    send(&mut c, "").await;
    assert_eq!(
        line(&mut c).await,
        "c1 NO [AUTHENTICATIONFAILED] Authentication failed."
    );

    up.set_not_connected(true);
    let mut c = imap_connect(&pki, up.port()).await;
    line(&mut c).await;
    let r = cmd(
        &mut c,
        "d1",
        &format!(
            "AUTHENTICATE XOAUTH2 {}",
            xoauth2("sales@contoso.com", &token)
        ),
    )
    .await;
    assert_eq!(r, vec!["d1 OK AUTHENTICATE completed."]);
    assert_eq!(
        cmd(&mut c, "d2", "NAMESPACE").await,
        vec!["d2 BAD User is authenticated but not connected."]
    );
    assert!(
        cmd(&mut c, "d3", "LOGOUT")
            .await
            .last()
            .unwrap()
            .starts_with("d3 OK")
    );
    up.set_not_connected(false);

    up.set_hang(true);
    let mut c = imap_connect(&pki, up.port()).await;
    let mut s = String::new();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.read_line(&mut s))
            .await
            .is_err()
    );
    up.set_hang(false);

    up.set_stopped(true);
    // Anything that slips in before the listener closes is dropped at once; soon
    // connections are refused outright.
    let mut refused = false;
    for _ in 0..50 {
        match TcpStream::connect(("127.0.0.1", up.port())).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            Err(_) => {}
            Ok(mut tcp) => {
                let mut buf = [0u8; 1];
                let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf))
                    .await
                    .unwrap();
                assert!(matches!(n, Ok(0) | Err(_)));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused);
    let before = up.stats().connections;
    up.set_stopped(false);
    let mut c = imap_connect(&pki, up.port()).await;
    assert!(line(&mut c).await.starts_with("* OK"));
    assert_eq!(up.stats().connections, before + 1);
}

async fn eof(c: &mut Tls) -> bool {
    let mut s = String::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), c.read_line(&mut s)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_session_expiry_and_kick() {
    let (pki, tokens, up) = imap_setup().await;
    up.set_expire_sessions(true);
    let user = "sales@contoso.com";
    let login = |tag: &'static str, token: String| {
        let pki = &pki;
        let port = up.port();
        async move {
            let mut c = imap_connect(pki, port).await;
            line(&mut c).await;
            let r = cmd(
                &mut c,
                tag,
                &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(user, &token)),
            )
            .await;
            assert_eq!(r, vec![format!("{tag} OK AUTHENTICATE completed.")]);
            c
        }
    };
    let t1 = tokens.issue(Subject::Mailbox(user.into()), Duration::from_secs(60));
    let mut c = login("e1", t1.clone()).await;
    assert_eq!(
        cmd(&mut c, "e2", "NOOP").await,
        vec!["e2 OK NOOP completed."]
    );
    tokens.expire(&t1);
    send(&mut c, "e3 NOOP").await;
    assert_eq!(
        line(&mut c).await,
        "* BYE Session invalidated - AccessTokenExpired"
    );
    assert!(eof(&mut c).await);

    let t2 = tokens.issue(Subject::Mailbox(user.into()), Duration::from_secs(60));
    let mut c = login("f1", t2.clone()).await;
    cmd(&mut c, "f2", "SELECT INBOX").await;
    send(&mut c, "f3 IDLE").await;
    assert_eq!(
        line(&mut c).await,
        "+ IDLE accepted, awaiting DONE command."
    );
    up.add_message(user, b"Subject: new\r\n\r\nnew\r\n".to_vec());
    assert_eq!(line(&mut c).await, "* 1 EXISTS");
    tokens.revoke(&Subject::Mailbox(user.into()));
    assert_eq!(
        line(&mut c).await,
        "* BYE Session invalidated - AccessTokenExpired"
    );
    assert!(eof(&mut c).await);

    let t3 = tokens.issue(Subject::Mailbox(user.into()), Duration::from_secs(60));
    let mut c = login("g1", t3).await;
    up.kick_all();
    assert!(eof(&mut c).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_large_append_and_fetch_are_fast() {
    let (pki, tokens, up) = imap_setup().await;
    let token = tokens.issue(
        Subject::Mailbox("big@contoso.com".into()),
        Duration::from_secs(60),
    );
    let mut c = imap_connect(&pki, up.port()).await;
    line(&mut c).await;
    let r = cmd(
        &mut c,
        "p1",
        &format!(
            "AUTHENTICATE XOAUTH2 {}",
            xoauth2("big@contoso.com", &token)
        ),
    )
    .await;
    assert_eq!(r, vec!["p1 OK AUTHENTICATE completed."]);
    let mut msg = b"Subject: big\r\n\r\n".to_vec();
    msg.resize(30 * 1024 * 1024, b'x');
    let started = std::time::Instant::now();
    c.get_mut()
        .write_all(format!("p2 APPEND INBOX {{{}+}}\r\n", msg.len()).as_bytes())
        .await
        .unwrap();
    c.get_mut().write_all(&msg).await.unwrap();
    send(&mut c, "").await;
    assert_eq!(
        line(&mut c).await,
        "p2 OK [APPENDUID 14 1] APPEND completed."
    );
    let append_time = started.elapsed();
    let r = cmd(&mut c, "p3", "EXAMINE INBOX").await;
    assert_eq!(r.last().unwrap(), "p3 OK [READ-ONLY] EXAMINE completed.");
    let started = std::time::Instant::now();
    send(&mut c, "p4 UID FETCH 1 (RFC822.SIZE BODY.PEEK[])").await;
    let head = line(&mut c).await;
    assert_eq!(
        head,
        format!("* 1 FETCH (UID 1 RFC822.SIZE {0} BODY[] {{{0}}}", msg.len())
    );
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line(&mut c).await, ")");
    assert_eq!(line(&mut c).await, "p4 OK UID FETCH completed.");
    let fetch_time = started.elapsed();
    assert!(got == msg);
    eprintln!("30 MB: append {append_time:?}, fetch {fetch_time:?}");
    assert!(append_time < Duration::from_secs(3) && fetch_time < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn imapflow_direct_to_mock_upstream() {
    let (pki, tokens, up) = imap_setup().await;
    let mailbox = "sales@contoso.com";
    let token = tokens.issue(Subject::Mailbox(mailbox.into()), Duration::from_secs(300));

    up.add_message(
        mailbox,
        b"From: x@example.com\r\nSubject: small\r\n\r\nsmall\r\n".to_vec(),
    );
    let mut big = b"From: \"Big Sender\" <big@example.com>\r\nTo: sales@contoso.com\r\nSubject: five megabytes\r\nMessage-ID: <big@example.com>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".to_vec();
    while big.len() < 5 * 1024 * 1024 {
        big.extend_from_slice(
            b"0123456789 The quick brown fox jumps over the lazy dog. abcdefghijklmnop\r\n",
        );
    }
    let big_sha = hex(&sha2::Sha256::digest(&big));
    let uid = up.add_message(mailbox, big.clone());

    let args = json!({
        "host": "127.0.0.1",
        "port": up.port(),
        "secure": true,
        "user": mailbox,
        "accessToken": token,
        "caFile": pki.ca_pem_path,
        "steps": ["select", "fetch", "download", "append", "idle", "list"],
        "fetchUid": uid,
        "appendSize": 3 * 1024 * 1024,
    });
    let started = std::time::Instant::now();
    let out = testkit::node::imapflow(&args, 40).await;
    assert_eq!(out["ok"], true, "{out}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(out["exists"], 2);
    assert_eq!(out["fetched"]["size"], big.len());
    assert_eq!(out["fetched"]["sha256"], big_sha);
    assert_eq!(out["fetched"]["subject"], "five megabytes");
    assert_eq!(out["downloaded"]["sha256"], big_sha);
    assert_eq!(out["idled"], true);
    assert_eq!(out["enabled"], json!(["UTF8=ACCEPT"]));
    let caps: Vec<String> = serde_json::from_value(out["capabilities"].clone()).unwrap();
    assert!(caps.contains(&"IDLE".to_string()));
    assert_eq!(out["appended"]["uid"], 3);

    let stored = up.messages(mailbox);
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[2].len(), 3 * 1024 * 1024);
    assert_eq!(
        hex(&sha2::Sha256::digest(&stored[2])),
        out["appended"]["sha256"].as_str().unwrap()
    );
    let list = out["list"].as_array().unwrap();
    let inbox = list.iter().find(|b| b["path"] == "INBOX").unwrap();
    assert_eq!(inbox["status"]["messages"], 3);
    assert!(
        list.iter()
            .any(|b| b["path"] == "Sent" && b["specialUse"] == "\\Sent")
    );

    let seen = up.commands_seen();
    for expected in [
        "NAMESPACE",
        "ENABLE",
        "SELECT",
        "UID FETCH",
        "APPEND",
        "IDLE",
        "NOOP",
        "LIST",
        "STATUS",
        "LOGOUT",
    ] {
        assert!(
            seen.iter().any(|c| c == expected),
            "{expected} not in {seen:?}"
        );
    }
    assert_eq!(up.tokens_seen(), vec![token]);
    assert_eq!(up.stats().auth_ok, 1);

    // A bad token: imapflow reports an authentication failure.
    let mut args = args;
    args["accessToken"] = json!("not-a-token");
    args["steps"] = json!([]);
    let out = testkit::node::imapflow(&args, 30).await;
    assert_eq!(out["ok"], false, "{out}");
    assert_eq!(out["authenticationFailed"], true, "{out}");
    assert_eq!(out["responseStatus"], "NO", "{out}");
    assert_eq!(out["responseText"], "AUTHENTICATE failed.", "{out}");

    // Outlook's "authenticated but not connected": imapflow turns it into an auth failure.
    up.set_not_connected(true);
    args["accessToken"] =
        json!(tokens.issue(Subject::Mailbox(mailbox.into()), Duration::from_secs(60)));
    let out = testkit::node::imapflow(&args, 30).await;
    assert_eq!(out["ok"], false, "{out}");
    assert_eq!(out["authenticationFailed"], true, "{out}");
    assert!(
        out["response"]
            .as_str()
            .unwrap_or("")
            .contains("User is authenticated but not connected"),
        "{out}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// The wire helpers the kit shares with the tests

#[test]
fn an_xoauth2_response_that_is_built_is_read_back() {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(xoauth2("sales@contoso.com", "tok"))
        .unwrap();
    assert_eq!(raw, b"user=sales@contoso.com\x01auth=Bearer tok\x01\x01");
    assert_eq!(
        testkit::parse_xoauth2(&raw),
        Some(("sales@contoso.com".to_string(), "tok".to_string()))
    );
}

#[test]
fn malformed_xoauth2_responses_are_refused() {
    for raw in [
        &b"user=a\x01auth=Bearer t\x01"[..],
        b"user=\x01auth=Bearer t\x01\x01",
        b"user=a\x01auth=Bearer \x01\x01",
        b"user=a\x01auth=Basic t\x01\x01",
        b"auth=Bearer t\x01\x01",
    ] {
        assert_eq!(testkit::parse_xoauth2(raw), None, "{raw:?}");
    }
    assert!(testkit::parse_xoauth2(b"user=a\x01auth=bearer t\x01\x01").is_some());
}

#[test]
fn literals_are_found_at_the_end_of_a_line() {
    type Case = (&'static [u8], Option<(usize, bool)>);
    let cases: &[Case] = &[
        (b"a LOGIN {12}\r\n", Some((12, true))),
        (b"a LOGIN {12+}\r\n", Some((12, false))),
        (b"* 1 FETCH (BODY[] {3}", Some((3, true))),
        (b"a APPEND INBOX ~{7}", Some((7, true))),
        (b"a LOGIN {}\r\n", None),
        (b"a LOGIN {1x}\r\n", None),
        (b"a LOGIN {12345678901}\r\n", None),
        (b"a NOOP\r\n", None),
    ];
    for (line, expected) in cases {
        assert_eq!(testkit::literal_announced(line), *expected, "{line:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redeemed_refresh_token_works_until_its_successor_is_used_and_reuse_is_counted() {
    let (_tokens, idp) = idp().await;
    idp.set_rotation(testkit::idp::Rotation::SpentWhenSuccessorUsed);
    let refresh = |rt: String| {
        let url = idp.token_url(TENANT);
        async move {
            let form = [
                ("grant_type", "refresh_token"),
                ("client_id", CLIENT),
                ("client_secret", SECRET),
                ("refresh_token", rt.as_str()),
            ];
            let (status, v) = post(&url, &form).await;
            (
                status,
                v["refresh_token"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    let rt1 = idp.issue_refresh_token("sales@contoso.com");
    let (_, lost) = refresh(rt1.clone()).await;
    // The client died before saving `lost`: the token it kept still works,
    // and the successor it never saw is replaced.
    let (status, rt2) = refresh(rt1.clone()).await;
    assert_eq!(status, 200);
    let mut valid = idp.valid_refresh_tokens("sales@contoso.com");
    valid.sort();
    let mut expected = vec![rt1.clone(), rt2.clone()];
    expected.sort();
    assert_eq!(valid, expected, "the unused successor is gone");
    // Using rt2 retires rt1; going back to rt1 (or to `lost`) is refused and counted.
    let (status, _rt3) = refresh(rt2).await;
    assert_eq!(status, 200);
    assert_eq!(refresh(rt1).await.0, 400);
    assert_eq!(refresh(lost).await.0, 400);
    assert_eq!(idp.counts().superseded_refresh_tokens_presented, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_delay_redeems_the_token_before_a_client_that_gave_up_hears_of_it() {
    let (_tokens, idp) = idp().await;
    idp.set_answer_delay(Duration::from_millis(300));
    let rt = idp.issue_refresh_token("sales@contoso.com");
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", CLIENT),
        ("client_secret", SECRET),
        ("refresh_token", rt.as_str()),
    ];
    let sent = impatient
        .post(idp.token_url(TENANT))
        .form(&form)
        .send()
        .await;
    assert!(sent.is_err(), "no answer within 50 ms");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while idp.requests_in_flight() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(idp.requests()[0].status, 200, "redeemed");
    let valid = idp.valid_refresh_tokens("sales@contoso.com");
    assert_eq!(valid.len(), 1);
    assert_ne!(
        valid[0], rt,
        "spent: only the successor nobody saw is valid"
    );
}

// ---- testkit::metrics: the /metrics reader the proxy tests use --------------

/// A `/metrics` text as the proxy writes it (OpenMetrics).
const METRICS_TEXT: &str = "\
# HELP xoauth2_proxy_logins_total Logins.
# TYPE xoauth2_proxy_logins_total counter
xoauth2_proxy_logins_total{protocol=\"imap\",outcome=\"ok\"} 2
xoauth2_proxy_logins_total{protocol=\"imap\",outcome=\"bad_password\"} 1
xoauth2_proxy_logins_total{protocol=\"smtp\",outcome=\"ok\"} 4
xoauth2_proxy_grant_store_up 1
xoauth2_proxy_account_needs_login{account=\"a\\\"b@contoso.com\"} 0
xoauth2_proxy_upstream_login_seconds_count 3 1700000000.5
# EOF
";

#[test]
fn metrics_reader_finds_a_series_by_its_name_and_some_of_its_labels_in_any_order() {
    let ok_imap = [("outcome", "ok"), ("protocol", "imap")];
    assert_eq!(
        metrics::value(METRICS_TEXT, "xoauth2_proxy_logins_total", &ok_imap),
        Some(2.0)
    );
    let imap = [("protocol", "imap")];
    assert_eq!(
        metrics::value(METRICS_TEXT, "xoauth2_proxy_logins_total", &imap),
        Some(3.0)
    );
    assert_eq!(
        metrics::value(METRICS_TEXT, "xoauth2_proxy_logins_total", &[]),
        Some(7.0)
    );
}

#[test]
fn metrics_reader_reads_series_without_labels_and_with_a_timestamp() {
    assert_eq!(
        metrics::value(METRICS_TEXT, "xoauth2_proxy_grant_store_up", &[]),
        Some(1.0)
    );
    let count = "xoauth2_proxy_upstream_login_seconds_count";
    assert_eq!(metrics::value(METRICS_TEXT, count, &[]), Some(3.0));
}

#[test]
fn metrics_reader_compares_an_escaped_label_value_unescaped() {
    let account = [("account", "a\"b@contoso.com")];
    let name = "xoauth2_proxy_account_needs_login";
    assert_eq!(metrics::value(METRICS_TEXT, name, &account), Some(0.0));
}

#[test]
fn metrics_reader_says_a_missing_series_is_none_not_zero() {
    let pop3 = [("protocol", "pop3")];
    assert_eq!(
        metrics::value(METRICS_TEXT, "xoauth2_proxy_logins_total", &pop3),
        None
    );
    assert_eq!(
        metrics::value(METRICS_TEXT, "xoauth2_proxy_logins", &[]),
        None
    );
}
