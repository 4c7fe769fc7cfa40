//! The mock's HTTP/1.1 face, served by hyper: the endpoint table, the request
//! as the endpoints read it, and the response with the headers Entra sends.
//! One request per connection: every answer says `Connection: close`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Shared;
use super::authorize::authorize;
use super::control::control;
use super::graph::send_mail;
use super::token::token_like;

/// The largest request body read; a larger one closes the connection.
/// Graph's `sendMail` takes up to 4 MB, and the mock answers 413 above that.
const MAX_BODY: usize = 8 * 1024 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until `shutdown` turns true; each is served on a task
/// of its own.
pub(super) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (shared, stop) = (shared.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        answer(shared.clone(), request, stop.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .title_case_headers(true)
                        .timer(TokioTimer::new())
                        .header_read_timeout(READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// The connection is closed without an answer (a body too large or too slow,
/// or the `Hang` mode when the mock stops).
#[derive(Debug)]
struct Unanswered;

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closed without an answer")
    }
}

impl std::error::Error for Unanswered {}

async fn answer(
    shared: Arc<Shared>,
    request: hyper::Request<Incoming>,
    mut stop: watch::Receiver<bool>,
) -> Result<hyper::Response<Full<Bytes>>, Unanswered> {
    let request = tokio::time::timeout(READ_TIMEOUT, Request::read(request))
        .await
        .ok()
        .flatten()
        .ok_or(Unanswered)?;
    match route(&shared, &request, &mut stop).await {
        Some(response) => Ok(response.into_hyper()),
        None => {
            // Hang: keep the connection open, unanswered, until the mock goes away.
            let _ = stop.wait_for(|s| *s).await;
            Err(Unanswered)
        }
    }
}

/// The endpoint table; `None` means "never answer" (the `Hang` mode).
async fn route(
    shared: &Arc<Shared>,
    request: &Request,
    stop: &mut watch::Receiver<bool>,
) -> Option<Response> {
    if let Some(response) = control(shared, request) {
        return Some(response);
    }
    if let Some(response) = send_mail(shared, request) {
        return Some(response);
    }
    if request.path == "/devicelogin" {
        return Some(super::devicelogin::page(shared, request));
    }
    let segments: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    let endpoint = match segments.as_slice() {
        [tenant, "oauth2", "v2.0", endpoint] if !tenant.is_empty() => *endpoint,
        _ => "",
    };
    let response = match (&request.method, endpoint) {
        (&Method::POST, "token" | "devicecode") => {
            return token_like(shared, request, endpoint, stop).await;
        }
        (&Method::GET, "authorize") => authorize(shared, &request.query),
        (_, "token" | "devicecode" | "authorize") => Response::method_not_allowed(),
        _ => Response::not_found(),
    };
    Some(response)
}

/// A request as the endpoints read it: hyper has framed it (chunked or not).
pub(super) struct Request {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) query: String,
    headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Request {
    async fn read(request: hyper::Request<Incoming>) -> Option<Request> {
        let (parts, body) = request.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Some(Request {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            headers: parts.headers,
            body,
        })
    }

    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// The body as an `application/x-www-form-urlencoded` form.
    pub(super) fn form(&self) -> HashMap<String, String> {
        parse_form(&String::from_utf8_lossy(&self.body))
    }
}

pub(super) struct Response {
    pub(super) status: u16,
    content_type: &'static str,
    pub(super) body: Vec<u8>,
    pub(super) location: Option<String>,
    pub(super) retry_after: Option<u64>,
}

impl Response {
    pub(super) fn json(status: u16, value: &Value) -> Response {
        Response {
            status,
            content_type: "application/json; charset=utf-8",
            body: value.to_string().into_bytes(),
            location: None,
            retry_after: None,
        }
    }

    pub(super) fn html(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/html; charset=utf-8",
            body: body.as_bytes().to_vec(),
            location: None,
            retry_after: None,
        }
    }

    pub(super) fn not_found() -> Response {
        Response::html(404, "<html><body>Not found</body></html>")
    }

    pub(super) fn method_not_allowed() -> Response {
        Response::html(405, "<html><body>Method not allowed</body></html>")
    }

    /// The `error` of an error answer (`http_<status>` when it has none).
    pub(super) fn error_name(&self) -> Option<String> {
        if self.status < 400 {
            return None;
        }
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .or_else(|| Some(format!("http_{}", self.status)))
    }

    /// With the headers Entra sends on every answer.
    fn into_hyper(self) -> hyper::Response<Full<Bytes>> {
        let mut response = hyper::Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        let mut set = |name, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        };
        set(header::CONTENT_TYPE, self.content_type);
        set(header::CACHE_CONTROL, "no-store, no-cache");
        set(header::PRAGMA, "no-cache");
        set(header::HeaderName::from_static("x-ms-request-id"), &uuid());
        set(header::CONNECTION, "close");
        if let Some(location) = &self.location {
            set(header::LOCATION, location);
        }
        if let Some(seconds) = self.retry_after {
            set(header::RETRY_AFTER, &seconds.to_string());
        }
        response
    }
}

pub(super) fn parse_form(s: &str) -> HashMap<String, String> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (url_decode(k), url_decode(v)),
            None => (url_decode(p), String::new()),
        })
        .collect()
}

pub(super) fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

pub(super) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(super) fn uuid() -> String {
    let hex = |n: usize| -> String {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..n)
            .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap())
            .collect()
    };
    format!("{}-{}-4{}-a{}-{}", hex(8), hex(4), hex(3), hex(3), hex(12))
}
