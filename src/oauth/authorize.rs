//! `xoauth2-proxy login ACCOUNT`: authorising an account once, interactively
//! (device code or browser sign-in), or obtaining an app-only token.
//!
//! Works without a terminal (stdin closed, output to a pipe), so scripts and
//! containers can run it: everything the user must do is printed as plain lines.

use std::io::Write;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::provider::{Grant, GrantError, ProviderClient};
use super::store::{GrantLock, LockError, StoredGrant, TokenStore, unix_now};
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

    let stored = save_signed_in(store, account, grant).await?;
    if let Some(user) = &stored.sign_in_user {
        say(&format!(
            "Signed in as {user}; SMTP logs in as {user}, sending as {}.",
            account.mailbox
        ));
    }
    say(&format!(
        "Account {} is authorised; its grant is stored in {}.",
        account.username,
        store.name_of(&account.username)
    ));
    Ok(())
}

/// Stores the grant a sign-in brought, under the account's lock, with what
/// is stored read again under it: a refresh a running proxy has in flight
/// finishes first, so that its save never lands over the new grant. Taken
/// only now, not during the sign-in, which may take minutes while the
/// proxy's logins of the account would wait for it.
async fn save_signed_in(
    store: &TokenStore,
    account: &Account,
    grant: Grant,
) -> Result<StoredGrant, String> {
    let username = &account.username;
    let _lock = wait_for_lock(store, username).await?;
    let stored = store
        .load(username)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let stored = signed_in(stored, account, grant, unix_now())?;
    store.save(username, &stored).await?;
    Ok(stored)
}

/// How long the lock may take before `login` says what it waits for.
const SAY_WAITING_AFTER: Duration = Duration::from_secs(1);

/// The account's lock, saying so when it is busy; none when the store
/// cannot make one (a state directory `login` may not write: the save says
/// why).
async fn wait_for_lock(store: &TokenStore, username: &str) -> Result<Option<GrantLock>, String> {
    let lock = store.lock(username);
    tokio::pin!(lock);
    let taken = tokio::select! {
        taken = &mut lock => taken,
        () = tokio::time::sleep(SAY_WAITING_AFTER) => {
            say(&format!(
                "Waiting for a running proxy to finish refreshing the grant of {username}…"
            ));
            lock.await
        }
    };
    match taken {
        Ok(lock) => Ok(Some(lock)),
        Err(LockError::Skippable(_)) => Ok(None),
        Err(LockError::Unavailable(e)) => Err(format!(
            "the new grant of {username} is not saved: {e}; run `xoauth2-proxy login {username}` again then"
        )),
    }
}

