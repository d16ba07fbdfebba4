//! README "The socket API" and issue 3: the socket API with a real client (curl), who may
//! read what, freshness on read, hostile clients, the socket file's
//! lifecycle and consumer reports of refused tokens.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use support::*;

/// What curl got: status, Content-Type and body.
#[derive(Debug)]
struct Curl {
    status: u16,
    content_type: String,
    body: String,
}

impl Curl {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts a JSON error of the contract: this status and code, a message.
    fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert!(
            self.content_type.starts_with("application/json"),
            "{self:?}"
        );
        let v = self.json();
        assert_eq!(v["error"], code, "{self:?}");
        let message = v["message"].as_str().expect("a message").to_owned();
        assert!(!message.is_empty());
        assert_no_secrets(&self.body, "an error body");
        message
    }
}

fn curl_command(socket: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("curl");
    c.args(["-q", "-sS", "--max-time", "60", "--unix-socket"])
        .arg(socket)
        .args(["-w", "\n%{http_code} %{content_type}"])
        .args(args)
        .current_dir("/");
    c
}

fn run_curl(mut c: Command) -> Curl {
    let out = c
        .output()
        .expect("curl runs (install it: apt-get install -y curl)");
    let stdout = String::from_utf8(out.stdout).expect("curl's output is text");
    assert!(
        out.status.success(),
        "curl failed ({:?}): {} {stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, tail) = stdout.rsplit_once('\n').expect("the -w trailer");
    let (status, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    Curl {
        status: status.parse().expect("an HTTP status"),
        content_type: content_type.to_owned(),
        body: body.to_owned(),
    }
}

/// `curl --unix-socket SOCK ARGS…`, as root (the test's user).
fn curl(socket: &Path, args: &[&str]) -> Curl {
    run_curl(curl_command(socket, args))
}

/// The same, as another user.
fn curl_as(uid: u32, gid: u32, socket: &Path, args: &[&str]) -> Curl {
    let mut c = curl_command(socket, args);
    c.uid(uid).gid(gid).env("HOME", "/");
    run_curl(c)
}

fn url(path: &str) -> String {
    format!("http://localhost{path}")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A `[refresh]` section with FAST_REFRESH's backoff and the given knobs.
fn refresh(request_timeout: &str, min_remaining: &str, extra: &str) -> String {
    format!(
        "\n[refresh]\n{QUIET_SWEEP}\nrefresh_before_expiry = \"2s\"\nmin_remaining = \"{min_remaining}\"\n\
         retry_initial = \"500ms\"\nretry_max = \"2s\"\nrequest_timeout = \"{request_timeout}\"\n{extra}\n"
    )
}

fn seconds_until(rfc3339: &str) -> f64 {
    let t = humantime::parse_rfc3339(rfc3339).unwrap();
    match t.duration_since(SystemTime::now()) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

// ---- 1. every route and every error code, with curl ----

#[test]
fn every_route_and_error_code_over_curl() {
    // The first token request (the refresh of "dead", which has no access
    // token) gets invalid_grant; nothing else is faulted until later.
    let env = Env::bare(Knobs {
        fault: Some(Fault::InvalidGrant),
        fault_on: FaultTarget::Token,
        fault_count: Some(1),
        ..Knobs::default()
    });
    env.write_config(&refresh("1s", "1s", ""), &env.sink("raw", "0600"));
    let bot = env.import("bot", true);
    env.import("dead", false);
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));
    wait_for(
        "dead to need re-authorization",
        Duration::from_secs(20),
        || (env.state("dead")? == "needs_reauthorization").then_some(()),
    );

    // GET /health
    let r = curl(&sock, &[&url("/health")]);
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{r:?}");

    // GET /v1/tokens/{name}: the token, as text and as JSON.
    let r = curl(&sock, &[&url("/v1/tokens/bot")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.content_type.starts_with("text/plain"), "{r:?}");
    assert_eq!(r.body, bot.access_token, "the token, without a newline");
    let r = curl(
        &sock,
        &["-H", "Accept: application/json", &url("/v1/tokens/bot")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.content_type.starts_with("application/json"), "{r:?}");
    let v = r.json();
    assert_eq!(v["name"], "bot");
    assert_eq!(v["access_token"], bot.access_token.as_str());
    assert_eq!(v["token_type"], "Bearer");
    let left = seconds_until(v["expires_at"].as_str().expect("expires_at"));
    assert!(
        left > (bot.expires_in - 120) as f64,
        "expires about a year ahead: {left}"
    );
    assert_eq!(v.as_object().unwrap().len(), 4, "{v}");

    // GET /v1/credentials and /v1/credentials/{name}: statuses, never a secret.
    let r = curl(&sock, &[&url("/v1/credentials")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.content_type.starts_with("application/json"), "{r:?}");
    assert_no_secrets(&r.body, "GET /v1/credentials");
    let list = r.json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bot", "dead"]);
    let r = curl(&sock, &[&url("/v1/credentials/bot")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_no_secrets(&r.body, "GET /v1/credentials/bot");
    let s = r.json();
    assert_eq!(s["name"], "bot");
    assert_eq!(s["provider"], "fake");
    assert_eq!(s["state"], "valid");
    assert_eq!(s["has_token"], true);
    let s = curl(&sock, &[&url("/v1/credentials/dead")]).json();
    assert_eq!(s["state"], "needs_reauthorization");
    assert_eq!(s["has_token"], false);

    // 404 unknown_credential, on every route that names a credential.
    for (method, path) in [
        ("GET", "/v1/tokens/nope"),
        ("GET", "/v1/credentials/nope"),
        ("POST", "/v1/credentials/nope/refresh"),
        ("POST", "/v1/tokens/nope/rejected"),
    ] {
        let r = curl(&sock, &["-X", method, &url(path)]);
        let m = r.assert_error(404, "unknown_credential");
        assert!(m.contains("nope"), "{method} {path}: {m}");
    }

    // 503 needs_reauthorization, with the command that fixes it.
    let r = curl(&sock, &[&url("/v1/tokens/dead")]);
    let m = r.assert_error(503, "needs_reauthorization");
    assert!(
        m.contains("tokend authorize dead --provider fake"),
        "says what to do: {m}"
    );

    // POST /v1/credentials/{name}/refresh: a new token, and the status.
    let r = curl(&sock, &["-X", "POST", &url("/v1/credentials/bot/refresh")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_no_secrets(&r.body, "POST refresh");
    let v = r.json();
    assert_eq!(v["refreshed"], true, "{v}");
    assert_eq!(v["name"], "bot");
    assert_eq!(v["state"], "valid");
    let new = env.provider.grant(bot.grant_id).unwrap().access_token;
    assert_ne!(new, bot.access_token);
    assert_eq!(curl(&sock, &[&url("/v1/tokens/bot")]).body, new);
    assert_eq!(env.provider.stats().refreshes_ok, 1);

    // POST /v1/tokens/{name}/rejected: 202.
    let r = curl(&sock, &["-X", "POST", &url("/v1/tokens/bot/rejected")]);
    assert_eq!(r.status, 202, "{r:?}");

    // 400 bad_request: a body over 4 KiB, on both POST routes; nothing happens.
    let big = env.dir.path().join("big.body");
    fs::write(&big, vec![b'x'; 5000]).unwrap();
    let data = format!("@{}", big.display());
    for path in ["/v1/tokens/bot/rejected", "/v1/credentials/bot/refresh"] {
        let r = curl(&sock, &["-X", "POST", "--data-binary", &data, &url(path)]);
        r.assert_error(400, "bad_request");
    }
    assert_eq!(
        env.provider.stats().refreshes_ok,
        1,
        "a refused request did nothing"
    );

    // 404 not_found and 405 method_not_allowed.
    for path in ["/", "/nope", "/v1", "/v1/other/bot", "/v2/tokens/bot"] {
        curl(&sock, &[&url(path)]).assert_error(404, "not_found");
    }
    for (method, path) in [
        ("DELETE", "/v1/tokens/bot"),
        ("POST", "/v1/tokens/bot"),
        ("GET", "/v1/tokens/bot/rejected"),
        ("GET", "/v1/credentials/bot/refresh"),
        ("PUT", "/v1/credentials"),
        ("POST", "/health"),
        ("DELETE", "/metrics"),
    ] {
        curl(&sock, &["-X", method, &url(path)]).assert_error(405, "method_not_allowed");
    }

    // 503 no_valid_token: a credential without an access token while the
    // token endpoint is out (request_timeout 1 s, so the read waits ≤ 3 s).
    env.provider.update_knobs(|k| {
        k.fault = Some(Fault::Status503);
        k.fault_count = None;
    });
    env.import("starved", false);
    wait_for(
        "the daemon to load starved",
        Duration::from_secs(20),
        || (get(&sock, "/v1/credentials/starved").status == 200).then_some(()),
    );
    let started = Instant::now();
    let r = curl(&sock, &[&url("/v1/tokens/starved")]);
    let m = r.assert_error(503, "no_valid_token");
    assert!(m.contains("503"), "names the provider's answer: {m}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "bounded wait: {:?}",
        started.elapsed()
    );

    // GET /metrics: every family, with what happened above.
    let r = curl(&sock, &[&url("/metrics")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.content_type.starts_with("text/plain"), "{r:?}");
    assert_no_secrets(&r.body, "GET /metrics");
    for family in [
        "tokend_credential_expiry_seconds",
        "tokend_credential_state",
        "tokend_refreshes_total",
        "tokend_validations_total",
        "tokend_provider_request_duration_seconds_bucket",
        "tokend_provider_request_duration_seconds_sum",
        "tokend_provider_request_duration_seconds_count",
        "tokend_socket_requests_total",
    ] {
        assert!(
            r.body.lines().any(|l| l.starts_with(family)),
            "no {family} in\n{}",
            r.body
        );
    }
    for line in [
        "tokend_credential_state{credential=\"dead\",state=\"needs_reauthorization\"} 1",
        "tokend_credential_state{credential=\"bot\",state=\"valid\"} 1",
        "tokend_refreshes_total{outcome=\"ok\"} 1",
        "tokend_socket_requests_total{route=\"/v1/tokens/{name}\",status=\"200\"}",
        "tokend_socket_requests_total{route=\"/v1/tokens/{name}\",status=\"404\"} 1",
        "tokend_socket_requests_total{route=\"/v1/tokens/{name}/rejected\",status=\"202\"} 1",
    ] {
        assert!(r.body.contains(line), "no {line} in\n{}", r.body);
    }
    assert!(
        r.body
            .contains("tokend_credential_expiry_seconds{credential=\"bot\"}"),
        "{}",
        r.body
    );
    drop(d);
}

// ---- 2. access rules and the socket file's mode and group ----

/// A user (uid, primary gid, name) who is a listed member of a group other
/// than its primary one, with that group's name: to show that supplementary
/// groups (getgrouplist) count.
fn user_with_supplementary_group() -> Option<(u32, u32, String)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    let group = fs::read_to_string("/etc/group").ok()?;
    for g in group.lines() {
        let f: Vec<&str> = g.split(':').collect();
        if f.len() < 4 || f[3].is_empty() {
            continue;
        }
        let Ok(gid) = f[2].parse::<u32>() else {
            continue;
        };
        for member in f[3].split(',') {
            let user = passwd.lines().find_map(|l| {
                let p: Vec<&str> = l.split(':').collect();
                (p.len() > 3 && p[0] == member).then(|| (p[2].parse().ok(), p[3].parse().ok()))
            });
            if let Some((Some(uid), Some(primary))) = user
                && uid != 0
                && primary != gid
            {
                return Some((uid, primary, f[0].to_owned()));
            }
        }
    }
    None
}

#[test]
fn access_rules_decide_what_another_uid_may_read() {
    if !is_root() && skip("needs root") {
        return;
    }
    let env = Env::bare(Knobs::default());
    let supplementary = user_with_supplementary_group();
    let mut rules = "[[access]]\ncredentials = [\"by-uid\", \"by-uid-*\"]\nuids = [65534]\n\
         [[access]]\ncredentials = [\"by-group\"]\ngroups = [\"nogroup\"]\n"
        .to_owned();
    if let Some((_, _, group)) = &supplementary {
        rules.push_str(&format!(
            "[[access]]\ncredentials = [\"by-supplementary\"]\ngroups = [\"{group}\"]\n"
        ));
    }
    env.write_config(
        &format!("socket_mode = \"0666\"\n{FAST_REFRESH}"),
        &format!("{}{rules}", env.sink("raw", "0600")),
    );
    let grants: Vec<(&str, MintedGrant)> = ["by-uid", "by-group", "secret", "by-supplementary"]
        .into_iter()
        .map(|n| (n, env.import(n, true)))
        .collect();
    let token = |name: &str| {
        grants
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, g)| g.access_token.clone())
            .unwrap()
    };
    // Others may reach the socket in the (otherwise private) temp dir.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));
    assert_eq!(mode(&sock), 0o666);
    let nobody = |args: &[&str]| curl_as(65534, 65534, &sock, args);

    // What no rule grants: 403 on every route that names a credential, and
    // 403 (not 404) for a name that does not exist, so names do not leak.
    for (method, path) in [
        ("GET", "/v1/tokens/secret"),
        ("GET", "/v1/credentials/secret"),
        ("POST", "/v1/credentials/secret/refresh"),
        ("POST", "/v1/tokens/secret/rejected"),
        ("GET", "/v1/tokens/no-such-thing"),
        ("GET", "/v1/credentials/no-such-thing"),
    ] {
        let r = nobody(&["-X", method, &url(path)]);
        let m = r.assert_error(403, "forbidden");
        assert!(m.contains("65534"), "names the uid: {m}");
    }
    // Granted by uid, and by group.
    for name in ["by-uid", "by-group"] {
        let r = nobody(&[&url(&format!("/v1/tokens/{name}"))]);
        assert_eq!(r.status, 200, "{name}: {r:?}");
        assert_eq!(r.body, token(name));
        let r = nobody(&[&url(&format!("/v1/credentials/{name}"))]);
        assert_eq!(r.status, 200, "{name}: {r:?}");
    }
    // A granted name that does not exist is 404.
    nobody(&[&url("/v1/tokens/by-uid-x")]).assert_error(404, "unknown_credential");
    // The list holds only what the caller may read.
    let r = nobody(&[&url("/v1/credentials")]);
    assert_eq!(r.status, 200, "{r:?}");
    let names: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["by-group", "by-uid"]);
    // Root reads everything.
    assert_eq!(
        listed_names(&sock),
        ["by-group", "by-supplementary", "by-uid", "secret"]
    );
    let r = curl(&sock, &[&url("/v1/tokens/secret")]);
    assert_eq!((r.status, r.body), (200, token("secret")));
    // A uid without a passwd entry, in no granted group, reads nothing.
    let r = curl_as(54321, 54321, &sock, &[&url("/v1/tokens/by-group")]);
    r.assert_error(403, "forbidden");
    // Supplementary groups count (when this machine has such a user).
    match &supplementary {
        Some((uid, gid, group)) => {
            let r = curl_as(*uid, *gid, &sock, &[&url("/v1/tokens/by-supplementary")]);
            assert_eq!(r.status, 200, "uid {uid} via group {group}: {r:?}");
            assert_eq!(r.body, token("by-supplementary"));
            let r = curl_as(*uid, *gid, &sock, &[&url("/v1/tokens/secret")]);
            r.assert_error(403, "forbidden");
        }
        None => eprintln!(
            "note: no user on this machine is a listed member of a group other than its \
             primary one; the supplementary-group case is skipped"
        ),
    }
    // The forbidden refresh and report did nothing at the provider.
    let s = env.provider.stats();
    assert_eq!(s.token_requests, 0, "{s:?}");
    drop(d);
}

#[test]
fn the_socket_file_has_the_configured_mode_and_group() {
    if !is_root() && skip("needs root") {
        return;
    }
    let env = Env::bare(Knobs::default());
    // A gid that is not ours, so that the chown is visible.
    env.write_config(
        &format!("socket_mode = \"0640\"\nsocket_group = \"65534\"\n{FAST_REFRESH}"),
        &env.sink("raw", "0600"),
    );
    let g = env.import("bot", true);
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let mut d = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    let meta = fs::metadata(&env.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(meta.gid(), 65534);
    assert_eq!(meta.uid(), 0, "owned by the daemon's user");
    // The group may not write, so may not connect: curl exits 7.
    let out = curl_command(&env.socket, &[&url("/health")])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "uid 65534 cannot connect to a 0640 socket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The owner can.
    let r = curl(&env.socket, &[&url("/v1/tokens/bot")]);
    assert_eq!((r.status, r.body), (200, g.access_token));
    assert!(d.stop().success());
}

// ---- 3. freshness on read ----

/// min_remaining 10m, and a token tokend believes has 300 s left: the
/// scheduler would refresh it only at half-life (150 s), so any refresh within
/// the test is the read's doing.
fn nearly_expired_env() -> (Env, MintedGrant) {
    let env = Env::bare(Knobs::default());
    env.write_config(&refresh("5s", "10m", ""), &env.sink("raw", "0600"));
    let g = import_expiring(&env, "bot", 300);
    (env, g)
}

#[test]
fn a_nearly_expired_token_is_refreshed_before_it_is_handed_out() {
    let (env, g) = nearly_expired_env();
    let d = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    let r = curl(
        &env.socket,
        &["-H", "Accept: application/json", &url("/v1/tokens/bot")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let token = v["access_token"].as_str().unwrap().to_owned();
    assert_ne!(token, g.access_token, "not the token with 300 s left");
    assert_eq!(
        token,
        env.provider.grant(g.grant_id).unwrap().access_token,
        "the provider's newest token"
    );
    let left = seconds_until(v["expires_at"].as_str().unwrap());
    assert!(left > 600.0, "more than min_remaining left: {left}");
    let s = env.provider.stats();
    assert_eq!(s.refreshes_ok, 1, "{s:?}");
    assert_eq!(s.refresh_requests, 1, "{s:?}");
    // The refreshed token is published too, and the next read reuses it.
    wait_for(
        "the file to hold the new token",
        Duration::from_secs(10),
        || (env.read_token("bot")? == token).then_some(()),
    );
    assert_eq!(curl(&env.socket, &[&url("/v1/tokens/bot")]).body, token);
    assert_eq!(env.provider.stats().refresh_requests, 1);
    drop(d);
}

#[test]
fn concurrent_reads_of_a_nearly_expired_token_cause_one_refresh() {
    let (env, g) = nearly_expired_env();
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));
    // The start-up validation is done before the provider slows down.
    wait_for("the start-up validation", Duration::from_secs(20), || {
        let s = get(&sock, "/v1/credentials/bot").json();
        (!s["last_validated_at"].is_null()).then_some(())
    });
    assert_eq!(env.provider.stats().refresh_requests, 0);
    // Each refresh takes 2 s, so the second read arrives while the first's
    // refresh is in flight and must join it.
    env.provider.update_knobs(|k| k.latency_ms = 2000);
    let read = |sock: std::path::PathBuf| {
        std::thread::spawn(move || {
            let r = socket_request(
                &sock,
                "GET",
                "/v1/tokens/bot",
                &[],
                b"",
                Duration::from_secs(30),
            )
            .unwrap();
            (r.status, r.text())
        })
    };
    let first = read(sock.clone());
    wait_for("the first read's refresh", Duration::from_secs(10), || {
        (env.provider.stats().refresh_requests >= 1).then_some(())
    });
    let second = read(sock.clone());
    let (a, b) = (first.join().unwrap(), second.join().unwrap());
    assert_eq!(a.0, 200, "{a:?}");
    assert_eq!(b.0, 200, "{b:?}");
    let s = env.provider.stats();
    let current = env.provider.grant(g.grant_id).unwrap().access_token;
    assert_eq!(
        s.refresh_requests, 1,
        "two concurrent reads caused {} refreshes: {s:?}",
        s.refresh_requests
    );
    assert_eq!(s.refreshes_ok, 1, "{s:?}");
    assert_eq!(a.1, b.1, "both reads got the same token");
    assert_eq!(a.1, current);
    assert_ne!(a.1, g.access_token);
    drop(d);
}

/// Two reads released at the same instant (no ordering between them).
#[test]
fn simultaneous_reads_of_a_nearly_expired_token_cause_one_refresh() {
    let (env, g) = nearly_expired_env();
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));
    wait_for("the start-up validation", Duration::from_secs(20), || {
        let s = get(&sock, "/v1/credentials/bot").json();
        (!s["last_validated_at"].is_null()).then_some(())
    });
    env.provider.update_knobs(|k| k.latency_ms = 1000);
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (sock, barrier) = (sock.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let r = curl(&sock, &[&url("/v1/tokens/bot")]);
                (r.status, r.body)
            })
        })
        .collect();
    let got: Vec<(u16, String)> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    let s = env.provider.stats();
    assert!(got.iter().all(|r| r.0 == 200), "{got:?}");
    assert_eq!(s.refresh_requests, 1, "{s:?}");
    assert_eq!(got[0].1, got[1].1, "both reads got the same token");
    assert_eq!(
        got[0].1,
        env.provider.grant(g.grant_id).unwrap().access_token
    );
    drop(d);
}

// ---- 4. hostile clients ----

/// A cheap pseudo-random byte stream (xorshift), for garbage.
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// How much a daemon's RSS may grow under the hostile clients' storm.
const RSS_GROWTH_KIB: u64 = 64 * 1024;

fn rss_kib(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Reads until the peer closes (Ok) or `timeout` passes without it (Err).
fn closed_within(s: &mut UnixStream, timeout: Duration) -> Result<(), String> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("still open after {timeout:?}"));
            }
            Err(_) => return Ok(()),
        }
    }
}

