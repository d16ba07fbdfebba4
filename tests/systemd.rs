//! README "What it does": tokend as a systemd service. The daemon runs as the unit runs
//! it (`UMask=0077`); the tests play the service manager's part.

mod support;

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use support::*;

/// The unit's `UMask=0077`, for a daemon started by a test.
fn umask_0077(cmd: &mut Command) {
    // SAFETY: umask(2) is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
}

#[test]
fn sink_directories_stay_reachable_under_umask_0077() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let mut d = Daemon::start_with(&env, "daemon", |cmd, _| umask_0077(cmd));
    wait_for("the token file", Duration::from_secs(20), || {
        env.read_token("bot")
    });
    // A consumer in the sink's group must be able to reach its file.
    assert_eq!(mode(&env.tokens), 0o755);
    assert_eq!(mode(&env.token_file("bot")), 0o600);
    assert!(d.stop().success());
}

/// The service manager's end of the notify protocol: a datagram socket the
/// daemon is pointed at, and every message received, with its arrival.
/// Arrivals are the kernel's (`SO_TIMESTAMPNS`, as time since the epoch),
/// not when this thread got round to reading: a loaded machine that keeps
/// the test from running for half a second must not look like a daemon
/// that missed a ping.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
    seen: Vec<(Duration, String)>,
}

/// Now, on the clock of the kernel's arrival stamps.
fn wall_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
}

impl Manager {
    fn new(env: &Env) -> Manager {
        let path = env.dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with an int option value.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
        Manager {
            socket,
            path,
            seen: Vec::new(),
        }
    }

    /// Starts `tokend run` as systemd would with `WatchdogSec=1s`
    /// (WATCHDOG_PID unset, as for the main process), plus `extra`.
    fn start(&self, env: &Env, extra: impl FnOnce(&mut Command)) -> Daemon {
        Daemon::start_with(env, "daemon", |cmd, _| {
            umask_0077(cmd);
            cmd.env("NOTIFY_SOCKET", &self.path)
                .env("WATCHDOG_USEC", "1000000")
                .env_remove("WATCHDOG_PID");
            extra(cmd);
        })
    }

    /// Receives what arrives within the next `window`.
    fn receive(&mut self, window: Duration) -> Vec<(Duration, String)> {
        let end = Instant::now() + window;
        let end_arrival = wall_now() + window;
        let first = self.seen.len();
        while Instant::now() < end {
            self.recv_one();
        }
        // What arrived in the window while this thread was kept from
        // reading (a daemon pinging too fast cannot keep this going).
        while self.recv_one().is_some_and(|(t, _)| t <= end_arrival) {}
        self.seen[first..].to_vec()
    }

    /// Receives until a message satisfies `pred`, and returns it.
    fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (Duration, String) {
        wait_for(what, timeout, || {
            let m = self.recv_one()?;
            pred(&m.1).then_some(m)
        })
    }

    fn recv_one(&mut self) -> Option<(Duration, String)> {
        let mut buf = [0u8; 4096];
        // Room for one control message holding a timespec, aligned.
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid; its pointers are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control) as _;
        // SAFETY: recvmsg into buffers that outlive the call.
        let n = unsafe { libc::recvmsg(self.socket.as_raw_fd(), &raw mut msg, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                return None;
            }
            panic!("notify socket: {e}");
        }
        let mut arrived = None;
        // SAFETY: the CMSG macros walk the control buffer recvmsg filled.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    arrived = Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        let arrived = arrived.expect("SO_TIMESTAMPNS gave no arrival time");
        let m = (
            arrived,
            String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
        );
        self.seen.push(m.clone());
        Some(m)
    }
}

/// The value of `KEY=` in a notify message.
fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// CLOCK_MONOTONIC in microseconds, as systemd reads MONOTONIC_USEC=.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The gaps between WATCHDOG=1 pings among `messages`, in ms.
fn watchdog_gaps(messages: &[(Duration, String)]) -> Vec<u128> {
    let pings: Vec<Duration> = messages
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    pings
        .windows(2)
        // A step back of the real-time clock shows as no gap at all.
        .map(|w| w[1].saturating_sub(w[0]).as_millis())
        .collect()
}

/// Several pings in `messages`, about every half second (WATCHDOG_USEC/2),
/// never a full second apart (systemd's timeout: the contract itself).
/// The mean has a generous margin either side of 500 ms, for a loaded
/// machine: it still tells half of WATCHDOG_USEC from a ping per second
/// (which the gaps catch) or a ping loop several times too fast.
fn assert_watchdog_cadence(messages: &[(Duration, String)], what: &str) {
    let gaps = watchdog_gaps(messages);
    assert!(gaps.len() >= 4, "{what}: too few WATCHDOG=1: {gaps:?}");
    assert!(
        gaps.iter().all(|&g| g < 1000),
        "{what}: a gap of a whole WATCHDOG_USEC: {gaps:?}"
    );
    let mean = gaps.iter().sum::<u128>() / gaps.len() as u128;
    assert!(
        (250..=900).contains(&mean),
        "{what}: WATCHDOG=1 every {mean} ms on average, not about 500: {gaps:?}"
    );
}

