//! The PostgreSQL SQL: the operations of `../ops.rs`, with their meaning
//! unchanged, for hosts that share the database. Each runs inside the
//! transaction its caller opened (one per operation, see `mod.rs`; a lone
//! read runs on its own), every statement prepared once per connection.
//!
//! What differs, because several hosts write at once:
//!
//! * every write first locks the credential's row (`SELECT … FOR UPDATE`),
//!   so a lease taken by one host and a commit by another serialise, and
//!   the fence a commit checks cannot move before it writes. The lock is a
//!   statement of its own: in READ COMMITTED each statement sees what
//!   committed before it started, so the lease row is read by the next
//!   statement, once the lock is ours (a statement that waited for the
//!   lock would still see the lease table as it was before the wait);
//! * lease expiry is set and compared on the database's clock, never a
//!   host's: a host whose clock runs ahead cannot think a live lease
//!   expired (docs/design.md, "Leases across hosts");
//! * every write to a credential's row notifies the other hosts
//!   ([`changed`], `listen.rs`).
//!
//! The hot path, a refresh, is two transactions of two statements each:
//! [`take_lease`] (the lock, then one statement that checks the lease,
//! grants it, marks the refresh started and notifies) and
//! [`commit_refresh`] (the lock, then one statement that checks the lease
//! and fence, compare-and-swaps the token pair on the version, releases
//! the lease, records the event and notifies).

use std::time::Duration;

use postgres::Row;
use postgres::Transaction;
use postgres::types::ToSql;

use super::super::{
    Commit, Credential, FailureUpdate, Grant, Lease, Looked, NewCredential, Over, Result, State,
    StoreError, TokenAt, TokenUpdate,
};
use super::Tx;
use super::keys::active_key;
use crate::clock::now_ms;
use crate::secret::Secret;
use crate::store::keys::check_key;
use crate::store::ops::Back;

/// Events kept per credential, as SQLite keeps.
const EVENTS_KEPT: i64 = 20;

/// The database's clock, in milliseconds since the Unix epoch: what lease
/// expiry is measured on.
macro_rules! db_now {
    () => {
        "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
    };
}

macro_rules! columns {
    () => {
        "name, provider, access_token, refresh_token, scope, expires_at, \
         issued_at, state, failures, next_attempt_at, last_error, last_refresh_at, \
         last_validated_at, refresh_started_at, created_at, updated_at, version, rev, \
         not_before, grant_type"
    };
}

fn from_row(r: &Row) -> Credential {
    from_row_at(r, 0)
}

