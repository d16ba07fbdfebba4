//! Issue 10, the daemon's part: stale temp files, a reload racing a
//! refresh, a 403 that refreshing cannot fix, and a validation sweep that
//! does not fire every credential in the same second.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::*;

const PATIENCE: Duration = Duration::from_secs(30);

/// A `[refresh]` section with short backoffs and the given extra keys.
fn section(extra: &str) -> String {
    format!(
        "\n[refresh]\nrefresh_before_expiry = \"2s\"\nmin_remaining = \"1s\"\n\
         retry_initial = \"500ms\"\nretry_max = \"2s\"\nrequest_timeout = \"5s\"\n{extra}\n"
    )
}

/// A temp file as `write_atomic` names it, left by a process `pid`.
fn plant(dir: &Path, file: &str, pid: u32) -> std::path::PathBuf {
    fs::create_dir_all(dir).unwrap();
    let p = dir.join(format!(".{file}.tokend-{pid}-0a1b2c3d"));
    fs::write(&p, "a token a crash left behind").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    p
}

/// A pid no process has: past the kernel's pid_max.
const DEAD_PID: u32 = 999_999_999;

#[test]
fn temp_files_a_crash_left_are_swept_at_start_and_on_remove() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    env.import("gone", true);
    let stale = plant(&env.tokens, "bot", DEAD_PID);
    // A live process's write in progress (pid 1 always runs) stays, and so
    // does a file that is not ours.
    let live = plant(&env.tokens, "bot", 1);
    let foreign = plant(&env.tokens, "other", DEAD_PID + 1);
    std::os::unix::fs::chown(&foreign, Some(65534), None).unwrap();
    let d = env.start();
    wait_for("the token file", PATIENCE, || env.read_token("bot"));
    assert!(!stale.exists(), "the stale temp file stays");
    assert!(live.exists());
    assert!(foreign.exists());
    d.wait_log("removed a temp file left by an earlier run", PATIENCE);
    drop(d);

    // Without a daemon, `tokend remove` sweeps the removed credential's too.
    let stale = plant(&env.tokens, "gone", DEAD_PID);
    let out = env.cli(&["remove", "gone"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stale.exists(), "remove left the temp file");
    fs::remove_file(live).unwrap();
    fs::remove_file(foreign).unwrap();
}

#[test]
fn a_reload_during_a_refresh_leaves_no_file_at_a_retired_path() {
    let env = Env::bare(Knobs::default());
    let old_sink = env.sink("raw", "0600");
    env.write_config(&section(""), &old_sink);
    let g = env.import("bot", true);
    let mut d = env.start();
    wait_serving(&env.socket, PATIENCE);
    let old_file = env.token_file("bot");
    wait_for("the token file", PATIENCE, || {
        old_file.exists().then_some(())
    });

    // A refresh is at the provider (2 s) when a reload moves the sink.
    env.provider.update_knobs(|k| k.latency_ms = 2000);
    let socket = env.socket.clone();
    let caller =
        std::thread::spawn(move || request(&socket, "POST", "/v1/credentials/bot/refresh").status);
    wait_for("the refresh at the provider", PATIENCE, || {
        (env.provider.stats().refresh_requests == 1).then_some(())
    });
    let new_dir = env.dir.path().join("moved");
    let new_sink = format!(
        "[[sinks]]\npath = \"{}/{{name}}\"\nformat = \"raw\"\nmode = \"0600\"\n",
        new_dir.display()
    );
    env.write_config(&section(""), &new_sink);
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded", PATIENCE);
    assert_eq!(caller.join().unwrap(), 200);
    let info = env.provider.grant(g.grant_id).unwrap();
    wait_for("the new token at the new path", PATIENCE, || {
        (fs::read_to_string(new_dir.join("bot")).ok()? == info.access_token).then_some(())
    });
    assert!(
        !old_file.exists(),
        "the refresh wrote to the path the reload retired"
    );
    assert!(d.stop().success());
}

/// Provider "pd": the PandaDoc preset (403 counts as an auth failure), its
/// URLs pointed at the fake provider.
fn pandadoc_block(env: &Env) -> String {
    let url = env.provider.url();
    format!(
        "[providers.pd]\npreset = \"pandadoc\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n\
         authorize_url = \"{url}/oauth2/authorize\"\ntoken_url = \"{url}/oauth2/access_token\"\n\
         validate_url = \"{url}/public/v1/members/current\"\n",
        env.provider.client_id(),
        env.secret_file.display()
    )
}

