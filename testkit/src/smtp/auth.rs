//! AUTH: XOAUTH2 checked against the token book, in Microsoft's or the
//! challenge style, and the refusals of every other mechanism.

use std::io;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::session::{Flow, Session, decode_b64};
use super::{
    AUTH_DISABLED, AUTH_FAILED_CHALLENGE, AUTH_FAILED_MICROSOFT, AUTH_OK, BASIC_AUTH_DISABLED,
    CHALLENGE_JSON, FailureStyle,
};
use crate::parse_xoauth2;

impl Session {
    pub(super) fn auth_failed(&self) {
        self.shared.state.lock().unwrap().stats.auth_failed += 1;
        self.shared.changed.notify_waiters();
    }

    pub(super) async fn auth(&mut self, arg: &str) -> io::Result<Flow> {
        if !self.tls {
            self.reply("504 5.7.4 Unrecognized authentication type");
            return Ok(Flow::Continue);
        }
        if !self.hello {
            self.reply("503 5.5.1 Send hello first");
            return Ok(Flow::Continue);
        }
        if self.auth_user.is_some() {
            self.reply("503 5.5.1 Already authenticated");
            return Ok(Flow::Continue);
        }
        if self.mail_from.is_some() {
            self.reply("503 5.5.1 Bad sequence of commands");
            return Ok(Flow::Continue);
        }
        let (mechanism, initial) = match arg.find(' ') {
            Some(i) => (&arg[..i], Some(arg[i + 1..].trim().to_string())),
            None => (arg, None),
        };
        match mechanism.to_ascii_uppercase().as_str() {
            "XOAUTH2" => self.auth_xoauth2(initial).await,
            "LOGIN" => {
                // Basic authentication is off at Microsoft; go through the motions.
                if initial.is_none() {
                    self.reply("334 VXNlcm5hbWU6");
                    if self.next_line().await?.is_none() {
                        return Ok(Flow::Close);
                    }
                }
                self.reply("334 UGFzc3dvcmQ6");
                if self.next_line().await?.is_none() {
                    return Ok(Flow::Close);
                }
                self.auth_failed();
                self.reply(BASIC_AUTH_DISABLED);
                Ok(Flow::Continue)
            }
            _ => {
                self.reply("504 5.7.4 Unrecognized authentication type");
                Ok(Flow::Continue)
            }
        }
    }

    pub(super) async fn auth_xoauth2(&mut self, initial: Option<String>) -> io::Result<Flow> {
        let response = match initial {
            Some(r) if r != "=" => r,
            Some(_) => String::new(),
            None => {
                self.reply("334 ");
                match self.next_line().await? {
                    Some(line) => line,
                    None => return Ok(Flow::Close),
                }
            }
        };
        if response.trim() == "*" {
            self.auth_failed();
            self.reply("501 5.7.0 Authentication cancelled");
            return Ok(Flow::Continue);
        }
        let Some(decoded) = decode_b64(&response) else {
            self.auth_failed();
            self.reply("501 5.5.2 Cannot Decode response");
            return Ok(Flow::Continue);
        };
        let parsed = parse_xoauth2(&decoded);
        let (disabled, style) = {
            let cfg = self.shared.cfg.lock().unwrap();
            let disabled = parsed
                .as_ref()
                .is_some_and(|(user, _)| cfg.auth_disabled.contains(&user.to_ascii_lowercase()));
            (disabled, cfg.failure_style)
        };
        if disabled {
            self.auth_failed();
            self.reply(AUTH_DISABLED);
            return Ok(Flow::Continue);
        }
        let accepted = parsed.filter(|(user, token)| self.shared.tokens.check(user, token));
        if let Some((user, _)) = accepted {
            {
                let mut state = self.shared.state.lock().unwrap();
                state.stats.auth_ok += 1;
                let ids = state.authed.entry(user.to_ascii_lowercase()).or_default();
                ids.push(self.id);
                let now = ids.len();
                let max = &mut state.stats.max_active_per_mailbox;
                *max = (*max).max(now);
            }
            self.shared.changed.notify_waiters();
            self.auth_user = Some(user);
            self.reply(AUTH_OK);
            return Ok(Flow::Continue);
        }
        self.auth_failed();
        match style {
            FailureStyle::Microsoft => self.reply(AUTH_FAILED_MICROSOFT),
            FailureStyle::Challenge => {
                let challenge = format!("334 {}", STANDARD.encode(CHALLENGE_JSON));
                self.reply(&challenge);
                if self.next_line().await?.is_none() {
                    return Ok(Flow::Close);
                }
                self.reply(AUTH_FAILED_CHALLENGE);
            }
        }
        Ok(Flow::Continue)
    }
}
