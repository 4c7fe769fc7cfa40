//! Property tests of the pre-login framing: a valid stream of commands,
//! delivered in any chunks (one chunk per read), frames and parses into
//! exactly the commands it was made of, the same as when it arrives whole.
//! The readers run as the sessions run them, through `xoauth2_proxy::fuzzing`
//! (which the fuzz targets in fuzz/ use too).

use proptest::prelude::*;
use proptest::sample::Index;
use xoauth2_proxy::fuzzing::{
    self, Chunked, IdParams, ImapCommand, ImapRequest, LinesEnd, SmtpCommand,
};

const CONTINUATION: &[u8] = b"+ Ready for literal data\r\n";

/// Cut positions anywhere in a stream of `len` bytes.
fn cut_at(cuts: &[Index], len: usize) -> Vec<usize> {
    cuts.iter().map(|c| c.index(len + 1)).collect()
}

fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..16)
}

/// A command name in the case the client chose.
fn in_case(name: &str, upper: bool) -> String {
    if upper {
        name.to_string()
    } else {
        name.to_ascii_lowercase()
    }
}

/// An IMAP command as sent, what it must parse to, and how many
/// synchronising literals it carries.
#[derive(Debug)]
struct Sent {
    wire: Vec<u8>,
    expected: ImapRequest,
    synchronising: usize,
}

/// An `astring` on the wire: the value it stands for, its encoding, and
/// whether it is a synchronising literal.
fn astring() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, bool)> {
    let atom =
        "[A-Za-z0-9@._+\\-\\]]{1,24}".prop_map(|a| (a.clone().into_bytes(), a.into_bytes(), false));
    let quoted = prop::collection::vec(1u8..=255, 0..24)
        .prop_filter("no line end in a quoted string", |v| {
            !v.contains(&b'\r') && !v.contains(&b'\n')
        })
        .prop_map(|value| {
            let mut wire = vec![b'"'];
            for &b in &value {
                if b == b'"' || b == b'\\' {
                    wire.push(b'\\');
                }
                wire.push(b);
            }
            wire.push(b'"');
            (value, wire, false)
        });
    let literal =
        (prop::collection::vec(any::<u8>(), 0..40), any::<bool>()).prop_map(|(value, sync)| {
            let plus = if sync { "" } else { "+" };
            let mut wire = format!("{{{}{plus}}}\r\n", value.len()).into_bytes();
            wire.extend_from_slice(&value);
            (value, wire, sync)
        });
    prop_oneof![atom, quoted, literal]
}

fn tag() -> impl Strategy<Value = String> {
    "[A-Za-z0-9.]{1,8}"
}

