//! Moving an installation from one store to another (`tokend migrate`,
//! README "Moving to PostgreSQL"): every credential row and its events,
//! copied as stored, so that nothing needs re-authorizing.
//!
//! A refresh token lives in one place only: once copied, the source's copy
//! must never be refreshed again, or the provider rotates the copy the new
//! store holds dead. So [`StoreConn::seal_for_move`] leases every credential
//! in the source to [`MOVED`] for good, in the same transaction that reads
//! them: no refresh is in flight while they are read (a live lease refuses
//! the move), and none starts afterwards, on any host still pointed at the
//! old store. (The lease row is replaced, not fenced anew: a holder whose
//! lease had lapsed fails its commit on the holder's name already, and the
//! rows are copied exactly as they were.)

use std::time::Duration;

use rusqlite::Connection;
use zeroize::Zeroize;

use super::conn::Backend;
use super::{Result, StoreConn, StoreError, ops};

/// The lease holder that marks a credential moved to another store. It has
/// no `/`, so no host takes it for a process it could see is gone
/// (`crate::lease::holder_alive`): only its expiry could free it.
pub const MOVED: &str = "tokend-migrate:moved";

/// How long a moved credential's lease lasts: as good as for ever.
const MOVED_FOR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How a column is stored: the two backends agree on these.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
}

/// Every column of `credentials` at the current schema version, in the
/// order both schemas define them.
const CREDENTIAL_COLUMNS: &[(&str, Kind)] = &[
    ("name", Kind::Text),
    ("provider", Kind::Text),
    ("access_token", Kind::Text),
    ("refresh_token", Kind::Text),
    ("scope", Kind::Text),
    ("expires_at", Kind::Int),
    ("issued_at", Kind::Int),
    ("state", Kind::Text),
    ("failures", Kind::Int),
    ("next_attempt_at", Kind::Int),
    ("last_error", Kind::Text),
    ("last_refresh_at", Kind::Int),
    ("last_validated_at", Kind::Int),
    ("refresh_started_at", Kind::Int),
    ("created_at", Kind::Int),
    ("updated_at", Kind::Int),
    ("version", Kind::Int),
    ("rev", Kind::Int),
    ("not_before", Kind::Int),
    ("fence", Kind::Int),
    ("grant_type", Kind::Text),
    ("given_fp", Kind::Text),
];

/// The columns of `events` that mean something outside one database (its
/// `id` only orders them, and the copy keeps that order).
const EVENT_COLUMNS: &[(&str, Kind)] = &[
    ("name", Kind::Text),
    ("at", Kind::Int),
    ("kind", Kind::Text),
    ("detail", Kind::Text),
];

/// Every column of `keys`: the data keys a sealed store's values need
/// (README "Secrets at rest"), still wrapped; they go along, so the copy
/// opens with the same key-encryption key.
const KEY_COLUMNS: &[(&str, Kind)] = &[
    ("id", Kind::Int),
    ("wrapped", Kind::Text),
    ("kek_fingerprint", Kind::Text),
    ("created_at", Kind::Int),
];

/// One stored value.
#[derive(Clone, PartialEq, Eq)]
enum Value {
    Int(Option<i64>),
    Text(Option<String>),
}

/// Everything [`StoreConn::seal_for_move`] read: rows as stored, tokens
/// included. No `Debug`; the text is wiped when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Dump {
    credentials: Vec<Vec<Value>>,
    events: Vec<Vec<Value>>,
    keys: Vec<Vec<Value>>,
    /// Some of its credentials were leased to [`MOVED`] already when it
    /// was read: an earlier move, or one whose source could not be
    /// unsealed after it failed.
    moved_before: bool,
}

impl Drop for Dump {
    fn drop(&mut self) {
        for v in self
            .credentials
            .iter_mut()
            .chain(&mut self.events)
            .flatten()
        {
            if let Value::Text(Some(s)) = v {
                s.zeroize();
            }
        }
    }
}

