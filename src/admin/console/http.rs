//! What every console request and response shares: the bounded form body,
//! the security headers, redirects.

use std::collections::HashMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use maud::Markup;

use crate::admin::exchange::Reply;

/// A console form is a few hundred bytes; a larger body is refused.
const MAX_FORM: usize = 16 * 1024;

/// Sent with every console response: nothing is cached, framed, sniffed or
/// referred, and the pages load only their own sheet and script.
const SECURITY_HEADERS: [(&str, &str); 5] = [
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    (
        "content-security-policy",
        "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
];

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", content_type);
    for (name, value) in SECURITY_HEADERS {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(body.into()))
        .expect("a valid response")
}

pub fn page(status: StatusCode, markup: Markup) -> Reply {
    reply(status, "text/html; charset=utf-8", markup.into_string())
}

pub fn text(status: StatusCode, body: &str) -> Reply {
    reply(status, "text/plain; charset=utf-8", body.to_string())
}

pub fn json(value: &serde_json::Value) -> Reply {
    reply(StatusCode::OK, "application/json", value.to_string())
}

pub fn asset(content_type: &str, body: &'static str) -> Reply {
    reply(StatusCode::OK, content_type, body)
}

/// 303 See Other to `location` (after a POST, the browser GETs it).
pub fn redirect(location: &str) -> Reply {
    let mut r = reply(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    r.headers_mut().insert(
        "location",
        location
            .parse()
            .expect("console redirects are valid header values"),
    );
    r
}

/// `response` with the browser told to keep `cookie` (a `Set-Cookie` value).
pub fn with_cookie(mut response: Reply, cookie: &str) -> Reply {
    response.headers_mut().append(
        "set-cookie",
        cookie
            .parse()
            .expect("session cookies are valid header values"),
    );
    response
}

/// The value of the request's `Cookie` headers, joined.
pub fn cookies<B>(request: &Request<B>) -> String {
    request
        .headers()
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The `application/x-www-form-urlencoded` body of a POST, at most
/// [`MAX_FORM`] bytes; `None` when it is larger or broken off.
pub async fn form(request: Request<Incoming>) -> Option<HashMap<String, String>> {
    let body = Limited::new(request.into_body(), MAX_FORM)
        .collect()
        .await
        .ok()?
        .to_bytes();
    Some(form_urlencoded::parse(&body).into_owned().collect())
}

/// The pairs of a query string.
pub fn query(request: &Request<Incoming>) -> HashMap<String, String> {
    let query = request.uri().query().unwrap_or_default();
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}
