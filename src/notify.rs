//! Notifications: when an account starts needing `login`, a program is run
//! (`admin.notify_command`) and a webhook called (`admin.notify_url`); again
//! every `admin.notify_repeat` while it still does; and once when it recovers.
//!
//! One task watches the process's [`Health`] record and compares it with what
//! it has announced: an account that needs login and was not announced (or
//! whose episode began anew) gets `needs_login`, an announced one that is
//! authorised again gets `recovered`, and the next repeat is a timer. Because
//! both the record and this task belong to the process, not to one config, a
//! reload (SIGHUP) neither repeats nor loses an event; at start, an account
//! that already needs login is announced once.
//!
//! Events go to one delivery task per sink through a bounded queue: a webhook
//! that is down retries with back-off a bounded number of times while newer
//! events wait, and past the queue's bound events are dropped (and logged),
//! so a dead receiver never grows memory. A program is run without a shell,
//! with stdin closed, a clean environment (a few locale and `PATH`
//! variables, then the event), its output kept to a few KiB for the debug
//! log, and killed with its process group after `admin.notify_timeout`.
//! The timeout is on the program's exit, not on its pipes: a program that
//! exits at once but leaves a job in the background (`logger … &`) has
//! finished, and its background job is left alone.
//!
//! Nothing secret goes into an event: the reason is the sentence the log
//! shows. The webhook's URL is itself a secret (Slack and Teams put their key
//! in it): logs name only its host, and errors are told without it.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::AdminSection;
use crate::oauth::{AccountHealth, Health};
use crate::secret::Secret;

/// Events waiting for one sink at most; more are dropped.
const QUEUE: usize = 32;
/// Tries of one webhook delivery, the first included.
const WEBHOOK_ATTEMPTS: u32 = 6;
/// The wait after the first failed try; it doubles up to [`LAST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);
/// The command's stdout or stderr kept for the log.
const OUTPUT_KEPT: usize = 4096;
/// How long the output is still read after the program exited (a job it
/// left in the background may keep the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// The variables of the proxy's own environment a command gets; anything
/// else (secrets passed in the environment, say) stays out.
const PASSED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ"];

/// What happened to an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    NeedsLogin,
    Recovered,
}

impl EventKind {
    /// As `XOAUTH2_PROXY_EVENT` and the JSON `event` say it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::NeedsLogin => "needs_login",
            EventKind::Recovered => "recovered",
        }
    }
}

/// One notification, as the program's environment and the webhook's JSON
/// carry it.
#[derive(Debug, Clone)]
struct Event {
    kind: EventKind,
    account: String,
    mailbox: String,
    reason: String,
    console_url: String,
    at: SystemTime,
}

impl Event {
    fn new(kind: EventKind, health: &AccountHealth, console_url: &str) -> Self {
        let reason = match (kind, &health.needs_login) {
            (EventKind::NeedsLogin, Some(needs)) => needs.reason.clone(),
            _ => "the account is authorised again; mail flows".to_string(),
        };
        Event {
            kind,
            account: health.username.clone(),
            mailbox: health.mailbox.clone(),
            reason,
            console_url: console_url.to_string(),
            at: SystemTime::now(),
        }
    }

    /// The webhook's body: the fields, plus a `text` that Slack and Teams
    /// show as the message.
    fn json(&self) -> Vec<u8> {
        let text = match self.kind {
            EventKind::NeedsLogin => format!(
                "xoauth2-proxy: {} ({}) needs signing in again: {} — {}",
                self.account, self.mailbox, self.reason, self.console_url
            ),
            EventKind::Recovered => format!(
                "xoauth2-proxy: {} ({}) is signed in again",
                self.account, self.mailbox
            ),
        };
        serde_json::to_vec(&serde_json::json!({
            "event": self.kind.as_str(),
            "account": self.account,
            "mailbox": self.mailbox,
            "reason": self.reason,
            "console_url": self.console_url,
            "at": humantime::format_rfc3339_seconds(self.at).to_string(),
            "text": text,
        }))
        .expect("JSON of strings")
    }

