//! Issue 12, "A fleet shares its credentials through PostgreSQL": three
//! `tokend run` daemons ("hosts": each its own host name, runtime
//! directory, sink and socket; `support/fleet.rs`) on one throwaway
//! PostgreSQL database, against the fake provider in strict rotation (a
//! rotated-out refresh token presented again revokes the whole grant).
//!
//! * `sigkilled_hosts_lose_no_rotation_and_leases_are_taken_over`: 1,000
//!   credentials of 5-second tokens while hosts are SIGKILLed and
//!   restarted at random;
//! * `a_database_restart_loses_no_rotation_and_publishes_nothing_uncommitted`:
//!   the database stopped and started again under hosts refreshing.
//!
//! Both need root (each host's own host name is a UTS namespace) and
//! PostgreSQL (`support/pg.rs`).
//!
//! How long: `TOKEND_FLEET_SECS` (default 30) is how long the hosts are
//! killed and restarted; the issue's full run is ten minutes:
//!
//! ```sh
//! TOKEND_FLEET_SECS=600 cargo test --test pg_fleet -- --nocapture sigkilled
//! ```
//!
//! The kill schedule comes from a seeded generator whose seed is printed
//! (`TOKEND_FLEET_SEED=N`); setting it replays the schedule (the daemons'
//! own timing is not replayed). The figures (refreshes, kills, takeover
//! times) are printed on stderr: `-- --nocapture` shows them.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::fleet::{Host, can_name_hosts};
use support::pg::Server;
use support::*;

/// One fleet at a time: two tests' six hosts at once would measure the
/// machine, not tokend.
static ONE_FLEET: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_fleet() -> std::sync::MutexGuard<'static, ()> {
    ONE_FLEET.lock().unwrap_or_else(|e| e.into_inner())
}

/// `request_timeout` in the hosts' config.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A lease lives `request_timeout` + 10 s (README, "How it keeps its
/// promises"; `LEASE_MARGIN` in src/refresher/attempt.rs).
const LEASE: Duration = Duration::from_secs(REQUEST_TIMEOUT.as_secs() + 10);
/// What a takeover may take beyond the lease, on a loaded machine: the
/// taker looks again every `retry_initial` (500 ms), then refreshes.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(10);
/// The tokens' lifetime during the run.
const LIFETIME_SECS: u64 = 5;
/// The provider's usual latency (before a request is processed).
const LATENCY_MS: u64 = 50;
/// Its latency while a kill is prepared: see [`Fleet::kill`].
const FREEZE_MS: u64 = 2000;
/// The most a kill may come after the freeze began: requests that arrived
/// after it are processed no sooner than FREEZE_MS after it.
const KILL_BY: Duration = Duration::from_millis(1500);

fn refresh_section() -> String {
    format!(
        "[refresh]\n{QUIET_SWEEP}\nrefresh_before_expiry = \"2s\"\nmin_remaining = \"1s\"\n\
         retry_initial = \"500ms\"\nretry_max = \"2s\"\nrequest_timeout = \"{}s\"\n\
         max_concurrency = 32\n",
        REQUEST_TIMEOUT.as_secs()
    )
}

fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A connection to the test's database that comes back after a restart.
struct Pg {
    config: postgres::Config,
    client: Option<postgres::Client>,
}