/// The header bound (README "Bounds": a head within 10 s, which also
/// closes idle keep-alive connections) counts from each request, not from
/// the connection's first: a connection busy past its first 10 s stays
/// open, and once idle it is closed 10 s after its last answer.
#[test]
fn an_idle_keep_alive_connection_is_closed_10_s_after_its_last_request() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let _d = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    let mut s = UnixStream::connect(&env.socket).unwrap();
    let opened = Instant::now();
    let mut last = opened;
    while opened.elapsed() < Duration::from_secs(13) {
        // Taken before the request: the daemon's 10 s start once it has
        // answered, which is after this however slowly the reply is read.
        last = Instant::now();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap_or_else(|e| panic!("closed after {:?}: {e}", opened.elapsed()));
        let r = read_one_reply(&mut s);
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{r:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    closed_within(&mut s, Duration::from_secs(20)).unwrap();
    let idle = last.elapsed();
    assert!(
        idle >= Duration::from_secs(10) && idle < Duration::from_secs(20),
        "closed {idle:?} after the last request"
    );
}

#[test]
fn hostile_clients_do_not_stop_a_well_behaved_one() {
    let env = Env::new(Knobs::default());
    let g = env.import("bot", true);
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));
    let pid = d.pid();
    let rss_before = rss_kib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let storm_start = Instant::now();

    // 50 silent connections.
    let mut silent: Vec<UnixStream> = (0..50)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    // 20 slow-loris clients: a partial head, then a byte a second. Each
    // notes when the daemon cut it off.
    let cut_off: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut threads = Vec::new();
    for _ in 0..20 {
        let (sock, stop, cut_off) = (sock.clone(), stop.clone(), cut_off.clone());
        threads.push(std::thread::spawn(move || {
            let mut s = UnixStream::connect(&sock).unwrap();
            let started = Instant::now();
            let mut ok = s
                .write_all(b"GET /v1/tokens/bot HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
                .is_ok();
            while ok && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                ok = s.write_all(b"a").is_ok();
            }
            if !ok {
                cut_off.lock().unwrap().push(started.elapsed());
            }
        }));
    }
    // 10 garbage clients: random bytes, then whatever comes back.
    let garbage_replies: Arc<Mutex<Vec<String>>> = Arc::default();
    for i in 0..10 {
        let (sock, replies) = (sock.clone(), garbage_replies.clone());
        threads.push(std::thread::spawn(move || {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let _ = s.write_all(&garbage(64 * 1024, 0x9E37_79B9_7F4A_7C15 + i));
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply);
            let line = String::from_utf8_lossy(&reply)
                .lines()
                .next()
                .unwrap_or("(closed)")
                .to_owned();
            replies.lock().unwrap().push(line);
        }));
    }
    // 5 oversized heads: 1 MB of header data.
    let oversized_replies: Arc<Mutex<Vec<String>>> = Arc::default();
    for _ in 0..5 {
        let (sock, replies) = (sock.clone(), oversized_replies.clone());
        threads.push(std::thread::spawn(move || {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut req = b"GET /v1/tokens/bot HTTP/1.1\r\nHost: localhost\r\n".to_vec();
            for i in 0..16_000 {
                req.extend_from_slice(
                    format!("X-Filler-{i:05}: {}\r\n", "a".repeat(48)).as_bytes(),
                );
            }
            assert!(req.len() > 1_000_000);
            let sent = s.write_all(&req);
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply);
            let line = String::from_utf8_lossy(&reply)
                .lines()
                .next()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("(closed; write: {sent:?})"));
            replies.lock().unwrap().push(line);
        }));
    }

    // Meanwhile a well-behaved client, on a new connection each time.
    let mut slowest = Duration::ZERO;
    let mut took_each = Vec::new();
    let mut served = 0;
    let mut max_rss = rss_before;
    while storm_start.elapsed() < Duration::from_secs(12) {
        let t = Instant::now();
        let r = socket_request(
            &sock,
            "GET",
            "/v1/tokens/bot",
            &[],
            b"",
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("the well-behaved client failed after {served}: {e}"));
        let took = t.elapsed();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), g.access_token);
        // A stuck accept loop or a starved runtime would hold a read for
        // the 5 s of its client's timeout; a loaded machine, for less.
        assert!(
            took < Duration::from_secs(3),
            "a read took {took:?} during the storm"
        );
        slowest = slowest.max(took);
        took_each.push(took);
        served += 1;
        max_rss = max_rss.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "served {served} reads during the storm, slowest {slowest:?}; RSS {rss_before} kB before, {max_rss} kB at most"
    );
    // The typical read as well as the worst: a runtime that each hostile
    // byte held up a little would slow them all without stopping any.
    took_each.sort();
    let median = took_each[took_each.len() / 2];
    assert!(
        median < Duration::from_millis(300),
        "the median read took {median:?} during the storm"
    );
    // Against buffers that grow with what hostile clients send (about 6 MB
    // here) or with their number: a generous bound on the growth, not a
    // figure (the daemon's memory is measured in benches/daemon.rs).
    assert!(
        max_rss < rss_before + RSS_GROWTH_KIB,
        "the daemon's RSS grew from {rss_before} to {max_rss} kB"
    );

    // The silent ones are dropped by the daemon (headers within 10 s).
    for (i, s) in silent.iter_mut().enumerate() {
        let left = Duration::from_secs(25).saturating_sub(storm_start.elapsed());
        closed_within(s, left.max(Duration::from_millis(100)))
            .unwrap_or_else(|e| panic!("silent connection {i}: {e}"));
    }
    let silent_closed_after = storm_start.elapsed();
    // So are the slow ones.
    wait_for(
        "the slow-loris clients to be cut off",
        Duration::from_secs(20),
        || (cut_off.lock().unwrap().len() == 20).then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let cut = cut_off.lock().unwrap().clone();
    assert!(
        cut.iter().all(|d| *d < Duration::from_secs(20)),
        "slow-loris clients cut off after {cut:?}"
    );
    let garbage_replies = garbage_replies.lock().unwrap().clone();
    assert!(
        garbage_replies
            .iter()
            .all(|l| l.starts_with("HTTP/1.1 400") || l == "(closed)"),
        "garbage got {garbage_replies:?}"
    );
    let oversized_replies = oversized_replies.lock().unwrap().clone();
    assert!(
        oversized_replies
            .iter()
            .all(|l| l.starts_with("HTTP/1.1 431")
                || l.starts_with("HTTP/1.1 400")
                || l.starts_with("(closed")),
        "oversized got {oversized_replies:?}"
    );
    eprintln!(
        "silent closed by {silent_closed_after:?}; slow-loris cut off after {:?}..{:?}; garbage: {:?}; oversized: {:?}",
        cut.iter().min(),
        cut.iter().max(),
        garbage_replies.first(),
        oversized_replies.first()
    );
    // Still serving, and not holding on to more memory than before.
    let r = get(&sock, "/v1/tokens/bot");
    assert_eq!(r.status, 200);
    let rss_after = rss_kib(pid);
    assert!(
        rss_after < rss_before + RSS_GROWTH_KIB,
        "RSS after the storm: {rss_after} kB, {rss_before} kB before"
    );
    drop(d);
}

