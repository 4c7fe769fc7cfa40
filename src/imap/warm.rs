//! The upstream IMAP connections of the listener: the per-mailbox cap, the
//! pre-login capabilities of each server, and warm sessions.
//!
//! A login to Microsoft 365 costs five or six round trips before the first
//! byte of mail (TCP, TLS, greeting, AUTHENTICATE, the NAMESPACE proof). For
//! an account that logged in recently, up to `imap.warm_sessions`
//! authenticated, unselected upstream sessions wait here, each in a task of
//! its own ([`Parked`]) that reads whatever the server sends unasked (a `BYE`
//! ends it), sends `NOOP` well within the server's idle timeout, closes when
//! the token manager replaces the access token it was opened with (which it
//! does minutes before the token expires), and closes after
//! `imap.warm_idle_timeout` without a login on the account. A client
//! login takes one ([`Upstreams::take_warm`]) only after its local password
//! check and the grant check, and only if it was opened with the access token
//! in force and the config in force.
//!
//! The client is answered `OK` at once, with the capabilities that session's
//! own login gave, and the session is proven alive meanwhile
//! ([`Taken::prove`]: a `NOOP` answered within [`PROOF`], nothing left
//! over). Proving it first would cost a round trip to the server before the
//! `OK`, a quarter of a whole direct login at 20 ms; after the `OK` it runs
//! while the client's first command is on its way. That command is relayed
//! only once the proof is back, so nothing reaches a session not known to
//! be sound. A session that fails the proof is discarded and the login gets
//! a session opened as a cold login opens one (the cap, the token in force,
//! the `NAMESPACE` proof): the client notices only the delay on its first
//! command, or, when that open fails too, a `* BYE [UNAVAILABLE]` instead of
//! an answer (`imap::session`). A replacement opens in the background once
//! the login has its session.
//!
//! Every upstream connection of a mailbox, relayed, warm or being opened,
//! holds a permit of the mailbox's semaphore (`imap.max_connections_per_mailbox`,
//! as Exchange refuses connections past its own limit): a warm session is
//! opened only with a free permit, and a cold login that finds none closes a
//! warm session of its account to take its permit, or is refused.
//!
//! This value lives as long as the listener; a reload or shutdown closes the
//! warm sessions ([`Upstreams::close_warm`]), so that none outlives the config
//! it was opened with.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::upstream::{self, ImapUpstream, KnownCapabilities};
use crate::config::Account;
use crate::secret::Secret;
use crate::shared::Shared;
use crate::upstream::UpstreamError;

/// How long a warm session has to answer the `NOOP` that proves it alive.
const PROOF: Duration = Duration::from_secs(2);
/// How often a waiting warm session sends `NOOP`: well below the 30 minutes
/// an IMAP server must allow an idle session (RFC 9051 §5.4).
const KEEPALIVE: Duration = Duration::from_secs(4 * 60);
/// How often a waiting warm session asks whether its access token is still
/// the account's: the token manager replaces a token minutes before it
/// expires, and the session closes then, before its token is out of date.
const TOKEN_CHECK: Duration = Duration::from_secs(60);
/// How long a cold login waits for the permit of a warm session it closed.
const EVICTION: Duration = Duration::from_secs(2);

/// One upstream connection's place within its mailbox's cap; dropping it
/// gives the place back.
pub type Slot = OwnedSemaphorePermit;

/// An authenticated upstream session with its place in the cap.
pub struct Opened {
    pub upstream: ImapUpstream,
    pub slot: Slot,
}

/// What the IMAP listener keeps of its upstream connections across reloads.
pub struct Upstreams {
    known: KnownCapabilities,
    max_per_mailbox: usize,
    mailboxes: Mutex<HashMap<String, Arc<Mailbox>>>,
    accounts: Mutex<HashMap<String, Arc<Warm>>>,
    /// Cancelled when the warm sessions are to close; replaced by a new one.
    closing: Mutex<CancellationToken>,
}

