//! README "Bulk import" (issue 14): `tokend import --from FILE|-`, JSON
//! lines checked whole before one transaction stores them all, or none;
//! and what `--force` may replace (README "Onboarding"): never the live
//! token with the one tokend rotated away, never during a refresh.

mod support;

use std::fs;
use std::process::Output;
use std::time::Duration;

use support::*;

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("stderr is UTF-8")
}

/// One JSON line for `name`, from a fresh grant; with its access token
/// (and lifetime) when `with_access`.
fn line(env: &Env, name: &str, with_access: bool) -> (String, MintedGrant) {
    let g = env
        .provider
        .mint_grant(env.provider.client_id(), "read+write");
    let mut v = serde_json::json!({
        "name": name,
        "provider": "fake",
        "refresh_token": g.refresh_token,
    });
    if with_access {
        v["access_token"] = g.access_token.clone().into();
        v["expires_in"] = g.expires_in.into();
    }
    (v.to_string(), g)
}

/// Writes `lines` to a file in the test's directory; returns its path.
fn batch_file(env: &Env, lines: &[String]) -> String {
    let path = env.dir.path().join("batch.jsonl");
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.display().to_string()
}

fn stored(env: &Env) -> usize {
    env.store().map_or(0, |s| s.load_all().unwrap().len())
}

#[test]
fn a_batch_is_stored_whole_with_its_tokens() {
    let env = Env::new(Knobs::default());
    let (with, g1) = line(&env, "alice", true);
    let (without, g2) = line(&env, "bob@eu", false);
    let file = batch_file(&env, &[with, String::new(), without]);
    let o = env.cli(&["import", "--from", &file], "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("imported 2 credentials"),
        "{}",
        stdout(&o)
    );
    assert_no_secrets(&stdout(&o), "import stdout");
    let alice = env.credential("alice").expect("alice stored");
    assert_eq!(
        alice.grant.refresh_token().unwrap().expose(),
        g1.refresh_token
    );
    assert_eq!(
        alice.access_token.as_ref().unwrap().expose(),
        g1.access_token
    );
    // Expiry is now + expires_in, as --expires-in takes it.
    let left = alice.expires_at.unwrap() - tokend::clock::now_ms();
    assert!(
        (left - g1.expires_in as i64 * 1000).abs() < 60_000,
        "{left}"
    );
    let bob = env.credential("bob@eu").expect("bob stored");
    assert_eq!(
        bob.grant.refresh_token().unwrap().expose(),
        g2.refresh_token
    );
    assert!(bob.access_token.is_none());
    // The provider's scope, as a single import takes it.
    assert_eq!(bob.scope, alice.scope);
}

#[test]
fn stdin_is_read_with_a_dash() {
    let env = Env::new(Knobs::default());
    let lines: Vec<String> = (0..3)
        .map(|i| line(&env, &format!("u{i}"), false).0)
        .collect();
    let o = env.cli(&["import", "--from", "-"], &lines.join("\n"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stored(&env), 3);
}

#[test]
fn a_bad_line_is_named_and_nothing_is_stored() {
    let env = Env::new(Knobs::default());
    let good: Vec<String> = (0..2)
        .map(|i| line(&env, &format!("u{i}"), true).0)
        .collect();
    let secret = env
        .provider
        .mint_grant(env.provider.client_id(), "read+write");
    // Each bad line is the third, after two good ones; what is wrong is
    // named by field, and no value that could be a token is echoed.
    let cases = [
        (
            serde_json::json!({"name": "u2", "provider": "fake", "refresh_token": ""}).to_string(),
            "refresh_token",
        ),
        (
            serde_json::json!({"name": "u2", "provider": "fake", "refresh_token": secret.refresh_token, "expires_in": secret.access_token}).to_string(),
            "expires_in",
        ),
        (
            serde_json::json!({"name": "u2", "provider": "fake", "refresh_token": secret.refresh_token, "access_token": secret.access_token, "expires_in": 999_999_999_999u64}).to_string(),
            "ten years",
        ),
        (
            serde_json::json!({"name": "u2", "provider": "nope", "refresh_token": secret.refresh_token}).to_string(),
            "provider \"nope\"",
        ),
        (
            serde_json::json!({"name": "../u2", "provider": "fake", "refresh_token": secret.refresh_token}).to_string(),
            "name",
        ),
        (
            serde_json::json!({"name": "u0", "provider": "fake", "refresh_token": secret.refresh_token}).to_string(),
            "also on line 1",
        ),
        (
            serde_json::json!({"name": "u2", "provider": "fake", "refresh": secret.refresh_token}).to_string(),
            "refresh_token: missing",
        ),
        (
            format!("{{\"name\": \"u2\", \"refresh_token\": \"{}\"", secret.refresh_token),
            "not valid JSON",
        ),
    ];
    for (bad, field) in cases {
        let file = batch_file(&env, &[good[0].clone(), good[1].clone(), bad.clone()]);
        let o = env.cli(&["import", "--from", &file], "");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("line 3"), "{bad}: {err}");
        assert!(err.contains(field), "{bad}: {err}");
        assert!(
            !err.contains("--help"),
            "the file at fault, not the usage: {err}"
        );
        assert_no_secrets(&stdout(&o), "import stdout");
        assert_eq!(stored(&env), 0, "{bad}: nothing of the batch is stored");
    }
}

