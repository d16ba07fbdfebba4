//! The scheduler task: it sleeps until the earliest credential deadline
//! (no polling) and puts due credentials on the work queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::Refresher;
use super::deadlines::Deadlines;
use super::policy::next_deadline;
use crate::clock::now_ms;

/// The longest the scheduler sleeps without looking at the clock again.
/// tokio's timers run on the monotonic clock, which stands still while the
/// machine is suspended, and the wall clock can be stepped; deadlines are
/// wall-clock instants (token expiry). Waking every five minutes at most
/// bounds how late a refresh can be after a resume or a clock jump, at a cost
/// of 12 wake-ups an hour.
pub(super) const MAX_SLEEP: Duration = Duration::from_secs(300);

/// Messages to the scheduler task.
pub(super) enum Sched {
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

impl Refresher {
    pub(super) async fn scheduler(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Sched>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut deadlines = Deadlines::default();
        let stall = test_stall();
        tokio::pin!(stall);
        loop {
            let now = now_ms();
            for name in deadlines.due(now) {
                self.enqueue(&name, |_| {});
            }
            let sleep = deadlines
                .next()
                .map(|at| Duration::from_millis((at - now).max(0) as u64))
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                msg = rx.recv() => match msg {
                    None => return,
                    Some(Sched::At(name, at)) => deadlines.set(name, at),
                    Some(Sched::By(name, at)) => deadlines.by(name, at),
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
    pub(super) fn reschedule(&self, name: &str) {
        let Some(e) = self.entry(name) else {
            let _ = self.sched.send(Sched::At(name.to_owned(), None));
            return;
        };
        let refresh = self.ctx().config.refresh.clone();
        let (cred, jitter, hold, republish) = {
            let st = e.state.lock().unwrap();
            (st.cred.clone(), st.jitter, st.hold_until, st.files.retry_at)
        };
        let at = next_deadline(&cred, now_ms(), &refresh, jitter).map(|t| t.max(hold));
        // Files that could not be written are tried again on their own clock.
        let at = match (at, republish) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        };
        let _ = self.sched.send(Sched::At(name.to_owned(), at));
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
