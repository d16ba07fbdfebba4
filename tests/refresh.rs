//! README "What it does" and "Credential states": the refresh cycle against the fake provider over HTTP:
//! rotation, validation and what each kind of failure does to a credential,
//! its published files and the requests the provider sees.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;
use tokend_fake_provider::GrantInfo;

/// A `[refresh]` section like FAST_REFRESH, with the timing knobs a test needs.
fn refresh_section(request_timeout: &str, retry_initial: &str, retry_max: &str) -> String {
    format!(
        "\n[refresh]\n{QUIET_SWEEP}\nrefresh_before_expiry = \"2s\"\nmin_remaining = \"1s\"\n\
         request_timeout = \"{request_timeout}\"\nretry_initial = \"{retry_initial}\"\n\
         retry_max = \"{retry_max}\"\n"
    )
}

fn row(env: &Env, name: &str) -> Row {
    env.row(name).unwrap_or_else(|| panic!("no row for {name}"))
}

/// The provider's view of a grant; it always exists in these tests.
fn grant(env: &Env, id: u64) -> GrantInfo {
    env.provider.grant(id).unwrap()
}

/// Validation requests the provider saw, as (arrival ms, status).
fn validations(env: &Env) -> Vec<(u64, u16)> {
    env.provider
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == "validate")
        .map(|r| (r.at_ms, r.status))
        .collect()
}

