//! The mock's message store: per-mailbox folders of messages with UIDs, flags
//! and internal dates.

use std::sync::Arc;

#[derive(Clone, Debug)]
pub(super) struct Msg {
    pub(super) uid: u32,
    pub(super) flags: Vec<String>,
    pub(super) internal_date: String,
    pub(super) data: Arc<Vec<u8>>,
}

pub(super) struct Folder {
    pub(super) name: &'static str,
    pub(super) special_use: &'static str,
    pub(super) uid_validity: u32,
    pub(super) uid_next: u32,
    pub(super) msgs: Vec<Msg>,
}

impl Folder {
    pub(super) fn new(name: &'static str, special_use: &'static str, uid_validity: u32) -> Folder {
        Folder {
            name,
            special_use,
            uid_validity,
            uid_next: 1,
            msgs: Vec::new(),
        }
    }

    pub(super) fn add(
        &mut self,
        data: Vec<u8>,
        flags: Vec<String>,
        internal_date: Option<String>,
    ) -> u32 {
        let uid = self.uid_next;
        self.uid_next += 1;
        self.msgs.push(Msg {
            uid,
            flags,
            internal_date: internal_date.unwrap_or_else(now_internal_date),
            data: Arc::new(data),
        });
        uid
    }

    pub(super) fn unseen(&self) -> usize {
        self.msgs
            .iter()
            .filter(|m| !has_flag(&m.flags, r"\Seen"))
            .count()
    }
}

pub(super) struct Account {
    pub(super) folders: Vec<Folder>,
}

impl Account {
    pub(super) fn new() -> Account {
        Account {
            folders: vec![
                Folder::new("INBOX", "", 14),
                Folder::new("Sent", r"\Sent", 15),
            ],
        }
    }

    pub(super) fn folder(&mut self, name: &str) -> Option<&mut Folder> {
        self.folders
            .iter_mut()
            .find(|f| folder_matches(f.name, name))
    }
}

pub(super) fn folder_matches(folder: &str, name: &str) -> bool {
    if folder == "INBOX" {
        name.eq_ignore_ascii_case("INBOX")
    } else {
        folder == name
    }
}

pub(super) fn has_flag(flags: &[String], flag: &str) -> bool {
    flags.iter().any(|f| f.eq_ignore_ascii_case(flag))
}

pub(super) const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `17-Jul-1996 02:44:25 +0000`, now, UTC.
pub(super) fn now_internal_date() -> String {
    let t = crate::dates::utc_now();
    format!(
        "{:02}-{}-{:04} {:02}:{:02}:{:02} +0000",
        t.day,
        MONTHS[t.month as usize - 1],
        t.year,
        t.hour,
        t.minute,
        t.second
    )
}

/// Days since 1970-01-01 of the date part of `d-Mon-yyyy[ …]`.
pub(super) fn parse_imap_date(s: &str) -> Option<i64> {
    let date = s.trim().split(' ').next()?;
    let mut it = date.split('-');
    let d: i64 = it.next()?.trim().parse().ok()?;
    let mon = it.next()?;
    let m = MONTHS.iter().position(|x| x.eq_ignore_ascii_case(mon))? as i64 + 1;
    let y: i64 = it.next()?.parse().ok()?;
    Some(crate::dates::days_from_civil(y, m, d))
}
