//! Entry points for the fuzz targets (`fuzz/`) and the framing property tests
//! (`tests/framing_properties.rs`); not part of the proxy's interface.
//!
//! Each reader runs here exactly as a session runs it, but over an in-memory
//! stream, on one current-thread runtime built once per process (a fuzzer
//! calls a target millions of times). The `fuzz_*` functions take the
//! fuzzer's bytes, must never panic on any input, and assert the invariants
//! each reader promises: a panic here is a bug found. The functions are thin
//! on purpose: they call the readers and parsers the sessions call, so a
//! change there is fuzzed without a change here.

use std::collections::VecDeque;
use std::hint::black_box;
use std::path::Path;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, BufReader, ReadBuf};

use crate::config::Config;
use crate::graph::headers::{named_recipients, with_bcc};
use crate::imap::framing::{MAX_COMMAND, read_command};
use crate::imap::parser;
use crate::lines::{self, LineError};
use crate::sasl::{self, Challenge, Mechanism, SaslError};
use crate::secret::Secret;
use crate::smtp::graph::path_argument;
use crate::smtp::session::{EndOfData, MAX_LINE};
use crate::smtp::upstream::{Reply, read_reply};

pub use crate::imap::parser::{Command as ImapCommand, IdParams, Request as ImapRequest};
pub use crate::smtp::command::Command as SmtpCommand;

/// What one IMAP continuation request looks like on the wire.
const CONTINUATION: &[u8] = b"+ Ready for literal data\r\n";

fn block_on<F: Future>(future: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime")
        })
        .block_on(future)
}

/// Bytes handed over one chunk per read, as a network may deliver them: a
/// reader must give the same result however its input is cut.
pub struct Chunked {
    chunks: VecDeque<Vec<u8>>,
}

impl Chunked {
    /// `bytes` cut at each of `cuts` (positions past the end count as the end).
    pub fn new(bytes: &[u8], cuts: impl IntoIterator<Item = usize>) -> Self {
        let mut at: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
        at.extend([0, bytes.len()]);
        at.sort_unstable();
        at.dedup();
        let chunks = at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect();
        Chunked { chunks }
    }
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(chunk) = self.chunks.front_mut() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.chunks.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Two cuts in `data` that the fuzzer steers through its first byte.
fn cuts(data: &[u8]) -> [usize; 2] {
    let first = data.first().copied().map_or(0, usize::from);
    [first * data.len() / 256, data.len() / 2]
}

/// What the IMAP pre-login framer made of a client's bytes.
pub struct ImapFrames {
    /// Each whole command, literals included, as `read_command` returned it.
    pub frames: Vec<Vec<u8>>,
    /// What the framer wrote back (continuation requests).
    pub written: Vec<u8>,
}

/// Frames commands from `client` with the session's `read_command` until it
/// fails or the client's bytes end.
pub fn imap_frames<R: AsyncRead + Unpin>(client: R) -> ImapFrames {
    block_on(async {
        let mut stream = BufReader::new(tokio::io::join(client, Vec::new()));
        let mut frames = Vec::new();
        let mut buf = Vec::new();
        while read_command(&mut stream, &mut buf).await.is_ok() {
            frames.push(std::mem::take(&mut buf));
        }
        let written = stream.into_inner().into_inner().1;
        ImapFrames { frames, written }
    })
}

/// `frame` parsed as the session parses it; `None` for a syntax error.
pub fn imap_request(frame: &[u8]) -> Option<ImapRequest> {
    parser::command(frame).ok().map(|(_, request)| request)
}

/// How a line reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinesEnd {
    TooLong,
    Closed,
    Failed,
}

/// Reads lines of at most `max` bytes from `input` with [`lines::read_line`]
/// until it fails: the lines, their line ends included, and why it stopped.
pub fn lines<R: AsyncRead + Unpin>(input: R, max: usize) -> (Vec<Vec<u8>>, LinesEnd) {
    block_on(async {
        let mut reader = BufReader::new(input);
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            match lines::read_line(&mut reader, &mut line, max).await {
                Ok(()) => lines.push(line),
                Err(LineError::TooLong) => return (lines, LinesEnd::TooLong),
                Err(LineError::Closed) => return (lines, LinesEnd::Closed),
                Err(LineError::Io(_)) => return (lines, LinesEnd::Failed),
            }
        }
    })
}

/// Reads SMTP command lines from `client` as the session does (bounded by
/// its line limit) until the bytes end or a line is too long.
pub fn smtp_lines<R: AsyncRead + Unpin>(client: R) -> (Vec<Vec<u8>>, LinesEnd) {
    lines(client, MAX_LINE)
}

/// One SMTP command line (CRLF included or not) parsed as the session
/// parses it; `None` for a syntax error.
pub fn smtp_command(line: &[u8]) -> Option<SmtpCommand> {
    crate::smtp::command::parse(lines::trim_eol(line))
}

