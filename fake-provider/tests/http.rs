//! The fake provider driven over real HTTP/1.1 with a plain TcpStream, the
//! way tokend's client will see it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokend_fake_provider::{FakeProvider, Fault, FaultTarget, Knobs};

const FORM: &str = "application/x-www-form-urlencoded";

/// A parsed HTTP response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn connect(p: &FakeProvider) -> TcpStream {
    let stream = TcpStream::connect(p.url().trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads one response (status line, headers, Content-Length body).
fn read_reply(reader: &mut BufReader<TcpStream>) -> std::io::Result<Reply> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    })
}

/// Sends raw request bytes on a fresh connection and reads the response.
fn raw(p: &FakeProvider, request: &[u8]) -> std::io::Result<Reply> {
    let mut stream = connect(p);
    stream.write_all(request)?;
    read_reply(&mut BufReader::new(stream))
}

fn request(
    p: &FakeProvider,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    raw(p, req.as_bytes()).unwrap()
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(n, v)| format!("{}={}", enc(n), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn token(p: &FakeProvider, fields: &[(&str, &str)]) -> Reply {
    request(
        p,
        "POST",
        "/oauth2/access_token",
        &[("Content-Type", FORM)],
        &form(fields),
    )
}

/// A refresh exactly as PandaDoc documents it (client_secret_post).
fn refresh(p: &FakeProvider, refresh_token: &str) -> Reply {
    token(
        p,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", p.client_id()),
            ("client_secret", p.client_secret()),
            ("refresh_token", refresh_token),
            ("scope", "read+write"),
        ],
    )
}

fn validate(p: &FakeProvider, access_token: &str) -> Reply {
    request(
        p,
        "GET",
        "/public/v1/members/current",
        &[("Authorization", &format!("Bearer {access_token}"))],
        "",
    )
}

/// Authorizes and returns the redirect's Location.
fn authorize(p: &FakeProvider, extra: &[(&str, &str)]) -> Reply {
    let mut fields = vec![
        ("client_id", p.client_id()),
        ("redirect_uri", "http://127.0.0.1:8765/callback?from=fake"),
        ("scope", "read+write"),
        ("response_type", "code"),
    ];
    fields.extend_from_slice(extra);
    request(
        p,
        "GET",
        &format!("/oauth2/authorize?{}", form(&fields)),
        &[],
        "",
    )
}

fn query_param(location: &str, name: &str) -> Option<String> {
    let query = location.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

/// Waits for a condition, failing the test after a deadline.
fn wait_until(condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "condition not met in time");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn start() -> FakeProvider {
    FakeProvider::start(Knobs::default()).unwrap()
}

#[test]
fn code_exchange_then_validate() {
    let p = start();
    let r = authorize(&p, &[("state", "st 1"), ("prompt", "consent")]);
    assert_eq!(r.status, 302);
    let location = r.header("location").unwrap();
    assert!(
        location.starts_with("http://127.0.0.1:8765/callback?from=fake&code=fcode_"),
        "{location}"
    );
    assert_eq!(query_param(location, "state").as_deref(), Some("st%201"));
    let code = query_param(location, "code").unwrap();

    let fields = [
        ("grant_type", "authorization_code"),
        ("client_id", p.client_id()),
        ("client_secret", p.client_secret()),
        ("code", &code),
        ("scope", "read+write"),
    ];
    let r = token(&p, &fields);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let body = r.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 31535999);
    assert_eq!(body["scope"], "read+write");
    let access = body["access_token"].as_str().unwrap();
    let refresh_token = body["refresh_token"].as_str().unwrap();
    assert!(access.starts_with("fat_") && access.len() == 44);
    assert!(refresh_token.starts_with("frt_"));

    let r = validate(&p, access);
    assert_eq!(r.status, 200);
    let grant = p.grant_of_refresh_token(refresh_token).unwrap();
    assert_eq!(
        r.json()["email"],
        format!("user-{}@example.com", grant.grant_id)
    );
    assert_eq!(grant.access_token, access);

    let stats = p.stats();
    assert_eq!(
        (
            stats.code_exchanges,
            stats.code_exchanges_ok,
            stats.bad_requests
        ),
        (1, 1, 0)
    );
    assert_eq!((stats.validations, stats.validations_ok), (1, 1));

    // Records hold names, never values.
    let records = p.requests();
    let exchange = records.iter().find(|r| r.endpoint == "token").unwrap();
    assert_eq!(
        exchange.form_fields,
        ["grant_type", "client_id", "client_secret", "code", "scope"]
    );
    assert_eq!(exchange.client_auth.as_deref(), Some("client_secret_post"));
    assert_eq!(exchange.grant_type.as_deref(), Some("authorization_code"));
    let dump = format!("{records:?}");
    for secret in [p.client_secret(), &code, access, refresh_token] {
        assert!(!dump.contains(secret));
    }

    // A used code is refused, and with strict_reuse the grant dies.
    let r = token(&p, &fields);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(!p.grant(grant.grant_id).unwrap().alive);
    assert_eq!(validate(&p, access).status, 401);
    assert_eq!(p.stats().reuse_detected, 1);
}

#[test]
fn authorize_errors_and_denial() {
    let p = start();
    let r = request(
        &p,
        "GET",
        "/oauth2/authorize?client_id=nobody&redirect_uri=http://x/cb&response_type=code",
        &[],
        "",
    );
    assert_eq!(r.status, 400);
    let r = request(
        &p,
        "GET",
        "/oauth2/authorize?client_id=tokend-test-client&redirect_uri=http://x/cb&response_type=token",
        &[],
        "",
    );
    assert_eq!(r.status, 400);
    p.update_knobs(|k| k.deny_authorization = true);
    let r = authorize(&p, &[("state", "abc")]);
    assert_eq!(r.status, 302);
    let location = r.header("location").unwrap();
    assert_eq!(
        query_param(location, "error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(query_param(location, "state").as_deref(), Some("abc"));
    assert!(query_param(location, "code").is_none());
}

#[test]
fn refresh_rotates_and_reuse_revokes_the_grant() {
    let p = start();
    let g = p.mint_grant(p.client_id(), "read+write");
    let r = refresh(&p, &g.refresh_token);
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    let new_refresh = body["refresh_token"].as_str().unwrap().to_owned();
    let new_access = body["access_token"].as_str().unwrap().to_owned();
    assert_ne!(new_refresh, g.refresh_token);
    // Old access tokens live until they expire, as with real providers.
    assert!(p.access_token_valid(&g.access_token) && p.access_token_valid(&new_access));
    let info = p.grant(g.grant_id).unwrap();
    assert_eq!(
        (info.rotations, info.refresh_token.as_str()),
        (1, new_refresh.as_str())
    );
    assert_eq!(
        p.grant_of_refresh_token(&g.refresh_token).unwrap().grant_id,
        g.grant_id
    );

    let r = refresh(&p, &g.refresh_token);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let info = p.grant(g.grant_id).unwrap();
    assert!(!info.alive && info.revoked_reason.is_some());
    assert!(!p.access_token_valid(&new_access));
    assert_eq!(refresh(&p, &new_refresh).status, 400);
    let s = p.stats();
    assert_eq!(
        (
            s.refresh_requests,
            s.refreshes_ok,
            s.reuse_detected,
            s.grants_revoked
        ),
        (3, 1, 1, 1)
    );
}

#[test]
fn lenient_reuse_keeps_the_grant() {
    let p = FakeProvider::start(Knobs {
        strict_reuse: false,
        ..Knobs::default()
    })
    .unwrap();
    let g = p.mint_grant(p.client_id(), "read+write");
    let new_refresh = refresh(&p, &g.refresh_token).json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(refresh(&p, &g.refresh_token).status, 400);
    assert!(p.grant(g.grant_id).unwrap().alive);
    assert_eq!(refresh(&p, &new_refresh).status, 200);
    assert_eq!(p.stats().reuse_detected, 1);
}

#[test]
fn non_rotating_mode_keeps_the_refresh_token() {
    let p = FakeProvider::start(Knobs {
        rotate_refresh_tokens: false,
        ..Knobs::default()
    })
    .unwrap();
    let g = p.mint_grant(p.client_id(), "read");
    for _ in 0..2 {
        let body = refresh(&p, &g.refresh_token).json();
        assert_eq!(body["refresh_token"], g.refresh_token.as_str());
        assert_eq!(body["scope"], "read");
    }
    assert_eq!(p.grant(g.grant_id).unwrap().rotations, 2);
    assert_eq!(p.stats().reuse_detected, 0);
}

#[test]
fn client_authentication() {
    let p = start();
    let g = p.mint_grant(p.client_id(), "read+write");
    let wrong = token(
        &p,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", p.client_id()),
            ("client_secret", "nope"),
            ("refresh_token", &g.refresh_token),
        ],
    );
    assert_eq!(
        (wrong.status, wrong.body.as_str()),
        (401, r#"{"error":"invalid_client"}"#)
    );
    let unknown = token(
        &p,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "other"),
            ("client_secret", "x"),
            ("refresh_token", &g.refresh_token),
        ],
    );
    assert_eq!(unknown.status, 401);

    // client_secret_basic: form-urlencoded id and secret, base64.
    p.add_client("app:2", "s3cr+t");
    let g2 = p.mint_grant("app:2", "read+write");
    let basic = format!(
        "Basic {}",
        b64(&format!("{}:{}", enc("app:2"), enc("s3cr+t")))
    );
    let headers = [("Content-Type", FORM), ("Authorization", basic.as_str())];
    let body = form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", &g2.refresh_token),
    ]);
    let r = request(&p, "POST", "/oauth2/access_token", &headers, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        p.requests().last().unwrap().client_auth.as_deref(),
        Some("client_secret_basic")
    );
    // Another client's refresh token is not this client's grant.
    let body = form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", &g.refresh_token),
    ]);
    assert_eq!(
        request(&p, "POST", "/oauth2/access_token", &headers, &body).json()["error"],
        "invalid_grant"
    );

    // Both methods at once is a schema violation.
    let before = p.stats().bad_requests;
    let body = form(&[
        ("grant_type", "refresh_token"),
        ("client_id", "app:2"),
        ("client_secret", "s3cr+t"),
        ("refresh_token", "x"),
    ]);
    let r = request(&p, "POST", "/oauth2/access_token", &headers, &body);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert_eq!(p.stats().bad_requests, before + 1);
}

