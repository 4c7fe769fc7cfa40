//! Failed logins, counted per client address and per (address, username), so
//! that guessing from one address is refused before it costs a password
//! check.
//!
//! The counters live as long as the process (a reload keeps them); the limits
//! come from the config in force at each attempt. Four rules:
//!
//! - **Counted before hashing.** An attempt is admitted only while the
//!   failures already counted plus the attempts still being checked stay
//!   below the limit; past it, further attempts wait for those outcomes. So
//!   however many connections guess at once, at most `max_failed_logins`
//!   checks run before the address is throttled. A right password served
//!   from the accounts' cache is admitted the same way, which is why parallel
//!   logins of one real client (a pool of five) wait a moment rather than fail.
//! - **Throttled means refused, right password or not**, until a back-off
//!   that starts at [`FIRST_BACKOFF`] and doubles with each further failure
//!   up to `throttle_max_delay`. After it, one attempt at a time is admitted.
//!   Other addresses are not affected: there is no account-wide lockout,
//!   which would let anyone lock a mailbox out.
//! - **A success resets** the address's counter and its counter for that
//!   username (not its counters for other usernames).
//! - **Bounded**: each table keeps at most [`CAPACITY`] entries; past it the
//!   entry touched least recently is forgotten, and entries quiet for
//!   [`QUIET`] (or `throttle_max_delay` if longer) with no back-off running
//!   are dropped as new ones arrive. Usernames are kept as a keyed 64-bit
//!   hash, so an entry's size does not depend on what a client sends.
//!
//! IPv6 clients are counted per /64, the block one host usually holds; an
//! IPv4-mapped IPv6 address counts as its IPv4 address.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::Notify;

/// The first back-off of a throttled address; each further failure doubles it.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(60);
/// Entries kept per table (addresses, and address–username pairs).
pub const CAPACITY: usize = 4096;
/// How long an entry without a running back-off stays after its last attempt.
pub const QUIET: Duration = Duration::from_secs(3600);

/// The limits in force (`[server]`), read at each attempt.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `max_failed_logins`: failures for one username from one address.
    pub per_user: u32,
    /// `max_failed_logins_per_address`: failures from one address.
    pub per_address: u32,
    /// `throttle_max_delay`: the longest back-off.
    pub max_delay: Duration,
}

/// The attempt is refused unchecked: its address is throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled;

/// The back-offs a failure started: for the username from that address,
/// and for the whole address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Blocked {
    pub user: Option<Duration>,
    pub address: Option<Duration>,
}

/// The process's failed-login counters.
pub struct Throttle {
    counters: Mutex<Counters>,
    /// Keys the username hash: random per process.
    hasher: RandomState,
    /// Woken whenever an attempt ends, for the attempts waiting on it.
    ended: Notify,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            counters: Mutex::new(Counters::new(CAPACITY)),
            hasher: RandomState::new(),
            ended: Notify::new(),
        }
    }
}

impl Throttle {
    /// Admits an attempt from `client` as `username`, waiting while earlier
    /// attempts that could throttle it are still being checked; `Throttled`
    /// when it must be refused unchecked.
    pub async fn enter(
        &self,
        client: IpAddr,
        username: &str,
        limits: &Limits,
    ) -> Result<Ticket<'_>, Throttled> {
        let key = Key::new(&self.hasher, client, username);
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before looking, so an end between the look and the
            // wait is not missed.
            ended.as_mut().enable();
            let door = self.lock().admit(key, limits, Instant::now());
            match door {
                Door::Open => {
                    return Ok(Ticket {
                        throttle: self,
                        key,
                    });
                }
                Door::Shut => return Err(Throttled),
                Door::Wait => ended.await,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An admitted attempt. Tell it how the check went; dropped untold (the
/// check could not run), it is forgotten without counting.
pub struct Ticket<'a> {
    throttle: &'a Throttle,
    key: Key,
}

impl Ticket<'_> {
    /// The password was wrong (or the username unknown): counted; returns
    /// the back-offs it started.
    pub fn failed(self, limits: &Limits) -> Blocked {
        let blocked = self
            .throttle
            .lock()
            .failed(self.key, limits, Instant::now());
        self.end();
        blocked
    }

    /// The password was right: the address's counters are reset.
    pub fn succeeded(self) {
        self.throttle.lock().succeeded(self.key);
        self.end();
    }

    /// Ends the ticket without running its `Drop` (which would release it again).
    fn end(self) {
        let throttle = self.throttle;
        std::mem::forget(self);
        throttle.ended.notify_waiters();
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.throttle.lock().released(self.key);
        self.throttle.ended.notify_waiters();
    }
}

/// The address as counted: IPv4 as it is, IPv6 by its /64 (and an
/// IPv4-mapped IPv6 address as its IPv4 address). Every per-address limit
/// counts through this one function, so that no limit gives a client with a
/// /64 more room than another does.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    address: IpAddr,
    /// Keyed hash of the lower-cased username.
    user: u64,
}