    /// The program's environment, besides [`PASSED_ENV`].
    fn env(&self) -> [(&'static str, &str); 5] {
        [
            ("XOAUTH2_PROXY_EVENT", self.kind.as_str()),
            ("XOAUTH2_PROXY_ACCOUNT", &self.account),
            ("XOAUTH2_PROXY_MAILBOX", &self.mailbox),
            ("XOAUTH2_PROXY_REASON", &self.reason),
            ("XOAUTH2_PROXY_CONSOLE_URL", &self.console_url),
        ]
    }
}

/// The notification keys of the config in force.
struct Settings {
    command: Vec<String>,
    url: Option<Secret>,
    /// Built with the settings: verified TLS (system roots and
    /// `notify_ca_file`), no redirects, `notify_timeout` per request.
    client: Option<reqwest::Client>,
    repeat: Duration,
    timeout: Duration,
    console_url: String,
}

impl Settings {
    fn new(admin: &AdminSection) -> Self {
        if let Some(url) = &admin.notify_url {
            warn_if_plain_http(url);
        }
        let client = admin.notify_url.as_ref().and_then(|_| {
            let ca_file = admin.notify_ca_file.as_deref();
            crate::tls::https_client(ca_file, admin.notify_timeout)
                .inspect_err(|e| {
                    warn!(
                        "cannot set up the HTTP client for admin.notify_url ({e}); webhook notifications are off until the next reload"
                    )
                })
                .ok()
        });
        Settings {
            command: admin.notify_command.clone(),
            url: admin.notify_url.clone(),
            client,
            repeat: admin.notify_repeat,
            timeout: admin.notify_timeout,
            console_url: admin.public_url.trim_end_matches('/').to_string(),
        }
    }

    fn notifies(&self) -> bool {
        !self.command.is_empty() || self.url.is_some()
    }
}

/// The handle the listener keeps: it outlives reloads, which hand it the
/// new config's keys.
pub struct Notifier {
    settings: watch::Sender<Arc<Settings>>,
}

impl Notifier {
    /// Starts watching `health`, notifying as `admin` says, until `stop`.
    pub fn start(health: Health, admin: &AdminSection, stop: CancellationToken) -> Notifier {
        let (settings, current) = watch::channel(Arc::new(Settings::new(admin)));
        let (to_command, commands) = mpsc::channel(QUEUE);
        let (to_webhook, webhooks) = mpsc::channel(QUEUE);
        tokio::spawn(deliver_commands(commands, current.clone(), stop.clone()));
        tokio::spawn(deliver_webhooks(webhooks, current.clone(), stop.clone()));
        let sinks = Sinks {
            command: to_command,
            webhook: to_webhook,
        };
        tokio::spawn(watch_health(health, current, sinks, stop));
        Notifier { settings }
    }

    /// Puts the notification keys of a reloaded config in force.
    pub fn reconfigure(&self, admin: &AdminSection) {
        self.settings.send_replace(Arc::new(Settings::new(admin)));
    }
}

/// What was last announced of an account that needs login.
struct Announced {
    /// The `since` of the episode announced.
    since: u64,
    last_sent: Instant,
}

/// The delivery queues.
struct Sinks {
    command: mpsc::Sender<Arc<Event>>,
    webhook: mpsc::Sender<Arc<Event>>,
}

impl Sinks {
    /// Queues `event` for each sink the settings name; a full queue drops it.
    fn send(&self, event: Event, settings: &Settings) {
        info!(
            account = %event.account,
            "notifying: {} ({})",
            event.kind.as_str(),
            event.reason
        );
        let event = Arc::new(event);
        let queues = [
            (
                !settings.command.is_empty(),
                &self.command,
                "notify_command",
            ),
            (settings.url.is_some(), &self.webhook, "notify_url"),
        ];
        for (wanted, queue, key) in queues {
            if wanted && queue.try_send(event.clone()).is_err() {
                warn!(
                    account = %event.account,
                    "{QUEUE} notifications are waiting for admin.{key}; dropping this {} event (is the receiver down?)",
                    event.kind.as_str()
                );
            }
        }
    }
}

/// Compares the health record with what was announced, sends what is due,
/// and sleeps until the record or the settings change or a repeat is due.
async fn watch_health(
    health: Health,
    mut settings: watch::Receiver<Arc<Settings>>,
    sinks: Sinks,
    stop: CancellationToken,
) {
    let mut changes = health.subscribe();
    let mut announced: HashMap<String, Announced> = HashMap::new();
    loop {
        changes.mark_unchanged();
        let current = settings.borrow_and_update().clone();
        let next = if current.notifies() {
            announce(
                &health.all(),
                &mut announced,
                &current,
                &sinks,
                Instant::now(),
            )
        } else {
            None
        };
        let repeat = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            changed = settings.changed() => if changed.is_err() { return },
            () = repeat => {}
        }
    }
}

