//! Command syntax: tokens (atoms, quoted strings, literals, lists), literals
//! announced at the end of a line, sequence sets and LIST patterns; and the
//! string forms replies use (nstring, quoted, astring).

#[derive(Clone, Debug)]
pub(super) enum Tok {
    Atom(String),
    Quoted(String),
    Literal(usize),
    List(Vec<Tok>),
}

pub(super) struct Command {
    pub(super) tag: String,
    pub(super) name: String,
    pub(super) args: Vec<Tok>,
    pub(super) literals: Vec<Vec<u8>>,
}

impl Command {
    pub(super) fn text(&self, tok: &Tok) -> Option<String> {
        match tok {
            Tok::Atom(s) | Tok::Quoted(s) => Some(s.clone()),
            Tok::Literal(i) => Some(String::from_utf8_lossy(&self.literals[*i]).to_string()),
            Tok::List(_) => None,
        }
    }

    pub(super) fn arg(&self, i: usize) -> Option<String> {
        self.args.get(i).and_then(|t| self.text(t))
    }
}

/// Literal placeholders in the command text are `\0<index>\0`.
pub(super) fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = s.chars().collect();
    let mut pos = 0;
    let toks = parse_tokens(&chars, &mut pos, false)?;
    Some(toks)
}

pub(super) fn parse_tokens(c: &[char], pos: &mut usize, in_list: bool) -> Option<Vec<Tok>> {
    let mut out = Vec::new();
    loop {
        while *pos < c.len() && c[*pos] == ' ' {
            *pos += 1;
        }
        if *pos >= c.len() {
            return if in_list { None } else { Some(out) };
        }
        match c[*pos] {
            ')' => {
                if in_list {
                    *pos += 1;
                    return Some(out);
                }
                return None;
            }
            '(' => {
                *pos += 1;
                out.push(Tok::List(parse_tokens(c, pos, true)?));
            }
            '"' => {
                *pos += 1;
                let mut s = String::new();
                loop {
                    let ch = *c.get(*pos)?;
                    *pos += 1;
                    match ch {
                        '\\' => {
                            s.push(*c.get(*pos)?);
                            *pos += 1;
                        }
                        '"' => break,
                        other => s.push(other),
                    }
                }
                out.push(Tok::Quoted(s));
            }
            '\0' => {
                *pos += 1;
                let mut n = String::new();
                while *c.get(*pos)? != '\0' {
                    n.push(c[*pos]);
                    *pos += 1;
                }
                *pos += 1;
                out.push(Tok::Literal(n.parse().ok()?));
            }
            _ => {
                let mut s = String::new();
                while *pos < c.len() && !matches!(c[*pos], ' ' | '(' | ')' | '"' | '\0') {
                    if c[*pos] == '[' {
                        // A section: everything up to the matching bracket.
                        let mut depth = 0;
                        while *pos < c.len() {
                            let ch = c[*pos];
                            s.push(ch);
                            *pos += 1;
                            if ch == '[' {
                                depth += 1;
                            } else if ch == ']' {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                        }
                        continue;
                    }
                    s.push(c[*pos]);
                    *pos += 1;
                }
                out.push(Tok::Atom(s));
            }
        }
    }
}

/// A literal announced at the end of `line`: the command text before it
/// (without the `~` of a binary literal), its size, and whether it is a
/// LITERAL+ one that the client sends without waiting for `+`.
pub(super) fn trailing_literal(line: &str) -> Option<(&str, usize, bool)> {
    let (n, synchronising) = crate::literal_announced(line.as_bytes())?;
    let prefix = &line[..line.rfind('{')?];
    Some((
        prefix.strip_suffix('~').unwrap_or(prefix),
        n,
        !synchronising,
    ))
}

pub(super) fn parse_set(set: &str, max: u32) -> Option<Vec<(u32, u32)>> {
    let num = |s: &str| -> Option<u32> {
        if s == "*" {
            Some(max)
        } else {
            s.parse().ok().filter(|&n| n > 0)
        }
    };
    set.split(',')
        .map(|part| match part.split_once(':') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                Some((a.min(b), a.max(b)))
            }
            None => {
                let n = num(part)?;
                Some((n, n))
            }
        })
        .collect()
}

pub(super) fn in_set(ranges: &[(u32, u32)], n: u32) -> bool {
    ranges.iter().any(|&(a, b)| a <= n && n <= b)
}

pub(super) fn is_set(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b":,*".contains(&b))
}

/// `*` matches anything, `%` anything but the delimiter `/`.
pub(super) fn glob(pattern: &str, name: &str) -> bool {
    pub(super) fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some('%') => (0..=n.len())
                .take_while(|&i| i == 0 || n[i - 1] != '/')
                .any(|i| go(&p[1..], &n[i..])),
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

pub(super) fn quoted(s: &str) -> String {
    let mut out = Vec::new();
    nstring(&mut out, Some(s));
    String::from_utf8_lossy(&out).to_string()
}

pub(super) fn astring(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+/&".contains(&b))
    {
        s.to_string()
    } else {
        quoted(s)
    }
}

/// An IMAP string: NIL, a quoted string, or a literal for 8-bit/control content.
pub(super) fn nstring(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.extend_from_slice(b"NIL"),
        Some(s) if s.bytes().all(|b| (0x20..0x7f).contains(&b)) => {
            out.push(b'"');
            for b in s.bytes() {
                if b == b'"' || b == b'\\' {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'"');
        }
        Some(s) => {
            out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}
