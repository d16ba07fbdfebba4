//! The per-credential state machine and the scheduler that drives it.
//!
//! * The **scheduler** task keeps one deadline per credential in a heap and
//!   sleeps until the earliest (no polling); due credentials go on the work
//!   queue.
//! * **Workers** take names off the queue. All work on one credential runs
//!   under that credential's async lock, so refreshes are single-flight in
//!   this process; the store's lease makes them single-flight across
//!   processes.
//! * Provider requests in flight are capped by a semaphore
//!   (`max_concurrency`); workers are twice as many, so that the semaphore
//!   stays busy while other workers wait on the store or the file system.
//!
//! A refresh goes: provider slot → lease (notes "refresh started", takes a
//! fencing value) → token request → commit as a compare-and-swap on the
//! row's version and the lease's fence → publish. Nothing is published or
//! handed out before its commit.
//!
//! A refresh belongs to the refresher, never to whoever asked for it: the
//! socket and the CLI start one as a task of its own ([`Refresher::refresh_now`])
//! and wait for its outcome, and may stop waiting (a wait that times out,
//! a connection cut at shutdown) without touching the refresh. Once a request may
//! have reached the provider, only its committed answer (or its failure)
//! ends it; on shutdown no new request starts and those in flight finish
//! (see `docs/design.md`).
//!
//! Every path that could send a provider request asks one policy first,
//! [`gate`]: nothing for `misconfigured` or `needs_reauthorization`, nothing
//! before a `retrying` credential's next attempt or the provider's
//! Retry-After.
//!
//! The module, one job a file:
//!
//! * `mod.rs` (this file): the [`Refresher`] itself, start-up, reload, the
//!   store watch's entry point, shutdown ([`Tasks`]);
//! * `policy`: the pure decisions (due when, may a request go, what may be
//!   published, backoff), no tokio;
//! * `deadlines`: the heap the scheduler sleeps towards, no tokio;
//! * `scheduler`: the task that wakes credentials at their deadlines;
//! * `entry`: what is remembered per credential;
//! * `worker`: the workers, and writing a credential's files;
//! * `attempt`: one validation or refresh, and its commit or its setback;
//! * `outage`: a provider as a whole: down, probed, back;
//! * `serve`: what consumers ask (a fresh token, a forced refresh, a report);
//! * `status`: statuses and metrics, never a secret.

mod attempt;
mod deadlines;
mod entry;
mod outage;
mod policy;
mod scheduler;
mod serve;
mod status;
pub mod unstored;
mod worker;

pub use policy::{Gate, backoff, gate};
pub use status::StatusCursor;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use entry::{Entry, Pending};
use outage::Outage;
use policy::publishable;
use scheduler::Sched;

use crate::alerts::Alerts;
use crate::clock::now_ms;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::provider;
use crate::publish::Publisher;
use crate::store::{Credential, State, Store, StoreError};

/// How long shutdown waits, beyond `request_timeout`, for refreshes in
/// flight to commit. The systemd unit's TimeoutStopSec leaves room for both.
pub const SHUTDOWN_COMMIT_GRACE: Duration = Duration::from_secs(30);

/// How long after the start of shutdown a consumer waiting for a refresh
/// is answered without it; the socket's drain (5 s, begun after this
/// clock starts) leaves two seconds to write that answer on a loaded
/// machine (src/socket/mod.rs `DRAIN`).
pub const STOP_ANSWER: Duration = Duration::from_secs(3);

/// New rows beyond which the store watch reads every row at once instead
/// of one query each (a bulk import: README "Bulk import").
const BULK_READ: usize = 64;

/// Threads that write the files at start-up. A disk's fsyncs overlap (the
/// file system shares journal commits between them, and src/dirsync.rs
/// shares the directory's), so sixteen writers put ten thousand new files
/// on this disk in about half one's time, 8 s, not 14 (BENCHMARKS.md
/// "Replacing files"); the socket and READY wait for them all.
const START_WRITERS: usize = 16;