/// One mailbox's upstream connections.
struct Mailbox {
    /// A permit per connection open or being opened.
    slots: Arc<Semaphore>,
    /// Cold logins waiting for a permit: a warm session opened meanwhile
    /// closes at once to give its permit to them.
    waiting: Mutex<usize>,
}

/// One account's warm sessions.
#[derive(Default)]
struct Warm {
    ready: Mutex<VecDeque<Handle>>,
    /// Being opened in the background now.
    opening: Mutex<usize>,
    last_login: Mutex<Option<Instant>>,
}

/// The pool's side of a parked session: send it a channel, and the session
/// comes back through it. Dropped, the session closes.
struct Handle {
    hand_over: oneshot::Sender<oneshot::Sender<Opened>>,
    /// The access token it was opened with.
    token: Secret,
    /// The config it was opened with.
    shared: Weak<Shared>,
}

/// A cold login counted among a mailbox's `waiting` for as long as it
/// waits, however it ends: a login whose client leaves is dropped mid-wait,
/// and a count left behind would keep warm sessions off for the mailbox.
struct Waiting<'a>(&'a Mutex<usize>);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a Mutex<usize>) -> Self {
        *lock(waiting) += 1;
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        *lock(self.0) -= 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Upstreams {
    /// The cap is read once, as the listener starts (like the SMTP pools).
    pub fn new(max_per_mailbox: usize) -> Self {
        Upstreams {
            known: KnownCapabilities::default(),
            max_per_mailbox,
            mailboxes: Mutex::default(),
            accounts: Mutex::default(),
            closing: Mutex::new(CancellationToken::new()),
        }
    }

    fn mailbox(&self, account: &Account) -> Arc<Mailbox> {
        let key = format!("{}\0{}", account.provider, account.mailbox.to_lowercase());
        lock(&self.mailboxes)
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Mailbox {
                    slots: Arc::new(Semaphore::new(self.max_per_mailbox)),
                    waiting: Mutex::new(0),
                })
            })
            .clone()
    }

    fn warm(&self, account: &Account) -> Arc<Warm> {
        lock(&self.accounts)
            .entry(account.username.to_lowercase())
            .or_default()
            .clone()
    }

    /// Closes every warm session (reload, shutdown); those being opened
    /// close as soon as they are.
    pub fn close_warm(&self) {
        let old = std::mem::replace(&mut *lock(&self.closing), CancellationToken::new());
        old.cancel();
        for warm in lock(&self.accounts).values() {
            lock(&warm.ready).clear();
        }
    }

    /// A place for a new connection to `account`'s mailbox: a free one, or
    /// that of a warm session of the account, closed for it, or one given
    /// back within [`EVICTION`]. `None` when the mailbox stays at its cap.
    async fn slot(&self, account: &Account) -> Option<Slot> {
        let mailbox = self.mailbox(account);
        if let Ok(slot) = mailbox.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        if let Some(evicted) = lock(&self.warm(account).ready).pop_front() {
            // Dropped, its session logs out and gives its permit back.
            drop(evicted);
        }
        let _waiting = Waiting::count(&mailbox.waiting);
        let slot = tokio::time::timeout(EVICTION, mailbox.slots.clone().acquire_owned()).await;
        slot.ok()?.ok()
    }

    /// Opens `account`'s mailbox cold with `token`, within the cap.
    pub async fn open(
        &self,
        shared: &Shared,
        account: &Account,
        token: &Secret,
    ) -> Result<Opened, UpstreamError> {
        let Some(slot) = self.slot(account).await else {
            info!(
                mailbox = %account.mailbox,
                "the mailbox already has {} upstream IMAP connections (imap.max_connections_per_mailbox); refusing the login: close other clients of the mailbox or raise the limit",
                self.max_per_mailbox
            );
            return Err(UpstreamError::Unreachable(format!(
                "the mailbox {} is at imap.max_connections_per_mailbox",
                account.mailbox
            )));
        };
        let upstream = self.open_upstream(shared, account, token).await?;
        Ok(Opened { upstream, slot })
    }

    async fn open_upstream(
        &self,
        shared: &Shared,
        account: &Account,
        token: &Secret,
    ) -> Result<ImapUpstream, UpstreamError> {
        let provider = shared.config.provider(&account.provider);
        let timeout = shared.config.server.upstream_timeout;
        let known = &self.known;
        upstream::open_with(
            &shared.tls,
            provider,
            timeout,
            &account.mailbox,
            token,
            known,
        )
        .await
    }

    /// A warm session of `account` opened with `token` under `shared`, not
    /// yet proven alive ([`Taken::prove`]); `None` (a miss) when there is
    /// none. Sessions found stale or ended on the way are closed.
    pub async fn take_warm(
        &self,
        shared: &Arc<Shared>,
        account: &Account,
        token: &Secret,
    ) -> Option<Taken> {
        if shared.config.imap.warm_sessions == 0 {
            return None;
        }
        let metrics = crate::metrics::get();
        let warm = self.warm(account);
        *lock(&warm.last_login) = Some(Instant::now());
        loop {
            let Some(handle) = lock(&warm.ready).pop_front() else {
                metrics.warm("miss");
                return None;
            };
            if handle.hand_over.is_closed() {
                // It ended while it waited, and was counted then.
                continue;
            }
            match handle.claim(shared, token).await {
                Claim::Taken(opened) => return Some(Taken(opened)),
                Claim::Discarded => metrics.warm("discarded"),
                // It ended while it was asked, and was counted then.
                Claim::Gone => {}
            }
        }
    }

    /// Opens warm sessions for `account` in the background until it has
    /// `imap.warm_sessions` ready or being opened, as far as the mailbox's
    /// cap has room; called after each login of the account.
    pub fn refill(self: &Arc<Self>, shared: &Arc<Shared>, account: &Account) {
        let wanted = shared.config.imap.warm_sessions;
        let warm = self.warm(account);
        *lock(&warm.last_login) = Some(Instant::now());
        loop {
            {
                let mut ready = lock(&warm.ready);
                ready.retain(|h| !h.hand_over.is_closed());
                let mut opening = lock(&warm.opening);
                if ready.len() + *opening >= wanted {
                    return;
                }
                *opening += 1;
            }
            let mailbox = self.mailbox(account);
            let slot = match *lock(&mailbox.waiting) {
                0 => mailbox.slots.clone().try_acquire_owned().ok(),
                _ => None,
            };
            let Some(slot) = slot else {
                *lock(&warm.opening) -= 1;
                return;
            };
            let closing = lock(&self.closing).clone();
            let opening = Opening(warm.clone());
            let task = self
                .clone()
                .open_warm(shared.clone(), account.clone(), opening, slot);
            tokio::spawn(task.run(closing));
        }
    }

    /// What opens one warm session in the background.
    fn open_warm(
        self: Arc<Self>,
        shared: Arc<Shared>,
        account: Account,
        opening: Opening,
        slot: Slot,
    ) -> WarmOpening {
        WarmOpening {
            upstreams: self,
            shared,
            account,
            opening,
            slot,
        }
    }
}