#[test]
fn an_existing_name_refuses_the_batch_unless_forced() {
    let env = Env::new(Knobs::default());
    env.import("u1", false);
    let (l0, _) = line(&env, "u0", false);
    let (l1, g1) = line(&env, "u1", false);
    let file = batch_file(&env, &[l0, l1]);
    let o = env.cli(&["import", "--from", &file], "");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("line 2") && err.contains("--force"), "{err}");
    assert!(
        env.credential("u0").is_none(),
        "nothing of the batch is stored"
    );
    assert_ne!(
        env.credential("u1")
            .unwrap()
            .grant
            .refresh_token()
            .unwrap()
            .expose(),
        g1.refresh_token
    );

    let o = env.cli(&["import", "--from", &file, "--force"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(env.credential("u0").is_some());
    assert_eq!(
        env.credential("u1")
            .unwrap()
            .grant
            .refresh_token()
            .unwrap()
            .expose(),
        g1.refresh_token
    );
}

#[test]
fn from_excludes_a_name_and_token_flags() {
    let env = Env::new(Knobs::default());
    for args in [
        &["import", "--from", "-", "bot"][..],
        &["import", "--from", "-", "--provider", "fake"],
        &["import", "--from", "-", "--refresh-token", "-"],
        &["import", "--from", "-", "--client-credentials"],
    ] {
        let o = env.cli(args, "");
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--from"), "{args:?}: {}", stderr(&o));
    }
    let o = env.cli(&["import", "--from", "-"], "\n\n");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no credentials"), "{}", stderr(&o));
}

/// A running daemon picks a batch up through its store watch, with no
/// restart: more than a handful at once, so the bulk read is what runs,
/// and more than one chunk of `GET /v1/credentials`.
#[test]
fn a_running_daemon_publishes_a_batch() {
    let env = Env::new(Knobs::default());
    env.import("before", true);
    let daemon = env.start();
    wait_serving(&env.socket, Duration::from_secs(10));
    let batch: Vec<(String, MintedGrant)> = (0..300)
        .map(|i| line(&env, &format!("user-{i:03}"), true))
        .collect();
    let lines: Vec<String> = batch.iter().map(|(l, _)| l.clone()).collect();
    let o = env.cli(&["import", "--from", "-"], &lines.join("\n"));
    assert!(o.status.success(), "{}", stderr(&o));
    for (i, (_, g)) in batch.iter().enumerate() {
        let name = format!("user-{i:03}");
        wait_for(
            &format!("{name}'s token file"),
            Duration::from_secs(20),
            || (env.read_token(&name).as_deref() == Some(g.access_token.as_str())).then_some(()),
        );
    }
    // Streamed in chunks: still one JSON array, in name order, all there.
    let names = listed_names(&env.socket);
    let mut expected: Vec<String> = (0..300).map(|i| format!("user-{i:03}")).collect();
    expected.insert(0, "before".into());
    assert_eq!(names, expected);
    // The command line reads the chunked answer too.
    let o = env.cli(&["list"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("user-")).count(),
        300,
        "{out}"
    );
    assert!(daemon.log().contains("credentials added to the store"));
    // Its tokens were stored, not fetched again.
    assert_eq!(env.provider.stats().refresh_requests, 0);
}

/// A configuration job that runs `import --force` with the refresh token
/// it was first given, again and again: before tokend's first refresh
/// that changes nothing; after it, when the provider has rotated that
/// token away and would revoke the whole grant if it came back, it is
/// refused, the credential keeps its live token and the grant lives on.
/// Before, the live token was replaced by the dead one.
#[test]
fn the_given_refresh_token_is_refused_once_rotated_and_a_rerun_changes_nothing() {
    let env = Env::new(Knobs::default());
    let g = env.import("bot", false);
    let out = env.import_force("bot", &g.refresh_token);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("nothing changed"), "{}", stdout(&out));
    assert_eq!(env.row("bot").unwrap().version, 1, "the row was written");

    let d = env.start();
    wait_for("the start-up refresh", Duration::from_secs(20), || {
        (env.row("bot")?.version == 2).then_some(())
    });
    let out = env.import_force("bot", &g.refresh_token);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refused") && err.contains("Nothing was changed"),
        "{err}"
    );
    assert!(!err.contains(&g.refresh_token), "the token in the error");
    let authorize = format!(
        "tokend authorize bot --provider fake --force --config {}",
        env.config_path.display()
    );
    assert!(err.contains(&authorize), "{err}");
    let live = env.row("bot").unwrap();
    assert_eq!(live.version, 2, "the live token was replaced");
    assert!(
        live.refresh_token != g.refresh_token,
        "the stored refresh token is the spent one"
    );
    // The grant lives: a refresh now succeeds, and sends no token twice.
    assert!(env.cli(&["refresh", "bot"], "").status.success());
    let stats = env.provider.stats();
    assert_eq!((stats.reuse_detected, stats.grants_revoked), (0, 0));
    drop(d);
}