/// The credential in `r`'s columns from `at` on ([`columns!`]'s order).
fn from_row_at(r: &Row, at: usize) -> Credential {
    let instant = |i: usize| r.get::<_, Option<i64>>(at + i).map(crate::clock::clamp);
    Credential {
        name: r.get(at),
        provider: r.get(at + 1),
        access_token: r.get::<_, Option<String>>(at + 2).map(Secret::new),
        grant: match r.get::<_, &str>(at + 19) {
            "client_credentials" => Grant::ClientCredentials,
            _ => Grant::RefreshToken(Secret::new(r.get::<_, String>(at + 3))),
        },
        scope: r.get(at + 4),
        expires_at: instant(5),
        issued_at: instant(6).unwrap_or(0),
        state: State::parse(r.get(at + 7)),
        failures: r.get::<_, i64>(at + 8).clamp(0, u32::MAX.into()) as u32,
        next_attempt_at: r.get(at + 9),
        last_error: r.get(at + 10),
        last_refresh_at: r.get(at + 11),
        last_validated_at: r.get(at + 12),
        refresh_started_at: r.get(at + 13),
        created_at: r.get(at + 14),
        updated_at: r.get(at + 15),
        version: r.get(at + 16),
        rev: r.get(at + 17),
        not_before: r.get(at + 18),
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub fn load_all(c: &mut Tx<'_>) -> Result<Vec<Credential>> {
    let rows = c.read(
        concat!("SELECT ", columns!(), " FROM credentials ORDER BY name"),
        &[],
    )?;
    Ok(rows.iter().map(from_row).collect())
}

pub fn get(c: &mut Tx<'_>, name: &str) -> Result<Option<Credential>> {
    let rows = c.read(
        concat!("SELECT ", columns!(), " FROM credentials WHERE name = $1"),
        &[&name],
    )?;
    Ok(rows.first().map(from_row))
}

/// Locks `name`'s row until the transaction ends (see the module docs);
/// the row as it is once the lock is ours.
fn lock(c: &mut Tx<'_>, name: &str) -> Result<Option<Credential>> {
    let row = c.query_opt(
        concat!(
            "SELECT ",
            columns!(),
            " FROM credentials WHERE name = $1 FOR UPDATE"
        ),
        &[&name],
    )?;
    Ok(row.as_ref().map(from_row))
}

/// [`lock`], for a write that needs nothing of the row.
fn lock_only(c: &mut Tx<'_>, name: &str) -> Result<()> {
    c.query_opt(
        "SELECT 1 FROM credentials WHERE name = $1 FOR UPDATE",
        &[&name],
    )?;
    Ok(())
}

pub fn revisions(c: &mut Tx<'_>) -> Result<Vec<(String, i64)>> {
    let rows = c.read("SELECT name, rev FROM credentials", &[])?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Tells the other hosts, once this transaction commits, that `name`'s row
/// changed.
fn changed(c: &mut Tx<'_>, name: &str) -> Result<()> {
    c.execute(
        "SELECT pg_notify($1, $2)",
        &[&super::listen::CHANNEL, &name],
    )?;
    Ok(())
}

/// Records an event and keeps the last [`EVENTS_KEPT`]: the trimming
/// `DELETE` runs in the same statement, so it does not see the new event
/// and keeps one fewer of the others.
fn event(c: &mut Tx<'_>, name: &str, kind: &str, detail: Option<&str>) -> Result<()> {
    c.execute(
        "WITH added AS (INSERT INTO events (name, at, kind, detail) VALUES ($1, $2, $3, $4))
         DELETE FROM events WHERE name = $1 AND id <
           (SELECT id FROM events WHERE name = $1 ORDER BY id DESC LIMIT 1 OFFSET $5)",
        &[&name, &now_ms(), &kind, &detail, &(EVENTS_KEPT - 2)],
    )?;
    Ok(())
}

/// See `../ops.rs`'s `insert`.
pub fn insert(
    c: &mut Tx<'_>,
    n: &NewCredential,
    over: Over,
    given: Option<&str>,
) -> Result<Credential> {
    let now = now_ms();
    let existing = lock(c, &n.name)?;
    let replace = match over {
        Over::No if existing.is_some() => return Err(StoreError::Exists(n.name.clone())),
        Over::No => false,
        Over::Row(at) => {
            if existing.as_ref().map(Credential::token_at) != at {
                return Err(StoreError::Moved);
            }
            if existing.is_some() {
                held_off(c, &n.name)?;
            }
            // No row when looked at: one another host adds meanwhile (not
            // yet committed, so not locked above) is no row to write over
            // unchecked, but one to look at (below).
            at.is_some()
        }
    };
    let params: [&(dyn ToSql + Sync); 10] = [
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
        &given,
    ];
    // A replaced credential keeps its creation time and its fence (a lease
    // taken before cannot commit: the version moves on); everything else
    // starts again, as in SQLite. A new name's fence starts at the clock,
    // as in SQLite (src/store/ops.rs `insert` says why): the database's, as
    // every host shares it. So does a new name's revision (src/store/ops.rs
    // `insert` says why).
    let row = c.query_opt(
        concat!(
            "INSERT INTO credentials (name, provider, access_token, refresh_token, scope,
                expires_at, issued_at, state, failures, created_at, updated_at, version, rev,
                grant_type, fence, given_fp)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'valid', 0, $7, $7, 1, ",
            db_now!(),
            ", $8, ",
            db_now!(),
            ", $10)
             ON CONFLICT (name) DO UPDATE SET provider = EXCLUDED.provider,
                access_token = EXCLUDED.access_token, refresh_token = EXCLUDED.refresh_token,
                scope = EXCLUDED.scope, expires_at = EXCLUDED.expires_at,
                issued_at = EXCLUDED.issued_at, state = 'valid', failures = 0,
                next_attempt_at = NULL, last_error = NULL, last_refresh_at = NULL,
                last_validated_at = NULL, refresh_started_at = NULL, not_before = NULL,
                updated_at = EXCLUDED.updated_at, version = credentials.version + 1,
                rev = credentials.rev + 1, grant_type = EXCLUDED.grant_type,
                given_fp = EXCLUDED.given_fp
             WHERE $9
             RETURNING ",
            columns!()
        ),
        &params,
    )?;
    let Some(row) = row else {
        // Another host stored the name after we looked.
        return Err(match over {
            Over::No => StoreError::Exists(n.name.clone()),
            Over::Row(_) => StoreError::Moved,
        });
    };
    event(c, &n.name, n.event, None)?;
    changed(c, &n.name)?;
    Ok(from_row(&row))
}

/// See `../ops.rs`'s `looked`.
pub fn looked(c: &mut Tx<'_>, name: Option<&str>) -> Result<Looked> {
    let rows = match name {
        Some(n) => c.read(
            concat!(
                "SELECT ",
                columns!(),
                ", given_fp FROM credentials WHERE name = $1"
            ),
            &[&n],
        )?,
        None => c.read(
            concat!("SELECT ", columns!(), ", given_fp FROM credentials"),
            &[],
        )?,
    };
    Ok(Looked(
        rows.iter().map(|r| (from_row(r), r.get(20))).collect(),
    ))
}

/// See `../ops.rs`'s `moved_away`.
pub fn moved_away(c: &mut Tx<'_>, name: &str) -> Result<()> {
    let holder: Option<String> = c
        .query_opt("SELECT holder FROM leases WHERE name = $1", &[&name])?
        .map(|r| r.get(0));
    match holder.as_deref() == Some(crate::store::MOVED) {
        true => Err(StoreError::MovedOut(name.to_owned())),
        false => Ok(()),
    }
}

/// See `../ops.rs`'s `held_off`.
fn held_off(c: &mut Tx<'_>, name: &str) -> Result<()> {
    moved_away(c, name)?;
    match busy(c, name, &crate::lease::holder_id())? {
        Some(until) => Err(crate::store::ops::refreshing(name, until)),
        None => Ok(()),
    }
}

/// Whether another live holder has `name`'s lease: until when, in this
/// host's clock (the remaining time is measured on the database's).
fn busy(c: &mut Tx<'_>, name: &str, holder: &str) -> Result<Option<i64>> {
    let row = c.query_opt(
        concat!(
            "SELECT holder, expires_at - ",
            db_now!(),
            " FROM leases WHERE name = $1"
        ),
        &[&name],
    )?;
    Ok(row.and_then(|r| live_other(holder, r.get(0), r.get(1))))
}

/// Until when (this host's clock) `other`'s lease, with `remaining` ms
/// left on the database's clock, keeps `holder` out; None if it does not.
fn live_other(holder: &str, other: Option<String>, remaining: Option<i64>) -> Option<i64> {
    let (other, remaining) = (other?, remaining?);
    (other != holder && remaining > 0 && crate::lease::holder_alive(&other))
        .then(|| now_ms() + remaining)
}

/// Takes the lease: unless another holder's lease is live (or `$5`, its
/// holder is known dead), bumps the fence, gives the lease to `$2` for
/// `$3` ms, marks the refresh started at `$4` and notifies. Answers the
/// new fence (NULL if not granted) and the lease it found.
const TAKE: &str = concat!(
    "WITH cur AS (
        SELECT holder, expires_at - ",
    db_now!(),
    " AS remaining FROM leases WHERE name = $1
    ), free AS (
        SELECT $5::boolean
            OR NOT EXISTS (SELECT 1 FROM cur WHERE holder <> $2 AND remaining > 0) AS ok
    ), granted AS (
        UPDATE credentials SET fence = fence + 1, refresh_started_at = $4,
            state = 'refreshing', updated_at = $4, rev = rev + 1
        WHERE name = $1 AND (SELECT ok FROM free)
        RETURNING fence
    ), leased AS (
        INSERT INTO leases (name, holder, expires_at, fence)
        SELECT $1, $2, ",
    db_now!(),
    " + $3, fence FROM granted
        ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,
            expires_at = EXCLUDED.expires_at, fence = EXCLUDED.fence
    ), notified AS (
        SELECT pg_notify($6, $1) FROM granted
    )
    SELECT (SELECT fence FROM granted), (SELECT holder FROM cur),
        (SELECT remaining FROM cur), (SELECT count(*) FROM notified)"
);

/// [`TAKE`] for work that is not a refresh (`hold_lease`): the fence and
/// the lease only, no mark, no notification; `$4` is TAKE's `$5`.
const HOLD: &str = concat!(
    "WITH cur AS (
        SELECT holder, expires_at - ",
    db_now!(),
    " AS remaining FROM leases WHERE name = $1
    ), free AS (
        SELECT $4::boolean
            OR NOT EXISTS (SELECT 1 FROM cur WHERE holder <> $2 AND remaining > 0) AS ok
    ), granted AS (
        UPDATE credentials SET fence = fence + 1
        WHERE name = $1 AND (SELECT ok FROM free)
        RETURNING fence
    ), leased AS (
        INSERT INTO leases (name, holder, expires_at, fence)
        SELECT $1, $2, ",
    db_now!(),
    " + $3, fence FROM granted
        ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,
            expires_at = EXCLUDED.expires_at, fence = EXCLUDED.fence
    )
    SELECT (SELECT fence FROM granted), (SELECT holder FROM cur), (SELECT remaining FROM cur)"
);

