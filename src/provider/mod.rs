//! The OAuth 2.0 client: code exchange, refresh and the validation GET, with
//! every answer classified (README "Credential states") so that the refresher never has to look
//! at a status code.
//!
//! This file holds the client, its requests and what they give back
//! ([`Tokens`], [`Failure`]); `classify.rs` turns an answer's status,
//! headers and body into one of those, purely, so every branch is
//! unit-tested.

mod classify;

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use crate::config::{ProviderConfig, TokenAuth};
use crate::secret::Secret;

pub use classify::{classify_revocation, classify_token, classify_validation, retry_after};

/// The most we read of any provider answer: a token response is a few
/// hundred bytes; anything near this is not one.
const MAX_BODY: usize = 64 * 1024;

/// What `invalid_grant` means after a refresh_token grant.
const DEAD_REFRESH_TOKEN: &str = "the refresh token is dead or revoked";
/// What `invalid_grant` means after an authorization_code grant: codes are
/// single-use and short-lived (RFC 6749 §4.1.2).
const DEAD_CODE: &str =
    "the code was already used, has expired, or was issued for another client or redirect URI";

/// What `invalid_grant` means after a client_credentials grant: there is no
/// grant to lose, so it is the client's registration that is refused.
const DEAD_CLIENT_GRANT: &str =
    "the provider refused the client's own credentials as a grant: check the client's registration";
/// What `invalid_grant` means after a device_code grant (RFC 8628 §3.5).
const DEAD_DEVICE_CODE: &str = "the device code is unknown, used or expired";

/// The device grant's `grant_type` (RFC 8628 §3.4).
pub const DEVICE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// A device authorization answer (RFC 8628 §3.2): what the user is told,
/// and what the device polls with.
#[derive(Debug)]
pub struct DeviceCode {
    /// The device's secret: never shown.
    pub device_code: Secret,
    /// Shown to the user, who types it at `verification_uri`; short-lived
    /// and useless without the user's login.
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    /// How long the device code can be polled with.
    pub expires_in: Duration,
    /// How far apart polls must be (5 s when the provider does not say).
    pub interval: Duration,
}

/// Why a device-code poll brought no tokens (RFC 8628 §3.5).
#[derive(Debug)]
pub enum DeviceWait {
    /// `authorization_pending`: poll again after the interval.
    Pending,
    /// `slow_down`: poll again, 5 s further apart from now on.
    SlowDown,
    /// `access_denied`: the user said no.
    Denied,
    /// `expired_token`: the device code expired first.
    Expired,
    /// Anything else, classified as for any token request.
    Failed(Failure),
}

/// A token endpoint's successful answer.
#[derive(Debug)]
pub struct Tokens {
    pub access_token: Secret,
    /// None when the provider did not rotate the refresh token.
    pub refresh_token: Option<Secret>,
    pub expires_in: Option<Duration>,
    pub scope: Option<String>,
    /// Set when `token_type` is not Bearer: the access token is of no use to
    /// consumers, but a rotated refresh token in the same answer is the only
    /// one that works now, so the refresher stores the pair before it calls
    /// the credential misconfigured. The text says why.
    pub unsupported: Option<String>,
}

/// Why a request did not give us a good token (or a verdict on one).
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Validation: the provider refused the token (401): refresh now.
    Unauthorized,
    /// Validation: PandaDoc's 403, which its OpenAPI lists for authentication
    /// failures but which a plan or permission problem also gives: refresh
    /// once; from a token just refreshed for it, it is not the token.
    Forbidden,
    /// Network, timeout, 5xx, 429, garbage: says nothing about the token; retry later.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
        /// The request may have reached the provider and been acted on
        /// (no answer came back): a refresh may have rotated the token.
        outcome_unknown: bool,
        /// The provider itself looks down (a 5xx, no connection, no answer),
        /// not just unhappy with this one credential (a per-user 429): its
        /// other credentials would fare no better now.
        provider_down: bool,
    },
    /// The grant is dead (`invalid_grant`, revoked): a human must re-authorize.
    Permanent { reason: String },
    /// Our side is wrong (`invalid_client`, a rejected request): fix the config.
    Misconfigured { reason: String },
}

impl Failure {
    pub fn describe(&self) -> String {
        match self {
            Failure::Unauthorized => "the provider rejected the access token (401)".into(),
            Failure::Forbidden => "the provider refused the access token (403)".into(),
            Failure::Transient { reason, .. }
            | Failure::Permanent { reason }
            | Failure::Misconfigured { reason } => reason.clone(),
        }
    }

    fn transient(reason: impl Into<String>) -> Failure {
        Failure::Transient {
            reason: reason.into(),
            retry_after: None,
            outcome_unknown: false,
            provider_down: false,
        }
    }
}

