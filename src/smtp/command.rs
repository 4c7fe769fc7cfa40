//! Client commands (RFC 5321 §4.1), parsed with nom as far as the proxy needs:
//! MAIL and RCPT are recognised but forwarded as the client wrote them, so
//! their parameters (SIZE, BODY, SMTPUTF8, DSN…) pass through untouched.

use nom::bytes::complete::{tag_no_case, take_while1};
use nom::character::complete::{char, space0, space1};
use nom::combinator::{map, opt, rest};
use nom::sequence::preceded;
use nom::{IResult, Parser};

#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo,
    Helo,
    Auth {
        mechanism: String,
        /// The initial response, still base64 (`=` for empty).
        initial_response: Option<Vec<u8>>,
    },
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    Unknown,
}

// Hand-written so that an initial response never reaches a Debug print.
impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Auth { mechanism, .. } => write!(f, "Auth({mechanism})"),
            Command::Ehlo => f.write_str("Ehlo"),
            Command::Helo => f.write_str("Helo"),
            Command::Mail => f.write_str("Mail"),
            Command::Rcpt => f.write_str("Rcpt"),
            Command::Data => f.write_str("Data"),
            Command::Bdat => f.write_str("Bdat"),
            Command::Rset => f.write_str("Rset"),
            Command::Noop => f.write_str("Noop"),
            Command::Quit => f.write_str("Quit"),
            Command::Vrfy => f.write_str("Vrfy"),
            Command::Help => f.write_str("Help"),
            Command::StartTls => f.write_str("StartTls"),
            Command::Unknown => f.write_str("Unknown"),
        }
    }
}

type Res<'a, T> = IResult<&'a [u8], T>;

fn word(i: &[u8]) -> Res<'_, &[u8]> {
    take_while1(|b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_').parse(i)
}

/// `"AUTH" SP sasl-mech [SP initial-response]` (RFC 4954 §4)
fn auth(i: &[u8]) -> Res<'_, Command> {
    map(
        (
            preceded(space1, word),
            opt(preceded(
                space1,
                take_while1(|b: u8| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
            )),
            space0,
        ),
        |(mechanism, ir, _)| Command::Auth {
            mechanism: String::from_utf8_lossy(mechanism).to_ascii_uppercase(),
            initial_response: ir.map(<[u8]>::to_vec),
        },
    )
    .parse(i)
}

/// A command without arguments, allowing trailing blanks.
fn bare(command: Command) -> impl Fn(&[u8]) -> Res<'_, Command> {
    move |i| {
        let (i, _) = space0(i)?;
        if i.is_empty() {
            Ok((i, command.clone()))
        } else {
            Err(nom::Err::Error(nom::error::Error::new(
                i,
                nom::error::ErrorKind::Eof,
            )))
        }
    }
}

/// Parses one command line (without its CRLF). `None`: a syntax error in a
/// known command.
pub fn parse(line: &[u8]) -> Option<Command> {
    let (args, verb) = word(line).ok()?;
    let verb = verb.to_ascii_uppercase();
    let parsed: Res<'_, Command> = match verb.as_slice() {
        b"EHLO" => map(preceded(space1, rest), |_| Command::Ehlo).parse(args),
        b"HELO" => map(preceded(space1, rest), |_| Command::Helo).parse(args),
        b"AUTH" => auth(args),
        b"MAIL" => map(
            preceded((space1, tag_no_case("FROM"), space0, char(':')), rest),
            |_| Command::Mail,
        )
        .parse(args),
        b"RCPT" => map(
            preceded((space1, tag_no_case("TO"), space0, char(':')), rest),
            |_| Command::Rcpt,
        )
        .parse(args),
        b"DATA" => bare(Command::Data)(args),
        b"RSET" => bare(Command::Rset)(args),
        b"QUIT" => bare(Command::Quit)(args),
        b"STARTTLS" => bare(Command::StartTls)(args),
        b"NOOP" => Ok((&[][..], Command::Noop)),
        b"BDAT" => Ok((&[][..], Command::Bdat)),
        b"VRFY" => Ok((&[][..], Command::Vrfy)),
        b"HELP" => Ok((&[][..], Command::Help)),
        _ => Ok((&[][..], Command::Unknown)),
    };
    parsed.ok().map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodemailer_commands() {
        assert_eq!(parse(b"EHLO [127.0.0.1]"), Some(Command::Ehlo));
        assert_eq!(
            parse(b"AUTH PLAIN AHVAeC5jb20AcHc="),
            Some(Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some(b"AHVAeC5jb20AcHc=".to_vec())
            })
        );
        assert_eq!(
            parse(b"auth login"),
            Some(Command::Auth {
                mechanism: "LOGIN".into(),
                initial_response: None
            })
        );
        assert_eq!(
            parse(b"MAIL FROM:<a@b.c> SIZE=100 BODY=8BITMIME"),
            Some(Command::Mail)
        );
        assert_eq!(parse(b"mail from: <a@b.c>"), Some(Command::Mail));
        assert_eq!(parse(b"RCPT TO:<x@y.z>"), Some(Command::Rcpt));
        assert_eq!(parse(b"DATA"), Some(Command::Data));
        assert_eq!(parse(b"RSET"), Some(Command::Rset));
        assert_eq!(parse(b"QUIT"), Some(Command::Quit));
        assert_eq!(parse(b"NOOP"), Some(Command::Noop));
        assert_eq!(parse(b"XYZZY"), Some(Command::Unknown));
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(parse(b"EHLO"), None);
        assert_eq!(parse(b"MAIL TO:<a@b.c>"), None);
        assert_eq!(parse(b"DATA now"), None);
        assert_eq!(parse(b"AUTH"), None);
        assert_eq!(parse(b""), None);
    }
}
