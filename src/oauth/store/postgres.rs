//! Grants in PostgreSQL: one row per account, shared by every replica of a
//! deployment (NocoBase's own database, in a schema of the proxy's own).
//!
//! A row holds the account, the document (the grant as a file would hold
//! it, sealed when there is a token key), a version bumped by every write,
//! and when it was created and last written. The schema and its tables are
//! made by versioned migrations, run once per store before its first use
//! (under a transaction-level advisory lock, so replicas starting together
//! run each migration once).
//!
//! The cross-replica lock of an account is a session-level advisory lock
//! held on a connection of its own, outside the pool: it is released when
//! the lock is dropped (the connection closes), when the process dies (the
//! kernel closes the socket, the server ends the session), or when the
//! replica is cut off from the database (nothing is closed: the server's
//! keepalive probes go unanswered and it ends the session, 25 s after the
//! replica fell silent). Each write is committed on its own, so a rotated
//! refresh token is committed before the lock is released and before its
//! access token is handed out.
//!
//! While a process holds an account's lock, that account's row is read and
//! written on the lock's own connection, not through the pool. The lock is
//! then a fence: a replica whose session the server has ended (it was cut
//! off, and another replica may have refreshed since) cannot write its
//! older grant over the newer one, because its writes can only go through
//! the session that held the lock, and that session is gone.
//!
//! The URL may hold a password: it is a [`Secret`], and logs and errors name
//! the database by host, port and name only. TLS to the database, when the
//! URL asks for it (`sslmode=prefer`, the default, or `require`), always
//! verifies the server's certificate (system roots, plus `sslrootcert`).

use std::collections::HashMap;
use std::ops::Deref;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use super::backend::{Backend, Document, GrantLock, LoadError, LockError, Pending, Revision};
use crate::config::{Config, StoreKind};
use crate::secret::Secret;

/// Connecting, waiting for a pooled connection, and one statement.
const DB_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refresh waits for another replica's: longer than a slow
/// identity provider answers.
const LOCK_WAIT: Duration = Duration::from_secs(60);
/// How often a running proxy checks that the database answers (`/metrics`).
const PROBE_EVERY: Duration = Duration::from_secs(10);
/// Connections in the pool: grants are read and written seldom.
const POOL_SIZE: usize = 4;
/// A connection whose data the database has not acknowledged for this long
/// is broken off by the kernel (`TCP_USER_TIMEOUT`): after a network
/// partition heals, no pooled connection is left waiting on a statement
/// sent into the void.
const UNACKNOWLEDGED: Duration = Duration::from_secs(10);
/// TCP keepalive of every connection (the lock's on both ends): a peer
/// silent for `KEEPALIVE_IDLE` is probed `KEEPALIVE_PROBES` times
/// `KEEPALIVE_INTERVAL` apart, then given up: 25 s in all, how long the
/// others wait for the lock of a replica cut off from the database
/// (docs/shared-store.md says why not less).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

/// How long a peer may stay silent before its connection is given up: the
/// keepalive's idle time and unanswered probes (25 s).
fn silent_peer_limit() -> Duration {
    KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES
}

/// The schema's migrations, in order; each runs once, in a transaction.
/// `{schema}` stands for the quoted schema name. Never edit one that has
/// shipped: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "grants: one row per account",
    "CREATE TABLE {schema}.grants (
        account text PRIMARY KEY,
        document bytea NOT NULL,
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )",
)];

/// The grants in one PostgreSQL schema.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    connect: tokio_postgres::Config,
    tls: Tls,
    schema: String,
    /// `host:port/db`, for sentences; never the password.
    place: String,
    /// The migrations have run since this store was made.
    migrated: tokio::sync::Mutex<bool>,
    /// The connections holding an account's lock in this process, by
    /// account: that account's row is read and written on them (a fence).
    held: std::sync::Mutex<HashMap<String, Weak<LockSession>>>,
    /// The last operation reached the database (logged when it changes).
    up: AtomicBool,
    probing: AtomicBool,
}

#[derive(Clone)]
enum Tls {
    Off,
    Verified(MakeRustlsConnect),
}

