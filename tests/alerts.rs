//! README "Notifications": `[[notify]]` commands run when a credential needs
//! a human, keeps failing, or is back; and what `on_change` hooks are told.
//! Every command here writes its environment to a file under the test's
//! directory, which the secrets audit scans when the test ends.

mod support;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;

/// A command that appends its environment to `out`, one run a block
/// ending in a `--` line.
fn env_dump(out: &Path) -> String {
    format!(
        "[\"/bin/sh\", \"-c\", \"env >> '{}'; echo -- >> '{}'\"]",
        out.display(),
        out.display()
    )
}

/// Each run's environment, from a file [`env_dump`] wrote.
fn runs(out: &Path) -> Vec<HashMap<String, String>> {
    let text = fs::read_to_string(out).unwrap_or_default();
    assert_no_secrets(&text, "a notify or hook command's environment");
    text.split("--\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            b.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

/// The runs of `event`.
fn runs_of(out: &Path, event: &str) -> Vec<HashMap<String, String>> {
    runs(out)
        .into_iter()
        .filter(|r| r.get("TOKEND_EVENT").map(String::as_str) == Some(event))
        .collect()
}

/// Only PATH, LANG and ours: nothing of the daemon's own environment (the
/// shell adds PWD, SHLVL and `_`).
fn assert_clean(run: &HashMap<String, String>) {
    for k in run.keys() {
        assert!(
            k.starts_with("TOKEND_") || ["PATH", "LANG", "PWD", "SHLVL", "_"].contains(&k.as_str()),
            "unexpected variable {k} in {run:?}"
        );
    }
}

/// `tokend remove` while the credential's validation is at the provider:
/// the validation's answer finds the row gone, and must not write the
/// token it holds in memory back to the files (before, it did, until the
/// removal's reload took them down again: a second `written` run, and a
/// removed credential's file on disk meanwhile).
#[test]
fn a_validation_answered_after_a_removal_writes_no_file() {
    let env = Env::bare(Knobs::default());
    let out = env.dir.path().join("hooked");
    let sinks = format!(
        "{}on_change = {}\n",
        env.sink("raw", "0600"),
        env_dump(&out)
    );
    env.write_config(FAST_REFRESH, &sinks);
    env.import("bot", true);
    // The start-up validation waits 2 s at the provider.
    env.provider.update_knobs(|k| k.latency_ms = 2000);
    let d = env.start();
    wait_for("the start-up publish", Duration::from_secs(10), || {
        runs_of(&out, "written").pop()
    });
    wait_for(
        "the validation at the provider",
        Duration::from_secs(10),
        || (env.provider.stats().validations == 1).then_some(()),
    );
    assert!(env.cli(&["remove", "bot"], "").status.success());
    d.wait_log("credential removed from the store", Duration::from_secs(20));
    assert_eq!(env.provider.stats().validations_ok, 1, "answered by then");
    assert!(
        !env.token_file("bot").exists(),
        "the removed credential's file is back"
    );
    assert_eq!(
        runs_of(&out, "written").len(),
        1,
        "the validation's answer wrote the removed credential's file"
    );
    drop(d);
}

fn notify_block(events: &str, command: &str, extra: &str) -> String {
    format!("[[notify]]\nevents = [{events}]\ncommand = {command}\n{extra}\n")
}

fn config_path(env: &Env) -> String {
    env.config_path.display().to_string()
}

#[test]
fn a_dead_grant_notifies_with_the_authorize_command_and_its_recovery_too() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 4,
        ..Knobs::default()
    });
    let out = env.dir.path().join("notified");
    env.write_config(FAST_REFRESH, &env.sink("raw", "0600"));
    env.import("bot", true);
    let d = env.start();
    d.wait_log("tokend running", Duration::from_secs(10));
    // Rules given on reload take effect.
    let rule = notify_block(
        "\"needs_reauthorization\", \"recovered\"",
        &env_dump(&out),
        "",
    );
    env.write_config(FAST_REFRESH, &format!("{}{rule}", env.sink("raw", "0600")));
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded", Duration::from_secs(10));
    env.provider.update_knobs(|k| {
        k.fault = Some(Fault::InvalidGrant);
        k.fault_on = FaultTarget::Token;
    });
    let run = wait_for(
        "the needs_reauthorization run",
        Duration::from_secs(20),
        || runs_of(&out, "needs_reauthorization").pop(),
    );
    assert_clean(&run);
    assert_eq!(run["TOKEND_CREDENTIAL"], "bot");
    assert_eq!(run["TOKEND_PROVIDER"], "fake");
    assert_eq!(run["TOKEND_STATE"], "needs_reauthorization");
    assert!(
        run["TOKEND_ERROR"].contains("invalid_grant"),
        "{:?}",
        run["TOKEND_ERROR"]
    );
    assert_eq!(
        run["TOKEND_AUTHORIZE"],
        format!(
            "tokend authorize bot --provider fake --force --config {}",
            config_path(&env)
        )
    );
    // What a human does: authorize again (here, import a fresh grant).
    env.provider.update_knobs(|k| k.fault = None);
    env.reimport("bot");
    let run = wait_for("the recovered run", Duration::from_secs(20), || {
        runs_of(&out, "recovered").pop()
    });
    assert_clean(&run);
    assert_eq!(run["TOKEND_STATE"], "valid");
    assert!(
        run["TOKEND_ERROR"].contains("invalid_grant"),
        "the trouble it recovered from"
    );
    assert_eq!(runs_of(&out, "needs_reauthorization").len(), 1);
    drop(d);
}

