//! The OAuth 2.0 client: code exchange, refresh and the validation GET, with
//! every answer classified (README "Credential states") so that the refresher never has to look
//! at a status code.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;

use crate::config::{ProviderConfig, TokenAuth};
use crate::secret::{Secret, redact};

/// The most we read of any provider answer: a token response is a few
/// hundred bytes; anything near this is not one.
const MAX_BODY: usize = 64 * 1024;

/// What `invalid_grant` means after a refresh_token grant.
const DEAD_REFRESH_TOKEN: &str = "the refresh token is dead or revoked";
/// What `invalid_grant` means after an authorization_code grant: codes are
/// single-use and short-lived (RFC 6749 §4.1.2).
const DEAD_CODE: &str =
    "the code was already used, has expired, or was issued for another client or redirect URI";

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
        mut form: Vec<(&str, &str)>,
        timeout: Duration,
        sent: &[&Secret],
        dead: &str,
    ) -> Result<Tokens, Failure> {
        let mut req = self.http.post(p.token_url.clone()).timeout(timeout);
        match p.token_auth {
            TokenAuth::ClientSecretPost => {
                // PandaDoc's field order: grant_type, client_id, client_secret, …
                form.insert(1, ("client_id", &p.client_id));
                form.insert(2, ("client_secret", p.client_secret.expose()));
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
        let mut secrets: Vec<&Secret> = sent.to_vec();
        secrets.push(&p.client_secret);
        let (status, headers, body) = match read(resp).await {
            Ok(r) => r,
            Err(f) => return Err(f),
        };
        classify_token(status, &headers, &body, &secrets, dead)
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
                    return Err(Failure::transient(format!(
                        "the provider's answer ({status}) is larger than {MAX_BODY} bytes"
                    )));
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

/// Seconds or an HTTP date (RFC 9110 §10.2.3); capped at a day, since a
/// provider that says "come back next year" is more likely broken than right.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(v).ok()?;
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    };
    Some(d.min(Duration::from_secs(86_400)))
}

#[derive(Deserialize)]
struct RawTokens {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    scope: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawError {
    error: Option<String>,
    error_description: Option<String>,
}

/// Provider text fit for a message: secrets redacted first (so that cutting
/// cannot leave a piece of one), then cut to 200 characters on one line.
fn snippet(body: &[u8], secrets: &[&Secret]) -> String {
    let text = redact(&String::from_utf8_lossy(body), secrets);
    let one_line: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    one_line.trim().to_owned()
}

fn status_failure(status: StatusCode, headers: &HeaderMap, what: &str) -> Option<Failure> {
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT {
        return Some(Failure::Transient {
            reason: format!("{what}: rate limited ({status})"),
            retry_after: retry_after(headers),
            outcome_unknown: false,
            // PandaDoc's limits are per user: one user's 429 says nothing
            // about the others.
            provider_down: false,
        });
    }
    if status.is_server_error() {
        return Some(Failure::Transient {
            reason: format!("{what}: provider error ({status})"),
            retry_after: retry_after(headers),
            // A 5xx from a gateway may hide a refresh the backend performed.
            outcome_unknown: status == StatusCode::BAD_GATEWAY
                || status == StatusCode::GATEWAY_TIMEOUT,
            provider_down: true,
        });
    }
    None
}

/// Classifies a token endpoint answer. Pure, so every branch is unit-tested.
/// `dead` says what an `invalid_grant` means for the grant that was sent.
pub fn classify_token(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[&Secret],
    dead: &str,
) -> Result<Tokens, Failure> {
    const WHAT: &str = "token endpoint";
    if let Some(f) = status_failure(status, headers, WHAT) {
        return Err(f);
    }
    if status.is_success() {
        let Ok(raw) = serde_json::from_slice::<RawTokens>(body) else {
            // Not a byte of the body: a truncated or mangled success answer
            // may hold the new tokens, and this text goes to the log and
            // the status.
            let kind = headers
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|t| format!(" of {}", snippet(t.as_bytes(), secrets)))
                .unwrap_or_default();
            // A success the provider acted on: the refresh token it rotated
            // may be in the part we could not read.
            return Err(Failure::Transient {
                reason: format!(
                    "{WHAT}: answer {status} is not a JSON token response ({} bytes{kind})",
                    body.len()
                ),
                retry_after: None,
                outcome_unknown: true,
                provider_down: false,
            });
        };
        let Some(access_token) = raw.access_token.filter(|t| !t.is_empty()) else {
            return Err(Failure::Transient {
                reason: format!("{WHAT}: answer {status} has no access_token"),
                retry_after: None,
                outcome_unknown: true,
                provider_down: false,
            });
        };
        let unsupported = raw
            .token_type
            .as_deref()
            .filter(|tt| !tt.eq_ignore_ascii_case("bearer"))
            .map(|tt| {
                format!(
                    "{WHAT}: token_type {:?} is not supported (only Bearer)",
                    snippet(tt.as_bytes(), secrets)
                )
            });
        let expires_in = match raw.expires_in {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(_) => None,
        }
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(10.0 * 365.0 * 86_400.0)));
        // scope is informational: PandaDoc has answered "read write read+write".
        let scope = match raw.scope {
            Some(serde_json::Value::String(s)) => Some(s),
            _ => None,
        };
        return Ok(Tokens {
            access_token: Secret::new(access_token),
            refresh_token: raw.refresh_token.filter(|t| !t.is_empty()).map(Secret::new),
            expires_in,
            scope,
            unsupported,
        });
    }
    let err = serde_json::from_slice::<RawError>(body).ok();
    let code = err.as_ref().and_then(|e| e.error.clone());
    let desc = err
        .and_then(|e| e.error_description)
        .map(|d| format!(" ({})", snippet(d.as_bytes(), secrets)))
        .unwrap_or_default();
    match code.as_deref() {
        Some("invalid_grant") => Err(Failure::Permanent {
            reason: format!("{WHAT}: invalid_grant{desc}: {dead}"),
        }),
        Some(
            c @ ("invalid_client"
            | "unauthorized_client"
            | "unsupported_grant_type"
            | "invalid_scope"
            | "invalid_request"),
        ) => Err(Failure::Misconfigured {
            reason: format!("{WHAT}: {c}{desc}: check the provider's client_id, secret and scope"),
        }),
        // `temporarily_unavailable`, `server_error`, `slow_down` or a code of
        // the provider's own: nothing says the grant is dead, and calling it
        // dead would take a live token away from its consumers.
        Some(other) if status != StatusCode::UNAUTHORIZED => Err(Failure::transient(format!(
            "{WHAT}: {} ({status}){desc}",
            snippet(other.as_bytes(), secrets)
        ))),
        _ if status == StatusCode::UNAUTHORIZED => Err(Failure::Misconfigured {
            reason: format!("{WHAT}: client authentication failed ({status})"),
        }),
        _ => Err(Failure::transient(format!(
            "{WHAT}: unexpected answer {status}: {:?}",
            snippet(body, secrets)
        ))),
    }
}