/// `tokend list` as a user runs it: (name, state, last refresh) per credential.
fn list(env: &Env) -> Vec<(String, String, String)> {
    let out = env.cli(&["list"], "");
    assert!(
        out.status.success(),
        "tokend list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_no_secrets(&stdout, "tokend list");
    let mut lines = stdout.lines();
    let header = lines.next().expect("a header line");
    // Columns are aligned under the header; LAST REFRESH may hold spaces ("3s ago").
    let state_at = header.find("STATE").unwrap();
    let expires_at = header.find("EXPIRES").unwrap();
    let refresh_at = header.find("LAST REFRESH").unwrap();
    let error_at = header.find("LAST ERROR").unwrap();
    lines
        .map(|l| {
            let cell = |from: usize, to: usize| l.get(from..to).unwrap_or("").trim().to_owned();
            (
                l.split_whitespace().next().unwrap().to_owned(),
                cell(state_at, expires_at),
                cell(refresh_at, error_at),
            )
        })
        .collect()
}

/// README "What it does" and "File sinks": with 6 s tokens the daemon
/// rotates every 3.5 to 4 s (2 s ahead of expiry, jittered); each rotation is one successful refresh at the
/// provider, committed before it is published, and every token the
/// provider issued reaches the file. (With 2 s tokens, a loaded machine
/// that held this poller up for a second missed a token.)
#[test]
fn short_lived_tokens_rotate_and_every_rotation_is_published_once() {
    let env = Env::new(Knobs {
        token_lifetime_secs: 6,
        ..Knobs::default()
    });
    let g = env.import("bot", false);
    let mut d = env.start();

    // Every distinct token the file showed, in order, with whether it was
    // ever seen settled: equal to the DB's and to the provider's current one.
    let mut seen: Vec<String> = Vec::new();
    let mut settled_db: Vec<bool> = Vec::new();
    let mut settled_provider: Vec<bool> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.len() < 6 {
        assert!(
            Instant::now() < deadline,
            "only {} tokens published in 90 s",
            seen.len()
        );
        // Read in publication order reversed (file, then DB, then provider):
        // each later read can only be as new or newer.
        let file = env.read_token("bot");
        let stored = row(&env, "bot").access_token;
        let current = grant(&env, g.grant_id).access_token;
        let Some(file) = file else {
            assert!(seen.is_empty(), "the token file disappeared mid-rotation");
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        assert!(!file.is_empty(), "the token file was empty");
        if seen.last() != Some(&file) {
            assert!(
                !seen.contains(&file),
                "the file went back to an older token"
            );
            seen.push(file.clone());
            settled_db.push(false);
            settled_provider.push(false);
        }
        let i = seen.len() - 1;
        if stored.as_deref() == Some(file.as_str()) {
            settled_db[i] = true;
            if current == file {
                settled_provider[i] = true;
            }
        } else {
            // Commit happens before publish: a DB that differs from the file
            // must hold a newer token, never one the file showed before.
            let stored = stored.expect("the DB lost its access token");
            assert!(
                !seen.contains(&stored),
                "the file holds a token the DB does not (published before commit?)"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(d.stop().success());

    // A refresh in flight at SIGTERM completes and is published: take it in.
    let file = env.read_token("bot").expect("the token file");
    if seen.last() != Some(&file) {
        assert!(
            !seen.contains(&file),
            "the file went back to an older token"
        );
        seen.push(file.clone());
        settled_db.push(true);
        settled_provider.push(true);
    }
    let r = row(&env, "bot");
    let info = grant(&env, g.grant_id);
    let stats = env.provider.stats();
    assert_eq!(r.access_token.as_deref(), Some(file.as_str()));
    assert_eq!(
        info.access_token, file,
        "the provider's current token is published"
    );
    assert_eq!(
        r.refresh_token, info.refresh_token,
        "the stored refresh token is the live one"
    );
    assert_eq!(r.state, "valid");
    assert!(
        settled_db.iter().all(|s| *s),
        "every published token was, for a while, the DB's token: {settled_db:?}"
    );
    assert!(
        settled_provider.iter().all(|s| *s),
        "every published token was, for a while, the provider's current one: {settled_provider:?}"
    );
    assert!(info.rotations >= 6, "rotations: {}", info.rotations);
    assert_eq!(stats.refreshes_ok, info.rotations, "{stats:?}");
    assert_eq!(
        stats.refresh_requests, info.rotations,
        "no refresh failed: {stats:?}"
    );
    assert_eq!(
        seen.len() as u64,
        info.rotations,
        "every rotation was published exactly once"
    );
    assert_eq!(
        r.version as u64,
        1 + info.rotations,
        "one DB commit per rotation"
    );
    assert_eq!(env.events("bot", "refreshed") as u64, info.rotations);
    assert_eq!(stats.reuse_detected, 0);
    assert!(info.alive);
}

/// README "Credential states": a 401 on validation means "refresh now", never "delete".
#[test]
fn a_rejected_access_token_is_refreshed_at_once() {
    let env = Env::new(Knobs::default());
    let g = import_with_access(&env, "bot", Some("not-a-real-token-000"), 3600);
    let d = env.start();
    let new = wait_for(
        "the refreshed token in the file",
        Duration::from_secs(15),
        || {
            let current = grant(&env, g.grant_id);
            (current.rotations == 1
                && env.read_token("bot").as_deref() == Some(&current.access_token))
            .then_some(current.access_token)
        },
    );
    assert!(env.provider.access_token_valid(&new));
    let r = row(&env, "bot");
    assert_eq!(r.access_token.as_deref(), Some(new.as_str()));
    assert_eq!(r.state, "valid");
    assert_eq!(r.refresh_token, grant(&env, g.grant_id).refresh_token);
    let v = validations(&env);
    assert_eq!(v.first().map(|x| x.1), Some(401), "validated first: {v:?}");
    d.wait_log(
        "the provider rejected the access token; refreshing now",
        Duration::from_secs(5),
    );
    let stats = env.provider.stats();
    assert_eq!(stats.refreshes_ok, 1);
    assert_eq!(stats.refresh_requests, 1);
    assert_eq!(env.events("bot", "refreshed"), 1);
    drop(d);
}

/// README "Credential states": a validation failure that is not a 401 says nothing about the
/// token: it stays stored and published, the credential is `retrying`, no
/// refresh is attempted, and it is `valid` again once the provider recovers.
fn transient_validation_failure_keeps_the_token(fault: Fault, expect_in_error: &str) {
    let env = Env::bare(Knobs {
        fault: Some(fault.clone()),
        fault_on: FaultTarget::Validate,
        ..Knobs::default()
    });
    env.write_config(
        &refresh_section("1s", "500ms", "2s"),
        &env.sink("raw", "0600"),
    );
    let g = env.import("bot", true);
    let token = g.access_token.clone();
    let d = env.start();
    d.wait_log("tokend running", Duration::from_secs(10));

    // The same token in the file and the DB at every look.
    let kept = |what: &str| {
        assert_eq!(
            env.read_token("bot").as_deref(),
            Some(token.as_str()),
            "{fault:?}: the published token changed {what}"
        );
        let r = row(&env, "bot");
        assert_eq!(
            r.access_token.as_deref(),
            Some(token.as_str()),
            "{fault:?}: the stored token changed {what}"
        );
        r
    };
    let r = wait_for("two failed validations", Duration::from_secs(20), || {
        let r = kept("while validation fails");
        (r.state == "retrying" && r.failures >= 2).then_some(r)
    });
    let error = r.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(expect_in_error),
        "{fault:?}: last_error {error:?} should mention {expect_in_error:?}"
    );
    assert!(env.events("bot", "validation_failed") >= 2);
    d.wait_log("transient failure; will retry", Duration::from_secs(5));
    // Every validation so far met the fault: none was answered for real.
    let failed: Vec<_> = env
        .provider
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == "validate")
        .collect();
    assert!(failed.len() >= 2, "{failed:?}");
    assert!(failed.iter().all(|r| r.fault), "{failed:?}");
    assert_eq!(env.provider.stats().validations_ok, 0);

    env.provider.update_knobs(|k| k.fault = None);
    let r = wait_for(
        "the credential to be valid again",
        Duration::from_secs(15),
        || {
            let r = kept("while recovering");
            (r.state == "valid").then_some(r)
        },
    );
    assert_eq!(r.failures, 0);
    assert_eq!(r.last_error, None);
    kept("after recovering");
    let stats = env.provider.stats();
    assert_eq!(
        stats.token_requests, 0,
        "{fault:?}: no refresh was attempted"
    );
    assert!(stats.validations_ok >= 1);
    assert_eq!(env.events("bot", "refreshed"), 0);
    drop(d);
}

#[test]
fn validation_503_keeps_the_token() {
    transient_validation_failure_keeps_the_token(Fault::Status503, "503");
}

#[test]
fn validation_500_keeps_the_token() {
    transient_validation_failure_keeps_the_token(Fault::Status500, "500");
}

#[test]
fn validation_429_with_retry_after_keeps_the_token() {
    transient_validation_failure_keeps_the_token(
        Fault::TooManyRequests {
            retry_after_secs: Some(1),
        },
        "429",
    );
}

#[test]
fn validation_429_without_retry_after_keeps_the_token() {
    transient_validation_failure_keeps_the_token(
        Fault::TooManyRequests {
            retry_after_secs: None,
        },
        "429",
    );
}

#[test]
fn validation_non_json_200_keeps_the_token() {
    transient_validation_failure_keeps_the_token(Fault::Garbage, "not JSON");
}

#[test]
fn validation_timeout_keeps_the_token() {
    transient_validation_failure_keeps_the_token(
        Fault::Hang,
        "no answer within the request timeout",
    );
}

/// README "Configuration" (backoff "honouring Retry-After"): with retry_initial 500ms and
/// retry_max 2s the daemon would come back within 2 s, but the provider
/// said 3 s.
#[test]
fn retry_after_is_honoured() {
    let env = Env::bare(Knobs {
        fault: Some(Fault::TooManyRequests {
            retry_after_secs: Some(3),
        }),
        fault_on: FaultTarget::Validate,
        ..Knobs::default()
    });
    env.write_config(
        &refresh_section("3s", "500ms", "2s"),
        &env.sink("raw", "0600"),
    );
    let g = env.import("bot", true);
    let d = env.start();
    let v = wait_for(
        "four throttled validations",
        Duration::from_secs(30),
        || {
            let v = validations(&env);
            (v.len() >= 4).then_some(v)
        },
    );
    assert!(v.iter().all(|x| x.1 == 429), "{v:?}");
    for pair in v.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= 2900,
            "validations {gap} ms apart, Retry-After said 3 s: {v:?}"
        );
        assert!(
            gap <= 8000,
            "validations {gap} ms apart: the daemon should come back after 3 s: {v:?}"
        );
    }
    assert_eq!(
        env.read_token("bot").as_deref(),
        Some(g.access_token.as_str())
    );
    assert_eq!(env.provider.stats().token_requests, 0);
    drop(d);
}

/// README "Configuration": during an outage the daemon keeps trying, at most once per
/// retry_initial and backing off towards retry_max, then recovers promptly.
#[test]
fn an_outage_is_ridden_out_with_bounded_backoff() {
    let env = Env::bare(Knobs {
        fault: Some(Fault::Status503),
        fault_on: FaultTarget::Both,
        ..Knobs::default()
    });
    env.write_config(&refresh_section("3s", "1s", "8s"), &env.sink("raw", "0600"));
    // No access token: the credential needs a refresh, which the outage blocks.
    let g = env.import("bot", false);
    let d = env.start();

    let first = wait_for("the first token request", Duration::from_secs(10), || {
        env.provider.requests().first().map(|r| r.at_ms)
    });
    // A measurement window, not synchronisation: 60 s of outage.
    std::thread::sleep(Duration::from_secs(60));
    let window: Vec<u64> = env
        .provider
        .requests()
        .into_iter()
        .filter(|r| r.at_ms < first + 60_000)
        .map(|r| {
            assert_eq!(r.endpoint, "token");
            assert_eq!(r.status, 503);
            r.at_ms
        })
        .collect();
    let n = window.len();
    // Each delay is at most retry_max (8 s): it keeps trying. Allowing a
    // second of slack per attempt, 60 s hold at least 6 attempts.
    assert!(n >= 6, "only {n} attempts in 60 s: {window:?}");
    // Each delay is at least retry_initial (1 s): at most 61 in 60 s.
    assert!(n <= 61, "{n} attempts in 60 s: {window:?}");
    // Delays are drawn uniformly in [1 s, min(8 s, 2^(failures-1) s)]: 1 s,
    // then U[1, 2], U[1, 4], and from the 4th failure on U[1, 8] (mean 4.5 s,
    // about 13 attempts a minute). 30 attempts in 60 s need the 26 U[1, 8]
    // draws among the 29 gaps to sum to under 57 s, i.e. 26 draws of U[0, 1]
    // to sum to under 31/7 = 4.43, whose probability is at most
    // 4.43^26 / 26! < 1e-9 (the volume of a simplex). More than 30 attempts
    // therefore means the delay does not double.
    assert!(
        n <= 30,
        "{n} attempts in 60 s: the backoff does not grow: {window:?}"
    );
    for pair in window.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= 950,
            "attempts {gap} ms apart, retry_initial is 1 s: {window:?}"
        );
        assert!(
            gap <= 10_000,
            "attempts {gap} ms apart, retry_max is 8 s: {window:?}"
        );
    }
    let r = row(&env, "bot");
    assert_eq!(r.state, "retrying");
    assert!(
        r.failures as usize >= n,
        "failures {} < attempts {n}",
        r.failures
    );
    assert!(r.last_error.unwrap_or_default().contains("503"));
    assert_eq!(env.read_token("bot"), None, "nothing to publish yet");

    // The outage ends: the next attempt (at most retry_max away) succeeds.
    env.provider.update_knobs(|k| k.fault = None);
    let token = wait_for(
        "recovery within retry_max + 5 s",
        Duration::from_secs(13),
        || {
            let r = env.row("bot")?;
            let file = env.read_token("bot")?;
            (r.state == "valid" && r.access_token.as_deref() == Some(file.as_str())).then_some(file)
        },
    );
    let info = grant(&env, g.grant_id);
    assert_eq!(info.access_token, token);
    assert_eq!(info.rotations, 1);
    assert_eq!(row(&env, "bot").refresh_token, info.refresh_token);
    let stats = env.provider.stats();
    assert_eq!(stats.refreshes_ok, 1);
    assert_eq!(stats.reuse_detected, 0);
    assert!(info.alive);
    drop(d);
}

