//! `xoauth2-proxy check`: what a user runs after editing the config, to learn
//! in plain words whether each account will work and, if not, what to fix.

use crate::config::{Account, Config, SendVia};
use crate::login::{OpenError, open_with_token};
use crate::shared::Shared;
use crate::upstream::UpstreamError;

/// Checks every account against the identity provider and the upstream
/// servers, printing one line per step. Returns whether all passed.
pub async fn run(config: Config) -> Result<bool, String> {
    let guard = crate::accounts::LoginGuard::new(&config.server);
    let shared = Shared::new(config, &guard, &crate::oauth::Health::default())?;
    let mut all_ok = true;
    let state = crate::config::state_dir(&shared.config);
    // The same checks as `serve` at start: the folders exist and no other
    // user may write them, grant and lock files are the proxy user's own.
    match shared.prepare_state_dir().await {
        Ok(()) => say(
            true,
            &format!("state directory {} is usable", state.display()),
        ),
        Err(e) => {
            all_ok = false;
            say(false, &e);
        }
    }
    let store = shared.tokens.store();
    if store.shared() {
        match store.probe().await {
            Ok(()) => say(true, &format!("grant store {} answers", store.describe())),
            Err(e) => {
                all_ok = false;
                say(false, &e);
            }
        }
    }
    if shared.config.accounts.is_empty() {
        say(
            false,
            "no [[accounts]] are configured; add one (config.example.toml shows how)",
        );
        return Ok(false);
    }
    for account in &shared.config.accounts {
        println!(
            "{} → mailbox {} (provider {}, {:?})",
            account.username, account.mailbox, account.provider, account.flow
        );
        for step in account_steps(&shared, account).await {
            say(step.ok, &step.line);
            all_ok &= step.ok;
        }
    }
    Ok(all_ok)
}

/// One step of a check: whether it passed, and its sentence (which says
/// what to fix when it did not).
#[derive(Debug, Clone)]
pub struct Step {
    pub ok: bool,
    pub line: String,
}

/// Logs in to `account`'s IMAP and SMTP servers with a token from the
/// identity provider (or gets a Graph token, for accounts that send through
/// Graph), as `xoauth2-proxy check` does for every account (the console's
/// Check runs it for one).
pub async fn account_steps(shared: &Shared, account: &Account) -> Vec<Step> {
    let provider = shared.config.provider(&account.provider);
    let (tls, timeout) = (&shared.tls, shared.config.server.upstream_timeout);
    let imap = open_with_token(&shared.tokens, account, |account, token| async move {
        crate::imap::upstream::open(tls, provider, timeout, &account.mailbox, &token)
            .await
            .map(|_| ())
    })
    .await;
    let mut steps = vec![step(&format!("IMAP {}", provider.imap_server), imap)];
    if account.send_via == SendVia::Graph {
        steps.push(check_graph(shared, account).await);
        return steps;
    }
    let tokens = &shared.tokens;
    let smtp = open_with_token(tokens, account, |account, token| async move {
        let user = crate::smtp::upstream::login_user(tokens, &account).await;
        let conn = crate::smtp::upstream::open(tls, provider, timeout, &user, &token).await?;
        conn.quit().await;
        Ok(())
    })
    .await;
    let what = format!("SMTP {}", provider.smtp_server);
    match smtp {
        Err(OpenError::Upstream(UpstreamError::Rejected { reply, .. }))
            if account.send_via == SendVia::Auto && reply.contains("5.7.139") =>
        {
            steps.push(Step {
                ok: true,
                line: format!(
                    "{what}: SMTP AUTH is disabled ({reply}); send_via = \"auto\" sends through Microsoft Graph instead"
                ),
            });
            steps.push(check_graph(shared, account).await);
        }
        smtp => steps.push(step(&what, smtp)),
    }
    steps
}

/// Gets an access token for Microsoft Graph, as sending would, without
/// sending anything.
async fn check_graph(shared: &Shared, account: &Account) -> Step {
    let graph_url = &shared.config.provider(&account.provider).graph_url;
    let what = format!("Microsoft Graph {graph_url}");
    match shared.tokens.graph_token(&account.username).await {
        Ok(_) => Step {
            ok: true,
            line: format!(
                "{what}: got a token for sending as {} (no mail sent; Graph itself checks Mail.Send at the first message)",
                account.mailbox
            ),
        },
        Err(e) => Step {
            ok: false,
            line: format!("{what}: no access token: {e}"),
        },
    }
}

fn step(what: &str, result: Result<(), OpenError>) -> Step {
    let failed = |line: String| Step { ok: false, line };
    match result {
        Ok(()) => Step {
            ok: true,
            line: format!("{what}: logged in with XOAUTH2"),
        },
        Err(OpenError::Token(e)) => failed(format!("{what}: no access token: {e}")),
        Err(OpenError::Upstream(UpstreamError::Unreachable(reason))) => {
            failed(format!("{what}: {reason}"))
        }
        Err(OpenError::Upstream(UpstreamError::Rejected { reply, hint })) => failed(format!(
            "{what}: the server refused the login ({reply}); {hint}"
        )),
    }
}

fn say(ok: bool, line: &str) {
    println!("  {} {line}", if ok { "ok     " } else { "PROBLEM" });
}
