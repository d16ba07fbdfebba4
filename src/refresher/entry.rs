//! What the refresher remembers per credential: the row as last read, the
//! work flagged for it, the lock that makes its work single-flight, and the
//! health of its published files.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::policy::backoff;
use super::scheduler::MAX_SLEEP;
use crate::alerts::{Alerts, Trouble, transition};
use crate::clock::rfc3339;
use crate::store::{Credential, State};
use crate::wire::Status;

/// The first wait before files that could not be written are tried again
/// (a full or read-only file system); it doubles, with jitter, up to
/// MAX_SLEEP, so that a disk that stays full costs a log line every few
/// minutes per credential, not every few seconds.
const PUBLISH_RETRY: Duration = Duration::from_secs(5);

/// Whether a credential's files match the store; while they do not, why,
/// and when to write them again.
#[derive(Default)]
pub(super) struct PublishHealth {
    /// Why the files last failed to match the store (full disk, read-only
    /// directory): shown in the status, since consumers then read an older
    /// token than the one stored.
    pub(super) error: Option<String>,
    /// Consecutive failures: the exponent of the retry delay.
    failures: u32,
    /// When to write the files again (ms); None while they are in step.
    pub(super) retry_at: Option<i64>,
}

impl PublishHealth {
    /// The files were written; returns whether they had been failing.
    pub(super) fn written(&mut self) -> bool {
        self.failures = 0;
        self.retry_at = None;
        self.error.take().is_some()
    }

    /// The files could not be written: try again after a doubling delay.
    pub(super) fn failed(&mut self, error: String, now: i64) {
        self.failures = self.failures.saturating_add(1);
        let delay = backoff(
            self.failures,
            PUBLISH_RETRY,
            MAX_SLEEP,
            None,
            fastrand::f64(),
        );
        self.retry_at = Some(now + delay.as_millis() as i64);
        self.error = Some(error);
    }

    /// Whether a failed write is due for another try.
    pub(super) fn due(&self, now: i64) -> bool {
        self.retry_at.is_some_and(|t| t <= now)
    }
}

/// Work flagged for a credential, done by the next worker that takes it.
#[derive(Default)]
pub(super) struct Pending {
    /// On the queue already: don't queue it twice.
    pub(super) queued: bool,
    /// Re-read the row: another process changed it.
    pub(super) reload: bool,
    /// The validation sweep asks for a GET.
    pub(super) validate: bool,
    /// Write the files again (start-up, config reload).
    pub(super) republish: bool,
    /// Try a `misconfigured` credential again (a config reload may have fixed it).
    pub(super) retry_now: bool,
}

pub(super) struct Entry {
    /// Held for all work on this credential: single-flight in this process.
    pub(super) lock: tokio::sync::Mutex<()>,
    pub(super) state: Mutex<EntryState>,
    /// Told of every change of state, in [`Entry::adopt`]: the one place
    /// where this process learns a credential's new state, whoever made it.
    alerts: Alerts,
}

pub(super) struct EntryState {
    pub(super) cred: Arc<Credential>,
    pub(super) pending: Pending,
    /// In [0, 1): how far ahead of the lead time this credential refreshes,
    /// drawn per token version so that tokens issued together spread out.
    pub(super) jitter: f64,
    /// Not before this instant (ms): set after a store failure or a busy lease.
    pub(super) hold_until: i64,
    /// The hold is its provider's outage: the credential is due, but
    /// another one probes the provider (src/refresher/outage.rs).
    pub(super) waits_for_probe: bool,
    /// Refresh attempts so far: a caller that waited for the lock while one
    /// ran sees it move, and takes that attempt's outcome (single-flight).
    pub(super) attempts: u64,
    /// When a consumer last reported this token refused (ms).
    pub(super) last_rejected: i64,
    /// A refresh holds the lease and its request may be out: the status
    /// says `refreshing` (the row says so too, but the entry keeps the row
    /// as it was before the lease).
    pub(super) refreshing: bool,
    /// An on-demand refresh task's outcome, while it runs: later callers
    /// wait on it too instead of starting another (single-flight).
    pub(super) running: Option<watch::Receiver<bool>>,
    /// Whether the files match the store.
    pub(super) files: PublishHealth,
    /// The token version a refresh brought because its predecessor got
    /// PandaDoc's 403: a 403 for this one is not the token's fault, and
    /// refreshing again would not help (a plan or permission problem).
    pub(super) refreshed_for_403: Option<i64>,
    /// What the credential went through since it last worked: `recovered`
    /// is reported only after trouble.
    trouble: Option<Trouble>,
}

/// Why a `valid` credential that is due sends nothing yet, as its status
/// and a token read's error say it: without it, a token that expired in an
/// outage showed `valid`, no token, and neither a reason nor a time.
pub(super) const WAITS_FOR_PROBE: &str = "not sent yet: its provider looks down and is probed with one request at a time; this credential waits its turn";

