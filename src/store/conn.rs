//! [`StoreConn`]: a synchronous connection, for the command line; opening
//! SQLite's (also the one the store thread owns) makes the database
//! private (0600, in a 0700 directory); opening either brings its schema up
//! to date.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use super::keys::{self, KeyTx, Keys, KeysReport, Lite, Sealer, StoredTokens};
use super::{
    Credential, Database, Looked, NewCredential, Over, Replaced, Result, StoreError,
    given_fingerprint, ops, pg,
};
use crate::seal::{Kek, Keyring, WrappedKey};

/// The schema version this build writes; `PRAGMA user_version` holds the file's.
pub(super) const SCHEMA_VERSION: i64 = 5;

/// Rows re-sealed per transaction by `tokend keys rotate`: few enough that
/// no row lock is held long, many enough that SQLite's fsyncs stay few.
const RESEAL_BATCH: usize = 200;

/// SQLite's page cache and WAL checkpoint interval. The page cache is
/// SQLite's default: a larger one gave nothing worth its memory at
/// 100,000 credentials (BENCHMARKS.md "Store"). The checkpoint interval
/// follows the database's size ([`checkpoint_interval`]) unless fixed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// `PRAGMA cache_size`, in KiB.
    pub cache_kib: i64,
    /// `PRAGMA wal_autocheckpoint`, WAL pages between automatic
    /// checkpoints: fixed, or None for [`checkpoint_interval`] of the
    /// database's size, followed as it grows.
    pub wal_autocheckpoint: Option<i64>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            cache_kib: 2000,
            wal_autocheckpoint: None,
        }
    }
}

/// WAL pages between automatic checkpoints, for a database of `pages`
/// pages: eight times its size, at least 10,000 pages (40 MiB, ten times
/// SQLite's default) and at most 64,000 (250 MiB).
///
/// Each checkpoint copies every page changed since the last one back into
/// the database file and syncs it, on the store thread, while leases and
/// commits wait. A sweep commits all over the file, so a checkpoint copies
/// up to the whole database however long the interval: an interval of a
/// fixed multiple of the database keeps that copy to a fixed share of the
/// WAL's writes whatever the number of credentials, and keeps the WAL in
/// proportion to the database. At 100,000 credentials (5,400 pages) the
/// sweep took 1.11–1.12 times the bare client's time with 10,000 pages,
/// 1.07–1.09 with 20,000 and 1.05–1.06 with 40,000 (BENCHMARKS.md
/// "Scale"); a store of 10,000 credentials stays at the floor, as before.
pub(super) fn checkpoint_interval(pages: i64) -> i64 {
    pages.saturating_mul(8).clamp(10_000, 64_000)
}

/// Sets the connection's checkpoint interval: `tuning`'s if fixed, else
/// [`checkpoint_interval`] of the database's size now.
pub(super) fn set_checkpoint_interval(c: &Connection, tuning: Tuning) -> Result<()> {
    let pages = match tuning.wal_autocheckpoint {
        Some(fixed) => fixed,
        None => checkpoint_interval(c.pragma_query_value(None, "page_count", |r| r.get(0))?),
    };
    Ok(c.pragma_update(None, "wal_autocheckpoint", pages)?)
}

/// A synchronous connection, for the command line.
pub struct StoreConn {
    pub(super) backend: Backend,
    sealer: Sealer,
    kek: Option<Arc<Kek>>,
}

pub(super) enum Backend {
    Sqlite(Connection),
    /// The connection's thread: the command line blocks on its answers.
    Postgres(pg::Jobs),
}

impl StoreConn {
    /// Opens the store the config's `database` names. For SQLite, `create`
    /// says whether a missing file is made or an error; a PostgreSQL
    /// database must exist, and its tables are made if missing.
    /// Without an encryption key: a sealed store is refused.
    pub fn open_database(db: &Database, create: bool) -> Result<StoreConn> {
        Self::open_sealed(db, create, None, Tuning::default(), true)
    }

    /// Opens the store the config's `database` names, sealed with its
    /// encryption key if it gives one (README "Secrets at rest").
    pub fn open_config(config: &crate::config::Config, create: bool) -> Result<StoreConn> {
        let kek = config.sealing.as_ref().map(|s| s.kek.clone());
        Self::open_sealed(&config.database, create, kek, Tuning::default(), true)
    }

    /// For `tokend keys`: the store as it is, sealed or not, its data keys
    /// left unread (they may be wrapped by another key): only the `keys`
    /// methods below may be used on it.
    pub fn open_for_keys(config: &crate::config::Config) -> Result<StoreConn> {
        let kek = config.sealing.as_ref().map(|s| s.kek.clone());
        Self::open_sealed(&config.database, false, kek, Tuning::default(), false)
    }

    /// For `tokend migrate`: the store as it is, sealed or not, its data
    /// keys left unread: only the rows as stored are copied
    /// ([`seal_for_move`](Self::seal_for_move), [`restore`](Self::restore)).
    pub fn open_as_is(db: &Database, create: bool) -> Result<StoreConn> {
        Self::open_sealed(db, create, None, Tuning::default(), false)
    }

