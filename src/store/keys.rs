//! Sealing the token columns (docs/design.md section 6, README "Secrets at
//! rest"): the one place both backends share where tokens are sealed on
//! their way into the store and opened on their way out, the `keys` table
//! of wrapped data keys, and the work of `tokend keys`.
//!
//! The rule: a store whose `keys` table holds a data key is **sealed**.
//! Every token written to it is sealed with the active (highest) data key,
//! every token read from it must be sealed and open, and a plaintext value
//! found in a token column is refused with the credential's name (someone
//! who can write to the database could otherwise plant a token of their
//! own). A store with no data key is plaintext, as before sealing existed;
//! a sealed value found there is refused too. A host with a key opens an
//! empty plaintext store by sealing it (its first data key); one that
//! already holds credentials is sealed by `tokend keys seal`, all rows in
//! one transaction, so that no store is ever half sealed.
//!
//! Every write of a token checks, once its row is locked, that the
//! table's active key is the one it sealed with ([`check_active`], or
//! [`check_key`] where the write's own statement read the key): a host
//! that missed a rotation (or the sealing of the store) re-reads the table
//! and seals again, so no value is ever written with a retired key, nor in
//! plaintext into a sealed store.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Commit, Credential, Grant, Lease, NewCredential, Result, State, StoreError, TokenUpdate,
};
use crate::clock::now_ms;
use crate::seal::{self, Column, Kek, Keyring, WrappedKey};
use crate::secret::Secret;

/// The stored (sealed or plaintext) token columns of one credential, as
/// `tokend keys` reads and rewrites them.
#[derive(Debug, Clone)]
pub struct StoredTokens {
    pub name: String,
    /// A client_credentials credential keeps an empty text in the
    /// `refresh_token` column: no token, nothing to seal.
    pub has_refresh_token: bool,
    pub access_token: Option<Secret>,
    pub refresh_token: Secret,
}

impl StoredTokens {
    /// The columns that hold a token.
    pub fn values(&self) -> Vec<(Column, &str)> {
        let mut v = Vec::new();
        if let Some(a) = &self.access_token {
            v.push((Column::AccessToken, a.expose()));
        }
        if self.has_refresh_token {
            v.push((Column::RefreshToken, self.refresh_token.expose()));
        }
        v
    }
}

/// The SQL `tokend keys` and the sealing need, on either backend: SQLite's
/// in this file ([`Lite`]), PostgreSQL's in `pg/keys.rs`. Each runs in the
/// transaction its caller holds.
pub(super) trait KeyTx {
    fn keys(&mut self) -> Result<Vec<WrappedKey>>;
    /// The active data key's id: the highest; None for a plaintext store.
    fn active(&mut self) -> Result<Option<u32>>;
    /// [`active`](Self::active), read by a write that sealed new values
    /// ([`check_active`]) and, on PostgreSQL, held until that write
    /// commits: a new name's row is invisible to `tokend keys rotate` and
    /// `seal` until then, so they must not change the keys under it (the
    /// rotation would delete the key it sealed with; the sealing would
    /// leave it plaintext in a sealed store). SQLite's write transaction
    /// holds the whole file already.
    fn active_held(&mut self) -> Result<Option<u32>> {
        self.active()
    }
    /// Adds a data key; false if its id is taken (another host rotated).
    fn insert_key(&mut self, k: &WrappedKey, kek_fingerprint: &str) -> Result<bool>;
    /// Replaces a key's wrapping if it is still `old`'s.
    fn rewrap_key(
        &mut self,
        old: &WrappedKey,
        new: &WrappedKey,
        kek_fingerprint: &str,
    ) -> Result<bool>;
    fn delete_key(&mut self, id: u32) -> Result<()>;
    /// Every credential's stored tokens, by name.
    fn stored_tokens(&mut self) -> Result<Vec<StoredTokens>>;
    /// One credential's, its row locked until the transaction ends (on
    /// PostgreSQL; SQLite's write transaction holds the whole file).
    fn lock_tokens(&mut self, name: &str) -> Result<Option<StoredTokens>>;
    /// Writes new stored forms of the same tokens if the row still holds
    /// `old`'s. Neither `version` nor `rev` moves: the tokens are the same,
    /// and a refresh in flight must still be able to commit.
    fn replace_tokens(
        &mut self,
        old: &StoredTokens,
        access: Option<&str>,
        refresh: &str,
    ) -> Result<bool>;
}