/// README "Credential states" and "File sinks": invalid_grant is permanent: the credential needs
/// re-authorization, its files go, and the provider hears no more of it.
#[test]
fn invalid_grant_stops_the_credential_and_removes_its_files() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 8,
        fault: Some(Fault::InvalidGrant),
        fault_on: FaultTarget::Token,
        ..Knobs::default()
    });
    env.write_config(FAST_REFRESH, &env.sink("raw", "0600"));
    let g = env.import("bot", true);
    let d = env.start();
    // Published at start-up; the refresh is due at half-life, ~4 s after minting.
    wait_for("the token file", Duration::from_secs(10), || {
        (env.read_token("bot")? == g.access_token).then_some(())
    });
    let r = wait_for("needs_reauthorization", Duration::from_secs(20), || {
        env.row("bot")
            .filter(|r| r.state == "needs_reauthorization")
    });
    let error = r.last_error.unwrap_or_default();
    assert!(error.contains("invalid_grant"), "last_error: {error:?}");
    assert!(error.contains("re-authorize"), "last_error: {error:?}");
    wait_for(
        "the token file to be removed",
        Duration::from_secs(5),
        || (!env.token_file("bot").exists()).then_some(()),
    );
    assert_eq!(env.events("bot", "needs_reauthorization"), 1);
    d.wait_log("credential stopped", Duration::from_secs(5));
    let listed = list(&env);
    assert_eq!(listed[0].0, "bot");
    assert_eq!(listed[0].1, "needs_reauthorization");

    let before = env.provider.requests().len();
    // A measurement window: nothing more should reach the provider.
    std::thread::sleep(Duration::from_secs(5));
    let requests = env.provider.requests();
    assert_eq!(
        requests.len(),
        before,
        "requests after the grant died: {requests:?}"
    );
    let stats = env.provider.stats();
    assert_eq!(stats.token_requests, 1, "{stats:?}");
    assert!(!env.token_file("bot").exists());
    assert_eq!(env.state("bot").as_deref(), Some("needs_reauthorization"));
    drop(d);
}