/// When the daemon logged each line holding `needle` (its timestamps).
fn logged_at(log: &str, needle: &str) -> Vec<SystemTime> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| humantime::parse_rfc3339(l.split_whitespace().next()?).ok())
        .collect()
}

/// Issue 10: a client that pipelines requests and never reads the answers.
/// Once the daemon's socket buffer is full its write waits; that wait is
/// bounded (5 s), so even with every slot (512) taken this way a consumer
/// gets its token within seconds.
///
/// "Within seconds" is counted from the first write that waits (the
/// daemon's log says when): before any does, the daemon (a debug build
/// here) writes the ~140,000 answers that fill 512 socket buffers, which
/// takes it 4 s alone on two cores and up to twice that while the other
/// tests run. The whole wait is capped too; without the bound no slot
/// ever frees.
#[test]
fn slow_readers_on_every_slot_do_not_lock_out_a_consumer() {
    /// MAX_CONNECTIONS in src/socket/mod.rs.
    const SLOTS: usize = 512;
    /// Far more answers than the daemon's socket buffer holds (a few hundred).
    const PIPELINED: usize = 1000;
    let env = Env::new(Knobs::default());
    let g = env.import("bot", true);
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));

    let batch = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(PIPELINED);
    let mut hostile = Vec::with_capacity(SLOTS);
    for i in 0..SLOTS {
        let mut s = UnixStream::connect(&sock).unwrap();
        // Whatever the socket takes now, without ever blocking or reading.
        s.set_nonblocking(true).unwrap();
        let mut sent = 0;
        while sent < batch.len() {
            match s.write(&batch[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("slow reader {i}: {e}"),
            }
        }
        assert!(sent > 0, "slow reader {i} could send nothing");
        hostile.push(s);
    }
    let filled = Instant::now();
    // Every slot is taken: one more connection is closed without an answer.
    let probe = socket_request(&sock, "GET", "/health", &[], b"", Duration::from_secs(5));
    assert!(
        probe.is_err(),
        "a connection beyond the 512 slow readers was served: {probe:?}"
    );

    let r = wait_for(
        "a consumer's token while slow readers hold every slot",
        Duration::from_secs(30),
        || {
            socket_request(
                &sock,
                "GET",
                "/v1/tokens/bot",
                &[],
                b"",
                Duration::from_secs(2),
            )
            .ok()
            .filter(|r| r.status == 200)
        },
    );
    let served = SystemTime::now();
    assert_eq!(r.text(), g.access_token);
    let log = d.log();
    let first_wait = *logged_at(&log, "a socket answer waits")
        .iter()
        .min()
        .expect("an answer waited for a slow reader");
    let first_cut = *logged_at(&log, "has not read its answer")
        .iter()
        .min()
        .expect("a slow reader was cut off");
    let bound = first_cut.duration_since(first_wait).unwrap_or_default();
    let waited = served.duration_since(first_wait).unwrap_or_default();
    eprintln!(
        "the consumer got its token {:?} after every slot was taken, {waited:?} after \
         the first answer began to wait; the first slow reader was cut after {bound:?}",
        filled.elapsed()
    );
    // 5 s, never less; the upper margins are wide because a loaded 2-core
    // machine (CI beside a build) delays timers and the first writes by
    // seconds: what must hold is that waiting answers are cut and the
    // consumer is served, not how fast a busy machine does it.
    assert!(
        bound >= Duration::from_millis(4900) && bound < Duration::from_secs(25),
        "a waiting answer is given 5 s: {bound:?}"
    );
    assert!(
        waited < Duration::from_secs(28),
        "the consumer waited {waited:?} after the first answer began to wait"
    );
    drop(hostile);
    assert_eq!(get(&sock, "/health").status, 200);
    drop(d);
}

