//! Whether this host reaches the database (README "When the database is
//! down"). Two witnesses report: the pool's threads (a connection that
//! cannot be made) and the listener (a `LISTEN` connection that cannot be
//! made again). Either one down is enough; each clears only its own report,
//! on its next success.
//!
//! Reporting only: it holds no operation back. Each operation that finds
//! its connection broken makes it again at once (bounded by the connect
//! timeout), and must: a refresh that rotated a token retries its commit,
//! renewing its lease, and a backoff here once kept such a commit from the
//! database for 8 s after a 3 s restart, long enough for its lease to pass
//! to another host and the rotated token to be lost (tests/pg_fleet.rs).

use std::sync::Mutex;

use crate::clock::now_ms;

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
        if !was {
            tracing::error!(
                error,
                "the database is unreachable; serving the tokens held, reconnecting"
            );
        }
    }

    pub(super) fn up(&self, who: Witness) {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let slot = match who {
            Witness::Ops => &mut s.ops,
            Witness::Listener => &mut s.listener,
        };
        if slot.take().is_some() && s.ops.is_none() && s.listener.is_none() {
            tracing::info!("the database answers again");
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
}
