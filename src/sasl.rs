//! The SASL exchange both protocols' pre-login dialogues share: PLAIN
//! (RFC 4616) and LOGIN, with or without an initial response, cancelled by
//! `*`.
//!
//! The mechanisms are the same in IMAP and SMTP; only the framing of a
//! challenge differs (`+ …` against `334 …`) and what a protocol does with a
//! response line that is too long or too late. So the exchange lives here,
//! once, and each protocol supplies its side of it through [`Challenge`]. The
//! LOGIN mechanism's prompts are the customary base64 of "Username:" and
//! "Password:".

use std::future::Future;

use base64::Engine;

/// `base64("Username:")`, the LOGIN mechanism's first prompt.
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
/// `base64("Password:")`, the LOGIN mechanism's second prompt.
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// The mechanisms the proxy offers its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// The mechanism named `name` (upper-case, as the command parsers
    /// leave it), if the proxy offers it.
    pub fn named(name: &str) -> Option<Mechanism> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            "LOGIN" => Some(Mechanism::Login),
            _ => None,
        }
    }
}

/// What a client logs in with.
pub struct Credentials {
    pub username: String,
    pub password: Vec<u8>,
}

/// A SASL exchange that produced no credentials. The protocols answer each
/// case differently, so it is an enum they branch on.
#[derive(Debug)]
pub enum SaslError {
    /// The client sent `*`.
    Cancelled,
    /// Not base64, or not the mechanism's shape.
    Malformed,
    /// The protocol closed the connection during the exchange, after telling
    /// the client why (its response was too long or too late).
    Closed,
    /// The connection failed or the client left.
    Io(std::io::Error),
}

impl From<std::io::Error> for SaslError {
    fn from(e: std::io::Error) -> Self {
        SaslError::Io(e)
    }
}

/// A protocol's side of a SASL exchange.
pub trait Challenge {
    /// Sends `prompt` (base64, possibly empty) as a continuation in the
    /// protocol's framing and returns the client's response line without its
    /// line end, still base64. The read is bounded in length and time like
    /// every read before login.
    fn challenge(
        &mut self,
        prompt: &str,
    ) -> impl Future<Output = Result<Vec<u8>, SaslError>> + Send;
}

/// Runs `mechanism` with the client: `initial` is the initial response of
/// the command (SASL-IR, still base64), if it carried one.
pub async fn credentials<C: Challenge>(
    client: &mut C,
    mechanism: Mechanism,
    initial: Option<Vec<u8>>,
) -> Result<Credentials, SaslError> {
    match mechanism {
        Mechanism::Plain => plain(client, initial).await,
        Mechanism::Login => login(client, initial).await,
    }
}

/// RFC 4616: one message `[authzid] NUL authcid NUL passwd`.
async fn plain<C: Challenge>(
    client: &mut C,
    initial: Option<Vec<u8>>,
) -> Result<Credentials, SaslError> {
    let message = first_response(client, initial, "").await?;
    parse_plain(&message)
}

/// The LOGIN mechanism: the username, then the password, each on request.
async fn login<C: Challenge>(
    client: &mut C,
    initial: Option<Vec<u8>>,
) -> Result<Credentials, SaslError> {
    let username = first_response(client, initial, LOGIN_USERNAME_PROMPT).await?;
    let username = String::from_utf8(username).map_err(|_| SaslError::Malformed)?;
    let password = decode(&client.challenge(LOGIN_PASSWORD_PROMPT).await?)?;
    Ok(Credentials { username, password })
}

/// The initial response if the command carried one, else the answer to
/// `prompt`; decoded.
async fn first_response<C: Challenge>(
    client: &mut C,
    initial: Option<Vec<u8>>,
    prompt: &str,
) -> Result<Vec<u8>, SaslError> {
    let response = match initial {
        Some(response) => response,
        None => client.challenge(prompt).await?,
    };
    decode(&response)
}

/// Decodes a client response: `*` cancels, `=` is empty, else base64.
pub fn decode(response: &[u8]) -> Result<Vec<u8>, SaslError> {
    match response {
        b"*" => Err(SaslError::Cancelled),
        b"=" => Ok(Vec::new()),
        _ => base64::engine::general_purpose::STANDARD
            .decode(response)
            .map_err(|_| SaslError::Malformed),
    }
}

