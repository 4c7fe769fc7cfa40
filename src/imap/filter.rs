//! The relay's filter after login: the upstream's capability answers reach
//! the client as the login's OK did ([`super::capabilities`]).
//!
//! Only real response lines may be rewritten. A FETCH of a message carries
//! the message as a literal (`{n}` CRLF, then `n` raw bytes), and a message
//! may well contain a line reading `* CAPABILITY … AUTH=PLAIN`. So the
//! server's stream is followed as IMAP frames it (RFC 9051 §4.3, §7.5): a
//! line that ends with `{n}` (or `~{n}`, `{n+}`) is followed by `n` bytes
//! that pass uncounted and unread, after which the same response goes on.
//! The scan costs little on the hot path: a literal is skipped by its count,
//! a line's end is found with `memchr`, and a response is judged by its
//! first bytes. Only responses that may carry capabilities (tagged status
//! lines and `* CAPABILITY`, `* OK`, `* NO`, `* BAD`, `* BYE`, `* PREAUTH`:
//! none of them holds a literal) are held until their line ends, so that
//! they can be rewritten whole; a response split across reads is held, not
//! misjudged. A line held past [`relay::HOLD_MAX`](crate::relay::HOLD_MAX)
//! goes out unchanged: no sane server sends one.
//!
//! COMPRESS=DEFLATE (RFC 4978) ends the scan: from the OK to a client's
//! `COMPRESS`, both directions are deflated and no line can be found in
//! them. The client's commands are followed for that alone (their literals
//! skipped by count, as APPEND's), and the COMPRESS answer is recognised by
//! its tag. After it the upstream's capability answers pass unchanged; a
//! client that compresses has already read the login's filtered list. (A
//! synchronising literal the server refuses is never sent, but the scan of
//! the client's stream still counts it: a COMPRESS within those bytes would
//! go unseen. Clients send COMPRESS first thing after login.)
//!
//! Inside a literal the filter knows how many of its bytes must still come
//! ([`Filter::upstream_owes`]), which lets the relay sleep until much of it
//! is there (`crate::low_water`); after COMPRESS it knows nothing.

use memchr::memchr;

use super::capabilities::{self, LONGEST_CARRIER, carries_capabilities};
use super::parser;
use crate::lines::literal_announced;
use crate::relay::{Filter, HOLD_MAX, Scanned};

/// The filter of one logged-in session.
#[derive(Default)]
pub struct CapabilityFilter {
    responses: Responses,
    commands: Commands,
    /// The tag of the client's COMPRESS until the server answers it.
    compress: Option<Box<[u8]>>,
    /// COMPRESS is active: nothing more is read.
    compressed: bool,
}

impl Filter for CapabilityFilter {
    fn client_sent(&mut self, bytes: &[u8]) {
        if self.compressed {
            return;
        }
        if let Some(tag) = self.commands.scan(bytes) {
            self.compress = Some(tag);
        }
    }

    fn upstream_sent(&mut self, buf: &mut [u8], len: usize) -> Scanned {
        if self.compressed {
            return Scanned::all(len);
        }
        let CapabilityFilter {
            responses,
            compress,
            compressed,
            ..
        } = self;
        responses.scan(buf, len, |line| {
            if let Some(tag) = compress.as_deref() {
                match status_of(line, tag) {
                    Some(true) => *compressed = true,
                    Some(false) => *compress = None,
                    None => {}
                }
            }
            Verdict {
                replace: capabilities::rewrite(line),
                last: *compressed,
            }
        })
    }

    fn upstream_owes(&self) -> u64 {
        match self.responses.at {
            Response::Literal(n) if !self.compressed => n,
            _ => 0,
        }
    }
}

/// `Some(true)` when `line` is `tag OK …`, `Some(false)` for another status
/// of `tag`, `None` when it is not `tag`'s.
fn status_of(line: &[u8], tag: &[u8]) -> Option<bool> {
    let rest = line.strip_prefix(tag)?.strip_prefix(b" ")?;
    Some(rest.get(..2).is_some_and(|s| s.eq_ignore_ascii_case(b"OK")))
}

