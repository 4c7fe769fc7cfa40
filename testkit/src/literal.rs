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
