//! The `xoauth2-proxy` command line.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tokio::sync::mpsc;
use xoauth2_proxy::{
    AccountStatus, Config, Listeners, LoadError, LocalPassword, StoreKind, TokenStore,
    account_statuses, default_config_path, unix_now,
};

/// Local IMAP/SMTP proxy: mail clients log in with a plain password, the proxy
/// opens their Microsoft 365 mailbox with OAuth 2.0 (SASL XOAUTH2).
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// The config file [default: $XOAUTH2_PROXY_CONFIG, else the platform config dir]
    #[arg(long, global = true, env = "XOAUTH2_PROXY_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the listeners until SIGTERM or SIGINT, then drain and exit.
    Serve,
    /// Authorise a delegated account once (device code or browser sign-in).
    Login {
        /// The account's `username` from the config.
        account: String,
    },
    /// Show each account's state: authorised or needs `login`, token expiry, last error.
    Status {
        /// Print JSON for scripts and health checks.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config, then reach the identity provider and the mail servers
    /// for every account and say what to fix.
    Check,
    /// Exit 0 if the running proxy's admin listener answers /healthz, else 1
    /// (for container health checks, where there is no curl).
    Health,
    /// Read a password from stdin (one line) and print its argon2id hash for `password_hash`.
    HashPassword,
    /// Write a new random token key (32 bytes, base64, mode 0600) to FILE, for
    /// `token_key_file`: grant files are then sealed with it. Never replaces a file.
    Keygen {
        /// Where to write the key; keep it out of the state directory (a Docker
        /// or Kubernetes secret).
        file: PathBuf,
    },
    /// TLS towards the clients.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
    /// Where grants are kept ([store] in the config).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy every grant to the other kind of store: from the files under the
    /// state directory to PostgreSQL ([store] url), or back. Safe to run again:
    /// grants already there are left as they are. Sealed grants stay sealed.
    Migrate {
        /// The store to copy to.
        #[arg(long, value_enum)]
        to: StoreTarget,
    },
    /// Seal every grant with the token key configured now (`token_key_file`
    /// or $XOAUTH2_PROXY_TOKEN_KEY_FILE): those sealed with the key being
    /// replaced (`--old-key`), and those not sealed yet. Safe to run again;
    /// a grant neither key opens is left as it is. Then reload or restart
    /// the proxy (every replica) so that it uses the new key.
    Rekey {
        /// The key file the grants are sealed with now; without it, only
        /// grants not sealed yet are sealed.
        #[arg(long)]
        old_key: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StoreTarget {
    Postgres,
    File,
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Print the CA certificate (PEM) that clients must trust, making the
    /// proxy's own CA first if it has none yet.
    Ca,
}

/// Exit codes: 0 ok, 1 runtime failure, 2 bad usage or config.
enum Failure {
    Usage(String),
    Runtime(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let path = cli.config.clone().unwrap_or_else(default_config_path);
    Config::load(&path).map_err(|e| Failure::Usage(e.to_string()))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the async runtime starts")
}

fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::HashPassword => hash_password(),
        Command::Keygen { file } => keygen(file),
        Command::Serve => {
            let config = load_config(&cli)?;
            // A bad token key is a config problem (exit 2), found before binding.
            token_store(&config)?;
            warn_at_start(&config);
            runtime().block_on(serve(config)).map_err(Failure::Runtime)
        }
        Command::Login { account } => login(&load_config(&cli)?, account),
        Command::Status { json } => status(&load_config(&cli)?, *json),
        Command::Tls {
            command: TlsCommand::Ca,
        } => tls_ca(&load_config(&cli)?),
        Command::Store {
            command: StoreCommand::Migrate { to },
        } => migrate_store(&load_config(&cli)?, *to),
        Command::Store {
            command: StoreCommand::Rekey { old_key },
        } => rekey_store(&load_config(&cli)?, old_key.as_deref()),
        Command::Health => {
            let config = load_config(&cli)?;
            runtime()
                .block_on(xoauth2_proxy::probe_health(config.admin.listen))
                .map_err(Failure::Runtime)
        }
        Command::Check => {
            let config = load_config(&cli)?;
            println!("config {} is valid", config.path.display());
            match runtime().block_on(xoauth2_proxy::check_accounts(config)) {
                Ok(true) => Ok(()),
                Ok(false) => Err(Failure::Runtime("some checks failed; see above".into())),
                Err(e) => Err(Failure::Runtime(e)),
            }
        }
    }
}

/// Binds the listeners and serves until SIGTERM or SIGINT; SIGHUP reloads
/// the config file.
async fn serve(config: Config) -> Result<(), String> {
    let listeners = Listeners::bind(&config).await?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(allocator::give_back_freed_memory());
    // Installed before the proxy says it is ready, so that a SIGHUP right
    // after never meets the default action (exit).
    let (reload, reloads) = mpsc::channel(1);
    let stop = signals(reload)?;
    xoauth2_proxy::run(listeners, config, stop, reloads).await
}

/// Freed memory back to the system after bursts of large transfers.
///
/// The relay takes a 256 KiB buffer per direction while data flows and the
/// TLS layers queue records of 16 KiB; all of it is freed at every pause.
/// glibc's malloc keeps what is freed in its arenas, and what lies between
/// allocations that live on (sessions' small state) it never gives back by
/// itself: after 1,000 sessions each fetched or sent 4 MiB at once, the
/// proxy kept 25–75 MiB more than before while the same sessions sat idle,
/// and up to 340 MiB more after 5,000 (docs/benchmarks.md, "memory after a
/// burst"). `malloc_trim` gives the whole free pages inside every arena
/// back, every [`PERIOD`].
///
/// It runs whatever the traffic: RSS cannot tell memory freed but kept from
/// memory in use (a trim in the middle of a burst gives back little, and
/// the end of the burst frees much without RSS moving), and a trim with
/// nothing to give back costs a walk of the free lists, well under a
/// millisecond (idle CPU in docs/benchmarks.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod allocator {
    use std::time::Duration;

    /// How often freed memory is given back.
    pub const PERIOD: Duration = Duration::from_secs(10);

    /// Runs for the life of the process.
    pub async fn give_back_freed_memory() {
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            trim();
        }
    }

    /// Gives the whole free pages of every arena back to the system.
    pub fn trim() {
        // SAFETY: malloc_trim only walks the allocator's own free lists,
        // under its locks; it has no preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// This process's resident set size (VmRSS), in KiB; 0 if unreadable.
    #[cfg(test)]
    pub fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse().ok()
            })
            .unwrap_or(0)
    }
}

