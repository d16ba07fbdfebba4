//! Who holds a store lease, and whether that holder still runs.
//!
//! A lease has an expiry so that a crashed holder cannot block a credential
//! forever; but waiting out the expiry after a crash and an immediate
//! restart would delay the first refresh needlessly. A holder id names the
//! host, the pid and the process's start time, so a holder on this host can
//! be seen to be gone (pid absent, or reused by a younger process) at once.

use std::sync::OnceLock;

/// This process's holder id: `host/pid/starttime`.
pub fn holder_id() -> String {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let pid = std::process::id();
        format!(
            "{}/{pid}/{}",
            hostname(),
            start_time(pid).unwrap_or_default()
        )
    })
    .clone()
}

/// Whether the holder may still be running. Holders on other hosts, and ids
/// we cannot read, are presumed alive: only the lease's expiry frees them.
pub fn holder_alive(holder: &str) -> bool {
    let mut parts = holder.rsplitn(3, '/');
    let (Some(start), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
        return true;
    };
    if host != hostname() {
        return true;
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return true;
    };
    start_time(pid).is_some_and(|s| s.to_string() == start)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Field 22 of /proc/PID/stat: the process's start time in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_pid_is_not() {
        let me = holder_id();
        assert!(holder_alive(&me));
        let host = hostname();
        assert!(!holder_alive(&format!("{host}/999999999/1")));
        // Our pid with another start time: a reused pid, so the holder is gone.
        let pid = std::process::id();
        assert!(!holder_alive(&format!("{host}/{pid}/1")));
        assert!(holder_alive("other-host/1/1"));
        assert!(holder_alive("garbage"));
    }
}
