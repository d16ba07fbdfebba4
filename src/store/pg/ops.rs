//! The PostgreSQL SQL: the operations of `../ops.rs`, with their meaning
//! unchanged, for hosts that share the database. Each runs inside the
//! transaction its caller opened (one per operation, see `mod.rs`).
//!
//! What differs, because several hosts write at once:
//!
//! * every write first locks the credential's row (`SELECT … FOR UPDATE`),
//!   so a lease taken by one host and a commit by another serialise, and
//!   the fence a commit checks cannot move before it writes;
//! * lease expiry is set and compared on the database's clock, never a
//!   host's: a host whose clock runs ahead cannot think a live lease
//!   expired (docs/design.md, "Leases across hosts");
//! * every write to a credential's row notifies the other hosts
//!   ([`changed`], `listen.rs`).

use std::time::Duration;

use postgres::Transaction;
use postgres::types::ToSql;

use super::super::{
    Commit, Credential, FailureUpdate, Grant, Lease, NewCredential, Result, State, StoreError,
    TokenUpdate,
};
use crate::clock::now_ms;
use crate::secret::Secret;

/// Events kept per credential, as SQLite keeps.
const EVENTS_KEPT: i64 = 20;

/// The database's clock, in milliseconds since the Unix epoch: what lease
/// expiry is measured on.
const DB_NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

const COLUMNS: &str = "name, provider, access_token, refresh_token, scope, expires_at, \
    issued_at, state, failures, next_attempt_at, last_error, last_refresh_at, \
    last_validated_at, refresh_started_at, created_at, updated_at, version, rev, not_before, \
    grant_type";