/// Installs the signal handlers. The future completes on SIGTERM or SIGINT;
/// until then each SIGHUP asks for a reload (one waiting is enough: a reload
/// reads the file as it is then).
fn signals(
    reload: mpsc::Sender<()>,
) -> Result<impl std::future::Future<Output = ()> + Send, String> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| {
                format!("cannot install a {name} handler ({e}); please report this as a bug")
            })
        };
        let mut term = install(SignalKind::terminate(), "SIGTERM")?;
        let mut int = install(SignalKind::interrupt(), "SIGINT")?;
        let mut hup = install(SignalKind::hangup(), "SIGHUP")?;
        Ok(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => return,
                    _ = int.recv() => return,
                    _ = hup.recv() => {
                        let _ = reload.try_send(());
                    }
                }
            }
        })
    }
    #[cfg(not(unix))]
    {
        drop(reload);
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// `xoauth2-proxy tls ca`: the CA's PEM on stdout. Without `[tls]`, or
/// with certificate files of the user's, there is no CA of the proxy's.
fn tls_ca(config: &Config) -> Result<(), Failure> {
    let makes_its_own = config.tls.as_ref().is_some_and(|t| t.files().is_none());
    match xoauth2_proxy::ca_certificate_pem(config) {
        Ok(pem) => {
            print!("{pem}");
            Ok(())
        }
        Err(e) if makes_its_own => Err(Failure::Runtime(e)),
        Err(e) => Err(Failure::Usage(e)),
    }
}

/// The grant store of `config`, with its token key: a key file that cannot
/// be used is a config problem.
fn token_store(config: &Config) -> Result<TokenStore, Failure> {
    TokenStore::for_config(config).map_err(Failure::Usage)
}

/// `xoauth2-proxy login ACCOUNT`. A grant file that is there but cannot be
/// replaced (sealed under another key, unsafe) stops it before the sign-in.
fn login(config: &Config, name: &str) -> Result<(), Failure> {
    let Some(account) = config.account(name).cloned() else {
        return Err(Failure::Usage(format!(
            "no account `{name}` in {}; accounts are named by their `username`",
            config.path.display()
        )));
    };
    let store = token_store(config)?;
    runtime().block_on(async {
        store.prepare().await.map_err(Failure::Runtime)?;
        match store.load(&account.username).await {
            Ok(_) | Err(LoadError::Damaged(_)) => {}
            Err(e) => return Err(Failure::Runtime(e.to_string())),
        }
        xoauth2_proxy::authorize(config, &store, &account)
            .await
            .map_err(Failure::Runtime)
    })
}

/// `xoauth2-proxy store migrate --to KIND`: every grant of the other kind
/// copied, as it is, into KIND.
fn migrate_store(config: &Config, to: StoreTarget) -> Result<(), Failure> {
    let (from_kind, to_kind) = match to {
        StoreTarget::Postgres => (StoreKind::File, StoreKind::Postgres),
        StoreTarget::File => (StoreKind::Postgres, StoreKind::File),
    };
    let open = |kind| TokenStore::of_kind(config, kind).map_err(Failure::Usage);
    let (from, to) = (open(from_kind)?, open(to_kind)?);
    let done = runtime()
        .block_on(xoauth2_proxy::migrate_grants(&from, &to))
        .map_err(Failure::Runtime)?;
    for account in &done.copied {
        println!("copied the grant of {account}");
    }
    for account in &done.left {
        println!("left as it is: the grant of {account}, already in the target");
    }
    println!(
        "{} grant(s) copied from {} to {}; {} already there, left as they are.",
        done.copied.len(),
        from.describe(),
        to.describe(),
        done.left.len()
    );
    if config.store.kind != to_kind {
        let kind = match to_kind {
            StoreKind::Postgres => "postgres",
            StoreKind::File => "file",
        };
        println!(
            "The proxy still uses {}: set `kind = \"{kind}\"` in [store] and restart it (every replica) to use the copy.",
            from.describe()
        );
    }
    Ok(())
}

/// `xoauth2-proxy store rekey [--old-key FILE]`.
fn rekey_store(config: &Config, old_key: Option<&std::path::Path>) -> Result<(), Failure> {
    let store = token_store(config)?;
    let old = old_key
        .map(xoauth2_proxy::TokenKey::read)
        .transpose()
        .map_err(Failure::Usage)?;
    let done = runtime()
        .block_on(xoauth2_proxy::rekey_grants(&store, old))
        .map_err(Failure::Runtime)?;
    for account in &done.sealed {
        println!("sealed the grant of {account} with the current key");
    }
    for why in &done.left {
        println!("left as it is: {why}");
    }
    println!(
        "{} grant(s) sealed again, {} already sealed with the current key, {} left as they are.",
        done.sealed.len(),
        done.current.len(),
        done.left.len()
    );
    if !done.sealed.is_empty() {
        println!(
            "Reload or restart the proxy (every replica) with this key, if it still runs with the old one."
        );
    }
    if done.left.is_empty() {
        Ok(())
    } else {
        Err(Failure::Runtime(
            "some grants open with neither key: run this again with `--old-key` naming the key they were sealed with, or run `xoauth2-proxy login` for those accounts".into(),
        ))
    }
}

/// `xoauth2-proxy keygen FILE`.
fn keygen(file: &std::path::Path) -> Result<(), Failure> {
    xoauth2_proxy::write_key_file(file).map_err(Failure::Runtime)?;
    let shown = file.display();
    println!("Wrote a new token key to {shown} (mode 0600).");
    println!(
        "To seal the grant files with it, set `token_key_file = \"{shown}\"` in [server] (or XOAUTH2_PROXY_TOKEN_KEY_FILE={shown}) and restart or reload the proxy; each grant is sealed at its next write."
    );
    println!(
        "Keep the key out of the state directory (a Docker or Kubernetes secret) and keep a copy: without it, sealed grants cannot be read and every account needs `xoauth2-proxy login` again."
    );
    Ok(())
}

/// What the log should say when `serve` starts: secrets in a config others
/// may read, plain passwords, no accounts.
fn warn_at_start(config: &Config) {
    if let Some(warning) = xoauth2_proxy::exposed_secret_warning(config) {
        tracing::warn!("{warning}");
    }
    if config.accounts.is_empty() {
        tracing::warn!(
            "no [[accounts]] are configured in {}: every login will fail; add one (config.example.toml shows how) and reload",
            config.path.display()
        );
    }
    warn_plain_passwords(config);
    warn_example_passwords(config);
}

/// The shipped examples (`packaging/`) hash `change-me` for the console:
/// anyone who read them knows it, so say so until it is replaced. (One
/// argon2 check, at start.)
fn warn_example_passwords(config: &Config) {
    let admin = config.admin.password_hash.as_deref();
    if config.admin.console && admin.is_some_and(xoauth2_proxy::is_example_password) {
        tracing::warn!(
            "the console's admin password is the examples' `change-me`: replace [admin] password_hash with the output of `xoauth2-proxy hash-password` and reload"
        );
    }
}

fn warn_plain_passwords(config: &Config) {
    for a in &config.accounts {
        if matches!(a.password, LocalPassword::Plain(_)) {
            tracing::warn!(
                account = %a.username,
                "the local password is stored in plain text; replace `password` with `password_hash` from `xoauth2-proxy hash-password`"
            );
        }
    }
}

fn hash_password() -> Result<(), Failure> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Password: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line).map_err(|e| {
        Failure::Runtime(format!(
            "cannot read the password from stdin ({e}); pipe it in as one line"
        ))
    })?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(Failure::Usage(
            "no password given on stdin; type it at the prompt or pipe it in as one line".into(),
        ));
    }
    println!("{}", xoauth2_proxy::hash_password(password.as_bytes()));
    Ok(())
}

