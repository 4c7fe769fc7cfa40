//! The admin HTTP listener: `/healthz` and `/metrics`, apart from the mail ports.
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
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::AdminSection;
use crate::shared::RefusalLog;

/// The longest an admin connection lives, however busy: a scraper that keeps
/// its connection alive simply opens another.
const MAX_AGE: Duration = Duration::from_secs(600);
/// After [`MAX_AGE`], how long a request in progress may take to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves admin requests until `shutdown`, within the limits of `[admin]`.
pub async fn serve(listener: TcpListener, limits: AdminSection, shutdown: CancellationToken) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut refusals = RefusalLog::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refuse(stream, &limits, &mut refusals);
            continue;
        };
        let (header_timeout, idle_timeout) = (limits.header_timeout, limits.idle_timeout);
        tokio::spawn(async move {
            serve_connection(stream, header_timeout, idle_timeout).await;
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
async fn serve_connection(stream: TcpStream, header_timeout: Duration, idle_timeout: Duration) {
    let activity = Activity::new();
    let io = Watched {
        inner: stream,
        activity: activity.clone(),
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), hyper::service::service_fn(handle));
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

/// A stream that notes in its [`Activity`] every byte read or written.
struct Watched<S> {
    inner: S,
    activity: Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled
            && *n > 0
        {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Asks the admin listener at `addr` for `/healthz`; `Ok` on a 200.
pub async fn probe(addr: std::net::SocketAddr) -> Result<(), String> {
    get(addr, "/healthz").await.map(drop)
}

/// The accounts whose newest grant the proxy at `addr` holds in memory only
/// (its save failed), from its `/metrics`: `status` runs in another process.
pub async fn unsaved_grants(addr: std::net::SocketAddr) -> Result<Vec<String>, String> {
    let body = get(addr, "/metrics").await?;
    Ok(crate::metrics::unsaved_accounts(&body))
}

/// The body of `path` from the admin listener at `addr`, on a 200.
async fn get(addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A wildcard listen address is reached on loopback.
    let target = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        ip if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), exchange).await {
        Ok(Ok(response)) if response.starts_with(b"HTTP/1.1 200") => {
            let text = String::from_utf8_lossy(&response);
            Ok(text
                .split_once("\r\n\r\n")
                .map_or("", |(_, body)| body)
                .to_string())
        }
        Ok(Ok(_)) => Err(format!("the proxy at {target} is not healthy; see its log")),
        Ok(Err(e)) => Err(format!(
            "no proxy answers at {target}: {}; is `xoauth2-proxy serve` running with this config?",
            crate::error::io_reason(&e)
        )),
        Err(_) => Err(format!(
            "the proxy at {target} did not answer within 5 s; see its log"
        )),
    }
}

async fn handle(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ));
    }
    Ok(match request.uri().path() {
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
    })
}