/// README "Credential states": invalid_client is our side's fault: misconfigured, no retry
/// loop, and a token that was valid stays published until it expires.
#[test]
fn invalid_client_is_misconfigured_without_a_retry_loop() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 8,
        fault: Some(Fault::InvalidClient),
        fault_on: FaultTarget::Token,
        ..Knobs::default()
    });
    env.write_config(FAST_REFRESH, &env.sink("raw", "0600"));
    // Counted from before the import: the token's lifetime starts there.
    let expires = Instant::now() + Duration::from_secs(8);
    let g = env.import("bot", true);
    let d = env.start();
    let r = wait_for("misconfigured", Duration::from_secs(20), || {
        env.row("bot").filter(|r| r.state == "misconfigured")
    });
    let error = r.last_error.unwrap_or_default();
    assert!(error.contains("invalid_client"), "last_error: {error:?}");
    d.wait_log("credential stopped", Duration::from_secs(5));
    let requests = env.provider.requests().len();
    if Instant::now() + Duration::from_millis(500) < expires {
        assert_eq!(
            env.read_token("bot").as_deref(),
            Some(g.access_token.as_str()),
            "the still-valid token stays published"
        );
    }
    // The token expires about 4 s after the failed refresh: then it goes.
    wait_for(
        "the expired token's file to be removed",
        Duration::from_secs(15),
        || (!env.token_file("bot").exists()).then_some(()),
    );
    assert!(
        Instant::now() + Duration::from_millis(500) >= expires,
        "the file was removed before the token expired"
    );
    // A measurement window after expiry: still no retry loop.
    std::thread::sleep(Duration::from_secs(2));
    let stats = env.provider.stats();
    assert_eq!(
        stats.token_requests, 1,
        "one attempt, no retry loop: {stats:?}"
    );
    assert_eq!(env.provider.requests().len(), requests);
    let r = row(&env, "bot");
    assert_eq!(r.state, "misconfigured");
    assert_eq!(env.events("bot", "misconfigured"), 1);
    drop(d);
}

