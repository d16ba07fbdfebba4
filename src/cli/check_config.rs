//! `tokend check-config`: every problem with the config, at once.
//!
//! Paths are checked with access(2), which answers for whoever runs the
//! command. Run as root, that says little about the service: root may write
//! anywhere and chown to any group. So as root, when the service user exists
//! (`tokend`, what systemd/tokend.service runs as, or `--as-user USER`),
//! directories and groups are also checked as that user meets them: the
//! mode bits of each directory on the way against its uid and groups (ACLs
//! are not read, and messages say so), and its membership of each group
//! tokend must give a file or the socket.

use std::fs::{self, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::Exit;
use super::args::{CheckConfig, Global};
use crate::config::{self, Config, ConfigError, Problem, SinkConfig};
use crate::publish;
use crate::store::{StoreConn, StoreError};
use crate::users::User;

/// The user systemd/tokend.service runs tokend as.
const SERVICE_USER: &str = "tokend";

pub fn run(global: &Global, args: &CheckConfig) -> Result<(), Exit> {
    let user = service_user(args.as_user.as_deref())?;
    let path = global.config_path();
    let config = config::load(&path).map_err(Exit::config)?;
    let mut problems = publish::check_dirs(&config.sinks, false);
    // A PostgreSQL URL's form was checked with the config; the server is
    // not asked.
    if let Some(db) = config.database.file()
        && let Err(e) = publish::writable(db.parent().unwrap_or(db))
    {
        problems.push(Problem {
            key: "database".into(),
            message: format!("cannot create or write {}: {e}", db.display()),
        });
    }
    // What the daemon or the commands would refuse at once, found here
    // before they meet it.
    if let Some(db) = config.database.file()
        && let Ok(meta) = fs::metadata(db)
        && !meta.is_file()
    {
        problems.push(Problem {
            key: "database".into(),
            message: format!(
                "{} is {}, not a database file",
                db.display(),
                crate::socket::describe(db, &meta)
            ),
        });
    }
    // A store the daemon would refuse with this config's key, or lack of
    // one (README "Secrets at rest"). SQLite only: a PostgreSQL server is
    // not asked.
    let mut warnings = Vec::new();
    if let Some(db) = config.database.file()
        && !problems.iter().any(|p| p.key == "database")
    {
        match StoreConn::check_sealing(db, config.sealing.as_ref().map(|s| s.kek.clone())) {
            Ok(()) => {}
            Err(StoreError::Seal(why)) => problems.push(Problem {
                key: "database".into(),
                message: why,
            }),
            // Not the daemon's problem, perhaps: it may read what we cannot.
            Err(e) if unreadable(&e) => warnings.push(format!(
                "database: cannot read {} to check its sealing: {e}",
                db.display()
            )),
            // Not a database, or a damaged one: the daemon refuses it too.
            Err(e) => problems.push(Problem {
                key: "database".into(),
                message: format!("{} is not a usable database: {e}", db.display()),
            }),
        }
    }
    let socket = &config.socket.path;
    if let Ok(meta) = fs::symlink_metadata(socket)
        && !meta.file_type().is_socket()
    {
        problems.push(Problem {
            key: "socket".into(),
            message: format!(
                "{} is {}, not a socket; tokend replaces only a stale socket and leaves \
                 anything else alone: set `socket` to another path",
                socket.display(),
                crate::socket::describe(socket, &meta)
            ),
        });
    }
    if let Some(user) = &user {
        let found = user.check(&config, &problems);
        problems.extend(found);
    }
    if let Some(db) = config.database.file() {
        warnings.extend(open_to_others(db));
    }
    for w in warnings {
        eprintln!("tokend: warning: {w}");
    }
    if !problems.is_empty() {
        return Err(Exit::config(ConfigError { path, problems }));
    }
    println!(
        "{}: ok ({} provider{}, {} sink{}, database {}{}{})",
        path.display(),
        config.providers.len(),
        if config.providers.len() == 1 { "" } else { "s" },
        config.sinks.len(),
        if config.sinks.len() == 1 { "" } else { "s" },
        config.database.display(),
        // README "Secrets at rest": the key's fingerprint, never the key.
        config
            .sealing
            .as_ref()
            .map_or("; sealing off".to_owned(), |s| format!(
                "; sealing on, key fingerprint {} from {}",
                s.kek.fingerprint(),
                s.source
            )),
        user.map_or(String::new(), |u| format!("; checked as user {}", u.name))
    );
    Ok(())
}

/// Whether reading the store failed for want of access (ours, perhaps not
/// the daemon's), not for what the store holds.
fn unreadable(e: &StoreError) -> bool {
    use rusqlite::ErrorCode::{CannotOpen, PermissionDenied};
    match e {
        StoreError::Io(..) => true,
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
            matches!(f.code, CannotOpen | PermissionDenied)
        }
        _ => false,
    }
}

