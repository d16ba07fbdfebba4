//! The PostgreSQL backend (issue 12): the same operations as SQLite's,
//! for a fleet of hosts sharing one database.
//!
//! A small pool of threads, each owning one connection, takes operations
//! from one shared queue ([`Lanes`]) and runs each in a transaction of its own
//! (`ops.rs` holds the SQL). Both faces use it: the daemon's
//! [`Store`](super::Store) awaits the answer, the command line's
//! [`StoreConn`](super::StoreConn) blocks on it. The synchronous client
//! (`postgres`) runs its own small runtime, which must not be entered from
//! a thread already inside one (`tokend refresh` opens the store inside
//! its runtime): on threads of their own they never are.
//!
//! The pool starts with one connection (made, and the schema migrated, by
//! [`Jobs::start`]) and grows, up to [`POOL_SIZE`], only when an operation
//! arrives while every thread is busy: a command, whose operations come
//! one after the other, keeps one connection; a daemon in a sweep gets
//! them all. Each connection prepares a statement once and keeps it
//! ([`Tx`]), so a statement costs one round trip, not two. Why the pool
//! and not one connection: each transaction waits for its round trips and
//! its commit's WAL flush; several at once overlap those waits, and the
//! server flushes their commits together (BENCHMARKS.md, "Fleet on
//! PostgreSQL").
//!
//! **Group commit, with bounded waits.** The daemon's writes on one
//! credential (lease, commit, renewal, failure, validation: [`Jobs::send_on`])
//! that wait in the queue together, up to [`BATCH`], share one
//! transaction, so that a sweep pays one COMMIT and one WAL flush per
//! batch instead of per write (BENCHMARKS.md, "Fleet on PostgreSQL"). A
//! batch answers only after its last write, and a lease's clock starts at
//! its own statement, so nothing may hold a batch up for long: a first
//! version that let one write wait for a row lock held elsewhere (another
//! host, a `psql` session) delayed every answer of its batch past their
//! leases, and let two hosts spend one refresh token. So each of these
//! writes waits at most 50 ms for a row lock, and each of its statements
//! runs at most 500 ms ([`BEGIN_BOUNDED`]); a batch that meets a locked
//! row, fails in any other way or runs past [`BATCH_TIME`] is rolled
//! back, and its writes then run one by one, each answered as soon as its
//! own transaction committed (tests/pg_lease_answers.rs), in the order
//! they were queued, for [`BATCH_TIME`] at most: the writes not reached by
//! then go back to the front of the queue, each to run alone on whichever
//! connection is free (a write that failed a batch never joins another).
//! A write whose row is still locked, or whose statement ran past its
//! 500 ms, goes to the back of its lane, to run alone, for
//! [`LOCK_PATIENCE`], then answers an error its caller retries (the
//! refresher renews its lease meanwhile).
//! Without the bound the same happened with no batch at all: four writes
//! waiting for rows held elsewhere took all four connections, and every
//! other credential's commit waited behind them.
//!
//! **Commits and renewals go first.** Their leases run out as they wait,
//! so they have a lane of their own in the queue, taken before anything
//! else and batched only with each other, and a one-by-one pass gives way
//! to them. A commit then waits for the commits and renewals queued before
//! it, shared among the connections, and for what a connection is running
//! when it comes (a batch, about a second at worst with the bounds above);
//! against the lease's 10 s margin. Before the lane, a commit could wait
//! behind every write a failed batch had put back, past its lease
//! (tests/pg_lease_answers.rs); before those writes ran alone, one
//! thread took them back as a batch that failed again, twenty slow
//! commits took 15 s, and the commit queued behind them landed 11 s past
//! its lease (tests/pg_store.rs).
//!
//! A batch takes its rows' locks in the order of the credentials' names,
//! as every write does: each write locks one credential's row and then its
//! lease row; an operation over several rows (`bring_forward`, a batch
//! import) locks them in name order, waits for them as long as it takes,
//! and one that deadlocks all the same is rolled back by the server and
//! run again ([`RETRIES`]). Everything else (a command's operations, reads
//! over all rows, imports) runs alone.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Statement, Transaction};
use tokio::sync::oneshot;

use super::{PgUrl, Result, StoreError};

mod health;
pub(super) mod keys;
mod listen;
pub use listen::{Changed, Changes};
pub(super) mod ops;

