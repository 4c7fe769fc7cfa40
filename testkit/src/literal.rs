//! IMAP literals announced at the end of a line (RFC 3501 §4.3, RFC 7888).

/// `Some((n, synchronising))` when `line` ends with `{n}` (synchronising) or
/// `{n+}` (LITERAL+), before an optional CRLF.
pub fn literal_announced(line: &[u8]) -> Option<(usize, bool)> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let open = line.iter().rposition(|&b| b == b'{')?;
    let spec = std::str::from_utf8(&line[open + 1..])
        .ok()?
        .strip_suffix('}')?;
    let (digits, synchronising) = spec.strip_suffix('+').map_or((spec, true), |d| (d, false));
    let well_formed =
        (1..=10).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
    let n = digits.parse().ok().filter(|_| well_formed)?;
    Some((n, synchronising))
}

#[cfg(test)]
mod tests {
    use super::literal_announced;

    #[test]
    fn literals_at_the_end_of_a_line() {
        let cases: &[(&[u8], Option<(usize, bool)>)] = &[
            (b"a LOGIN {12}\r\n", Some((12, true))),
            (b"a LOGIN {12+}\r\n", Some((12, false))),
            (b"* 1 FETCH (BODY[] {3}", Some((3, true))),
            (b"a APPEND INBOX ~{7}", Some((7, true))),
            (b"a LOGIN {}\r\n", None),
            (b"a LOGIN {1x}\r\n", None),
            (b"a LOGIN {12345678901}\r\n", None),
            (b"a NOOP\r\n", None),
        ];
        for (line, expected) in cases {
            assert_eq!(literal_announced(line), *expected, "{line:?}");
        }
    }
}