/// Classifies a validation answer: only a 401 (and PandaDoc's 403 for
/// authentication failures) says the token is bad; anything unexpected says
/// nothing about it.
pub fn classify_validation(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    pandadoc: bool,
) -> Result<(), Failure> {
    const WHAT: &str = "validation";
    if let Some(f) = status_failure(status, headers, WHAT) {
        return Err(f);
    }
    if status == StatusCode::UNAUTHORIZED {
        return Err(Failure::Unauthorized);
    }
    if pandadoc && status == StatusCode::FORBIDDEN {
        return Err(Failure::Forbidden);
    }
    if status.is_success() {
        // A captive portal or a proxy answers 200 with HTML: that is no verdict.
        return match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(_) => Ok(()),
            Err(_) => Err(Failure::transient(format!(
                "{WHAT}: answer {status} is not JSON"
            ))),
        };
    }
    Err(Failure::transient(format!(
        "{WHAT}: unexpected answer {status}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn tok(status: u16, body: &str) -> Result<Tokens, Failure> {
        classify_token(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            body.as_bytes(),
            &[],
            DEAD_REFRESH_TOKEN,
        )
    }

    #[test]
    fn pandadoc_answer_is_parsed() {
        let t = tok(
            200,
            r#"{"access_token":"a","token_type":"Bearer","expires_in":31535999,"refresh_token":"r","scope":"read write read+write"}"#,
        )
        .unwrap();
        assert_eq!(t.access_token.expose(), "a");
        assert_eq!(t.refresh_token.unwrap().expose(), "r");
        assert_eq!(t.expires_in, Some(Duration::from_secs(31_535_999)));
        assert_eq!(t.scope.as_deref(), Some("read write read+write"));
    }

    #[test]
    fn token_errors_are_classified() {
        assert!(matches!(
            tok(400, r#"{"error":"invalid_grant"}"#),
            Err(Failure::Permanent { .. })
        ));
        assert!(matches!(
            tok(401, r#"{"error":"invalid_client"}"#),
            Err(Failure::Misconfigured { .. })
        ));
        assert!(matches!(
            tok(401, "nope"),
            Err(Failure::Misconfigured { .. })
        ));
        for (status, body) in [
            (200, "<html>"),
            (200, r#"{"access_token":"#),
            (200, r#"{"token_type":"Bearer"}"#),
            (500, ""),
            (503, "{}"),
            (429, r#"{"type":"throttled"}"#),
            (404, "not found"),
            (400, "garbage"),
        ] {
            assert!(
                matches!(tok(status, body), Err(Failure::Transient { .. })),
                "{status} {body}"
            );
        }
    }

    #[test]
    fn a_broken_success_answer_is_not_echoed() {
        // Cut off after the access token: the body holds a live token.
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let body = br#"{"access_token":"at-secret-123","token_type":"Bea"#;
        let f = classify_token(StatusCode::OK, &h, body, &[], DEAD_REFRESH_TOKEN).unwrap_err();
        let text = f.describe();
        assert!(!text.contains("at-secret"), "{text}");
        assert!(
            text.ends_with("is not a JSON token response (49 bytes of application/json)"),
            "{text}"
        );
    }

    #[test]
    fn invalid_grant_says_what_died() {
        let dead = |what| {
            classify_token(
                StatusCode::BAD_REQUEST,
                &HeaderMap::new(),
                br#"{"error":"invalid_grant"}"#,
                &[],
                what,
            )
            .unwrap_err()
            .describe()
        };
        assert!(dead(DEAD_CODE).ends_with("invalid_grant: the code was already used, has expired, or was issued for another client or redirect URI"));
        assert!(dead(DEAD_REFRESH_TOKEN).ends_with("the refresh token is dead or revoked"));
    }

    #[test]
    fn retry_after_in_seconds_or_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let f = classify_token(StatusCode::TOO_MANY_REQUESTS, &h, b"", &[], DEAD_CODE).unwrap_err();
        assert!(matches!(
            f,
            Failure::Transient {
                retry_after: Some(d),
                ..
            } if d == Duration::from_secs(7)
        ));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn echoed_secrets_are_redacted() {
        let s = Secret::new("the-refresh-token");
        let f = classify_token(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"error":"invalid_grant","error_description":"token the-refresh-token is dead"}"#,
            &[&s],
            DEAD_REFRESH_TOKEN,
        )
        .unwrap_err();
        assert!(!f.describe().contains("the-refresh-token"), "{f:?}");
    }

    #[test]
    fn an_echo_in_token_type_is_redacted() {
        // Found by the fuzz target `provider`.
        let s = Secret::new("the-refresh-token");
        let t = classify_token(
            StatusCode::OK,
            &HeaderMap::new(),
            br#"{"access_token":"a","token_type":"the-refresh-token","refresh_token":"r2"}"#,
            &[&s],
            DEAD_REFRESH_TOKEN,
        )
        .unwrap();
        let why = t.unsupported.expect("not Bearer");
        assert!(!why.contains("the-refresh"), "{why}");
        // The rotated refresh token is kept, to be stored before anything else.
        assert_eq!(t.refresh_token.unwrap().expose(), "r2");
    }

    #[test]
    fn only_invalid_grant_kills_a_grant() {
        for code in [
            "temporarily_unavailable",
            "server_error",
            "slow_down",
            "invalid_token_of_our_own",
        ] {
            let body = format!(r#"{{"error":"{code}"}}"#);
            assert!(
                matches!(tok(400, &body), Err(Failure::Transient { .. })),
                "{code}"
            );
        }
        assert!(matches!(
            tok(400, r#"{"error":"invalid_grant"}"#),
            Err(Failure::Permanent { .. })
        ));
    }

    #[test]
    fn a_success_we_cannot_read_may_have_rotated() {
        for body in [
            "<html>",
            r#"{"access_token":"#,
            r#"{"token_type":"Bearer"}"#,
        ] {
            assert!(
                matches!(
                    tok(200, body),
                    Err(Failure::Transient {
                        outcome_unknown: true,
                        ..
                    })
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn a_secret_across_the_cut_leaves_no_piece() {
        let s = Secret::new("the-refresh-token");
        let padding = "x".repeat(190);
        for body in [
            format!("{padding}the-refresh-token"),
            format!(
                r#"{{"error":"invalid_grant","error_description":"{padding}the-refresh-token"}}"#
            ),
        ] {
            let f = classify_token(
                StatusCode::BAD_REQUEST,
                &HeaderMap::new(),
                body.as_bytes(),
                &[&s],
                DEAD_REFRESH_TOKEN,
            )
            .unwrap_err();
            assert!(!f.describe().contains("the-ref"), "{f:?}");
        }
    }

    #[test]
    fn provider_text_reaches_messages_on_one_line() {
        let f = tok(
            400,
            r#"{"error":"invalid_grant","error_description":"a\u001b[31mb\nc"}"#,
        );
        let text = f.unwrap_err().describe();
        assert!(text.contains("(a [31mb c)"), "{text}");
    }

    #[test]
    fn validation_only_401_condemns_a_token() {
        let v = |s: u16, body: &str, pd: bool| {
            classify_validation(
                StatusCode::from_u16(s).unwrap(),
                &HeaderMap::new(),
                body.as_bytes(),
                pd,
            )
        };
        assert_eq!(v(200, r#"{"user_id":"x"}"#, true), Ok(()));
        assert_eq!(v(401, "", false), Err(Failure::Unauthorized));
        assert_eq!(v(403, "", true), Err(Failure::Forbidden));
        assert!(matches!(v(403, "", false), Err(Failure::Transient { .. })));
        assert!(matches!(
            v(200, "<html>", true),
            Err(Failure::Transient { .. })
        ));
        assert!(matches!(v(502, "", true), Err(Failure::Transient { .. })));
        assert!(matches!(v(429, "", true), Err(Failure::Transient { .. })));
    }

    #[test]
    fn basic_auth_credentials_are_form_encoded() {
        assert_eq!(form_encode("a b+c:d"), "a+b%2Bc%3Ad");
        assert_eq!(form_encode("~*é"), "%7E*%C3%A9");
    }
}