/// Counts a warm session being opened for as long as it is.
struct Opening(Arc<Warm>);

impl Drop for Opening {
    fn drop(&mut self) {
        *lock(&self.0.opening) -= 1;
    }
}

/// One warm session to open, with its place in the cap.
struct WarmOpening {
    upstreams: Arc<Upstreams>,
    shared: Arc<Shared>,
    account: Account,
    opening: Opening,
    slot: Slot,
}

impl WarmOpening {
    /// Opens the session and parks it until a login takes it or it closes
    /// (`closing` included).
    async fn run(self, closing: CancellationToken) {
        let WarmOpening {
            upstreams,
            shared,
            account,
            opening,
            slot,
        } = self;
        let open = async {
            let token = shared.tokens.access_token(&account.username).await.ok()?;
            match upstreams
                .open_upstream(&shared, &account, &token.token)
                .await
            {
                Ok(upstream) => Some((upstream, token.token)),
                Err(e) => {
                    debug!(mailbox = %account.mailbox, "no warm session: {e}");
                    None
                }
            }
        };
        let opened = tokio::select! {
            _ = closing.cancelled() => None,
            opened = open => opened,
        };
        let warm = opening.0.clone();
        drop(opening);
        let Some((upstream, token)) = opened else {
            return;
        };
        if *lock(&upstreams.mailbox(&account).waiting) > 0 {
            // A login waits for this session's place in the cap: it gets it
            // once the server has closed this connection, not before.
            upstream.log_out(PROOF).await;
            return drop(slot);
        }
        crate::metrics::get().warm("opened");
        let (hand_over, asked) = oneshot::channel();
        lock(&warm.ready).push_back(Handle {
            hand_over,
            token: token.clone(),
            shared: Arc::downgrade(&shared),
        });
        let idle_timeout = shared.config.imap.warm_idle_timeout;
        let parked = Parked {
            asked,
            warm: &warm,
            idle_timeout,
            closing: &closing,
            shared: Arc::downgrade(&shared),
            username: account.username.clone(),
            token,
        };
        drop((shared, upstreams));
        parked.wait(Opened { upstream, slot }).await;
    }
}