/// One HTTP client for every provider: connections are pooled per host.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
}

impl Client {
    pub fn new() -> Result<Client, String> {
        // reqwest is built without a default crypto provider; install ring's
        // once. A second call (tests, reloads) finds it installed: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Client { http })
    }

    /// The refresh_token grant (RFC 6749 §6).
    pub async fn refresh(
        &self,
        p: &ProviderConfig,
        refresh_token: &Secret,
        timeout: Duration,
    ) -> Result<Tokens, Failure> {
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ];
        let scope = p.token_scope().filter(|_| p.refresh_scope);
        if let Some(scope) = &scope {
            form.push(("scope", scope));
        }
        self.token_request(p, form, timeout, &[refresh_token], DEAD_REFRESH_TOKEN)
            .await
    }

    /// The client_credentials grant (RFC 6749 §4.4.2), with the provider's
    /// `scope` (§4.4.2 makes it optional; a strict server wants it).
    pub async fn client_credentials(
        &self,
        p: &ProviderConfig,
        timeout: Duration,
    ) -> Result<Tokens, Failure> {
        let mut form = vec![("grant_type", "client_credentials")];
        let scope = p.token_scope();
        if let Some(scope) = &scope {
            form.push(("scope", scope));
        }
        match self
            .token_request(p, form, timeout, &[], DEAD_CLIENT_GRANT)
            .await
        {
            // No grant to lose: what the provider refuses is our client.
            Err(Failure::Permanent { reason }) => Err(Failure::Misconfigured { reason }),
            // RFC 6749 §4.4.3: a refresh token should not come; one that
            // does is not kept, since the next token comes the same way.
            Ok(tokens) => Ok(Tokens {
                refresh_token: None,
                ..tokens
            }),
            Err(f) => Err(f),
        }
    }

    /// Starts a device authorization (RFC 8628 §3.1): `client_id`, the
    /// client's authentication as configured, and the provider's `scope`.
    pub async fn device_authorization(
        &self,
        p: &ProviderConfig,
        url: &reqwest::Url,
        timeout: Duration,
    ) -> Result<DeviceCode, Failure> {
        let scope = p.token_scope();
        let mut form = vec![];
        if let Some(scope) = &scope {
            form.push(("scope", scope.as_str()));
        }
        // RFC 8628 §3.1 names client_id; with Basic it is in the header too.
        if p.token_auth == TokenAuth::ClientSecretBasic {
            form.push(("client_id", &p.client_id));
        }
        let (status, headers, body) = self.send_form(p, url, form, timeout).await?;
        if !status.is_success() {
            return Err(
                match classify_token(status, &headers, &body, &[&p.client_secret], "") {
                    Err(f) => f,
                    Ok(_) => Failure::transient(format!("device authorization: answer {status}")),
                },
            );
        }
        classify::device_code(&body, &[&p.client_secret])
    }

    /// One poll of the token endpoint with a device code (RFC 8628 §3.4).
    pub async fn device_token(
        &self,
        p: &ProviderConfig,
        device_code: &Secret,
        timeout: Duration,
    ) -> Result<Tokens, DeviceWait> {
        let mut form = vec![
            ("grant_type", DEVICE_GRANT_TYPE),
            ("device_code", device_code.expose()),
        ];
        // RFC 8628 §3.4 names client_id; with Basic it is in the header too.
        if p.token_auth == TokenAuth::ClientSecretBasic {
            form.push(("client_id", &p.client_id));
        }
        let (status, headers, body) = self
            .send_form(p, &p.token_url, form, timeout)
            .await
            .map_err(DeviceWait::Failed)?;
        if let Some(wait) = classify::device_wait(status, &body) {
            return Err(wait);
        }
        match classify_token(
            status,
            &headers,
            &body,
            &[device_code, &p.client_secret],
            DEAD_DEVICE_CODE,
        ) {
            Ok(Tokens {
                unsupported: Some(reason),
                ..
            }) => Err(DeviceWait::Failed(Failure::Misconfigured { reason })),
            Ok(tokens) => Ok(tokens),
            Err(f) => Err(DeviceWait::Failed(f)),
        }
    }

    /// Revokes `token` at the provider's revocation endpoint (RFC 7009
    /// §2.1), with `token_type_hint` (`refresh_token` or `access_token`).
    pub async fn revoke(
        &self,
        p: &ProviderConfig,
        url: &reqwest::Url,
        token: &Secret,
        hint: &str,
        timeout: Duration,
    ) -> Result<(), Failure> {
        let form = vec![("token", token.expose()), ("token_type_hint", hint)];
        let (status, headers, body) = self.send_form(p, url, form, timeout).await?;
        classify_revocation(status, &headers, &body, &[token, &p.client_secret])
    }

    /// The authorization_code grant (RFC 6749 §4.1.3).
    pub async fn exchange_code(
        &self,
        p: &ProviderConfig,
        code: &Secret,
        pkce_verifier: Option<&Secret>,
        timeout: Duration,
    ) -> Result<Tokens, Failure> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
        ];
        let scope = p.token_scope();
        if let Some(scope) = &scope {
            form.push(("scope", scope));
        }
        // PandaDoc's schema has no redirect_uri field; RFC 6749 requires it
        // when the authorization request carried one, so others get it.
        let redirect = p.redirect_uri.as_ref().map(|u| u.to_string());
        if p.preset.is_none()
            && let Some(r) = &redirect
        {
            form.push(("redirect_uri", r));
        }
        if let Some(v) = pkce_verifier {
            form.push(("code_verifier", v.expose()));
        }
        let tokens = self
            .token_request(p, form, timeout, &[code], DEAD_CODE)
            .await?;
        // Nothing is stored yet and the code is spent: a human runs the
        // authorization again once the provider is fixed.
        match tokens.unsupported {
            Some(reason) => Err(Failure::Misconfigured { reason }),
            None => Ok(tokens),
        }
    }

    async fn token_request(
        &self,
        p: &ProviderConfig,
        form: Vec<(&str, &str)>,
        timeout: Duration,
        sent: &[&Secret],
        dead: &str,
    ) -> Result<Tokens, Failure> {
        let mut secrets: Vec<&Secret> = sent.to_vec();
        secrets.push(&p.client_secret);
        let (status, headers, body) = self.send_form(p, &p.token_url, form, timeout).await?;
        classify_token(status, &headers, &body, &secrets, dead)
    }

    /// POSTs `form` to `url` with the client's authentication as configured
    /// (`token_auth`): every request to the token, device authorization and
    /// revocation endpoints authenticates the same way (RFC 6749 §2.3.1).
    async fn send_form(
        &self,
        p: &ProviderConfig,
        url: &reqwest::Url,
        mut form: Vec<(&str, &str)>,
        timeout: Duration,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), Failure> {
        let mut req = self.http.post(url.clone()).timeout(timeout);
        // PandaDoc's field order: grant_type, client_id, client_secret, …
        let at = form.len().min(1);
        match p.token_auth {
            TokenAuth::ClientSecretPost => {
                form.insert(at, ("client_id", &p.client_id));
                form.insert(at + 1, ("client_secret", p.client_secret.expose()));
            }
            TokenAuth::ClientSecretBasic => {
                req = req.basic_auth(
                    form_encode(&p.client_id),
                    Some(form_encode(p.client_secret.expose())),
                );
            }
        }
        let resp = req
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await;
        read(resp).await
    }

    /// The cheap GET that tells whether an access token still works.
    pub async fn validate(
        &self,
        p: &ProviderConfig,
        access_token: &Secret,
        timeout: Duration,
    ) -> Result<(), Failure> {
        let resp = self
            .http
            .get(p.validate_url.clone())
            .timeout(timeout)
            .bearer_auth(access_token.expose())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await;
        let (status, headers, body) = read(resp).await?;
        classify_validation(status, &headers, &body, p.preset.is_some())
    }
}

