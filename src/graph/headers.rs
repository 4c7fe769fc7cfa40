//! Just enough of RFC 5322 to learn which recipients a message's header
//! names, and to add the ones it does not as a `Bcc` field. Only the header
//! section is read; the body is never parsed, and never changed.
//!
//! Graph's `sendMail` takes the recipients of a MIME message from its `To`,
//! `Cc` and `Bcc` fields. An SMTP client names Bcc recipients only in the
//! envelope (nodemailer strips the `Bcc` field, as RFC 5322 §3.6.3 allows),
//! so without the added field they would silently get nothing.

use std::collections::HashSet;

/// The fields whose addresses Graph delivers to.
const RECIPIENT_FIELDS: [&str; 3] = ["to", "cc", "bcc"];

/// `message` with a `Bcc` field first naming each of `envelope` (RCPT TO
/// addresses) that no `To`, `Cc` or `Bcc` field names (compared without
/// case), or the message unchanged when every one is named.
pub fn with_bcc(message: &[u8], envelope: &[String]) -> Vec<u8> {
    let named = named_recipients(message);
    let mut seen = HashSet::new();
    let missing: Vec<&str> = envelope
        .iter()
        .map(String::as_str)
        .filter(|a| !named.contains(&a.to_lowercase()) && seen.insert(a.to_lowercase()))
        .collect();
    if missing.is_empty() {
        return message.to_vec();
    }
    // One address per line keeps every line far below 998 characters.
    let field = format!("Bcc: {}\r\n", missing.join(",\r\n "));
    let mut out = Vec::with_capacity(field.len() + message.len());
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(message);
    out
}

/// The addresses the `To`, `Cc` and `Bcc` fields name that `envelope` (RCPT
/// TO addresses) does not (compared without case), sorted: Graph would
/// deliver to them although the client did not ask it to.
pub fn beyond_envelope(message: &[u8], envelope: &[String]) -> Vec<String> {
    let envelope: HashSet<String> = envelope.iter().map(|a| a.to_lowercase()).collect();
    let mut extra: Vec<String> = named_recipients(message)
        .into_iter()
        .filter(|a| !envelope.contains(a))
        .collect();
    extra.sort();
    extra
}

/// Every address the `To`, `Cc` and `Bcc` fields name, lower-cased.
pub fn named_recipients(message: &[u8]) -> HashSet<String> {
    fields(header_section(message))
        .filter(|(name, _)| {
            RECIPIENT_FIELDS
                .iter()
                .any(|f| name.eq_ignore_ascii_case(f))
        })
        .flat_map(|(_, body)| address_list(&body))
        .map(|a| a.to_lowercase())
        .collect()
}

/// The header section (RFC 5322 §2.1): up to the first empty line, or the
/// whole message when there is none.
fn header_section(message: &[u8]) -> &[u8] {
    match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(end) => &message[..end + 2],
        None => message,
    }
}

/// The header fields (§2.2), unfolded (§2.2.3): a line that begins with a
/// space or tab continues the field before it. A line without a colon is
/// no field, and what follows it continues nothing; an empty line (a bare
/// LF too) ends the section.
fn fields(section: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    let mut unfolded: Vec<(String, String)> = Vec::new();
    let mut open = false;
    for line in section.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        if line[0] == b' ' || line[0] == b'\t' {
            if let (true, Some((_, body))) = (open, unfolded.last_mut()) {
                body.push_str(&text);
            }
            continue;
        }
        open = match text.split_once(':') {
            Some((name, body)) => {
                unfolded.push((name.trim().to_string(), body.to_string()));
                true
            }
            None => false,
        };
    }
    unfolded.into_iter()
}