/// Splits a PLAIN message `[authzid] NUL authcid NUL passwd` into the
/// username and password. An authorisation identity other than the user
/// (acting as someone else) is refused.
pub fn parse_plain(message: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = message.splitn(3, |b| *b == 0);
    let (Some(authzid), Some(authcid), Some(password)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let authcid = String::from_utf8(authcid.to_vec()).map_err(|_| SaslError::Malformed)?;
    if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(authcid.as_bytes()) {
        return Err(SaslError::Malformed);
    }
    Ok(Credentials {
        username: authcid,
        password: password.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_with_and_without_authzid() {
        let c = parse_plain(b"\0u@x.com\0pw").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_slice()),
            ("u@x.com", &b"pw"[..])
        );
        assert_eq!(
            parse_plain(b"U@x.com\0u@x.com\0pw").unwrap().username,
            "u@x.com"
        );
        assert!(matches!(
            parse_plain(b"other@x.com\0u@x.com\0pw"),
            Err(SaslError::Malformed)
        ));
        assert!(matches!(
            parse_plain(b"u@x.com\0pw"),
            Err(SaslError::Malformed)
        ));
    }

    #[test]
    fn responses_decode_cancel_and_empty() {
        assert!(matches!(decode(b"*"), Err(SaslError::Cancelled)));
        assert_eq!(decode(b"=").unwrap(), Vec::<u8>::new());
        assert_eq!(decode(b"dXNlcg==").unwrap(), b"user".to_vec());
        assert!(matches!(decode(b"not base64!"), Err(SaslError::Malformed)));
    }

    /// A client that answers challenges from a script and notes the prompts.
    struct Scripted {
        responses: Vec<&'static [u8]>,
        prompts: Vec<String>,
    }

    impl Challenge for Scripted {
        async fn challenge(&mut self, prompt: &str) -> Result<Vec<u8>, SaslError> {
            self.prompts.push(prompt.to_string());
            Ok(self.responses.remove(0).to_vec())
        }
    }

    async fn exchange(
        mechanism: Mechanism,
        initial: Option<&[u8]>,
        responses: Vec<&'static [u8]>,
    ) -> (Result<Credentials, SaslError>, Vec<String>) {
        let mut client = Scripted {
            responses,
            prompts: Vec::new(),
        };
        let result = credentials(&mut client, mechanism, initial.map(<[u8]>::to_vec)).await;
        (result, client.prompts)
    }

    #[tokio::test]
    async fn plain_prompts_only_without_an_initial_response() {
        let (c, prompts) = exchange(Mechanism::Plain, Some(b"AHVAeC5jb20AcHc="), vec![]).await;
        assert_eq!(c.unwrap().username, "u@x.com");
        assert!(prompts.is_empty());
        let (c, prompts) = exchange(Mechanism::Plain, None, vec![b"AHVAeC5jb20AcHc="]).await;
        assert_eq!(c.unwrap().password, b"pw");
        assert_eq!(prompts, [""]);
    }

    #[tokio::test]
    async fn login_asks_for_the_username_then_the_password() {
        let (c, prompts) = exchange(Mechanism::Login, None, vec![b"dUB4LmNvbQ==", b"cHc="]).await;
        let c = c.unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_slice()),
            ("u@x.com", &b"pw"[..])
        );
        assert_eq!(prompts, [LOGIN_USERNAME_PROMPT, LOGIN_PASSWORD_PROMPT]);
        let (c, prompts) = exchange(Mechanism::Login, Some(b"dUB4LmNvbQ=="), vec![b"cHc="]).await;
        assert_eq!(c.unwrap().username, "u@x.com");
        assert_eq!(prompts, [LOGIN_PASSWORD_PROMPT]);
    }

    #[tokio::test]
    async fn a_star_cancels_and_a_bad_username_ends_before_the_password() {
        let (c, _) = exchange(Mechanism::Login, None, vec![b"dUB4LmNvbQ==", b"*"]).await;
        assert!(matches!(c, Err(SaslError::Cancelled)));
        let (c, _) = exchange(Mechanism::Plain, Some(b"*"), vec![]).await;
        assert!(matches!(c, Err(SaslError::Cancelled)));
        // base64 of the bytes FF FE: not UTF-8.
        let (c, prompts) = exchange(Mechanism::Login, Some(b"//4="), vec![]).await;
        assert!(matches!(c, Err(SaslError::Malformed)));
        assert!(prompts.is_empty());
    }

    #[test]
    fn only_plain_and_login_are_offered() {
        assert_eq!(Mechanism::named("PLAIN"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::named("LOGIN"), Some(Mechanism::Login));
        assert_eq!(Mechanism::named("CRAM-MD5"), None);
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
