//! Bounded line reading, for the parts of a session the proxy speaks itself.
//!
//! Before login every byte comes from someone we do not trust yet: a line that
//! never ends must not grow a buffer without bound.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

#[derive(Debug)]
pub enum LineError {
    /// The line grew past the limit before its end arrived.
    TooLong,
    /// The peer closed the connection (no partial line is returned).
    Closed,
    Io(std::io::Error),
}

impl From<std::io::Error> for LineError {
    fn from(e: std::io::Error) -> Self {
        LineError::Io(e)
    }
}

/// Appends one line, its `\n` included, to `buf`. Fails with
/// [`LineError::TooLong`] once `buf` would exceed `max` bytes; `buf` then
/// holds what was read so far and the reader is right after it, so that a
/// caller may go on with a larger `max`. `buf`'s capacity stays within
/// `max` (or what it was).
pub async fn read_line<R>(reader: &mut R, buf: &mut Vec<u8>, max: usize) -> Result<(), LineError>
where
    R: AsyncBufRead + Unpin,
{
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Err(LineError::Closed);
        }
        let (take, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if buf.len() + take > max {
            return Err(LineError::TooLong);
        }
        reserve_within(buf, take, max);
        buf.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            return Ok(());
        }
    }
}

/// Makes room in `buf` for `additional` more bytes, doubling as a `Vec`
/// does but never past `max` (unless `additional` needs more), so that a
/// bounded buffer is not allocated at twice its bound.
pub fn reserve_within(buf: &mut Vec<u8>, additional: usize, max: usize) {
    let needed = buf.len() + additional;
    if needed > buf.capacity() {
        let target = (buf.capacity() * 2).min(max).max(needed);
        buf.reserve_exact(target - buf.len());
    }
}

/// `line` without its trailing CRLF (or bare LF).
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `Some((n, synchronising))` when `line` ends with an IMAP literal
/// announcement, `{n}` or LITERAL+'s `{n+}`, before its CRLF. Client
/// commands and upstream responses announce literals alike. `n` has at most
/// 10 digits: a larger literal (10 GB and more) is not taken for one.
pub fn literal_announced(line: &[u8]) -> Option<(usize, bool)> {
    let line = trim_eol(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let spec = &inner[open + 1..];
    let (digits, synchronising) = match spec.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (spec, true),
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((n, synchronising))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_lines_and_refuses_long_ones() {
        let mut input: &[u8] = b"a1 NOOP\r\nxxxxxxxxxxxxxxxxxxxx\r\n";
        let mut buf = Vec::new();
        read_line(&mut input, &mut buf, 64).await.unwrap();
        assert_eq!(trim_eol(&buf), b"a1 NOOP");
        buf.clear();
        assert!(matches!(
            read_line(&mut input, &mut buf, 10).await,
            Err(LineError::TooLong)
        ));
        let mut empty: &[u8] = b"partial";
        buf.clear();
        assert!(matches!(
            read_line(&mut empty, &mut buf, 64).await,
            Err(LineError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_bounded_line_never_takes_more_than_its_bound() {
        let line = [b'x'; 1000];
        let mut input: &[u8] = &line;
        let mut buf = Vec::with_capacity(600);
        buf.extend_from_slice(&[b'y'; 600]);
        let mut reader = tokio::io::BufReader::with_capacity(100, &mut input);
        assert!(matches!(
            read_line(&mut reader, &mut buf, 1100).await,
            Err(LineError::TooLong)
        ));
        assert_eq!(buf.len(), 1100, "what was read is kept");
        assert_eq!(buf.capacity(), 1100, "not 1200, as doubling would give");
    }

    #[test]
    fn announcements() {
        assert_eq!(literal_announced(b"a LOGIN {12}\r\n"), Some((12, true)));
        assert_eq!(literal_announced(b"a LOGIN {12+}\r\n"), Some((12, false)));
        assert_eq!(literal_announced(b"a LOGIN {}\r\n"), None);
        assert_eq!(literal_announced(b"a LOGIN {1x}\r\n"), None);
        assert_eq!(
            literal_announced(b"* 1 FETCH (BODY[] ~{9999999999}\r\n"),
            Some((9_999_999_999, true))
        );
        assert_eq!(literal_announced(b"a NOOP\r\n"), None);
    }
}
