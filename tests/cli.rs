//! README "Commands" and issue 3: `tokend token|status|list|refresh|remove`, with a
//! daemon running and without one.

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

/// Runs a command that must succeed; returns stdout, checked for secrets.
fn ok(env: &Env, args: &[&str]) -> String {
    let o = env.cli(args, "");
    assert!(
        o.status.success(),
        "tokend {args:?} failed ({:?}): {}",
        o.status,
        stderr(&o)
    );
    let out = stdout(&o);
    if args.first() != Some(&"token") {
        assert_no_secrets(&out, &format!("tokend {args:?}"));
    }
    out
}

/// Runs a command that must fail with exit code 1; returns stderr.
fn fails(env: &Env, args: &[&str]) -> String {
    let o = env.cli(args, "");
    assert_eq!(
        o.status.code(),
        Some(1),
        "tokend {args:?}: {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    assert_eq!(stdout(&o), "", "tokend {args:?} printed on stdout");
    stderr(&o)
}

/// `tokend token NAME`: the token and a newline on stdout, nothing on stderr.
fn token(env: &Env, name: &str) -> String {
    let o = env.cli(&["token", name], "");
    assert!(o.status.success(), "tokend token {name}: {}", stderr(&o));
    assert_eq!(stderr(&o), "", "tokend token {name} wrote on stderr");
    let out = stdout(&o);
    let token = out
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("no newline after the token: {out:?}"));
    assert!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "{out:?}"
    );
    token.to_owned()
}

/// The rows of `tokend list` as (name, state), after checking its header.
fn list(env: &Env) -> Vec<(String, String)> {
    let out = ok(env, &["list"]);
    let mut lines = out.lines();
    let header = lines.next().expect("a header");
    for col in [
        "NAME",
        "PROVIDER",
        "STATE",
        "EXPIRES",
        "LAST REFRESH",
        "LAST ERROR",
    ] {
        assert!(header.contains(col), "{header}");
    }
    lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_owned(), f[2].to_owned())
        })
        .collect()
}

/// Checks `tokend status` in its three forms for the given credentials.
fn check_status(env: &Env, names: &[&str], state: &str) {
    let human = ok(env, &["status"]);
    for n in names {
        assert!(
            human.lines().any(|l| l == *n),
            "{n} has a section:\n{human}"
        );
    }
    assert!(
        human.contains(&format!("  state:           {state}")),
        "{human}"
    );
    assert!(human.contains("  provider:        fake"), "{human}");

    let one = ok(env, &["status", names[0]]);
    assert_eq!(one.lines().next(), Some(names[0]), "{one}");
    for n in &names[1..] {
        assert!(!one.lines().any(|l| l == *n), "only {}:\n{one}", names[0]);
    }

    let json: serde_json::Value = serde_json::from_str(&ok(env, &["status", "--json"])).unwrap();
    let listed: Vec<&str> = json
        .as_array()
        .expect("an array")
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, names);
    for s in json.as_array().unwrap() {
        assert_eq!(s["state"], state);
        assert_eq!(s["provider"], "fake");
        assert!(s.get("access_token").is_none() && s.get("refresh_token").is_none());
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(env, &["status", names[0], "--json"])).unwrap();
    assert_eq!(json["name"], names[0]);
    assert_eq!(json["has_token"], true);

    let e = fails(env, &["status", "nope"]);
    assert!(e.contains("no credential named \"nope\""), "{e}");
}

// ---- 7. against a running daemon ----

