//! The store thread: it owns the daemon's connection and runs what the
//! [`Store`](super::Store) handle sends it, grouped (see the module docs of
//! [`super`]: group commit, and reads that never wait for a writer).

use std::path::Path;
use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::conn::{Tuning, set_checkpoint_interval};
use super::{Result, StoreError};

/// Operations grouped into one transaction at most.
const MAX_BATCH: usize = 1024;

/// Write transactions between two looks at the database's size, to scale
/// the checkpoint interval with it (`conn::checkpoint_interval`): a bulk
/// import or a sweep of 100,000 credentials runs thousands, a small store
/// a few an hour, and staying at the interval it was opened with then
/// costs nothing.
const RESCALE_EVERY: u32 = 1000;

/// The store thread's queue: what a [`Store`](super::Store) holds.
#[derive(Clone)]
pub(super) struct Jobs(mpsc::Sender<Box<dyn Op>>);

impl Jobs {
    /// Starts the store thread, which owns `conn` (opened with `tuning`)
    /// from now on; `path` names the database if the thread cannot be
    /// started.
    pub(super) fn start(conn: Connection, path: &Path, tuning: Tuning) -> Result<Jobs> {
        let (tx, rx) = mpsc::channel::<Box<dyn Op>>();
        std::thread::Builder::new()
            .name("tokend-store".into())
            .spawn(move || run_batches(conn, rx, tuning))
            .map_err(|e| StoreError::Io(path.to_owned(), e))?;
        Ok(Jobs(tx))
    }

    /// Queues `f` for the next batch, in its write transaction if `writes`,
    /// and waits for its answer, which comes once that transaction committed.
    pub(super) async fn send<T, F>(&self, f: F, writes: bool) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let op = CallOp {
            f: Some(f),
            writes,
            result: None,
            tx,
        };
        self.0.send(Box::new(op)).map_err(|_| StoreError::Closed)?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// One queued operation: run inside the batch's transaction, then told
/// whether the transaction committed.
trait Op: Send {
    /// Whether it writes: only then does its batch take the write lock.
    fn writes(&self) -> bool;
    fn run(&mut self, c: &Connection) -> bool;
    fn finish(self: Box<Self>, commit: std::result::Result<(), String>);
}

struct CallOp<T, F> {
    f: Option<F>,
    writes: bool,
    result: Option<Result<T>>,
    tx: oneshot::Sender<Result<T>>,
}

impl<T, F> Op for CallOp<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T> + Send,
{
    fn writes(&self) -> bool {
        self.writes
    }

