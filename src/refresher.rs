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
//! and wait for its outcome, and may stop waiting (a client that hangs up,
//! a wait that times out) without touching the refresh. Once a request may
//! have reached the provider, only its committed answer (or its failure)
//! ends it; on shutdown no new request starts and those in flight finish
//! (see `docs/design.md`).
//!
//! Every path that could send a provider request asks one policy first,
//! [`gate`]: nothing for `misconfigured` or `needs_reauthorization`, nothing
//! before a `retrying` credential's next attempt or the provider's
//! Retry-After.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::clock::{now_ms, rfc3339};
use crate::config::{Config, ProviderConfig, RefreshConfig};
use crate::metrics::{CredentialGauge, Endpoint, Metrics, RefreshOutcome, ValidationOutcome};
use crate::provider::{self, Failure};
use crate::publish::Publisher;
use crate::secret::Secret;
use crate::store::{
    Commit, Credential, FailureUpdate, Lease, State, Store, StoreError, TokenUpdate,
};

/// The longest the scheduler sleeps without looking at the clock again.
/// tokio's timers run on the monotonic clock, which stands still while the
/// machine is suspended, and the wall clock can be stepped; deadlines are
/// wall-clock instants (token expiry). Waking every five minutes at most
/// bounds how late a refresh can be after a resume or a clock jump, at a cost
/// of 12 wake-ups an hour.
const MAX_SLEEP: Duration = Duration::from_secs(300);
/// How long a store failure holds a credential back before it is tried again.
const STORE_RETRY: Duration = Duration::from_secs(5);
/// The longest wait between attempts at committing a token pair the
/// provider already issued. There is no last attempt: giving the pair up
/// would lose the grant, so only the process's end stops the retries.
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(30);
/// How long a lease outlives its request's timeout: the commit of the
/// answer (one store write, which a busy database holds up for its 5 s
/// busy timeout) must fit in it. A commit that is retried renews it.
const LEASE_MARGIN: Duration = Duration::from_secs(10);
/// How long shutdown waits, beyond `request_timeout`, for refreshes in
/// flight to commit. The systemd unit's TimeoutStopSec leaves room for both.
pub const SHUTDOWN_COMMIT_GRACE: Duration = Duration::from_secs(30);
/// When a credential of a provider succeeds after failures, the provider is
/// back: its other `retrying` credentials are tried again within this long,
/// spread at random, instead of sleeping out backoffs of up to `retry_max`.
const RECOVERY_SPREAD: Duration = Duration::from_secs(5);
/// At most one such nudge per provider this often, so that a provider that
/// flaps costs each credential one extra request per interval at most.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(30);
/// While a provider looks down (two or more of its credentials failed with
/// a 5xx or no answer since its last success), one request probes it this
/// often (or every `retry_max`, if shorter) and the others wait: an outage
/// costs a provider about two requests a minute, however many credentials
/// it has, and its return is seen within this long.
const PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// The first wait before files that could not be written are tried again
/// (a full or read-only file system); it doubles, with jitter, up to
/// MAX_SLEEP, so that a disk that stays full costs a log line every few
/// minutes per credential, not every few seconds.
const PUBLISH_RETRY: Duration = Duration::from_secs(5);

/// What the config decides, swapped as a whole on reload.
struct Ctx {
    config: Arc<Config>,
    publisher: Arc<Publisher>,
    /// Provider requests in flight, all credentials.
    slots: Arc<Semaphore>,
}

/// Work flagged for a credential, done by the next worker that takes it.
#[derive(Default)]
struct Pending {
    /// On the queue already: don't queue it twice.
    queued: bool,
    /// Re-read the row: another process changed it.
    reload: bool,
    /// The validation sweep asks for a GET.
    validate: bool,
    /// Write the files again (start-up, config reload).
    republish: bool,
    /// Try a `misconfigured` credential again (a config reload may have fixed it).
    retry_now: bool,
}

struct Entry {
    /// Held for all work on this credential: single-flight in this process.
    lock: tokio::sync::Mutex<()>,
    state: Mutex<EntryState>,
}

struct EntryState {
    cred: Arc<Credential>,
    pending: Pending,
    /// In [0, 1): how far ahead of the lead time this credential refreshes,
    /// drawn per token version so that tokens issued together spread out.
    jitter: f64,
    /// Not before this instant (ms): set after a store failure or a busy lease.
    hold_until: i64,
    /// Refresh attempts so far: a caller that waited for the lock while one
    /// ran sees it move, and takes that attempt's outcome (single-flight).
    attempts: u64,
    /// When a consumer last reported this token refused (ms).
    last_rejected: i64,
    /// A refresh holds the lease and its request may be out: the status
    /// says `refreshing` (the row says so too, but the entry keeps the row
    /// as it was before the lease).
    refreshing: bool,
    /// An on-demand refresh task's outcome, while it runs: later callers
    /// wait on it too instead of starting another (single-flight).
    running: Option<watch::Receiver<bool>>,
    /// Why the files last failed to match the store (full disk, read-only
    /// directory), until a publish succeeds: shown in the status, since
    /// consumers then read an older token than the one stored.
    publish_error: Option<String>,
    /// The token version a refresh brought because its predecessor got
    /// PandaDoc's 403: a 403 for this one is not the token's fault, and
    /// refreshing again would not help (a plan or permission problem).
    refreshed_for_403: Option<i64>,
    /// Consecutive publish failures: the exponent of the retry delay.
    publish_failures: u32,
    /// When to write the files again after a failure (ms); None while they
    /// are in step with the store.
    republish_at: Option<i64>,
}

impl Entry {
    fn new(cred: Credential) -> Entry {
        Entry {
            lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(EntryState {
                cred: Arc::new(cred),
                pending: Pending::default(),
                jitter: fastrand::f64(),
                hold_until: 0,
                attempts: 0,
                last_rejected: 0,
                refreshing: false,
                running: None,
                refreshed_for_403: None,
                publish_error: None,
                publish_failures: 0,
                republish_at: None,
            }),
        }
    }

    /// The status shown to the socket and the CLI: the row, and what only
    /// this process knows (whether its files could be written).
    fn status(&self, now: i64) -> Status {
        // Copied under the lock, built after it: nothing that computes or
        // formats runs while the lock is held, so however that goes, it
        // cannot poison the entry for the scheduler and the workers.
        let (cred, refreshing, publish_error) = {
            let st = self.state.lock().unwrap();
            (st.cred.clone(), st.refreshing, st.publish_error.clone())
        };
        // An expiry anyone may have written into the row (an older import
        // took milliseconds for seconds): within what an instant can show,
        // so that `Status::of`'s `expires_at - now` cannot overflow.
        let bounded = crate::clock::bounded(cred.expires_at);
        let cred = if bounded == cred.expires_at {
            cred
        } else {
            Arc::new(Credential {
                expires_at: bounded,
                ..(*cred).clone()
            })
        };
        let mut status = Status::of(&cred, now);
        if refreshing {
            status.state = State::Refreshing.as_str().to_owned();
        }
        status.last_publish_error = publish_error;
        status
    }

    fn cred(&self) -> Arc<Credential> {
        self.state.lock().unwrap().cred.clone()
    }

    /// Adopts a newer row (by `rev`); returns whether the token changed.
    fn adopt(&self, cred: Credential) -> bool {
        let mut st = self.state.lock().unwrap();
        if cred.rev < st.cred.rev && cred.version <= st.cred.version {
            return false;
        }
        let token_changed = cred.version != st.cred.version;
        if token_changed {
            st.jitter = fastrand::f64();
            // Whatever held us back (a peer's lease) has produced a new token.
            st.hold_until = 0;
        }
        st.cred = Arc::new(cred);
        token_changed
    }

    fn hold(&self, until: i64) {
        self.state.lock().unwrap().hold_until = until;
    }
}