fn status(config: &Config, json: bool) -> Result<(), Failure> {
    let store = token_store(config)?;
    let now = unix_now();
    let (health, (mut rows, mut problems)) = runtime().block_on(async {
        let health = store.probe().await;
        (health, account_statuses(config, &store, now).await)
    });
    for row in &mut rows {
        row.grant_store = store_kind_name(store.kind());
        row.grant_store_up = health.is_ok();
    }
    let asked = ask_proxy_for_unsaved(config, &mut rows);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("status serialises")
        );
    } else {
        print_statuses(config, &store, &rows, now);
        if let Err(e) = asked {
            println!("Whether every grant is saved is not known: {e}");
        }
        match &health {
            Ok(()) => println!("Grants are stored in {}.", store.describe()),
            Err(e) => println!(
                "Grants are stored in {}, which cannot be reached now: {e}",
                store.describe()
            ),
        }
        print_sealing(&store, &rows);
        print_tls(config, &mut problems);
    }
    for p in problems {
        eprintln!("warning: {p}");
    }
    Ok(())
}

fn store_kind_name(kind: StoreKind) -> &'static str {
    match kind {
        StoreKind::File => "file",
        StoreKind::Postgres => "postgres",
    }
}

/// Only the running proxy knows which grants it could not save: ask its
/// admin listener.
fn ask_proxy_for_unsaved(config: &Config, rows: &mut [AccountStatus]) -> Result<(), String> {
    let unsaved = runtime().block_on(xoauth2_proxy::unsaved_grants(config.admin.listen))?;
    for r in rows {
        r.grant_saved = Some(!unsaved.iter().any(|a| a.eq_ignore_ascii_case(&r.account)));
    }
    Ok(())
}