    fn open_sealed(
        db: &Database,
        create: bool,
        kek: Option<Arc<Kek>>,
        tuning: Tuning,
        load_keys: bool,
    ) -> Result<StoreConn> {
        let backend = match db {
            Database::Sqlite(path) => Backend::Sqlite(open_sqlite(path, create, tuning)?),
            Database::Postgres(url) => Backend::Postgres(pg::Jobs::start(url)?),
        };
        let mut conn = StoreConn {
            backend,
            sealer: Sealer::new(None, &[])?,
            kek: kek.clone(),
        };
        let found = if load_keys {
            conn.open_keys(kek.clone())?
        } else {
            Vec::new()
        };
        conn.sealer = Sealer::new(kek, &found)?;
        Ok(conn)
    }

    /// For `tokend check-config`: whether a daemon with `kek` would take
    /// the SQLite store at `path` as it is (README "Secrets at rest"),
    /// found by reading it only: nothing is made, migrated or sealed. A
    /// store not made yet is taken. One that cannot be read without a
    /// trace (see `open_to_look`) is an `Io` error, as is one this process
    /// may not read: the caller tells those from a store the daemon would
    /// refuse.
    pub fn check_sealing(path: &Path, kek: Option<Arc<Kek>>) -> Result<()> {
        if std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        {
            return Ok(());
        }
        let Some(c) = open_to_look(path)? else {
            return Err(StoreError::Io(
                path.to_owned(),
                std::io::Error::other(
                    "its -wal file is there without its -shm (left by a crash): not read, \
                     since reading would make one",
                ),
            ));
        };
        let has = |table: &str| -> Result<bool> {
            let n: i64 = c.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )?;
            Ok(n > 0)
        };
        if !has("credentials")? {
            return Ok(());
        }
        if !has("keys")? {
            // Older than sealing (the daemon migrates it first): every
            // credential is plaintext.
            let n: i64 = c.query_row(
                "SELECT count(*) FROM credentials
                 WHERE refresh_token != '' OR access_token IS NOT NULL",
                [],
                |r| r.get(0),
            )?;
            if kek.is_some() && n > 0 {
                return Err(StoreError::Seal(format!(
                    "the config gives an encryption key, but the store holds {n} \
                     credential{} in plaintext: run `tokend keys seal` once to seal them \
                     (README \"Secrets at rest\")",
                    if n == 1 { "" } else { "s" }
                )));
            }
            return Ok(());
        }
        let found = Lite(&c).keys()?;
        keys::judge(&found, || Lite(&c).stored_tokens(), kek.as_deref())?;
        // The data keys unwrap with this key, as the daemon's would.
        Sealer::new(kek, &found)?;
        Ok(())
    }

    /// [`keys::open_keys`]. On SQLite, a read outside any transaction
    /// first: a store that needs no first data key opens (`tokend status`)
    /// while another process holds the write lock.
    fn open_keys(&self, kek: Option<Arc<Kek>>) -> Result<Vec<WrappedKey>> {
        if let Backend::Sqlite(c) = &self.backend {
            let found = Lite(c).keys()?;
            if kek.is_none() || !found.is_empty() {
                return keys::open_keys(&mut Lite(c), kek.as_deref());
            }
        }
        self.in_keys_tx(move |tx| keys::open_keys(tx, kek.as_deref()))
    }

    /// Runs `f` in a write transaction of its own, on either backend.
    fn in_keys_tx<T: Send + 'static>(
        &self,
        mut f: impl FnMut(&mut dyn KeyTx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        match &self.backend {
            Backend::Sqlite(c) => immediate(c, |c| f(&mut Lite(c))),
            Backend::Postgres(j) => j.call(move |c| f(c)),
        }
    }

    /// `v` with its tokens opened, the data keys read again first if one
    /// of its values needs a key added since.
    fn opened<T: keys::Tokens>(&self, v: Result<T>) -> Result<T> {
        let mut v = v?;
        let keys = if self.sealer.needs_reload(&mut v) {
            Keys::Fresh(self.reload_keys()?)
        } else {
            Keys::Loaded
        };
        if !self.sealer.open(&mut v, keys)? {
            // A value the keys held do not open: refused, or not, only
            // with the keys as the table holds them now.
            let fresh = self.reload_keys()?;
            self.sealer.open(&mut v, Keys::Fresh(fresh))?;
        }
        Ok(v)
    }

    /// Reads the data keys again; returns those it read.
    fn reload_keys(&self) -> Result<Option<Arc<Keyring>>> {
        let found = self.in_keys_tx(|tx| tx.keys())?;
        self.sealer.install(&found)
    }

    fn kek(&self) -> Result<Arc<Kek>> {
        self.kek.clone().ok_or_else(|| {
            StoreError::Seal(
                "the config gives no encryption key: set encryption_key_file or \
                 encryption_key_credential"
                    .into(),
            )
        })
    }

    /// The data keys and every credential's stored token columns, as they
    /// are: for `tokend keys status`, which needs no key.
    pub fn key_status(&self) -> Result<(Vec<WrappedKey>, Vec<StoredTokens>)> {
        self.in_keys_tx(|tx| Ok((tx.keys()?, tx.stored_tokens()?)))
    }

    /// `tokend keys seal`: seals a plaintext store, every row in one
    /// transaction with its first data key.
    pub fn seal_store(&self) -> Result<KeysReport> {
        let kek = self.kek()?;
        self.in_keys_tx(move |tx| keys::seal_store(tx, &kek))
    }

    /// `tokend keys rotate`: a new data key, every value sealed again with
    /// it, then the keys no value uses any more deleted.
    pub fn rotate_key(&self) -> Result<KeysReport> {
        let kek = self.kek()?;
        let k = kek.clone();
        let ring = Arc::new(self.in_keys_tx(move |tx| keys::add_data_key(tx, &k))?);
        let mut report = KeysReport {
            active: ring.active_key(),
            ..KeysReport::default()
        };
        let names: Vec<String> = self
            .in_keys_tx(|tx| tx.stored_tokens())?
            .into_iter()
            .map(|t| t.name)
            .collect();
        for chunk in names.chunks(RESEAL_BATCH) {
            let (chunk, ring) = (chunk.to_vec(), ring.clone());
            let (n, plain) = self.in_keys_tx(move |tx| {
                let (mut n, mut plain) = (0, Vec::new());
                for name in &chunk {
                    let (wrote, refused) = keys::reseal_row(tx, &ring, name, false)?;
                    n += wrote;
                    if refused {
                        plain.push(name.clone());
                    }
                }
                Ok((n, plain))
            })?;
            report.sealed += n;
            report.plaintext.extend(plain);
        }
        let active = report.active;
        report.deleted = self.in_keys_tx(move |tx| keys::delete_unused(tx, active))?;
        Ok(report)
    }

    /// After sealing or re-sealing a SQLite file: rewrites it (`VACUUM`)
    /// and empties its WAL, so that the plaintext (or the values of a
    /// retired key) left in free pages and old WAL frames is gone.
    /// PostgreSQL keeps dead row versions until its own VACUUM (README
    /// "Secrets at rest").
    pub fn compact(&self) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(c) => Ok(c.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")?),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// `tokend keys rewrap`: every data key wrapped anew by `new`; returns
    /// how many.
    pub fn rewrap_keys(&self, new: Arc<Kek>) -> Result<usize> {
        let old = self.kek()?;
        self.in_keys_tx(move |tx| keys::rewrap_keys(tx, &old, &new))
    }

    /// Opens the database; with `create`, makes it (0600, in a 0700
    /// directory) if missing, otherwise a missing file is an error.
    pub fn open(path: &Path, create: bool) -> Result<StoreConn> {
        Self::open_tuned(path, create, Tuning::default())
    }

    /// [`open`](Self::open) with other SQLite settings than the defaults:
    /// for the store benchmark, which measures them.
    pub fn open_tuned(path: &Path, create: bool, tuning: Tuning) -> Result<StoreConn> {
        Self::open_sealed(
            &Database::Sqlite(path.to_owned()),
            create,
            None,
            tuning,
            true,
        )
    }
}

