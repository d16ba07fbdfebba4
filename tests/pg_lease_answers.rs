//! A lease granted by PostgreSQL reaches its holder at once, whatever else
//! the pool's connection does around it (src/store/pg/mod.rs, "Group
//! commit, with bounded waits"). The lease's clock starts at its own
//! statement; an answer held back behind other writes would reach the
//! holder with less of it left than the holder counts on, or none, and a
//! second host would be granted the same lease.
//!
//! The store's pool has one connection here (`TOKEND_PG_POOL=1`), so the
//! order of the writes is known; one test binary, one test, so that the
//! setting is made before anything else runs. A commit, too, is answered
//! inside its lease when the batch it joined fails.

mod support;

use std::time::Duration;

use std::collections::HashMap;
use support::pg::{Server, new_cred, update};
use tokend::clock::now_ms;

use tokend::store::{Commit, Database, Lease, PgUrl, Store, StoreConn, TokenAt};

const TTL: Duration = Duration::from_secs(2);

/// Host B asks for `b`'s lease while the pool's one connection is busy
/// with a write to `c` whose statements take 3 s (a trigger sleeps: slow
/// for a reason that is no row lock), and another write to `c` queues
/// behind the lease. With `held_a`, a write to `a`, whose row another
/// session holds, queues first: its batch fails and every write then runs
/// alone. Returns how much of the lease was left when B was told it holds
/// it (None if its lease is no longer in the database), and whether host
/// C, asking right after, was granted it too.
async fn lease_beside_slow_writes(server: &Server, held_a: bool) -> (Option<i64>, bool) {
    let url = server.fresh_db();
    let dbname = Server::db_name(&url);
    let db = Database::Postgres(PgUrl::parse(&url).unwrap());
    let conn = StoreConn::open_database(&db, true).unwrap();
    let at: HashMap<&str, TokenAt> = ["a", "b", "c"]
        .into_iter()
        .map(|n| (n, conn.insert(&new_cred(n, "rt0")).unwrap().token_at()))
        .collect();
    server.slow_updates(&dbname, "c", 3.0);
    let free_a = held_a.then(|| server.hold_row(&dbname, "a"));
    let (b, c) = (
        Store::open_database(&db).unwrap(),
        Store::open_database(&db).unwrap(),
    );
    let mut writes = Vec::new();
    let (b0, c_at) = (b.clone(), at["c"]);
    writes.push(tokio::spawn(
        async move { b0.record_validated("c", c_at).await },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    if held_a {
        let (b1, a_at) = (b.clone(), at["a"]);
        writes.push(tokio::spawn(
            async move { b1.record_validated("a", a_at).await },
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (b2, b_at) = (b.clone(), at["b"]);
    let lease = tokio::spawn(async move {
        let l = b2.take_lease("b", "hostB/1/1", TTL, b_at).await;
        (l, now_ms())
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b3 = b.clone();
    writes.push(tokio::spawn(
        async move { b3.record_validated("c", c_at).await },
    ));
    let (l, answered_at) = lease.await.unwrap();
    let Lease::Taken { fence, .. } = l.unwrap() else {
        panic!("b's lease not taken");
    };
    let second = c.take_lease("b", "hostC/2/2", TTL, at["b"]).await.unwrap();
    // The lease's expiry as the database set it (the same machine's clock).
    let expires_at: Option<i64> = server
        .psql(
            &dbname,
            &format!("SELECT expires_at FROM leases WHERE name = 'b' AND fence = {fence}"),
        )
        .trim()
        .parse()
        .ok();
    drop(free_a);
    // The writes to `c` are cut short by the statements' bound and answer
    // an error; nothing more is asked of them.
    for w in writes {
        let _ = w.await.unwrap();
    }
    (
        expires_at.map(|e| e - answered_at),
        matches!(second, Lease::Taken { .. }),
    )
}

/// The lease of [`commit_beside_a_failed_batch`].
const COMMIT_TTL: Duration = Duration::from_secs(4);

/// Host B holds `z`'s lease and commits what the provider answered, while
/// the pool's one connection is busy: a write to a row another session
/// holds (`a`) and eight writes whose statements take 450 ms each
/// (`c1`…`c8`, a trigger sleeps) queue behind a first slow write (`c0`),
/// and fail together as a batch. The commit comes with them (`late`
/// false), or 1.6 s into the run, when the failed batch's pass has run
/// out of time and put the writes it did not reach back in the queue
/// (`late`). Returns how much of the lease was left when B was told its
/// commit is done.
async fn commit_beside_a_failed_batch(server: &Server, late: bool) -> i64 {
    let url = server.fresh_db();
    let dbname = Server::db_name(&url);
    let db = Database::Postgres(PgUrl::parse(&url).unwrap());
    let conn = StoreConn::open_database(&db, true).unwrap();
    let slow: Vec<String> = (0..=8).map(|i| format!("c{i}")).collect();
    let mut at = HashMap::new();
    for n in slow.iter().map(String::as_str).chain(["a", "z"]) {
        let row = conn.insert(&new_cred(n, "rt0")).unwrap();
        at.insert(n, row.token_at());
    }
    server.slow_updates(&dbname, "c%", 0.45);
    let b = Store::open_database(&db).unwrap();
    let Lease::Taken { fence, .. } = b
        .take_lease("z", "hostB/1/1", COMMIT_TTL, at["z"])
        .await
        .unwrap()
    else {
        panic!("z's lease not taken");
    };
    let expires_at: i64 = server
        .psql(
            &dbname,
            &format!("SELECT expires_at FROM leases WHERE name = 'z' AND fence = {fence}"),
        )
        .trim()
        .parse()
        .unwrap();
    let free_a = server.hold_row(&dbname, "a");
    let started = std::time::Instant::now();
    // c0 keeps the connection busy while the others queue behind it.
    let mut writes = Vec::new();
    for n in std::iter::once("c0")
        .chain(["a"])
        .chain(slow[1..].iter().map(String::as_str))
    {
        let (b, name, token) = (b.clone(), n.to_owned(), at[n]);
        writes.push((
            n,
            tokio::spawn(async move { b.record_validated(&name, token).await }),
        ));
        if n == "c0" {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if late {
        tokio::time::sleep(Duration::from_millis(1600).saturating_sub(started.elapsed())).await;
    }
    let commit = b
        .commit_refresh("z", "hostB/1/1", fence, at["z"], update("rt2"))
        .await
        .unwrap();
    let answered_at = now_ms();
    assert!(
        matches!(commit, Commit::Done(_)),
        "the commit was refused although its lease was still held"
    );
    drop(free_a);
    for (n, w) in writes {
        let r = w.await.unwrap();
        // `a`'s row was held for longer than a write waits for it.
        assert!(
            n == "a" || r.is_ok(),
            "the write to {n}, put back in the queue, failed: {:?}",
            r.err()
        );
    }
    expires_at - answered_at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_is_answered_at_once_whatever_else_the_connection_does() {
    // SAFETY: the only test of this binary sets it before any store
    // exists; the runtime's worker threads, already started, read no
    // environment.
    unsafe { std::env::set_var("TOKEND_PG_POOL", "1") };
    let Some(server) = Server::start() else {
        return;
    };
    for held_a in [false, true] {
        let (left, also_granted) = lease_beside_slow_writes(&server, held_a).await;
        let case = if held_a {
            "writes run one by one after a batch met a held row"
        } else {
            "a batch with a slow write after the lease"
        };
        assert!(
            !also_granted,
            "{case}: a second host was granted the lease host B was told it holds"
        );
        // Slack for a loaded machine, under the 500 ms a statement may run:
        // an answer held for the next write (a fault this catches) comes
        // at least that late.
        let floor = TTL.as_millis() as i64 - 450;
        assert!(
            left.is_some_and(|ms| ms >= floor),
            "{case}: the lease reached host B with {left:?} ms of its {TTL:?} left"
        );
    }
    // Before commits had a lane of their own, the commit waited for the
    // eight slow writes, 3.6 s; or, asked 1.6 s into the run, for those
    // the pass put back in the queue, answered 2.7 s after it asked: both
    // past its 4 s lease.
    for late in [false, true] {
        let left = commit_beside_a_failed_batch(&server, late).await;
        let case = if late {
            "a commit queued after a failed batch's writes were put back"
        } else {
            "a commit queued with a batch that failed"
        };
        eprintln!("{case}: answered with {left} ms of its lease left");
        assert!(
            left >= 300,
            "{case}: answered with {left} ms of its {COMMIT_TTL:?} lease left"
        );
    }
}
