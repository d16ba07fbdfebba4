//! The test kit, shared by the integration tests and the benches: a temp
//! directory with a config, the fake provider over HTTP on 127.0.0.1, and
//! the real `tokend` binary. Benches include it with
//! `#[path = "../tests/support/mod.rs"] mod support;`.
//!
//! * here: [`Env`] (the directory, the config, the CLI) and the audit of files;
//! * `daemon.rs`: [`Daemon`], a `tokend run` and the audit of what it shows;
//! * `socket.rs`: HTTP over the daemon's Unix socket;
//! * `fleet.rs`: [`fleet::Host`], one of several daemons on a shared
//!   PostgreSQL database, each under a host name of its own;
//! * `store.rs`: the store, read through tokend's own `StoreConn`; the few
//!   tests that must write what tokend never would do so through
//!   [`Env::raw_store`], which says why.
//!
//! Every test is also a secrets audit (issue 6, item 5). The fake provider's
//! tokens and client secret carry recognisable prefixes ([`SECRET_MARKERS`]),
//! and none may show up where tokend promises they never go:
//!
//! * when a [`Daemon`] is dropped: its log (stderr, at debug level); while it
//!   still runs, its `/proc/PID/cmdline` and its children's, `GET /metrics`
//!   and `tokend status --json` (from the store once it has stopped);
//! * every CLI command's stderr ([`Env::cli`]);
//! * when an [`Env`] is dropped: every file under its temp directory except
//!   the store, the configured sinks and the harness's own inputs (see
//!   [`Env::audit_files`]); and the store must be 0600 in a 0700 directory.
//!
//! The audit runs only when the test has not already failed, so that a
//! failure is reported as itself, and not at all for a bench ([`Env::bench`]).
#![allow(dead_code, unused_imports)]

pub mod bench;
mod daemon;
pub mod fleet;
pub mod pg;
mod socket;
mod store;

pub use daemon::*;
pub use socket::*;
pub use store::*;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use tokend_fake_provider::{FakeProvider, Fault, FaultTarget, Knobs, MintedGrant};

/// Prefixes of everything secret the fake provider hands out.
pub const SECRET_MARKERS: [&str; 4] = ["fat_", "frt_", "fcode_", "fake-client-secret"];

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tokend")
}

/// The environment variable that lets a test skip what this machine cannot
/// do (no root, no tmpfs, no `chattr`). Unset, as in CI (which runs as
/// root), such a test fails instead: no test passes by skipping.
pub const MAY_SKIP: &str = "TOKEND_TESTS_MAY_SKIP";

/// Whether a test that cannot run here (`why`) should return early: only
/// when [`MAY_SKIP`] is set, saying so; otherwise it fails, naming `why`.
pub fn skip(why: &str) -> bool {
    if std::env::var_os(MAY_SKIP).is_some_and(|v| !v.is_empty()) {
        eprintln!("skipped ({MAY_SKIP} is set): {why}");
        return true;
    }
    panic!("this test cannot run here: {why} (set {MAY_SKIP}=1 to skip it instead)");
}

/// A random generator whose seed is printed as `VAR=N`, so that a failure
/// can be replayed by setting `VAR` to it.
pub fn seeded(var: &str) -> fastrand::Rng {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{var}={seed}");
    fastrand::Rng::with_seed(seed)
}

/// Polls `f` until it returns Some, or panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Env {
    /// Dropped last: [`Env`]'s own Drop audits it first.
    pub dir: tempfile::TempDir,
    pub provider: FakeProvider,
    pub config_path: PathBuf,
    pub db: PathBuf,
    pub tokens: PathBuf,
    pub secret_file: PathBuf,
    /// The daemon's Unix socket.
    pub socket: PathBuf,
    /// Whether dropping it (and its daemons) runs the secrets audit: false
    /// only for a bench.
    pub audit: bool,
}

/// The validation sweep once a year: the default (every quarter hour)
/// would add validations to whatever a test that crosses one counts.
pub const QUIET_SWEEP: &str = r#"validate_schedule = "0 0 0 1 1 *""#;

/// A `[refresh]` section for tests: short lead times and backoff.
pub const FAST_REFRESH: &str = r#"
[refresh]
validate_schedule = "0 0 0 1 1 *"
refresh_before_expiry = "2s"
min_remaining = "1s"
retry_initial = "500ms"
retry_max = "2s"
request_timeout = "3s"
"#;

/// [`FAST_REFRESH`] with another request timeout, for a test whose provider
/// answers slowly on purpose: well above its latency, so that a loaded
/// machine cannot turn a slow answer into one tokend gave up on while the
/// provider went on to rotate (a lost answer, which spends a grant).
pub fn fast_refresh_timeout(timeout: &str) -> String {
    let text = FAST_REFRESH.replace(
        "request_timeout = \"3s\"",
        &format!("request_timeout = \"{timeout}\""),
    );
    assert_ne!(text, FAST_REFRESH);
    text
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.audit && !std::thread::panicking() {
            self.audit_store_mode();
            self.audit_files();
        }
    }
}

