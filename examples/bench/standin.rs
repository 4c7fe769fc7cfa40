//! A lean, fast TLS IMAP and SMTP stand-in for the benchmarks.
//!
//! It answers like outlook.office365.com (IMAP, implicit TLS) and
//! smtp.office365.com (SMTP, here with implicit TLS), accepts only SASL
//! XOAUTH2 with a token from the shared [`TokenBook`], and otherwise does as
//! little as it can: a FETCH of the one message writes a shared in-memory
//! buffer, an APPEND literal and a DATA body are read and thrown away. So what
//! a benchmark sees is the TLS and the path between client and server, not the
//! server.

use std::sync::Arc;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use testkit::tokens::TokenBook;

/// The longest command line the stand-in reads (an XOAUTH2 line is a few KB).
const MAX_LINE: usize = 64 * 1024;
/// Read-side buffer per connection; large reads (APPEND, DATA) bypass it.
const READ_BUFFER: usize = 16 * 1024;
/// What a literal or a message body is read in.
const SINK_CHUNK: usize = 256 * 1024;

const IMAP_CAPABILITIES: &str = "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+";

/// The listening ports of a started stand-in.
pub struct StandIn {
    pub imap_port: u16,
    pub smtp_port: u16,
}

/// Starts the IMAP and SMTP listeners on 127.0.0.1. `message` is the one
/// message in every mailbox's INBOX (UID 1).
pub async fn start(acceptor: TlsAcceptor, tokens: TokenBook, message: Arc<Vec<u8>>) -> StandIn {
    let imap = TcpListener::bind("127.0.0.1:0").await.expect("bind IMAP");
    let smtp = TcpListener::bind("127.0.0.1:0").await.expect("bind SMTP");
    let ports = StandIn {
        imap_port: imap.local_addr().unwrap().port(),
        smtp_port: smtp.local_addr().unwrap().port(),
    };
    {
        let (acceptor, tokens) = (acceptor.clone(), tokens.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = imap.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tokens, message) =
                    (acceptor.clone(), tokens.clone(), message.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = imap_session(tls, &tokens, &message).await;
                    }
                });
            }
        });
    }
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = smtp.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tokens) = (acceptor.clone(), tokens.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = smtp_session(tls, &tokens).await;
                }
            });
        }
    });
    ports
}

/// The mailbox named by an XOAUTH2 initial response if its token is good.
fn check_xoauth2(tokens: &TokenBook, b64: &[u8]) -> Option<String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim_ascii())
        .ok()?;
    let (user, token) = testkit::parse_xoauth2(&raw)?;
    tokens.check(&user, &token).then_some(user)
}