/// A credential held back past its own schedule: a retrying one past its
/// backoff, a valid one that is due, both because its provider looks down
/// and another credential probes it. Until when.
fn held_past_backoff(cred: &Credential, hold: i64, waits_for_probe: bool, now: i64) -> Option<i64> {
    let held = hold > now && cred.next_attempt_at.is_none_or(|t| t < hold);
    let shown = match cred.state {
        State::Retrying => true,
        State::Valid => waits_for_probe,
        _ => false,
    };
    (held && shown).then_some(hold)
}

impl Entry {
    pub(super) fn new(cred: Credential, alerts: Alerts) -> Entry {
        Entry {
            alerts,
            lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(EntryState {
                pending: Pending::default(),
                jitter: fastrand::f64(),
                hold_until: 0,
                waits_for_probe: false,
                attempts: 0,
                last_rejected: 0,
                refreshing: false,
                running: None,
                refreshed_for_403: None,
                files: PublishHealth::default(),
                trouble: Trouble::of(&cred),
                cred: Arc::new(cred),
            }),
        }
    }

    /// The status shown to the socket and the CLI: the row, and what only
    /// this process knows (a refresh in flight, whether its files could be
    /// written, a hold that delays the next attempt).
    pub(super) fn status(&self, now: i64) -> Status {
        // Copied under the lock, built after it: nothing that computes or
        // formats runs while the lock is held, so however that goes, it
        // cannot poison the entry for the scheduler and the workers. (The
        // store clamps every instant it reads, so nothing here overflows.)
        let (cred, refreshing, publish_error, hold, waits) = {
            let st = self.state.lock().unwrap();
            (
                st.cred.clone(),
                st.refreshing,
                st.files.error.clone(),
                st.hold_until,
                st.waits_for_probe,
            )
        };
        let mut status = Status::of(&cred, now);
        if refreshing {
            status.state = State::Refreshing;
        } else if let Some(hold) = held_past_backoff(&cred, hold, waits, now) {
            status.next_attempt_at = Some(rfc3339(hold));
            if cred.state == State::Valid && status.last_error.is_none() {
                status.last_error = Some(WAITS_FOR_PROBE.into());
            }
        }
        status.last_publish_error = publish_error;
        status
    }

    /// When a credential's next attempt is due, as every answer tells it:
    /// a retrying one's backoff's end, or its hold if that is later; a
    /// valid one held for its provider's probe, that hold; else none.
    pub(super) fn next_attempt(&self, cred: &Credential, now: i64) -> Option<i64> {
        let (hold, waits) = {
            let st = self.state.lock().unwrap();
            (st.hold_until, st.waits_for_probe)
        };
        let held = held_past_backoff(cred, hold, waits, now);
        match cred.state {
            State::Retrying => held.or(cred.next_attempt_at),
            _ => held,
        }
    }

    /// Why no request is sent for a credential now, beyond its row's last
    /// error: see [`WAITS_FOR_PROBE`].
    pub(super) fn waiting(&self, cred: &Credential, now: i64) -> Option<&'static str> {
        (cred.state == State::Valid && self.next_attempt(cred, now).is_some())
            .then_some(WAITS_FOR_PROBE)
    }

    pub(super) fn cred(&self) -> Arc<Credential> {
        self.state.lock().unwrap().cred.clone()
    }

    /// Adopts a newer row (by `rev`); returns whether the token changed, so
    /// that the caller writes the files again.
    pub(super) fn adopt(&self, cred: Credential) -> bool {
        let mut st = self.state.lock().unwrap();
        // A name removed and imported again starts at version 1 anew: its
        // creation tells it from the row it replaced, and only `rev` tells
        // which of the two is newer.
        let replaced = cred.created_at != st.cred.created_at;
        if cred.rev < st.cred.rev && (replaced || cred.version <= st.cred.version) {
            return false;
        }
        // A row that no longer says `refreshing` carries the refresh's
        // outcome: the status stops saying so at once, not when the worker
        // gets round to it.
        if cred.state != State::Refreshing {
            st.refreshing = false;
        }
        let st = &mut *st;
        if let Some(change) = transition(&st.cred, &cred, &mut st.trouble) {
            self.alerts.changed(change);
        }
        let token_changed = replaced || cred.version != st.cred.version;
        if token_changed {
            st.jitter = fastrand::f64();
            // Whatever held us back (a peer's lease) has produced a new token.
            st.hold_until = 0;
            st.waits_for_probe = false;
        }
        if replaced {
            // What this process noted of the old grant's tokens is not
            // about the new one's (a 403 after a refresh for a 403 is
            // keyed by version, which starts over).
            st.refreshed_for_403 = None;
            st.last_rejected = 0;
        }
        st.cred = Arc::new(cred);
        token_changed
    }

    pub(super) fn hold(&self, until: i64) {
        let mut st = self.state.lock().unwrap();
        st.hold_until = until;
        st.waits_for_probe = false;
    }

    /// Holds a due credential until its provider's next probe.
    pub(super) fn wait_for_probe(&self, until: i64) {
        let mut st = self.state.lock().unwrap();
        st.hold_until = until;
        st.waits_for_probe = true;
    }
}