/// The addresses of an `address-list` (§3.4): mailboxes and groups, each
/// an `angle-addr` (`"Name" <a@b>`) or a bare `addr-spec` (`a@b`). Quoted
/// strings and comments are skipped where they cannot be the address, so
/// commas and brackets inside display names do not split or mislead.
fn address_list(body: &str) -> Vec<String> {
    let mut addresses = Vec::new();
    let mut current = String::new();
    let mut angle: Option<String> = None;
    let mut chars = body.chars().peekable();
    let mut finish = |current: &mut String, angle: &mut Option<String>| {
        let address = angle.take().unwrap_or_else(|| current.trim().to_string());
        if address.contains('@') {
            addresses.push(address.trim().to_string());
        }
        current.clear();
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                // quoted-string (§3.2.4): part of a local part or a name.
                current.push('"');
                while let Some(q) = chars.next() {
                    current.push(q);
                    match q {
                        '\\' => current.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '(' => skip_comment(&mut chars),
            '<' => {
                let inner: String = chars.by_ref().take_while(|&a| a != '>').collect();
                angle = Some(inner.trim().to_string());
            }
            // A group's display name ends at its colon (§3.4).
            ':' if angle.is_none() => current.clear(),
            ',' | ';' => finish(&mut current, &mut angle),
            _ => current.push(c),
        }
    }
    finish(&mut current, &mut angle);
    addresses
}

/// Skips a comment (§3.2.2) after its `(`: comments nest, and a backslash
/// quotes the next character.
fn skip_comment(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    let mut depth = 1;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_header_recipients_the_envelope_lacks_without_case() {
        let message = b"To: \"A, B\" <A@x.com>, c@x.com\r\nCc: D@X.com\r\nSubject: s\r\n\r\nTo: body@x.com\r\n";
        let envelope = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert!(beyond_envelope(message, &envelope(&["a@x.com", "C@x.com", "d@x.com"])).is_empty());
        assert_eq!(
            beyond_envelope(message, &envelope(&["a@x.com", "bcc@y.com"])),
            ["c@x.com", "d@x.com"]
        );
    }

    #[test]
    fn address_lists_as_rfc_5322_writes_them() {
        let cases: &[(&str, &[&str])] = &[
            (" a@example.com", &["a@example.com"]),
            (
                " A <a@example.com>, b@example.com",
                &["a@example.com", "b@example.com"],
            ),
            (r#" "Doe, John" <j@example.com>"#, &["j@example.com"]),
            (" j@example.com (Doe, <John>)", &["j@example.com"]),
            (
                " Team: a@x.com, B <b@x.com>;, c@x.com",
                &["a@x.com", "b@x.com", "c@x.com"],
            ),
            (
                r#" "odd, local"@example.com"#,
                &[r#""odd, local"@example.com"#],
            ),
            (
                " =?utf-8?Q?J=C3=B6rg?= <jorg@example.com>",
                &["jorg@example.com"],
            ),
            (" undisclosed-recipients:;", &[]),
            ("", &[]),
        ];
        for (body, expected) in cases {
            assert_eq!(address_list(body), *expected, "{body}");
        }
    }

    #[test]
    fn envelope_recipients_missing_from_the_header_become_a_bcc_field_first() {
        let message = b"From: s@x.com\r\nTo: A <a@x.com>,\r\n B <b@x.com>\r\nCc: c@x.com\r\nSubject: Bcc: nobody@x.com\r\n\r\nTo: body@x.com\r\n";
        let envelope = [
            "<a@x.com>",
            "B@X.com",
            "c@x.com",
            "d@x.com",
            "body@x.com",
            "D@x.com",
        ]
        .map(|a| a.trim_matches(['<', '>']).to_string());
        let sent = with_bcc(message, &envelope);
        let bcc = b"Bcc: d@x.com,\r\n body@x.com\r\n";
        assert_eq!(
            &sent[..bcc.len()],
            bcc,
            "{}",
            String::from_utf8_lossy(&sent)
        );
        assert_eq!(&sent[bcc.len()..], message, "the rest unchanged");
        let named = ["a@x.com", "b@x.com", "c@x.com"].map(String::from);
        assert_eq!(with_bcc(message, &named), message, "nothing to add");
    }

    #[test]
    fn a_message_without_a_body_or_header_end_is_read_whole() {
        let message = b"To: a@x.com\r\nSubject: x\r\n";
        assert!(named_recipients(message).contains("a@x.com"));
        let sent = with_bcc(message, &["b@x.com".to_string()]);
        assert!(sent.starts_with(b"Bcc: b@x.com\r\nTo: a@x.com"));
    }
}