pub use health::Outage;
use health::{Health, Witness};

/// The `pg_advisory_xact_lock` key the migrating transaction holds, so that
/// hosts starting at once migrate one after the other ("tokend" in ASCII).
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e64;

/// How long connecting may take before the store reports the database down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most connections (and threads) one process's store holds, besides
/// the daemon's listening connection. Chosen by measurement
/// (BENCHMARKS.md, "Fleet on PostgreSQL"): on the 10k sweep, 4 is 17 %
/// faster than 1, and 8 and 16 are no faster than 4 (the server's CPU is
/// the limit by then) while costing the server more CPU and a fleet more
/// of its `max_connections` (100 by default). `TOKEND_PG_POOL` (1 to 32)
/// overrides it, for measuring.
const POOL_SIZE: usize = 4;
const POOL_MAX: usize = 32;

/// How many times an operation the server rolled back for a deadlock or a
/// serialization failure is run again before its error is returned.
const RETRIES: u32 = 3;

/// The most writes one transaction commits together (group commit).
/// Chosen by measurement (BENCHMARKS.md, "Fleet on PostgreSQL"): a sweep
/// at `max_concurrency = 64` rarely queues more than this per thread.
const BATCH: usize = 32;

/// Opens the transaction of daemon writes ([`Jobs::send_on`]): a row lock
/// held by another transaction is waited for at most 50 ms, then the
/// write gives way. Our own transactions hold a row for a few
/// milliseconds, or a batch's length; a longer wait is another session's
/// (a stuck host, a `psql` shell, an import). A statement may run for
/// 500 ms at most, whatever holds it up: a lease granted early in a batch
/// is answered only after the batch's last statement.
const BEGIN_BOUNDED: &str =
    "BEGIN; SET LOCAL lock_timeout = '50ms'; SET LOCAL statement_timeout = '500ms'";
/// Commits a transaction begun with [`BEGIN_BOUNDED`], its bounds lifted
/// first: the statements' waits are bounded, the COMMIT's is not (a COMMIT
/// cancelled by a statement timeout while it waits for a synchronous
/// standby is reported as done, with only a warning). A transaction
/// that notified takes the server's NOTIFY queue lock at its COMMIT and
/// keeps it until the commit is flushed, so that notifications arrive in
/// commit order; every host's commits take it in turn, a few ms each, and
/// with three hosts some waited past 50 ms (BENCHMARKS.md, "Fleet on
/// PostgreSQL").
const COMMIT_BOUNDED: &str = "SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0; COMMIT";
/// A batch that has run this long takes no further write: it is rolled
/// back and its writes run one by one, for about as long again at most
/// (no write starts in the pass past it). With the statements' bound
/// ([`BEGIN_BOUNDED`]), this bounds how late a lease granted in a batch
/// is answered (about 1.5 s at worst, two statements past this), against
/// the lease's margin of 10 s (`refresher::attempt::LEASE_MARGIN`). The
/// refresher also counts a lease's time from before it asked, and renews
/// one that came late before using it.
const BATCH_TIME: Duration = Duration::from_millis(500);
/// How long a daemon write keeps trying for a row locked elsewhere (or a
/// statement that runs past its bound) before it answers an error. Its
/// caller tries again later: the refresher holds the credential for a
/// moment, and a commit renews its lease between tries.
const LOCK_PATIENCE: Duration = Duration::from_secs(2);

impl From<postgres::Error> for StoreError {
    /// The server's severity, SQLSTATE and message only: its DETAIL may
    /// quote a row (with its tokens), and nothing here repeats the URL.
    fn from(e: postgres::Error) -> Self {
        StoreError::Postgres(match e.as_db_error() {
            Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
            None => e.to_string(),
        })
    }
}

/// An operation waiting in the pool's queue.
struct Op {
    /// The one credential whose rows it writes, if it writes no other's
    /// (the daemon's writes): such operations wait for a row lock at most
    /// 50 ms at a time ([`BEGIN_BOUNDED`]), and may share a transaction.
    key: Option<String>,
    /// A commit or a renewal: its lease's time runs while it waits, so it
    /// waits in the queue's urgent lane ([`Lanes`]).
    urgent: bool,
    /// Runs alone: it was in a batch that failed (its row was locked
    /// elsewhere, and it would fail any batch it joined; or the pass after
    /// the failure did not reach it), and never runs in a batch again.
    solo: bool,
    /// Its place in the order operations were queued: a failed batch's
    /// pass runs them in that order, not in the batch's name order.
    seq: u64,
    job: Box<dyn Job>,
    /// When it first found its row locked elsewhere ([`LOCK_PATIENCE`]).
    blocked_since: Option<Instant>,
}

