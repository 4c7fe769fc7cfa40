//! The pre-authentication IMAP commands, parsed with nom (RFC 3501 §9 and
//! RFC 9051 §9 names for the rules).
//!
//! The input is one complete command as framed by [`super::framing`]: the
//! line, any literals inline with their `{n}` announcements, and the final
//! CRLF. Only what a client may send before login is understood; anything
//! else is reported as [`Command::Other`] so the session can answer it.
//!
//! ID (RFC 2971) is parsed for its sizes only: the proxy does not use the
//! client's fields, but the RFC limits them (§3.3), and the session refuses
//! an ID that breaks those limits.

use nom::branch::alt;
use nom::bytes::complete::{tag, tag_no_case, take, take_while, take_while1};
use nom::character::complete::{char, digit1};
use nom::combinator::{eof, map, map_res, opt};
use nom::multi::fold_many0;
use nom::sequence::{delimited, preceded, terminated};
use nom::{IResult, Parser};

type Res<'a, T> = IResult<&'a [u8], T>;

/// One tagged client command.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub tag: String,
    pub command: Command,
}

#[derive(PartialEq, Eq)]
pub enum Command {
    Capability,
    Noop,
    Logout,
    StartTls,
    /// RFC 2971; the client's parameters are not used, only measured.
    Id(IdParams),
    Login {
        username: Vec<u8>,
        password: Vec<u8>,
    },
    Authenticate {
        mechanism: String,
        /// SASL-IR (RFC 4959) initial response, still base64 (`=` for empty).
        initial_response: Option<Vec<u8>>,
    },
    /// Any other command name, upper-cased.
    Other(String),
}

// Hand-written so that passwords never reach a Debug print.
impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Login { .. } => f.write_str("Login { .. }"),
            Command::Authenticate { mechanism, .. } => write!(f, "Authenticate({mechanism})"),
            Command::Capability => f.write_str("Capability"),
            Command::Noop => f.write_str("Noop"),
            Command::Logout => f.write_str("Logout"),
            Command::StartTls => f.write_str("StartTls"),
            Command::Id(params) => write!(f, "Id({} pairs)", params.pairs),
            Command::Other(name) => write!(f, "Other({name})"),
        }
    }
}

/// RFC 2971 §3.3: at most 30 field-value pairs.
pub const ID_MAX_PAIRS: usize = 30;
/// RFC 2971 §3.3: a field is at most 30 octets.
pub const ID_MAX_FIELD: usize = 30;
/// RFC 2971 §3.3: a value is at most 1,024 octets.
pub const ID_MAX_VALUE: usize = 1024;

/// The sizes of an ID command's parameters: how many field-value pairs, and
/// the longest field and value (in octets, after unquoting).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IdParams {
    pub pairs: usize,
    pub longest_field: usize,
    pub longest_value: usize,
}

impl IdParams {
    /// The RFC 2971 limit these parameters break, as a sentence for the
    /// client; `None` when they keep them all.
    pub fn broken_limit(&self) -> Option<&'static str> {
        if self.pairs > ID_MAX_PAIRS {
            Some("ID takes at most 30 field-value pairs (RFC 2971)")
        } else if self.longest_field > ID_MAX_FIELD {
            Some("ID fields are at most 30 octets (RFC 2971)")
        } else if self.longest_value > ID_MAX_VALUE {
            Some("ID values are at most 1024 octets (RFC 2971)")
        } else {
            None
        }
    }

    fn add(mut self, (field, value): (usize, usize)) -> Self {
        self.pairs += 1;
        self.longest_field = self.longest_field.max(field);
        self.longest_value = self.longest_value.max(value);
        self
    }
}

/// `ATOM-CHAR`: any CHAR except atom-specials.
fn is_atom_char(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && !b"(){%*\"\\]".contains(&b)
}

/// `ASTRING-CHAR = ATOM-CHAR / resp-specials`
fn is_astring_char(b: u8) -> bool {
    is_atom_char(b) || b == b']'
}

/// `tag = 1*<any ASTRING-CHAR except "+">`
fn is_tag_char(b: u8) -> bool {
    is_astring_char(b) && b != b'+'
}

fn crlf(i: &[u8]) -> Res<'_, &[u8]> {
    alt((tag(&b"\r\n"[..]), tag(&b"\n"[..]))).parse(i)
}

