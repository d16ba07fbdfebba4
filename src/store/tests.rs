//! The lease and compare-and-swap rules, end to end: through a [`Store`],
//! its thread and the SQL.

use std::time::Duration;

use rusqlite::Connection;

use super::*;
use crate::clock::now_ms;
use crate::secret::Secret;

/// A credential as `import` stores it, its access token good for a minute.
pub(super) fn new_cred(name: &str) -> NewCredential {
    NewCredential {
        name: name.into(),
        provider: "p".into(),
        access_token: Some(Secret::new("at1")),
        grant: Grant::RefreshToken(Secret::new("rt1")),
        scope: None,
        expires_at: Some(now_ms() + 60_000),
        event: "imported",
    }
}

/// A fresh store file holding credential "a", as `import` leaves it; the
/// directory goes when the first value is dropped.
pub(super) fn store_of_a() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    StoreConn::open(&path, true)
        .unwrap()
        .insert(&new_cred("a"))
        .unwrap();
    (dir, path)
}

#[tokio::test]
async fn refresh_commit_is_a_compare_and_swap() {
    let (_dir, path) = store_of_a();
    let store = Store::open(&path).unwrap();
    let me = crate::lease::holder_id();
    let Lease::Taken {
        credential,
        interrupted,
        fence,
    } = store
        .take_lease("a", &me, Duration::from_secs(60), a_at(&store).await)
        .await
        .unwrap()
    else {
        panic!("lease not taken")
    };
    assert!(!interrupted);
    // Another live holder (one we cannot check, on another host) is refused.
    assert!(matches!(
        store
            .take_lease(
                "a",
                "other-host/1/1",
                Duration::from_secs(60),
                a_at(&store).await
            )
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
        .commit_refresh("a", &me, fence, credential.token_at(), update())
        .await
        .unwrap()
    else {
        panic!("conflict")
    };
    assert_eq!(c.grant.refresh_token().unwrap().expose(), "rt2");
    assert_eq!(c.state, State::Valid);
    assert_eq!(c.refresh_started_at, None);
    // The same old version again is a conflict and writes nothing.
    let Lease::Taken { fence, .. } = store
        .take_lease("a", &me, Duration::from_secs(60), c.token_at())
        .await
        .unwrap()
    else {
        panic!("lease not taken")
    };
    assert!(matches!(
        store
            .commit_refresh("a", &me, fence, credential.token_at(), update())
            .await
            .unwrap(),
        Commit::Conflict
    ));
    assert_eq!(store.get("a").await.unwrap().unwrap().version, c.version);
}

#[tokio::test]
async fn a_holder_whose_lease_passed_on_writes_nothing_but_an_event() {
    let (_dir, path) = store_of_a();
    let store = Store::open(&path).unwrap();
    let stale = "other-host/1/1";
    let Lease::Taken { fence: old, .. } = store
        .take_lease("a", stale, Duration::from_millis(1), a_at(&store).await)
        .await
        .unwrap()
    else {
        panic!("lease not taken")
    };
    std::thread::sleep(Duration::from_millis(5));
    // The lease expired; another holder takes it.
    let Lease::Taken { fence: new, .. } = store
        .take_lease("a", "next", Duration::from_secs(60), a_at(&store).await)
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
            .commit_refresh("a", stale, old, a_at(&store).await, update)
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
        store
            .record_failure("a", stale, a_at(&store).await, failure)
            .await
            .unwrap(),
        Commit::LeaseLost
    ));
    let row = store.get("a").await.unwrap().unwrap();
    assert_eq!(row.grant.refresh_token().unwrap().expose(), "rt1");
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
    let (_dir, path) = store_of_a();
    let store = Store::open(&path).unwrap();
    let _ = store
        .take_lease(
            "a",
            "peer-host/1/1",
            Duration::from_secs(60),
            a_at(&store).await,
        )
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
    let Commit::Done(row) = store
        .record_failure("a", "me", a_at(&store).await, failure)
        .await
        .unwrap()
    else {
        panic!("not recorded")
    };
    assert!(row.refresh_started_at.is_some());
    // Nor the peer's lease.
    assert!(matches!(
        store
            .take_lease("a", "me", Duration::from_secs(60), a_at(&store).await)
            .await
            .unwrap(),
        Lease::Busy { .. }
    ));
}

#[tokio::test]
async fn an_unfinished_refresh_is_reported_to_the_next_holder() {
    let (_dir, path) = store_of_a();
    let store = Store::open(&path).unwrap();
    // A holder from a process that no longer exists.
    let dead = "other-host/1/1";
    let _ = store
        .take_lease("a", dead, Duration::from_millis(1), a_at(&store).await)
        .await
        .unwrap();
    std::thread::sleep(Duration::from_millis(5));
    match store
        .take_lease("a", "next", Duration::from_secs(60), a_at(&store).await)
        .await
        .unwrap()
    {
        Lease::Taken { interrupted, .. } => assert!(interrupted),
        _ => panic!("lease not taken"),
    }
}

#[test]
fn sqlite_records_its_schema_version_in_tokend_schema_as_postgresql_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    StoreConn::open(&path, true).unwrap();
    // Opened again: the migration does not run twice, the row stays one.
    StoreConn::open(&path, false).unwrap();
    let c = Connection::open(&path).unwrap();
    let versions: Vec<i64> = c
        .prepare("SELECT version FROM tokend_schema")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(versions, vec![conn::SCHEMA_VERSION]);
}

/// Every refresh records an event and trims the credential's events: the
/// statements doing it are prepared once, not parsed again on every run
/// (which cost a refresh about a sixth of its instructions, BENCHMARKS.md
/// "Store"), and the trimming finds the events to keep in the index,
/// without sorting them.
#[test]
fn recording_an_event_does_not_prepare_its_statements_again() {
    let (_dir, path) = store_of_a();
    // The daemon's connection, as the store opens it.
    let c = conn::open_sqlite(&path, false, conn::Tuning::default()).unwrap();
    for i in 0..30 {
        ops::event(&c, "a", "refreshed", Some(&format!("n{i}"))).unwrap();
    }
    let prepared_again = c
        .prepare_cached(ops::TRIM_EVENTS)
        .unwrap()
        .get_status(rusqlite::StatementStatus::RePrepare);
    assert_eq!(
        prepared_again, 0,
        "the trimming statement was prepared again"
    );
    let kept: i64 = c
        .query_row("SELECT count(*) FROM events WHERE name = 'a'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(kept, 20);
    let plan: Vec<String> = c
        .prepare(&format!("EXPLAIN QUERY PLAN {}", ops::TRIM_EVENTS))
        .unwrap()
        .query_map(rusqlite::params!["a", 19], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(
        plan.iter().all(|step| !step.contains("TEMP B-TREE"))
            && plan
                .iter()
                .filter(|step| step.contains("events_by_name"))
                .count()
                == 2,
        "{plan:?}"
    );
}

/// `a`'s token at version 1 (as `store_of_a` made it), its creation read
/// back from the store.
async fn a_at(store: &Store) -> TokenAt {
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!(a.version, 1);
    a.token_at()
}
