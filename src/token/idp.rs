//! Identity-platform client: refresh-token and device-code grants through the
//! `oauth2` crate, driven by authswap's own hyper + rustls client (one HTTP
//! stack in the binary). Microsoft's error bodies (`error_codes`) and the
//! HTTP status / `Retry-After` of each answer feed the classification in
//! [`super::error`]. Browser sign-in (authorization code + PKCE S256) builds
//! its authorization URL and redeems the code here too; the ID token that
//! comes with the code is read by [`super::id_token`].

use super::error::{classify, IdpError};
use crate::config::IdpConfig;
use crate::secret::Secret;
use crate::tls::{BoxError, HttpsClient};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use oauth2::basic::{
    BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AsyncHttpClient, AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    DeviceAuthorizationUrl, EndpointNotSet, EndpointSet, HttpRequest, HttpResponse,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    StandardDeviceAuthorizationResponse, StandardRevocableToken, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

/// Largest identity-platform response accepted.
const MAX_RESPONSE: usize = 1024 * 1024;

/// Microsoft's error body: the standard fields plus `error_codes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MsErrorResponse {
    /// OAuth error code (`invalid_grant`, ...).
    pub error: String,
    /// Human-readable text (`AADSTS70008: ...`).
    #[serde(default)]
    pub error_description: Option<String>,
    /// Numeric AADSTS codes.
    #[serde(default)]
    pub error_codes: Vec<u32>,
    /// Microsoft's correlation id (for support requests).
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// Microsoft's trace id.
    #[serde(default)]
    pub trace_id: Option<String>,
}

impl fmt::Display for MsErrorResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        if let Some(d) = &self.error_description {
            write!(f, ": {}", super::error::summarize(d))?;
        }
        Ok(())
    }
}

impl oauth2::ErrorResponse for MsErrorResponse {}

/// A token response, lenient where real servers differ from RFC 6749:
/// `expires_in` as a number or a string (v1 endpoints, ADFS), `token_type`
/// in any case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MsTokenResponse {
    access_token: oauth2::AccessToken,
    #[serde(deserialize_with = "de_token_type", serialize_with = "ser_token_type")]
    token_type: BasicTokenType,
    #[serde(default, deserialize_with = "de_lenient_u64")]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<oauth2::RefreshToken>,
    /// OpenID Connect ID token (when `openid` was asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<Secret>,
}

impl TokenResponse for MsTokenResponse {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &oauth2::AccessToken {
        &self.access_token
    }

    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }

    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }

    fn refresh_token(&self) -> Option<&oauth2::RefreshToken> {
        self.refresh_token.as_ref()
    }

    fn scopes(&self) -> Option<&Vec<Scope>> {
        None
    }
}

fn de_token_type<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BasicTokenType, D::Error> {
    let s = String::deserialize(d)?;
    Ok(match s.to_ascii_lowercase().as_str() {
        "bearer" => BasicTokenType::Bearer,
        "mac" => BasicTokenType::Mac,
        _ => BasicTokenType::Extension(s),
    })
}

fn ser_token_type<S: serde::Serializer>(t: &BasicTokenType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.as_ref())
}

fn de_lenient_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        F(f64),
        S(String),
    }
    Ok(match Option::<Raw>::deserialize(d)? {
        None => None,
        Some(Raw::N(n)) => Some(n),
        Some(Raw::F(f)) if f >= 0.0 => Some(f as u64),
        Some(Raw::F(_)) => None,
        Some(Raw::S(s)) => s.trim().parse().ok(),
    })
}

type MsClient = oauth2::Client<
    MsErrorResponse,
    MsTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// Tokens returned by a successful grant.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    /// The access token.
    pub access_token: Secret,
    /// Its lifetime (`expires_in`).
    pub expires_in: Duration,
    /// A rotated refresh token, when the platform sent one.
    pub refresh_token: Option<Secret>,
    /// The ID token, when `openid` was among the scopes (sign-in grants).
    pub id_token: Option<Secret>,
}

/// Scopes OpenID Connect sign-ins add to the resource scopes: an ID token
/// naming the account, and a refresh token.
pub const SIGNIN_SCOPES: [&str; 3] = ["openid", "profile", "offline_access"];

/// `scopes` plus [`SIGNIN_SCOPES`], without duplicates, in order.
pub fn with_signin_scopes(scopes: &[String]) -> Vec<String> {
    let mut all: Vec<String> = scopes.to_vec();
    for s in SIGNIN_SCOPES {
        if !all.iter().any(|x| x == s) {
            all.push(s.to_owned());
        }
    }
    all
}

