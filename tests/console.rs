//! The web console over HTTP, against the real binary, the test identity
//! provider and the mock mail servers: the admin session, CSRF, the
//! throttle, each account's state, Connect (device code and browser
//! sign-in), Disconnect and Check, and that no secret reaches a page, a URL
//! or the log. The same console in a real browser: tests/console_browser.rs.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use testkit::idp::DeviceOutcome;
use testkit::proxy::{AccountSpec, TestProxy, with_console};
use testkit::world::{LineClient, World};

const ADMIN_PASSWORD: &str = "console admin pw 7Hq";
const SALES: &str = "sales@contoso.com";
const OPS: &str = "ops@contoso.com";

/// A browser's worth of HTTP: one cookie jar of one cookie, no redirects
/// followed, and every body kept to look for secrets at the end.
struct Browser {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
    seen: Vec<String>,
}

struct Page {
    status: StatusCode,
    location: Option<String>,
    body: String,
}

impl Browser {
    fn new(proxy: &TestProxy) -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: format!("http://{}", proxy.admin_addr),
            cookie: None,
            seen: Vec::new(),
        }
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> Page {
        let request = match &self.cookie {
            Some(c) => request.header(COOKIE, format!("xoauth2_console={c}")),
            None => request,
        };
        let response = request.send().await.unwrap();
        for set in response.headers().get_all(SET_COOKIE) {
            let set = set.to_str().unwrap();
            assert!(
                set.contains("HttpOnly") && set.contains("SameSite=Strict"),
                "{set}"
            );
            let value = set
                .strip_prefix("xoauth2_console=")
                .and_then(|v| v.split(';').next())
                .unwrap();
            self.cookie = (!value.is_empty()).then(|| value.to_string());
        }
        let status = response.status();
        let location = response
            .headers()
            .get(LOCATION)
            .map(|l| l.to_str().unwrap().to_string());
        let body = response.text().await.unwrap();
        self.seen.push(body.clone());
        self.seen.extend(location.clone());
        Page {
            status,
            location,
            body,
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let url = format!("{}{path}", self.base);
        self.send(self.http.get(url)).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let url = format!("{}{path}", self.base);
        self.send(self.http.post(url).form(form)).await
    }

    /// Logs in with `password`; the answer to the login form.
    async fn log_in(&mut self, password: &str) -> Page {
        let form = self.get("/login").await;
        assert_eq!(form.status, StatusCode::OK);
        let csrf = csrf(&form.body);
        self.post("/login", &[("csrf", &csrf), ("password", password)])
            .await
    }

    /// Logs in with the right password and returns the Accounts page.
    async fn signed_in(&mut self) -> Page {
        let login = self.log_in(ADMIN_PASSWORD).await;
        assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
        assert_eq!(login.location.as_deref(), Some("/accounts"));
        let page = self.get("/accounts").await;
        assert_eq!(page.status, StatusCode::OK);
        page
    }

    /// Posts `action` for `account` with the CSRF token of the Accounts page.
    async fn act(&mut self, action: &str, account: &str) -> Page {
        let page = self.get("/accounts").await;
        let csrf = csrf(&page.body);
        self.post(
            &format!("/accounts/{action}"),
            &[("csrf", &csrf), ("account", account)],
        )
        .await
    }

    /// The row of `account` on the Accounts page.
    async fn row(&mut self, account: &str) -> String {
        let page = self.get("/accounts").await;
        row(&page.body, account)
    }
}

