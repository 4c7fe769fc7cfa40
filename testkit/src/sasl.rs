//! SASL XOAUTH2, both ends: the client's initial response (built by the proxy's
//! own encoder, so the tests and the product cannot drift apart) and the
//! server's reading of it, shared by the mock IMAP and SMTP upstreams.

use xoauth2_proxy::Secret;

/// The base64 XOAUTH2 initial response `user=<user>^Aauth=Bearer <token>^A^A`.
pub fn xoauth2(user: &str, token: &str) -> String {
    xoauth2_proxy::xoauth2(user, &Secret::new(token.to_string()))
        .expose()
        .to_string()
}

/// The decoded XOAUTH2 response `user=<mailbox>^Aauth=Bearer <token>^A^A` →
/// `(mailbox, token)`; `None` unless both are there and non-empty. Other
/// `key=value` parts are ignored and the scheme name is compared without case,
/// as Exchange does.
pub fn parse_xoauth2(raw: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(raw).ok()?;
    let parts = text.strip_suffix("\x01\x01")?;
    let (mut user, mut token) = (None, None);
    for part in parts.split('\x01') {
        if let Some(u) = part.strip_prefix("user=") {
            user = Some(u);
        } else if let Some(auth) = part.strip_prefix("auth=") {
            let (scheme, t) = auth.split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("Bearer") {
                return None;
            }
            token = Some(t);
        }
    }
    let (user, token) = (
        user.filter(|u| !u.is_empty())?,
        token.filter(|t| !t.is_empty())?,
    );
    Some((user.to_string(), token.to_string()))
}
