//! README "File sinks": what the files hold, their modes, and when they are written.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use support::*;

#[test]
fn every_format_has_the_exact_content_and_mode() {
    let env = Env::bare(Knobs::default());
    let sinks = [
        env.sink("raw", "0600"),
        env.sink("header", "0640"),
        env.sink("env", "0644"),
        env.sink("json", "0440"),
    ]
    .concat();
    env.write_config(FAST_REFRESH, &sinks);
    let g = env.import("sales-bot", true);
    let mut d = env.start();
    let raw = env.tokens.join("sales-bot");
    wait_for("the raw sink", Duration::from_secs(10), || {
        env.tokens.join("sales-bot.json").exists().then_some(())
    });
    let t = &g.access_token;
    assert_eq!(fs::read_to_string(&raw).unwrap(), *t);
    assert_eq!(
        fs::read_to_string(env.tokens.join("sales-bot.header")).unwrap(),
        format!("Authorization: Bearer {t}\n")
    );
    assert_eq!(
        fs::read_to_string(env.tokens.join("sales-bot.env")).unwrap(),
        format!("ACCESS_TOKEN={t}\n")
    );
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(env.tokens.join("sales-bot.json")).unwrap())
            .unwrap();
    assert_eq!(json["access_token"], t.as_str());
    assert_eq!(json["token_type"], "Bearer");
    let expires = humantime::parse_rfc3339(json["expires_at"].as_str().unwrap()).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(g.expires_in - 60),
        "expires_at is about a year ahead: {left:?}"
    );
    assert_eq!(mode(&raw), 0o600);
    assert_eq!(mode(&env.tokens.join("sales-bot.header")), 0o640);
    assert_eq!(mode(&env.tokens.join("sales-bot.env")), 0o644);
    assert_eq!(mode(&env.tokens.join("sales-bot.json")), 0o440);
    // No temp files left next to them.
    assert_eq!(fs::read_dir(&env.tokens).unwrap().count(), 4);
    // The files come before the start-up validation: wait for it, then stop.
    wait_for("the start-up validation", Duration::from_secs(20), || {
        (env.provider.stats().validations_ok == 1).then_some(())
    });
    assert!(d.stop().success());
    // The token was valid for a year: no refresh, one validation.
    let s = env.provider.stats();
    assert_eq!(s.refresh_requests, 0);
    assert_eq!(s.validations_ok, 1);
}

#[test]
fn files_are_republished_at_start_and_only_rewritten_on_change() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let mut d = env.start();
    let file = env.token_file("bot");
    wait_for("the token file", Duration::from_secs(10), || {
        file.exists().then_some(())
    });
    let before = fs::metadata(&file).unwrap();
    assert!(d.stop().success());
    // A restart with the file in place does not rewrite it...
    let mut d = env.start();
    d.wait_log("tokend running", Duration::from_secs(10));
    assert!(d.stop().success());
    let after = fs::metadata(&file).unwrap();
    assert_eq!(
        before.ino(),
        after.ino(),
        "an unchanged file is not replaced"
    );
    // ...and one with /run emptied (a reboot) writes it again.
    fs::remove_dir_all(&env.tokens).unwrap();
    let mut d = env.start();
    d.wait_log("tokend running", Duration::from_secs(10));
    assert!(file.exists(), "republished at start-up");
    assert!(d.stop().success());
}

#[test]
fn group_and_mode_hold_under_any_umask() {
    let env = Env::bare(Knobs::default());
    // gid 0 exists everywhere; the test runs as root in CI or as a member of it rarely,
    // so use our own primary gid, which we may always give.
    let gid = unsafe { libc::getgid() };
    let sink = format!("{}group = \"{gid}\"\n", env.sink("raw", "0640"));
    env.write_config(FAST_REFRESH, &sink);
    env.import("bot", true);
    let mut cmd = env.tokend(&["run"]);
    let log = fs::File::create(env.dir.path().join("umask.log")).unwrap();
    // SAFETY: umask in the child between fork and exec is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::umask(0o000);
            Ok(())
        });
    }
    let mut child = cmd.stderr(log).spawn().unwrap();
    let file = env.token_file("bot");
    wait_for("the token file", Duration::from_secs(10), || {
        file.exists().then_some(())
    });
    let meta = fs::metadata(&file).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(meta.gid(), gid);
    assert_eq!(
        mode(&env.db),
        0o600,
        "the database is private whatever the umask"
    );
    assert_eq!(mode(env.db.parent().unwrap()), 0o700);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn on_change_runs_after_the_file_changed() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 4,
        ..Knobs::default()
    });
    // The hook records a digest of what it read: a copy of the token would
    // be a file the secrets audit rightly refuses.
    let marker = env.dir.path().join("changed");
    let sink = format!(
        "{}on_change = [\"/bin/sh\", \"-c\", \"sha256sum < {} >> {}\"]\n",
        env.sink("raw", "0600"),
        env.token_file("bot").display(),
        marker.display()
    );
    env.write_config(FAST_REFRESH, &sink);
    env.import("bot", false);
    let d = env.start();
    // The hook saw the new file's content, not an older one.
    wait_for("the hook to run", Duration::from_secs(15), || {
        let seen = fs::read_to_string(&marker).ok()?;
        let current = env.read_token("bot")?;
        (seen.contains(&sha256_hex(&current))).then_some(())
    });
    drop(d);
}

fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