impl Dump {
    /// How many credentials it holds.
    pub fn credentials(&self) -> usize {
        self.credentials.len()
    }

    /// How many events it holds.
    pub fn events(&self) -> usize {
        self.events.len()
    }

    /// Whether the source was moved (or half-moved) before: see
    /// `tokend migrate`'s handling of a failed write.
    pub fn moved_before(&self) -> bool {
        self.moved_before
    }

    /// The credentials' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.credentials
            .iter()
            .map(|row| match &row[0] {
                Value::Text(Some(n)) => n.clone(),
                _ => String::new(),
            })
            .collect()
    }
}

impl StoreConn {
    /// Reads every credential and event, and leases every credential to
    /// [`MOVED`] in the same transaction. Refuses, changing nothing, if a
    /// live holder (a refresh in flight, a `remove --revoke`) has a lease.
    pub fn seal_for_move(&self) -> Result<Dump> {
        match &self.backend {
            Backend::Sqlite(c) => super::conn::immediate(c, sqlite::seal_for_move),
            Backend::Postgres(j) => j.call(pg::seal_for_move),
        }
    }

    /// Undoes [`seal_for_move`](Self::seal_for_move): for a move that could
    /// not be written to its destination.
    pub fn unseal_after_failed_move(&self) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(c) => super::conn::immediate(c, |c| {
                c.execute("DELETE FROM leases WHERE holder = ?1", [MOVED])?;
                Ok(())
            }),
            Backend::Postgres(j) => j.call(|tx| {
                tx.execute("DELETE FROM leases WHERE holder = $1", &[&MOVED])?;
                Ok(())
            }),
        }
    }

    /// Reads every credential and event, leasing nothing: what a copy
    /// holds, for a test to compare with its source.
    pub fn dump(&self) -> Result<Dump> {
        match &self.backend {
            Backend::Sqlite(c) => super::conn::immediate(c, sqlite::read),
            Backend::Postgres(j) => j.call(pg::read),
        }
    }

    /// Writes `dump` in one transaction, all or nothing. Refuses, writing
    /// nothing, if any of its names is stored here already.
    pub fn restore(&self, dump: &Dump) -> Result<()> {
        let dump = dump.clone();
        match &self.backend {
            Backend::Sqlite(c) => super::conn::immediate(c, |c| sqlite::restore(c, &dump)),
            Backend::Postgres(j) => j.call(move |tx| pg::restore(tx, &dump)),
        }
    }
}

