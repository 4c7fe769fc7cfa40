//! Local logins: username → account, and the local password check.
//!
//! Argon2 is slow and large on purpose: tens of milliseconds and, with the
//! default parameters, 19 MiB per check. Four things keep that bounded however
//! many clients guess at once:
//!
//! - **The throttle first.** [`crate::throttle`] decides before any hashing;
//!   a throttled address is refused unchecked, whatever the password.
//! - **A cache for the right password.** After a password has been verified
//!   once, a keyed SHA-256 of it is kept in memory, so later logins cost
//!   microseconds; the key is random per process, so the cached value is
//!   useless outside it. A wrong password costs the full argon2 check.
//! - **Bounded hashing.** At most `server.password_checks` checks run at once
//!   and at most `server.password_check_queue` wait for a slot; a login past
//!   those is told to try again later ([`Refused::Busy`]).
//! - **Memory that goes back.** Each check runs in a block buffer mapped from
//!   the OS, not taken from the allocator: glibc keeps what a thread freed in
//!   that thread's arena, so every blocking thread that once hashed went on
//!   holding 19 MiB. A finished check hands its buffer to the next while
//!   others wait, and it is unmapped when none do.
//!
//! An unknown username is checked against a stand-in hash with the accounts'
//! own argon2 parameters, through the same queue, so that it costs what a
//! known one costs and answers as late under load: the time of an answer does
//! not tell which usernames exist.
//!
//! The slots and the throttle's counters belong to the process
//! ([`LoginGuard`]); a reload builds new [`Accounts`] around the same guard.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use memmap2::MmapMut;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::config::{Account, Config, LocalPassword, ServerSection};
use crate::secret::Secret;
use crate::throttle::{Blocked, Limits, Throttle};

/// What outlives a reload: the password check slots and the failed-login
/// counters. A cheap clone of one process-wide value.
#[derive(Clone)]
pub struct LoginGuard {
    hashing: Arc<Hashing>,
    throttle: Arc<Throttle>,
}

impl LoginGuard {
    /// Sized by `server.password_checks` (0: one per core) and
    /// `server.password_check_queue` as the process starts.
    pub fn new(server: &ServerSection) -> Self {
        let slots = match server.password_checks {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        LoginGuard {
            hashing: Arc::new(Hashing::new(slots, server.password_check_queue)),
            throttle: Arc::default(),
        }
    }
}

/// Why a login's password was not accepted.
#[derive(Debug)]
pub enum Refused {
    /// Unknown username (`known` false) or wrong password, counted by the
    /// throttle; `blocked` holds the back-offs this failure started.
    Wrong { known: bool, blocked: Blocked },
    /// Refused unchecked: the client's address is throttled.
    Throttled,
    /// No check slot and no queue place free: try again later.
    Busy,
}

/// The configured accounts, by lower-cased username.
pub struct Accounts {
    by_name: HashMap<String, Arc<Entry>>,
    cache_key: [u8; 32],
    /// What an unknown username is checked against: the first hashed
    /// account's parameters with a random salt and output. `None` when no
    /// account has a hash, as there is then no cost to match.
    stand_in: Option<Arc<Argon2Hash>>,
    guard: LoginGuard,
    limits: Limits,
    /// The console's admin password (`admin.password_hash`), if set.
    admin: Option<Arc<Argon2Hash>>,
}

/// The name the throttle counts the console's admin logins under: no
/// mailbox username can be it, so guessing one never throttles the other.
const ADMIN_LOGIN: &str = "\0console admin";

struct Entry {
    account: Account,
    password: Password,
    /// Keyed digest of the last password that verified.
    verified: Mutex<Option<[u8; 32]>>,
}

/// A local password as it is checked.
enum Password {
    Plain(Secret),
    Argon2(Arc<Argon2Hash>),
}

impl Accounts {
    /// The accounts of `config`, checked through `guard`. Fails on a
    /// `password_hash` that parses but that argon2 cannot check.
    pub fn new(config: &Config, guard: LoginGuard) -> Result<Self, String> {
        let mut by_name = HashMap::new();
        for account in &config.accounts {
            let entry = Entry {
                password: Password::of(account)?,
                account: account.clone(),
                verified: Mutex::new(None),
            };
            by_name.insert(account.username.to_lowercase(), Arc::new(entry));
        }
        let stand_in = config.accounts.iter().find_map(|a| match &a.password {
            LocalPassword::Hash(_) => match &by_name[&a.username.to_lowercase()].password {
                Password::Argon2(hash) => Some(Arc::new(hash.stand_in())),
                Password::Plain(_) => None,
            },
            LocalPassword::Plain(_) => None,
        });
        let admin = match &config.admin.password_hash {
            Some(phc) => Some(Arc::new(Argon2Hash::parse(phc).map_err(|e| {
                format!("`admin.password_hash` cannot be checked ({e}); make a new one with `xoauth2-proxy hash-password`")
            })?)),
            None => None,
        };
        let server = &config.server;
        Ok(Accounts {
            admin,
            by_name,
            cache_key: rand::random(),
            stand_in,
            guard,
            limits: Limits {
                per_user: server.max_failed_logins,
                per_address: server.max_failed_logins_per_address,
                max_delay: server.throttle_max_delay,
            },
        })
    }