/// Every credential's files as the store has them at start-up: written when
/// alive, removed otherwise. Returns (published, unpublished, failures).
fn publish_all(
    publisher: &Publisher,
    creds: &[Arc<Credential>],
    now: i64,
) -> (usize, usize, Vec<(String, Vec<String>)>) {
    let next = AtomicUsize::new(0);
    // One writer for every 64 files, up to START_WRITERS.
    let writers = creds.len().div_ceil(64).clamp(1, START_WRITERS);
    std::thread::scope(|s| {
        let work = || {
            let (mut p, mut u, mut failed) = (0, 0, Vec::new());
            while let Some(c) = creds.get(next.fetch_add(1, Ordering::Relaxed)) {
                let errors = if let Some(token) = publishable(c, now) {
                    p += 1;
                    publisher.publish(&c.name, token, c.expires_at)
                } else {
                    u += 1;
                    publisher.unpublish(&c.name)
                };
                if !errors.is_empty() {
                    failed.push((c.name.clone(), errors));
                }
            }
            (p, u, failed)
        };
        // As many helpers as can be had; this thread writes too, so every
        // file is written even if none can.
        let helpers: Vec<_> = (1..writers)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("tokend-publish".into())
                    .spawn_scoped(s, work)
                    .ok()
            })
            .collect();
        let mut all = work();
        for h in helpers {
            match h.join() {
                Ok((p, u, failed)) => {
                    all.0 += p;
                    all.1 += u;
                    all.2.extend(failed);
                }
                // A bug; the others' results still count, and a file it
                // left unwritten is put back by its credential's next
                // validation (README "File sinks").
                Err(_) => tracing::error!("a start-up file writer failed"),
            }
        }
        all
    })
}

/// What the config decides, swapped as a whole on reload.
struct Ctx {
    config: Arc<Config>,
    publisher: Arc<Publisher>,
    /// Provider requests in flight, all credentials.
    slots: Arc<Semaphore>,
    /// Leases taken and waiting for a slot: as many as there are slots.
    ahead: Arc<Semaphore>,
}

/// The credentials by name. Every socket read looks its name up here:
/// foldhash (seeded per process) hashes a short name in a fraction of the
/// time of std's SipHash: about 150 of a token read's 12,000 instructions
/// (BENCHMARKS.md, "Socket API", "Instructions per request").
type Entries = HashMap<String, Arc<Entry>, foldhash::fast::RandomState>;

/// The running refresher. Cheap to share (`Arc`).
pub struct Refresher {
    store: Store,
    client: provider::Client,
    /// Our id in the store's leases.
    holder: String,
    ctx: RwLock<Arc<Ctx>>,
    entries: RwLock<Entries>,
    queue: mpsc::UnboundedSender<String>,
    sched: mpsc::UnboundedSender<Sched>,
    /// What `GET /metrics` reports.
    metrics: Metrics,
    /// Bumped when a credential's state changes (or one comes or goes), so
    /// that the systemd status line is recomputed only then.
    states: watch::Sender<()>,
    /// Set on shutdown: no new provider request starts.
    stopping: AtomicBool,
    /// When shutdown began, for those who wait on it: see
    /// [`Refresher::answer_by`]. Only the daemon's refresher ever sets it:
    /// `tokend refresh` without a daemon waits for its refresh whatever
    /// signal it gets (its process is all that holds the answer).
    stopped: watch::Sender<Option<Instant>>,
    /// Whether this is the daemon's refresher (see `stopped`).
    daemon: bool,
    /// On-demand refresh tasks running: shutdown waits for them.
    inflight: InFlight,
    /// When each provider's `retrying` credentials were last brought
    /// forward after one of its credentials recovered (ms).
    recovered_at: Mutex<HashMap<String, i64>>,
    /// Per provider that looks down: see [`Outage`].
    outages: Mutex<HashMap<String, Outage>>,
    /// The `[[notify]]` rules' runner, told of every change of state.
    alerts: Alerts,
    /// Held for reading while files are written or removed, for writing
    /// while a reload swaps the sinks and retires the old paths: no file
    /// is written to a path a reload has retired.
    publishing: tokio::sync::RwLock<()>,
    /// Where a pair whose commit failed is kept until one lands.
    unstored: unstored::Unstored,
}

