//! The test harness: a temp directory with a config, the fake provider over
//! HTTP on 127.0.0.1, and the real `tokend` binary.
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
//! failure is reported as itself.
#![allow(dead_code, unused_imports)]

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

impl Drop for Env {
    fn drop(&mut self) {
        if !std::thread::panicking() {
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
        }
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
        let mut c = Command::new(bin());
        c.arg("-c").arg(&self.config_path).args(args);
        // Tests run under systemd too (CI as a service): its variables are
        // not for the daemons a test starts.
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
        // A config that leaves `socket` out still keeps its daemon's socket
        // in the test's own directory, not on the machine's /run/tokend.
        c.env("RUNTIME_DIRECTORY", self.dir.path());
        c
    }

    /// Runs a CLI command to completion, with `stdin` fed in.
    pub fn cli(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .tokend(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_no_secrets(&String::from_utf8_lossy(&out.stderr), "CLI stderr");
        out
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
    /// files handed to `tokend import`, and the configs, one of which puts
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
                || (path.parent() == Some(root) && name.ends_with(".access"));
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

    /// The stored row of a credential, read straight from the SQLite file.
    pub fn row(&self, name: &str) -> Option<Row> {
        let c = rusqlite::Connection::open(&self.db).ok()?;
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c.query_row(
            "SELECT access_token, refresh_token, state, last_error, failures, version
             FROM credentials WHERE name = ?1",
            [name],
            |r| {
                Ok(Row {
                    access_token: r.get(0)?,
                    refresh_token: r.get(1)?,
                    state: r.get(2)?,
                    last_error: r.get(3)?,
                    failures: r.get(4)?,
                    version: r.get(5)?,
                })
            },
        )
        .ok()
    }

    pub fn state(&self, name: &str) -> Option<String> {
        self.row(name).map(|r| r.state)
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub access_token: Option<String>,
    pub refresh_token: String,
    pub state: String,
    pub last_error: Option<String>,
    pub failures: i64,
    pub version: i64,
}

pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    /// The config it runs with: the audit on drop asks its socket.
    pub config: PathBuf,
}

impl Daemon {
    pub fn start(env: &Env, label: &str) -> Daemon {
        Daemon::start_with(env, label, |_, _| {})
    }

    /// Like `start`, with `configure` given the command and the log file
    /// (created, empty) before the spawn: more arguments, environment.
    pub fn start_with(
        env: &Env,
        label: &str,
        configure: impl FnOnce(&mut Command, &Path),
    ) -> Daemon {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let log = env.dir.path().join(format!("{label}-{n}.log"));
        let file = fs::File::create(&log).unwrap();
        let mut cmd = env.tokend(&["run"]);
        cmd.env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        configure(&mut cmd, &log);
        let child = cmd.spawn().unwrap();
        Daemon {
            child,
            log,
            config: env.config_path.clone(),
        }
    }

    /// Runs `cmd` (a `tokend -c CONFIG run`) at debug level, its stderr to `log`.
    pub fn spawn(mut cmd: Command, config: &Path, log: PathBuf) -> Daemon {
        let child = cmd
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon {
            child,
            log,
            config: config.to_owned(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(&format!("log line {needle:?}"), timeout, || {
            self.log().contains(needle).then_some(())
        });
    }

    /// Polls for exit until `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for("the daemon to exit", timeout, || {
            self.child.try_wait().unwrap()
        })
    }

    /// SIGTERM, and the exit status within a few seconds.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(10))
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let audit = !std::thread::panicking();
        let running = self.child.try_wait().ok().flatten().is_none();
        if audit && running {
            self.audit_running();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if audit {
            assert_no_secrets(&self.log(), &self.log.display().to_string());
            if !running {
                // The store's view, as `tokend status` shows it with no daemon.
                self.audit_status();
            }
        }
    }
}

impl Daemon {
    /// What a running daemon shows others: its argv and its children's (a
    /// hook), its metrics and its statuses. Skipped for a stopped (SIGSTOP)
    /// daemon, which would not answer.
    fn audit_running(&self) {
        let pid = self.pid();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('T')
        {
            return;
        }
        for p in std::iter::once(pid).chain(children(pid)) {
            if let Ok(argv) = fs::read(format!("/proc/{p}/cmdline")) {
                assert_no_secrets(
                    &String::from_utf8_lossy(&argv).replace('\0', " "),
                    &format!("/proc/{p}/cmdline"),
                );
            }
        }
        let socket = tokend::config::socket_path(&self.config);
        // Only a socket of this test's own (never a system daemon's).
        if self.config.parent().is_some_and(|d| socket.starts_with(d))
            && let Ok(r) =
                socket_request(&socket, "GET", "/metrics", &[], b"", Duration::from_secs(5))
        {
            assert_no_secrets(&r.text(), "GET /metrics");
        }
        self.audit_status();
    }

    /// `tokend status --json`, from the daemon or the store.
    fn audit_status(&self) {
        let out = Command::new(bin())
            .arg("-c")
            .arg(&self.config)
            .args(["status", "--json"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output();
        if let Ok(out) = out {
            assert_no_secrets(
                &String::from_utf8_lossy(&out.stdout),
                "tokend status --json",
            );
            assert_no_secrets(
                &String::from_utf8_lossy(&out.stderr),
                "tokend status stderr",
            );
        }
    }
}

/// The pids whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    // "pid (comm) state ppid …": comm may hold spaces.
                    let rest = s.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
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

// ---- the socket API (appended for tests/socket.rs and tests/cli.rs) ----

/// A reply read over the daemon's Unix socket.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) over a Unix socket and
/// reads the reply to the end. `timeout` bounds each read and write.
pub fn socket_request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Reply> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_reply(&raw)
}

/// Parses a whole HTTP/1.1 response (Content-Length, chunked, or to EOF).
pub fn parse_reply(raw: &[u8]) -> std::io::Result<Reply> {
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what}: {:?}", String::from_utf8_lossy(raw)),
        )
    };
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = rest[at..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("bad chunk"))?;
            let size = std::str::from_utf8(&rest[at..at + line_end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| bad("bad chunk size"))?;
            at += line_end + 2;
            if size == 0 {
                break;
            }
            body.extend_from_slice(rest.get(at..at + size).ok_or_else(|| bad("short chunk"))?);
            at += size + 2;
        }
        body
    } else if let Some(n) = find("content-length") {
        let n: usize = n.parse().map_err(|_| bad("bad content-length"))?;
        rest.get(..n).ok_or_else(|| bad("short body"))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// A request over the socket that must get an answer (10 s per read/write).
pub fn request(socket: &Path, method: &str, path: &str) -> Reply {
    socket_request(socket, method, path, &[], b"", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{method} {path} over {}: {e}", socket.display()))
}

/// `GET path` over the socket.
pub fn get(socket: &Path, path: &str) -> Reply {
    request(socket, "GET", path)
}

/// Waits until the daemon answers `GET /health` with 200.
pub fn wait_serving(socket: &Path, timeout: Duration) {
    wait_for("the socket to serve /health", timeout, || {
        socket_request(socket, "GET", "/health", &[], b"", Duration::from_secs(5))
            .ok()
            .filter(|r| r.status == 200)
            .map(|_| ())
    });
}

/// The names `GET /v1/credentials` lists.
pub fn listed_names(socket: &Path) -> Vec<String> {
    let r = get(socket, "/v1/credentials");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|s| s["name"].as_str().expect("a name").to_owned())
        .collect()
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