/// Every reply on a connection, read until the daemon closes it (or
/// `timeout` passes between reads).
fn read_replies(s: &mut UnixStream, timeout: Duration) -> Vec<Reply> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "reading replies: {e} after {:?}",
                String::from_utf8_lossy(&raw)
            ),
        }
    }
    split_replies(&raw)
}

/// The Content-Length of a reply head (the bytes through its blank line).
fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.trim().parse().expect("a Content-Length"))
}

/// Reads exactly one reply (its head and Content-Length bytes of body).
fn read_one_reply(s: &mut UnixStream) -> Reply {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("a reply head");
        assert!(
            n == 1,
            "closed before a reply: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.push(byte[0]);
    }
    let mut body = vec![0u8; content_length(&raw)];
    s.read_exact(&mut body).expect("a reply body");
    raw.extend_from_slice(&body);
    parse_reply(&raw).unwrap()
}

/// Splits back-to-back replies (each framed by its Content-Length).
fn split_replies(mut raw: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no reply head in {:?}", String::from_utf8_lossy(raw)))
            + 4;
        let whole = (end + content_length(&raw[..end])).min(raw.len());
        out.push(parse_reply(&raw[..whole]).unwrap());
        raw = &raw[whole..];
    }
    out
}

/// A JSON error of the contract: this status and code, and a message.
fn assert_json_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{r:?} {:?}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "not JSON: {r:?} {:?}",
        r.text()
    );
    let v = r.json();
    assert_eq!(v["error"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

/// Sends `bytes` on a new connection (ignoring a write the daemon cuts
/// short) and returns every reply until it closes.
fn exchange(sock: &Path, bytes: &[u8]) -> Vec<Reply> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    read_replies(&mut s, Duration::from_secs(15))
}

/// Empty lines may come before a request line, and are skipped; a client
/// that sends nothing else, faster than the daemon reads, gets 431 once
/// they pass a head's 16 KiB, as an over-long head does. Before, they were
/// skipped one by one until the head's 10 s bound, which is looked at only
/// when a read has to wait: a client writing faster than the daemon reads
/// could hold a slot, and a core, for longer.
#[test]
fn a_flood_of_empty_lines_is_an_oversized_head() {
    let env = Env::new(Knobs::default());
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut writer = s.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let lines = b"\r\n".repeat(512);
        let until = Instant::now() + Duration::from_secs(30);
        // Until the daemon closes the connection (EPIPE), or the bound.
        while Instant::now() < until && writer.write_all(&lines).is_ok() {}
    });
    let replies = read_replies(&mut s, Duration::from_secs(20));
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_json_error(&replies[0], 431, "request_header_fields_too_large");
    flood.join().unwrap();
    assert_eq!(get(&sock, "/health").status, 200);
    drop(d);
}

