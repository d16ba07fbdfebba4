//! The store as the tests and benches see it: read through tokend's own
//! [`StoreConn`] (the schema lives in one place, `src/store/ops.rs`), and
//! filled in bulk by [`StoreConn::insert_all`]. Raw SQL only through
//! [`Env::raw_store`], for what tokend's API does not do on purpose.

use super::*;
use tokend::secret::Secret;
use tokend::store::{Credential, Grant, Lease, NewCredential, Store, StoreConn};

impl Env {
    /// The store, opened as `tokend status` opens it; None while there is
    /// no database yet.
    pub fn store(&self) -> Option<StoreConn> {
        StoreConn::open(&self.db, false).ok()
    }

    /// A credential as stored; None when there is no database or no such row.
    pub fn credential(&self, name: &str) -> Option<Credential> {
        self.store()?
            .get(name)
            .unwrap_or_else(|e| panic!("reading {name} from the store: {e}"))
    }

    /// The stored row of a credential, with its secrets readable.
    pub fn row(&self, name: &str) -> Option<Row> {
        self.credential(name).map(Row::from)
    }

    pub fn state(&self, name: &str) -> Option<String> {
        self.row(name).map(|r| r.state)
    }

    /// The SQLite file opened by hand, as an operator's `sqlite3` would.
    /// Only for what tokend's store API does not offer, on purpose: values
    /// no tokend writes (an older build's, a hand edit's: tests/values.rs),
    /// another process holding the write lock ([`DbLock`]), and the
    /// `events` table and integrity check, which `StoreConn` does not read.
    /// Credentials are read with [`Env::credential`].
    pub fn raw_store(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(&self.db).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    /// How many events of `kind` the store holds for `name`.
    pub fn events(&self, name: &str, kind: &str) -> i64 {
        self.raw_store()
            .query_row(
                "SELECT count(*) FROM events WHERE name = ?1 AND kind = ?2",
                [name, kind],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// SQLite's `PRAGMA integrity_check`: "ok" for a sound file.
    pub fn integrity_check(&self) -> String {
        self.raw_store()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap()
    }

    /// Takes the write lock as another process would (a `sqlite3` shell
    /// after `BEGIN EXCLUSIVE`), until the [`DbLock`] is dropped.
    pub fn lock_store(&self, busy_timeout: Duration) -> DbLock {
        let c = self.raw_store();
        c.busy_timeout(busy_timeout).unwrap();
        c.execute_batch("BEGIN EXCLUSIVE").unwrap();
        DbLock(c)
    }

    /// Takes `name`'s lease for `holder` (a peer's id, `host/pid/start/place`)
    /// for `ttl`, as that peer's tokend would: the store's own
    /// `take_lease`, which also marks a refresh as started. Panics unless
    /// the lease was taken.
    pub fn take_lease(&self, name: &str, holder: &str, ttl: Duration) {
        let at = self
            .credential(name)
            .unwrap_or_else(|| panic!("no row for {name}"))
            .token_at();
        let store = Store::open(&self.db).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let lease = rt
            .block_on(store.take_lease(name, holder, ttl, at))
            .unwrap();
        assert!(
            matches!(lease, Lease::Taken { .. }),
            "{holder} did not get the lease on {name}"
        );
    }

    /// Stores `n` credentials `user-00000`, `user-00001`… from fresh grants
    /// of the fake provider, in one transaction ([`StoreConn::insert_all`]):
    /// importing thousands one by one would time the store's syncs. With
    /// `expires_at` (ms), each keeps its grant's access token, expiring
    /// then; without, each has none and is due at once.
    pub fn seed(&self, n: usize, expires_at: Option<i64>) {
        let new: Vec<NewCredential> = (0..n)
            .map(|i| {
                let g = self
                    .provider
                    .mint_grant(self.provider.client_id(), "read+write");
                NewCredential {
                    name: format!("user-{i:05}"),
                    provider: "fake".into(),
                    access_token: expires_at.map(|_| Secret::new(g.access_token)),
                    grant: Grant::RefreshToken(Secret::new(g.refresh_token)),
                    scope: Some("read+write".into()),
                    expires_at,
                    event: "imported",
                }
            })
            .collect();
        StoreConn::open(&self.db, true)
            .unwrap()
            .insert_all(&new)
            .unwrap();
    }
}

/// Another process's write transaction on the store, rolled back on drop.
pub struct DbLock(rusqlite::Connection);

impl Drop for DbLock {
    fn drop(&mut self) {
        let _ = self.0.execute_batch("ROLLBACK");
    }
}

/// What the tests compare of a stored credential, secrets exposed.
#[derive(Debug, Clone)]
pub struct Row {
    pub access_token: Option<String>,
    /// Empty for a client_credentials credential, which has none.
    pub refresh_token: String,
    /// `refresh_token` or `client_credentials`.
    pub grant: String,
    /// As the store writes it (`valid`, `needs_reauthorization`, …).
    pub state: String,
    pub last_error: Option<String>,
    pub failures: i64,
    pub version: i64,
}

impl From<Credential> for Row {
    fn from(c: Credential) -> Row {
        Row {
            access_token: c.access_token.map(|t| t.expose().to_owned()),
            refresh_token: c
                .grant
                .refresh_token()
                .map(|t| t.expose().to_owned())
                .unwrap_or_default(),
            grant: c.grant.kind().as_str().to_owned(),
            state: c.state.as_str().to_owned(),
            last_error: c.last_error,
            failures: c.failures.into(),
            version: c.version,
        }
    }
}