/// The statuses for people: a headline per account, then indented details.
fn print_statuses(config: &Config, store: &TokenStore, rows: &[AccountStatus], now: u64) {
    if rows.is_empty() {
        println!("No accounts are configured in {}.", config.path.display());
    }
    for r in rows {
        println!(
            "{} ({}, {:?} via {}): {}",
            r.account, r.mailbox, r.flow, r.provider, r.state
        );
        let details = [
            signed_in(r),
            not_saved(r, store),
            r.grant_error.clone(),
            login_hint(r),
            token_expiry(r, now),
            last_token(r, now),
            last_error(r, now),
        ];
        for line in details.into_iter().flatten() {
            println!("  {line}");
        }
    }
}

/// Whether grant files are sealed, and how to seal them if not.
fn print_sealing(store: &TokenStore, rows: &[AccountStatus]) {
    let Some(key) = store.key_file() else {
        println!(
            "{}",
            xoauth2_proxy::unsealed_warning(store).unwrap_or_default()
        );
        return;
    };
    println!("Grants are sealed with the token key in {}.", key.display());
    let plain = rows
        .iter()
        .filter(|r| r.grant_sealed == Some(false))
        .count();
    if plain > 0 {
        println!(
            "  {plain} grant file(s) are still plain text; each is sealed at its next write (the next token refresh or `xoauth2-proxy login`)."
        );
    }
}