/// README "Commands": `import` while the daemon runs is picked up without a restart.
#[test]
fn a_credential_imported_while_running_is_picked_up() {
    let env = Env::new(Knobs::default());
    env.import("first", true);
    let mut d = env.start();
    d.wait_log("tokend running", Duration::from_secs(10));
    wait_for(
        "the first credential's validation",
        Duration::from_secs(10),
        || (env.provider.stats().validations_ok == 1).then_some(()),
    );

    // One with its access token (published, then validated) and one without
    // (refreshed first).
    let with = env.import("second", true);
    let without = env.import("third", false);
    wait_for(
        "the second credential's file",
        Duration::from_secs(10),
        || (env.read_token("second")? == with.access_token).then_some(()),
    );
    let third = wait_for(
        "the third credential's file",
        Duration::from_secs(10),
        || {
            let current = grant(&env, without.grant_id);
            (current.rotations == 1 && env.read_token("third")? == current.access_token)
                .then_some(current.access_token)
        },
    );
    wait_for(
        "the second credential's validation",
        Duration::from_secs(10),
        || env.credential("second")?.last_validated_at.map(|_| ()),
    );
    assert_eq!(
        row(&env, "third").access_token.as_deref(),
        Some(third.as_str())
    );
    let listed = list(&env);
    let names: Vec<&str> = listed.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(names.len(), 3, "{listed:?}");
    for (name, state, _) in &listed {
        assert_eq!(state, "valid", "{name}: {listed:?}");
    }
    let third_line = listed.iter().find(|l| l.0 == "third").unwrap();
    assert_ne!(third_line.2, "never", "third was refreshed: {listed:?}");
    let stats = env.provider.stats();
    assert_eq!(
        stats.validations_ok, 2,
        "first and second validated once each"
    );
    assert_eq!(stats.refreshes_ok, 1, "only third was refreshed");
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the same daemon still runs"
    );
    assert!(d.stop().success());
}