/// What becomes of a held response once its line is whole.
struct Verdict {
    /// The line to send in its place.
    replace: Option<Vec<u8>>,
    /// Everything after it passes unread.
    last: bool,
}

/// Where the scan of the server's stream stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Response {
    /// At the start of a response, or past its first bytes when they are
    /// too few to judge it (they are held).
    #[default]
    Start,
    /// In a response that may carry capabilities: held until its line ends.
    Held,
    /// In a line that passes as it is, up to its end.
    Passing,
    /// In a line that passes as it is and whose grammar carries no literal
    /// (a continuation request, or a status line too long to hold): a `{n}`
    /// at its end is text, and the next response starts after it.
    Text,
    /// In a literal: this many bytes pass unread; the response goes on after.
    Literal(u64),
}

/// The server's stream, followed response by response.
#[derive(Default)]
struct Responses {
    at: Response,
    /// How many bytes at the start of the buffer were held last time.
    held: usize,
    /// The end of the passing line, for its literal announcement.
    tail: Tail,
}

/// Where a scan stands in the buffer: `at` is the next byte to look at,
/// `line` the start of the current response's line, `len` the buffer's
/// length (which a rewrite shortens).
struct Cursor {
    at: usize,
    line: usize,
    len: usize,
}

impl Responses {
    /// Scans `buf[..len]` (what was held, then new bytes); `judge` sees each
    /// held response when its line is whole.
    fn scan(
        &mut self,
        buf: &mut [u8],
        len: usize,
        mut judge: impl FnMut(&[u8]) -> Verdict,
    ) -> Scanned {
        let mut c = Cursor {
            at: self.held,
            line: 0,
            len,
        };
        loop {
            let done = match self.at {
                Response::Literal(n) => self.literal(&mut c, n),
                Response::Passing => self.passing(buf, &mut c, true),
                Response::Text => self.passing(buf, &mut c, false),
                Response::Start => self.start(buf, &mut c),
                Response::Held => self.held_line(buf, &mut c, &mut judge),
            };
            if let Some(scanned) = done {
                return scanned;
            }
        }
    }

    /// Skips what is here of a literal's `n` bytes.
    fn literal(&mut self, c: &mut Cursor, n: u64) -> Option<Scanned> {
        let skip = n.min((c.len - c.at) as u64);
        c.at += skip as usize;
        if skip < n {
            self.at = Response::Literal(n - skip);
            return Some(self.pass(c.len));
        }
        self.at = Response::Passing;
        None
    }

    /// Looks for the end of a passing line, keeping its last bytes when a
    /// literal may follow it.
    fn passing(&mut self, buf: &[u8], c: &mut Cursor, literal_may_follow: bool) -> Option<Scanned> {
        let Some(i) = memchr(b'\n', &buf[c.at..c.len]) else {
            self.tail.push(&buf[c.at..c.len]);
            return Some(self.pass(c.len));
        };
        self.tail.push(&buf[c.at..=c.at + i]);
        c.at += i + 1;
        c.line = c.at;
        self.at = match literal_may_follow {
            true => after_line(self.tail.bytes()),
            false => Response::Start,
        };
        self.tail = Tail::default();
        None
    }

    /// Judges a response by its first bytes, holding them while too few.
    fn start(&mut self, buf: &[u8], c: &mut Cursor) -> Option<Scanned> {
        self.at = match judge_start(&buf[c.line..c.len]) {
            Start::TooFew => return Some(self.hold(c)),
            Start::Passing => Response::Passing,
            Start::Text => Response::Text,
            Start::Held => Response::Held,
        };
        c.at = c.line;
        None
    }

