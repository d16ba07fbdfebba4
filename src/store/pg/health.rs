//! Whether this host reaches the database (README "Running a fleet": what
//! happens when the database is down). Two witnesses report: the threads
//! that run operations (a connection that cannot be made) and the
//! listener (a `LISTEN` connection lost and not made again). Either one
//! down is enough; each clears only its own report, on its next success.
//!
//! While the operations' side is down, connecting is tried again with
//! backoff (at once after the first failure, then 1 s doubling to 30 s)
//! rather than by every operation: a host
//! cut off from its database must not queue a connection attempt, with
//! its timeout, behind every refresh.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::clock::now_ms;

/// Reconnection backoff for the operations' connection.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Who found the database unreachable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Witness {
    Ops,
    Listener,
}

/// Since when (ms since the Unix epoch) the database has been unreachable,
/// and the last error, already made safe to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outage {
    pub since_ms: i64,
    pub error: String,
}

#[derive(Default)]
pub(super) struct Health(Mutex<State>);

#[derive(Default)]
struct State {
    ops: Option<Outage>,
    listener: Option<Outage>,
    /// When the operations' side may try to connect again, and the wait
    /// after that.
    retry_at: Option<Instant>,
    backoff: Option<Duration>,
}

impl Health {
    pub(super) fn down(&self, who: Witness, error: &str) {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let was = s.ops.is_some() || s.listener.is_some();
        let slot = match who {
            Witness::Ops => &mut s.ops,
            Witness::Listener => &mut s.listener,
        };
        let since_ms = slot.as_ref().map_or_else(now_ms, |o| o.since_ms);
        *slot = Some(Outage {
            since_ms,
            error: error.to_owned(),
        });
        if who == Witness::Ops {
            // The first failure holds nothing back (a server's restart
            // takes a fraction of a second): the next operation tries at
            // once. From the second on, 1 s doubling to 30 s.
            let wait = match s.backoff {
                None => Duration::ZERO,
                Some(Duration::ZERO) => BACKOFF_FIRST,
                Some(b) => (b * 2).min(BACKOFF_MAX),
            };
            s.backoff = Some(wait);
            s.retry_at = Some(Instant::now() + wait);
        }
        if !was {
            tracing::error!(
                error,
                "the database is unreachable; serving the tokens held, reconnecting with backoff"
            );
        }
    }

    pub(super) fn up(&self, who: Witness) {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let slot = match who {
            Witness::Ops => {
                s.retry_at = None;
                s.backoff = None;
                &mut s.ops
            }
            Witness::Listener => &mut s.listener,
        };
        if slot.take().is_some() && s.ops.is_none() && s.listener.is_none() {
            tracing::info!("the database answers again");
        }
    }

    /// Whether the operations' side may try to connect now; if not, how
    /// long until it may.
    pub(super) fn may_connect(&self) -> Result<(), Duration> {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match s.retry_at {
            Some(at) if at > Instant::now() => Err(at - Instant::now()),
            _ => Ok(()),
        }
    }

    /// The outage, if either side reports one: the earlier start, the
    /// operations' error first (it is what refreshes meet).
    pub(super) fn outage(&self) -> Option<Outage> {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match (&s.ops, &s.listener) {
            (Some(o), Some(l)) => Some(Outage {
                since_ms: o.since_ms.min(l.since_ms),
                error: o.error.clone(),
            }),
            (Some(o), None) | (None, Some(o)) => Some(o.clone()),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_witness_makes_an_outage_and_clears_only_its_own() {
        let h = Health::default();
        assert!(h.outage().is_none());
        h.down(Witness::Listener, "connection refused");
        let first = h.outage().unwrap();
        h.down(Witness::Ops, "connection refused again");
        let both = h.outage().unwrap();
        assert_eq!(both.since_ms, first.since_ms);
        assert_eq!(both.error, "connection refused again");
        h.up(Witness::Listener);
        assert!(h.outage().is_some(), "the operations' side is still down");
        h.up(Witness::Ops);
        assert!(h.outage().is_none());
    }

    #[test]
    fn connecting_again_backs_off_from_the_second_failure_doubling_to_thirty_seconds() {
        let h = Health::default();
        assert!(h.may_connect().is_ok());
        h.down(Witness::Ops, "refused");
        assert!(
            h.may_connect().is_ok(),
            "a first failure holds nothing back"
        );
        h.down(Witness::Ops, "refused");
        let wait = h.may_connect().unwrap_err();
        assert!(
            wait <= BACKOFF_FIRST && wait > BACKOFF_FIRST / 2,
            "{wait:?}"
        );
        for _ in 0..10 {
            h.down(Witness::Ops, "refused");
        }
        assert!(h.may_connect().unwrap_err() > BACKOFF_MAX / 2);
        h.up(Witness::Ops);
        assert!(h.may_connect().is_ok());
        // The listener's reports never hold the operations back.
        h.down(Witness::Listener, "lost");
        assert!(h.may_connect().is_ok());
    }
}
