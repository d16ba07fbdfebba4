//! `[[notify]]` rules (README "Notifications"): a command run when a
//! credential needs a human (its grant died, our side is misconfigured), keeps
//! failing, or is back.
//!
//! The refresher reports every row it adopts ([`transition`] decides, in the
//! one place a credential's state changes in memory, `Entry::adopt`); a task
//! of its own matches the rules, keeps the per-credential interval and runs
//! the commands, so a slow or hanging command never holds up a refresh.
//! Runs are bounded ([`MAX_RUNS`] at a time, each killed at its `timeout`),
//! get no token, and a failed one is logged once, never retried.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::config::{AlertEvent, Config, DEFAULT_CONFIG, NotifyRule};
use crate::publish::hook_command;
use crate::store::{Credential, State};

/// Commands running at once, all rules together: a provider outage that
/// stops ten thousand credentials queues their runs instead of forking them
/// all in the same second.
const MAX_RUNS: usize = 4;

/// What a credential went through since it last worked, kept between
/// adoptions so that `recovered` can tell whether anyone was told of trouble.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trouble {
    /// It was `needs_reauthorization` or `misconfigured` at some point.
    stopped: bool,
    /// The most consecutive failures it reached.
    peak: u32,
    /// Its last error.
    error: Option<String>,
}

impl Trouble {
    /// What a credential found in trouble at start has been through, as far
    /// as its row tells: so that its recovery is reported too.
    pub fn of(c: &Credential) -> Option<Trouble> {
        let stopped = matches!(c.state, State::NeedsReauthorization | State::Misconfigured);
        (stopped || c.state == State::Retrying).then(|| Trouble {
            stopped,
            peak: c.failures,
            error: c.last_error.clone(),
        })
    }
}

/// One change worth matching against the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub name: String,
    pub provider: String,
    pub event: AlertEvent,
    pub state: State,
    pub error: Option<String>,
    /// Consecutive failures before and after (for `recovered`: 0 and the
    /// peak the trouble reached).
    pub failures: (u32, u32),
    /// For `recovered`: whether the trouble included a stop.
    pub stopped: bool,
    /// A client_credentials credential has no grant to re-authorize: its
    /// fix is the provider's config, so no authorize line is offered.
    pub authorizable: bool,
}

/// What adopting `next` over `prev` means to the rules, if anything;
/// `trouble` is the credential's memory between calls. `recovered` needs
/// evidence of a good token (a refresh, a validation or a new token pair, as
/// `tokend authorize --force` brings), not just the state: a reload that
/// lets a `misconfigured` credential try again says `valid` before anything
/// worked.
pub fn transition(
    prev: &Credential,
    next: &Credential,
    trouble: &mut Option<Trouble>,
) -> Option<Change> {
    let change = |event, failures, stopped, error: Option<String>| Change {
        name: next.name.clone(),
        provider: next.provider.clone(),
        event,
        state: next.state,
        error,
        failures,
        stopped,
        // A refused refresh token is mended by authorizing again, too.
        authorizable: next.grant.kind() == crate::store::GrantKind::RefreshToken,
    };
    let mut note = |stop: bool| {
        let t = trouble.get_or_insert_with(Trouble::default);
        t.stopped |= stop;
        t.peak = t.peak.max(next.failures);
        t.error = next.last_error.clone().or(t.error.take());
    };
    match next.state {
        State::Refreshing => None,
        State::NeedsReauthorization | State::Misconfigured => {
            note(true);
            let event = match next.state {
                State::Misconfigured => AlertEvent::Misconfigured,
                _ => AlertEvent::NeedsReauthorization,
            };
            (prev.state != next.state).then(|| change(event, (0, 0), true, next.last_error.clone()))
        }
        State::Retrying => {
            note(false);
            let before = match prev.state {
                State::Retrying | State::Refreshing => prev.failures,
                _ => 0,
            };
            (next.failures > before).then(|| {
                change(
                    AlertEvent::Retrying,
                    (before, next.failures),
                    false,
                    next.last_error.clone(),
                )
            })
        }
        State::Valid => {
            let worked = next.version != prev.version
                || next.last_refresh_at != prev.last_refresh_at
                || next.last_validated_at != prev.last_validated_at;
            if !worked {
                return None;
            }
            let t = trouble.take()?;
            Some(change(
                AlertEvent::Recovered,
                (0, t.peak),
                t.stopped,
                t.error,
            ))
        }
    }
}