/// Why an attempt did not bring a good token, as it is recorded.
struct Setback {
    state: State,
    error: String,
    /// The provider's Retry-After: a floor for the next attempt, on every path.
    retry_after: Option<Duration>,
    /// Keep the "refresh started" mark: the provider may have rotated.
    outcome_unknown: bool,
    /// The provider itself looks down (a 5xx, no answer): see [`Outage`].
    provider_down: bool,
    /// The fencing value of the lease a refresh ran under; None for a
    /// validation, which holds no lease.
    lease: Option<i64>,
    /// The event recorded in the store.
    event: &'static str,
}

/// Messages to the scheduler task.
enum Sched {
    /// The credential's next deadline (ms), or None to forget it.
    At(String, Option<i64>),
    /// Look at the credential by this instant (ms) at the latest: its
    /// deadline becomes the earlier of the two.
    By(String, i64),
    /// Answer at once: the watchdog's proof that the scheduler is alive.
    Ping(oneshot::Sender<()>),
}

/// Test-only: with `TOKEND_TEST_STALL_SCHEDULER=SECONDS` in its environment,
/// the scheduler task wedges itself (awaits forever, answering nothing) that
/// many seconds after it starts, so that a test can watch the systemd
/// watchdog pings stop. Unset, as it always is outside tests, it does nothing.
const TEST_STALL_SCHEDULER: &str = "TOKEND_TEST_STALL_SCHEDULER";

/// What one worker pass decided to do.
#[derive(Debug, PartialEq, Eq)]
enum Do {
    Nothing,
    Validate,
    Refresh,
}

/// The running refresher. Cheap to share (`Arc`).
pub struct Refresher {
    store: Store,
    client: provider::Client,
    /// Our id in the store's leases.
    holder: String,
    ctx: RwLock<Arc<Ctx>>,
    entries: RwLock<HashMap<String, Arc<Entry>>>,
    queue: mpsc::UnboundedSender<String>,
    sched: mpsc::UnboundedSender<Sched>,
    /// What `GET /metrics` reports.
    metrics: Metrics,
    /// Bumped when a credential's state changes (or one comes or goes), so
    /// that the systemd status line is recomputed only then.
    states: watch::Sender<()>,
    /// Set on shutdown: no new provider request starts.
    stopping: AtomicBool,
    /// On-demand refresh tasks running: shutdown waits for them.
    inflight: InFlight,
    /// When each provider's `retrying` credentials were last brought
    /// forward after one of its credentials recovered (ms).
    recovered_at: Mutex<HashMap<String, i64>>,
    /// Per provider that looks down: see [`Outage`].
    outages: Mutex<HashMap<String, Outage>>,
    /// Held for reading while files are written or removed, for writing
    /// while a reload swaps the sinks and retires the old paths: no file
    /// is written to a path a reload has retired.
    publishing: tokio::sync::RwLock<()>,
}

/// A provider that may be down: which of its credentials failed with a 5xx
/// or no answer since its last success, and when it may next be probed.
#[derive(Default)]
struct Outage {
    failing: HashSet<String>,
    next_probe: i64,
}

impl Outage {
    /// Two credentials failing alike is the provider, not a credential.
    fn down(&self) -> bool {
        self.failing.len() >= 2
    }
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

/// What the socket API and `tokend status` show of a credential: never a secret.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub name: String,
    pub provider: String,
    pub state: String,
    /// Whether an unexpired access token is published.
    pub has_token: bool,
    /// RFC 3339, or null when unknown.
    pub expires_at: Option<String>,
    pub expires_in_seconds: Option<i64>,
    pub last_refresh_at: Option<String>,
    pub last_validated_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub failures: u32,
    pub last_error: Option<String>,
    /// Why the token files could not be written (full disk, read-only or
    /// vanished directory), while they lag behind the store; null once a
    /// write succeeds. Known to the daemon only (the store does not hold it).
    #[serde(default)]
    pub last_publish_error: Option<String>,
}

