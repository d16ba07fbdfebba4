//! What the socket API and `tokend status` show of credentials, and the
//! metrics exposition: never a secret.

use std::collections::HashMap;
use std::sync::Arc;

use super::Refresher;
use super::entry::Entry;
use super::policy::publishable;
use crate::clock::{now_ms, rfc3339};
use crate::metrics::CredentialGauge;
use crate::store::{Credential, State};
use crate::wire::Status;

impl Status {
    pub fn of(c: &Credential, now: i64) -> Status {
        Status {
            name: c.name.clone(),
            provider: c.provider.clone(),
            grant: c.grant.kind(),
            state: c.state,
            has_token: publishable(c, now).is_some(),
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

impl Refresher {
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
            .filter(|c| visible(&c.name))
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

    /// The statuses of the credentials `visible` lets the caller see, by
    /// name. Only the entries are taken now; each status is made as it is
    /// read, so that a socket answer for 100,000 credentials is streamed in
    /// chunks instead of being built whole (README "The socket API").
    pub fn status_cursor(&self, visible: impl Fn(&str) -> bool) -> StatusCursor {
        let entries = self.entries.read().unwrap();
        let mut v: Vec<(&String, &Arc<Entry>)> =
            entries.iter().filter(|(n, _)| visible(n)).collect();
        v.sort_unstable_by(|a, b| a.0.cmp(b.0));
        StatusCursor {
            entries: v
                .into_iter()
                .map(|(_, e)| e.clone())
                .collect::<Vec<_>>()
                .into_iter(),
            now: now_ms(),
        }
    }

    /// `degraded: …` while this daemon cannot reach its database (a
    /// PostgreSQL server: README "Running a fleet"), for `/health`, the
    /// STATUS= line and `tokend status`. Meanwhile it serves the tokens it
    /// holds while they have more than `min_remaining` left.
    pub fn degraded(&self) -> Option<String> {
        let o = self.store.outage()?;
        Some(format!(
            "degraded: the database has been unreachable since {} ({})",
            rfc3339(o.since_ms),
            o.error
        ))
    }

    /// Counts of credentials per state, for the status line and logs.
    /// Placeholders for rows not read yet (rev 0) are not credentials yet.
    pub fn summary(&self) -> HashMap<State, usize> {
        let mut m = HashMap::new();
        for e in self.entries.read().unwrap().values() {
            let c = e.cred();
            *m.entry(c.state).or_default() += 1;
        }
        m
    }
}

/// See [`Refresher::status_cursor`].
pub struct StatusCursor {
    entries: std::vec::IntoIter<Arc<Entry>>,
    now: i64,
}

impl Iterator for StatusCursor {
    type Item = Status;

    fn next(&mut self) -> Option<Status> {
        self.entries.next().map(|e| e.status(self.now))
    }
}