    fn run(&mut self, c: &Connection) -> bool {
        let f = self.f.take().expect("an op runs once");
        let r = f(c);
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn finish(self: Box<Self>, commit: std::result::Result<(), String>) {
        let r = match (commit, self.result) {
            (Ok(()), Some(r)) => r,
            (Err(e), _) => Err(StoreError::Commit(e)),
            (Ok(()), None) => Err(StoreError::Closed),
        };
        let _ = self.tx.send(r);
    }
}

fn run_batches(conn: Connection, rx: mpsc::Receiver<Box<dyn Op>>, tuning: Tuning) {
    let c = &conn;
    let mut writes_since_rescale = 0;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // Everything in a batch arrived while the previous one ran, from
        // callers that each wait for their answer: any order is one they
        // could have seen. Reads go first, in a transaction of their own
        // that no other process's write lock can hold up.
        let (writes, reads): (Vec<_>, Vec<_>) = batch.into_iter().partition(|op| op.writes());
        run_transaction(c, reads, "BEGIN");
        if !writes.is_empty() {
            run_transaction(c, writes, "BEGIN IMMEDIATE");
            writes_since_rescale += 1;
        }
        if writes_since_rescale == RESCALE_EVERY {
            writes_since_rescale = 0;
            // Outside any transaction. Should it fail, the interval in
            // force stays: only the checkpoints' spacing depends on it.
            if let Err(e) = set_checkpoint_interval(c, tuning) {
                tracing::debug!(error = %e, "cannot set the checkpoint interval");
            }
        }
    }
}

/// Runs `ops` in one transaction opened with `begin`, each in its own
/// savepoint, and tells each whether the transaction committed.
fn run_transaction(c: &Connection, mut ops: Vec<Box<dyn Op>>, begin: &str) {
    if ops.is_empty() {
        return;
    }
    if let Err(e) = control(c, begin) {
        let msg = e.to_string();
        for op in ops {
            op.finish(Err(msg.clone()));
        }
        return;
    }
    for op in ops.iter_mut() {
        // A failing op rolls back to its savepoint; the others still commit.
        if control(c, "SAVEPOINT op").is_ok() && op.run(c) {
            let _ = control(c, "RELEASE op");
        } else {
            let _ = c.execute_batch("ROLLBACK TO op; RELEASE op");
        }
    }
    let commit = control(c, "COMMIT").map_err(|e| {
        let _ = c.execute_batch("ROLLBACK");
        e.to_string()
    });
    for op in ops {
        op.finish(commit.clone());
    }
}

/// Runs one transaction-control statement, prepared once: through
/// `execute_batch`, the four or five of a refresh were parsed on every run,
/// about 4,700 of a refresh's 277,000 instructions (BENCHMARKS.md,
/// "Store").
fn control(c: &Connection, sql: &str) -> rusqlite::Result<()> {
    c.prepare_cached(sql)?.execute([])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::tests::store_of_a;
    use crate::store::{Lease, Store};

    /// The checkpoint interval is set from the database's size when the
    /// store opens, and followed as the database grows (a bulk import
    /// into a running daemon's store), unless the tuning fixes it.
    #[tokio::test]
    async fn the_checkpoint_interval_follows_the_database_s_size() {
        let interval = |jobs: Jobs| async move {
            jobs.send(
                |c| Ok(c.pragma_query_value(None, "wal_autocheckpoint", |r| r.get::<_, i64>(0))?),
                false,
            )
            .await
            .unwrap()
        };
        let pad = |path: &Path, mib: usize| {
            let other = Connection::open(path).unwrap();
            other
                .execute_batch(&format!(
                    "CREATE TABLE IF NOT EXISTS pad(b BLOB); INSERT INTO pad VALUES (zeroblob({}));",
                    mib << 20
                ))
                .unwrap();
        };
        let (_dir, path) = store_of_a();
        let open = |tuning| {
            let c = super::super::conn::open_sqlite(&path, false, tuning).unwrap();
            // The test's thousand commits need no fsync each.
            c.pragma_update(None, "synchronous", "OFF").unwrap();
            Jobs::start(c, &path, tuning).unwrap()
        };
        // A small database: the floor.
        let jobs = open(Tuning::default());
        assert_eq!(interval(jobs.clone()).await, 10_000);
        // 8 MiB more (2,048 pages of 4 KiB and some): eight times that,
        // once the thread looks again.
        pad(&path, 8);
        for _ in 0..RESCALE_EVERY {
            jobs.send(|_| Ok(()), true).await.unwrap();
        }
        let grown = interval(jobs.clone()).await;
        assert!((16_400..17_000).contains(&grown), "{grown}");
        // Opened on the grown database: at once.
        assert_eq!(interval(open(Tuning::default())).await, grown);
        // Fixed: kept whatever the size.
        let fixed = Tuning {
            wal_autocheckpoint: Some(1_000),
            ..Tuning::default()
        };
        let jobs = open(fixed);
        for _ in 0..RESCALE_EVERY {
            jobs.send(|_| Ok(()), true).await.unwrap();
        }
        assert_eq!(interval(jobs).await, 1_000);
        // Bounded: 250 MiB of WAL at most.
        assert_eq!(super::super::conn::checkpoint_interval(1 << 20), 64_000);
    }

    #[tokio::test]
    async fn reads_do_not_wait_for_another_process_holding_the_write_lock() {
        let (_dir, path) = store_of_a();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let started = std::time::Instant::now();
        let store = Store::open(&path).unwrap();
        assert_eq!(store.load_all().await.unwrap().len(), 1);
        let at = store.get("a").await.unwrap().unwrap().token_at();
        // A read stuck behind the lock would take the 5 s busy timeout.
        assert!(started.elapsed() < Duration::from_secs(3));
        other.execute_batch("COMMIT").unwrap();
        assert!(matches!(
            store
                .take_lease("a", "me", Duration::from_secs(60), at)
                .await
                .unwrap(),
            Lease::Taken { .. }
        ));
    }
}