impl Key {
    fn new(hasher: &RandomState, client: IpAddr, username: &str) -> Self {
        Key {
            address: address_key(client),
            user: hasher.hash_one(username.to_lowercase()),
        }
    }
}

/// What an attempt finds at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    /// Admitted: counted as in flight.
    Open,
    /// Attempts in flight may throttle it: wait for them.
    Wait,
    /// Throttled: refused unchecked.
    Shut,
}

/// The counts of one address, or of one username from one address.
#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    in_flight: u32,
    blocked_until: Option<Instant>,
    last_seen: Instant,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Entry {
            failures: 0,
            in_flight: 0,
            blocked_until: None,
            last_seen: now,
        }
    }

    fn blocked(&self, now: Instant) -> bool {
        self.blocked_until.is_some_and(|until| now < until)
    }

    fn door(&self, limit: u32, now: Instant) -> Door {
        if self.blocked(now) {
            Door::Shut
        } else if self.in_flight > 0 && self.failures + self.in_flight >= limit {
            Door::Wait
        } else {
            Door::Open
        }
    }

    /// Counts a failure; returns the back-off it started, if it reached the limit.
    fn fail(&mut self, limit: u32, max_delay: Duration, now: Instant) -> Option<Duration> {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.failures = self.failures.saturating_add(1);
        self.last_seen = now;
        if self.failures < limit {
            return None;
        }
        let backoff = backoff(self.failures - limit, max_delay);
        self.blocked_until = Some(now + backoff);
        Some(backoff)
    }

    /// Nothing to remember: no back-off running, nothing in flight, and
    /// quiet for `forget_after`.
    fn forgettable(&self, forget_after: Duration, now: Instant) -> bool {
        self.in_flight == 0
            && !self.blocked(now)
            && now.saturating_duration_since(self.last_seen) >= forget_after
    }
}

/// The back-off after `beyond` failures past the limit: [`FIRST_BACKOFF`]
/// doubled that many times, at most `max_delay`.
fn backoff(beyond: u32, max_delay: Duration) -> Duration {
    FIRST_BACKOFF
        .checked_mul(1u32 << beyond.min(20))
        .unwrap_or(max_delay)
        .min(max_delay)
}

/// The two tables, bounded.
struct Counters {
    addresses: LruCache<IpAddr, Entry>,
    users: LruCache<Key, Entry>,
}

