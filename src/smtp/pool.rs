//! Per-mailbox pools of authenticated upstream SMTP connections.
//!
//! Microsoft allows 3 concurrent SMTP connections per mailbox, while
//! nodemailer's pool keeps 5 open for minutes. So client connections do not
//! own upstream connections: a transaction leases one from its mailbox's pool
//! for MAIL … end of DATA and gives it back, and the pool never holds more than
//! `max_connections_per_mailbox` (a semaphore's permits; an idle connection
//! keeps its permit). A transaction that finds every connection busy waits,
//! up to `pool_wait`, for one to come back. Idle connections close after
//! `pool_idle_timeout`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::upstream::SmtpUpstream;
use crate::config::Account;
use crate::login::LoginError;

/// All mailboxes' pools.
pub struct Pools {
    pools: Mutex<HashMap<String, Arc<MailboxPool>>>,
    max_per_mailbox: usize,
    idle_timeout: Duration,
    wait: Duration,
}

struct MailboxPool {
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    leased: AtomicUsize,
    /// Signalled whenever a connection is returned, added or closed.
    changed: Notify,
}

struct Idle {
    conn: SmtpUpstream,
    permit: OwnedSemaphorePermit,
    since: Instant,
}

/// An upstream connection lent to one transaction. Dropped without
/// [`release`](Lease::release), the connection is closed (its state is unknown).
pub struct Lease {
    conn: Option<SmtpUpstream>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<MailboxPool>,
    reused: bool,
}

impl Lease {
    /// Whether the connection waited in the pool (and so may have been
    /// closed by the server meanwhile) rather than being opened for this lease.
    pub fn reused(&self) -> bool {
        self.reused
    }

    pub fn conn(&mut self) -> &mut SmtpUpstream {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until it ends")
    }

    /// Gives a clean connection (no transaction open) back to the pool.
    pub fn release(mut self) {
        let conn = self.conn.take().expect("held");
        let permit = self.permit.take().expect("held");
        self.pool.idle.lock().expect("not poisoned").push(Idle {
            conn,
            permit,
            since: Instant::now(),
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Release moved both out; otherwise the connection closes here and
        // its slot frees.
        self.conn.take();
        self.permit.take();
        self.pool.leased.fetch_sub(1, Ordering::AcqRel);
        self.pool.changed.notify_waiters();
    }
}

/// Whether [`Pools::ensure`] opened a connection, and so used the account's
/// token just now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Yes,
    No,
}

/// No connection could be had for a transaction.
#[derive(Debug)]
pub enum LeaseError {
    /// Every connection stayed busy for `pool_wait`.
    Busy,
    /// Opening a new connection failed.
    Login(LoginError),
}

impl Pools {
    pub fn new(max_per_mailbox: usize, idle_timeout: Duration, wait: Duration) -> Self {
        Pools {
            pools: Mutex::new(HashMap::new()),
            max_per_mailbox,
            idle_timeout,
            wait,
        }
    }

    fn pool(&self, account: &Account) -> Arc<MailboxPool> {
        let key = format!("{}\0{}", account.provider, account.mailbox.to_lowercase());
        self.pools
            .lock()
            .expect("not poisoned")
            .entry(key)
            .or_insert_with(|| {
                Arc::new(MailboxPool {
                    slots: Arc::new(Semaphore::new(self.max_per_mailbox)),
                    idle: Mutex::new(Vec::new()),
                    leased: AtomicUsize::new(0),
                    changed: Notify::new(),
                })
            })
            .clone()
    }