/// Issue 10: a head that cannot be parsed is answered before any route
/// runs; those answers too are the contract's JSON errors, on the first
/// request of a connection and on a later one, while well-formed requests
/// keep their connection alive.
#[test]
fn malformed_and_oversized_heads_get_json_errors() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));

    // Malformed heads: 400 bad_request.
    for bad in [
        &b"GET /health HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n"[..],
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: ten\r\n\r\n",
        b"GET /health HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        b"POST /health HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET /health HTTP/7.0\r\n\r\n",
        b"GET /he\x7fllo HTTP/1.1\r\n\r\n",
        b"GET /a<b HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        let replies = exchange(&sock, bad);
        assert_eq!(
            replies.len(),
            1,
            "{:?}: {replies:?}",
            String::from_utf8_lossy(bad)
        );
        assert_json_error(&replies[0], 400, "bad_request");
    }

    // A head over 16 KiB (and one with too many headers): 431.
    let mut big = b"GET /health HTTP/1.1\r\nHost: localhost\r\n".to_vec();
    for i in 0..20 {
        big.extend_from_slice(format!("X-Filler-{i:02}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let mut many = b"GET /health HTTP/1.1\r\nHost: localhost\r\n".to_vec();
    for i in 0..120 {
        many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    for bad in [&big, &many] {
        let replies = exchange(&sock, bad);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_json_error(&replies[0], 431, "request_header_fields_too_large");
    }

    // Keep-alive works, and a malformed head later on the connection gets
    // the JSON error too: sent after the first answer was read…
    let mut s = UnixStream::connect(&sock).unwrap();
    for _ in 0..3 {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let r = read_one_reply(&mut s);
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{r:?}");
    }
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nbroken\r\n\r\n")
        .unwrap();
    let replies = read_replies(&mut s, Duration::from_secs(15));
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_json_error(&replies[0], 400, "bad_request");

    // …and pipelined behind good requests (one with a body) in one write:
    // those are answered first, in order.
    let replies = exchange(
        &sock,
        b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n\
          POST /v1/tokens/bot/rejected HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello\
          POST /v1/tokens/bot/rejected HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n\
          NOT HTTP AT ALL\r\n\r\n",
    );
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 202, 202, 200, 400], "{replies:?}");
    assert_json_error(&replies[4], 400, "bad_request");

    // A head split across many writes is still one request.
    let mut s = UnixStream::connect(&sock).unwrap();
    for part in [
        &b"GET /hea"[..],
        b"lth HTTP/1.1\r\nHo",
        b"st: localhost\r",
        b"\n",
        b"\r\n",
    ] {
        s.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    let r = read_one_reply(&mut s);
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{r:?}");

    // The refusals are counted like any answer.
    let metrics = get(&sock, "/metrics").text();
    for line in [
        "tokend_socket_requests_total{route=\"bad_request\",status=\"400\"}",
        "tokend_socket_requests_total{route=\"bad_request\",status=\"431\"}",
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
    drop(d);
}

/// The HTTP/1.1 a client may rely on beyond one request and its answer:
/// HEAD is GET without the body (not on the token route), and the
/// connection goes on after it,
/// `Expect: 100-continue` gets its go-ahead, an HTTP/1.0 client is kept
/// only when it asks and gets the list of credentials close-delimited, an
/// HTTP/1.1 one gets it chunked, and a body too large or malformed gets
/// the JSON error and the connection closes.
#[test]
fn http_framing_a_client_may_rely_on() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));
    // Under the 10 s a connection may idle: an answer whose end is not
    // marked (or a connection not closed after it) fails the read.
    let read_all = |s: &mut UnixStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("the answers, then the end");
        raw
    };

    // HEAD is GET without the body (on /health: "ok", 2 bytes), and the
    // next request on the connection is answered right after it; on the
    // token route, where a read may refresh, it is not allowed.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(
        b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n\r\n\r\nHEAD /v1/tokens/bot HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let raw = read_all(&mut s);
    let mut rest = &raw[..];
    for (status, length) in [("200", Some("2")), ("405", None)] {
        let end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
        assert!(head.starts_with(&format!("http/1.1 {status} ")), "{head:?}");
        let said = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("a content-length");
        assert!(length.is_none_or(|n| n == said) && said != "0", "{head:?}");
        assert!(head.contains("\r\ndate: "), "{head:?}");
        rest = &rest[end..];
    }
    let next = parse_reply(rest).unwrap();
    assert_eq!((next.status, next.text().as_str()), (200, "ok"), "{next:?}");
    assert_eq!(next.header("connection"), Some("close"));

    // Expect: 100-continue: the go-ahead comes before the body is sent.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(
        b"POST /v1/tokens/bot/rejected HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let go = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut got = vec![0u8; go.len()];
    s.read_exact(&mut got)
        .expect("the go-ahead before the body");
    assert_eq!(got, go, "{:?}", String::from_utf8_lossy(&got));
    s.write_all(b"hello").unwrap();
    let r = parse_reply(&read_all(&mut s)).unwrap();
    assert_eq!(r.status, 202, "{r:?}");

    // HTTP/1.0: kept only when asked, and the list ends with the connection.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let r = read_one_reply(&mut s);
    assert_eq!(
        (r.status, r.header("connection")),
        (200, Some("keep-alive"))
    );
    s.write_all(b"GET /v1/credentials HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let raw = read_all(&mut s);
    let r = parse_reply(&raw).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.json()[0]["name"], "bot", "{:?}", r.text());

    // HTTP/1.1: the list is chunked (parse_reply follows the chunks).
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET /v1/credentials HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = parse_reply(&read_all(&mut s)).unwrap();
    assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{r:?}");
    assert_eq!(r.json()[0]["name"], "bot", "{:?}", r.text());

    // Bodies: over 4096 bytes, or chunked wrongly: 400, and the end.
    for bad in [
        &b"POST /v1/tokens/bot/rejected HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"[..],
        b"POST /v1/tokens/bot/rejected HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let replies = exchange(&sock, bad);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_json_error(&replies[0], 400, "bad_request");
        assert_eq!(replies[0].header("connection"), Some("close"));
    }
    drop(d);
}