/// SQLite's side of [`KeyTx`].
pub(super) struct Lite<'a>(pub(super) &'a Connection);

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WrappedKey> {
    Ok(WrappedKey {
        id: r.get(0)?,
        wrapped: r.get(1)?,
        created_at: r.get(2)?,
    })
}

fn tokens_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredTokens> {
    Ok(StoredTokens {
        name: r.get(0)?,
        has_refresh_token: r.get::<_, String>(1)? != "client_credentials",
        access_token: r.get::<_, Option<String>>(2)?.map(Secret::new),
        refresh_token: Secret::new(r.get::<_, String>(3)?),
    })
}

const TOKEN_COLUMNS: &str = "name, grant_type, access_token, refresh_token";

impl KeyTx for Lite<'_> {
    fn keys(&mut self) -> Result<Vec<WrappedKey>> {
        let mut st = self
            .0
            .prepare_cached("SELECT id, wrapped, created_at FROM keys ORDER BY id")?;
        let rows = st.query_map([], key_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn active(&mut self) -> Result<Option<u32>> {
        Ok(self
            .0
            .prepare_cached("SELECT max(id) FROM keys")?
            .query_row([], |r| r.get(0))?)
    }

    fn insert_key(&mut self, k: &WrappedKey, kek_fingerprint: &str) -> Result<bool> {
        let n = self.0.execute(
            "INSERT OR IGNORE INTO keys (id, wrapped, kek_fingerprint, created_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![k.id, k.wrapped, kek_fingerprint, k.created_at],
        )?;
        Ok(n > 0)
    }

    fn rewrap_key(
        &mut self,
        old: &WrappedKey,
        new: &WrappedKey,
        kek_fingerprint: &str,
    ) -> Result<bool> {
        let n = self.0.execute(
            "UPDATE keys SET wrapped = ?3, kek_fingerprint = ?4 WHERE id = ?1 AND wrapped = ?2",
            params![old.id, old.wrapped, new.wrapped, kek_fingerprint],
        )?;
        Ok(n > 0)
    }

    fn delete_key(&mut self, id: u32) -> Result<()> {
        self.0.execute("DELETE FROM keys WHERE id = ?1", [id])?;
        Ok(())
    }

    fn stored_tokens(&mut self) -> Result<Vec<StoredTokens>> {
        let mut st = self.0.prepare_cached(&format!(
            "SELECT {TOKEN_COLUMNS} FROM credentials ORDER BY name"
        ))?;
        let rows = st.query_map([], tokens_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn lock_tokens(&mut self, name: &str) -> Result<Option<StoredTokens>> {
        Ok(self
            .0
            .prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM credentials WHERE name = ?1"
            ))?
            .query_row([name], tokens_row)
            .optional()?)
    }

    fn replace_tokens(
        &mut self,
        old: &StoredTokens,
        access: Option<&str>,
        refresh: &str,
    ) -> Result<bool> {
        let n = self.0.execute(
            "UPDATE credentials SET access_token = ?4, refresh_token = ?5
             WHERE name = ?1 AND access_token IS ?2 AND refresh_token = ?3",
            params![
                old.name,
                old.access_token.as_ref().map(Secret::expose),
                old.refresh_token.expose(),
                access,
                refresh
            ],
        )?;
        Ok(n > 0)
    }
}

/// Schema version 4 (SQLite): the wrapped data keys. `kek_fingerprint`
/// repeats what `wrapped` records, for a DBA's `SELECT`.
pub(super) fn migrate_to_4(c: &Connection) -> Result<()> {
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS keys (
                        id INTEGER PRIMARY KEY NOT NULL,
                        wrapped TEXT NOT NULL,
                        kek_fingerprint TEXT NOT NULL,
                        created_at INTEGER NOT NULL
                    );
                    PRAGMA user_version = 4;",
    )?;
    Ok(())
}

