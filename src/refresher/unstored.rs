//! Token pairs the provider gave that the store has not taken yet.
//!
//! A refresh whose commit fails (SQLite locked, PostgreSQL unreachable)
//! keeps retrying, but only for as long as the process lives: stopped at
//! the end of the shutdown grace, killed by systemd or the OOM killer, it
//! took the rotated refresh token with it, and the provider had already
//! spent the stored one. So once a commit has failed, or has not landed
//! within a second (a store that hangs rather than fails: the commit goes
//! on), and before the commit when the daemon is stopping or its store has
//! closed, the daemon also writes the pair to a file of its own (mode 0600,
//! in a 0700 directory, synced) until a commit answers. Before anything refreshes a credential
//! again, the pair is stored, under a lease of the storer's own and only
//! over the token it replaced (never over a credential that changed
//! since): at the daemon's start, by `tokend refresh` without a daemon, and
//! by a daemon that takes over the lease of a holder that died with a pair
//! kept.
//!
//! The file holds the tokens as the provider sent them, like the sink
//! files and a plaintext store: on this host, readable by tokend's user
//! only, which also reads the key file of a sealed store. It names its
//! store, so that a directory two stores share (a SQLite file and a
//! PostgreSQL store in one state directory, after `tokend migrate`) never
//! has one store's pairs judged, or deleted, by the other.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::secret::Secret;
use crate::store::{
    Commit, Credential, Database, Grant, Lease, Store, StoreError, TokenAt, TokenUpdate,
};

/// The directory's name, beside a SQLite store or in the state directory.
const DIR: &str = "tokend-pending";

/// The unit's state directory (`StateDirectory=tokend`): where a
/// PostgreSQL daemon under it keeps its pairs, and where a command run
/// from a shell (no `$STATE_DIRECTORY`) looks for them.
const UNIT_STATE: &str = "/var/lib/tokend";

/// How long a lease taken to store a kept pair lasts: one commit.
const LEASE: std::time::Duration = std::time::Duration::from_secs(60);

/// Where unstored pairs are kept, and for which store.
#[derive(Debug, Clone, Default)]
pub struct Unstored {
    /// None: nowhere to keep them (a PostgreSQL store with neither
    /// `$STATE_DIRECTORY` nor `$RUNTIME_DIRECTORY`).
    dir: Option<PathBuf>,
    /// The store's name as shown (a SQLite path; a PostgreSQL URL without
    /// its password).
    store: String,
    /// Whether this process writes pairs (the daemon), or only stores
    /// those it finds (`tokend refresh`, often run as root: a file of
    /// root's would be one the daemon cannot read).
    writes: bool,
}

/// One pair and what its commit needs: the lease it was refreshed under
/// and the token it replaces.
#[derive(Serialize, Deserialize)]
struct Record {
    store: String,
    name: String,
    holder: String,
    fence: i64,
    version: i64,
    created_at: i64,
    access_token: Option<String>,
    refresh_token: Option<String>,
    scope: Option<String>,
    expires_at: Option<i64>,
}

/// A pair read back.
pub struct Kept {
    pub name: String,
    /// The process that kept it, and its lease: for the log.
    pub holder: String,
    pub fence: i64,
    pub at: TokenAt,
    pub update: TokenUpdate,
}

impl Unstored {
    /// Beside a SQLite store; in `$STATE_DIRECTORY` (then
    /// `$RUNTIME_DIRECTORY`) for PostgreSQL. `writes`: see the field.
    pub fn new(config: &Config, writes: bool) -> Unstored {
        Unstored::of(&config.database, writes)
    }

    /// [`new`](Self::new) for a store given apart from a config (`tokend
    /// migrate`'s source).
    pub fn of(database: &Database, writes: bool) -> Unstored {
        let base = match database {
            Database::Sqlite(p) => p.parent().map(Path::to_path_buf),
            Database::Postgres(_) => ["STATE_DIRECTORY", "RUNTIME_DIRECTORY"]
                .iter()
                .find_map(std::env::var_os)
                .and_then(|v| {
                    let first = v.to_string_lossy().split(':').next()?.to_owned();
                    (!first.is_empty()).then(|| PathBuf::from(first))
                })
                .or_else(|| Some(PathBuf::from(UNIT_STATE)).filter(|d| d.is_dir())),
        };
        // A SQLite file as the kernel resolves it: one store, however
        // the path to it is spelled.
        let store = match database {
            Database::Sqlite(p) => fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
            Database::Postgres(_) => database.display().to_string(),
        };
        Unstored {
            dir: base.map(|b| b.join(DIR)),
            store,
            writes,
        }
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        Some(self.dir.as_ref()?.join(format!("{name}.json")))
    }

