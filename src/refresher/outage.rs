//! A provider as a whole: whether it looks down (two or more of its
//! credentials failing with a 5xx or no answer since its last success), the
//! one probe per interval that asks it while it does, and the nudge that
//! brings its other credentials back soon once it answers again.
//!
//! A failure is remembered with the endpoint it came from. A validation
//! answered ends only the validation endpoint's part of an outage: one
//! answered while the token endpoint fails (a 503 from the OAuth service
//! while the API works) used to end the whole outage, so that every held
//! credential tried the token endpoint again at once, at every validation.
//! A refresh answered ends all of it: what tokens need works. While only
//! the token endpoint fails, validations go out as usual, without taking
//! the probe (which one could not end the outage with).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::Refresher;
use super::entry::{Entry, EntryState};
use super::policy::{Gate, gate, next_deadline};
use super::scheduler::Sched;
use crate::clock::now_ms;
use crate::metrics::Endpoint;
use crate::store::{Credential, Grant, State, TokenAt};

/// When a credential of a provider succeeds after failures, the provider is
/// back: its other `retrying` credentials are tried again within this long,
/// spread at random, instead of sleeping out backoffs of up to `retry_max`.
pub(super) const RECOVERY_SPREAD: Duration = Duration::from_secs(5);

/// At most one such nudge per provider this often, so that a provider that
/// flaps costs each credential one extra request per interval at most.
pub(super) const RECOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// While a provider looks down (two or more of its credentials failed with
/// a 5xx or no answer since its last success), one request probes it this
/// often (or every `retry_max`, if shorter) and the others wait: an outage
/// costs a provider about two requests a minute, however many credentials
/// it has, and its return is seen within this long.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// A provider that may be down: which of its credentials failed with a 5xx
/// or no answer since its last success, and when it may next be probed.
#[derive(Default)]
pub(super) struct Outage {
    /// Each failing credential, and the endpoint it last failed on.
    failing: HashMap<String, Endpoint>,
    /// How many of those failed on the validation endpoint.
    validating: usize,
    pub(super) next_probe: i64,
}

impl Outage {
    /// Two credentials failing alike is the provider, not a credential.
    fn down(&self) -> bool {
        self.failing.len() >= 2
    }

    fn failed(&mut self, name: &str, endpoint: Endpoint) {
        if self.failing.insert(name.to_owned(), endpoint) == Some(Endpoint::Validate) {
            self.validating -= 1;
        }
        if endpoint == Endpoint::Validate {
            self.validating += 1;
        }
    }

    /// A request to `endpoint` was answered: a refresh ends every failure,
    /// a validation those of its own endpoint.
    fn answered(&mut self, endpoint: Endpoint) {
        match endpoint {
            Endpoint::Token => self.failing.clear(),
            Endpoint::Validate => self.failing.retain(|_, e| *e != Endpoint::Validate),
        }
        self.validating = 0;
    }
}