// ---- 5. the socket file's lifecycle ----

#[test]
fn sigterm_removes_the_socket_file() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let mut d = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    assert!(env.socket.exists());
    assert!(d.stop().success());
    assert!(!env.socket.exists(), "the socket file is removed at exit");
    assert!(UnixStream::connect(&env.socket).is_err());
}

/// Issue 3: "Shutdown closes the listener first, finishes or cuts open
/// requests within a bound, and removes the socket file."
#[test]
fn sigterm_closes_the_listener_first_and_finishes_a_request_in_flight() {
    let (env, g) = nearly_expired_env();
    let mut d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));
    wait_for("the start-up validation", Duration::from_secs(20), || {
        let s = get(&sock, "/v1/credentials/bot").json();
        (!s["last_validated_at"].is_null()).then_some(())
    });
    // A silent client, and a read whose refresh takes 2 s, begun before
    // the SIGTERM: it ends before the 3 s after which a read is answered
    // without its refresh (below).
    let mut silent = UnixStream::connect(&sock).unwrap();
    env.provider.update_knobs(|k| k.latency_ms = 2000);
    let reader = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            socket_request(
                &sock,
                "GET",
                "/v1/tokens/bot",
                &[],
                b"",
                Duration::from_secs(30),
            )
        })
    };
    wait_for("the read's refresh", Duration::from_secs(10), || {
        (env.provider.stats().refresh_requests == 1).then_some(())
    });
    let stopping = Instant::now();
    d.signal(libc::SIGTERM);
    wait_for("the listener to close", Duration::from_secs(5), || {
        UnixStream::connect(&sock).is_err().then_some(())
    });
    assert!(
        !reader.is_finished(),
        "the listener closed while the read was still in flight"
    );
    let r = reader
        .join()
        .unwrap()
        .expect("the read in flight is answered");
    assert_eq!(r.status, 200, "{r:?}");
    let new = env.provider.grant(g.grant_id).unwrap().access_token;
    assert_eq!(r.text(), new);
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(12),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    assert!(!sock.exists(), "the socket file is removed");
    closed_within(&mut silent, Duration::from_secs(1)).expect("the silent client is cut off");
    // The refresh in flight was committed before exit.
    assert_eq!(
        env.row("bot").unwrap().access_token.as_deref(),
        Some(new.as_str())
    );
}