/// `import --force` of another grant while a refresh of the credential is
/// at the provider waits for that refresh to commit, then replaces it;
/// so does a batch (`--from FILE --force`), which leases its credentials
/// first. Before, the replacement was written at once, and the refresh's
/// rotated token pair was thrown away: the old grant stayed alive at the
/// provider with a refresh token nobody held.
#[test]
fn a_replacement_waits_for_the_refresh_in_flight() {
    for batch in [false, true] {
        let env = Env::new(Knobs::default());
        env.write_config(&fast_refresh_timeout("15s"), "");
        env.import("bot", false);
        // 10 s: the import (a CLI run, a batch file first) must find the
        // lease before the refresh commits, however loaded the machine.
        env.provider.update_knobs(|k| k.latency_ms = 10_000);
        let d = env.start();
        wait_for(
            "the refresh at the provider",
            Duration::from_secs(20),
            || (env.provider.stats().refresh_requests > 0).then_some(()),
        );
        let (out, next) = if batch {
            let (line, next) = line(&env, "bot", false);
            let file = batch_file(&env, &[line]);
            (env.cli(&["import", "--from", &file, "--force"], ""), next)
        } else {
            let next = env
                .provider
                .mint_grant(env.provider.client_id(), "read+write");
            (env.import_force("bot", &next.refresh_token), next)
        };
        let err = stderr(&out);
        assert!(out.status.success(), "batch {batch}: {err}");
        assert!(
            err.contains("being refreshed") && err.contains("waiting for th"),
            "batch {batch}: {err}"
        );
        assert_eq!(
            env.provider.stats().refreshes_ok,
            1,
            "batch {batch}: replaced before the refresh answered"
        );
        let row = env.row("bot").unwrap();
        assert!(
            row.refresh_token == next.refresh_token,
            "batch {batch}: the new grant not stored"
        );
        assert_eq!(
            row.version, 3,
            "batch {batch}: the refresh's commit and then the replacement"
        );
        assert!(!d.log().contains("new token pair was discarded"));
        drop(d);
    }
}

/// A batch replacing credentials that are being refreshed all the time
/// (tokens of 4 s, refreshed at 2 s left, each request held 1 s by the
/// provider: a third of them leased at any moment) gets through: it leases
/// each one as its refresh ends, instead of waiting for a moment when none
/// of them is leased, which does not come.
#[test]
fn a_batch_replacement_gets_through_a_store_always_refreshing() {
    const N: usize = 40;
    let env = Env::new(Knobs {
        token_lifetime_secs: 4,
        ..Knobs::default()
    });
    env.write_config(&fast_refresh_timeout("15s"), "");
    let names: Vec<String> = (0..N).map(|i| format!("bot-{i:02}")).collect();
    let first: Vec<String> = names.iter().map(|n| line(&env, n, false).0).collect();
    let out = env.cli(&["import", "--from", &batch_file(&env, &first)], "");
    assert!(out.status.success(), "{}", stderr(&out));
    env.provider.update_knobs(|k| k.latency_ms = 1000);
    let d = env.start();
    wait_for(
        "every credential refreshed twice",
        Duration::from_secs(60),
        || (env.provider.stats().refreshes_ok as usize >= 2 * N).then_some(()),
    );
    let (lines, grants): (Vec<String>, Vec<MintedGrant>) =
        names.iter().map(|n| line(&env, n, false)).unzip();
    let out = env.cli(
        &["import", "--from", &batch_file(&env, &lines), "--force"],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("imported {N} credentials")),
        "{}",
        stdout(&out)
    );
    // Each new grant is the one the daemon refreshes from now on.
    wait_for("every new grant refreshed", Duration::from_secs(60), || {
        grants
            .iter()
            .all(|g| {
                env.provider
                    .grant(g.grant_id)
                    .is_some_and(|i| i.rotations > 0)
            })
            .then_some(())
    });
    let stats = env.provider.stats();
    assert_eq!((stats.reuse_detected, stats.grants_revoked), (0, 0));
    assert!(!d.log().contains("new token pair was discarded"));
    drop(d);
}
