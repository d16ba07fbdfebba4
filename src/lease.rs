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
    match start_time(pid) {
        Some(s) => s.to_string() == start,
        // The unit's ProtectProc=invisible hides other users' processes in
        // /proc (a `tokend run` started by root by mistake): only a pid
        // that does not exist at all is known to be gone.
        None => pid_exists(pid),
    }
}

/// Whether any process has this pid, ours to see in /proc or not.
pub fn pid_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing; it only checks that the pid exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The host name from uname(2): /proc/sys is out of reach under the unit's
/// ProcSubset=pid, and a fallback name shared by every host would let one
/// host judge another's pids.
fn hostname() -> String {
    // SAFETY: uname fills the utsname we own; nodename is NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "localhost".into();
        }
        std::ffi::CStr::from_ptr(u.nodename.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
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

    #[test]
    fn pids_exist_whether_or_not_proc_shows_them() {
        assert!(pid_exists(std::process::id()));
        assert!(pid_exists(1));
        assert!(!pid_exists(999_999_999));
        assert!(!pid_exists(u32::MAX));
    }

    #[test]
    fn the_host_name_is_the_kernel_s() {
        let proc = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(hostname(), proc.trim());
    }
}
