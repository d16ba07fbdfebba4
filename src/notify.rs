//! tokend's side of systemd's notify protocol (sd_notify(3)): READY, STATUS,
//! RELOADING, STOPPING and the watchdog, as datagrams to `$NOTIFY_SOCKET`.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd, or `Type=simple`)
//! nothing is sent, nothing fails, and no task runs.
//!
//! The protocol is a few lines, written here rather than taken from the
//! `sd-notify` crate: that crate connects to `@name` addresses as if they
//! were file paths (systemd documents `@` for the abstract namespace, which
//! some container managers use), and opens a new socket for every message,
//! every 15 s for the watchdog; here one socket is opened at start.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::refresher::Refresher;
use crate::store::State;

/// How long the status line waits after a state change for more: the
/// validation sweep or a mass refresh changes thousands of states in a
/// burst, and costs one STATUS= message, not thousands.
const STATUS_DEBOUNCE: Duration = Duration::from_secs(1);

/// How often the status line looks for the start or end of a database
/// outage, which no credential's state change announces.
const OUTAGE_CHECK: Duration = Duration::from_secs(5);

/// The service manager, if there is one to tell.
#[derive(Default)]
pub struct Systemd {
    socket: Option<Arc<Socket>>,
}

/// The notify socket: one unbound datagram socket and the manager's address.
struct Socket {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Systemd {
    /// The manager named by `$NOTIFY_SOCKET`; without it (or with an address
    /// that cannot be used, which is logged) every method does nothing.
    pub fn from_env() -> Systemd {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
            return Systemd::default();
        };
        match Socket::new(&path) {
            Ok(s) => Systemd {
                socket: Some(Arc::new(s)),
            },
            Err(e) => {
                tracing::warn!(notify_socket = %path.to_string_lossy(), error = %e, "cannot use NOTIFY_SOCKET; systemd will not hear from tokend");
                Systemd::default()
            }
        }
    }

    /// Start-up is done: READY=1 with the first status line. Then keeps the
    /// status line current and, when systemd asks for it (`WatchdogSec=`),
    /// pings the watchdog for as long as the refresher's scheduler answers.
    /// The caller aborts the tasks returned when shutdown begins (systemd
    /// stops watching once STOPPING=1 is sent).
    pub fn ready(&self, refresher: &Arc<Refresher>) -> Vec<JoinHandle<()>> {
        let Some(socket) = &self.socket else {
            return Vec::new();
        };
        // Subscribed before the first count, so no change falls in between.
        let changes = refresher.state_changes();
        let status = status_line(&refresher.summary(), refresher.degraded());
        socket.send(&format!("READY=1\nSTATUS={status}"));
        let mut tasks = vec![tokio::spawn(keep_status(
            socket.clone(),
            refresher.clone(),
            changes,
            status,
        ))];
        let period = watchdog_period(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        if let Some(period) = period {
            tracing::debug!(period = ?period, "pinging the systemd watchdog");
            tasks.push(tokio::spawn(watchdog(
                socket.clone(),
                refresher.clone(),
                period,
            )));
        }
        tasks
    }

    /// SIGHUP arrived: RELOADING=1, with the time systemd needs to tell this
    /// reload from an earlier one.
    pub fn reloading(&self) {
        if let Some(s) = &self.socket {
            s.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        }
    }

    /// The reload is over, whether the new file was taken or refused.
    pub fn reloaded(&self) {
        if let Some(s) = &self.socket {
            s.send("READY=1");
        }
    }

    /// SIGTERM or SIGINT arrived: shutdown has begun.
    pub fn stopping(&self) {
        if let Some(s) = &self.socket {
            s.send("STOPPING=1");
        }
    }
}

impl Socket {
    fn new(path: &OsStr) -> io::Result<Socket> {
        let addr = match path.as_bytes().strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(path)?,
        };
        let socket = UnixDatagram::unbound()?;
        // A manager that does not read must not stall the daemon: a message
        // that does not fit is dropped (and logged).
        socket.set_nonblocking(true)?;
        Ok(Socket { socket, addr })
    }

    fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            let first = message.lines().next().unwrap_or_default();
            tracing::warn!(message = first, error = %e, "cannot notify systemd");
        }
    }
}