/// Fails with [`StoreError::KeysChanged`] unless the table's active key is
/// `sealed_with` (None: the store is plaintext, and so were the values).
/// Called in every transaction that writes a token: on PostgreSQL either
/// first, holding `keys` until the commit ([`KeyTx::active_held`]: no key
/// can change meanwhile), or after the row's lock, so that it sees any
/// rotation or sealing that committed before this write could.
pub(super) fn check_active(tx: &mut dyn KeyTx, sealed_with: Option<u32>) -> Result<()> {
    check_key(tx.active_held()?, sealed_with)
}

/// [`check_active`] with the active key already read, by a statement that
/// ran after the row lock (PostgreSQL's refresh commit reads it in its
/// own statement).
pub(super) fn check_key(active: Option<u32>, sealed_with: Option<u32>) -> Result<()> {
    if active == sealed_with {
        Ok(())
    } else {
        Err(StoreError::KeysChanged)
    }
}

fn seal_error(e: seal::SealError) -> StoreError {
    StoreError::Seal(e.to_string())
}

/// What opening a store finds, before any token is read: the data keys
/// to load (empty: a plaintext store). With `kek`, an empty plaintext
/// store is sealed here (its first data key); a plaintext store that holds
/// tokens is refused, as is a sealed store without `kek`.
pub(super) fn open_keys(tx: &mut dyn KeyTx, kek: Option<&Kek>) -> Result<Vec<WrappedKey>> {
    let keys = tx.keys()?;
    match (kek, judge(&keys, || tx.stored_tokens(), kek)?) {
        (Some(kek), true) => {
            let (_, first) = Keyring::create(kek, now_ms()).map_err(seal_error)?;
            // Another host may have made it first: then its key is the one.
            tx.insert_key(&first, kek.fingerprint())?;
            tx.keys()
        }
        _ => Ok(keys),
    }
}

/// Whether a store with these data `keys` opens with `kek`: true if it
/// is to be sealed now (a key given, and no token stored yet), false if it
/// opens as it is; an error if it is refused. `stored` is read only when
/// it decides. Apart from [`open_keys`], so that `tokend check-config`
/// asks the same question of a store it only reads.
pub(super) fn judge(
    keys: &[WrappedKey],
    stored: impl FnOnce() -> Result<Vec<StoredTokens>>,
    kek: Option<&Kek>,
) -> Result<bool> {
    match kek {
        None if keys.is_empty() => Ok(false),
        None => Err(StoreError::Seal(format!(
            "the store is sealed (its data keys are wrapped by the key with fingerprint {}), \
             but the config gives no encryption key: set encryption_key_file or \
             encryption_key_credential (README \"Secrets at rest\")",
            fingerprint_of(&keys[0]).unwrap_or("?")
        ))),
        Some(_) if !keys.is_empty() => Ok(false),
        Some(_) => {
            let stored = stored()?;
            if let Some(t) = stored
                .iter()
                .find(|t| t.values().iter().any(|(_, v)| seal::is_sealed(v)))
            {
                return Err(StoreError::Seal(format!(
                    "the store holds sealed tokens ({} among them) but no data key to open \
                     them: its keys table was emptied (README \"Secrets at rest\", a lost key)",
                    t.name
                )));
            }
            let plain = stored.iter().filter(|t| !t.values().is_empty()).count();
            if plain > 0 {
                return Err(StoreError::Seal(format!(
                    "the config gives an encryption key, but the store holds {plain} \
                     credential{} in plaintext: run `tokend keys seal` once to seal them \
                     (README \"Secrets at rest\")",
                    if plain == 1 { "" } else { "s" }
                )));
            }
            Ok(true)
        }
    }
}

