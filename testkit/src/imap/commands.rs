//! The mailbox commands that need no message parsing: LIST, STATUS, SELECT,
//! APPEND, STORE, EXPUNGE, COPY and MOVE.

use super::FLAGS;
use super::mailbox::{Account, Msg, has_flag};
use super::parse::{Command, Tok, astring, glob};
use super::session::{Selected, Session};

impl Session {
    pub(super) fn list(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let (Some(reference), Some(pattern)) = (cmd.arg(0), cmd.arg(1)) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let verb = cmd.name.clone();
        if pattern.is_empty() {
            self.put(&format!(r#"* {verb} (\Noselect) "/" """#));
            self.tagged(tag, &format!("OK {verb} completed."));
            return;
        }
        let pattern = format!("{reference}{pattern}");
        let folders: Vec<(&'static str, &'static str)> = {
            let mut store = self.shared.store.lock().unwrap();
            let account = store
                .entry(self.user().to_ascii_lowercase())
                .or_insert_with(Account::new);
            account
                .folders
                .iter()
                .map(|f| (f.name, f.special_use))
                .collect()
        };
        for (name, special) in folders {
            let matches = if name == "INBOX" {
                glob(&pattern.to_ascii_uppercase(), name)
            } else {
                glob(&pattern, name)
            };
            if matches {
                let attrs = if special.is_empty() || verb == "LSUB" {
                    r"\HasNoChildren".to_string()
                } else {
                    format!(r"\HasNoChildren {special}")
                };
                self.put(&format!(r#"* {verb} ({attrs}) "/" {}"#, astring(name)));
            }
        }
        self.tagged(tag, &format!("OK {verb} completed."));
    }

    pub(super) fn status(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let Some(name) = cmd.arg(0) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let items: Vec<String> = match cmd.args.get(1) {
            Some(Tok::List(l)) => l.iter().filter_map(|t| cmd.text(t)).collect(),
            _ => Vec::new(),
        };
        let info = self.shared.with_folder(&self.user(), &name, |f| {
            (f.name, f.msgs.len(), f.uid_next, f.uid_validity, f.unseen())
        });
        let Some((fname, messages, uid_next, uid_validity, unseen)) = info else {
            self.tagged(
                tag,
                "NO [NONEXISTENT] The requested item could not be found.",
            );
            return;
        };
        let mut parts = Vec::new();
        for item in items {
            let item = item.to_ascii_uppercase();
            let value = match item.as_str() {
                "MESSAGES" => messages as u64,
                "RECENT" => 0,
                "UIDNEXT" => uid_next as u64,
                "UIDVALIDITY" => uid_validity as u64,
                "UNSEEN" => unseen as u64,
                _ => {
                    self.tagged(tag, "BAD Command Argument Error. 11");
                    return;
                }
            };
            parts.push(format!("{item} {value}"));
        }
        self.put(&format!(
            "* STATUS {} ({})",
            astring(fname),
            parts.join(" ")
        ));
        self.tagged(tag, "OK STATUS completed.");
    }

    pub(super) fn select(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        self.selected = None;
        let Some(name) = cmd.arg(0) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let info = self.shared.with_folder(&self.user(), &name, |f| {
            let first_unseen = f
                .msgs
                .iter()
                .position(|m| !has_flag(&m.flags, r"\Seen"))
                .map(|i| i + 1);
            (
                f.name,
                f.msgs.len(),
                f.uid_validity,
                f.uid_next,
                first_unseen,
            )
        });
        let Some((fname, exists, uid_validity, uid_next, first_unseen)) = info else {
            self.tagged(
                tag,
                "NO [NONEXISTENT] The requested item could not be found.",
            );
            return;
        };
        let read_only = cmd.name == "EXAMINE";
        self.put(&format!("* {exists} EXISTS"));
        self.put("* 0 RECENT");
        self.put(&format!("* FLAGS ({FLAGS})"));
        self.put(&format!("* OK [PERMANENTFLAGS ({FLAGS})] Permanent flags"));
        if let Some(n) = first_unseen {
            self.put(&format!("* OK [UNSEEN {n}] Is the first unseen message"));
        }
        self.put(&format!(
            "* OK [UIDVALIDITY {uid_validity}] UIDVALIDITY value"
        ));
        self.put(&format!(
            "* OK [UIDNEXT {uid_next}] The next unique identifier value"
        ));
        self.selected = Some(Selected {
            folder: fname.to_string(),
            read_only,
            known_exists: exists,
        });
        let mode = if read_only { "READ-ONLY" } else { "READ-WRITE" };
        self.tagged(tag, &format!("OK [{mode}] {} completed.", cmd.name));
    }

    pub(super) fn append(&mut self, mut cmd: Command) {
        let tag = &cmd.tag;
        let Some(name) = cmd.arg(0) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let mut flags = Vec::new();
        let mut date = None;
        let mut data = None;
        for tok in &cmd.args[1..] {
            match tok {
                Tok::List(l) => flags = l.iter().filter_map(|t| cmd.text(t)).collect(),
                Tok::Quoted(d) => date = Some(d.clone()),
                Tok::Literal(i) => data = Some(*i),
                Tok::Atom(_) => {}
            }
        }
        let Some(index) = data else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let bytes = std::mem::take(&mut cmd.literals[index]);
        let result = self.shared.with_folder(&self.user(), &name, |f| {
            let uid = f.add(bytes, flags, date);
            (f.name, f.uid_validity, uid)
        });
        let Some((fname, uid_validity, uid)) = result else {
            self.tagged(tag, "NO [TRYCREATE] The requested item could not be found.");
            return;
        };
        self.shared.changed();
        if self.selected.as_ref().is_some_and(|s| s.folder == fname) {
            self.report_exists();
        }
        self.tagged(
            tag,
            &format!("OK [APPENDUID {uid_validity} {uid}] APPEND completed."),
        );
    }

    pub(super) fn store(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let uid_mode = cmd.name.starts_with("UID");
        let (Some(set), Some(op)) = (cmd.arg(0), cmd.arg(1)) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let op = op.to_ascii_uppercase();
        let silent = op.ends_with(".SILENT");
        let op = op.trim_end_matches(".SILENT").to_string();
        let mut flags = Vec::new();
        for tok in &cmd.args[2..] {
            match tok {
                Tok::List(l) => flags.extend(l.iter().filter_map(|t| cmd.text(t))),
                other => flags.extend(cmd.text(other)),
            }
        }
        if !matches!(op.as_str(), "FLAGS" | "+FLAGS" | "-FLAGS") {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        }
        let sel = self.selected.as_ref().unwrap();
        if sel.read_only {
            self.tagged(tag, "NO Command received in Invalid state.");
            return;
        }
        let folder = sel.folder.clone();
        let Some(targets) = self.resolve(&set, uid_mode) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let uids: Vec<u32> = targets.iter().map(|(_, m)| m.uid).collect();
        let updated = self
            .shared
            .with_folder(&self.user(), &folder, |f| {
                let mut updated = Vec::new();
                for (i, m) in f.msgs.iter_mut().enumerate() {
                    if !uids.contains(&m.uid) {
                        continue;
                    }
                    match op.as_str() {
                        "FLAGS" => m.flags = flags.clone(),
                        "+FLAGS" => {
                            for fl in &flags {
                                if !has_flag(&m.flags, fl) {
                                    m.flags.push(fl.clone());
                                }
                            }
                        }
                        _ => m
                            .flags
                            .retain(|x| !flags.iter().any(|f| f.eq_ignore_ascii_case(x))),
                    }
                    updated.push((i + 1, m.uid, m.flags.clone()));
                }
                updated
            })
            .unwrap_or_default();
        if !silent {
            for (seq, uid, fl) in updated {
                if uid_mode {
                    self.put(&format!(
                        "* {seq} FETCH (UID {uid} FLAGS ({}))",
                        fl.join(" ")
                    ));
                } else {
                    self.put(&format!("* {seq} FETCH (FLAGS ({}))", fl.join(" ")));
                }
            }
        }
        self.tagged(tag, &format!("OK {} completed.", cmd.name));
    }

    pub(super) fn expunge(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let sel = self.selected.as_ref().unwrap();
        if sel.read_only {
            self.tagged(tag, "NO Command received in Invalid state.");
            return;
        }
        let folder = sel.folder.clone();
        let only: Option<Vec<u32>> = if cmd.name == "UID EXPUNGE" {
            let Some(targets) = cmd.arg(0).and_then(|s| self.resolve(&s, true)) else {
                self.tagged(tag, "BAD Command Argument Error. 11");
                return;
            };
            Some(targets.iter().map(|(_, m)| m.uid).collect())
        } else {
            None
        };
        let removed = self.remove_where(&folder, |m| {
            has_flag(&m.flags, r"\Deleted") && only.as_ref().is_none_or(|u| u.contains(&m.uid))
        });
        for seq in removed {
            self.put(&format!("* {seq} EXPUNGE"));
        }
        self.tagged(tag, &format!("OK {} completed.", cmd.name));
    }

    /// Removes matching messages; returns the EXPUNGE sequence numbers to report.
    pub(super) fn remove_where(&mut self, folder: &str, pred: impl Fn(&Msg) -> bool) -> Vec<usize> {
        let removed = self
            .shared
            .with_folder(&self.user(), folder, |f| {
                let mut removed = Vec::new();
                let mut i = 0;
                while i < f.msgs.len() {
                    if pred(&f.msgs[i]) {
                        f.msgs.remove(i);
                        removed.push(i + 1);
                    } else {
                        i += 1;
                    }
                }
                removed
            })
            .unwrap_or_default();
        if !removed.is_empty() {
            self.shared.changed();
            if let Some(sel) = self.selected.as_mut() {
                sel.known_exists = sel.known_exists.saturating_sub(removed.len());
            }
        }
        removed
    }

    pub(super) fn copy_move(&mut self, cmd: &Command) {
        let tag = &cmd.tag;
        let uid_mode = cmd.name.starts_with("UID");
        let is_move = cmd.name.ends_with("MOVE");
        let (Some(set), Some(dest)) = (cmd.arg(0), cmd.arg(1)) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let Some(targets) = self.resolve(&set, uid_mode) else {
            self.tagged(tag, "BAD Command Argument Error. 11");
            return;
        };
        let copied = self.shared.with_folder(&self.user(), &dest, |f| {
            let mut new_uids = Vec::new();
            for (_, m) in &targets {
                new_uids.push(f.add(
                    m.data.as_ref().clone(),
                    m.flags.clone(),
                    Some(m.internal_date.clone()),
                ));
            }
            (f.uid_validity, new_uids)
        });
        let Some((validity, new_uids)) = copied else {
            self.tagged(tag, "NO [TRYCREATE] The requested item could not be found.");
            return;
        };
        self.shared.changed();
        let src: Vec<String> = targets.iter().map(|(_, m)| m.uid.to_string()).collect();
        let dst: Vec<String> = new_uids.iter().map(|u| u.to_string()).collect();
        let code = format!("COPYUID {validity} {} {}", src.join(","), dst.join(","));
        if is_move && !targets.is_empty() {
            self.put(&format!("* OK [{code}] Moved"));
            let folder = self.selected.as_ref().unwrap().folder.clone();
            let uids: Vec<u32> = targets.iter().map(|(_, m)| m.uid).collect();
            for seq in self.remove_where(&folder, |m| uids.contains(&m.uid)) {
                self.put(&format!("* {seq} EXPUNGE"));
            }
            self.tagged(tag, &format!("OK {} completed.", cmd.name));
        } else if targets.is_empty() {
            self.tagged(tag, &format!("OK {} completed.", cmd.name));
        } else {
            self.tagged(tag, &format!("OK [{code}] {} completed.", cmd.name));
        }
    }
}