/// [`keys::open_keys`] on the daemon's SQLite connection, before the store
/// thread owns it: read outside a transaction unless a first data key is
/// to be made (see [`StoreConn`]'s `open_keys`).
pub(super) fn sqlite_open_keys(c: &Connection, kek: Option<&Kek>) -> Result<Vec<WrappedKey>> {
    let found = Lite(c).keys()?;
    if kek.is_none() || !found.is_empty() {
        return keys::open_keys(&mut Lite(c), kek);
    }
    immediate(c, |c| keys::open_keys(&mut Lite(c), kek))
}

/// Opens a SQLite store to read it without leaving a trace; None if that
/// cannot be done. A read-only connection to a WAL database makes its
/// `-wal` and `-shm` files when they are missing, and cannot remove them at
/// its close: as root (where `check-config` runs) in a directory of the
/// service user's, or with the mode of a store made loose by hand. When
/// neither is there, the main file holds everything committed, and is read
/// as immutable: no lock, no other file. When both are (a daemon has it
/// open), they are used. A `-wal` alone (left by a crash) holds commits
/// the main file lacks, and reading it would make the `-shm`: None.
fn open_to_look(path: &Path) -> Result<Option<Connection>> {
    use rusqlite::OpenFlags;
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p).exists()
    };
    match (with("-wal"), with("-shm")) {
        (true, true) => {
            return Ok(Some(Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?));
        }
        (true, false) => return Ok(None),
        _ => {}
    }
    let abs = std::path::absolute(path).map_err(|e| StoreError::Io(path.to_owned(), e))?;
    // An empty authority, then the absolute path (which may start `//`).
    let mut uri = String::from("file://");
    for &b in abs.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    Ok(Some(Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )?))
}