/// Reads one line (CRLF included) into `line`; false at EOF or on an overlong line.
async fn read_line<S: AsyncRead + Unpin>(io: &mut BufReader<S>, line: &mut Vec<u8>) -> bool {
    line.clear();
    let mut limited = (&mut *io).take(MAX_LINE as u64);
    matches!(limited.read_until(b'\n', line).await, Ok(n) if n > 0 && line.ends_with(b"\n"))
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    bytes: &[u8],
) -> std::io::Result<()> {
    let stream = io.get_mut();
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads and drops exactly `n` bytes.
async fn sink_exact<S: AsyncRead + Unpin>(
    io: &mut BufReader<S>,
    mut n: u64,
) -> std::io::Result<()> {
    let mut chunk = vec![0u8; SINK_CHUNK];
    while n > 0 {
        let want = n.min(chunk.len() as u64) as usize;
        let got = io.read(&mut chunk[..want]).await?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        n -= got as u64;
    }
    Ok(())
}

async fn imap_session<S>(stream: S, tokens: &TokenBook, message: &[u8]) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut io = BufReader::with_capacity(READ_BUFFER, stream);
    send(
        &mut io,
        b"* OK The Microsoft Exchange IMAP4 service is ready. [YmVuY2g=]\r\n",
    )
    .await?;
    let mut line = Vec::new();
    let mut user: Option<String> = None;
    while read_line(&mut io, &mut line).await {
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let mut words = text.splitn(3, ' ');
        let tag = words.next().unwrap_or("*").to_string();
        let mut command = words.next().unwrap_or("").to_ascii_uppercase();
        let mut rest = words.next().unwrap_or("").to_string();
        if command == "UID" {
            let mut inner = rest.splitn(2, ' ');
            command = format!("UID {}", inner.next().unwrap_or("").to_ascii_uppercase());
            rest = inner.next().unwrap_or("").to_string();
        }
        let authed = user.is_some();
        match command.as_str() {
            "CAPABILITY" => {
                let reply = format!(
                    "* CAPABILITY {IMAP_CAPABILITIES}\r\n{tag} OK CAPABILITY completed.\r\n"
                );
                send(&mut io, reply.as_bytes()).await?;
            }
            "NOOP" => send(&mut io, format!("{tag} OK NOOP completed.\r\n").as_bytes()).await?,
            "ID" => {
                let reply = format!("* ID NIL\r\n{tag} OK ID completed.\r\n");
                send(&mut io, reply.as_bytes()).await?;
            }
            "LOGOUT" => {
                let reply = format!(
                    "* BYE Microsoft Exchange Server IMAP4 server signing off.\r\n{tag} OK LOGOUT completed.\r\n"
                );
                send(&mut io, reply.as_bytes()).await?;
                let _ = io.get_mut().shutdown().await;
                return Ok(());
            }
            "AUTHENTICATE" if !authed => {
                let mut args = rest.split(' ');
                if !args.next().unwrap_or("").eq_ignore_ascii_case("XOAUTH2") {
                    let reply = format!("{tag} NO AUTHENTICATE failed.\r\n");
                    send(&mut io, reply.as_bytes()).await?;
                    continue;
                }
                let response = match args.next() {
                    Some(ir) => ir.as_bytes().to_vec(),
                    None => {
                        send(&mut io, b"+ \r\n").await?;
                        let mut answer = Vec::new();
                        if !read_line(&mut io, &mut answer).await {
                            return Ok(());
                        }
                        answer
                    }
                };
                match check_xoauth2(tokens, &response) {
                    Some(mailbox) => {
                        user = Some(mailbox);
                        let reply = format!("{tag} OK AUTHENTICATE completed.\r\n");
                        send(&mut io, reply.as_bytes()).await?;
                    }
                    None => {
                        let reply = format!("{tag} NO AUTHENTICATE failed.\r\n");
                        send(&mut io, reply.as_bytes()).await?;
                    }
                }
            }
            "LOGIN" if !authed => {
                send(&mut io, format!("{tag} NO LOGIN failed.\r\n").as_bytes()).await?
            }
            _ if !authed => {
                let reply = format!("{tag} BAD Command received in Invalid state.\r\n");
                send(&mut io, reply.as_bytes()).await?;
            }
            "NAMESPACE" => {
                let reply = format!(
                    "* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n{tag} OK NAMESPACE completed.\r\n"
                );
                send(&mut io, reply.as_bytes()).await?;
            }
            "ENABLE" => {
                send(
                    &mut io,
                    format!("{tag} OK ENABLE completed.\r\n").as_bytes(),
                )
                .await?
            }
            "SELECT" | "EXAMINE" => {
                let reply = format!(
                    "* 1 EXISTS\r\n* 0 RECENT\r\n* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent)\r\n\
                     * OK [PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent)] Permanent flags\r\n\
                     * OK [UIDVALIDITY 14] UIDVALIDITY value\r\n* OK [UIDNEXT 2] The next unique identifier value\r\n\
                     {tag} OK [READ-WRITE] {command} completed.\r\n"
                );
                send(&mut io, reply.as_bytes()).await?;
            }
            "FETCH" | "UID FETCH" => {
                let upper = rest.to_ascii_uppercase();
                let stream = io.get_mut();
                if upper.contains("BODY.PEEK[]")
                    || upper.contains("BODY[]")
                    || upper.contains("RFC822)")
                {
                    let head = format!("* 1 FETCH (UID 1 BODY[] {{{}}}\r\n", message.len());
                    stream.write_all(head.as_bytes()).await?;
                    stream.write_all(message).await?;
                    stream.write_all(b")\r\n").await?;
                } else {
                    let head = format!(
                        "* 1 FETCH (UID 1 RFC822.SIZE {} FLAGS ())\r\n",
                        message.len()
                    );
                    stream.write_all(head.as_bytes()).await?;
                }
                let done = format!("{tag} OK {command} completed.\r\n");
                stream.write_all(done.as_bytes()).await?;
                stream.flush().await?;
            }
            "APPEND" => {
                let Some((n, sync)) = testkit::literal_announced(&line) else {
                    send(
                        &mut io,
                        format!("{tag} BAD Command Argument Error. 11\r\n").as_bytes(),
                    )
                    .await?;
                    continue;
                };
                if sync {
                    send(&mut io, b"+ Ready for additional command text.\r\n").await?;
                }
                sink_exact(&mut io, n as u64).await?;
                // The rest of the command line after the literal (normally just CRLF).
                if !read_line(&mut io, &mut line).await {
                    return Ok(());
                }
                let reply = format!("{tag} OK [APPENDUID 14 2] APPEND completed.\r\n");
                send(&mut io, reply.as_bytes()).await?;
            }
            "IDLE" => {
                send(&mut io, b"+ IDLE accepted, awaiting DONE command.\r\n").await?;
                if !read_line(&mut io, &mut line).await {
                    return Ok(());
                }
                send(&mut io, format!("{tag} OK IDLE completed.\r\n").as_bytes()).await?;
            }
            _ => {
                let reply = format!("{tag} BAD Command Error. 12\r\n");
                send(&mut io, reply.as_bytes()).await?;
            }
        }
    }
    Ok(())
}

