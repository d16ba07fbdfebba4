//! Who is on the other end of a socket connection: SO_PEERCRED's uid and
//! gid, plus that uid's supplementary groups (looked up in src/users.rs),
//! for the `[[access]]` rules.

use std::io;

use tokio::net::UnixStream;

use crate::users::supplementary_groups;

/// The caller of a socket request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    gid: u32,
    /// Primary gid and the uid's supplementary groups, looked up only when
    /// an access rule needs them (root and our own user never do): reading
    /// the user database per connection would cost more than the request.
    groups: std::sync::OnceLock<Vec<u32>>,
}

impl Caller {
    pub fn of(stream: &UnixStream) -> io::Result<Caller> {
        let cred = stream.peer_cred()?;
        Ok(Caller::new(cred.uid(), cred.gid()))
    }

    /// A caller with this uid and primary gid; groups are looked up later.
    pub fn new(uid: u32, gid: u32) -> Caller {
        Caller {
            uid,
            gid,
            groups: std::sync::OnceLock::new(),
        }
    }

    pub fn groups(&self) -> &[u32] {
        self.groups.get_or_init(|| {
            let mut groups = vec![self.gid];
            groups.extend(supplementary_groups(self.uid, self.gid));
            groups.sort_unstable();
            groups.dedup();
            groups
        })
    }
}

pub fn own_uid() -> u32 {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}
