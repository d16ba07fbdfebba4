//! The user database: users, groups, and the groups a user is in, as the
//! config (`socket_group`, sinks' `group`, `[[access]]` groups), the socket
//! (a caller's groups) and `check-config` (the service user) look them up.
//! One module, so every lookup goes through the reentrant calls and grows
//! its buffer on ERANGE the same way (LDAP groups of thousands of members).

use std::ffi::{CStr, CString};
use std::io;

/// The buffer a reentrant user-database lookup starts with, and the most it
/// grows to: a group of a few thousand members (an LDAP group) needs more
/// than the first, and nothing sane needs more than the last.
const LOOKUP_BUFFER: usize = 16 * 1024;
const LOOKUP_BUFFER_MAX: usize = 1 << 20;

/// Runs a reentrant user-database lookup (`getgrnam_r`, `getpwnam_r`,
/// `getpwuid_r`) with a buffer that doubles, from 16 KiB up to 1 MiB, while
/// the call answers ERANGE (too small). `call` is given the buffer and
/// returns the function's result code and, when that is 0, what it found
/// (None: no such entry), copied out of the buffer.
fn lookup_r<T>(
    mut call: impl FnMut(&mut [u8]) -> (libc::c_int, Option<T>),
) -> io::Result<Option<T>> {
    let mut len = LOOKUP_BUFFER;
    loop {
        let mut buf = vec![0u8; len];
        match call(&mut buf) {
            (0, found) => return Ok(found),
            (libc::ERANGE, _) if len < LOOKUP_BUFFER_MAX => len = (len * 2).min(LOOKUP_BUFFER_MAX),
            (libc::ERANGE, _) => {
                return Err(io::Error::other(format!(
                    "its entry is larger than {} KiB",
                    LOOKUP_BUFFER_MAX / 1024
                )));
            }
            // What some libcs answer for "no such entry" (getpwnam(3), NOTES).
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (rc, _) => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

/// The gid of the group named `name`; None if there is none.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    let Ok(c_name) = CString::new(name) else {
        return Ok(None);
    };
    lookup_r(|buf| {
        // SAFETY: getgrnam_r writes only into `grp`, `buf` (whose length we
        // pass) and `result`, all of which outlive the call; the gid is
        // copied out before `buf` goes.
        unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let mut result: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(
                c_name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            );
            (rc, (!result.is_null()).then_some(grp.gr_gid))
        }
    })
}

/// An entry of the user database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: CString,
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
}

impl User {
    /// The user named `name`; None if there is none.
    pub fn named(name: &str) -> io::Result<Option<User>> {
        let Ok(c_name) = CString::new(name) else {
            return Ok(None);
        };
        lookup_r(|buf| {
            // SAFETY: getpwnam_r writes only into `pw`, `buf` (whose length
            // we pass) and `result`, all of which outlive the call; what we
            // keep is copied out before `buf` goes.
            unsafe {
                let mut pw: libc::passwd = std::mem::zeroed();
                let mut result: *mut libc::passwd = std::ptr::null_mut();
                let rc = libc::getpwnam_r(
                    c_name.as_ptr(),
                    &mut pw,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut result,
                );
                (rc, (!result.is_null()).then(|| User::of(&pw)))
            }
        })
    }

    /// The user with this uid; None if there is none.
    pub fn with_uid(uid: u32) -> io::Result<Option<User>> {
        lookup_r(|buf| {
            // SAFETY: as in `named`, with getpwuid_r.
            unsafe {
                let mut pw: libc::passwd = std::mem::zeroed();
                let mut result: *mut libc::passwd = std::ptr::null_mut();
                let rc = libc::getpwuid_r(
                    uid,
                    &mut pw,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut result,
                );
                (rc, (!result.is_null()).then(|| User::of(&pw)))
            }
        })
    }

    /// # Safety
    /// `pw` must be a passwd entry that a successful lookup filled in.
    unsafe fn of(pw: &libc::passwd) -> User {
        User {
            // SAFETY: the lookup left a NUL-terminated name in its buffer.
            name: unsafe { CStr::from_ptr(pw.pw_name) }.to_owned(),
            uid: pw.pw_uid,
            gid: pw.pw_gid,
        }
    }

    /// The name, for messages.
    pub fn display_name(&self) -> String {
        self.name.to_string_lossy().into_owned()
    }

    /// The groups the user database gives this user with `gid` as its
    /// primary group (getgrouplist): `gid` itself and every group that lists
    /// the user, sorted. Empty if they cannot be read.
    pub fn groups(&self, gid: u32) -> Vec<u32> {
        let mut n: libc::c_int = 64;
        loop {
            let mut groups = vec![0 as libc::gid_t; n as usize];
            let want = n;
            // SAFETY: getgrouplist writes at most `n` gids into `groups`,
            // and the needed count into `n`.
            if unsafe { libc::getgrouplist(self.name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) }
                >= 0
            {
                groups.truncate(n as usize);
                groups.sort_unstable();
                groups.dedup();
                return groups;
            }
            if n <= want {
                n = want * 2;
            }
            if n > 65_536 {
                return Vec::new();
            }
        }
    }
}

/// The groups the user database gives `uid` (getgrouplist), or none if the
/// uid has no passwd entry (or it cannot be read).
pub fn supplementary_groups(uid: u32, gid: u32) -> Vec<u32> {
    match User::with_uid(uid) {
        Ok(Some(user)) => user.groups(gid),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10: a group of thousands of members (LDAP) does not fit in
    /// getgrnam_r's first buffer; the lookup grows it instead of reporting
    /// "no group".
    #[test]
    fn lookups_grow_their_buffer_while_the_libc_says_erange() {
        let mut sizes = Vec::new();
        let found = lookup_r(|buf| {
            sizes.push(buf.len());
            if buf.len() < 100_000 {
                (libc::ERANGE, None)
            } else {
                (0, Some(buf.len()))
            }
        });
        assert_eq!(found.unwrap(), Some(128 << 10));
        assert_eq!(sizes, [16 << 10, 32 << 10, 64 << 10, 128 << 10]);

        // Bounded: at most 1 MiB, then an error that says why.
        sizes.clear();
        let e = lookup_r(|buf| {
            sizes.push(buf.len());
            (libc::ERANGE, None::<()>)
        })
        .unwrap_err();
        assert_eq!(sizes.len(), 7, "{sizes:?}");
        assert_eq!(sizes.last(), Some(&(1 << 20)));
        assert!(e.to_string().contains("larger than 1024 KiB"), "{e}");

        // No such entry, however the libc says it; and other errors.
        for rc in [0, libc::ENOENT, libc::ESRCH, libc::EBADF, libc::EPERM] {
            assert!(matches!(lookup_r(|_| (rc, None::<()>)), Ok(None)), "{rc}");
        }
        let e = lookup_r(|_| (libc::EIO, None::<()>)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn users_and_groups_of_this_system() {
        let root = User::named("root").unwrap().expect("a root user");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(User::with_uid(0).unwrap(), Some(root.clone()));
        assert!(root.groups(0).contains(&0));
        assert_eq!(supplementary_groups(0, 0), root.groups(0));
        assert_eq!(User::named("no-such-user-tokend").unwrap(), None);
        assert_eq!(User::named("a\0b").unwrap(), None);
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-tokend").unwrap(), None);
        assert_eq!(group_id("a\0b").unwrap(), None);
    }
}