    /// Says where pairs are kept, or that they cannot be; removes the temp
    /// files of a write a crash cut short (they hold tokens).
    pub fn announce(&self) {
        match &self.dir {
            Some(dir) => {
                crate::publish::sweep_dir(dir);
            }
            None => tracing::warn!(
                "neither $STATE_DIRECTORY nor $RUNTIME_DIRECTORY is set, and there is no \
                 {UNIT_STATE}: a refreshed token pair the database does not take before tokend \
                 stops cannot be kept for the next start"
            ),
        }
    }

    /// Writes `name`'s pair, durably, while its commit waits or is
    /// retried. Without a directory it does nothing: `announce` said at
    /// start that such pairs cannot be kept, once rather than at each.
    pub fn keep(
        &self,
        name: &str,
        holder: &str,
        fence: i64,
        at: TokenAt,
        u: &TokenUpdate,
    ) -> io::Result<()> {
        let (true, Some(dir), Some(path)) = (self.writes, &self.dir, self.path(name)) else {
            return Ok(());
        };
        let owner = private_dir(dir)?;
        let record = Record {
            store: self.store.clone(),
            name: name.to_owned(),
            holder: holder.to_owned(),
            fence,
            version: at.version,
            created_at: at.created_at,
            access_token: u.access_token.as_ref().map(|s| s.expose().to_owned()),
            refresh_token: u.refresh_token.as_ref().map(|s| s.expose().to_owned()),
            scope: u.scope.clone(),
            expires_at: u.expires_at,
        };
        let bytes = Secret::new(serde_json::to_string(&record).map_err(io::Error::other)?);
        crate::publish::write_atomic(&path, bytes.expose().as_bytes(), 0o600, None)?;
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&path, Some(uid), None)?;
        }
        Ok(())
    }

    /// Removes `name`'s pair once a commit answered (stored, or refused
    /// for good).
    pub fn forget(&self, name: &str) {
        if let Some(path) = self.path(name) {
            remove(&path);
        }
    }

    /// Every pair kept for this store. A directory or a file that cannot
    /// be read is an error naming it, never its content: its pair must not
    /// be passed over, or the next refresh spends the token it replaced.
    /// Another store's pairs are left where they are, untouched.
    pub fn kept(&self) -> Result<Vec<Kept>, String> {
        let Some(dir) = &self.dir else {
            return Ok(Vec::new());
        };
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(format!(
                    "cannot read {}, where token pairs tokend could not store are kept: {e} \
                     (it must be the service user's: chown it and its files to that user)",
                    dir.display()
                ));
            }
        };
        let mut kept = Vec::new();
        for e in entries {
            let path = e
                .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
                .path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let r = read_record(&path).map_err(|why| {
                format!(
                    "{} holds a token pair tokend could not store, but {why}: move it away to \
                     go on without it (the credential may then need authorizing again)",
                    path.display()
                )
            })?;
            if r.store != self.store {
                tracing::info!(
                    file = %path.display(),
                    store = %r.store,
                    "a token pair kept for another store: left for it"
                );
                continue;
            }
            if self.path(&r.name).as_ref() != Some(&path) {
                return Err(format!(
                    "{} is not named after the credential it holds a pair of",
                    path.display()
                ));
            }
            kept.push(Kept {
                at: TokenAt {
                    version: r.version,
                    created_at: r.created_at,
                },
                update: TokenUpdate {
                    access_token: r.access_token.map(Secret::new),
                    refresh_token: r.refresh_token.map(Secret::new),
                    scope: r.scope,
                    expires_at: r.expires_at,
                },
                name: r.name,
                holder: r.holder,
                fence: r.fence,
            });
        }
        Ok(kept)
    }

    /// Stores the pairs kept for this store (all, or `name`'s), each under
    /// a lease `holder` takes for it, and only over the token it replaced;
    /// removes each file once it is stored, or once the credential has
    /// changed since (its pair can no longer be the current one). A pair
    /// whose credential another live process is refreshing is left for
    /// later: that process may be the one that kept it, still retrying.
    pub async fn store_kept(
        &self,
        store: &Store,
        holder: &str,
        name: Option<&str>,
    ) -> Result<(), StoreError> {
        let kept = self.kept().map_err(StoreError::Unstored)?;
        for k in kept
            .into_iter()
            .filter(|k| name.is_none_or(|n| n == k.name))
        {
            match store.take_lease(&k.name, holder, LEASE, k.at).await? {
                Lease::Taken { fence, .. } => {
                    self.store_under(store, holder, fence, k).await?;
                }
                Lease::Changed(row) if holds(&row, &k.update) => {
                    // A crash after the commit, before the file went.
                    tracing::info!(
                        credential = %k.name,
                        "the token pair kept before tokend stopped was stored already; its file is removed"
                    );
                    self.forget(&k.name);
                }
                Lease::Changed(_) | Lease::Gone => {
                    discarded(&k.name);
                    self.forget(&k.name);
                }
                Lease::Busy { .. } => tracing::info!(
                    credential = %k.name,
                    kept_by = %k.holder,
                    "a kept token pair waits: another process is refreshing this credential"
                ),
            }
        }
        Ok(())
    }

    /// Stores `k` under lease `fence`, which `holder` took on its token;
    /// the file goes once the store has answered. Returns what it stored.
    pub async fn store_under(
        &self,
        store: &Store,
        holder: &str,
        fence: i64,
        k: Kept,
    ) -> Result<Option<Credential>, StoreError> {
        let (name, by, lease) = (k.name, k.holder, k.fence);
        let stored = match store
            .commit_refresh(&name, holder, fence, k.at, k.update)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let _ = store.release_lease(&name, holder, fence).await;
                return Err(e);
            }
        };
        let stored = match stored {
            Commit::Done(c) => {
                tracing::warn!(
                    credential = %name,
                    kept_by = %by,
                    lease,
                    "stored the token pair a refresh got before tokend stopped, which the store did not take then"
                );
                Some(*c)
            }
            Commit::Conflict | Commit::LeaseLost => {
                discarded(&name);
                None
            }
        };
        self.forget(&name);
        Ok(stored)
    }
}

