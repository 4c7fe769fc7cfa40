//! The post-login byte pipe.
//!
//! After login the proxy neither parses nor buffers more than one chunk per
//! direction: IDLE, APPEND literals, COMPRESS=DEFLATE all pass untouched.
//! Bytes that the login dialogue had already read ahead on either side are
//! delivered first, so nothing pipelined by the client or sent early by the
//! server is lost.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tracing::debug;

/// Chunk size per direction: one TLS record's worth of plaintext.
const CHUNK: usize = 16 * 1024;

/// Relays between `client` and `upstream` until both directions are closed.
pub async fn splice<C, U>(client: BufReader<C>, upstream: BufReader<U>) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let client_ahead = client.buffer().to_vec();
    let upstream_ahead = upstream.buffer().to_vec();
    let mut client = client.into_inner();
    let mut upstream = upstream.into_inner();
    if !client_ahead.is_empty() {
        upstream.write_all(&client_ahead).await?;
        upstream.flush().await?;
    }
    if !upstream_ahead.is_empty() {
        client.write_all(&upstream_ahead).await?;
        client.flush().await?;
    }
    let (up, down) =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, CHUNK, CHUNK).await?;
    debug!(
        client_to_upstream = up,
        upstream_to_client = down,
        "session closed"
    );
    Ok(())
}