#[test]
fn every_command_against_a_running_daemon() {
    let env = Env::new(Knobs::default());
    let bot = env.import("bot", true);
    let other = env.import("other", true);
    let d = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));

    // token
    assert_eq!(token(&env, "bot"), bot.access_token);
    assert_eq!(token(&env, "other"), other.access_token);
    let e = fails(&env, &["token", "nope"]);
    assert!(e.contains("no credential named \"nope\""), "{e}");

    // status, status NAME, status --json, list
    check_status(&env, &["bot", "other"], "valid");
    let rows = list(&env);
    assert_eq!(
        rows,
        [
            ("bot".into(), "valid".into()),
            ("other".into(), "valid".into())
        ]
    );

    // refresh: through the daemon, which publishes the new token.
    let out = ok(&env, &["refresh", "bot"]);
    assert!(out.starts_with("refreshed bot: "), "{out}");
    let new = env.provider.grant(bot.grant_id).unwrap().access_token;
    assert_ne!(new, bot.access_token);
    wait_for("the new token in the file", Duration::from_secs(10), || {
        (env.read_token("bot")? == new).then_some(())
    });
    assert_eq!(token(&env, "bot"), new);
    let s = env.provider.stats();
    assert_eq!((s.refresh_requests, s.refreshes_ok), (1, 1), "{s:?}");
    assert_eq!(
        env.row("bot").unwrap().access_token.as_deref(),
        Some(new.as_str())
    );
    let e = fails(&env, &["refresh", "nope"]);
    assert!(e.contains("no credential named \"nope\""), "{e}");

    // remove: the row and files go, and the daemon forgets the credential.
    assert!(env.token_file("other").exists());
    let out = ok(&env, &["remove", "other"]);
    assert!(out.contains("removed other"), "{out}");
    assert!(!env.token_file("other").exists());
    assert!(env.row("other").is_none());
    wait_for("the daemon to drop other", Duration::from_secs(15), || {
        (listed_names(&env.socket) == ["bot"]).then_some(())
    });
    let e = fails(&env, &["token", "other"]);
    assert!(e.contains("no credential named \"other\""), "{e}");
    assert!(!env.token_file("other").exists(), "its files stay removed");
    assert_eq!(list(&env), [("bot".into(), "valid".into())]);
    let e = fails(&env, &["remove", "other"]);
    assert!(e.contains("no credential named \"other\""), "{e}");

    // A refresh that fails says what to do next; so does token.
    env.provider.update_knobs(|k| {
        k.fault = Some(Fault::InvalidGrant);
        k.fault_on = FaultTarget::Token;
        k.fault_count = Some(1);
    });
    // The command to paste names the config, which is not the default.
    let fix = format!(
        "tokend authorize bot --provider fake --force --config {}",
        env.config_path.display()
    );
    let e = fails(&env, &["refresh", "bot"]);
    assert!(e.contains(&fix), "{e}");
    let e = fails(&env, &["token", "bot"]);
    assert!(e.contains("needs re-authorization"), "{e}");
    assert!(e.contains(&fix), "{e}");
    let out = ok(&env, &["status", "bot"]);
    assert!(out.contains(&format!("to fix:          {fix}")), "{out}");
    assert_eq!(list(&env), [("bot".into(), "needs_reauthorization".into())]);
    drop(d);
}

// ---- 8. without a daemon ----