/// The server certificate the listeners present, if `[tls]` is configured.
fn print_tls(config: &Config, problems: &mut Vec<String>) {
    if config.tls.is_none() {
        return;
    }
    match xoauth2_proxy::current_certificate(config) {
        Ok(Some(cert)) => println!(
            "TLS towards clients: certificate {}\n  {}\n  SHA-256 {}",
            cert.path.display(),
            cert.describe(std::time::SystemTime::now()),
            cert.sha256
        ),
        Ok(None) => println!(
            "TLS towards clients: the proxy makes its own certificate when it starts (`xoauth2-proxy tls ca` prints the CA)"
        ),
        Err(e) => problems.push(e),
    }
}

fn not_saved(r: &AccountStatus, store: &TokenStore) -> Option<String> {
    (r.grant_saved == Some(false)).then(|| {
        format!(
            "grant not saved: the running proxy holds the newest grant in memory only and keeps trying to write it; {}",
            store.write_advice()
        )
    })
}

/// Who SMTP logs in as, for a delegated grant; for a grant stored before
/// the signed-in user was recorded, what that means for a shared mailbox.
fn signed_in(r: &AccountStatus) -> Option<String> {
    if !r.flow.is_delegated() || r.needs_login {
        return None;
    }
    let via = match r.send_via {
        "smtp" => String::new(),
        other => format!("; sends via {other}"),
    };
    Some(match &r.signed_in_as {
        Some(user) => format!("signed in as {user}{via}"),
        None => format!(
            "signed in as: not recorded (the grant predates it), so SMTP logs in as {mailbox}; if {mailbox} is a shared mailbox, run `xoauth2-proxy login {account}` again (or set sign_in_user){via}",
            mailbox = r.mailbox,
            account = r.account
        ),
    })
}

fn login_hint(r: &AccountStatus) -> Option<String> {
    r.needs_login
        .then(|| format!("run `xoauth2-proxy login {}`", r.account))
}

fn token_expiry(r: &AccountStatus, now: u64) -> Option<String> {
    let t = r.access_token_expires_at?;
    Some(if t > now {
        format!("access token valid for {} more", ago(t - now))
    } else {
        format!("access token expired {} ago", ago(now - t))
    })
}