/// A token read, or a `tokend refresh`, waiting on a refresh that outlasts
/// the socket's drain (5 s) is answered before the drain cuts its
/// connection: the read with the token there is (still unexpired), the
/// command with why it has no new token. Before, the connection was cut
/// unanswered. The refresh itself still commits before tokend exits.
#[test]
fn sigterm_answers_a_request_whose_refresh_outlasts_the_drain() {
    let (env, g) = nearly_expired_env();
    env.write_config(&refresh("30s", "10m", ""), &env.sink("raw", "0600"));
    let sock = env.socket.clone();
    let started = || {
        wait_serving(&sock, Duration::from_secs(20));
        wait_for("the start-up validation", Duration::from_secs(20), || {
            let s = get(&sock, "/v1/credentials/bot").json();
            (!s["last_validated_at"].is_null()).then_some(())
        });
        env.provider.update_knobs(|k| k.latency_ms = 8000);
    };
    let refreshes = || env.provider.stats().refresh_requests;

    // A read whose refresh takes 8 s.
    let mut d = env.start();
    started();
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            socket_request(
                &sock,
                "GET",
                "/v1/tokens/bot",
                &[],
                b"",
                Duration::from_secs(30),
            )
        });
        wait_for("the read's refresh", Duration::from_secs(10), || {
            (refreshes() == 1).then_some(())
        });
        d.signal(libc::SIGTERM);
        let r = reader
            .join()
            .unwrap()
            .expect("the read is answered before its connection is cut");
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.text() == g.access_token,
            "not the token there was, unexpired"
        );
    });
    assert!(d.wait_exit(Duration::from_secs(30)).success());
    let new = env.provider.grant(g.grant_id).unwrap().access_token;
    assert!(
        env.row("bot").unwrap().access_token.as_deref() == Some(new.as_str()),
        "the refresh was not stored before exit"
    );

    // `tokend refresh` through the daemon, its refresh taking 8 s.
    env.provider.update_knobs(|k| k.latency_ms = 0);
    let mut d = env.start();
    started();
    std::thread::scope(|s| {
        let command = s.spawn(|| env.cli(&["refresh", "bot"], ""));
        wait_for("the command's refresh", Duration::from_secs(10), || {
            (refreshes() == 2).then_some(())
        });
        d.signal(libc::SIGTERM);
        let out = command.join().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("was not refreshed (refreshing): tokend is stopping"),
            "{err}"
        );
    });
    assert!(d.wait_exit(Duration::from_secs(30)).success());
    let info = env.provider.grant(g.grant_id).unwrap();
    assert_eq!(info.rotations, 2);
    assert!(
        env.row("bot").unwrap().access_token.as_deref() == Some(info.access_token.as_str()),
        "the refresh was not stored before exit"
    );
    assert!(info.alive);
}

/// An idle keep-alive connection does not hold shutdown up: the drain
/// reaches it at once (the connection stops waiting for a head once the
/// daemon stops), not when the drain's 5 s bound runs out.
#[test]
fn sigterm_closes_an_idle_keep_alive_connection_at_once() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let mut d = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    let mut s = UnixStream::connect(&env.socket).unwrap();
    // Several requests: the connection's task has been woken many times
    // before the drain comes.
    for _ in 0..3 {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let r = read_one_reply(&mut s);
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{r:?}");
    }
    let stopping = Instant::now();
    d.signal(libc::SIGTERM);
    closed_within(&mut s, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("the idle connection at shutdown: {e}"));
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "shutdown took {:?}",
        stopping.elapsed()
    );
}

#[test]
fn a_stale_socket_file_is_replaced_at_start() {
    let env = Env::new(Knobs::default());
    let g = env.import("bot", true);
    // A socket file nobody listens on, as a crash leaves it.
    drop(UnixListener::bind(&env.socket).unwrap());
    assert!(fs::metadata(&env.socket).unwrap().file_type().is_socket());
    assert!(UnixStream::connect(&env.socket).is_err());
    let mut d = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    let r = get(&env.socket, "/v1/tokens/bot");
    assert_eq!((r.status, r.text()), (200, g.access_token));
    assert_eq!(mode(&env.socket), 0o660, "the default mode");
    assert!(d.stop().success());
    assert!(!env.socket.exists());
}

#[test]
fn a_second_daemon_on_a_live_socket_fails_and_the_first_keeps_serving() {
    let env = Env::new(Knobs::default());
    let g = env.import("bot", true);
    let mut first = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    wait_for("the start-up validation", Duration::from_secs(20), || {
        (env.provider.stats().validations_ok == 1).then_some(())
    });
    let inode = fs::metadata(&env.socket).unwrap().ino();

    let mut second = Daemon::start(&env, "second");
    let status = second.wait_exit(Duration::from_secs(30));
    let log = second.log();
    assert_eq!(status.code(), Some(1), "second daemon: {status:?}\n{log}");
    assert!(
        log.contains(&env.socket.display().to_string()),
        "the message names the socket path:\n{log}"
    );
    assert!(
        !log.contains("tokend running"),
        "the second daemon did not claim to run:\n{log}"
    );

    // The first keeps its socket file and serves on.
    assert_eq!(fs::metadata(&env.socket).unwrap().ino(), inode);
    let r = get(&env.socket, "/v1/tokens/bot");
    assert_eq!((r.status, r.text()), (200, g.access_token));
    assert!(first.child.try_wait().unwrap().is_none());
    assert!(first.stop().success());
    assert!(!env.socket.exists());
}

/// README "Configuration": "the daemon never starts half-configured". A daemon that
/// cannot take its socket (here a plain listener holds it) must exit without
/// having touched the store or the provider. Credentials without an access
/// token make any early refresh visible: it would take the store's lease
/// (state "refreshing") before the token request. The race is narrow, so
/// the start is tried a few times.
#[test]
fn a_daemon_that_cannot_take_its_socket_touches_nothing() {
    let env = Env::new(Knobs::default());
    let _held = UnixListener::bind(&env.socket).unwrap();
    let names: Vec<String> = (0..30).map(|i| format!("c{i:02}")).collect();
    for n in &names {
        env.import(n, false);
    }
    let before: Vec<(String, i64)> = names
        .iter()
        .map(|n| {
            let r = env.row(n).unwrap();
            (r.state, r.version)
        })
        .collect();
    for attempt in 1..=5 {
        let mut d = Daemon::start(&env, "blocked");
        let status = d.wait_exit(Duration::from_secs(30));
        let log = d.log();
        assert_eq!(status.code(), Some(1), "{log}");
        assert!(log.contains(&env.socket.display().to_string()), "{log}");
        let after: Vec<(String, i64)> = names
            .iter()
            .map(|n| {
                let r = env.row(n).unwrap();
                (r.state, r.version)
            })
            .collect();
        let touched: Vec<_> = names
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| b != a)
            .map(|(n, (_, a))| format!("{n}: {}", a.0))
            .collect();
        assert!(
            touched.is_empty(),
            "start {attempt} failed on the socket but changed rows first: {touched:?}"
        );
        let s = env.provider.stats();
        assert_eq!(
            s.token_requests + s.validations,
            0,
            "start {attempt}: {s:?}"
        );
    }
}

/// Issue 10: `socket` pointing at something that is not a socket (here the
/// live database) is a configuration error: exit 2, naming the path and
/// what is there, and the file is left as it was.
#[test]
fn a_socket_path_that_is_the_database_is_refused_and_left_alone() {
    let env = Env::bare(Knobs::default());
    // The socket where the store is.
    let text = format!(
        "database = \"{}\"\nsocket = \"{}\"\n{FAST_REFRESH}\n{}\n{}",
        env.db.display(),
        env.db.display(),
        env.provider_block(),
        env.sink("raw", "0600")
    );
    fs::write(&env.config_path, text).unwrap();
    env.import("bot", true);
    let before = fs::read(&env.db).unwrap();
    let meta = fs::symlink_metadata(&env.db).unwrap();
    assert!(meta.file_type().is_file());

    let mut d = env.start();
    let status = d.wait_exit(Duration::from_secs(20));
    let log = d.log();
    assert_eq!(status.code(), Some(2), "{status:?}\n{log}");
    assert!(
        log.contains(&env.db.display().to_string()) && log.contains("regular file"),
        "names the path and what is there:\n{log}"
    );
    assert!(!log.contains("tokend running"), "{log}");
    let after = fs::symlink_metadata(&env.db).expect("the database is still there");
    assert!(after.file_type().is_file());
    assert_eq!(
        (after.ino(), after.mode()),
        (meta.ino(), meta.mode()),
        "the same file, same mode"
    );
    assert_eq!(
        fs::read(&env.db).unwrap(),
        before,
        "the database is unchanged"
    );
    assert!(env.row("bot").is_some(), "and still readable");
}