fn column_list(cols: &[(&str, Kind)]) -> String {
    cols.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// Whether the destination, holding data keys or not (`dest_sealed`) and
/// credentials or not (`dest_used`), can take `dump`: a store is all
/// sealed or all plaintext, so plaintext rows cannot go into a sealed
/// store (nor sealed ones, with their keys, into a store of plaintext
/// rows, which would then be refused on every read), and two sets of data
/// keys cannot be one.
fn check_sealing(dump: &Dump, dest_sealed: bool, dest_used: bool) -> Result<()> {
    match (dump.keys.is_empty(), dest_sealed) {
        (false, false) if dest_used => Err(StoreError::Seal(
            "the source is sealed and the destination holds credentials in plaintext: \
             move into an empty store, or seal the destination first and move into a \
             store without data keys"
                .into(),
        )),
        (_, false) => Ok(()),
        (true, true) => Err(StoreError::Seal(
            "the destination is sealed and the source is not: seal the source first \
             (tokend keys seal, with the same key), or move into a store without data keys"
                .into(),
        )),
        (false, true) => Err(StoreError::Seal(
            "the destination has data keys of its own: move into a store without any".into(),
        )),
    }
}

/// A name the destination has already: the move would overwrite it.
fn taken(name: &str) -> StoreError {
    StoreError::Exists(name.to_owned())
}

/// A live lease that is not ours: a refresh may be rotating the token.
fn in_use(name: &str) -> StoreError {
    StoreError::InUse(format!(
        "{name:?} is leased to a running tokend (a refresh in flight?): stop every daemon that uses this store, then try again"
    ))
}

mod sqlite {
    use super::*;
    use rusqlite::types::ToSql;

    fn rows(
        c: &Connection,
        table: &str,
        cols: &[(&str, Kind)],
        order: &str,
    ) -> Result<Vec<Vec<Value>>> {
        let sql = format!("SELECT {} FROM {table} ORDER BY {order}", column_list(cols));
        let mut st = c.prepare(&sql)?;
        let out = st
            .query_map([], |r| {
                cols.iter()
                    .enumerate()
                    .map(|(i, (_, k))| {
                        Ok(match k {
                            Kind::Int => Value::Int(r.get(i)?),
                            Kind::Text => Value::Text(r.get(i)?),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(out)
    }

    pub(super) fn read(c: &Connection) -> Result<Dump> {
        Ok(Dump {
            credentials: rows(c, "credentials", CREDENTIAL_COLUMNS, "name")?,
            events: rows(c, "events", EVENT_COLUMNS, "id")?,
            keys: rows(c, "keys", KEY_COLUMNS, "id")?,
            moved_before: false,
        })
    }

    pub(super) fn seal_for_move(c: &Connection) -> Result<Dump> {
        let now = crate::clock::now_ms();
        let mut st = c.prepare("SELECT name, holder FROM leases WHERE expires_at > ?1")?;
        let live = st
            .query_map([now], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if let Some((name, _)) = live
            .iter()
            .find(|(_, h)| h != MOVED && crate::lease::holder_alive(h))
        {
            return Err(in_use(name));
        }
        let moved_before = live.iter().any(|(_, h)| h == MOVED);
        c.execute(
            "INSERT OR REPLACE INTO leases (name, holder, expires_at, fence)
             SELECT name, ?1, ?2, fence FROM credentials",
            rusqlite::params![MOVED, now + MOVED_FOR.as_millis() as i64],
        )?;
        let mut dump = read(c)?;
        dump.moved_before = moved_before;
        Ok(dump)
    }

    fn insert(
        c: &Connection,
        table: &str,
        cols: &[(&str, Kind)],
        rows: &[Vec<Value>],
    ) -> Result<()> {
        let marks = (1..=cols.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            column_list(cols),
            marks.join(", ")
        );
        let mut st = c.prepare(&sql)?;
        for row in rows {
            let params: Vec<&dyn ToSql> = row
                .iter()
                .map(|v| match v {
                    Value::Int(i) => i as &dyn ToSql,
                    Value::Text(t) => t as &dyn ToSql,
                })
                .collect();
            st.execute(params.as_slice())?;
        }
        Ok(())
    }

    pub(super) fn restore(c: &Connection, dump: &Dump) -> Result<()> {
        let sealed: bool = c.query_row("SELECT EXISTS (SELECT 1 FROM keys)", [], |r| r.get(0))?;
        let used: bool = c.query_row("SELECT EXISTS (SELECT 1 FROM credentials)", [], |r| {
            r.get(0)
        })?;
        check_sealing(dump, sealed, used)?;
        for name in dump.names() {
            if ops::get(c, &name)?.is_some() {
                return Err(taken(&name));
            }
        }
        insert(c, "keys", KEY_COLUMNS, &dump.keys)?;
        insert(c, "credentials", CREDENTIAL_COLUMNS, &dump.credentials)?;
        insert(c, "events", EVENT_COLUMNS, &dump.events)
    }
}

mod pg {
    use super::super::pg::Tx;
    use super::*;
    use postgres::types::ToSql;

    fn rows(
        tx: &mut Tx<'_>,
        table: &str,
        cols: &[(&str, Kind)],
        order: &str,
    ) -> Result<Vec<Vec<Value>>> {
        let sql = format!("SELECT {} FROM {table} ORDER BY {order}", column_list(cols));
        Ok(tx
            .query_dynamic(&sql, &[])?
            .iter()
            .map(|r| {
                cols.iter()
                    .enumerate()
                    .map(|(i, (_, k))| match k {
                        Kind::Int => Value::Int(r.get(i)),
                        Kind::Text => Value::Text(r.get(i)),
                    })
                    .collect()
            })
            .collect())
    }

    pub(super) fn read(tx: &mut Tx<'_>) -> Result<Dump> {
        Ok(Dump {
            credentials: rows(tx, "credentials", CREDENTIAL_COLUMNS, "name")?,
            events: rows(tx, "events", EVENT_COLUMNS, "id")?,
            keys: rows(tx, "keys", KEY_COLUMNS, "id")?,
            moved_before: false,
        })
    }

    pub(super) fn seal_for_move(tx: &mut Tx<'_>) -> Result<Dump> {
        // Every row locked, as each write to one locks it: a lease another
        // host takes meanwhile waits for this transaction, then finds ours.
        tx.execute("SELECT name FROM credentials ORDER BY name FOR UPDATE", &[])?;
        let live = tx.query(
            concat!(
                "SELECT name, holder FROM leases WHERE expires_at > ",
                "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
            ),
            &[],
        )?;
        let mut moved_before = false;
        for r in &live {
            let (name, holder): (String, String) = (r.get(0), r.get(1));
            if holder != MOVED && crate::lease::holder_alive(&holder) {
                return Err(in_use(&name));
            }
            moved_before |= holder == MOVED;
        }
        tx.execute(
            "INSERT INTO leases (name, holder, expires_at, fence)
             SELECT name, $1, (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $2, fence
             FROM credentials
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,
                expires_at = EXCLUDED.expires_at, fence = EXCLUDED.fence",
            &[&MOVED, &(MOVED_FOR.as_millis() as i64)],
        )?;
        // Hosts following this database re-read the leased rows.
        tx.execute("SELECT pg_notify('tokend_changes', '')", &[])?;
        let mut dump = read(tx)?;
        dump.moved_before = moved_before;
        Ok(dump)
    }

    fn insert(
        tx: &mut Tx<'_>,
        table: &str,
        cols: &[(&str, Kind)],
        rows: &[Vec<Value>],
    ) -> Result<()> {
        let marks = (1..=cols.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            column_list(cols),
            marks.join(", ")
        );
        for row in rows {
            let params: Vec<&(dyn ToSql + Sync)> = row
                .iter()
                .map(|v| match v {
                    Value::Int(i) => i as &(dyn ToSql + Sync),
                    Value::Text(t) => t as &(dyn ToSql + Sync),
                })
                .collect();
            tx.execute_dynamic(&sql, &params)?;
        }
        Ok(())
    }

    pub(super) fn restore(tx: &mut Tx<'_>, dump: &Dump) -> Result<()> {
        // Other hosts' key changes wait for this transaction.
        tx.execute("LOCK TABLE keys IN EXCLUSIVE MODE", &[])?;
        let sealed: bool = tx
            .query_one("SELECT EXISTS (SELECT 1 FROM keys)", &[])?
            .get(0);
        let used: bool = tx
            .query_one("SELECT EXISTS (SELECT 1 FROM credentials)", &[])?
            .get(0);
        check_sealing(dump, sealed, used)?;
        let names = dump.names();
        if let Some(r) = tx.query_opt(
            "SELECT name FROM credentials WHERE name = ANY($1) ORDER BY name LIMIT 1",
            &[&names],
        )? {
            return Err(taken(&r.get::<_, String>(0)));
        }
        insert(tx, "keys", KEY_COLUMNS, &dump.keys)?;
        insert(tx, "credentials", CREDENTIAL_COLUMNS, &dump.credentials)?;
        insert(tx, "events", EVENT_COLUMNS, &dump.events)?;
        tx.execute("SELECT pg_notify('tokend_changes', '')", &[])?;
        Ok(())
    }
}