/// What [`TAKE`] or [`HOLD`] did.
enum Granted {
    Fence(i64),
    Busy(i64),
}

/// Runs [`TAKE`] (`take`) or [`HOLD`] on a row whose lock is ours. A
/// lease the database still counts live but whose holder is known dead
/// (a process of this host that is gone: `lease::holder_alive`) is taken
/// over, by a second run that ignores it.
fn grant(c: &mut Tx<'_>, name: &str, holder: &str, ttl: Duration, take: bool) -> Result<Granted> {
    let ttl = ms(ttl);
    let mut force = false;
    loop {
        let row = if take {
            let now = now_ms();
            c.query_one(
                TAKE,
                &[&name, &holder, &ttl, &now, &force, &super::listen::CHANNEL],
            )?
        } else {
            c.query_one(HOLD, &[&name, &holder, &ttl, &force])?
        };
        if let Some(fence) = row.get::<_, Option<i64>>(0) {
            return Ok(Granted::Fence(fence));
        }
        if force {
            // The row was locked and found: a forced grant cannot miss.
            return Err(StoreError::NotFound(name.to_owned()));
        }
        if let Some(until) = live_other(holder, row.get(1), row.get(2)) {
            return Ok(Granted::Busy(until));
        }
        force = true;
    }
}

pub fn take_lease(
    c: &mut Tx<'_>,
    name: &str,
    holder: &str,
    ttl: Duration,
    at: TokenAt,
) -> Result<Lease> {
    let Some(cred) = lock(c, name)? else {
        if let Some(until) = busy(c, name, holder)? {
            return Ok(Lease::Busy { until });
        }
        c.execute("DELETE FROM leases WHERE name = $1", &[&name])?;
        return Ok(Lease::Gone);
    };
    if cred.token_at() != at {
        if let Some(until) = busy(c, name, holder)? {
            return Ok(Lease::Busy { until });
        }
        return Ok(Lease::Changed(Box::new(cred)));
    }
    let fence = match grant(c, name, holder, ttl, true)? {
        Granted::Fence(f) => f,
        Granted::Busy(until) => return Ok(Lease::Busy { until }),
    };
    let interrupted = cred.refresh_started_at.is_some();
    if interrupted {
        event(
            c,
            name,
            "refresh_interrupted",
            Some("a previous refresh never finished"),
        )?;
    }
    Ok(Lease::Taken {
        credential: Box::new(cred),
        interrupted,
        fence,
    })
}