/// The fingerprint a wrapped key records, as `tokend keys status` shows it.
pub fn fingerprint_of(k: &WrappedKey) -> Option<&str> {
    let rest = k.wrapped.strip_prefix("tokend-kek:v1:")?;
    let (print, _) = rest.split_once(':')?;
    (print.len() == 16 && print.bytes().all(|b| b.is_ascii_hexdigit())).then_some(print)
}

/// A value that would be returned or written as a token: what the store
/// seals and opens.
pub(super) trait Tokens {
    /// Rows read for their own sake (a load, a read of some rows, the row
    /// a write left), not a lease, whose caller sends the refresh token: a
    /// refresh token there that is at fault itself ([`Unopened::Value`])
    /// refuses its credential alone ([`refuse`]) instead of failing the
    /// whole read, so that one planted or damaged row cannot stop a
    /// start-up or hide every other credential from `tokend status`. A
    /// lease's answer fails instead: its caller must not act on the row.
    const ROWS: bool = false;

    fn credentials(&mut self) -> Vec<&mut Credential>;
}

impl Tokens for Credential {
    fn credentials(&mut self) -> Vec<&mut Credential> {
        vec![self]
    }
}

impl Tokens for Option<Credential> {
    const ROWS: bool = true;

    fn credentials(&mut self) -> Vec<&mut Credential> {
        self.iter_mut().collect()
    }
}

impl Tokens for Vec<Credential> {
    const ROWS: bool = true;

    fn credentials(&mut self) -> Vec<&mut Credential> {
        self.iter_mut().collect()
    }
}

impl Tokens for super::Looked {
    const ROWS: bool = true;

    fn credentials(&mut self) -> Vec<&mut Credential> {
        self.0.iter_mut().map(|(c, _)| c).collect()
    }
}

impl Tokens for Lease {
    fn credentials(&mut self) -> Vec<&mut Credential> {
        match self {
            Lease::Taken { credential, .. } | Lease::Changed(credential) => vec![credential],
            Lease::Busy { .. } | Lease::Gone => vec![],
        }
    }
}

/// The row a write left, which its caller adopts as it would a read: no
/// caller sends its tokens (a lease's answer is the one that is acted on).
impl Tokens for Commit {
    const ROWS: bool = true;

    fn credentials(&mut self) -> Vec<&mut Credential> {
        match self {
            Commit::Done(c) => vec![c],
            Commit::Conflict | Commit::LeaseLost => vec![],
        }
    }
}

impl Tokens for () {
    fn credentials(&mut self) -> Vec<&mut Credential> {
        vec![]
    }
}

impl Tokens for bool {
    fn credentials(&mut self) -> Vec<&mut Credential> {
        vec![]
    }
}

/// A store's sealing: the key-encryption key (None: the config gives
/// none) and the data keys it unwrapped (None: the store is plaintext).
/// Shared by every clone of a [`Store`](super::Store).
pub(super) struct Sealer {
    kek: Option<Arc<Kek>>,
    ring: RwLock<Option<Arc<Keyring>>>,
}

impl Sealer {
    pub(super) fn new(kek: Option<Arc<Kek>>, keys: &[WrappedKey]) -> Result<Sealer> {
        let s = Sealer {
            kek,
            ring: RwLock::new(None),
        };
        s.install(keys)?;
        Ok(s)
    }

