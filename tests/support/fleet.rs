//! A fleet for `tests/pg_fleet.rs` (issue 12): [`Host`]s, each a `tokend
//! run` with a directory, config, sink, socket and log of its own, and a
//! host name of its own, all on one PostgreSQL database.
//!
//! The host name matters: a lease holder's id is `host/pid/start/place`, and a
//! holder on the same host is seen dead at once by its pid, one on another
//! host only when its lease expires (docs/design.md, "Leases across
//! hosts"). So that a SIGKILLed host's leases are freed as on a real fleet,
//! each daemon runs in a UTS namespace of its own (`unshare(CLONE_NEWUTS)`,
//! then `sethostname`), which needs root: see [`can_name_hosts`].
//!
//! A host's directory is on tmpfs when `/dev/shm` is there, as `/run`
//! (where sinks live in production) is: three hosts publishing a thousand
//! 5-second tokens would otherwise wait on the disk's fsyncs, not on tokend.

use super::*;
use std::ffi::CString;
use std::os::unix::process::CommandExt;

/// Whether daemons can be given host names of their own (root, for the
/// UTS namespace).
pub fn can_name_hosts() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub struct Host {
    /// Its host name, also the prefix of its daemons' lease holder ids.
    pub name: String,
    pub config: PathBuf,
    pub tokens: PathBuf,
    pub socket: PathBuf,
    /// The running daemon, if any.
    pub daemon: Option<Daemon>,
    /// Daemons started so far: each gets a log of its own.
    pub starts: usize,
    /// Dropped last: [`Host`]'s Drop stops the daemon and audits it first.
    pub dir: tempfile::TempDir,
}

impl Host {
    /// A host named `name` whose config uses `database`, the `[refresh]`
    /// section `refresh` and `env`'s provider, with one raw sink,
    /// `tokens/{name}`, mode 0600.
    pub fn new(name: &str, env: &Env, database: &str, refresh: &str) -> Host {
        let dir = if Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("tokend-fleet")
                .tempdir_in("/dev/shm")
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        let config = dir.path().join("config.toml");
        let tokens = dir.path().join("tokens");
        let socket = dir.path().join("tokend.sock");
        let text = format!(
            "database = \"{database}\"\nsocket = \"{}\"\n{refresh}\n{}\n\
             [[sinks]]\npath = \"{}/{{name}}\"\nformat = \"raw\"\nmode = \"0600\"\n",
            socket.display(),
            env.provider_block(),
            tokens.display()
        );
        fs::write(&config, text).unwrap();
        Host {
            name: name.to_owned(),
            config,
            tokens,
            socket,
            daemon: None,
            starts: 0,
            dir,
        }
    }

    /// `tokend -c CONFIG ARGS`, with the harness's environment cleaned.
    pub fn tokend(&self, args: &[&str]) -> Command {
        tokend_command(&self.config, self.dir.path(), args)
    }

    /// A CLI command run to completion with `stdin`; its stderr audited.
    pub fn cli(&self, args: &[&str], stdin: &str) -> Output {
        run_cli(self.tokend(args), stdin)
    }

    /// Starts `tokend run` under its own host name, logging at `info` (a
    /// thousand credentials at `debug` would write gigabytes in ten
    /// minutes) to `NAME-N.log` in its directory.
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "{} runs already", self.name);
        let log = self
            .dir
            .path()
            .join(format!("{}-{}.log", self.name, self.starts));
        self.starts += 1;
        let mut cmd = self.tokend(&["run"]);
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        if can_name_hosts() {
            let host = CString::new(self.name.clone()).unwrap();
            // SAFETY: between fork and exec only async-signal-safe calls
            // (unshare, sethostname) on memory allocated before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::unshare(libc::CLONE_NEWUTS) != 0
                        || libc::sethostname(host.as_ptr(), host.as_bytes().len()) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap();
        self.daemon = Some(Daemon {
            child,
            log,
            config: self.config.clone(),
            audit: true,
        });
    }

    pub fn running(&self) -> bool {
        self.daemon.is_some()
    }

    /// SIGKILL, reaped; the dead daemon's log and status are audited.
    pub fn kill9(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill9();
        }
    }

    /// The token this host's sink holds for credential `name`.
    pub fn read_token(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.tokens.join(name)).ok()
    }

    /// How many of `names` have a file in this host's sink.
    pub fn published(&self, names: &[String]) -> usize {
        names
            .iter()
            .filter(|n| self.tokens.join(n).exists())
            .count()
    }

    /// Every log its daemons wrote, oldest first.
    pub fn logs(&self) -> String {
        (0..self.starts)
            .map(|n| {
                fs::read_to_string(self.dir.path().join(format!("{}-{n}.log", self.name)))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The lease holder ids of this host's daemons start with this.
    pub fn holder_prefix(&self) -> String {
        format!("{}/", self.name)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The daemon's own Drop audits its log, argv, metrics and statuses.
        drop(self.daemon.take());
        if std::thread::panicking() {
            // The logs outlive a failed test, for its report.
            let keep = std::env::temp_dir()
                .join(format!("tokend-fleet-failed-{}", std::process::id()))
                .join(&self.name);
            if fs::create_dir_all(&keep).is_ok() {
                for n in 0..self.starts {
                    let log = format!("{}-{n}.log", self.name);
                    let _ = fs::copy(self.dir.path().join(&log), keep.join(&log));
                }
                eprintln!("{}'s logs are kept in {}", self.name, keep.display());
            }
            return;
        }
        // Nothing but the sink and the config may hold a secret.
        for path in walk(self.dir.path()) {
            if path.starts_with(&self.tokens) || path == self.config {
                continue;
            }
            let Ok(bytes) = fs::read(&path) else { continue };
            assert_no_secrets(
                &String::from_utf8_lossy(&bytes),
                &path.display().to_string(),
            );
        }
    }
}
