//! The console's HTML, rendered on the server with `maud`, which escapes
//! every value it splices in: a username or an identity provider's error
//! text cannot become markup. No page carries a token, a code verifier, a
//! client secret or a password; forms carry only the session's CSRF token.
//!
//! The pages work without JavaScript (forms and links); `/console.js` only
//! refreshes the account rows while a sign-in is under way. Styles are one
//! small sheet, readable on a phone (rows become cards on narrow screens),
//! with visible focus and AA contrast.

use maud::{DOCTYPE, Markup, PreEscaped, html};
use sha2::{Digest, Sha256};

use super::sign_ins::Device;
use crate::check::Step;
use crate::config::Flow;
use crate::oauth::status::AccountStatus;
use crate::oauth::{AccountState, ClientLogins};

/// A page: the head, the header with the navigation when signed in, and `main`.
fn page(title: &str, csrf: Option<&str>, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · xoauth2-proxy" }
                link rel="stylesheet" href="/console.css";
            }
            body {
                header {
                    p.brand { "xoauth2-proxy" }
                    @if let Some(csrf) = csrf {
                        nav aria-label="Console" {
                            a href="/accounts" { "Accounts" }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" data-action="logout" { "Log out" }
                            }
                        }
                    }
                }
                main id="main" { (main) }
                script src="/console.js" {}
            }
        }
    }
}

/// The login form; `notice` says why the last attempt failed.
pub fn login(csrf: &str, notice: Option<&str>) -> Markup {
    page(
        "Log in",
        None,
        html! {
            h1 { "Log in to the console" }
            @if let Some(notice) = notice {
                p.notice.problem role="alert" { (notice) }
            }
            form method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                label for="password" { "Admin password" }
                input id="password" name="password" type="password" autocomplete="current-password" required autofocus;
                button type="submit" data-action="login" { "Log in" }
            }
            p.hint { "The password is the one whose hash is `password_hash` in the [admin] section of the config." }
        },
    )
}

/// What the Accounts page shows of one account.
pub struct Row<'a> {
    pub status: &'a AccountStatus,
    pub health: AccountState,
    pub device: Option<Device>,
    /// Why the grant file could not be read, if it could not.
    pub problem: Option<&'a str>,
    /// When a client last logged in, per protocol (this process's record).
    pub client_logins: ClientLogins,
}

/// The Accounts page: a row per account, a notice at the top, and once for
/// the page (it holds for every grant alike), `unsealed`: the sentence
/// `status` prints when the grants are stored without a token key.
pub fn accounts(
    rows: &[String],
    csrf: &str,
    notice: Option<(&str, bool)>,
    unsealed: Option<&str>,
) -> Markup {
    page(
        "Accounts",
        Some(csrf),
        html! {
            h1 { "Accounts" }
            @if let Some((text, problem)) = notice {
                p.notice.problem[problem] role=(if problem { "alert" } else { "status" }) { (text) }
            }
            @if let Some(text) = unsealed {
                p.notice data-notice="unsealed" { (text) }
            }
            @if rows.is_empty() {
                p { "No accounts are configured: add an [[accounts]] section to the config and reload it." }
            } @else {
                table data-poll="/accounts/rows" {
                    caption { "Each mailbox the proxy opens, and whether it can." }
                    thead {
                        tr {
                            th scope="col" { "Account" }
                            th scope="col" { "Mailbox" }
                            th scope="col" { "Provider" }
                            th scope="col" { "Flow" }
                            th scope="col" { "State" }
                            th scope="col" { "Access token" }
                            th scope="col" { "Last refresh" }
                            th scope="col" { "Last client login" }
                            th scope="col" { "Last error" }
                            th scope="col" { "Actions" }
                        }
                    }
                    tbody aria-live="polite" {
                        @for row in rows { (PreEscaped(row)) }
                    }
                }
            }
        },
    )
}

