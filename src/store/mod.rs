//! The state store: SQLite behind a narrow interface of our own.
//!
//! Nothing outside this module speaks SQL, so that a PostgreSQL backend can
//! later stand behind the same methods. Two faces:
//!
//! * [`StoreConn`], synchronous, for the command line (`import`, `list`);
//! * [`Store`], for the daemon: one thread owns the connection and runs every
//!   operation that arrives while the previous commit was in progress in one
//!   transaction (group commit), each inside its own savepoint. With
//!   `synchronous=FULL` every commit costs an fsync; grouping lets ten thousand
//!   refreshes share a few hundred of them. A caller's answer is sent only
//!   after its transaction committed: *commit, then publish*.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, params};

use crate::clock::now_ms;
use crate::secret::Secret;

mod ops;
mod thread;

/// The schema version this build writes; `PRAGMA user_version` holds the file's.
const SCHEMA_VERSION: i64 = 2;

/// Why a store operation failed.
#[derive(Debug)]
pub enum StoreError {
    Sqlite(rusqlite::Error),
    Io(PathBuf, std::io::Error),
    /// `import` of a name that is already there, without `--force`.
    Exists(String),
    NotFound(String),
    /// The file was written by a newer tokend.
    TooNew(i64),
    /// The transaction holding the operation did not commit.
    Commit(String),
    /// The store thread is gone (the daemon is shutting down).
    Closed,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "database error: {e}"),
            StoreError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            StoreError::Exists(n) => write!(f, "a credential named {n:?} already exists"),
            StoreError::NotFound(n) => write!(f, "no credential named {n:?}"),
            StoreError::TooNew(v) => write!(
                f,
                "the database has schema version {v}, newer than this tokend understands ({SCHEMA_VERSION}): upgrade tokend"
            ),
            StoreError::Commit(e) => write!(f, "database commit failed: {e}"),
            StoreError::Closed => write!(f, "the store is closed"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Where a credential stands (README "Credential states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Valid,
    Refreshing,
    Retrying,
    NeedsReauthorization,
    Misconfigured,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Valid => "valid",
            State::Refreshing => "refreshing",
            State::Retrying => "retrying",
            State::NeedsReauthorization => "needs_reauthorization",
            State::Misconfigured => "misconfigured",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "refreshing" => State::Refreshing,
            "retrying" => State::Retrying,
            "needs_reauthorization" => State::NeedsReauthorization,
            "misconfigured" => State::Misconfigured,
            _ => State::Valid,
        }
    }
}

/// One stored credential. Instants are milliseconds since the Unix epoch.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    /// The `[providers.NAME]` it belongs to.
    pub provider: String,
    /// None until the first refresh of a credential imported without one.
    pub access_token: Option<Secret>,
    pub refresh_token: Secret,
    pub scope: Option<String>,
    /// None when the provider did not say (`expires_in` absent).
    pub expires_at: Option<i64>,
    /// When the current access token was stored: the start of its lifetime.
    pub issued_at: i64,
    pub state: State,
    /// Consecutive failures, the exponent of the backoff.
    pub failures: u32,
    pub next_attempt_at: Option<i64>,
    pub last_error: Option<String>,
    pub last_refresh_at: Option<i64>,
    pub last_validated_at: Option<i64>,
    /// Set while a refresh request may be in flight. Found set by the next
    /// lease holder, it means the previous refresh never finished (a crash, or
    /// a request that got no answer): the provider may have rotated the token.
    pub refresh_started_at: Option<i64>,
    /// The provider's Retry-After, as an instant (ms): no request before it,
    /// whatever else would bring the next attempt forward.
    pub not_before: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Bumped whenever the token pair changes: refresh commits compare-and-swap on it.
    pub version: i64,
    /// Bumped on every write: lets a reader tell which rows changed.
    pub rev: i64,
}

/// What `import` and `authorize` store.
pub struct NewCredential {
    pub name: String,
    pub provider: String,
    pub access_token: Option<Secret>,
    pub refresh_token: Secret,
    pub scope: Option<String>,
    pub expires_at: Option<i64>,
    /// The event recorded ("imported", "authorized"): how the tokens came.
    pub event: &'static str,
}