#[test]
fn every_command_without_a_daemon() {
    let env = Env::new(Knobs::default());
    let bot = env.import("bot", true);
    env.import("other", true);

    // token needs the daemon, and says how to start it.
    let e = fails(&env, &["token", "bot"]);
    assert!(e.contains("not running"), "{e}");
    assert!(
        e.contains("tokend run") || e.contains("systemctl start"),
        "{e}"
    );
    assert!(e.contains(&env.socket.display().to_string()), "{e}");

    // list and status read the store.
    assert_eq!(
        list(&env),
        [
            ("bot".into(), "valid".into()),
            ("other".into(), "valid".into())
        ]
    );
    check_status(&env, &["bot", "other"], "valid");

    // refresh refreshes directly, and says so on stderr.
    let before = env.row("bot").unwrap();
    let o = env.cli(&["refresh", "bot"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("refreshing bot directly"),
        "a note that it refreshes directly: {}",
        stderr(&o)
    );
    assert!(stdout(&o).starts_with("refreshed bot: "), "{}", stdout(&o));
    let grant = env.provider.grant(bot.grant_id).unwrap();
    assert_ne!(grant.access_token, bot.access_token);
    assert_eq!(
        env.read_token("bot").as_deref(),
        Some(grant.access_token.as_str())
    );
    let after = env.row("bot").unwrap();
    assert_eq!(
        after.access_token.as_deref(),
        Some(grant.access_token.as_str())
    );
    assert_eq!(after.refresh_token, grant.refresh_token);
    assert_ne!(after.refresh_token, before.refresh_token);
    assert!(after.version > before.version);
    let s = env.provider.stats();
    assert_eq!((s.refresh_requests, s.refreshes_ok), (1, 1), "{s:?}");
    let e = fails(&env, &["refresh", "nope"]);
    assert!(e.contains("no credential named \"nope\""), "{e}");

    // A daemon started right after takes over from the stored pair.
    let mut d = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    assert_eq!(token(&env, "bot"), grant.access_token);
    let out = ok(&env, &["refresh", "bot"]);
    assert!(out.starts_with("refreshed bot: "), "{out}");
    let s = env.provider.stats();
    assert_eq!(s.reuse_detected, 0, "{s:?}");
    assert_eq!((s.refresh_requests, s.refreshes_ok), (2, 2), "{s:?}");
    let latest = env.provider.grant(bot.grant_id).unwrap();
    assert!(latest.alive);
    assert_eq!(token(&env, "bot"), latest.access_token);
    assert!(d.stop().success());

    // remove works without a daemon.
    let out = ok(&env, &["remove", "other"]);
    assert!(out.contains("removed other"), "{out}");
    assert!(!env.token_file("other").exists());
    assert!(env.row("other").is_none());
    assert_eq!(list(&env), [("bot".into(), "valid".into())]);
    let e = fails(&env, &["remove", "other"]);
    assert!(e.contains("no credential named \"other\""), "{e}");
    let out = ok(&env, &["remove", "bot"]);
    assert!(out.contains("removed bot"), "{out}");
    let o = env.cli(&["list"], "");
    assert!(o.status.success());
    assert_eq!(stdout(&o), "", "nothing to list");
    assert!(stderr(&o).contains("no credentials yet"), "{}", stderr(&o));
}

// ---- 9. token's output ----

#[test]
fn token_prints_only_the_token_and_a_newline() {
    let env = Env::bare(Knobs::default());
    // min_remaining 10m: "fresh" was imported with 300 s left, so reading it
    // makes the daemon refresh first; the output is the same shape.
    env.write_config(
        &format!(
            "\n[refresh]\n{QUIET_SWEEP}\nrefresh_before_expiry = \"2s\"\nmin_remaining = \"10m\"\n\
         retry_initial = \"500ms\"\nretry_max = \"2s\"\nrequest_timeout = \"5s\"\n"
        ),
        &env.sink("raw", "0600"),
    );
    let bot = env.import("bot", true);
    let stale = import_expiring(&env, "stale", 300);
    let d = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));

    let refreshed = {
        let mut c = env.tokend(&["token", "stale"]);
        // Even with every log level on, nothing but the token comes out.
        c.env("RUST_LOG", "trace");
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stderr(&o), "", "stderr on success");
        let out = stdout(&o);
        assert_eq!(out.matches('\n').count(), 1, "{out:?}");
        out.strip_suffix('\n').unwrap().to_owned()
    };
    assert_ne!(
        refreshed, stale.access_token,
        "refreshed before it was handed out"
    );
    assert_eq!(
        refreshed,
        env.provider.grant(stale.grant_id).unwrap().access_token
    );
    for _ in 0..20 {
        let o = env
            .tokend(&["token", "bot"])
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(o.stdout, format!("{}\n", bot.access_token).into_bytes());
        assert_eq!(o.stderr, b"");
        let o = env.tokend(&["token", "stale"]).output().unwrap();
        assert_eq!(o.stdout, format!("{refreshed}\n").into_bytes());
        assert_eq!(o.stderr, b"");
    }
    assert_eq!(env.provider.stats().refresh_requests, 1);
    // On failure stdout stays empty, whatever the reason.
    assert_eq!(env.cli(&["token", "nope"], "").stdout, b"");
    drop(d);
    let o = env.cli(&["token", "bot"], "");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(o.stdout, b"");
    // Daemon gone: token files and row untouched by the failed reads.
    assert!(fs::metadata(env.token_file("bot")).is_ok());
}

// ---- 10. help, completions and the man page (issue 11) ----

/// Every command a user may type; `completions` and `man` are hidden.
const COMMANDS: [&str; 9] = [
    "run",
    "check-config",
    "authorize",
    "import",
    "list",
    "status",
    "token",
    "refresh",
    "remove",
];