/// One account's row, and its version (changes whenever what it shows
/// does, so that the page's poll replaces only rows that changed).
pub fn account_row(row: &Row, csrf: &str, now: u64) -> (String, String) {
    let s = row.status;
    let cells = html! {
        th scope="row" data-label="Account" { (s.account) }
        td data-label="Mailbox" {
            (s.mailbox)
            @if let Some(user) = s.signed_in_as.as_ref().filter(|u| !u.eq_ignore_ascii_case(&s.mailbox)) {
                br; small { "signed in as " (user) }
            }
        }
        td data-label="Provider" { (s.provider) }
        td data-label="Flow" { (flow_name(s.flow)) }
        td data-label="State" { (state_cell(row)) }
        td data-label="Access token" { (expiry(s, now)) }
        td data-label="Last refresh" { (when(s.last_refresh, now)) }
        td data-label="Last client login" {
            "IMAP " (when(row.client_logins.imap, now)) br;
            "SMTP " (when(row.client_logins.smtp, now))
        }
        td data-label="Last error" { (last_error(row, now)) }
        td data-label="Actions" {
            div.actions {
                (action("connect", "Connect", &s.account, csrf))
                (action("check", "Check", &s.account, csrf))
                @if s.flow.is_delegated() {
                    (action("disconnect", "Disconnect", &s.account, csrf))
                }
            }
        }
    }
    .into_string();
    let version = hex8(&Sha256::digest(cells.as_bytes()));
    let html = html! {
        tr data-account=(s.account) data-state=(hook(row.health)) data-version=(version) {
            (PreEscaped(&cells))
        }
    }
    .into_string();
    (version, html)
}

/// The `data-state` value of a row, for tests and scripts.
fn hook(state: AccountState) -> &'static str {
    match state {
        AccountState::Authorised => "authorised",
        AccountState::NeedsLogin => "needs-login",
        AccountState::Error => "error",
    }
}

fn hex8(digest: &[u8]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A button that posts `action` for `account` with the CSRF token.
fn action(action: &str, label: &str, account: &str, csrf: &str) -> Markup {
    html! {
        form method="post" action={ "/accounts/" (action) } {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="account" value=(account);
            button type="submit" data-action=(action) aria-label={ (label) " " (account) } { (label) }
        }
    }
}

fn flow_name(flow: Flow) -> &'static str {
    match flow {
        Flow::DeviceCode => "device code",
        Flow::AuthorizationCode => "browser sign-in",
        Flow::ClientCredentials => "app-only",
    }
}

fn state_cell(row: &Row) -> Markup {
    let label = match row.health {
        AccountState::Authorised => "authorised",
        AccountState::NeedsLogin => "needs login",
        AccountState::Error => "error",
    };
    html! {
        span.state { (label) }
        @if let Some(Device::Waiting { user_code, verification_uri }) = &row.device {
            div.sign-in role="status" {
                "To connect, open "
                // Only a web address becomes a link, whatever the identity provider sent.
                @if verification_uri.starts_with("https://") || verification_uri.starts_with("http://") {
                    a href=(verification_uri) target="_blank" rel="noopener noreferrer" { (verification_uri) }
                } @else {
                    (verification_uri)
                }
                " and enter the code "
                code data-user-code=(user_code) { (user_code) }
                ". This row turns to authorised by itself."
            }
        }
    }
}

fn expiry(s: &AccountStatus, now: u64) -> Markup {
    match s.access_token_expires_at {
        Some(t) if t > now => html! { "valid for " (at(t, now)) },
        Some(t) => html! { "expired " (at(t, now)) },
        None => html! { "none" },
    }
}

fn when(t: Option<u64>, now: u64) -> Markup {
    match t {
        Some(t) => at(t, now),
        None => html! { "never" },
    }
}

/// `t` as "3m 20s ago" or "in 55m", with the exact time for machines.
fn at(t: u64, now: u64) -> Markup {
    let stamp = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
    let exact = humantime::format_rfc3339_seconds(stamp).to_string();
    let text = if t > now {
        format!(
            "{}",
            humantime::format_duration(std::time::Duration::from_secs(t - now))
        )
    } else {
        format!(
            "{} ago",
            humantime::format_duration(std::time::Duration::from_secs(now - t))
        )
    };
    html! { time datetime=(exact) title=(exact) { (text) } }
}

