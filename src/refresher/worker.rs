//! The workers: each takes a credential off the queue and does what is
//! flagged and due for it, under its lock; and the writing of its files.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::Refresher;
use super::attempt::STORE_RETRY;
use super::entry::Entry;
use super::policy::{Do, Gate, decide, gate, publishable};
use super::scheduler::Sched;
use crate::clock::now_ms;
use crate::metrics::Endpoint;
use crate::store::{Commit, Credential, Grant, State};

impl Refresher {
    pub(super) async fn worker(
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

    pub(super) async fn process(&self, name: &str) {
        let Some(entry) = self.entry(name) else {
            return;
        };
        let _guard = entry.lock.lock().await;
        let (mut pending, state_before) = {
            let mut st = entry.state.lock().unwrap();
            (std::mem::take(&mut st.pending), st.cred.state)
        };
        // Files that failed to be written are due for another try.
        if entry.state.lock().unwrap().files.due(now_ms()) {
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
        let endpoint = match action {
            Do::Validate => Endpoint::Validate,
            _ => Endpoint::Token,
        };
        let action = if action != Do::Nothing && !self.may_send(&entry, &cred, now, true, endpoint)
        {
            Do::Nothing
        } else {
            action
        };
        if (cred.access_token.is_some() || cred.grant == Grant::Refused)
            && publishable(&cred, now).is_none()
        {
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
        let state_after = entry.cred().state;
        if state_after != state_before {
            self.states.send_replace(());
        }
        self.reschedule(name);
    }

    /// Re-reads a row another process changed. Returns false if it is gone.
    pub(super) async fn reload_row(&self, name: &str, entry: &Entry) -> bool {
        match self.store.get(name).await {
            Ok(Some(row)) => {
                let was_published = publishable(&entry.cred(), now_ms()).is_some();
                if entry.adopt(row) || !was_published {
                    let c = entry.cred();
                    self.publish(&c).await;
                } else if publishable(&entry.cred(), now_ms()).is_none() {
                    self.unpublish(name).await;
                }
                true
            }
            Ok(None) => {
                tracing::info!(credential = name, "credential removed from the store");
                self.entries.write().unwrap().remove(name);
                self.forget_files(name).await;
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

    /// Writes the credential's files with the sinks of the config in force
    /// now, not of the one a worker started with: a reload may have retired
    /// a path since (see [`Refresher::reload`]).
    pub(super) async fn publish(&self, cred: &Credential) {
        let Some(token) = publishable(cred, now_ms()) else {
            return self.unpublish(&cred.name).await;
        };
        let _in_force = self.publishing.read().await;
        let publisher = self.ctx().publisher.clone();
        let (name, tok, exp) = (cred.name.clone(), token.clone(), cred.expires_at);
        let errors = tokio::task::spawn_blocking(move || publisher.publish(&name, &tok, exp))
            .await
            .unwrap_or_default();
        self.published(&cred.name, errors);
    }

    pub(super) async fn unpublish(&self, name: &str) {
        let _in_force = self.publishing.read().await;
        let publisher = self.ctx().publisher.clone();
        let n = name.to_owned();
        let errors = tokio::task::spawn_blocking(move || publisher.unpublish(&n))
            .await
            .unwrap_or_default();
        self.published(name, errors);
    }

    /// Removes the files of a credential gone from the store, and tells
    /// the hooks even if `tokend remove` removed the files first.
    async fn forget_files(&self, name: &str) {
        let _in_force = self.publishing.read().await;
        let publisher = self.ctx().publisher.clone();
        let n = name.to_owned();
        let errors = tokio::task::spawn_blocking(move || publisher.forget(&n))
            .await
            .unwrap_or_default();
        self.published(name, errors);
    }

    /// Takes in how writing (or removing) a credential's files went. On
    /// failure the old files stay as they were (writes are atomic): the
    /// error is logged, shown in the status and counted, and the files are
    /// tried again later, since nothing else would write them before the
    /// next refresh, which may be a year away.
    pub(super) fn published(&self, name: &str, errors: Vec<String>) {
        for e in &errors {
            tracing::error!(credential = name, error = %e, "cannot publish");
        }
        self.metrics.publish_errors(errors.len());
        let Some(entry) = self.entry(name) else {
            return;
        };
        let mut st = entry.state.lock().unwrap();
        if errors.is_empty() {
            if st.files.written() {
                tracing::info!(credential = name, "token files written again");
            }
        } else {
            st.files.failed(errors.join("; "), now_ms());
        }
    }
}
