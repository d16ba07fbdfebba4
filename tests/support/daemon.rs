//! [`Daemon`]: a `tokend run` of the test's config, its log in the test's
//! directory, audited when dropped.

use super::*;

pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    /// The config it runs with: the audit on drop asks its socket.
    pub config: PathBuf,
    /// Whether dropping it runs the secrets audit (its [`Env`]'s `audit`).
    pub audit: bool,
}

impl Daemon {
    pub fn start(env: &Env, label: &str) -> Daemon {
        Daemon::start_with(env, label, |_, _| {})
    }

    /// Like `start`, with `configure` given the command and the log file
    /// (created, empty) before the spawn: more arguments, environment (a
    /// bench sets `RUST_LOG` and sends stderr to the terminal).
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
            audit: env.audit,
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
            audit: true,
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

    /// SIGSTOP, and waits until the kernel has stopped it: a signal is
    /// delivered after kill(2) returns, and a daemon that ran on for a
    /// moment may have taken a lock it would then hold while stopped.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
        let stat = format!("/proc/{}/stat", self.pid());
        wait_for("the daemon to stop", Duration::from_secs(10), || {
            let s = fs::read_to_string(&stat).ok()?;
            s.rsplit(')')
                .next()?
                .trim_start()
                .starts_with('T')
                .then_some(())
        });
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let audit = self.audit && !std::thread::panicking();
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
pub fn children(pid: i32) -> Vec<i32> {
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
