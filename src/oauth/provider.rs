//! Talking to one identity provider: the OAuth 2.0 grants the proxy uses, and
//! its errors turned into sentences and classes.

use std::time::Duration;

use base64::Engine as _;
use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, DeviceAuthorizationUrl,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, ErrorResponse, ExtraTokenFields,
    HttpClientError, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    StandardDeviceAuthorizationResponse, StandardErrorResponse, StandardRevocableToken,
    StandardTokenResponse, TokenResponse, TokenUrl,
};

use super::aadsts::{self, ErrorClass};
use crate::config::Provider;
use crate::secret::Secret;

/// The token response's fields beyond OAuth's: the OpenID Connect ID token,
/// sent when `openid` was asked for.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct IdTokenFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}

impl ExtraTokenFields for IdTokenFields {}

type TokenResponseWithId = StandardTokenResponse<IdTokenFields, BasicTokenType>;

type OAuthClient = oauth2::Client<
    BasicErrorResponse,
    TokenResponseWithId,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointMaybeSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// A token response, reduced to what the proxy keeps.
#[derive(Debug)]
pub struct Grant {
    pub access_token: Secret,
    pub expires_in: Duration,
    pub refresh_token: Option<Secret>,
    /// Who signed in: the ID token's `preferred_username`, when an ID token
    /// came with the response.
    pub sign_in_user: Option<String>,
}

/// The `preferred_username` claim of an ID token (a JWT: header, payload,
/// signature, base64url each).
///
/// The signature is not checked, on purpose: the token came straight from
/// the token endpoint over verified TLS, in answer to our own request, and
/// the proxy reads it only as an identity hint (which user signed in, so
/// that SMTP logs in as that user), never to authorise anything; Microsoft's
/// guidance for public clients allows exactly that use. A token that does
/// not parse yields `None`.
pub fn preferred_username(id_token: &str) -> Option<String> {
    let payload = id_token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let name = claims.get("preferred_username")?.as_str()?.trim();
    // An address is at most 254 characters; anything else is not a login.
    (!name.is_empty() && name.len() <= 254 && !name.chars().any(char::is_control))
        .then(|| name.to_string())
}

/// A failed grant request: what it means, and a sentence without secrets.
#[derive(Debug, Clone)]
pub struct GrantError {
    pub class: ErrorClass,
    /// The OAuth `error` code, when the provider sent one.
    pub oauth_error: Option<String>,
    /// The Entra `AADSTSnnnn` code in the error description, when there is
    /// one: it can say more than `error` does.
    pub aadsts: Option<u32>,
    pub message: String,
}

/// One configured provider, ready to request tokens.
pub struct ProviderClient {
    pub config: Provider,
    oauth: OAuthClient,
    http: reqwest::Client,
}

impl ProviderClient {
    pub fn new(config: &Provider, timeout: Duration) -> Result<Self, String> {
        let mut oauth = oauth2::Client::new(ClientId::new(config.client_id.clone()))
            .set_auth_type(AuthType::RequestBody)
            .set_auth_uri(
                AuthUrl::new(config.authorize_url.clone()).map_err(bad_url("authorize_url"))?,
            )
            .set_token_uri(TokenUrl::new(config.token_url.clone()).map_err(bad_url("token_url"))?)
            .set_device_authorization_url_option(
                config
                    .device_code_url
                    .clone()
                    .map(DeviceAuthorizationUrl::new)
                    .transpose()
                    .map_err(bad_url("device_code_url"))?,
            )
            .set_redirect_uri(
                RedirectUrl::new(config.redirect_uri.clone()).map_err(bad_url("redirect_uri"))?,
            );
        if let Some(secret) = &config.client_secret {
            oauth = oauth.set_client_secret(ClientSecret::new(secret.expose().to_string()));
        }
        let http = crate::tls::https_client(config.ca_file.as_deref(), timeout)?;
        Ok(ProviderClient {
            config: config.clone(),
            oauth,
            http,
        })
    }