/// application/x-www-form-urlencoded, one value: alphanumerics and `*-._`
/// stay, a space is '+', everything else is %XX. RFC 6749 §2.3.1 has Basic
/// client credentials form-encoded first; the authorization URL's query is
/// written with it too.
pub(crate) fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn read(
    resp: reqwest::Result<reqwest::Response>,
) -> Result<(StatusCode, HeaderMap, Vec<u8>), Failure> {
    let mut resp = resp.map_err(|e| transport_failure(&e))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(Failure::Transient {
                        reason: format!(
                            "the provider's answer ({status}) is larger than {MAX_BODY} bytes"
                        ),
                        retry_after: None,
                        // Unread, a success (or a gateway's 502 or 504) may
                        // hold a rotated token, as in classify.rs; a plain
                        // error did nothing.
                        outcome_unknown: !(status.is_client_error()
                            || (status.is_server_error()
                                && status != StatusCode::BAD_GATEWAY
                                && status != StatusCode::GATEWAY_TIMEOUT)),
                        provider_down: status.is_server_error(),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(transport_failure(&e)),
        }
    }
    Ok((status, headers, body))
}

fn transport_failure(e: &reqwest::Error) -> Failure {
    // reqwest's messages carry the URL, never the form or the headers.
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    Failure::Transient {
        reason: if e.is_timeout() {
            format!("no answer within the request timeout ({reason})")
        } else {
            reason
        },
        retry_after: None,
        // Connect errors happen before anything was sent.
        outcome_unknown: !e.is_connect(),
        provider_down: true,
    }
}

#[cfg(test)]
mod tests;