fn from_row(r: &postgres::Row) -> Credential {
    let instant = |i: usize| r.get::<_, Option<i64>>(i).map(crate::clock::clamp);
    Credential {
        name: r.get(0),
        provider: r.get(1),
        access_token: r.get::<_, Option<String>>(2).map(Secret::new),
        grant: match r.get::<_, &str>(19) {
            "client_credentials" => Grant::ClientCredentials,
            _ => Grant::RefreshToken(Secret::new(r.get::<_, String>(3))),
        },
        scope: r.get(4),
        expires_at: instant(5),
        issued_at: instant(6).unwrap_or(0),
        state: State::parse(r.get(7)),
        failures: r.get::<_, i64>(8).clamp(0, u32::MAX.into()) as u32,
        next_attempt_at: r.get(9),
        last_error: r.get(10),
        last_refresh_at: r.get(11),
        last_validated_at: r.get(12),
        refresh_started_at: r.get(13),
        created_at: r.get(14),
        updated_at: r.get(15),
        version: r.get(16),
        rev: r.get(17),
        not_before: r.get(18),
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub fn load_all(c: &mut Transaction<'_>) -> Result<Vec<Credential>> {
    let rows = c.query(
        &format!("SELECT {COLUMNS} FROM credentials ORDER BY name"),
        &[],
    )?;
    Ok(rows.iter().map(from_row).collect())
}

pub fn get(c: &mut Transaction<'_>, name: &str) -> Result<Option<Credential>> {
    let row = c.query_opt(
        &format!("SELECT {COLUMNS} FROM credentials WHERE name = $1"),
        &[&name],
    )?;
    Ok(row.as_ref().map(from_row))
}

/// Locks `name`'s row until the transaction ends (see the module docs);
/// the row as it is once the lock is ours.
fn lock(c: &mut Transaction<'_>, name: &str) -> Result<Option<Credential>> {
    let row = c.query_opt(
        &format!("SELECT {COLUMNS} FROM credentials WHERE name = $1 FOR UPDATE"),
        &[&name],
    )?;
    Ok(row.as_ref().map(from_row))
}

pub fn revisions(c: &mut Transaction<'_>) -> Result<Vec<(String, i64)>> {
    let rows = c.query("SELECT name, rev FROM credentials", &[])?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Tells the other hosts, once this transaction commits, that `name`'s row
/// changed.
fn changed(c: &mut Transaction<'_>, name: &str) -> Result<()> {
    c.execute(
        "SELECT pg_notify($1, $2)",
        &[&super::listen::CHANNEL, &name],
    )?;
    Ok(())
}

fn event(c: &mut Transaction<'_>, name: &str, kind: &str, detail: Option<&str>) -> Result<()> {
    c.execute(
        "INSERT INTO events (name, at, kind, detail) VALUES ($1, $2, $3, $4)",
        &[&name, &now_ms(), &kind, &detail],
    )?;
    c.execute(
        "DELETE FROM events WHERE name = $1 AND id <
           (SELECT id FROM events WHERE name = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
        &[&name, &(EVENTS_KEPT - 1)],
    )?;
    Ok(())
}

pub fn insert(c: &mut Transaction<'_>, n: &NewCredential, replace: bool) -> Result<Credential> {
    let now = now_ms();
    let existing = lock(c, &n.name)?;
    if existing.is_some() && !replace {
        return Err(StoreError::Exists(n.name.clone()));
    }
    let params: [&(dyn ToSql + Sync); 9] = [
        &n.name,
        &n.provider,
        &n.access_token.as_ref().map(Secret::expose),
        // As in SQLite: the column is NOT NULL, and grant_type says that
        // this empty text is no token.
        &n.grant.refresh_token().map_or("", Secret::expose),
        &n.scope,
        &n.expires_at,
        &now,
        &n.grant.kind().as_str(),
        &replace,
    ];
    // A replaced credential keeps its creation time and its fence (a lease
    // taken before cannot commit: the version moves on); everything else
    // starts again, as in SQLite.
    let inserted = c.execute(
        "INSERT INTO credentials (name, provider, access_token, refresh_token, scope,
            expires_at, issued_at, state, failures, created_at, updated_at, version, rev,
            grant_type)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'valid', 0, $7, $7, 1, 1, $8)
         ON CONFLICT (name) DO UPDATE SET provider = EXCLUDED.provider,
            access_token = EXCLUDED.access_token, refresh_token = EXCLUDED.refresh_token,
            scope = EXCLUDED.scope, expires_at = EXCLUDED.expires_at,
            issued_at = EXCLUDED.issued_at, state = 'valid', failures = 0,
            next_attempt_at = NULL, last_error = NULL, last_refresh_at = NULL,
            last_validated_at = NULL, refresh_started_at = NULL, not_before = NULL,
            updated_at = EXCLUDED.updated_at, version = credentials.version + 1,
            rev = credentials.rev + 1, grant_type = EXCLUDED.grant_type
         WHERE $9",
        &params,
    )?;
    if inserted == 0 {
        // Another host stored the name after we looked, and this is no
        // replacement.
        return Err(StoreError::Exists(n.name.clone()));
    }
    event(c, &n.name, n.event, None)?;
    changed(c, &n.name)?;
    get(c, &n.name)?.ok_or_else(|| StoreError::NotFound(n.name.clone()))
}

/// Whether another live holder has `name`'s lease: until when, in this
/// host's clock (the remaining time is measured on the database's).
fn busy(c: &mut Transaction<'_>, name: &str, holder: &str) -> Result<Option<i64>> {
    let row = c.query_opt(
        &format!("SELECT holder, expires_at - {DB_NOW} FROM leases WHERE name = $1"),
        &[&name],
    )?;
    Ok(row.and_then(|r| {
        let (other, remaining): (String, i64) = (r.get(0), r.get(1));
        (other != holder && remaining > 0 && crate::lease::holder_alive(&other))
            .then(|| now_ms() + remaining)
    }))
}

/// Bumps the fence and gives the lease to `holder` for `ttl`.
fn grant_lease(c: &mut Transaction<'_>, name: &str, holder: &str, ttl: Duration) -> Result<i64> {
    let fence: i64 = c
        .query_one(
            "UPDATE credentials SET fence = fence + 1 WHERE name = $1 RETURNING fence",
            &[&name],
        )?
        .get(0);
    c.execute(
        &format!(
            "INSERT INTO leases (name, holder, expires_at, fence) VALUES ($1, $2, {DB_NOW} + $3, $4)
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,
                expires_at = EXCLUDED.expires_at, fence = EXCLUDED.fence"
        ),
        &[&name, &holder, &ms(ttl), &fence],
    )?;
    Ok(fence)
}

pub fn take_lease(
    c: &mut Transaction<'_>,
    name: &str,
    holder: &str,
    ttl: Duration,
    version: i64,
) -> Result<Lease> {
    let now = now_ms();
    let cred = lock(c, name)?;
    if let Some(until) = busy(c, name, holder)? {
        return Ok(Lease::Busy { until });
    }
    let Some(cred) = cred else {
        c.execute("DELETE FROM leases WHERE name = $1", &[&name])?;
        return Ok(Lease::Gone);
    };
    if cred.version != version {
        return Ok(Lease::Changed(Box::new(cred)));
    }
    let fence = grant_lease(c, name, holder, ttl)?;
    let interrupted = cred.refresh_started_at.is_some();
    if interrupted {
        event(
            c,
            name,
            "refresh_interrupted",
            Some("a previous refresh never finished"),
        )?;
    }
    c.execute(
        "UPDATE credentials SET refresh_started_at = $2, state = 'refreshing',
            updated_at = $2, rev = rev + 1 WHERE name = $1",
        &[&name, &now],
    )?;
    changed(c, name)?;
    Ok(Lease::Taken {
        credential: Box::new(cred),
        interrupted,
        fence,
    })
}

/// See `../ops.rs`'s `hold_lease`.
pub fn hold_lease(
    c: &mut Transaction<'_>,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Lease> {
    let cred = lock(c, name)?;
    if let Some(until) = busy(c, name, holder)? {
        return Ok(Lease::Busy { until });
    }
    let Some(cred) = cred else {
        return Ok(Lease::Gone);
    };
    let fence = grant_lease(c, name, holder, ttl)?;
    Ok(Lease::Taken {
        credential: Box::new(cred),
        interrupted: false,
        fence,
    })
}

pub fn renew_lease(
    c: &mut Transaction<'_>,
    name: &str,
    holder: &str,
    fence: i64,
    ttl: Duration,
) -> Result<bool> {
    let n = c.execute(
        &format!(
            "UPDATE leases SET expires_at = {DB_NOW} + $4
             WHERE name = $1 AND holder = $2 AND fence = $3"
        ),
        &[&name, &holder, &fence, &ms(ttl)],
    )?;
    Ok(n > 0)
}

/// Whether `holder`'s lease `fence` is the current one; the caller holds
/// the row's lock, so it stays so until the transaction ends.
fn holds(c: &mut Transaction<'_>, name: &str, holder: &str, fence: i64) -> Result<bool> {
    Ok(c.query_opt(
        "SELECT 1 FROM leases WHERE name = $1 AND holder = $2 AND fence = $3",
        &[&name, &holder, &fence],
    )?
    .is_some())
}

fn lease_lost(c: &mut Transaction<'_>, name: &str, what: &str) -> Result<Commit> {
    if get(c, name)?.is_some() {
        event(
            c,
            name,
            "lease_lost",
            Some(&crate::store::lease_lost_detail(what)),
        )?;
    }
    Ok(Commit::LeaseLost)
}

pub fn commit_refresh(
    c: &mut Transaction<'_>,
    name: &str,
    holder: &str,
    fence: i64,
    version: i64,
    u: &TokenUpdate,
) -> Result<Commit> {
    lock(c, name)?;
    if !holds(c, name, holder, fence)? {
        return lease_lost(c, name, "a refreshed token pair");
    }
    let now = now_ms();
    let n = c.execute(
        "UPDATE credentials SET access_token = COALESCE($3, access_token),
            refresh_token = COALESCE($4, refresh_token), scope = COALESCE($5, scope),
            expires_at = CASE WHEN $3::text IS NULL THEN expires_at ELSE $6 END,
            issued_at = CASE WHEN $3::text IS NULL THEN issued_at ELSE $7 END,
            state = 'valid', failures = 0,
            next_attempt_at = NULL, not_before = NULL, last_error = NULL, last_refresh_at = $7,
            last_validated_at = $7, refresh_started_at = NULL, updated_at = $7,
            version = version + 1, rev = rev + 1
         WHERE name = $1 AND version = $2",
        &[
            &name,
            &version,
            &u.access_token.as_ref().map(Secret::expose),
            &u.refresh_token.as_ref().map(Secret::expose),
            &u.scope,
            &u.expires_at,
            &now,
        ],
    )?;
    release(c, name, holder)?;
    if n == 0 {
        return Ok(Commit::Conflict);
    }
    event(c, name, "refreshed", None)?;
    done(c, name)
}

pub fn record_failure(
    c: &mut Transaction<'_>,
    name: &str,
    holder: &str,
    version: i64,
    f: &FailureUpdate,
) -> Result<Commit> {
    lock(c, name)?;
    if let Some(fence) = f.lease
        && !holds(c, name, holder, fence)?
    {
        return lease_lost(c, name, "a failed refresh's outcome");
    }
    let clear_mark = f.lease.is_some() && !f.outcome_unknown;
    let n = c.execute(
        "UPDATE credentials SET state = $3, failures = $4, next_attempt_at = $5,
            last_error = $6, updated_at = $7, rev = rev + 1, not_before = $9,
            refresh_started_at = CASE WHEN $8 THEN NULL ELSE refresh_started_at END
         WHERE name = $1 AND version = $2",
        &[
            &name,
            &version,
            &f.state.as_str(),
            &i64::from(f.failures),
            &f.next_attempt_at,
            &f.error,
            &now_ms(),
            &clear_mark,
            &f.not_before,
        ],
    )?;
    if f.lease.is_some() {
        release(c, name, holder)?;
    }
    if n == 0 {
        return Ok(Commit::Conflict);
    }
    event(c, name, f.event, Some(&f.error))?;
    done(c, name)
}

pub fn record_validated(c: &mut Transaction<'_>, name: &str, version: i64) -> Result<Commit> {
    let n = c.execute(
        "UPDATE credentials SET last_validated_at = $3, updated_at = $3, rev = rev + 1,
            state = CASE WHEN state = 'retrying' THEN 'valid' ELSE state END,
            failures = CASE WHEN state = 'retrying' THEN 0 ELSE failures END,
            next_attempt_at = CASE WHEN state = 'retrying' THEN NULL ELSE next_attempt_at END,
            not_before = CASE WHEN state = 'retrying' THEN NULL ELSE not_before END,
            last_error = NULL
         WHERE name = $1 AND version = $2",
        &[&name, &version, &now_ms()],
    )?;
    if n == 0 {
        return Ok(Commit::Conflict);
    }
    event(c, name, "validated", None)?;
    done(c, name)
}

pub fn record_note(
    c: &mut Transaction<'_>,
    name: &str,
    version: i64,
    error: &str,
) -> Result<Commit> {
    let n = c.execute(
        "UPDATE credentials SET last_error = $3, last_validated_at = $4,
            updated_at = $4, rev = rev + 1 WHERE name = $1 AND version = $2",
        &[&name, &version, &error, &now_ms()],
    )?;
    if n == 0 {
        return Ok(Commit::Conflict);
    }
    event(c, name, "validation_forbidden", Some(error))?;
    done(c, name)
}

pub fn bring_forward(
    c: &mut Transaction<'_>,
    items: &[(String, i64, i64)],
) -> Result<Vec<Credential>> {
    let mut moved = Vec::new();
    for (name, version, at) in items {
        let rows = c.query(
            &format!(
                "UPDATE credentials SET next_attempt_at = GREATEST($3, COALESCE(not_before, 0)),
                    rev = rev + 1
                 WHERE name = $1 AND version = $2 AND state = 'retrying'
                    AND next_attempt_at > GREATEST($3, COALESCE(not_before, 0))
                 RETURNING {COLUMNS}"
            ),
            &[name, version, at],
        )?;
        if !rows.is_empty() {
            changed(c, name)?;
        }
        moved.extend(rows.iter().map(from_row));
    }
    Ok(moved)
}

pub fn reset_backoff(c: &mut Transaction<'_>, name: &str) -> Result<Commit> {
    let n = c.execute(
        "UPDATE credentials SET state = 'valid', failures = 0, next_attempt_at = NULL,
            not_before = NULL, updated_at = $2, rev = rev + 1
         WHERE name = $1 AND state = 'misconfigured'",
        &[&name, &now_ms()],
    )?;
    if n == 0 {
        return Ok(Commit::Conflict);
    }
    done(c, name)
}

pub fn abandon(
    c: &mut Transaction<'_>,
    name: &str,
    holder: &str,
    fence: i64,
    state: State,
    started: Option<i64>,
) -> Result<()> {
    lock(c, name)?;
    if !holds(c, name, holder, fence)? {
        return Ok(());
    }
    c.execute(
        "UPDATE credentials SET state = $2, refresh_started_at = $3, updated_at = $4,
            rev = rev + 1 WHERE name = $1",
        &[&name, &state.as_str(), &started, &now_ms()],
    )?;
    changed(c, name)?;
    release(c, name, holder)
}

pub fn release(c: &mut Transaction<'_>, name: &str, holder: &str) -> Result<()> {
    c.execute(
        "DELETE FROM leases WHERE name = $1 AND holder = $2",
        &[&name, &holder],
    )?;
    Ok(())
}

/// The row as this write left it, announced to the other hosts.
fn done(c: &mut Transaction<'_>, name: &str) -> Result<Commit> {
    changed(c, name)?;
    get(c, name)?
        .map(|cred| Commit::Done(Box::new(cred)))
        .ok_or_else(|| StoreError::NotFound(name.to_owned()))
}

pub fn remove(c: &mut Transaction<'_>, name: &str) -> Result<bool> {
    let n = c.execute("DELETE FROM credentials WHERE name = $1", &[&name])?;
    c.execute("DELETE FROM events WHERE name = $1", &[&name])?;
    c.execute("DELETE FROM leases WHERE name = $1", &[&name])?;
    if n > 0 {
        changed(c, name)?;
    }
    Ok(n > 0)
}

// ---- the schema ----

/// The schema version `tokend_schema` records; 0 for an empty database.
pub fn schema_version(c: &mut Transaction<'_>) -> Result<i64> {
    let exists: bool = c
        .query_one("SELECT to_regclass('tokend_schema') IS NOT NULL", &[])?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(
        c.query_one("SELECT COALESCE(max(version), 0) FROM tokend_schema", &[])?
            .get(0),
    )
}

/// The tables at `version`, in one step: they mean what SQLite's mean at
/// the same version (`../ops.rs`), in PostgreSQL's types (instants are
/// BIGINT milliseconds since the Unix epoch).
pub fn create_schema(c: &mut Transaction<'_>, version: i64) -> Result<()> {
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS tokend_schema (version BIGINT NOT NULL);
         CREATE TABLE IF NOT EXISTS credentials (
             name TEXT PRIMARY KEY,
             provider TEXT NOT NULL,
             access_token TEXT,
             refresh_token TEXT NOT NULL,
             scope TEXT,
             expires_at BIGINT,
             issued_at BIGINT NOT NULL,
             state TEXT NOT NULL,
             failures BIGINT NOT NULL DEFAULT 0,
             next_attempt_at BIGINT,
             last_error TEXT,
             last_refresh_at BIGINT,
             last_validated_at BIGINT,
             refresh_started_at BIGINT,
             created_at BIGINT NOT NULL,
             updated_at BIGINT NOT NULL,
             version BIGINT NOT NULL,
             rev BIGINT NOT NULL,
             not_before BIGINT,
             fence BIGINT NOT NULL DEFAULT 0,
             grant_type TEXT NOT NULL DEFAULT 'refresh_token'
         );
         CREATE TABLE IF NOT EXISTS events (
             id BIGSERIAL PRIMARY KEY,
             name TEXT NOT NULL,
             at BIGINT NOT NULL,
             kind TEXT NOT NULL,
             detail TEXT
         );
         CREATE INDEX IF NOT EXISTS events_by_name ON events (name, id);
         CREATE TABLE IF NOT EXISTS leases (
             name TEXT PRIMARY KEY,
             holder TEXT NOT NULL,
             expires_at BIGINT NOT NULL,
             fence BIGINT NOT NULL DEFAULT 0
         );
         DELETE FROM tokend_schema;",
    )?;
    c.execute(
        "INSERT INTO tokend_schema (version) VALUES ($1)",
        &[&version],
    )?;
    Ok(())
}
