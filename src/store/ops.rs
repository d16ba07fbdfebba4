//! The SQL: every statement the store runs on its tables, and its schema,
//! is here and nowhere else, so that another backend can stand behind the
//! same functions. Each takes the connection, inside a transaction its
//! caller holds (a [`StoreConn`](super::StoreConn)'s `immediate`, or the
//! store thread's batch), and returns the store's own types.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    Commit, Credential, FailureUpdate, Grant, Lease, Looked, NewCredential, Over, Result, State,
    StoreError, TokenAt, TokenUpdate,
};
use crate::clock::now_ms;
use crate::secret::Secret;

/// Events kept per credential: enough to explain the last few days, bounded.
const EVENTS_KEPT: i64 = 20;

const COLUMNS: &str = "name, provider, access_token, refresh_token, scope, expires_at, \
    issued_at, state, failures, next_attempt_at, last_error, last_refresh_at, \
    last_validated_at, refresh_started_at, created_at, updated_at, version, rev, not_before, \
    grant_type";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Credential> {
    Ok(Credential {
        name: r.get(0)?,
        provider: r.get(1)?,
        access_token: r.get::<_, Option<String>>(2)?.map(Secret::new),
        grant: match r.get::<_, String>(19)?.as_str() {
            "client_credentials" => Grant::ClientCredentials,
            _ => Grant::RefreshToken(Secret::new(r.get::<_, String>(3)?)),
        },
        scope: r.get(4)?,
        // Every instant the refresher computes with is within what a
        // clock can show, whatever a row holds (an older import's epoch
        // milliseconds, a hand-edited row, a REAL).
        expires_at: instant(r, 5)?,
        issued_at: instant(r, 6)?.unwrap_or(0),
        state: State::parse(&r.get::<_, String>(7)?),
        failures: r.get(8)?,
        next_attempt_at: r.get(9)?,
        last_error: r.get(10)?,
        last_refresh_at: r.get(11)?,
        last_validated_at: r.get(12)?,
        refresh_started_at: r.get(13)?,
        created_at: r.get(14)?,
        updated_at: r.get(15)?,
        version: r.get(16)?,
        rev: r.get(17)?,
        not_before: r.get(18)?,
    })
}

/// An instant column, clamped to what can be shown ([`crate::clock::clamp`]);
/// a REAL (written by hand) is taken too, rather than failing every read.
fn instant(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<i64>> {
    use rusqlite::types::ValueRef;
    Ok(match r.get_ref(i)? {
        ValueRef::Integer(v) => Some(v),
        ValueRef::Real(v) if v.is_finite() => {
            Some(v.clamp(i64::MIN as f64, i64::MAX as f64) as i64)
        }
        ValueRef::Null | ValueRef::Real(_) => None,
        ValueRef::Text(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|t| t.trim().parse().ok()),
        ValueRef::Blob(_) => None,
    }
    .map(crate::clock::clamp))
}

pub fn load_all(c: &Connection) -> Result<Vec<Credential>> {
    let mut st = c.prepare_cached(&format!("SELECT {COLUMNS} FROM credentials ORDER BY name"))?;
    let rows = st.query_map([], from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn get(c: &Connection, name: &str) -> Result<Option<Credential>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM credentials WHERE name = ?1"
    ))?;
    Ok(st.query_row([name], from_row).optional()?)
}