/// Runs the binary with no config and no daemon.
fn bare(args: &[&str]) -> Output {
    std::process::Command::new(bin())
        .args(args)
        .env_remove("TOKEND_CONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn help_and_version_exit_0_on_stdout() {
    let o = bare(&["--help"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let help = stdout(&o);
    for c in COMMANDS {
        assert!(help.contains(&format!("\n  {c} ")), "{c} not in:\n{help}");
    }
    assert!(!help.contains("completions"), "{help}");
    assert!(help.contains("Exit codes: 0 success"), "{help}");
    for c in COMMANDS {
        for flag in ["--help", "-h"] {
            let o = bare(&[c, flag]);
            assert_eq!(o.status.code(), Some(0), "{c} {flag}: {}", stderr(&o));
            assert!(
                stdout(&o).contains(&format!("Usage: tokend {c}")),
                "{c} {flag}"
            );
        }
    }
    for flag in ["-V", "--version"] {
        let o = bare(&[flag]);
        assert_eq!(o.status.code(), Some(0));
        assert_eq!(
            stdout(&o),
            format!("tokend {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

/// clap's usage errors exit 2, like tokend's own, and say so on stderr.
#[test]
fn usage_errors_exit_2_on_stderr() {
    // No command: the help, on stderr.
    let o = bare(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stdout(&o), "");
    assert!(stderr(&o).contains("Usage: tokend"), "{}", stderr(&o));
    for args in [
        &["nope"][..],
        &["list", "--bogus"],
        &["list", "--force"],
        &["token"],
        &["token", "bot", "--timeout", "5s"],
        &["token", "../x"],
        &["import", "bot", "--provider", "p"],
        &["run", "--log-format", "xml"],
        &["completions", "tcsh"],
    ] {
        let o = bare(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), "", "{args:?}");
        let e = stderr(&o);
        assert!(
            e.starts_with("error: ") && e.contains("--help"),
            "{args:?}: {e}"
        );
    }
}

#[test]
fn completions_and_the_man_page_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let o = bare(&["completions", shell]);
        assert_eq!(o.status.code(), Some(0), "{shell}: {}", stderr(&o));
        let script = stdout(&o);
        for c in COMMANDS {
            assert!(script.contains(c), "{shell}: no {c}");
        }
        // (fish writes `-l config`.)
        for option in ["config", "provider", "refresh-token", "log-format"] {
            assert!(script.contains(option), "{shell}: no {option}");
        }
    }
    let o = bare(&["man"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let page = stdout(&o);
    assert!(
        page.starts_with(".ie") && page.contains(".TH tokend 1"),
        "{page}"
    );
    for c in COMMANDS {
        assert!(
            page.contains(&format!(".SS \"tokend {c}\"")),
            "no {c} in:\n{page}"
        );
    }
    // Options are documented under their command, with roff's escaped dash.
    assert!(page.contains(r"\-\-refresh\-token"), "{page}");
    assert!(page.contains("Exit codes: 0 success"), "{page}");
}

/// A store that cannot be read is an error to show, not an empty store.
/// With `database` under a plain file, `list` said "no credentials yet"
/// and `status --json` printed `[]`, both exiting 0.
#[test]
fn a_store_that_cannot_be_read_is_an_error_not_an_empty_store() {
    let env = Env::new(Knobs::default());
    let plain = env.dir.path().join("plain-file");
    fs::write(&plain, "").unwrap();
    let text = fs::read_to_string(&env.config_path).unwrap();
    let moved = text.replace(
        &env.db.display().to_string(),
        &plain.join("tokend.db").display().to_string(),
    );
    assert_ne!(moved, text);
    fs::write(&env.config_path, moved).unwrap();
    for args in [&["list"][..], &["status", "--json"], &["status", "bot"]] {
        let err = fails(&env, args);
        assert!(
            err.contains("cannot open the database") && err.contains("Not a directory"),
            "tokend {args:?}: {err}"
        );
    }
}

const NOBODY: u32 = 65534;

/// A user who may not connect to the daemon's socket is told that, not
/// that tokend is not running; one who may not reach the store is told
/// that, not that it holds no credentials.
#[test]
fn a_user_kept_out_of_the_socket_and_the_store_is_told_so() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && skip("needs root (to run as nobody)") {
        return;
    }
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    // nobody may search the test's directory and read the config (which
    // holds no secret), nothing more.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    fs::set_permissions(&env.config_path, fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut cmd = env.tokend(args);
        cmd.uid(NOBODY).gid(NOBODY).env("HOME", "/");
        cmd.output().unwrap()
    };
    let mut d = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    for args in [&["token", "bot"][..], &["list"], &["refresh", "bot"]] {
        let o = as_nobody(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "tokend {args:?}: {err}");
        assert!(
            err.contains("Permission denied") && err.contains("socket_group"),
            "tokend {args:?}: {err}"
        );
        assert!(!err.contains("not running"), "tokend {args:?}: {err}");
    }
    d.stop();
    for args in [&["list"][..], &["status", "bot"]] {
        let o = as_nobody(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "tokend {args:?}: {err}");
        assert!(
            err.contains("cannot open the database") && err.contains("Permission denied"),
            "tokend {args:?}: {err}"
        );
    }
}