fn sp(i: &[u8]) -> Res<'_, char> {
    char(' ').parse(i)
}

/// `tag`
pub fn tag_rule(i: &[u8]) -> Res<'_, &[u8]> {
    take_while1(is_tag_char).parse(i)
}

/// `atom = 1*ATOM-CHAR`
fn atom(i: &[u8]) -> Res<'_, &[u8]> {
    take_while1(is_atom_char).parse(i)
}

/// `quoted = DQUOTE *QUOTED-CHAR DQUOTE`, where `QUOTED-CHAR` is any TEXT-CHAR
/// but `"` and `\`, or `\` followed by one of them.
fn quoted(i: &[u8]) -> Res<'_, Vec<u8>> {
    let (mut i, _) = char('"').parse(i)?;
    let mut out = Vec::new();
    loop {
        match i.first() {
            Some(b'"') => return Ok((&i[1..], out)),
            Some(b'\\') => match i.get(1) {
                Some(&c @ (b'"' | b'\\')) => {
                    out.push(c);
                    i = &i[2..];
                }
                _ => return fail(i),
            },
            Some(b'\r' | b'\n' | 0) | None => return fail(i),
            Some(&c) => {
                out.push(c);
                i = &i[1..];
            }
        }
    }
}

/// `literal = "{" number64 ["+"] "}" CRLF *CHAR8` (LITERAL+ included).
fn literal(i: &[u8]) -> Res<'_, Vec<u8>> {
    let (i, n) = delimited(
        char('{'),
        terminated(
            map_res(digit1, |d: &[u8]| {
                std::str::from_utf8(d).unwrap_or("x").parse::<usize>()
            }),
            opt(char('+')),
        ),
        char('}'),
    )
    .parse(i)?;
    let (i, _) = crlf(i)?;
    map(take(n), |b: &[u8]| b.to_vec()).parse(i)
}

/// `string = quoted / literal`
fn string(i: &[u8]) -> Res<'_, Vec<u8>> {
    alt((quoted, literal)).parse(i)
}

/// `nil = "NIL"`
fn nil(i: &[u8]) -> Res<'_, &[u8]> {
    tag_no_case(&b"NIL"[..]).parse(i)
}

/// `nstring = string / nil`, as its length in octets (0 for NIL).
fn nstring_len(i: &[u8]) -> Res<'_, usize> {
    alt((map(string, |s| s.len()), map(nil, |_| 0))).parse(i)
}

/// `string SP nstring`, one field-value pair of ID, as their lengths.
fn id_pair(i: &[u8]) -> Res<'_, (usize, usize)> {
    (map(string, |s| s.len()), preceded(sp, nstring_len)).parse(i)
}

/// `[pair *(SP pair)]`, folded into their sizes without keeping them.
fn id_pairs(i: &[u8]) -> Res<'_, IdParams> {
    let (i, first) = opt(id_pair).parse(i)?;
    let Some(first) = first else {
        return Ok((i, IdParams::default()));
    };
    fold_many0(
        preceded(sp, id_pair),
        move || IdParams::default().add(first),
        IdParams::add,
    )
    .parse(i)
}

/// RFC 2971 §4: `id_params_list = "(" #(string SP nstring) ")" / nil`; the
/// pairs are separated by SP (as in RFC 9051's `id-params-list`), and an
/// empty list is taken as NIL is.
fn id_params_list(i: &[u8]) -> Res<'_, IdParams> {
    alt((
        delimited(char('('), id_pairs, char(')')),
        map(nil, |_| IdParams::default()),
    ))
    .parse(i)
}

/// `astring = 1*ASTRING-CHAR / string`
fn astring(i: &[u8]) -> Res<'_, Vec<u8>> {
    alt((
        map(take_while1(is_astring_char), |b: &[u8]| b.to_vec()),
        string,
    ))
    .parse(i)
}

/// `base64 / "="` as sent after `AUTHENTICATE mech` (SASL-IR).
fn initial_response(i: &[u8]) -> Res<'_, Vec<u8>> {
    map(
        take_while1(|b: u8| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
        |b: &[u8]| b.to_vec(),
    )
    .parse(i)
}

fn fail<T>(i: &[u8]) -> Res<'_, T> {
    Err(nom::Err::Error(nom::error::Error::new(
        i,
        nom::error::ErrorKind::Verify,
    )))
}