/// What an authorization request carries besides the client's settings.
#[derive(Clone)]
pub struct AuthorizeParams<'a> {
    /// Registered redirect URI (`{public_url}/callback`).
    pub redirect_uri: &'a str,
    /// Scopes (resource scopes plus [`SIGNIN_SCOPES`]).
    pub scopes: &'a [String],
    /// The `state` value bound to this sign-in.
    pub state: &'a Secret,
    /// PKCE code verifier; its S256 challenge goes into the URL.
    pub verifier: &'a Secret,
    /// OpenID Connect nonce expected back in the ID token.
    pub nonce: &'a str,
    /// `login_hint`: the invited mailbox.
    pub login_hint: &'a str,
}

impl fmt::Debug for AuthorizeParams<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizeParams")
            .field("redirect_uri", &self.redirect_uri)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// What the identity platform said when it refused something, for the
/// person's page and the administrator (no secrets: codes and ids only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlatformDetails {
    /// OAuth `error` (`invalid_grant`, `access_denied`, ...).
    pub error: String,
    /// The first AADSTS code, if any.
    pub aadsts: Option<u32>,
    /// Correlation id, if given.
    pub correlation_id: Option<String>,
    /// Trace id, if given.
    pub trace_id: Option<String>,
}

/// A refused or failed code redemption: the classification plus what the
/// platform said.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{class}")]
pub struct CodeError {
    /// How the failure is classified.
    pub class: IdpError,
    /// The platform's codes (empty when it did not answer).
    pub details: PlatformDetails,
}

/// A fresh random value for `state`, PKCE verifiers and nonces: 32 random
/// bytes, base64url (43 characters, as RFC 7636 asks of verifiers).
pub fn random_token() -> Secret {
    use base64::Engine;
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// A device-code login in progress: show `verification_uri` and `user_code`.
#[derive(Debug)]
pub struct DeviceLogin {
    details: StandardDeviceAuthorizationResponse,
}

impl DeviceLogin {
    /// Where the person signs in.
    pub fn verification_uri(&self) -> &str {
        self.details.verification_uri().as_str()
    }

    /// The code the person types.
    pub fn user_code(&self) -> &str {
        self.details.user_code().secret()
    }

    /// How long the code is valid.
    pub fn expires_in(&self) -> Duration {
        self.details.expires_in()
    }

    /// Polling interval asked for by the platform.
    pub fn interval(&self) -> Duration {
        self.details.interval()
    }
}

/// Transport failure of one identity-platform request.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Could not connect, TLS failed, or the connection broke.
    #[error("cannot reach the identity platform: {0}")]
    Connect(String),
    /// No answer in time.
    #[error("the identity platform did not answer within {0:?}")]
    Timeout(Duration),
    /// Answer larger than allowed.
    #[error("identity platform response too large")]
    TooLarge,
}

/// One request's HTTP adapter for `oauth2`, remembering the last status and
/// `Retry-After` (the crate does not expose them in its errors).
struct Exchange<'a> {
    http: &'a HttpsClient,
    timeout: Duration,
    last: Mutex<(Option<u16>, Option<Duration>)>,
}

impl<'a> Exchange<'a> {
    fn new(http: &'a HttpsClient, timeout: Duration) -> Self {
        Exchange {
            http,
            timeout,
            last: Mutex::new((None, None)),
        }
    }

    fn last(&self) -> (Option<u16>, Option<Duration>) {
        self.last.lock().map(|g| *g).unwrap_or((None, None))
    }

    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, TransportError> {
        let (parts, body) = request.into_parts();
        let body: crate::tls::OutBody = Full::new(Bytes::from(body))
            .map_err(|never| -> BoxError { match never {} })
            .boxed_unsync();
        let request = http::Request::from_parts(parts, body);
        let timeout = self.timeout;
        let work = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| TransportError::Connect(error_chain(&e)))?;
            let (parts, body) = response.into_parts();
            let retry_after = parts
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            if let Ok(mut g) = self.last.lock() {
                *g = (Some(parts.status.as_u16()), retry_after);
            }
            let bytes = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        TransportError::TooLarge
                    } else {
                        TransportError::Connect(e.to_string())
                    }
                })?
                .to_bytes();
            Ok(http::Response::from_parts(parts, bytes.to_vec()))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| TransportError::Timeout(timeout))?
    }
}

impl<'c> AsyncHttpClient<'c> for Exchange<'_> {
    type Error = TransportError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, TransportError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// Formats an error with its sources (hyper hides the cause otherwise).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// Client for the identity platform's token and device-code endpoints.