impl PostgresStore {
    /// The store `[store]` of `config` names (its `url`, `schema`). Nothing
    /// is connected yet; a URL that cannot be used is an error.
    pub fn for_config(config: &Config) -> Result<Self, String> {
        let url = config.store.url.as_ref().ok_or(
            "[store] has no url: set url (postgres://USER:PASSWORD@HOST:5432/DB) or url_file",
        )?;
        PostgresStore::new(url, &config.store.schema)
    }

    /// The store at `url` (a secret: it may hold a password), tables in
    /// `schema` (a plain SQL name, checked by the config).
    pub fn new(url: &Secret, schema: &str) -> Result<Self, String> {
        let (mut connect, root_cert) = parse_url(url.expose())?;
        connect.connect_timeout(DB_TIMEOUT);
        // And the proxy notices a vanished server, on an idle connection or
        // one waiting for an answer.
        connect.keepalives_idle(KEEPALIVE_IDLE);
        connect.keepalives_interval(KEEPALIVE_INTERVAL);
        connect.keepalives_retries(KEEPALIVE_PROBES);
        connect.tcp_user_timeout(UNACKNOWLEDGED);
        connect.application_name("xoauth2-proxy");
        let tls = match connect.get_ssl_mode() {
            SslMode::Disable => Tls::Off,
            _ => {
                let rustls = crate::tls::client_config(root_cert.as_deref())?;
                Tls::Verified(MakeRustlsConnect::new((*rustls).clone()))
            }
        };
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Tls::Off => Manager::from_config(connect.clone(), NoTls, manager_config),
            Tls::Verified(t) => Manager::from_config(connect.clone(), t.clone(), manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(DB_TIMEOUT))
            .create_timeout(Some(DB_TIMEOUT))
            .recycle_timeout(Some(DB_TIMEOUT))
            .build()
            .map_err(|e| format!("cannot set up the database pool ({e}); please report this"))?;
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                place: place(&connect),
                connect,
                tls,
                schema: schema.to_string(),
                migrated: tokio::sync::Mutex::new(false),
                held: std::sync::Mutex::new(HashMap::new()),
                up: AtomicBool::new(true),
                probing: AtomicBool::new(false),
            }),
        })
    }

    fn table(&self) -> String {
        format!("\"{}\".grants", self.inner.schema)
    }

    /// The sentence for a database that does not answer (or refuses).
    fn down(&self, reason: String) -> String {
        let advice = if reason.contains("certificate") {
            "the database's TLS certificate is not trusted: add sslrootcert=/path/to/ca.pem (its CA) to [store] url, or fix the certificate's names"
        } else {
            "check that the database is up and that [store] url is right"
        };
        format!(
            "the grant store (PostgreSQL {}) cannot be used: {reason}; {advice}",
            self.inner.place
        )
    }

    /// Notes whether the database answered: logged when it changes, and
    /// the `grant_store_up` gauge follows.
    fn mark<T>(&self, result: Result<T, String>) -> Result<T, String> {
        let up = result.is_ok();
        let was = self.inner.up.swap(up, Ordering::Relaxed);
        crate::metrics::get().grant_store_up.set(i64::from(up));
        match (&result, was) {
            (Err(e), true) => warn!("{e}"),
            (Ok(_), false) => info!(
                "the grant store (PostgreSQL {}) answers again",
                self.inner.place
            ),
            _ => {}
        }
        result
    }

    /// A pooled connection, once the schema is migrated.
    async fn client(&self) -> Result<deadpool_postgres::Object, Unready> {
        let mut client = self
            .inner
            .pool
            .get()
            .await
            .map_err(|e| Unready::Down(self.down(chain(&e))))?;
        let mut migrated = self.inner.migrated.lock().await;
        if !*migrated {
            if let Err(e) = self.migrate(&mut client).await {
                // Not given back to the pool: a statement that timed out may
                // still be running on it, in the transaction.
                drop(deadpool_postgres::Object::take(client));
                return Err(e);
            }
            *migrated = true;
        }
        Ok(client)
    }

    /// Creates the schema if it is missing and runs the migrations it has
    /// not had, under a lock so that replicas starting together do not race.
    async fn migrate(&self, client: &mut Client) -> Result<(), Unready> {
        let schema = &self.inner.schema;
        let quoted = format!("\"{schema}\"");
        let tx = self.step(client.transaction()).await?;
        let lock_key = format!("xoauth2-proxy/{schema}/migrations");
        self.step(tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&lock_key],
        ))
        .await?;
        let exists = self
            .step(tx.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[schema]))
            .await?
            .is_some();
        if !exists {
            self.step(tx.batch_execute(&format!("CREATE SCHEMA {quoted}")))
                .await?;
        }
        self.step(tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {quoted}.schema_migrations (
                version integer PRIMARY KEY,
                description text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"
        )))
        .await?;
        let applied: Vec<i32> = self
            .step(tx.query(
                &format!("SELECT version FROM {quoted}.schema_migrations"),
                &[],
            ))
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for (version, description, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            self.step(tx.batch_execute(&sql.replace("{schema}", &quoted)))
                .await?;
            self.step(tx.execute(
                &format!(
                    "INSERT INTO {quoted}.schema_migrations (version, description) VALUES ($1, $2)"
                ),
                &[version, description],
            ))
            .await?;
            info!("grant store: applied migration {version} ({description}) to schema {schema}");
        }
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if applied.iter().any(|v| *v > newest) {
            warn!(
                "schema {schema} was migrated by a newer xoauth2-proxy (version {}); this one knows up to {newest}: run the newer version on every replica",
                applied.iter().max().unwrap_or(&0)
            );
        }
        self.step(tx.commit()).await
    }

    /// One statement of the migrations, bounded as every statement is
    /// ([`within`]): they run holding the store's `migrated` mutex, which
    /// every use of the store waits for. The database refused (no right to
    /// create the schema or a table), or it broke or stalled.
    async fn step<T>(
        &self,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Unready> {
        let schema = &self.inner.schema;
        match tokio::time::timeout(DB_TIMEOUT, statement).await {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) if e.as_db_error().is_some() => Err(Unready::Schema(format!(
                "cannot prepare schema {schema} in PostgreSQL {}: {}; the role in [store] url needs its own schema (docs/shared-store.md has the SQL that makes one)",
                self.inner.place,
                chain(&e)
            ))),
            Ok(Err(e)) => Err(Unready::Down(self.down(chain(&e)))),
            Err(_) => Err(Unready::Down(self.down(no_answer()))),
        }
    }

    /// A connection of its own for a lock (closed with it).
    async fn dedicated(&self) -> Result<Client, String> {
        let inner = &self.inner;
        // `connect_timeout` bounds the TCP connect alone: TLS, the startup
        // message and authentication are bounded here, or a server whose
        // port answers but which stalls would hold the refresh (and every
        // login of its account, waiting behind it) for ever.
        let client = match &inner.tls {
            Tls::Off => {
                let (client, connection) = self.in_time(inner.connect.connect(NoTls)).await?;
                tokio::spawn(connection);
                client
            }
            Tls::Verified(tls) => {
                let (client, connection) = self.in_time(inner.connect.connect(tls.clone())).await?;
                tokio::spawn(connection);
                client
            }
        };
        Ok(client)
    }

    /// Connecting, within [`DB_TIMEOUT`].
    async fn in_time<T>(
        &self,
        connecting: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(DB_TIMEOUT, connecting).await {
            Ok(connected) => connected.map_err(|e| self.down(chain(&e))),
            Err(_) => Err(self.down(no_answer())),
        }
    }

    async fn take_lock(&self, account: &str) -> Result<GrantLock, String> {
        let client = self.dedicated().await?;
        // A replica cut off from the database (not killed: its socket is
        // never closed) must not hold the lock for the kernel's default two
        // hours: the server probes the lock's connection and ends it. The
        // keepalive covers a connection with nothing in flight; the user
        // timeout one whose last answer was sent into the cut, which TCP
        // would otherwise retransmit for some fifteen minutes.
        within(client.batch_execute(&format!(
            "SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; SET tcp_keepalives_count = {KEEPALIVE_PROBES}; SET tcp_user_timeout = {}",
            KEEPALIVE_IDLE.as_secs(),
            KEEPALIVE_INTERVAL.as_secs(),
            silent_peer_limit().as_millis(),
        )))
        .await
        .map_err(|e| self.down(e))?;
        let account = account.to_lowercase();
        let key = format!("xoauth2-proxy/{}/{account}", self.inner.schema);
        let locked = tokio::time::timeout(
            LOCK_WAIT,
            client.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&key]),
        )
        .await;
        match locked {
            Ok(Ok(_)) => {
                let held = HeldLock::new(self, account, client);
                // What a refresh under this lock replaces, remembered while
                // the database can still be asked.
                let _ = self.read_row(&held.account).await;
                Ok(GrantLock::new(held))
            }
            Ok(Err(e)) => Err(self.down(chain(&e))),
            Err(_) => Err(format!(
                "another process has held the refresh lock of {account} in PostgreSQL {} for over {}s; try again later",
                self.inner.place,
                LOCK_WAIT.as_secs()
            )),
        }
    }

    /// The connection for `account`'s row: the lock's own while this
    /// process holds the lock (if the server has ended that session, the
    /// statement fails rather than go around the fence), else a pooled one.
    async fn conn_for(&self, account: &str) -> Result<Conn, String> {
        let held = self
            .inner
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&account.to_lowercase())
            .and_then(Weak::upgrade);
        match held {
            Some(session) => Ok(Conn::Locked(session)),
            None => Ok(Conn::Pooled(Box::new(self.client().await?))),
        }
    }

    async fn read_row(&self, account: &str) -> Result<Option<Document>, String> {
        let client = self.conn_for(account).await?;
        let sql = format!(
            "SELECT document, version, extract(epoch FROM updated_at)::float8 FROM {} WHERE account = $1",
            self.table()
        );
        let row = within(client.query_opt(&sql, &[&account.to_lowercase()]))
            .await
            .map_err(|e| self.down(e))?;
        let document = row.map(|row| Document {
            bytes: row.get(0),
            revision: revision(row.get(1), row.get(2)),
        });
        client.saw(document.clone());
        Ok(document)
    }

    async fn row_revision(&self, account: &str) -> Result<Option<Revision>, String> {
        let client = self.conn_for(account).await?;
        let sql = format!(
            "SELECT version, extract(epoch FROM updated_at)::float8 FROM {} WHERE account = $1",
            self.table()
        );
        let row = within(client.query_opt(&sql, &[&account.to_lowercase()]))
            .await
            .map_err(|e| self.down(e))?;
        Ok(row.map(|row| revision(row.get(0), row.get(1))))
    }

    async fn write_row(&self, account: &str, bytes: &[u8]) -> Result<Revision, String> {
        let client = self.conn_for(account).await?;
        let sql = format!(
            "INSERT INTO {table} (account, document) VALUES ($1, $2)
             ON CONFLICT (account) DO UPDATE
                SET document = EXCLUDED.document, version = grants.version + 1, updated_at = now()
             RETURNING version, extract(epoch FROM updated_at)::float8",
            table = self.table()
        );
        let row = within(client.query_one(&sql, &[&account.to_lowercase(), &bytes]))
            .await
            .map_err(|e| {
                format!(
                    "cannot write the grant of {account} to PostgreSQL {}: {e}",
                    self.inner.place
                )
            })?;
        let written = revision(row.get(0), row.get(1));
        client.saw(Some(Document {
            bytes: bytes.to_vec(),
            revision: written,
        }));
        Ok(written)
    }

    async fn delete_row(&self, account: &str) -> Result<(), String> {
        let client = self.conn_for(account).await?;
        let sql = format!("DELETE FROM {} WHERE account = $1", self.table());
        within(client.execute(&sql, &[&account.to_lowercase()]))
            .await
            .map(|_| ())
            .map_err(|e| self.down(e))
    }

    async fn list(&self) -> Result<Vec<String>, String> {
        let client = self.client().await?;
        let sql = format!("SELECT account FROM {} ORDER BY account", self.table());
        let rows = within(client.query(&sql, &[]))
            .await
            .map_err(|e| self.down(e))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    async fn ping(&self) -> Result<(), String> {
        let client = self.client().await?;
        within(client.simple_query("SELECT 1"))
            .await
            .map(|_| ())
            .map_err(|e| self.down(e))
    }

    /// Checks the database every [`PROBE_EVERY`] while this store lives,
    /// so that `/metrics` shows an outage nobody's login has met yet.
    fn start_probing(&self) {
        if self.inner.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(inner) = weak.upgrade() else { return };
                let store = PostgresStore { inner };
                let _ = store.mark(store.ping().await);
            }
        });
    }
}