fn end(i: &[u8]) -> Res<'_, ()> {
    map((crlf, eof), |_| ()).parse(i)
}

/// `command = tag SP (command-any / command-nonauth / …) CRLF`
pub fn command(i: &[u8]) -> Res<'_, Request> {
    let (i, t) = terminated(tag_rule, sp).parse(i)?;
    let (i, name) = atom(i)?;
    let name = String::from_utf8_lossy(name).to_ascii_uppercase();
    let (i, command) = match name.as_str() {
        "CAPABILITY" => map(end, |_| Command::Capability).parse(i)?,
        "NOOP" => map(end, |_| Command::Noop).parse(i)?,
        "LOGOUT" => map(end, |_| Command::Logout).parse(i)?,
        "STARTTLS" => map(end, |_| Command::StartTls).parse(i)?,
        "ID" => map(terminated(preceded(sp, id_params_list), end), Command::Id).parse(i)?,
        "LOGIN" => map(
            terminated((preceded(sp, astring), preceded(sp, astring)), end),
            |(username, password)| Command::Login { username, password },
        )
        .parse(i)?,
        "AUTHENTICATE" => map(
            terminated(
                (preceded(sp, atom), opt(preceded(sp, initial_response))),
                end,
            ),
            |(mechanism, initial_response)| Command::Authenticate {
                mechanism: String::from_utf8_lossy(mechanism).to_ascii_uppercase(),
                initial_response,
            },
        )
        .parse(i)?,
        _ => map(take_while(|_| true), |_| Command::Other(name.clone())).parse(i)?,
    };
    Ok((
        i,
        Request {
            tag: String::from_utf8_lossy(t).into_owned(),
            command,
        },
    ))
}

/// The tag and name of the command that `i` begins, once the name is whole
/// (`tag SP name` followed by SP or the end of the line). `None` before
/// that, or when `i` does not begin a command.
pub fn command_head(i: &[u8]) -> Option<(&[u8], &[u8])> {
    let (rest, head) = (terminated(tag_rule, sp), atom).parse(i).ok()?;
    matches!(rest.first(), Some(b' ' | b'\r' | b'\n')).then_some(head)
}

/// The name of the command that `i` begins, as [`command_head`] reads it:
/// the framer sizes its bound by it.
pub fn command_name(i: &[u8]) -> Option<&[u8]> {
    command_head(i).map(|(_, name)| name)
}