    /// The account for `username` if `password` is its local password and
    /// `client` is not throttled. An unknown username and a wrong password
    /// are refused alike (`known` is for the log only).
    pub async fn verify(
        &self,
        client: IpAddr,
        username: &str,
        password: &[u8],
    ) -> Result<Account, Refused> {
        let throttle = &self.guard.throttle;
        let ticket = throttle
            .enter(client, username, &self.limits)
            .await
            .map_err(|_| Refused::Throttled)?;
        let entry = self.by_name.get(&username.to_lowercase());
        let checked = match entry {
            Some(entry) => self.check(entry, password).await,
            None => self.check_unknown(password).await,
        };
        match (checked, entry) {
            (Ok(true), Some(entry)) => {
                ticket.succeeded();
                Ok(entry.account.clone())
            }
            (Ok(_), _) => Err(Refused::Wrong {
                known: entry.is_some(),
                blocked: ticket.failed(&self.limits),
            }),
            // The ticket, dropped, releases the attempt uncounted.
            (Err(Busy), _) => Err(Refused::Busy),
        }
    }

    /// Whether `password` is the console's admin password, through the same
    /// throttle and bounded argon2 checks as the mail logins. Without
    /// `admin.password_hash` every password is wrong (the console then runs
    /// only where the config allows it without one, and asks for none).
    pub async fn verify_admin(&self, client: IpAddr, password: &[u8]) -> Result<(), Refused> {
        let ticket = self
            .guard
            .throttle
            .enter(client, ADMIN_LOGIN, &self.limits)
            .await
            .map_err(|_| Refused::Throttled)?;
        let checked = match &self.admin {
            Some(hash) => self.guard.hashing.verify(hash, password).await,
            None => Ok(false),
        };
        match checked {
            Ok(true) => {
                ticket.succeeded();
                Ok(())
            }
            Ok(false) => Err(Refused::Wrong {
                known: true,
                blocked: ticket.failed(&self.limits),
            }),
            Err(Busy) => Err(Refused::Busy),
        }
    }

    /// Whether `password` is `entry`'s.
    async fn check(&self, entry: &Entry, password: &[u8]) -> Result<bool, Busy> {
        let digest = self.digest(password);
        let known = *entry.verified.lock().expect("not poisoned");
        if known.is_some_and(|known| bool::from(known.ct_eq(&digest))) {
            return Ok(true);
        }
        let ok = match &entry.password {
            Password::Plain(expected) => bool::from(expected.expose().as_bytes().ct_eq(password)),
            Password::Argon2(hash) => self.guard.hashing.verify(hash, password).await?,
        };
        if ok {
            *entry.verified.lock().expect("not poisoned") = Some(digest);
        }
        Ok(ok)
    }