/// A symlink at the socket path is not followed, removed or changed, nor
/// is what it points to: exit 2.
#[test]
fn a_socket_path_that_is_a_symlink_is_refused_and_nothing_is_touched() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let target = env.dir.path().join("precious.txt");
    fs::write(&target, "keep me\n").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&target, &env.socket).unwrap();
    let link_before = fs::symlink_metadata(&env.socket).unwrap();
    let target_before = fs::metadata(&target).unwrap();

    let mut d = env.start();
    let status = d.wait_exit(Duration::from_secs(20));
    let log = d.log();
    assert_eq!(status.code(), Some(2), "{status:?}\n{log}");
    assert!(
        log.contains(&env.socket.display().to_string()) && log.contains("symbolic link"),
        "names the path and what is there:\n{log}"
    );
    let link_after = fs::symlink_metadata(&env.socket).expect("the link is still there");
    assert!(link_after.file_type().is_symlink());
    assert_eq!(link_after.ino(), link_before.ino());
    assert_eq!(fs::read_link(&env.socket).unwrap(), target);
    let target_after = fs::metadata(&target).unwrap();
    assert_eq!(fs::read_to_string(&target).unwrap(), "keep me\n");
    assert_eq!(
        (target_after.ino(), target_after.mode(), target_after.gid()),
        (
            target_before.ino(),
            target_before.mode(),
            target_before.gid()
        ),
        "the target's mode and group are untouched"
    );
}

// ---- 6. consumers' reports of a refused token ----

#[test]
fn rejected_reports_revalidate_at_most_once_per_cooldown() {
    let env = Env::bare(Knobs::default());
    // A cooldown long enough for the burst below with a generous margin:
    // five requests over a local socket take milliseconds (their latency
    // is measured in benches/socket.rs), not seconds.
    env.write_config(
        &refresh("3s", "1s", "rejected_cooldown = \"4s\""),
        &env.sink("raw", "0600"),
    );
    let g = env.import("bot", true);
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));
    wait_for("the start-up validation", Duration::from_secs(20), || {
        (env.provider.stats().validations == 1).then_some(())
    });

    // A burst of five reports: one validation.
    let burst = Instant::now();
    let mut first_answered = None;
    for _ in 0..5 {
        let r = request(&sock, "POST", "/v1/tokens/bot/rejected");
        assert_eq!(r.status, 202, "{r:?}");
        // The daemon starts the cooldown before it answers the first.
        first_answered.get_or_insert_with(Instant::now);
    }
    let first_answered = first_answered.unwrap();
    let burst_took = burst.elapsed();
    assert!(
        burst_took < Duration::from_secs(3),
        "the burst must fit in the cooldown to mean anything: {burst_took:?}"
    );
    wait_for("the re-validation", Duration::from_secs(10), || {
        (env.provider.stats().validations == 2).then_some(())
    });
    // A measurement window up to the end of the cooldown: no more come.
    std::thread::sleep(Duration::from_millis(4200).saturating_sub(burst.elapsed()));
    let s = env.provider.stats();
    assert_eq!(s.validations, 2, "five reports in one cooldown: {s:?}");
    assert_eq!(s.validations_ok, 2);

    // After the cooldown, another report, another validation.
    std::thread::sleep(Duration::from_millis(4200).saturating_sub(first_answered.elapsed()));
    let r = request(&sock, "POST", "/v1/tokens/bot/rejected");
    assert_eq!(r.status, 202);
    wait_for("the second re-validation", Duration::from_secs(10), || {
        (env.provider.stats().validations == 3).then_some(())
    });
    // The token was fine: nothing was refreshed, and it is still handed out.
    let s = env.provider.stats();
    assert_eq!(s.token_requests, 0, "{s:?}");
    assert_eq!(get(&sock, "/v1/tokens/bot").text(), g.access_token);
    // The provider counts a validation as it arrives, the daemon once it
    // has the answer.
    wait_for(
        "three validations in the metrics",
        Duration::from_secs(10),
        || {
            get(&sock, "/metrics")
                .text()
                .contains("tokend_validations_total{outcome=\"ok\"} 3")
                .then_some(())
        },
    );
    drop(d);
}

/// The provider stops accepting a token tokend believes good for an hour
/// (the fake provider has no revocation, so: it was minted with an 8 s
/// lifetime and imported with --expires-in 3600). A consumer's report is
/// what makes tokend notice: the re-validation gets 401, and it refreshes.
#[test]
fn a_rejected_report_of_a_dead_token_brings_a_new_one() {
    let env = Env::bare(Knobs::default());
    env.write_config(
        &refresh("3s", "1s", "rejected_cooldown = \"2s\""),
        &env.sink("raw", "0600"),
    );
    env.import("other", true);
    let d = env.start();
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(20));
    // Imported while the daemon runs, so that its start-up validation comes
    // at once, well inside the token's real 8 s.
    env.provider.update_knobs(|k| k.token_lifetime_secs = 8);
    let g = import_expiring(&env, "bot", 3600);
    env.provider
        .update_knobs(|k| k.token_lifetime_secs = Knobs::default().token_lifetime_secs);
    // `>=`, then `==`: a third validation says so instead of timing out.
    wait_for("bot's first validation", Duration::from_secs(20), || {
        (env.provider.stats().validations_ok >= 2).then_some(())
    });
    assert_eq!(
        env.provider.stats().validations_ok,
        2,
        "validated more than the start-up's one and bot's"
    );
    assert_eq!(
        env.provider.stats().token_requests,
        0,
        "the first validation came too late to test anything"
    );
    wait_for(
        "the provider to drop the token",
        Duration::from_secs(20),
        || (!env.provider.access_token_valid(&g.access_token)).then_some(()),
    );
    // tokend does not know yet: it still hands out the dead token.
    assert_eq!(get(&sock, "/v1/tokens/bot").text(), g.access_token);

    let r = request(&sock, "POST", "/v1/tokens/bot/rejected");
    assert_eq!(r.status, 202);
    let new = wait_for(
        "a new token over the socket",
        Duration::from_secs(15),
        || {
            let t = get(&sock, "/v1/tokens/bot").text();
            (t != g.access_token).then_some(t)
        },
    );
    assert_eq!(new, env.provider.grant(g.grant_id).unwrap().access_token);
    assert!(env.provider.access_token_valid(&new));
    let validations: Vec<u16> = env
        .provider
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == "validate")
        .map(|r| r.status)
        .collect();
    assert_eq!(validations.last(), Some(&401), "{validations:?}");
    let s = env.provider.stats();
    assert_eq!(s.refreshes_ok, 1, "{s:?}");
    wait_for(
        "the file to hold the new token",
        Duration::from_secs(10),
        || (env.read_token("bot")? == new).then_some(()),
    );
    drop(d);
}