    /// Redeems a refresh token (the identity provider may rotate it).
    pub async fn refresh(
        &self,
        refresh_token: &Secret,
        scopes: &[String],
    ) -> Result<Grant, GrantError> {
        let token = RefreshToken::new(refresh_token.expose().to_string());
        let response = self
            .oauth
            .exchange_refresh_token(&token)
            .add_scopes(scopes.iter().cloned().map(Scope::new))
            .request_async(&self.http)
            .await;
        self.grant(response)
    }

    /// The client credentials grant (app-only access).
    pub async fn client_credentials(&self, scopes: &[String]) -> Result<Grant, GrantError> {
        let response = self
            .oauth
            .exchange_client_credentials()
            .add_scopes(scopes.iter().cloned().map(Scope::new))
            .request_async(&self.http)
            .await;
        self.grant(response)
    }

    /// Redeems an authorization code with its PKCE verifier; `redirect` is
    /// the redirect URI the sign-in used when it is not `redirect_uri`.
    pub async fn authorization_code(
        &self,
        code: String,
        verifier: PkceCodeVerifier,
        redirect: Option<&RedirectUrl>,
    ) -> Result<Grant, GrantError> {
        let mut request = self
            .oauth
            .exchange_code(AuthorizationCode::new(code))
            .set_pkce_verifier(verifier);
        if let Some(redirect) = redirect {
            request = request.set_redirect_uri(std::borrow::Cow::Borrowed(redirect));
        }
        let response = request.request_async(&self.http).await;
        self.grant(response)
    }

    /// The URL a user opens for the authorization code flow, its CSRF state
    /// and PKCE verifier; the browser comes back to `redirect`, else to
    /// `redirect_uri`.
    pub fn authorize_url(
        &self,
        scopes: &[String],
        redirect: Option<&RedirectUrl>,
    ) -> (String, String, PkceCodeVerifier) {
        let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
        let mut request = self
            .oauth
            .authorize_url(oauth2::CsrfToken::new_random)
            .add_scopes(scopes.iter().cloned().map(Scope::new))
            .add_extra_param("prompt", "select_account")
            .set_pkce_challenge(challenge);
        if let Some(redirect) = redirect {
            request = request.set_redirect_uri(std::borrow::Cow::Borrowed(redirect));
        }
        let (url, state) = request.url();
        (url.to_string(), state.secret().clone(), verifier)
    }

    /// Starts the device authorization grant.
    pub async fn device_authorize(
        &self,
        scopes: &[String],
    ) -> Result<StandardDeviceAuthorizationResponse, GrantError> {
        let request = self.oauth.exchange_device_code().map_err(|_| GrantError {
            class: ErrorClass::AppRefused,
            oauth_error: None,
            aadsts: None,
            message: format!("provider `{}` has no device_code_url", self.config.name),
        })?;
        let response = request
            .add_scopes(scopes.iter().cloned().map(Scope::new))
            .request_async(&self.http)
            .await;
        response.map_err(|e| self.describe(e))
    }

    /// Polls the token endpoint until the user completes (or refuses) the
    /// device authorization. `sleep` is called between polls with the
    /// interval the provider asks for, so the caller can show progress.
    pub async fn device_poll<S, F>(
        &self,
        details: &StandardDeviceAuthorizationResponse,
        sleep: S,
    ) -> Result<Grant, GrantError>
    where
        S: Fn(Duration) -> F,
        F: std::future::Future<Output = ()>,
    {
        let response = self
            .oauth
            .exchange_device_access_token(details)
            .request_async(&self.http, sleep, None)
            .await;
        self.grant(response)
    }