/// One comparison at `now`: sends the events due and returns when the
/// next repeat is.
fn announce(
    accounts: &[AccountHealth],
    announced: &mut HashMap<String, Announced>,
    settings: &Settings,
    sinks: &Sinks,
    now: Instant,
) -> Option<Instant> {
    let due = |a: &Announced| !settings.repeat.is_zero() && now >= a.last_sent + settings.repeat;
    for health in accounts {
        let key = health.username.to_lowercase();
        let kind = match (&health.needs_login, announced.get(&key)) {
            (Some(needs), Some(a)) if a.since == needs.since && !due(a) => continue,
            (Some(needs), _) => {
                let since = needs.since;
                announced.insert(
                    key,
                    Announced {
                        since,
                        last_sent: now,
                    },
                );
                EventKind::NeedsLogin
            }
            (None, Some(_)) => {
                announced.remove(&key);
                EventKind::Recovered
            }
            (None, None) => continue,
        };
        sinks.send(Event::new(kind, health, &settings.console_url), settings);
    }
    // Accounts a reload removed are forgotten without a word.
    announced.retain(|key, _| {
        accounts
            .iter()
            .any(|h| h.username.eq_ignore_ascii_case(key))
    });
    if settings.repeat.is_zero() {
        return None;
    }
    announced
        .values()
        .map(|a| a.last_sent + settings.repeat)
        .min()
}

// ---- the program -------------------------------------------------------------

async fn deliver_commands(
    mut events: mpsc::Receiver<Arc<Event>>,
    settings: watch::Receiver<Arc<Settings>>,
    stop: CancellationToken,
) {
    while let Some(event) = tokio::select! {
        _ = stop.cancelled() => None,
        event = events.recv() => event,
    } {
        let current = settings.borrow().clone();
        if current.command.is_empty() {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = run_command(&current.command, current.timeout, &event) => {}
        }
    }
}

/// Runs `command` for `event`, at most `timeout`; says how it went.
async fn run_command(command: &[String], timeout: Duration, event: &Event) {
    let program = &command[0];
    let mut child = match spawn(command, event) {
        Ok(child) => child,
        Err(e) => {
            warn!(
                account = %event.account,
                "cannot run admin.notify_command `{program}`: {}; check that the path is right and the file executable by the proxy's user",
                crate::error::io_reason(&e)
            );
            return;
        }
    };
    match wait_reading_output(&mut child, timeout).await {
        (Ok(Ok(status)), stdout, stderr) => {
            debug!(account = %event.account, %status, stdout = %stdout, stderr = %stderr, "admin.notify_command finished");
            if !status.success() {
                warn!(
                    account = %event.account,
                    "admin.notify_command `{program}` failed ({status}) for the {} event; its output is in the debug log",
                    event.kind.as_str()
                );
            }
        }
        (Ok(Err(e)), _, _) => warn!(
            account = %event.account,
            "waiting for admin.notify_command `{program}` failed: {}",
            crate::error::io_reason(&e)
        ),
        (Err(_), _, _) => {
            kill_group(&mut child).await;
            warn!(
                account = %event.account,
                "admin.notify_command `{program}` ran longer than admin.notify_timeout ({}) for the {} event; killed it (and what it started): make it finish sooner or raise the timeout",
                humantime::format_duration(timeout),
                event.kind.as_str()
            );
        }
    }
}