/// Whether `row` holds the pair `update` would store: the kept pair's own
/// commit landed, and only the file's removal was lost.
fn holds(row: &Credential, update: &TokenUpdate) -> bool {
    let refresh_token = match &row.grant {
        Grant::RefreshToken(t) => Some(t),
        _ => None,
    };
    // A pair with no usable access token (not Bearer) stored only its
    // refresh token: each token the pair has must be the row's.
    (update.access_token.is_some() || update.refresh_token.is_some())
        && update
            .access_token
            .as_ref()
            .is_none_or(|a| row.access_token.as_ref() == Some(a))
        && update
            .refresh_token
            .as_ref()
            .is_none_or(|t| refresh_token == Some(t))
}

fn discarded(name: &str) {
    tracing::error!(
        credential = %name,
        "a token pair a refresh got before tokend stopped was not stored: the credential changed since (replaced, removed, or refreshed by another process; or that pair was stored after all, its answer lost); discarded"
    );
}

/// The directory, made 0700 if missing; refused if it is not a directory
/// of ours, and closed to others if it is ours but open. Root (a daemon
/// started by hand as root, by mistake) keeps its files as the owner of
/// the directory they sit in would, so that the service user can still
/// read them: returns that owner for the files when it is not root.
fn private_dir(dir: &Path) -> io::Result<Option<u32>> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let base = dir.parent().unwrap_or(Path::new("/")).metadata()?.uid();
    let owner = if uid == 0 { base } else { uid };
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        Ok(()) if owner != uid => std::os::unix::fs::chown(dir, Some(owner), None)?,
        _ => {}
    }
    let meta = dir.symlink_metadata()?;
    if !meta.is_dir() || meta.uid() != owner {
        return Err(io::Error::other(format!(
            "{} is not a directory of this user's",
            dir.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok((owner != uid).then_some(owner))
}

/// A kept file's record: a regular file (never a symlink followed, nor a
/// FIFO waited on). The reason it is not, without its content.
fn read_record(path: &Path) -> Result<Record, String> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if !f.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err("is not a regular file".into());
    }
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|e| format!("cannot be read: {e}"))?;
    let text = Secret::new(text);
    serde_json::from_str(text.expose()).map_err(|e| format!("does not parse ({})", what(&e)))
}

fn remove(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                let _ = crate::dirsync::sync(dir);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a stored pair's file")
        }
    }
}

