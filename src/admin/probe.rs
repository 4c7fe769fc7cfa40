//! The client side of the admin listener, for commands that run in another
//! process than `serve`: `health` and `status`.

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