/// See `../ops.rs`'s `hold_lease`.
pub fn hold_lease(c: &mut Tx<'_>, name: &str, holder: &str, ttl: Duration) -> Result<Lease> {
    let Some(cred) = lock(c, name)? else {
        if let Some(until) = busy(c, name, holder)? {
            return Ok(Lease::Busy { until });
        }
        return Ok(Lease::Gone);
    };
    let fence = match grant(c, name, holder, ttl, false)? {
        Granted::Fence(f) => f,
        Granted::Busy(until) => return Ok(Lease::Busy { until }),
    };
    Ok(Lease::Taken {
        credential: Box::new(cred),
        interrupted: false,
        fence,
    })
}

pub fn renew_lease(
    c: &mut Tx<'_>,
    name: &str,
    holder: &str,
    fence: i64,
    ttl: Duration,
) -> Result<bool> {
    let n = c.execute(
        concat!(
            "UPDATE leases SET expires_at = ",
            db_now!(),
            " + $4 WHERE name = $1 AND holder = $2 AND fence = $3"
        ),
        &[&name, &holder, &fence, &ms(ttl)],
    )?;
    Ok(n > 0)
}

/// Whether `holder`'s lease `fence` is the current one; the caller holds
/// the row's lock, so it stays so until the transaction ends.
fn holds(c: &mut Tx<'_>, name: &str, holder: &str, fence: i64) -> Result<bool> {
    Ok(c.query_opt(
        "SELECT 1 FROM leases WHERE name = $1 AND holder = $2 AND fence = $3",
        &[&name, &holder, &fence],
    )?
    .is_some())
}