/// A second daemon on the same database with its own config and sink directory.
fn start_peer(env: &Env, tokens: &Path) -> Daemon {
    let config = env.dir.path().join("peer.toml");
    let sink = format!(
        "[[sinks]]\npath = \"{}/{{name}}\"\nformat = \"raw\"\nmode = \"0600\"\n",
        tokens.display()
    );
    fs::write(
        &config,
        format!(
            "database = \"{}\"\nsocket = \"{}\"\n{FAST_REFRESH}\n{}\n{sink}",
            env.db.display(),
            env.dir.path().join("peer.sock").display(),
            env.provider_block()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("-c").arg(&config).arg("run");
    Daemon::spawn(cmd, &config, env.dir.path().join("peer.log"))
}

/// README "Commands": "Two processes never refresh the same credential at once": two
/// daemons on one database rotate each refresh token exactly once, and both
/// publish what is stored.
#[test]
fn two_daemons_on_one_database_rotate_each_token_exactly_once() {
    let env = Env::new(Knobs {
        token_lifetime_secs: 2,
        ..Knobs::default()
    });
    let names = ["alpha", "beta"];
    let grants: Vec<MintedGrant> = names.iter().map(|n| env.import(n, true)).collect();
    let peer_tokens: PathBuf = env.dir.path().join("peer-tokens");
    let mut a = env.start();
    let mut b = start_peer(&env, &peer_tokens);
    a.wait_log("tokend running", Duration::from_secs(10));
    b.wait_log("tokend running", Duration::from_secs(10));

    wait_for("8 rotations of each grant", Duration::from_secs(40), || {
        assert!(a.child.try_wait().unwrap().is_none(), "daemon A died");
        assert!(b.child.try_wait().unwrap().is_none(), "daemon B died");
        // A refresh token presented twice kills the grant: fail at once.
        let stats = env.provider.stats();
        assert_eq!(stats.reuse_detected, 0, "{stats:?}");
        // (Requests against successes only once both have stopped, below:
        // the provider counts a request before it answers it.)
        grants
            .iter()
            .all(|g| grant(&env, g.grant_id).rotations >= 8)
            .then_some(())
    });
    // Both daemons publish the stored token (B's directory is B's alone).
    wait_for(
        "both daemons' files to hold the stored token",
        Duration::from_secs(10),
        || {
            names
                .iter()
                .zip(&grants)
                .all(|(name, g)| {
                    let stored = env.row(name).and_then(|r| r.access_token);
                    let a_file = env.read_token(name);
                    let b_file = fs::read_to_string(peer_tokens.join(name)).ok();
                    let current = grant(&env, g.grant_id).access_token;
                    stored.is_some()
                        && stored == a_file
                        && stored == b_file
                        && stored.as_deref() == Some(current.as_str())
                })
                .then_some(())
        },
    );
    a.signal(libc::SIGTERM);
    b.signal(libc::SIGTERM);
    assert!(a.wait_exit(Duration::from_secs(10)).success());
    assert!(b.wait_exit(Duration::from_secs(10)).success());

    let stats = env.provider.stats();
    let mut rotations = 0;
    for (name, g) in names.iter().zip(&grants) {
        let info = grant(&env, g.grant_id);
        let r = row(&env, name);
        assert!(info.alive, "{name}: {:?}", info.revoked_reason);
        assert_eq!(r.refresh_token, info.refresh_token, "{name}: nothing lost");
        assert_eq!(r.access_token.as_deref(), Some(info.access_token.as_str()));
        assert_eq!(
            env.events(name, "refreshed") as u64,
            info.rotations,
            "{name}: one commit per rotation"
        );
        assert_eq!(r.version as u64, 1 + info.rotations, "{name}");
        rotations += info.rotations;
    }
    assert_eq!(stats.reuse_detected, 0, "{stats:?}");
    assert_eq!(stats.refreshes_ok, rotations, "{stats:?}");
    assert_eq!(
        stats.refresh_requests, rotations,
        "every refresh token was presented exactly once: {stats:?}"
    );
}

/// Two tokend processes on one host name, each in its own pid namespace:
/// containers sharing the host's network (`docker run --network host`)
/// and a store. A lease holder's pid means nothing in the other's
/// namespace, where that pid is another process or none: judged by it, the
/// daemon's lease looked abandoned, `tokend refresh` took it while the
/// daemon's request was at the provider and sent the same refresh token,
/// and the provider revoked the grant for its reuse. Runs the daemon under
/// `unshare --pid` (root).
#[test]
fn a_lease_holder_in_another_pid_namespace_is_not_taken_for_gone() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && skip("a pid namespace of its own: root") {
        return;
    }
    let env = Env::bare(Knobs::default());
    env.write_config(&fast_refresh_timeout("30s"), &env.sink("raw", "0600"));
    let g = env.import("bot", true);
    let inner = env.tokend(&["run"]);
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut daemon = Daemon::spawn(cmd, &env.config_path, env.dir.path().join("daemon.log"));
    wait_serving(&env.socket, Duration::from_secs(20));

    // The daemon's refresh, held at the provider for 10 s: the command
    // below must meet its lease, however loaded the machine.
    env.provider.update_knobs(|k| k.answer_delay_ms = 10_000);
    let socket = env.socket.clone();
    let refresh =
        std::thread::spawn(move || request(&socket, "POST", "/v1/credentials/bot/refresh"));
    wait_for(
        "the daemon's refresh at the provider",
        Duration::from_secs(20),
        || (env.provider.stats().refresh_requests == 1).then_some(()),
    );
    // Meanwhile, a refresh of its own from the host: another config that
    // names no running daemon's socket, so the command refreshes directly.
    let direct = env.dir.path().join("direct.toml");
    let text = fs::read_to_string(&env.config_path).unwrap();
    let socket_line = format!("socket = \"{}\"", env.socket.display());
    assert!(text.contains(&socket_line), "{text}");
    let elsewhere = format!(
        "socket = \"{}\"",
        env.dir.path().join("none.sock").display()
    );
    fs::write(&direct, text.replace(&socket_line, &elsewhere)).unwrap();
    assert!(
        !refresh.is_finished(),
        "the daemon's refresh ended before the command ran: the machine was too slow for this test"
    );
    let out = run_cli(
        tokend_command(&direct, env.dir.path(), &["refresh", "bot"]),
        "",
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = refresh.join().unwrap();
    env.provider.update_knobs(|k| k.answer_delay_ms = 0);
    assert_eq!(reply.status, 200, "{}", reply.text());

    let stats = env.provider.stats();
    assert_eq!(
        stats.reuse_detected, 0,
        "{stats:?}; the command said: {said}"
    );
    assert_eq!(
        stats.refresh_requests, 1,
        "{stats:?}; the command said: {said}"
    );
    let info = grant(&env, g.grant_id);
    assert!(info.alive, "{:?}", info.revoked_reason);
    assert!(
        row(&env, "bot").refresh_token == info.refresh_token,
        "the stored refresh token is not the provider's"
    );
    // The daemon is pid 1 of its namespace; unshare waits for it.
    let inner = children(daemon.pid())
        .into_iter()
        .next()
        .expect("no daemon");
    // SAFETY: kill(2) of our own grandchild.
    assert_eq!(unsafe { libc::kill(inner, libc::SIGTERM) }, 0);
    assert!(daemon.wait_exit(Duration::from_secs(20)).success());
}

/// `tokend refresh NAME` with no daemon, interrupted while its request is
/// at the provider (Ctrl-C; a terminal closed): it finishes, stores the
/// rotated refresh token and only then exits. Before, the signal ended the
/// process with the new token in its memory only, and the next refresh
/// sent the rotated-out one, which a provider that detects reuse answers
/// by revoking the grant.
#[test]
fn a_direct_refresh_interrupted_mid_request_stores_its_answer() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    for sig in [libc::SIGINT, libc::SIGHUP, libc::SIGTSTP] {
        // Longer than the 3 s after which the daemon answers those waiting
        // on a refresh at shutdown: this command has nobody to hand its
        // refresh to, and waits for it.
        let env = Env::bare(Knobs {
            latency_ms: 5000,
            ..Knobs::default()
        });
        env.write_config(&fast_refresh_timeout("15s"), &env.sink("raw", "0600"));
        let g = env.import("bot", true);
        let mut child = env
            .tokend(&["refresh", "bot"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(
            "the refresh request to arrive",
            Duration::from_secs(15),
            || (env.provider.stats().refresh_requests == 1).then_some(()),
        );
        // SAFETY: a plain kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        // Ctrl-Z stopped it, before: it would never exit.
        wait_for("the command to exit", Duration::from_secs(30), || {
            child.try_wait().unwrap()
        });
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), None, "signal {sig} ended it: {stderr}");
        assert!(
            out.status.success(),
            "signal {sig}: {:?}: {stderr}",
            out.status
        );
        assert!(
            stderr.contains("after storing the refresh in flight"),
            "{stderr}"
        );
        let info = grant(&env, g.grant_id);
        assert_eq!(info.rotations, 1);
        let r = row(&env, "bot");
        assert!(
            r.refresh_token == info.refresh_token,
            "signal {sig}: the rotated refresh token was not stored"
        );
        assert_eq!(env.credential("bot").unwrap().refresh_started_at, None);
        assert_eq!(env.provider.stats().reuse_detected, 0);
    }
}

/// README "What it does" and the SIGTERM contract: a refresh in flight completes and is
/// committed before the daemon exits, so the rotated refresh token is not lost.
#[test]
fn sigterm_lets_a_refresh_in_flight_commit() {
    let env = Env::bare(Knobs {
        latency_ms: 4000,
        ..Knobs::default()
    });
    env.write_config(&fast_refresh_timeout("15s"), &env.sink("raw", "0600"));
    let g = env.import("bot", false);
    let mut d = env.start();
    wait_for(
        "the refresh request to arrive",
        Duration::from_secs(15),
        || (env.provider.stats().refresh_requests == 1).then_some(()),
    );
    assert_eq!(env.provider.stats().refreshes_ok, 0, "still in flight");
    let signalled = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(20));
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(12), "took {took:?} to stop");

    let info = grant(&env, g.grant_id);
    assert_eq!(info.rotations, 1);
    let r = row(&env, "bot");
    assert_eq!(
        r.refresh_token, info.refresh_token,
        "the rotated refresh token was stored"
    );
    assert_eq!(r.access_token.as_deref(), Some(info.access_token.as_str()));
    assert_eq!(r.state, "valid");
    assert_eq!(env.credential("bot").unwrap().refresh_started_at, None);
    assert_eq!(
        env.read_token("bot").as_deref(),
        Some(info.access_token.as_str())
    );
    assert!(d.log().contains("token refreshed"));
    let stats = env.provider.stats();
    assert_eq!(stats.refreshes_ok, 1);
    assert_eq!(stats.refresh_requests, 1);
}