#[test]
fn retrying_notifies_once_failures_reach_after_and_once_per_interval() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 4,
        ..Knobs::default()
    });
    let out = env.dir.path().join("notified");
    let rule = notify_block(
        "\"retrying\", \"recovered\"",
        &env_dump(&out),
        "after = 2\ninterval = \"1h\"\n",
    );
    env.write_config(FAST_REFRESH, &format!("{}{rule}", env.sink("raw", "0600")));
    env.import("bot", true);
    env.provider.update_knobs(|k| {
        k.fault = Some(Fault::Status503);
        k.fault_on = FaultTarget::Token;
    });
    let d = env.start();
    let failures = |n: u32| {
        wait_for(&format!("{n} failures"), Duration::from_secs(30), || {
            let c = env.credential("bot")?;
            (c.failures >= n).then_some(())
        })
    };
    failures(1);
    // Read before the row: a run would follow the second failure's commit.
    let seen = runs(&out);
    if env.credential("bot").unwrap().failures < 2 {
        assert!(seen.is_empty(), "one failure is not worth a run");
    }
    let run = wait_for("the retrying run", Duration::from_secs(30), || {
        runs_of(&out, "retrying").pop()
    });
    assert_clean(&run);
    assert_eq!(run["TOKEND_STATE"], "retrying");
    assert!(
        run["TOKEND_ERROR"].contains("503"),
        "{:?}",
        run["TOKEND_ERROR"]
    );
    failures(4);
    assert_eq!(runs_of(&out, "retrying").len(), 1, "not once per failure");
    // The provider is back: one recovered run.
    env.provider.update_knobs(|k| k.fault = None);
    wait_for("the recovered run", Duration::from_secs(30), || {
        runs_of(&out, "recovered").pop()
    });
    // Down again within the interval: the retrying run is not repeated.
    env.provider
        .update_knobs(|k| k.fault = Some(Fault::Status503));
    failures(3);
    d.wait_log("notification skipped", Duration::from_secs(10));
    assert_eq!(runs_of(&out, "retrying").len(), 1, "once per interval");
    drop(d);
}

