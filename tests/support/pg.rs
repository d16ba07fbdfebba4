//! A throwaway PostgreSQL server for the tests (issue 12): `initdb` into a
//! temporary directory, `postgres` listening on a Unix socket in that
//! directory only (no TCP), so `cargo test` needs no set-up and servers
//! started by tests running at once never meet. Debian's packages put the
//! binaries in /usr/lib/postgresql/VERSION/bin, off PATH.
//!
//! PostgreSQL refuses to run as root: when the tests do (CI), the server
//! runs as the `postgres` user that Debian's packages create, in a
//! directory given to it.
//!
//! Where PostgreSQL is missing the test fails saying how to install it,
//! unless [`SKIP_POSTGRES`] is set: then [`Server::start`] returns None
//! and the test says that it skipped.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::wait_for;

/// Set to 1, PostgreSQL tests skip on a machine without PostgreSQL.
pub const SKIP_POSTGRES: &str = "TOKEND_SKIP_POSTGRES";

/// The superuser `initdb` creates: trusted on the socket, no password.
pub const USER: &str = "tokend";

/// Every server listens in its own directory, so they can all use the
/// default port: a Unix socket's name is the directory plus the port.
const PORT: u16 = 5432;

/// The user the server runs as when the tests run as root.
const RUN_AS: &str = "postgres";

/// A running server; dropping it stops it and removes its directory.
pub struct Server {
    /// The socket directory and, in `data/`, the cluster.
    dir: tempfile::TempDir,
    child: Option<Child>,
    bin: PathBuf,
    databases: AtomicUsize,
    /// Whether commits are synced to the disk ([`Server::start_durable`]).
    durable: bool,
}

impl Server {
    /// Starts a fresh server with a database `tokend`; None only when
    /// PostgreSQL is missing and [`SKIP_POSTGRES`] says to skip.
    pub fn start() -> Option<Server> {
        Self::start_with(false)
    }