/// A successful refresh, to be committed.
pub struct TokenUpdate {
    /// None keeps the stored access token and its expiry: the provider's
    /// new one is unusable (not Bearer), but the rotated refresh token
    /// beside it must be stored all the same.
    pub access_token: Option<Secret>,
    /// None when the provider did not rotate: the old refresh token stays.
    pub refresh_token: Option<Secret>,
    pub scope: Option<String>,
    pub expires_at: Option<i64>,
}

/// A failed attempt, to be recorded.
pub struct FailureUpdate {
    pub state: State,
    pub failures: u32,
    pub next_attempt_at: Option<i64>,
    pub error: String,
    /// The provider's Retry-After as an instant (ms), if it sent one.
    pub not_before: Option<i64>,
    /// The lease (its fencing value) a failed refresh ran under: the failure
    /// is recorded only while that lease is still the current one, and then
    /// clears the refresh's "started" mark unless `outcome_unknown`. None for
    /// a validation, which never touches a refresh's mark (a peer's, maybe).
    pub lease: Option<i64>,
    /// The request got no answer, so the provider may have acted on it: keep
    /// `refresh_started_at` so the next attempt knows.
    pub outcome_unknown: bool,
    /// "refresh_failed", "validation_failed", …: the event recorded.
    pub event: &'static str,
}

/// The answer to [`Store::take_lease`].
pub enum Lease {
    /// The lease is ours until it expires; here is the row as it is now.
    Taken {
        credential: Box<Credential>,
        /// A previous refresh started and never finished.
        interrupted: bool,
        /// This lease's fencing value, bumped with every lease taken on the
        /// credential: a commit under an older one is refused.
        fence: i64,
    },
    /// Another process holds it.
    Busy { until: i64 },
    /// The token pair changed since it was read (a peer refreshed): no
    /// lease taken; here is the row.
    Changed(Box<Credential>),
    /// The credential no longer exists.
    Gone,
}

/// The answer to a compare-and-swap commit.
pub enum Commit {
    Done(Box<Credential>),
    /// The row changed since it was read (a peer refreshed, an operator
    /// re-imported or removed it): nothing was written.
    Conflict,
    /// The lease this write was made under has passed to another holder
    /// (it expired while this one stalled): nothing was written but an
    /// event that says so, since the new holder's view is the true one.
    LeaseLost,
}

/// A synchronous connection, for the command line and the store thread.
pub struct StoreConn {
    conn: Connection,
}