impl Refresher {
    /// Whether a request to `provider` may go now. While it looks down (see
    /// [`Outage`]), one request per probe interval: with `claim`, the
    /// caller that gets Go is that probe and the next one is due an
    /// interval later; the others are told when to ask again.
    pub(super) fn provider_gate(
        &self,
        provider: &str,
        endpoint: Endpoint,
        now: i64,
        claim: bool,
    ) -> Gate {
        let mut outages = self.outages.lock().unwrap();
        let Some(o) = outages.get_mut(provider).filter(|o| o.down()) else {
            return Gate::Go;
        };
        // A validation while only the token endpoint fails goes to an
        // endpoint that answers: it neither waits nor takes the probe,
        // which it could not end the outage with.
        if endpoint == Endpoint::Validate && o.validating == 0 {
            return Gate::Go;
        }
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
    pub(super) fn may_send(
        &self,
        entry: &Entry,
        cred: &Credential,
        now: i64,
        claim: bool,
        endpoint: Endpoint,
    ) -> bool {
        let hold = entry.state.lock().unwrap().hold_until;
        if gate(cred, now, hold) != Gate::Go {
            return false;
        }
        match self.provider_gate(&cred.provider, endpoint, now, claim) {
            Gate::Go => true,
            Gate::NotBefore(t) => {
                entry.wait_for_probe(t);
                false
            }
            Gate::Stopped => false,
        }
    }

    /// Whether a validation's 401 or 403 may be followed by its refresh now.
    /// A validation that went out while only the token endpoint fails took
    /// no probe (see [`Refresher::provider_gate`]): its refresh waits for
    /// the token endpoint's, as any refresh does. One that was the probe,
    /// or went out with no outage, goes on.
    pub(super) fn may_refresh_after_validation(&self, entry: &Entry, cred: &Credential) -> bool {
        let free = self
            .outages
            .lock()
            .unwrap()
            .get(&cred.provider)
            .is_some_and(|o| o.down() && o.validating == 0);
        !free || self.may_send(entry, cred, now_ms(), true, Endpoint::Token)
    }

    /// A request to `provider`'s `endpoint` failed as if it were down (see
    /// [`Outage`]).
    pub(super) fn provider_failed(&self, provider: &str, endpoint: Endpoint, name: &str) {
        let mut outages = self.outages.lock().unwrap();
        let o = outages.entry(provider.to_owned()).or_default();
        let was_down = o.down();
        o.failed(name, endpoint);
        if o.down() && !was_down {
            tracing::warn!(
                provider,
                "the provider looks down; probing it with one request at a time until it answers"
            );
        }
    }

    /// A request to `provider`'s `endpoint` succeeded. A refresh ends the
    /// outage; a validation only the failures of the validation endpoint
    /// (see the module's docs). If the provider looked down and no longer
    /// does, or this credential had failed, it is back: see
    /// [`Refresher::recovered`].
    pub(super) fn answered(&self, provider: &str, endpoint: Endpoint, after_failures: bool) {
        let (was_down, down) = {
            let mut outages = self.outages.lock().unwrap();
            let Some(o) = outages.get_mut(provider) else {
                drop(outages);
                if after_failures {
                    self.recovered(provider);
                }
                return;
            };
            let was_down = o.down();
            o.answered(endpoint);
            let down = o.down();
            if o.failing.is_empty() {
                outages.remove(provider);
            }
            (was_down, down)
        };
        if was_down && !down {
            tracing::info!(provider, "the provider answers again");
        }
        if (was_down || after_failures) && !down {
            self.recovered(provider);
        }
        if was_down && !down {
            // Those held for a probe that the nudge did not reach (it goes
            // at most once per interval) have nothing left to wait for:
            // they go within the spread too.
            self.release(provider, now_ms(), |st| st.waits_for_probe);
        }
    }

    /// Lets the credentials of `provider` that `held` picks go, each at a
    /// random instant within RECOVERY_SPREAD.
    fn release(&self, provider: &str, now: i64, held: impl Fn(&EntryState) -> bool) {
        let spread = RECOVERY_SPREAD.as_millis() as i64;
        let picked: Vec<Arc<Entry>> = self
            .entries
            .read()
            .unwrap()
            .values()
            .filter(|e| {
                let st = e.state.lock().unwrap();
                st.cred.provider == provider && held(&st)
            })
            .cloned()
            .collect();
        for e in picked {
            e.hold(now + (spread as f64 * fastrand::f64()) as i64);
            let name = e.cred().name.clone();
            self.reschedule(&name);
        }
    }

    /// One credential of `provider` just succeeded after failures: the
    /// provider is back. Its other `retrying` credentials are tried again
    /// within RECOVERY_SPREAD (never before a Retry-After), at most once per
    /// RECOVERY_INTERVAL per provider.
    pub(super) fn recovered(&self, provider: &str) {
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
        self.release(provider, now, |st| {
            (st.cred.state == State::Retrying || st.waits_for_probe)
                && st.hold_until > now
                && st.cred.next_attempt_at.is_none_or(|t| t <= now + spread)
        });
        let items: Vec<(String, TokenAt, i64)> = self
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
                (c.name.clone(), c.token_at(), at)
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
                // A row refused on reading stops at its next attempt,
                // where its files are removed too (attempt.rs).
                if matches!(row.grant, Grant::Refused) {
                    continue;
                }
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
}