    /// Holds a response to its line's end, then has it judged and rewritten.
    fn held_line(
        &mut self,
        buf: &mut [u8],
        c: &mut Cursor,
        judge: &mut impl FnMut(&[u8]) -> Verdict,
    ) -> Option<Scanned> {
        let Some(i) = memchr(b'\n', &buf[c.at..c.len]) else {
            if c.len - c.line < HOLD_MAX {
                return Some(self.hold(c));
            }
            self.at = Response::Text;
            return Some(self.pass(c.len));
        };
        let mut end = c.at + i + 1;
        let verdict = judge(&buf[c.line..end]);
        if let Some(new) = verdict.replace.filter(|new| new.len() <= end - c.line) {
            end = replace(buf, c.line..end, &new, &mut c.len);
        }
        if verdict.last {
            return Some(self.pass(c.len));
        }
        // A status line's text and capabilities carry no literal (RFC 9051
        // `resp-text`): a `{n}` at its end is text the server echoed.
        self.at = Response::Start;
        c.at = end;
        c.line = end;
        None
    }

    fn pass(&mut self, len: usize) -> Scanned {
        self.held = 0;
        Scanned::all(len)
    }

    /// Holds the current response, not judged yet, from its start.
    fn hold(&mut self, c: &Cursor) -> Scanned {
        self.held = c.len - c.line;
        Scanned {
            len: c.len,
            ready: c.line,
        }
    }
}

/// What follows a line that ends with `line_end`: a literal when it
/// announced one, else the start of the next response.
fn after_line(line_end: &[u8]) -> Response {
    match literal_announced(line_end) {
        Some((n, _)) => Response::Literal(n as u64),
        None => Response::Start,
    }
}

/// Puts `new` in the place of `buf[range]` (no shorter than `new`), closing
/// the gap up to `*len`; returns where the replaced part now ends.
fn replace(buf: &mut [u8], range: std::ops::Range<usize>, new: &[u8], len: &mut usize) -> usize {
    let end = range.start + new.len();
    buf[range.start..end].copy_from_slice(new);
    buf.copy_within(range.end..*len, end);
    *len -= range.end - end;
    end
}

/// What the first bytes of a response tell.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// Too few bytes yet.
    TooFew,
    /// It cannot carry capabilities.
    Passing,
    /// A continuation request: no capabilities, and no literal after it.
    Text,
    /// It may: hold it to its end.
    Held,
}

/// Judges a response by its first bytes: `+` continuations and untagged
/// data pass; tagged status lines and the untagged responses that may carry
/// capabilities are held.
fn judge_start(head: &[u8]) -> Start {
    match head {
        [] | [b'*'] => Start::TooFew,
        [b'+', ..] => Start::Text,
        [b'*', b' ', rest @ ..] => match rest.iter().position(|b| !b.is_ascii_alphabetic()) {
            None if rest.len() <= LONGEST_CARRIER => Start::TooFew,
            Some(n) if carries_capabilities(&rest[..n]) => Start::Held,
            _ => Start::Passing,
        },
        [b'*', ..] => Start::Passing,
        _ => Start::Held,
    }
}

/// Where the scan of the client's stream stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// At the start of a command, or in its first bytes (in `tail`, which
    /// then holds the line from its start).
    #[default]
    Start,
    /// In a line, up to its end.
    Passing,
    /// In a literal: this many bytes pass unread.
    Literal(u64),
}

/// The client's stream, followed command by command to see COMPRESS.
#[derive(Default)]
struct Commands {
    at: Command,
    /// The line's last bytes; its first bytes while they are judged.
    tail: Tail,
}

impl Commands {
    /// Follows `bytes`; returns the tag of a COMPRESS command among them.
    fn scan(&mut self, mut bytes: &[u8]) -> Option<Box<[u8]>> {
        let mut compress = None;
        while !bytes.is_empty() {
            let taken = match self.at {
                Command::Literal(n) => self.literal(bytes, n),
                Command::Passing => self.passing(bytes),
                Command::Start => {
                    let taken = self.tail.start_line(bytes);
                    compress = self.judge_start().or(compress);
                    taken
                }
            };
            bytes = &bytes[taken..];
        }
        compress
    }

    /// Skips what is here of a literal's `n` bytes; returns how many.
    fn literal(&mut self, bytes: &[u8], n: u64) -> usize {
        let skip = n.min(bytes.len() as u64);
        self.at = match n - skip {
            0 => Command::Passing,
            left => Command::Literal(left),
        };
        skip as usize
    }