impl NotifyRule {
    /// Whether this rule runs for `c` (its interval aside). `retrying` when
    /// the failures reach `after`, not at each one past it; `recovered` only
    /// after trouble the rule's other events would have reported.
    pub fn wants(&self, c: &Change) -> bool {
        if !self.matches(&c.name) {
            return false;
        }
        let wanted = |e| self.events.contains(&e);
        match c.event {
            AlertEvent::Retrying => {
                wanted(c.event) && c.failures.0 < self.after && c.failures.1 >= self.after
            }
            AlertEvent::Recovered => wanted(c.event) && (c.stopped || c.failures.1 >= self.after),
            e => wanted(e),
        }
    }
}

enum Msg {
    Change(Change),
    Config(Arc<Config>),
}

/// The refresher's handle on the rules' runner. Cheap to clone.
#[derive(Clone)]
pub struct Alerts(Option<mpsc::UnboundedSender<Msg>>);

impl Alerts {
    /// For a refresher that runs no rules (`tokend refresh` without a daemon):
    /// a daemon that runs later does not notify for what it finds at start.
    pub fn none() -> Alerts {
        Alerts(None)
    }

    /// Must be called inside a tokio runtime: the runner is a task.
    pub fn start(config: Arc<Config>) -> Alerts {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(runner(config, rx));
        Alerts(Some(tx))
    }

    pub fn changed(&self, c: Change) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Msg::Change(c));
        }
    }

    /// New rules take effect for changes from now on; the intervals of
    /// commands that stay are kept.
    pub fn reload(&self, config: Arc<Config>) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Msg::Config(config));
        }
    }
}

/// A rule's run for one credential and event: the last one, per command.
type RunKey = (Vec<String>, String, AlertEvent);

async fn runner(mut config: Arc<Config>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut last: HashMap<RunKey, Instant> = HashMap::new();
    let slots = Arc::new(Semaphore::new(MAX_RUNS));
    while let Some(msg) = rx.recv().await {
        let c = match msg {
            Msg::Config(new) => {
                config = new;
                continue;
            }
            Msg::Change(c) => c,
        };
        for rule in config.notify.iter().filter(|r| r.wants(&c)) {
            let now = Instant::now();
            let key = (rule.command.clone(), c.name.clone(), c.event);
            if let Some(t) = last.get(&key)
                && now.duration_since(*t) < rule.interval
            {
                tracing::debug!(credential = %c.name, event = c.event.as_str(), rule = rule.index, "notification skipped: one ran within the interval");
                continue;
            }
            last.insert(key, now);
            let env = variables(&c, &config.path);
            tokio::spawn(run(
                rule.clone(),
                c.name.clone(),
                c.event,
                env,
                slots.clone(),
            ));
        }
        // Entries past every interval are of no use: the map stays as large
        // as the credentials that had trouble lately.
        if last.len() > 4096 {
            let longest = config.notify.iter().map(|r| r.interval).max();
            last.retain(|_, t| longest.is_some_and(|i| t.elapsed() < i));
        }
    }
}