/// The tag of a line that failed to parse, if it has a usable one, so the
/// error can be tagged.
pub fn leading_tag(i: &[u8]) -> Option<String> {
    terminated(tag_rule, sp)
        .parse(i)
        .ok()
        .map(|(_, t)| String::from_utf8_lossy(t).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &[u8]) -> Request {
        command(input).expect("parses").1
    }

    fn login(input: &[u8]) -> (Vec<u8>, Vec<u8>) {
        match parse(input).command {
            Command::Login { username, password } => (username, password),
            other => panic!("not LOGIN: {other:?}"),
        }
    }

    #[test]
    fn login_with_atoms() {
        assert_eq!(
            login(b"a1 LOGIN user@example.com secret]\r\n"),
            (b"user@example.com".to_vec(), b"secret]".to_vec())
        );
    }

    #[test]
    fn login_with_quoted_strings_and_escapes() {
        let (u, p) = login(b"A001 login \"sales@contoso.com\" \"pa ss\\\"w\\\\rd\"\r\n");
        assert_eq!(u, b"sales@contoso.com");
        assert_eq!(p, b"pa ss\"w\\rd");
    }

    #[test]
    fn login_with_literals_sync_and_nonsync() {
        let (u, p) = login(b"x LOGIN {5}\r\nu@x.y {10+}\r\np\r\nss word\r\n");
        assert_eq!(u, b"u@x.y");
        assert_eq!(p, b"p\r\nss word");
    }

    #[test]
    fn empty_quoted_password_parses() {
        assert_eq!(login(b"t LOGIN u \"\"\r\n").1, b"");
    }

    #[test]
    fn authenticate_with_and_without_initial_response() {
        assert_eq!(
            parse(b"a AUTHENTICATE plain AHVAeABw\r\n").command,
            Command::Authenticate {
                mechanism: "PLAIN".into(),
                initial_response: Some(b"AHVAeABw".to_vec())
            }
        );
        assert_eq!(
            parse(b"a AUTHENTICATE LOGIN\r\n").command,
            Command::Authenticate {
                mechanism: "LOGIN".into(),
                initial_response: None
            }
        );
    }

    #[test]
    fn simple_commands_and_others() {
        assert_eq!(parse(b"1 capability\r\n").command, Command::Capability);
        assert_eq!(parse(b"2 NOOP\r\n").command, Command::Noop);
        assert_eq!(parse(b"3 LOGOUT\r\n").command, Command::Logout);
        assert_eq!(
            parse(b"5 SELECT INBOX\r\n").command,
            Command::Other("SELECT".into())
        );
    }

    fn id(input: &[u8]) -> IdParams {
        match parse(input).command {
            Command::Id(params) => params,
            other => panic!("not ID: {other:?}"),
        }
    }

    /// `(pairs, longest field, longest value)`
    fn sizes(pairs: usize, longest_field: usize, longest_value: usize) -> IdParams {
        IdParams {
            pairs,
            longest_field,
            longest_value,
        }
    }

    #[test]
    fn id_parameters_are_measured_after_unquoting() {
        for (input, expected) in [
            (&b"4 ID (\"name\" \"imapflow\")\r\n"[..], sizes(1, 4, 8)),
            (b"4 ID NIL\r\n", sizes(0, 0, 0)),
            (b"4 id nil\r\n", sizes(0, 0, 0)),
            (b"4 ID ()\r\n", sizes(0, 0, 0)),
            (b"4 ID (\"name\" NIL \"os\" \"linux\")\r\n", sizes(2, 4, 5)),
            (b"4 ID (\"na\\\"me\" \"a\\\\b\")\r\n", sizes(1, 5, 3)),
            (b"4 ID ({4}\r\nname {3+}\r\na\r\n)\r\n", sizes(1, 4, 3)),
            (b"4 ID (\"name\" {0}\r\n)\r\n", sizes(1, 4, 0)),
        ] {
            assert_eq!(id(input), expected, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn id_limits_of_rfc_2971() {
        assert_eq!(sizes(30, 30, 1024).broken_limit(), None);
        assert!(
            sizes(31, 1, 1)
                .broken_limit()
                .unwrap()
                .contains("30 field-value pairs")
        );
        assert!(
            sizes(1, 31, 1)
                .broken_limit()
                .unwrap()
                .contains("30 octets")
        );
        assert!(
            sizes(1, 1, 1025)
                .broken_limit()
                .unwrap()
                .contains("1024 octets")
        );
    }

    #[test]
    fn malformed_ids_are_errors() {
        for bad in [
            &b"4 ID\r\n"[..],
            b"4 ID (\r\n",
            b"4 ID (\"name\")\r\n",
            b"4 ID (\"name\" \"x\" )\r\n",
            b"4 ID (\"name\"\"x\")\r\n",
            b"4 ID (NIL \"x\")\r\n",
            b"4 ID NIL extra\r\n",
            b"4 ID name\r\n",
        ] {
            assert!(command(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn command_names_are_known_once_whole() {
        assert_eq!(command_name(b"a1 ID ("), Some(&b"ID"[..]));
        assert_eq!(command_name(b"a1 id\r\n"), Some(&b"id"[..]));
        assert_eq!(command_name(b"a1 LOGIN "), Some(&b"LOGIN"[..]));
        assert_eq!(command_name(b"a1 ID"), None, "IDLE may follow");
        assert_eq!(command_name(b"a1"), None);
        assert_eq!(command_name(b"+a ID ("), None);
    }

    #[test]
    fn malformed_commands_are_errors() {
        for bad in [
            &b"a1 LOGIN onlyuser\r\n"[..],
            b"a1 LOGIN \"unterminated\r\n",
            b"a1 LOGIN u p extra\r\n",
            b"+tag NOOP\r\n",
            b"a1 NOOP now\r\n",
            b"\r\n",
            b"a1 LOGIN {10}\r\nshort\r\n",
            b"a1 LOGIN \"bad\\escape\" p\r\n",
        ] {
            assert!(command(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(leading_tag(b"a1 LOGIN x\r\n").as_deref(), Some("a1"));
        assert_eq!(leading_tag(b"\x01\x02"), None);
    }
}