fn simple_command() -> impl Strategy<Value = (Vec<u8>, ImapCommand, usize)> {
    (
        prop::sample::select(vec!["CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "ID"]),
        any::<bool>(),
    )
        .prop_map(|(name, upper)| {
            let (args, command) = match name {
                "CAPABILITY" => ("", ImapCommand::Capability),
                "NOOP" => ("", ImapCommand::Noop),
                "LOGOUT" => ("", ImapCommand::Logout),
                "STARTTLS" => ("", ImapCommand::StartTls),
                _ => (
                    " (\"name\" \"imapflow\")",
                    ImapCommand::Id(IdParams {
                        pairs: 1,
                        longest_field: 4,
                        longest_value: 8,
                    }),
                ),
            };
            (
                format!("{}{args}", in_case(name, upper)).into_bytes(),
                command,
                0,
            )
        })
}

fn login() -> impl Strategy<Value = (Vec<u8>, ImapCommand, usize)> {
    (any::<bool>(), astring(), astring()).prop_map(
        |(upper, (user, user_wire, s1), (pass, pass_wire, s2))| {
            let mut wire = in_case("LOGIN ", upper).into_bytes();
            wire.extend_from_slice(&user_wire);
            wire.push(b' ');
            wire.extend_from_slice(&pass_wire);
            let command = ImapCommand::Login {
                username: user,
                password: pass,
            };
            (wire, command, usize::from(s1) + usize::from(s2))
        },
    )
}

fn authenticate() -> impl Strategy<Value = (Vec<u8>, ImapCommand, usize)> {
    let response = prop_oneof!["[A-Za-z0-9+/]{4,40}={0,2}", Just("=".to_string())];
    ("[A-Za-z][A-Za-z0-9-]{0,12}", prop::option::of(response)).prop_map(|(mechanism, response)| {
        let mut wire = format!("AUTHENTICATE {mechanism}");
        if let Some(r) = &response {
            wire.push(' ');
            wire.push_str(r);
        }
        let command = ImapCommand::Authenticate {
            mechanism: mechanism.to_ascii_uppercase(),
            initial_response: response.map(String::into_bytes),
        };
        (wire.into_bytes(), command, 0)
    })
}

/// A command the proxy does not serve before login, some with a literal
/// (an APPEND's message) that the framer must read whole all the same.
fn other() -> impl Strategy<Value = (Vec<u8>, ImapCommand, usize)> {
    (
        prop::sample::select(vec!["SELECT", "LIST", "APPEND", "ENABLE", "XYZZY"]),
        prop::option::of((prop::collection::vec(any::<u8>(), 0..60), any::<bool>())),
    )
        .prop_map(|(name, literal)| {
            let mut wire = format!("{name} INBOX").into_bytes();
            let mut synchronising = 0;
            if let Some((message, sync)) = literal {
                let plus = if sync { "" } else { "+" };
                wire.extend_from_slice(format!(" {{{}{plus}}}\r\n", message.len()).as_bytes());
                wire.extend_from_slice(&message);
                synchronising = usize::from(sync);
            }
            (wire, ImapCommand::Other(name.to_string()), synchronising)
        })
}

fn imap_command() -> impl Strategy<Value = Sent> {
    let command = prop_oneof![simple_command(), login(), authenticate(), other()];
    (tag(), command, any::<bool>()).prop_map(|(tag, (body, command, synchronising), crlf)| {
        let mut wire = format!("{tag} ").into_bytes();
        wire.extend_from_slice(&body);
        wire.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        Sent {
            wire,
            expected: ImapRequest { tag, command },
            synchronising,
        }
    })
}

/// An SMTP command line as a client sends it, and what it must parse to.
fn smtp_line() -> impl Strategy<Value = (Vec<u8>, SmtpCommand)> {
    let auth = (
        "[A-Za-z][A-Za-z0-9-]{0,12}",
        prop::option::of("[A-Za-z0-9+/]{4,40}={0,2}"),
    )
        .prop_map(|(mechanism, response)| {
            let line = match &response {
                Some(r) => format!("AUTH {mechanism} {r}"),
                None => format!("AUTH {mechanism}"),
            };
            let command = SmtpCommand::Auth {
                mechanism: mechanism.to_ascii_uppercase(),
                initial_response: response.map(String::into_bytes),
            };
            (line, command)
        });
    let fixed = prop::sample::select(vec![
        ("EHLO [127.0.0.1]", SmtpCommand::Ehlo),
        ("helo client.example", SmtpCommand::Helo),
        (
            "MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME",
            SmtpCommand::Mail,
        ),
        ("mail from: <a@b.example>", SmtpCommand::Mail),
        ("RCPT TO:<x@y.example>", SmtpCommand::Rcpt),
        ("DATA", SmtpCommand::Data),
        ("RSET  ", SmtpCommand::Rset),
        ("quit", SmtpCommand::Quit),
        ("NOOP hello", SmtpCommand::Noop),
        ("VRFY someone", SmtpCommand::Vrfy),
        ("HELP", SmtpCommand::Help),
        ("STARTTLS", SmtpCommand::StartTls),
        ("BDAT 100 LAST", SmtpCommand::Bdat),
        ("XYZZY", SmtpCommand::Unknown),
    ])
    .prop_map(|(line, command)| (line.to_string(), command));
    (prop_oneof![auth, fixed], any::<bool>()).prop_map(|((line, command), crlf)| {
        let mut wire = line.into_bytes();
        wire.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        (wire, command)
    })
}

/// Bytes with many line ends among them.
fn bytes_with_lines() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), any::<u8>()], 0..300)
}