/// A warm session handed to a login and not yet proven alive: the login
/// answers its client at once with [`Taken::capabilities`] and proves the
/// session while the client's first command is on its way.
pub struct Taken(Box<Opened>);

impl Taken {
    /// The capabilities the session's own login gave, as a client may see them.
    pub fn capabilities(&self) -> &str {
        &self.0.upstream.capabilities
    }

    /// The session, if it answers a `NOOP` within [`PROOF`] with nothing
    /// left over (a hit); else it is closed (discarded), and its place in
    /// the cap is free again when this returns.
    pub async fn prove(self) -> Option<Opened> {
        let mut opened = *self.0;
        let metrics = crate::metrics::get();
        match opened.upstream.prove_alive("w1", PROOF).await {
            Ok(()) => {
                metrics.warm("hit");
                Some(opened)
            }
            Err(e) => {
                info!("a warm session did not prove alive ({e}); the login gets a new one");
                metrics.warm("discarded");
                None
            }
        }
    }
}

/// What asking a waiting session for itself came to.
enum Claim {
    Taken(Box<Opened>),
    /// Opened with another token or config: closed.
    Discarded,
    /// It had ended on its own.
    Gone,
}

impl Handle {
    /// The session, if it was opened with `token` under `shared`; else it
    /// closes.
    async fn claim(self, shared: &Arc<Shared>, token: &Secret) -> Claim {
        if !Weak::ptr_eq(&self.shared, &Arc::downgrade(shared)) || self.token != *token {
            debug!("a warm session opened with an older token or config is closed");
            return Claim::Discarded;
        }
        let (reply, handed) = oneshot::channel();
        if self.hand_over.send(reply).is_err() {
            return Claim::Gone;
        }
        match tokio::time::timeout(PROOF, handed).await {
            Ok(Ok(opened)) => Claim::Taken(Box::new(opened)),
            Ok(Err(_)) => Claim::Gone,
            Err(_) => Claim::Discarded,
        }
    }
}

/// Why a parked session stops waiting.
enum Unpark {
    /// A login takes it.
    Taken(oneshot::Sender<Opened>),
    /// Closed politely: idle too long, evicted, reload or shutdown.
    Close,
    /// Found dead: nothing more to say to it.
    Dead(UpstreamError),
}

/// A warm session's wait.
struct Parked<'a> {
    /// Where a login asks for it.
    asked: oneshot::Receiver<oneshot::Sender<Opened>>,
    warm: &'a Warm,
    idle_timeout: Duration,
    closing: &'a CancellationToken,
    /// The config it was opened under, the account, and its token.
    shared: Weak<Shared>,
    username: String,
    token: Secret,
}