    /// Costs what checking a known username's hash costs; never matches.
    async fn check_unknown(&self, password: &[u8]) -> Result<bool, Busy> {
        if let Some(stand_in) = &self.stand_in {
            self.guard.hashing.verify(stand_in, password).await?;
        }
        Ok(false)
    }

    fn digest(&self, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(password);
        h.finalize().into()
    }
}

impl Password {
    fn of(account: &Account) -> Result<Self, String> {
        match &account.password {
            LocalPassword::Plain(plain) => Ok(Password::Plain(plain.clone())),
            LocalPassword::Hash(phc) => Argon2Hash::parse(phc)
                .map(|hash| Password::Argon2(Arc::new(hash)))
                .map_err(|e| {
                    format!(
                        "the password_hash of account `{}` cannot be checked ({e}); make a new one with `xoauth2-proxy hash-password`",
                        account.username
                    )
                }),
        }
    }
}

/// An argon2 PHC string taken apart once, checked with a caller's memory.
struct Argon2Hash {
    algorithm: Algorithm,
    version: Version,
    params: Params,
    salt: Vec<u8>,
    expected: Vec<u8>,
}

impl Argon2Hash {
    fn parse(phc: &str) -> Result<Self, String> {
        let hash = PasswordHash::new(phc).map_err(|e| e.to_string())?;
        let version = hash.version.map(Version::try_from).transpose();
        Ok(Argon2Hash {
            algorithm: Algorithm::try_from(hash.algorithm.as_str()).map_err(|e| e.to_string())?,
            version: version.map_err(|e| e.to_string())?.unwrap_or_default(),
            params: Params::try_from(&hash).map_err(|e| e.to_string())?,
            salt: hash.salt.as_ref().ok_or("it has no salt")?.to_vec(),
            expected: hash.hash.ok_or("it has no hash")?.as_bytes().to_vec(),
        })
    }

    /// The same parameters with a random salt and output: a check against
    /// it costs the same and matches nothing.
    fn stand_in(&self) -> Self {
        let salt: [u8; 16] = rand::random();
        Argon2Hash {
            salt: salt.to_vec(),
            expected: (0..self.expected.len()).map(|_| rand::random()).collect(),
            params: self.params.clone(),
            ..*self
        }
    }

    /// Whether `password` hashes to the expected output, in `blocks` (at
    /// least [`Params::block_count`] of them); compared in constant time.
    fn matches(&self, password: &[u8], blocks: &mut [Block]) -> bool {
        let argon2 = Argon2::new(self.algorithm, self.version, self.params.clone());
        let mut out = vec![0u8; self.expected.len()];
        let memory = &mut blocks[..self.params.block_count()];
        argon2
            .hash_password_into_with_memory(password, &self.salt, &mut out, memory)
            .is_ok()
            && bool::from(out.ct_eq(&self.expected))
    }
}

/// No check slot and no queue place was free.
#[derive(Debug)]
struct Busy;

/// The process's argon2 checks: at most as many at once as `slots` has
/// permits, at most `queue` waiting, and the memory they run in.
struct Hashing {
    slots: Arc<Semaphore>,
    queue: usize,
    waiting: AtomicUsize,
    /// Buffers of finished checks, kept only while other checks wait.
    spare: Mutex<Vec<Blocks>>,
}

impl Hashing {
    fn new(slots: usize, queue: usize) -> Self {
        Hashing {
            slots: Arc::new(Semaphore::new(slots)),
            queue,
            waiting: AtomicUsize::new(0),
            spare: Mutex::new(Vec::new()),
        }
    }