/// Fuzz target: the IMAP pre-login framer and parser over any client bytes.
/// Frames stay within [`MAX_COMMAND`] and are exactly the bytes read, in
/// order, however the bytes arrive; only continuation requests are written;
/// a parsed command, written out again, frames and parses the same.
pub fn fuzz_imap_command(data: &[u8]) {
    let ImapFrames { frames, written } = imap_frames(data);
    let split = imap_frames(Chunked::new(data, cuts(data)));
    assert_eq!(split.frames, frames, "framed differently when split");
    assert_eq!(split.written, written, "answered differently when split");
    assert!(
        frames.iter().all(|f| f.len() <= MAX_COMMAND),
        "over the bound"
    );
    assert!(
        data.starts_with(&frames.concat()),
        "frames are not the input"
    );
    assert!(
        written
            .chunks(CONTINUATION.len())
            .all(|c| c == CONTINUATION),
        "the framer wrote something other than continuations"
    );
    for frame in &frames {
        match imap_request(frame) {
            Some(request) => reframe_parses_the_same(&request),
            None => {
                black_box(parser::leading_tag(frame));
            }
        }
    }
}

/// Writes `request` out again (a LOGIN with a synchronising and a
/// non-synchronising literal), frames it and parses it: the same request.
fn reframe_parses_the_same(request: &ImapRequest) {
    let wire = imap_wire(request);
    if wire.len() > MAX_COMMAND {
        return;
    }
    let again = imap_frames(&wire[..]);
    assert_eq!(
        again.frames,
        std::slice::from_ref(&wire),
        "re-framed differently"
    );
    assert_eq!(
        imap_request(&wire).as_ref(),
        Some(request),
        "re-parsed differently"
    );
}

/// `request` as a client may send it.
fn imap_wire(request: &ImapRequest) -> Vec<u8> {
    let mut wire = format!("{} ", request.tag).into_bytes();
    match &request.command {
        ImapCommand::Capability => wire.extend_from_slice(b"CAPABILITY"),
        ImapCommand::Noop => wire.extend_from_slice(b"NOOP"),
        ImapCommand::Logout => wire.extend_from_slice(b"LOGOUT"),
        ImapCommand::StartTls => wire.extend_from_slice(b"STARTTLS"),
        ImapCommand::Id(params) => wire.extend_from_slice(&imap_id_wire(params)),
        ImapCommand::Login { username, password } => {
            wire.extend_from_slice(format!("LOGIN {{{}}}\r\n", username.len()).as_bytes());
            wire.extend_from_slice(username);
            wire.extend_from_slice(format!(" {{{}+}}\r\n", password.len()).as_bytes());
            wire.extend_from_slice(password);
        }
        ImapCommand::Authenticate {
            mechanism,
            initial_response,
        } => {
            wire.extend_from_slice(format!("AUTHENTICATE {mechanism}").as_bytes());
            if let Some(response) = initial_response {
                wire.push(b' ');
                wire.extend_from_slice(response);
            }
        }
        ImapCommand::Other(name) => wire.extend_from_slice(name.as_bytes()),
    }
    wire.extend_from_slice(b"\r\n");
    wire
}

/// An `ID` with the sizes of `params`: the first pair holds the longest
/// field and value, the others are empty strings.
fn imap_id_wire(params: &IdParams) -> Vec<u8> {
    if params.pairs == 0 {
        return b"ID NIL".to_vec();
    }
    let pairs: Vec<String> = (0..params.pairs)
        .map(|pair| {
            let (field, value) = match pair {
                0 => (params.longest_field, params.longest_value),
                _ => (0, 0),
            };
            format!("\"{}\" \"{}\"", "f".repeat(field), "v".repeat(value))
        })
        .collect();
    format!("ID ({})", pairs.join(" ")).into_bytes()
}

/// Fuzz target: the SMTP session's line reader and command parser over any
/// client bytes, and the end-of-DATA scanner over any split of them. Lines
/// stay within the limit and are exactly the bytes read, however they
/// arrive; an AUTH command, written out again, parses the same.
pub fn fuzz_smtp_command(data: &[u8]) {
    let (lines, end) = smtp_lines(data);
    assert_eq!(
        smtp_lines(Chunked::new(data, cuts(data))),
        (lines.clone(), end)
    );
    assert!(lines.iter().all(|l| l.len() <= MAX_LINE), "over the bound");
    assert!(data.starts_with(&lines.concat()), "lines are not the input");
    for line in &lines {
        if let Some(auth @ SmtpCommand::Auth { .. }) = smtp_command(line) {
            assert_eq!(smtp_command(&smtp_auth_wire(&auth)), Some(auth));
        }
    }
    end_of_data_ignores_the_split(data);
}