/// Counts tasks that may hold a provider's answer not yet committed, so that
/// shutdown can wait for them (completion is observed, never forced).
#[derive(Clone, Default)]
struct InFlight(Arc<watch::Sender<usize>>);

/// One task counted by [`InFlight`] until dropped.
struct InFlightGuard(Arc<watch::Sender<usize>>);

impl InFlight {
    fn enter(&self) -> InFlightGuard {
        self.0.send_modify(|n| *n += 1);
        InFlightGuard(self.0.clone())
    }

    fn count(&self) -> usize {
        *self.0.borrow()
    }

    async fn idle(&self) {
        let _ = self.0.subscribe().wait_for(|n| *n == 0).await;
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Why no token can be handed out.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    Unknown,
    NeedsReauthorization(Option<String>),
    /// No unexpired token, and none could be had now: the last error, and
    /// when the next attempt is due (ms) if one is planned.
    NoValidToken {
        why: Option<String>,
        next_attempt: Option<i64>,
    },
}

/// Handles to the refresher's tasks, for shutdown.
pub struct Tasks {
    workers: Vec<JoinHandle<()>>,
    scheduler: JoinHandle<()>,
    inflight: InFlight,
}

impl Tasks {
    /// Waits for the workers and the on-demand refreshes to finish what they
    /// hold (a refresh in flight completes and commits), at most `grace`;
    /// then abandons the rest (their "refresh started" mark tells the next
    /// start). Call [`Refresher::stop`] first, so that nothing new starts.
    pub async fn join(self, grace: Duration) {
        self.scheduler.abort();
        let deadline = Instant::now() + grace;
        let n = self.inflight.count();
        if n > 0 {
            tracing::info!(
                refreshes = n,
                "waiting for refreshes in flight to finish and commit"
            );
        }
        for w in self.workers {
            let abort = w.abort_handle();
            if tokio::time::timeout_at(deadline, w).await.is_err() {
                tracing::error!(
                    "a refresh did not finish within the shutdown grace; the next start will find it unfinished"
                );
                abort.abort();
            }
        }
        if tokio::time::timeout_at(deadline, self.inflight.idle())
            .await
            .is_err()
        {
            tracing::error!(
                "a refresh did not finish within the shutdown grace; the next start will find it unfinished"
            );
        }
    }
}

impl Refresher {
    /// Loads every credential, publishes every token (a tmpfs /run is empty
    /// after a boot), schedules them all and starts the workers. Returns once
    /// the first publish is done.
    pub async fn start(
        config: Arc<Config>,
        store: Store,
        client: provider::Client,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Arc<Refresher>, Tasks), StoreError> {
        // Before anything reads the store: a pair an earlier run could not
        // store replaces the token it rotated, which must never be sent.
        let unstored = unstored::Unstored::new(&config, true);
        unstored.announce();
        unstored
            .store_kept(&store, &crate::lease::holder_id(), None)
            .await?;
        let creds = store.load_all().await?;
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let (sched_tx, sched_rx) = mpsc::unbounded_channel();
        let ctx = Ctx::new(config.clone());
        let r = Arc::new(Refresher {
            store,
            client,
            holder: crate::lease::holder_id(),
            ctx: RwLock::new(Arc::new(ctx)),
            entries: RwLock::new(Entries::default()),
            queue: queue_tx,
            sched: sched_tx,
            metrics: Metrics::default(),
            states: watch::Sender::new(()),
            stopping: AtomicBool::new(false),
            stopped: watch::Sender::new(None),
            daemon: true,
            inflight: InFlight::default(),
            recovered_at: Mutex::new(HashMap::new()),
            outages: Mutex::new(HashMap::new()),
            publishing: tokio::sync::RwLock::new(()),
            alerts: Alerts::start(config.clone()),
            unstored,
        });
        {
            let mut entries = r.entries.write().unwrap();
            for c in creds {
                entries.insert(c.name.clone(), Arc::new(Entry::new(c, r.alerts.clone())));
            }
        }
        let all: Vec<Arc<Entry>> = r.entries.read().unwrap().values().cloned().collect();
        let ctx = r.ctx();
        let now = now_ms();
        let (published, removed, failed) = tokio::task::spawn_blocking(move || {
            // Temp files an earlier run left when it died mid-write hold
            // tokens that nothing else would ever remove.
            let names: Vec<Arc<Credential>> = all.iter().map(|e| e.cred()).collect();
            ctx.publisher
                .sweep_temp_files(names.iter().map(|c| c.name.as_str()));
            publish_all(&ctx.publisher, &names, now)
        })
        .await
        .unwrap_or_default();
        for (name, errors) in failed {
            r.published(&name, errors);
        }
        tracing::info!(
            credentials = published + removed,
            published,
            unpublished = removed,
            "loaded credentials"
        );
        let scheduler = tokio::spawn(r.clone().scheduler(sched_rx, shutdown.clone()));
        let queue_rx = Arc::new(tokio::sync::Mutex::new(queue_rx));
        let workers = (0..config.refresh.max_concurrency * 2)
            .map(|_| tokio::spawn(r.clone().worker(queue_rx.clone(), shutdown.clone())))
            .collect();
        let names: Vec<String> = r.entries.read().unwrap().keys().cloned().collect();
        for n in names {
            r.reschedule(&n);
        }
        let inflight = r.inflight.clone();
        Ok((
            r,
            Tasks {
                workers,
                scheduler,
                inflight,
            },
        ))
    }

