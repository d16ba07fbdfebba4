//! The PostgreSQL backend (issue 12): the same operations as SQLite's,
//! for a fleet of hosts sharing one database.
//!
//! One thread owns the connection and runs each operation it is sent in a
//! transaction of its own (`ops.rs` holds the SQL). Both faces use it: the
//! daemon's [`Store`](super::Store) awaits the answer, the command line's
//! [`StoreConn`](super::StoreConn) blocks on it. The synchronous client
//! (`postgres`) runs its own small runtime, which must not be entered from
//! a thread already inside one (`tokend refresh` opens the store inside
//! its runtime): on a thread of its own it never is.
//!
//! No group commit, unlike SQLite's thread: another host's transaction may
//! wait for a credential's row lock, and a batch would hold every row it
//! touched until its end.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use postgres::{Client, NoTls, Transaction};
use tokio::sync::oneshot;

use super::{PgUrl, Result, StoreError};

mod health;
pub(super) mod keys;
mod listen;

pub use health::Outage;
use health::{Health, Witness};
pub(super) mod ops;

/// The `pg_advisory_xact_lock` key the migrating transaction holds, so that
/// hosts starting at once migrate one after the other ("tokend" in ASCII).
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e64;

/// How long connecting may take before the store reports the database down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

type Op = Box<dyn FnOnce(&mut Link) + Send>;

/// The database thread's queue. Cloning shares the thread.
#[derive(Clone)]
pub(super) struct Jobs {
    tx: mpsc::Sender<Op>,
    url: PgUrl,
    /// The backend pid of the thread's connection: notifications it sent
    /// are this process's own.
    pid: Arc<AtomicI32>,
    /// Whether the database answers (`health.rs`).
    health: Arc<Health>,
}

impl Jobs {
    /// Connects, brings the schema up to date, and starts the thread that
    /// owns the connection from then on.
    pub(super) fn start(url: &PgUrl) -> Result<Jobs> {
        let mut config = url.config();
        config.connect_timeout(CONNECT_TIMEOUT);
        let (tx, rx) = mpsc::channel::<Op>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let pid = Arc::new(AtomicI32::new(0));
        let link_pid = pid.clone();
        let health = Arc::new(Health::default());
        let link_health = health.clone();
        std::thread::Builder::new()
            .name("tokend-pg".into())
            .spawn(move || {
                let mut link = match Link::connect(config, link_pid, link_health) {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(op) = rx.recv() {
                    op(&mut link);
                }
            })
            .map_err(|e| StoreError::Postgres(format!("cannot start the database thread: {e}")))?;
        ready_rx.recv().unwrap_or(Err(StoreError::Closed))?;
        Ok(Jobs {
            tx,
            url: url.clone(),
            pid,
            health,
        })
    }

    /// Wake-ups for other processes' commits (`listen.rs`).
    pub(super) fn subscribe(&self) -> tokio::sync::mpsc::Receiver<()> {
        listen::start(&self.url, self.pid.clone(), self.health.clone())
    }

    /// Since when this process has not reached the database, if it has not.
    pub(super) fn outage(&self) -> Option<Outage> {
        self.health.outage()
    }

    fn queue<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T> + Send + 'static,
        answer: impl FnOnce(Result<T>) + Send + 'static,
    ) -> Result<()> {
        let op: Op = Box::new(move |link: &mut Link| answer(link.run(f)));
        self.tx.send(op).map_err(|_| StoreError::Closed)
    }

    /// Runs `f` in a transaction of its own; the answer comes once it
    /// committed (*commit, then publish*).
    pub(super) async fn send<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T> + Send + 'static,
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
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.queue(f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }
}

/// The connection, made again when it broke (a restarted server, a
/// dropped network). An operation whose BEGIN finds it broken runs on a
/// new one: nothing of it had reached the server. One that broke later
/// fails (its transaction is rolled back, or, if the COMMIT got no
/// answer, its outcome is unknown: [`StoreError::Commit`]); the next
/// reconnects.
struct Link {
    config: postgres::Config,
    client: Client,
    pid: Arc<AtomicI32>,
    health: Arc<Health>,
}

impl Link {
    fn connect(config: postgres::Config, pid: Arc<AtomicI32>, health: Arc<Health>) -> Result<Link> {
        let mut client = config.connect(NoTls)?;
        migrate(&mut client)?;
        let mut link = Link {
            config,
            client,
            pid,
            health,
        };
        link.note_pid()?;
        Ok(link)
    }

    /// Makes the connection again, unless the last attempt failed too
    /// recently (`health.rs`: backoff): then fails at once.
    fn reconnect(&mut self) -> Result<()> {
        if let Err(wait) = self.health.may_connect() {
            return Err(StoreError::Postgres(format!(
                "the database is unreachable; next attempt to connect in {} ms",
                wait.as_millis()
            )));
        }
        match self.config.connect(NoTls).map_err(StoreError::from) {
            Ok(client) => {
                self.client = client;
                self.note_pid()?;
                self.health.up(Witness::Ops);
                Ok(())
            }
            Err(e) => {
                self.health.down(Witness::Ops, &e.to_string());
                Err(e)
            }
        }
    }

    fn note_pid(&mut self) -> Result<()> {
        let pid: i32 = self
            .client
            .query_one("SELECT pg_backend_pid()", &[])?
            .get(0);
        self.pid.store(pid, Ordering::Relaxed);
        Ok(())
    }

    fn run<T>(&mut self, f: impl FnOnce(&mut Transaction<'_>) -> Result<T>) -> Result<T> {
        if self.client.is_closed() {
            self.reconnect()?;
        }
        let failed = match self.client.transaction() {
            Ok(tx) => return finish(tx, f),
            Err(e) => e,
        };
        if !self.client.is_closed() {
            return Err(failed.into());
        }
        self.reconnect()?;
        finish(self.client.transaction()?, f)
    }
}

/// Runs `f` in `tx` and commits if it succeeded.
fn finish<T>(
    mut tx: Transaction<'_>,
    f: impl FnOnce(&mut Transaction<'_>) -> Result<T>,
) -> Result<T> {
    let r = f(&mut tx)?;
    tx.commit()
        .map_err(|e| StoreError::Commit(StoreError::from(e).to_string()))?;
    Ok(r)
}

/// Creates or upgrades the schema, under the advisory lock: hosts starting
/// at once run it one after the other, and the later ones find it done.
fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
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