/// The command's environment besides PATH and LANG: what happened, and the
/// command that brings a dead grant back (empty for a client_credentials
/// credential, which has none). Never a token or a secret.
pub fn variables(c: &Change, config: &Path) -> Vec<(&'static str, String)> {
    let authorize = if c.authorizable {
        authorize_command(&c.name, &c.provider, config)
    } else {
        String::new()
    };
    vec![
        ("TOKEND_CREDENTIAL", c.name.clone()),
        ("TOKEND_PROVIDER", c.provider.clone()),
        ("TOKEND_EVENT", c.event.as_str().to_owned()),
        ("TOKEND_STATE", c.state.as_str().to_owned()),
        // A NUL would make the variable impossible to pass.
        (
            "TOKEND_ERROR",
            c.error.clone().unwrap_or_default().replace('\0', ""),
        ),
        ("TOKEND_AUTHORIZE", authorize),
    ]
}

/// `tokend authorize NAME --provider P --force`, with `--config PATH` when
/// the config is not the default one: the command that brings a dead grant
/// back, as every hint gives it, ready to paste.
pub fn authorize_command(name: &str, provider: &str, config: &Path) -> String {
    let mut authorize = format!(
        "tokend authorize {} --provider {} --force",
        quoted(name),
        quoted(provider)
    );
    if config != Path::new(DEFAULT_CONFIG) {
        let path = std::path::absolute(config).unwrap_or_else(|_| PathBuf::from(config));
        authorize.push_str(" --config ");
        authorize.push_str(&quoted(&path.to_string_lossy()));
    }
    authorize
}