/// The last error as a sentence that says what to do.
fn last_error(row: &Row, now: u64) -> Markup {
    let s = row.status;
    let fix = match row.health {
        AccountState::NeedsLogin => Some(html! {
            "Press Connect to sign in (or run "
            code { "xoauth2-proxy login " (s.account) }
            " on the server)."
        }),
        AccountState::Error => Some(html! {
            "Press Check to see what fails; the proxy tries again at the next login."
        }),
        AccountState::Authorised => None,
    };
    html! {
        @if let Some(Device::Failed(sentence)) = &row.device {
            p.problem { "The sign-in failed: " (sentence) "." }
        }
        @if let Some(problem) = row.problem.or(s.grant_error.as_deref()) {
            p.problem { (problem) }
        }
        @if let Some(e) = &s.last_error {
            p { (e) @if let Some(t) = s.last_error_at { " (" (at(t, now)) ")" } }
        }
        @if let Some(fix) = fix {
            @if s.last_error.is_some() || row.problem.is_some() || row.health == AccountState::NeedsLogin {
                p.hint { (fix) }
            }
        } @else if s.last_error.is_none() && row.device.is_none() {
            "none"
        }
    }
}

/// The outcome of Check for one account.
pub fn check(account: &str, steps: &[Step], csrf: &str) -> Markup {
    let all_ok = steps.iter().all(|s| s.ok);
    page(
        "Check",
        Some(csrf),
        html! {
            h1 { "Check of " (account) }
            p.notice.problem[!all_ok] role="status" data-check=(if all_ok { "ok" } else { "problem" }) {
                @if all_ok { "Every step passed: clients can log in to this mailbox." }
                @else { "Some steps failed; each says what to fix." }
            }
            ul.steps {
                @for step in steps {
                    li data-ok=(step.ok) {
                        strong { @if step.ok { "ok" } @else { "problem" } } ": " (step.line)
                    }
                }
            }
            p { a href="/accounts" { "Back to the accounts" } }
        },
    )
}

/// The page the browser lands on after the identity provider. After a
/// success it moves on to the Accounts page by itself (a navigation from
/// this page is same-site, so the session cookie goes with it); a failure
/// stays until the admin has read it. Both have a link back.
pub fn callback_done(outcome: Result<&str, &str>) -> Markup {
    let moves_on = outcome.is_ok();
    let (title, text) = match outcome {
        Ok(account) => ("Connected", format!("Account {account} is authorised.")),
        Err(e) => (
            "Sign-in failed",
            format!("The sign-in failed: {}.", e.trim_end_matches('.')),
        ),
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                @if moves_on {
                    meta http-equiv="refresh" content="1;url=/accounts";
                }
                title { (title) " · xoauth2-proxy" }
                link rel="stylesheet" href="/console.css";
            }
            body {
                main id="main" {
                    h1 { (title) }
                    p role="status" { (text) }
                    p { a href="/accounts" { "Back to the accounts" } }
                }
            }
        }
    }
}

/// A page for an error the visitor can act on (`text` says how).
pub fn problem(title: &str, text: &str) -> Markup {
    page(
        title,
        None,
        html! {
            h1 { (title) }
            p.notice.problem role="alert" { (text) }
            p { a href="/accounts" { "Back to the console" } }
        },
    )
}

