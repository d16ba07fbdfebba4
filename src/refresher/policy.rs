//! The pure decisions of the refresher: whether a provider request may go
//! now, when a credential is next due, what a worker does with it, what may
//! be published, and the backoff. No tokio, no I/O: tests call them with
//! numbers.

use std::time::Duration;

use crate::config::RefreshConfig;
use crate::secret::Secret;
use crate::store::{Credential, State};

/// Whether a provider request for a credential may be sent now: the one
/// policy every path asks (the schedule, socket reads, forced refreshes, the
/// CLI without a daemon).
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    Go,
    /// Not before this instant (ms): the backoff of a `retrying` credential,
    /// the provider's Retry-After, or a hold (a peer's lease, a store failure).
    NotBefore(i64),
    /// `misconfigured` (until a reload) or `needs_reauthorization` (until
    /// someone authorizes again): nothing is sent.
    Stopped,
}

/// The policy behind [`Gate`]. `hold` is the entry's own hold (ms).
pub fn gate(c: &Credential, now: i64, hold: i64) -> Gate {
    if matches!(c.state, State::NeedsReauthorization | State::Misconfigured) {
        return Gate::Stopped;
    }
    let mut not_before = hold.max(c.not_before.unwrap_or(0));
    if c.state == State::Retrying {
        not_before = not_before.max(c.next_attempt_at.unwrap_or(0));
    }
    if not_before > now {
        Gate::NotBefore(not_before)
    } else {
        Gate::Go
    }
}

/// What one worker pass decided to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Do {
    Nothing,
    Validate,
    Refresh,
}

/// The access token consumers may be given now, if any: there is one, it
/// has not expired, and the grant is not known dead. Only ever an access
/// token: nothing here can hand out the refresh token in its place.
pub(super) fn publishable(c: &Credential, now: i64) -> Option<&Secret> {
    c.access_token
        .as_ref()
        .filter(|_| c.state != State::NeedsReauthorization && c.expires_at.is_none_or(|e| e > now))
}

/// When the token should be refreshed: `lead` (plus up to a quarter more, by
/// jitter) before expiry, but never in the first half of its lifetime, so a
/// provider that issues tokens shorter than the lead cannot drive a loop.
pub(super) fn refresh_at(c: &Credential, r: &RefreshConfig, jitter: f64) -> Option<i64> {
    if c.access_token.is_none() {
        return Some(0);
    }
    let exp = c.expires_at?;
    let lead = r.lead().as_millis() as f64;
    let early = exp - (lead * (1.0 + jitter / 4.0)) as i64;
    let half_life = c.issued_at + (exp - c.issued_at) / 2;
    Some(early.max(half_life))
}

/// What a worker does now with a credential.
pub(super) fn decide(
    c: &Credential,
    now: i64,
    r: &RefreshConfig,
    jitter: f64,
    validate: bool,
) -> Do {
    match c.state {
        State::NeedsReauthorization | State::Misconfigured => Do::Nothing,
        // Stored as refreshing but not ours: a refresh that a crash cut off
        // (or a peer's, whose lease will turn us away). Find out now, not
        // at the next expiry, whether the stored refresh token still works.
        State::Refreshing if c.refresh_started_at.is_some() => Do::Refresh,
        State::Retrying if c.next_attempt_at.is_some_and(|t| t > now) => Do::Nothing,
        _ if refresh_at(c, r, jitter).is_some_and(|t| t <= now) => Do::Refresh,
        // A failed refresh that is not due (a 401 on validation) re-checks first.
        State::Retrying => Do::Validate,
        _ if validate || c.last_validated_at.is_none() => Do::Validate,
        _ => Do::Nothing,
    }
}

/// When the scheduler should next look at a credential (ms), if ever.
pub(super) fn next_deadline(
    c: &Credential,
    now: i64,
    r: &RefreshConfig,
    jitter: f64,
) -> Option<i64> {
    let expiry = c
        .expires_at
        .filter(|&e| e > now && c.access_token.is_some());
    match c.state {
        State::NeedsReauthorization => None,
        // Only to take the files down when the token expires.
        State::Misconfigured => expiry,
        State::Retrying => {
            let retry = c.next_attempt_at.unwrap_or(now);
            Some(expiry.map_or(retry, |e| e.min(retry)))
        }
        State::Refreshing if c.refresh_started_at.is_some() => Some(now),
        State::Valid | State::Refreshing => {
            if c.last_validated_at.is_none() && c.access_token.is_some() {
                return Some(now);
            }
            let refresh = refresh_at(c, r, jitter);
            match (refresh, expiry) {
                (Some(t), _) => Some(t),
                (None, e) => e,
            }
        }
    }
}

