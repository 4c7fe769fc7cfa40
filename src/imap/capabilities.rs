//! What a logged-in client may see of the upstream's capabilities.
//!
//! Outlook keeps announcing `AUTH=PLAIN AUTH=XOAUTH2 SASL-IR` after login;
//! passed on, they invite a client to authenticate again, with a password
//! the upstream does not know. So the login's OK carries the list without
//! them, and after login the relay rewrites the upstream's own answers the
//! same way: `* CAPABILITY …` and `[CAPABILITY …]` codes (RFC 9051 §7.2.2,
//! §7.1). STARTTLS goes too: after login it cannot be used, and the
//! connection to the client is the proxy's, not the upstream's.

use crate::lines::trim_eol;

/// The capabilities a logged-in client must not see, by prefix or name.
fn hidden(capability: &[u8]) -> bool {
    let upper = capability.to_ascii_uppercase();
    upper.starts_with(b"AUTH=")
        || [
            &b"LOGINDISABLED"[..],
            b"STARTTLS",
            b"SASL-IR",
            b"LOGIN-REFERRALS",
        ]
        .contains(&&upper[..])
}

/// The post-login capabilities a client may see, as one space-separated list.
pub fn filter_capabilities(capabilities: &[String]) -> String {
    capabilities
        .iter()
        .filter(|c| !hidden(c.as_bytes()))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The responses that carry capabilities after their tag: the list itself,
/// or a status whose text may open with a `[CAPABILITY …]` code.
const CARRIERS: [&[u8]; 6] = [b"CAPABILITY", b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"];

/// Whether `word`, the first word after a response's tag, names a response
/// that may carry capabilities.
pub fn carries_capabilities(word: &[u8]) -> bool {
    CARRIERS.iter().any(|c| c.eq_ignore_ascii_case(word))
}

/// The longest word of [`CARRIERS`].
pub const LONGEST_CARRIER: usize = "CAPABILITY".len();

/// One whole response line (CRLF included) as the client may see it:
/// `Some` with the hidden capabilities taken out of a `* CAPABILITY` list or
/// of a status response's `[CAPABILITY …]` code, `None` when nothing needs
/// to change. The result is never longer than the line.
pub fn rewrite(line: &[u8]) -> Option<Vec<u8>> {
    let text = trim_eol(line);
    let (tag, rest) = word(text);
    let (name, rest) = word(rest);
    let list = if tag == b"*" && name.eq_ignore_ascii_case(b"CAPABILITY") {
        rest
    } else if carries_capabilities(name) {
        let code = strip_prefix_ignore_case(rest, b"[CAPABILITY ")?;
        &code[..code.iter().position(|b| *b == b']')?]
    } else {
        return None;
    };
    let visible = visible(list)?;
    let start = list.as_ptr() as usize - text.as_ptr() as usize;
    Some([&text[..start], &visible, &line[start + list.len()..]].concat())
}

/// `list` without the hidden capabilities, single-spaced; `None` when none
/// is hidden.
fn visible(list: &[u8]) -> Option<Vec<u8>> {
    let words = list.split(|b| *b == b' ').filter(|w| !w.is_empty());
    if !words.clone().any(hidden) {
        return None;
    }
    Some(words.filter(|w| !hidden(w)).collect::<Vec<_>>().join(&b' '))
}

/// The first word of `text` and what follows its space.
fn word(text: &[u8]) -> (&[u8], &[u8]) {
    match text.iter().position(|b| *b == b' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, &[]),
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_what_a_logged_in_client_must_not_see() {
        let caps: Vec<String> = "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID IDLE NAMESPACE LITERAL+ STARTTLS LOGINDISABLED"
            .split(' ')
            .map(String::from)
            .collect();
        assert_eq!(
            filter_capabilities(&caps),
            "IMAP4 IMAP4rev1 UIDPLUS ID IDLE NAMESPACE LITERAL+"
        );
    }

    #[test]
    fn capability_responses_are_rewritten() {
        for (line, expected) in [
            (
                &b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR IDLE STARTTLS\r\n"[..],
                Some(&b"* CAPABILITY IMAP4rev1 IDLE\r\n"[..]),
            ),
            (
                b"* capability auth=xoauth2 IMAP4rev1 logindisabled\r\n",
                Some(b"* capability IMAP4rev1\r\n"),
            ),
            (
                b"a5 OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN IDLE] Logged in\r\n",
                Some(b"a5 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"),
            ),
            (
                b"* ok [capability IMAP4rev1 LOGIN-REFERRALS] ready\n",
                Some(b"* ok [capability IMAP4rev1] ready\n"),
            ),
            (b"* CAPABILITY IMAP4rev1 IDLE\r\n", None),
            (b"a5 OK [CAPABILITY IMAP4rev1] done\r\n", None),
            (b"a5 OK CAPABILITY AUTH=PLAIN completed\r\n", None),
            (b"a5 OK [UIDNEXT 5] AUTH=PLAIN\r\n", None),
            (b"* 1 FETCH (BODY[] \"* CAPABILITY AUTH=PLAIN\")\r\n", None),
            (b"* LIST () \"/\" \"AUTH=PLAIN\"\r\n", None),
            (b"a5 OK [CAPABILITY AUTH=PLAIN without a bracket\r\n", None),
        ] {
            let got = rewrite(line);
            assert_eq!(
                got.as_deref(),
                expected,
                "{:?} became {:?}",
                String::from_utf8_lossy(line),
                got.as_deref().map(String::from_utf8_lossy)
            );
            assert!(got.is_none_or(|g| g.len() <= line.len()));
        }
    }
}
