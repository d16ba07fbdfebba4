//! The provider client's unit tests: every kind of answer classified,
//! provider text redacted and cut, Retry-After read, credentials encoded.

use reqwest::header::{HeaderValue, RETRY_AFTER};

use super::*;

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
        format!(r#"{{"error":"invalid_grant","error_description":"{padding}the-refresh-token"}}"#),
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

/// Issue 13: RFC 8628 §3.5's answers, RFC 7009 §2.2's, and the §3.2 body.
#[test]
fn device_and_revocation_answers_are_classified() {
    let wait = |status: u16, body: &str| {
        classify::device_wait(StatusCode::from_u16(status).unwrap(), body.as_bytes())
    };
    assert!(matches!(
        wait(400, r#"{"error":"authorization_pending"}"#),
        Some(DeviceWait::Pending)
    ));
    assert!(matches!(
        wait(400, r#"{"error":"slow_down"}"#),
        Some(DeviceWait::SlowDown)
    ));
    assert!(matches!(
        wait(400, r#"{"error":"access_denied"}"#),
        Some(DeviceWait::Denied)
    ));
    assert!(matches!(
        wait(400, r#"{"error":"expired_token"}"#),
        Some(DeviceWait::Expired)
    ));
    assert!(wait(400, r#"{"error":"invalid_grant"}"#).is_none());
    assert!(wait(503, r#"{"error":"slow_down"}"#).is_none());

    let secret = Secret::new("fdc_secret");
    let d = classify::device_code(
        br#"{"device_code":"fdc_secret","user_code":"BCDF-GHJK","verification_uri":"https://x/device","expires_in":600}"#,
        &[],
    )
    .unwrap();
    assert_eq!(
        (d.user_code.as_str(), d.interval),
        ("BCDF-GHJK", Duration::from_secs(5))
    );
    assert_eq!(d.expires_in, Duration::from_secs(600));
    let e = classify::device_code(br#"{"device_code":"fdc_secret"}"#, &[&secret])
        .unwrap_err()
        .describe();
    assert!(
        e.contains("no user_code") && !e.contains("fdc_secret"),
        "{e}"
    );

    let rev = |status: u16, body: &str| {
        classify_revocation(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            body.as_bytes(),
            &[],
        )
    };
    assert!(rev(200, "").is_ok());
    assert!(matches!(
        rev(503, ""),
        Err(Failure::Transient {
            provider_down: true,
            ..
        })
    ));
    assert!(matches!(
        rev(400, r#"{"error":"unsupported_token_type"}"#),
        Err(Failure::Misconfigured { reason }) if reason.contains("does not revoke")
    ));
    assert!(matches!(
        rev(401, r#"{"error":"invalid_client"}"#),
        Err(Failure::Misconfigured { .. })
    ));
}