fn lease_lost(c: &mut Tx<'_>, name: &str, what: &str) -> Result<Commit> {
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

/// The commit of a refresh, after the row's lock: if `$2` holds lease
/// `$3` (or no one does, the row is still marked as being refreshed, and
/// one lease only was taken since: `Store::commit_refresh` says why),
/// stores the pair if the row still holds the token of version `$4` and
/// creation `$12`, releases the lease, records the event (trimmed as
/// [`event`] does) and notifies.
/// Answers whether the lease was held, the active data key (what
/// `keys::check_active` would read in a statement of its own: this one
/// too starts after the row's lock), then the row as written (NULLs if
/// nothing was).
const COMMIT_REFRESH: &str = concat!(
    "WITH held AS (
        SELECT 1 FROM leases WHERE name = $1 AND holder = $2 AND fence = $3
    ), given_back AS (
        SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM leases WHERE name = $1)
    ), written AS (
        UPDATE credentials SET access_token = COALESCE($5, access_token),
            refresh_token = COALESCE($6, refresh_token), scope = COALESCE($7, scope),
            expires_at = CASE WHEN $5::text IS NULL THEN expires_at ELSE $8 END,
            issued_at = CASE WHEN $5::text IS NULL THEN issued_at ELSE $9 END,
            state = 'valid', failures = 0,
            next_attempt_at = NULL, not_before = NULL, last_error = NULL, last_refresh_at = $9,
            last_validated_at = $9, refresh_started_at = NULL, updated_at = $9,
            version = version + 1, rev = rev + 1
        WHERE name = $1 AND version = $4 AND created_at = $12 AND (EXISTS (SELECT 1 FROM held)
            OR (EXISTS (SELECT 1 FROM given_back) AND state = 'refreshing'
                AND refresh_started_at IS NOT NULL AND fence = $3 + 1))
        RETURNING ",
    columns!(),
    "
    ), released AS (
        DELETE FROM leases WHERE name = $1 AND holder = $2 AND fence = $3
    ), added AS (
        INSERT INTO events (name, at, kind) SELECT name, $9, 'refreshed' FROM written
    ), trimmed AS (
        DELETE FROM events WHERE name = $1 AND EXISTS (SELECT 1 FROM written) AND id <
            (SELECT id FROM events WHERE name = $1 ORDER BY id DESC LIMIT 1 OFFSET $10)
    ), notified AS (
        SELECT pg_notify($11, $1) FROM written
    )
    SELECT EXISTS (SELECT 1 FROM held), (SELECT count(*) FROM notified),
        (SELECT max(id) FROM keys), written.*
    FROM (SELECT 1) AS one LEFT JOIN written ON true"
);

