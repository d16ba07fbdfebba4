//! Serving consumers: a fresh token (refreshing first when the backoff
//! allows), a forced refresh, a rejected-token report. A refresh they start
//! is a task of the refresher's; they only wait for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use super::entry::Entry;
use super::policy::publishable;
use super::{Refresher, TokenError};
use crate::clock::now_ms;
use crate::metrics::Endpoint;
use crate::secret::Secret;
use crate::store::{Credential, State};
use crate::wire::Status;

/// Why a consumer waiting for a refresh was answered without its outcome.
const STOPPING: &str = "tokend is stopping before the refresh ended (it is stored before tokend exits); ask again once tokend is back";

impl Refresher {
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
        if let Some(t) = fresh(&c) {
            return Ok(t);
        }
        let mut cut = false;
        if let Some(mut done) = self.start_refresh(name, &entry) {
            tokio::select! {
                _ = tokio::time::timeout(wait, done.wait_for(|d| *d)) => {}
                () = self.answer_by() => cut = true,
            }
        }
        let c = entry.cred();
        if let Some(t) = fresh(&c) {
            return Ok(t);
        }
        if c.state == State::NeedsReauthorization {
            return Err(TokenError::NeedsReauthorization(c.last_error.clone()));
        }
        match publishable(&c, now_ms()) {
            Some(t) => Ok((t.clone(), c.expires_at)),
            _ => Err(TokenError::NoValidToken {
                why: if cut {
                    Some(STOPPING.into())
                } else {
                    (c.last_error.clone())
                        .or_else(|| entry.waiting(&c, now_ms()).map(str::to_owned))
                },
                // As the status says it: a hold past the backoff included.
                next_attempt: entry.next_attempt(&c, now_ms()),
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
        let before = entry.cred().version;
        let mut cut = false;
        if let Some(mut done) = self.start_refresh(name, &entry) {
            tokio::select! {
                _ = done.wait_for(|d| *d) => {}
                () = self.answer_by() => cut = true,
            }
        }
        // A pair stored without a usable access token (not Bearer) is no
        // refresh to report: the credential is misconfigured.
        let c = entry.cred();
        let changed = c.version != before && c.state != State::Misconfigured;
        let mut status = entry.status(now_ms());
        if cut && !changed {
            status.last_error = Some(STOPPING.into());
        }
        Some((status, changed))
    }

    /// Starts an on-demand refresh as a task owned by the refresher, or
    /// joins the one running; returns what to wait on for its end. None when
    /// nothing may be sent now (the credential's [`gate`], or its provider
    /// looks down and is not due for a probe) or tokend is stopping.
    pub(super) fn start_refresh(
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
        if !refreshing && !self.may_send(entry, &cred, now_ms(), false, Endpoint::Token) {
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
    pub(super) async fn run_refresh(&self, name: &str, entry: &Entry, attempts: u64) {
        let state_before = {
            let _guard = entry.lock.lock().await;
            let state_before = entry.cred().state;
            let joined = entry.state.lock().unwrap().attempts != attempts;
            let cred = entry.cred();
            if !joined && self.may_send(entry, &cred, now_ms(), true, Endpoint::Token) {
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
}