    /// Makes sure the mailbox has a working upstream connection, opening one
    /// if it has none, so that a refused token or disabled SMTP AUTH surfaces
    /// at the client's AUTH. `open` logs in a new upstream connection.
    pub async fn ensure<F, Fut>(&self, account: &Account, open: F) -> Result<Opened, LoginError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<SmtpUpstream, LoginError>>,
    {
        let pool = self.pool(account);
        let deadline = Instant::now() + self.wait;
        loop {
            let changed = pool.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if pool.leased.load(Ordering::Acquire) > 0
                || !pool.idle.lock().expect("not poisoned").is_empty()
            {
                return Ok(Opened::No);
            }
            if let Ok(permit) = pool.slots.clone().try_acquire_owned() {
                let (conn, permit) = open_in_slot(&open, &pool, permit).await?;
                pool.idle.lock().expect("not poisoned").push(Idle {
                    conn,
                    permit,
                    since: Instant::now(),
                });
                pool.changed.notify_waiters();
                return Ok(Opened::Yes);
            }
            // Every slot is taken by connections being opened right now:
            // their outcome is ours.
            if tokio::time::timeout_at(deadline.into(), changed)
                .await
                .is_err()
            {
                return Err(LoginError::UpstreamUnavailable);
            }
        }
    }

    /// Lends the mailbox's idle connection, or a new one while under the
    /// limit (logged in with `open`), or waits for one to come back.
    pub async fn lease<F, Fut>(&self, account: &Account, open: F) -> Result<Lease, LeaseError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<SmtpUpstream, LoginError>>,
    {
        let pool = self.pool(account);
        let deadline = Instant::now() + self.wait;
        loop {
            let changed = pool.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let idle = pool.idle.lock().expect("not poisoned").pop();
            if let Some(Idle {
                conn,
                permit,
                since,
            }) = idle
            {
                if since.elapsed() < self.idle_timeout {
                    return Ok(self.lent(&pool, conn, permit, true));
                }
                // Its slot frees once it is closed; waiters (this one among
                // them) must hear of it.
                let pool = pool.clone();
                tokio::spawn(async move {
                    conn.quit().await;
                    drop(permit);
                    pool.changed.notify_waiters();
                });
                continue;
            }
            if let Ok(permit) = pool.slots.clone().try_acquire_owned() {
                return match open_in_slot(&open, &pool, permit).await {
                    Ok((conn, permit)) => Ok(self.lent(&pool, conn, permit, false)),
                    Err(e) => Err(LeaseError::Login(e)),
                };
            }
            if tokio::time::timeout_at(deadline.into(), changed)
                .await
                .is_err()
            {
                return Err(LeaseError::Busy);
            }
        }
    }

    fn lent(
        &self,
        pool: &Arc<MailboxPool>,
        conn: SmtpUpstream,
        permit: OwnedSemaphorePermit,
        reused: bool,
    ) -> Lease {
        pool.leased.fetch_add(1, Ordering::AcqRel);
        Lease {
            conn: Some(conn),
            permit: Some(permit),
            pool: pool.clone(),
            reused,
        }
    }

    /// How often [`reap_once`](Self::reap_once) should run.
    pub fn reap_period(&self) -> Duration {
        (self.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// Closes idle connections older than the idle timeout.
    pub fn reap_once(&self) {
        let pools: Vec<_> = self
            .pools
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        for pool in pools {
            let expired: Vec<Idle> = {
                let mut idle = pool.idle.lock().expect("not poisoned");
                let (old, fresh) = idle
                    .drain(..)
                    .partition(|i| i.since.elapsed() >= self.idle_timeout);
                *idle = fresh;
                old
            };
            for Idle { conn, permit, .. } in expired {
                let pool = pool.clone();
                tokio::spawn(async move {
                    conn.quit().await;
                    drop(permit);
                    pool.changed.notify_waiters();
                });
            }
        }
    }
}

/// Opens a connection with `open` in the slot `permit` holds. On failure
/// the slot is freed and the pool's waiters are told.
async fn open_in_slot<F, Fut>(
    open: &F,
    pool: &MailboxPool,
    permit: OwnedSemaphorePermit,
) -> Result<(SmtpUpstream, OwnedSemaphorePermit), LoginError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<SmtpUpstream, LoginError>>,
{
    match open().await {
        Ok(conn) => Ok((conn, permit)),
        Err(e) => {
            drop(permit);
            pool.changed.notify_waiters();
            Err(e)
        }
    }
}