/// `s` as one shell word: as is when it needs no quoting.
fn quoted(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:@=+,%".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs a rule's command once, with no shell, a cleared environment (but
/// PATH and LANG, as hooks get) and the rule's timeout. A failure is logged
/// once: a notification that fails must not become a loop.
async fn run(
    rule: Arc<NotifyRule>,
    name: String,
    event: AlertEvent,
    env: Vec<(&'static str, String)>,
    slots: Arc<Semaphore>,
) {
    let Ok(_slot) = slots.acquire_owned().await else {
        return;
    };
    let event = event.as_str();
    let program = &rule.command[0];
    let mut cmd = hook_command(&rule.command, env);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(credential = %name, event, rule = rule.index, program = %program, error = %e, "notify command could not start");
            return;
        }
    };
    match tokio::time::timeout(rule.timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            tracing::info!(credential = %name, event, rule = rule.index, program = %program, "notify command ran");
        }
        Ok(Ok(status)) => {
            tracing::warn!(credential = %name, event, rule = rule.index, program = %program, %status, "notify command failed; not retried");
        }
        Ok(Err(e)) => {
            tracing::warn!(credential = %name, event, rule = rule.index, program = %program, error = %e, "notify command failed; not retried");
        }
        Err(_) => {
            let _ = child.kill().await;
            tracing::warn!(credential = %name, event, rule = rule.index, program = %program, timeout = ?rule.timeout, "notify command timed out and was killed; not retried");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn cred(state: State, failures: u32) -> Credential {
        Credential {
            name: "bot".into(),
            provider: "fake".into(),
            access_token: Some(Secret::new("t")),
            grant: crate::store::Grant::RefreshToken(Secret::new("r")),
            scope: None,
            expires_at: None,
            issued_at: 0,
            state,
            failures,
            next_attempt_at: None,
            last_error: (failures > 0).then(|| format!("failure {failures}")),
            last_refresh_at: None,
            last_validated_at: None,
            refresh_started_at: None,
            not_before: None,
            created_at: 0,
            updated_at: 0,
            version: 1,
            rev: 1,
        }
    }

    fn rule(events: &[AlertEvent]) -> NotifyRule {
        NotifyRule {
            index: 0,
            credentials: vec!["*".into()],
            events: events.to_vec(),
            command: vec!["/bin/true".into()],
            timeout: std::time::Duration::from_secs(30),
            interval: std::time::Duration::from_secs(3600),
            after: 3,
        }
    }

    #[test]
    fn retrying_fires_when_failures_reach_after_and_recovered_follows() {
        let r = rule(&[AlertEvent::Retrying, AlertEvent::Recovered]);
        let mut trouble = None;
        let mut prev = cred(State::Valid, 0);
        let mut fired = Vec::new();
        for n in 1..=5 {
            let next = cred(State::Retrying, n);
            if let Some(c) = transition(&prev, &next, &mut trouble)
                && r.wants(&c)
            {
                fired.push((c.event, n));
            }
            prev = next;
        }
        assert_eq!(fired, [(AlertEvent::Retrying, 3)]);
        // Back to valid without evidence (nothing changed but the state): nothing.
        let reset = cred(State::Valid, 0);
        assert_eq!(transition(&prev, &reset, &mut trouble.clone()), None);
        let mut ok = cred(State::Valid, 0);
        ok.last_validated_at = Some(1);
        let c = transition(&prev, &ok, &mut trouble).unwrap();
        assert_eq!(
            (c.event, c.failures, c.error.as_deref()),
            (AlertEvent::Recovered, (0, 5), Some("failure 5"))
        );
        assert!(r.wants(&c));
        assert_eq!(trouble, None);
    }

    #[test]
    fn a_blip_under_after_recovers_silently() {
        let r = rule(&[AlertEvent::Retrying, AlertEvent::Recovered]);
        let mut trouble = None;
        let c = transition(
            &cred(State::Valid, 0),
            &cred(State::Retrying, 1),
            &mut trouble,
        )
        .unwrap();
        assert!(!r.wants(&c));
        let mut ok = cred(State::Valid, 0);
        ok.version = 2;
        let c = transition(&cred(State::Retrying, 1), &ok, &mut trouble).unwrap();
        assert!(!r.wants(&c), "one failure is not worth a recovery notice");
    }

    #[test]
    fn a_stop_fires_once_and_its_recovery_always_counts() {
        let r = rule(&[AlertEvent::NeedsReauthorization, AlertEvent::Recovered]);
        let mut trouble = None;
        let dead = cred(State::NeedsReauthorization, 1);
        let c = transition(&cred(State::Valid, 0), &dead, &mut trouble).unwrap();
        assert_eq!(c.event, AlertEvent::NeedsReauthorization);
        assert!(r.wants(&c));
        assert_eq!(transition(&dead, &dead, &mut trouble), None);
        let mut back = cred(State::Valid, 0);
        back.version = 2;
        let c = transition(&dead, &back, &mut trouble).unwrap();
        assert!(c.stopped && r.wants(&c));
    }

    #[test]
    fn the_authorize_line_quotes_what_needs_it() {
        let c = transition(
            &cred(State::Valid, 0),
            &cred(State::Misconfigured, 1),
            &mut None,
        )
        .unwrap();
        let vars: HashMap<_, _> = variables(&c, Path::new(DEFAULT_CONFIG))
            .into_iter()
            .collect();
        assert_eq!(
            vars["TOKEND_AUTHORIZE"],
            "tokend authorize bot --provider fake --force"
        );
        let vars: HashMap<_, _> = variables(&c, Path::new("/etc/my tokend.toml"))
            .into_iter()
            .collect();
        assert_eq!(
            vars["TOKEND_AUTHORIZE"],
            "tokend authorize bot --provider fake --force --config '/etc/my tokend.toml'"
        );
        assert_eq!(vars["TOKEND_STATE"], "misconfigured");
        assert_eq!(vars["TOKEND_ERROR"], "failure 1");
    }

    #[test]
    fn a_client_credentials_credential_gets_no_authorize_line() {
        let mut machine = cred(State::Misconfigured, 1);
        machine.grant = crate::store::Grant::ClientCredentials;
        let c = transition(&cred(State::Valid, 0), &machine, &mut None).unwrap();
        let vars: HashMap<_, _> = variables(&c, Path::new(DEFAULT_CONFIG))
            .into_iter()
            .collect();
        assert_eq!(vars["TOKEND_AUTHORIZE"], "");
        assert_eq!(vars["TOKEND_EVENT"], "misconfigured");
    }
}