/// `stored` after a sign-in that brought `grant` at `now`: the new tokens,
/// the account marked authorised and its last error forgotten. The one
/// place both `login` and the console's Connect turn a sign-in into a grant.
pub(crate) fn signed_in(
    mut stored: StoredGrant,
    account: &Account,
    grant: Grant,
    now: u64,
) -> Result<StoredGrant, String> {
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
    // A new sign-in may be another user's: what the old grant knew goes.
    stored.sign_in_user = grant.sign_in_user.filter(|_| account.flow.is_delegated());
    if account.flow.is_delegated() && stored.refresh_token.is_none() {
        return Err(
            "the identity provider sent no refresh token: add the offline_access scope".into(),
        );
    }
    Ok(stored)
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

/// Entra's AADSTS70019, "Verification code expired", whatever `error` it
/// comes with.
const VERIFICATION_CODE_EXPIRED: u32 = 70019;

/// How a failed device sign-in is told to the user: declined and expired get
/// our own sentence, anything else the provider's.
fn device_error(e: &GrantError) -> String {
    device_error_retry(e, "run `xoauth2-proxy login` again")
}

/// `retry` says how to try again (`run \`xoauth2-proxy login\` again`, or
/// the console's button).
pub(crate) fn device_error_retry(e: &GrantError, retry: &str) -> String {
    match (e.oauth_error.as_deref(), e.aadsts) {
        (Some("authorization_declined" | "access_denied"), _) => {
            format!("the sign-in was declined; {retry} to retry")
        }
        (Some("expired_token" | "code_expired"), _) | (_, Some(VERIFICATION_CODE_EXPIRED)) => {
            format!("the code expired before the sign-in finished; {retry}")
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

/// How long the browser has to come back to the redirect URI (the sentence
/// in [`accept_before`] says "10 minutes").
const SIGN_IN_WAIT: Duration = Duration::from_secs(600);

/// How long a connection to the redirect listener may take to send its
/// request.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// The authorization code flow with PKCE: print the URL, receive the redirect
/// on the loopback `redirect_uri`, redeem the code.
async fn authorization_code(provider: &ProviderClient, scopes: &[String]) -> Result<Grant, String> {
    let redirect = redirect_url(&provider.config.redirect_uri)?;
    // Listening before the URL is shown, so the browser never comes back to
    // a closed port.
    let listener = listen_for_redirect(&redirect).await?;
    let (url, state, verifier) = provider.authorize_url(scopes, None);
    show_sign_in_url(&url, &provider.config.redirect_uri);
    let code = wait_for_code(&listener, &redirect, &state).await?;
    provider
        .authorization_code(code, verifier, None)
        .await
        .map_err(|e| e.message)
}

fn redirect_url(redirect_uri: &str) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(redirect_uri).map_err(|e| {
        format!(
            "`redirect_uri` {redirect_uri} is not a URL ({e}); set it to a loopback URL registered in Entra"
        )
    })
}

/// Binds the redirect URI's host and port; `localhost` is bound as
/// 127.0.0.1 rather than left to the resolver.
async fn listen_for_redirect(redirect: &reqwest::Url) -> Result<TcpListener, String> {
    let host = redirect.host_str().unwrap_or_default();
    let port = redirect.port_or_known_default().unwrap_or(80);
    let bind = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    TcpListener::bind((bind, port)).await.map_err(|e| {
        format!(
            "cannot listen on the redirect_uri {}:{port} ({}); set `redirect_uri` to a free loopback port registered in Entra",
            host,
            crate::error::io_reason(&e)
        )
    })
}

fn show_sign_in_url(url: &str, redirect_uri: &str) {
    say("To sign in, open this URL in a browser on this machine:");
    say(url);
    say(&format!(
        "Waiting for the browser to return to {redirect_uri} …"
    ));
}

/// Serves the redirect listener until the browser brings back this
/// sign-in's answer. Other requests (a favicon, a stale tab) are answered
/// or dropped, and waited past.
async fn wait_for_code(
    listener: &TcpListener,
    redirect: &reqwest::Url,
    state: &str,
) -> Result<String, String> {
    let deadline = Instant::now() + SIGN_IN_WAIT;
    loop {
        let mut socket = accept_before(listener, deadline).await?;
        let Some(url) = requested_url(&mut socket, redirect).await else {
            continue;
        };
        let callback = Callback::from_url(&url, state);
        let _ = respond(&mut socket, callback.page()).await;
        match callback {
            Callback::Code(code) => return Ok(code),
            Callback::Failed(sentence) => return Err(sentence),
            Callback::Unrelated => continue,
        }
    }
}

async fn accept_before(listener: &TcpListener, deadline: Instant) -> Result<TcpStream, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    let (socket, _) = tokio::time::timeout(left, listener.accept())
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
    Ok(socket)
}

/// The URL in the request line, resolved against the redirect URI; `None`
/// when nothing that looks like HTTP arrived in time.
async fn requested_url(socket: &mut TcpStream, redirect: &reqwest::Url) -> Option<reqwest::Url> {
    let mut request = vec![0u8; 8192];
    let n = tokio::time::timeout(REQUEST_WAIT, socket.read(&mut request))
        .await
        .unwrap_or(Ok(0))
        .unwrap_or(0);
    let head = String::from_utf8_lossy(&request[..n]);
    let target = head.split_whitespace().nth(1)?;
    redirect.join(target).ok()
}

/// What the browser brought back to the redirect URI.
#[derive(Debug, PartialEq)]
enum Callback {
    /// A code issued for this sign-in: its `state` is ours.
    Code(String),
    /// The identity provider's refusal, as a sentence for the user.
    Failed(String),
    /// Not an answer to this sign-in (no code, or another state: a stale
    /// tab of an earlier attempt, even one carrying an `error`).
    Unrelated,
}

impl Callback {
    fn from_url(url: &reqwest::Url, state: &str) -> Self {
        let param = |name: &str| {
            url.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        match (param("code"), param("state"), param("error")) {
            (Some(code), Some(s), _) if s == state => Callback::Code(code),
            (_, Some(s), Some(error)) if s == state => {
                let description = param("error_description").unwrap_or_default();
                Callback::Failed(format!(
                    "the sign-in failed: {error}: {}",
                    description.lines().next().unwrap_or_default()
                ))
            }
            _ => Callback::Unrelated,
        }
    }

    /// The page the browser shows.
    fn page(&self) -> &'static str {
        match self {
            Callback::Code(_) => "Signed in. You can close this window.",
            Callback::Failed(_) => "Sign-in failed; see the terminal.",
            Callback::Unrelated => "Not a sign-in response.",
        }
    }
}

async fn respond(socket: &mut TcpStream, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::aadsts::ErrorClass;

    fn grant_error(oauth_error: Option<&str>, aadsts: Option<u32>, message: &str) -> GrantError {
        GrantError {
            class: ErrorClass::GrantInvalid,
            oauth_error: oauth_error.map(str::to_string),
            aadsts,
            message: message.into(),
        }
    }

    #[test]
    fn device_sign_in_failures_are_worded_from_the_error_codes() {
        let expired =
            "the code expired before the sign-in finished; run `xoauth2-proxy login` again";
        assert_eq!(
            device_error(&grant_error(Some("expired_token"), None, "x")),
            expired
        );
        assert_eq!(
            device_error(&grant_error(Some("invalid_grant"), Some(70019), "x")),
            expired
        );
        assert!(
            device_error(&grant_error(Some("authorization_declined"), None, "x"))
                .contains("declined")
        );
        assert_eq!(
            device_error(&grant_error(
                Some("invalid_client"),
                Some(7000215),
                "wrong secret"
            )),
            "wrong secret"
        );
    }

    #[test]
    fn only_a_callback_with_our_state_carries_a_code() {
        let url =
            |query: &str| reqwest::Url::parse(&format!("http://localhost:8080/?{query}")).unwrap();
        assert_eq!(
            Callback::from_url(&url("code=c1&state=s1"), "s1"),
            Callback::Code("c1".into())
        );
        assert_eq!(
            Callback::from_url(&url("code=c1&state=forged"), "s1"),
            Callback::Unrelated
        );
        assert_eq!(Callback::from_url(&url(""), "s1"), Callback::Unrelated);
        assert_eq!(
            Callback::from_url(
                &url(
                    "error=access_denied&error_description=AADSTS65004%3A+declined%0Atrace&state=s1"
                ),
                "s1"
            ),
            Callback::Failed("the sign-in failed: access_denied: AADSTS65004: declined".into())
        );
        assert_eq!(
            Callback::from_url(&url("error=access_denied&state=old"), "s1"),
            Callback::Unrelated
        );
        assert_eq!(
            Callback::from_url(&url("error=access_denied"), "s1"),
            Callback::Unrelated
        );
    }

    /// Sends one request to the loopback listener and returns the page.
    async fn browse(port: u16, query: &str) -> String {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        socket
            .write_all(format!("GET /?{query} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut page = String::new();
        socket.read_to_string(&mut page).await.unwrap();
        page
    }

    async fn loopback() -> (TcpListener, reqwest::Url, u16) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let redirect = reqwest::Url::parse(&format!("http://localhost:{port}/")).unwrap();
        (listener, redirect, port)
    }

    #[tokio::test]
    async fn a_stale_tabs_error_is_waited_past_and_the_sign_in_goes_on() {
        let (listener, redirect, port) = loopback().await;
        let waiting = tokio::spawn(async move { wait_for_code(&listener, &redirect, "new").await });
        let stale = browse(port, "error=access_denied&state=old").await;
        assert!(stale.ends_with("Not a sign-in response."), "{stale}");
        let stray = browse(port, "error=x").await;
        assert!(stray.ends_with("Not a sign-in response."), "{stray}");
        let ours = browse(port, "code=c1&state=new").await;
        assert!(
            ours.ends_with("Signed in. You can close this window."),
            "{ours}"
        );
        assert_eq!(waiting.await.unwrap(), Ok("c1".to_string()));
    }

    #[tokio::test]
    async fn an_error_for_this_sign_in_fails_it_with_its_sentence() {
        let (listener, redirect, port) = loopback().await;
        let waiting = tokio::spawn(async move { wait_for_code(&listener, &redirect, "new").await });
        let page = browse(
            port,
            "error=access_denied&error_description=the+user+declined&state=new",
        )
        .await;
        assert!(
            page.ends_with("Sign-in failed; see the terminal."),
            "{page}"
        );
        assert_eq!(
            waiting.await.unwrap(),
            Err("the sign-in failed: access_denied: the user declined".to_string())
        );
    }
}