/// The CSRF token of the first form of `page`.
fn csrf(page: &str) -> String {
    let start = page
        .find(r#"name="csrf" value=""#)
        .expect("a form with a CSRF token")
        + r#"name="csrf" value=""#.len();
    page[start..][..page[start..].find('"').unwrap()].to_string()
}

fn row(page: &str, account: &str) -> String {
    let start = page
        .find(&format!(r#"data-account="{account}""#))
        .unwrap_or_else(|| panic!("no row for {account} in\n{page}"));
    let end = page[start..].find("</tr>").unwrap();
    page[start..start + end].to_string()
}

fn state(row: &str) -> &str {
    let start = row.find(r#"data-state=""#).unwrap() + r#"data-state=""#.len();
    &row[start..][..row[start..].find('"').unwrap()]
}

async fn console_proxy(world: &World, accounts: &[AccountSpec], extra: &str) -> TestProxy {
    let extra = extra.to_string();
    TestProxy::start_with(&world.endpoints, accounts, "debug", move |text| {
        with_console(text, ADMIN_PASSWORD) + &extra
    })
    .await
}

/// Like [`console_proxy`], with `granted` holding a grant before the proxy
/// starts (as after `xoauth2-proxy login`).
async fn console_proxy_granted(world: &World, granted: &AccountSpec, extra: &str) -> TestProxy {
    let extra = extra.to_string();
    TestProxy::start_with(
        &world.endpoints,
        std::slice::from_ref(granted),
        "debug",
        move |text| {
            let state_dir = text
                .lines()
                .find_map(|l| l.strip_prefix("state_dir = "))
                .map(|d| std::path::PathBuf::from(d.trim_matches('"')))
                .expect("the generated config names its state_dir");
            world.grant_in(&state_dir, granted);
            with_console(text, ADMIN_PASSWORD) + &extra
        },
    )
    .await
}

fn browser_account(username: &str) -> AccountSpec {
    AccountSpec {
        flow: "authorization_code",
        ..AccountSpec::device(username, "pw")
    }
}

/// No secret the test kit knows of, nor the admin password, in `text`.
fn assert_no_secret(world: &World, what: &str, text: &str) {
    for secret in world
        .secrets()
        .iter()
        .map(String::as_str)
        .chain([ADMIN_PASSWORD])
    {
        assert!(!text.contains(secret), "a secret is in the {what}");
    }
}

#[tokio::test]
async fn no_page_without_the_admin_session() {
    let world = World::start().await;
    let proxy = console_proxy(&world, &[AccountSpec::device(SALES, "pw")], "").await;
    world.grant(&proxy, &AccountSpec::device(SALES, "pw"));
    let mut b = Browser::new(&proxy);
    for path in ["/", "/accounts"] {
        let page = b.get(path).await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(page.location.as_deref(), Some("/login"));
    }
    assert_eq!(
        b.get("/accounts/rows").await.status,
        StatusCode::UNAUTHORIZED
    );
    // A session that is not signed in (the login form's) is not enough either.
    let form = b.get("/login").await;
    let token = csrf(&form.body);
    for action in ["disconnect", "connect", "check"] {
        let page = b
            .post(
                &format!("/accounts/{action}"),
                &[("csrf", &token), ("account", SALES)],
            )
            .await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{action}");
    }
    assert!(
        proxy
            .state_dir
            .join("tokens/sales@contoso.com.json")
            .exists()
    );
    let grant =
        std::fs::read_to_string(proxy.state_dir.join("tokens/sales@contoso.com.json")).unwrap();
    assert!(
        grant.contains("refresh_token\":\""),
        "the grant is untouched"
    );
    // The probes stay as they were: open, and the same.
    assert_eq!(b.get("/healthz").await.body, "ok\n");
    assert_eq!(b.get("/metrics").await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_accounts_page_shows_each_account_and_its_state() {
    let world = World::start().await;
    let accounts = [
        AccountSpec::device(SALES, "pw"),
        AccountSpec::device(OPS, "pw"),
    ];
    let proxy = console_proxy(&world, &accounts, "").await;
    world.grant(&proxy, &accounts[0]);
    let mut b = Browser::new(&proxy);
    let page = b.signed_in().await;
    let sales = row(&page.body, SALES);
    assert_eq!(state(&sales), "authorised");
    assert!(
        sales.contains("device code") && sales.contains(">test<"),
        "{sales}"
    );
    let ops = row(&page.body, OPS);
    assert_eq!(state(&ops), "needs-login");
    assert!(ops.contains("Press Connect"), "{ops}");
    for action in ["connect", "disconnect", "check"] {
        assert!(ops.contains(&format!(r#"data-action="{action}""#)), "{ops}");
    }
    // The polled rows say the same.
    let rows: serde_json::Value =
        serde_json::from_str(&b.get("/accounts/rows").await.body).unwrap();
    let states: Vec<_> = rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["account"].as_str().unwrap().to_string(),
                state(r["html"].as_str().unwrap()).to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (SALES.to_string(), "authorised".to_string()),
            (OPS.to_string(), "needs-login".to_string())
        ]
    );
    // A logout ends the session.
    let token = csrf(&page.body);
    assert_eq!(
        b.post("/logout", &[("csrf", &token)]).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(b.get("/accounts").await.location.as_deref(), Some("/login"));
}

#[tokio::test]
async fn the_accounts_page_says_once_that_grants_are_not_sealed_as_status_does() {
    let world = World::start().await;
    let accounts = [SALES, OPS].map(|account| AccountSpec::device(account, "pw"));
    let proxy = console_proxy(&world, &accounts, "").await;
    let page = Browser::new(&proxy).signed_in().await;
    let status = proxy.cli(&["status"]).await;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let sentence = status
        .lines()
        .find(|l| l.starts_with("Grants are not sealed"))
        .unwrap_or_else(|| panic!("status says nothing of sealing:\n{status}"));
    assert_eq!(
        page.body.matches(sentence).count(),
        1,
        "the status sentence, once for the page:\n{}",
        page.body
    );
    assert_eq!(page.body.matches("not sealed").count(), 1, "not per row");
    assert_eq!(page.body.matches(r#"data-notice="unsealed""#).count(), 1);

    // Sealed with a token key: nothing to say.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("token.key");
    xoauth2_proxy::write_key_file(&key).unwrap();
    let server = format!("[server]\ntoken_key_file = \"{}\"\n", key.display());
    let sealed = TestProxy::start_with(&world.endpoints, &accounts, "debug", |text| {
        with_console(text.replacen("[server]\n", &server, 1), ADMIN_PASSWORD)
    })
    .await;
    let page = Browser::new(&sealed).signed_in().await;
    assert!(row(&page.body, SALES).contains("data-state"));
    assert!(!page.body.contains("not sealed"), "{}", page.body);
    assert!(!page.body.contains("data-notice"), "{}", page.body);
}

#[tokio::test]
async fn a_post_without_the_csrf_token_is_refused() {
    let world = World::start().await;
    let account = AccountSpec::device(SALES, "pw");
    let proxy = console_proxy(&world, std::slice::from_ref(&account), "").await;
    world.grant(&proxy, &account);
    let mut b = Browser::new(&proxy);
    b.signed_in().await;
    for form in [
        vec![("account", SALES)],
        vec![("account", SALES), ("csrf", "forged")],
    ] {
        let page = b.post("/accounts/disconnect", &form).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN);
        assert!(page.body.contains("reload the page"), "{}", page.body);
    }
    assert_eq!(state(&b.row(SALES).await), "authorised");
    // Another session's token is no better.
    let mut other = Browser::new(&proxy);
    let other_page = other.signed_in().await;
    let foreign = csrf(&other_page.body);
    let page = b
        .post(
            "/accounts/disconnect",
            &[("csrf", &foreign), ("account", SALES)],
        )
        .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    // The login form needs its token too.
    let mut fresh = Browser::new(&proxy);
    fresh.get("/login").await;
    let page = fresh.post("/login", &[("password", ADMIN_PASSWORD)]).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn wrong_admin_passwords_are_throttled() {
    let world = World::start().await;
    let proxy = console_proxy(&world, &[AccountSpec::device(SALES, "pw")], "").await;
    let mut b = Browser::new(&proxy);
    // max_failed_logins is 5 by default.
    for _ in 0..5 {
        let page = b.log_in("not the password").await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED);
        assert!(page.body.contains("Wrong password"), "{}", page.body);
    }
    let page = b.log_in(ADMIN_PASSWORD).await;
    assert_eq!(page.status, StatusCode::TOO_MANY_REQUESTS, "{}", page.body);
    assert!(page.body.contains("wait a few minutes"), "{}", page.body);
    assert_eq!(b.get("/accounts").await.location.as_deref(), Some("/login"));
    let logs = proxy.logs();
    assert!(logs.contains("console: wrong admin password"), "{logs}");
    assert!(!logs.contains("not the password") && !logs.contains(ADMIN_PASSWORD));
}

#[tokio::test]
async fn the_console_refuses_to_start_without_an_admin_password() {
    let world = World::start().await;
    let proxy = TestProxy::start(&world.endpoints, &[AccountSpec::device(SALES, "pw")]).await;
    let text = std::fs::read_to_string(&proxy.config_path).unwrap() + "console = true\n";
    std::fs::write(&proxy.config_path, text).unwrap();
    let out = proxy.cli(&["serve"]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin.password_hash") && stderr.contains("xoauth2-proxy hash-password"),
        "{stderr}"
    );
}

#[tokio::test]
async fn disconnect_forgets_the_grant_and_the_cached_token() {
    let world = World::start().await;
    world.idp.set_device_user(SALES);
    let account = AccountSpec::device(SALES, "pw");
    let proxy = console_proxy(&world, std::slice::from_ref(&account), "").await;
    world.grant(&proxy, &account);
    let ok = LineClient::imap_login(proxy.imap_addr, SALES, "pw").await;
    assert!(ok.starts_with("a OK"), "{ok}");
    let mut b = Browser::new(&proxy);
    b.signed_in().await;
    let page = b.act("disconnect", SALES).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert_eq!(state(&b.row(SALES).await), "needs-login");
    let refused = LineClient::imap_login(proxy.imap_addr, SALES, "pw").await;
    assert!(
        refused.starts_with("a NO"),
        "the cached token went too: {refused}"
    );
    let grant =
        std::fs::read_to_string(proxy.state_dir.join("tokens/sales@contoso.com.json")).unwrap();
    let grant: serde_json::Value = serde_json::from_str(&grant).unwrap();
    assert!(
        grant["refresh_token"].is_null() && grant["access_token"].is_null(),
        "{grant}"
    );
    assert_no_secret(&world, "pages", &b.seen.join("\n"));
    assert_no_secret(&world, "log", &proxy.logs());
}

#[tokio::test]
async fn check_says_for_one_account_what_works_and_what_to_fix() {
    let world = World::start().await;
    let accounts = [
        AccountSpec::device(SALES, "pw"),
        AccountSpec::device(OPS, "pw"),
    ];
    let proxy = console_proxy(&world, &accounts, "").await;
    world.grant(&proxy, &accounts[0]);
    let mut b = Browser::new(&proxy);
    b.signed_in().await;
    let page = b.act("check", SALES).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains(r#"data-check="ok""#), "{}", page.body);
    assert!(
        page.body.contains("logged in with XOAUTH2"),
        "{}",
        page.body
    );
    let page = b.act("check", OPS).await;
    assert!(
        page.body.contains(r#"data-check="problem""#),
        "{}",
        page.body
    );
    assert!(page.body.contains("is not authorised"), "{}", page.body);
    assert_no_secret(&world, "pages", &b.seen.join("\n"));
}

/// Waits (polling the rows, as the page does) until `account`'s row is in `wanted`.
async fn wait_for_state(b: &mut Browser, account: &str, wanted: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = b.row(account).await;
        if state(&row) == wanted {
            return row;
        }
        assert!(
            Instant::now() < deadline,
            "{account} never became {wanted}: {row}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn device_code_connect_shows_the_code_and_the_row_turns_authorised() {
    let world = World::start().await;
    world.idp.set_device_user(SALES);
    world
        .idp
        .set_device_outcome(DeviceOutcome::ApproveAfterPolls(1));
    let account = AccountSpec::device(SALES, "pw");
    let proxy = console_proxy(&world, std::slice::from_ref(&account), "").await;
    let mut b = Browser::new(&proxy);
    b.signed_in().await;
    assert_eq!(state(&b.row(SALES).await), "needs-login");
    let page = b.act("connect", SALES).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let row = b.row(SALES).await;
    assert!(row.contains("data-user-code="), "{row}");
    assert!(row.contains("https://microsoft.com/devicelogin"), "{row}");
    wait_for_state(&mut b, SALES, "authorised").await;
    let ok = LineClient::imap_login(proxy.imap_addr, SALES, "pw").await;
    assert!(ok.starts_with("a OK"), "{ok}");
    assert_no_secret(&world, "pages", &b.seen.join("\n"));
    assert_no_secret(&world, "log", &proxy.logs());
}

#[tokio::test]
async fn a_declined_device_sign_in_says_so_in_its_row() {
    let world = World::start().await;
    world.idp.set_device_outcome(DeviceOutcome::Decline);
    let proxy = console_proxy(&world, &[AccountSpec::device(SALES, "pw")], "").await;
    let mut b = Browser::new(&proxy);
    b.signed_in().await;
    b.act("connect", SALES).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = b.row(SALES).await;
        if row.contains("declined") {
            assert!(row.contains("press Connect again"), "{row}");
            assert_eq!(state(&row), "needs-login");
            break;
        }
        assert!(Instant::now() < deadline, "no failure shown: {row}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn browser_sign_in_goes_to_the_identity_provider_and_back_to_the_callback() {
    let world = World::start().await;
    world.idp.set_device_user(SALES);
    let account = browser_account(SALES);
    let proxy = console_proxy(&world, std::slice::from_ref(&account), "").await;
    let mut b = Browser::new(&proxy);
    b.signed_in().await;
    let page = b.act("connect", SALES).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let authorize = page.location.unwrap();
    assert!(
        authorize.starts_with(&world.idp.authorize_url(testkit::world::TENANT)),
        "{authorize}"
    );
    let callback = format!("http://{}/oauth/callback", proxy.admin_addr);
    let parsed = reqwest::Url::parse(&authorize).unwrap();
    let param = |name: &str| {
        parsed
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(param("redirect_uri").as_deref(), Some(callback.as_str()));
    assert_eq!(param("code_challenge_method").as_deref(), Some("S256"));
    // The identity provider signs in at once and redirects to the callback.
    let at_idp = b.http.get(&authorize).send().await.unwrap();
    let back = at_idp.headers()[LOCATION].to_str().unwrap().to_string();
    assert!(back.starts_with(&callback), "{back}");
    // The callback arrives without the session cookie (SameSite=Strict, from another site).
    let mut from_idp = Browser::new(&proxy);
    let done = from_idp.send(from_idp.http.get(&back)).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert!(done.body.contains("is authorised"), "{}", done.body);
    assert!(
        done.body
            .contains(r#"http-equiv="refresh" content="1;url=/accounts""#),
        "a success moves on to the accounts: {}",
        done.body
    );
    assert!(!done.body.contains("code="), "the page repeats no code");
    assert_eq!(state(&b.row(SALES).await), "authorised");
    let ok = LineClient::imap_login(proxy.imap_addr, SALES, "pw").await;
    assert!(ok.starts_with("a OK"), "{ok}");
    // A state is used once.
    let again = from_idp.send(from_idp.http.get(&back)).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_no_secret(&world, "pages", &b.seen.join("\n"));
    assert_no_secret(&world, "pages", &from_idp.seen.join("\n"));
    assert_no_secret(&world, "log", &proxy.logs());
}

#[tokio::test]
async fn a_failed_browser_sign_in_page_stays_with_its_sentence() {
    let world = World::start().await;
    let account = browser_account(SALES);
    let proxy = console_proxy(&world, std::slice::from_ref(&account), "").await;
    let mut b = Browser::new(&proxy);
    b.signed_in().await;
    let page = b.act("connect", SALES).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let authorize = reqwest::Url::parse(&page.location.unwrap()).unwrap();
    let state = authorize
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    // The identity provider sends the browser back with a refusal.
    let mut back =
        reqwest::Url::parse(&format!("http://{}/oauth/callback", proxy.admin_addr)).unwrap();
    back.query_pairs_mut()
        .append_pair("error", "access_denied")
        .append_pair("error_description", "AADSTS65004: The user declined.")
        .append_pair("state", &state);
    let mut from_idp = Browser::new(&proxy);
    let done = from_idp.send(from_idp.http.get(back.as_str())).await;
    assert_eq!(done.status, StatusCode::BAD_GATEWAY, "{}", done.body);
    assert!(
        done.body
            .contains("The sign-in failed: access_denied: AADSTS65004: The user declined.<"),
        "{}",
        done.body
    );
    assert!(
        !done.body.contains("refresh"),
        "a failure page stays until read: {}",
        done.body
    );
    assert!(done.body.contains(r#"href="/accounts""#), "{}", done.body);
}

/// The lines `events` holds once it holds `n`.
async fn until_lines(events: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(events).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(Instant::now() < deadline, "only {lines:?} were notified");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn disconnect_notifies_needs_login_and_connect_notifies_recovered() {
    use std::os::unix::fs::PermissionsExt;
    let world = World::start().await;
    world.idp.set_device_user(SALES);
    world
        .idp
        .set_device_outcome(DeviceOutcome::ApproveAfterPolls(1));
    let account = AccountSpec::device(SALES, "pw");
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events");
    let command = dir.path().join("notify.sh");
    std::fs::write(
        &command,
        format!(
            "#!/bin/sh\necho \"$XOAUTH2_PROXY_EVENT $XOAUTH2_PROXY_ACCOUNT $XOAUTH2_PROXY_CONSOLE_URL\" >> {}\n",
            events.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&command, std::fs::Permissions::from_mode(0o755)).unwrap();
    let notify = format!("notify_command = [\"{}\"]\n", command.display());
    let proxy = console_proxy_granted(&world, &account, &notify).await;
    let mut b = Browser::new(&proxy);
    b.signed_in().await;
    let console = format!("http://{}", proxy.admin_addr);
    assert_eq!(state(&b.row(SALES).await), "authorised");

    b.act("disconnect", SALES).await;
    let lines = until_lines(&events, 1).await;
    assert_eq!(lines, [format!("needs_login {SALES} {console}")]);

    b.act("connect", SALES).await;
    wait_for_state(&mut b, SALES, "authorised").await;
    let lines = until_lines(&events, 2).await;
    assert_eq!(lines[1], format!("recovered {SALES} {console}"));
    assert_eq!(lines.len(), 2, "{lines:?}");
}

#[tokio::test]
async fn the_examples_admin_password_is_warned_about_and_no_other() {
    let world = World::start().await;
    let account = AccountSpec::device(SALES, "pw");
    let example = TestProxy::start_with(
        &world.endpoints,
        std::slice::from_ref(&account),
        "info",
        |text| with_console(text, "change-me"),
    )
    .await;
    example
        .wait_for_log(
            "admin password is the examples' `change-me`",
            Duration::from_secs(10),
        )
        .await;
    let own = console_proxy(&world, &[account], "").await;
    own.wait_for_log("xoauth2-proxy is ready", Duration::from_secs(10))
        .await;
    assert!(!own.logs().contains("change-me"), "{}", own.logs());
}

#[tokio::test]
async fn a_row_shows_when_a_client_last_logged_in_over_each_protocol() {
    let world = World::start().await;
    let account = AccountSpec::device(SALES, "pw");
    let proxy = console_proxy_granted(&world, &account, "").await;
    let mut b = Browser::new(&proxy);
    b.signed_in().await;
    let before = b.row(SALES).await;
    assert!(
        before.contains("IMAP never") && before.contains("SMTP never"),
        "{before}"
    );
    let ok = LineClient::imap_login(proxy.imap_addr, SALES, "pw").await;
    assert!(ok.starts_with("a OK"), "{ok}");
    let after = b.row(SALES).await;
    assert!(
        !after.contains("IMAP never") && after.contains("SMTP never"),
        "{after}"
    );
}

/// Writes `text` as the config, sends SIGHUP and waits for the reload to
/// be in force.
async fn reload_to(proxy: &TestProxy, text: &str) {
    let before = proxy.logs().matches("config reloaded").count();
    std::fs::write(&proxy.config_path, text).unwrap();
    proxy.reload();
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.logs().matches("config reloaded").count() == before {
        assert!(Instant::now() < deadline, "no reload:\n{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A config text from [`with_console`] without the admin `password_hash`.
fn no_admin_password(text: &str) -> String {
    let at = text.find("console = true\npassword_hash = ").unwrap() + "console = true\n".len();
    let end = at + text[at..].find('\n').unwrap() + 1;
    format!("{}{}", &text[..at], &text[end..])
}

/// The config in force without the admin `password_hash`, edited by `edit`.
fn without_password(proxy: &TestProxy, edit: impl Fn(&str) -> String) -> String {
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    edit(&no_admin_password(&text))
}

#[tokio::test]
async fn a_reload_that_turns_the_console_off_closes_it_at_once() {
    let world = World::start().await;
    let proxy = console_proxy(&world, &[AccountSpec::device(SALES, "pw")], "").await;
    let mut admin = Browser::new(&proxy);
    admin.signed_in().await;
    let off = without_password(&proxy, |t| t.replace("console = true", "console = false"));
    reload_to(&proxy, &off).await;
    for mut browser in [admin, Browser::new(&proxy)] {
        for path in ["/accounts", "/login"] {
            let page = browser.get(path).await;
            assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}: {}", page.body);
            assert!(page.body.contains("admin.console"), "{}", page.body);
        }
    }
    let health = reqwest::get(format!("http://{}/healthz", proxy.admin_addr))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK, "the probes stay");
}

#[tokio::test]
async fn a_console_bound_to_all_addresses_keeps_its_password_whatever_a_reload_says() {
    let world = World::start().await;
    let account = AccountSpec::device(SALES, "pw");
    let proxy = TestProxy::start_with(&world.endpoints, &[account], "debug", |text| {
        let text = with_console(text, ADMIN_PASSWORD);
        let listen = text
            .lines()
            .rev()
            .find(|l| l.starts_with("listen = \"127.0.0.1:"))
            .unwrap()
            .to_string();
        text.replace(&listen, &listen.replace("127.0.0.1", "0.0.0.0"))
    })
    .await;
    // A new loopback `listen` (restart-only) makes the reload valid; the
    // listener is still bound to every address.
    let opened = without_password(&proxy, |t| {
        t.replace("listen = \"0.0.0.0:", "listen = \"127.0.0.1:")
            + "console_allow_loopback_without_password = true\n"
    });
    reload_to(&proxy, &opened).await;
    let mut visitor = Browser::new(&proxy);
    let page = visitor.get("/accounts").await;
    assert_eq!(page.location.as_deref(), Some("/login"), "{}", page.body);
    assert!(visitor.cookie.is_none(), "no session was handed out");
    let page = visitor.get("/login").await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(
        page.body.contains("xoauth2-proxy hash-password"),
        "{}",
        page.body
    );
    let page = visitor
        .post("/accounts/disconnect", &[("account", SALES)])
        .await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn on_loopback_the_console_goes_without_a_password_only_where_allowed() {
    let world = World::start().await;
    let proxy = TestProxy::start_with(
        &world.endpoints,
        &[AccountSpec::device(SALES, "pw")],
        "debug",
        |text| {
            no_admin_password(&with_console(text, ADMIN_PASSWORD))
                + "console_allow_loopback_without_password = true\n"
        },
    )
    .await;
    let mut visitor = Browser::new(&proxy);
    let page = visitor.get("/accounts").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    row(&page.body, SALES);
    assert_eq!(
        visitor.get("/login").await.location.as_deref(),
        Some("/accounts")
    );
    // An admin password set by a reload ends the session opened without one.
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    let text = text.replace(
        "console_allow_loopback_without_password = true\n",
        &format!(
            "password_hash = \"{}\"\n",
            testkit::proxy::hash_password(ADMIN_PASSWORD)
        ),
    );
    reload_to(&proxy, &text).await;
    let page = visitor.get("/accounts").await;
    assert_eq!(page.location.as_deref(), Some("/login"), "{}", page.body);
    visitor.signed_in().await;
}

#[tokio::test]
async fn a_new_admin_password_ends_the_console_sessions_signed_in_before() {
    let world = World::start().await;
    let proxy = console_proxy(&world, &[AccountSpec::device(SALES, "pw")], "").await;
    let mut admin = Browser::new(&proxy);
    admin.signed_in().await;
    let new = "a new admin pw 3Kd";
    let text = without_password(&proxy, |t| {
        format!(
            "{t}password_hash = \"{}\"\n",
            testkit::proxy::hash_password(new)
        )
    });
    reload_to(&proxy, &text).await;
    let page = admin.get("/accounts").await;
    assert_eq!(page.location.as_deref(), Some("/login"), "{}", page.body);
    assert_eq!(
        admin.log_in(ADMIN_PASSWORD).await.status,
        StatusCode::UNAUTHORIZED
    );
    let login = admin.log_in(new).await;
    assert_eq!(
        login.location.as_deref(),
        Some("/accounts"),
        "{}",
        login.body
    );
    assert_no_secret(&world, "page", &admin.seen.join("\n"));
}