/// Sends STATUS= when the counts per state change.
async fn keep_status(
    socket: Arc<Socket>,
    refresher: Arc<Refresher>,
    mut changes: watch::Receiver<()>,
    mut last: String,
) {
    // An outage of the database starts and ends with no state changing:
    // look for one this often as well.
    let mut outage = tokio::time::interval(OUTAGE_CHECK);
    outage.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                tokio::time::sleep(STATUS_DEBOUNCE).await;
                changes.borrow_and_update();
            }
            _ = outage.tick() => {}
        }
        let line = status_line(&refresher.summary(), refresher.degraded());
        if line != last {
            socket.send(&format!("STATUS={line}"));
            last = line;
        }
    }
}

/// Sends WATCHDOG=1 every `period`, but only after a round trip through the
/// refresher's scheduler: a wedged scheduler serves no deadline, so systemd
/// must see the pings stop and restart us. (A provider that never answers
/// is not a wedge: requests are bounded by `request_timeout` and run on
/// workers, not on the scheduler.)
async fn watchdog(socket: Arc<Socket>, refresher: Arc<Refresher>, period: Duration) {
    // Pings go out at most period + patience = 3/4 of WATCHDOG_USEC apart.
    let patience = period / 2;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wedged = false;
    loop {
        tick.tick().await;
        if refresher.scheduler_alive(patience).await {
            socket.send("WATCHDOG=1");
            if wedged {
                tracing::warn!("the refresh scheduler answers again; watchdog pings resumed");
                wedged = false;
            }
        } else if !wedged {
            tracing::error!(
                patience = ?patience,
                "the refresh scheduler does not answer; withholding the watchdog ping so that systemd restarts tokend"
            );
            wedged = true;
        }
    }
}

/// How often to ping: half of `WATCHDOG_USEC` (sd_watchdog_enabled(3)
/// recommends it), if the watchdog is ours: `WATCHDOG_PID` unset or our pid.
fn watchdog_period(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    if pid.is_some_and(|p| p.parse() != Ok(me)) {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

/// The STATUS= line: "12 valid, 1 retrying, 0 need re-authorization", then
/// the rarer states only when there are some; after `degraded`, if the
/// database is out of reach.
fn status_line(counts: &HashMap<State, usize>, degraded: Option<String>) -> String {
    let n = |s| counts.get(&s).copied().unwrap_or(0);
    let mut line = degraded.map(|d| d + "; ").unwrap_or_default();
    line += &format!(
        "{} valid, {} retrying, {} need re-authorization",
        n(State::Valid),
        n(State::Retrying),
        n(State::NeedsReauthorization)
    );
    for (state, what) in [
        (State::Misconfigured, "misconfigured"),
        (State::Refreshing, "refreshing"),
    ] {
        if n(state) > 0 {
            line.push_str(&format!(", {} {what}", n(state)));
        }
    }
    line
}

/// CLOCK_MONOTONIC in microseconds, the clock of `MONOTONIC_USEC=`.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_at_half_its_timeout_and_only_if_ours() {
        let p = |usec, pid| watchdog_period(usec, pid, 42);
        assert_eq!(p(Some("30000000"), None), Some(Duration::from_secs(15)));
        assert_eq!(
            p(Some("1000000"), Some("42")),
            Some(Duration::from_millis(500))
        );
        assert_eq!(p(Some("1000000"), Some("7")), None);
        assert_eq!(p(Some("0"), None), None);
        assert_eq!(p(Some("soon"), None), None);
        assert_eq!(p(None, Some("42")), None);
    }

    #[test]
    fn the_status_line_names_rare_states_only_when_present() {
        let mut counts = HashMap::from([(State::Valid, 12), (State::Retrying, 1)]);
        assert_eq!(
            status_line(&counts, None),
            "12 valid, 1 retrying, 0 need re-authorization"
        );
        counts.insert(State::Misconfigured, 2);
        assert_eq!(
            status_line(&counts, None),
            "12 valid, 1 retrying, 0 need re-authorization, 2 misconfigured"
        );
        assert_eq!(
            status_line(&HashMap::new(), None),
            "0 valid, 0 retrying, 0 need re-authorization"
        );
        assert_eq!(
            status_line(&HashMap::new(), Some("degraded: no database".into())),
            "degraded: no database; 0 valid, 0 retrying, 0 need re-authorization"
        );
    }

    #[test]
    fn messages_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        Socket::new(path.as_os_str()).unwrap().send("READY=1");
        let mut buf = [0; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("tokend-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        Socket::new(OsStr::new(&format!("@{name}")))
            .unwrap()
            .send("STOPPING=1");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