impl Counters {
    fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).expect("a capacity of at least one");
        Counters {
            addresses: LruCache::new(capacity),
            users: LruCache::new(capacity),
        }
    }

    fn admit(&mut self, key: Key, limits: &Limits, now: Instant) -> Door {
        let forget_after = limits.max_delay.max(QUIET);
        forget_quiet(&mut self.addresses, forget_after, now);
        forget_quiet(&mut self.users, forget_after, now);
        let address = self
            .addresses
            .get_or_insert_mut(key.address, || Entry::new(now));
        address.last_seen = now;
        let door = address.door(limits.per_address, now);
        if door != Door::Open {
            return door;
        }
        let user = self.users.get_or_insert_mut(key, || Entry::new(now));
        user.last_seen = now;
        let door = user.door(limits.per_user, now);
        if door == Door::Open {
            user.in_flight += 1;
            if let Some(address) = self.addresses.peek_mut(&key.address) {
                address.in_flight += 1;
            }
        }
        door
    }

    fn failed(&mut self, key: Key, limits: &Limits, now: Instant) -> Blocked {
        let user = self.users.get_or_insert_mut(key, || Entry::new(now));
        let user = user.fail(limits.per_user, limits.max_delay, now);
        let address = self
            .addresses
            .get_or_insert_mut(key.address, || Entry::new(now));
        let address = address.fail(limits.per_address, limits.max_delay, now);
        Blocked { user, address }
    }

    /// A success: the address's counter and the username's are reset;
    /// attempts still in flight stay counted as such.
    fn succeeded(&mut self, key: Key) {
        reset(&mut self.users, &key);
        reset(&mut self.addresses, &key.address);
    }

    /// An attempt that was not checked: no longer in flight, not counted.
    fn released(&mut self, key: Key) {
        if let Some(user) = self.users.peek_mut(&key) {
            user.in_flight = user.in_flight.saturating_sub(1);
        }
        if let Some(address) = self.addresses.peek_mut(&key.address) {
            address.in_flight = address.in_flight.saturating_sub(1);
        }
    }
}

/// Forgets the entry of `key` after a success, or clears its counts while
/// other attempts of it are in flight.
fn reset<K: std::hash::Hash + Eq>(table: &mut LruCache<K, Entry>, key: &K) {
    let Some(entry) = table.peek_mut(key) else {
        return;
    };
    entry.in_flight = entry.in_flight.saturating_sub(1);
    if entry.in_flight == 0 {
        table.pop(key);
    } else {
        entry.failures = 0;
        entry.blocked_until = None;
    }
}