/// What kind of parse error, without serde's excerpt of the input (which
/// could be a token).
fn what(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "not a token pair",
        serde_json::error::Category::Eof => "cut short",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> TokenAt {
        TokenAt {
            version: 3,
            created_at: 42,
        }
    }

    fn update() -> TokenUpdate {
        TokenUpdate {
            access_token: Some(Secret::new("at-kept")),
            refresh_token: Some(Secret::new("rt-kept")),
            scope: None,
            expires_at: Some(7),
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_kept_pair_reads_back_private_and_another_store_s_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ours = Unstored::of(&Database::Sqlite(dir.path().join("a.db")), true);
        ours.keep("bot", "h/1/1/?", 9, at(), &update()).unwrap();
        let kept_dir = dir.path().join(DIR);
        assert_eq!(mode(&kept_dir), 0o700);
        assert_eq!(mode(&kept_dir.join("bot.json")), 0o600);
        let kept = ours.kept().unwrap();
        assert_eq!(kept.len(), 1);
        let k = &kept[0];
        assert_eq!(
            (k.name.as_str(), k.holder.as_str(), k.fence),
            ("bot", "h/1/1/?", 9)
        );
        assert_eq!(k.at, at());
        assert_eq!(k.update.refresh_token.as_ref().unwrap().expose(), "rt-kept");
        assert_eq!(k.update.expires_at, Some(7));

        // Another store beside it sees none of it, and deletes nothing.
        let other = Unstored::of(&Database::Sqlite(dir.path().join("b.db")), true);
        assert!(other.kept().unwrap().is_empty());
        assert!(kept_dir.join("bot.json").exists());

        // A directory opened to others meanwhile is closed before a write.
        fs::set_permissions(&kept_dir, fs::Permissions::from_mode(0o755)).unwrap();
        ours.keep("bot", "h/1/1/?", 10, at(), &update()).unwrap();
        assert_eq!(mode(&kept_dir), 0o700);
        assert_eq!(ours.kept().unwrap()[0].fence, 10);
        ours.forget("bot");
        assert!(ours.kept().unwrap().is_empty());
        // Commands only store what they find; they write nothing.
        let command = Unstored::of(&Database::Sqlite(dir.path().join("a.db")), false);
        command.keep("bot", "h/1/1/?", 9, at(), &update()).unwrap();
        assert!(command.kept().unwrap().is_empty());
    }

    /// A daemon run as root by mistake keeps its pairs as the service user
    /// (the owner of the store's directory), who must read them next.
    #[test]
    fn root_keeps_pairs_as_the_owner_of_the_store_s_directory() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let nobody = 65534;
        std::os::unix::fs::chown(dir.path(), Some(nobody), None).unwrap();
        let ours = Unstored::of(&Database::Sqlite(dir.path().join("a.db")), true);
        ours.keep("bot", "h/1/1/?", 9, at(), &update()).unwrap();
        let kept_dir = dir.path().join(DIR);
        assert_eq!(fs::metadata(&kept_dir).unwrap().uid(), nobody);
        assert_eq!(
            fs::metadata(kept_dir.join("bot.json")).unwrap().uid(),
            nobody
        );
        // And again, into the directory that is nobody's now.
        ours.keep("bot", "h/1/1/?", 10, at(), &update()).unwrap();
        assert_eq!(ours.kept().unwrap()[0].fence, 10);
    }

    #[test]
    fn a_kept_file_that_cannot_be_read_is_an_error_naming_it_never_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let ours = Unstored::of(&Database::Sqlite(dir.path().join("a.db")), true);
        let kept_dir = dir.path().join(DIR);
        fs::DirBuilder::new().mode(0o700).create(&kept_dir).unwrap();
        let file = kept_dir.join("bot.json");
        // Cut short by a disk that filled up, say.
        fs::write(&file, r#"{"store":"x","refresh_token":"rt-secret-part"#).unwrap();
        let e = ours.kept().err().unwrap();
        assert!(
            e.contains("bot.json") && e.contains("does not parse"),
            "{e}"
        );
        assert!(!e.contains("rt-secret"), "the content in the message");
        // Not followed, nor waited on.
        fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &file).unwrap();
        fs::write(dir.path().join("elsewhere"), "{}").unwrap();
        let e = ours.kept().err().unwrap();
        assert!(e.contains("cannot be read"), "{e}");
        fs::remove_file(&file).unwrap();
        let c = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = ours.kept().err().unwrap();
        assert!(e.contains("not a regular file"), "{e}");
        // A directory this user may not read is an error too, not "none".
        fs::remove_file(&file).unwrap();
        fs::remove_dir(&kept_dir).unwrap();
        fs::write(&kept_dir, "").unwrap();
        assert!(ours.kept().is_err());
    }
}
