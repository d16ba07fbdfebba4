//! The state store: SQLite, or PostgreSQL for a fleet of hosts (issue 12),
//! behind a narrow interface of our own.
//!
//! Nothing outside this module speaks SQL or learns which backend it has;
//! `pg/` is the PostgreSQL one, the rest below is SQLite's. Two faces:
//!
//! * [`StoreConn`], synchronous, for the command line (`import`, `list`);
//! * [`Store`], for the daemon: one thread owns the connection and runs every
//!   operation that arrives while the previous commit was in progress in one
//!   transaction (group commit), each inside its own savepoint. With
//!   `synchronous=FULL` every commit costs an fsync; grouping lets ten thousand
//!   refreshes share a few hundred of them. A caller's answer is sent only
//!   after its transaction committed: *commit, then publish*.
//!
//! Here are the types both faces speak and the [`Store`] handle, whose
//! methods only send work to the store thread (`thread.rs`: the batches,
//! their transactions). `conn.rs` opens the database (private, migrated);
//! `ops.rs` holds every SQL statement.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::seal::{Column, Kek, Keyring};
use crate::secret::Secret;

mod conn;
mod copy;
mod database;
mod keys;
mod ops;
mod pg;
mod thread;

#[cfg(test)]
mod tests;

pub use conn::{StoreConn, Tuning};
pub use copy::{Dump, MOVED};
pub use database::{Database, PgUrl};
pub use keys::{KeysReport, StoredTokens, fingerprint_of};
pub use pg::{Changed, Changes, Outage};

/// Why a store operation failed.
#[derive(Debug)]
pub enum StoreError {
    Sqlite(rusqlite::Error),
    /// A PostgreSQL error, already made safe to show: no row's values, no
    /// part of the connection URL.
    Postgres(String),
    Io(PathBuf, std::io::Error),
    /// `import` of a name that is already there, without `--force`.
    Exists(String),
    NotFound(String),
    /// A live lease stands in the way (`tokend migrate`, or a replacement
    /// while the credential is being refreshed): what, and what to do.
    InUse(String),
    /// A replacement (`import --force`) brought back the refresh token the
    /// credential was given, which tokend has rotated since: refused, as a
    /// rotating provider no longer accepts it and one that detects reuse
    /// would revoke the grant (README "Onboarding").
    Spent(String),
    /// The row changed between a replacement's look at it and its write:
    /// looked at again ([`StoreConn::replace`]).
    Moved,
    /// A replacement in a store `tokend migrate` moved away (its rows
    /// leased to [`MOVED`] for good).
    MovedOut(String),
    /// The file was written by a newer tokend.
    TooNew(i64),
    /// The transaction holding the operation did not commit.
    Commit(String),
    /// The store thread is gone (the daemon is shutting down).
    Closed,
    /// Sealing (README "Secrets at rest"): a key that does not open the
    /// store, a sealed store without a key, a value that does not open.
    /// The text names files, credentials, key ids and fingerprints, never
    /// a token or a key.
    Seal(String),
    /// A token column of a sealed store holds plaintext: refused, since
    /// whoever can write to the database could have planted it.
    Plaintext {
        name: String,
        column: Column,
    },
    /// The store's active data key is not the one a write sealed with
    /// (another process rotated it, or sealed the store): the write was
    /// rolled back, to be sealed again after the keys are read again.
    KeysChanged,
    /// A token pair kept by an earlier run that could not be stored then
    /// cannot be read now (src/refresher/unstored.rs): the text names its
    /// file, never its content.
    Unstored(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "database error: {e}"),
            StoreError::Postgres(e) => write!(f, "PostgreSQL error: {e}"),
            StoreError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            StoreError::Exists(n) => write!(f, "a credential named {n:?} already exists"),
            StoreError::NotFound(n) => write!(f, "no credential named {n:?}"),
            StoreError::InUse(why) => f.write_str(why),
            StoreError::Spent(n) => write!(
                f,
                "this is the refresh token {n:?} was imported or authorized with, and tokend has \
                 refreshed it since: a provider that rotates refresh tokens no longer accepts \
                 it, and one that detects reuse would revoke the whole grant if it came back. \
                 Nothing was changed; {n:?} keeps its current tokens. To replace the grant, give \
                 a refresh token tokend has not held, or authorize it again"
            ),
            StoreError::Moved => write!(f, "the credential changed while it was being replaced"),
            StoreError::MovedOut(n) => write!(
                f,
                "{n:?} was moved to another store by 'tokend migrate', and this one is kept \
                 only as a backup: import into the store the config names now"
            ),
            StoreError::TooNew(v) => write!(
                f,
                "the database has schema version {v}, newer than this tokend understands ({}): upgrade tokend",
                conn::SCHEMA_VERSION
            ),
            StoreError::Commit(e) => write!(f, "database commit failed: {e}"),
            StoreError::Closed => write!(f, "the store is closed"),
            StoreError::Seal(e) => f.write_str(e),
            StoreError::Plaintext { name, column } => write!(
                f,
                "the {column} of {name:?} is stored in plaintext in a sealed store: refused \
                 (whoever can write to the database may have planted it); authorize or \
                 import the credential again"
            ),
            StoreError::KeysChanged => write!(
                f,
                "the store's data keys changed during the operation (another process rotated \
                 them): run it again"
            ),
            StoreError::Unstored(why) => f.write_str(why),
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

pub use crate::wire::{GrantKind, State};

/// What a credential's next access token is obtained with. A type rather
/// than an empty refresh token, so that no path can send a refresh_token
/// grant for a credential that has none, or call its grant dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// The refresh_token grant (RFC 6749 §6): this refresh token, replaced
    /// by each rotation.
    RefreshToken(Secret),
    /// The client_credentials grant (RFC 6749 §4.4): the client's own
    /// credentials, from the config. Nothing the provider answers can make
    /// it need a new authorization.
    ClientCredentials,
    /// A refresh_token grant whose stored refresh token was refused when
    /// read: plaintext in a sealed store, or a sealed value that does not
    /// open (README "Secrets at rest"; the reason is in `last_error`).
    /// Nothing can be sent for it until it is authorized again.
    Refused,
}

