//! One attempt at a credential: a validation, or a refresh under the
//! store's lease, and what it leaves behind: a committed pair, or a setback
//! recorded with its backoff.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::entry::Entry;
use super::policy::backoff;
use super::{Ctx, Refresher};
use crate::clock::now_ms;
use crate::config::ProviderConfig;
use crate::metrics::{Endpoint, RefreshOutcome, ValidationOutcome};
use crate::provider::{self, Failure};
use crate::store::{
    Commit, Credential, FailureUpdate, Grant, Lease, State, StoreError, TokenUpdate,
};

/// How long a store failure holds a credential back before it is tried again.
pub(super) const STORE_RETRY: Duration = Duration::from_secs(5);

/// The longest wait between attempts at committing a token pair the
/// provider already issued. There is no last attempt: giving the pair up
/// would lose the grant, so only the process's end stops the retries.
/// Short, and well inside [`LEASE_MARGIN`]: once the store answers again
/// (a database's restart), the commit must land before the lease, which
/// no retry could renew meanwhile, passes to another host that would
/// spend the rotated-out token. At 30 s, a 10 s outage lost the grant
/// (tests/pg_daemon.rs).
pub(super) const COMMIT_RETRY_MAX: Duration = Duration::from_secs(2);

/// How long a lease outlives its request's timeout: the commit of the
/// answer (one store write, which a busy database holds up for its 5 s
/// busy timeout) must fit in it. A commit that is retried renews it.
pub(super) const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// A lease asked for this long ago (its answer, then a provider slot) is
/// renewed before its request, so that its whole lifetime is still ahead
/// of the request.
const LEASE_RENEW_AFTER: Duration = Duration::from_secs(1);

/// How long the first commit of a refreshed pair may take before the pair
/// is kept in a file meanwhile (`unstored`): far above a commit's usual
/// milliseconds, far below the busy timeout or a stop timeout.
const KEEP_AFTER: Duration = Duration::from_secs(1);

/// Renewals tried before a request while each comes back late
/// ([`renewed_in_time`]); then the lease is given back, nothing sent.
const RENEW_TRIES: u32 = 3;

/// Whether a renewal asked at `asked` and answered `now` left the request
/// the lease it counts on. The database starts a renewal's clock at its
/// statement, and the answer follows its COMMIT, which nothing bounds (a
/// stalled disk, a synchronous standby away): a renewal answered after
/// more than half the lease's margin may have run out already, and
/// another host may hold the lease. Such a renewal is renewed again.
fn renewed_in_time(asked: Instant, now: Instant) -> bool {
    now.saturating_duration_since(asked) <= LEASE_MARGIN / 2
}

/// Why an attempt did not bring a good token, as it is recorded. `lease` is
/// the fencing value of the lease a refresh ran under (None for what holds
/// no lease: a validation, a provider missing from the config): only the
/// lease's holder records, and only it may clear the refresh's mark.
pub(super) enum Setback {
    /// Our side is wrong: nothing is sent until a reload.
    Misconfigured { error: String, lease: Option<i64> },
    /// The grant is dead (`invalid_grant`): a human must authorize again.
    NeedsReauthorization { error: String, lease: i64 },
    /// Transient: try again after the backoff.
    Retry {
        error: String,
        /// The provider's Retry-After: a floor for the next attempt, on every path.
        retry_after: Option<Duration>,
        /// Keep the "refresh started" mark: the provider may have rotated.
        outcome_unknown: bool,
        /// The endpoint asked looks down (a 5xx, no answer): see [`Outage`].
        provider_down: Option<Endpoint>,
        lease: Option<i64>,
        /// "refresh_failed" or "validation_failed": the event recorded.
        event: &'static str,
    },
}

impl Setback {
    fn state(&self) -> State {
        match self {
            Setback::Misconfigured { .. } => State::Misconfigured,
            Setback::NeedsReauthorization { .. } => State::NeedsReauthorization,
            Setback::Retry { .. } => State::Retrying,
        }
    }
}

