//! Framing a pre-authentication command: its line plus any literals.
//!
//! A literal (`{n}` or LITERAL+'s `{n+}` at the end of a line) carries `n`
//! raw bytes, CRLFs included, so a command cannot be found by looking for the
//! end of a line. The framer reads line by line; where a line announces a
//! literal it answers a synchronising one with `+`, reads exactly `n` bytes,
//! and goes on until a line ends without one. Everything is bounded by
//! [`MAX_COMMAND`]: before login the client is not trusted.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::lines::{LineError, literal_announced, read_line};

/// The largest pre-authentication command, literals included. A LOGIN with
/// a long address and password is a few hundred bytes.
pub const MAX_COMMAND: usize = 16 * 1024;

#[derive(Debug)]
pub enum FrameError {
    /// The command grew past [`MAX_COMMAND`] (the line, or a literal the
    /// client has already started sending): the stream cannot be resynced.
    TooLong,
    /// A synchronising literal too large to accept; the client waits for our
    /// answer and sends nothing more for this command.
    LiteralRefused {
        line: Vec<u8>,
    },
    Closed,
    Io(std::io::Error),
}

impl From<LineError> for FrameError {
    fn from(e: LineError) -> Self {
        match e {
            LineError::TooLong => FrameError::TooLong,
            LineError::Closed => FrameError::Closed,
            LineError::Io(e) => FrameError::Io(e),
        }
    }
}

/// Reads one whole command into `buf` (cleared first), writing `+`
/// continuations to the same stream.
pub async fn read_command<S>(stream: &mut BufReader<S>, buf: &mut Vec<u8>) -> Result<(), FrameError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let reader = stream;
    buf.clear();
    loop {
        let line_start = buf.len();
        read_line(reader, buf, MAX_COMMAND).await?;
        let Some((n, synchronising)) = literal_announced(&buf[line_start..]) else {
            return Ok(());
        };
        if buf.len() + n > MAX_COMMAND {
            return Err(if synchronising {
                FrameError::LiteralRefused { line: buf.clone() }
            } else {
                FrameError::TooLong
            });
        }
        if synchronising {
            let writer = reader.get_mut();
            writer
                .write_all(b"+ Ready for literal data\r\n")
                .await
                .map_err(FrameError::Io)?;
            writer.flush().await.map_err(FrameError::Io)?;
        }
        let start = buf.len();
        buf.resize(start + n, 0);
        reader
            .read_exact(&mut buf[start..])
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
                _ => FrameError::Io(e),
            })?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, DuplexStream};

    /// A server stream with `input` already sent by the client, and the
    /// client's end to read what the server wrote.
    async fn client_sent(input: &[u8]) -> (BufReader<DuplexStream>, DuplexStream) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        (BufReader::new(server), client)
    }

    async fn written(server: BufReader<DuplexStream>, mut client: DuplexStream) -> Vec<u8> {
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn synchronising_literal_gets_a_continuation() {
        let (mut server, client) =
            client_sent(b"a LOGIN {3}\r\nabc {2+}\r\nxy\r\nb NOOP\r\n").await;
        let mut buf = Vec::new();
        read_command(&mut server, &mut buf).await.unwrap();
        assert_eq!(buf, b"a LOGIN {3}\r\nabc {2+}\r\nxy\r\n");
        read_command(&mut server, &mut buf).await.unwrap();
        assert_eq!(buf, b"b NOOP\r\n");
        assert_eq!(
            written(server, client).await,
            b"+ Ready for literal data\r\n",
            "one + for the one synchronising literal"
        );
    }

    #[tokio::test]
    async fn oversized_literals_are_refused() {
        let mut buf = Vec::new();
        let (mut server, client) = client_sent(b"a LOGIN {999999}\r\n").await;
        assert!(matches!(
            read_command(&mut server, &mut buf).await,
            Err(FrameError::LiteralRefused { .. })
        ));
        assert!(
            written(server, client).await.is_empty(),
            "no + for a refused literal"
        );
        let (mut server, _client) = client_sent(b"a LOGIN {999999+}\r\n").await;
        assert!(matches!(
            read_command(&mut server, &mut buf).await,
            Err(FrameError::TooLong)
        ));
    }
}