impl Env {
    /// A provider with `knobs`, and a config with FAST_REFRESH and one raw sink.
    pub fn new(knobs: Knobs) -> Env {
        let env = Env::bare(knobs);
        env.write_config(FAST_REFRESH, &env.sink("raw", "0600"));
        env
    }

    /// A provider and a secret file, but no config yet.
    pub fn bare(knobs: Knobs) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let provider = FakeProvider::start(knobs).unwrap();
        let secret_file = dir.path().join("client.secret");
        fs::write(&secret_file, provider.client_secret()).unwrap();
        fs::set_permissions(&secret_file, fs::Permissions::from_mode(0o600)).unwrap();
        Env {
            config_path: dir.path().join("config.toml"),
            db: dir.path().join("state/tokend.db"),
            tokens: dir.path().join("tokens"),
            socket: dir.path().join("tokend.sock"),
            secret_file,
            provider,
            dir,
            audit: true,
        }
    }

    /// For a bench: like [`Env::bare`], but neither it nor its daemons run
    /// the secrets audit when dropped. A bench measures; the tests audit.
    pub fn bench(knobs: Knobs) -> Env {
        let mut env = Env::bare(knobs);
        env.audit = false;
        env
    }

    /// A `[[sinks]]` block writing `tokens/{name}` (for format raw) or
    /// `tokens/{name}.FORMAT`.
    pub fn sink(&self, format: &str, mode: &str) -> String {
        let suffix = if format == "raw" {
            String::new()
        } else {
            format!(".{format}")
        };
        format!(
            "[[sinks]]\npath = \"{}/{{name}}{suffix}\"\nformat = \"{format}\"\nmode = \"{mode}\"\n",
            self.tokens.display()
        )
    }

    /// The provider block for the fake provider, named "fake".
    pub fn provider_block(&self) -> String {
        let url = self.provider.url();
        format!(
            "[providers.fake]\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n\
             authorize_url = \"{url}/oauth2/authorize\"\ntoken_url = \"{url}/oauth2/access_token\"\n\
             validate_url = \"{url}/public/v1/members/current\"\n",
            self.provider.client_id(),
            self.secret_file.display()
        )
    }

    pub fn write_config(&self, refresh: &str, sinks: &str) {
        let text = format!(
            "database = \"{}\"\nsocket = \"{}\"\n{refresh}\n{}\n{sinks}",
            self.db.display(),
            self.socket.display(),
            self.provider_block()
        );
        fs::write(&self.config_path, text).unwrap();
    }

    pub fn tokend(&self, args: &[&str]) -> Command {
        tokend_command(&self.config_path, self.dir.path(), args)
    }

    /// Runs a CLI command to completion, with `stdin` fed in; its stderr is
    /// audited.
    pub fn cli(&self, args: &[&str], stdin: &str) -> Output {
        run_cli(self.tokend(args), stdin)
    }

    /// Mints a grant at the provider and imports it as `name` (refresh token
    /// on stdin; with the access token from a file when `with_access`).
    pub fn import(&self, name: &str, with_access: bool) -> MintedGrant {
        let g = self
            .provider
            .mint_grant(self.provider.client_id(), "read+write");
        let mut args = vec!["import", name, "--provider", "fake", "--refresh-token", "-"];
        let access_file = self.dir.path().join(format!("{name}.access"));
        let access_arg = access_file.display().to_string();
        let lifetime = g.expires_in.to_string();
        if with_access {
            fs::write(&access_file, &g.access_token).unwrap();
            args.extend(["--access-token", &access_arg, "--expires-in", &lifetime]);
        }
        let out = self.cli(&args, &g.refresh_token);
        assert!(
            out.status.success(),
            "import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        g
    }

    /// `tokend import NAME --force` with `refresh_token` on stdin.
    pub fn import_force(&self, name: &str, refresh_token: &str) -> Output {
        self.cli(
            &[
                "import",
                name,
                "--provider",
                "fake",
                "--refresh-token",
                "-",
                "--force",
            ],
            refresh_token,
        )
    }

    /// Mints a fresh grant and imports it over `name` (`--force`), as an
    /// operator re-authorizing by hand would.
    pub fn reimport(&self, name: &str) -> MintedGrant {
        let g = self
            .provider
            .mint_grant(self.provider.client_id(), "read+write");
        let out = self.import_force(name, &g.refresh_token);
        assert!(
            out.status.success(),
            "re-import of {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        g
    }

    pub fn token_file(&self, name: &str) -> PathBuf {
        self.tokens.join(name)
    }

    pub fn read_token(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.token_file(name)).ok()
    }

    pub fn start(&self) -> Daemon {
        Daemon::start(self, "daemon")
    }

    /// The store is private (SECURITY.md): the file and its -wal and -shm
    /// companions 0600, its directory 0700.
    pub fn audit_store_mode(&self) {
        if !self.db.exists() {
            return;
        }
        let dir = self.db.parent().unwrap();
        assert_eq!(mode(dir), 0o700, "{} is not 0700", dir.display());
        for suffix in ["", "-wal", "-shm"] {
            let f = PathBuf::from(format!("{}{suffix}", self.db.display()));
            if f.exists() {
                assert_eq!(mode(&f), 0o600, "{} is not 0600", f.display());
            }
        }
    }

    /// No file under the temp directory holds a secret, except those meant
    /// to: the store (`*.db`, `*.db-wal`, `*.db-shm`, `*.db-journal`), the
    /// files of every sink configured in a `*.toml` there, and the inputs
    /// the tests wrote themselves (the client secret file, the `*.access`
    /// and `*.jsonl` files handed to `tokend import`, and the configs, one of which puts
    /// a secret under an unknown key on purpose).
    pub fn audit_files(&self) {
        let root = self.dir.path();
        let configs: Vec<PathBuf> = walk(root)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        let sinks: Vec<(String, String)> = configs.iter().flat_map(|c| sink_patterns(c)).collect();
        for path in walk(root) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let store = [".db", ".db-wal", ".db-shm", ".db-journal"]
                .iter()
                .any(|s| name.ends_with(s));
            let input = path == self.secret_file
                || configs.contains(&path)
                || (path.parent() == Some(root)
                    && (name.ends_with(".access") || name.ends_with(".jsonl")));
            let text = path.to_string_lossy();
            // The harness's own sink directory counts too: a test may leave
            // a config behind that no longer parses (a reload of a bad file).
            let sink = path.starts_with(&self.tokens)
                || sinks.iter().any(|(pre, post)| {
                    text.starts_with(pre.as_str()) && text.ends_with(post.as_str())
                });
            if store || input || sink {
                continue;
            }
            let Ok(bytes) = fs::read(&path) else { continue };
            assert_no_secrets(&String::from_utf8_lossy(&bytes), &text);
        }
    }
}