/// The position of the first `.` in `hay`, eight bytes at a time (the
/// stand-in must scan DATA at memory speed, and a message body rarely has dots).
fn find_dot(hay: &[u8]) -> Option<usize> {
    const DOTS: u64 = u64::from_ne_bytes([b'.'; 8]);
    const LOW: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut words = hay.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let x = u64::from_ne_bytes(word.try_into().expect("8 bytes")) ^ DOTS;
        if x.wrapping_sub(LOW) & !x & HIGH != 0 {
            return word.iter().position(|b| *b == b'.').map(|p| at + p);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|b| *b == b'.')
        .map(|p| at + p)
}

/// The end (exclusive) of the first `CRLF . CRLF` in `hay`.
fn find_terminator(hay: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = find_dot(&hay[from..]) {
        let dot = from + p;
        if dot >= 2 && &hay[dot - 2..dot] == b"\r\n" && hay.get(dot + 1..dot + 3) == Some(b"\r\n") {
            return Some(dot + 3);
        }
        from = dot + 1;
    }
    None
}

/// Finds the `CRLF . CRLF` that ends DATA across chunk boundaries (the CRLF
/// of the DATA command counts as the first line end).
struct EndOfData {
    tail: [u8; 4],
    tail_len: usize,
}

impl EndOfData {
    fn new() -> Self {
        EndOfData {
            tail: [b'\r', b'\n', 0, 0],
            tail_len: 2,
        }
    }