    /// Like [`start`](Self::start), but with PostgreSQL's durability on
    /// (`fsync`, `full_page_writes`, its default buffers), as a production
    /// server runs: for a benchmark, where a commit must cost its WAL
    /// flush. The tests keep `fsync=off`, which is faster and enough for
    /// them (a commit still survives `restart`).
    pub fn start_durable() -> Option<Server> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Option<Server> {
        let Some(bin) = bin_dir() else {
            if std::env::var_os(SKIP_POSTGRES).is_some_and(|v| v == "1") {
                eprintln!(
                    "skipped ({SKIP_POSTGRES}=1): PostgreSQL is not installed (no initdb found)"
                );
                return None;
            }
            panic!(
                "this test needs PostgreSQL, which is not installed (no initdb in \
                 /usr/lib/postgresql/*/bin or on PATH): `apt-get install postgresql-15`, \
                 or set {SKIP_POSTGRES}=1 to skip the PostgreSQL tests"
            );
        };
        let dir = tempfile::Builder::new()
            .prefix("tokend-pg")
            .tempdir()
            .unwrap();
        if as_root() {
            let (uid, gid) = run_as_ids();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let data = dir.path().join("data");
        let out = command(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .args(["-U", USER, "--no-instructions"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut server = Server {
            dir,
            child: None,
            bin,
            databases: AtomicUsize::new(0),
            durable,
        };
        server.run();
        server.psql("postgres", "CREATE DATABASE tokend");
        Some(server)
    }

    /// The socket directory, libpq's `host`.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The libpq URL of the `tokend` database.
    pub fn url(&self) -> String {
        self.url_of("tokend")
    }

    /// The libpq URL of database `db` on this server.
    pub fn url_of(&self, db: &str) -> String {
        format!(
            "postgresql://{USER}@/{db}?host={}&port={PORT}",
            self.socket_dir().display()
        )
    }

    /// The database a URL of [`fresh_db`](Self::fresh_db) names, for
    /// [`psql`](Self::psql) and [`hold_row`](Self::hold_row).
    pub fn db_name(url: &str) -> String {
        let path = url.split('/').nth(3).unwrap_or_default();
        path.split('?').next().unwrap_or_default().to_owned()
    }

    /// Creates an empty database of its own for one test and returns its URL.
    pub fn fresh_db(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{n}");
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url_of(&name)
    }

    /// The server's main process (the first line of `postmaster.pid`):
    /// its backends are its children. None while it is not running.
    pub fn postmaster_pid(&self) -> Option<u32> {
        fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Runs SQL as the superuser in `db`, panicking on failure; its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &PORT.to_string(), "-U", USER, "-d", db, "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Stops the server at once, as a crash would (`-m immediate`: no
    /// checkpoint, connections cut), and starts it again on the same
    /// directory: the database restarted under its clients.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Stops the server as [`restart`](Self::restart) does, and leaves it
    /// down until [`come_back`](Self::come_back): an outage.
    pub fn go_down(&mut self) {
        self.stop();
    }

    /// Starts the server again after [`go_down`](Self::go_down).
    pub fn come_back(&mut self) {
        self.run();
    }

    /// Like [`Server::restart`], but the server stays down for `down`
    /// before it starts again: its clients meet refused connections, not
    /// only cut ones.
    pub fn restart_after(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.run();
    }

    /// A connection config for database `db` on this server, for the
    /// `postgres` crate (what a test reads while tokend runs).
    pub fn config(&self, db: &str) -> postgres::Config {
        let mut c = postgres::Config::new();
        c.user(USER)
            .dbname(db)
            .host_path(self.socket_dir())
            .port(PORT)
            .connect_timeout(Duration::from_secs(5));
        c
    }

    /// Makes every update of the credentials whose names are `LIKE
    /// pattern` in database `db` take `secs` longer (a trigger sleeps):
    /// a database slow for a reason that is no row lock (I/O, a trigger
    /// an administrator added).
    pub fn slow_updates(&self, db: &str, pattern: &str, secs: f64) {
        self.psql(
            db,
            &format!(
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
                   $$ BEGIN PERFORM pg_sleep({secs}); RETURN NEW; END $$;
                 CREATE TRIGGER slow BEFORE UPDATE ON credentials FOR EACH ROW
                   WHEN (NEW.name LIKE '{pattern}') EXECUTE FUNCTION slow();"
            ),
        );
    }

    /// Locks credential `name`'s row from a session of its own, as a
    /// `psql` shell left in a transaction would, until the returned sender
    /// is dropped.
    pub fn hold_row(&self, db: &str, name: &'static str) -> std::sync::mpsc::Sender<()> {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (locked, is_locked) = std::sync::mpsc::channel::<()>();
        let config = self.config(db);
        std::thread::spawn(move || {
            let mut client = config.connect(postgres::NoTls).unwrap();
            let mut tx = client.transaction().unwrap();
            tx.query(
                "SELECT 1 FROM credentials WHERE name = $1 FOR UPDATE",
                &[&name],
            )
            .unwrap();
            locked.send(()).unwrap();
            let _ = released.recv();
            let _ = tx.commit();
        });
        is_locked.recv().unwrap();
        release
    }

    /// Starts `postgres` on the cluster and waits until it accepts connections.
    fn run(&mut self) {
        let data = self.dir.path().join("data");
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = command(&self.bin, "postgres")
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-p", &PORT.to_string()])
            // Unix socket only. A commit is written before it is
            // acknowledged, so it survives `restart` (the process killed),
            // but, unless durable, never synced: nothing here outlives a
            // machine crash.
            .args(["-c", "listen_addresses=", "-c", "max_connections=100"])
            .args(if self.durable {
                // PostgreSQL's defaults: every commit flushed to the disk.
                ["-c", "fsync=on", "-c", "full_page_writes=on"]
            } else {
                ["-c", "fsync=off", "-c", "full_page_writes=off"]
            })
            .args([
                "-c",
                if self.durable {
                    "shared_buffers=128MB"
                } else {
                    "shared_buffers=16MB"
                },
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // postmaster.pid's eighth line turns to "ready" once connections
        // are accepted (see PostgreSQL's pidfile.h).
        let pidfile = data.join("postmaster.pid");
        let ready = || {
            fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.lines().nth(7).map(|l| l.trim() == "ready"))
                .unwrap_or(false)
        };
        let child = self.child.as_mut().unwrap();
        wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = fs::read_to_string(self.dir.path().join("server.log"));
                    panic!("postgres exited ({status}): {}", log.unwrap_or_default());
                }
                ready().then_some(())
            },
        );
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = command(&self.bin, "pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where `initdb` and `postgres` are: Debian's directory of the newest
/// version installed, else PATH.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    versions.sort_by_key(|b| {
        b.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop().or_else(|| {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(PathBuf::from)
            .find(|d| d.join("initdb").is_file())
    })
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of [`RUN_AS`].
fn run_as_ids() -> (u32, u32) {
    let name = std::ffi::CString::new(RUN_AS).unwrap();
    // SAFETY: getpwnam with a valid C string; the fields are read at once,
    // before any other call could reuse its static buffer.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "the tests run as root and PostgreSQL refuses to: they run it as the \
         {RUN_AS:?} user, which does not exist (Debian's postgresql package creates it)"
    );
    // SAFETY: checked non-null above.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// A PostgreSQL program, run as [`RUN_AS`] when we are root.
fn command(bin: &Path, program: &str) -> Command {
    if as_root() {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={RUN_AS}"),
            &format!("--regid={RUN_AS}"),
            "--clear-groups",
        ])
        .arg(bin.join(program));
        c.current_dir("/");
        c
    } else {
        Command::new(bin.join(program))
    }
}

/// Credential `name` as the PostgreSQL store tests import it: an access
/// token good for a minute, refresh token `refresh_token`.
pub fn new_cred(name: &str, refresh_token: &str) -> tokend::store::NewCredential {
    tokend::store::NewCredential {
        name: name.into(),
        provider: "p".into(),
        access_token: Some(tokend::secret::Secret::new("at1")),
        grant: tokend::store::Grant::RefreshToken(tokend::secret::Secret::new(refresh_token)),
        scope: Some("read".into()),
        expires_at: Some(tokend::clock::now_ms() + 60_000),
        event: "imported",
    }
}

/// What a provider answered to a refresh that rotated to `rt`, as a
/// commit stores it.
pub fn update(rt: &str) -> tokend::store::TokenUpdate {
    tokend::store::TokenUpdate {
        access_token: Some(tokend::secret::Secret::new(format!("at-{rt}"))),
        refresh_token: Some(tokend::secret::Secret::new(rt)),
        scope: None,
        expires_at: Some(tokend::clock::now_ms() + 3_600_000),
    }
}
