//! One connection: the byte stream (plain, then TLS), the buffered reader,
//! replies, and the command loop with EHLO, STARTTLS, RSET, NOOP and QUIT.

use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::{GREETING, HOSTNAME, MAX_LINE, Shared, unregister_auth};

pub(super) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Gone,
}

impl Io {
    pub(super) async fn read_into(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        buf.reserve(64 * 1024);
        match self {
            Io::Plain(s) => s.read_buf(buf).await,
            Io::Tls(s) => s.read_buf(buf).await,
            Io::Gone => Ok(0),
        }
    }

    pub(super) async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Io::Plain(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Io::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Io::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    pub(super) async fn shutdown(&mut self) {
        match self {
            Io::Plain(s) => {
                let _ = s.shutdown().await;
            }
            Io::Tls(s) => {
                let _ = s.shutdown().await;
            }
            Io::Gone => {}
        }
    }

    /// Closes with a TCP reset: no reply, no close_notify.
    pub(super) fn reset(&mut self) {
        match std::mem::replace(self, Io::Gone) {
            Io::Plain(s) => {
                let _ = s.set_zero_linger();
            }
            Io::Tls(s) => {
                let _ = s.get_ref().0.set_zero_linger();
            }
            Io::Gone => {}
        }
    }
}

pub(super) enum Flow {
    Continue,
    Close,
    /// Reset the connection without another word.
    Drop,
}

pub(super) struct Session {
    pub(super) shared: Arc<Shared>,
    pub(super) id: u64,
    pub(super) peer: SocketAddr,
    pub(super) io: Io,
    /// Bytes read and not yet consumed are `buf[pos..]`.
    pub(super) buf: Vec<u8>,
    pub(super) pos: usize,
    /// Replies not yet written (flushed before every read, so pipelined
    /// commands get their replies in one write).
    pub(super) out: Vec<u8>,
    pub(super) tls: bool,
    pub(super) hello: bool,
    pub(super) auth_user: Option<String>,
    pub(super) mail_from: Option<String>,
    pub(super) rcpts: Vec<String>,
    pub(super) bdat: Option<Vec<u8>>,
}

/// Position of the first LF (std's `read_until` machinery, which uses an optimised
/// memchr even in debug builds).
pub(super) fn find_lf(hay: &[u8]) -> Option<usize> {
    let mut reader = hay;
    let n = reader.skip_until(b'\n').unwrap_or(0);
    (n > 0 && hay[n - 1] == b'\n').then(|| n - 1)
}

pub(super) fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

pub(super) fn decode_b64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    STANDARD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .ok()
}

impl Session {
    pub(super) fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    pub(super) async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            self.io.write_all(&out).await?;
            self.out = out;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads more input (after flushing pending replies); 0 means EOF.
    pub(super) async fn fill(&mut self) -> io::Result<usize> {
        self.flush().await?;
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.io.read_into(&mut self.buf).await
    }

    /// The next command line without its line ending; `None` at EOF or after a
    /// line that was too long (answered, then the connection is closed).
    pub(super) async fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(i) = find_lf(&self.buf[self.pos..]) {
                let start = self.pos;
                let mut end = start + i;
                self.pos = end + 1;
                if end > start && self.buf[end - 1] == b'\r' {
                    end -= 1;
                }
                if end - start > MAX_LINE {
                    self.reply("500 5.5.6 Line too long");
                    self.flush().await?;
                    return Ok(None);
                }
                return Ok(Some(
                    String::from_utf8_lossy(&self.buf[start..end]).into_owned(),
                ));
            }
            if self.buf.len() - self.pos > MAX_LINE + 2 {
                self.reply("500 5.5.6 Line too long");
                self.flush().await?;
                return Ok(None);
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    pub(super) async fn run(&mut self) -> io::Result<Flow> {
        self.reply(GREETING);
        loop {
            let Some(line) = self.next_line().await? else {
                return Ok(Flow::Close);
            };
            match self.command(&line).await? {
                Flow::Continue => {}
                Flow::Close => {
                    self.flush().await?;
                    self.io.shutdown().await;
                    return Ok(Flow::Close);
                }
                Flow::Drop => return Ok(Flow::Drop),
            }
        }
    }

    pub(super) fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
        self.bdat = None;
    }

    pub(super) async fn command(&mut self, line: &str) -> io::Result<Flow> {
        let (verb, arg) = match line.find(' ') {
            Some(i) => (&line[..i], line[i + 1..].trim()),
            None => (line, ""),
        };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" | "HELO" if arg.is_empty() => self.reply("501 5.5.4 Invalid domain name"),
            "EHLO" => {
                self.reset_transaction();
                self.hello = true;
                let mut lines = vec![
                    format!("{HOSTNAME} Hello [{}]", self.peer.ip()),
                    "SIZE 157286400".to_string(),
                    "PIPELINING".to_string(),
                    "DSN".to_string(),
                    "ENHANCEDSTATUSCODES".to_string(),
                ];
                if self.tls {
                    lines.push("AUTH LOGIN XOAUTH2".to_string());
                } else {
                    lines.push("STARTTLS".to_string());
                }
                for ext in ["8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8"] {
                    lines.push(ext.to_string());
                }
                let last = lines.len() - 1;
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i == last { ' ' } else { '-' };
                    self.out
                        .extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
                }
            }
            "HELO" => {
                self.reset_transaction();
                self.hello = true;
                let text = format!("250 {HOSTNAME} Hello [{}]", self.peer.ip());
                self.reply(&text);
            }
            "STARTTLS" => return self.starttls().await,
            "AUTH" => return self.auth(arg).await,
            "MAIL" => self.mail(arg),
            "RCPT" => {
                if self.mail_from.is_none() {
                    self.reply("503 5.5.1 Need mail command");
                } else if let Some(to) = strip_prefix_ci(arg, "TO:") {
                    self.rcpts.push(to.trim().to_string());
                    self.reply("250 2.1.5 Recipient OK");
                } else {
                    self.reply("501 5.5.4 Invalid arguments");
                }
            }
            "DATA" => return self.data().await,
            "BDAT" => return self.bdat(arg).await,
            "RSET" => {
                self.reset_transaction();
                self.shared.state.lock().unwrap().stats.rsets += 1;
                self.shared.changed.notify_waiters();
                self.reply("250 2.0.0 Resetting");
            }
            "NOOP" => self.reply("250 2.0.0 OK"),
            "QUIT" => {
                // Stop counting against the mailbox's limit before the client can
                // see the 221 and open its next connection.
                unregister_auth(&mut self.shared.state.lock().unwrap(), self.id);
                self.reply("221 2.0.0 Service closing transmission channel");
                return Ok(Flow::Close);
            }
            _ => self.reply("500 5.3.3 Unrecognized command"),
        }
        Ok(Flow::Continue)
    }

    pub(super) async fn starttls(&mut self) -> io::Result<Flow> {
        if self.tls {
            self.reply("503 5.5.1 Bad sequence of commands");
            return Ok(Flow::Continue);
        }
        self.reply("220 2.0.0 SMTP server ready");
        self.flush().await?;
        // Anything pipelined after STARTTLS in plaintext is discarded (RFC 3207).
        self.buf.clear();
        self.pos = 0;
        let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
            return Ok(Flow::Close);
        };
        match self.shared.acceptor.accept(tcp).await {
            Ok(tls) => self.io = Io::Tls(Box::new(tls)),
            Err(_) => return Ok(Flow::Close),
        }
        self.tls = true;
        self.hello = false;
        self.auth_user = None;
        self.reset_transaction();
        Ok(Flow::Continue)
    }
}