/// The style sheet.
pub const CSS: &str = r#":root{color-scheme:light;--fg:#1a1a1a;--muted:#4a4a4a;--line:#c8c8c8;--accent:#0b57a4;--bad:#a4000f;--good:#0a6b2d;--bg:#fff}
*{box-sizing:border-box}body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;flex-wrap:wrap;gap:1rem;align-items:center;justify-content:space-between;padding:.5rem 1rem;border-bottom:1px solid var(--line)}
.brand{font-weight:700;margin:0}nav{display:flex;gap:1rem;align-items:center}nav form{margin:0}
main{padding:1rem;max-width:80rem}h1{font-size:1.5rem;margin:.5rem 0 1rem}
a{color:var(--accent)}a:focus,button:focus,input:focus{outline:3px solid #f0a000;outline-offset:2px}
table{border-collapse:collapse;width:100%}caption{text-align:left;color:var(--muted);padding:.25rem 0}
th,td{text-align:left;vertical-align:top;padding:.5rem;border-bottom:1px solid var(--line)}
tr[data-state="authorised"] .state{color:var(--good);font-weight:700}
tr[data-state="needs-login"] .state,tr[data-state="error"] .state{color:var(--bad);font-weight:700}
.actions{display:flex;flex-wrap:wrap;gap:.5rem}.actions form{margin:0}
button{font:inherit;padding:.4rem .9rem;border:1px solid var(--accent);border-radius:4px;background:var(--accent);color:#fff;cursor:pointer;min-height:2.75rem}
button[data-action="disconnect"],button[data-action="logout"]{background:#fff;color:var(--accent)}
label{display:block;font-weight:600;margin:.5rem 0 .25rem}input[type=password]{font:inherit;padding:.5rem;width:100%;max-width:24rem;border:1px solid var(--muted);border-radius:4px}
form>button{margin-top:.75rem}.notice{padding:.5rem .75rem;border-left:4px solid var(--good);background:#eef7f0}
.notice.problem,.problem{color:var(--bad)}.notice.problem{border-left-color:var(--bad);background:#fbeeee}
.hint{color:var(--muted)}.sign-in{margin-top:.5rem;padding:.5rem;border:2px dashed var(--accent);border-radius:4px}
code[data-user-code]{font-size:1.25rem;font-weight:700;letter-spacing:.1em}td p{margin:0 0 .25rem}
@media (max-width:48rem){thead{position:absolute;left:-9999px}table,tbody,tr,th,td,caption{display:block;width:100%}
tr{border:1px solid var(--line);border-radius:6px;margin-bottom:1rem;padding:.25rem}
th[scope=row],td{border:0;padding:.25rem .5rem}td::before{content:attr(data-label);display:block;font-size:.85rem;color:var(--muted);font-weight:600}}
"#;

/// Refreshes the rows of the Accounts page every two seconds, so that a
/// device sign-in finished on another device shows without a reload. The
/// server renders the rows; only changed ones are replaced.
pub const JS: &str = r#"(function () {
  var table = document.querySelector("table[data-poll]");
  if (!table || !window.fetch) return;
  function poll() {
    fetch(table.getAttribute("data-poll"), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (r.status === 401) { location.assign("/login"); return null; } return r.ok ? r.json() : null; })
      .then(function (d) {
        if (!d) return;
        d.rows.forEach(function (row) {
          var tr = table.querySelector('tr[data-account="' + CSS.escape(row.account) + '"]');
          if (tr && tr.getAttribute("data-version") !== row.version) tr.outerHTML = row.html;
        });
      })
      .catch(function () {})
      .finally(function () { setTimeout(poll, 2000); });
  }
  setTimeout(poll, 2000);
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn status(account: &str, last_error: Option<&str>) -> AccountStatus {
        AccountStatus {
            account: account.into(),
            mailbox: account.into(),
            provider: "m365".into(),
            flow: Flow::DeviceCode,
            state: "needs login",
            needs_login: true,
            access_token_expires_at: None,
            access_token_valid: false,
            last_refresh: None,
            authorized_at: None,
            last_error: last_error.map(str::to_string),
            last_error_at: None,
            grant_sealed: None,
            grant_error: None,
            grant_saved: None,
            grant_store: "file",
            grant_store_up: true,
            signed_in_as: None,
            send_via: "smtp",
        }
    }

    #[test]
    fn every_value_in_a_row_is_escaped() {
        let s = status(
            "a\"><script>alert(1)</script>@x.com",
            Some("<img src=x onerror=alert(2)>"),
        );
        let row = Row {
            status: &s,
            health: AccountState::NeedsLogin,
            device: Some(Device::Waiting {
                user_code: "<b>CODE</b>".into(),
                verification_uri: "javascript:alert(3)\"".into(),
            }),
            problem: None,
            client_logins: ClientLogins::default(),
        };
        let (_, html) = account_row(&row, "tok\"en", 0);
        for raw in ["<script>", "<img", "<b>", "alert(3)\"", "tok\"en"] {
            assert!(!html.contains(raw), "{raw} unescaped in {html}");
        }
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("href=\"javascript"), "{html}");
        assert!(html.contains(r#"data-state="needs-login""#));
    }

    #[test]
    fn a_row_changes_its_version_when_what_it_shows_changes() {
        let s = status("u@x.com", None);
        let row = |health| Row {
            status: &s,
            health,
            device: None,
            problem: None,
            client_logins: ClientLogins::default(),
        };
        let (needs, _) = account_row(&row(AccountState::NeedsLogin), "t", 0);
        let (again, _) = account_row(&row(AccountState::NeedsLogin), "t", 0);
        let (authorised, _) = account_row(&row(AccountState::Authorised), "t", 0);
        assert_eq!(needs, again);
        assert_ne!(needs, authorised);
    }
}