    /// A refresher holding one credential and running no tasks: for
    /// `tokend refresh` when no daemon runs. It goes through the same lease,
    /// compare-and-swap commit and publish as the daemon, so it never races
    /// one. Returns None if there is no such credential.
    pub async fn single(
        config: Arc<Config>,
        store: Store,
        client: provider::Client,
        name: &str,
    ) -> Result<Option<Arc<Refresher>>, StoreError> {
        // A daemon that died with this credential's pair kept left it for
        // its next start; store it now, before the token it replaced is
        // sent (this command writes no such file of its own: it retries
        // its commit for as long as it runs, signals held).
        unstored::Unstored::new(&config, false)
            .store_kept(&store, &crate::lease::holder_id(), Some(name))
            .await?;
        let Some(cred) = store.get(name).await? else {
            return Ok(None);
        };
        // Nobody listens on these: there are no workers or scheduler.
        let (queue, _) = mpsc::unbounded_channel();
        let (sched, _) = mpsc::unbounded_channel();
        let r = Refresher {
            store,
            client,
            holder: crate::lease::holder_id(),
            ctx: RwLock::new(Arc::new(Ctx::new(config))),
            entries: RwLock::new(Entries::from_iter([(
                name.to_owned(),
                Arc::new(Entry::new(cred, Alerts::none())),
            )])),
            queue,
            sched,
            metrics: Metrics::default(),
            states: watch::Sender::new(()),
            stopping: AtomicBool::new(false),
            stopped: watch::Sender::new(None),
            daemon: false,
            inflight: InFlight::default(),
            recovered_at: Mutex::new(HashMap::new()),
            outages: Mutex::new(HashMap::new()),
            publishing: tokio::sync::RwLock::new(()),
            alerts: Alerts::none(),
            unstored: unstored::Unstored::default(),
        };
        Ok(Some(Arc::new(r)))
    }

