//! SEARCH: the search keys over one folder's messages.

use std::sync::Arc;

use super::fetch::{body_start, header, header_fields};
use super::mailbox::{Msg, has_flag, now_internal_date, parse_imap_date};
use super::parse::{Command, Tok, in_set, is_set, parse_set};
use super::session::Session;

impl Session {
    pub(super) fn search(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let uid_mode = cmd.name.starts_with("UID");
        let mut args = cmd.args.clone();
        if let Some(first) = args.first()
            && cmd
                .text(first)
                .is_some_and(|t| t.eq_ignore_ascii_case("CHARSET"))
        {
            args.drain(..2.min(args.len()));
        }
        let Some(all) = self.resolve("1:*", false) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let max_seq = all.len() as u32;
        let max_uid = all.last().map(|(_, m)| m.uid).unwrap_or(0);
        let ctx = SearchCtx {
            cmd,
            max_seq,
            max_uid,
        };
        let mut hits = Vec::new();
        for (seq, msg) in &all {
            let mut pos = 0;
            match ctx.all_of(&args, &mut pos, *seq as u32, msg) {
                Some(true) => hits.push(if uid_mode { msg.uid } else { *seq as u32 }),
                Some(false) => {}
                None => {
                    self.tagged(tag, "BAD Command Argument Error. 11");
                    return;
                }
            }
        }
        if all.is_empty() {
            // Still validate the criteria.
            let dummy = Msg {
                uid: 0,
                flags: Vec::new(),
                internal_date: now_internal_date(),
                data: Arc::new(Vec::new()),
            };
            let mut pos = 0;
            if ctx.all_of(&args, &mut pos, 0, &dummy).is_none() {
                self.tagged(tag, "BAD Command Argument Error. 11");
                return;
            }
        }
        let list: Vec<String> = hits.iter().map(|n| n.to_string()).collect();
        let line = format!("* SEARCH {}", list.join(" "));
        self.put(line.trim_end());
        self.tagged(tag, &format!("OK {} completed.", cmd.name));
    }
}

pub(super) struct SearchCtx<'a> {
    pub(super) cmd: &'a Command,
    pub(super) max_seq: u32,
    pub(super) max_uid: u32,
}

impl SearchCtx<'_> {
    /// All keys from `pos` to the end match; `None` for an unknown key.
    pub(super) fn all_of(
        &self,
        toks: &[Tok],
        pos: &mut usize,
        seq: u32,
        msg: &Msg,
    ) -> Option<bool> {
        let mut result = true;
        while *pos < toks.len() {
            result &= self.one(toks, pos, seq, msg)?;
        }
        Some(result)
    }

    pub(super) fn one(&self, toks: &[Tok], pos: &mut usize, seq: u32, msg: &Msg) -> Option<bool> {
        let tok = toks.get(*pos)?;
        *pos += 1;
        if let Tok::List(inner) = tok {
            let mut p = 0;
            return self.all_of(inner, &mut p, seq, msg);
        }
        let key = self.cmd.text(tok)?;
        let upper = key.to_ascii_uppercase();
        let mut arg = || -> Option<String> {
            let t = toks.get(*pos)?;
            *pos += 1;
            self.cmd.text(t)
        };
        let flag = |f: &str| has_flag(&msg.flags, f);
        Some(match upper.as_str() {
            "ALL" => true,
            "SEEN" => flag(r"\Seen"),
            "UNSEEN" | "NEW" => !flag(r"\Seen"),
            "DELETED" => flag(r"\Deleted"),
            "UNDELETED" => !flag(r"\Deleted"),
            "FLAGGED" => flag(r"\Flagged"),
            "UNFLAGGED" => !flag(r"\Flagged"),
            "ANSWERED" => flag(r"\Answered"),
            "UNANSWERED" => !flag(r"\Answered"),
            "DRAFT" => flag(r"\Draft"),
            "UNDRAFT" => !flag(r"\Draft"),
            "RECENT" => false,
            "OLD" => true,
            "KEYWORD" => flag(&arg()?),
            "UNKEYWORD" => !flag(&arg()?),
            "UID" => in_set(&parse_set(&arg()?, self.max_uid)?, msg.uid),
            "LARGER" => msg.data.len() > arg()?.parse::<usize>().ok()?,
            "SMALLER" => msg.data.len() < arg()?.parse::<usize>().ok()?,
            "SINCE" | "BEFORE" | "ON" | "SENTSINCE" | "SENTBEFORE" | "SENTON" => {
                let day = parse_imap_date(&arg()?)?;
                let own = parse_imap_date(&msg.internal_date).unwrap_or(0);
                match upper.trim_start_matches("SENT") {
                    "SINCE" => own >= day,
                    "BEFORE" => own < day,
                    _ => own == day,
                }
            }
            "SUBJECT" | "FROM" | "TO" | "CC" | "BCC" => {
                let needle = arg()?.to_ascii_lowercase();
                let fields = header_fields(&msg.data);
                header(&fields, &upper).is_some_and(|v| v.to_ascii_lowercase().contains(&needle))
            }
            "HEADER" => {
                let name = arg()?;
                let needle = arg()?.to_ascii_lowercase();
                let fields = header_fields(&msg.data);
                header(&fields, &name).is_some_and(|v| v.to_ascii_lowercase().contains(&needle))
            }
            "BODY" | "TEXT" => {
                let needle = arg()?.to_ascii_lowercase();
                let start = if upper == "BODY" {
                    body_start(&msg.data)
                } else {
                    0
                };
                String::from_utf8_lossy(&msg.data[start..])
                    .to_ascii_lowercase()
                    .contains(&needle)
            }
            "NOT" => !self.one(toks, pos, seq, msg)?,
            "OR" => {
                let a = self.one(toks, pos, seq, msg)?;
                let b = self.one(toks, pos, seq, msg)?;
                a || b
            }
            _ if is_set(&key) => in_set(&parse_set(&key, self.max_seq)?, seq),
            _ => return None,
        })
    }
}
