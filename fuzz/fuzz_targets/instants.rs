//! Instants, whatever their value: an expiry typed in milliseconds by
//! mistake, a row edited by hand, a clock far off. Formatting one, measuring
//! it from now, putting it in a status or a json sink file never panics,
//! and what is shown is an RFC 3339 time within years 1970 to 9999.
//!
//! Input: 24 bytes, little-endian: the stored expiry (i64, ms), now (i64,
//! ms), and the token's issue time (i64, ms); shorter input is zero-padded.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokend::clock;
use tokend::config::Format;
use tokend::publish::render;
use tokend::secret::Secret;
use tokend::store::{Credential, Grant, State};
use tokend::wire::Status;

fn word(data: &[u8], i: usize) -> i64 {
    let mut b = [0u8; 8];
    for (k, x) in b.iter_mut().enumerate() {
        *x = data.get(i * 8 + k).copied().unwrap_or(0);
    }
    i64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let (raw, now, issued) = (word(data, 0), word(data, 1), word(data, 2));
    // What the store hands the rest of tokend: instants clamped on read.
    let (expires_at, now, issued_at) = (clock::clamp(raw), clock::clamp(now), clock::clamp(issued));
    for shown in [clock::rfc3339(raw), clock::rfc3339(expires_at)] {
        assert!(humantime::parse_rfc3339(&shown).is_ok(), "{shown}");
    }
    let _ = clock::span(raw);
    let _ = clock::relative(raw, now);
    let json = render(Format::Json, &Secret::new("t"), Some(expires_at));
    let json: serde_json::Value = serde_json::from_slice(&json).expect("the json sink is JSON");
    assert!(json["expires_at"].is_string());
    let cred = Credential {
        name: "c".into(),
        provider: "p".into(),
        access_token: Some(Secret::new("a")),
        grant: Grant::RefreshToken(Secret::new("r")),
        scope: None,
        expires_at: Some(expires_at),
        issued_at,
        state: State::Valid,
        failures: 0,
        next_attempt_at: Some(expires_at),
        last_error: None,
        last_refresh_at: Some(issued_at),
        last_validated_at: Some(issued_at),
        refresh_started_at: None,
        not_before: None,
        created_at: issued_at,
        updated_at: issued_at,
        version: 1,
        rev: 1,
    };
    let status = Status::of(&cred, now);
    let _ = serde_json::to_string(&status).expect("a status serializes");
});