fn b64(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                A[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

#[test]
fn schema_violations_are_400_and_counted() {
    let p = start();
    let id = p.client_id().to_owned();
    let secret = p.client_secret().to_owned();
    let json_body = format!(
        r#"{{"grant_type":"refresh_token","client_id":"{id}","client_secret":"{secret}","refresh_token":"x"}}"#
    );
    let r = request(
        &p,
        "POST",
        "/oauth2/access_token",
        &[("Content-Type", "application/json")],
        &json_body,
    );
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(p.requests()[0].form_fields.is_empty());
    let r = token(
        &p,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    );
    assert_eq!(r.json()["error"], "invalid_request");
    assert!(
        r.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("refresh_token")
    );
    let r = token(
        &p,
        &[
            ("grant_type", "password"),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    );
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let r = request(
        &p,
        "POST",
        "/oauth2/access_token",
        &[("Content-Type", FORM)],
        "grant_type=%zz&\u{1}=\u{7f}",
    );
    assert_eq!(r.status, 400);
    let r = request(
        &p,
        "POST",
        "/oauth2/access_token",
        &[("Content-Type", FORM), ("Authorization", "Bearer x")],
        "grant_type=refresh_token",
    );
    assert_eq!(r.status, 400);
    let r = request(&p, "GET", "/oauth2/access_token", &[], "");
    assert_eq!(r.status, 405);
    // Refused on the declared length, before the body is sent.
    let big = format!(
        "POST /oauth2/access_token HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nContent-Length: 70000\r\n\r\n"
    );
    assert_eq!(raw(&p, big.as_bytes()).unwrap().status, 413);
    assert_eq!(p.stats().bad_requests, 7);
    assert_eq!(p.stats().token_requests, 7);

    // Garbage that is not even HTTP gets an error, and the server lives on.
    let _ = raw(&p, b"\x00\xff garbage\r\n\r\n");
    assert_eq!(request(&p, "GET", "/nowhere", &[], "").status, 404);
    assert_eq!(p.requests().last().unwrap().endpoint, "other");
}

#[test]
fn pkce_and_redirect_uri_are_checked() {
    let p = start();
    // RFC 7636 appendix B.
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
    let r = authorize(
        &p,
        &[
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ],
    );
    let code = query_param(r.header("location").unwrap(), "code").unwrap();
    let exchange = |extra: &[(&str, &str)]| {
        let mut fields = vec![
            ("grant_type", "authorization_code"),
            ("client_id", p.client_id()),
            ("client_secret", p.client_secret()),
            ("code", code.as_str()),
        ];
        fields.extend_from_slice(extra);
        token(&p, &fields)
    };
    assert_eq!(exchange(&[]).json()["error"], "invalid_grant");
    assert_eq!(
        exchange(&[(
            "code_verifier",
            "wrong-verifier-wrong-verifier-wrong-verifier"
        )])
        .json()["error"],
        "invalid_grant"
    );
    assert_eq!(
        exchange(&[
            ("code_verifier", verifier),
            ("redirect_uri", "http://elsewhere/cb")
        ])
        .json()["error"],
        "invalid_grant"
    );
    let r = exchange(&[
        ("code_verifier", verifier),
        ("redirect_uri", "http://127.0.0.1:8765/callback?from=fake"),
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(p.stats().bad_requests, 0);
}

#[test]
fn validation_answers() {
    let p = FakeProvider::start(Knobs {
        token_lifetime_secs: 0,
        ..Knobs::default()
    })
    .unwrap();
    let r = request(&p, "GET", "/public/v1/members/current", &[], "");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "authentication_error");
    assert!(r.json()["detail"].is_string());
    assert_eq!(validate(&p, "fat_unknown").status, 401);
    // Lifetime 0: expired as soon as issued.
    let g = p.mint_grant(p.client_id(), "read+write");
    assert_eq!(g.expires_in, 0);
    assert_eq!(validate(&p, &g.access_token).status, 401);
    p.update_knobs(|k| k.token_lifetime_secs = 3600);
    let access = refresh(&p, &g.refresh_token).json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(validate(&p, &access).status, 200);
    let s = p.stats();
    assert_eq!((s.validations, s.validations_ok), (4, 1));
}

#[test]
fn every_fault() {
    let p = start();
    let g = p.mint_grant(p.client_id(), "read+write");
    let set = |fault: Fault| p.update_knobs(|k| k.fault = Some(fault));

    set(Fault::Status500);
    assert_eq!(refresh(&p, &g.refresh_token).status, 500);
    set(Fault::Status503);
    assert_eq!(validate(&p, &g.access_token).status, 503);
    set(Fault::TooManyRequests {
        retry_after_secs: Some(7),
    });
    let r = refresh(&p, &g.refresh_token);
    assert_eq!((r.status, r.header("retry-after")), (429, Some("7")));
    assert_eq!(r.json()["type"], "throttled");
    set(Fault::TooManyRequests {
        retry_after_secs: None,
    });
    let r = validate(&p, &g.access_token);
    assert_eq!((r.status, r.header("retry-after")), (429, None));
    assert_eq!(r.json()["detail"], "Request was throttled.");
    set(Fault::Garbage);
    let r = refresh(&p, &g.refresh_token);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(serde_json::from_str::<Value>(&r.body).is_err());
    set(Fault::Truncated);
    let r = refresh(&p, &g.refresh_token);
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("application/json"))
    );
    assert!(serde_json::from_str::<Value>(&r.body).is_err());
    set(Fault::InvalidClient);
    let r = refresh(&p, &g.refresh_token);
    assert_eq!(
        (r.status, r.body.as_str()),
        (401, r#"{"error":"invalid_client"}"#)
    );
    set(Fault::InvalidGrant);
    let r = refresh(&p, &g.refresh_token);
    assert_eq!(
        (r.status, r.body.as_str()),
        (400, r#"{"error":"invalid_grant"}"#)
    );

    set(Fault::Drop);
    let body = form(&[
        ("grant_type", "refresh_token"),
        ("client_id", p.client_id()),
        ("client_secret", p.client_secret()),
        ("refresh_token", &g.refresh_token),
    ]);
    let req = format!(
        "POST /oauth2/access_token HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = connect(&p);
    stream.write_all(req.as_bytes()).unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    assert!(got.is_empty(), "a dropped connection answers nothing");

    set(Fault::Hang);
    let mut hung = connect(&p);
    hung.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    hung.write_all(req.as_bytes()).unwrap();
    // Other connections are served meanwhile.
    p.update_knobs(|k| k.fault_on = FaultTarget::Token);
    assert_eq!(validate(&p, &g.access_token).status, 200);
    let err = hung.read(&mut [0; 16]).unwrap_err();
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));

    p.update_knobs(|k| k.fault = None);
    wait_until(|| p.stats().faults_injected == 10);
    // Nothing above consumed the refresh token.
    assert_eq!(refresh(&p, &g.refresh_token).status, 200);
    let records = p.requests();
    let faulted: Vec<_> = records
        .iter()
        .filter(|r| r.fault)
        .map(|r| r.status)
        .collect();
    assert_eq!(faulted, [500, 503, 429, 429, 200, 200, 401, 400, 0, 0]);
    let s = p.stats();
    assert_eq!(
        (s.faults_injected, s.refreshes_ok, s.bad_requests),
        (10, 1, 0)
    );
}

#[test]
fn fault_count_and_target() {
    let p = start();
    let g = p.mint_grant(p.client_id(), "read+write");
    p.update_knobs(|k| {
        k.fault = Some(Fault::Status503);
        k.fault_on = FaultTarget::Validate;
        k.fault_count = Some(2);
    });
    // Token requests are not targeted and do not consume the count.
    assert_eq!(refresh(&p, &g.refresh_token).status, 200);
    let access = p.grant(g.grant_id).unwrap().access_token;
    assert_eq!(validate(&p, &access).status, 503);
    assert_eq!(validate(&p, &access).status, 503);
    assert_eq!(validate(&p, &access).status, 200);
    let knobs = p.knobs();
    assert_eq!((knobs.fault, knobs.fault_count), (None, None));

    p.update_knobs(|k| k.error_rate_5xx = 1.0);
    assert_eq!(validate(&p, &access).status, 503);
    assert_eq!(p.stats().faults_injected, 3);
}

#[test]
fn latency_delays_answers() {
    let p = FakeProvider::start(Knobs {
        latency_ms: 300,
        ..Knobs::default()
    })
    .unwrap();
    let g = p.mint_grant(p.client_id(), "read+write");
    let t = Instant::now();
    assert_eq!(validate(&p, &g.access_token).status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    // Not the admin routes.
    p.set_knobs(Knobs {
        latency_ms: 5_000,
        ..Knobs::default()
    });
    let t = Instant::now();
    assert_eq!(request(&p, "GET", "/_admin/stats", &[], "").status, 200);
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn admin_routes() {
    let p = start();
    let r = request(
        &p,
        "PUT",
        "/_admin/knobs",
        &[("Content-Type", "application/json")],
        r#"{"latency_ms":5,"fault":{"kind":"too_many_requests","retry_after_secs":3},"fault_on":"token"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let knobs = p.knobs();
    assert_eq!(knobs.latency_ms, 5);
    assert_eq!(
        knobs.fault,
        Some(Fault::TooManyRequests {
            retry_after_secs: Some(3)
        })
    );
    assert_eq!(
        (knobs.fault_on, knobs.token_lifetime_secs),
        (FaultTarget::Token, 31535999)
    );
    assert_eq!(
        request(&p, "GET", "/_admin/knobs", &[], "").json()["fault"]["kind"],
        "too_many_requests"
    );
    assert_eq!(
        request(&p, "PUT", "/_admin/knobs", &[], "{nope").status,
        400
    );
    p.set_knobs(Knobs::default());

    let minted = request(&p, "POST", "/_admin/grants", &[], r#"{"scope":"read"}"#).json();
    let id = minted["grant_id"].as_u64().unwrap();
    assert!(
        minted["refresh_token"]
            .as_str()
            .unwrap()
            .starts_with("frt_")
    );
    assert_eq!(request(&p, "POST", "/_admin/grants", &[], "").status, 200);
    assert_eq!(
        request(
            &p,
            "POST",
            "/_admin/grants",
            &[],
            r#"{"client_id":"ghost"}"#
        )
        .status,
        400
    );
    assert_eq!(
        refresh(&p, minted["refresh_token"].as_str().unwrap()).status,
        200
    );
    let grant = request(&p, "GET", &format!("/_admin/grants/{id}"), &[], "").json();
    assert_eq!(
        (grant["alive"].as_bool(), grant["rotations"].as_u64()),
        (Some(true), Some(1))
    );
    assert_eq!(
        request(&p, "GET", "/_admin/grants/999", &[], "").status,
        404
    );
    assert_eq!(request(&p, "GET", "/_admin/grants/x", &[], "").status, 404);

    let stats = request(&p, "GET", "/_admin/stats", &[], "").json();
    assert_eq!(
        (
            stats["refreshes_ok"].as_u64(),
            stats["bad_requests"].as_u64()
        ),
        (Some(1), Some(0))
    );
    let records = request(&p, "GET", "/_admin/requests", &[], "").json();
    assert_eq!(
        records.as_array().unwrap().len(),
        1,
        "admin routes are not recorded"
    );
    assert_eq!(records[0]["endpoint"], "token");
    assert_eq!(request(&p, "DELETE", "/_admin/stats", &[], "").status, 200);
    assert_eq!(p.stats().token_requests, 0);
    assert!(p.requests().is_empty());
}

#[test]
fn keep_alive_serves_several_requests_per_connection() {
    let p = start();
    let g = p.mint_grant(p.client_id(), "read+write");
    let stream = connect(&p);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let req = format!(
        "GET /public/v1/members/current HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        g.access_token
    );
    for _ in 0..3 {
        writer.write_all(req.as_bytes()).unwrap();
        assert_eq!(read_reply(&mut reader).unwrap().status, 200);
    }
}

#[test]
fn drop_frees_the_port() {
    let p = start();
    let addr = p.url().trim_start_matches("http://").parse().unwrap();
    let g = p.mint_grant(p.client_id(), "read+write");
    // A hung connection must not keep the server alive.
    p.update_knobs(|k| k.fault = Some(Fault::Hang));
    let mut hung = connect(&p);
    hung.write_all(format!("GET /public/v1/members/current HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n", g.access_token).as_bytes()).unwrap();
    wait_until(|| !p.requests().is_empty());
    drop(p);
    assert_eq!(
        hung.read(&mut [0; 16]).unwrap_or(0),
        0,
        "the hung connection is closed"
    );
    let again = FakeProvider::start_on(addr, Knobs::default()).unwrap();
    assert_eq!(again.url(), format!("http://{addr}"));
}

#[test]
fn binary_serves_and_writes_secrets_to_files() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    let dir = std::env::temp_dir().join(format!("fake-provider-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("secret");
    let grant_file = dir.join("grant");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokend-fake-provider"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--client-id",
            "demo",
            "--latency-ms",
            "1",
            "--no-rotate",
        ])
        .arg("--write-client-secret")
        .arg(&secret_file)
        .arg("--grant-file")
        .arg(&grant_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_owned();

    let secret = std::fs::read_to_string(&secret_file)
        .unwrap()
        .trim()
        .to_owned();
    let refresh_token = std::fs::read_to_string(&grant_file)
        .unwrap()
        .trim()
        .to_owned();
    for f in [&secret_file, &grant_file] {
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let body = form(&[
        ("grant_type", "refresh_token"),
        ("client_id", "demo"),
        ("client_secret", &secret),
        ("refresh_token", &refresh_token),
    ]);
    let mut stream = TcpStream::connect(&addr).unwrap();
    write!(stream, "POST /oauth2/access_token HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let reply = read_reply(&mut BufReader::new(stream)).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["refresh_token"], refresh_token.as_str());

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let mut printed = line;
    stdout.read_to_string(&mut printed).unwrap();
    printed.push_str(&String::from_utf8_lossy(&output.stderr));
    assert!(!printed.contains(&secret) && !printed.contains(&refresh_token));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn binary_rejects_bad_flags() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokend-fake-provider"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokend-fake-provider"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--grant-file"));
}

#[tokio::test]
async fn usable_and_droppable_inside_an_async_runtime() {
    let p = start();
    let g = p.mint_grant(p.client_id(), "read+write");
    let addr = p.url().trim_start_matches("http://").to_owned();
    let req = format!(
        "GET /public/v1/members/current HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        g.access_token
    );
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, req.as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(p);
}

/// A raw refresh request (client_secret_post) with the given extra form text
/// appended verbatim, so that a test controls how `scope` is encoded.
fn raw_refresh_request(p: &FakeProvider, refresh_token: &str, extra: &str) -> String {
    let body = form(&[
        ("grant_type", "refresh_token"),
        ("client_id", p.client_id()),
        ("client_secret", p.client_secret()),
        ("refresh_token", refresh_token),
    ]) + extra;
    format!(
        "POST /oauth2/access_token HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn answer_delay_holds_back_an_answer_whose_effects_happened() {
    let p = FakeProvider::start(Knobs {
        answer_delay_ms: 5_000,
        ..Knobs::default()
    })
    .unwrap();
    let g = p.mint_grant(p.client_id(), "read+write");
    let t = Instant::now();
    let mut stream = connect(&p);
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    stream
        .write_all(raw_refresh_request(&p, &g.refresh_token, "").as_bytes())
        .unwrap();

    // The provider rotates, counts and records before it answers.
    wait_until(|| p.stats().refreshes_ok == 1);
    let info = p.grant(g.grant_id).unwrap();
    assert_eq!(info.rotations, 1);
    assert_ne!(info.refresh_token, g.refresh_token);
    let records = p.requests();
    assert_eq!(
        (records.len(), records[0].status, records[0].fault),
        (1, 200, false)
    );
    let err = stream.read(&mut [0; 16]).unwrap_err();
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    assert!(t.elapsed() < Duration::from_secs(5), "answered too early");

    // The client gives up: its refresh token is already rotated out, and
    // retrying with it is reuse, which kills the grant.
    drop(stream);
    p.update_knobs(|k| k.answer_delay_ms = 0);
    let r = refresh(&p, &g.refresh_token);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(!p.grant(g.grant_id).unwrap().alive);
    assert_eq!(p.stats().reuse_detected, 1);
}

#[test]
fn answer_delay_applies_to_every_answer_but_drop_and_hang() {
    let p = FakeProvider::start(Knobs {
        answer_delay_ms: 300,
        ..Knobs::default()
    })
    .unwrap();
    let g = p.mint_grant(p.client_id(), "read+write");
    let timed = |f: &dyn Fn() -> Reply| {
        let t = Instant::now();
        let r = f();
        (r.status, t.elapsed())
    };
    let (status, took) = timed(&|| validate(&p, &g.access_token));
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    let (status, took) = timed(&|| refresh(&p, &g.refresh_token));
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    // A schema violation is processed, then held back, too.
    let (status, took) = timed(&|| token(&p, &[("grant_type", "refresh_token")]));
    assert_eq!(status, 400);
    assert!(took >= Duration::from_millis(300), "{took:?}");

    p.update_knobs(|k| k.fault = Some(Fault::Status503));
    let (status, took) = timed(&|| refresh(&p, "frt_whatever"));
    assert_eq!(status, 503);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    let (status, took) = timed(&|| validate(&p, &g.access_token));
    assert_eq!(status, 503);
    assert!(took >= Duration::from_millis(300), "{took:?}");

    // A dropped connection closes at once, delay or not.
    p.update_knobs(|k| {
        k.fault = Some(Fault::Drop);
        k.answer_delay_ms = 60_000;
    });
    let t = Instant::now();
    let mut stream = connect(&p);
    stream
        .write_all(raw_refresh_request(&p, "frt_whatever", "").as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    assert!(got.is_empty());
    assert!(t.elapsed() < Duration::from_secs(5));

    // Admin routes are never held back.
    let t = Instant::now();
    assert_eq!(request(&p, "GET", "/_admin/stats", &[], "").status, 200);
    assert!(t.elapsed() < Duration::from_secs(5));
    let faulted: Vec<u16> = p
        .requests()
        .iter()
        .filter(|r| r.fault)
        .map(|r| r.status)
        .collect();
    assert_eq!(faulted, [503, 503, 0]);
}

#[test]
fn scope_raw_is_recorded_as_sent() {
    let p = start();
    let g = p.mint_grant(p.client_id(), "read+write");
    // `refresh` form-encodes "read+write" as read%2Bwrite.
    assert_eq!(refresh(&p, &g.refresh_token).status, 200);
    let info = p.grant(g.grant_id).unwrap();
    let mut stream = connect(&p);
    stream
        .write_all(raw_refresh_request(&p, &info.refresh_token, "&scope=read+write").as_bytes())
        .unwrap();
    assert_eq!(read_reply(&mut BufReader::new(stream)).unwrap().status, 200);
    let info = p.grant(g.grant_id).unwrap();
    let mut stream = connect(&p);
    stream
        .write_all(raw_refresh_request(&p, &info.refresh_token, "").as_bytes())
        .unwrap();
    assert_eq!(read_reply(&mut BufReader::new(stream)).unwrap().status, 200);
    let r = request(
        &p,
        "GET",
        "/oauth2/authorize?client_id=tokend-test-client&redirect_uri=http://x/cb&response_type=code&scope=read+write",
        &[],
        "",
    );
    assert_eq!(r.status, 302);
    assert_eq!(authorize(&p, &[]).status, 302);
    assert_eq!(validate(&p, &g.access_token).status, 200);

    let recorded: Vec<(String, Option<String>)> = p
        .requests()
        .into_iter()
        .map(|r| (r.endpoint, r.scope_raw))
        .collect();
    let expect = [
        ("token", Some("read%2Bwrite")),
        ("token", Some("read+write")),
        ("token", None),
        ("authorize", Some("read+write")),
        ("authorize", Some("read%2Bwrite")),
        ("validate", None),
    ];
    assert_eq!(recorded.len(), expect.len());
    for ((endpoint, raw), (e_endpoint, e_raw)) in recorded.iter().zip(expect) {
        assert_eq!((endpoint.as_str(), raw.as_deref()), (e_endpoint, e_raw));
    }
    let json = request(&p, "GET", "/_admin/requests", &[], "").json();
    assert_eq!(json[0]["scope_raw"], "read%2Bwrite");
    assert!(json[2]["scope_raw"].is_null());
}

#[test]
fn oidc_scopes_refuse_ungranted_scope_on_refresh() {
    let p = FakeProvider::start(Knobs {
        oidc_scopes: true,
        ..Knobs::default()
    })
    .unwrap();
    let r = request(
        &p,
        "GET",
        &format!(
            "/oauth2/authorize?{}",
            form(&[
                ("client_id", p.client_id()),
                ("redirect_uri", "http://x/cb"),
                ("response_type", "code"),
                ("scope", "openid offline_access profile"),
            ])
        ),
        &[],
        "",
    );
    let code = query_param(r.header("location").unwrap(), "code").unwrap();
    let r = token(
        &p,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", p.client_id()),
            ("client_secret", p.client_secret()),
            ("code", &code),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["scope"], "openid profile");
    let refresh_token = r.json()["refresh_token"].as_str().unwrap().to_owned();
    let grant = p.grant_of_refresh_token(&refresh_token).unwrap();
    assert_eq!(grant.scope, "openid profile");

    // Repeating the authorization scope names offline_access: refused,
    // nothing rotated.
    let refused = token(
        &p,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", p.client_id()),
            ("client_secret", p.client_secret()),
            ("refresh_token", &refresh_token),
            ("scope", "openid offline_access profile"),
        ],
    );
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (
            400,
            r#"{"error":"invalid_scope","error_description":"refresh token missing requested scope"}"#
        )
    );
    let after = p.grant(grant.grant_id).unwrap();
    assert_eq!(after, grant);
    let s = p.stats();
    assert_eq!(
        (
            s.refresh_requests,
            s.refreshes_ok,
            s.scope_refused,
            s.bad_requests
        ),
        (1, 0, 1, 0)
    );
    let admin = request(
        &p,
        "GET",
        &format!("/_admin/grants/{}", grant.grant_id),
        &[],
        "",
    );
    assert_eq!(admin.json()["scope"], "openid profile");
    assert_eq!(
        request(&p, "GET", "/_admin/stats", &[], "").json()["scope_refused"],
        1
    );

    // Without scope, the whole granted scope; with a subset, that subset.
    let mut stream = connect(&p);
    stream
        .write_all(raw_refresh_request(&p, &refresh_token, "").as_bytes())
        .unwrap();
    let r = read_reply(&mut BufReader::new(stream)).unwrap();
    assert_eq!(
        (r.status, r.json()["scope"].as_str()),
        (200, Some("openid profile"))
    );
    let refresh_token = r.json()["refresh_token"].as_str().unwrap().to_owned();
    let mut stream = connect(&p);
    stream
        .write_all(raw_refresh_request(&p, &refresh_token, "&scope=profile").as_bytes())
        .unwrap();
    let r = read_reply(&mut BufReader::new(stream)).unwrap();
    assert_eq!(
        (r.status, r.json()["scope"].as_str()),
        (200, Some("profile"))
    );
    assert_eq!(p.grant(grant.grant_id).unwrap().scope, "openid profile");
}

#[test]
fn oidc_scopes_split_on_decoded_spaces() {
    let p = FakeProvider::start(Knobs {
        oidc_scopes: true,
        ..Knobs::default()
    })
    .unwrap();
    // PandaDoc's scope, "read+write", is a single name once decoded.
    let g = p.mint_grant(p.client_id(), "read+write");
    let send = |refresh_token: &str, extra: &str| {
        let mut stream = connect(&p);
        stream
            .write_all(raw_refresh_request(&p, refresh_token, extra).as_bytes())
            .unwrap();
        read_reply(&mut BufReader::new(stream)).unwrap()
    };
    // read+write on the wire decodes to two names, "read" and "write".
    let r = send(&g.refresh_token, "&scope=read+write");
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_scope"))
    );
    // read%2Bwrite decodes to the one granted name.
    let r = send(&g.refresh_token, "&scope=read%2Bwrite");
    assert_eq!(
        (r.status, r.json()["scope"].as_str()),
        (200, Some("read+write"))
    );
    // Still a bad request when repeated, before any scope check.
    let refresh_token = r.json()["refresh_token"].as_str().unwrap().to_owned();
    let r = send(&refresh_token, "&scope=read%2Bwrite&scope=read%2Bwrite");
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let s = p.stats();
    assert_eq!((s.scope_refused, s.bad_requests, s.refreshes_ok), (1, 1, 1));
    let raws: Vec<Option<String>> = p.requests().into_iter().map(|r| r.scope_raw).collect();
    assert_eq!(
        raws,
        [
            Some("read+write".to_owned()),
            Some("read%2Bwrite".to_owned()),
            Some("read%2Bwrite".to_owned())
        ]
    );
}

fn post(p: &FakeProvider, path: &str, fields: &[(&str, &str)]) -> Reply {
    request(p, "POST", path, &[("Content-Type", FORM)], &form(fields))
}

#[test]
fn client_credentials_grant() {
    let p = start();
    let creds = [
        ("grant_type", "client_credentials"),
        ("client_id", p.client_id()),
        ("client_secret", p.client_secret()),
        ("scope", "machine"),
    ];
    let r = token(&p, &creds);
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert!(
        body.get("refresh_token").is_none(),
        "RFC 6749 §4.4.3: {body}"
    );
    assert_eq!(body["scope"], "machine");
    let access = body["access_token"].as_str().unwrap();
    assert_eq!(validate(&p, access).status, 200);
    assert_eq!(p.stats().client_credentials_ok, 1);
    // A client not allowed the grant.
    p.update_knobs(|k| k.client_credentials_clients.clear());
    let r = token(&p, &creds);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("unauthorized_client"))
    );
    // A wrong secret is the client's failure first.
    let r = token(
        &p,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", p.client_id()),
            ("client_secret", "wrong"),
        ],
    );
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("invalid_client"))
    );
}

#[test]
fn device_authorization_grant() {
    let p = FakeProvider::start(Knobs {
        device_interval_secs: 1,
        ..Knobs::default()
    })
    .unwrap();
    let auth = [
        ("client_id", p.client_id()),
        ("client_secret", p.client_secret()),
    ];
    let r = post(
        &p,
        "/oauth2/device_authorization",
        &[auth[0], auth[1], ("scope", "read")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let d = r.json();
    let device_code = d["device_code"].as_str().unwrap().to_owned();
    let user_code = d["user_code"].as_str().unwrap().to_owned();
    assert_eq!(d["interval"], 1);
    assert!(d["verification_uri"].as_str().unwrap().ends_with("/device"));
    assert_eq!(p.pending_user_codes(), [user_code.as_str()]);
    let poll = || {
        token(
            &p,
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", &device_code),
                auth[0],
                auth[1],
            ],
        )
    };
    let error = |r: Reply| (r.status, r.json()["error"].as_str().unwrap().to_owned());
    assert_eq!(error(poll()), (400, "authorization_pending".into()));
    // Polled again at once: slow_down, and the interval grows to 6 s.
    assert_eq!(error(poll()), (400, "slow_down".into()));
    assert!(p.decide_device(&user_code, true));
    assert!(!p.decide_device(&user_code, true), "decided already");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        error(poll()),
        (400, "slow_down".into()),
        "1 s is now too soon"
    );
    // Approved, and polled after the grown interval (11 s now): tokens, once.
    std::thread::sleep(Duration::from_millis(11_100));
    let tokens = poll();
    assert_eq!(tokens.status, 200, "{}", tokens.body);
    assert!(
        tokens.json()["refresh_token"]
            .as_str()
            .unwrap()
            .starts_with("frt_")
    );
    assert_eq!(error(poll()), (400, "invalid_grant".into()));
}

#[test]
fn device_denied_and_expired() {
    let p = FakeProvider::start(Knobs {
        device_interval_secs: 0,
        device_code_lifetime_secs: 1,
        ..Knobs::default()
    })
    .unwrap();
    let auth = [
        ("client_id", p.client_id()),
        ("client_secret", p.client_secret()),
    ];
    let code = |r: Reply| r.json()["device_code"].as_str().unwrap().to_owned();
    let denied = code(post(&p, "/oauth2/device_authorization", &auth));
    let user_code = p.pending_user_codes().pop().unwrap();
    let r = request(
        &p,
        "POST",
        "/_admin/device/deny",
        &[("Content-Type", "application/json")],
        &format!(r#"{{"user_code":"{user_code}"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let poll = |device_code: &str| {
        let r = token(
            &p,
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", device_code),
                auth[0],
                auth[1],
            ],
        );
        r.json()["error"].as_str().unwrap().to_owned()
    };
    assert_eq!(poll(&denied), "access_denied");
    let expiring = code(post(&p, "/oauth2/device_authorization", &auth));
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(poll(&expiring), "expired_token");
    // No client authentication: refused.
    let r = post(&p, "/oauth2/device_authorization", &[auth[0]]);
    assert_eq!(r.status, 400);
    assert_eq!(p.stats().device_polls, 2);
}

#[test]
fn revocation() {
    let p = start();
    let g = p.mint_grant(p.client_id(), "read+write");
    let revoke = |token: &str, secret: &str| {
        post(
            &p,
            "/oauth2/revoke",
            &[
                ("token", token),
                ("token_type_hint", "refresh_token"),
                ("client_id", p.client_id()),
                ("client_secret", secret),
            ],
        )
    };
    assert_eq!(revoke(&g.refresh_token, "wrong").status, 401);
    assert!(p.grant(g.grant_id).unwrap().alive);
    let r = revoke(&g.refresh_token, p.client_secret());
    assert_eq!(r.status, 200, "{}", r.body);
    let info = p.grant(g.grant_id).unwrap();
    assert!(!info.alive);
    assert!(
        !p.access_token_valid(&g.access_token),
        "the grant's tokens die with it"
    );
    let r = refresh(&p, &g.refresh_token);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    // Unknown tokens are answered as revoked (RFC 7009 §2.2).
    assert_eq!(revoke("frt_unknown", p.client_secret()).status, 200);
    assert_eq!(p.stats().revocations, 1);
    p.update_knobs(|k| k.revocation_unsupported = true);
    let r = revoke("frt_unknown", p.client_secret());
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("unsupported_token_type"))
    );
    let recorded = p.requests();
    let last = recorded.last().unwrap();
    assert_eq!(last.endpoint, "revoke");
    assert_eq!(
        last.form_fields,
        ["token", "token_type_hint", "client_id", "client_secret"]
    );
}