#[test]
fn without_notify_socket_nothing_is_sent_and_nothing_fails() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let mut d = Daemon::start_with(&env, "daemon", |cmd, _| {
        cmd.env("WATCHDOG_USEC", "1000000");
    });
    d.wait_log("tokend running", Duration::from_secs(20));
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded", Duration::from_secs(20));
    assert!(d.stop().success());
    let log = d.log();
    assert!(!log.contains("watchdog"), "{log}");
    assert!(!log.contains("notify"), "{log}");
}

#[test]
fn readiness_status_watchdog_reload_and_stop_reach_systemd() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let mut manager = Manager::new(&env);
    let mut d = manager.start(&env, |_| {});

    // READY=1 comes after the first publish, with a status line.
    let (_, ready) = manager.expect("READY=1", Duration::from_secs(20), |m| {
        m.lines().any(|l| l == "READY=1")
    });
    assert!(
        env.read_token("bot").is_some(),
        "READY=1 before the first publish"
    );
    assert_eq!(
        field(&ready, "STATUS"),
        Some("1 valid, 0 retrying, 0 need re-authorization"),
        "{ready:?}"
    );

    let window = manager.receive(Duration::from_millis(3200));
    assert_watchdog_cadence(&window, "a healthy daemon");
    d.wait_log("pinging the systemd watchdog", Duration::from_secs(5));
    assert!(
        window.iter().all(|(_, m)| field(m, "STATUS").is_none()),
        "STATUS= sent though nothing changed: {window:?}"
    );

    // A state change updates the status line: a second credential, imported
    // while the daemon runs, whose grant is dead.
    env.provider.update_knobs(|k| {
        k.fault = Some(Fault::InvalidGrant);
        k.fault_on = FaultTarget::Token;
    });
    env.import("dead", false);
    manager.expect("the new STATUS=", Duration::from_secs(20), |m| {
        field(m, "STATUS") == Some("1 valid, 0 retrying, 1 need re-authorization")
    });

    // SIGHUP: RELOADING=1 with the monotonic time, then READY=1, whether
    // the new file is taken ...
    let good = std::fs::read_to_string(&env.config_path).unwrap();
    for (case, config) in [
        ("a good file", good.clone()),
        ("a bad file", "[not toml".into()),
    ] {
        std::fs::write(&env.config_path, config).unwrap();
        let before = monotonic_usec();
        d.signal(libc::SIGHUP);
        let (_, reloading) = manager.expect(
            &format!("RELOADING=1 for {case}"),
            Duration::from_secs(20),
            |m| m.lines().any(|l| l == "RELOADING=1"),
        );
        let after = monotonic_usec();
        let stamp: u64 = field(&reloading, "MONOTONIC_USEC")
            .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"))
            .parse()
            .unwrap();
        assert!(
            (before..=after).contains(&stamp),
            "{case}: MONOTONIC_USEC={stamp} outside [{before}, {after}]"
        );
        manager.expect(
            &format!("READY=1 after the reload of {case}"),
            Duration::from_secs(20),
            |m| m.lines().any(|l| l == "READY=1"),
        );
    }
    d.wait_log("configuration rejected", Duration::from_secs(5));

    d.signal(libc::SIGTERM);
    manager.expect("STOPPING=1", Duration::from_secs(20), |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    assert!(d.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn a_provider_that_never_answers_does_not_stop_the_watchdog() {
    let env = Env::new(Knobs {
        fault: Some(Fault::Hang),
        ..Knobs::default()
    });
    // No access token: the daemon refreshes at once, and the request hangs
    // until request_timeout (3 s), then again after a backoff.
    env.import("bot", false);
    let mut manager = Manager::new(&env);
    let mut d = manager.start(&env, |_| {});
    manager.expect("READY=1", Duration::from_secs(20), |m| {
        m.lines().any(|l| l == "READY=1")
    });
    wait_for("a hanging refresh", Duration::from_secs(20), || {
        (env.provider.stats().refresh_requests > 0).then_some(())
    });
    let window = manager.receive(Duration::from_millis(3200));
    assert_watchdog_cadence(&window, "while the provider hangs");
    assert!(d.stop().success());
}

#[test]
fn a_stalled_scheduler_stops_the_watchdog() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let mut manager = Manager::new(&env);
    let mut d = manager.start(&env, |cmd| {
        cmd.env("TOKEND_TEST_STALL_SCHEDULER", "2");
    });
    manager.expect("READY=1", Duration::from_secs(20), |m| {
        m.lines().any(|l| l == "READY=1")
    });
    manager.expect("a first WATCHDOG=1", Duration::from_secs(5), |m| {
        m.lines().any(|l| l == "WATCHDOG=1")
    });
    d.wait_log("the scheduler stalls now", Duration::from_secs(20));
    // A ping answered just before the stall may still go out; none after.
    let stalled = wall_now();
    let window = manager.receive(Duration::from_millis(3000));
    let late: Vec<u128> = window
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| t.saturating_sub(stalled).as_millis())
        .filter(|&ms| ms > 400)
        .collect();
    assert!(
        late.is_empty(),
        "WATCHDOG=1 went on after the scheduler stalled, at {late:?} ms"
    );
    d.wait_log("does not answer", Duration::from_secs(5));
    // systemd would kill it now; without systemd, SIGTERM still stops it.
    assert!(d.stop().success());
}