/// The session holding an account's lock: its connection, and the row as
/// this process last read or wrote it through that connection.
struct LockSession {
    client: Client,
    /// Nobody else writes the row while the lock is held, so this is what a
    /// refresh under the lock replaces, known even once the database cannot
    /// be reached ([`Backend::read_under_lock`]).
    seen: std::sync::Mutex<Option<Document>>,
}

/// An account's lock, held by this process: its session, registered so
/// that the account's row goes through it.
struct HeldLock {
    session: Arc<LockSession>,
    account: String,
    store: Weak<Inner>,
}

impl HeldLock {
    fn new(store: &PostgresStore, account: String, client: Client) -> HeldLock {
        let session = Arc::new(LockSession {
            client,
            seen: std::sync::Mutex::new(None),
        });
        store
            .inner
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(account.clone(), Arc::downgrade(&session));
        HeldLock {
            session,
            account,
            store: Arc::downgrade(&store.inner),
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let Some(inner) = self.store.upgrade() else {
            return;
        };
        let mut held = inner.held.lock().unwrap_or_else(|e| e.into_inner());
        // Only this lock's entry: a lock taken since (this one's session
        // ended) has its own.
        let ours = Arc::downgrade(&self.session);
        if held.get(&self.account).is_some_and(|w| w.ptr_eq(&ours)) {
            held.remove(&self.account);
        }
    }
}

/// Where an account's row is read or written.
enum Conn {
    Pooled(Box<deadpool_postgres::Object>),
    /// The session holding the account's lock.
    Locked(Arc<LockSession>),
}

impl Conn {
    /// The row was read or written as `document` through this connection.
    fn saw(&self, document: Option<Document>) {
        if let Conn::Locked(session) = self {
            *session.seen.lock().unwrap_or_else(|e| e.into_inner()) = document;
        }
    }
}

impl Deref for Conn {
    type Target = Client;

