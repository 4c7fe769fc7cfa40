//! The admin HTTP listener: `/healthz` and `/metrics`, apart from the mail ports.
//!
//! It starts after the mail listeners are bound and the config is loaded, so
//! a 200 from `/healthz` means the proxy is ready to serve.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Serves admin requests until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(handle);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!("admin connection: {e}");
            }
        });
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