    /// Follows a line up to its end; returns how many bytes it took.
    fn passing(&mut self, bytes: &[u8]) -> usize {
        let end = memchr(b'\n', bytes).map_or(bytes.len(), |i| i + 1);
        self.tail.push(&bytes[..end]);
        if bytes[end - 1] == b'\n' {
            self.line_ended();
        }
        end
    }

    /// Once the first bytes tell the command's name (or cannot): the tag of
    /// a COMPRESS, and the scan goes on in the line. A tag too long for
    /// [`TAIL`] bytes is not followed (clients use short ones).
    fn judge_start(&mut self) -> Option<Box<[u8]>> {
        let head = self.tail.bytes();
        let ended = head.last() == Some(&b'\n');
        let compress = match parser::command_head(head) {
            Some((tag, name)) if name.eq_ignore_ascii_case(b"COMPRESS") => Some(tag.into()),
            None if !ended && head.len() < TAIL => return None,
            _ => None,
        };
        if ended {
            self.line_ended();
        } else {
            self.at = Command::Passing;
        }
        compress
    }

    fn line_ended(&mut self) {
        self.at = match literal_announced(self.tail.bytes()) {
            Some((n, _)) => Command::Literal(n as u64),
            None => Command::Start,
        };
        self.tail = Tail::default();
    }
}

/// The last bytes of a line: enough for the longest literal announcement
/// (`{`, 10 digits, `+}`, CRLF) with room to spare.
const TAIL: usize = 32;

/// The last [`TAIL`] bytes pushed, to find a literal announcement at the
/// end of a line that came in pieces.
#[derive(Clone, Copy)]
struct Tail {
    bytes: [u8; TAIL],
    len: u8,
}

impl Default for Tail {
    fn default() -> Self {
        Tail {
            bytes: [0; TAIL],
            len: 0,
        }
    }
}

impl Tail {
    /// Takes the first bytes of a line from `more`, up to the tail's room or
    /// the line's end; returns how many.
    fn start_line(&mut self, more: &[u8]) -> usize {
        let room = (TAIL - usize::from(self.len)).min(more.len());
        let n = memchr(b'\n', &more[..room]).map_or(room, |i| i + 1);
        self.push(&more[..n]);
        n
    }

    fn push(&mut self, more: &[u8]) {
        if more.len() >= TAIL {
            self.bytes.copy_from_slice(&more[more.len() - TAIL..]);
            self.len = TAIL as u8;
            return;
        }
        let len = usize::from(self.len);
        let keep = len.min(TAIL - more.len());
        self.bytes.copy_within(len - keep..len, 0);
        self.bytes[keep..keep + more.len()].copy_from_slice(more);
        self.len = (keep + more.len()) as u8;
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message whose body holds what looks like a capability response.
    const BODY: &[u8] = b"Subject: caps\r\n\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nx OK [CAPABILITY AUTH=PLAIN] {5}\r\n";

    /// What a server says after login, and what the client must get.
    fn session() -> (Vec<u8>, Vec<u8>) {
        let fetch = [
            format!("* 1 FETCH (UID 7 BODY[] {{{}}}\r\n", BODY.len()).as_bytes(),
            BODY,
            b" BODY[HEADER] ~{0}\r\n FLAGS (\\Seen))\r\n",
        ]
        .concat();
        let parts: [(&[u8], &[u8]); 11] = [
            (
                b"* CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR IDLE STARTTLS\r\n",
                b"* CAPABILITY IMAP4rev1 IDLE\r\n",
            ),
            (
                b"a1 OK CAPABILITY completed\r\n",
                b"a1 OK CAPABILITY completed\r\n",
            ),
            (&fetch, &fetch),
            (b"a2 OK FETCH done\r\n", b"a2 OK FETCH done\r\n"),
            (b"+ idling\r\n", b"+ idling\r\n"),
            (
                b"* 3 EXISTS\r\n* OK Still here\r\n",
                b"* 3 EXISTS\r\n* OK Still here\r\n",
            ),
            (
                b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED IDLE] hi\r\n",
                b"* OK [CAPABILITY IMAP4rev1 IDLE] hi\r\n",
            ),
            (
                b"* ID (\"name\" {12}\r\n* CAPABILITY)\r\n",
                b"* ID (\"name\" {12}\r\n* CAPABILITY)\r\n",
            ),
            // Text that ends like a literal's announcement, where the
            // grammar has none: the next response is scanned as one.
            (
                b"a4 NO Mailbox doesn't exist: x{300000}\r\n",
                b"a4 NO Mailbox doesn't exist: x{300000}\r\n",
            ),
            (b"+ go on {9}\r\n", b"+ go on {9}\r\n"),
            (
                b"a3 OK [CAPABILITY IMAP4rev1 SASL-IR] done\r\n",
                b"a3 OK [CAPABILITY IMAP4rev1] done\r\n",
            ),
        ];
        let sent = parts.iter().flat_map(|(s, _)| s.iter().copied()).collect();
        let expected = parts.iter().flat_map(|(_, e)| e.iter().copied()).collect();
        (sent, expected)
    }