/// See [`StoreConn::open_tuned`]: the SQLite connection, private and migrated.
pub(super) fn open_sqlite(path: &Path, create: bool, tuning: Tuning) -> Result<Connection> {
    let io = |e| StoreError::Io(path.to_owned(), e);
    if create {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            // The store's own directory is private; the ones above it
            // that are missing are made as `mkdir -p` would (0755 less
            // the umask): a sink's directory beside the store's must stay
            // reachable by its consumers.
            if let Some(up) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(up)
                    .map_err(|e| StoreError::Io(up.to_owned(), e))?;
            }
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
    } else {
        // Only a file that is not there is "no database yet": one this
        // user may not reach (or a path through a file) is an error to
        // show, not an empty store.
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no database here yet (tokend import or tokend authorize creates it)",
                )));
            }
            Err(e) => return Err(io(e)),
            Ok(_) => {}
        }
    }
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "database file was readable by others; setting mode 0600");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    keep_private(path)?;
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    set_wal(&conn)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -tuning.cache_kib)?;
    set_checkpoint_interval(&conn, tuning)?;
    // The store caches 31 statements (the transaction statements
    // included): rusqlite's default of 16 would have the rarer ones push
    // out the ones every refresh runs, to be parsed again.
    conn.set_prepared_statement_cache_capacity(64);
    // Plans chosen without looking at bound values: otherwise SQLite marks
    // a parameter whose value it consulted, and rusqlite's cache clearing
    // the bindings (each time a statement goes back to it) expires the
    // statement, to be parsed and planned again on its next run. That
    // happened to the events' trimming on every refresh, a sixth of a
    // refresh's instructions (BENCHMARKS.md, "Store"), and statistics
    // from an ANALYZE would do it to every lookup by name. Our statements
    // are lookups by key, planned the same either way.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    migrate(&conn)?;
    Ok(conn)
}

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Puts the database in WAL mode (a no-op once it is: the mode is kept in
/// the file). The switch takes the database's exclusive lock, and while
/// another connection switches it too (two processes opening a new store
/// at once, say `tokend import` and the daemon's first start), SQLite
/// answers SQLITE_BUSY at once, without waiting as the busy timeout says:
/// so it is tried again here, for as long.
fn set_wal(conn: &Connection) -> Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return Ok(r?),
        }
    }
}

fn migrate(conn: &Connection) -> Result<()> {
    let v = ops::user_version(conn)?;
    if v > SCHEMA_VERSION {
        return Err(StoreError::TooNew(v));
    }
    let v = if (1..SCHEMA_VERSION).contains(&v) {
        immediate(conn, repair_version)?
    } else {
        v
    };
    // Each step looks at the version again once it holds the write lock:
    // another process may have migrated while we waited for it. Step 1
    // run again would set the version back to 1 under a newer schema,
    // and every later open would fail on step 2's columns.
    if v < 1 {
        immediate(conn, |c| {
            if ops::user_version(c)? >= 1 {
                return Ok(());
            }
            ops::migrate_to_1(c)
        })?;
    }
    if v < 2 {
        // Lease fencing, and the provider's Retry-After kept apart from
        // the backoff so that nothing brings an attempt before it.
        immediate(conn, |c| {
            if ops::user_version(c)? >= 2 {
                return Ok(());
            }
            ops::migrate_to_2(c)
        })?;
    }
    if v < 3 {
        // The credential's grant: client_credentials beside refresh tokens.
        immediate(conn, |c| {
            if ops::user_version(c)? >= 3 {
                return Ok(());
            }
            ops::migrate_to_3(c)
        })?;
    }
    if v < 4 {
        // The wrapped data keys of a sealed store (README "Secrets at rest").
        immediate(conn, |c| {
            if ops::user_version(c)? >= 4 {
                return Ok(());
            }
            keys::migrate_to_4(c)?;
            record_version(c, 4)
        })?;
    }
    if v < 5 {
        // The fingerprint of the refresh token each credential was given.
        immediate(conn, |c| {
            if ops::user_version(c)? >= 5 {
                return Ok(());
            }
            ops::migrate_to_5(c)?;
            record_version(c, 5)
        })?;
    }
    Ok(())
}

/// The file's version, set right where an earlier build's first-open race
/// set it back: a process that had read version 0 ran step 1 again after
/// another had migrated further, which left `user_version` at 1 under a
/// newer schema, and every later open failed on step 2's columns. Each
/// step adds its columns or table and its version in one transaction, so
/// the schema itself tells the version it reached.
fn repair_version(c: &Connection) -> Result<i64> {
    let v = ops::user_version(c)?;
    let has = |table: &str, column: &str| -> Result<bool> {
        let n: i64 = c
            .prepare("SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2")?
            .query_row([table, column], |r| r.get(0))?;
        Ok(n > 0)
    };
    let found = if has("credentials", "given_fp")? {
        5
    } else if has("keys", "wrapped")? {
        4
    } else if has("credentials", "grant_type")? {
        3
    } else if has("credentials", "fence")? {
        2
    } else {
        v
    };
    if found <= v {
        return Ok(v);
    }
    tracing::warn!(
        from = v,
        to = found,
        "the store's schema version was behind its schema (an interrupted first open); set to the schema's"
    );
    c.pragma_update(None, "user_version", found)?;
    Ok(found)
}

/// Writes the schema version into `tokend_schema`, the table PostgreSQL's
/// store keeps it in, so that both stores answer a DBA's
/// `SELECT version FROM tokend_schema` alike. SQLite's own check stays
/// `PRAGMA user_version`, which the same transaction sets.
fn record_version(c: &Connection, version: i64) -> Result<()> {
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS tokend_schema (version INTEGER NOT NULL);
         DELETE FROM tokend_schema;",
    )?;
    c.execute("INSERT INTO tokend_schema (version) VALUES (?1)", [version])?;
    Ok(())
}

/// Runs `f` in a write transaction taken up front, so that a busy peer
/// makes us wait (busy_timeout) instead of failing half-way.
pub(super) fn immediate<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match f(conn) {
        Ok(v) => match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(v),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e.into())
            }
        },
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

impl StoreConn {
    pub fn load_all(&self) -> Result<Vec<Credential>> {
        self.opened(match &self.backend {
            Backend::Sqlite(c) => ops::load_all(c),
            Backend::Postgres(j) => j.call(pg::ops::load_all),
        })
    }