/// The commit of a refresh whose tokens were sealed with `sealed_with`:
/// fails with [`StoreError::KeysChanged`] (the transaction then rolls
/// back) unless that is still the active data key.
pub fn commit_refresh(
    c: &mut Tx<'_>,
    name: &str,
    holder: &str,
    fence: i64,
    at: TokenAt,
    u: &TokenUpdate,
    sealed_with: Option<u32>,
) -> Result<Commit> {
    lock_only(c, name)?;
    let row = c.query_one(
        COMMIT_REFRESH,
        &[
            &name,
            &holder,
            &fence,
            &at.version,
            &u.access_token.as_ref().map(Secret::expose),
            &u.refresh_token.as_ref().map(Secret::expose),
            &u.scope,
            &u.expires_at,
            &now_ms(),
            &(EVENTS_KEPT - 2),
            &super::listen::CHANNEL,
            &at.created_at,
        ],
    )?;
    check_key(active_key(&row, 2), sealed_with)?;
    if row.get::<_, Option<&str>>(3).is_some() {
        return Ok(Commit::Done(Box::new(from_row_at(&row, 3))));
    }
    if !row.get::<_, bool>(0) {
        return lease_lost(c, name, "a refreshed token pair");
    }
    Ok(Commit::Conflict)
}

/// The end of a compare-and-swap write that returned `row` (None: the row
/// had moved on, nothing written): its event, if any, and the
/// notification.
fn written(
    c: &mut Tx<'_>,
    name: &str,
    row: Option<Row>,
    event_of: Option<(&str, Option<&str>)>,
) -> Result<Commit> {
    let Some(row) = row else {
        return Ok(Commit::Conflict);
    };
    if let Some((kind, detail)) = event_of {
        event(c, name, kind, detail)?;
    }
    changed(c, name)?;
    Ok(Commit::Done(Box::new(from_row(&row))))
}

pub fn record_failure(
    c: &mut Tx<'_>,
    name: &str,
    holder: &str,
    at: TokenAt,
    f: &FailureUpdate,
) -> Result<Commit> {
    lock_only(c, name)?;
    if let Some(fence) = f.lease
        && !holds(c, name, holder, fence)?
    {
        return lease_lost(c, name, "a failed refresh's outcome");
    }
    let clear_mark = f.lease.is_some() && !f.outcome_unknown;
    let row = c.query_opt(
        concat!(
            "UPDATE credentials SET state = $3, failures = $4, next_attempt_at = $5,
                last_error = $6, updated_at = $7, rev = rev + 1, not_before = $9,
                refresh_started_at = CASE WHEN $8 THEN NULL ELSE refresh_started_at END
             WHERE name = $1 AND version = $2 AND created_at = $10
             RETURNING ",
            columns!()
        ),
        &[
            &name,
            &at.version,
            &f.state.as_str(),
            &i64::from(f.failures),
            &f.next_attempt_at,
            &f.error,
            &now_ms(),
            &clear_mark,
            &f.not_before,
            &at.created_at,
        ],
    )?;
    if let Some(fence) = f.lease {
        release(c, name, holder, fence)?;
    }
    written(c, name, row, Some((f.event, Some(&f.error))))
}

pub fn record_validated(c: &mut Tx<'_>, name: &str, at: TokenAt) -> Result<Commit> {
    let row = c.query_opt(
        concat!(
            "UPDATE credentials SET last_validated_at = $3, updated_at = $3, rev = rev + 1,
                state = CASE WHEN state = 'retrying' THEN 'valid' ELSE state END,
                failures = CASE WHEN state = 'retrying' THEN 0 ELSE failures END,
                next_attempt_at = CASE WHEN state = 'retrying' THEN NULL ELSE next_attempt_at END,
                not_before = CASE WHEN state = 'retrying' THEN NULL ELSE not_before END,
                last_error = NULL
             WHERE name = $1 AND version = $2 AND created_at = $4
             RETURNING ",
            columns!()
        ),
        &[&name, &at.version, &now_ms(), &at.created_at],
    )?;
    written(c, name, row, Some(("validated", None)))
}