/// `DEV:INODE` of a file, as systemd puts it in JOURNAL_STREAM.
fn journal_stream(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap();
    format!("{}:{}", meta.dev(), meta.ino())
}

/// Whether a log line carries a timestamp of ours (RFC 3339, as
/// tracing-subscriber writes it).
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.windows(11).any(|w| {
        w[..4].iter().all(u8::is_ascii_digit)
            && w[4] == b'-'
            && w[5..7].iter().all(u8::is_ascii_digit)
            && w[7] == b'-'
            && w[8..10].iter().all(u8::is_ascii_digit)
            && w[10] == b'T'
    })
}

/// Runs a daemon through a start, a reload that warns (a new database path
/// waits for a restart), a refused reload and a stop: a line at every level.
fn a_day_in_the_log(env: &Env, configure: impl FnOnce(&mut Command, &Path)) -> String {
    let good = std::fs::read_to_string(&env.config_path).unwrap();
    let mut d = Daemon::start_with(env, "daemon", configure);
    d.wait_log("tokend running", Duration::from_secs(20));
    let moved = good.replace("state/tokend.db", "elsewhere/tokend.db");
    std::fs::write(&env.config_path, moved).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded", Duration::from_secs(20));
    std::fs::write(&env.config_path, "[not toml").unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration rejected", Duration::from_secs(20));
    std::fs::write(&env.config_path, good).unwrap();
    assert!(d.stop().success());
    d.log()
}

#[test]
fn under_journald_lines_carry_a_priority_and_no_timestamp() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let log = a_day_in_the_log(&env, |cmd, log| {
        cmd.env("JOURNAL_STREAM", journal_stream(log));
    });
    for line in log.lines() {
        let priority = line.get(..3).unwrap_or(line);
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].contains(&priority),
            "no priority prefix: {line:?}"
        );
        assert!(!has_timestamp(line), "a timestamp of our own: {line:?}");
        assert!(
            !line[3..].starts_with(char::is_whitespace),
            "padding after the priority: {line:?}"
        );
    }
    for (priority, text) in [
        ("<6>", "tokend running"),
        ("<7>", "token validated"),
        ("<4>", "takes effect only after a restart"),
        ("<3>", "configuration rejected"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.starts_with(priority) && l.contains(text)),
            "no {priority} line with {text:?} in:\n{log}"
        );
    }

    // A fatal error reaches the journal at error priority too.
    std::fs::write(&env.config_path, "[not toml").unwrap();
    let err = env.dir.path().join("fatal.log");
    let file = std::fs::File::create(&err).unwrap();
    let status = env
        .tokend(&["run"])
        .env("JOURNAL_STREAM", journal_stream(&err))
        .stdin(Stdio::null())
        .stderr(file)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let fatal = std::fs::read_to_string(&err).unwrap();
    assert!(
        !fatal.is_empty() && fatal.lines().all(|l| l.starts_with("<3>")),
        "{fatal}"
    );
}

#[test]
fn a_journal_stream_that_is_not_stderr_leaves_text_logs() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let other = env.dir.path().join("not-stderr");
    std::fs::write(&other, "").unwrap();
    let mut d = Daemon::start_with(&env, "daemon", |cmd, _| {
        // Inherited from a parent whose stderr was the journal; ours is not.
        cmd.env("JOURNAL_STREAM", journal_stream(&other));
    });
    d.wait_log("tokend running", Duration::from_secs(20));
    assert!(d.stop().success());
    let log = d.log();
    assert!(log.lines().all(has_timestamp), "{log}");
    assert!(!log.contains("<6>"), "{log}");
}

#[test]
fn with_log_format_json_every_line_is_json() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    // An explicit format beats the journal's.
    let log = a_day_in_the_log(&env, |cmd, log| {
        cmd.args(["--log-format", "json"])
            .env("JOURNAL_STREAM", journal_stream(log));
    });
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(lines.len() > 5, "{log}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
    }
    for (level, text) in [
        ("INFO", "tokend running"),
        ("WARN", "takes effect only after a restart"),
        ("ERROR", "configuration rejected"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l["level"] == level && l["message"].as_str().unwrap_or("").contains(text)),
            "no {level} {text:?} in:\n{log}"
        );
    }
}