pub struct IdpClient {
    client: Option<MsClient>,
    http: HttpsClient,
    timeout: Duration,
    /// A certificate credential: every token request carries a fresh
    /// client assertion signed with it.
    certificate: Option<Certificate>,
}

struct Certificate {
    cert: std::sync::Arc<super::assertion::AppCertificate>,
    algorithm: crate::config::AssertionAlgorithm,
    client_id: String,
    token_url: String,
}

/// The `client_assertion_type` of JWT client assertions (RFC 7523).
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

impl fmt::Debug for IdpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdpClient")
            .field("configured", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl IdpClient {
    /// Builds the client; with an empty `client_id` every call answers
    /// [`IdpError::NotConfigured`].
    pub fn new(config: &IdpConfig, http: HttpsClient) -> IdpClient {
        let client = if config.client_id.trim().is_empty() {
            None
        } else {
            // URLs were validated when the configuration was loaded.
            let build = || -> Result<MsClient, url::ParseError> {
                let mut c = oauth2::Client::new(ClientId::new(config.client_id.trim().to_owned()))
                    .set_auth_uri(AuthUrl::new(config.authorize_url())?)
                    .set_device_authorization_url(DeviceAuthorizationUrl::new(
                        config.device_code_url(),
                    )?)
                    .set_token_uri(TokenUrl::new(config.token_url())?)
                    .set_auth_type(AuthType::RequestBody);
                if let Some(secret) = &config.client_secret {
                    c = c.set_client_secret(ClientSecret::new(secret.expose().to_owned()));
                }
                Ok(c)
            };
            build().ok()
        };
        IdpClient {
            client,
            http,
            timeout: config.timeout,
            certificate: None,
        }
    }

    /// Authenticates every token request with a client assertion signed by
    /// `cert` (a certificate credential) instead of a secret.
    pub fn with_certificate(
        mut self,
        cert: std::sync::Arc<super::assertion::AppCertificate>,
        algorithm: crate::config::AssertionAlgorithm,
    ) -> IdpClient {
        let (client_id, token_url) = match &self.client {
            Some(c) => (
                c.client_id().as_str().to_owned(),
                c.token_uri().as_str().to_owned(),
            ),
            None => (String::new(), String::new()),
        };
        self.certificate = Some(Certificate {
            cert,
            algorithm,
            client_id,
            token_url,
        });
        self
    }

    fn client(&self) -> Result<&MsClient, IdpError> {
        self.client.as_ref().ok_or(IdpError::NotConfigured)
    }

    /// The client-assertion parameters of the next token request (empty
    /// without a certificate credential).
    fn assertion(&self) -> Result<Vec<(&'static str, String)>, IdpError> {
        let Some(c) = &self.certificate else {
            return Ok(Vec::new());
        };
        let jwt = c
            .cert
            .assertion(&c.client_id, &c.token_url, c.algorithm)
            .map_err(|e| IdpError::AppCredential {
                code: None,
                message: format!("cannot sign the client assertion: {e}"),
            })?;
        Ok(vec![
            ("client_assertion_type", JWT_BEARER_ASSERTION.to_owned()),
            ("client_assertion", jwt.expose().to_owned()),
        ])
    }

    /// An app-only access token (client-credentials grant) for `scopes`
    /// (a resource's `/.default`), authenticated with the tenant's secret
    /// or certificate.
    pub async fn app_token(&self, scopes: &[String]) -> Result<TokenGrant, IdpError> {
        let client = self.client()?;
        let extra = self.assertion()?;
        let exchange = Exchange::new(&self.http, self.timeout);
        let mut request = client
            .exchange_client_credentials()
            .add_scopes(scopes.iter().map(|s| Scope::new(s.clone())));
        for (k, v) in extra {
            request = request.add_extra_param(k, v);
        }
        match request.request_async(&exchange).await {
            Ok(resp) => Ok(grant(&resp)),
            Err(e) => Err(map_error(e, exchange.last(), |r: &MsErrorResponse| {
                (
                    r.error.clone(),
                    r.error_description.clone().unwrap_or_default(),
                    r.error_codes.clone(),
                )
            })),
        }
    }

    /// Exchanges a refresh token for an access token (and usually a rotated
    /// refresh token).
    pub async fn refresh(
        &self,
        refresh_token: &Secret,
        scopes: &[String],
    ) -> Result<TokenGrant, IdpError> {
        let client = self.client()?;
        let extra = self.assertion()?;
        let exchange = Exchange::new(&self.http, self.timeout);
        let rt = RefreshToken::new(refresh_token.expose().to_owned());
        let mut request = client
            .exchange_refresh_token(&rt)
            .add_scopes(scopes.iter().map(|s| Scope::new(s.clone())));
        for (k, v) in extra {
            request = request.add_extra_param(k, v);
        }
        let result = request.request_async(&exchange).await;
        match result {
            Ok(resp) => Ok(grant(&resp)),
            Err(e) => Err(map_error(e, exchange.last(), |r: &MsErrorResponse| {
                (
                    r.error.clone(),
                    r.error_description.clone().unwrap_or_default(),
                    r.error_codes.clone(),
                )
            })),
        }
    }

    /// The authorization URL of a browser sign-in: authorization code with
    /// PKCE (S256), `state`, `nonce`, `login_hint`, `prompt=select_account`
    /// and `response_mode=query`.
    pub fn authorization_url(&self, p: &AuthorizeParams<'_>) -> Result<String, IdpError> {
        let client = self.client()?;
        let redirect =
            RedirectUrl::new(p.redirect_uri.to_owned()).map_err(|e| IdpError::Configuration {
                message: format!("bad redirect URI: {e}"),
            })?;
        let challenge = PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(
            p.verifier.expose().to_owned(),
        ));
        let state = p.state.expose().to_owned();
        let (url, _) = client
            .authorize_url(move || CsrfToken::new(state))
            .set_redirect_uri(Cow::Owned(redirect))
            .set_pkce_challenge(challenge)
            .add_scopes(p.scopes.iter().map(|s| Scope::new(s.clone())))
            .add_extra_param("nonce", p.nonce.to_owned())
            .add_extra_param("login_hint", p.login_hint.to_owned())
            .add_extra_param("prompt", "select_account")
            .add_extra_param("response_mode", "query")
            .url();
        Ok(url.into())
    }

    /// Redeems an authorization code with its PKCE verifier (and the client
    /// secret for confidential clients).
    pub async fn redeem_code(
        &self,
        code: &Secret,
        verifier: &Secret,
        redirect_uri: &str,
    ) -> Result<TokenGrant, CodeError> {
        let client = self.client().map_err(|class| CodeError {
            class,
            details: PlatformDetails::default(),
        })?;
        let redirect = RedirectUrl::new(redirect_uri.to_owned()).map_err(|e| CodeError {
            class: IdpError::Configuration {
                message: format!("bad redirect URI: {e}"),
            },
            details: PlatformDetails::default(),
        })?;
        let extra = self.assertion().map_err(|class| CodeError {
            class,
            details: PlatformDetails::default(),
        })?;
        let exchange = Exchange::new(&self.http, self.timeout);
        let mut request = client
            .exchange_code(AuthorizationCode::new(code.expose().to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.expose().to_owned()))
            .set_redirect_uri(Cow::Owned(redirect));
        for (k, v) in extra {
            request = request.add_extra_param(k, v);
        }
        let result = request.request_async(&exchange).await;
        match result {
            Ok(resp) => Ok(grant(&resp)),
            Err(e) => {
                let details = match &e {
                    RequestTokenError::ServerResponse(r) => PlatformDetails {
                        error: r.error.clone(),
                        aadsts: r
                            .error_codes
                            .first()
                            .copied()
                            .or_else(|| r.error_description.as_deref().and_then(first_aadsts)),
                        correlation_id: r.correlation_id.clone(),
                        trace_id: r.trace_id.clone(),
                    },
                    _ => PlatformDetails::default(),
                };
                let class = map_error(e, exchange.last(), |r: &MsErrorResponse| {
                    (
                        r.error.clone(),
                        r.error_description.clone().unwrap_or_default(),
                        r.error_codes.clone(),
                    )
                });
                Err(CodeError { class, details })
            }
        }
    }

    /// Starts a device-code login for `scopes`.
    pub async fn start_device_login(&self, scopes: &[String]) -> Result<DeviceLogin, IdpError> {
        let client = self.client()?;
        let exchange = Exchange::new(&self.http, self.timeout);
        let result = client
            .exchange_device_code()
            .add_scopes(scopes.iter().map(|s| Scope::new(s.clone())))
            .request_async(&exchange)
            .await;
        match result {
            Ok(details) => Ok(DeviceLogin { details }),
            Err(e) => Err(map_error(e, exchange.last(), |r: &MsErrorResponse| {
                (
                    r.error.clone(),
                    r.error_description.clone().unwrap_or_default(),
                    r.error_codes.clone(),
                )
            })),
        }
    }

    /// Polls until the person has signed in (honouring the interval and
    /// `slow_down`), the code expires, or the login is declined. `waiting`
    /// is called before each pause with the time left on the code.
    pub async fn finish_device_login(
        &self,
        login: &DeviceLogin,
        waiting: impl Fn(Duration) + Send + Sync,
    ) -> Result<TokenGrant, IdpError> {
        let client = self.client()?;
        let exchange = Exchange::new(&self.http, self.timeout);
        let deadline = tokio::time::Instant::now() + login.expires_in();
        let result = client
            .exchange_device_access_token(&login.details)
            .request_async(
                &exchange,
                |pause: Duration| {
                    waiting(deadline.saturating_duration_since(tokio::time::Instant::now()));
                    tokio::time::sleep(pause)
                },
                None,
            )
            .await;
        match result {
            Ok(resp) => Ok(grant(&resp)),
            Err(e) => Err(map_error(e, exchange.last(), |r| {
                let error = match r.error() {
                    oauth2::DeviceCodeErrorResponseType::ExpiredToken => "expired_token".to_owned(),
                    oauth2::DeviceCodeErrorResponseType::AccessDenied => "access_denied".to_owned(),
                    other => serde_json::to_value(other)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_else(|| format!("{other:?}")),
                };
                let description = r.error_description().cloned().unwrap_or_default();
                (error, description, Vec::new())
            }))
            .map_err(|e| match e {
                IdpError::Transient { message, .. } if message.contains("Device code expired") => {
                    IdpError::Reauth {
                        error: "expired_token".into(),
                        message: "the code expired before sign-in finished".into(),
                    }
                }
                other => other,
            }),
        }
    }
}

