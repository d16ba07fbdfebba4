//! The test harness: a temp directory with a config, the fake provider over
//! HTTP on 127.0.0.1, and the real `tokend` binary.
//!
//! Every daemon's stderr goes to a file; when a [`Daemon`] is dropped, its
//! log is checked for anything that looks like a token or the client secret
//! (the fake provider's tokens carry recognisable prefixes), so that every
//! test is also a secrets test.
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
    pub dir: tempfile::TempDir,
    pub provider: FakeProvider,
    pub config_path: PathBuf,
    pub db: PathBuf,
    pub tokens: PathBuf,
    pub secret_file: PathBuf,
    /// The daemon's Unix socket.
    pub socket: PathBuf,
}

/// A `[refresh]` section for tests: short lead times and backoff.
pub const FAST_REFRESH: &str = r#"
[refresh]
refresh_before_expiry = "2s"
min_remaining = "1s"
retry_initial = "500ms"
retry_max = "2s"
request_timeout = "3s"
"#;

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
        Daemon { child, log }
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
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            assert_no_secrets(&self.log(), &self.log.display().to_string());
        }
    }
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
    let g = env
        .provider
        .mint_grant(env.provider.client_id(), "read+write");
    let access_file = env.dir.path().join(format!("{name}.access"));
    fs::write(&access_file, &g.access_token).unwrap();
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
