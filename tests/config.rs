//! README "Commands" and "Configuration": configuration errors name their key and stop everything
//! before anything is created; SIGHUP applies a good file and keeps the old
//! one when the new one is bad; `import` and `list` validate their input; and
//! no secret travels on a command line.

mod support;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use support::*;

/// Runs a command that must end by itself within `timeout` (a `tokend run`
/// with a bad config must not start); returns its status, stdout and stderr.
fn run_bounded(env: &Env, mut cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    let out = env.dir.path().join("bounded.out");
    let err = env.dir.path().join("bounded.err");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let status = {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "still running after {timeout:?}; stderr: {}",
                    fs::read_to_string(&err).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let stderr = fs::read_to_string(&err).unwrap();
    assert_no_secrets(&stderr, "stderr");
    (status, fs::read_to_string(&out).unwrap(), stderr)
}

/// Like `Env::cli`, for commands that may exit before reading their stdin
/// (a usage error found first): a closed pipe is not the test's failure.
fn cli_early_exit(env: &Env, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = env
        .tokend(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("stdin: {e}"),
        _ => {}
    }
    let out = child.wait_with_output().unwrap();
    assert_no_secrets(&String::from_utf8_lossy(&out.stderr), "CLI stderr");
    out
}

/// The config Env::new writes, as text, so cases can change one thing in it.
fn base_config(env: &Env) -> String {
    env.write_config(FAST_REFRESH, &env.sink("raw", "0600"));
    fs::read_to_string(&env.config_path).unwrap()
}

/// Replaces exactly one occurrence of `from`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?} in the base config");
    text.replacen(from, to, 1)
}

fn assert_nothing_created(env: &Env, case: &str) {
    assert!(!env.db.exists(), "{case}: the database was created");
    assert!(
        !env.db.parent().unwrap().exists(),
        "{case}: the database directory was created"
    );
    assert!(
        !env.tokens.exists(),
        "{case}: the sink directory was created"
    );
}

#[test]
fn a_bad_config_exits_2_naming_the_key_and_creates_nothing() {
    let env = Env::bare(Knobs::default());
    let base = base_config(&env);
    let tokens = env.tokens.display().to_string();
    let plain_file = env.dir.path().join("plain-file");
    fs::write(&plain_file, "not a directory").unwrap();
    let secret = env.secret_file.display().to_string();
    let token_url = format!("{}/oauth2/access_token", env.provider.url());
    // (what, config, text stderr must hold, whether it is a key-named
    // problem printed as "tokend: PATH: KEY: ...")
    let cases: Vec<(&str, String, &str, bool)> = vec![
        (
            "unknown key in [refresh]",
            edit(&base, "[refresh]\n", "[refresh]\nretry_maxx = \"1m\"\n"),
            "retry_maxx",
            false,
        ),
        (
            "bad duration",
            edit(&base, "retry_max = \"2s\"", "retry_max = \"15x\""),
            "refresh.retry_max",
            true,
        ),
        (
            "bad cron",
            edit(
                &base,
                "validate_schedule = \"0 0 0 1 1 *\"\n",
                "validate_schedule = \"every minute\"\n",
            ),
            "refresh.validate_schedule",
            true,
        ),
        (
            "max_concurrency = 0",
            edit(&base, "[refresh]\n", "[refresh]\nmax_concurrency = 0\n"),
            "refresh.max_concurrency",
            true,
        ),
        (
            "missing client secret file",
            edit(&base, &secret, "/nonexistent/tokend/client.secret"),
            "providers.fake.client_secret_file",
            true,
        ),
        (
            "http token_url to a non-loopback host",
            edit(
                &base,
                &format!("token_url = \"{token_url}\""),
                "token_url = \"http://api.example.com/oauth2/access_token\"",
            ),
            "providers.fake.token_url",
            true,
        ),
        (
            "sink mode 0666",
            edit(&base, "mode = \"0600\"", "mode = \"0666\""),
            "sinks[0].mode",
            true,
        ),
        (
            "sink format yaml",
            edit(&base, "format = \"raw\"", "format = \"yaml\""),
            "sinks[0].format",
            true,
        ),
        (
            "relative sink path",
            edit(
                &base,
                &format!("\"{tokens}/{{name}}\""),
                "\"tokens/{name}\"",
            ),
            "sinks[0].path",
            true,
        ),
        (
            "sink path under a regular file",
            edit(
                &base,
                &format!("\"{tokens}/{{name}}\""),
                &format!("\"{}/{{name}}\"", plain_file.display()),
            ),
            "sinks[0].path",
            true,
        ),
        (
            "relative database path",
            edit(
                &base,
                &format!("database = \"{}\"", env.db.display()),
                "database = \"state/tokend.db\"",
            ),
            "database",
            true,
        ),
    ];
    let path = env.config_path.display().to_string();
    for (case, text, key, key_named) in &cases {
        fs::write(&env.config_path, text).unwrap();
        for command in ["check-config", "run"] {
            let (status, stdout, stderr) =
                run_bounded(&env, env.tokend(&[command]), Duration::from_secs(20));
            let what = format!("{command} with {case}");
            assert_eq!(
                status.code(),
                Some(2),
                "{what}: exit code; stderr: {stderr}"
            );
            assert!(stderr.contains(key), "{what}: {key} not named in: {stderr}");
            if *key_named {
                let line = format!("tokend: {path}: {key}: ");
                assert!(stderr.contains(&line), "{what}: no {line:?} in: {stderr}");
            }
            assert!(!stdout.contains("ok"), "{what}: stdout says ok: {stdout}");
            assert_nothing_created(&env, &what);
        }
    }
    // The base itself is fine: each case failed because of its one change.
    fs::write(&env.config_path, &base).unwrap();
    let (status, _, stderr) =
        run_bounded(&env, env.tokend(&["check-config"]), Duration::from_secs(20));
    assert!(status.success(), "base config: {stderr}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let env = Env::bare(Knobs::default());
    let base = base_config(&env);
    let text = edit(&base, "retry_max = \"2s\"", "retry_max = \"15x\"");
    let text = edit(&text, "mode = \"0600\"", "mode = \"0666\"");
    let text = edit(&text, "[refresh]\n", "[refresh]\nmax_concurrency = 0\n");
    fs::write(&env.config_path, text).unwrap();
    let out = env.cli(&["check-config"], "");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "refresh.retry_max",
        "refresh.max_concurrency",
        "sinks[0].mode",
    ] {
        assert!(stderr.contains(key), "{key} missing from: {stderr}");
    }
}

