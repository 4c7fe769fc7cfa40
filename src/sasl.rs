//! The SASL pieces both protocols' pre-login dialogues share: decoding a
//! client response and splitting PLAIN (RFC 4616). The LOGIN mechanism's
//! prompts are the customary base64 of "Username:" and "Password:".

use base64::Engine;

/// `base64("Username:")`, the LOGIN mechanism's first prompt.
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
/// `base64("Password:")`, the LOGIN mechanism's second prompt.
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// A SASL exchange that produced no credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslEnd {
    /// The client sent `*`.
    Cancelled,
    /// Not base64, or not the mechanism's shape.
    Malformed,
}

/// Decodes a client response: `*` cancels, `=` is empty, else base64.
pub fn decode(response: &[u8]) -> Result<Vec<u8>, SaslEnd> {
    match response {
        b"*" => Err(SaslEnd::Cancelled),
        b"=" => Ok(Vec::new()),
        _ => base64::engine::general_purpose::STANDARD
            .decode(response)
            .map_err(|_| SaslEnd::Malformed),
    }
}

/// Splits a PLAIN message `[authzid] NUL authcid NUL passwd` into the
/// username and password. An authorisation identity other than the user
/// (acting as someone else) is refused.
pub fn parse_plain(message: &[u8]) -> Result<(String, Vec<u8>), SaslEnd> {
    let mut parts = message.splitn(3, |b| *b == 0);
    let (Some(authzid), Some(authcid), Some(password)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslEnd::Malformed);
    };
    let authcid = String::from_utf8(authcid.to_vec()).map_err(|_| SaslEnd::Malformed)?;
    if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(authcid.as_bytes()) {
        return Err(SaslEnd::Malformed);
    }
    Ok((authcid, password.to_vec()))
}

/// The username of a LOGIN exchange, which must be UTF-8.
pub fn login_username(response: Result<Vec<u8>, SaslEnd>) -> Result<String, SaslEnd> {
    String::from_utf8(response?).map_err(|_| SaslEnd::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_with_and_without_authzid() {
        assert_eq!(
            parse_plain(b"\0u@x.com\0pw").unwrap(),
            ("u@x.com".to_string(), b"pw".to_vec())
        );
        assert_eq!(parse_plain(b"U@x.com\0u@x.com\0pw").unwrap().0, "u@x.com");
        assert_eq!(
            parse_plain(b"other@x.com\0u@x.com\0pw"),
            Err(SaslEnd::Malformed)
        );
        assert_eq!(parse_plain(b"u@x.com\0pw"), Err(SaslEnd::Malformed));
    }

    #[test]
    fn responses_decode_cancel_and_empty() {
        assert_eq!(decode(b"*"), Err(SaslEnd::Cancelled));
        assert_eq!(decode(b"="), Ok(Vec::new()));
        assert_eq!(decode(b"dXNlcg=="), Ok(b"user".to_vec()));
        assert_eq!(decode(b"not base64!"), Err(SaslEnd::Malformed));
    }
}

/// The SASL XOAUTH2 initial response, base64-encoded:
/// `user=<mailbox>^Aauth=Bearer <token>^A^A`. It holds the token: never log it.
pub fn xoauth2(mailbox: &str, token: &crate::secret::Secret) -> crate::secret::Secret {
    let raw = format!("user={mailbox}\x01auth=Bearer {}\x01\x01", token.expose());
    crate::secret::Secret::new(base64::engine::general_purpose::STANDARD.encode(raw))
}

#[cfg(test)]
mod xoauth2_tests {
    use super::*;

    #[test]
    fn xoauth2_string_has_microsofts_shape() {
        let b64 = xoauth2(
            "shared@contoso.com",
            &crate::secret::Secret::new("tok".into()),
        );
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.expose())
            .unwrap();
        assert_eq!(raw, b"user=shared@contoso.com\x01auth=Bearer tok\x01\x01");
    }
}
