//! Framing a pre-authentication command: its line plus any literals.
//!
//! A literal (`{n}` or LITERAL+'s `{n+}` at the end of a line) carries `n`
//! raw bytes, CRLFs included, so a command cannot be found by looking for the
//! end of a line. The framer reads line by line; where a line announces a
//! literal it answers a synchronising one with `+`, reads exactly `n` bytes,
//! and goes on until a line ends without one.
//!
//! Before login the client is not trusted, so every command is bounded, and
//! the bound is the command's own: [`MAX_COMMAND`] for all but ID, whose
//! parameters RFC 2971 allows to reach about 62 KiB when every value is
//! quoted with every octet escaped ([`MAX_ID_COMMAND`]). The name is known
//! from the command's first bytes, so a LOGIN never gets ID's room. A
//! command over its bound cannot be skipped (the rest of it may hold
//! anything), so the session closes the connection after answering it; the
//! tag, when the command got that far, goes with the error so that the
//! answer can be tagged. The buffer a long ID grew is given back before the
//! next command is waited for.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::parser::{self, ID_MAX_FIELD, ID_MAX_PAIRS, ID_MAX_VALUE};
use crate::lines::{LineError, literal_announced, read_line, reserve_within};

/// The largest pre-authentication command but ID, literals included. A
/// LOGIN with a long address and password is a few hundred bytes, an
/// AUTHENTICATE with SASL-IR a little more.
pub const MAX_COMMAND: usize = 16 * 1024;

/// The largest ID command: 64 KiB. It holds the largest ID parameters RFC
/// 2971 allows written the longest way ([`MAX_ID_PARAMS`], 63,421 bytes)
/// with `tag SP "ID" SP` and CRLF, for a tag of up to 2,109 bytes.
pub const MAX_ID_COMMAND: usize = 64 * 1024;

/// The longest `id_params_list` within RFC 2971's limits: 30 pairs, each a
/// field of 30 octets and a value of 1,024, every octet a `"` or `\` and so
/// escaped inside a quoted string (a literal is shorter: `{1024}` CRLF and
/// the octets), the pairs separated by SP and the list in parentheses.
const MAX_ID_PARAMS: usize =
    2 + ID_MAX_PAIRS * (quoted_len(ID_MAX_FIELD) + 1 + quoted_len(ID_MAX_VALUE)) + ID_MAX_PAIRS - 1;

// The bound holds the longest ID with room for a tag of 2 KiB.
const _: () = assert!(MAX_ID_COMMAND >= 2048 + " ID ".len() + MAX_ID_PARAMS + 2);

/// A quoted string of `octets` octets, each escaped.
const fn quoted_len(octets: usize) -> usize {
    2 + 2 * octets
}

/// A buffer larger than this is given back between commands.
const KEPT_CAPACITY: usize = 4 * 1024;

#[derive(Debug)]
pub enum FrameError {
    /// The command grew past its bound (the line, or a literal the client
    /// has already started sending): the stream cannot be resynced. `tag` is
    /// the command's tag when it was read before the bound was reached.
    TooLong {
        tag: Option<String>,
        bound: usize,
    },
    /// A synchronising literal too large to accept; the client waits for our
    /// answer and sends nothing more for this command.
    LiteralRefused {
        line: Vec<u8>,
    },
    Closed,
    Io(std::io::Error),
}

impl FrameError {
    /// A [`FrameError::TooLong`] for the command begun in `command`.
    fn too_long(command: &[u8], bound: usize) -> Self {
        FrameError::TooLong {
            tag: parser::leading_tag(command),
            bound,
        }
    }

    fn from_line(e: LineError, command: &[u8], bound: usize) -> Self {
        match e {
            LineError::TooLong => FrameError::too_long(command, bound),
            LineError::Closed => FrameError::Closed,
            LineError::Io(e) => FrameError::Io(e),
        }
    }
}

/// The bound of the command begun in `command`: ID's once its name is read.
pub fn bound(command: &[u8]) -> usize {
    match parser::command_name(command) {
        Some(name) if name.eq_ignore_ascii_case(b"ID") => MAX_ID_COMMAND,
        _ => MAX_COMMAND,
    }
}