/// Waits up to `timeout` for the program to exit, reading its output
/// meanwhile (so it never blocks on a full pipe); then its output as far as
/// it came. Only the exit counts against `timeout`: a job the program left
/// in the background may hold the pipes open long after, so once it exited
/// the output gets [`OUTPUT_GRACE`] more and is then let go.
async fn wait_reading_output(
    child: &mut tokio::process::Child,
    timeout: Duration,
) -> (
    Result<std::io::Result<std::process::ExitStatus>, tokio::time::error::Elapsed>,
    String,
    String,
) {
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut reading = Box::pin(async {
        tokio::join!(keep_output(stdout, &mut out), keep_output(stderr, &mut err));
    });
    let mut read_all = false;
    let exited = tokio::time::timeout(timeout, async {
        loop {
            tokio::select! {
                status = child.wait() => return status,
                () = &mut reading, if !read_all => read_all = true,
            }
        }
    })
    .await;
    if matches!(exited, Ok(Ok(_))) && !read_all {
        let _ = tokio::time::timeout(OUTPUT_GRACE, &mut reading).await;
    }
    drop(reading);
    (exited, as_text(&out), as_text(&err))
}

/// The program, started in its own process group with the event's
/// environment and nothing else of the proxy's but [`PASSED_ENV`].
fn spawn(command: &[String], event: &Event) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .env_clear()
        .envs(
            PASSED_ENV
                .iter()
                .filter_map(|k| Some((k, std::env::var_os(k)?))),
        )
        .envs(event.env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    cmd.spawn()
}

/// Kills the program and whatever it started (its process group), and
/// reaps it.
async fn kill_group(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a negative pid signals that process group;
        // the group is the child's own (process_group(0)) and it has not
        // been reaped, so the id is not reused.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill().await;
}

/// Reads `output` to its end (so the program never blocks on a full pipe),
/// keeping up to [`OUTPUT_KEPT`] bytes of it in `kept`.
async fn keep_output(output: Option<impl AsyncRead + Unpin>, kept: &mut Vec<u8>) {
    let Some(mut output) = output else {
        return;
    };
    let mut chunk = [0u8; 1024];
    while let Ok(n) = output.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
}

fn as_text(kept: &[u8]) -> String {
    String::from_utf8_lossy(kept).trim_end().to_string()
}

// ---- the webhook -------------------------------------------------------------

async fn deliver_webhooks(
    mut events: mpsc::Receiver<Arc<Event>>,
    settings: watch::Receiver<Arc<Settings>>,
    stop: CancellationToken,
) {
    while let Some(event) = tokio::select! {
        _ = stop.cancelled() => None,
        event = events.recv() => event,
    } {
        tokio::select! {
            _ = stop.cancelled() => return,
            () = post(&settings, &event) => {}
        }
    }
}

/// What one webhook try came to.
enum Posted {
    Delivered,
    /// Worth another try: the sentence says why this one failed.
    Retry(String),
    /// Refused for good (a 4xx other than 429).
    Refused(reqwest::StatusCode),
    /// Not worth another try (its certificate is not trusted): why.
    Hopeless(String),
}

/// Posts `event` with the settings in force at each try, retrying with
/// back-off up to [`WEBHOOK_ATTEMPTS`] tries.
async fn post(settings: &watch::Receiver<Arc<Settings>>, event: &Event) {
    let body = bytes::Bytes::from(event.json());
    let mut wait = FIRST_RETRY;
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let current = settings.borrow().clone();
        let (Some(url), Some(client)) = (&current.url, &current.client) else {
            return;
        };
        let host = host_of(url);
        let why = match try_post(client, url, body.clone()).await {
            Posted::Delivered => {
                info!(account = %event.account, "the webhook at {host} took the {} event", event.kind.as_str());
                return;
            }
            Posted::Refused(status) => {
                warn!(
                    account = %event.account,
                    "the webhook at {host} refused the {} event ({status}); not retried: check admin.notify_url and what the receiver expects",
                    event.kind.as_str()
                );
                return;
            }
            Posted::Hopeless(why) => {
                warn!(
                    account = %event.account,
                    "the webhook at {host} {why}; the {} event is not sent",
                    event.kind.as_str()
                );
                return;
            }
            Posted::Retry(why) => why,
        };
        if attempt == WEBHOOK_ATTEMPTS {
            warn!(
                account = %event.account,
                "the webhook at {host} {why}; gave up on the {} event after {attempt} tries: check that it is up and admin.notify_url",
                event.kind.as_str()
            );
            return;
        }
        warn!(
            account = %event.account,
            "the webhook at {host} {why}; trying the {} event again in {}",
            event.kind.as_str(),
            humantime::format_duration(wait)
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(LAST_RETRY);
    }
}