impl Grant {
    pub fn refresh_token(&self) -> Option<&Secret> {
        match self {
            Grant::RefreshToken(t) => Some(t),
            Grant::ClientCredentials | Grant::Refused => None,
        }
    }

    pub fn kind(&self) -> GrantKind {
        match self {
            Grant::RefreshToken(_) | Grant::Refused => GrantKind::RefreshToken,
            Grant::ClientCredentials => GrantKind::ClientCredentials,
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
    pub grant: Grant,
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

/// Which token a result is about, for the writes that record it (a
/// validation's answer, a failed refresh): the row's version, and its
/// creation, which tells a name removed and imported again (at version
/// 1 anew) from the row it replaced. Such a write lands only on that
/// token's row; otherwise it answers [`Commit::Conflict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenAt {
    pub version: i64,
    pub created_at: i64,
}

impl Credential {
    /// The token this row holds now, for [`TokenAt`]'s writes.
    pub fn token_at(&self) -> TokenAt {
        TokenAt {
            version: self.version,
            created_at: self.created_at,
        }
    }
}

/// What [`StoreConn::replace`] did.
#[derive(Debug)]
pub enum Replaced {
    Stored(Box<Credential>),
    /// The credential already held this refresh token (for the same
    /// provider, and no other access token or expiry was given): nothing
    /// was written, so its state, backoff and Retry-After stand. A re-run
    /// of the same `import --force` is a no-op.
    Unchanged,
}

/// Rows as a replacement looks at them, each with the fingerprint of the
/// refresh token it was last given (`given_fp`), read in one transaction:
/// read apart, an import landing between the two reads would pair a row
/// with another row's fingerprint.
pub(super) struct Looked(pub Vec<(Credential, Option<String>)>);

/// How an insert treats a row already stored under the name.
#[derive(Debug, Clone, Copy)]
enum Over {
    /// Refused ([`StoreError::Exists`]).
    No,
    /// Replaced, provided the row holds this token (None: no row), as
    /// the replacement saw it; otherwise [`StoreError::Moved`].
    Row(Option<TokenAt>),
}

/// The fingerprint kept of the refresh token a credential was given
/// (`given_fp`): SHA-256, which tells nothing usable about a random token,
/// so that a replacement can recognise that token after tokend rotated
/// it away.
fn given_fingerprint(token: &Secret) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.expose().as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// What `import` and `authorize` store.
#[derive(Clone)]
pub struct NewCredential {
    pub name: String,
    pub provider: String,
    pub access_token: Option<Secret>,
    pub grant: Grant,
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

/// The `lease_lost` event's text, one for both backends: `what` (a
/// refreshed pair, a failure) came from a holder whose lease had passed on.
fn lease_lost_detail(what: &str) -> String {
    format!("{what} arrived after this process's lease had passed to another; not stored")
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

/// The daemon's handle on the store's thread (SQLite's or PostgreSQL's).
/// Cloning is cheap.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// Seals tokens on the way in, opens them on the way out (`keys.rs`).
    sealer: Arc<keys::Sealer>,
}

#[derive(Clone)]
enum Backend {
    Sqlite(thread::Jobs),
    Postgres(pg::Jobs),
}

/// Runs an operation on the store's backend: `$sqlite` (a closure over
/// SQLite's connection, in a write transaction if `$writes`) or `$pg` (over
/// a PostgreSQL transaction of its own). Both arms move the same captures:
/// only one runs.
macro_rules! run {
    ($store:expr, $writes:expr, $sqlite:expr, $pg:expr) => {
        match &$store.backend {
            Backend::Sqlite(j) => j.send($sqlite, $writes).await,
            Backend::Postgres(j) => j.send($pg).await,
        }
    };
    // A write to credential `$name`'s rows and no other's: on PostgreSQL
    // it may share a transaction with others of the kind (group commit,
    // `pg/mod.rs`), as every SQLite write does.
    ($store:expr, on $name:expr, $sqlite:expr, $pg:expr) => {
        match &$store.backend {
            Backend::Sqlite(j) => j.send($sqlite, WRITE).await,
            Backend::Postgres(j) => j.send_on($name, false, $pg).await,
        }
    };
    // The same, for a write whose lease's time is running out as it waits
    // (a commit, a renewal): on PostgreSQL it waits in the pool's urgent
    // lane, taken before any other write (`pg/mod.rs`).
    ($store:expr, urgent on $name:expr, $sqlite:expr, $pg:expr) => {
        match &$store.backend {
            Backend::Sqlite(j) => j.send($sqlite, WRITE).await,
            Backend::Postgres(j) => j.send_on($name, true, $pg).await,
        }
    };
}

/// Reads only: in WAL mode a SQLite read never waits for another
/// process's write lock, so loading the credentials at start-up and
/// picking up a peer's changes keep working while someone holds the
/// database (a `sqlite3` shell in a transaction).
const READ: bool = false;
/// Writes: SQLite runs it in the next write transaction.
const WRITE: bool = true;

impl Store {
    /// Opens (creating if needed) the SQLite file and starts the store
    /// thread, without an encryption key: a sealed store is refused.
    pub fn open(path: &Path) -> Result<Store> {
        Self::open_tuned(path, Tuning::default())
    }

    /// Opens the store the config's `database` names, sealed with its
    /// encryption key if it gives one (README "Secrets at rest").
    pub fn open_config(config: &crate::config::Config) -> Result<Store> {
        let kek = config.sealing.as_ref().map(|s| s.kek.clone());
        Self::open_sealed(&config.database, kek, Tuning::default())
    }

    /// Opens the store `db` names, without an encryption key: a SQLite
    /// file (created if needed) or a PostgreSQL database (its schema
    /// created or upgraded).
    pub fn open_database(db: &Database) -> Result<Store> {
        Self::open_sealed(db, None, Tuning::default())
    }

    /// [`open`](Self::open) with other SQLite settings (the store benchmark).
    pub fn open_tuned(path: &Path, tuning: Tuning) -> Result<Store> {
        Self::open_sealed(&Database::Sqlite(path.to_owned()), None, tuning)
    }

    /// Opens the store with the key-encryption key `kek`, if any: its data
    /// keys are loaded (a plaintext store without credentials is sealed
    /// first), before any token is read (`keys.rs`).
    fn open_sealed(db: &Database, kek: Option<Arc<Kek>>, tuning: Tuning) -> Result<Store> {
        let k = kek.clone();
        let (backend, found) = match db {
            Database::Sqlite(path) => {
                let conn = conn::open_sqlite(path, true, tuning)?;
                let found = conn::sqlite_open_keys(&conn, k.as_deref())?;
                (
                    Backend::Sqlite(thread::Jobs::start(conn, path, tuning)?),
                    found,
                )
            }
            Database::Postgres(url) => {
                let j = pg::Jobs::start(url)?;
                let found = j.call(move |c| keys::open_keys(c, k.as_deref()))?;
                (Backend::Postgres(j), found)
            }
        };
        Ok(Store {
            backend,
            sealer: Arc::new(keys::Sealer::new(kek, &found)?),
        })
    }

    /// Reads the `keys` table again (another process added a data key, a
    /// rotation, or sealed the store); returns the keys it read, which a
    /// read then opens its values with (`keys::Keys::Fresh`).
    async fn reload_keys(&self) -> Result<Option<Arc<Keyring>>> {
        let found = run!(self, READ, |c| keys::KeyTx::keys(&mut keys::Lite(c)), |c| {
            keys::KeyTx::keys(c)
        })?;
        self.sealer.install(&found)
    }

    /// `v` with its tokens opened (the data keys read again first if one
    /// of its values needs a key added since).
    async fn opened<T: keys::Tokens>(&self, v: Result<T>) -> Result<T> {
        let mut v = v?;
        let keys = if self.sealer.needs_reload(&mut v) {
            keys::Keys::Fresh(self.reload_keys().await?)
        } else {
            keys::Keys::Loaded
        };
        if !self.sealer.open(&mut v, keys)? {
            // A value the keys held do not open: refused, or not, only
            // with the keys as the table holds them now.
            let fresh = self.reload_keys().await?;
            self.sealer.open(&mut v, keys::Keys::Fresh(fresh))?;
        }
        Ok(v)
    }

    pub async fn load_all(&self) -> Result<Vec<Credential>> {
        self.opened(run!(self, READ, ops::load_all, pg::ops::load_all))
            .await
    }

    pub async fn get(&self, name: &str) -> Result<Option<Credential>> {
        let name = name.to_owned();
        let got = run!(self, READ, move |c| ops::get(c, &name), move |c| {
            pg::ops::get(c, &name)
        });
        self.opened(got).await
    }

    /// `(name, rev)` of every row: cheap enough to tell, after another
    /// process wrote, which rows to reload.
    pub async fn revisions(&self) -> Result<Vec<(String, i64)>> {
        run!(self, READ, ops::revisions, pg::ops::revisions)
    }

    /// What other processes committed, for a store that announces its
    /// commits (PostgreSQL: the names of the rows they changed, or
    /// "everything" after each reconnection, when some may have gone
    /// unheard). None for SQLite, whose file the daemon watches
    /// (inotify and [`data_version`](Self::data_version)).
    pub fn subscribe(&self) -> Option<Changes> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(j) => Some(j.subscribe()),
        }
    }

    /// Since when, and why, this process has not reached its database: a
    /// PostgreSQL server out of reach (README "Running a fleet"). Never for
    /// SQLite, whose file is local.
    pub fn outage(&self) -> Option<Outage> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(j) => j.outage(),
        }
    }

    /// SQLite's `data_version`: changes when *another* connection commits.
    /// PostgreSQL has no such counter: always 0 there (see
    /// [`subscribe`](Self::subscribe)).
    pub async fn data_version(&self) -> Result<i64> {
        run!(self, READ, ops::data_version, |_| Ok(0))
    }

    /// Takes the cross-process lease on a credential for `ttl`, so that only
    /// one process refreshes it, and notes that a refresh is starting (see
    /// [`Credential::refresh_started_at`]) — unless the row has moved on from
    /// the token `at` (rotated, or the name removed and imported again), in
    /// which case nothing is taken and the row returned: a refresh decided
    /// on one grant's token never spends another grant's.
    pub async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
        at: TokenAt,
    ) -> Result<Lease> {
        let (owned, holder_owned) = (name.to_owned(), holder.to_owned());
        let lease = run!(
            self,
            on owned.clone(),
            move |c| ops::take_lease(c, &owned, &holder_owned, ttl, at),
            move |c| pg::ops::take_lease(c, &owned, &holder_owned, ttl, at)
        )?;
        // The row as the lease found it, to put back should its tokens not
        // open: a lease nobody can use must not leave the row marked as
        // refreshing, nor keep other processes out until it expires.
        let taken = match &lease {
            Lease::Taken {
                credential, fence, ..
            } => Some((
                *fence,
                credential.version,
                credential.state,
                credential.refresh_started_at,
            )),
            _ => None,
        };
        match self.opened(Ok(lease)).await {
            Err(e) => {
                if let Some((fence, version, state, started)) = taken
                    && let Err(back) = self
                        .abandon(name, holder, fence, version, state, started)
                        .await
                {
                    tracing::warn!(credential = name, error = %back, "could not give back a lease whose row does not open");
                }
                Err(e)
            }
            ok => ok,
        }
    }

    /// Gives back lease `fence`, taken for a refresh whose request was
    /// never sent (the daemon is stopping): the row's state and "refresh
    /// started" mark return to those of `before`, the row as the lease
    /// found it, unless the row was replaced meanwhile (`authorize
    /// --force`, `import --force`): a new grant's row is not ours to
    /// mark.
    pub async fn abandon_lease(
        &self,
        name: &str,
        holder: &str,
        fence: i64,
        before: &Credential,
    ) -> Result<()> {
        self.abandon(
            name,
            holder,
            fence,
            before.version,
            before.state,
            before.refresh_started_at,
        )
        .await
    }

    async fn abandon(
        &self,
        name: &str,
        holder: &str,
        fence: i64,
        version: i64,
        state: State,
        started: Option<i64>,
    ) -> Result<()> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        let back = ops::Back {
            fence,
            version,
            state,
            started,
        };
        run!(
            self,
            on name.clone(),
            move |c| ops::abandon(c, &name, &holder, back),
            move |c| pg::ops::abandon(c, &name, &holder, back)
        )
    }

    /// Gives back `holder`'s lease `fence` on `name`, and no other: not one
    /// the same process took on a row of that name added since.
    pub async fn release_lease(&self, name: &str, holder: &str, fence: i64) -> Result<()> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        run!(
            self,
            on name.clone(),
            move |c| ops::release(c, &name, &holder, fence),
            move |c| pg::ops::release(c, &name, &holder, fence)
        )
    }

    /// Stores a refreshed token pair if the row still holds the token `at`
    /// and the lease `fence` is still `holder`'s, and releases the lease, in
    /// one transaction. A lease that passed to one other holder who gave it
    /// back without acting still takes the pair: the row has no lease, is
    /// still marked as being refreshed, holds the same token, and its fence
    /// moved on by that one lease only. Nobody sent the refresh token
    /// since, and the pair may be all that is left of the grant
    /// (docs/design.md §3).
    pub async fn commit_refresh(
        &self,
        name: &str,
        holder: &str,
        fence: i64,
        at: TokenAt,
        update: TokenUpdate,
    ) -> Result<Commit> {
        let mut reloaded = false;
        loop {
            // Sealed here, with the data key this process holds as the
            // active one; the transaction checks, once the row is locked,
            // that it still is (`keys::check_active` on SQLite, the commit
            // statement's own read on PostgreSQL), else the keys are read
            // again and the pair sealed again, once.
            let (sealed, with) = self.sealer.seal_update(name, &update)?;
            let (n, h) = (name.to_owned(), holder.to_owned());
            let done = run!(
                self,
                urgent on n.clone(),
                move |c| {
                    let r = ops::commit_refresh(c, &n, &h, fence, at, &sealed)?;
                    keys::check_active(&mut keys::Lite(c), with)?;
                    Ok(r)
                },
                move |c| pg::ops::commit_refresh(c, &n, &h, fence, at, &sealed, with)
            );
            match done {
                Err(StoreError::KeysChanged) if !reloaded => {
                    tracing::info!(
                        credential = name,
                        "the data keys changed since this refresh was sealed (another \
                         process rotated them or sealed the store): reading them again to \
                         seal it with the active key"
                    );
                    reloaded = true;
                    self.reload_keys().await?;
                }
                done => return self.opened(done).await,
            }
        }
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
        run!(
            self,
            urgent on name.clone(),
            move |c| ops::renew_lease(c, &name, &holder, fence, ttl),
            move |c| pg::ops::renew_lease(c, &name, &holder, fence, ttl)
        )
    }

    /// Brings the next attempt of `retrying` credentials forward to the
    /// given instants (never before their Retry-After), each only while its
    /// token is still the given one and its attempt is later. Returns the
    /// rows that moved.
    pub async fn bring_forward(
        &self,
        items: Vec<(String, TokenAt, i64)>,
    ) -> Result<Vec<Credential>> {
        let moved = run!(
            self,
            WRITE,
            move |c| ops::bring_forward(c, &items),
            move |c| pg::ops::bring_forward(c, &items)
        );
        self.opened(moved).await
    }

    /// Records a failed refresh or validation against the token `at` it
    /// was about, and releases the lease if `holder` has it.
    pub async fn record_failure(
        &self,
        name: &str,
        holder: &str,
        at: TokenAt,
        failure: FailureUpdate,
    ) -> Result<Commit> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        let done = run!(
            self,
            on name.clone(),
            move |c| ops::record_failure(c, &name, &holder, at, &failure),
            move |c| pg::ops::record_failure(c, &name, &holder, at, &failure)
        );
        self.opened(done).await
    }

    /// Records that the token `at` passed validation.
    pub async fn record_validated(&self, name: &str, at: TokenAt) -> Result<Commit> {
        let name = name.to_owned();
        let done = run!(
            self,
            on name.clone(),
            move |c| ops::record_validated(c, &name, at),
            move |c| pg::ops::record_validated(c, &name, at)
        );
        self.opened(done).await
    }

    /// Records `error` as the last error of the token `at` without
    /// changing its state: a problem the token cannot fix (a 403 from a
    /// fresh token), shown in the status while it lasts.
    pub async fn record_note(&self, name: &str, at: TokenAt, error: String) -> Result<Commit> {
        let name = name.to_owned();
        let done = run!(
            self,
            on name.clone(),
            move |c| ops::record_note(c, &name, at, &error),
            move |c| pg::ops::record_note(c, &name, at, &error)
        );
        self.opened(done).await
    }

    /// Clears the failure count of a `misconfigured` credential so that it is
    /// tried again now (after a config reload that may have fixed it).
    pub async fn reset_backoff(&self, name: &str) -> Result<Commit> {
        let name = name.to_owned();
        let done = run!(
            self,
            on name.clone(),
            move |c| ops::reset_backoff(c, &name),
            move |c| pg::ops::reset_backoff(c, &name)
        );
        self.opened(done).await
    }
}