/// Reads one whole command into `buf` (cleared first, and given back if a
/// previous command grew it), writing `+` continuations to the same stream.
pub async fn read_command<S>(stream: &mut BufReader<S>, buf: &mut Vec<u8>) -> Result<(), FrameError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let reader = stream;
    buf.clear();
    if buf.capacity() > KEPT_CAPACITY {
        *buf = Vec::new();
    }
    loop {
        let line_start = buf.len();
        let bound = read_command_line(reader, buf).await?;
        let Some((n, synchronising)) = literal_announced(&buf[line_start..]) else {
            return Ok(());
        };
        if n > bound.saturating_sub(buf.len()) {
            return Err(if synchronising {
                FrameError::LiteralRefused { line: buf.clone() }
            } else {
                FrameError::too_long(buf, bound)
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
        read_literal(reader, buf, n, bound).await?;
    }
}

/// Appends one line of the command to `buf` within the command's bound,
/// which widens when the first line turns out to begin an ID; returns the
/// bound. A bound reached before the name is read stays [`MAX_COMMAND`].
async fn read_command_line<S>(
    reader: &mut BufReader<S>,
    buf: &mut Vec<u8>,
) -> Result<usize, FrameError>
where
    S: AsyncRead + Unpin,
{
    let mut limit = bound(buf);
    loop {
        // On TooLong, `read_line` has kept what it read and left the rest
        // in the reader, so the line can go on under a wider bound.
        match read_line(reader, buf, limit).await {
            Ok(()) => return Ok(limit),
            Err(LineError::TooLong) if bound(buf) > limit => limit = bound(buf),
            Err(e) => return Err(FrameError::from_line(e, buf, limit)),
        }
    }
}

/// Appends the `n` bytes of a literal to `buf`.
async fn read_literal<S>(
    reader: &mut BufReader<S>,
    buf: &mut Vec<u8>,
    n: usize,
    bound: usize,
) -> Result<(), FrameError>
where
    S: AsyncRead + Unpin,
{
    let start = buf.len();
    reserve_within(buf, n, bound);
    buf.resize(start + n, 0);
    reader
        .read_exact(&mut buf[start..])
        .await
        .map(|_| ())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
            _ => FrameError::Io(e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, DuplexStream};

    /// A server stream with `input` already sent by the client, and the
    /// client's end to read what the server wrote.
    async fn client_sent(input: &[u8]) -> (BufReader<DuplexStream>, DuplexStream) {
        let (mut client, server) = tokio::io::duplex(input.len() + 1024);
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
            Err(FrameError::TooLong { tag: Some(t), bound: MAX_COMMAND }) if t == "a"
        ));
    }

    /// A maximal RFC 2971 ID, every octet of every string a `"` or `\`,
    /// quoted and escaped: 30 fields of 30 octets, 30 values of 1,024.
    fn maximal_id_params() -> Vec<u8> {
        let field = format!("\"{}\"", "\\\"".repeat(30));
        let value = format!("\"{}\"", "\\\\".repeat(1024));
        let pairs: Vec<String> = (0..30).map(|_| format!("{field} {value}")).collect();
        format!("({})", pairs.join(" ")).into_bytes()
    }

    fn id_command(tag: &str, params: &[u8]) -> Vec<u8> {
        [format!("{tag} ID ").as_bytes(), params, b"\r\n"].concat()
    }

    #[test]
    fn the_id_bound_holds_a_maximal_id_quoted_the_longest_way() {
        assert_eq!(maximal_id_params().len(), MAX_ID_PARAMS);
        assert_eq!(MAX_ID_PARAMS, 63_421);
        let longest_tag = MAX_ID_COMMAND - MAX_ID_PARAMS - " ID ".len() - 2;
        assert_eq!(longest_tag, 2_109);
        let command = id_command(&"t".repeat(longest_tag), &maximal_id_params());
        assert_eq!(command.len(), MAX_ID_COMMAND);
    }

    #[tokio::test]
    async fn an_id_frames_up_to_its_bound_and_not_a_byte_more() {
        let params = maximal_id_params();
        let at_bound = id_command(&"t".repeat(2_109), &params);
        let (mut server, _client) = client_sent(&at_bound).await;
        let mut buf = Vec::new();
        read_command(&mut server, &mut buf).await.unwrap();
        assert!(buf == at_bound);
        assert!(buf.capacity() <= MAX_ID_COMMAND, "{}", buf.capacity());

        let over = id_command(&"t".repeat(2_110), &params);
        let (mut server, _client) = client_sent(&over).await;
        match read_command(&mut server, &mut buf).await {
            Err(FrameError::TooLong { tag, bound }) => {
                assert_eq!(tag.as_deref(), Some("t".repeat(2_110).as_str()));
                assert_eq!(bound, MAX_ID_COMMAND);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn other_commands_keep_the_tight_bound() {
        for name in ["LOGIN", "AUTHENTICATE", "IDLE", "XYZ"] {
            let mut command = format!("a7 {name} ").into_bytes();
            command.resize(MAX_COMMAND + 1, b'x');
            command.extend_from_slice(b"\r\n");
            let (mut server, _client) = client_sent(&command).await;
            let mut buf = Vec::new();
            match read_command(&mut server, &mut buf).await {
                Err(FrameError::TooLong { tag, bound }) => {
                    assert_eq!((tag.as_deref(), bound), (Some("a7"), MAX_COMMAND), "{name}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_overlong_line_without_a_tag_is_told_apart() {
        let (mut server, _client) = client_sent(&[b'\x01'; MAX_COMMAND + 10]).await;
        let mut buf = Vec::new();
        assert!(matches!(
            read_command(&mut server, &mut buf).await,
            Err(FrameError::TooLong { tag: None, .. })
        ));
    }

    #[tokio::test]
    async fn a_large_ids_buffer_is_given_back_before_the_next_command() {
        let mut input = id_command("a", &maximal_id_params());
        input.extend_from_slice(b"b NOOP\r\n");
        let (mut server, _client) = client_sent(&input).await;
        let mut buf = Vec::new();
        read_command(&mut server, &mut buf).await.unwrap();
        assert!(buf.capacity() > KEPT_CAPACITY);
        read_command(&mut server, &mut buf).await.unwrap();
        assert_eq!(buf, b"b NOOP\r\n");
        assert!(buf.capacity() <= KEPT_CAPACITY, "{}", buf.capacity());
    }

    #[tokio::test]
    async fn an_id_of_literals_gets_the_id_bound() {
        let value = vec![b'v'; 1024];
        let mut input = b"a ID (".to_vec();
        for i in 0..30 {
            input.extend_from_slice(b"{5}\r\nfield {1024}\r\n");
            input.extend_from_slice(&value);
            input.extend_from_slice(if i < 29 { b" " } else { b")\r\n" });
        }
        assert!(input.len() > MAX_COMMAND);
        let (mut server, _client) = client_sent(&input).await;
        let mut buf = Vec::new();
        read_command(&mut server, &mut buf).await.unwrap();
        assert!(buf == input);
    }
}