/// Drops the quiet entries at the old end of `table`. The table is ordered
/// by last attempt, so the first entry still worth keeping ends the sweep.
fn forget_quiet<K: std::hash::Hash + Eq>(
    table: &mut LruCache<K, Entry>,
    forget_after: Duration,
    now: Instant,
) {
    while table
        .peek_lru()
        .is_some_and(|(_, entry)| entry.forgettable(forget_after, now))
    {
        table.pop_lru();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        per_user: 3,
        per_address: 5,
        max_delay: Duration::from_secs(300),
    };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn key(address: IpAddr, user: &str) -> Key {
        static HASHER: std::sync::LazyLock<RandomState> =
            std::sync::LazyLock::new(RandomState::new);
        Key::new(&HASHER, address, user)
    }

    /// Admits and fails one attempt; returns what the failure started.
    fn fail_once(counters: &mut Counters, key: Key, now: Instant) -> Blocked {
        assert_eq!(counters.admit(key, &LIMITS, now), Door::Open);
        counters.failed(key, &LIMITS, now)
    }

    #[test]
    fn back_off_starts_at_the_first_and_doubles_up_to_the_maximum() {
        let max = Duration::from_secs(300);
        let steps: Vec<u64> = (0..6).map(|n| backoff(n, max).as_secs()).collect();
        assert_eq!(steps, [60, 120, 240, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX, max), max, "no overflow");
        assert_eq!(
            backoff(0, Duration::from_secs(10)),
            Duration::from_secs(10),
            "a maximum below the first back-off wins"
        );
    }

    #[test]
    fn the_limit_throttles_that_username_from_that_address_only() {
        let mut c = Counters::new(16);
        let now = Instant::now();
        let guessed = key(ip(1), "sales@contoso.com");
        for _ in 0..2 {
            assert_eq!(fail_once(&mut c, guessed, now), Blocked::default());
        }
        let third = fail_once(&mut c, guessed, now);
        assert_eq!(third.user, Some(FIRST_BACKOFF));
        assert_eq!(third.address, None, "3 of the address's 5");
        assert_eq!(c.admit(guessed, &LIMITS, now), Door::Shut);
        let same_user_other_case = key(ip(1), "SALES@contoso.com");
        assert_eq!(c.admit(same_user_other_case, &LIMITS, now), Door::Shut);
        let other_address = key(ip(2), "sales@contoso.com");
        assert_eq!(c.admit(other_address, &LIMITS, now), Door::Open);
        let other_user = key(ip(1), "info@contoso.com");
        assert_eq!(c.admit(other_user, &LIMITS, now), Door::Open);
    }

    #[test]
    fn after_the_back_off_one_attempt_is_admitted_and_its_failure_doubles_it() {
        let mut c = Counters::new(16);
        let start = Instant::now();
        let k = key(ip(1), "u");
        for _ in 0..3 {
            fail_once(&mut c, k, start);
        }
        let later = start + FIRST_BACKOFF;
        assert_eq!(
            c.admit(k, &LIMITS, later - Duration::from_secs(1)),
            Door::Shut
        );
        assert_eq!(c.admit(k, &LIMITS, later), Door::Open);
        assert_eq!(c.admit(k, &LIMITS, later), Door::Wait, "one at a time");
        let blocked = c.failed(k, &LIMITS, later);
        assert_eq!(blocked.user, Some(2 * FIRST_BACKOFF));
        assert_eq!(c.admit(k, &LIMITS, later + FIRST_BACKOFF), Door::Shut);
    }

    #[test]
    fn attempts_in_flight_count_so_parallel_guesses_wait() {
        let mut c = Counters::new(16);
        let now = Instant::now();
        let k = key(ip(1), "u");
        for _ in 0..3 {
            assert_eq!(c.admit(k, &LIMITS, now), Door::Open);
        }
        assert_eq!(c.admit(k, &LIMITS, now), Door::Wait);
        c.failed(k, &LIMITS, now);
        c.failed(k, &LIMITS, now);
        assert_eq!(c.admit(k, &LIMITS, now), Door::Wait, "one still in flight");
        assert_eq!(c.failed(k, &LIMITS, now).user, Some(FIRST_BACKOFF));
        assert_eq!(c.admit(k, &LIMITS, now), Door::Shut);
    }

    #[test]
    fn an_unchecked_attempt_is_not_counted() {
        let mut c = Counters::new(16);
        let now = Instant::now();
        let k = key(ip(1), "u");
        for _ in 0..10 {
            assert_eq!(c.admit(k, &LIMITS, now), Door::Open);
            c.released(k);
        }
        assert_eq!(c.admit(k, &LIMITS, now), Door::Open);
    }

    #[test]
    fn the_address_limit_spans_usernames() {
        let mut c = Counters::new(16);
        let now = Instant::now();
        for n in 0..4 {
            let k = key(ip(1), &format!("user{n}"));
            assert_eq!(fail_once(&mut c, k, now).address, None);
        }
        let fifth = key(ip(1), "user4");
        assert_eq!(fail_once(&mut c, fifth, now).address, Some(FIRST_BACKOFF));
        let fresh = key(ip(1), "someone-new");
        assert_eq!(c.admit(fresh, &LIMITS, now), Door::Shut);
        assert_eq!(c.admit(key(ip(9), "user0"), &LIMITS, now), Door::Open);
    }

    #[test]
    fn a_success_resets_the_address_and_that_username() {
        let mut c = Counters::new(16);
        let now = Instant::now();
        let k = key(ip(1), "u");
        let other = key(ip(1), "v");
        fail_once(&mut c, k, now);
        fail_once(&mut c, k, now);
        fail_once(&mut c, other, now);
        fail_once(&mut c, other, now);
        assert_eq!(c.admit(k, &LIMITS, now), Door::Open);
        c.succeeded(k);
        // Three more for `u` before it is throttled again: its count restarted.
        for _ in 0..2 {
            assert_eq!(fail_once(&mut c, k, now), Blocked::default());
        }
        // The address restarted too (2 of 5 now), but `v` kept its two.
        assert_eq!(fail_once(&mut c, other, now).user, Some(FIRST_BACKOFF));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), ip(7));
    }

    #[test]
    fn the_tables_stay_within_their_capacity() {
        let capacity = 64;
        let mut c = Counters::new(capacity);
        let now = Instant::now();
        for n in 0..10 * capacity as u32 {
            let address = IpAddr::from(n.to_be_bytes());
            let k = key(address, &format!("user{n}"));
            fail_once(&mut c, k, now);
        }
        assert_eq!(c.addresses.len(), capacity);
        assert_eq!(c.users.len(), capacity);
        // The oldest went first: the newest address is still counted.
        let newest = IpAddr::from((10 * capacity as u32 - 1).to_be_bytes());
        assert_eq!(c.addresses.peek(&newest).map(|e| e.failures), Some(1));
    }

    /// Admits and releases an attempt at `now`, which sweeps the tables.
    fn touch(counters: &mut Counters, key: Key, limits: &Limits, now: Instant) {
        assert_eq!(counters.admit(key, limits, now), Door::Open);
        counters.released(key);
    }

    #[test]
    fn quiet_entries_are_forgotten() {
        let mut c = Counters::new(16);
        let start = Instant::now();
        let once = key(ip(1), "u");
        fail_once(&mut c, once, start);
        let newcomer = key(ip(3), "u");
        touch(
            &mut c,
            newcomer,
            &LIMITS,
            start + QUIET - Duration::from_secs(1),
        );
        assert!(c.users.peek(&once).is_some(), "not quiet long enough yet");
        touch(&mut c, newcomer, &LIMITS, start + QUIET);
        assert!(c.users.peek(&once).is_none());
        assert!(c.addresses.peek(&ip(1)).is_none());
        assert_eq!((c.users.len(), c.addresses.len()), (1, 1));
    }

    #[test]
    fn entries_are_kept_as_long_as_the_longest_back_off() {
        let long = Limits {
            max_delay: 3 * QUIET,
            ..LIMITS
        };
        let mut c = Counters::new(16);
        let start = Instant::now();
        let k = key(ip(1), "u");
        assert_eq!(c.admit(k, &long, start), Door::Open);
        c.failed(k, &long, start);
        let newcomer = key(ip(3), "u");
        touch(&mut c, newcomer, &long, start + 2 * QUIET);
        assert!(c.users.peek(&k).is_some());
        touch(&mut c, newcomer, &long, start + 3 * QUIET);
        assert!(c.users.peek(&k).is_none());
    }

    #[tokio::test]
    async fn a_waiting_attempt_is_refused_once_those_in_flight_throttle_it() {
        let throttle = Throttle::default();
        let client = ip(1);
        let mut tickets = Vec::new();
        for _ in 0..LIMITS.per_user {
            tickets.push(throttle.enter(client, "u", &LIMITS).await.unwrap());
        }
        let waiting = throttle.enter(client, "u", &LIMITS);
        tokio::pin!(waiting);
        assert!(
            futures_poll_once(waiting.as_mut()).await.is_none(),
            "waits while three are in flight"
        );
        for ticket in tickets {
            ticket.failed(&LIMITS);
        }
        assert_eq!(waiting.await.err(), Some(Throttled));
        let other = throttle.enter(ip(2), "u", &LIMITS).await;
        assert!(other.is_ok(), "another address is admitted");
    }

    #[tokio::test]
    async fn a_waiting_attempt_goes_ahead_after_a_success() {
        let throttle = Throttle::default();
        let client = ip(1);
        let mut tickets = Vec::new();
        for _ in 0..LIMITS.per_user {
            tickets.push(throttle.enter(client, "u", &LIMITS).await.unwrap());
        }
        let waiting = throttle.enter(client, "u", &LIMITS);
        tokio::pin!(waiting);
        assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        tickets.pop().unwrap().succeeded();
        assert!(waiting.await.is_ok());
        drop(tickets);
    }

    /// Polls `future` once: `Some` if it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(future: F) -> Option<F::Output> {
        let mut future = future;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(out) => Some(out),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
