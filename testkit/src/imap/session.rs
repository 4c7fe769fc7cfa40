//! One connection after TLS: the framed command reader, the output buffer,
//! dispatch, authentication and IDLE.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use super::mailbox::has_flag;
use super::parse::{Command, tokenize, trailing_literal};
use super::{
    Aside, FailureStyle, GREETING, LARGE_WRITE, MAX_LINE, MAX_LITERAL, PRE_AUTH_CAPABILITIES,
    Shared,
};
use crate::parse_xoauth2;

pub(super) struct Selected {
    pub(super) folder: String,
    pub(super) read_only: bool,
    pub(super) known_exists: usize,
}

pub(super) struct Session {
    pub(super) io: BufReader<TlsStream<TcpStream>>,
    pub(super) line: Vec<u8>,
    pub(super) out: Vec<u8>,
    pub(super) shared: Arc<Shared>,
    pub(super) changes: watch::Receiver<u64>,
    /// What the test asks open connections to do between commands.
    pub(super) aside: watch::Receiver<(u64, Aside)>,
    pub(super) user: Option<String>,
    pub(super) not_connected: bool,
    /// The bearer token this session authenticated with.
    pub(super) token: Option<String>,
    pub(super) selected: Option<Selected>,
}

pub(super) type Io<T> = std::io::Result<T>;

pub(super) fn io_err(msg: &str) -> std::io::Error {
    std::io::Error::other(msg.to_string())
}

impl Session {
    pub(super) async fn run(&mut self) {
        let _ = self.run_inner().await;
        let _ = self.io.get_mut().shutdown().await;
    }

    pub(super) async fn run_inner(&mut self) -> Io<()> {
        self.put(GREETING);
        self.flush().await?;
        loop {
            if !self.between_commands().await? {
                return Ok(());
            }
            let Some(cmd) = self.read_command().await? else {
                return Ok(());
            };
            if self.token_expired() {
                self.put("* BYE Session invalidated - AccessTokenExpired");
                self.flush().await?;
                return Ok(());
            }
            let keep_going = self.dispatch(cmd).await?;
            self.flush().await?;
            if !keep_going {
                return Ok(());
            }
        }
    }

    /// Waits for the next command's first byte, doing what the test asks
    /// meanwhile; false when the connection is to end. What the test asked
    /// before a command arrived comes first, so that a test can silence a
    /// session and be sure its next command goes unanswered.
    async fn between_commands(&mut self) -> Io<bool> {
        loop {
            let asked = self.aside.has_changed().unwrap_or(false);
            if !self.line.is_empty() || (!asked && !self.io.buffer().is_empty()) {
                return Ok(true);
            }
            tokio::select! {
                biased;
                r = self.aside.changed() => {
                    if r.is_err() {
                        return Ok(true);
                    }
                    let aside = self.aside.borrow_and_update().1.clone();
                    match aside {
                        Aside::Nothing => {}
                        Aside::Untagged(line) => {
                            self.put(&line);
                            self.flush().await?;
                        }
                        Aside::Bye => {
                            self.put("* BYE Server shutting down.");
                            self.flush().await?;
                            return Ok(false);
                        }
                        Aside::Silence => {
                            // Swallow whatever comes until the peer goes away.
                            let mut sink = vec![0u8; 4096];
                            while self.io.read(&mut sink).await? > 0 {}
                            return Ok(false);
                        }
                    }
                }
                r = self.io.fill_buf() => { r?; return Ok(true) }
            }
        }
    }

