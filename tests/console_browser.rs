//! The web console in a real browser: headless Chromium driven through
//! chromedriver (Debian's `chromium` and `chromium-driver`), against the
//! real binary, the test identity provider and the mock mail servers.
//!
//! One scenario, as a newcomer goes through it: log in to the console, see
//! an account that needs a sign-in, press Connect, approve the device code
//! at the identity provider in another tab, watch the row turn authorised
//! without a reload, log in over IMAP through the proxy; then the browser
//! sign-in of a second account (authorize page → `/oauth/callback` → back
//! to the console). Along the way: the session cookie is out of the page's
//! reach, a POST without the CSRF token is refused, and no page holds a
//! secret. The screenshots in docs/ come from this test: run it with
//! `UPDATE_SCREENSHOTS=1` to write them again.

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use testkit::idp::DeviceOutcome;
use testkit::proxy::{AccountSpec, TestProxy, free_port, with_console};
use testkit::world::{LineClient, World};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ADMIN_PASSWORD: &str = "browser admin pw 3Vd";
const SALES: &str = "sales@contoso.com";
const OPS: &str = "ops@contoso.com";
/// How long the browser may take for anything one step waits for.
const STEP: Duration = Duration::from_secs(30);

/// chromedriver on a free loopback port, stopped when dropped.
struct Driver {
    _child: Child,
    port: u16,
}

impl Driver {
    /// Starts chromedriver and waits for its "started successfully".
    async fn start() -> Driver {
        let port = free_port();
        let mut child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run chromedriver ({e}): install Debian's `chromium` and `chromium-driver` (apt-get install chromium chromium-driver)")
            });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("started successfully") {
                    return;
                }
            }
            panic!("chromedriver exited before it started");
        };
        tokio::time::timeout(STEP, started)
            .await
            .expect("chromedriver starts");
        // Its later output is not read: keep the pipe drained.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Driver {
            _child: child,
            port,
        }
    }

    /// A new headless Chromium with a profile of its own.
    async fn browser(&self, profile: &std::path::Path) -> Client {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "args": args, "binary": "/usr/bin/chromium" }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("chromedriver opens a Chromium session")
    }
}

/// Saves a screenshot of what the browser shows as docs/console-NAME.png,
/// when asked to (`UPDATE_SCREENSHOTS=1`).
async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(format!("console-{name}.png"));
        std::fs::write(path, png).unwrap();
    }
}

/// Waits for an element matching `css`.
async fn wait_for(browser: &Client, css: &str) -> fantoccini::elements::Element {
    browser
        .wait()
        .at_most(STEP)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} appeared: {e}"))
}

/// Every page the browser showed, to look for secrets at the end.
struct Seen(Vec<String>);

impl Seen {
    async fn keep(&mut self, browser: &Client) {
        self.0.push(browser.source().await.unwrap());
        self.0
            .push(browser.current_url().await.unwrap().to_string());
    }
}

