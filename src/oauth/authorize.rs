//! `xoauth2-proxy login ACCOUNT`: authorising an account once, interactively
//! (device code or browser sign-in), or obtaining an app-only token.
//!
//! Works without a terminal (stdin closed, output to a pipe), so scripts and
//! containers can run it: everything the user must do is printed as plain lines.

use std::io::Write;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::provider::{Grant, GrantError, ProviderClient};
use super::store::{TokenStore, unix_now};
use crate::config::{Account, Config, Flow};

/// Runs the account's flow to the end and stores the grant. The error is one
/// sentence for the user.
pub async fn authorize(
    config: &Config,
    store: &TokenStore,
    account: &Account,
) -> Result<(), String> {
    let provider = ProviderClient::new(
        config.provider(&account.provider),
        config.server.idp_timeout,
    )
    .map_err(|e| format!("provider `{}`: {e}", account.provider))?;
    let scopes = account.scopes(&provider.config);
    let grant = match account.flow {
        Flow::DeviceCode => device_code(&provider, &scopes).await?,
        Flow::AuthorizationCode => authorization_code(&provider, &scopes).await?,
        Flow::ClientCredentials => {
            let grant = provider
                .client_credentials(&scopes)
                .await
                .map_err(|e| e.message)?;
            say(&format!(
                "Account {} uses client credentials: no sign-in is needed, and the app obtained a token.",
                account.username
            ));
            grant
        }
    };

    let now = unix_now();
    let mut stored = store
        .load(&account.username)
        .ok()
        .flatten()
        .unwrap_or_default();
    stored.account = account.username.clone();
    stored.flow = Some(account.flow);
    if grant.refresh_token.is_some() {
        stored.refresh_token = grant.refresh_token;
    }
    stored.access_token = Some(grant.access_token);
    stored.obtained_at = Some(now);
    stored.expires_at = Some(now + grant.expires_in.as_secs());
    stored.authorized_at = Some(now);
    stored.needs_login = false;
    stored.last_error = None;
    stored.last_error_at = None;
    if account.flow.is_delegated() && stored.refresh_token.is_none() {
        return Err(
            "the identity provider sent no refresh token: add the offline_access scope".into(),
        );
    }
    store.save(&account.username, &stored)?;
    say(&format!(
        "Account {} is authorised; its grant is stored in {}.",
        account.username,
        store.path(&account.username).display()
    ));
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn device_code(provider: &ProviderClient, scopes: &[String]) -> Result<Grant, String> {
    let details = provider
        .device_authorize(scopes)
        .await
        .map_err(|e| e.message)?;
    let expires_in = details.expires_in();
    say(&format!(
        "To sign in, open {} in a browser and enter the code {}",
        details.verification_uri().as_str(),
        details.user_code().secret()
    ));
    say(&format!(
        "Sign in as the mailbox's user (or an admin of a shared mailbox). The code expires in {}.",
        minutes(expires_in)
    ));

    let started = Instant::now();
    let last_said = std::sync::Mutex::new(Instant::now());
    let sleep = |interval: Duration| {
        let left = expires_in.saturating_sub(started.elapsed());
        let mut last = last_said.lock().expect("not poisoned");
        if last.elapsed() >= Duration::from_secs(30) {
            say(&format!("Waiting for sign-in… {} left.", minutes(left)));
            *last = Instant::now();
        }
        tokio::time::sleep(interval.min(left.max(Duration::from_millis(1))))
    };
    provider
        .device_poll(&details, sleep)
        .await
        .map_err(|e| device_error(&e))
}

fn device_error(e: &GrantError) -> String {
    match e.oauth_error.as_deref() {
        Some("authorization_declined" | "access_denied") => {
            "the sign-in was declined; run `xoauth2-proxy login` again to retry".into()
        }
        Some("expired_token") | Some("code_expired") => {
            "the code expired before the sign-in finished; run `xoauth2-proxy login` again".into()
        }
        _ if e.message.contains("expired") => {
            "the code expired before the sign-in finished; run `xoauth2-proxy login` again".into()
        }
        _ => e.message.clone(),
    }
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}

/// The authorization code flow with PKCE: print the URL, receive the redirect
/// on the loopback `redirect_uri`, redeem the code.
async fn authorization_code(provider: &ProviderClient, scopes: &[String]) -> Result<Grant, String> {
    let redirect = reqwest::Url::parse(&provider.config.redirect_uri).map_err(|e| {
        format!(
            "`redirect_uri` {} is not a URL ({e}); set it to a loopback URL registered in Entra",
            provider.config.redirect_uri
        )
    })?;
    let host = redirect.host_str().unwrap_or_default().to_string();
    let port = redirect.port_or_known_default().unwrap_or(80);
    let bind = if host == "localhost" {
        "127.0.0.1".to_string()
    } else {
        host.clone()
    };
    let listener = tokio::net::TcpListener::bind((bind.as_str(), port))
        .await
        .map_err(|e| {
            format!(
                "cannot listen on the redirect_uri {}:{port} ({}); set `redirect_uri` to a free loopback port registered in Entra",
                host,
                crate::error::io_reason(&e)
            )
        })?;
    let (url, state, verifier) = provider.authorize_url(scopes);
    say("To sign in, open this URL in a browser on this machine:");
    say(&url);
    say(&format!(
        "Waiting for the browser to return to {} …",
        provider.config.redirect_uri
    ));

    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (mut socket, _) = tokio::time::timeout(left, listener.accept())
            .await
            .map_err(|_| {
                "no sign-in arrived within 10 minutes; run `xoauth2-proxy login` again".to_string()
            })?
            .map_err(|e| {
                format!(
                    "cannot accept the browser's redirect: {}; run `xoauth2-proxy login` again",
                    crate::error::io_reason(&e)
                )
            })?;
        let mut request = vec![0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut request))
            .await
            .unwrap_or(Ok(0))
            .unwrap_or(0);
        let head = String::from_utf8_lossy(&request[..n]);
        let Some(target) = head.split_whitespace().nth(1) else {
            continue;
        };
        let Ok(url) = redirect.join(target) else {
            continue;
        };
        let param = |name: &str| {
            url.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let (body, outcome) = match (param("code"), param("state"), param("error")) {
            (Some(code), Some(s), _) if s == state => {
                ("Signed in. You can close this window.", Ok(code))
            }
            (_, _, Some(error)) => {
                let description = param("error_description").unwrap_or_default();
                (
                    "Sign-in failed; see the terminal.",
                    Err(format!(
                        "the sign-in failed: {error}: {}",
                        description.lines().next().unwrap_or_default()
                    )),
                )
            }
            _ => {
                let _ = respond(&mut socket, "Not a sign-in response.").await;
                continue;
            }
        };
        let _ = respond(&mut socket, body).await;
        let code = outcome?;
        return provider
            .authorization_code(code, verifier)
            .await
            .map_err(|e| e.message);
    }
}

async fn respond(socket: &mut tokio::net::TcpStream, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}
