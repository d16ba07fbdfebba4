//! README "Running a program with a token" and `tokend token --format`
//! (issue 13): the real binary, a real daemon and the fake provider. The
//! children are /bin/sh scripts that write what they see under the test's
//! token directory (which the secrets audit expects to hold tokens).

mod support;

use std::fs;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(20);

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A daemon serving `bot` (imported with its access token) with one raw sink.
fn serving() -> (Env, Daemon, MintedGrant) {
    let env = Env::new(Knobs::default());
    let bot = env.import("bot", true);
    let d = env.start();
    wait_serving(&env.socket, WAIT);
    (env, d, bot)
}

/// `tokend exec ARGS -- /bin/sh -c SCRIPT`, with `$OUT` the token directory.
fn exec(env: &Env, args: &[&str], script: &str) -> std::process::Command {
    fs::create_dir_all(&env.tokens).unwrap();
    let mut c = env.tokend(&[&["exec"], args, &["--", "/bin/sh", "-c", script]].concat());
    c.env("OUT", &env.tokens)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs `tokend exec` to completion; its stderr is audited.
fn exec_output(env: &Env, args: &[&str], script: &str) -> Output {
    let o = exec(env, args, script).output().unwrap();
    assert_no_secrets(&stderr(&o), "tokend exec's stderr");
    o
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

fn lines(path: &Path) -> Vec<String> {
    read(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A `tokend exec` running in the background. If the test fails first,
/// dropping it sends SIGTERM (which it passes on to its child), then SIGKILL.
struct Running(Option<Child>);

impl Running {
    fn start(mut c: std::process::Command) -> Running {
        Running(Some(c.spawn().unwrap()))
    }

    fn kill(&self, sig: i32) {
        let pid = self.0.as_ref().unwrap().id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, sig) };
    }

    /// Waits for it to end; its status and stderr (audited).
    fn finish(mut self) -> Output {
        let o = self.0.take().unwrap().wait_with_output().unwrap();
        assert_no_secrets(&stderr(&o), "tokend exec's stderr");
        o
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.is_none() {
            return;
        }
        self.kill(libc::SIGTERM);
        let child = self.0.as_mut().unwrap();
        for _ in 0..100 {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A child that says it started (appending its token to `$OUT/starts`),
/// then waits to be signalled.
const LOOP: &str = "printf '%s\\n' \"$ACCESS_TOKEN\" >> \"$OUT/starts\"; \
                    while :; do sleep 0.05; done";

#[test]
fn token_format_prints_the_bytes_of_each_sink_format() {
    let env = Env::bare(Knobs::default());
    let sinks: String = ["raw", "header", "json", "env"]
        .iter()
        .map(|f| env.sink(f, "0600"))
        .collect();
    env.write_config(FAST_REFRESH, &sinks);
    env.import("bot", true);
    let _d = env.start();
    wait_serving(&env.socket, WAIT);
    for (format, file) in [
        ("raw", "bot"),
        ("header", "bot.header"),
        ("json", "bot.json"),
        ("env", "bot.env"),
    ] {
        let path = env.tokens.join(file);
        let published = wait_for(&format!("{file} to be published"), WAIT, || {
            fs::read(&path).ok()
        });
        let o = env.cli(&["token", "bot", "--format", format], "");
        assert!(o.status.success(), "--format {format}: {}", stderr(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&published),
            "--format {format}"
        );
    }
    // Without --format: the token and a newline, as before.
    let o = env.cli(&["token", "bot"], "");
    assert_eq!(
        o.stdout,
        [fs::read(env.token_file("bot")).unwrap(), b"\n".to_vec()].concat()
    );
    let o = env.cli(&["token", "bot", "--format", "xml"], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--format"), "{}", stderr(&o));
}

#[test]
fn exec_gives_the_child_the_token_in_its_environment_only() {
    let (env, _d, bot) = serving();
    // The child records its variables, its own argv and its parent's
    // (`tokend exec`'s), then exits 7.
    let script = "printf '%s' \"$ACCESS_TOKEN\" > \"$OUT/seen\"; \
                  printf '%s' \"${MY_TOKEN-unset}\" > \"$OUT/seen-other\"; \
                  cat /proc/$$/cmdline > \"$OUT/child-argv\"; \
                  cat /proc/$PPID/cmdline > \"$OUT/exec-argv\"; exit 7";
    let o = exec_output(&env, &["bot"], script);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let seen = read(&env.tokens.join("seen")).unwrap();
    assert_eq!(seen, bot.access_token);
    assert_eq!(Some(seen), env.read_token("bot"));
    assert_eq!(read(&env.tokens.join("seen-other")).unwrap(), "unset");
    for argv in ["child-argv", "exec-argv"] {
        let text = read(&env.tokens.join(argv)).unwrap();
        assert!(!text.is_empty(), "{argv} not recorded");
        assert!(!text.contains(&bot.access_token), "{argv}: {text:?}");
        assert_no_secrets(&text, argv);
    }
    assert!(
        read(&env.tokens.join("exec-argv"))
            .unwrap()
            .contains("exec")
    );

    // --env names the variable; the default one is then not set.
    let o = exec_output(
        &env,
        &["bot", "--env", "MY_TOKEN"],
        "printf '%s' \"$MY_TOKEN\" > \"$OUT/seen-other\"; \
         printf '%s' \"${ACCESS_TOKEN-unset}\" > \"$OUT/seen\"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        read(&env.tokens.join("seen-other")).unwrap(),
        bot.access_token
    );
    assert_eq!(read(&env.tokens.join("seen")).unwrap(), "unset");
}

#[test]
fn exec_forwards_signals_and_exits_as_the_child() {
    let (env, _d, _bot) = serving();
    let got = env.tokens.join("got");
    let script = "trap 'echo usr1 >> \"$OUT/got\"' USR1; \
                  trap 'echo hup >> \"$OUT/got\"' HUP; \
                  echo ready > \"$OUT/ready\"; \
                  while :; do sleep 0.05; done";
    let child = Running::start(exec(&env, &["bot"], script));
    wait_for("the child to start", WAIT, || {
        read(&env.tokens.join("ready"))
    });
    child.kill(libc::SIGUSR1);
    wait_for("the child to get SIGUSR1", WAIT, || {
        (lines(&got) == ["usr1"]).then_some(())
    });
    child.kill(libc::SIGHUP);
    wait_for("the child to get SIGHUP", WAIT, || {
        (lines(&got) == ["usr1", "hup"]).then_some(())
    });
    // The child does not catch SIGTERM: it dies of it, and tokend exec
    // exits as a shell would say, 128 + 15.
    child.kill(libc::SIGTERM);
    let o = child.finish();
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
}

#[test]
fn exec_restarts_the_child_on_a_new_token() {
    let (env, _d, bot) = serving();
    let starts = env.tokens.join("starts");
    let child = Running::start(exec(
        &env,
        &["bot", "--restart-on-change", "--interval", "200ms"],
        LOOP,
    ));
    wait_for("the child to start", WAIT, || {
        (lines(&starts).len() == 1).then_some(())
    });
    assert_eq!(lines(&starts), std::slice::from_ref(&bot.access_token));
    let o = env.cli(&["refresh", "bot"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let new = env.read_token("bot").unwrap();
    assert_ne!(new, bot.access_token);
    wait_for("the child to restart with the new token", WAIT, || {
        (lines(&starts).len() == 2).then_some(())
    });
    assert_eq!(lines(&starts), [bot.access_token.clone(), new]);
    child.kill(libc::SIGTERM);
    assert_eq!(child.finish().status.code(), Some(143));
}

#[test]
fn exec_signals_the_child_on_a_new_token() {
    let (env, _d, bot) = serving();
    let starts = env.tokens.join("starts");
    let script = "trap 'echo hup >> \"$OUT/hups\"' HUP; ".to_owned() + LOOP;
    let child = Running::start(exec(
        &env,
        &["bot", "--signal", "HUP", "--interval", "200ms"],
        &script,
    ));
    wait_for("the child to start", WAIT, || {
        (lines(&starts).len() == 1).then_some(())
    });
    assert_eq!(
        read(&env.tokens.join("hups")),
        None,
        "a signal before a rotation"
    );
    let o = env.cli(&["refresh", "bot"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let hups = env.tokens.join("hups");
    wait_for("the child to get SIGHUP", WAIT, || {
        lines(&hups).first().cloned()
    });
    assert_eq!(lines(&hups), ["hup"], "one rotation, one signal");
    // Signalled, not restarted: it still holds its first token.
    assert_eq!(lines(&starts), [bot.access_token]);
    child.kill(libc::SIGTERM);
    assert_eq!(child.finish().status.code(), Some(143));
}

#[test]
fn exec_fails_without_a_daemon_an_unknown_name_or_a_command() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let ran = "echo ran > \"$OUT/ran\"";
    let o = exec_output(&env, &["bot"], ran);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("tokend is not running") && e.contains("tokend run"),
        "{e}"
    );

    let _d = env.start();
    wait_serving(&env.socket, WAIT);
    let o = exec_output(&env, &["nope"], ran);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no credential named \"nope\""),
        "{}",
        stderr(&o)
    );
    assert_eq!(read(&env.tokens.join("ran")), None, "a child ran");

    for args in [
        &["exec", "bot"][..],
        &["exec", "bot", "--"],
        &["exec", "bot", "/bin/true"],
        &["exec", "bot", "--env", "1X", "--", "/bin/true"],
        &["exec", "bot", "--signal", "NOPE", "--", "/bin/true"],
        &[
            "exec",
            "bot",
            "--signal",
            "HUP",
            "--restart-on-change",
            "--",
            "/bin/true",
        ],
    ] {
        let o = env.cli(args, "");
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let o = env.cli(&["exec", "bot", "--", "/nonexistent/program"], "");
    assert_eq!(o.status.code(), Some(127), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/program"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn exec_obeys_the_access_rules() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && skip("tokend exec as another user needs root") {
        return;
    }
    let env = Env::bare(Knobs::default());
    env.write_config(
        &format!("socket_mode = \"0666\"\n{FAST_REFRESH}"),
        &format!(
            "{}\n[[access]]\ncredentials = [\"granted\"]\nuids = [65534]\n",
            env.sink("raw", "0600")
        ),
    );
    env.import("bot", true);
    env.import("granted", true);
    // Others may reach the socket and the config in the temp dir.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    fs::set_permissions(&env.config_path, fs::Permissions::from_mode(0o644)).unwrap();
    let _d = env.start();
    wait_serving(&env.socket, WAIT);
    let as_nobody = |name: &str| {
        use std::os::unix::process::CommandExt;
        let mut c = exec(&env, &[name], "[ -n \"$ACCESS_TOKEN\" ] && exit 3");
        c.uid(65534).gid(65534).env("HOME", "/");
        let o = c.output().unwrap();
        assert_no_secrets(&stderr(&o), "tokend exec's stderr");
        o
    };
    let o = as_nobody("bot");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("65534"),
        "the daemon's message: {}",
        stderr(&o)
    );
    // The child ran, with a token, and its status came back.
    let o = as_nobody("granted");
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
}