    /// Forgets a credential: its row, events and lease. Returns whether it existed.
    pub fn remove(&self, name: &str) -> Result<bool> {
        match &self.backend {
            Backend::Sqlite(c) => immediate(c, |c| ops::remove(c, name)),
            Backend::Postgres(j) => {
                let name = name.to_owned();
                j.call(move |c| pg::ops::remove(c, &name))
            }
        }
    }

    /// Forgets a credential as [`remove`](Self::remove) does, only while
    /// `holder` still has its lease `fence`: whether it did. A holder
    /// stopped longer than its lease (a VM paused) finds another process
    /// may have refreshed the credential meanwhile.
    pub fn remove_held(&self, name: &str, holder: &str, fence: i64) -> Result<bool> {
        match &self.backend {
            Backend::Sqlite(c) => immediate(c, |c| ops::remove_held(c, name, holder, fence)),
            Backend::Postgres(j) => {
                let (name, holder) = (name.to_owned(), holder.to_owned());
                j.call(move |c| pg::ops::remove_held(c, &name, &holder, fence))
            }
        }
    }

    /// Takes the credential's lease, as the refresher does, for work that
    /// is not a refresh (`tokend remove --revoke`): while it is held no
    /// refresh starts anywhere, and none is in flight.
    pub fn hold_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<super::Lease> {
        let lease = match &self.backend {
            Backend::Sqlite(c) => immediate(c, |c| ops::hold_lease(c, name, holder, ttl)),
            Backend::Postgres(j) => {
                let (name, holder) = (name.to_owned(), holder.to_owned());
                j.call(move |c| pg::ops::hold_lease(c, &name, &holder, ttl))
            }
        }?;
        let fence = match &lease {
            super::Lease::Taken { fence, .. } => Some(*fence),
            _ => None,
        };
        // A lease on a row whose tokens do not open is of no use: given
        // back at once (it marked nothing), not left to keep others out.
        self.opened(Ok(lease)).inspect_err(|_| {
            if let Some(fence) = fence {
                let _ = self.release_lease(name, holder, fence);
            }
        })
    }

    /// [`hold_lease`](Self::hold_lease) on many credentials
    /// (`import --from FILE --force`): the fences of those taken, and the
    /// names another holder has (a refresh in flight). Names not stored
    /// are skipped; a store `tokend migrate` moved away answers
    /// [`StoreError::MovedOut`]. Taken a thousand to a transaction, in
    /// name order as every batch locks rows: one transaction for a large
    /// batch would hold SQLite's write lock long enough for a refresh in
    /// flight elsewhere to miss its lease's renewal, and lose its lease
    /// (and its rotated token) to this batch.
    pub fn hold_leases(
        &self,
        names: &[String],
        holder: &str,
        ttl: Duration,
    ) -> Result<(Held, Vec<String>)> {
        let mut names = names.to_vec();
        names.sort();
        let (mut held, mut busy) = (Vec::new(), Vec::new());
        for chunk in names.chunks(LEASES_PER_TRANSACTION) {
            let leases = match &self.backend {
                Backend::Sqlite(c) => immediate(c, |c| {
                    chunk
                        .iter()
                        .map(|n| {
                            ops::moved_away(c, n)?;
                            Ok((n.clone(), ops::hold_lease(c, n, holder, ttl)?))
                        })
                        .collect::<Result<Vec<_>>>()
                }),
                Backend::Postgres(j) => {
                    let (chunk, holder) = (chunk.to_vec(), holder.to_owned());
                    j.call(move |c| {
                        chunk
                            .iter()
                            .map(|n| {
                                pg::ops::moved_away(c, n)?;
                                Ok((n.clone(), pg::ops::hold_lease(c, n, &holder, ttl)?))
                            })
                            .collect::<Result<Vec<_>>>()
                    })
                }
            };
            let leases = match leases {
                Ok(l) => l,
                Err(e) => {
                    // Those taken before are given back, not left to run out.
                    let _ = self.release_leases(&held, holder);
                    return Err(e);
                }
            };
            for (name, lease) in leases {
                match lease {
                    super::Lease::Taken { fence, .. } => held.push((name, fence)),
                    super::Lease::Busy { .. } => busy.push(name),
                    super::Lease::Gone | super::Lease::Changed(_) => {}
                }
            }
        }
        Ok((held, busy))
    }

    /// Gives back leases [`hold_leases`](Self::hold_leases) took, a
    /// thousand to a transaction.
    pub fn release_leases(&self, held: &[(String, i64)], holder: &str) -> Result<()> {
        for chunk in held.chunks(LEASES_PER_TRANSACTION) {
            match &self.backend {
                Backend::Sqlite(c) => immediate(c, |c| {
                    chunk
                        .iter()
                        .try_for_each(|(n, fence)| ops::release(c, n, holder, *fence))
                })?,
                Backend::Postgres(j) => {
                    let (chunk, holder) = (chunk.to_vec(), holder.to_owned());
                    j.call(move |c| {
                        chunk
                            .iter()
                            .try_for_each(|(n, fence)| pg::ops::release(c, n, &holder, *fence))
                    })?
                }
            }
        }
        Ok(())
    }