    /// Feeds `chunks` from the upstream as the relay does: what the filter
    /// holds comes back first with the next chunk, and goes out at the end.
    fn downstream(filter: &mut CapabilityFilter, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut held = Vec::new();
        for chunk in chunks {
            held.extend_from_slice(chunk);
            let len = held.len();
            let scanned = filter.upstream_sent(&mut held, len);
            assert!(scanned.len - scanned.ready < HOLD_MAX);
            out.extend_from_slice(&held[..scanned.ready]);
            held = held[scanned.ready..scanned.len].to_vec();
        }
        out.extend_from_slice(&held);
        out
    }

    fn filtered(chunks: &[&[u8]]) -> Vec<u8> {
        downstream(&mut CapabilityFilter::default(), chunks)
    }

    fn show(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn capability_answers_are_filtered_and_literals_pass_unread() {
        let (sent, expected) = session();
        assert_eq!(show(&filtered(&[&sent])), show(&expected));
    }

    #[test]
    fn a_session_split_at_any_byte_comes_out_the_same() {
        let (sent, expected) = session();
        for i in 0..=sent.len() {
            let got = filtered(&[&sent[..i], &sent[i..]]);
            assert!(got == expected, "split at {i}: {}", show(&got));
        }
        let bytes: Vec<&[u8]> = sent.chunks(1).collect();
        assert!(filtered(&bytes) == expected, "byte by byte");
    }

    #[test]
    fn a_session_split_twice_anywhere_comes_out_the_same() {
        let (sent, expected) = session();
        for i in 0..=sent.len() {
            for j in i..=sent.len() {
                let got = filtered(&[&sent[..i], &sent[i..j], &sent[j..]]);
                assert!(got == expected, "split at {i} and {j}: {}", show(&got));
            }
        }
    }

    #[test]
    fn a_response_line_too_long_to_hold_passes_unchanged() {
        let mut line = b"a1 OK [CAPABILITY AUTH=PLAIN] ".to_vec();
        line.resize(2 * HOLD_MAX, b'x');
        // Ends like a literal's announcement; a status line has none.
        line.extend_from_slice(b"{300000}\r\n* CAPABILITY AUTH=PLAIN IDLE\r\n");
        let chunks: Vec<&[u8]> = line.chunks(1000).collect();
        let mut filter = CapabilityFilter::default();
        let got = downstream(&mut filter, &chunks);
        let end = 2 * HOLD_MAX + 10;
        assert!(got[..end] == line[..end], "{}", show(&got[..200]));
        assert_eq!(show(&got[end..]), "* CAPABILITY IDLE\r\n");
        assert_eq!(filter.upstream_owes(), 0);
    }

    #[test]
    fn only_a_literal_makes_the_upstream_owe_bytes() {
        let mut filter = CapabilityFilter::default();
        downstream(&mut filter, &[b"a1 NO no such mailbox: x{300000}\r\n"]);
        assert_eq!(filter.upstream_owes(), 0, "a status line's text");
        downstream(&mut filter, &[b"+ go on {300000}\r\n"]);
        assert_eq!(filter.upstream_owes(), 0, "a continuation request");
        downstream(&mut filter, &[b"* 1 FETCH (BODY[] {300000}\r\nabc"]);
        assert_eq!(filter.upstream_owes(), 300_000 - 3, "a literal");
    }

    #[test]
    fn the_end_of_the_stream_goes_out_as_it_came() {
        for tail in [&b"*"[..], b"* CAPAB", b"a1 OK [CAPABILITY AUTH=PLAIN"] {
            assert!(filtered(&[tail]) == tail);
        }
    }

    /// The client's bytes, then the upstream's, through one filter.
    fn exchange(filter: &mut CapabilityFilter, client: &[&[u8]], upstream: &[u8]) -> Vec<u8> {
        for chunk in client {
            filter.client_sent(chunk);
        }
        downstream(filter, &[upstream])
    }

    #[test]
    fn after_compress_nothing_is_read() {
        let deflated = b"\x00\x01\n* CAPABILITY AUTH=PLAIN\r\nz9 OK [CAPABILITY SASL-IR]\r\n\xff";
        let answer = [
            &b"c1 OK [CAPABILITY IDLE SASL-IR] DEFLATE active\r\n"[..],
            deflated,
        ]
        .concat();
        let command = b"c1 COMPRESS DEFLATE\r\n";
        for i in 0..=command.len() {
            let mut filter = CapabilityFilter::default();
            let got = exchange(&mut filter, &[&command[..i], &command[i..]], &answer);
            let expected = [&b"c1 OK [CAPABILITY IDLE] DEFLATE active\r\n"[..], deflated].concat();
            assert!(got == expected, "split at {i}: {}", show(&got));
            assert!(
                filter.upstream_sent(&mut deflated.to_vec(), deflated.len())
                    == Scanned::all(deflated.len())
            );
        }
    }

    #[test]
    fn a_refused_compress_leaves_the_scan_on() {
        let mut filter = CapabilityFilter::default();
        let got = exchange(
            &mut filter,
            &[b"c1 COMPRESS DEFLATE\r\n"],
            b"c1 NO Compression failed\r\n* CAPABILITY AUTH=PLAIN IDLE\r\n",
        );
        assert_eq!(
            show(&got),
            "c1 NO Compression failed\r\n* CAPABILITY IDLE\r\n"
        );
    }

    #[test]
    fn compress_inside_a_literal_is_not_a_command() {
        let mut filter = CapabilityFilter::default();
        let append = b"a1 APPEND INBOX {21}\r\nc1 COMPRESS DEFLATE\r\n\r\n";
        let got = exchange(
            &mut filter,
            &append.chunks(3).collect::<Vec<_>>(),
            b"c1 OK [CAPABILITY AUTH=PLAIN IDLE] x\r\n* CAPABILITY AUTH=PLAIN IDLE\r\n",
        );
        assert_eq!(
            show(&got),
            "c1 OK [CAPABILITY IDLE] x\r\n* CAPABILITY IDLE\r\n"
        );
    }

    #[test]
    fn responses_are_judged_by_their_first_bytes() {
        for (head, expected) in [
            (&b""[..], Start::TooFew),
            (b"*", Start::TooFew),
            (b"* ", Start::TooFew),
            (b"* CAPABILIT", Start::TooFew),
            (b"* CAPABILITY ", Start::Held),
            (b"* ok ", Start::Held),
            (b"* BYE", Start::TooFew),
            (b"* BYE\r", Start::Held),
            (b"* 12 FETCH", Start::Passing),
            (b"* LIST ", Start::Passing),
            (b"* CAPABILITYX", Start::Passing),
            (b"+ go", Start::Text),
            (b"a1", Start::Held),
        ] {
            assert_eq!(judge_start(head), expected, "{}", show(head));
        }
    }
}