    /// Checks `password` against `hash` in a slot, on a blocking thread.
    /// The slot goes with the check, so that a login given up while its
    /// check runs does not free the slot early.
    async fn verify(
        self: &Arc<Self>,
        hash: &Arc<Argon2Hash>,
        password: &[u8],
    ) -> Result<bool, Busy> {
        let slot = self.slot().await?;
        crate::metrics::get().password_checks.inc();
        let (hashing, hash, password) = (self.clone(), hash.clone(), password.to_vec());
        let checked = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            hashing.run(&hash, &password)
        })
        .await;
        match checked {
            Ok(Some(ok)) => Ok(ok),
            // No memory for the check: the client may try again later.
            Ok(None) => Err(Busy),
            Err(_) => Ok(false),
        }
    }

    /// A slot at once, or after waiting in the queue if it has room.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, Busy> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        let _place = self.queue_place().ok_or(Busy)?;
        self.slots.clone().acquire_owned().await.map_err(|_| Busy)
    }

    fn queue_place(&self) -> Option<QueuePlace<'_>> {
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.queue).then_some(n + 1)
            })
            .ok()?;
        Some(QueuePlace(&self.waiting))
    }

    /// One check, in a buffer from [`Self::buffer`]; `None` when no memory
    /// could be mapped.
    fn run(&self, hash: &Argon2Hash, password: &[u8]) -> Option<bool> {
        let mut blocks = self.buffer(hash.params.block_count())?;
        let ok = hash.matches(password, blocks.as_blocks());
        self.done_with(blocks);
        Some(ok)
    }

    /// A spare buffer of at least `count` blocks, else a new one.
    fn buffer(&self, count: usize) -> Option<Blocks> {
        let mut spare = self.spare.lock().expect("not poisoned");
        if let Some(i) = spare.iter().position(|b| b.len() >= count) {
            return Some(spare.swap_remove(i));
        }
        drop(spare);
        Blocks::map(count)
            .inspect_err(|e| warn!("cannot map {count} KiB for a password check: {e}"))
            .ok()
    }

    /// Keeps `blocks` for a check that waits, or gives it (and any spare)
    /// back to the OS when none does.
    fn done_with(&self, blocks: Blocks) {
        let mut spare = self.spare.lock().expect("not poisoned");
        if self.waiting.load(Ordering::SeqCst) > 0 {
            spare.push(blocks);
        } else {
            spare.clear();
        }
    }
}

/// A place in the queue for a check slot, given up when dropped.
struct QueuePlace<'a>(&'a AtomicUsize);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Argon2's working memory: an anonymous mapping, so that dropping it gives
/// the pages back to the OS whatever the allocator would have done.
struct Blocks(MmapMut);

impl Blocks {
    fn map(count: usize) -> std::io::Result<Self> {
        MmapMut::map_anon(count * Block::SIZE).map(Blocks)
    }

    fn len(&self) -> usize {
        self.0.len() / Block::SIZE
    }

    fn as_blocks(&mut self) -> &mut [Block] {
        let len = self.len();
        // SAFETY: the mapping is page-aligned (above `Block`'s 64-byte
        // alignment), `len` blocks long, zero-filled by the OS, and a block
        // is plain `u64`s, for which any bytes are valid; the `&mut self`
        // borrow makes the slice the only access while it lives.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<Block>(), len) }
    }
}

/// An argon2id PHC string for `password`, for `xoauth2-proxy hash-password`.
pub fn hash_password(password: &[u8]) -> String {
    use argon2::password_hash::PasswordHasher;
    Argon2::default()
        .hash_password(password)
        .expect("argon2 with default parameters cannot fail")
        .to_string()
}

/// The password the shipped example configs (`packaging/`) hash.
pub const EXAMPLE_PASSWORD: &str = "change-me";