/// The first `AADSTSnnnn` code in a text.
pub fn first_aadsts(text: &str) -> Option<u32> {
    let i = text.find("AADSTS")?;
    let digits: String = text[i + 6..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn grant(resp: &MsTokenResponse) -> TokenGrant {
    TokenGrant {
        access_token: Secret::new(resp.access_token().secret().clone()),
        expires_in: resp.expires_in().unwrap_or(Duration::from_secs(600)),
        refresh_token: resp
            .refresh_token()
            .map(|t| Secret::new(t.secret().clone())),
        id_token: resp.id_token.clone(),
    }
}

fn map_error<T: oauth2::ErrorResponse>(
    e: RequestTokenError<TransportError, T>,
    last: (Option<u16>, Option<Duration>),
    fields: impl Fn(&T) -> (String, String, Vec<u32>),
) -> IdpError {
    let (status, retry_after) = last;
    match e {
        RequestTokenError::ServerResponse(r) => {
            let (error, description, codes) = fields(&r);
            match error.as_str() {
                // Device flow outcomes that are not about the refresh token.
                "authorization_declined" | "access_denied" => IdpError::Reauth {
                    error,
                    message: "the sign-in was declined".into(),
                },
                "expired_token" => IdpError::Reauth {
                    error,
                    message: "the code expired before sign-in finished".into(),
                },
                "bad_verification_code" => IdpError::Reauth {
                    error,
                    message: "the identity platform did not recognise the device code".into(),
                },
                _ => classify(status, &error, &description, &codes, retry_after),
            }
        }
        RequestTokenError::Request(t) => IdpError::Transient {
            message: t.to_string(),
            retry_after,
        },
        // Never include the body: a success body that failed to parse could
        // hold tokens.
        RequestTokenError::Parse(_, _) => match status {
            Some(s) if s == 429 || s >= 500 => IdpError::Transient {
                message: format!("identity platform answered HTTP {s}"),
                retry_after,
            },
            Some(s) => {
                IdpError::transient(format!("unexpected identity platform response (HTTP {s})"))
            }
            None => IdpError::transient("unexpected identity platform response"),
        },
        RequestTokenError::Other(msg) => match status {
            Some(s) if s == 429 || s >= 500 => IdpError::Transient {
                message: format!("identity platform answered HTTP {s}"),
                retry_after,
            },
            _ => IdpError::Transient {
                message: msg,
                retry_after,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses_are_parsed_leniently() {
        let r: MsTokenResponse = serde_json::from_str(
            r#"{"token_type":"bearer","expires_in":"3599","access_token":"a","refresh_token":"r","scope":"x y","foo":1}"#,
        )
        .unwrap();
        assert_eq!(r.expires_in(), Some(Duration::from_secs(3599)));
        assert_eq!(*r.token_type(), BasicTokenType::Bearer);
        let r: MsTokenResponse =
            serde_json::from_str(r#"{"token_type":"Bearer","expires_in":3600,"access_token":"a"}"#)
                .unwrap();
        assert_eq!(r.expires_in(), Some(Duration::from_secs(3600)));
        assert!(r.refresh_token().is_none());
        assert!(!format!("{r:?}").contains("\"a\""));
    }
}
