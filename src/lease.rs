//! Who holds a store lease, and whether that holder still runs.
//!
//! A lease has an expiry so that a crashed holder cannot block a credential
//! forever; but waiting out the expiry after a crash and an immediate
//! restart would delay the first refresh needlessly. A holder id names the
//! host, the pid and the process's start time, so a holder on this host can
//! be seen to be gone (pid absent, or reused by a younger process) at once.
//!
//! A pid means something only in its pid namespace and its boot, and a
//! host name is not unique: two containers on one machine with the host's
//! network share its name (`docker run --network host`, Kubernetes'
//! `hostNetwork`), and so may two machines given one name. Judged by our
//! own pids, the other's live holder would look gone, its lease would be
//! taken while its request is at the provider, and the refresh token sent
//! twice. So the id also names the place its pid means something in: the
//! boot (as the moment it began) and the pid namespace. A holder from
//! another place is left to its lease's expiry.

use std::sync::OnceLock;

/// This process's holder id: `host/pid/starttime/place`.
pub fn holder_id() -> String {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let pid = std::process::id();
        format!(
            "{}/{pid}/{}/{}",
            hostname(),
            start_time(pid).unwrap_or_default(),
            this_place().map_or_else(|| "?".to_owned(), |p| p.to_string())
        )
    })
    .clone()
}

/// Whether the holder may still be running. Holders on other hosts, boots
/// or pid namespaces, and ids we cannot read, are presumed alive: only the
/// lease's expiry frees them.
pub fn holder_alive(holder: &str) -> bool {
    let mut parts = holder.rsplitn(4, '/');
    let (Some(place), Some(start), Some(pid), Some(host)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return true;
    };
    if host != hostname() {
        return true;
    }
    match (Place::parse(place), this_place()) {
        (Some(theirs), Some(ours)) if theirs.same_as(ours) => {}
        _ => return true,
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

/// Where a pid means what it says: the boot and the pid namespace.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Place {
    /// When the machine booted, in seconds since the epoch: the wall clock
    /// less the time since boot. The wall clock may be stepped between two
    /// readings, so two readings of one boot are taken as the same within
    /// [`BOOT_SLACK`]; two machines of one name booted that close together
    /// would be taken for one.
    boot: i64,
    /// The inode of /proc/self/ns/pid, which names the namespace while it
    /// exists. /proc/sys (the kernel's boot id) is out of reach under the
    /// unit's ProcSubset=pid; /proc/self is not.
    pid_ns: u64,
}

/// How far apart two readings of one boot's start may be.
const BOOT_SLACK: i64 = 2;

impl Place {
    fn parse(s: &str) -> Option<Place> {
        let (boot, ns) = s.split_once(':')?;
        Some(Place {
            boot: boot.parse().ok()?,
            pid_ns: ns.parse().ok()?,
        })
    }

    fn same_as(self, other: Place) -> bool {
        self.pid_ns == other.pid_ns && (self.boot - other.boot).abs() <= BOOT_SLACK
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.boot, self.pid_ns)
    }
}

/// This process's place, read again on each call (the wall clock moves).
fn this_place() -> Option<Place> {
    use std::os::unix::fs::MetadataExt;
    let pid_ns = std::fs::metadata("/proc/self/ns/pid").ok()?.ino();
    let secs = |clock| {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills the timespec we own.
        (unsafe { libc::clock_gettime(clock, &mut t) } == 0).then_some(t.tv_sec)
    };
    let boot = secs(libc::CLOCK_REALTIME)? - secs(libc::CLOCK_BOOTTIME)?;
    Some(Place { boot, pid_ns })
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
        let here = this_place().unwrap();
        assert!(!holder_alive(&format!("{host}/999999999/1/{here}")));
        // Our pid with another start time: a reused pid, so the holder is gone.
        let pid = std::process::id();
        assert!(!holder_alive(&format!("{host}/{pid}/1/{here}")));
        assert!(holder_alive(&format!("other-host/1/1/{here}")));
        assert!(holder_alive("garbage"));
    }

    #[test]
    fn a_pid_of_another_boot_or_pid_namespace_is_not_judged() {
        let (host, pid) = (hostname(), std::process::id());
        let here = this_place().unwrap();
        let gone = |place: &str| !holder_alive(&format!("{host}/999999999/1/{place}"));
        assert!(gone(&here.to_string()));
        // The wall clock stepped a second between the readings: one boot.
        let stepped = Place {
            boot: here.boot + 1,
            ..here
        };
        assert!(gone(&stepped.to_string()));
        // Another boot, another pid namespace, or a place not read: the
        // holder is presumed alive, whatever our own pids say.
        let later = Place {
            boot: here.boot + 600,
            ..here
        };
        let inside = Place {
            pid_ns: here.pid_ns + 1,
            ..here
        };
        for place in [later.to_string(), inside.to_string(), "?".into()] {
            assert!(!gone(&place), "{place}");
            assert!(holder_alive(&format!("{host}/{pid}/1/{place}")), "{place}");
        }
        // An id of the older form, without a place.
        assert!(holder_alive(&format!("{host}/999999999/1")));
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
