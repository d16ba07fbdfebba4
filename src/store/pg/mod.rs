//! The PostgreSQL backend (issue 12): the same operations as SQLite's,
//! for a fleet of hosts sharing one database.
//!
//! A small pool of threads, each owning one connection, takes operations
//! from one shared queue and runs each in a transaction of its own
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
//! No group commit, unlike SQLite's thread. One was built and taken out
//! (BENCHMARKS.md, "Fleet on PostgreSQL"): a batch answers only once its
//! last operation is done, so one operation waiting for a row lock that
//! another host (or a `psql` session) holds delays every other answer in
//! the batch, while the leases they took run out. A lease granted early
//! in a batch could reach its holder already expired, and a commit sorted
//! behind a blocked row waited past its lease: either lets two hosts
//! spend the same refresh token. Another host's transaction may also wait
//! for a credential's row lock, and a batch would hold every row it
//! touched until its end. Operations on different connections may lock
//! the same rows: each write locks one credential's row and then its
//! lease row, always in that order; an operation over several rows
//! (`bring_forward`, a batch import) that deadlocks all the same is rolled
//! back by the server and run again ([`RETRIES`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

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

/// An operation: it runs on a pool thread's connection and returns the
/// sending of its answer, which the thread does once it counts as idle
/// again (so a caller's next operation never finds the pool busy with the
/// one just answered, and a command keeps one connection).
type Op = Box<dyn FnOnce(&mut Link) -> Reply + Send>;
type Reply = Box<dyn FnOnce() + Send>;

/// The backend pids of this process's store connections: notifications
/// they sent are this process's own (`listen.rs`).
pub(super) struct Pids(Vec<AtomicI32>);

impl Pids {
    pub(super) fn contains(&self, pid: i32) -> bool {
        pid != 0 && self.0.iter().any(|p| p.load(Ordering::Relaxed) == pid)
    }
}

/// What the pool's threads share.
struct Pool {
    config: postgres::Config,
    queue: Mutex<mpsc::Receiver<Op>>,
    /// Threads waiting for an operation, or about to.
    idle: AtomicUsize,
    /// Threads started.
    threads: AtomicUsize,
    size: usize,
    pids: Arc<Pids>,
    /// Whether the database answers (`health.rs`): every thread reports.
    health: Arc<Health>,
}

/// The pool's queue. Cloning shares the pool.
#[derive(Clone)]
pub(super) struct Jobs {
    tx: mpsc::Sender<Op>,
    pool: Arc<Pool>,
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
        let (tx, rx) = mpsc::channel::<Op>();
        let pool = Arc::new(Pool {
            config,
            queue: Mutex::new(rx),
            idle: AtomicUsize::new(1),
            threads: AtomicUsize::new(1),
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
        ready_rx.recv().unwrap_or(Err(StoreError::Closed))?;
        Ok(Jobs {
            tx,
            pool,
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
        f: impl FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
        answer: impl FnOnce(Result<T>) + Send + 'static,
    ) -> Result<()> {
        let op: Op = Box::new(move |link: &mut Link| {
            let r = link.run(f);
            Box::new(move || answer(r))
        });
        // Looked at before the send: once sent, an idle thread may take
        // the operation at once, and no longer count as idle.
        let busy = self.pool.idle.load(Ordering::SeqCst) == 0;
        self.tx.send(op).map_err(|_| StoreError::Closed)?;
        if busy {
            grow(&self.pool);
        }
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
        let (tx, rx) = oneshot::channel();
        self.queue(f, move |r| {
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
        self.queue(f, move |r| {
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
/// every [`Jobs`] is gone.
fn serve(pool: &Pool, link: &mut Link) {
    loop {
        let op = pool
            .queue
            .lock()
            .map_err(drop)
            .and_then(|q| q.recv().map_err(drop));
        pool.idle.fetch_sub(1, Ordering::SeqCst);
        let Ok(op) = op else { return };
        let reply = op(link);
        pool.idle.fetch_add(1, Ordering::SeqCst);
        reply();
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

    fn run<T>(&mut self, mut f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
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
            let mut tx = Tx {
                client,
                statements: &mut self.statements,
                begun: false,
                trips: 0,
                retry: false,
            };
            let r = f(&mut tx).and_then(|v| tx.commit().map(|()| v));
            let (retry, trips, begun) = (tx.retry, tx.trips, tx.begun);
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
}

impl Tx<'_> {
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
            let r = self.client.batch_execute("BEGIN");
            self.check(r)?;
            self.begun = true;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        if self.begun {
            self.begun = false;
            self.client
                .batch_execute("COMMIT")
                .map_err(|e| StoreError::Commit(StoreError::from(e).to_string()))?;
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