#[test]
fn a_403_that_a_refresh_does_not_fix_is_reported_not_refreshed_forever() {
    let env = Env::bare(Knobs::default());
    fs::write(
        &env.config_path,
        format!(
            "database = \"{}\"\nsocket = \"{}\"\n{}\n{}\n{}",
            env.db.display(),
            env.socket.display(),
            section("rejected_cooldown = \"1s\"\nvalidate_schedule = \"0 0 0 1 1 *\""),
            pandadoc_block(&env),
            env.sink("raw", "0600")
        ),
    )
    .unwrap();
    let g = env
        .provider
        .mint_grant(env.provider.client_id(), "read+write");
    let access = env.dir.path().join("bot.access");
    fs::write(&access, &g.access_token).unwrap();
    let out = env.cli(
        &[
            "import",
            "bot",
            "--provider",
            "pd",
            "--refresh-token",
            "-",
            "--access-token",
            &access.display().to_string(),
        ],
        &g.refresh_token,
    );
    assert!(out.status.success());
    let d = env.start();
    wait_serving(&env.socket, PATIENCE);
    wait_for("the start-up validation", PATIENCE, || {
        (env.provider.stats().validations_ok == 1).then_some(())
    });
    // The account loses access to the validation endpoint (its plan).
    env.provider.update_knobs(|k| {
        k.fault = Some(Fault::OauthError {
            status: 403,
            error: "forbidden".into(),
        });
        k.fault_on = FaultTarget::Validate;
    });
    // Four re-validations (a report is taken once per cooldown): one
    // refresh, then it is the account, not the token.
    for n in 1..=4u64 {
        let seen = env.provider.stats().validations;
        wait_for("a re-validation", PATIENCE, || {
            let r = request(&env.socket, "POST", "/v1/tokens/bot/rejected");
            assert_eq!(r.status, 202);
            (env.provider.stats().validations > seen).then_some(())
        });
        wait_for("its outcome", PATIENCE, || {
            let forbidden = format!(
                "tokend_validations_total{{outcome=\"forbidden\"}} {}",
                n - 1
            );
            let refreshed = env.provider.stats().refreshes_ok == 1;
            let noted = get(&env.socket, "/metrics").text().contains(&forbidden);
            (if n == 1 { refreshed } else { noted }).then_some(())
        });
    }
    assert_eq!(env.provider.stats().refreshes_ok, 1);
    let s = get(&env.socket, "/v1/credentials/bot").json();
    assert_eq!(s["state"], "valid");
    assert!(s["last_error"].as_str().unwrap().contains("403 Forbidden"));
    let metrics = get(&env.socket, "/metrics").text();
    assert!(
        metrics.contains("tokend_validations_total{outcome=\"forbidden\"} 3"),
        "{metrics}"
    );
    // The token is still handed out: nothing says it is bad.
    assert_eq!(get(&env.socket, "/v1/tokens/bot").status, 200);
    drop(d);
}

#[test]
fn a_validation_sweep_spreads_its_requests() {
    let env = Env::bare(Knobs::default());
    // A sweep every 6 s spreads over 4.5 s.
    env.write_config(
        &section("validate_schedule = \"*/6 * * * * *\""),
        &env.sink("raw", "0600"),
    );
    for i in 0..12 {
        env.import(&format!("c{i}"), true);
    }
    let d = env.start();
    wait_for("the start-up validations", PATIENCE, || {
        (env.provider.stats().validations_ok >= 12).then_some(())
    });
    env.provider.reset_stats();
    wait_for("a sweep's validations", PATIENCE, || {
        (env.provider.stats().validations_ok >= 12).then_some(())
    });
    // All at once, the first twelve would fall in one or two 100 ms buckets
    // (one sweep, or the end of one and the start of the next).
    let mut buckets: Vec<u64> = env
        .provider
        .requests()
        .iter()
        .filter(|r| r.endpoint == "validate")
        .take(12)
        .map(|r| r.at_ms / 100)
        .collect();
    buckets.dedup();
    assert!(
        buckets.len() >= 5,
        "a sweep's validations came in {} bursts",
        buckets.len()
    );
    drop(d);
}