impl Parked<'_> {
    /// Whether the session's token is still the one the account's logins
    /// get (a revoked grant gets none).
    async fn token_in_force(&self) -> bool {
        let Some(shared) = self.shared.upgrade() else {
            return false;
        };
        let current = shared.tokens.access_token(&self.username).await;
        matches!(current, Ok(t) if t.token == self.token)
    }

    /// Keeps a warm session until a login asks for it: reads what the
    /// server sends unasked, sends NOOP every [`KEEPALIVE`], and closes
    /// when its token is no longer the account's ([`TOKEN_CHECK`]), after
    /// `idle_timeout` without a login on the account, or at `closing`.
    async fn wait(mut self, mut opened: Opened) {
        let unpark = self.until_unparked(&mut opened).await;
        unparked(unpark, opened).await
    }

    async fn until_unparked(&mut self, opened: &mut Opened) -> Unpark {
        let (warm, idle_timeout) = (self.warm, self.idle_timeout);
        let mut keepalive = Instant::now() + KEEPALIVE;
        let mut token_check = Instant::now() + TOKEN_CHECK;
        loop {
            let idle_until = lock(&warm.last_login).unwrap_or_else(Instant::now) + idle_timeout;
            tokio::select! {
                biased;
                () = self.closing.cancelled() => return Unpark::Close,
                taken = &mut self.asked => match taken {
                    Ok(reply) => return Unpark::Taken(reply),
                    Err(_) => return Unpark::Close,
                },
                filled = opened.upstream.stream.fill_buf() => {
                    if let Err(e) = filled.map_err(|e| UpstreamError::Unreachable(e.to_string())) {
                        return Unpark::Dead(e);
                    }
                    if let Err(e) = opened.upstream.read_unasked(PROOF).await {
                        return Unpark::Dead(e);
                    }
                }
                () = tokio::time::sleep_until(keepalive) => {
                    if let Err(e) = opened.upstream.prove_alive("w0", PROOF).await {
                        return Unpark::Dead(e);
                    }
                    keepalive = Instant::now() + KEEPALIVE;
                }
                () = tokio::time::sleep_until(token_check) => {
                    if !self.token_in_force().await {
                        return Unpark::Close;
                    }
                    token_check = Instant::now() + TOKEN_CHECK;
                }
                () = tokio::time::sleep_until(idle_until) => {
                    if lock(&warm.last_login).is_none_or(|at| at + idle_timeout <= Instant::now()) {
                        return Unpark::Close;
                    }
                }
            }
        }
    }
}

/// What becomes of a session that stopped waiting.
async fn unparked(unpark: Unpark, opened: Opened) {
    match unpark {
        Unpark::Taken(reply) => {
            if let Err(opened) = reply.send(opened) {
                // The login gave up waiting; the session is no longer known clean.
                opened.upstream.log_out(PROOF).await;
            }
        }
        Unpark::Close => {
            crate::metrics::get().warm("closed");
            opened.upstream.log_out(PROOF).await;
        }
        Unpark::Dead(e) => {
            debug!("a warm session ended while it waited: {e}");
            crate::metrics::get().warm("discarded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Flow, LocalPassword, SendVia};

    fn account() -> Account {
        Account {
            username: "sales@contoso.com".into(),
            password: LocalPassword::Plain(Secret::new("pw".into())),
            provider: "p".into(),
            mailbox: "sales@contoso.com".into(),
            flow: Flow::DeviceCode,
            scopes: None,
            sign_in_user: None,
            send_via: SendVia::Smtp,
        }
    }

    #[tokio::test]
    async fn a_login_dropped_while_it_waits_for_a_slot_is_no_longer_counted() {
        let upstreams = Upstreams::new(1);
        let account = account();
        let held = upstreams.slot(&account).await.expect("a free slot");
        {
            let mut waiting = std::pin::pin!(upstreams.slot(&account));
            let polled = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(waiting.as_mut().poll(cx).is_pending())
            })
            .await;
            assert!(polled, "the mailbox is at its cap");
            assert_eq!(*lock(&upstreams.mailbox(&account).waiting), 1);
        }
        assert_eq!(
            *lock(&upstreams.mailbox(&account).waiting),
            0,
            "the client left: nobody waits"
        );
        drop(held);
        assert!(upstreams.slot(&account).await.is_some());
    }
}