impl Op {
    /// Whether it may share a transaction with others.
    fn batches(&self) -> bool {
        self.key.is_some() && !self.solo
    }
}

/// An operation's statements and the sending of its answer. A thread
/// sends the answer of the last operation it ran once it counts as idle
/// again (so a caller's next operation never finds the pool busy with the
/// one just answered, and a command keeps one connection).
trait Job: Send {
    /// Runs the statements in a batch's transaction, which the batch
    /// commits; keeps the result for [`answer`](Self::answer). An error
    /// leaves the transaction to be rolled back.
    fn run(&mut self, tx: &mut Tx<'_>) -> Result<()>;
    /// Runs the operation in a transaction of its own ([`Link::run`]),
    /// its lock waits bounded if `bounded`; false if one timed out
    /// (nothing of it was kept).
    fn alone(&mut self, link: &mut Link, bounded: bool) -> bool;
    /// Sends the result kept, or `failed` instead.
    fn answer(self: Box<Self>, failed: Option<StoreError>);
}

struct Pending<T, F, A> {
    f: F,
    answer: A,
    result: Option<Result<T>>,
}

impl<T, F, A> Job for Pending<T, F, A>
where
    T: Send,
    F: FnMut(&mut Tx<'_>) -> Result<T> + Send,
    A: FnOnce(Result<T>) + Send,
{
    fn run(&mut self, tx: &mut Tx<'_>) -> Result<()> {
        let v = (self.f)(tx)?;
        self.result = Some(Ok(v));
        Ok(())
    }

    fn alone(&mut self, link: &mut Link, bounded: bool) -> bool {
        let r = link.run(bounded, &mut self.f);
        if bounded && link.locked {
            return false;
        }
        self.result = Some(r);
        true
    }

    fn answer(self: Box<Self>, failed: Option<StoreError>) {
        let r = match failed {
            Some(e) => Err(e),
            None => self.result.unwrap_or(Err(StoreError::Closed)),
        };
        (self.answer)(r);
    }
}

/// The backend pids of this process's store connections: notifications
/// they sent are this process's own (`listen.rs`).
pub(super) struct Pids(Vec<AtomicI32>);

impl Pids {
    pub(super) fn contains(&self, pid: i32) -> bool {
        pid != 0 && self.0.iter().any(|p| p.load(Ordering::Relaxed) == pid)
    }
}

/// The pool's queue, in two lanes: commits and renewals (`urgent`), whose
/// leases run out as they wait, are taken before anything else, so that
/// none waits behind writes re-queued by a failed batch, or behind a
/// backlog of leases to take.
#[derive(Default)]
struct Lanes {
    urgent: VecDeque<Op>,
    normal: VecDeque<Op>,
    /// Every [`Jobs`] is gone: the threads leave once the lanes are empty.
    closed: bool,
}

/// Where an operation goes back into its lane.
#[derive(Clone, Copy)]
enum End {
    /// Its turn came and went (a row locked elsewhere): after the others.
    Back,
    /// It has not had its turn (a failed batch's pass ran out of time):
    /// before the others.
    Front,
}

/// What the pool's threads share.
struct Pool {
    config: postgres::Config,
    lanes: Mutex<Lanes>,
    /// Signalled when an operation is queued, or the queue closes.
    queued: Condvar,
    /// Threads waiting for an operation, or about to.
    idle: AtomicUsize,
    /// Threads started.
    threads: AtomicUsize,
    /// The next operation's [`Op::seq`].
    seq: AtomicU64,
    size: usize,
    pids: Arc<Pids>,
    /// Whether the database answers (`health.rs`): every thread reports.
    health: Arc<Health>,
}

impl Pool {
    /// Queues `ops`, in their order, at `end` of their lanes, and wakes
    /// a thread for each; starts a thread if none is idle. (Once the queue
    /// has closed, the threads still run what it holds before they leave.)
    fn requeue(self: &Arc<Pool>, ops: Vec<Op>, end: End) {
        if ops.is_empty() {
            return;
        }
        let mut lanes = self.lanes.lock().unwrap();
        let busy = self.idle.load(Ordering::SeqCst) == 0;
        let n = ops.len();
        match end {
            End::Back => {
                for op in ops {
                    lanes.lane(op.urgent).push_back(op);
                }
            }
            End::Front => {
                for op in ops.into_iter().rev() {
                    lanes.lane(op.urgent).push_front(op);
                }
            }
        }
        drop(lanes);
        if n == 1 {
            self.queued.notify_one();
        } else {
            self.queued.notify_all();
        }
        if busy {
            grow(self);
        }
    }

    /// Waits for the next operation and takes it, with the others of its
    /// lane that may share its transaction (up to [`BATCH`]), if it may;
    /// None once the queue has closed and is empty. Counts the thread
    /// busy.
    fn take(&self) -> Option<Vec<Op>> {
        let mut lanes = self.lanes.lock().unwrap();
        loop {
            let urgent = !lanes.urgent.is_empty();
            if let Some(first) = lanes.lane(urgent).pop_front() {
                self.idle.fetch_sub(1, Ordering::SeqCst);
                let batches = first.batches();
                let mut ops = vec![first];
                if batches {
                    // Only from its own lane: a commit never waits behind
                    // a lease's statements.
                    let lane = lanes.lane(urgent);
                    let mut i = 0;
                    while i < lane.len() && ops.len() < BATCH {
                        if lane[i].batches() {
                            ops.extend(lane.remove(i));
                        } else {
                            i += 1;
                        }
                    }
                }
                return Some(ops);
            }
            if lanes.closed {
                return None;
            }
            lanes = self.queued.wait(lanes).unwrap();
        }
    }

    /// Whether a commit or renewal waits for a thread.
    fn urgent_waiting(&self) -> bool {
        !self.lanes.lock().unwrap().urgent.is_empty()
    }

    fn close(&self) {
        self.lanes.lock().unwrap().closed = true;
        self.queued.notify_all();
    }
}

impl Lanes {
    fn lane(&mut self, urgent: bool) -> &mut VecDeque<Op> {
        if urgent {
            &mut self.urgent
        } else {
            &mut self.normal
        }
    }
}

/// Closes the pool's queue when the last [`Jobs`] is dropped.
struct Closer(Arc<Pool>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The pool's queue. Cloning shares the pool.
#[derive(Clone)]
pub(super) struct Jobs {
    pool: Arc<Pool>,
    _closer: Arc<Closer>,
    url: PgUrl,
}

impl Jobs {
    /// Connects, brings the schema up to date, and starts the pool's first
    /// thread, which owns that connection from then on.
    pub(super) fn start(url: &PgUrl) -> Result<Jobs> {
        let mut config = url.config();
        config.connect_timeout(CONNECT_TIMEOUT);
        let size = std::env::var("TOKEND_PG_POOL")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(POOL_SIZE, |n| n.clamp(1, POOL_MAX));
        let pool = Arc::new(Pool {
            config,
            lanes: Mutex::new(Lanes::default()),
            queued: Condvar::new(),
            idle: AtomicUsize::new(1),
            threads: AtomicUsize::new(1),
            seq: AtomicU64::new(0),
            size,
            pids: Arc::new(Pids((0..size).map(|_| AtomicI32::new(0)).collect())),
            health: Arc::new(Health::default()),
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let first = pool.clone();
        std::thread::Builder::new()
            .name("tokend-pg".into())
            .spawn(move || {
                let mut link = Link::new(&first, 0);
                let ready = link.connect().and_then(|()| link.migrate());
                let failed = ready.is_err();
                let _ = ready_tx.send(ready);
                if !failed {
                    serve(&first, &mut link);
                }
            })
            .map_err(|e| StoreError::Postgres(format!("cannot start the database thread: {e}")))?;
        let closer = Arc::new(Closer(pool.clone()));
        // Should start-up fail below, the thread leaves: nothing is queued.
        ready_rx.recv().unwrap_or(Err(StoreError::Closed))?;
        Ok(Jobs {
            pool,
            _closer: closer,
            url: url.clone(),
        })
    }

    /// Wake-ups for other processes' commits (`listen.rs`).
    pub(super) fn subscribe(&self) -> Changes {
        listen::start(&self.url, self.pool.pids.clone(), self.pool.health.clone())
    }

    /// Since when this process has not reached the database, if it has not.
    pub(super) fn outage(&self) -> Option<Outage> {
        self.pool.health.outage()
    }

    fn queue<T: Send + 'static>(
        &self,
        key: Option<String>,
        urgent: bool,
        f: impl FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
        answer: impl FnOnce(Result<T>) + Send + 'static,
    ) -> Result<()> {
        let op = Op {
            key,
            urgent,
            solo: false,
            job: Box::new(Pending {
                f,
                answer,
                result: None,
            }),
            blocked_since: None,
            seq: self.pool.seq.fetch_add(1, Ordering::Relaxed),
        };
        self.pool.requeue(vec![op], End::Back);
        Ok(())
    }

    /// Runs `f` in a transaction of its own; the answer comes once it
    /// committed (*commit, then publish*). `f` runs again, on a new
    /// transaction, if the server rolled the first back for a deadlock,
    /// or if the connection was found broken before anything reached
    /// the server: it does nothing but its statements.
    pub(super) async fn send<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.send_keyed(None, false, f).await
    }

    /// [`send`](Self::send), for a daemon write to the rows of credential
    /// `name` and no other's: it may share its transaction with others of
    /// the kind, and waits for a row locked elsewhere only in bounded
    /// turns (group commit, above). Its answer still comes only once its
    /// transaction committed. `urgent`: a commit or a renewal, whose
    /// lease runs out as it waits.
    pub(super) async fn send_on<T: Send + 'static>(
        &self,
        name: String,
        urgent: bool,
        f: impl FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.send_keyed(Some(name), urgent, f).await
    }

    async fn send_keyed<T: Send + 'static>(
        &self,
        key: Option<String>,
        urgent: bool,
        f: impl FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.queue(key, urgent, f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// [`send`](Self::send), for the command line: blocks until the answer.
    pub(super) fn call<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.queue(None, false, f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }
}

/// Starts one more thread if the pool is not full; it connects when its
/// first operation comes.
fn grow(pool: &Arc<Pool>) {
    let Ok(slot) = pool
        .threads
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < pool.size).then_some(n + 1)
        })
    else {
        return;
    };
    pool.idle.fetch_add(1, Ordering::SeqCst);
    let p = pool.clone();
    let spawned = std::thread::Builder::new()
        .name("tokend-pg".into())
        .spawn(move || serve(&p, &mut Link::new(&p, slot)));
    if spawned.is_err() {
        // The threads already there serve the queue.
        pool.idle.fetch_sub(1, Ordering::SeqCst);
        pool.threads.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A pool thread, counted idle when it starts: runs operations until
/// every [`Jobs`] is gone. A daemon write takes along the others of its
/// lane already queued, up to [`BATCH`] (group commit: [`Pool::take`]).
fn serve(pool: &Arc<Pool>, link: &mut Link) {
    while let Some(ops) = pool.take() {
        let last = link.run_batch(pool, ops);
        pool.idle.fetch_add(1, Ordering::SeqCst);
        for (job, failed) in last {
            job.answer(failed);
        }
    }
}

/// One connection of the pool, made again when it broke (a restarted
/// server, a dropped network), and its prepared statements. An operation
/// whose first round trip finds it broken runs on a new one: nothing of
/// it had reached the server. One that broke later fails (its
/// transaction is rolled back, or, if the COMMIT got no answer, its
/// outcome is unknown: [`StoreError::Commit`]); the next reconnects.
struct Link {
    config: postgres::Config,
    client: Option<Client>,
    statements: HashMap<&'static str, Statement>,
    pids: Arc<Pids>,
    slot: usize,
    health: Arc<Health>,
    /// The last [`run`](Self::run) failed on a bounded wait: a row lock
    /// held elsewhere, or a statement past its 500 ms.
    locked: bool,
}

impl Link {
    fn new(pool: &Pool, slot: usize) -> Link {
        Link {
            config: pool.config.clone(),
            client: None,
            statements: HashMap::new(),
            pids: pool.pids.clone(),
            slot,
            health: pool.health.clone(),
            locked: false,
        }
    }

    /// A new connection; the statements prepared on the old one are gone
    /// with it. Whether it could be made is reported (`health.rs`).
    fn connect(&mut self) -> Result<()> {
        self.client = None;
        self.statements.clear();
        self.pids.0[self.slot].store(0, Ordering::Relaxed);
        let connected = self
            .config
            .connect(NoTls)
            .and_then(|mut c| {
                let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[])?.get(0);
                Ok((c, pid))
            })
            .map_err(StoreError::from);
        let (client, pid) = match connected {
            Ok(c) => c,
            Err(e) => {
                self.health.down(Witness::Ops, &e.to_string());
                return Err(e);
            }
        };
        self.health.up(Witness::Ops);
        self.pids.0[self.slot].store(pid, Ordering::Relaxed);
        self.client = Some(client);
        Ok(())
    }

    fn migrate(&mut self) -> Result<()> {
        match &mut self.client {
            Some(c) => migrate(c),
            None => Err(StoreError::Closed),
        }
    }

    /// Runs `ops`, which a thread took from the queue together. Several
    /// (daemon writes) share one transaction, locked in their credentials'
    /// order; if it does not commit while the connection still works, each
    /// runs again alone, in the order they were queued. One runs alone. An
    /// operation that ran alone is answered at once, but the last, which
    /// is returned to be answered once the thread counts as idle; so are
    /// all the operations of a batch that committed, or that failed with a
    /// broken connection (with the error each answers).
    ///
    /// An operation whose row is locked elsewhere goes to the back of its
    /// lane, to run alone (a commit stays in the urgent lane: once the
    /// row is free, it must not wait behind the leases). After a batch rolled back, the pass
    /// that runs its writes alone stops once it has run for
    /// [`BATCH_TIME`], or, unless they are commits and renewals
    /// themselves, as soon as a commit or renewal waits: the writes it
    /// has not reached go back to the front of their lane, each to run
    /// alone on whichever thread is free (never in a batch again: one
    /// that failed once may fail again), so that none waits for a whole
    /// batch's writes to run one after the other on one connection.
    fn run_batch(
        &mut self,
        pool: &Arc<Pool>,
        mut ops: Vec<Op>,
    ) -> Vec<(Box<dyn Job>, Option<StoreError>)> {
        if ops.len() > 1 {
            ops.sort_by(|a, b| a.key.cmp(&b.key));
            match self.batch(&mut ops) {
                Batch::Committed => return ops.into_iter().map(|op| (op.job, None)).collect(),
                Batch::Failed(e) => {
                    return ops.into_iter().map(|op| (op.job, Some(same(&e)))).collect();
                }
                Batch::RolledBack => {}
            }
            ops.sort_by_key(|op| op.seq);
        }
        let pass = Instant::now();
        let mut ops = ops.into_iter().peekable();
        let mut first = true;
        while let Some(mut op) = ops.next() {
            if !std::mem::take(&mut first)
                && (pass.elapsed() > BATCH_TIME || (!op.urgent && pool.urgent_waiting()))
            {
                let rest = std::iter::once(op)
                    .chain(ops)
                    .map(|mut op| {
                        op.solo = true;
                        op
                    })
                    .collect();
                pool.requeue(rest, End::Front);
                return Vec::new();
            }
            let bounded = op.key.is_some();
            if !op.job.alone(self, bounded) {
                let since = *op.blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() < LOCK_PATIENCE {
                    op.solo = true;
                    pool.requeue(vec![op], End::Back);
                    continue;
                }
                op.job.answer(Some(StoreError::Postgres(format!(
                    "the credential {:?} is locked by another database session, \
                     or its writes run past their time limit (for {} s now); \
                     trying again later",
                    op.key.unwrap_or_default(),
                    LOCK_PATIENCE.as_secs()
                ))));
                continue;
            }
            if ops.peek().is_none() {
                return vec![(op.job, None)];
            }
            op.job.answer(None);
        }
        Vec::new()
    }

    /// Runs daemon writes in one transaction, its row lock waits bounded.
    fn batch(&mut self, ops: &mut [Op]) -> Batch {
        if self.client.as_ref().is_none_or(Client::is_closed)
            && let Err(e) = self.connect()
        {
            return Batch::Failed(e);
        }
        let Some(client) = self.client.as_mut() else {
            return Batch::Failed(StoreError::Closed);
        };
        let started = Instant::now();
        let mut tx = Tx::new(client, &mut self.statements, true);
        let ran = tx.begin().and_then(|()| {
            ops.iter_mut().try_for_each(|op| {
                if started.elapsed() > BATCH_TIME {
                    return Err(StoreError::Postgres("the batch ran out of time".into()));
                }
                op.job.run(&mut tx)
            })
        });
        if ran.is_ok() {
            return match tx.commit() {
                Ok(()) => Batch::Committed,
                Err(e) => Batch::Failed(e),
            };
        }
        let trips = tx.trips;
        let client = self.client.as_mut().expect("a transaction ran on it");
        if client.is_closed() || client.batch_execute("ROLLBACK").is_err() {
            self.client = None;
            if trips > 0 {
                // Broken mid-way: the operations would only fail again,
                // each waiting for its own reconnection.
                return Batch::Failed(ran.expect_err("it failed"));
            }
            // Found broken before anything reached the server (a
            // restarted server): each runs alone, on a new connection.
        }
        Batch::RolledBack
    }

    /// Runs `f` in a transaction of its own, its row lock waits bounded by
    /// 50 ms and its statements by 500 ms ([`BEGIN_BOUNDED`]) if `bounded`
    /// (then [`locked`](Self::locked) says whether one ran out).
    fn run<T>(&mut self, bounded: bool, mut f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.locked = false;
        let mut retries = 0;
        let mut reconnected = false;
        loop {
            if self.client.as_ref().is_none_or(Client::is_closed) {
                self.connect()?;
                reconnected = true;
            }
            let Some(client) = self.client.as_mut() else {
                return Err(StoreError::Closed);
            };
            let mut tx = Tx::new(client, &mut self.statements, bounded);
            let r = f(&mut tx).and_then(|v| tx.commit().map(|()| v));
            let (retry, trips, begun) = (tx.retry, tx.trips, tx.begun);
            self.locked = tx.locked;
            let Err(e) = r else { return r };
            if begun {
                // The transaction failed before its COMMIT: end it, or
                // drop a connection whose state is no longer known.
                let client = self.client.as_mut().expect("a transaction ran on it");
                if client.is_closed() || client.batch_execute("ROLLBACK").is_err() {
                    self.client = None;
                }
            }
            let broken = self.client.as_ref().is_none_or(Client::is_closed);
            if self.locked {
                return Err(e);
            }
            if retry && retries < RETRIES {
                retries += 1;
            } else if !(broken && trips == 0 && !reconnected) {
                // Unless nothing reached the server: then once more, on a
                // new connection.
                return Err(e);
            }
        }
    }
}

/// `e` again, for each operation of a batch that failed with it: the
/// errors a batch can end with, the text of any other.
fn same(e: &StoreError) -> StoreError {
    match e {
        StoreError::Commit(m) => StoreError::Commit(m.clone()),
        StoreError::Postgres(m) => StoreError::Postgres(m.clone()),
        StoreError::Closed => StoreError::Closed,
        other => StoreError::Postgres(other.to_string()),
    }
}

/// How a batch of operations ended ([`Link::batch`]).
enum Batch {
    Committed,
    /// Nothing of it is known committed: every operation answers this.
    Failed(StoreError),
    /// Rolled back, the connection intact: each operation runs again alone.
    RolledBack,
}

/// An operation's transaction on one connection of the pool. It begins
/// with its first write ([`execute`](Self::execute), [`query`](Self::query)
/// …); an operation that only reads one statement ([`read`](Self::read)
/// first) runs it on its own, one round trip instead of three. Every
/// statement is prepared once per connection and kept.
pub(super) struct Tx<'a> {
    client: &'a mut Client,
    statements: &'a mut HashMap<&'static str, Statement>,
    begun: bool,
    /// Round trips that got an answer.
    trips: u32,
    /// The server rolled the transaction back for a deadlock or a
    /// serialization failure: the operation may run again.
    retry: bool,
    /// Row lock waits are bounded ([`BEGIN_BOUNDED`]).
    bounded: bool,
    /// A bounded wait (a row lock's, or a statement's) ran out.
    locked: bool,
}