fn row(account: &str, state: &str) -> String {
    format!(r#"tr[data-account="{account}"][data-state="{state}"]"#)
}

#[tokio::test]
async fn a_newcomer_connects_mailboxes_from_the_browser() {
    let world = World::start().await;
    world.idp.set_device_user(SALES);
    world
        .idp
        .set_device_outcome(DeviceOutcome::ApproveInBrowser);
    let accounts = [
        AccountSpec::device(SALES, "sales-pw"),
        AccountSpec {
            flow: "authorization_code",
            ..AccountSpec::device(OPS, "ops-pw")
        },
    ];
    // The console as `localhost`, the identity provider as 127.0.0.1: two
    // sites, as in real life, so that the way back from the sign-in crosses
    // sites and the SameSite=Strict cookie is put to the test.
    let proxy = TestProxy::start_with(&world.endpoints, &accounts, "debug", |text| {
        with_console(text, ADMIN_PASSWORD).replace(
            "public_url = \"http://127.0.0.1:",
            "public_url = \"http://localhost:",
        )
    })
    .await;
    let console = format!("http://localhost:{}", proxy.admin_addr.port());
    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.browser(profile.path()).await;
    let mut seen = Seen(Vec::new());

    // No page without the admin session: the console sends us to log in.
    browser.goto(&format!("{console}/accounts")).await.unwrap();
    wait_for(&browser, "input#password").await;
    assert_eq!(browser.current_url().await.unwrap().path(), "/login");
    screenshot(&browser, "login").await;
    let form = browser
        .form(Locator::Css("form[action='/login']"))
        .await
        .unwrap();
    form.set(Locator::Id("password"), ADMIN_PASSWORD)
        .await
        .unwrap();
    form.submit_with(Locator::Css("button[data-action='login']"))
        .await
        .unwrap();

    // The Accounts page: SALES needs a sign-in.
    wait_for(&browser, &row(SALES, "needs-login")).await;
    seen.keep(&browser).await;
    screenshot(&browser, "accounts").await;
    let cookie = browser
        .execute("return document.cookie", vec![])
        .await
        .unwrap();
    assert_eq!(cookie, json!(""), "the session cookie is HttpOnly");

    // A POST without the CSRF token is refused, even from the signed-in page.
    let status = browser
        .execute_async(
            r#"const done = arguments[arguments.length - 1];
               fetch("/accounts/disconnect", {method: "POST", headers: {"Content-Type": "application/x-www-form-urlencoded"}, body: "account=sales%40contoso.com"})
                 .then(r => done(r.status));"#,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, json!(403));

    // Connect: the row shows the code and the link, and polls.
    browser
        .find(Locator::Css(&format!(
            r#"tr[data-account="{SALES}"] button[data-action="connect"]"#
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let code = wait_for(
        &browser,
        &format!(r#"tr[data-account="{SALES}"] [data-user-code]"#),
    )
    .await;
    let user_code = code.attr("data-user-code").await.unwrap().unwrap();
    assert_eq!(code.text().await.unwrap(), user_code);
    let link = browser
        .find(Locator::Css(&format!(
            r#"tr[data-account="{SALES}"] .sign-in a"#
        )))
        .await
        .unwrap();
    let verification = link.attr("href").await.unwrap().unwrap();
    assert_eq!(
        verification,
        format!("{}/devicelogin", world.idp.base_url())
    );
    seen.keep(&browser).await;
    screenshot(&browser, "connect").await;
    // A mark that a reload would wipe.
    browser
        .execute("window.notReloaded = true", vec![])
        .await
        .unwrap();

    // The person signs in at the identity provider, in another tab.
    let console_tab = browser.window().await.unwrap();
    let idp_tab = browser.new_window(true).await.unwrap().handle;
    browser.switch_to_window(idp_tab).await.unwrap();
    browser.goto(&verification).await.unwrap();
    let form = browser.form(Locator::Css("form")).await.unwrap();
    form.set(Locator::Id("code"), &user_code).await.unwrap();
    form.submit_with(Locator::Id("next")).await.unwrap();
    wait_for(&browser, "#approved").await;
    browser.close_window().await.unwrap();
    browser.switch_to_window(console_tab).await.unwrap();

    // The row turns authorised by itself.
    wait_for(&browser, &row(SALES, "authorised")).await;
    let still = browser
        .execute("return window.notReloaded === true", vec![])
        .await
        .unwrap();
    assert_eq!(still, json!(true), "the page was not reloaded");
    let gone = browser.find(Locator::Css("[data-user-code]")).await;
    assert!(gone.is_err(), "the code is gone once authorised");
    seen.keep(&browser).await;
    screenshot(&browser, "authorised").await;

    // The mailbox works through the proxy.
    let ok = LineClient::imap_login(proxy.imap_addr, SALES, "sales-pw").await;
    assert!(ok.starts_with("a OK"), "{ok}");

    // The browser sign-in: to the identity provider's authorize page, back
    // to /oauth/callback, and on to the console.
    world.idp.set_device_user(OPS);
    browser
        .find(Locator::Css(&format!(
            r#"tr[data-account="{OPS}"] button[data-action="connect"]"#
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&browser, &row(OPS, "authorised")).await;
    assert_eq!(browser.current_url().await.unwrap().path(), "/accounts");
    seen.keep(&browser).await;
    let requests = world.idp.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.grant_type.as_deref() == Some("authorization_code") && r.status == 200),
        "the code was redeemed at the token endpoint"
    );
    let ok = LineClient::imap_login(proxy.imap_addr, OPS, "ops-pw").await;
    assert!(ok.starts_with("a OK"), "{ok}");

    // Readable on a phone.
    browser.set_window_size(390, 844).await.unwrap();
    browser.refresh().await.unwrap();
    wait_for(&browser, &row(SALES, "authorised")).await;
    screenshot(&browser, "phone").await;

    // No secret in any page, URL or log line.
    let mut secrets = world.secrets();
    secrets.push(ADMIN_PASSWORD.to_string());
    let pages = seen.0.join("\n");
    let logs = proxy.logs();
    for secret in &secrets {
        assert!(
            !pages.contains(secret.as_str()),
            "a secret is in a page or URL"
        );
        assert!(!logs.contains(secret.as_str()), "a secret is in the log");
    }
    browser.close().await.unwrap();
}