/// Full jitter between `initial` and a cap that doubles with every failure up
/// to `max`; never sooner than the provider's Retry-After. The floor of
/// `initial` bounds the request rate of a long outage at one per `initial`.
pub fn backoff(
    failures: u32,
    initial: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    rnd: f64,
) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let cap = initial.saturating_mul(1u32 << exp).min(max).max(initial);
    let d = initial + (cap - initial).mul_f64(rnd.clamp(0.0, 1.0));
    d.max(retry_after.unwrap_or_default())
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;

    fn cred(issued: i64, expires: Option<i64>) -> Credential {
        Credential {
            name: "c".into(),
            provider: "p".into(),
            access_token: Some(Secret::new("a")),
            grant: crate::store::Grant::RefreshToken(Secret::new("r")),
            scope: None,
            expires_at: expires,
            issued_at: issued,
            state: State::Valid,
            failures: 0,
            next_attempt_at: None,
            last_error: None,
            last_refresh_at: None,
            last_validated_at: Some(issued),
            refresh_started_at: None,
            not_before: None,
            created_at: 0,
            updated_at: 0,
            version: 1,
            rev: 1,
        }
    }

    fn cfg(lead_s: u64) -> RefreshConfig {
        RefreshConfig {
            refresh_before_expiry: Duration::from_secs(lead_s),
            min_remaining: Duration::ZERO,
            ..RefreshConfig::default()
        }
    }

    #[test]
    fn refresh_is_due_lead_before_expiry_with_jitter() {
        let c = cred(0, Some(3600 * S));
        let r = cfg(600);
        assert_eq!(refresh_at(&c, &r, 0.0), Some(3000 * S));
        assert_eq!(refresh_at(&c, &r, 1.0), Some(2850 * S));
        assert_eq!(decide(&c, 2999 * S, &r, 0.0, false), Do::Nothing);
        assert_eq!(decide(&c, 3000 * S, &r, 0.0, false), Do::Refresh);
        assert_eq!(decide(&c, 100 * S, &r, 0.0, true), Do::Validate);
    }

    #[test]
    fn short_tokens_are_not_refreshed_in_their_first_half() {
        let c = cred(0, Some(10 * S));
        assert_eq!(refresh_at(&c, &cfg(600), 0.5), Some(5 * S));
    }

    #[test]
    fn min_remaining_extends_the_lead() {
        let c = cred(0, Some(3600 * S));
        let r = RefreshConfig {
            refresh_before_expiry: Duration::from_secs(60),
            min_remaining: Duration::from_secs(600),
            ..RefreshConfig::default()
        };
        assert_eq!(refresh_at(&c, &r, 0.0), Some(3000 * S));
    }

    #[test]
    fn no_access_token_means_refresh_now() {
        let mut c = cred(0, None);
        c.access_token = None;
        assert_eq!(decide(&c, 0, &cfg(600), 0.0, false), Do::Refresh);
    }

    #[test]
    fn stopped_states_do_nothing_and_retrying_waits() {
        let r = cfg(600);
        let mut c = cred(0, Some(3600 * S));
        c.state = State::NeedsReauthorization;
        assert_eq!(decide(&c, 3500 * S, &r, 0.0, true), Do::Nothing);
        assert_eq!(next_deadline(&c, 0, &r, 0.0), None);
        c.state = State::Misconfigured;
        assert_eq!(decide(&c, 3500 * S, &r, 0.0, true), Do::Nothing);
        assert_eq!(next_deadline(&c, 0, &r, 0.0), Some(3600 * S));
        c.state = State::Retrying;
        c.next_attempt_at = Some(100 * S);
        assert_eq!(decide(&c, 50 * S, &r, 0.0, true), Do::Nothing);
        assert_eq!(decide(&c, 100 * S, &r, 0.0, false), Do::Validate);
        assert_eq!(decide(&c, 3100 * S, &r, 0.0, false), Do::Refresh);
        assert_eq!(next_deadline(&c, 0, &r, 0.0), Some(100 * S));
    }

    #[test]
    fn an_interrupted_refresh_is_retried_at_once() {
        let mut c = cred(0, Some(3600 * S));
        c.state = State::Refreshing;
        c.refresh_started_at = Some(5);
        assert_eq!(decide(&c, 10 * S, &cfg(600), 0.0, false), Do::Refresh);
        assert_eq!(next_deadline(&c, 10 * S, &cfg(600), 0.0), Some(10 * S));
    }

    #[test]
    fn unknown_expiry_relies_on_validation() {
        let c = cred(0, None);
        assert_eq!(next_deadline(&c, 0, &cfg(600), 0.0), None);
        let mut fresh = c.clone();
        fresh.last_validated_at = None;
        assert_eq!(next_deadline(&fresh, 7, &cfg(600), 0.0), Some(7));
    }

    #[test]
    fn backoff_doubles_with_full_jitter_and_honours_retry_after() {
        let (i, m) = (Duration::from_secs(5), Duration::from_secs(900));
        assert_eq!(backoff(1, i, m, None, 1.0), i);
        assert_eq!(backoff(3, i, m, None, 1.0), Duration::from_secs(20));
        assert_eq!(backoff(3, i, m, None, 0.0), i);
        assert_eq!(backoff(30, i, m, None, 1.0), m);
        assert_eq!(
            backoff(100, i, m, None, 0.5),
            Duration::from_millis(452_500)
        );
        assert_eq!(
            backoff(1, i, m, Some(Duration::from_secs(60)), 0.3),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn publishable_only_while_alive() {
        let mut c = cred(0, Some(10 * S));
        assert!(publishable(&c, 5 * S).is_some_and(|t| t.expose() == "a"));
        assert!(publishable(&c, 10 * S).is_none());
        c.state = State::NeedsReauthorization;
        assert!(publishable(&c, 0).is_none());
        c.state = State::Valid;
        c.access_token = None;
        assert!(publishable(&c, 0).is_none());
    }
}