async fn try_post(client: &reqwest::Client, url: &Secret, body: bytes::Bytes) -> Posted {
    let sent = client
        .post(url.expose())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => Posted::Delivered,
        Ok(r) if r.status().is_server_error() || r.status() == 429 => {
            Posted::Retry(format!("answered {}", r.status()))
        }
        Ok(r) if r.status().is_redirection() => Posted::Retry(format!(
            "answered {} (a redirect, not followed: give its target as admin.notify_url)",
            r.status()
        )),
        Ok(r) => Posted::Refused(r.status()),
        Err(e) => failure(e),
    }
}

/// A failed request as a sentence without the URL (reqwest's own message
/// names it, and the URL may hold the webhook's key).
fn failure(e: reqwest::Error) -> Posted {
    if e.is_timeout() {
        return Posted::Retry("did not answer within admin.notify_timeout".to_string());
    }
    let e = e.without_url();
    let chain = crate::error::chain(&e);
    if chain.contains("certificate") {
        return Posted::Hopeless(format!(
            "presented a TLS certificate that is not trusted ({chain}); give the webhook a certificate from a public CA, or name its CA's PEM file in admin.notify_ca_file and reload"
        ));
    }
    Posted::Retry(format!("could not be reached ({chain})"))
}

/// A webhook reached over plain HTTP beyond this machine: its URL (and a
/// key in it) and the events cross the network readable.
fn warn_if_plain_http(url: &Secret) {
    let Ok(parsed) = reqwest::Url::parse(url.expose()) else {
        return;
    };
    let host = parsed.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if parsed.scheme() == "http" && !loopback {
        warn!(
            "admin.notify_url is plain http to {}: its address (with any key in it) and the events cross the network unencrypted; use https",
            host_of(url)
        );
    }
}