fn smtp_auth_wire(auth: &SmtpCommand) -> Vec<u8> {
    let SmtpCommand::Auth {
        mechanism,
        initial_response,
    } = auth
    else {
        unreachable!("only AUTH is written out again")
    };
    let mut wire = format!("AUTH {mechanism}").into_bytes();
    if let Some(response) = initial_response {
        wire.push(b' ');
        wire.extend_from_slice(response);
    }
    wire
}

/// The end of DATA content found across two chunks (split where the first
/// byte says) is where a plain search of the whole finds it.
fn end_of_data_ignores_the_split(data: &[u8]) {
    let Some((&cut, content)) = data.split_first() else {
        return;
    };
    let expected =
        memchr::memmem::find(&[b"\r\n", content].concat(), b"\r\n.\r\n").map(|p| p + 5 - 2);
    let (head, tail) = content.split_at(usize::from(cut).min(content.len()));
    let mut end = EndOfData::default();
    let found = match end.scan(head) {
        (n, true) => Some(n),
        (n, false) if !tail.is_empty() => match end.scan(tail) {
            (m, true) => Some(n + m),
            _ => None,
        },
        _ => None,
    };
    assert_eq!(found, expected, "the end of DATA depends on the split");
}

/// A SASL client that answers the challenges with the lines of a script and
/// hangs up when it runs out.
struct Scripted<'a> {
    responses: std::slice::Split<'a, u8, fn(&u8) -> bool>,
    challenges: usize,
}

impl Challenge for Scripted<'_> {
    async fn challenge(&mut self, _prompt: &str) -> Result<Vec<u8>, SaslError> {
        self.challenges += 1;
        let line = self.responses.next().ok_or(SaslError::Closed)?;
        Ok(lines::trim_eol(line).to_vec())
    }
}

/// Fuzz target: the SASL decoders (PLAIN, LOGIN, with and without an
/// initial response) over any client lines, and the XOAUTH2 builder. No
/// mechanism asks more than twice; decoded credentials encode back to the
/// same; the XOAUTH2 string decodes to its parts.
pub fn fuzz_sasl(data: &[u8]) {
    if let Ok(decoded) = sasl::decode(data) {
        let encoded = base64_encode(&decoded);
        let again = sasl::decode(encoded.as_bytes()).ok();
        assert!(decoded.is_empty() || again.as_ref() == Some(&decoded));
    }
    if let Ok(credentials) = sasl::parse_plain(data) {
        plain_round_trip(&credentials);
    }
    black_box(Mechanism::named(&String::from_utf8_lossy(data)));
    for mechanism in [Mechanism::Plain, Mechanism::Login] {
        let (first, rest) = split_line(data);
        exchange(mechanism, None, data);
        exchange(mechanism, Some(first), rest);
    }
    xoauth2_round_trip(data);
}

fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b'\n', data) {
        Some(i) => (lines::trim_eol(&data[..=i]), &data[i + 1..]),
        None => (data, &[]),
    }
}

fn exchange(mechanism: Mechanism, initial: Option<&[u8]>, script: &[u8]) {
    let mut client = Scripted {
        responses: script.split((|b| *b == b'\n') as fn(&u8) -> bool),
        challenges: 0,
    };
    let result = block_on(sasl::credentials(
        &mut client,
        mechanism,
        initial.map(<[u8]>::to_vec),
    ));
    assert!(
        client.challenges <= 2,
        "{mechanism:?} asked {} times",
        client.challenges
    );
    if let (Ok(credentials), Mechanism::Plain) = (result, mechanism) {
        plain_round_trip(&credentials);
    }
}

/// Credentials from PLAIN, encoded again as the client would, decode the same.
fn plain_round_trip(credentials: &sasl::Credentials) {
    let mut message = vec![0];
    message.extend_from_slice(credentials.username.as_bytes());
    message.push(0);
    message.extend_from_slice(&credentials.password);
    let again = sasl::parse_plain(&message).expect("re-encoded PLAIN decodes");
    assert!(!credentials.username.contains('\0'));
    assert_eq!(again.username, credentials.username);
    assert!(again.password == credentials.password, "passwords differ");
}