/// Every regular file under `dir`, symlinks not followed.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            out.extend(walk(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

/// The `[[sinks]]` paths of a config file, each split at `{name}` into what
/// a sink file's path starts and ends with. A file that does not parse
/// yields none.
fn sink_patterns(config: &Path) -> Vec<(String, String)> {
    let Some(value) = fs::read_to_string(config)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
    else {
        return Vec::new();
    };
    value
        .get("sinks")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
        .filter_map(|s| s.get("path")?.as_str())
        .map(|p| match p.split_once("{name}") {
            Some((pre, post)) => (pre.to_owned(), post.to_owned()),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

/// `tokend -c CONFIG ARGS…` with the harness's environment cleaned: tests
/// run under systemd too (CI as a service), and its variables are not for
/// the daemons a test starts. A config that leaves `socket` out still keeps
/// its daemon's socket in `runtime_dir`, not on the machine's /run/tokend.
pub fn tokend_command(config: &Path, runtime_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("-c").arg(config).args(args);
    for var in [
        "RUST_LOG",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
        "CREDENTIALS_DIRECTORY",
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
    ] {
        c.env_remove(var);
    }
    c.env("RUNTIME_DIRECTORY", runtime_dir);
    c
}

/// Runs a CLI command to completion, with `stdin` fed in; its stderr is
/// audited.
pub fn run_cli(mut cmd: Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command may exit, closing its stdin, before it has read all of it
    // (one that reads none, or refuses its arguments first): what it
    // answered is for the test to judge, not a failed write.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "writing the CLI's stdin: {e}"
        );
    }
    let out = child.wait_with_output().unwrap();
    assert_no_secrets(&String::from_utf8_lossy(&out.stderr), "CLI stderr");
    out
}

pub fn assert_no_secrets(text: &str, what: &str) {
    for m in SECRET_MARKERS {
        if let Some(line) = text.lines().find(|l| l.contains(m)) {
            panic!("{what} holds something secret ({m}…): {line}");
        }
    }
}

/// Mode bits of a file.
pub fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Mints a grant with the provider's current knobs and imports it as `name`
/// with its access token, telling tokend it has `expires_in` seconds left
/// (which may differ from what the provider thinks).
pub fn import_expiring(env: &Env, name: &str, expires_in: u64) -> MintedGrant {
    import_with_access(env, name, None, expires_in)
}

/// Like `import_expiring`, with `access` (which the provider may not know)
/// instead of the grant's own access token when given.
pub fn import_with_access(
    env: &Env,
    name: &str,
    access: Option<&str>,
    expires_in: u64,
) -> MintedGrant {
    let g = env
        .provider
        .mint_grant(env.provider.client_id(), "read+write");
    let access_file = env.dir.path().join(format!("{name}.access"));
    fs::write(&access_file, access.unwrap_or(&g.access_token)).unwrap();
    let access_arg = access_file.display().to_string();
    let lifetime = expires_in.to_string();
    let out = env.cli(
        &[
            "import",
            name,
            "--provider",
            "fake",
            "--refresh-token",
            "-",
            "--access-token",
            &access_arg,
            "--expires-in",
            &lifetime,
        ],
        &g.refresh_token,
    );
    assert!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    g
}