#[test]
fn a_command_past_its_timeout_is_killed_and_a_failing_one_is_not_retried() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 4,
        fault: Some(Fault::InvalidGrant),
        fault_on: FaultTarget::Token,
        ..Knobs::default()
    });
    let pid_file = env.dir.path().join("slow.pid");
    let failed = env.dir.path().join("failed");
    let slow = format!(
        "[\"/bin/sh\", \"-c\", \"echo $$ > '{}'; exec sleep 60\"]",
        pid_file.display()
    );
    let failing = format!(
        "[\"/bin/sh\", \"-c\", \"echo ran >> '{}'; exit 3\"]",
        failed.display()
    );
    let rules = [
        notify_block("\"needs_reauthorization\"", &slow, "timeout = \"1s\""),
        notify_block("\"needs_reauthorization\"", &failing, ""),
    ]
    .concat();
    env.write_config(FAST_REFRESH, &format!("{}{rules}", env.sink("raw", "0600")));
    env.import("bot", true);
    let d = env.start();
    let pid: i32 = wait_for("the slow command", Duration::from_secs(20), || {
        fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    });
    d.wait_log(
        "notify command timed out and was killed",
        Duration::from_secs(10),
    );
    wait_for(
        "the slow command to be gone",
        Duration::from_secs(5),
        || {
            // SAFETY: kill with signal 0 only asks whether the process exists.
            (unsafe { libc::kill(pid, 0) } != 0).then_some(())
        },
    );
    d.wait_log(
        "notify command failed; not retried",
        Duration::from_secs(10),
    );
    // A reload and another look at the credential bring no second run.
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded", Duration::from_secs(10));
    let _ = env.cli(&["refresh", "bot"], "");
    assert_eq!(fs::read_to_string(&failed).unwrap(), "ran\n");
    assert_eq!(
        d.log().matches("notify command failed").count(),
        1,
        "a failure is logged once"
    );
    drop(d);
}

#[test]
fn check_config_names_every_bad_notify_key() {
    let env = Env::bare(Knobs::default());
    let not_executable = env.dir.path().join("page.sh");
    fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&not_executable, fs::Permissions::from_mode(0o644)).unwrap();
    let rules = format!(
        "[[notify]]\nevents = [\"needs_reauthorization\", \"exploded\"]\ncommand = [\"page-oncall\"]\n\
         [[notify]]\nevents = [\"misconfigured\"]\ncommand = [\"{}\"]\nafter = 2\n\
         [[notify]]\ncommand = []\ntimeout = \"0s\"\ninterval = \"soon\"\n\
         [[notify]]\nevents = [\"retrying\"]\ncommand = [\"/bin/true\"]\nafter = 0\n",
        not_executable.display()
    );
    env.write_config(FAST_REFRESH, &rules);
    let out = env.cli(&["check-config"], "");
    assert_eq!(out.status.code(), Some(2));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "notify[0].events: \"exploded\" is not one of",
        "notify[0].command: \"page-oncall\" must be an absolute path",
        &format!(
            "notify[1].command: \"{}\" is not executable",
            not_executable.display()
        ),
        "notify[1].after: applies to the \"retrying\" event only",
        "notify[2].events: is required",
        "notify[2].command: must name a program",
        "notify[2].timeout: must be more than 0s",
        "notify[2].interval: \"soon\" is not a duration",
        "notify[3].after: 0 is out of range",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // A good rule passes.
    let good = notify_block("\"needs_reauthorization\"", "[\"/bin/true\"]", "");
    env.write_config(FAST_REFRESH, &good);
    let out = env.cli(&["check-config"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hooks_are_told_which_file_changed_and_when_it_was_removed() {
    let env = Env::bare(Knobs::default());
    let out = env.dir.path().join("hooked");
    let json: PathBuf = env.tokens.join("bot.json");
    let sinks = format!(
        "{}{}on_change = {}\n",
        env.sink("raw", "0600"),
        env.sink("json", "0600"),
        env_dump(&out)
    );
    env.write_config(FAST_REFRESH, &sinks);
    env.import("bot", true);
    let d = env.start();
    let run = wait_for("the hook's written run", Duration::from_secs(10), || {
        runs_of(&out, "written").pop()
    });
    assert_clean(&run);
    assert_eq!(run["TOKEND_CREDENTIAL"], "bot");
    assert_eq!(run["TOKEND_PATH"], json.display().to_string());
    assert_eq!(run["TOKEND_FORMAT"], "json");
    let expires = humantime::parse_rfc3339(&run["TOKEND_EXPIRES_AT"]).unwrap();
    assert!(expires > std::time::SystemTime::now());
    let removed = env.cli(&["remove", "bot"], "");
    assert!(removed.status.success());
    let run = wait_for("the hook's removed run", Duration::from_secs(10), || {
        runs_of(&out, "removed").pop()
    });
    assert_clean(&run);
    assert_eq!(run["TOKEND_PATH"], json.display().to_string());
    assert_eq!(run["TOKEND_EXPIRES_AT"], "");
    assert_eq!(runs_of(&out, "written").len(), 1, "one file, one write");
    drop(d);
}