    fn ctx(&self) -> Arc<Ctx> {
        self.ctx.read().unwrap().clone()
    }

    fn entry(&self, name: &str) -> Option<Arc<Entry>> {
        self.entries.read().unwrap().get(name).cloned()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.ctx().config.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops starting provider requests: those in flight finish and commit
    /// ([`Tasks::join`] waits for them). For shutdown.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if self.daemon {
            self.stopped.send_if_modified(|at| {
                at.get_or_insert_with(Instant::now);
                true
            });
        }
    }

    /// Ends [`STOP_ANSWER`] after the daemon began to stop (never before,
    /// and never in `tokend refresh` without a daemon): a consumer waiting
    /// for a refresh is answered by then, with what there is, instead of
    /// waiting for a refresh that may take `request_timeout` and having its
    /// connection cut unanswered by the socket's drain. Only the wait ends:
    /// the refresh is a task of its own, which shutdown waits for.
    async fn answer_by(&self) {
        let mut stopped = self.stopped.subscribe();
        let at = match stopped.wait_for(Option::is_some).await {
            Ok(at) => *at,
            Err(_) => None,
        };
        match at {
            Some(at) => tokio::time::sleep_until(at + STOP_ANSWER).await,
            None => std::future::pending().await,
        }
    }

    /// Waits for the on-demand refresh tasks to end: `tokend refresh`
    /// without a daemon leaves its runtime only then, since dropping the
    /// runtime would drop a refresh before its commit.
    pub async fn settled(&self) {
        self.inflight.idle().await;
    }

    /// Marked changed whenever [`Refresher::summary`] may have changed.
    pub fn state_changes(&self) -> watch::Receiver<()> {
        self.states.subscribe()
    }

    /// Whether the scheduler task answers a ping within `patience`. The
    /// systemd watchdog asks: a wedged scheduler serves no deadline.
    pub async fn scheduler_alive(&self, patience: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.sched.send(Sched::Ping(tx)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(patience, rx).await, Ok(Ok(())))
    }

    /// Flags work on a credential and queues it unless it is queued already.
    fn enqueue(&self, name: &str, flag: impl FnOnce(&mut Pending)) {
        let Some(e) = self.entry(name) else { return };
        let mut st = e.state.lock().unwrap();
        flag(&mut st.pending);
        if !st.pending.queued {
            st.pending.queued = true;
            let _ = self.queue.send(name.to_owned());
        }
    }

    /// The cron sweep: validate every credential that holds a live token
    /// and is not backing off, each at a random instant within `spread`, so
    /// that ten thousand credentials do not all ask the provider in the
    /// same second.
    pub fn sweep(&self, spread: Duration) {
        let names: Vec<String> = self
            .entries
            .read()
            .unwrap()
            .iter()
            .filter(|(_, e)| {
                let c = e.cred();
                c.state == State::Valid && c.access_token.is_some()
            })
            .map(|(n, _)| n.clone())
            .collect();
        tracing::debug!(credentials = names.len(), spread = %crate::clock::span(spread.as_millis() as i64), "validation sweep");
        let now = now_ms();
        for n in names {
            let Some(e) = self.entry(&n) else { continue };
            // Flagged now, done when the credential's turn comes (or sooner,
            // if other work on it comes first).
            e.state.lock().unwrap().pending.validate = true;
            let at = now + (spread.as_millis() as f64 * fastrand::f64()) as i64;
            let _ = self.sched.send(Sched::By(n, at));
        }
    }

    /// Another process wrote to the store (import, a peer daemon's refresh,
    /// remove): queue a reload of every row whose revision moved.
    pub async fn store_changed(&self) -> Result<(), StoreError> {
        let revs = self.store.revisions().await?;
        let mut seen = HashSet::with_capacity(revs.len());
        let (mut changed, mut new) = (Vec::new(), Vec::new());
        {
            let entries = self.entries.read().unwrap();
            for (name, rev) in revs {
                seen.insert(name.clone());
                match entries.get(&name) {
                    Some(e) if e.cred().rev >= rev => {}
                    Some(_) => changed.push(name),
                    None => new.push(name),
                }
            }
            changed.extend(entries.keys().filter(|n| !seen.contains(*n)).cloned());
        }
        self.take_changes(changed, new).await
    }