proptest! {
    #[test]
    fn imap_commands_frame_and_parse_the_same_however_they_arrive(
        sent in prop::collection::vec(imap_command(), 1..6),
        cuts in cuts(),
    ) {
        let stream: Vec<u8> = sent.iter().flat_map(|s| s.wire.clone()).collect();
        let whole = fuzzing::imap_frames(&stream[..]);
        let split = fuzzing::imap_frames(Chunked::new(&stream, cut_at(&cuts, stream.len())));
        let frames: Vec<Vec<u8>> = sent.iter().map(|s| s.wire.clone()).collect();
        prop_assert_eq!(&split.frames, &frames);
        prop_assert_eq!(&whole.frames, &frames);
        let synchronising: usize = sent.iter().map(|s| s.synchronising).sum();
        prop_assert_eq!(split.written, CONTINUATION.repeat(synchronising));
        prop_assert_eq!(whole.written, CONTINUATION.repeat(synchronising));
        let parsed: Vec<Option<ImapRequest>> =
            split.frames.iter().map(|f| fuzzing::imap_request(f)).collect();
        let expected: Vec<Option<ImapRequest>> =
            sent.into_iter().map(|s| Some(s.expected)).collect();
        prop_assert_eq!(parsed, expected);
    }

    #[test]
    fn any_imap_bytes_frame_the_same_however_they_arrive(
        bytes in bytes_with_lines(),
        cuts in cuts(),
    ) {
        let whole = fuzzing::imap_frames(&bytes[..]);
        let split = fuzzing::imap_frames(Chunked::new(&bytes, cut_at(&cuts, bytes.len())));
        prop_assert_eq!(split.frames, whole.frames);
        prop_assert_eq!(split.written, whole.written);
    }

    #[test]
    fn smtp_command_lines_parse_the_same_however_they_arrive(
        sent in prop::collection::vec(smtp_line(), 1..10),
        cuts in cuts(),
    ) {
        let stream: Vec<u8> = sent.iter().flat_map(|(wire, _)| wire.clone()).collect();
        let whole = fuzzing::smtp_lines(&stream[..]);
        let split = fuzzing::smtp_lines(Chunked::new(&stream, cut_at(&cuts, stream.len())));
        let lines: Vec<Vec<u8>> = sent.iter().map(|(wire, _)| wire.clone()).collect();
        prop_assert_eq!(&split, &(lines.clone(), LinesEnd::Closed));
        prop_assert_eq!(&whole, &split);
        let parsed: Vec<Option<SmtpCommand>> =
            lines.iter().map(|l| fuzzing::smtp_command(l)).collect();
        let expected: Vec<Option<SmtpCommand>> =
            sent.into_iter().map(|(_, command)| Some(command)).collect();
        prop_assert_eq!(parsed, expected);
    }

    #[test]
    fn lines_read_the_same_however_they_arrive(
        bytes in bytes_with_lines(),
        max in 1usize..64,
        cuts in cuts(),
    ) {
        let whole = fuzzing::lines(&bytes[..], max);
        let split = fuzzing::lines(Chunked::new(&bytes, cut_at(&cuts, bytes.len())), max);
        prop_assert_eq!(&split, &whole);
        let (lines, end) = whole;
        prop_assert!(lines.iter().all(|l| l.len() <= max && l.ends_with(b"\n")));
        let read = lines.concat();
        prop_assert!(bytes.starts_with(&read));
        let rest = &bytes[read.len()..];
        let next_line = rest.iter().position(|b| *b == b'\n').map_or(rest.len(), |i| i + 1);
        let expected_end = if next_line > max { LinesEnd::TooLong } else { LinesEnd::Closed };
        prop_assert_eq!(end, expected_end, "stopped for the wrong reason");
    }
}