    fn deref(&self) -> &Client {
        match self {
            Conn::Pooled(object) => object,
            Conn::Locked(session) => &session.client,
        }
    }
}

/// Why `e` happened, with its causes ("error performing TLS handshake:
/// invalid peer certificate: UnknownIssuer"); the database's own message
/// when it sent one.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = match e.downcast_ref::<tokio_postgres::Error>() {
        Some(pg) => db_reason(pg),
        None => e.to_string(),
    };
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = match c.downcast_ref::<tokio_postgres::Error>() {
            Some(pg) => db_reason(pg),
            None => c.to_string(),
        };
        if !reason.contains(&text) {
            reason = format!("{reason}: {text}");
        }
        cause = c.source();
    }
    reason
}

/// Why the store is not ready to use.
enum Unready {
    /// The database cannot be reached (or the connection broke): a later
    /// use tries again.
    Down(String),
    /// The database refused the schema's migrations: a set-up problem,
    /// reported at start.
    Schema(String),
}

impl From<Unready> for String {
    fn from(e: Unready) -> String {
        match e {
            Unready::Down(s) | Unready::Schema(s) => s,
        }
    }
}

/// One statement, bounded: a database that accepts connections and then
/// stalls must not hold a login forever.
async fn within<T>(
    query: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(DB_TIMEOUT, query).await {
        Ok(result) => result.map_err(|e| chain(&e)),
        Err(_) => Err(no_answer()),
    }
}