impl Status {
    pub fn of(c: &Credential, now: i64) -> Status {
        Status {
            name: c.name.clone(),
            provider: c.provider.clone(),
            state: c.state.as_str().to_owned(),
            has_token: publishable(c, now),
            expires_at: c.expires_at.map(rfc3339),
            expires_in_seconds: c.expires_at.map(|e| (e - now) / 1000),
            last_refresh_at: c.last_refresh_at.map(rfc3339),
            last_validated_at: c.last_validated_at.map(rfc3339),
            next_attempt_at: c.next_attempt_at.map(rfc3339),
            failures: c.failures,
            last_error: c.last_error.clone(),
            last_publish_error: None,
        }
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

/// Whether a provider request for a credential may be sent now: the one
/// policy every path asks (the schedule, socket reads, forced refreshes, the
/// CLI without a daemon).
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    Go,
    /// Not before this instant (ms): the backoff of a `retrying` credential,
    /// the provider's Retry-After, or a hold (a peer's lease, a store failure).
    NotBefore(i64),
    /// `misconfigured` (until a reload) or `needs_reauthorization` (until
    /// someone authorizes again): nothing is sent.
    Stopped,
}

/// The policy behind [`Gate`]. `hold` is the entry's own hold (ms).
pub fn gate(c: &Credential, now: i64, hold: i64) -> Gate {
    if matches!(c.state, State::NeedsReauthorization | State::Misconfigured) {
        return Gate::Stopped;
    }
    let mut not_before = hold.max(c.not_before.unwrap_or(0));
    if c.state == State::Retrying {
        not_before = not_before.max(c.next_attempt_at.unwrap_or(0));
    }
    if not_before > now {
        Gate::NotBefore(not_before)
    } else {
        Gate::Go
    }
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
        let creds = store.load_all().await?;
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let (sched_tx, sched_rx) = mpsc::unbounded_channel();
        let ctx = Ctx::new(config.clone());
        let r = Arc::new(Refresher {
            store,
            client,
            holder: crate::lease::holder_id(),
            ctx: RwLock::new(Arc::new(ctx)),
            entries: RwLock::new(HashMap::new()),
            queue: queue_tx,
            sched: sched_tx,
            metrics: Metrics::default(),
            states: watch::Sender::new(()),
            stopping: AtomicBool::new(false),
            inflight: InFlight::default(),
            recovered_at: Mutex::new(HashMap::new()),
            outages: Mutex::new(HashMap::new()),
            publishing: tokio::sync::RwLock::new(()),
        });
        {
            let mut entries = r.entries.write().unwrap();
            for c in creds {
                entries.insert(c.name.clone(), Arc::new(Entry::new(c)));
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
            let (mut p, mut u, mut failed) = (0, 0, Vec::new());
            for e in &all {
                let c = e.cred();
                let errors = if publishable(&c, now) {
                    p += 1;
                    ctx.publisher.publish(&c.name, token(&c), c.expires_at)
                } else {
                    u += 1;
                    ctx.publisher.unpublish(&c.name)
                };
                if !errors.is_empty() {
                    failed.push((c.name.clone(), errors));
                }
            }
            (p, u, failed)
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
            entries: RwLock::new(HashMap::from([(
                name.to_owned(),
                Arc::new(Entry::new(cred)),
            )])),
            queue,
            sched,
            metrics: Metrics::default(),
            states: watch::Sender::new(()),
            stopping: AtomicBool::new(false),
            inflight: InFlight::default(),
            recovered_at: Mutex::new(HashMap::new()),
            outages: Mutex::new(HashMap::new()),
            publishing: tokio::sync::RwLock::new(()),
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

    /// The metrics exposition, with the gauges of the credentials `visible`
    /// lets the caller see (names are not shown to those without a grant).
    pub fn render_metrics(&self, visible: impl Fn(&str) -> bool) -> String {
        let now = now_ms();
        let creds: Vec<Arc<Credential>> = self
            .entries
            .read()
            .unwrap()
            .values()
            .map(|e| e.cred())
            .filter(|c| !c.provider.is_empty() && visible(&c.name))
            .collect();
        let gauges: Vec<CredentialGauge<'_>> = creds
            .iter()
            .map(|c| CredentialGauge {
                name: &c.name,
                state: c.state.as_str(),
                expires_in: c
                    .expires_at
                    .filter(|_| c.access_token.is_some())
                    .map(|e| (e - now) as f64 / 1000.0),
            })
            .collect();
        self.metrics.render(&gauges)
    }

    pub fn status(&self, name: &str) -> Option<Status> {
        self.entry(name).map(|e| e.status(now_ms()))
    }

    /// Every credential's status, by name.
    pub fn statuses(&self) -> Vec<Status> {
        let now = now_ms();
        let mut v: Vec<Status> = self
            .entries
            .read()
            .unwrap()
            .values()
            .map(|e| e.status(now))
            .filter(|s| !s.provider.is_empty())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A token with at least `min_remaining` left. One with less (or none)
    /// is refreshed first, joining a refresh already in flight, waiting at
    /// most `wait`, if the backoff allows a request now. When no fresh token
    /// can be had (the provider fails, the backoff or Retry-After says not
    /// yet, the credential is misconfigured), the current token is handed
    /// out while it has not expired, as the files keep it published.
    /// Returns the token and its expiry.
    pub async fn fresh_token(
        self: &Arc<Self>,
        name: &str,
        wait: Duration,
    ) -> Result<(Secret, Option<i64>), TokenError> {
        let entry = self.entry(name).ok_or(TokenError::Unknown)?;
        let min = self.ctx().config.refresh.min_remaining.as_millis() as i64;
        let fresh = |c: &Credential| {
            let now = now_ms();
            match (&c.access_token, c.state) {
                (_, State::NeedsReauthorization) => None,
                (Some(t), _) if c.expires_at.is_none_or(|e| e - now >= min) => {
                    Some((t.clone(), c.expires_at))
                }
                _ => None,
            }
        };
        let c = entry.cred();
        if c.provider.is_empty() {
            return Err(TokenError::Unknown);
        }
        if let Some(t) = fresh(&c) {
            return Ok(t);
        }
        if let Some(mut done) = self.start_refresh(name, &entry) {
            let _ = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
        }
        let c = entry.cred();
        if let Some(t) = fresh(&c) {
            return Ok(t);
        }
        if c.state == State::NeedsReauthorization {
            return Err(TokenError::NeedsReauthorization(c.last_error.clone()));
        }
        match &c.access_token {
            Some(t) if publishable(&c, now_ms()) => Ok((t.clone(), c.expires_at)),
            _ => Err(TokenError::NoValidToken {
                why: c.last_error.clone(),
                next_attempt: c.next_attempt_at.filter(|_| c.state == State::Retrying),
            }),
        }
    }

    /// Refreshes now, or joins the refresh in flight, if the backoff allows
    /// a request now ([`gate`]); otherwise sends nothing. Returns the status
    /// after it and whether the token changed; None for an unknown name. The
    /// refresh runs as a task of its own: dropping this future stops the
    /// waiting, never the refresh.
    pub async fn refresh_now(self: &Arc<Self>, name: &str) -> Option<(Status, bool)> {
        let entry = self.entry(name)?;
        let before = {
            let c = entry.cred();
            if c.provider.is_empty() {
                return None;
            }
            c.version
        };
        if let Some(mut done) = self.start_refresh(name, &entry) {
            let _ = done.wait_for(|d| *d).await;
        }
        // A pair stored without a usable access token (not Bearer) is no
        // refresh to report: the credential is misconfigured.
        let c = entry.cred();
        let changed = c.version != before && c.state != State::Misconfigured;
        Some((entry.status(now_ms()), changed))
    }

    /// Starts an on-demand refresh as a task owned by the refresher, or
    /// joins the one running; returns what to wait on for its end. None when
    /// nothing may be sent now (the credential's [`gate`], or its provider
    /// looks down and is not due for a probe) or tokend is stopping.
    fn start_refresh(
        self: &Arc<Self>,
        name: &str,
        entry: &Arc<Entry>,
    ) -> Option<watch::Receiver<bool>> {
        let st = entry.state.lock().unwrap();
        if let Some(done) = &st.running {
            return Some(done.clone());
        }
        if self.stopping.load(Ordering::SeqCst) {
            return None;
        }
        // A refresh in flight (the scheduler's) is joined whatever the gate
        // says now; otherwise the gates decide.
        let (refreshing, cred) = (st.refreshing, st.cred.clone());
        drop(st);
        if !refreshing && !self.may_send(entry, &cred, now_ms(), false) {
            return None;
        }
        let mut st = entry.state.lock().unwrap();
        if let Some(done) = &st.running {
            return Some(done.clone());
        }
        let attempts = st.attempts;
        let (tx, rx) = watch::channel(false);
        st.running = Some(rx.clone());
        drop(st);
        let (r, entry, name) = (self.clone(), entry.clone(), name.to_owned());
        let guard = self.inflight.enter();
        tokio::spawn(async move {
            let _guard = guard;
            r.run_refresh(&name, &entry, attempts).await;
            entry.state.lock().unwrap().running = None;
            let _ = tx.send(true);
        });
        Some(rx)
    }

    /// The body of an on-demand refresh task: under the credential's lock,
    /// unless a refresh ended since it was asked for (then that one is the
    /// answer), and only if the gate still says go.
    async fn run_refresh(&self, name: &str, entry: &Entry, attempts: u64) {
        let state_before = {
            let _guard = entry.lock.lock().await;
            let state_before = entry.cred().state;
            let joined = entry.state.lock().unwrap().attempts != attempts;
            let cred = entry.cred();
            if !joined && self.may_send(entry, &cred, now_ms(), true) {
                let ctx = self.ctx();
                match ctx.config.providers.get(&cred.provider) {
                    Some(p) => self.refresh(&ctx, entry, &cred, p).await,
                    None => self.provider_missing(&ctx, entry, &cred).await,
                }
            }
            state_before
        };
        if entry.cred().state != state_before {
            self.states.send_replace(());
        }
        self.reschedule(name);
    }

    /// Whether a request to `provider` may go now. While it looks down (see
    /// [`Outage`]), one request per probe interval: with `claim`, the
    /// caller that gets Go is that probe and the next one is due an
    /// interval later; the others are told when to ask again.
    fn provider_gate(&self, provider: &str, now: i64, claim: bool) -> Gate {
        let mut outages = self.outages.lock().unwrap();
        let Some(o) = outages.get_mut(provider).filter(|o| o.down()) else {
            return Gate::Go;
        };
        if now < o.next_probe {
            return Gate::NotBefore(o.next_probe);
        }
        if claim {
            let every = PROBE_INTERVAL.min(self.ctx().config.refresh.retry_max);
            o.next_probe = now + every.as_millis() as i64;
            tracing::debug!(provider, "probing a provider that looks down");
        }
        Gate::Go
    }

    /// Both gates, for a request about to be decided on: the credential's
    /// own backoff ([`gate`]), then its provider's outage. A credential held
    /// back by the outage is held until the next probe.
    fn may_send(&self, entry: &Entry, cred: &Credential, now: i64, claim: bool) -> bool {
        let hold = entry.state.lock().unwrap().hold_until;
        if gate(cred, now, hold) != Gate::Go {
            return false;
        }
        match self.provider_gate(&cred.provider, now, claim) {
            Gate::Go => true,
            Gate::NotBefore(t) => {
                entry.hold(t);
                false
            }
            Gate::Stopped => false,
        }
    }

    /// Stops starting provider requests: those in flight finish and commit
    /// ([`Tasks::join`] waits for them). For shutdown.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// A consumer says the provider refused this token: re-validate, at most
    /// once per `rejected_cooldown`. Returns false for an unknown name.
    pub fn rejected(&self, name: &str) -> bool {
        let Some(entry) = self.entry(name) else {
            return false;
        };
        let cooldown = self.ctx().config.refresh.rejected_cooldown.as_millis() as i64;
        let now = now_ms();
        let due = {
            let mut st = entry.state.lock().unwrap();
            if st.cred.provider.is_empty() {
                return false;
            }
            let due = now - st.last_rejected >= cooldown;
            if due {
                st.last_rejected = now;
            }
            due
        };
        if due {
            tracing::info!(
                credential = name,
                "a consumer reports the token was refused; re-validating"
            );
            self.enqueue(name, |p| p.validate = true);
        }
        true
    }

    /// Counts of credentials per state, for the status line and logs.
    /// Placeholders for rows not read yet (rev 0) are not credentials yet.
    pub fn summary(&self) -> HashMap<State, usize> {
        let mut m = HashMap::new();
        for e in self.entries.read().unwrap().values() {
            let c = e.cred();
            if c.rev > 0 {
                *m.entry(c.state).or_default() += 1;
            }
        }
        m
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
        let mut changed = Vec::new();
        {
            let mut entries = self.entries.write().unwrap();
            for (name, rev) in revs {
                seen.insert(name.clone());
                match entries.get(&name) {
                    Some(e) if e.cred().rev >= rev => {}
                    Some(_) => changed.push(name),
                    None => {
                        // A placeholder until the worker reads the row.
                        let placeholder = Credential::placeholder(&name);
                        entries.insert(name.clone(), Arc::new(Entry::new(placeholder)));
                        changed.push(name);
                    }
                }
            }
            for name in entries.keys() {
                if !seen.contains(name) {
                    changed.push(name.clone());
                }
            }
        }
        for n in changed {
            self.enqueue(&n, |p| p.reload = true);
        }
        Ok(())
    }

    /// Puts a new configuration in force: sinks, providers, limits.
    pub async fn reload(&self, config: Arc<Config>) {
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

    // ---- the scheduler ----

    async fn scheduler(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Sched>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut heap: BinaryHeap<Reverse<(i64, u64, String)>> = BinaryHeap::new();
        // Per credential: the heap entry in force (its sequence number) and its instant.
        let mut current: HashMap<String, (u64, i64)> = HashMap::new();
        let mut seq = 0u64;
        let stall = test_stall();
        tokio::pin!(stall);
        loop {
            let now = now_ms();
            // Pop everything due; stale heap entries (superseded) are skipped.
            while let Some(Reverse((at, s, _))) = heap.peek() {
                if *at > now {
                    break;
                }
                let s = *s;
                let Reverse((_, _, name)) = heap.pop().unwrap();
                if current.get(&name).is_some_and(|c| c.0 == s) {
                    current.remove(&name);
                    self.enqueue(&name, |_| {});
                }
            }
            // Rebuild when stale entries dominate, so the heap stays O(credentials).
            if heap.len() > 2 * current.len() + 1024 {
                heap.retain(|Reverse((_, s, n))| current.get(n).is_some_and(|c| c.0 == *s));
            }
            let sleep = heap
                .peek()
                .map(|Reverse((at, _, _))| Duration::from_millis((*at - now).max(0) as u64))
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                msg = rx.recv() => match msg {
                    None => return,
                    Some(Sched::At(name, at)) => {
                        seq += 1;
                        match at {
                            Some(at) => {
                                current.insert(name.clone(), (seq, at));
                                heap.push(Reverse((at, seq, name)));
                            }
                            None => {
                                current.remove(&name);
                            }
                        }
                    }
                    Some(Sched::By(name, at)) => {
                        if current.get(&name).is_none_or(|c| c.1 > at) {
                            seq += 1;
                            current.insert(name.clone(), (seq, at));
                            heap.push(Reverse((at, seq, name)));
                        }
                    }
                    Some(Sched::Ping(reply)) => {
                        let _ = reply.send(());
                    }
                },
                _ = tokio::time::sleep(sleep) => {}
                _ = &mut stall => {
                    tracing::warn!("{TEST_STALL_SCHEDULER}: the scheduler stalls now (test hook)");
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Tells the scheduler when this credential next needs attention.
    fn reschedule(&self, name: &str) {
        let Some(e) = self.entry(name) else {
            let _ = self.sched.send(Sched::At(name.to_owned(), None));
            return;
        };
        let refresh = self.ctx().config.refresh.clone();
        let (cred, jitter, hold, republish) = {
            let st = e.state.lock().unwrap();
            (st.cred.clone(), st.jitter, st.hold_until, st.republish_at)
        };
        let at = next_deadline(&cred, now_ms(), &refresh, jitter).map(|t| t.max(hold));
        // Files that could not be written are tried again on their own clock.
        let at = match (at, republish) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        };
        let _ = self.sched.send(Sched::At(name.to_owned(), at));
    }

    // ---- workers ----

    async fn worker(
        self: Arc<Self>,
        queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let name = tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                name = async { queue.lock().await.recv().await } => match name {
                    Some(n) => n,
                    None => return,
                },
            };
            // Not cancelled by shutdown: a refresh in flight completes and commits.
            self.process(&name).await;
        }
    }

    async fn process(&self, name: &str) {
        let Some(entry) = self.entry(name) else {
            return;
        };
        let _guard = entry.lock.lock().await;
        let (mut pending, state_before) = {
            let mut st = entry.state.lock().unwrap();
            (
                std::mem::take(&mut st.pending),
                (st.cred.rev > 0).then_some(st.cred.state),
            )
        };
        // Files that failed to be written are due for another try.
        if entry
            .state
            .lock()
            .unwrap()
            .republish_at
            .is_some_and(|t| t <= now_ms())
        {
            pending.republish = true;
        }
        let ctx = self.ctx();
        if pending.reload && !self.reload_row(name, &entry).await {
            // Removed from the store: one credential fewer to count.
            self.states.send_replace(());
            return;
        }
        let mut cred = entry.cred();
        // A reload may have fixed a misconfiguration; a `retrying`
        // credential keeps its backoff (the provider set it, not us).
        if pending.retry_now
            && cred.state == State::Misconfigured
            && ctx.config.providers.contains_key(&cred.provider)
            && let Ok(Commit::Done(c)) = self.store.reset_backoff(name).await
        {
            entry.adopt(*c);
            cred = entry.cred();
        }
        if pending.republish {
            self.publish(&cred).await;
        }
        let now = now_ms();
        // Copied out: no std lock is held across the policy's arithmetic.
        let (hold, jitter) = {
            let st = entry.state.lock().unwrap();
            (st.hold_until, st.jitter)
        };
        let action = if gate(&cred, now, hold) != Gate::Go {
            Do::Nothing
        } else {
            decide(&cred, now, &ctx.config.refresh, jitter, pending.validate)
        };
        // A provider that looks down gets one probe per interval.
        let action = if action != Do::Nothing && !self.may_send(&entry, &cred, now, true) {
            Do::Nothing
        } else {
            action
        };
        if cred.access_token.is_some() && !publishable(&cred, now) {
            // Expired (or dead) tokens are not left for consumers to trip on.
            self.unpublish(name).await;
        }
        if action != Do::Nothing {
            match ctx.config.providers.get(&cred.provider) {
                None => self.provider_missing(&ctx, &entry, &cred).await,
                Some(p) if action == Do::Validate => self.validate(&ctx, &entry, &cred, p).await,
                Some(p) => self.refresh(&ctx, &entry, &cred, p).await,
            }
        }
        let state_after = Some(entry.cred()).filter(|c| c.rev > 0).map(|c| c.state);
        if state_after != state_before {
            self.states.send_replace(());
        }
        self.reschedule(name);
    }

    /// Re-reads a row another process changed. Returns false if it is gone.
    async fn reload_row(&self, name: &str, entry: &Entry) -> bool {
        match self.store.get(name).await {
            Ok(Some(row)) => {
                let was_published = publishable(&entry.cred(), now_ms());
                if entry.adopt(row) || !was_published {
                    let c = entry.cred();
                    self.publish(&c).await;
                } else if !publishable(&entry.cred(), now_ms()) {
                    self.unpublish(name).await;
                }
                true
            }
            Ok(None) => {
                tracing::info!(credential = name, "credential removed from the store");
                self.entries.write().unwrap().remove(name);
                self.unpublish(name).await;
                let (publisher, n) = (self.ctx().publisher.clone(), name.to_owned());
                let _ = tokio::task::spawn_blocking(move || {
                    publisher.sweep_temp_files([n.as_str()]);
                })
                .await;
                let _ = self.sched.send(Sched::At(name.to_owned(), None));
                false
            }
            Err(e) => {
                tracing::warn!(credential = name, error = %e, "cannot read the credential");
                entry.hold(now_ms() + STORE_RETRY.as_millis() as i64);
                true
            }
        }
    }

    async fn validate(&self, ctx: &Ctx, entry: &Entry, cred: &Credential, p: &ProviderConfig) {
        let Some(token) = &cred.access_token else {
            return;
        };
        let result = {
            let _slot = ctx.slots.acquire().await;
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let started = Instant::now();
            let r = self
                .client
                .validate(p, token, ctx.config.refresh.request_timeout)
                .await;
            self.metrics
                .provider_latency(Endpoint::Validate, started.elapsed());
            r
        };
        let fresh_403 = entry.state.lock().unwrap().refreshed_for_403 == Some(cred.version);
        self.metrics.validation(match &result {
            Ok(()) => ValidationOutcome::Ok,
            Err(Failure::Forbidden) if fresh_403 => ValidationOutcome::Forbidden,
            Err(Failure::Unauthorized | Failure::Forbidden) => ValidationOutcome::Unauthorized,
            Err(_) => ValidationOutcome::Transient,
        });
        let result = match result {
            Err(Failure::Forbidden) if fresh_403 => {
                let error = "validation: 403 Forbidden from a token just refreshed for a 403: \
                    the account may not call the validation endpoint (a plan or permission \
                    problem); not refreshing again for it"
                    .to_owned();
                tracing::warn!(credential = %cred.name, error = %error, "validation refused");
                match self
                    .store
                    .record_note(&cred.name, cred.version, error)
                    .await
                {
                    Ok(Commit::Done(c)) => {
                        entry.adopt(*c);
                    }
                    Ok(_) => {}
                    Err(e) => self.store_failed(entry, &cred.name, &e),
                }
                return;
            }
            other => other,
        };
        match result {
            Ok(()) => {
                match self.store.record_validated(&cred.name, cred.version).await {
                    Ok(Commit::Done(c)) => {
                        entry.adopt(*c);
                    }
                    Ok(Commit::Conflict | Commit::LeaseLost) => {}
                    Err(e) => self.store_failed(entry, &cred.name, &e),
                }
                tracing::debug!(credential = %cred.name, "token validated");
                self.answered(&cred.provider, cred.failures > 0);
                // The validation sweep doubles as a check of the files: one
                // that was removed (a cleaned /run, a deleted directory) or
                // altered is written again; an intact one costs a read.
                let c = entry.cred();
                self.publish(&c).await;
            }
            Err(Failure::Unauthorized) => {
                tracing::info!(credential = %cred.name, "the provider rejected the access token; refreshing now");
                self.refresh(ctx, entry, cred, p).await;
            }
            Err(Failure::Forbidden) => {
                tracing::info!(credential = %cred.name, "the provider refused the access token (403); refreshing once");
                self.refresh(ctx, entry, cred, p).await;
                let now = entry.cred();
                if now.version != cred.version {
                    entry.state.lock().unwrap().refreshed_for_403 = Some(now.version);
                }
            }
            Err(f) => {
                let (retry_after, provider_down) = match &f {
                    Failure::Transient {
                        retry_after,
                        provider_down,
                        ..
                    } => (*retry_after, *provider_down),
                    _ => (None, false),
                };
                // A validation failure that is not a 401 says nothing about
                // the token: it stays published while we retry.
                let setback = Setback {
                    state: State::Retrying,
                    error: f.describe(),
                    retry_after,
                    outcome_unknown: false,
                    provider_down,
                    lease: None,
                    event: "validation_failed",
                };
                self.fail(ctx, entry, cred, setback).await;
            }
        }
    }

    async fn refresh(&self, ctx: &Ctx, entry: &Entry, seen: &Credential, p: &ProviderConfig) {
        self.refresh_attempt(ctx, entry, seen, p).await;
        // Counted when it is over: a caller that took its snapshot while
        // this one ran sees the count move once it gets the lock, and joins.
        let mut st = entry.state.lock().unwrap();
        st.attempts += 1;
        st.refreshing = false;
    }

    /// A credential whose provider is not in the configuration.
    async fn provider_missing(&self, ctx: &Ctx, entry: &Entry, cred: &Credential) {
        let setback = Setback {
            state: State::Misconfigured,
            error: format!(
                "provider {:?} is not in the configuration: add [providers.{}] and reload",
                cred.provider, cred.provider
            ),
            retry_after: None,
            outcome_unknown: false,
            provider_down: false,
            lease: None,
            event: "misconfigured",
        };
        self.fail(ctx, entry, cred, setback).await;
    }

    async fn refresh_attempt(
        &self,
        ctx: &Ctx,
        entry: &Entry,
        seen: &Credential,
        p: &ProviderConfig,
    ) {
        let name = &seen.name;
        // The provider slot first: the lease's lifetime covers the request
        // and its commit, not the wait for a slot.
        let slot = ctx.slots.acquire().await;
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let ttl = ctx.config.refresh.request_timeout + LEASE_MARGIN;
        let (cred, interrupted, fence) = match self
            .store
            .take_lease(name, &self.holder, ttl, seen.version)
            .await
        {
            Ok(Lease::Taken {
                credential,
                interrupted,
                fence,
            }) => {
                entry.state.lock().unwrap().refreshing = true;
                (*credential, interrupted, fence)
            }
            Ok(Lease::Changed(row)) => {
                drop(slot);
                // A peer refreshed since we looked: take its result.
                tracing::debug!(credential = %name, "already refreshed by another process");
                if entry.adopt(*row) {
                    let c = entry.cred();
                    self.publish(&c).await;
                }
                return;
            }
            Ok(Lease::Busy { until }) => {
                tracing::debug!(credential = %name, "another process is refreshing this credential");
                // Its commit will wake us through the store watch. Should it
                // die instead, look again soon: a dead holder on this host
                // is seen at once, one elsewhere when its lease expires.
                let soon = now_ms() + ctx.config.refresh.retry_initial.as_millis() as i64;
                entry.hold(until.min(soon));
                return;
            }
            Ok(Lease::Gone) => return,
            Err(e) => return self.store_failed(entry, name, &e),
        };
        if interrupted {
            tracing::warn!(
                credential = %name,
                "a previous refresh of this credential never finished (tokend stopped, or no answer came); trying the stored refresh token once"
            );
        }
        let result = {
            let _slot = slot;
            let started = Instant::now();
            let r = self
                .client
                .refresh(p, &cred.refresh_token, ctx.config.refresh.request_timeout)
                .await;
            self.metrics
                .provider_latency(Endpoint::Token, started.elapsed());
            r
        };
        self.metrics.refresh(match &result {
            Ok(t) if t.unsupported.is_none() => RefreshOutcome::Ok,
            Ok(_) => RefreshOutcome::Misconfigured,
            Err(Failure::Permanent { .. }) => RefreshOutcome::Permanent,
            Err(Failure::Misconfigured { .. }) => RefreshOutcome::Misconfigured,
            Err(_) => RefreshOutcome::Transient,
        });
        let setback = match result {
            Ok(tokens) => return self.commit(ctx, entry, &cred, fence, tokens).await,
            Err(Failure::Permanent { reason }) => {
                // A peer may have rotated the token under us: re-read first.
                if let Ok(Some(row)) = self.store.get(name).await
                    && row.refresh_token != cred.refresh_token
                {
                    tracing::info!(credential = %name, "refresh token was rotated by another process meanwhile");
                    let _ = self.store.release_lease(name, &self.holder).await;
                    if entry.adopt(row) {
                        let c = entry.cred();
                        self.publish(&c).await;
                    }
                    return;
                }
                let error = if interrupted {
                    format!(
                        "{reason}; a previous refresh was interrupted before its answer was stored, and the provider had already rotated the refresh token: re-authorize"
                    )
                } else {
                    format!("{reason}: re-authorize")
                };
                Setback {
                    state: State::NeedsReauthorization,
                    error,
                    retry_after: None,
                    outcome_unknown: false,
                    provider_down: false,
                    lease: Some(fence),
                    event: "needs_reauthorization",
                }
            }
            Err(Failure::Misconfigured { reason }) => Setback {
                state: State::Misconfigured,
                error: reason,
                retry_after: None,
                outcome_unknown: false,
                provider_down: false,
                lease: Some(fence),
                event: "misconfigured",
            },
            Err(f) => {
                let (retry_after, unknown, provider_down) = match &f {
                    Failure::Transient {
                        retry_after,
                        outcome_unknown,
                        provider_down,
                        ..
                    } => (*retry_after, *outcome_unknown, *provider_down),
                    _ => (None, false, false),
                };
                // Keep the "refresh started" mark while the outcome is unknown,
                // so a later invalid_grant can be explained.
                Setback {
                    state: State::Retrying,
                    error: f.describe(),
                    retry_after,
                    outcome_unknown: unknown || interrupted,
                    provider_down,
                    lease: Some(fence),
                    event: "refresh_failed",
                }
            }
        };
        self.fail(ctx, entry, &cred, setback).await;
    }

    /// Stores a new token pair, then publishes it. The provider may already
    /// have killed the old refresh token, so a store failure here (a locked
    /// or full database) is retried, renewing the lease, until it lands or
    /// the process stops; if it stops first, the "refresh started" mark
    /// tells the next start. A pair whose lease passed to another holder
    /// meanwhile is not stored: the new holder's view stands.
    async fn commit(
        &self,
        ctx: &Ctx,
        entry: &Entry,
        cred: &Credential,
        fence: i64,
        tokens: provider::Tokens,
    ) {
        let name = &cred.name;
        let now = now_ms();
        let update = || TokenUpdate {
            // A token that is not Bearer is of no use to consumers: the
            // stored one stays, beside the rotated refresh token.
            access_token: tokens
                .unsupported
                .is_none()
                .then(|| tokens.access_token.clone()),
            refresh_token: tokens.refresh_token.clone(),
            scope: tokens.scope.clone(),
            expires_at: tokens.expires_in.map(|d| now + d.as_millis() as i64),
        };
        let ttl = ctx.config.refresh.request_timeout + LEASE_MARGIN;
        let mut delay = Duration::from_millis(250);
        for attempt in 1u64.. {
            match self
                .store
                .commit_refresh(name, &self.holder, fence, cred.version, update())
                .await
            {
                Ok(Commit::Done(c)) => {
                    let expires = c.expires_at.map(|e| crate::clock::span(e - now));
                    entry.adopt(*c);
                    let c = entry.cred();
                    if let Some(reason) = tokens.unsupported {
                        let setback = Setback {
                            state: State::Misconfigured,
                            error: format!(
                                "{reason}; the rotated refresh token is stored, the old access token stays in use"
                            ),
                            retry_after: None,
                            outcome_unknown: false,
                            provider_down: false,
                            lease: None,
                            event: "misconfigured",
                        };
                        return self.fail(ctx, entry, &c, setback).await;
                    }
                    self.publish(&c).await;
                    tracing::info!(credential = %name, expires_in = expires.as_deref().unwrap_or("unknown"), "token refreshed");
                    self.answered(&cred.provider, cred.failures > 0);
                    return;
                }
                Ok(Commit::Conflict) => {
                    tracing::error!(
                        credential = %name,
                        "refreshed, but the credential was replaced or removed meanwhile; the new token pair was discarded"
                    );
                    self.enqueue(name, |p| p.reload = true);
                    return;
                }
                Ok(Commit::LeaseLost) => {
                    tracing::error!(
                        credential = %name,
                        "refreshed, but this process's lease had expired and passed to another holder; the new token pair was not stored (the other holder's result stands)"
                    );
                    self.enqueue(name, |p| p.reload = true);
                    return;
                }
                Err(StoreError::Closed) => break,
                Err(e) => {
                    tracing::error!(credential = %name, attempt, error = %e, "cannot store the refreshed token pair; retrying");
                    // Keep the lease while we retry, so that no peer takes
                    // over and spends the old refresh token meanwhile.
                    let _ = self.store.renew_lease(name, &self.holder, fence, ttl).await;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(COMMIT_RETRY_MAX);
                }
            }
        }
        tracing::error!(
            credential = %name,
            "tokend is stopping before the refreshed token pair could be stored; the next start will find the refresh unfinished"
        );
    }

    /// Records a failed attempt: the state, the backoff (never shorter than
    /// the provider's Retry-After) and the error.
    async fn fail(&self, ctx: &Ctx, entry: &Entry, cred: &Credential, s: Setback) {
        if s.provider_down {
            let mut outages = self.outages.lock().unwrap();
            let o = outages.entry(cred.provider.clone()).or_default();
            let was_down = o.down();
            o.failing.insert(cred.name.clone());
            if o.down() && !was_down {
                tracing::warn!(
                    provider = %cred.provider,
                    "the provider looks down; probing it with one request at a time until it answers"
                );
            }
        }
        let r = &ctx.config.refresh;
        let failures = cred.failures.saturating_add(1);
        let now = now_ms();
        let next = (s.state == State::Retrying).then(|| {
            let d = backoff(
                failures,
                r.retry_initial,
                r.retry_max,
                s.retry_after,
                fastrand::f64(),
            );
            now + d.as_millis() as i64
        });
        match s.state {
            State::Retrying => tracing::warn!(
                credential = %cred.name, failures, retry_in = %crate::clock::span(next.unwrap_or_default() - now), error = %s.error,
                "transient failure; will retry"
            ),
            _ => {
                tracing::error!(credential = %cred.name, state = s.state.as_str(), error = %s.error, "credential stopped")
            }
        }
        let update = FailureUpdate {
            state: s.state,
            failures,
            next_attempt_at: next,
            error: s.error,
            not_before: s.retry_after.map(|d| now + d.as_millis() as i64),
            lease: s.lease,
            outcome_unknown: s.outcome_unknown,
            event: s.event,
        };
        match self
            .store
            .record_failure(&cred.name, &self.holder, cred.version, update)
            .await
        {
            Ok(Commit::Done(c)) => {
                entry.adopt(*c);
            }
            Ok(Commit::Conflict) => self.enqueue(&cred.name, |p| p.reload = true),
            Ok(Commit::LeaseLost) => {
                tracing::error!(
                    credential = %cred.name,
                    "this process's lease had passed to another holder; its outcome was not stored"
                );
                self.enqueue(&cred.name, |p| p.reload = true);
                return;
            }
            Err(e) => return self.store_failed(entry, &cred.name, &e),
        }
        if s.state == State::NeedsReauthorization {
            self.unpublish(&cred.name).await;
        }
    }

    /// A request to `provider` succeeded: it is not down. If it looked down,
    /// or this credential had failed, the provider is back: see [`Refresher::recovered`].
    fn answered(&self, provider: &str, after_failures: bool) {
        let was_down = self
            .outages
            .lock()
            .unwrap()
            .remove(provider)
            .is_some_and(|o| o.down());
        if was_down {
            tracing::info!(provider, "the provider answers again");
        }
        if was_down || after_failures {
            self.recovered(provider);
        }
    }

    /// One credential of `provider` just succeeded after failures: the
    /// provider is back. Its other `retrying` credentials are tried again
    /// within RECOVERY_SPREAD (never before a Retry-After), at most once per
    /// RECOVERY_INTERVAL per provider.
    fn recovered(&self, provider: &str) {
        let now = now_ms();
        {
            let mut last = self.recovered_at.lock().unwrap();
            let prev = last.get(provider).copied().unwrap_or(i64::MIN);
            if now.saturating_sub(prev) < RECOVERY_INTERVAL.as_millis() as i64 {
                return;
            }
            last.insert(provider.to_owned(), now);
        }
        let spread = RECOVERY_SPREAD.as_millis() as i64;
        // Those the outage held back (their own next attempt is due): each
        // at a random instant within the spread.
        let held: Vec<Arc<Entry>> = self
            .entries
            .read()
            .unwrap()
            .values()
            .filter(|e| {
                let st = e.state.lock().unwrap();
                st.cred.provider == provider
                    && st.cred.state == State::Retrying
                    && st.hold_until > now
                    && st.cred.next_attempt_at.is_none_or(|t| t <= now + spread)
            })
            .cloned()
            .collect();
        for e in held {
            let at = now + (spread as f64 * fastrand::f64()) as i64;
            e.hold(at);
            let name = e.cred().name.clone();
            self.reschedule(&name);
        }
        let items: Vec<(String, i64, i64)> = self
            .entries
            .read()
            .unwrap()
            .values()
            .map(|e| e.cred())
            .filter(|c| {
                c.provider == provider
                    && c.state == State::Retrying
                    && c.next_attempt_at.is_some_and(|t| t > now + spread)
            })
            .map(|c| {
                let at = now + (spread as f64 * fastrand::f64()) as i64;
                (c.name.clone(), c.version, at)
            })
            .collect();
        if items.is_empty() {
            return;
        }
        tracing::info!(
            provider,
            credentials = items.len(),
            "the provider answers again; trying its retrying credentials again soon"
        );
        let (store, sched) = (self.store.clone(), self.sched.clone());
        let entries: HashMap<String, Arc<Entry>> = items
            .iter()
            .filter_map(|(n, _, _)| Some((n.clone(), self.entry(n)?)))
            .collect();
        let refresh = self.ctx().config.refresh.clone();
        tokio::spawn(async move {
            let Ok(rows) = store.bring_forward(items).await else {
                return;
            };
            for row in rows {
                let Some(e) = entries.get(&row.name) else {
                    continue;
                };
                e.adopt(row);
                let (c, jitter, hold) = {
                    let st = e.state.lock().unwrap();
                    (st.cred.clone(), st.jitter, st.hold_until)
                };
                let at = next_deadline(&c, now_ms(), &refresh, jitter).map(|t| t.max(hold));
                let _ = sched.send(Sched::At(c.name.clone(), at));
            }
        });
    }

    fn store_failed(&self, entry: &Entry, name: &str, e: &StoreError) {
        tracing::error!(credential = name, error = %e, "store operation failed; will try again");
        entry.hold(now_ms() + STORE_RETRY.as_millis() as i64);
    }

    /// Writes the credential's files with the sinks of the config in force
    /// now, not of the one a worker started with: a reload may have retired
    /// a path since (see [`Refresher::reload`]).
    async fn publish(&self, cred: &Credential) {
        if !publishable(cred, now_ms()) {
            return self.unpublish(&cred.name).await;
        }
        let _in_force = self.publishing.read().await;
        let publisher = self.ctx().publisher.clone();
        let (name, tok, exp) = (cred.name.clone(), token(cred).clone(), cred.expires_at);
        let errors = tokio::task::spawn_blocking(move || publisher.publish(&name, &tok, exp))
            .await
            .unwrap_or_default();
        self.published(&cred.name, errors);
    }

    async fn unpublish(&self, name: &str) {
        let _in_force = self.publishing.read().await;
        let publisher = self.ctx().publisher.clone();
        let n = name.to_owned();
        let errors = tokio::task::spawn_blocking(move || publisher.unpublish(&n))
            .await
            .unwrap_or_default();
        self.published(name, errors);
    }

    /// Takes in how writing (or removing) a credential's files went. On
    /// failure the old files stay as they were (writes are atomic): the
    /// error is logged, shown in the status and counted, and the files are
    /// tried again later, since nothing else would write them before the
    /// next refresh, which may be a year away.
    fn published(&self, name: &str, errors: Vec<String>) {
        for e in &errors {
            tracing::error!(credential = name, error = %e, "cannot publish");
        }
        self.metrics.publish_errors(errors.len());
        let Some(entry) = self.entry(name) else {
            return;
        };
        let mut st = entry.state.lock().unwrap();
        if errors.is_empty() {
            if st.publish_error.take().is_some() {
                tracing::info!(credential = name, "token files written again");
            }
            st.publish_failures = 0;
            st.republish_at = None;
            return;
        }
        st.publish_failures = st.publish_failures.saturating_add(1);
        let delay = backoff(
            st.publish_failures,
            PUBLISH_RETRY,
            MAX_SLEEP,
            None,
            fastrand::f64(),
        );
        st.republish_at = Some(now_ms() + delay.as_millis() as i64);
        st.publish_error = Some(errors.join("; "));
    }
}

impl Ctx {
    fn new(config: Arc<Config>) -> Ctx {
        Ctx {
            publisher: Arc::new(Publisher::new(&config.sinks)),
            slots: Arc::new(Semaphore::new(config.refresh.max_concurrency)),
            config,
        }
    }
}

fn token(c: &Credential) -> &Secret {
    c.access_token.as_ref().unwrap_or(&c.refresh_token)
}

/// Whether consumers may be given this credential's access token: there is
/// one, it has not expired, and the grant is not known dead.
fn publishable(c: &Credential, now: i64) -> bool {
    c.access_token.is_some()
        && c.state != State::NeedsReauthorization
        && c.expires_at.is_none_or(|e| e > now)
}

/// When the token should be refreshed: `lead` (plus up to a quarter more, by
/// jitter) before expiry, but never in the first half of its lifetime, so a
/// provider that issues tokens shorter than the lead cannot drive a loop.
fn refresh_at(c: &Credential, r: &RefreshConfig, jitter: f64) -> Option<i64> {
    if c.access_token.is_none() {
        return Some(0);
    }
    let exp = c.expires_at?;
    let lead = r.lead().as_millis() as f64;
    let early = exp - (lead * (1.0 + jitter / 4.0)) as i64;
    let half_life = c.issued_at + (exp - c.issued_at) / 2;
    Some(early.max(half_life))
}

/// What a worker does now with a credential.
fn decide(c: &Credential, now: i64, r: &RefreshConfig, jitter: f64, validate: bool) -> Do {
    match c.state {
        State::NeedsReauthorization | State::Misconfigured => Do::Nothing,
        // Stored as refreshing but not ours: a refresh that a crash cut off
        // (or a peer's, whose lease will turn us away). Find out now, not
        // at the next expiry, whether the stored refresh token still works.
        State::Refreshing if c.refresh_started_at.is_some() => Do::Refresh,
        State::Retrying if c.next_attempt_at.is_some_and(|t| t > now) => Do::Nothing,
        _ if refresh_at(c, r, jitter).is_some_and(|t| t <= now) => Do::Refresh,
        // A failed refresh that is not due (a 401 on validation) re-checks first.
        State::Retrying => Do::Validate,
        _ if validate || c.last_validated_at.is_none() => Do::Validate,
        _ => Do::Nothing,
    }
}

/// When the scheduler should next look at a credential (ms), if ever.
fn next_deadline(c: &Credential, now: i64, r: &RefreshConfig, jitter: f64) -> Option<i64> {
    let expiry = c
        .expires_at
        .filter(|&e| e > now && c.access_token.is_some());
    match c.state {
        State::NeedsReauthorization => None,
        // Only to take the files down when the token expires.
        State::Misconfigured => expiry,
        State::Retrying => {
            let retry = c.next_attempt_at.unwrap_or(now);
            Some(expiry.map_or(retry, |e| e.min(retry)))
        }
        State::Refreshing if c.refresh_started_at.is_some() => Some(now),
        State::Valid | State::Refreshing => {
            if c.last_validated_at.is_none() && c.access_token.is_some() {
                return Some(now);
            }
            let refresh = refresh_at(c, r, jitter);
            match (refresh, expiry) {
                (Some(t), _) => Some(t),
                (None, e) => e,
            }
        }
    }
}

/// Resolves `TOKEND_TEST_STALL_SCHEDULER` seconds from now when the test hook
/// is set, never otherwise.
async fn test_stall() {
    match std::env::var(TEST_STALL_SCHEDULER)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => std::future::pending().await,
    }
}

/// Full jitter between `initial` and a cap that doubles with every failure up
/// to `max`; never sooner than the provider's Retry-After. The floor of
/// `initial` bounds the request rate of a long outage at one per `initial`.
pub fn backoff(
    failures: u32,
    initial: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    rnd: f64,
) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let cap = initial.saturating_mul(1u32 << exp).min(max).max(initial);
    let d = initial + (cap - initial).mul_f64(rnd.clamp(0.0, 1.0));
    d.max(retry_after.unwrap_or_default())
}

impl Credential {
    /// A stand-in for a row not yet read: `rev` 0 so the real row wins.
    fn placeholder(name: &str) -> Credential {
        Credential {
            name: name.to_owned(),
            provider: String::new(),
            access_token: None,
            refresh_token: Secret::new(""),
            scope: None,
            expires_at: None,
            issued_at: 0,
            state: State::Misconfigured,
            failures: 0,
            next_attempt_at: None,
            last_error: None,
            last_refresh_at: None,
            last_validated_at: None,
            refresh_started_at: None,
            not_before: None,
            created_at: 0,
            updated_at: 0,
            version: 0,
            rev: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;

    fn cred(issued: i64, expires: Option<i64>) -> Credential {
        let mut c = Credential::placeholder("c");
        c.state = State::Valid;
        c.access_token = Some(Secret::new("a"));
        c.issued_at = issued;
        c.expires_at = expires;
        c.last_validated_at = Some(issued);
        c
    }

    fn cfg(lead_s: u64) -> RefreshConfig {
        RefreshConfig {
            refresh_before_expiry: Duration::from_secs(lead_s),
            min_remaining: Duration::ZERO,
            ..RefreshConfig::default()
        }
    }

    #[test]
    fn refresh_is_due_lead_before_expiry_with_jitter() {
        let c = cred(0, Some(3600 * S));
        let r = cfg(600);
        assert_eq!(refresh_at(&c, &r, 0.0), Some(3000 * S));
        assert_eq!(refresh_at(&c, &r, 1.0), Some(2850 * S));
        assert_eq!(decide(&c, 2999 * S, &r, 0.0, false), Do::Nothing);
        assert_eq!(decide(&c, 3000 * S, &r, 0.0, false), Do::Refresh);
        assert_eq!(decide(&c, 100 * S, &r, 0.0, true), Do::Validate);
    }

    #[test]
    fn short_tokens_are_not_refreshed_in_their_first_half() {
        let c = cred(0, Some(10 * S));
        assert_eq!(refresh_at(&c, &cfg(600), 0.5), Some(5 * S));
    }

    #[test]
    fn min_remaining_extends_the_lead() {
        let c = cred(0, Some(3600 * S));
        let r = RefreshConfig {
            refresh_before_expiry: Duration::from_secs(60),
            min_remaining: Duration::from_secs(600),
            ..RefreshConfig::default()
        };
        assert_eq!(refresh_at(&c, &r, 0.0), Some(3000 * S));
    }

    #[test]
    fn no_access_token_means_refresh_now() {
        let mut c = cred(0, None);
        c.access_token = None;
        assert_eq!(decide(&c, 0, &cfg(600), 0.0, false), Do::Refresh);
    }

    #[test]
    fn stopped_states_do_nothing_and_retrying_waits() {
        let r = cfg(600);
        let mut c = cred(0, Some(3600 * S));
        c.state = State::NeedsReauthorization;
        assert_eq!(decide(&c, 3500 * S, &r, 0.0, true), Do::Nothing);
        assert_eq!(next_deadline(&c, 0, &r, 0.0), None);
        c.state = State::Misconfigured;
        assert_eq!(decide(&c, 3500 * S, &r, 0.0, true), Do::Nothing);
        assert_eq!(next_deadline(&c, 0, &r, 0.0), Some(3600 * S));
        c.state = State::Retrying;
        c.next_attempt_at = Some(100 * S);
        assert_eq!(decide(&c, 50 * S, &r, 0.0, true), Do::Nothing);
        assert_eq!(decide(&c, 100 * S, &r, 0.0, false), Do::Validate);
        assert_eq!(decide(&c, 3100 * S, &r, 0.0, false), Do::Refresh);
        assert_eq!(next_deadline(&c, 0, &r, 0.0), Some(100 * S));
    }

    #[test]
    fn an_interrupted_refresh_is_retried_at_once() {
        let mut c = cred(0, Some(3600 * S));
        c.state = State::Refreshing;
        c.refresh_started_at = Some(5);
        assert_eq!(decide(&c, 10 * S, &cfg(600), 0.0, false), Do::Refresh);
        assert_eq!(next_deadline(&c, 10 * S, &cfg(600), 0.0), Some(10 * S));
    }

    #[test]
    fn unknown_expiry_relies_on_validation() {
        let c = cred(0, None);
        assert_eq!(next_deadline(&c, 0, &cfg(600), 0.0), None);
        let mut fresh = c.clone();
        fresh.last_validated_at = None;
        assert_eq!(next_deadline(&fresh, 7, &cfg(600), 0.0), Some(7));
    }

    #[test]
    fn backoff_doubles_with_full_jitter_and_honours_retry_after() {
        let (i, m) = (Duration::from_secs(5), Duration::from_secs(900));
        assert_eq!(backoff(1, i, m, None, 1.0), i);
        assert_eq!(backoff(3, i, m, None, 1.0), Duration::from_secs(20));
        assert_eq!(backoff(3, i, m, None, 0.0), i);
        assert_eq!(backoff(30, i, m, None, 1.0), m);
        assert_eq!(
            backoff(100, i, m, None, 0.5),
            Duration::from_millis(452_500)
        );
        assert_eq!(
            backoff(1, i, m, Some(Duration::from_secs(60)), 0.3),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn publishable_only_while_alive() {
        let mut c = cred(0, Some(10 * S));
        assert!(publishable(&c, 5 * S));
        assert!(!publishable(&c, 10 * S));
        c.state = State::NeedsReauthorization;
        assert!(!publishable(&c, 0));
        c.state = State::Valid;
        c.access_token = None;
        assert!(!publishable(&c, 0));
    }
}