/// What lets other users at a SQLite store that tokend would still use:
/// warnings, not problems. tokend makes the file 0600 in a 0700
/// directory; one made by hand, or a directory loosened later, may not be.
fn open_to_others(db: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let dir = db.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir
        && let Ok(meta) = fs::metadata(dir)
        && meta.mode() & 0o002 != 0
    {
        found.push(format!(
            "database: {} is writable by others (mode {:04o}): anyone may replace \
             the database or its journal files",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    if let Ok(meta) = fs::metadata(db)
        && meta.mode() & 0o004 != 0
    {
        found.push(format!(
            "database: {} is readable by others (mode {:04o}), and holds the \
             refresh tokens: chmod 600 it",
            db.display(),
            meta.mode() & 0o7777
        ));
    }
    found
}

/// Whom paths and groups are checked for besides ourselves: the service
/// user, when we are root and it exists (and is not root).
fn service_user(asked: Option<&str>) -> Result<Option<AsUser>, Exit> {
    // SAFETY: geteuid cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let name = asked.unwrap_or(SERVICE_USER);
    if euid != 0 {
        // access(2) answers for ourselves, exactly; for anyone else the
        // directories on the way may not even be ours to look at.
        return match asked {
            None => Ok(None),
            Some(_)
                if User::named(name)
                    .ok()
                    .flatten()
                    .is_some_and(|u| u.uid == euid) =>
            {
                Ok(None)
            }
            Some(_) => Err(Exit::usage(format!(
                "check-config --as-user needs root (as uid {euid}, it can check paths only as \
                 itself): run it as root, or as user {name:?} without --as-user"
            ))),
        };
    }
    match User::named(name) {
        Ok(Some(u)) if u.uid == 0 => Ok(None),
        Ok(Some(u)) => Ok(Some(AsUser::new(u))),
        Ok(None) if asked.is_some() => Err(Exit::usage(format!(
            "--as-user: no user {name:?} on this system"
        ))),
        Ok(None) => Ok(None),
        Err(e) if asked.is_some() => Err(Exit::usage(format!(
            "--as-user: cannot look up user {name:?}: {e}"
        ))),
        Err(e) => {
            eprintln!("tokend: cannot look up user {name:?} ({e}): paths are checked as root only");
            Ok(None)
        }
    }
}

/// Mode bits, as in each class's rwx.
const R: u32 = 0o4;
const W: u32 = 0o2;
const X: u32 = 0o1;

/// The service user, and the groups it runs with.
struct AsUser {
    name: String,
    uid: u32,
    groups: Vec<u32>,
}

impl AsUser {
    fn new(user: User) -> AsUser {
        // systemd starts the service with the user's primary group and the
        // groups the user database lists it in (initgroups).
        let mut groups = user.groups(user.gid);
        if !groups.contains(&user.gid) {
            groups.push(user.gid);
        }
        AsUser {
            name: user.display_name(),
            uid: user.uid,
            groups,
        }
    }

    /// Every problem the service user would meet, but for paths whose key
    /// `found` (the checks as ourselves) already names.
    fn check(&self, config: &Config, found: &[Problem]) -> Vec<Problem> {
        let known = |key: &str| found.iter().any(|p| p.key == key);
        let mut problems = Vec::new();
        let mut add = |key: String, message: String| problems.push(Problem { key, message });
        for s in &config.sinks {
            let key = format!("sinks[{}].path", s.index);
            if let Some(dir) = sink_dir(s).filter(|_| !known(&key))
                && let Err(e) = self.can_create_in(&dir)
            {
                add(key, e);
            }
            if let Some((name, gid)) = &s.group
                && !self.groups.contains(gid)
            {
                add(
                    format!("sinks[{}].group", s.index),
                    self.not_in(name, *gid, "its files"),
                );
            }
        }
        if let Some((name, gid)) = &config.socket.group
            && !self.groups.contains(gid)
        {
            add("socket_group".into(), self.not_in(name, *gid, "the socket"));
        }
        // The daemon reads these at start, as this user.
        let files = std::iter::once((String::new(), config.path.clone()))
            .chain(config.secret_files.iter().cloned());
        for (key, path) in files {
            if !known(&key)
                && let Err(e) = self.can_read(&path)
            {
                add(key, e);
            }
        }
        if !known("database")
            && let Some(db) = config.database.file()
        {
            let dir = db.parent().unwrap_or(Path::new("/"));
            let result = self
                .can_create_in(dir)
                .and_then(|()| match fs::metadata(db) {
                    Ok(meta) if !self.may(&meta, R | W) => Err(format!(
                        "{} cannot read and write {}: it has {}",
                        self.who(),
                        db.display(),
                        described(&meta)
                    )),
                    _ => Ok(()),
                });
            if let Err(e) = result {
                add("database".into(), e);
            }
        }
        problems
    }

    /// "user tokend (uid 998)"
    fn who(&self) -> String {
        format!("user {} (uid {})", self.name, self.uid)
    }

    fn not_in(&self, group: &str, gid: u32, what: &str) -> String {
        format!(
            "user {} is not in group {group:?} (gid {gid}), so tokend, which runs without \
             capabilities, cannot give {what} that group: add the user to it (systemd-sysusers: \
             \"m {} {group}\") or name one of its groups",
            self.name, self.name
        )
    }

    /// Whether the mode bits give this user `want` of `meta`: the owner's
    /// class if it owns the file, else the group's if it is in the group,
    /// else the others', as the kernel decides (ACLs are not read).
    fn may(&self, meta: &Metadata, want: u32) -> bool {
        let mode = meta.mode();
        let bits = if meta.uid() == self.uid {
            mode >> 6
        } else if self.groups.contains(&meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }

    /// Whether the user can read `file`: search on every directory on the
    /// way to it, as written and as symlinks resolve, then read on it.
    fn can_read(&self, file: &Path) -> Result<(), String> {
        let file = &std::path::absolute(file)
            .map_err(|e| format!("cannot resolve {}: {e}", file.display()))?;
        let resolved = self.can_reach(file, file)?;
        let meta =
            fs::metadata(&resolved).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        if self.may(&meta, R) {
            Ok(())
        } else {
            Err(format!(
                "{} cannot read {}: it has {}",
                self.who(),
                file.display(),
                described(&meta)
            ))
        }
    }

    /// Search on every directory on the way to `path` (which exists), as
    /// written and as symlinks resolve; `goal` names what the way leads
    /// to, for the message. Returns `path` resolved.
    fn can_reach(&self, path: &Path, goal: &Path) -> Result<PathBuf, String> {
        let resolved = fs::canonicalize(path)
            .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
        let mut on_the_way: Vec<&Path> = path.ancestors().skip(1).collect();
        on_the_way.reverse();
        let mut real: Vec<&Path> = resolved.ancestors().skip(1).collect();
        real.reverse();
        on_the_way.extend(real);
        for d in on_the_way {
            let meta = fs::metadata(d).map_err(|e| format!("cannot read {}: {e}", d.display()))?;
            if !self.may(&meta, X) {
                return Err(format!(
                    "{} cannot reach {}: {} has {}",
                    self.who(),
                    goal.display(),
                    d.display(),
                    described(&meta)
                ));
            }
        }
        Ok(resolved)
    }

    /// Whether the user can create files in `dir` (tokend writes a temp
    /// file there and renames it over the last): search on every directory
    /// on the way, as written and as symlinks resolve, then write and search
    /// on `dir`. A directory that does not exist yet is made later, by
    /// systemd (`RuntimeDirectory=`, owned by the user) or by tokend: then
    /// only the way to the nearest one that exists is checked.
    fn can_create_in(&self, dir: &Path) -> Result<(), String> {
        let mut existing = dir;
        while !existing.exists() {
            existing = existing.parent().unwrap_or(Path::new("/"));
        }
        let resolved = self.can_reach(existing, dir)?;
        let meta = fs::metadata(&resolved)
            .map_err(|e| format!("cannot read {}: {e}", resolved.display()))?;
        if !meta.is_dir() {
            return Err(format!("{} is not a directory", existing.display()));
        }
        if existing != dir {
            return match self.may(&meta, X) {
                true => Ok(()),
                false => Err(format!(
                    "{} cannot reach {}: {} has {}",
                    self.who(),
                    dir.display(),
                    existing.display(),
                    described(&meta)
                )),
            };
        }
        match self.may(&meta, W | X) {
            true => Ok(()),
            false => Err(format!(
                "{} cannot write to {}: it has {}",
                self.who(),
                dir.display(),
                described(&meta)
            )),
        }
    }
}

/// Owner, group and mode, and how they were read.
fn described(meta: &Metadata) -> String {
    format!(
        "owner uid {}, group gid {}, mode {:04o} (checked by the mode bits; ACLs are not read)",
        meta.uid(),
        meta.gid(),
        meta.mode() & 0o7777
    )
}

/// The directory in which a sink's files, or the directories named after
/// credentials, are created: everything before the first `{name}`, up to
/// its last `/`.
fn sink_dir(s: &SinkConfig) -> Option<PathBuf> {
    let at = s.path.find("{name}").unwrap_or(s.path.len());
    let prefix = &s.path[..at];
    let cut = prefix.rfind('/')?;
    Some(PathBuf::from(&prefix[..cut.max(1)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn nobody() -> AsUser {
        AsUser {
            name: "nobody".into(),
            uid: 65534,
            groups: vec![65534],
        }
    }

    #[test]
    fn the_mode_class_that_matches_decides() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let meta = |mode: u32| {
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
            fs::metadata(p).unwrap()
        };
        // The directory is ours (the test's uid), not nobody's.
        let u = nobody();
        assert!(u.may(&meta(0o707), W | X));
        assert!(!u.may(&meta(0o775), W | X));
        let owner = AsUser {
            uid: fs::metadata(p).unwrap().uid(),
            ..nobody()
        };
        // The owner's class decides for the owner, even with fewer bits.
        assert!(!owner.may(&meta(0o077), X));
        assert!(owner.may(&meta(0o300), W | X));
        let member = AsUser {
            groups: vec![fs::metadata(p).unwrap().gid()],
            ..nobody()
        };
        assert!(member.may(&meta(0o030), W | X));
        assert!(!member.may(&meta(0o707), X));
    }

    #[test]
    fn sink_dirs() {
        let sink = |path: &str| SinkConfig {
            index: 0,
            credentials: vec!["*".into()],
            path: path.into(),
            format: config::Format::Raw,
            mode: 0o600,
            group: None,
            on_change: None,
            on_change_timeout: std::time::Duration::from_secs(30),
        };
        for (path, dir) in [
            ("/run/tokend/tokens/{name}", "/run/tokend/tokens"),
            ("/run/tokend/tokens/{name}/token", "/run/tokend/tokens"),
            ("/run/tokend/tok-{name}/token", "/run/tokend"),
            ("/run/token", "/run"),
            ("/{name}", "/"),
        ] {
            assert_eq!(sink_dir(&sink(path)), Some(PathBuf::from(dir)), "{path}");
        }
    }
}
