//! The store benchmark: `cargo bench --bench store` (BENCHMARKS.md
//! "Store"). SQLite's page cache and WAL checkpoint interval, measured at
//! 100,000 credentials rather than guessed.
//!
//! For each setting (the default first), on a fresh database of N
//! credentials (TOKEND_BENCH_STORE_N, default 100000) filled in one
//! transaction:
//!
//! 1. **load**: the daemon's start-up read of every row (`Store::load_all`);
//! 2. **cycles**: N refreshes' store work, as a sweep does it: 64 tasks
//!    (`max_concurrency`) each reading a credential, taking its lease, then
//!    committing its new token pair, through the store thread's group commit, with
//!    `synchronous = FULL` as in production;
//! 3. **random reads**: 20,000 single-row reads of credentials drawn at
//!    random (what the store watch and `tokend status NAME` do), after the
//!    sweep;
//! 4. the database and its WAL after the sweep, per credential, and the
//!    WAL's size.
//!
//! The settings run in two rounds, alternated, so that a disk that slows
//! down mid-run weighs on all of them. Prints a Markdown table.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokend::secret::Secret;
use tokend::store::{Commit, Grant, Lease, NewCredential, Store, StoreConn, TokenUpdate, Tuning};

const CONCURRENCY: usize = 64;
/// Single-row reads timed after the sweep, at random among the N.
const READS: usize = 20_000;

fn main() {
    let n: usize = std::env::var("TOKEND_BENCH_STORE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let default = Tuning::default();
    // tokend's defaults (SQLite's page cache, a checkpoint interval of
    // eight times the database, at least 10,000 WAL pages), a page cache
    // that holds the whole database (about 40 MiB at 100k), and SQLite's
    // own checkpoint interval, 1,000 pages.
    let settings = [
        default,
        Tuning {
            cache_kib: 64 * 1024,
            ..default
        },
        Tuning {
            wal_autocheckpoint: Some(1_000),
            ..default
        },
    ];
    let mut runs: Vec<Vec<Run>> = settings.iter().map(|_| Vec::new()).collect();
    for _round in 0..2 {
        for (i, t) in settings.iter().enumerate() {
            let r = run(n, *t);
            eprintln!("store: {t:?}: cycles {:.3} s", r.cycles.as_secs_f64());
            runs[i].push(r);
        }
    }
    println!("Store, {n} credentials, {CONCURRENCY} tasks; the better of two alternated rounds.\n");
    println!(
        "| cache_size | wal_autocheckpoint | load_all | lease + commit cycles | per cycle | {READS} random reads | DB + WAL per credential | WAL at the end |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (t, r) in settings.iter().zip(&runs) {
        let best = |f: fn(&Run) -> Duration| r.iter().map(f).min().unwrap();
        let cycles = best(|r| r.cycles);
        println!(
            "| {} KiB{} | {} | {:.3} s | {:.3} s | {:.1} µs | {:.3} s | {} B | {:.1} MiB |",
            t.cache_kib,
            if *t == default { " (default)" } else { "" },
            t.wal_autocheckpoint
                .map_or("8 × the database".to_owned(), |p| format!("{p} pages")),
            best(|r| r.load).as_secs_f64(),
            cycles.as_secs_f64(),
            cycles.as_secs_f64() * 1e6 / n as f64,
            best(|r| r.reads).as_secs_f64(),
            r[0].db_bytes / n as u64,
            r[0].wal_bytes as f64 / (1024.0 * 1024.0),
        );
    }
}

struct Run {
    load: Duration,
    cycles: Duration,
    reads: Duration,
    db_bytes: u64,
    wal_bytes: u64,
}

fn run(n: usize, tuning: Tuning) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokend.db");
    let names: Vec<String> = (0..n).map(|i| format!("user-{i:06}")).collect();
    {
        let sc = StoreConn::open(&path, true).unwrap();
        let new: Vec<NewCredential> = names
            .iter()
            .map(|name| NewCredential {
                name: name.clone(),
                provider: "pandadoc".into(),
                access_token: Some(Secret::new(format!("access-{name}-0123456789abcdef"))),
                grant: Grant::RefreshToken(Secret::new(format!("refresh-{name}-0123456789abcdef"))),
                scope: Some("read+write".into()),
                expires_at: Some(tokend::clock::now_ms() + 3_600_000),
                event: "imported",
            })
            .collect();
        sc.insert_all(&new).unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(Store::open_tuned(&path, tuning).unwrap());
    let (load, cycles, reads) = rt.block_on(async {
        let started = Instant::now();
        let all = store.load_all().await.unwrap();
        assert_eq!(all.len(), n);
        let load = started.elapsed();
        drop(all);

        let names = Arc::new(names);
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let (store, names, next) = (store.clone(), names.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(name) = names.get(i) else { return };
                        let ttl = Duration::from_secs(60);
                        let at = store.get(name).await.unwrap().unwrap().token_at();
                        let Ok(Lease::Taken { fence, .. }) =
                            store.take_lease(name, "bench", ttl, at).await
                        else {
                            panic!("no lease on {name}");
                        };
                        let update = TokenUpdate {
                            access_token: Some(Secret::new(format!(
                                "access-{name}-new-0123456789"
                            ))),
                            refresh_token: Some(Secret::new(format!(
                                "refresh-{name}-new-0123456789"
                            ))),
                            scope: None,
                            expires_at: Some(tokend::clock::now_ms() + 3_600_000),
                        };
                        let c = store
                            .commit_refresh(name, "bench", fence, at, update)
                            .await
                            .unwrap();
                        assert!(matches!(c, Commit::Done(_)));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let cycles = started.elapsed();

        let started = Instant::now();
        for _ in 0..READS {
            let i = fastrand::usize(..n);
            store.get(&names[i]).await.unwrap().unwrap();
        }
        (load, cycles, started.elapsed())
    });
    drop(store);
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let wal = dir.path().join("tokend.db-wal");
    Run {
        load,
        cycles,
        reads,
        db_bytes: size(&path) + size(&wal),
        wal_bytes: size(&wal),
    }
}