fn xoauth2_round_trip(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (mailbox, token) = text.split_once('\n').unwrap_or((&text, ""));
    let built = sasl::xoauth2(mailbox, &Secret::new(token.to_string()));
    let raw = sasl::decode(built.expose().as_bytes()).expect("XOAUTH2 is base64");
    let expected = format!("user={mailbox}\x01auth=Bearer {token}\x01\x01");
    assert!(
        raw == expected.as_bytes(),
        "XOAUTH2 string has the wrong shape"
    );
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Fuzz target: the upstream IMAP login dialogue (greeting, capabilities,
/// AUTHENTICATE XOAUTH2 with its challenges, the NAMESPACE check) against any
/// server bytes. The XOAUTH2 response goes out at most once; the
/// capabilities a client will see carry no authentication mechanism.
pub fn fuzz_imap_upstream(data: &[u8]) {
    let token = Secret::new("fuzz-token".into());
    let sasl = sasl::xoauth2("mailbox@example.com", &token);
    let (result, written) = block_on(async {
        let mut stream = BufReader::new(tokio::io::join(data, Vec::new()));
        let result =
            crate::imap::upstream::greet_and_log_in(&mut stream, "mailbox@example.com", &token)
                .await;
        (result, stream.into_inner().into_inner().1)
    });
    let sent = memchr::memmem::find_iter(&written, sasl.expose().as_bytes()).count();
    assert!(sent <= 1, "the XOAUTH2 response went out {sent} times");
    if let Ok(capabilities) = result {
        let upper = capabilities.to_ascii_uppercase();
        assert!(!upper.split(' ').any(|c| c.starts_with("AUTH=")));
    }
}

/// Fuzz target: the upstream SMTP reply reader over any server bytes, reply
/// after reply. Each reply is exactly the bytes read, has a code from 200 to
/// 599, and its text, EHLO keywords and enhanced code read without panic.
pub fn fuzz_smtp_upstream(data: &[u8]) {
    let mut rest = data;
    loop {
        let before = rest;
        let Ok(reply) = block_on(read_reply(&mut rest)) else {
            return;
        };
        assert!(before.starts_with(&reply.raw), "the reply is not the input");
        assert_eq!(before.len() - rest.len(), reply.raw.len());
        assert!((200..600).contains(&reply.code));
        look_at(&reply);
    }
}

fn look_at(reply: &Reply) {
    let text = reply.text();
    black_box(crate::smtp::upstream::enhanced_code(&text));
    black_box(reply.ehlo_keywords());
    black_box(reply.is_positive());
}

/// Fuzz target: `Config::parse` on any text: an error or a config, never a
/// panic. A config's accounts all find their provider. Inputs naming
/// `client_secret_file` are skipped: the fuzzer must not read this machine's
/// files (a device such as `/dev/zero` never ends); unit tests cover that key.
pub fn fuzz_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains("client_secret_file") {
        return;
    }
    if let Ok(config) = Config::parse(Path::new("/fuzz/config.toml"), text) {
        for account in &config.accounts {
            black_box(config.provider(&account.provider));
        }
    }
}

/// The Graph path's reading of what an authenticated client sends: RCPT
/// paths (`smtp::graph::path_argument`) and the header section read to add
/// the `Bcc` field (`graph::headers`). `data` is RCPT lines, a NUL, then a
/// message. The message always comes out whole at the end, after nothing
/// but one `Bcc` field; an envelope address of plain characters is named
/// by the header that Graph reads (unless the message itself begins with a
/// folded line, which would continue the field).
pub fn fuzz_graph_message(data: &[u8]) {
    let (rcpts, message) = match memchr::memchr(0, data) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    let envelope: Vec<String> = rcpts
        .split(|b| *b == b'\n')
        .filter_map(|line| path_argument(line, "RCPT TO:"))
        .collect();
    let sent = with_bcc(message, &envelope);
    assert!(sent.ends_with(message), "the message was changed");
    let added = &sent[..sent.len() - message.len()];
    assert!(
        added.is_empty() || (added.starts_with(b"Bcc: ") && added.ends_with(b"\r\n")),
        "something else than a Bcc field was added"
    );
    if message.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return;
    }
    let named = named_recipients(&sent);
    for address in envelope.iter().filter(|a| plain_address(a)) {
        assert!(named.contains(&address.to_lowercase()), "{address} is lost");
    }
}

/// `local@domain` of letters, digits and `.-_+` alone.
fn plain_address(address: &str) -> bool {
    let plain = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_+".contains(&b))
    };
    address
        .split_once('@')
        .is_some_and(|(local, domain)| plain(local) && plain(domain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzz_seeds_keep_the_fuzz_targets_invariants() {
        for seed in [
            &include_bytes!("../fuzz/corpus/graph_message/bcc_and_groups")[..],
            &include_bytes!("../fuzz/corpus/graph_message/empty_header")[..],
            // Found by the fuzzer: a folded line after a line that is no
            // field continued the added Bcc field and hid its addresses.
            &include_bytes!("../fuzz/corpus/graph_message/regression_continuation_after_garbage")[..],
            // Found by the fuzzer: an RCPT address with an unbalanced quote
            // swallowed the Bcc field's later addresses; it is refused now.
            &include_bytes!("../fuzz/corpus/graph_message/regression_unbalanced_quote")[..],
            b"RCPT TO:<a@b.c>\n\0 folded\r\n\r\n",
            b"RCPT TO:<a@b.c>\n\0\nTo: x@y\r\n",
        ] {
            fuzz_graph_message(seed);
        }
    }
}