pub fn revisions(c: &Connection) -> Result<Vec<(String, i64)>> {
    let mut st = c.prepare_cached("SELECT name, rev FROM credentials")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// SQLite's `data_version`: changes when *another* connection commits.
pub fn data_version(c: &Connection) -> Result<i64> {
    Ok(c.pragma_query_value(None, "data_version", |r| r.get(0))?)
}

pub fn event(c: &Connection, name: &str, kind: &str, detail: Option<&str>) -> Result<()> {
    c.prepare_cached("INSERT INTO events (name, at, kind, detail) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![name, now_ms(), kind, detail])?;
    c.prepare_cached(TRIM_EVENTS)?
        .execute(params![name, EVENTS_KEPT - 1])?;
    Ok(())
}

/// The trimming of a credential's events after each one recorded. It stays
/// prepared across runs only because the connection asks SQLite for plans
/// that do not depend on bound values (src/store/conn.rs, `open_sqlite`,
/// says why).
pub(super) const TRIM_EVENTS: &str = "DELETE FROM events WHERE name = ?1 AND id <
           (SELECT id FROM events WHERE name = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)";

/// Until when another live holder than `holder` has `name`'s lease; None
/// if none does.
fn busy(c: &Connection, name: &str, holder: &str) -> Result<Option<i64>> {
    let current: Option<(String, i64)> = c
        .prepare_cached("SELECT holder, expires_at FROM leases WHERE name = ?1")?
        .query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(current.and_then(|(other, until)| {
        (other != holder && until > now_ms() && crate::lease::holder_alive(&other)).then_some(until)
    }))
}

/// Whether a replacement of `name` must wait ([`refreshing`]) or give up
/// ([`StoreError::MovedOut`]) for the lease on it.
fn held_off(c: &Connection, name: &str) -> Result<()> {
    moved_away(c, name)?;
    match busy(c, name, &crate::lease::holder_id())? {
        Some(until) => Err(refreshing(name, until)),
        None => Ok(()),
    }
}

/// [`StoreError::MovedOut`] if `tokend migrate` moved `name` away.
pub fn moved_away(c: &Connection, name: &str) -> Result<()> {
    let holder: Option<String> = c
        .prepare_cached("SELECT holder FROM leases WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?;
    match holder.as_deref() == Some(super::MOVED) {
        true => Err(StoreError::MovedOut(name.to_owned())),
        false => Ok(()),
    }
}

/// What a replacement must not run into: a refresh in flight, whose
/// rotated token it would throw away (the commit finds another row).
pub(super) fn refreshing(name: &str, until: i64) -> StoreError {
    StoreError::InUse(format!(
        "{name:?} is being refreshed (its lease runs for {} s more)",
        ((until - now_ms()).max(0) + 999) / 1000
    ))
}

/// Stores `n` (see [`Over`]); `given` is the fingerprint of its refresh
/// token, kept to recognise it after rotation ([`given_fp`]).
pub fn insert(
    c: &Connection,
    n: &NewCredential,
    over: Over,
    given: Option<&str>,
) -> Result<Credential> {
    let now = now_ms();
    let existing = get(c, &n.name)?;
    match over {
        Over::No if existing.is_some() => return Err(StoreError::Exists(n.name.clone())),
        Over::No => {}
        Over::Row(at) => {
            if existing.as_ref().map(Credential::token_at) != at {
                return Err(StoreError::Moved);
            }
            if existing.is_some() {
                held_off(c, &n.name)?;
            }
        }
    }
    // A replaced credential keeps its creation time; its version moves on.
    // A new name's revision starts at the clock in ms, not at 1: a daemon
    // that has not yet seen the old row go (`tokend remove` and `import`
    // of the same name between two of its looks) reloads a row only when
    // its revision rose, and would keep serving the removed credential.
    let (version, rev, created) =
        existing.map_or((1, now, now), |e| (e.version + 1, e.rev + 1, e.created_at));
    // It keeps its fence too, read before REPLACE deletes the old row. A
    // new name's fence starts at the clock in ms, not at 0: fences are
    // compared for equality only, and a holder's id is its process's, so a
    // credential removed and added again while an attempt on the old row is
    // still in flight must not hand out a fence that attempt carries. The
    // old row's fence started at its own creation's clock (or at 0, made
    // before this rule) and grew by one per lease, far slower than the
    // clock (docs/design.md section 3).
    c.execute(
        "INSERT OR REPLACE INTO credentials (name, provider, access_token, refresh_token,
            scope, expires_at, issued_at, state, failures, created_at, updated_at, version, rev,
            grant_type, fence, given_fp)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'valid', 0, ?10, ?7, ?8, ?9, ?11,
            COALESCE((SELECT fence FROM credentials WHERE name = ?1), ?7), ?12)",
        params![
            n.name,
            n.provider,
            n.access_token.as_ref().map(Secret::expose),
            // The column predates client_credentials and is NOT NULL; the
            // grant_type column says that this empty text is no token.
            n.grant.refresh_token().map_or("", Secret::expose),
            n.scope,
            n.expires_at,
            now,
            version,
            rev,
            created,
            n.grant.kind().as_str(),
            given
        ],
    )?;
    event(c, &n.name, n.event, None)?;
    get(c, &n.name)?.ok_or_else(|| StoreError::NotFound(n.name.clone()))
}

/// The rows named (all, for None), each with the fingerprint of the
/// refresh token it was last given by `import` or `authorize` (None for
/// a row stored before schema 5, or given none).
pub fn looked(c: &Connection, name: Option<&str>) -> Result<Looked> {
    let (sql, args): (String, Vec<&str>) = match name {
        Some(n) => (
            format!("SELECT {COLUMNS}, given_fp FROM credentials WHERE name = ?1"),
            vec![n],
        ),
        None => (
            format!("SELECT {COLUMNS}, given_fp FROM credentials"),
            vec![],
        ),
    };
    let mut st = c.prepare(&sql)?;
    let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
        Ok((from_row(r)?, r.get(20)?))
    })?;
    Ok(Looked(rows.collect::<rusqlite::Result<_>>()?))
}