    /// Gives back `holder`'s lease `fence` on a credential, and no other
    /// (see `ops::release`).
    pub fn release_lease(&self, name: &str, holder: &str, fence: i64) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(c) => immediate(c, |c| ops::release(c, name, holder, fence)),
            Backend::Postgres(j) => {
                let (name, holder) = (name.to_owned(), holder.to_owned());
                j.call(move |c| pg::ops::release(c, &name, &holder, fence))
            }
        }
    }

    /// One credential: a command looks before it asks the user for work
    /// that an existing name would waste (`authorize` without `--force`).
    pub fn get(&self, name: &str) -> Result<Option<Credential>> {
        self.opened(match &self.backend {
            Backend::Sqlite(c) => ops::get(c, name),
            Backend::Postgres(j) => {
                let name = name.to_owned();
                j.call(move |c| pg::ops::get(c, &name))
            }
        })
    }

    /// Stores a new credential; a name already stored is refused
    /// ([`StoreError::Exists`]).
    pub fn insert(&self, new: &NewCredential) -> Result<Credential> {
        self.write_new(new, Over::No)
    }

    /// Stores `new` in place of the credential of that name, if there is
    /// one (`import --force`, `authorize --force`): its version moves on,
    /// so an attempt that read the old row cannot write over it. Never
    /// while a refresh of it is in flight ([`StoreError::InUse`]: that
    /// refresh's rotated token would be thrown away; its caller waits);
    /// never with the refresh token the credential was given if tokend
    /// has rotated it since ([`StoreError::Spent`]); and not at all when
    /// the credential holds these tokens already ([`Replaced::Unchanged`]).
    pub fn replace(&self, new: &NewCredential) -> Result<Replaced> {
        let mut tries = 0;
        loop {
            let (current, given) = match self.look(Some(&new.name))?.0.pop() {
                Some((c, g)) => (Some(c), g),
                None => (None, None),
            };
            let Plan::Over(at) = plan_replace(new, current.as_ref(), given.as_deref())? else {
                return Ok(Replaced::Unchanged);
            };
            match self.write_new(new, Over::Row(at)) {
                // Written by another between the look and the write: look
                // again, a few times.
                Err(StoreError::Moved) if tries < REPLACE_TRIES => tries += 1,
                r => return r.map(|c| Replaced::Stored(Box::new(c))),
            }
        }
    }

    /// The rows named (all, for None) with the fingerprints of the
    /// refresh tokens they were given (schema 5), their tokens opened.
    fn look(&self, name: Option<&str>) -> Result<Looked> {
        self.opened(match &self.backend {
            Backend::Sqlite(c) => ops::looked(c, name),
            Backend::Postgres(j) => {
                let name = name.map(str::to_owned);
                j.call(move |c| pg::ops::looked(c, name.as_deref()))
            }
        })
    }

    fn write_new(&self, new: &NewCredential, over: Over) -> Result<Credential> {
        let given = new.grant.refresh_token().map(given_fingerprint);
        self.with_keys_reloaded(|| {
            let (new, with) = self.sealer.seal_new(new)?;
            let given = given.clone();
            self.opened(match &self.backend {
                Backend::Sqlite(c) => immediate(c, |c| {
                    let r = ops::insert(c, &new, over, given.as_deref())?;
                    keys::check_active(&mut Lite(c), with)?;
                    Ok(r)
                }),
                // The keys first, as every change of the keys does, then
                // the row: `keys seal` locks `keys`, then every row.
                Backend::Postgres(j) => j.call(move |c| {
                    keys::check_active(c, with)?;
                    pg::ops::insert(c, &new, over, given.as_deref())
                }),
            })
        })
    }

    /// Runs a write that seals; if another process changed the data keys
    /// meanwhile ([`StoreError::KeysChanged`]), once more with them.
    fn with_keys_reloaded<T>(&self, f: impl Fn() -> Result<T>) -> Result<T> {
        match f() {
            Err(StoreError::KeysChanged) => {
                self.reload_keys()?;
                f()
            }
            r => r,
        }
    }

    /// Stores many new credentials in one transaction, all or none: a name
    /// that is already stored (or comes twice) refuses the whole batch. One
    /// [`insert`](Self::insert) each would wait for one sync each.
    pub fn insert_all(&self, new: &[NewCredential]) -> Result<()> {
        self.insert_batch(new, false).map(drop)
    }

    /// [`insert_all`](Self::insert_all), where `replace` stores credentials
    /// in place of those of the same names as [`replace`](Self::replace)
    /// does, all or none (`tokend import --from FILE --force`). Returns how
    /// many were left as they were, holding these tokens already.
    pub fn insert_batch(&self, new: &[NewCredential], replace: bool) -> Result<usize> {
        let mut tries = 0;
        loop {
            let (mut plans, mut unchanged) = (Vec::with_capacity(new.len()), 0);
            if replace {
                let names: std::collections::HashSet<&str> =
                    new.iter().map(|n| n.name.as_str()).collect();
                let mut current: std::collections::HashMap<String, (Credential, Option<String>)> =
                    self.look(None)?
                        .0
                        .into_iter()
                        .filter(|(c, _)| names.contains(c.name.as_str()))
                        .map(|row| (row.0.name.clone(), row))
                        .collect();
                for n in new {
                    let (cur, given) = match current.remove(&n.name) {
                        Some((c, g)) => (Some(c), g),
                        None => (None, None),
                    };
                    match plan_replace(n, cur.as_ref(), given.as_deref())? {
                        Plan::Over(at) => plans.push((n, Over::Row(at))),
                        Plan::Unchanged => unchanged += 1,
                    }
                }
            } else {
                plans.extend(new.iter().map(|n| (n, Over::No)));
            }
            match self.write_batch(&plans) {
                Err(StoreError::Moved) if tries < REPLACE_TRIES => tries += 1,
                r => return r.map(|()| unchanged),
            }
        }
    }

    fn write_batch(&self, plans: &[(&NewCredential, Over)]) -> Result<()> {
        if plans.is_empty() {
            return Ok(());
        }
        self.with_keys_reloaded(|| {
            let mut with = None;
            let mut sealed = Vec::with_capacity(plans.len());
            for (n, over) in plans {
                let given = n.grant.refresh_token().map(given_fingerprint);
                let (n, w) = self.sealer.seal_new(n)?;
                with = w;
                sealed.push((n, *over, given));
            }
            match &self.backend {
                Backend::Sqlite(c) => immediate(c, |c| {
                    sealed.iter().try_for_each(|(n, over, given)| {
                        ops::insert(c, n, *over, given.as_deref()).map(drop)
                    })?;
                    keys::check_active(&mut Lite(c), with)
                }),
                Backend::Postgres(j) => j.call(move |c| {
                    keys::check_active(c, with)?;
                    sealed.iter().try_for_each(|(n, over, given)| {
                        pg::ops::insert(c, n, *over, given.as_deref()).map(drop)
                    })
                }),
            }
        })
    }
}