    fn grant<T>(
        &self,
        response: Result<
            TokenResponseWithId,
            RequestTokenError<HttpClientError<reqwest::Error>, StandardErrorResponse<T>>,
        >,
    ) -> Result<Grant, GrantError>
    where
        T: oauth2::ErrorResponseType + AsRef<str> + Send + Sync + 'static,
        StandardErrorResponse<T>: ErrorResponse,
    {
        let response = response.map_err(|e| self.describe(e))?;
        let expires_in = response
            .expires_in()
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_secs(1));
        Ok(Grant {
            access_token: Secret::new(response.access_token().secret().clone()),
            expires_in,
            refresh_token: response
                .refresh_token()
                .map(|t| Secret::new(t.secret().clone())),
            sign_in_user: response
                .extra_fields()
                .id_token
                .as_deref()
                .and_then(preferred_username),
        })
    }

    /// Turns a failed request into a class and a sentence. Response bodies are
    /// never quoted: they may hold tokens.
    fn describe<T>(
        &self,
        error: RequestTokenError<HttpClientError<reqwest::Error>, StandardErrorResponse<T>>,
    ) -> GrantError
    where
        T: oauth2::ErrorResponseType + AsRef<str> + Send + Sync + 'static,
        StandardErrorResponse<T>: ErrorResponse,
    {
        let host = reqwest::Url::parse(&self.config.token_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        match error {
            RequestTokenError::ServerResponse(response) => {
                let error = response.error().as_ref().to_string();
                let description = response.error_description().cloned().unwrap_or_default();
                let code = aadsts::code_in(&description);
                let class = aadsts::classify(&error, code);
                // The description's first line is Microsoft's own explanation;
                // the rest are trace and correlation IDs.
                let first_line = description.lines().next().unwrap_or_default().trim();
                let mut message = if first_line.is_empty() {
                    format!("the identity provider answered `{error}`")
                } else {
                    format!("the identity provider answered `{error}`: {first_line}")
                };
                if let Some(fix) = code.and_then(aadsts::fix_it) {
                    message.push_str(" — ");
                    message.push_str(fix);
                }
                GrantError {
                    class,
                    oauth_error: Some(error),
                    aadsts: code,
                    message,
                }
            }
            RequestTokenError::Request(e) => GrantError {
                class: ErrorClass::Transient,
                oauth_error: None,
                aadsts: None,
                message: format!(
                    "cannot reach the identity provider at {host}: {}",
                    describe_http_error(&e)
                ),
            },
            RequestTokenError::Parse(_, _) => GrantError {
                class: ErrorClass::Transient,
                oauth_error: None,
                aadsts: None,
                message: format!(
                    "the identity provider at {host} sent an answer that is not OAuth JSON (is the endpoint URL right, or is it down?)"
                ),
            },
            RequestTokenError::Other(text) => GrantError {
                class: ErrorClass::Transient,
                oauth_error: None,
                aadsts: None,
                message: format!("the identity provider at {host} answered unexpectedly: {text}"),
            },
        }
    }
}

/// The sentence for a provider URL in the config that does not parse.
fn bad_url(key: &'static str) -> impl Fn(oauth2::url::ParseError) -> String {
    move |e| format!("`{key}` is not a valid URL ({e}); correct it in the config")
}

fn describe_http_error(e: &HttpClientError<reqwest::Error>) -> String {
    match e {
        HttpClientError::Reqwest(inner) if inner.is_timeout() => "timed out".to_string(),
        HttpClientError::Reqwest(inner) => {
            let inner = inner.as_ref();
            let text = crate::error::chain(inner);
            // reqwest names the URL; the chain's tail says why.
            text.rsplit(": ").next().unwrap_or(&text).to_string()
        }
        other => crate::error::chain(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(payload))
    }

    #[test]
    fn the_signed_in_user_is_read_from_the_id_tokens_payload() {
        let cases = [
            (
                jwt(r#"{"preferred_username":"delegate@contoso.com","name":"D"}"#),
                Some("delegate@contoso.com"),
            ),
            (jwt(r#"{"name":"no username"}"#), None),
            (jwt(r#"{"preferred_username":""}"#), None),
            (jwt(r#"{"preferred_username":"a\nb"}"#), None),
            ("not a jwt".to_string(), None),
            ("a.!!!.c".to_string(), None),
        ];
        for (token, expected) in cases {
            assert_eq!(preferred_username(&token).as_deref(), expected, "{token}");
        }
    }
}