    pub(super) fn put(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    pub(super) fn tagged(&mut self, tag: &str, rest: &str) {
        self.put(&format!("{tag} {rest}"));
    }

    pub(super) async fn flush(&mut self) -> Io<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            self.io.get_mut().write_all(&out).await?;
            self.out = out;
            self.out.clear();
        }
        self.io.get_mut().flush().await
    }

    /// `{n}\r\n` and the bytes; large payloads go out in one write of their own.
    pub(super) async fn literal(&mut self, data: &[u8]) -> Io<()> {
        self.out
            .extend_from_slice(format!("{{{}}}\r\n", data.len()).as_bytes());
        if data.len() >= LARGE_WRITE {
            let out = std::mem::take(&mut self.out);
            self.io.get_mut().write_all(&out).await?;
            self.out = out;
            self.out.clear();
            if self.shared.config.lock().unwrap().small_records {
                return self.small_records(data).await;
            }
            self.io.get_mut().write_all(data).await?;
        } else {
            self.out.extend_from_slice(data);
        }
        Ok(())
    }

    /// `data` in records of 8 KiB, as Dovecot writes them (`set_small_records`).
    async fn small_records(&mut self, data: &[u8]) -> Io<()> {
        for (i, record) in data.chunks(8 * 1024).enumerate() {
            self.io.get_mut().write_all(record).await?;
            self.io.get_mut().flush().await?;
            if i % 32 == 31 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Ok(())
    }

    /// One line without its CRLF; `None` at end of stream. Cancel-safe: a partial
    /// line stays in `self.line`.
    pub(super) async fn read_line(&mut self) -> Io<Option<Vec<u8>>> {
        loop {
            let buf = self.io.fill_buf().await?;
            if buf.is_empty() {
                return Ok(None);
            }
            if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                self.line.extend_from_slice(&buf[..pos]);
                self.io.consume(pos + 1);
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            let n = buf.len();
            self.line.extend_from_slice(buf);
            self.io.consume(n);
            if self.line.len() > MAX_LINE {
                self.put("* BAD Line is too long.");
                self.flush().await?;
                return Err(io_err("line too long"));
            }
        }
    }

    pub(super) async fn read_command(&mut self) -> Io<Option<Command>> {
        let mut text = String::new();
        let mut literals = Vec::new();
        loop {
            let Some(line) = self.read_line().await? else {
                return Ok(None);
            };
            let line = String::from_utf8_lossy(&line).to_string();
            if let Some((prefix, n, plus)) = trailing_literal(&line) {
                if n > MAX_LITERAL {
                    self.put("* BAD Literal is too large.");
                    self.flush().await?;
                    return Err(io_err("literal too large"));
                }
                if !plus {
                    self.put("+ Ready for additional command text.");
                    self.flush().await?;
                }
                let mut data = vec![0u8; n];
                self.io.read_exact(&mut data).await?;
                text.push_str(prefix);
                text.push_str(&format!("\0{}\0", literals.len()));
                literals.push(data);
                continue;
            }
            text.push_str(&line);
            if text.trim().is_empty() && literals.is_empty() {
                text.clear();
                continue;
            }
            break;
        }
        let toks = tokenize(&text);
        let Some(mut toks) = toks else {
            let tag = text.split(' ').next().unwrap_or("*").to_string();
            return Ok(Some(Command {
                tag,
                name: "\0INVALID".to_string(),
                args: Vec::new(),
                literals,
            }));
        };
        let mut cmd = Command {
            tag: String::new(),
            name: String::new(),
            args: Vec::new(),
            literals,
        };
        if toks.is_empty() {
            return Ok(Some(cmd));
        }
        cmd.tag = cmd.text(&toks.remove(0)).unwrap_or_else(|| "*".into());
        if toks.is_empty() {
            cmd.name = "\0INVALID".to_string();
            return Ok(Some(cmd));
        }
        let mut name = cmd
            .text(&toks.remove(0))
            .unwrap_or_default()
            .to_ascii_uppercase();
        if name == "UID" && !toks.is_empty() {
            let sub = cmd
                .text(&toks.remove(0))
                .unwrap_or_default()
                .to_ascii_uppercase();
            name = format!("UID {sub}");
        }
        cmd.name = name;
        cmd.args = toks;
        Ok(Some(cmd))
    }

    pub(super) async fn dispatch(&mut self, cmd: Command) -> Io<bool> {
        let tag = cmd.tag.clone();
        if cmd.name == "\0INVALID" || tag.is_empty() {
            self.tagged(
                if tag.is_empty() { "*" } else { &tag },
                "BAD Command Error. 10",
            );
            return Ok(true);
        }
        let authed = self.user.is_some();
        if authed {
            self.shared
                .commands_seen
                .lock()
                .unwrap()
                .push(cmd.name.clone());
            if self.not_connected && cmd.name != "LOGOUT" {
                self.tagged(&tag, "BAD User is authenticated but not connected.");
                return Ok(true);
            }
        }
        match cmd.name.as_str() {
            "CAPABILITY" => {
                let caps = if authed {
                    self.shared
                        .config
                        .lock()
                        .unwrap()
                        .post_auth_capabilities
                        .clone()
                } else {
                    let before = &self.shared.capabilities_before_login;
                    before.fetch_add(1, Ordering::SeqCst);
                    PRE_AUTH_CAPABILITIES.to_string()
                };
                self.put(&format!("* CAPABILITY {caps}"));
                self.tagged(&tag, "OK CAPABILITY completed.");
            }
            "NOOP" | "CHECK" => {
                self.report_exists();
                self.tagged(&tag, &format!("OK {} completed.", cmd.name));
            }
            "LOGOUT" => {
                self.put("* BYE Microsoft Exchange Server IMAP4 server signing off.");
                self.tagged(&tag, "OK LOGOUT completed.");
                return Ok(false);
            }
            "ID" => {
                self.put(
                    r#"* ID ("name" "Microsoft.Exchange.Imap4.Imap4Server" "version" "15.20")"#,
                );
                self.tagged(&tag, "OK ID completed.");
            }
            "STARTTLS" => self.tagged(&tag, "BAD Command received in Invalid state."),
            "LOGIN" if !authed => {
                self.shared.auth_failed.fetch_add(1, Ordering::SeqCst);
                self.tagged(&tag, "NO LOGIN failed.");
            }
            "AUTHENTICATE" if !authed => self.authenticate(&cmd).await?,
            _ if !authed => self.tagged(&tag, "BAD Command received in Invalid state."),
            "LOGIN" | "AUTHENTICATE" => self.tagged(&tag, "BAD Command received in Invalid state."),
            "NAMESPACE" => {
                self.put(r#"* NAMESPACE (("" "/")) NIL NIL"#);
                self.tagged(&tag, "OK NAMESPACE completed.");
            }
            "ENABLE" => {
                let mut enabled = Vec::new();
                for i in 0..cmd.args.len() {
                    let ext = cmd.arg(i).unwrap_or_default().to_ascii_uppercase();
                    if ext == "UTF8=ACCEPT" {
                        enabled.push(ext);
                    }
                }
                let line = format!("* ENABLED {}", enabled.join(" "));
                self.put(line.trim_end());
                self.tagged(&tag, "OK ENABLE completed.");
            }
            "LIST" | "LSUB" => self.list(&cmd),
            "STATUS" => self.status(&cmd),
            "SELECT" | "EXAMINE" => self.select(&cmd),
            "APPEND" => self.append(cmd),
            "IDLE" => self.idle(&tag).await?,
            "CREATE" | "DELETE" | "RENAME" | "SUBSCRIBE" | "UNSUBSCRIBE" => self.tagged(
                &tag,
                &format!("NO {} is not supported by this mock.", cmd.name),
            ),
            "FETCH" | "UID FETCH" | "STORE" | "UID STORE" | "SEARCH" | "UID SEARCH" | "EXPUNGE"
            | "UID EXPUNGE" | "CLOSE" | "UNSELECT" | "COPY" | "UID COPY" | "MOVE" | "UID MOVE"
                if self.selected.is_none() =>
            {
                self.tagged(&tag, "BAD Command received in Invalid state.")
            }
            "FETCH" | "UID FETCH" => self.fetch(&cmd).await?,
            "STORE" | "UID STORE" => self.store(&cmd),
            "SEARCH" | "UID SEARCH" => self.search(&cmd),
            "EXPUNGE" | "UID EXPUNGE" => self.expunge(&cmd),
            "COPY" | "UID COPY" | "MOVE" | "UID MOVE" => self.copy_move(&cmd),
            "CLOSE" => {
                let sel = self.selected.take().unwrap();
                if !sel.read_only {
                    let user = self.user.clone().unwrap();
                    self.shared.with_folder(&user, &sel.folder, |f| {
                        f.msgs.retain(|m| !has_flag(&m.flags, r"\Deleted"))
                    });
                    self.shared.changed();
                }
                self.tagged(&tag, "OK CLOSE completed.");
            }
            "UNSELECT" => {
                self.selected = None;
                self.tagged(&tag, "OK UNSELECT completed.");
            }
            _ => self.tagged(&tag, "BAD Command Error. 12"),
        }
        Ok(true)
    }

    pub(super) async fn authenticate(&mut self, cmd: &Command) -> Io<()> {
        let tag = &cmd.tag;
        let mech = cmd.arg(0).unwrap_or_default().to_ascii_uppercase();
        let initial = cmd.arg(1);
        let payload = match initial {
            Some(ir) if ir == "=" => String::new(),
            Some(ir) => ir,
            None => {
                self.put("+ ");
                self.flush().await?;
                let Some(line) = self.read_line().await? else {
                    return Err(io_err("eof in AUTHENTICATE"));
                };
                let line = String::from_utf8_lossy(&line).trim().to_string();
                if line == "*" {
                    self.tagged(tag, "BAD AUTHENTICATE aborted.");
                    return Ok(());
                }
                line
            }
        };
        if mech != "XOAUTH2" {
            self.shared.auth_failed.fetch_add(1, Ordering::SeqCst);
            self.tagged(tag, "NO AUTHENTICATE failed.");
            return Ok(());
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(payload.as_bytes())
            .ok();
        let parsed = decoded.as_deref().and_then(parse_xoauth2);
        if let Some((_, token)) = &parsed {
            self.shared.tokens_seen.lock().unwrap().push(token.clone());
        }
        let ok = parsed
            .as_ref()
            .is_some_and(|(user, token)| self.shared.tokens.check_mailbox(user, token));
        if ok {
            let (user, token) = parsed.unwrap();
            self.token = Some(token);
            self.not_connected = self.shared.config.lock().unwrap().not_connected;
            self.user = Some(user);
            self.shared.auth_ok.fetch_add(1, Ordering::SeqCst);
            self.tagged(tag, "OK AUTHENTICATE completed.");
            return Ok(());
        }
        self.shared.auth_failed.fetch_add(1, Ordering::SeqCst);
        let style = self.shared.config.lock().unwrap().failure_style;
        match style {
            FailureStyle::Microsoft => self.tagged(tag, "NO AUTHENTICATE failed."),
            FailureStyle::Challenge => {
                let json = r#"{"status":"401","schemes":"bearer","scope":"https://outlook.office.com/IMAP.AccessAsUser.All"}"#;
                let b64 = base64::engine::general_purpose::STANDARD.encode(json);
                self.put(&format!("+ {b64}"));
                self.flush().await?;
                if self.read_line().await?.is_none() {
                    return Err(io_err("eof after challenge"));
                }
                self.tagged(tag, "NO [AUTHENTICATIONFAILED] Authentication failed.");
            }
        }
        Ok(())
    }

    /// True when session expiry is on and this session's token no longer passes.
    pub(super) fn token_expired(&self) -> bool {
        let (Some(user), Some(token)) = (&self.user, &self.token) else {
            return false;
        };
        self.shared.config.lock().unwrap().expire_sessions
            && !self.shared.tokens.check_mailbox(user, token)
    }

    pub(super) fn user(&self) -> String {
        self.user.clone().unwrap_or_default()
    }

    /// `* n EXISTS` when the selected folder grew since this session last said so.
    pub(super) fn report_exists(&mut self) {
        let user = self.user();
        let Some(sel) = self.selected.as_mut() else {
            return;
        };
        let exists = self
            .shared
            .with_folder(&user, &sel.folder, |f| f.msgs.len())
            .unwrap_or(0);
        if exists != sel.known_exists {
            sel.known_exists = exists;
            self.put(&format!("* {exists} EXISTS"));
        }
    }

    pub(super) async fn idle(&mut self, tag: &str) -> Io<()> {
        self.put("+ IDLE accepted, awaiting DONE command.");
        self.flush().await?;
        let mut changes = self.changes.clone();
        changes.borrow_and_update();
        loop {
            tokio::select! {
                line = self.read_line() => {
                    let Some(line) = line? else { return Err(io_err("eof in IDLE")) };
                    if String::from_utf8_lossy(&line).trim().eq_ignore_ascii_case("DONE") {
                        self.tagged(tag, "OK IDLE completed.");
                    } else {
                        self.tagged(tag, "BAD Command Argument Error. 11");
                    }
                    return Ok(());
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    if self.token_expired() {
                        self.put("* BYE Session invalidated - AccessTokenExpired");
                        self.flush().await?;
                        return Err(io_err("token expired"));
                    }
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return Err(io_err("store gone"));
                    }
                    self.report_exists();
                    self.flush().await?;
                }
            }
        }
    }
}