impl StoreConn {
    /// Opens the database; with `create`, makes it (0600, in a 0700
    /// directory) if missing, otherwise a missing file is an error.
    pub fn open(path: &Path, create: bool) -> Result<StoreConn> {
        let io = |e| StoreError::Io(path.to_owned(), e);
        if create {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                && !dir.exists()
            {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| StoreError::Io(dir.to_owned(), e))?;
            }
            // Create the file ourselves: SQLite would use the umask, and its
            // -wal and -shm files copy the main file's mode.
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(f) => give_to_directory_owner(&f, path)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
        } else if !path.exists() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no database here yet (tokend import or tokend authorize creates it)",
            )));
        }
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "database file was readable by others; setting mode 0600");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        keep_private(path)?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let sc = StoreConn { conn };
        sc.migrate()?;
        Ok(sc)
    }

    fn migrate(&self) -> Result<()> {
        let v: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if v > SCHEMA_VERSION {
            return Err(StoreError::TooNew(v));
        }
        if v < 1 {
            self.immediate(|c| {
                c.execute_batch(
                    "CREATE TABLE IF NOT EXISTS credentials (
                        name TEXT PRIMARY KEY NOT NULL,
                        provider TEXT NOT NULL,
                        access_token TEXT,
                        refresh_token TEXT NOT NULL,
                        scope TEXT,
                        expires_at INTEGER,
                        issued_at INTEGER NOT NULL,
                        state TEXT NOT NULL,
                        failures INTEGER NOT NULL DEFAULT 0,
                        next_attempt_at INTEGER,
                        last_error TEXT,
                        last_refresh_at INTEGER,
                        last_validated_at INTEGER,
                        refresh_started_at INTEGER,
                        created_at INTEGER NOT NULL,
                        updated_at INTEGER NOT NULL,
                        version INTEGER NOT NULL,
                        rev INTEGER NOT NULL
                    );
                    CREATE TABLE IF NOT EXISTS events (
                        id INTEGER PRIMARY KEY,
                        name TEXT NOT NULL,
                        at INTEGER NOT NULL,
                        kind TEXT NOT NULL,
                        detail TEXT
                    );
                    CREATE INDEX IF NOT EXISTS events_by_name ON events(name, id);
                    CREATE TABLE IF NOT EXISTS leases (
                        name TEXT PRIMARY KEY NOT NULL,
                        holder TEXT NOT NULL,
                        expires_at INTEGER NOT NULL
                    );
                    PRAGMA user_version = 1;",
                )?;
                Ok(())
            })?;
        }
        if v < 2 {
            // Lease fencing, and the provider's Retry-After kept apart from
            // the backoff so that nothing brings an attempt before it.
            self.immediate(|c| {
                // Another process may have migrated while we waited for the lock.
                let v: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
                if v >= 2 {
                    return Ok(());
                }
                c.execute_batch(
                    "ALTER TABLE credentials ADD COLUMN not_before INTEGER;
                    ALTER TABLE credentials ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
                    ALTER TABLE leases ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
                    PRAGMA user_version = 2;",
                )?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Runs `f` in a write transaction taken up front, so that a busy peer
    /// makes us wait (busy_timeout) instead of failing half-way.
    fn immediate<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(&self.conn) {
            Ok(v) => match self.conn.execute_batch("COMMIT") {
                Ok(()) => Ok(v),
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    Err(e.into())
                }
            },
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    pub fn load_all(&self) -> Result<Vec<Credential>> {
        ops::load_all(&self.conn)
    }

    /// Forgets a credential: its row, events and lease. Returns whether it existed.
    pub fn remove(&self, name: &str) -> Result<bool> {
        self.immediate(|c| {
            let n = c.execute("DELETE FROM credentials WHERE name = ?1", [name])?;
            c.execute("DELETE FROM events WHERE name = ?1", [name])?;
            c.execute("DELETE FROM leases WHERE name = ?1", [name])?;
            Ok(n > 0)
        })
    }

    /// One credential: a command looks before it asks the user for work
    /// that an existing name would waste (`authorize` without `--force`).
    pub fn get(&self, name: &str) -> Result<Option<Credential>> {
        ops::get(&self.conn, name)
    }

    /// Stores a new credential; with `replace`, overwrites one of that name
    /// (its version moves on, so a refresh in flight cannot overwrite it back).
    pub fn insert(&self, new: &NewCredential, replace: bool) -> Result<Credential> {
        self.immediate(|c| ops::insert(c, new, replace))
    }
}

/// An existing store is kept as private as a new one: its directory 0700,
/// its `-wal`, `-shm` and `-journal` companions 0600. What is ours is
/// tightened (a directory only while it holds nothing but the store, so
/// that a shared directory is never closed to others behind their back);
/// anything else is refused with the fix, before the database is opened.
fn keep_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let io = |p: &Path, e| StoreError::Io(p.to_owned(), e);
    let refuse = |p: &Path, why: String| {
        StoreError::Io(
            p.to_owned(),
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
        )
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in ["-wal", "-shm", "-journal"] {
        let f = PathBuf::from(format!("{}{suffix}", path.display()));
        let Ok(meta) = std::fs::symlink_metadata(&f) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 == 0 {
            continue;
        }
        if !meta.is_file() || (meta.uid() != euid && euid != 0) {
            return Err(refuse(
                &f,
                format!(
                    "is readable by others (mode {mode:04o}) and not ours to fix: make it 0600"
                ),
            ));
        }
        tracing::warn!(path = %f.display(), "database file was readable by others; setting mode 0600");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io(&f, e))?;
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let meta = std::fs::metadata(dir).map_err(|e| io(dir, e))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let store_only = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .flatten()
        .all(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix(file_name.as_str())
                .is_some_and(|rest| ["", "-wal", "-shm", "-journal"].contains(&rest))
        });
    if (meta.uid() != euid && euid != 0) || !store_only {
        return Err(refuse(
            dir,
            format!(
                "the database's directory is open to others (mode {mode:04o}){}: make it 0700, or give the database a directory of its own (tokend creates it 0700)",
                if store_only {
                    " and not ours to fix"
                } else {
                    " and holds other files"
                }
            ),
        ));
    }
    tracing::warn!(dir = %dir.display(), "the database's directory was open to others; setting mode 0700");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io(dir, e))
}