/// An operator who writes the client secret straight into the file (a key
/// many tools have, but tokend does not) gets an "unknown field" error; that
/// error must not repeat the secret, since it goes to a terminal or, from the
/// daemon, to the journal (invariant 6 of docs/design.md).
#[test]
fn a_secret_under_an_unknown_key_is_not_echoed_back() {
    let env = Env::bare(Knobs::default());
    let good = base_config(&env);
    let secret = env.provider.client_secret().to_owned();
    let bad = edit(
        &good,
        "[providers.fake]\n",
        &format!("[providers.fake]\nclient_secret = \"{secret}\"\n"),
    );
    // Every channel the error reaches, with what it said.
    let mut said: Vec<(String, String)> = Vec::new();
    fs::write(&env.config_path, &bad).unwrap();
    for command in ["check-config", "run"] {
        let out = env
            .tokend(&[command])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(stderr.contains("client_secret"), "{command}: {stderr}");
        said.push((format!("{command} stderr"), stderr));
    }
    // A reload of the same file, logged by a running daemon. (Not a Daemon:
    // its Drop would panic on the secret before this test could say where.)
    fs::write(&env.config_path, &good).unwrap();
    let log = env.dir.path().join("reload.log");
    let mut child = env
        .tokend(&["run"])
        .stdin(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    wait_for("the daemon to run", Duration::from_secs(20), || {
        log_text().contains("tokend running").then_some(())
    });
    fs::write(&env.config_path, &bad).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    wait_for("the rejection", Duration::from_secs(20), || {
        log_text().contains("configuration rejected").then_some(())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    said.push(("the daemon log on SIGHUP".into(), log_text()));

    let leaks: Vec<String> = said
        .iter()
        .filter_map(|(channel, text)| {
            let line = text.lines().find(|l| l.contains(&secret))?;
            Some(format!(
                "{channel}: {}",
                line.replace(&secret, "<THE SECRET>")
            ))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "the client secret was echoed back by:\n{}",
        leaks.join("\n")
    );
}

#[test]
fn check_config_on_a_good_config_says_ok_and_creates_nothing() {
    let env = Env::bare(Knobs::default());
    base_config(&env);
    let (status, stdout, stderr) =
        run_bounded(&env, env.tokend(&["check-config"]), Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(
        stdout.trim_end(),
        format!(
            "{}: ok (1 provider, 1 sink, database {}; sealing off)",
            env.config_path.display(),
            env.db.display()
        )
    );
    assert_nothing_created(&env, "check-config");
}

/// What `run` and the commands would refuse at once, `check-config` finds
/// first: a `database` that is a directory, a `socket` path that holds a
/// plain file. It said `ok` to both.
#[test]
fn check_config_finds_a_database_directory_and_a_file_at_the_socket_path() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::bare(Knobs::default());
    base_config(&env);
    fs::create_dir_all(&env.db).unwrap();
    let state = env.db.parent().unwrap();
    fs::set_permissions(state, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(&env.socket, "").unwrap();
    let (status, _, stderr) =
        run_bounded(&env, env.tokend(&["check-config"]), Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("database") && stderr.contains("a directory, not a database file"),
        "{stderr}"
    );
    assert!(
        stderr.contains("socket") && stderr.contains("a regular file, not a socket"),
        "{stderr}"
    );
    // What the env's audit of its files would take for a store.
    fs::remove_dir(&env.db).unwrap();
    fs::remove_file(&env.socket).unwrap();
}

/// A store tokend would use, but open to other users (made by hand, or its
/// directory loosened since): `check-config` still says ok, and warns of
/// each opening. It said nothing.
#[test]
fn check_config_warns_of_a_database_open_to_others() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::bare(Knobs::default());
    base_config(&env);
    env.import("bot", true);
    let state = env.db.parent().unwrap().to_owned();
    let mode = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    let check = || run_bounded(&env, env.tokend(&["check-config"]), Duration::from_secs(20));
    let (status, _, stderr) = check();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert!(
        !state.join("tokend.db-shm").exists(),
        "check-config left a journal file"
    );

    mode(&env.db, 0o644);
    mode(&state, 0o777);
    let wal = state.join("tokend.db-wal");
    assert!(
        !wal.exists(),
        "the test's premise: no daemon holds the store"
    );
    let (status, stdout, stderr) = check();
    assert!(!wal.exists(), "check-config left a journal file");
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(stdout.contains(": ok ("), "{stdout}");
    assert!(
        stderr.contains("readable by others (mode 0644)") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    assert!(
        stderr.contains("writable by others (mode 0777)"),
        "{stderr}"
    );
    mode(&env.db, 0o600);
    mode(&state, 0o700);

    // Not a database at all: the daemon would refuse it, and so does
    // check-config (exit 2), naming it.
    let saved = fs::read(&env.db).unwrap();
    fs::write(&env.db, vec![7u8; 8192]).unwrap();
    let (status, _, stderr) = check();
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("not a usable database"), "{stderr}");
    fs::write(&env.db, saved).unwrap();
}

/// Issue 10, item 4: a PandaDoc preset with `token_auth =
/// "client_secret_basic"` or `pkce = true` would send requests PandaDoc's
/// OpenAPI description does not describe: check-config (and run) refuse
/// it, naming each key.
#[test]
fn check_config_refuses_pandadoc_presets_with_basic_auth_or_pkce() {
    let env = Env::bare(Knobs::default());
    let base = base_config(&env);
    let path = env.config_path.display().to_string();
    let text = format!(
        "{base}\n[providers.pd]\npreset = \"pandadoc-eu\"\nclient_id = \"cid\"\n\
         client_secret_file = \"{}\"\ntoken_auth = \"client_secret_basic\"\npkce = true\n",
        env.secret_file.display()
    );
    fs::write(&env.config_path, text).unwrap();
    for command in ["check-config", "run"] {
        let (status, stdout, stderr) =
            run_bounded(&env, env.tokend(&[command]), Duration::from_secs(20));
        assert_eq!(status.code(), Some(2), "{command}: {stderr}");
        for key in ["providers.pd.token_auth", "providers.pd.pkce"] {
            let line = format!("tokend: {path}: {key}: ");
            assert!(
                stderr.contains(&line),
                "{command}: no {line:?} in: {stderr}"
            );
        }
        assert!(stderr.contains("OpenAPI"), "{command}: says why: {stderr}");
        assert!(!stdout.contains("ok"), "{command}: {stdout}");
        assert_nothing_created(&env, command);
    }
}

/// The current raw file, once it differs from `old`.
fn wait_change(env: &Env, name: &str, old: &str, what: &str) -> String {
    wait_for(what, Duration::from_secs(20), || {
        env.read_token(name).filter(|t| t != old)
    })
}

#[test]
fn sighup_keeps_the_old_config_when_the_new_one_is_bad_and_applies_a_good_one() {
    // Two-second tokens: a refresh about every second.
    let env = Env::bare(Knobs {
        token_lifetime_secs: 2,
        ..Knobs::default()
    });
    let good = base_config(&env);
    env.import("bot", true);
    let mut d = env.start();
    d.wait_log("tokend running", Duration::from_secs(20));
    let first = wait_for("the token file", Duration::from_secs(20), || {
        env.read_token("bot")
    });
    wait_change(&env, "bot", &first, "a first refresh");

    // Garbage: rejected, and the daemon goes on refreshing with the old config.
    fs::write(&env.config_path, "this is [not toml\n").unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration rejected", Duration::from_secs(20));
    let after = env.read_token("bot").unwrap();
    wait_change(&env, "bot", &after, "a refresh after the rejected reload");
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon runs on");

    // A file that parses but holds a bad value: rejected too, naming the key.
    fs::write(
        &env.config_path,
        edit(&good, "retry_max = \"2s\"", "retry_max = \"15x\""),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    wait_for("the second rejection", Duration::from_secs(20), || {
        d.log()
            .lines()
            .any(|l| l.contains("configuration rejected") && l.contains("refresh.retry_max"))
            .then_some(())
    });
    let after = env.read_token("bot").unwrap();
    wait_change(&env, "bot", &after, "a refresh after the second rejection");
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon runs on");
    assert!(
        !d.log().contains("configuration reloaded"),
        "a bad file was never applied"
    );

    // A good file with a second sink: applied, and the new file appears.
    let json_dir = env.dir.path().join("json-tokens");
    let json_sink = format!(
        "[[sinks]]\npath = \"{}/{{name}}.json\"\nformat = \"json\"\nmode = \"0640\"\n",
        json_dir.display()
    );
    fs::write(&env.config_path, format!("{good}\n{json_sink}")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded", Duration::from_secs(20));
    let json_file = json_dir.join("bot.json");
    let json_token = || -> Option<String> {
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&json_file).ok()?).ok()?;
        assert_eq!(json["token_type"], "Bearer");
        json["access_token"].as_str().map(str::to_owned)
    };
    let at_reload = wait_for(
        "the new sink to hold the stored token",
        Duration::from_secs(20),
        || {
            let t = json_token()?;
            (Some(&t) == env.row("bot")?.access_token.as_ref()).then_some(t)
        },
    );
    assert_eq!(mode(&json_file), 0o640);
    // Later refreshes reach both sinks.
    wait_for(
        "a refresh to reach both sinks",
        Duration::from_secs(20),
        || {
            let t = json_token()?;
            (t != at_reload && env.read_token("bot")? == t).then_some(())
        },
    );
    let status = d.stop();
    assert!(status.success(), "stop: {status}");
}

#[test]
fn import_validates_its_input_and_list_works_without_a_database() {
    let env = Env::new(Knobs::default());

    // list on a fresh directory: no database, no error, nothing created.
    let out = env.cli(&["list"], "");
    assert_eq!(out.status.code(), Some(0));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("no credentials"), "list said: {said}");
    assert!(!env.db.exists(), "list created the database");

    let g = env
        .provider
        .mint_grant(env.provider.client_id(), "read+write");
    let rt = g.refresh_token.as_str();
    let usage = |args: &[&str], stdin: &str, expect: &[&str]| {
        let out = cli_early_exit(&env, args, stdin);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        for e in expect {
            assert!(stderr.contains(e), "{args:?}: {e:?} not in: {stderr}");
        }
    };
    let import = [
        "import",
        "bot",
        "--provider",
        "fake",
        "--refresh-token",
        "-",
    ];
    usage(
        &[
            "import",
            "bot",
            "--provider",
            "nope",
            "--refresh-token",
            "-",
        ],
        rt,
        &["\"nope\"", "configured: fake"],
    );
    usage(
        &[
            "import",
            "../x",
            "--provider",
            "fake",
            "--refresh-token",
            "-",
        ],
        rt,
        &["bad credential name", "../x"],
    );
    usage(&import, "", &["--refresh-token"]);
    usage(&import, "  \n", &["--refresh-token"]);
    usage(
        &[&import[..], &["--expires-in", "3600"]].concat(),
        rt,
        &["--expires-in"],
    );
    assert!(!env.db.exists(), "a usage error created the database");

    env.import("bot", true);
    let before = env.row("bot").unwrap();

    // The same name again: refused with a pointer to --force, nothing changed.
    let again = env
        .provider
        .mint_grant(env.provider.client_id(), "read+write");
    let out = env.cli(&import, &again.refresh_token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    let row = env.row("bot").unwrap();
    assert_eq!(row.refresh_token, before.refresh_token);
    assert_eq!(row.version, before.version);

    // --force replaces the tokens.
    let out = env.cli(&[&import[..], &["--force"]].concat(), &again.refresh_token);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = env.row("bot").unwrap();
    assert_eq!(row.refresh_token, again.refresh_token);
    assert_eq!(row.access_token, None, "the old access token went too");
    assert!(row.version > before.version);

    let out = env.cli(&["list"], "");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_no_secrets(&stdout, "list output");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("bot ") && l.contains("fake") && l.contains("valid")),
        "list: {stdout}"
    );
}

/// /proc/PID/cmdline as the words it holds.
fn argv_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', " ")
}

#[test]
fn secrets_never_travel_on_argv_or_into_hooks() {
    const SECRET_VAR: &str = "TOKEND_TEST_CLIENT_SECRET";
    let env = Env::bare(Knobs {
        token_lifetime_secs: 2,
        ..Knobs::default()
    });
    let seen = env.dir.path().join("hook-saw");
    // The hook records its own argv and environment and its parent's argv.
    let hook = format!(
        "echo $PPID > {seen}.ppid.tmp; cat /proc/$$/cmdline > {seen}.argv.tmp; \
         cat /proc/$$/environ > {seen}.env.tmp; cat /proc/$PPID/cmdline > {seen}.parent.tmp; \
         for f in ppid argv env parent; do mv {seen}.$f.tmp {seen}.$f; done",
        seen = seen.display()
    );
    let sink = format!(
        "{}on_change = [\"/bin/sh\", \"-c\", {}]\n",
        env.sink("raw", "0600"),
        serde_json::to_string(&hook).unwrap()
    );
    env.write_config(FAST_REFRESH, &sink);
    // The client secret comes from the environment this time.
    let text = fs::read_to_string(&env.config_path).unwrap();
    let text = edit(
        &text,
        &format!("client_secret_file = \"{}\"", env.secret_file.display()),
        &format!("client_secret_env = \"{SECRET_VAR}\""),
    );
    fs::write(&env.config_path, text).unwrap();
    fs::remove_file(&env.secret_file).unwrap();
    let first = env.import("bot", true);

    let log = env.dir.path().join("argv-daemon.log");
    let mut cmd = env.tokend(&["run"]);
    cmd.env(SECRET_VAR, env.provider.client_secret());
    let mut d = Daemon::spawn(cmd, &env.config_path, log);
    // A refresh went through, so the secret from the environment was used...
    wait_for("a refresh", Duration::from_secs(20), || {
        env.read_token("bot")
            .filter(|t| *t != first.access_token)
            .map(|_| ())
    });
    // ...and the hook ran after it.
    wait_for("the hook to run", Duration::from_secs(20), || {
        Path::new(&format!("{}.parent", seen.display()))
            .exists()
            .then_some(())
    });
    let read = |suffix: &str| fs::read(format!("{}.{suffix}", seen.display())).unwrap();
    let daemon_argv = argv_text(&fs::read(format!("/proc/{}/cmdline", d.pid())).unwrap());
    let ppid: i32 = String::from_utf8(read("ppid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(ppid, d.pid(), "the hook is the daemon's child");
    let parent_argv = argv_text(&read("parent"));
    let hook_argv = argv_text(&read("argv"));
    let hook_env = argv_text(&read("env"));
    assert!(daemon_argv.contains(" run"), "daemon argv: {daemon_argv}");
    assert_eq!(parent_argv, daemon_argv);
    assert!(
        hook_argv.starts_with("/bin/sh -c "),
        "hook argv: {hook_argv}"
    );
    for (what, text) in [
        ("the daemon's argv", &daemon_argv),
        ("the hook's argv", &hook_argv),
        ("the hook's environment", &hook_env),
    ] {
        assert_no_secrets(text, what);
        assert!(!text.contains(SECRET_VAR), "{what} holds {SECRET_VAR}");
    }
    let status = d.stop();
    assert!(status.success(), "stop: {status}");
}

// ---- issue 10, item 2: entries larger than a lookup's first buffer ----

/// A group with thousands of members, as an LDAP group has, and a user
/// whose passwd entry is long: each is larger than the 16 KiB buffer that
/// tokend's lookups used to be limited to.
const BIG_GROUP: (&str, u32) = ("tokend-big", 4343);
const WIDE_USER: (&str, u32) = ("tokend-wide", 4344);

/// Copies of this machine's /etc/passwd and /etc/group, with BIG_GROUP
/// (WIDE_USER among its 3,000 members) and WIDE_USER added.
fn big_user_database(env: &Env) -> (PathBuf, PathBuf) {
    let passwd = env.dir.path().join("passwd");
    let group = env.dir.path().join("group");
    let mut p = fs::read_to_string("/etc/passwd").unwrap();
    p.push_str(&format!(
        "{}:x:{uid}:{uid}:{}:/nonexistent:/usr/sbin/nologin\n",
        WIDE_USER.0,
        "w".repeat(20_000),
        uid = WIDE_USER.1
    ));
    let mut g = fs::read_to_string("/etc/group").unwrap();
    let members: Vec<String> = (0..3000).map(|i| format!("member{i:05}")).collect();
    g.push_str(&format!(
        "{}:x:{}:{},{}\n",
        BIG_GROUP.0,
        BIG_GROUP.1,
        members.join(","),
        WIDE_USER.0
    ));
    fs::write(&passwd, p).unwrap();
    fs::write(&group, g).unwrap();
    (passwd, group)
}

/// Makes `cmd` run in a mount namespace of its own, in which /etc/passwd
/// and /etc/group are `passwd` and `group` (the rest of the machine sees
/// its own). Where this machine cannot (it takes root, or CAP_SYS_ADMIN),
/// fails the test, or returns false when skipping is allowed ([`skip`]).
fn with_user_database(cmd: &mut Command, passwd: &Path, group: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    fn setup(passwd: &CString, group: &CString) -> std::io::Result<()> {
        let fail = || Err(std::io::Error::last_os_error());
        let none = std::ptr::null();
        // SAFETY: plain syscalls on NUL-terminated strings that outlive
        // them; nothing here allocates (this runs between fork and exec).
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            // Private first, so that the binds never reach the machine's namespace.
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
            for (from, to) in [(passwd, c"/etc/passwd"), (group, c"/etc/group")] {
                if libc::mount(
                    from.as_ptr(),
                    to.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
            }
        }
        Ok(())
    }
    let passwd = CString::new(passwd.as_os_str().as_bytes()).unwrap();
    let group = CString::new(group.as_os_str().as_bytes()).unwrap();
    let probe = {
        let (passwd, group) = (passwd.clone(), group.clone());
        let mut probe = Command::new("true");
        // SAFETY: `setup` only makes syscalls.
        unsafe { probe.pre_exec(move || setup(&passwd, &group)) };
        probe.status()
    };
    if !probe.as_ref().is_ok_and(|s| s.success()) {
        skip(&format!(
            "cannot make a mount namespace here ({probe:?}); run as root"
        ));
        return false;
    }
    // SAFETY: as above.
    unsafe { cmd.pre_exec(move || setup(&passwd, &group)) };
    true
}

/// getgrnam_r: a sink's `group`, an `[[access]]` rule's `groups` and
/// `socket_group` naming a group whose entry is larger than 16 KiB are
/// found, not reported as "no group".
#[test]
fn a_group_larger_than_16_kib_is_found() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::bare(Knobs::default());
    let (passwd, group) = big_user_database(&env);
    let (name, gid) = BIG_GROUP;
    // Imported first: `import` reads the config, and outside the namespace
    // there is no such group.
    env.write_config(FAST_REFRESH, &env.sink("raw", "0640"));
    env.import("bot", true);
    let sink = format!("{}group = \"{name}\"\n", env.sink("raw", "0640"));
    env.write_config(
        &format!("socket_group = \"{name}\"\n{FAST_REFRESH}"),
        &format!("{sink}\n[[access]]\ncredentials = [\"*\"]\ngroups = [\"{name}\"]\n"),
    );
    let mut cmd = env.tokend(&["check-config"]);
    if !with_user_database(&mut cmd, &passwd, &group) {
        return;
    }
    let (status, stdout, stderr) = run_bounded(&env, cmd, Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stdout.contains(": ok ("), "{stdout}");

    // And the daemon gives the file that group.
    let mut cmd = env.tokend(&["run"]);
    assert!(with_user_database(&mut cmd, &passwd, &group));
    let d = Daemon::spawn(cmd, &env.config_path, env.dir.path().join("big-group.log"));
    let file = wait_for("the file with the group", Duration::from_secs(20), || {
        fs::metadata(env.token_file("bot"))
            .ok()
            .filter(|m| m.gid() == gid)
    });
    assert_eq!(file.gid(), gid);
    drop(d);
}

/// getpwuid_r: a caller of the socket whose passwd entry is larger than
/// 16 KiB still gets the groups an `[[access]]` rule grants by.
#[test]
fn a_caller_with_a_passwd_entry_larger_than_16_kib_keeps_its_groups() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let env = Env::bare(Knobs::default());
    let (passwd, group) = big_user_database(&env);
    // By number, so that only the caller's lookup is put to the test.
    env.write_config(
        &format!("socket_mode = \"0666\"\n{FAST_REFRESH}"),
        &format!(
            "{}\n[[access]]\ncredentials = [\"*\"]\ngroups = [\"{}\"]\n",
            env.sink("raw", "0600"),
            BIG_GROUP.1
        ),
    );
    // The caller must reach the socket: search (not read) on the directory.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let g = env.import("bot", true);
    let mut cmd = env.tokend(&["run"]);
    if !with_user_database(&mut cmd, &passwd, &group) {
        return;
    }
    let d = Daemon::spawn(cmd, &env.config_path, env.dir.path().join("wide-user.log"));
    wait_serving(&env.socket, Duration::from_secs(20));
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&env.socket)
        .arg("http://localhost/v1/tokens/bot")
        .uid(WIDE_USER.1)
        .gid(WIDE_USER.1)
        .env("HOME", "/")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    assert_eq!(
        code,
        "200",
        "uid {} (in group {} by the user database): {body} {}",
        WIDE_USER.1,
        BIG_GROUP.1,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(body, g.access_token);
    drop(d);
}

// ---- issue 10, item 3: check-config as the service user ----

const NOBODY: u32 = 65534;

/// A directory under the test's own, with this owner and mode.
fn dir_owned(env: &Env, name: &str, uid: u32, gid: u32, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = env.dir.path().join(name);
    fs::create_dir_all(&d).unwrap();
    std::os::unix::fs::chown(&d, Some(uid), Some(gid)).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
    d
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// As root, `check-config --as-user nobody` meets the directories and
/// groups as nobody would: what root may write, nobody may not.
#[test]
fn check_config_as_root_checks_paths_and_groups_as_the_service_user() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() && skip("needs root") {
        return;
    }
    let env = Env::bare(Knobs::default());
    // nobody may search the test's directory, not read it.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    // The client secret is the service user's, as installed (0600).
    std::os::unix::fs::chown(&env.secret_file, Some(NOBODY), Some(NOBODY)).unwrap();
    let state = dir_owned(&env, "state-nobody", NOBODY, NOBODY, 0o700);
    let root_dir = dir_owned(&env, "root-0755", 0, 0, 0o755);
    let nobody_dir = dir_owned(&env, "nobody-0755", NOBODY, NOBODY, 0o755);
    let group_dir = dir_owned(&env, "nogroup-0775", 0, NOBODY, 0o775);
    let closed = dir_owned(&env, "root-0700", 0, 0, 0o700);
    let config = |database: &Path, sink_dir: &Path, group: Option<&str>| {
        let text = format!(
            "database = \"{}\"\nsocket = \"{}\"\n{FAST_REFRESH}\n{}\n\
             [[sinks]]\npath = \"{}/{{name}}\"\nmode = \"0640\"\n{}",
            database.display(),
            env.socket.display(),
            env.provider_block(),
            sink_dir.display(),
            group.map_or(String::new(), |g| format!("group = \"{g}\"\n"))
        );
        fs::write(&env.config_path, text).unwrap();
    };
    let path = env.config_path.display().to_string();
    let check = |args: &[&str]| {
        let mut all = vec!["check-config"];
        all.extend(args);
        run_bounded(&env, env.tokend(&all), Duration::from_secs(20))
    };
    let db = state.join("tokend.db");

    // Writable by nobody: as owner, through the group, or a directory
    // nobody may search on the way to one that does not exist yet (systemd
    // makes RuntimeDirectory= at start).
    for (what, dir) in [
        ("owned by nobody", nobody_dir.clone()),
        ("group nogroup, 0775", group_dir.clone()),
        ("not there yet", nobody_dir.join("later/tokens")),
    ] {
        config(&db, &dir, None);
        let (status, stdout, stderr) = check(&["--as-user", "nobody"]);
        assert_eq!(status.code(), Some(0), "{what}: {stderr}");
        assert!(
            stdout.contains(": ok (") && stdout.contains("checked as user nobody"),
            "{what}: {stdout}"
        );
    }

    // Root's 0755 directory: root may write it, nobody may not.
    config(&db, &root_dir, None);
    let (status, _, stderr) = check(&["--as-user", "nobody"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let line = format!("tokend: {path}: sinks[0].path: user nobody ");
    assert!(stderr.contains(&line), "no {line:?} in: {stderr}");
    assert!(stderr.contains(&root_dir.display().to_string()), "{stderr}");
    assert!(stderr.contains("mode 0755"), "{stderr}");
    assert!(
        stderr.contains("ACLs"),
        "says what it does not read: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one problem: {stderr}");

    // On the way to a directory that does not exist yet: one nobody may
    // not search.
    config(&db, &closed.join("later"), None);
    let (status, _, stderr) = check(&["--as-user", "nobody"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&line), "no {line:?} in: {stderr}");
    assert!(stderr.contains(&closed.display().to_string()), "{stderr}");

    // A sink group nobody is not in (root), and one it is in (its own).
    config(&db, &nobody_dir, Some("root"));
    let (status, _, stderr) = check(&["--as-user", "nobody"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let line = format!("tokend: {path}: sinks[0].group: user nobody is not in group \"root\"");
    assert!(stderr.contains(&line), "no {line:?} in: {stderr}");
    config(&db, &nobody_dir, Some(&NOBODY.to_string()));
    let (status, _, stderr) = check(&["--as-user", "nobody"]);
    assert_eq!(status.code(), Some(0), "{stderr}");

    // The database's directory too.
    config(&root_dir.join("tokend.db"), &nobody_dir, None);
    let (status, _, stderr) = check(&["--as-user", "nobody"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let line = format!("tokend: {path}: database: user nobody ");
    assert!(stderr.contains(&line), "no {line:?} in: {stderr}");

    // Files the daemon reads at start: the client secret, and the config
    // itself, each root's alone.
    config(&db, &nobody_dir, None);
    std::os::unix::fs::chown(&env.secret_file, Some(0), Some(0)).unwrap();
    let (status, _, stderr) = check(&["--as-user", "nobody"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let line = format!(
        "tokend: {path}: providers.fake.client_secret_file: user nobody (uid {NOBODY}) cannot \
         read {}: it has owner uid 0, group gid 0, mode 0600",
        env.secret_file.display()
    );
    assert!(stderr.contains(&line), "no {line:?} in: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one problem: {stderr}");
    std::os::unix::fs::chown(&env.secret_file, Some(NOBODY), Some(NOBODY)).unwrap();
    fs::set_permissions(&env.config_path, fs::Permissions::from_mode(0o600)).unwrap();
    let (status, _, stderr) = check(&["--as-user", "nobody"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let line = format!("tokend: {path}: user nobody (uid {NOBODY}) cannot read {path}: it has");
    assert!(stderr.contains(&line), "no {line:?} in: {stderr}");
    fs::set_permissions(&env.config_path, fs::Permissions::from_mode(0o644)).unwrap();

    // As root, for root, as before: everything is writable.
    config(&root_dir.join("tokend.db"), &root_dir, Some("root"));
    let (status, stdout, stderr) = check(&["--as-user", "root"]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stdout.contains("checked as user"), "{stdout}");
    if tokend::users::User::named("tokend").unwrap().is_none() {
        // No service user on this machine: checked as root, as before.
        let (status, stdout, stderr) = check(&[]);
        assert_eq!(status.code(), Some(0), "{stderr}");
        assert!(!stdout.contains("checked as user"), "{stdout}");
    }

    // A user that does not exist is a usage error.
    let (status, _, stderr) = check(&["--as-user", "no-such-user-tokend"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no user \"no-such-user-tokend\""),
        "{stderr}"
    );
    assert_nothing_created(&env, "check-config --as-user");
}

/// Not root: check-config checks as itself, as it always did; it cannot
/// check as anyone else.
#[test]
fn check_config_as_another_user_needs_root() {
    use std::os::unix::process::CommandExt;
    if !is_root() && skip("needs root (to run as nobody)") {
        return;
    }
    let env = Env::bare(Knobs::default());
    let mut cmd = env.tokend(&["check-config", "--as-user", "root"]);
    cmd.uid(NOBODY).gid(NOBODY);
    let (status, _, stderr) = run_bounded(&env, cmd, Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--as-user needs root"), "{stderr}");
}