    /// Loads the data keys read from the `keys` table.
    pub(super) fn install(&self, keys: &[WrappedKey]) -> Result<Option<Arc<Keyring>>> {
        let ring = match (&self.kek, keys.is_empty()) {
            (_, true) => None,
            (None, false) => {
                return Err(StoreError::Seal(
                    "the store has been sealed, but the config gives no encryption key: set \
                     encryption_key_file or encryption_key_credential"
                        .into(),
                ));
            }
            (Some(kek), false) => Some(Arc::new(Keyring::load(kek, keys).map_err(seal_error)?)),
        };
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = ring.clone();
        Ok(ring)
    }

    fn ring(&self) -> Option<Arc<Keyring>> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether `v` holds a value the data keys loaded cannot open but the
    /// table's may: sealed with a key added since (another host rotated,
    /// or sealed the store).
    pub(super) fn needs_reload(&self, v: &mut impl Tokens) -> bool {
        let ring = self.ring();
        if self.kek.is_none() {
            return false;
        }
        v.credentials().into_iter().any(|c| {
            stored_values(c).into_iter().any(|(_, s)| match &ring {
                Some(r) => seal::sealed_with(s).is_some_and(|id| !r.has_key(id)),
                None => seal::is_sealed(s),
            })
        })
    }

    /// Opens every token in `v` with `keys`. A value at fault itself
    /// ([`Unopened`]) is refused with its credential ([`refuse`]): an
    /// access token in every read; a refresh token in rows read for their
    /// own sake ([`Tokens::ROWS`]), while it fails the whole read
    /// otherwise. Any other value that does not open fails the whole read.
    /// Returns false, and changes nothing, if a value is
    /// [`Unopened::Suspect`]: read the keys, then call again with them.
    pub(super) fn open<T: Tokens>(&self, v: &mut T, keys: Keys) -> Result<bool> {
        let (ring, reloaded) = match keys {
            Keys::Loaded => (self.ring(), false),
            Keys::Fresh(ring) => (ring, true),
        };
        let mut creds = v.credentials();
        let mut opened = Vec::with_capacity(creds.len());
        for c in creds.iter() {
            let mut pair: BTreeMap<u8, Secret> = BTreeMap::new();
            let mut refused = Vec::new();
            for (column, s) in stored_values(c) {
                let kek = self.kek.is_some();
                let e = match open_value(ring.as_deref(), kek, reloaded, &c.name, column, s) {
                    Ok(value) => {
                        pair.insert(column as u8, value);
                        continue;
                    }
                    Err(Unopened::Suspect) => return Ok(false),
                    Err(Unopened::Value(e)) => e,
                    Err(Unopened::Store(e)) => return Err(e),
                };
                // An access token at fault is never used, whatever the
                // read: the refresh token (or the client's credentials)
                // brings a new one.
                if T::ROWS || column == Column::AccessToken {
                    refused.push((column, e));
                } else {
                    return Err(e);
                }
            }
            opened.push((pair, refused));
        }
        for (c, (mut pair, refused)) in creds.iter_mut().zip(opened) {
            if let Some(a) = pair.remove(&(Column::AccessToken as u8)) {
                c.access_token = Some(a);
            }
            if let Some(r) = pair.remove(&(Column::RefreshToken as u8)) {
                c.grant = Grant::RefreshToken(r);
            }
            if !refused.is_empty() {
                refuse(c, refused);
            }
        }
        Ok(true)
    }

    /// `value` as it is stored: sealed when the store is.
    fn seal(
        &self,
        ring: Option<&Keyring>,
        name: &str,
        column: Column,
        value: &Secret,
    ) -> Result<Secret> {
        match ring {
            None => Ok(value.clone()),
            Some(r) => r
                .seal(name, column, value)
                .map(Secret::new)
                .map_err(seal_error),
        }
    }

