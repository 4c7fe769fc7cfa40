//! The mail transaction: MAIL FROM (where the thread limit bites), RCPT TO,
//! DATA with dot-unstuffing, BDAT chunks, and recording what was accepted.

use std::io;
use std::sync::atomic::Ordering;

use super::session::{Flow, Session, find_lf, strip_prefix_ci};
use super::{HOSTNAME, NOT_AUTHENTICATED, ReceivedMessage, SEND_AS_DENIED, THREAD_LIMIT};

/// The address in a `MAIL FROM:` argument (`<a@b> SIZE=10` → `a@b`).
fn reverse_path(arg: &str) -> &str {
    let arg = arg.trim();
    let path = arg.split_whitespace().next().unwrap_or("");
    path.trim_start_matches('<').trim_end_matches('>')
}

impl Session {
    pub(super) fn mail(&mut self, arg: &str) {
        let Some(user) = self.auth_user.clone() else {
            self.reply(NOT_AUTHENTICATED);
            return;
        };
        if self.mail_from.is_some() {
            self.reply("503 5.5.1 Sender already specified");
            return;
        }
        let Some(from) = strip_prefix_ci(arg, "FROM:") else {
            self.reply("501 5.5.4 Invalid arguments");
            return;
        };
        // Exchange applies Send As at submission: a shared mailbox as the
        // sender needs the logged-in user's Send As right on it.
        if !self.shared.tokens.may_send_as(&user, reverse_path(from)) {
            self.reply(SEND_AS_DENIED);
            return;
        }
        let over_limit = {
            let limit = self.shared.cfg.lock().unwrap().max_sessions;
            let mut state = self.shared.state.lock().unwrap();
            let position = state
                .authed
                .get(&user.to_ascii_lowercase())
                .and_then(|ids| ids.iter().position(|&id| id == self.id))
                .unwrap_or(0);
            let over = limit.is_some_and(|n| position >= n);
            if over {
                state.stats.thread_limit_errors += 1;
            }
            over
        };
        if over_limit {
            self.shared.changed.notify_waiters();
            self.reply(THREAD_LIMIT);
            return;
        }
        self.mail_from = Some(from.trim().to_string());
        self.reply("250 2.1.0 Sender OK");
    }

    /// Checks the state for DATA/BDAT; on a problem answers and returns false.
    pub(super) fn transaction_ready(&mut self) -> bool {
        if self.mail_from.is_none() {
            self.reply("503 5.5.1 Need mail command");
            false
        } else if self.rcpts.is_empty() {
            self.reply("503 5.5.1 Need rcpt command");
            false
        } else {
            true
        }
    }

    pub(super) fn accept_message(&mut self, data: Vec<u8>, raw: Vec<u8>) {
        let n = self.shared.next_msg.fetch_add(1, Ordering::SeqCst);
        let message = ReceivedMessage {
            conn_id: self.id,
            auth_user: self.auth_user.clone().unwrap_or_default(),
            mail_from: self.mail_from.take().unwrap_or_default(),
            rcpt_to: std::mem::take(&mut self.rcpts),
            data,
            raw,
        };
        self.reset_transaction();
        {
            let mut state = self.shared.state.lock().unwrap();
            state.stats.transactions_ok += 1;
            state.messages.push(message);
        }
        self.shared.changed.notify_waiters();
        let text = format!(
            "250 2.0.0 OK <MOCK{:04}{:06}.{}@{HOSTNAME}> [Hostname=mock]",
            self.id,
            n,
            crate::tokens::random_text(12)
        );
        self.reply(&text);
    }

    pub(super) async fn data(&mut self) -> io::Result<Flow> {
        if self.bdat.is_some() {
            self.reply("503 5.5.1 Bad sequence of commands");
            return Ok(Flow::Continue);
        }
        if !self.transaction_ready() {
            return Ok(Flow::Continue);
        }
        self.reply("354 Start mail input; end with <CRLF>.<CRLF>");
        if self.shared.stall_next_data.swap(false, Ordering::SeqCst) {
            self.flush().await?;
            std::future::pending::<()>().await;
        }
        if self.shared.drop_next_data.swap(false, Ordering::SeqCst) {
            if self.pos == self.buf.len() && self.fill().await? == 0 {
                return Ok(Flow::Close);
            }
            self.shared.state.lock().unwrap().stats.dropped_data += 1;
            self.shared.changed.notify_waiters();
            return Ok(Flow::Drop);
        }
        match self.read_data().await? {
            Some((data, raw)) => {
                self.accept_message(data, raw);
                Ok(Flow::Continue)
            }
            None => Ok(Flow::Close),
        }
    }

    /// Reads dot-stuffed content up to and including the `.<CR><LF>` line;
    /// returns (unstuffed, as on the wire), both without that line, or `None` at EOF.
    pub(super) async fn read_data(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut data = Vec::new();
        let mut raw = Vec::new();
        let mut line_start = true;
        loop {
            while self.pos < self.buf.len() {
                let avail = &self.buf[self.pos..];
                if line_start && avail[0] == b'.' {
                    match (avail.get(1), avail.get(2)) {
                        (None, _) | (Some(b'\r'), None) => break, // undecided: need more
                        (Some(b'\r'), Some(b'\n')) => {
                            self.pos += 3;
                            return Ok(Some((data, raw)));
                        }
                        _ => {
                            // A stuffed dot: on the wire, not in the content.
                            raw.push(b'.');
                            self.pos += 1;
                            line_start = false;
                            continue;
                        }
                    }
                }
                let (n, found) = match find_lf(avail) {
                    Some(i) => (i + 1, true),
                    None => (avail.len(), false),
                };
                raw.extend_from_slice(&avail[..n]);
                data.extend_from_slice(&avail[..n]);
                self.pos += n;
                line_start = found;
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    pub(super) async fn bdat(&mut self, arg: &str) -> io::Result<Flow> {
        let mut parts = arg.split_ascii_whitespace();
        let size = parts.next().and_then(|s| s.parse::<usize>().ok());
        let last = match parts.next() {
            None => false,
            Some(p) if p.eq_ignore_ascii_case("LAST") => true,
            Some(_) => {
                self.reply("501 5.5.4 Invalid arguments");
                return Ok(Flow::Continue);
            }
        };
        let Some(size) = size else {
            self.reply("501 5.5.4 Invalid arguments");
            return Ok(Flow::Continue);
        };
        // The chunk follows the command at once, whatever we answer: read it first.
        let mut chunk = Vec::with_capacity(size.min(1 << 20));
        while chunk.len() < size {
            if self.pos == self.buf.len() && self.fill().await? == 0 {
                return Ok(Flow::Close);
            }
            let take = (size - chunk.len()).min(self.buf.len() - self.pos);
            chunk.extend_from_slice(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
        }
        if !self.transaction_ready() {
            return Ok(Flow::Continue);
        }
        let mut content = self.bdat.take().unwrap_or_default();
        content.extend_from_slice(&chunk);
        if last {
            self.accept_message(content.clone(), content);
        } else {
            self.bdat = Some(content);
            let text = format!("250 2.0.0 {size} octets received");
            self.reply(&text);
        }
        Ok(Flow::Continue)
    }
}
