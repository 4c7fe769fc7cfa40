//! FETCH: the items, and the message parsing they need (header fields,
//! sections, ENVELOPE, BODYSTRUCTURE).

use super::LARGE_WRITE;
use super::mailbox::{Msg, has_flag};
use super::parse::{Command, Tok, in_set, nstring, parse_set, quoted};
use super::session::{Io, Session};

impl Session {
    /// The selected folder's messages with their sequence numbers that `set` names.
    pub(super) fn resolve(&self, set: &str, uid: bool) -> Option<Vec<(usize, Msg)>> {
        let sel = self.selected.as_ref()?;
        self.shared
            .with_folder(&self.user(), &sel.folder, |f| {
                let max = if uid {
                    f.msgs.last().map(|m| m.uid).unwrap_or(0)
                } else {
                    f.msgs.len() as u32
                };
                let ranges = parse_set(set, max)?;
                Some(
                    f.msgs
                        .iter()
                        .enumerate()
                        .filter(|(i, m)| {
                            let n = if uid { m.uid } else { *i as u32 + 1 };
                            in_set(&ranges, n)
                        })
                        .map(|(i, m)| (i + 1, m.clone()))
                        .collect(),
                )
            })
            .flatten()
    }

    pub(super) async fn fetch(&mut self, cmd: &Command) -> Io<()> {
        let tag = cmd.tag.clone();
        let uid_mode = cmd.name.starts_with("UID");
        let (Some(set), Some(items_tok)) = (cmd.arg(0), cmd.args.get(1)) else {
            self.tagged(&tag, "BAD Command Argument Error. 11");
            return Ok(());
        };
        let mut items: Vec<String> = match items_tok {
            Tok::List(l) => l.iter().filter_map(|t| cmd.text(t)).collect(),
            other => vec![cmd.text(other).unwrap_or_default()],
        };
        items = items
            .into_iter()
            .flat_map(|i| match i.to_ascii_uppercase().as_str() {
                "ALL" => vec!["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                "FAST" => vec!["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                "FULL" => vec!["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                _ => vec![i],
            })
            .collect();
        if uid_mode && !items.iter().any(|i| i.eq_ignore_ascii_case("UID")) {
            items.insert(0, "UID".to_string());
        }
        let mut parsed = Vec::new();
        for item in &items {
            match FetchItem::parse(item) {
                Some(fi) => parsed.push(fi),
                None => {
                    self.tagged(&tag, "BAD Command Argument Error. 11");
                    return Ok(());
                }
            }
        }
        let Some(msgs) = self.resolve(&set, uid_mode) else {
            self.tagged(&tag, "BAD Command Argument Error. 11");
            return Ok(());
        };
        let sets_seen = parsed.iter().any(|i| i.sets_seen());
        let read_only = self.selected.as_ref().is_some_and(|s| s.read_only);
        let folder = self.selected.as_ref().unwrap().folder.clone();
        for (seq, mut msg) in msgs {
            let mut flags_changed = false;
            if sets_seen && !read_only && !has_flag(&msg.flags, r"\Seen") {
                let uid = msg.uid;
                self.shared.with_folder(&self.user(), &folder, |f| {
                    if let Some(m) = f.msgs.iter_mut().find(|m| m.uid == uid) {
                        m.flags.push(r"\Seen".to_string());
                    }
                });
                msg.flags.push(r"\Seen".to_string());
                flags_changed = true;
            }
            self.out
                .extend_from_slice(format!("* {seq} FETCH (").as_bytes());
            let mut first = true;
            let mut wrote_flags = false;
            for item in &parsed {
                if !first {
                    self.out.push(b' ');
                }
                first = false;
                match item {
                    FetchItem::Uid => self
                        .out
                        .extend_from_slice(format!("UID {}", msg.uid).as_bytes()),
                    FetchItem::Flags => {
                        wrote_flags = true;
                        self.out.extend_from_slice(
                            format!("FLAGS ({})", msg.flags.join(" ")).as_bytes(),
                        )
                    }
                    FetchItem::Size => self
                        .out
                        .extend_from_slice(format!("RFC822.SIZE {}", msg.data.len()).as_bytes()),
                    FetchItem::InternalDate => self.out.extend_from_slice(
                        format!("INTERNALDATE \"{}\"", msg.internal_date).as_bytes(),
                    ),
                    FetchItem::Envelope => {
                        self.out.extend_from_slice(b"ENVELOPE ");
                        let env = envelope(&msg.data);
                        self.out.extend_from_slice(&env);
                    }
                    FetchItem::BodyStructure(ext) => {
                        self.out
                            .extend_from_slice(if *ext { b"BODYSTRUCTURE " } else { b"BODY " });
                        let bs = body_structure(&msg.data, *ext);
                        self.out.extend_from_slice(bs.as_bytes());
                    }
                    FetchItem::Section {
                        key,
                        section,
                        partial,
                        ..
                    } => {
                        let content = section_content(&msg.data, section);
                        let bytes: &[u8] = match &content {
                            Content::Range(a, b) => &msg.data[*a..*b],
                            Content::Owned(v) => v,
                        };
                        let (bytes, origin) = match partial {
                            Some((start, len)) => {
                                let s = (*start).min(bytes.len());
                                let e = s.saturating_add(*len).min(bytes.len());
                                (&bytes[s..e], Some(*start))
                            }
                            None => (bytes, None),
                        };
                        match origin {
                            Some(o) => self
                                .out
                                .extend_from_slice(format!("{key}<{o}> ").as_bytes()),
                            None => self.out.extend_from_slice(format!("{key} ").as_bytes()),
                        }
                        self.literal(bytes).await?;
                    }
                }
            }
            if flags_changed && !wrote_flags {
                self.out
                    .extend_from_slice(format!(" FLAGS ({})", msg.flags.join(" ")).as_bytes());
            }
            self.out.extend_from_slice(b")\r\n");
            if self.out.len() >= LARGE_WRITE {
                self.flush().await?;
            }
        }
        self.tagged(&tag, &format!("OK {} completed.", cmd.name));
        Ok(())
    }
}

pub(super) enum FetchItem {
    Uid,
    Flags,
    Size,
    InternalDate,
    Envelope,
    /// `true`: BODYSTRUCTURE, `false`: BODY.
    BodyStructure(bool),
    Section {
        /// The response key, e.g. `BODY[HEADER.FIELDS (FROM)]`.
        key: String,
        section: String,
        partial: Option<(usize, usize)>,
        peek: bool,
    },
}

impl FetchItem {
    pub(super) fn parse(item: &str) -> Option<FetchItem> {
        let upper = item.to_ascii_uppercase();
        Some(match upper.as_str() {
            "UID" => FetchItem::Uid,
            "FLAGS" => FetchItem::Flags,
            "RFC822.SIZE" => FetchItem::Size,
            "INTERNALDATE" => FetchItem::InternalDate,
            "ENVELOPE" => FetchItem::Envelope,
            "BODYSTRUCTURE" => FetchItem::BodyStructure(true),
            "BODY" => FetchItem::BodyStructure(false),
            "RFC822" => FetchItem::Section {
                key: "RFC822".into(),
                section: String::new(),
                partial: None,
                peek: false,
            },
            "RFC822.HEADER" => FetchItem::Section {
                key: "RFC822.HEADER".into(),
                section: "HEADER".into(),
                partial: None,
                peek: true,
            },
            "RFC822.TEXT" => FetchItem::Section {
                key: "RFC822.TEXT".into(),
                section: "TEXT".into(),
                partial: None,
                peek: false,
            },
            _ => {
                let (name, rest) = upper.split_once('[')?;
                let peek = match name {
                    "BODY" => false,
                    "BODY.PEEK" => true,
                    _ => return None,
                };
                let close = rest.rfind(']')?;
                let section = rest[..close].to_string();
                let tail = &rest[close + 1..];
                let partial = if tail.is_empty() {
                    None
                } else {
                    let inner = tail.strip_prefix('<')?.strip_suffix('>')?;
                    let (o, n) = inner.split_once('.')?;
                    Some((o.parse().ok()?, n.parse().ok()?))
                };
                // Keep the client's spelling of the section in the key.
                let orig_open = item.find('[')?;
                let orig_close = item.rfind(']')?;
                let key = format!("BODY[{}]", &item[orig_open + 1..orig_close]);
                FetchItem::Section {
                    key,
                    section,
                    partial,
                    peek,
                }
            }
        })
    }

    pub(super) fn sets_seen(&self) -> bool {
        matches!(self, FetchItem::Section { peek: false, .. })
    }
}

pub(super) enum Content {
    Range(usize, usize),
    Owned(Vec<u8>),
}

/// Offset where the body starts (after the blank line), or the length if none.
pub(super) fn body_start(data: &[u8]) -> usize {
    if let Some(p) = data.windows(4).position(|w| w == b"\r\n\r\n") {
        return p + 4;
    }
    if let Some(p) = data.windows(2).position(|w| w == b"\n\n") {
        return p + 2;
    }
    data.len()
}

/// Header fields as (name, raw lines incl. folding and line ends, unfolded value).
pub(super) fn header_fields(data: &[u8]) -> Vec<(String, Vec<u8>, String)> {
    let head = &data[..body_start(data)];
    let mut fields: Vec<(String, Vec<u8>, String)> = Vec::new();
    for line in head.split_inclusive(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(line);
        let trimmed = text.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(last) = fields.last_mut() {
                last.1.extend_from_slice(line);
                last.2.push(' ');
                last.2.push_str(trimmed.trim());
            }
            continue;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            fields.push((
                name.trim().to_string(),
                line.to_vec(),
                value.trim().to_string(),
            ));
        }
    }
    fields
}

pub(super) fn header<'a>(fields: &'a [(String, Vec<u8>, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, _, v)| v.as_str())
}