    /// A new credential as it is stored, and the data key it was sealed
    /// with, for [`check_active`].
    pub(super) fn seal_new(&self, n: &NewCredential) -> Result<(NewCredential, Option<u32>)> {
        let ring = self.ring();
        let r = ring.as_deref();
        let mut out = n.clone();
        if let Some(a) = &n.access_token {
            out.access_token = Some(self.seal(r, &n.name, Column::AccessToken, a)?);
        }
        if let Grant::RefreshToken(t) = &n.grant {
            out.grant = Grant::RefreshToken(self.seal(r, &n.name, Column::RefreshToken, t)?);
        }
        Ok((out, r.map(Keyring::active_key)))
    }

    /// A refreshed pair as it is stored, and the data key it was sealed with.
    pub(super) fn seal_update(
        &self,
        name: &str,
        u: &TokenUpdate,
    ) -> Result<(TokenUpdate, Option<u32>)> {
        let ring = self.ring();
        let r = ring.as_deref();
        let seal = |column, v: &Option<Secret>| {
            v.as_ref()
                .map(|v| self.seal(r, name, column, v))
                .transpose()
        };
        Ok((
            TokenUpdate {
                access_token: seal(Column::AccessToken, &u.access_token)?,
                refresh_token: seal(Column::RefreshToken, &u.refresh_token)?,
                scope: u.scope.clone(),
                expires_at: u.expires_at,
            },
            r.map(Keyring::active_key),
        ))
    }
}

/// Takes the token values of `c` at fault ([`Unopened`]) out of it, and says
/// why in its `last_error`, naming the credential and column, never the
/// value. Nothing is written to the row: it is left for the operator, and
/// this is only how this process sees it until the row changes.
///
/// - The access token alone: `c` has none. A refresh (its refresh token
///   opened) or a client_credentials fetch brings a new one; nothing from
///   the row is ever published.
/// - The refresh token: its grant is [`Grant::Refused`] and its state
///   `needs_reauthorization`. Nothing is sent for it and its files are
///   removed, until `tokend authorize NAME --force` or `import --force`
///   writes a row that opens (or `tokend remove NAME`).
fn refuse(c: &mut Credential, refused: Vec<(Column, StoreError)>) {
    let why: Vec<String> = refused.iter().map(|(_, e)| e.to_string()).collect();
    let why = why.join("; ");
    // Whatever the row holds there is not ours to use, opened or not.
    c.access_token = None;
    if refused.iter().any(|(col, _)| *col == Column::RefreshToken) {
        c.grant = Grant::Refused;
        c.state = State::NeedsReauthorization;
        c.next_attempt_at = None;
        tracing::error!(credential = %c.name, error = %why, "credential refused: its refresh token cannot be used");
    } else {
        tracing::warn!(credential = %c.name, error = %why, "stored access token refused; a new one will be fetched");
    }
    c.last_error = Some(why);
}

/// The token columns a credential read from the store holds.
fn stored_values(c: &Credential) -> Vec<(Column, &str)> {
    let mut v = Vec::new();
    if let Some(a) = &c.access_token {
        v.push((Column::AccessToken, a.expose()));
    }
    if let Grant::RefreshToken(t) = &c.grant {
        v.push((Column::RefreshToken, t.expose()));
    }
    v
}

/// The data keys a read opens its values with.
pub(super) enum Keys {
    /// Those this process holds now.
    Loaded,
    /// Those this read has just read from the `keys` table itself (None: it
    /// holds none). Not the process's keys, which another task may have
    /// replaced since with keys it read earlier.
    Fresh(Option<Arc<Keyring>>),
}

/// Why a stored value did not open.
enum Unopened {
    /// The value itself is at fault, whatever this process learns later:
    /// plaintext in a sealed store, a sealed value that does not parse, or,
    /// with keys just read ([`Keys::Fresh`]), one naming a data key newer
    /// than any in the table (keys are stored before anything is sealed
    /// with them, so that key never existed) or one that does not
    /// authenticate with the key its id names (altered, or copied from
    /// another row or column). Refused with its credential alone
    /// ([`refuse`]).
    Value(StoreError),
    /// Not known until the keys are read again: a key this process does not
    /// hold, or one that does not open the value, may be a key the table
    /// holds now (another process rotated, or a restored database was
    /// rotated since, so that an id names another key).
    Suspect,
    /// This process may be at fault, even with keys just read: a retired
    /// key it no longer holds (a read in the middle of `keys rotate`, which
    /// re-seals a row, then deletes the old key), a store sealed without a
    /// key here, a newer tokend's format (a rolling upgrade). The read
    /// fails, as it would for a database error, rather than stop
    /// credentials that another read, or another version, finds sound.
    Store(StoreError),
}

