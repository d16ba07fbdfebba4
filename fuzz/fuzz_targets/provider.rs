//! The provider answer parsers: any status, Retry-After and body is
//! classified without a panic, and a secret we sent never appears in the
//! failure's text, however the provider echoes it.
//!
//! Input, as text so that seeds are readable and mutations stay meaningful:
//!
//! ```text
//! STATUS[p]          e.g. "400", or "403p" for a PandaDoc provider
//! RETRY-AFTER        the header's value; an empty line for none
//! SENT               the refresh token (or code) we sent
//! CLIENT-SECRET
//! BODY…              the rest; "$S" and "$C" stand for the two secrets
//! ```

#![no_main]

use std::time::Duration;

use http::StatusCode;
use http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use libfuzzer_sys::fuzz_target;
use tokend::provider::{classify_token, classify_validation, retry_after};
use tokend::secret::Secret;

/// A secret as providers issue them: RFC 6750's b64token alphabet, with a
/// prefix none of our own messages contains, so that finding it in a
/// message can only mean an echo got through.
fn secret(s: &[u8]) -> Secret {
    let token: String = s
        .iter()
        .map(|&b| b as char)
        .filter(|c| c.is_ascii_alphanumeric() || "-._~+/=".contains(*c))
        .collect();
    Secret::new(format!("tok_{token}"))
}

fn replace(body: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while !rest.is_empty() {
        if rest.starts_with(from) {
            out.extend_from_slice(to);
            rest = &rest[from.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(5, |&b| b == b'\n');
    let (Some(status), Some(retry), Some(sent), Some(client), body) = (
        lines.next(),
        lines.next(),
        lines.next(),
        lines.next(),
        lines.next().unwrap_or_default(),
    ) else {
        return;
    };
    let pandadoc = status.ends_with(b"p");
    let Some(status) = std::str::from_utf8(status.strip_suffix(b"p").unwrap_or(status))
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
    else {
        return;
    };
    let mut headers = HeaderMap::new();
    if !retry.is_empty()
        && let Ok(v) = HeaderValue::from_bytes(retry)
    {
        headers.insert(RETRY_AFTER, v);
    }
    let (sent, client) = (secret(sent), secret(client));
    let body = replace(body, b"$S", sent.expose().as_bytes());
    let body = replace(&body, b"$C", client.expose().as_bytes());

    if let Some(d) = retry_after(&headers) {
        assert!(d <= Duration::from_secs(86_400), "Retry-After {d:?}");
    }
    let secrets = [&sent, &client];
    match classify_token(status, &headers, &body, &secrets, "the grant is dead") {
        Ok(t) => {
            assert!(!t.access_token.is_empty());
            if let Some(d) = t.expires_in {
                assert!(d > Duration::ZERO && d <= Duration::from_secs(10 * 366 * 86_400));
            }
        }
        Err(f) => {
            let text = f.describe();
            for s in secrets {
                assert!(!text.contains(s.expose()), "a secret in {text:?}");
            }
        }
    }
    if let Err(f) = classify_validation(status, &headers, &body, pandadoc) {
        let text = f.describe();
        for s in secrets {
            assert!(!text.contains(s.expose()), "a secret in {text:?}");
        }
    }
});