/// The host of the webhook's URL: all the log may say of it.
fn host_of(url: &Secret) -> String {
    reqwest::Url::parse(url.expose())
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "admin.notify_url".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::health::NeedsLogin;

    fn health(needs_login: Option<u64>) -> AccountHealth {
        AccountHealth {
            username: "Sales@contoso.com".into(),
            mailbox: "sales@contoso.com".into(),
            delegated: true,
            needs_login: needs_login.map(|since| NeedsLogin {
                reason: "the grant is invalid, expired or revoked: run `xoauth2-proxy login Sales@contoso.com`".into(),
                since,
            }),
            access_token_expires_at: None,
            last_refresh: None,
            last_error: None,
            last_error_at: None,
            last_client_login: Default::default(),
        }
    }

    fn settings(repeat: Duration) -> Settings {
        let admin = AdminSection {
            notify_command: vec!["/bin/true".into()],
            notify_repeat: repeat,
            ..Default::default()
        };
        Settings::new(&admin)
    }

    /// The kinds of the events queued so far.
    fn kinds(events: &mut mpsc::Receiver<Arc<Event>>) -> Vec<EventKind> {
        std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.kind)
            .collect()
    }

    #[tokio::test]
    async fn needs_login_is_announced_once_repeated_when_due_and_recovered_once() {
        let (command, mut events) = mpsc::channel(QUEUE);
        let (webhook, _unused) = mpsc::channel(QUEUE);
        let sinks = Sinks { command, webhook };
        let settings = settings(Duration::from_secs(3600));
        let mut announced = HashMap::new();
        let start = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut look = |h, at| announce(&[h], &mut announced, &settings, &sinks, at);

        let next = look(health(Some(10)), start);
        assert_eq!(kinds(&mut events), [EventKind::NeedsLogin]);
        assert_eq!(next, Some(start + hour));
        // Looked at again (a reload, another account's change): nothing new.
        look(health(Some(10)), start + hour / 2);
        assert_eq!(kinds(&mut events), []);
        assert_eq!(look(health(Some(10)), start + hour), Some(start + 2 * hour));
        assert_eq!(kinds(&mut events), [EventKind::NeedsLogin], "repeated");
        look(health(None), start + hour);
        look(health(None), start + 3 * hour);
        assert_eq!(kinds(&mut events), [EventKind::Recovered], "once");
        // Never announced as needing login: no recovery either.
        announce(
            &[health(None)],
            &mut HashMap::new(),
            &settings,
            &sinks,
            start,
        );
        assert_eq!(kinds(&mut events), []);
    }

    #[tokio::test]
    async fn a_new_episode_is_announced_and_a_removed_account_forgotten_silently() {
        let (command, mut events) = mpsc::channel(QUEUE);
        let (webhook, _unused) = mpsc::channel(QUEUE);
        let sinks = Sinks { command, webhook };
        let settings = settings(Duration::ZERO);
        let mut announced = HashMap::new();
        let now = Instant::now();
        assert_eq!(
            announce(&[health(Some(10))], &mut announced, &settings, &sinks, now),
            None,
            "no repeats"
        );
        announce(&[health(Some(20))], &mut announced, &settings, &sinks, now);
        assert_eq!(
            kinds(&mut events),
            [EventKind::NeedsLogin, EventKind::NeedsLogin]
        );
        announce(&[], &mut announced, &settings, &sinks, now);
        assert!(announced.is_empty());
        assert_eq!(kinds(&mut events), []);
    }

    #[tokio::test]
    async fn a_sink_that_does_not_keep_up_drops_events_past_its_queue() {
        let (command, mut commands) = mpsc::channel(QUEUE);
        let (webhook, mut webhooks) = mpsc::channel(QUEUE);
        let sinks = Sinks { command, webhook };
        let admin = AdminSection {
            notify_url: Some(Secret::new("https://hooks.example.com/x".into())),
            ..Default::default()
        };
        let settings = Settings::new(&admin);
        for _ in 0..3 * QUEUE {
            let event = Event::new(EventKind::NeedsLogin, &health(Some(1)), "http://x");
            sinks.send(event, &settings);
        }
        assert_eq!(kinds(&mut webhooks).len(), QUEUE, "bounded");
        assert!(kinds(&mut commands).is_empty(), "no notify_command");
    }

    #[test]
    fn the_webhook_body_has_every_field_and_a_message() {
        let event = Event {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000),
            ..Event::new(
                EventKind::NeedsLogin,
                &health(Some(1)),
                "http://localhost:8025",
            )
        };
        let json: serde_json::Value = serde_json::from_slice(&event.json()).unwrap();
        assert_eq!(json["event"], "needs_login");
        assert_eq!(json["account"], "Sales@contoso.com");
        assert_eq!(json["mailbox"], "sales@contoso.com");
        assert_eq!(json["console_url"], "http://localhost:8025");
        assert_eq!(json["at"], "2025-11-24T16:00:00Z");
        assert!(json["reason"].as_str().unwrap().contains("revoked"));
        assert!(
            json["text"]
                .as_str()
                .unwrap()
                .contains("needs signing in again")
        );
    }

    #[tokio::test]
    async fn a_webhook_error_never_shows_its_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/services/T000/B000/hook-key-XYZ");
        let client = reqwest::Client::new();
        let Posted::Retry(why) = try_post(&client, &Secret::new(url), "{}".into()).await else {
            panic!("a closed port is worth retrying");
        };
        assert!(
            !why.contains("hook-key-XYZ") && !why.contains("/services"),
            "{why}"
        );
        assert!(why.starts_with("could not be reached"), "{why}");
        let host = host_of(&Secret::new(
            "https://hooks.slack.com/services/T/B/key".into(),
        ));
        assert_eq!(host, "hooks.slack.com");
    }
}