fn last_token(r: &AccountStatus, now: u64) -> Option<String> {
    r.last_refresh
        .map(|t| format!("last token obtained {} ago", ago(now.saturating_sub(t))))
}

fn last_error(r: &AccountStatus, now: u64) -> Option<String> {
    let e = r.last_error.as_ref()?;
    let when = r
        .last_error_at
        .map(|t| format!(" ({} ago)", ago(now.saturating_sub(t))))
        .unwrap_or_default();
    Some(format!("last error{when}: {e}"))
}

fn ago(seconds: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use xoauth2_proxy::Flow;

    fn row() -> AccountStatus {
        AccountStatus {
            account: "user@contoso.com".into(),
            mailbox: "user@contoso.com".into(),
            provider: "m365".into(),
            flow: Flow::DeviceCode,
            state: "needs login",
            needs_login: true,
            access_token_expires_at: Some(1000),
            access_token_valid: false,
            last_refresh: None,
            authorized_at: None,
            last_error: Some("the grant was refused".into()),
            last_error_at: Some(880),
            grant_sealed: Some(true),
            grant_error: None,
            grant_saved: Some(false),
            grant_store: "file",
            grant_store_up: true,
            signed_in_as: None,
            send_via: "smtp",
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn memory_freed_between_live_allocations_goes_back_to_the_system() {
        const MIB: u64 = 1024;
        // 64 MiB in 16 KiB pieces, each followed by a small allocation that
        // lives on: freed, the pieces cannot merge into the arena's top.
        let mut live = Vec::new();
        let mut freed = Vec::new();
        for i in 0..4096u32 {
            freed.push(vec![i as u8 | 1; 16 * 1024]);
            live.push(vec![i as u8; 64]);
        }
        drop(freed);
        let before = allocator::rss_kib();
        allocator::trim();
        let after = allocator::rss_kib();
        assert!(
            before.saturating_sub(after) >= 32 * MIB,
            "RSS {before} KiB before the trim, {after} KiB after"
        );
        assert_eq!(live.len(), 4096);
    }

    #[test]
    fn status_details_say_what_to_do_and_how_old_things_are() {
        let r = row();
        assert_eq!(
            login_hint(&r).as_deref(),
            Some("run `xoauth2-proxy login user@contoso.com`")
        );
        assert_eq!(
            token_expiry(&r, 940).as_deref(),
            Some("access token valid for 1m more")
        );
        assert_eq!(
            token_expiry(&r, 1060).as_deref(),
            Some("access token expired 1m ago")
        );
        assert_eq!(last_token(&r, 1000), None);
        assert!(
            not_saved(&r, &TokenStore::new(std::path::Path::new("/state")))
                .is_some_and(|line| line.contains("not saved") && line.contains("/state/tokens"))
        );
        assert_eq!(
            last_error(&r, 1000).as_deref(),
            Some("last error (2m ago): the grant was refused")
        );
    }

    #[test]
    fn status_names_the_signed_in_user_or_says_a_shared_mailbox_needs_login_again() {
        let authorised = AccountStatus {
            state: "authorised",
            needs_login: false,
            mailbox: "shared@contoso.com".into(),
            ..row()
        };
        let known = AccountStatus {
            signed_in_as: Some("delegate@contoso.com".into()),
            send_via: "graph",
            ..AccountStatus { ..authorised }
        };
        assert_eq!(
            signed_in(&known).as_deref(),
            Some("signed in as delegate@contoso.com; sends via graph")
        );
        let old = AccountStatus {
            state: "authorised",
            needs_login: false,
            mailbox: "shared@contoso.com".into(),
            ..row()
        };
        let line = signed_in(&old).unwrap();
        assert!(
            line.contains("not recorded")
                && line.contains("if shared@contoso.com is a shared mailbox")
                && line.contains("run `xoauth2-proxy login user@contoso.com` again"),
            "{line}"
        );
        assert_eq!(signed_in(&row()), None, "needs login says so already");
    }
}