pub(super) fn section_content(data: &[u8], section: &str) -> Content {
    let start = body_start(data);
    let section = section.trim();
    match section {
        "" => Content::Range(0, data.len()),
        "HEADER" | "1.MIME" | "MIME" => Content::Range(0, start),
        "TEXT" | "1" => Content::Range(start, data.len()),
        _ => {
            let (not, list) = if let Some(rest) = section.strip_prefix("HEADER.FIELDS.NOT") {
                (true, rest)
            } else if let Some(rest) = section.strip_prefix("HEADER.FIELDS") {
                (false, rest)
            } else {
                return Content::Owned(Vec::new());
            };
            let names: Vec<String> = list
                .trim()
                .trim_start_matches('(')
                .trim_end_matches(')')
                .split_whitespace()
                .map(|s| s.trim_matches('"').to_ascii_lowercase())
                .collect();
            let mut out = Vec::new();
            for (name, raw, _) in header_fields(data) {
                if names.contains(&name.to_ascii_lowercase()) != not {
                    out.extend_from_slice(&raw);
                    if !raw.ends_with(b"\n") {
                        out.extend_from_slice(b"\r\n");
                    }
                }
            }
            out.extend_from_slice(b"\r\n");
            Content::Owned(out)
        }
    }
}

/// Splits an address list on commas outside quotes, comments and angle brackets.
pub(super) fn split_addresses(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut in_quote, mut angle, mut paren) = (false, 0, 0);
    let mut escaped = false;
    for ch in value.chars() {
        if escaped {
            cur.push(ch);
            escaped = false;
            continue;
        }
        match ch {
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '<' if !in_quote => angle += 1,
            '>' if !in_quote => angle -= 1,
            '(' if !in_quote => paren += 1,
            ')' if !in_quote => paren -= 1,
            ',' if !in_quote && angle == 0 && paren == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

pub(super) fn address_list(out: &mut Vec<u8>, value: Option<&str>) {
    let addrs: Vec<String> = value.map(split_addresses).unwrap_or_default();
    if addrs.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for a in addrs {
        let (name, addr) = match (a.find('<'), a.rfind('>')) {
            (Some(l), Some(r)) if l < r => {
                let name = a[..l].trim().trim_matches('"').trim().to_string();
                (
                    if name.is_empty() { None } else { Some(name) },
                    a[l + 1..r].trim().to_string(),
                )
            }
            _ => (None, a.clone()),
        };
        let (mailbox, host) = match addr.rsplit_once('@') {
            Some((m, h)) => (m.to_string(), Some(h.to_string())),
            None => (addr.clone(), None),
        };
        out.push(b'(');
        nstring(out, name.as_deref());
        out.extend_from_slice(b" NIL ");
        nstring(out, Some(&mailbox));
        out.push(b' ');
        nstring(out, host.as_deref());
        out.push(b')');
    }
    out.push(b')');
}

pub(super) fn envelope(data: &[u8]) -> Vec<u8> {
    let fields = header_fields(data);
    let h = |n: &str| header(&fields, n);
    let mut out = Vec::new();
    out.push(b'(');
    nstring(&mut out, h("Date"));
    out.push(b' ');
    nstring(&mut out, h("Subject"));
    out.push(b' ');
    let from = h("From");
    address_list(&mut out, from);
    out.push(b' ');
    address_list(&mut out, h("Sender").or(from));
    out.push(b' ');
    address_list(&mut out, h("Reply-To").or(from));
    for name in ["To", "Cc", "Bcc"] {
        out.push(b' ');
        address_list(&mut out, h(name));
    }
    out.push(b' ');
    nstring(&mut out, h("In-Reply-To"));
    out.push(b' ');
    nstring(&mut out, h("Message-ID"));
    out.push(b')');
    out
}

/// A single-part body structure from Content-Type/Content-Transfer-Encoding;
/// multipart and message/* messages are described as text/plain.
pub(super) fn body_structure(data: &[u8], extensible: bool) -> String {
    let fields = header_fields(data);
    let ctype = header(&fields, "Content-Type").unwrap_or("text/plain; charset=us-ascii");
    let mut parts = ctype.split(';');
    let mime = parts
        .next()
        .unwrap_or("text/plain")
        .trim()
        .to_ascii_uppercase();
    let (mut ty, mut sub) = mime
        .split_once('/')
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        .unwrap_or(("TEXT".into(), "PLAIN".into()));
    let mut params: Vec<(String, String)> = parts
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((
                k.trim().to_ascii_uppercase(),
                v.trim().trim_matches('"').to_string(),
            ))
        })
        .collect();
    if ty == "MULTIPART" || ty == "MESSAGE" {
        ty = "TEXT".into();
        sub = "PLAIN".into();
        params.retain(|(k, _)| k == "CHARSET");
    }
    if ty == "TEXT" && params.is_empty() {
        params.push(("CHARSET".into(), "us-ascii".into()));
    }
    let params = if params.is_empty() {
        "NIL".to_string()
    } else {
        let inner: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{} {}", quoted(k), quoted(v)))
            .collect();
        format!("({})", inner.join(" "))
    };
    let encoding = header(&fields, "Content-Transfer-Encoding")
        .unwrap_or("7BIT")
        .to_ascii_uppercase();
    let id = header(&fields, "Content-ID")
        .map(quoted)
        .unwrap_or("NIL".into());
    let desc = header(&fields, "Content-Description")
        .map(quoted)
        .unwrap_or("NIL".into());
    let body = &data[body_start(data)..];
    let size = body.len();
    let mut s = format!(
        "({} {} {params} {id} {desc} {} {size}",
        quoted(&ty),
        quoted(&sub),
        quoted(&encoding)
    );
    if ty == "TEXT" {
        let lines = body.iter().filter(|&&b| b == b'\n').count();
        s.push_str(&format!(" {lines}"));
    }
    if extensible {
        s.push_str(" NIL NIL NIL NIL");
    }
    s.push(')');
    s
}