    /// Bytes of `chunk` up to and including the terminator, and whether it was found.
    fn scan(&mut self, chunk: &[u8]) -> (usize, bool) {
        let t = self.tail_len;
        let k = chunk.len().min(4);
        let mut window = [0u8; 8];
        window[..t].copy_from_slice(&self.tail[..t]);
        window[t..t + k].copy_from_slice(&chunk[..k]);
        if let Some(end) = find_terminator(&window[..t + k]) {
            return (end - t, true);
        }
        if let Some(end) = find_terminator(chunk) {
            return (end, true);
        }
        let joined = &window[..t + k];
        let keep_from_window = if chunk.len() >= 4 {
            0
        } else {
            joined.len().min(4)
        };
        let mut last = [0u8; 4];
        let n = if keep_from_window > 0 {
            last[..keep_from_window].copy_from_slice(&joined[joined.len() - keep_from_window..]);
            keep_from_window
        } else {
            last.copy_from_slice(&chunk[chunk.len() - 4..]);
            4
        };
        self.tail = last;
        self.tail_len = n;
        (chunk.len(), false)
    }
}

async fn smtp_session<S>(stream: S, tokens: &TokenBook) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut io = BufReader::with_capacity(SINK_CHUNK, stream);
    send(
        &mut io,
        b"220 bench.stand-in Microsoft ESMTP MAIL Service ready\r\n",
    )
    .await?;
    let mut line = Vec::new();
    let mut authed = false;
    let mut queued = 0u64;
    while read_line(&mut io, &mut line).await {
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = text.to_ascii_uppercase();
        let verb = upper.split(' ').next().unwrap_or("");
        match verb {
            "EHLO" => {
                send(
                    &mut io,
                    b"250-bench.stand-in Hello [127.0.0.1]\r\n250-SIZE 157286400\r\n250-PIPELINING\r\n\
                      250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250-AUTH LOGIN XOAUTH2\r\n250-8BITMIME\r\n\
                      250-BINARYMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n",
                )
                .await?
            }
            "HELO" => send(&mut io, b"250 bench.stand-in Hello\r\n").await?,
            "AUTH" if !authed => {
                let mut args = text.split(' ').skip(1);
                if !args.next().unwrap_or("").eq_ignore_ascii_case("XOAUTH2") {
                    send(&mut io, b"504 5.7.4 Unrecognized authentication type\r\n").await?;
                    continue;
                }
                let response = match args.next() {
                    Some(ir) => ir.as_bytes().to_vec(),
                    None => {
                        send(&mut io, b"334 \r\n").await?;
                        let mut answer = Vec::new();
                        if !read_line(&mut io, &mut answer).await {
                            return Ok(());
                        }
                        answer
                    }
                };
                if check_xoauth2(tokens, &response).is_some() {
                    authed = true;
                    send(&mut io, b"235 2.7.0 Authentication successful\r\n").await?;
                } else {
                    send(&mut io, b"535 5.7.3 Authentication unsuccessful\r\n").await?;
                }
            }
            "QUIT" => {
                send(&mut io, b"221 2.0.0 Service closing transmission channel\r\n").await?;
                let _ = io.get_mut().shutdown().await;
                return Ok(());
            }
            "NOOP" => send(&mut io, b"250 2.0.0 OK\r\n").await?,
            "RSET" => send(&mut io, b"250 2.0.0 Resetting\r\n").await?,
            _ if !authed => send(&mut io, b"530 5.7.57 Client not authenticated\r\n").await?,
            "MAIL" => send(&mut io, b"250 2.1.0 Sender OK\r\n").await?,
            "RCPT" => send(&mut io, b"250 2.1.5 Recipient OK\r\n").await?,
            "DATA" => {
                send(&mut io, b"354 Start mail input; end with <CRLF>.<CRLF>\r\n").await?;
                let mut end = EndOfData::new();
                loop {
                    let chunk = io.fill_buf().await?;
                    if chunk.is_empty() {
                        return Ok(());
                    }
                    let (n, done) = end.scan(chunk);
                    io.consume(n);
                    if done {
                        break;
                    }
                }
                queued += 1;
                let reply = format!("250 2.6.0 <{queued}@bench.stand-in> Queued mail for delivery\r\n");
                send(&mut io, reply.as_bytes()).await?;
            }
            _ => send(&mut io, b"500 5.3.3 Unrecognized command\r\n").await?,
        }
    }
    Ok(())
}