/// Why a bounded operation failed when the database said nothing.
fn no_answer() -> String {
    format!(
        "the database did not answer within {}s",
        DB_TIMEOUT.as_secs()
    )
}

/// The database's own message when there is one (it says more than
/// "db error").
fn db_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

fn revision(version: i64, epoch: f64) -> Revision {
    Revision {
        version,
        written: UNIX_EPOCH + Duration::from_secs_f64(epoch.max(0.0)),
    }
}

/// `host:port/db` of a connection config, for sentences.
fn place(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// Parses the URL as libpq would, for what tokio-postgres does not know:
/// `sslmode=verify-ca` and `verify-full` (TLS here is always verified, so
/// they mean `require`), and `sslrootcert=FILE` (a CA to trust besides the
/// system's). Errors never repeat the URL (it may hold a password).
fn parse_url(url: &str) -> Result<(tokio_postgres::Config, Option<PathBuf>), String> {
    let mut root_cert = None;
    let url = match url.split_once('?') {
        Some((base, query)) => {
            let mut kept = Vec::new();
            for pair in query.split('&') {
                match pair.split_once('=') {
                    Some(("sslrootcert", file)) => root_cert = Some(PathBuf::from(file)),
                    Some(("sslmode", "verify-ca" | "verify-full")) => kept.push("sslmode=require"),
                    _ => kept.push(pair),
                }
            }
            if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
        None => url.to_string(),
    };
    let config = tokio_postgres::Config::from_str(&url).map_err(|e| {
        format!("[store] url is not a PostgreSQL URL ({e}); write it as postgres://USER:PASSWORD@HOST:5432/DB")
    })?;
    Ok((config, root_cert))
}

impl Backend for PostgresStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Postgres
    }

    fn describe(&self) -> String {
        format!(
            "PostgreSQL {}, schema {}",
            self.inner.place, self.inner.schema
        )
    }

    fn name_of(&self, account: &str) -> String {
        format!(
            "the grant of {} in PostgreSQL {} (schema {})",
            account.to_lowercase(),
            self.inner.place,
            self.inner.schema
        )
    }

    fn write_advice(&self) -> String {
        format!(
            "check that PostgreSQL {} is up and has room",
            self.inner.place
        )
    }

    fn shared(&self) -> bool {
        true
    }

    /// Migrates and checks the database. Out of reach at start is not an
    /// error: logins with cached tokens do not need it, and every use tries
    /// again, so the proxy recovers by itself.
    fn prepare(&self) -> Pending<'_, Result<(), String>> {
        Box::pin(async move {
            self.start_probing();
            let ready = self.client().await.map(|_| ());
            let refused = matches!(ready, Err(Unready::Schema(_)));
            match self.mark(ready.map_err(String::from)) {
                Err(e) if refused => Err(e),
                _ => Ok(()),
            }
        })
    }

    fn check_lock(&self, _account: &str) -> Result<(), String> {
        Ok(())
    }

    fn read_under_lock(&self, account: &str) -> Option<Document> {
        let held = self.inner.held.lock().unwrap_or_else(|e| e.into_inner());
        let session = held.get(&account.to_lowercase())?.upgrade()?;
        let seen = session.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.clone()
    }

    fn read<'a>(&'a self, account: &'a str) -> Pending<'a, Result<Option<Document>, LoadError>> {
        Box::pin(async move {
            self.mark(self.read_row(account).await)
                .map_err(LoadError::Unavailable)
        })
    }

    fn revision<'a>(
        &'a self,
        account: &'a str,
    ) -> Pending<'a, Result<Option<Revision>, LoadError>> {
        Box::pin(async move {
            self.mark(self.row_revision(account).await)
                .map_err(LoadError::Unavailable)
        })
    }

    fn write<'a>(
        &'a self,
        account: &'a str,
        bytes: &'a [u8],
    ) -> Pending<'a, Result<Revision, String>> {
        Box::pin(async move { self.mark(self.write_row(account, bytes).await) })
    }

    fn remove<'a>(&'a self, account: &'a str) -> Pending<'a, Result<(), String>> {
        Box::pin(async move { self.mark(self.delete_row(account).await) })
    }

    fn lock<'a>(&'a self, account: &'a str) -> Pending<'a, Result<GrantLock, LockError>> {
        Box::pin(async move {
            self.mark(self.take_lock(account).await)
                .map_err(LockError::Unavailable)
        })
    }

    fn accounts(&self) -> Pending<'_, Result<Vec<String>, String>> {
        Box::pin(async move { self.mark(self.list().await) })
    }

    fn probe(&self) -> Pending<'_, Result<(), String>> {
        Box::pin(async move { self.mark(self.ping().await) })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_mean_require_and_the_root_cert_is_taken_out() {
        let (config, root) = parse_url(
            "postgres://u:pw@db.example:6543/app?sslmode=verify-full&sslrootcert=/ca.pem",
        )
        .unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        assert_eq!(root, Some(PathBuf::from("/ca.pem")));
        assert_eq!(place(&config), "db.example:6543/app");
    }

    use crate::oauth::store::{StoredGrant, TokenStore};
    use testkit::postgres::TestPostgres;

    fn store(pg: &TestPostgres, schema: &str) -> PostgresStore {
        PostgresStore::new(&Secret::new(pg.url()), schema).unwrap()
    }

    fn grant(refresh_token: &str) -> StoredGrant {
        StoredGrant {
            account: "a@x.com".into(),
            refresh_token: Some(Secret::new(refresh_token.into())),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn rows_are_written_versioned_listed_and_forgotten() {
        let pg = TestPostgres::start().await;
        let tokens = TokenStore::over(Arc::new(store(&pg, "grants_here")));
        tokens.prepare().await.unwrap();
        assert!(tokens.load("a@x.com").await.unwrap().is_none());
        let first = tokens
            .save_revision("A@x.com", &grant("rt1"))
            .await
            .unwrap();
        let second = tokens
            .save_revision("a@x.com", &grant("rt2"))
            .await
            .unwrap();
        assert_eq!((first.version, second.version), (1, 2));
        assert_eq!(tokens.revision("a@X.com").await.unwrap(), Some(second));
        let (file, revision) = tokens.read_revision("a@x.com").await.unwrap().unwrap();
        assert_eq!(file.grant.refresh_token.unwrap().expose(), "rt2");
        assert_eq!(revision, second);
        assert_eq!(
            tokens.backend.accounts().await.unwrap(),
            vec!["a@x.com".to_string()]
        );
        tokens.forget("a@x.com").await.unwrap();
        assert!(tokens.load("a@x.com").await.unwrap().is_none());
        tokens.forget("a@x.com").await.unwrap();
        let applied = pg
            .psql("SELECT version, description FROM grants_here.schema_migrations")
            .await;
        assert_eq!(applied, "1|grants: one row per account");
    }

    #[tokio::test]
    async fn replicas_starting_together_migrate_once_and_lock_each_other_out() {
        let pg = TestPostgres::start().await;
        let (a, b) = (store(&pg, "xoauth2_proxy"), store(&pg, "xoauth2_proxy"));
        let (ra, rb) = tokio::join!(Backend::prepare(&a), Backend::prepare(&b));
        ra.unwrap();
        rb.unwrap();
        let applied = pg
            .psql("SELECT count(*) FROM xoauth2_proxy.schema_migrations")
            .await;
        assert_eq!(applied, "1");

        let held = a.lock("a@x.com").await.ok().unwrap();
        let waiting = tokio::spawn(async move { b.lock("A@X.COM").await.is_ok() });
        let blocked = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
        while pg.psql(blocked).await != "1" {
            assert!(
                !waiting.is_finished(),
                "the second lock was granted while the first was held"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Another account's lock is not held up.
        drop(a.lock("b@x.com").await.ok().unwrap());
        drop(held);
        assert!(waiting.await.unwrap(), "granted once the first was dropped");
    }

    #[tokio::test]
    async fn a_write_under_a_lock_whose_session_ended_fails_instead_of_going_around_it() {
        let pg = TestPostgres::start().await;
        let (a, b) = (store(&pg, "xoauth2_proxy"), store(&pg, "xoauth2_proxy"));
        let tokens = TokenStore::over(Arc::new(a.clone()));
        tokens.prepare().await.unwrap();
        tokens.save("a@x.com", &grant("rt0")).await.unwrap();

        let held = a.lock("a@x.com").await.ok().unwrap();
        // The server ends A's session, as it does for a replica cut off from
        // it; B takes the lock and stores a newer grant.
        let ended = pg
            .psql(
                "SELECT pg_terminate_backend(pid) FROM pg_locks
                 WHERE locktype = 'advisory' AND granted",
            )
            .await;
        assert_eq!(ended, "t");
        let b_lock = b.lock("a@x.com").await.ok().unwrap();
        TokenStore::over(Arc::new(b.clone()))
            .save("a@x.com", &grant("rt2"))
            .await
            .unwrap();
        drop(b_lock);

        // A, still believing it holds the lock, cannot write its older grant.
        let e = tokens.save("a@x.com", &grant("rt1")).await.unwrap_err();
        assert!(e.contains("grant of a@x.com is not saved"), "{e}");
        assert!(tokens.load("A@x.com").await.is_err(), "nor read around it");
        // What its refresh replaced is still known, for when it can write.
        let replaced = tokens.replaced_under_lock("a@x.com").await.unwrap();
        assert_eq!(replaced.unwrap().refresh_token.unwrap().expose(), "rt0");
        drop(held);
        let stored = tokens.load("a@x.com").await.unwrap().unwrap();
        assert_eq!(stored.refresh_token.unwrap().expose(), "rt2");
        // Without the lock, the pool serves A again.
        tokens.save("b@x.com", &grant("other")).await.unwrap();
    }

    #[tokio::test]
    async fn a_role_that_may_not_make_the_schema_is_told_what_to_run_at_start() {
        let pg = TestPostgres::start().await;
        pg.psql("CREATE ROLE guest LOGIN PASSWORD 'guest-pw'").await;
        let url = pg.url().replace(
            &format!("postgres:{}@", testkit::postgres::PASSWORD),
            "guest:guest-pw@",
        );
        let guest = PostgresStore::new(&Secret::new(url), "xoauth2_proxy").unwrap();
        let e = Backend::prepare(&guest).await.unwrap_err();
        assert!(e.contains("cannot prepare schema xoauth2_proxy"), "{e}");
        assert!(e.contains("permission denied"), "{e}");
        assert!(e.contains("docs/shared-store.md"), "{e}");
        assert!(!e.contains("guest-pw"), "{e}");
        // A database that is not there yet is no reason to stop: it is
        // tried again at each use.
        let mut pg = pg;
        pg.stop().await;
        let down = store(&pg, "xoauth2_proxy");
        Backend::prepare(&down).await.unwrap();
        let e = Backend::probe(&down).await.unwrap_err();
        assert!(e.contains("cannot be used"), "{e}");
        pg.start_again().await;
        Backend::probe(&down).await.unwrap();
    }

    /// A "database" whose port accepts connections and then says nothing
    /// (a stalled server, a paused machine behind a live port): its
    /// connections are held open until the test ends.
    async fn stalled_database() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                open.push(stream);
            }
        });
        let url = format!("postgres://u:STALLED-pw@127.0.0.1:{port}/app?sslmode=disable");
        (url, held)
    }

    /// Far beyond every bound of the store: only a hang reaches it.
    const HANG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_lock_on_a_database_that_never_answers_fails_instead_of_hanging() {
        let (url, _held) = stalled_database().await;
        let store = PostgresStore::new(&Secret::new(url), "xoauth2_proxy").unwrap();
        let locked = tokio::time::timeout(HANG, Backend::lock(&store, "a@x.com"))
            .await
            .expect("the lock's connection is bounded");
        let Err(LockError::Unavailable(e)) = locked else {
            panic!("no lock without a database");
        };
        assert!(e.contains("did not answer within"), "{e}");
        assert!(e.contains("check that the database is up"), "{e}");
        assert!(!e.contains("STALLED-pw"), "{e}");
    }

    #[tokio::test]
    async fn migrations_stuck_behind_a_lock_give_up_and_leave_the_pool_usable() {
        let pg = TestPostgres::start().await;
        // Another session holds the migrations' lock and never lets go (a
        // replica stalled mid-migration).
        let (holder, connection) = tokio_postgres::connect(&pg.url(), NoTls).await.unwrap();
        tokio::spawn(connection);
        holder
            .execute(
                "SELECT pg_advisory_lock(hashtextextended($1, 0))",
                &[&"xoauth2-proxy/xoauth2_proxy/migrations"],
            )
            .await
            .unwrap();
        let waiting = store(&pg, "xoauth2_proxy");
        let probed = tokio::time::timeout(HANG, Backend::probe(&waiting))
            .await
            .expect("the migrations' statements are bounded");
        let e = probed.unwrap_err();
        assert!(e.contains("did not answer within"), "{e}");
        drop(holder);
        // The connection left waiting was not given back to the pool: the
        // next use migrates on a new one.
        Backend::probe(&waiting).await.unwrap();
        let applied = pg
            .psql("SELECT count(*) FROM xoauth2_proxy.schema_migrations")
            .await;
        assert_eq!(applied, "1");
    }

    #[test]
    fn a_bad_url_is_refused_without_repeating_it() {
        let e = parse_url("postgres://u:SECRET-pw@db:notaport/app")
            .err()
            .unwrap();
        assert!(!e.contains("SECRET-pw"), "{e}");
        assert!(e.contains("postgres://USER:PASSWORD@HOST:5432/DB"), "{e}");
    }
}