fn open_value(
    ring: Option<&Keyring>,
    has_kek: bool,
    reloaded: bool,
    name: &str,
    column: Column,
    stored: &str,
) -> std::result::Result<Secret, Unopened> {
    use seal::SealError::{Corrupt, UnknownKey};
    match ring {
        Some(_) if !seal::is_sealed(stored) => Err(Unopened::Value(StoreError::Plaintext {
            name: name.to_owned(),
            column,
        })),
        Some(r) => r.open(name, column, stored).map_err(|e| match e {
            Corrupt { key: None, .. } => Unopened::Value(seal_error(e)),
            Corrupt { .. } | UnknownKey { .. } if !reloaded => Unopened::Suspect,
            Corrupt { .. } => Unopened::Value(seal_error(e)),
            UnknownKey { key, .. } if key > r.active_key() => Unopened::Value(seal_error(e)),
            _ => Unopened::Store(seal_error(e)),
        }),
        None if seal::is_sealed(stored) && has_kek && !reloaded => Err(Unopened::Suspect),
        None if seal::is_sealed(stored) => Err(Unopened::Store(StoreError::Seal(format!(
            "the {column} of {name} is sealed, but {}",
            if has_kek {
                "the store holds no data key to open it with"
            } else {
                "the config gives no encryption key (encryption_key_file or \
                 encryption_key_credential)"
            }
        )))),
        None => Ok(Secret::new(stored)),
    }
}

/// What `tokend keys seal`, `rotate` and `rewrap` did.
#[derive(Debug, Default)]
pub struct KeysReport {
    /// The active data key afterwards.
    pub active: u32,
    /// Token values written anew.
    pub sealed: usize,
    /// Credentials whose token columns hold plaintext in a sealed store:
    /// left as they are, refused on every read.
    pub plaintext: Vec<String>,
    /// Data keys deleted, no value using them any more.
    pub deleted: Vec<u32>,
}

/// `tokend keys seal`: the first data key, and every token sealed with
/// it, in one transaction.
pub(super) fn seal_store(tx: &mut dyn KeyTx, kek: &Kek) -> Result<KeysReport> {
    if let Some(active) = tx.active()? {
        return Err(StoreError::Seal(format!(
            "the store is already sealed (data key {active} is active): `tokend keys rotate` \
             makes a new data key"
        )));
    }
    let (ring, first) = Keyring::create(kek, now_ms()).map_err(seal_error)?;
    if !tx.insert_key(&first, kek.fingerprint())? {
        return Err(StoreError::KeysChanged);
    }
    let mut report = KeysReport {
        active: ring.active_key(),
        ..KeysReport::default()
    };
    let names: Vec<String> = tx.stored_tokens()?.into_iter().map(|t| t.name).collect();
    for name in names {
        report.sealed += reseal_row(tx, &ring, &name, true)?.0;
    }
    Ok(report)
}

/// `tokend keys rotate`, its first step: a new active data key, added in
/// a transaction that first unwraps the table's keys with this host's KEK,
/// so that a host with an old KEK cannot add a key the others cannot open.
pub(super) fn add_data_key(tx: &mut dyn KeyTx, kek: &Kek) -> Result<Keyring> {
    let keys = tx.keys()?;
    if keys.is_empty() {
        return Err(StoreError::Seal(
            "the store is not sealed: `tokend keys seal` seals it".into(),
        ));
    }
    let mut ring = Keyring::load(kek, &keys).map_err(seal_error)?;
    let new = ring.rotate(kek, now_ms()).map_err(seal_error)?;
    if !tx.insert_key(&new, kek.fingerprint())? {
        return Err(StoreError::Seal(
            "another process added a data key meanwhile: run `tokend keys rotate` again".into(),
        ));
    }
    Ok(ring)
}

