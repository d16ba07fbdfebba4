//! The workers: each takes a credential off the queue and does what is
//! flagged and due for it, under its lock; and the writing of its files.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot, watch};

use super::Refresher;
use super::attempt::STORE_RETRY;
use super::entry::Entry;
use super::policy::{Do, Gate, decide, gate, publishable};
use super::scheduler::Sched;
use crate::clock::now_ms;
use crate::secret::Secret;
use crate::store::{Commit, Credential, State};

/// The most credentials one batch of publications writes: bounds the
/// memory of a batch and the wait of the first commit in it.
const BATCH: usize = 512;

/// A committed token on its way to its files, and who waits to hear how
/// that went.
pub(super) struct Publication {
    name: String,
    token: Secret,
    expires_at: Option<i64>,
    /// The row's token version: of two for one credential, the newer wins.
    version: i64,
    done: oneshot::Sender<Vec<String>>,
}

/// Writes the publications queued by commits in batches, each taking all
/// that queued while the one before was written (docs/design.md, "Commit,
/// then publish"). Holds the refresher weakly: it ends with it.
pub(super) async fn write_batches(
    refresher: Weak<Refresher>,
    mut queue: mpsc::UnboundedReceiver<Publication>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let Some(r) = refresher.upgrade() else { return };
        r.write_batch(std::mem::take(&mut batch)).await;
    }
}

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
        let action = if action != Do::Nothing && !self.may_send(&entry, &cred, now, true) {
            Do::Nothing
        } else {
            action
        };
        if cred.access_token.is_some() && publishable(&cred, now).is_none() {
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
    /// a path since (see [`Refresher::reload`]). Returns once the files are
    /// durable, having joined the batch of other commits' files if the
    /// batch writer runs.
    pub(super) async fn publish(&self, cred: &Credential) {
        let Some(token) = publishable(cred, now_ms()) else {
            return self.unpublish(&cred.name).await;
        };
        let (done, written) = oneshot::channel();
        let job = Publication {
            name: cred.name.clone(),
            token: token.clone(),
            expires_at: cred.expires_at,
            version: cred.version,
            done,
        };
        match self.publications.get() {
            Some(queue) => {
                if let Err(mpsc::error::SendError(job)) = queue.send(job) {
                    self.write_batch(vec![job]).await;
                }
            }
            None => self.write_batch(vec![job]).await,
        }
        let errors = written
            .await
            .unwrap_or_else(|_| vec!["the file writer stopped".to_owned()]);
        self.published(&cred.name, errors);
    }

    /// Writes a batch of publications and tells each how it went. Of two
    /// for one credential only the newer token is written, and a token older
    /// than the one the credential holds now gives way to that one: a file
    /// never goes back to an older token.
    async fn write_batch(&self, jobs: Vec<Publication>) {
        let mut newest: HashMap<String, (i64, Secret, Option<i64>)> = HashMap::new();
        for j in &jobs {
            if newest.get(&j.name).is_none_or(|(v, _, _)| *v < j.version) {
                let item = (j.version, j.token.clone(), j.expires_at);
                newest.insert(j.name.clone(), item);
            }
        }
        let now = now_ms();
        for (name, item) in newest.iter_mut() {
            if let Some(e) = self.entry(name) {
                let c = e.cred();
                if c.version > item.0
                    && let Some(token) = publishable(&c, now)
                {
                    *item = (c.version, token.clone(), c.expires_at);
                }
            }
        }
        let items: Vec<(String, Secret, Option<i64>)> = newest
            .into_iter()
            .map(|(name, (_, token, exp))| (name, token, exp))
            .collect();
        let _in_force = self.publishing.read().await;
        let publisher = self.ctx().publisher.clone();
        let written = tokio::task::spawn_blocking(move || {
            let refs: Vec<_> = items.iter().map(|(n, t, e)| (n.as_str(), t, *e)).collect();
            let errors = publisher.publish_many(&refs);
            items.into_iter().map(|(n, ..)| n).zip(errors).collect()
        })
        .await;
        let errors: HashMap<String, Vec<String>> = written.unwrap_or_default();
        for j in jobs {
            let e = errors
                .get(&j.name)
                .cloned()
                .unwrap_or_else(|| vec!["the file writer stopped".to_owned()]);
            let _ = j.done.send(e);
        }
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