pub fn record_note(c: &mut Tx<'_>, name: &str, at: TokenAt, error: &str) -> Result<Commit> {
    let row = c.query_opt(
        concat!(
            "UPDATE credentials SET last_error = $3, last_validated_at = $4,
                updated_at = $4, rev = rev + 1
             WHERE name = $1 AND version = $2 AND created_at = $5
             RETURNING ",
            columns!()
        ),
        &[&name, &at.version, &error, &now_ms(), &at.created_at],
    )?;
    written(c, name, row, Some(("validation_forbidden", Some(error))))
}

/// Rows are written in name order, as every multi-row write is, so that
/// two of them lock their rows in the same order.
pub fn bring_forward(c: &mut Tx<'_>, items: &[(String, TokenAt, i64)]) -> Result<Vec<Credential>> {
    let mut sorted: Vec<&(String, TokenAt, i64)> = items.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut moved = Vec::new();
    for (name, token, at) in sorted {
        let rows = c.query(
            concat!(
                "UPDATE credentials SET next_attempt_at = GREATEST($3, COALESCE(not_before, 0)),
                    rev = rev + 1
                 WHERE name = $1 AND version = $2 AND created_at = $4 AND state = 'retrying'
                    AND next_attempt_at > GREATEST($3, COALESCE(not_before, 0))
                 RETURNING ",
                columns!()
            ),
            &[name, &token.version, at, &token.created_at],
        )?;
        if !rows.is_empty() {
            changed(c, name)?;
        }
        moved.extend(rows.iter().map(from_row));
    }
    Ok(moved)
}

pub fn reset_backoff(c: &mut Tx<'_>, name: &str) -> Result<Commit> {
    let row = c.query_opt(
        concat!(
            "UPDATE credentials SET state = 'valid', failures = 0, next_attempt_at = NULL,
                not_before = NULL, updated_at = $2, rev = rev + 1
             WHERE name = $1 AND state = 'misconfigured'
             RETURNING ",
            columns!()
        ),
        &[&name, &now_ms()],
    )?;
    written(c, name, row, None)
}

/// See [`crate::store::ops::abandon`].
pub fn abandon(c: &mut Tx<'_>, name: &str, holder: &str, b: Back) -> Result<()> {
    lock_only(c, name)?;
    if !holds(c, name, holder, b.fence)? {
        return Ok(());
    }
    let n = c.execute(
        "UPDATE credentials SET state = $2, refresh_started_at = $3, updated_at = $4,
            rev = rev + 1 WHERE name = $1 AND version = $5",
        &[&name, &b.state.as_str(), &b.started, &now_ms(), &b.version],
    )?;
    if n > 0 {
        changed(c, name)?;
    }
    release(c, name, holder, b.fence)
}

/// See [`crate::store::ops::release`].
pub fn release(c: &mut Tx<'_>, name: &str, holder: &str, fence: i64) -> Result<()> {
    c.execute(
        "DELETE FROM leases WHERE name = $1 AND holder = $2 AND fence = $3",
        &[&name, &holder, &fence],
    )?;
    Ok(())
}

/// See `../ops.rs`'s `remove_held`: the row locked first, as every write
/// locks it, so that no lease changes hands between the check and the
/// removal.
pub fn remove_held(c: &mut Tx<'_>, name: &str, holder: &str, fence: i64) -> Result<bool> {
    lock_only(c, name)?;
    let held = c
        .query_opt(
            "SELECT 1 FROM leases WHERE name = $1 AND holder = $2 AND fence = $3",
            &[&name, &holder, &fence],
        )?
        .is_some();
    if !held {
        return Ok(false);
    }
    remove(c, name)
}

pub fn remove(c: &mut Tx<'_>, name: &str) -> Result<bool> {
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
             grant_type TEXT NOT NULL DEFAULT 'refresh_token',
             given_fp TEXT
         );
         -- Schema 5 (src/store/ops.rs, migrate_to_5).
         ALTER TABLE credentials ADD COLUMN IF NOT EXISTS given_fp TEXT;
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

#[cfg(test)]
mod tests {
    /// The refresh commit reads the active data key itself, in place of
    /// `keys::check_active`'s statement: it must be the same query.
    #[test]
    fn the_refresh_commit_reads_the_active_key_as_the_check_does() {
        assert!(super::COMMIT_REFRESH.contains(&format!("({})", super::super::keys::ACTIVE)));
    }
}