    /// Other processes changed these rows (a store that names them,
    /// PostgreSQL): queue a reload of each, and read those first seen.
    /// Rows of other names are not read at all.
    pub async fn rows_changed(&self, names: Vec<String>) -> Result<(), StoreError> {
        let (changed, new) = {
            let entries = self.entries.read().unwrap();
            names.into_iter().partition(|n| entries.contains_key(n))
        };
        self.take_changes(changed, new).await
    }

    /// Queues a reload of the `changed` rows (gone ones are forgotten by
    /// it) and adds the `new` ones, each read whole before it gets an
    /// entry: no entry ever stands for a row not read yet.
    async fn take_changes(
        &self,
        mut changed: Vec<String>,
        new: Vec<String>,
    ) -> Result<(), StoreError> {
        // A bulk import brings thousands at once: one read of every row
        // then beats a query each.
        let bulk = new.len() > BULK_READ;
        let mut rows: HashMap<String, Credential> = if bulk {
            let wanted: HashSet<&String> = new.iter().collect();
            self.store
                .load_all()
                .await?
                .into_iter()
                .filter(|c| wanted.contains(&c.name))
                .map(|c| (c.name.clone(), c))
                .collect()
        } else {
            HashMap::new()
        };
        let mut count = 0;
        for name in new {
            let row = if bulk {
                rows.remove(&name)
            } else {
                self.store.get(&name).await?
            };
            let Some(cred) = row else { continue };
            let added = {
                let mut entries = self.entries.write().unwrap();
                let added = !entries.contains_key(&name);
                if added {
                    entries.insert(
                        name.clone(),
                        Arc::new(Entry::new(cred, self.alerts.clone())),
                    );
                }
                added
            };
            if added {
                count += 1;
                if !bulk {
                    tracing::info!(credential = %name, "credential added to the store");
                }
                self.states.send_replace(());
                self.enqueue(&name, |p| p.republish = true);
            } else {
                changed.push(name);
            }
        }
        if bulk {
            tracing::info!(credentials = count, "credentials added to the store");
        }
        for n in changed {
            self.enqueue(&n, |p| p.reload = true);
        }
        Ok(())
    }

    /// Puts a new configuration in force: sinks, providers, limits.
    pub async fn reload(&self, config: Arc<Config>) {
        self.alerts.reload(config.clone());
        let new = Arc::new(Ctx::new(config));
        // Publishes hold this for reading: once we have it, every publish
        // that used the old sinks is done, and every later one uses the new.
        let _swap = self.publishing.write().await;
        let old = std::mem::replace(&mut *self.ctx.write().unwrap(), new.clone());
        let names: Vec<String> = self.entries.read().unwrap().keys().cloned().collect();
        // Files that no sink of the new config writes any more are removed.
        let retire = names.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for n in &retire {
                let keep: HashSet<_> = new.publisher.paths_for(n).into_iter().collect();
                for p in old.publisher.paths_for(n) {
                    if !keep.contains(&p) {
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
        })
        .await;
        drop(_swap);
        for n in names {
            self.enqueue(&n, |p| {
                p.republish = true;
                p.retry_now = true;
            });
        }
    }
}

impl Ctx {
    fn new(config: Arc<Config>) -> Ctx {
        Ctx {
            publisher: Arc::new(Publisher::new(&config.sinks)),
            slots: Arc::new(Semaphore::new(config.refresh.max_concurrency)),
            ahead: Arc::new(Semaphore::new(config.refresh.max_concurrency)),
            config,
        }
    }
}