/// Re-seals `name`'s tokens with the ring's active key; `plaintext_ok`
/// only while sealing a plaintext store. Returns the values written and
/// whether the row held plaintext that was refused.
pub(super) fn reseal_row(
    tx: &mut dyn KeyTx,
    ring: &Keyring,
    name: &str,
    plaintext_ok: bool,
) -> Result<(usize, bool)> {
    let Some(old) = tx.lock_tokens(name)? else {
        return Ok((0, false));
    };
    let values = old.values();
    if !plaintext_ok && values.iter().any(|(_, v)| !seal::is_sealed(v)) {
        return Ok((0, true));
    }
    let mut new_access = old.access_token.as_ref().map(|a| a.expose().to_owned());
    let mut new_refresh = old.refresh_token.expose().to_owned();
    let mut n = 0;
    for (column, v) in values {
        if let Some(s) = ring.reseal(name, column, v).map_err(seal_error)? {
            n += 1;
            match column {
                Column::AccessToken => new_access = Some(s),
                Column::RefreshToken => new_refresh = s,
            }
        }
    }
    if n > 0 && !tx.replace_tokens(&old, new_access.as_deref(), &new_refresh)? {
        return Err(StoreError::KeysChanged);
    }
    Ok((n, false))
}

/// The data keys some stored value is sealed with.
pub(super) fn keys_in_use(tx: &mut dyn KeyTx) -> Result<Vec<u32>> {
    let mut used: Vec<u32> = tx
        .stored_tokens()?
        .iter()
        .flat_map(|t| {
            t.values()
                .into_iter()
                .filter_map(|(_, v)| seal::sealed_with(v))
                .collect::<Vec<_>>()
        })
        .collect();
    used.sort_unstable();
    used.dedup();
    Ok(used)
}

/// Deletes the data keys older than `active` that no value uses; the
/// check comes after the delete, in its transaction, so that it sees any
/// write that committed before the keys were gone.
pub(super) fn delete_unused(tx: &mut dyn KeyTx, active: u32) -> Result<Vec<u32>> {
    let used = keys_in_use(tx)?;
    let old: Vec<u32> = tx
        .keys()?
        .iter()
        .map(|k| k.id)
        .filter(|id| *id < active && !used.contains(id))
        .collect();
    for id in &old {
        tx.delete_key(*id)?;
    }
    let still = keys_in_use(tx)?;
    if old.iter().any(|id| still.contains(id)) {
        return Err(StoreError::KeysChanged);
    }
    Ok(old)
}

/// `tokend keys rewrap`: every data key wrapped anew by `new`, in one
/// transaction; no token is touched.
pub(super) fn rewrap_keys(tx: &mut dyn KeyTx, old: &Kek, new: &Kek) -> Result<usize> {
    let keys = tx.keys()?;
    if keys.is_empty() {
        return Err(StoreError::Seal(
            "the store is not sealed: there is no data key to rewrap".into(),
        ));
    }
    if Keyring::load(new, &keys).is_ok() {
        return Err(StoreError::Seal(format!(
            "the data keys are already wrapped by the new key (fingerprint {}): install it \
             on every host",
            new.fingerprint()
        )));
    }
    let rewrapped = seal::rewrap(&keys, old, new).map_err(seal_error)?;
    for (o, n) in keys.iter().zip(&rewrapped) {
        if !tx.rewrap_key(o, n, new.fingerprint())? {
            return Err(StoreError::KeysChanged);
        }
    }
    Ok(keys.len())
}
