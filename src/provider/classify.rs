//! Answer classification (README "Credential states"): a token endpoint's
//! or a validation GET's status, headers and body become [`Tokens`] or a
//! [`Failure`]. Pure functions, no I/O.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;

use super::{DeviceCode, DeviceWait, Failure, Tokens};
use crate::secret::{Secret, redact};

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

/// An OAuth error answer (RFC 6749 §5.2): its `error` code, and its
/// `error_description` ready to append to a message (" (…)", secrets
/// redacted), or "" without one.
fn oauth_error(body: &[u8], secrets: &[&Secret]) -> (Option<String>, String) {
    let err = serde_json::from_slice::<RawError>(body).ok();
    let code = err.as_ref().and_then(|e| e.error.clone());
    let desc = err
        .and_then(|e| e.error_description)
        .map(|d| format!(" ({})", snippet(d.as_bytes(), secrets)))
        .unwrap_or_default();
    (code, desc)
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
    let (code, desc) = oauth_error(body, secrets);
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

/// A device authorization's success body (RFC 8628 §3.2). Not a byte of it
/// in an error: it holds the device code.
pub fn device_code(body: &[u8], secrets: &[&Secret]) -> Result<DeviceCode, Failure> {
    #[derive(Deserialize)]
    struct Raw {
        device_code: Option<String>,
        user_code: Option<String>,
        verification_uri: Option<String>,
        verification_uri_complete: Option<String>,
        expires_in: Option<u64>,
        interval: Option<u64>,
    }
    let bad = |what: &str| {
        Failure::transient(format!(
            "device authorization: the answer is not an RFC 8628 §3.2 answer ({what})"
        ))
    };
    let raw: Raw = serde_json::from_slice(body).map_err(|_| bad("not JSON of that shape"))?;
    let device_code = raw
        .device_code
        .filter(|c| !c.is_empty())
        .ok_or_else(|| bad("no device_code"))?;
    let text = |s: Option<String>| {
        s.map(|s| snippet(s.as_bytes(), secrets))
            .filter(|s| !s.is_empty())
    };
    Ok(DeviceCode {
        device_code: Secret::new(device_code),
        user_code: text(raw.user_code).ok_or_else(|| bad("no user_code"))?,
        verification_uri: text(raw.verification_uri).ok_or_else(|| bad("no verification_uri"))?,
        verification_uri_complete: text(raw.verification_uri_complete),
        expires_in: Duration::from_secs(
            raw.expires_in
                .ok_or_else(|| bad("no expires_in"))?
                .min(86_400),
        ),
        // RFC 8628 §3.2: 5 s when absent.
        interval: Duration::from_secs(raw.interval.unwrap_or(5).clamp(1, 300)),
    })
}

/// The answers of RFC 8628 §3.5 that are no failure of the request: None
/// for anything else, which is classified as any token answer is.
pub fn device_wait(status: StatusCode, body: &[u8]) -> Option<DeviceWait> {
    if status != StatusCode::BAD_REQUEST && status != StatusCode::UNAUTHORIZED {
        return None;
    }
    let code = serde_json::from_slice::<RawError>(body).ok()?.error?;
    Some(match code.as_str() {
        "authorization_pending" => DeviceWait::Pending,
        "slow_down" => DeviceWait::SlowDown,
        "access_denied" => DeviceWait::Denied,
        "expired_token" => DeviceWait::Expired,
        _ => return None,
    })
}

/// Classifies a revocation answer (RFC 7009 §2.2): 200 is revoked, the
/// unknown token too; a 503 or any 5xx may be tried again (§2.2.1).
pub fn classify_revocation(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[&Secret],
) -> Result<(), Failure> {
    const WHAT: &str = "revocation endpoint";
    if status == StatusCode::OK {
        return Ok(());
    }
    if let Some(f) = status_failure(status, headers, WHAT) {
        return Err(f);
    }
    let (code, desc) = oauth_error(body, secrets);
    match code.as_deref() {
        Some("unsupported_token_type") => Err(Failure::Misconfigured {
            reason: format!(
                "{WHAT}: unsupported_token_type{desc}: the provider does not revoke this kind \
                 of token on request"
            ),
        }),
        Some(c @ ("invalid_client" | "unauthorized_client" | "invalid_request")) => {
            Err(Failure::Misconfigured {
                reason: format!(
                    "{WHAT}: {c}{desc}: check the provider's client_id, secret and revocation_url"
                ),
            })
        }
        _ if status == StatusCode::UNAUTHORIZED => Err(Failure::Misconfigured {
            reason: format!("{WHAT}: client authentication failed ({status})"),
        }),
        Some(other) => Err(Failure::transient(format!(
            "{WHAT}: {} ({status}){desc}",
            snippet(other.as_bytes(), secrets)
        ))),
        None => Err(Failure::transient(format!(
            "{WHAT}: unexpected answer {status}: {:?}",
            snippet(body, secrets)
        ))),
    }
}