pub fn take_lease(
    c: &Connection,
    name: &str,
    holder: &str,
    ttl: Duration,
    at: TokenAt,
) -> Result<Lease> {
    let now = now_ms();
    if let Some(until) = busy(c, name, holder)? {
        return Ok(Lease::Busy { until });
    }
    let Some(cred) = get(c, name)? else {
        c.execute("DELETE FROM leases WHERE name = ?1", [name])?;
        return Ok(Lease::Gone);
    };
    if cred.token_at() != at {
        return Ok(Lease::Changed(Box::new(cred)));
    }
    let fence: i64 = c
        .prepare_cached("UPDATE credentials SET fence = fence + 1 WHERE name = ?1 RETURNING fence")?
        .query_row([name], |r| r.get(0))?;
    c.prepare_cached(
        "INSERT OR REPLACE INTO leases (name, holder, expires_at, fence) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![name, holder, now + ttl.as_millis() as i64, fence])?;
    let interrupted = cred.refresh_started_at.is_some();
    if interrupted {
        event(
            c,
            name,
            "refresh_interrupted",
            Some("a previous refresh never finished"),
        )?;
    }
    c.prepare_cached(
        "UPDATE credentials SET refresh_started_at = ?2, state = 'refreshing',
            updated_at = ?2, rev = rev + 1 WHERE name = ?1",
    )?
    .execute(params![name, now])?;
    Ok(Lease::Taken {
        credential: Box::new(cred),
        interrupted,
        fence,
    })
}

/// Takes `name`'s lease for work that is not a refresh (revoking the grant
/// before removing it): no refresh is marked as started, so giving it back
/// leaves the row as it was. Like [`take_lease`], it bumps the fence, so a
/// holder whose lease expired can commit nothing meanwhile.
pub fn hold_lease(c: &Connection, name: &str, holder: &str, ttl: Duration) -> Result<Lease> {
    let now = now_ms();
    if let Some(until) = busy(c, name, holder)? {
        return Ok(Lease::Busy { until });
    }
    let Some(cred) = get(c, name)? else {
        return Ok(Lease::Gone);
    };
    let fence: i64 = c
        .prepare_cached("UPDATE credentials SET fence = fence + 1 WHERE name = ?1 RETURNING fence")?
        .query_row([name], |r| r.get(0))?;
    c.prepare_cached(
        "INSERT OR REPLACE INTO leases (name, holder, expires_at, fence) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![name, holder, now + ttl.as_millis() as i64, fence])?;
    Ok(Lease::Taken {
        credential: Box::new(cred),
        interrupted: false,
        fence,
    })
}

/// Extends `holder`'s lease `fence` to `ttl` from now; whether it is still ours.
pub fn renew_lease(
    c: &Connection,
    name: &str,
    holder: &str,
    fence: i64,
    ttl: Duration,
) -> Result<bool> {
    let n = c
        .prepare_cached(
            "UPDATE leases SET expires_at = ?4 WHERE name = ?1 AND holder = ?2 AND fence = ?3",
        )?
        .execute(params![
            name,
            holder,
            fence,
            now_ms() + ttl.as_millis() as i64
        ])?;
    Ok(n > 0)
}

/// Whether `holder`'s lease `fence` is the credential's current lease.
/// One that expired but that nobody took since still is: nobody else
/// can have acted on the credential meanwhile.
fn holds(c: &Connection, name: &str, holder: &str, fence: i64) -> Result<bool> {
    Ok(
        c.prepare_cached("SELECT 1 FROM leases WHERE name = ?1 AND holder = ?2 AND fence = ?3")?
            .query_row(params![name, holder, fence], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

/// The only write of a holder that lost its lease: an event.
fn lease_lost(c: &Connection, name: &str, what: &str) -> Result<Commit> {
    if get(c, name)?.is_some() {
        event(c, name, "lease_lost", Some(&super::lease_lost_detail(what)))?;
    }
    Ok(Commit::LeaseLost)
}

/// Whether no lease of `name` is held, live or expired: the last holder
/// gave it back.
fn unleased(c: &Connection, name: &str) -> Result<bool> {
    Ok(c.prepare_cached("SELECT 1 FROM leases WHERE name = ?1")?
        .query_row([name], |_| Ok(()))
        .optional()?
        .is_none())
}

pub fn commit_refresh(
    c: &Connection,
    name: &str,
    holder: &str,
    fence: i64,
    at: TokenAt,
    u: &TokenUpdate,
) -> Result<Commit> {
    let held = holds(c, name, holder, fence)?;
    if !held && !unleased(c, name)? {
        return lease_lost(c, name, "a refreshed token pair");
    }
    let now = now_ms();
    // Without a new access token (?3 NULL), the stored one keeps its
    // expiry and its lifetime's start.
    let n = c
        .prepare_cached(
            "UPDATE credentials SET access_token = COALESCE(?3, access_token),
                refresh_token = COALESCE(?4, refresh_token), scope = COALESCE(?5, scope),
                expires_at = CASE WHEN ?3 IS NULL THEN expires_at ELSE ?6 END,
                issued_at = CASE WHEN ?3 IS NULL THEN issued_at ELSE ?7 END,
                state = 'valid', failures = 0,
                next_attempt_at = NULL, not_before = NULL, last_error = NULL, last_refresh_at = ?7,
                last_validated_at = ?7, refresh_started_at = NULL, updated_at = ?7,
                version = version + 1, rev = rev + 1
             WHERE name = ?1 AND version = ?2 AND created_at = ?8
                AND (?9 OR (state = 'refreshing' AND refresh_started_at IS NOT NULL
                    AND fence = ?10))",
        )?
        .execute(params![
            name,
            at.version,
            u.access_token.as_ref().map(Secret::expose),
            u.refresh_token.as_ref().map(Secret::expose),
            u.scope,
            u.expires_at,
            now,
            at.created_at,
            held,
            fence + 1
        ])?;
    release(c, name, holder, fence)?;
    if n == 0 && !held {
        return lease_lost(c, name, "a refreshed token pair");
    }
    if n == 0 {
        return Ok(Commit::Conflict);
    }
    event(c, name, "refreshed", None)?;
    done(c, name)
}

pub fn record_failure(
    c: &Connection,
    name: &str,
    holder: &str,
    at: TokenAt,
    f: &FailureUpdate,
) -> Result<Commit> {
    if let Some(fence) = f.lease
        && !holds(c, name, holder, fence)?
    {
        return lease_lost(c, name, "a failed refresh's outcome");
    }
    let now = now_ms();
    // Only the holder of the refresh's lease may clear its mark.
    let clear_mark = f.lease.is_some() && !f.outcome_unknown;
    let n = c
        .prepare_cached(
            "UPDATE credentials SET state = ?3, failures = ?4, next_attempt_at = ?5,
                last_error = ?6, updated_at = ?7, rev = rev + 1, not_before = ?9,
                refresh_started_at = CASE WHEN ?8 THEN NULL ELSE refresh_started_at END
             WHERE name = ?1 AND version = ?2 AND created_at = ?10",
        )?
        .execute(params![
            name,
            at.version,
            f.state.as_str(),
            f.failures,
            f.next_attempt_at,
            f.error,
            now,
            clear_mark,
            f.not_before,
            at.created_at
        ])?;
    if let Some(fence) = f.lease {
        release(c, name, holder, fence)?;
    }
    if n == 0 {
        return Ok(Commit::Conflict);
    }
    event(c, name, f.event, Some(&f.error))?;
    done(c, name)
}

pub fn record_validated(c: &Connection, name: &str, at: TokenAt) -> Result<Commit> {
    let now = now_ms();
    let n = c
        .prepare_cached(
            "UPDATE credentials SET last_validated_at = ?3, updated_at = ?3, rev = rev + 1,
                state = CASE WHEN state = 'retrying' THEN 'valid' ELSE state END,
                failures = CASE WHEN state = 'retrying' THEN 0 ELSE failures END,
                next_attempt_at = CASE WHEN state = 'retrying' THEN NULL ELSE next_attempt_at END,
                not_before = CASE WHEN state = 'retrying' THEN NULL ELSE not_before END,
                last_error = NULL
             WHERE name = ?1 AND version = ?2 AND created_at = ?4",
        )?
        .execute(params![name, at.version, now, at.created_at])?;
    if n == 0 {
        return Ok(Commit::Conflict);
    }
    event(c, name, "validated", None)?;
    done(c, name)
}

/// Sets the last error of the token `at`, its state untouched.
pub fn record_note(c: &Connection, name: &str, at: TokenAt, error: &str) -> Result<Commit> {
    let n = c
        .prepare_cached(
            "UPDATE credentials SET last_error = ?3, last_validated_at = ?4,
                updated_at = ?4, rev = rev + 1
             WHERE name = ?1 AND version = ?2 AND created_at = ?5",
        )?
        .execute(params![name, at.version, error, now_ms(), at.created_at])?;
    if n == 0 {
        return Ok(Commit::Conflict);
    }
    event(c, name, "validation_forbidden", Some(error))?;
    done(c, name)
}

/// Moves the next attempt of each `retrying` `(name, token, at)` forward
/// to `at`, never before its Retry-After; returns the rows that moved.
pub fn bring_forward(c: &Connection, items: &[(String, TokenAt, i64)]) -> Result<Vec<Credential>> {
    let mut moved = Vec::new();
    for (name, token, at) in items {
        let n = c
            .prepare_cached(
                "UPDATE credentials SET next_attempt_at = MAX(?3, COALESCE(not_before, 0)),
                    rev = rev + 1
                 WHERE name = ?1 AND version = ?2 AND created_at = ?4 AND state = 'retrying'
                    AND next_attempt_at > MAX(?3, COALESCE(not_before, 0))",
            )?
            .execute(params![name, token.version, at, token.created_at])?;
        if n > 0 {
            moved.extend(get(c, name)?);
        }
    }
    Ok(moved)
}

pub fn reset_backoff(c: &Connection, name: &str) -> Result<Commit> {
    let n = c.execute(
        "UPDATE credentials SET state = 'valid', failures = 0, next_attempt_at = NULL,
            not_before = NULL, updated_at = ?2, rev = rev + 1
         WHERE name = ?1 AND state = 'misconfigured'",
        params![name, now_ms()],
    )?;
    if n == 0 {
        return Ok(Commit::Conflict);
    }
    done(c, name)
}

/// A lease given back unused: lease `fence`, on the row at `version`, to
/// be put back to `state` and `started` (its "refresh started" mark).
#[derive(Clone, Copy)]
pub struct Back {
    pub fence: i64,
    pub version: i64,
    pub state: State,
    pub started: Option<i64>,
}

/// See [`super::Store::abandon_lease`]. A lease no longer ours leaves the
/// row to its new holder; a row replaced meanwhile (a new version) is left
/// as its writer made it.
pub fn abandon(c: &Connection, name: &str, holder: &str, b: Back) -> Result<()> {
    if !holds(c, name, holder, b.fence)? {
        return Ok(());
    }
    c.prepare_cached(
        "UPDATE credentials SET state = ?2, refresh_started_at = ?3, updated_at = ?4,
            rev = rev + 1 WHERE name = ?1 AND version = ?5",
    )?
    .execute(params![
        name,
        b.state.as_str(),
        b.started,
        now_ms(),
        b.version
    ])?;
    release(c, name, holder, b.fence)
}

/// Gives back lease `fence` only: an attempt that outlived its row (removed
/// and added again meanwhile) must not release the new row's lease, which
/// the same process may hold under the same holder id.
pub fn release(c: &Connection, name: &str, holder: &str, fence: i64) -> Result<()> {
    c.prepare_cached("DELETE FROM leases WHERE name = ?1 AND holder = ?2 AND fence = ?3")?
        .execute(params![name, holder, fence])?;
    Ok(())
}

pub fn done(c: &Connection, name: &str) -> Result<Commit> {
    get(c, name)?
        .map(|cred| Commit::Done(Box::new(cred)))
        .ok_or_else(|| StoreError::NotFound(name.to_owned()))
}

/// [`remove`], only while `holder` still has the lease `fence` on it
/// (`remove --revoke`, after revoking): false, removing nothing, if the
/// lease passed to another meanwhile.
pub fn remove_held(c: &Connection, name: &str, holder: &str, fence: i64) -> Result<bool> {
    let held = c
        .prepare_cached("SELECT 1 FROM leases WHERE name = ?1 AND holder = ?2 AND fence = ?3")?
        .exists(params![name, holder, fence])?;
    if !held {
        return Ok(false);
    }
    remove(c, name)
}

/// Forgets a credential: its row, events and lease. Returns whether it existed.
pub fn remove(c: &Connection, name: &str) -> Result<bool> {
    let n = c.execute("DELETE FROM credentials WHERE name = ?1", [name])?;
    c.execute("DELETE FROM events WHERE name = ?1", [name])?;
    c.execute("DELETE FROM leases WHERE name = ?1", [name])?;
    Ok(n > 0)
}

// ---- the schema ----
//
// The statements' text, indentation included, is what earlier builds ran:
// SQLite keeps a table's CREATE text (and every column added) in
// sqlite_master, and every database keeps the same one.

/// The file's schema version, `PRAGMA user_version`.
pub fn user_version(c: &Connection) -> Result<i64> {
    Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

/// Version 1: the credentials, their events and their leases.
pub fn migrate_to_1(c: &Connection) -> Result<()> {
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
}

/// Version 2: lease fencing, and the provider's Retry-After kept apart from
/// the backoff so that nothing brings an attempt before it.
pub fn migrate_to_2(c: &Connection) -> Result<()> {
    c.execute_batch(
        "ALTER TABLE credentials ADD COLUMN not_before INTEGER;
                    ALTER TABLE credentials ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
                    ALTER TABLE leases ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
                    PRAGMA user_version = 2;",
    )?;
    Ok(())
}

/// Version 3: the grant a credential's tokens come from (README "Other
/// grants"); every earlier row holds a refresh token.
pub fn migrate_to_3(c: &Connection) -> Result<()> {
    c.execute_batch(
        "ALTER TABLE credentials ADD COLUMN grant_type TEXT NOT NULL DEFAULT 'refresh_token';
                    PRAGMA user_version = 3;",
    )?;
    Ok(())
}

/// Version 5: the fingerprint of the refresh token each credential was
/// given, so that `import --force` can refuse that token once tokend has
/// rotated it away (README "Onboarding").
pub fn migrate_to_5(c: &Connection) -> Result<()> {
    c.execute_batch(
        "ALTER TABLE credentials ADD COLUMN given_fp TEXT;
                    PRAGMA user_version = 5;",
    )?;
    Ok(())
}
