//! The admin HTTP listener: `/healthz` and `/metrics`, apart from the mail
//! ports, and the web console (`admin.console`, [`console`]) beside them.
//!
//! It starts after the mail listeners are bound and the config is loaded, so
//! a 200 from `/healthz` means the proxy is ready to serve.
//!
//! Its connections are bounded so that they cannot take the file descriptors
//! the mail listeners need: at most `admin.max_connections` at once (past it a
//! new one is closed at once); a request's headers within
//! `admin.header_timeout` of the connection's start or of the previous
//! response (hyper's own timer, which so also closes a kept-alive connection
//! waiting that long for its next request); no silence in either direction
//! longer than `admin.idle_timeout` at any point (hyper has no such timer for
//! HTTP/1: a client that stops reading its response would hold the
//! connection for ever); and no connection older than [`MAX_AGE`], however
//! busy.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::AdminSection;
use crate::shared::RefusalLog;
use crate::watched::{Watched, Watcher};

mod console;
mod exchange;
mod probe;

pub use exchange::{Current, Reply};
pub use probe::{probe, unsaved_grants};

/// The longest an admin connection lives, however busy: a scraper that keeps
/// its connection alive simply opens another.
const MAX_AGE: Duration = Duration::from_secs(600);
/// After [`MAX_AGE`], how long a request in progress may take to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves admin requests until `shutdown`, within the limits of `[admin]`;
/// the console, when `admin.console` is on, reads the config in force from
/// `current`.
pub async fn serve(
    listener: TcpListener,
    limits: AdminSection,
    current: Current,
    shutdown: CancellationToken,
) {
    let console = match listener.local_addr() {
        Ok(bound) if limits.console => Some(Arc::new(console::Console::new(current, bound))),
        _ => None,
    };
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut refusals = RefusalLog::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refuse(stream, &limits, &mut refusals);
            continue;
        };
        let (header_timeout, idle_timeout) = (limits.header_timeout, limits.idle_timeout);
        let console = console.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let console = console.clone();
                async move { Ok::<_, Infallible>(handle(request, peer, console.as_deref()).await) }
            });
            serve_connection(stream, service, header_timeout, idle_timeout).await;
            drop(permit);
        });
    }
}

/// Closes a connection past `admin.max_connections` at once; counted, and
/// logged once per burst.
fn refuse(stream: TcpStream, limits: &AdminSection, log: &mut RefusalLog) {
    drop(stream);
    crate::metrics::get().refused("admin", "max_connections");
    if let Some(unlogged) = log.note(std::time::Instant::now()) {
        let since = match unlogged {
            0 => String::new(),
            n => format!(" ({n} more since the last such line)"),
        };
        warn!(
            "{} admin connections are open (admin.max_connections); closing new ones at once{since}",
            limits.max_connections
        );
    }
}

/// Serves one admin connection until it ends, falls silent for
/// `idle_timeout`, or reaches [`MAX_AGE`].
async fn serve_connection<S>(
    stream: TcpStream,
    service: S,
    header_timeout: Duration,
    idle_timeout: Duration,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Reply, Error = Infallible>,
    S::Future: Send,
{
    let activity = Activity::new();
    let io = Watched {
        inner: stream,
        watcher: activity.clone(),
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => {
            if let Err(e) = served {
                debug!("admin connection: {e}");
            }
        }
        () = activity.silent_for(idle_timeout) => {
            debug!("admin connection silent for {}; closing", humantime::format_duration(idle_timeout));
        }
        () = tokio::time::sleep(MAX_AGE) => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
        }
    }
}

/// When a connection last moved a byte, either way.
#[derive(Clone)]
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last byte.
    last: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let since = self.start.elapsed().as_millis() as u64;
        self.last.store(since, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `idle`.
    async fn silent_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            if Instant::now() >= last + idle {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    }
}

/// A connection's [`Activity`] is touched by every byte it moves.
impl Watcher for Activity {
    fn read(&self, _: usize) {
        self.touch();
    }

    fn written(&self, _: usize) {
        self.touch();
    }
}

/// Answers one request: `/healthz` and `/metrics` as always, anything else
/// through the console when it is on.
async fn handle(
    request: Request<Incoming>,
    peer: std::net::SocketAddr,
    console: Option<&console::Console>,
) -> Reply {
    match (request.uri().path(), console) {
        ("/healthz" | "/metrics", _) | (_, None) => probe_endpoints(&request),
        (_, Some(console)) => console.handle(request, peer).await,
    }
}

/// `/healthz` and `/metrics`, GET and HEAD only.
fn probe_endpoints(request: &Request<Incoming>) -> Reply {
    let response = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        );
    }
    match request.uri().path() {
        "/healthz" => response(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::metrics::get().encode(),
        ),
        _ => response(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /healthz or /metrics\n".into(),
        ),
    }
}