/// README "Commands" ("two processes never refresh the same credential at once") with
/// "Configuration" (min_remaining: the refresher never lets a token get close to expiry):
/// of two daemons on one database, the one that found the other refreshing
/// must carry on alone once the other stops, not sit out the lease.
#[test]
fn when_one_of_two_daemons_stops_the_other_carries_on() {
    // Latency keeps each refresh's lease held long enough that the daemon
    // waking second finds it busy.
    let env = Env::new(Knobs {
        token_lifetime_secs: 2,
        latency_ms: 300,
        ..Knobs::default()
    });
    let g = env.import("alpha", true);
    let peer_tokens: PathBuf = env.dir.path().join("peer-tokens");
    let mut a = env.start();
    let mut b = start_peer(&env, &peer_tokens);
    a.wait_log("tokend running", Duration::from_secs(10));
    b.wait_log("tokend running", Duration::from_secs(10));
    const BUSY: &str = "another process is refreshing this credential";
    let a_waited = wait_for(
        "one daemon to find the other refreshing",
        Duration::from_secs(30),
        || match (a.log().contains(BUSY), b.log().contains(BUSY)) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
    );
    // Stop the one that was refreshing; the one that waited must take over.
    let (stopped, survivor, survivor_file) = if a_waited {
        (&mut b, &mut a, env.token_file("alpha"))
    } else {
        (&mut a, &mut b, peer_tokens.join("alpha"))
    };
    assert!(stopped.stop().success());
    let before = grant(&env, g.grant_id).rotations;
    wait_for(
        "three more rotations by the surviving daemon",
        Duration::from_secs(10),
        || {
            assert!(
                survivor.child.try_wait().unwrap().is_none(),
                "the survivor died"
            );
            (grant(&env, g.grant_id).rotations >= before + 3).then_some(())
        },
    );
    let current = grant(&env, g.grant_id);
    wait_for(
        "the survivor's file to hold the current token",
        Duration::from_secs(5),
        || {
            let file = fs::read_to_string(&survivor_file).ok()?;
            (file == grant(&env, g.grant_id).access_token).then_some(())
        },
    );
    assert!(survivor.stop().success());
    let info = grant(&env, g.grant_id);
    assert!(info.rotations >= current.rotations);
    assert_eq!(row(&env, "alpha").refresh_token, info.refresh_token);
    let stats = env.provider.stats();
    assert_eq!(stats.reuse_detected, 0, "{stats:?}");
    assert_eq!(stats.refreshes_ok, info.rotations, "{stats:?}");
}