impl<'a> Tx<'a> {
    /// A transaction not yet begun on `client`.
    fn new(
        client: &'a mut Client,
        statements: &'a mut HashMap<&'static str, Statement>,
        bounded: bool,
    ) -> Tx<'a> {
        Tx {
            client,
            statements,
            begun: false,
            trips: 0,
            retry: false,
            bounded,
            locked: false,
        }
    }

    fn check<T>(&mut self, r: std::result::Result<T, postgres::Error>) -> Result<T> {
        match r {
            Ok(v) => {
                self.trips += 1;
                Ok(v)
            }
            Err(e) => {
                if let Some(code) = e.code()
                    && (*code == SqlState::T_R_DEADLOCK_DETECTED
                        || *code == SqlState::T_R_SERIALIZATION_FAILURE)
                {
                    self.retry = true;
                }
                // A bounded wait that ran out: the row lock's (55P03), or
                // the statement's (57014). One CI run also got 57014
                // "canceling statement due to user request" where a lock
                // timeout was due (most likely the server's timeout mark
                // cleared before it acted on the cancel). tokend sends no
                // cancel of its own; an operator's `pg_cancel_backend` is
                // taken for a bound too, which is safe: the transaction
                // rolled back, and the write is tried again.
                if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
                    || (self.bounded && e.code() == Some(&SqlState::QUERY_CANCELED))
                {
                    self.locked = true;
                }
                Err(e.into())
            }
        }
    }

    fn statement(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let r = self.client.prepare(sql);
        let s = self.check(r)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn begin(&mut self) -> Result<()> {
        if !self.begun {
            // Counted begun before the answer: should a SET of
            // BEGIN_BOUNDED fail after its BEGIN, the transaction it left
            // open is rolled back, not found by the next operation.
            self.begun = true;
            let r = self
                .client
                .batch_execute(if self.bounded { BEGIN_BOUNDED } else { "BEGIN" });
            self.check(r)?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        if self.begun {
            self.begun = false;
            self.client
                .batch_execute(if self.bounded {
                    COMMIT_BOUNDED
                } else {
                    "COMMIT"
                })
                .map_err(|e| {
                    // Its outcome is unknown: never a bound to try again.
                    self.locked = false;
                    StoreError::Commit(StoreError::from(e).to_string())
                })?;
        }
        Ok(())
    }

    /// A read that may run on its own: inside the transaction if one has
    /// begun, else as a transaction of its own (the operation must do
    /// nothing else that has to see the same state).
    pub(super) fn read(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let s = self.statement(sql)?;
        let r = self.client.query(&s, params);
        self.check(r)
    }

    pub(super) fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        self.begin()?;
        let s = self.statement(sql)?;
        let r = self.client.query(&s, params);
        self.check(r)
    }

    pub(super) fn query_one(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row> {
        self.begin()?;
        let s = self.statement(sql)?;
        let r = self.client.query_one(&s, params);
        self.check(r)
    }

    pub(super) fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        self.begin()?;
        let s = self.statement(sql)?;
        let r = self.client.query_opt(&s, params);
        self.check(r)
    }

    /// A statement whose text is made at run time (`tokend migrate`'s
    /// column lists), prepared for this one use, in the transaction.
    pub(super) fn query_dynamic(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        self.begin()?;
        let r = self.client.query(sql, params);
        self.check(r)
    }

    /// [`query_dynamic`](Self::query_dynamic), for a statement that
    /// returns no rows: how many it changed.
    pub(super) fn execute_dynamic(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        self.begin()?;
        let r = self.client.execute(sql, params);
        self.check(r)
    }

    pub(super) fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        self.begin()?;
        let s = self.statement(sql)?;
        let r = self.client.execute(&s, params);
        self.check(r)
    }
}

/// Creates or upgrades the schema, under the advisory lock: hosts starting
/// at once run it one after the other, and the later ones find it done.
fn migrate(client: &mut Client) -> Result<()> {
    let mut tx: Transaction<'_> = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    let v = ops::schema_version(&mut tx)?;
    if v > super::conn::SCHEMA_VERSION {
        return Err(StoreError::TooNew(v));
    }
    if v < super::conn::SCHEMA_VERSION {
        ops::create_schema(&mut tx, super::conn::SCHEMA_VERSION)?;
        keys::create_table(&mut tx)?;
    }
    tx.commit()?;
    Ok(())
}