/// When root creates the database (an operator's first `tokend import`) in
/// a directory that belongs to the daemon's user (systemd's
/// StateDirectory=), the file goes to that user: otherwise a daemon running
/// as `tokend` could not open it. SQLite gives its -wal and -shm files the
/// owner of the database when it runs as root.
fn give_to_directory_owner(f: &std::fs::File, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let meta = std::fs::metadata(dir).map_err(|e| StoreError::Io(dir.to_owned(), e))?;
    if meta.uid() != 0 {
        std::os::unix::fs::fchown(f, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| StoreError::Io(path.to_owned(), e))?;
    }
    Ok(())
}

/// The daemon's handle on the store thread. Cloning is cheap.
#[derive(Clone)]
pub struct Store {
    jobs: thread::Jobs,
}

impl Store {
    /// Opens (creating if needed) and starts the store thread.
    pub fn open(path: &Path) -> Result<Store> {
        let sc = StoreConn::open(path, true)?;
        Ok(Store {
            jobs: thread::Jobs::start(sc, path)?,
        })
    }

    /// Runs `f`, which writes, in the next write transaction.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.jobs.send(f, true).await
    }

    /// Runs `f`, which only reads, in a read transaction: in WAL mode that
    /// never waits for another process's write lock, so loading the
    /// credentials at start-up and picking up a peer's changes keep working
    /// while someone holds the database (a `sqlite3` shell in a transaction).
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.jobs.send(f, false).await
    }

    pub async fn load_all(&self) -> Result<Vec<Credential>> {
        self.read(ops::load_all).await
    }

    pub async fn get(&self, name: &str) -> Result<Option<Credential>> {
        let name = name.to_owned();
        self.read(move |c| ops::get(c, &name)).await
    }

    /// `(name, rev)` of every row: cheap enough to tell, after another
    /// process wrote, which rows to reload.
    pub async fn revisions(&self) -> Result<Vec<(String, i64)>> {
        self.read(ops::revisions).await
    }

    /// SQLite's `data_version`: changes when *another* connection commits.
    pub async fn data_version(&self) -> Result<i64> {
        self.read(|c| Ok(c.pragma_query_value(None, "data_version", |r| r.get(0))?))
            .await
    }

    /// Takes the cross-process lease on a credential for `ttl`, so that only
    /// one process refreshes it, and notes that a refresh is starting (see
    /// [`Credential::refresh_started_at`]) — unless the row has moved on from
    /// token `version`, in which case nothing is taken and the row returned.
    pub async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
        version: i64,
    ) -> Result<Lease> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.call(move |c| ops::take_lease(c, &name, &holder, ttl, version))
            .await
    }

    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.call(move |c| {
            c.execute(
                "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                params![name, holder],
            )?;
            Ok(())
        })
        .await
    }

    /// Stores a refreshed token pair if the row is still at `version` and the
    /// lease `fence` is still `holder`'s, and releases the lease, in one
    /// transaction.
    pub async fn commit_refresh(
        &self,
        name: &str,
        holder: &str,
        fence: i64,
        version: i64,
        update: TokenUpdate,
    ) -> Result<Commit> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.call(move |c| ops::commit_refresh(c, &name, &holder, fence, version, &update))
            .await
    }

    /// Extends `holder`'s lease `fence` to `ttl` from now, while a commit of
    /// what the provider answered is being retried. Returns whether the
    /// lease is still ours.
    pub async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        fence: i64,
        ttl: Duration,
    ) -> Result<bool> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.call(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE leases SET expires_at = ?4 WHERE name = ?1 AND holder = ?2 AND fence = ?3",
                )?
                .execute(params![name, holder, fence, now_ms() + ttl.as_millis() as i64])?;
            Ok(n > 0)
        })
        .await
    }

    /// Brings the next attempt of `retrying` credentials forward to the
    /// given instants (never before their Retry-After), each only while its
    /// token is still at the given version and its attempt is later. Returns
    /// the rows that moved.
    pub async fn bring_forward(&self, items: Vec<(String, i64, i64)>) -> Result<Vec<Credential>> {
        self.call(move |c| {
            let mut moved = Vec::new();
            for (name, version, at) in &items {
                let n = c
                    .prepare_cached(
                        "UPDATE credentials SET next_attempt_at = MAX(?3, COALESCE(not_before, 0)),
                            rev = rev + 1
                         WHERE name = ?1 AND version = ?2 AND state = 'retrying'
                            AND next_attempt_at > MAX(?3, COALESCE(not_before, 0))",
                    )?
                    .execute(params![name, version, at])?;
                if n > 0 {
                    moved.extend(ops::get(c, name)?);
                }
            }
            Ok(moved)
        })
        .await
    }

    /// Records a failed refresh or validation against the token `version` it
    /// was about, and releases the lease if `holder` has it.
    pub async fn record_failure(
        &self,
        name: &str,
        holder: &str,
        version: i64,
        failure: FailureUpdate,
    ) -> Result<Commit> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.call(move |c| ops::record_failure(c, &name, &holder, version, &failure))
            .await
    }

    /// Records that the token at `version` passed validation.
    pub async fn record_validated(&self, name: &str, version: i64) -> Result<Commit> {
        let name = name.to_owned();
        self.call(move |c| ops::record_validated(c, &name, version))
            .await
    }

    /// Records `error` as the last error of the token at `version` without
    /// changing its state: a problem the token cannot fix (a 403 from a
    /// fresh token), shown in the status while it lasts.
    pub async fn record_note(&self, name: &str, version: i64, error: String) -> Result<Commit> {
        let name = name.to_owned();
        self.call(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE credentials SET last_error = ?3, last_validated_at = ?4,
                        updated_at = ?4, rev = rev + 1 WHERE name = ?1 AND version = ?2",
                )?
                .execute(params![name, version, error, now_ms()])?;
            if n == 0 {
                return Ok(Commit::Conflict);
            }
            ops::event(c, &name, "validation_forbidden", Some(&error))?;
            ops::done(c, &name)
        })
        .await
    }

    /// Clears the failure count of a `misconfigured` credential so that it is
    /// tried again now (after a config reload that may have fixed it).
    pub async fn reset_backoff(&self, name: &str) -> Result<Commit> {
        let name = name.to_owned();
        self.call(move |c| ops::reset_backoff(c, &name)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_cred(name: &str) -> NewCredential {
        NewCredential {
            name: name.into(),
            provider: "p".into(),
            access_token: Some(Secret::new("at1")),
            refresh_token: Secret::new("rt1"),
            scope: None,
            expires_at: Some(now_ms() + 60_000),
            event: "imported",
        }
    }

    #[test]
    fn creates_private_file_and_migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tokend.db");
        let sc = StoreConn::open(&path, true).unwrap();
        sc.insert(&new_cred("a"), false).unwrap();
        drop(sc);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let sc = StoreConn::open(&path, false).unwrap();
        assert_eq!(sc.load_all().unwrap().len(), 1);
        assert!(StoreConn::open(&dir.path().join("missing.db"), false).is_err());
    }

    #[test]
    fn an_existing_store_is_made_private_or_refused() {
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        let path = dir.join("t.db");
        drop(StoreConn::open(&path, true).unwrap());
        // A directory of its own, opened up, and a -wal made readable.
        set(&dir, 0o755);
        let wal = dir.join("t.db-wal");
        std::fs::write(&wal, b"").unwrap();
        set(&wal, 0o644);
        let sc = StoreConn::open(&path, false).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&wal), 0o600);
        drop(sc);
        // A shared directory is not closed behind others' back: refused.
        set(&dir, 0o755);
        std::fs::write(dir.join("other-service.conf"), b"").unwrap();
        let e = StoreConn::open(&path, false)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("holds other files") && e.contains("0700"), "{e}");
        assert_eq!(mode(&dir), 0o755);
    }

    #[test]
    fn root_gives_a_new_database_to_the_directory_owner() {
        use std::os::unix::fs::MetadataExt;
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        let path = dir.path().join("t.db");
        StoreConn::open(&path, true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), 65534);
    }

    #[test]
    fn insert_refuses_duplicates_unless_replacing() {
        let dir = tempfile::tempdir().unwrap();
        let sc = StoreConn::open(&dir.path().join("t.db"), true).unwrap();
        let a = sc.insert(&new_cred("a"), false).unwrap();
        assert!(matches!(
            sc.insert(&new_cred("a"), false),
            Err(StoreError::Exists(_))
        ));
        let b = sc.insert(&new_cred("a"), true).unwrap();
        assert_eq!(b.version, a.version + 1);
        assert_eq!(b.created_at, a.created_at);
    }

    #[tokio::test]
    async fn refresh_commit_is_a_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        StoreConn::open(&path, true)
            .unwrap()
            .insert(&new_cred("a"), false)
            .unwrap();
        let store = Store::open(&path).unwrap();
        let me = crate::lease::holder_id();
        let Lease::Taken {
            credential,
            interrupted,
            fence,
        } = store
            .take_lease("a", &me, Duration::from_secs(60), 1)
            .await
            .unwrap()
        else {
            panic!("lease not taken")
        };
        assert!(!interrupted);
        // Another live holder (one we cannot check, on another host) is refused.
        assert!(matches!(
            store
                .take_lease("a", "other-host/1/1", Duration::from_secs(60), 1)
                .await
                .unwrap(),
            Lease::Busy { .. }
        ));
        let update = || TokenUpdate {
            access_token: Some(Secret::new("at2")),
            refresh_token: Some(Secret::new("rt2")),
            scope: None,
            expires_at: None,
        };
        let Commit::Done(c) = store
            .commit_refresh("a", &me, fence, credential.version, update())
            .await
            .unwrap()
        else {
            panic!("conflict")
        };
        assert_eq!(c.refresh_token.expose(), "rt2");
        assert_eq!(c.state, State::Valid);
        assert_eq!(c.refresh_started_at, None);
        // The same old version again is a conflict and writes nothing.
        let Lease::Taken { fence, .. } = store
            .take_lease("a", &me, Duration::from_secs(60), c.version)
            .await
            .unwrap()
        else {
            panic!("lease not taken")
        };
        assert!(matches!(
            store
                .commit_refresh("a", &me, fence, credential.version, update())
                .await
                .unwrap(),
            Commit::Conflict
        ));
        assert_eq!(store.get("a").await.unwrap().unwrap().version, c.version);
    }

    #[tokio::test]
    async fn a_holder_whose_lease_passed_on_writes_nothing_but_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        StoreConn::open(&path, true)
            .unwrap()
            .insert(&new_cred("a"), false)
            .unwrap();
        let store = Store::open(&path).unwrap();
        let stale = "other-host/1/1";
        let Lease::Taken { fence: old, .. } = store
            .take_lease("a", stale, Duration::from_millis(1), 1)
            .await
            .unwrap()
        else {
            panic!("lease not taken")
        };
        std::thread::sleep(Duration::from_millis(5));
        // The lease expired; another holder takes it.
        let Lease::Taken { fence: new, .. } = store
            .take_lease("a", "next", Duration::from_secs(60), 1)
            .await
            .unwrap()
        else {
            panic!("lease not taken")
        };
        assert!(new > old);
        let update = TokenUpdate {
            access_token: Some(Secret::new("at-stale")),
            refresh_token: Some(Secret::new("rt-stale")),
            scope: None,
            expires_at: None,
        };
        assert!(matches!(
            store
                .commit_refresh("a", stale, old, 1, update)
                .await
                .unwrap(),
            Commit::LeaseLost
        ));
        let failure = FailureUpdate {
            state: State::Retrying,
            failures: 1,
            next_attempt_at: None,
            error: "x".into(),
            not_before: None,
            lease: Some(old),
            outcome_unknown: false,
            event: "refresh_failed",
        };
        assert!(matches!(
            store.record_failure("a", stale, 1, failure).await.unwrap(),
            Commit::LeaseLost
        ));
        let row = store.get("a").await.unwrap().unwrap();
        assert_eq!(row.refresh_token.expose(), "rt1");
        assert_eq!(row.version, 1);
        assert!(
            row.refresh_started_at.is_some(),
            "the new holder's mark stays"
        );
        assert!(
            !store
                .renew_lease("a", stale, old, Duration::from_secs(9))
                .await
                .unwrap()
        );
        assert!(
            store
                .renew_lease("a", "next", new, Duration::from_secs(9))
                .await
                .unwrap()
        );
        let kinds: Vec<String> = Connection::open(&path)
            .unwrap()
            .prepare("SELECT kind FROM events WHERE name = 'a' ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            kinds.iter().filter(|k| *k == "lease_lost").count(),
            2,
            "{kinds:?}"
        );
    }

    #[tokio::test]
    async fn a_validation_failure_leaves_a_peer_s_refresh_mark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        StoreConn::open(&path, true)
            .unwrap()
            .insert(&new_cred("a"), false)
            .unwrap();
        let store = Store::open(&path).unwrap();
        let _ = store
            .take_lease("a", "peer-host/1/1", Duration::from_secs(60), 1)
            .await
            .unwrap();
        let failure = FailureUpdate {
            state: State::Retrying,
            failures: 1,
            next_attempt_at: None,
            error: "validation: provider error (503)".into(),
            not_before: None,
            lease: None,
            outcome_unknown: false,
            event: "validation_failed",
        };
        let Commit::Done(row) = store.record_failure("a", "me", 1, failure).await.unwrap() else {
            panic!("not recorded")
        };
        assert!(row.refresh_started_at.is_some());
        // Nor the peer's lease.
        assert!(matches!(
            store
                .take_lease("a", "me", Duration::from_secs(60), 1)
                .await
                .unwrap(),
            Lease::Busy { .. }
        ));
    }

    #[tokio::test]
    async fn reads_do_not_wait_for_another_process_holding_the_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        StoreConn::open(&path, true)
            .unwrap()
            .insert(&new_cred("a"), false)
            .unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let started = std::time::Instant::now();
        let store = Store::open(&path).unwrap();
        assert_eq!(store.load_all().await.unwrap().len(), 1);
        assert!(store.get("a").await.unwrap().is_some());
        // A read stuck behind the lock would take the 5 s busy timeout.
        assert!(started.elapsed() < Duration::from_secs(3));
        other.execute_batch("COMMIT").unwrap();
        assert!(matches!(
            store
                .take_lease("a", "me", Duration::from_secs(60), 1)
                .await
                .unwrap(),
            Lease::Taken { .. }
        ));
    }

    #[tokio::test]
    async fn an_unfinished_refresh_is_reported_to_the_next_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        StoreConn::open(&path, true)
            .unwrap()
            .insert(&new_cred("a"), false)
            .unwrap();
        let store = Store::open(&path).unwrap();
        // A holder from a process that no longer exists.
        let dead = "other-host/1/1";
        let _ = store
            .take_lease("a", dead, Duration::from_millis(1), 1)
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        match store
            .take_lease("a", "next", Duration::from_secs(60), 1)
            .await
            .unwrap()
        {
            Lease::Taken { interrupted, .. } => assert!(interrupted),
            _ => panic!("lease not taken"),
        }
    }
}