/// Whether `hash` is of the examples' password: a start-up warning, since
/// whoever read the examples knows it. Costs one argon2 check.
pub fn is_example_password(hash: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(EXAMPLE_PASSWORD.as_bytes(), &parsed)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn config(password_line: &str, server: &str) -> Config {
        let text = format!(
            "[server]\n{server}\n[providers.p]\nclient_id = \"c\"\n[[accounts]]\nusername = \"u@x.com\"\nprovider = \"p\"\n{password_line}\n"
        );
        Config::parse(Path::new("t.toml"), &text).unwrap()
    }

    /// An argon2id hash with the smallest memory argon2 allows: quick to check.
    fn cheap_hash(password: &str) -> String {
        use argon2::password_hash::PasswordHasher;
        let params = Params::new(Params::MIN_M_COST, 1, 1, None).unwrap();
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes())
            .unwrap()
            .to_string()
    }

    fn accounts_with(password_line: &str, server: &str) -> Accounts {
        let config = config(password_line, server);
        Accounts::new(&config, LoginGuard::new(&config.server)).unwrap()
    }

    fn hashed(server: &str) -> Accounts {
        accounts_with(&format!("password_hash = \"{}\"", cheap_hash("pw")), server)
    }

    #[tokio::test]
    async fn hashed_password_verifies_and_wrong_one_does_not() {
        let hash = hash_password(b"correct horse");
        assert!(hash.starts_with("$argon2id$"));
        let accounts = accounts_with(&format!("password_hash = \"{hash}\""), "");
        let verify = |user, password| accounts.verify(CLIENT, user, password);
        assert!(verify("U@X.com", b"correct horse").await.is_ok());
        // Served from the cache the second time, still exact.
        assert!(verify("u@x.com", b"correct horse").await.is_ok());
        assert!(matches!(
            verify("u@x.com", b"correct horsE").await,
            Err(Refused::Wrong { known: true, .. })
        ));
        assert!(matches!(
            verify("nobody@x.com", b"correct horse").await,
            Err(Refused::Wrong { known: false, .. })
        ));
    }

    #[tokio::test]
    async fn plain_password_compares_exactly() {
        let accounts = accounts_with("password = \"pw\"", "");
        assert!(accounts.verify(CLIENT, "u@x.com", b"pw").await.is_ok());
        assert!(accounts.verify(CLIENT, "u@x.com", b"pw ").await.is_err());
        assert!(accounts.verify(CLIENT, "u@x.com", b"").await.is_err());
    }

    #[test]
    fn the_examples_password_is_recognised_and_no_other() {
        assert!(is_example_password(&hash_password(b"change-me")));
        assert!(!is_example_password(&hash_password(b"change-me!")));
        assert!(!is_example_password("not a hash"));
    }

    #[test]
    fn a_hash_argon2_cannot_check_is_refused_with_what_to_do() {
        let config = config(
            "password_hash = \"$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\"",
            "",
        );
        let e = Accounts::new(&config, LoginGuard::new(&config.server))
            .err()
            .expect("refused");
        assert!(e.contains("u@x.com") && e.contains("hash-password"), "{e}");
    }

    #[tokio::test]
    async fn a_throttled_address_is_refused_even_the_right_password_and_others_are_not() {
        let accounts = hashed("max_failed_logins = 2");
        for _ in 0..2 {
            let refused = accounts.verify(CLIENT, "u@x.com", b"guess").await;
            assert!(matches!(refused, Err(Refused::Wrong { .. })), "{refused:?}");
        }
        let right = accounts.verify(CLIENT, "u@x.com", b"pw").await;
        assert!(matches!(right, Err(Refused::Throttled)), "{right:?}");
        assert!(accounts.verify(OTHER, "u@x.com", b"pw").await.is_ok());
        // Even once the right password is cached.
        let right = accounts.verify(CLIENT, "u@x.com", b"pw").await;
        assert!(matches!(right, Err(Refused::Throttled)), "{right:?}");
    }

    #[tokio::test]
    async fn the_counters_outlive_a_reload() {
        let config = config(
            &format!("password_hash = \"{}\"", cheap_hash("pw")),
            "max_failed_logins = 2",
        );
        let guard = LoginGuard::new(&config.server);
        let before = Accounts::new(&config, guard.clone()).unwrap();
        for _ in 0..2 {
            let _ = before.verify(CLIENT, "u@x.com", b"guess").await;
        }
        let after = Accounts::new(&config, guard).unwrap();
        let right = after.verify(CLIENT, "u@x.com", b"pw").await;
        assert!(matches!(right, Err(Refused::Throttled)), "{right:?}");
    }

    #[tokio::test]
    async fn known_and_unknown_usernames_wait_in_the_same_bounded_queue() {
        let accounts = hashed("password_checks = 1\npassword_check_queue = 1");
        let hashing = &accounts.guard.hashing;
        let held = hashing.slots.try_acquire().expect("the one slot");
        // One login waits in the queue; the next, known or not, is told busy.
        let waiting = accounts.verify(CLIENT, "u@x.com", b"pw");
        tokio::pin!(waiting);
        assert!(poll_once(waiting.as_mut()).await.is_none(), "queued");
        assert_eq!(hashing.waiting.load(Ordering::SeqCst), 1);
        for user in ["u@x.com", "nobody@x.com"] {
            let busy = accounts.verify(OTHER, user, b"guess").await;
            assert!(matches!(busy, Err(Refused::Busy)), "{user}: {busy:?}");
        }
        drop(held);
        assert!(waiting.await.is_ok(), "runs once the slot is free");
    }

    #[tokio::test]
    async fn busy_is_not_counted_as_a_failure() {
        let accounts =
            hashed("password_checks = 1\npassword_check_queue = 0\nmax_failed_logins = 1");
        let held = accounts.guard.hashing.slots.try_acquire().unwrap();
        for _ in 0..3 {
            let busy = accounts.verify(CLIENT, "u@x.com", b"pw").await;
            assert!(matches!(busy, Err(Refused::Busy)), "{busy:?}");
        }
        drop(held);
        assert!(accounts.verify(CLIENT, "u@x.com", b"pw").await.is_ok());
    }

    #[tokio::test]
    async fn check_memory_goes_back_when_nothing_waits() {
        let accounts = hashed("");
        let _ = accounts.verify(CLIENT, "u@x.com", b"guess").await;
        let _ = accounts.verify(CLIENT, "nobody@x.com", b"guess").await;
        let spare = accounts.guard.hashing.spare.lock().unwrap().len();
        assert_eq!(spare, 0, "no buffer kept after the last check");
    }

    #[test]
    fn a_finished_check_leaves_its_buffer_to_a_waiting_one() {
        let hashing = Hashing::new(1, 4);
        let hash = Argon2Hash::parse(&cheap_hash("pw")).unwrap();
        let _place = hashing.queue_place().unwrap();
        assert_eq!(hashing.run(&hash, b"pw"), Some(true));
        assert_eq!(
            hashing.spare.lock().unwrap().len(),
            1,
            "kept for the waiter"
        );
        assert_eq!(hashing.run(&hash, b"nope"), Some(false), "reused");
        drop(_place);
        assert_eq!(hashing.run(&hash, b"pw"), Some(true));
        assert_eq!(hashing.spare.lock().unwrap().len(), 0, "unmapped");
    }

    #[test]
    fn the_stand_in_costs_the_same_and_matches_nothing() {
        let hash = Argon2Hash::parse(&cheap_hash("pw")).unwrap();
        let stand_in = hash.stand_in();
        assert_eq!(stand_in.params, hash.params);
        assert_eq!(stand_in.expected.len(), hash.expected.len());
        assert_ne!(stand_in.salt, hash.salt);
        let mut blocks = Blocks::map(hash.params.block_count()).unwrap();
        assert!(hash.matches(b"pw", blocks.as_blocks()));
        assert!(!stand_in.matches(b"pw", blocks.as_blocks()));
    }

    /// Polls `future` once: `Some` if it completed.
    async fn poll_once<F: std::future::Future + Unpin>(mut future: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(out) => Some(out),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