impl Pg {
    fn new(config: postgres::Config) -> Pg {
        Pg {
            config,
            client: None,
        }
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(self.config.connect(postgres::NoTls)?);
        }
        let r = self.client.as_mut().unwrap().query(sql, params);
        if r.is_err() {
            self.client = None;
        }
        r
    }

    /// `query`, which must succeed.
    fn rows(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Vec<postgres::Row> {
        self.query(sql, params)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// name → (access token, refresh token, version), as committed.
    fn committed(&mut self) -> Result<HashMap<String, (String, String, i64)>, postgres::Error> {
        Ok(self
            .query(
                "SELECT name, access_token, refresh_token, version FROM credentials",
                &[],
            )?
            .iter()
            .map(|r| {
                let access: Option<String> = r.get(1);
                (r.get(0), (access.unwrap_or_default(), r.get(2), r.get(3)))
            })
            .collect())
    }
}

/// The hosts, their database and provider. Fields drop in order: the
/// daemons first, the provider, the server last.
struct Fleet {
    hosts: Vec<Host>,
    env: Env,
    pg: Pg,
    db: String,
    /// Credential name → the provider's grant id.
    grants: BTreeMap<String, u64>,
    names: Vec<String>,
    server: Server,
}

impl Fleet {
    /// `hosts` hosts on a fresh database holding `credentials` credentials
    /// of 5-second tokens, all published on every host. None when the
    /// test may not run here (and may skip).
    fn start(hosts: usize, credentials: usize) -> Option<Fleet> {
        if !can_name_hosts()
            && skip("a fleet test gives each host its own host name (a UTS namespace): root")
        {
            return None;
        }
        let server = Server::start()?;
        let url = server.fresh_db();
        let db = url
            .split_once("@/")
            .and_then(|(_, rest)| rest.split_once('?'))
            .unwrap()
            .0
            .to_owned();
        // Imported with the provider's year-long tokens, which tokend is
        // told expire 10 to 40 s later: every file is published at start,
        // and the first refreshes come spread out. From then on the
        // provider issues 5-second tokens.
        let env = Env::bare(Knobs::default());
        let hosts: Vec<Host> = (1..=hosts)
            .map(|i| Host::new(&format!("fleet-{i}"), &env, &url, &refresh_section()))
            .collect();
        let mut grants = BTreeMap::new();
        let mut lines = String::new();
        for i in 0..credentials {
            let name = format!("c{i:04}");
            let g = env
                .provider
                .mint_grant(env.provider.client_id(), "read+write");
            lines.push_str(
                &serde_json::json!({
                    "name": name, "provider": "fake", "refresh_token": g.refresh_token,
                    "access_token": g.access_token, "expires_in": 10 + i % 31,
                })
                .to_string(),
            );
            lines.push('\n');
            grants.insert(name, g.grant_id);
        }
        // The harness's own input, which the Env's audit leaves alone.
        let batch = env.dir.path().join("fleet.jsonl");
        std::fs::write(&batch, lines).unwrap();
        let out = hosts[0].cli(&["import", "--from", &batch.display().to_string()], "");
        assert!(
            out.status.success(),
            "import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names: Vec<String> = grants.keys().cloned().collect();
        let pg = Pg::new(server.config(&db));
        let mut fleet = Fleet {
            hosts,
            env,
            pg,
            db,
            grants,
            names,
            server,
        };
        for h in &mut fleet.hosts {
            h.start();
        }
        for h in &mut fleet.hosts {
            let deadline = Instant::now() + Duration::from_secs(60);
            while h.published(&fleet.names) < credentials {
                let exited = h.daemon.as_mut().unwrap().child.try_wait().unwrap();
                if exited.is_some() || Instant::now() > deadline {
                    panic!(
                        "{} published {} of {credentials} files ({exited:?}); its log ends:\n{}",
                        h.name,
                        h.published(&fleet.names),
                        tail(&h.logs(), 30)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        fleet.env.provider.update_knobs(|k| {
            k.latency_ms = LATENCY_MS;
            k.token_lifetime_secs = LIFETIME_SECS;
        });
        Some(fleet)
    }

    fn provider(&self) -> &FakeProvider {
        &self.env.provider
    }

    /// Backends connected to the test's database, other than ours.
    /// The database connections of `host`'s daemons, told by the
    /// `application_name` tokend gives them (`tokend HOST/PID/START/PLACE`).
    fn backends_of(&mut self, host: usize) -> i64 {
        let db = self.db.clone();
        let name = format!("tokend {}%", self.hosts[host].holder_prefix());
        self.pg.rows(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE $2",
            &[&db, &name],
        )[0]
        .get(0)
    }

    /// Credentials whose lease a holder of `host` holds, with their
    /// committed refresh token and version.
    fn leased_by(&mut self, host: usize) -> Vec<(String, String, i64, i64, String)> {
        let prefix = format!("{}%", self.hosts[host].holder_prefix());
        let now = now_ms();
        self.pg
            .rows(
                "SELECT c.name, c.refresh_token, c.version,
                    l.expires_at - (extract(epoch FROM clock_timestamp()) * 1000)::bigint, l.holder
                 FROM leases l JOIN credentials c USING (name) WHERE l.holder LIKE $1",
                &[&prefix],
            )
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    now + r.get::<_, i64>(3),
                    r.get(4),
                )
            })
            .collect()
    }

    /// SIGKILLs host `victim` while it holds leases on credentials whose
    /// requests wait at the provider, and returns those credentials with
    /// their committed versions, when their leases expire (this
    /// machine's clock, in ms since the epoch) and the dead holder's id;
    /// None when the moment could not be made
    /// (the host is then left running).
    ///
    /// A kill between the provider's rotation and the commit loses the
    /// rotated refresh token with the process that held it, whatever the
    /// client does: README "A crash at any line" (the one loss no client
    /// can prevent; the next holder's try of the stored refresh token is a
    /// reuse, which revokes the grant). Kills are kept out of that window
    /// only: the provider's latency goes up to FREEZE_MS, so that requests
    /// arriving from then on wait before they are processed (a request
    /// whose client dies while it waits is never processed); once every
    /// credential the victim holds a lease on has its rotation committed
    /// (the stored refresh token is the provider's current one), the kill
    /// comes, within KILL_BY of the freeze. Everything else is at random:
    /// leases being taken, requests waiting, files being written, peers'
    /// changes being read.
    fn kill(&mut self, victim: usize) -> Option<Vec<(String, i64, i64, String)>> {
        self.provider().update_knobs(|k| k.latency_ms = FREEZE_MS);
        let frozen = Instant::now();
        let settled = Duration::from_millis(LATENCY_MS + 100);
        let ready = loop {
            if frozen.elapsed() >= settled {
                let leased = self.leased_by(victim);
                let uncommitted = leased.iter().any(|(name, refresh, ..)| {
                    let g = self.provider().grant(self.grants[name]).unwrap();
                    g.refresh_token != *refresh
                });
                if !uncommitted {
                    break frozen.elapsed() < KILL_BY;
                }
            }
            if frozen.elapsed() >= KILL_BY {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if ready {
            // SIGKILL and reap, before anything else.
            let d = self.hosts[victim].daemon.as_mut().unwrap();
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        self.provider().update_knobs(|k| k.latency_ms = LATENCY_MS);
        if !ready {
            return None;
        }
        // Its log and status audited (Daemon's Drop), then its last
        // transaction settled: once its connections are gone, its leases
        // are what the database keeps.
        self.hosts[victim].kill9();
        wait_for(
            "the killed host's database connections to close",
            Duration::from_secs(10),
            || (self.backends_of(victim) == 0).then_some(()),
        );
        Some(
            self.leased_by(victim)
                .into_iter()
                .map(|(name, _, version, free_at, holder)| (name, version, free_at, holder))
                .collect(),
        )
    }

    /// Ends the run: every host running, tokens an hour long from the next
    /// refresh on, every credential refreshed once more, and every host's
    /// file of every credential the committed token. Returns the committed
    /// rows.
    fn settle(&mut self) -> HashMap<String, (String, String, i64)> {
        for h in &mut self.hosts {
            if !h.running() {
                h.start();
            }
        }
        let before: HashMap<u64, u64> = self
            .grants
            .values()
            .map(|id| (*id, self.provider().grant(*id).unwrap().rotations))
            .collect();
        self.provider().update_knobs(|k| {
            k.token_lifetime_secs = 3600;
            k.latency_ms = 0;
        });
        wait_for(
            "every credential refreshed once with an hour-long token",
            Duration::from_secs(180),
            || {
                before
                    .iter()
                    .all(|(id, r)| self.provider().grant(*id).unwrap().rotations > *r)
                    .then_some(())
            },
        );
        let mut pg = Pg::new(self.server.config(&self.db));
        let hosts = &self.hosts;
        wait_for(
            "every host's files to hold the committed tokens",
            Duration::from_secs(60),
            || {
                let committed = pg.committed().ok()?;
                let behind = committed
                    .iter()
                    .filter(|(name, (access, _, _))| {
                        hosts
                            .iter()
                            .any(|h| h.read_token(name).as_ref() != Some(access))
                    })
                    .count();
                (behind == 0).then_some(committed)
            },
        )
    }

    /// What the database and the hosts' logs say about credential `name`,
    /// and how far behind the fleet is: for a failure's message.
    fn explain(&mut self, name: &str) -> String {
        let now = now_ms();
        let row = self.pg.rows(
            "SELECT state, version, refresh_started_at - $2, next_attempt_at - $2,
                expires_at - $2, last_error FROM credentials WHERE name = $1",
            &[&name, &now],
        );
        let lease = self.pg.rows(
            "SELECT holder, expires_at - (extract(epoch FROM clock_timestamp()) * 1000)::bigint
             FROM leases WHERE name = $1",
            &[&name],
        );
        let behind: i64 = self.pg.rows(
            "SELECT count(*) FROM credentials WHERE expires_at < $1",
            &[&now],
        )[0]
        .get(0);
        let mut text = format!(
            "row (state, version, ms since the refresh started, ms to the next attempt, \
             ms to expiry, last error): {:?}\nlease (holder, ms left): {:?}\n\
             credentials whose token expired unrefreshed: {behind} of {}\nhosts running: {:?}\n",
            row.first().map(|r| (
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, Option<i64>>(2),
                r.get::<_, Option<i64>>(3),
                r.get::<_, Option<i64>>(4),
                r.get::<_, Option<String>>(5)
            )),
            lease
                .first()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))),
            self.grants.len(),
            self.hosts
                .iter()
                .filter(|h| h.running())
                .map(|h| &h.name)
                .collect::<Vec<_>>()
        );
        let needle = format!("credential={name} ");
        for h in &self.hosts {
            let logs = h.logs();
            let lines: Vec<&str> = logs.lines().filter(|l| l.contains(&needle)).collect();
            text += &format!(
                "{} log, last lines naming {name}:\n{}\n",
                h.name,
                lines[lines.len().saturating_sub(6)..].join("\n")
            );
        }
        text
    }

    /// Fails at once when the provider saw a refresh token reused: the
    /// first sign of two refreshers of one grant, checked all along (a
    /// revoked grant stops refreshing, which a later wait would report
    /// less clearly).
    fn assert_no_reuse(&self, when: &str) {
        let stats = self.provider().stats();
        assert_eq!(
            (stats.reuse_detected, stats.grants_revoked),
            (0, 0),
            "{when}, the provider saw refresh tokens reused: {stats:?}"
        );
    }

    /// What a fleet must never do, checked at the end: reuse a refresh
    /// token (the provider saw none and revoked no grant), lose a rotation
    /// (every stored refresh token is its grant's current one), or publish
    /// a token the provider does not accept.
    fn assert_sound(&self, committed: &HashMap<String, (String, String, i64)>) {
        let stats = self.provider().stats();
        assert_eq!(
            (stats.reuse_detected, stats.grants_revoked),
            (0, 0),
            "the provider saw refresh tokens reused: {stats:?}"
        );
        for (name, id) in &self.grants {
            let g = self.provider().grant(*id).unwrap();
            assert!(g.alive, "{name}'s grant died: {:?}", g.revoked_reason);
            assert!(
                committed[name].1 == g.refresh_token,
                "{name}: the database does not hold the current refresh token"
            );
            for h in &self.hosts {
                let token = h.read_token(name).unwrap_or_default();
                assert!(
                    self.provider().access_token_valid(&token),
                    "{}'s file of {name} holds a token the provider refuses",
                    h.name
                );
            }
        }
    }
}

/// A takeover under way: a credential whose lease a killed host held.
struct Pending {
    name: String,
    version: i64,
    victim: usize,
    killed: Instant,
    /// When its lease expires, in ms since the epoch.
    free_at: i64,
    /// The dead holder.
    holder: String,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Issue 12: "zero refresh-token reuse over 10 minutes of 5-second tokens
/// while hosts are SIGKILLed and restarted at random; every host's files
/// hold a token the provider accepts; a killed host's leases are taken
/// over within the lease time."
///
/// Three hosts refresh 1,000 credentials of 5-second tokens (about 350
/// refreshes a second between them) for TOKEND_FLEET_SECS (default 30; 600
/// for the issue's ten minutes). Every 2 to 8 s a running host is
/// SIGKILLed (never the last one), with leases held on requests that wait
/// at the provider ([`Fleet::kill`]), and started again 5 to 30 s later
/// (the first one killed with leases only once they expired).
/// For each lease the killed host held (whose expiry must be within the
/// lease time), the credential must be taken over (refreshed: its version
/// moves; or leased by another holder, who may be killed in turn) by
/// another host when the killed one is still down, by its restarted self
/// (which sees its old pid gone) otherwise: within TAKEOVER_MARGIN of the
/// lease's expiry, or, while the surviving hosts are behind (here they
/// are: two busy cores do not refresh 1,000 5-second tokens in time), no
/// later than every other token that expired by then (see
/// `check_pending`). At the end, with every host
/// running and a last refresh of each credential: the provider saw no
/// reuse and revoked nothing, the database holds every grant's current
/// refresh token, and every host's file of every credential holds the
/// committed token, which the provider accepts.
///
/// Seen failing (issue 12, item 3), each break made by hand and reverted:
/// * host 3 given a database of its own (`server.fresh_db()`, the same
///   batch imported there too), so that two hosts refresh the same grants:
///   "7.0s into the run, the provider saw refresh tokens reused: Stats {
///   … reuse_detected: 1, grants_revoked: 1 … }";
/// * the killed host's leases never freed (the test pushed their expiry
///   10 minutes on in the database right after the kill): "c0068 (leased
///   by the killed fleet-1) was not refreshed within 10s of its lease's
///   expiry (32.5s after the kill), though the surviving hosts refreshed
///   every other token that expired by then" (with 620 of 1,000 tokens
///   expired unrefreshed at that moment: the rule holds a fleet that is
///   behind too).
#[test]
fn sigkilled_hosts_lose_no_rotation_and_leases_are_taken_over() {
    let _one = one_fleet();
    let started = Instant::now();
    let Some(mut fleet) = Fleet::start(3, 1000) else {
        return;
    };
    let secs = env_u64("TOKEND_FLEET_SECS", 30);
    let mut rng = seeded("TOKEND_FLEET_SEED");
    eprintln!(
        "fleet of 3 hosts, 1000 credentials, ready after {:.1?}; killing for {secs} s",
        started.elapsed()
    );
    let refreshes_before = fleet.provider().stats().refreshes_ok;
    let run = Instant::now();
    let end = run + Duration::from_secs(secs);
    let mut next_kill = run + Duration::from_millis(rng.u64(2000..=8000));
    let mut restart_at: Vec<Option<Instant>> = vec![None; fleet.hosts.len()];
    let mut pending: Vec<Pending> = Vec::new();
    // (time from kill to the next refresh, by another host)
    let mut takeovers: Vec<(Duration, bool, i64)> = Vec::new();
    let (mut kills, mut unmade) = (0, 0);
    let mut takeover_shown = false;

    let check_pending = |fleet: &mut Fleet,
                         pending: &mut Vec<Pending>,
                         takeovers: &mut Vec<(Duration, bool, i64)>| {
        if pending.is_empty() {
            return;
        }
        let names: Vec<String> = pending.iter().map(|p| p.name.clone()).collect();
        // (version, lease holder) of each
        let now: HashMap<String, (i64, Option<String>)> = fleet
            .pg
            .rows(
                "SELECT c.name, c.version, l.holder FROM credentials c
                 LEFT JOIN leases l USING (name) WHERE c.name = ANY($1)",
                &[&names],
            )
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        fleet.assert_no_reuse(&format!("{:.1?} into the run", run.elapsed()));
        pending.retain(|p| {
            // Taken over: refreshed since, or leased by another holder
            // (who may be killed in turn: then it is pending again, as
            // that host's lease).
            let (version, holder) = &now[&p.name];
            if *version > p.version || holder.as_ref().is_some_and(|h| *h != p.holder) {
                takeovers.push((
                    p.killed.elapsed(),
                    !fleet.hosts[p.victim].running(),
                    now_ms() - p.free_at,
                ));
                return false;
            }
            true
        });
        // A lease freed is taken at the taker's next look (every
        // `retry_initial`), as soon as the surviving hosts have room: a
        // fleet that keeps up refreshes it within TAKEOVER_MARGIN of the
        // lease's expiry; one that is behind (this machine cannot refresh
        // 1,000 5-second tokens in time on two busy cores), no later than
        // it refreshes the others' tokens that expired by then. So it is
        // late once the oldest token of the others expires later than its
        // lease did, plus the margin.
        let oldest: Option<i64> = fleet.pg.rows(
            "SELECT min(expires_at) FROM credentials WHERE name <> ALL($1)",
            &[&names],
        )[0]
        .get(0);
        let margin = TAKEOVER_MARGIN.as_millis() as i64;
        let now = now_ms();
        if let Some(p) = pending
            .iter()
            .find(|p| now > p.free_at + margin && oldest.unwrap_or(i64::MAX) > p.free_at + margin)
        {
            let victim = fleet.hosts[p.victim].name.clone();
            panic!(
                "{} (leased by the killed {victim}) was not refreshed within {TAKEOVER_MARGIN:?} \
                 of its lease's expiry ({:.1?} after the kill), though the surviving hosts \
                 refreshed every other token that expired by then\n{}",
                p.name,
                p.killed.elapsed(),
                fleet.explain(&p.name)
            );
        }
    };

    while Instant::now() < end {
        for (i, at) in restart_at.iter_mut().enumerate() {
            if at.is_some_and(|t| Instant::now() >= t) {
                fleet.hosts[i].start();
                *at = None;
            }
        }
        fleet.assert_no_reuse(&format!("{:.1?} into the run", run.elapsed()));
        check_pending(&mut fleet, &mut pending, &mut takeovers);
        let running: Vec<usize> = (0..fleet.hosts.len())
            .filter(|i| fleet.hosts[*i].running())
            .collect();
        if Instant::now() >= next_kill && running.len() >= 2 {
            // Until a takeover by another host is shown, the host with the
            // most leases: one just restarted may hold none yet, and a run
            // whose every kill found none would show nothing.
            let victim = if takeover_shown {
                running[rng.usize(..running.len())]
            } else {
                *running
                    .iter()
                    .max_by_key(|i| fleet.leased_by(**i).len())
                    .unwrap()
            };
            match fleet.kill(victim) {
                Some(leased) => {
                    kills += 1;
                    eprintln!(
                        "{:>6.1?}: SIGKILLed {} holding {} leases",
                        run.elapsed(),
                        fleet.hosts[victim].name,
                        leased.len()
                    );
                    let killed = Instant::now();
                    let leased_now = leased.len();
                    let lease_ms = LEASE.as_millis() as i64 + 1000;
                    for (name, _, free_at, _) in &leased {
                        assert!(
                            *free_at <= now_ms() + lease_ms,
                            "{name}'s lease runs longer than the lease time"
                        );
                    }
                    pending.extend(leased.into_iter().map(|(name, version, free_at, holder)| {
                        Pending {
                            name,
                            version,
                            free_at,
                            holder,
                            victim,
                            killed,
                        }
                    }));
                    // The first host killed with leases stays down until
                    // they must have been taken over by another; the others
                    // come back before or after their leases expire (a
                    // restarted host sees its old pid gone and takes them).
                    let down = if takeover_shown || leased_now == 0 {
                        Duration::from_millis(rng.u64(5000..=30_000))
                    } else {
                        takeover_shown = true;
                        LEASE + TAKEOVER_MARGIN + Duration::from_secs(1)
                    };
                    restart_at[victim] = Some(killed + down);
                }
                None => unmade += 1,
            }
            next_kill = Instant::now() + Duration::from_millis(rng.u64(2000..=8000));
        }
        // Pacing, not synchronisation: the loop looks about ten times a second.
        std::thread::sleep(Duration::from_millis(100));
    }
    // The takeovers still under way, the killed hosts still down.
    wait_for("the last takeovers", Duration::from_secs(180), || {
        check_pending(&mut fleet, &mut pending, &mut takeovers);
        pending.is_empty().then_some(())
    });
    let refreshes = fleet.provider().stats().refreshes_ok - refreshes_before;
    let committed = fleet.settle();
    fleet.assert_sound(&committed);

    let mut times: Vec<Duration> = takeovers.iter().map(|t| t.0).collect();
    times.sort();
    let by_others = takeovers.iter().filter(|t| t.1).count();
    let past_expiry = takeovers.iter().map(|t| t.2).max().unwrap_or(0);
    let pct = |p: usize| times.get((times.len() * p / 100).min(times.len().saturating_sub(1)));
    eprintln!(
        "{secs} s: {refreshes} refreshes, {kills} kills ({unmade} moments not made), \
         {} takeovers ({by_others} by another host): min {:.1?}, median {:.1?}, \
         p90 {:.1?}, max {:.1?} after the kill (lease {LEASE:?}), at most {past_expiry} ms \
         after the lease's expiry; whole test {:.1?}",
        times.len(),
        times.first(),
        pct(50),
        pct(90),
        times.last(),
        started.elapsed()
    );
    assert!(kills > 0, "no host was killed");
    assert!(
        by_others > 0,
        "no lease of a killed host was taken over by another host"
    );
}

/// Issue 12: "The database restarted under them: no lost rotation, the
/// hosts reconnect, nothing published that is not committed."
///
/// Three hosts refresh 300 credentials of 5-second tokens; a watcher reads
/// the committed rows every 100 ms (every access token the database ever
/// held, as far as it sees) and every host's files every 250 ms (every
/// token ever published). Once the fleet is busy, the server is stopped
/// as a crash would stop it, left down for 3 s (refreshes whose answers
/// came meanwhile must be committed later, not lost) and started again.
/// Then a credential imported after the restart must reach every host's
/// file within 25 s (before the 30 s full re-read: the hosts' connections
/// and LISTENs came back). At the end, as in the kill test: no reuse, no
/// revoked grant, every grant's current refresh token stored, every file
/// the committed token; and no token was published before that which
/// the watcher did not see committed.
///
/// Seen failing (issue 12, item 3), each break made by hand and reverted:
/// * host 3 given a database of its own holding the same credentials (as
///   in the kill test): "before the restart, the provider saw refresh
///   tokens reused: Stats { … reuse_detected: 1, grants_revoked: 1 … }";
/// * the same with the provider not rotating refresh tokens (so that no
///   reuse is seen): "timed out after 25s waiting for the import after
///   the restart in fleet-3's file", and, with host 3 left out of that
///   wait, "fleet-3 published a token of c0163 that the database never
///   held (the watcher missed 0 versions)".
#[test]
fn a_database_restart_loses_no_rotation_and_publishes_nothing_uncommitted() {
    let _one = one_fleet();
    let started = Instant::now();
    let Some(mut fleet) = Fleet::start(3, 300) else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let mut pg = Pg::new(fleet.server.config(&fleet.db));
        let sinks: Vec<(String, std::path::PathBuf)> = fleet
            .hosts
            .iter()
            .map(|h| (h.name.clone(), h.tokens.clone()))
            .collect();
        let names = fleet.names.clone();
        std::thread::spawn(move || {
            let mut committed: HashSet<String> = HashSet::new();
            let mut published: HashMap<String, (String, String)> = HashMap::new();
            let mut versions: HashMap<String, i64> = HashMap::new();
            let mut missed = 0;
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if let Ok(rows) = pg.committed() {
                    for (name, (access, _, version)) in rows {
                        let last = versions.insert(name, version).unwrap_or(version);
                        if version > last + 1 {
                            missed += 1;
                        }
                        committed.insert(access);
                    }
                }
                if round.is_multiple_of(3) {
                    for (host, dir) in &sinks {
                        for name in &names {
                            if let Ok(t) = std::fs::read_to_string(dir.join(name)) {
                                published
                                    .entry(t)
                                    .or_insert_with(|| (host.clone(), name.clone()));
                            }
                        }
                    }
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            // One last look at the database, after the last files.
            if let Ok(rows) = pg.committed() {
                committed.extend(rows.into_values().map(|r| r.0));
            }
            (committed, published, missed)
        })
    };
    let busy = fleet.provider().stats().refreshes_ok + 600;
    wait_for(
        "the fleet to refresh 600 times",
        Duration::from_secs(60),
        || {
            fleet.assert_no_reuse("before the restart");
            (fleet.provider().stats().refreshes_ok >= busy).then_some(())
        },
    );
    let before = fleet.provider().stats().refreshes_ok;
    fleet.server.restart_after(Duration::from_secs(3));
    let back = Instant::now();
    eprintln!(
        "database restarted after {} refreshes ({:.1?} in)",
        before,
        started.elapsed()
    );

    // A change made after the restart reaches every host.
    let g = fleet
        .provider()
        .mint_grant(fleet.provider().client_id(), "read+write");
    let out = fleet.hosts[0].cli(
        &[
            "import",
            "after",
            "--provider",
            "fake",
            "--refresh-token",
            "-",
        ],
        &g.refresh_token,
    );
    assert!(
        out.status.success(),
        "import after the restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.grants.insert("after".into(), g.grant_id);
    let imported = Instant::now();
    let mut reached = Vec::new();
    for h in &fleet.hosts {
        wait_for(
            &format!("the import after the restart in {}'s file", h.name),
            Duration::from_secs(25),
            || h.read_token("after").map(|_| ()),
        );
        reached.push(imported.elapsed());
    }
    eprintln!(
        "imported {:.1?} after the restart; in each host's file {reached:.1?} after the import",
        imported - back
    );
    let reached = back.elapsed();
    let busy = fleet.provider().stats().refreshes_ok + 300;
    wait_for(
        "the fleet to refresh again after the restart",
        Duration::from_secs(60),
        || {
            fleet.assert_no_reuse("after the restart");
            (fleet.provider().stats().refreshes_ok >= busy).then_some(())
        },
    );

    // Everything published up to now was committed first; from here on
    // `settle` waits for every file to hold the committed token.
    stop.store(true, Ordering::SeqCst);
    let (seen_committed, published, missed) = watcher.join().unwrap();
    for (token, (host, name)) in &published {
        assert!(
            seen_committed.contains(token),
            "{host} published a token of {name} that the database never held \
             (the watcher missed {missed} versions)"
        );
    }
    let committed = fleet.settle();
    fleet.assert_sound(&committed);
    let count = |needle: &str| -> usize {
        fleet
            .hosts
            .iter()
            .map(|h| h.logs().matches(needle).count())
            .sum()
    };
    let commit_retries = count("cannot store the refreshed token pair; retrying");
    let relistened = count("listening for other hosts' changes again");
    eprintln!(
        "{} refreshes in all; after the restart, every host had the new import within {reached:.1?}; \
         {} tokens published, {} committed seen ({missed} versions unseen); \
         {commit_retries} commits retried, {relistened} LISTENs made again; whole test {:.1?}",
        fleet.provider().stats().refreshes_ok,
        published.len(),
        seen_committed.len(),
        started.elapsed()
    );
}