/// How many leases [`StoreConn::hold_leases`] takes (or gives back) in one
/// transaction.
const LEASES_PER_TRANSACTION: usize = 1000;

/// Leases taken by [`StoreConn::hold_leases`]: each name and its fence.
pub type Held = Vec<(String, i64)>;

/// How often a replacement looks again at a row written by another
/// between its look and its write, before it gives up.
const REPLACE_TRIES: u32 = 5;

/// What replacing a credential does.
enum Plan {
    /// Nothing: it holds these tokens already.
    Unchanged,
    /// Writes, provided the row still holds this token (None: no row).
    Over(Option<super::TokenAt>),
}

/// What replacing the credential `current` (None: there is none) with
/// `new` does, from its tokens as they are and the fingerprint of the
/// refresh token it was `given`.
fn plan_replace(
    new: &NewCredential,
    current: Option<&Credential>,
    given: Option<&str>,
) -> Result<Plan> {
    let Some(cur) = current else {
        return Ok(Plan::Over(None));
    };
    if let (Some(incoming), Some(held)) = (new.grant.refresh_token(), cur.grant.refresh_token()) {
        if incoming == held {
            // An access token given is a change unless it is the one
            // held, with no other expiry. The scope is not compared: an
            // import fills it from the config, a refresh from the
            // provider's answer, and the same token is the same grant.
            // Nor is a stopped credential left as it is: the same token
            // imported again once its configuration was mended is how it
            // is tried again.
            let same_access = new.access_token.as_ref().is_none_or(|a| {
                cur.access_token.as_ref() == Some(a)
                    && new.expires_at.is_none_or(|e| cur.expires_at == Some(e))
            });
            let stopped = matches!(
                cur.state,
                super::State::NeedsReauthorization | super::State::Misconfigured
            );
            if same_access && cur.provider == new.provider && !stopped {
                return Ok(Plan::Unchanged);
            }
        } else if given == Some(given_fingerprint(incoming).as_str()) {
            // The credential was given this token, and holds another now:
            // only a refresh changes it without a new `given`.
            return Err(StoreError::Spent(new.name.clone()));
        }
    }
    Ok(Plan::Over(Some(cur.token_at())))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::store::Grant;
    use crate::store::tests::new_cred;

    #[test]
    fn creates_private_file_and_migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tokend.db");
        let sc = StoreConn::open(&path, true).unwrap();
        sc.insert(&new_cred("a")).unwrap();
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
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // CI runs as root; elsewhere say so rather than pass silently.
            assert!(
                std::env::var_os("TOKEND_TESTS_MAY_SKIP").is_some(),
                "this test needs root (set TOKEND_TESTS_MAY_SKIP=1 to skip it)"
            );
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
        let a = sc.insert(&new_cred("a")).unwrap();
        assert!(matches!(
            sc.insert(&new_cred("a")),
            Err(StoreError::Exists(_))
        ));
        let mut other = new_cred("a");
        other.grant = Grant::RefreshToken(Secret::new("rt-other"));
        let Replaced::Stored(b) = sc.replace(&other).unwrap() else {
            panic!("not replaced")
        };
        assert_eq!(b.version, a.version + 1);
        assert_eq!(b.created_at, a.created_at);
    }

    #[test]
    fn insert_all_stores_every_one_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let sc = StoreConn::open(&dir.path().join("t.db"), true).unwrap();
        sc.insert_all(&[new_cred("a"), new_cred("b")]).unwrap();
        let names = |sc: &StoreConn| -> Vec<String> {
            sc.load_all().unwrap().into_iter().map(|c| c.name).collect()
        };
        assert_eq!(names(&sc), ["a", "b"]);
        assert_eq!(sc.get("b").unwrap().unwrap().version, 1);
        // "b" exists: "c" before it is not stored either.
        assert!(matches!(
            sc.insert_all(&[new_cred("c"), new_cred("b")]),
            Err(StoreError::Exists(n)) if n == "b"
        ));
        assert!(matches!(
            sc.insert_all(&[new_cred("d"), new_cred("d")]),
            Err(StoreError::Exists(_))
        ));
        assert_eq!(names(&sc), ["a", "b"]);
    }

    /// A new store opened by several processes at once (`tokend import`
    /// beside the daemon's first start): every one opens it, and it is
    /// left at the current schema. Before, switching the file to WAL,
    /// SQLite answered "database is locked" at once to all but one; and a
    /// process that had read version 0 created the schema again after
    /// another had migrated it, set the version back to 1, and failed on
    /// the next step's columns, as every later open then did.
    #[test]
    fn a_new_store_opened_by_many_at_once_opens_for_all() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tokend.db");
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let opened: Vec<_> = (0..8)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        StoreConn::open(&path, true).map(drop)
                    })
                })
                .collect();
            for t in opened {
                t.join().unwrap().unwrap();
            }
            let c = Connection::open(&path).unwrap();
            assert_eq!(ops::user_version(&c).unwrap(), SCHEMA_VERSION);
            StoreConn::open(&path, false).unwrap();
        }
    }

    /// A new store's own directory is made 0700; the missing ones above it
    /// as `mkdir -p` makes them, so that a sink under one of them stays
    /// reachable. All were made 0700.
    #[test]
    fn only_the_store_s_own_directory_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("srv/app/state");
        StoreConn::open(&state.join("tokend.db"), true).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
            .unwrap();
        for up in [dir.path().join("srv"), dir.path().join("srv/app")] {
            assert_eq!(mode(&up), 0o755 & !umask, "{}", up.display());
        }
    }

    /// A store left at version 1 under a newer schema by an earlier
    /// build's first-open race (`a_new_store_opened_by_many_at_once_opens_for_all`)
    /// opens again: its version
    /// is read from the schema, and its rows are kept.
    #[test]
    fn a_store_set_back_to_version_1_by_the_old_race_opens() {
        for reached in 2..=SCHEMA_VERSION {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tokend.db");
            {
                std::fs::File::create(&path).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
                    .unwrap();
                let c = Connection::open(&path).unwrap();
                ops::migrate_to_1(&c).unwrap();
                ops::migrate_to_2(&c).unwrap();
                if reached >= 3 {
                    ops::migrate_to_3(&c).unwrap();
                }
                if reached >= 4 {
                    keys::migrate_to_4(&c).unwrap();
                    record_version(&c, 4).unwrap();
                }
                if reached >= 5 {
                    ops::migrate_to_5(&c).unwrap();
                    record_version(&c, 5).unwrap();
                }
                c.execute(
                    "INSERT INTO credentials (name, provider, access_token, refresh_token,
                        issued_at, state, created_at, updated_at, version, rev)
                     VALUES ('old', 'p', 'at', 'rt-old', 1, 'valid', 1, 1, 1, 1)",
                    [],
                )
                .unwrap();
                // What the race's second step 1 left.
                ops::migrate_to_1(&c).unwrap();
                assert_eq!(ops::user_version(&c).unwrap(), 1);
            }
            let sc = StoreConn::open(&path, false)
                .unwrap_or_else(|e| panic!("a store at schema {reached} does not open: {e}"));
            assert_eq!(
                ops::user_version(&Connection::open(&path).unwrap()).unwrap(),
                SCHEMA_VERSION
            );
            let old = sc.get("old").unwrap().unwrap();
            assert_eq!(old.grant, Grant::RefreshToken(Secret::new("rt-old")));
        }
    }

    /// Issue 13: a version 2 file (before the grant column) opens as
    /// version 3 (and on, to the current one), its rows keeping their refresh tokens; two processes
    /// starting at once on it migrate it once.
    #[test]
    fn a_version_2_database_migrates_to_3() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            std::fs::File::create(&path).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
            let c = Connection::open(&path).unwrap();
            ops::migrate_to_1(&c).unwrap();
            ops::migrate_to_2(&c).unwrap();
            c.execute(
                "INSERT INTO credentials (name, provider, access_token, refresh_token,
                    issued_at, state, created_at, updated_at, version, rev)
                 VALUES ('old', 'p', 'at', 'rt-old', 1, 'valid', 1, 1, 1, 1)",
                [],
            )
            .unwrap();
        }
        let opened: Vec<_> = (0..2)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || StoreConn::open(&path, false).map(drop))
            })
            .collect();
        for t in opened {
            t.join().unwrap().unwrap();
        }
        let sc = StoreConn::open(&path, false).unwrap();
        assert_eq!(
            ops::user_version(&Connection::open(&path).unwrap()).unwrap(),
            SCHEMA_VERSION
        );
        let old = sc.get("old").unwrap().unwrap();
        assert_eq!(old.grant, Grant::RefreshToken(Secret::new("rt-old")));
        let mut cc = new_cred("machine");
        cc.grant = Grant::ClientCredentials;
        sc.insert(&cc).unwrap();
        assert_eq!(
            sc.get("machine").unwrap().unwrap().grant,
            Grant::ClientCredentials
        );
    }
}