impl Refresher {
    pub(super) async fn validate(
        &self,
        ctx: &Ctx,
        entry: &Entry,
        cred: &Credential,
        p: &ProviderConfig,
    ) {
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
                    .record_note(&cred.name, cred.token_at(), error)
                    .await
                {
                    Ok(Commit::Done(c)) => self.adopt_written(entry, *c).await,
                    Ok(_) => {}
                    Err(e) => self.store_failed(entry, &cred.name, &e),
                }
                return;
            }
            other => other,
        };
        match result {
            Ok(()) => {
                let current = match self
                    .store
                    .record_validated(&cred.name, cred.token_at())
                    .await
                {
                    Ok(Commit::Done(c)) => {
                        self.adopt_written(entry, *c).await;
                        true
                    }
                    // The row changed or went while the request was out
                    // (`tokend remove`, a forced import): its reload
                    // publishes what it holds now. Writing the token in
                    // memory here would bring a removed credential's
                    // files back until that reload.
                    Ok(Commit::Conflict | Commit::LeaseLost) => {
                        self.conflict(entry, &cred.name);
                        false
                    }
                    Err(e) => {
                        self.store_failed(entry, &cred.name, &e);
                        true
                    }
                };
                tracing::debug!(credential = %cred.name, "token validated");
                self.answered(&cred.provider, Endpoint::Validate, cred.failures > 0);
                // The validation sweep doubles as a check of the files: one
                // that was removed (a cleaned /run, a deleted directory) or
                // altered is written again; an intact one costs a read.
                if current {
                    let c = entry.cred();
                    self.publish(&c).await;
                }
            }
            Err(Failure::Unauthorized) => {
                tracing::info!(credential = %cred.name, "the provider rejected the access token; refreshing now");
                if self.may_refresh_after_validation(entry, cred) {
                    self.refresh(ctx, entry, cred, p).await;
                }
            }
            Err(Failure::Forbidden) => {
                tracing::info!(credential = %cred.name, "the provider refused the access token (403); refreshing once");
                if !self.may_refresh_after_validation(entry, cred) {
                    return;
                }
                self.refresh(ctx, entry, cred, p).await;
                let now = entry.cred();
                // A new token of this grant (not of a grant that replaced
                // it meanwhile, whose tokens this 403 says nothing about).
                if now.version != cred.version && now.created_at == cred.created_at {
                    entry.state.lock().unwrap().refreshed_for_403 = Some(now.version);
                }
            }
            Err(f) => {
                let (retry_after, provider_down) = match &f {
                    Failure::Transient {
                        retry_after,
                        provider_down,
                        ..
                    } => (*retry_after, provider_down.then_some(Endpoint::Validate)),
                    _ => (None, None),
                };
                // A validation failure that is not a 401 says nothing about
                // the token: it stays published while we retry.
                let setback = Setback::Retry {
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

    pub(super) async fn refresh(
        &self,
        ctx: &Ctx,
        entry: &Entry,
        seen: &Credential,
        p: &ProviderConfig,
    ) {
        self.refresh_attempt(ctx, entry, seen, p).await;
        // Counted when it is over: a caller that took its snapshot while
        // this one ran sees the count move once it gets the lock, and joins.
        let mut st = entry.state.lock().unwrap();
        st.attempts += 1;
        st.refreshing = false;
    }

    /// A credential whose provider is not in the configuration.
    pub(super) async fn provider_missing(&self, ctx: &Ctx, entry: &Entry, cred: &Credential) {
        let setback = Setback::Misconfigured {
            error: format!(
                "provider {:?} is not in the configuration: add [providers.{}] and reload",
                cred.provider, cred.provider
            ),
            lease: None,
        };
        self.fail(ctx, entry, cred, setback).await;
    }

    pub(super) async fn refresh_attempt(
        &self,
        ctx: &Ctx,
        entry: &Entry,
        seen: &Credential,
        p: &ProviderConfig,
    ) {
        let name = &seen.name;
        // The lease before the slot: its store round trip (a group commit
        // and its fsync) overlaps the requests in flight instead of holding
        // a provider slot idle. At most `max_concurrency` leases wait for a
        // slot at once, so none waits long, and one that did is renewed
        // before the request (docs/design.md §1).
        let ahead = ctx.ahead.acquire().await;
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let ttl = ctx.config.refresh.request_timeout + LEASE_MARGIN;
        // The lease's clock runs from before the ask: an answer that came
        // late (a slow store) leaves less of it, and is renewed below
        // before any request goes out.
        let leased = Instant::now();
        let (cred, interrupted, fence) = match self
            .store
            .take_lease(name, &self.holder, ttl, seen.token_at())
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
                drop(ahead);
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
            // A token value of the row does not open (say, one planted in
            // plaintext by someone with write access to the database, which
            // changes no `rev` for the store watch to see): read the row
            // again as a plain read does, which refuses that credential
            // alone (src/store/keys.rs `refuse`), so that it stops, its
            // files go and the operator is told, instead of failing here
            // at every attempt.
            Err(e @ (StoreError::Plaintext { .. } | StoreError::Seal(_))) => {
                drop(ahead);
                tracing::warn!(credential = %name, error = %e, "cannot take the lease: a stored token does not open");
                self.reload_row(name, entry).await;
                entry.hold(now_ms() + STORE_RETRY.as_millis() as i64);
                return;
            }
            Err(e) => return self.store_failed(entry, name, &e),
        };
        // A holder that died mid-refresh may have kept its pair for the
        // next start (`unstored`), which is not this process: store that
        // pair, under this lease, instead of sending the token it replaced.
        if interrupted {
            match self.unstored.kept() {
                Ok(kept) => {
                    if let Some(k) = kept.into_iter().find(|k| &k.name == name) {
                        drop(ahead);
                        match self
                            .unstored
                            .store_under(&self.store, &self.holder, fence, k)
                            .await
                        {
                            Ok(Some(c)) => {
                                entry.adopt(c);
                                let c = entry.cred();
                                self.publish(&c).await;
                            }
                            Ok(None) => self.conflict(entry, name),
                            Err(e) => self.store_failed(entry, name, &e),
                        }
                        return;
                    }
                }
                Err(why) => {
                    drop(ahead);
                    self.give_back(name, fence, &cred).await;
                    return self.store_failed(entry, name, &StoreError::Unstored(why));
                }
            }
        }
        let slot = ctx.slots.acquire().await;
        drop(ahead);
        if self.stopping.load(Ordering::SeqCst) {
            // Nothing was sent: the row goes back to what it was, so the
            // next start does not take this for an interrupted refresh.
            self.give_back(name, fence, &cred).await;
            return;
        }
        if leased.elapsed() > LEASE_RENEW_AFTER {
            let mut tries = 0;
            loop {
                if tries == RENEW_TRIES {
                    tracing::warn!(credential = %name, "the store answers lease renewals too late to trust them; giving the lease back, nothing sent");
                    self.give_back(name, fence, &cred).await;
                    entry.hold(now_ms() + STORE_RETRY.as_millis() as i64);
                    return;
                }
                tries += 1;
                let asked = Instant::now();
                match self.store.renew_lease(name, &self.holder, fence, ttl).await {
                    Ok(true) if renewed_in_time(asked, Instant::now()) => break,
                    Ok(true) => {}
                    Ok(false) => {
                        // It expired while we waited and another holder took
                        // it: nothing was sent, its result will reach us.
                        tracing::debug!(credential = %name, "lease passed on while waiting for a provider slot");
                        entry.hold(now_ms() + ctx.config.refresh.retry_initial.as_millis() as i64);
                        return;
                    }
                    Err(e) => {
                        // Nothing was sent: the next attempt must not take
                        // this for an interrupted refresh.
                        self.give_back(name, fence, &cred).await;
                        return self.store_failed(entry, name, &e);
                    }
                }
            }
        }
        // A client_credentials fetch that never finished lost nothing.
        if interrupted && matches!(cred.grant, Grant::RefreshToken(_)) {
            tracing::warn!(
                credential = %name,
                "a previous refresh of this credential never finished (tokend stopped, or no answer came); trying the stored refresh token once"
            );
        }
        let result = {
            let _slot = slot;
            let started = Instant::now();
            let timeout = ctx.config.refresh.request_timeout;
            // A client_credentials credential's "refresh" is a new token of
            // the same grant: same slot, lease, commit and backoff.
            let r = match &cred.grant {
                Grant::RefreshToken(token) => self.client.refresh(p, token, timeout).await,
                Grant::ClientCredentials => self.client.client_credentials(p, timeout).await,
                // A lease's read fails on a row it cannot open rather than
                // refuse it (src/store/keys.rs), so this is not reached;
                // were it, nothing would be sent.
                Grant::Refused => {
                    self.give_back(name, fence, &cred).await;
                    return;
                }
            };
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
                // (A row whose refresh token is refused on reading is no
                // peer's rotation: ours is dead all the same.)
                if let Ok(Some(row)) = self.store.get(name).await
                    && matches!(row.grant, Grant::RefreshToken(_))
                    && row.grant != cred.grant
                {
                    tracing::info!(credential = %name, "refresh token was rotated by another process meanwhile");
                    let _ = self.store.release_lease(name, &self.holder, fence).await;
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
                Setback::NeedsReauthorization {
                    error,
                    lease: fence,
                }
            }
            Err(Failure::Misconfigured { reason }) => Setback::Misconfigured {
                error: reason,
                lease: Some(fence),
            },
            Err(f) => {
                let (retry_after, unknown, provider_down) = match &f {
                    Failure::Transient {
                        retry_after,
                        outcome_unknown,
                        provider_down,
                        ..
                    } => (
                        *retry_after,
                        *outcome_unknown,
                        provider_down.then_some(Endpoint::Token),
                    ),
                    _ => (None, false, None),
                };
                // Keep the "refresh started" mark while the outcome is unknown,
                // so a later invalid_grant can be explained.
                Setback::Retry {
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
    pub(super) async fn commit(
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
        // Whether the pair was sent to its file (`keep_pair`). A stopping
        // daemon keeps it before its first commit: the end of the shutdown
        // grace, or systemd's stop timeout, may come before a commit slower
        // than KEEP_AFTER is noticed.
        let mut kept = false;
        if self.stopping.load(Ordering::SeqCst) {
            self.keep_pair(name, fence, cred, update(), "the daemon is stopping")
                .await;
            kept = true;
        }
        for attempt in 1u64.. {
            let commit =
                self.store
                    .commit_refresh(name, &self.holder, fence, cred.token_at(), update());
            // A commit that has not landed within KEEP_AFTER (a store that
            // hangs rather than fails: a busy SQLite for its busy timeout,
            // PostgreSQL behind a dead connection) is waited for, never
            // dropped, but the pair goes to the file first: a kill in the
            // wait (systemd's stop timeout, the OOM killer) keeps it.
            let committed = if kept {
                commit.await
            } else {
                tokio::pin!(commit);
                tokio::select! {
                    biased;
                    c = &mut commit => c,
                    () = tokio::time::sleep(KEEP_AFTER) => {
                        self.keep_pair(name, fence, cred, update(), "a commit slower than 1 s").await;
                        kept = true;
                        commit.await
                    }
                }
            };
            // Not on LeaseLost: the pair was not stored, and the holder
            // after this one may be of this host and store it from the file.
            // Also after a keep that failed: it may have failed after its
            // file was in place (a directory sync, a chown).
            if kept && matches!(committed, Ok(Commit::Done(_) | Commit::Conflict)) {
                self.unstored.forget(name);
            }
            match committed {
                Ok(Commit::Done(c)) => {
                    let expires = c.expires_at.map(|e| crate::clock::span(e - now));
                    entry.adopt(*c);
                    let c = entry.cred();
                    if let Some(reason) = tokens.unsupported {
                        let setback = Setback::Misconfigured {
                            error: format!(
                                "{reason}; the rotated refresh token is stored, the old access token stays in use"
                            ),
                            lease: None,
                        };
                        return self.fail(ctx, entry, &c, setback).await;
                    }
                    self.publish(&c).await;
                    tracing::info!(credential = %name, expires_in = expires.as_deref().unwrap_or("unknown"), "token refreshed");
                    self.answered(&cred.provider, Endpoint::Token, cred.failures > 0);
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
                Err(StoreError::Closed) => {
                    // The store's thread is gone (the daemon stops, or it
                    // died): the file is what is left of the pair.
                    if !kept {
                        self.keep_pair(name, fence, cred, update(), "the store is closed")
                            .await;
                    }
                    break;
                }
                Err(e) => {
                    tracing::error!(credential = %name, attempt, error = %e, "cannot store the refreshed token pair; retrying");
                    if !kept {
                        self.keep_pair(name, fence, cred, update(), &e.to_string())
                            .await;
                        kept = true;
                    }
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

    /// Keeps a refreshed pair in its file (`unstored`) until a commit
    /// answers, so that a process that ends first leaves it to the next
    /// start or holder on this host. Off the runtime's threads: a
    /// directory made, a file written, both synced, on the disk that may
    /// be what makes the commit slow. A failure is logged, with `why` the
    /// pair is being kept.
    async fn keep_pair(
        &self,
        name: &str,
        fence: i64,
        cred: &Credential,
        update: TokenUpdate,
        why: &str,
    ) {
        let (unstored, owned, holder, at) = (
            self.unstored.clone(),
            name.to_owned(),
            self.holder.clone(),
            cred.token_at(),
        );
        let done =
            tokio::task::spawn_blocking(move || unstored.keep(&owned, &holder, fence, at, &update))
                .await
                .unwrap_or_else(|e| {
                    Err(std::io::Error::other(format!(
                        "the writer did not finish: {e}"
                    )))
                });
        if let Err(e) = done {
            tracing::error!(credential = %name, error = %e, because = why, "cannot keep the refreshed token pair in a file while it waits for the store");
        }
    }

    /// Records a failed attempt: the state, the backoff (never shorter than
    /// the provider's Retry-After) and the error.
    pub(super) async fn fail(&self, ctx: &Ctx, entry: &Entry, cred: &Credential, s: Setback) {
        let state = s.state();
        let failures = cred.failures.saturating_add(1);
        let now = now_ms();
        let update = match s {
            Setback::Misconfigured { error, lease } => FailureUpdate {
                state,
                failures,
                next_attempt_at: None,
                error,
                not_before: None,
                lease,
                outcome_unknown: false,
                event: "misconfigured",
            },
            Setback::NeedsReauthorization { error, lease } => FailureUpdate {
                state,
                failures,
                next_attempt_at: None,
                error,
                not_before: None,
                lease: Some(lease),
                outcome_unknown: false,
                event: "needs_reauthorization",
            },
            Setback::Retry {
                error,
                retry_after,
                outcome_unknown,
                provider_down,
                lease,
                event,
            } => {
                if let Some(endpoint) = provider_down {
                    self.provider_failed(&cred.provider, endpoint, &cred.name);
                }
                let r = &ctx.config.refresh;
                let delay = backoff(
                    failures,
                    r.retry_initial,
                    r.retry_max,
                    retry_after,
                    fastrand::f64(),
                );
                FailureUpdate {
                    state,
                    failures,
                    next_attempt_at: Some(now + delay.as_millis() as i64),
                    error,
                    not_before: retry_after.map(|d| now + d.as_millis() as i64),
                    lease,
                    outcome_unknown,
                    event,
                }
            }
        };
        match update.next_attempt_at {
            Some(next) => tracing::warn!(
                credential = %cred.name, failures, retry_in = %crate::clock::span(next - now), error = %update.error,
                "transient failure; will retry"
            ),
            None => {
                tracing::error!(credential = %cred.name, state = state.as_str(), error = %update.error, "credential stopped")
            }
        }
        match self
            .store
            .record_failure(&cred.name, &self.holder, cred.token_at(), update)
            .await
        {
            Ok(Commit::Done(c)) => self.adopt_written(entry, *c).await,
            // About a token the row no longer holds: nothing of it is
            // recorded, and the files stay those of the row's token.
            Ok(Commit::Conflict) => return self.conflict(entry, &cred.name),
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
        if state == State::NeedsReauthorization {
            self.unpublish(&cred.name).await;
        }
    }

    /// Adopts the row a write left (a validation, a note, a failure). One
    /// whose refresh token was refused on reading (src/store/keys.rs
    /// `refuse`: planted, say, since the credential was last read) stops
    /// the credential here, and its files go with it.
    async fn adopt_written(&self, entry: &Entry, row: Credential) {
        let refused = row.grant == Grant::Refused;
        let name = row.name.clone();
        // Such a write lands only on the token it was about (`TokenAt`),
        // so its row holds the token published already; should it not,
        // the files follow the row.
        let changed = entry.adopt(row);
        if refused {
            self.unpublish(&name).await;
        } else if changed {
            let c = entry.cred();
            self.publish(&c).await;
        }
    }

    /// Gives back a lease under which nothing was sent: the row goes back
    /// to what it was, so that nobody takes it for an interrupted refresh.
    async fn give_back(&self, name: &str, fence: i64, before: &Credential) {
        if let Err(e) = self
            .store
            .abandon_lease(name, &self.holder, fence, before)
            .await
        {
            tracing::warn!(credential = %name, error = %e, "could not give back an unused lease");
        }
    }

    /// A result about a token the row no longer holds (it changed or went
    /// while the request was out): read the row again. The hold keeps a
    /// row that is somehow never taken (a clock stepped back between two
    /// creations of one name, docs/design.md §3) from being asked about in
    /// a loop; taking a new token lifts it (`Entry::adopt`).
    fn conflict(&self, entry: &Entry, name: &str) {
        entry.hold(now_ms() + STORE_RETRY.as_millis() as i64);
        self.enqueue(name, |p| p.reload = true);
    }

    pub(super) fn store_failed(&self, entry: &Entry, name: &str, e: &StoreError) {
        tracing::error!(credential = name, error = %e, "store operation failed; will try again");
        entry.hold(now_ms() + STORE_RETRY.as_millis() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewal is trusted only if it came back within half the lease's
    /// margin of its ask: the rest of the margin still covers the commit.
    #[test]
    fn a_renewal_answered_late_is_not_trusted() {
        let asked = Instant::now();
        assert!(renewed_in_time(asked, asked));
        assert!(renewed_in_time(asked, asked + LEASE_MARGIN / 2));
        assert!(!renewed_in_time(
            asked,
            asked + LEASE_MARGIN / 2 + Duration::from_millis(1)
        ));
        // A renewal answered after its whole lease, as a COMMIT held up by
        // an absent synchronous standby would be.
        assert!(!renewed_in_time(asked, asked + LEASE_MARGIN * 3));
    }
}
