//! The provider chaos figures (issue 6, item 2): `cargo bench --bench chaos`.
//!
//! 1. **Herd**: 1,000 credentials whose tokens were issued at the same
//!    moment with the same lifetime, so that all expire in the same second.
//!    The refresh start times, from the fake provider's request records,
//!    show how the jitter (invariant 7 of docs/design.md) spreads them: offsets
//!    from the earliest instant a refresh may start (expiry − 1.25 × lead),
//!    min, p50, p90, max, the busiest second, and a histogram by second.
//! 2. **Outage**: credentials that need a refresh while the provider answers
//!    every request with 503, for a window (10 minutes by default). The
//!    requests sent are compared with the backoff's bound (one per
//!    `retry_initial`) and with what the backoff is expected to send (its own
//!    function, simulated 10,000 times over the same window). Meanwhile a
//!    consumer reads every credential's token over the daemon's socket
//!    (`GET /v1/tokens/NAME`, every 5 s by default) and forces a refresh
//!    of each (`POST /v1/credentials/NAME/refresh`, every 30 s): during the
//!    backoff those must be answered from what is known and send nothing,
//!    so the requests stay at the backoff's expectation; provider requests
//!    that arrive while such a call is open are counted by route. Then the
//!    provider returns, and the time each credential takes to recover is
//!    measured against what the recovery nudge (one success brings the
//!    provider's other credentials forward, within 5 s) is expected to give
//!    (simulated the same way) and against the last delay's cap.
//!
//! Both run with the daemon's default `[refresh]` settings unless told
//! otherwise. Environment:
//!
//! * TOKEND_CHAOS_HERD (default 1000) credentials in the herd; 0 skips it;
//! * TOKEND_CHAOS_HERD_LEAD (default "10m", the default
//!   `refresh_before_expiry`; `min_remaining` is set no larger, so that this
//!   is the lead): the jitter window is a quarter of it;
//! * TOKEND_CHAOS_OUTAGE_SECS (default 600) the outage window; 0 skips it;
//! * TOKEND_CHAOS_OUTAGE_CREDENTIALS (default 10);
//! * TOKEND_CHAOS_READ_EVERY (default "5s") how often the consumer reads
//!   each credential's token during the outage; "0s" sends no on-demand
//!   traffic at all (a control run);
//! * TOKEND_CHAOS_FORCE_EVERY (default "30s") how often it also forces a
//!   refresh of each; "0s" forces none;
//! * TOKEND_CHAOS_RETRY_INITIAL, TOKEND_CHAOS_RETRY_MAX (defaults "5s", "15m").
//!
//! Prints a Markdown report to stdout; BENCHMARKS.md holds the latest one.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::{Daemon, Env, Fault, FaultTarget, Knobs, QUIET_SWEEP, wait_for};

/// PandaDoc's token lifetime: what the herd's tokens were issued with.
const LIFETIME_SECS: i64 = 31_535_999;
/// Outages simulated to find the backoff's expected request count.
const TRIALS: usize = 10_000;
/// RECOVERY_SPREAD in src/refresher.rs: how soon after one credential's
/// success the provider's other `retrying` credentials are tried again.
const RECOVERY_SPREAD: Duration = Duration::from_secs(5);
/// The goal for the median time to recover after the provider returns.
const RECOVERY_GOAL: Duration = Duration::from_secs(30);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_duration(name: &str, default: &str) -> Duration {
    let v = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    humantime::parse_duration(&v).unwrap_or_else(|e| panic!("{name}={v:?}: {e}"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let herd = env_u64("TOKEND_CHAOS_HERD", 1000) as usize;
    let lead = env_duration("TOKEND_CHAOS_HERD_LEAD", "10m");
    let outage = Duration::from_secs(env_u64("TOKEND_CHAOS_OUTAGE_SECS", 600));
    let outage_n = env_u64("TOKEND_CHAOS_OUTAGE_CREDENTIALS", 10) as usize;
    let initial = env_duration("TOKEND_CHAOS_RETRY_INITIAL", "5s");
    let max = env_duration("TOKEND_CHAOS_RETRY_MAX", "15m");
    let traffic = OnDemand {
        read_every: env_duration("TOKEND_CHAOS_READ_EVERY", "5s"),
        force_every: env_duration("TOKEND_CHAOS_FORCE_EVERY", "30s"),
    };
    println!("## Provider chaos benchmark\n");
    println!(
        "Machine: {} cores; run: {}\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    if herd > 0 {
        herd_spread(herd, lead);
    }
    if !outage.is_zero() && outage_n > 0 {
        outage_requests(outage_n, outage, initial, max, traffic);
    }
}

/// A bench environment (the fake provider with `knobs`; a config with no
/// sinks, no validation sweep to speak of, and `refresh` lines added to
/// `[refresh]`), its store filled by `fill`, and a daemon started on it.
fn start(knobs: Knobs, refresh: &str, fill: impl FnOnce(&Env)) -> (Env, Daemon) {
    let env = Env::bench(knobs);
    env.write_config(&format!("[refresh]\n{QUIET_SWEEP}\n{refresh}\n"), "");
    fill(&env);
    let daemon = Daemon::start_with(&env, "chaos", |cmd, _| {
        cmd.env("RUST_LOG", "error").stderr(Stdio::inherit());
    });
    (env, daemon)
}

/// The value at quantile `q` of sorted `v`.
fn quantile<T: Copy>(v: &[T], q: f64) -> T {
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn herd_spread(n: usize, lead: Duration) {
    let p0 = now_ms();
    let lead_ms = lead.as_millis() as i64;
    // All expire in the same second; the earliest refresh (jitter 1: a
    // quarter of the lead early) is due 5 s after the daemon starts.
    let expires = (now_ms() + lead_ms * 5 / 4 + 5_000) / 1000 * 1000;
    let issued = expires - LIFETIME_SECS * 1000;
    let earliest = expires - lead_ms * 5 / 4;
    // min_remaining (default 60 s) also lengthens the lead: keep it within.
    let refresh = format!(
        "refresh_before_expiry = \"{}\"\nmin_remaining = \"{}\"",
        humantime::format_duration(lead),
        humantime::format_duration(lead.min(Duration::from_secs(60)))
    );
    let (env, daemon) = start(Knobs::default(), &refresh, |env| {
        env.seed(n, Some(expires));
        // Raw SQL on purpose (Env::raw_store): these tokens were issued a
        // lifetime before they expire, and validated; an import stores
        // neither (it takes now as the start of the lifetime, and leaves
        // the validation to the daemon, a thousand requests at start-up).
        env.raw_store()
            .execute(
                "UPDATE credentials SET issued_at = ?1, last_validated_at = ?2",
                [issued, now_ms()],
            )
            .unwrap();
    });
    let provider = &env.provider;
    let window = lead / 4;
    wait_for(
        "every credential refreshed",
        window + Duration::from_secs(120),
        || (provider.stats().refreshes_ok as usize >= n).then_some(()),
    );
    drop(daemon);
    // Request records are in ms since the provider started (just after p0).
    let mut offsets: Vec<i64> = provider
        .requests()
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
        .map(|r| p0 + r.at_ms as i64 - earliest)
        .collect();
    offsets.sort_unstable();
    assert_eq!(offsets.len(), n, "one refresh per credential");
    let seconds = (window.as_secs() as usize).max(1) + 1;
    let mut histogram = vec![0usize; seconds];
    for o in &offsets {
        histogram[((o / 1000).max(0) as usize).min(seconds - 1)] += 1;
    }
    let peak = histogram.iter().copied().max().unwrap_or(0);
    let s = |ms: i64| format!("{:.1} s", ms as f64 / 1000.0);
    println!(
        "### Herd: {n} credentials expiring in the same second (lead {}, jitter window {})\n",
        humantime::format_duration(lead),
        humantime::format_duration(window)
    );
    println!(
        "Offsets of the refresh requests from the earliest allowed start (expiry − 1.25 × lead):\n"
    );
    println!("| measure | result | without jitter |");
    println!("|---|---|---|");
    println!(
        "| min / p50 / p90 / max | {} / {} / {} / {} | all in one second |",
        s(offsets[0]),
        s(quantile(&offsets, 0.5)),
        s(quantile(&offsets, 0.9)),
        s(offsets[n - 1])
    );
    println!(
        "| busiest second | {peak} refreshes ({:.1} % of {n}) | {n} |",
        100.0 * peak as f64 / n as f64
    );
    println!(
        "| mean per second over the window | {:.1} | — |",
        n as f64 / window.as_secs_f64()
    );
    println!(
        "| seconds with no refresh, inside the window | {} of {} | — |",
        histogram[..seconds - 1].iter().filter(|c| **c == 0).count(),
        seconds - 1
    );
    println!("\nHistogram, refreshes per second from the earliest allowed start:\n");
    println!("```");
    for (row, chunk) in histogram.chunks(15).enumerate() {
        let cells: Vec<String> = chunk.iter().map(|c| format!("{c:3}")).collect();
        println!("{:4}s {}", row * 15, cells.join(" "));
    }
    println!("```\n");
}

/// One credential through an outage of `window`, against the daemon's own
/// backoff: the requests sent in the window, and how long after its end the
/// next attempt comes.
fn simulate_one(window: Duration, initial: Duration, max: Duration) -> (usize, Duration) {
    let (mut t, mut n) = (Duration::ZERO, 0);
    while t < window {
        n += 1;
        t += tokend::refresher::backoff(n as u32, initial, max, None, fastrand::f64());
    }
    (n, t - window)
}

/// Simulates outages of `window` against the daemon's own backoff: the
/// request counts of `TRIALS` runs, sorted.
fn simulated_counts(window: Duration, initial: Duration, max: Duration) -> Vec<usize> {
    let mut counts: Vec<usize> = (0..TRIALS)
        .map(|_| simulate_one(window, initial, max).0)
        .collect();
    counts.sort_unstable();
    counts
}

/// Simulates `TRIALS` outages of `window` for `n` credentials of one
/// provider: the median time to recover (ms) of each, sorted, with the
/// recovery nudge (the first success brings the others forward to within
/// RECOVERY_SPREAD) and without it (each waits out its backoff).
fn simulated_recovery(
    n: usize,
    window: Duration,
    initial: Duration,
    max: Duration,
) -> (Vec<u64>, Vec<u64>) {
    let spread = RECOVERY_SPREAD.as_millis() as u64;
    let (mut nudged, mut plain): (Vec<u64>, Vec<u64>) = (0..TRIALS)
        .map(|_| {
            let mut r: Vec<u64> = (0..n)
                .map(|_| simulate_one(window, initial, max).1.as_millis() as u64)
                .collect();
            r.sort_unstable();
            let first = r[0];
            let mut with: Vec<u64> = r
                .iter()
                .map(|&t| {
                    if t <= first + spread {
                        t
                    } else {
                        first + (spread as f64 * fastrand::f64()) as u64
                    }
                })
                .collect();
            with.sort_unstable();
            (quantile(&with, 0.5), quantile(&r, 0.5))
        })
        .unzip();
    nudged.sort_unstable();
    plain.sort_unstable();
    (nudged, plain)
}

/// The consumer's on-demand traffic during the outage.
#[derive(Clone, Copy)]
struct OnDemand {
    /// Every credential's token is read this often (zero: no traffic).
    read_every: Duration,
    /// A refresh of every credential is also forced this often (zero: none).
    force_every: Duration,
}

/// One on-demand call over the daemon's socket.
struct Call {
    /// `POST /v1/credentials/NAME/refresh`; otherwise `GET /v1/tokens/NAME`.
    force: bool,
    /// When it was sent and answered, in ms on the bench's clock.
    sent_ms: u64,
    done_ms: u64,
    /// The HTTP status; 0 when no answer came.
    status: u16,
    /// A forced refresh's `"refreshed"`.
    refreshed: Option<bool>,
    /// Requests the provider received while the call was open.
    provider_requests: u64,
}

/// One HTTP/1.1 request over the daemon's Unix socket, on a connection of
/// its own: the status and the body.
fn socket_request(socket: &Path, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    // A call that starts or joins a refresh waits for it (request_timeout).
    support::socket_request(socket, method, path, &[], b"", Duration::from_secs(120))
        .map(|r| (r.status, r.text()))
}

/// Reads each of the `n` credentials' tokens every `read_every`, one
/// credential at a time at an even pace, and forces a refresh of each every
/// `force_every` (right after one of its reads, staggered), until `until`
/// on `clock` (ms): at most window / read_every reads per credential.
/// `received` counts the requests the provider has received.
fn on_demand(
    socket: &Path,
    n: usize,
    traffic: OnDemand,
    clock: impl Fn() -> u64,
    until: u64,
    received: impl Fn() -> u64,
) -> Vec<Call> {
    let mut calls = Vec::new();
    if traffic.read_every.is_zero() {
        return calls;
    }
    let tick = (traffic.read_every.as_millis() as u64 / n as u64).max(1);
    // Forced refreshes: one round of reads in `rounds`, per credential.
    let rounds = (traffic.force_every.as_millis() as u64)
        .div_ceil(traffic.read_every.as_millis() as u64)
        .max(1);
    let start = clock();
    for j in 0.. {
        let at = start + j * tick;
        if at >= until {
            break;
        }
        std::thread::sleep(Duration::from_millis(at.saturating_sub(clock())));
        let (i, round) = (j as usize % n, j / n as u64);
        let force = !traffic.force_every.is_zero() && round % rounds == i as u64 % rounds;
        let name = format!("user-{i:05}");
        let mut call = |force: bool, method: &str, path: String| {
            let before = received();
            let sent_ms = clock();
            let answer = socket_request(socket, method, &path);
            let done_ms = clock();
            let provider_requests = received() - before;
            if provider_requests > 0 {
                eprintln!(
                    "{provider_requests} provider request(s) arrived during {method} {path} (answered in {} ms)",
                    done_ms - sent_ms
                );
            }
            let (status, body) = answer.unwrap_or_else(|e| {
                eprintln!("on-demand {method} {path}: {e}");
                (0, String::new())
            });
            let refreshed = force
                .then(|| serde_json::from_str::<serde_json::Value>(&body).ok())
                .flatten()
                .and_then(|v| v["refreshed"].as_bool());
            calls.push(Call {
                force,
                sent_ms,
                done_ms,
                status,
                refreshed,
                provider_requests,
            });
        };
        call(false, "GET", format!("/v1/tokens/{name}"));
        if force {
            call(true, "POST", format!("/v1/credentials/{name}/refresh"));
        }
    }
    calls
}

fn outage_requests(
    n: usize,
    window: Duration,
    initial: Duration,
    max: Duration,
    traffic: OnDemand,
) {
    let p0 = Instant::now();
    let knobs = Knobs {
        fault: Some(Fault::Status503),
        fault_on: FaultTarget::Both,
        ..Knobs::default()
    };
    let provider_ms = || p0.elapsed().as_millis() as u64;
    let refresh = format!(
        "retry_initial = \"{}\"\nretry_max = \"{}\"",
        humantime::format_duration(initial),
        humantime::format_duration(max)
    );
    // Each needs a refresh now (no access token).
    let (env, daemon) = start(knobs, &refresh, |env| env.seed(n, None));
    let provider = &env.provider;
    wait_for("the first request", Duration::from_secs(60), || {
        (provider.stats().token_requests > 0).then_some(())
    });
    let first = provider.requests()[0].at_ms;
    eprintln!(
        "outage: {n} credentials, {} window, started",
        humantime::format_duration(window)
    );
    let calls = on_demand(
        &env.socket,
        n,
        traffic,
        provider_ms,
        first + window.as_millis() as u64,
        || {
            let s = provider.stats();
            s.token_requests + s.validations
        },
    );
    let elapsed = Duration::from_millis(provider_ms().saturating_sub(first));
    std::thread::sleep(window.saturating_sub(elapsed));
    provider.update_knobs(|k| k.fault = None);
    let end = provider_ms();
    let in_window: Vec<_> = provider
        .requests()
        .into_iter()
        .filter(|r| r.at_ms < first + window.as_millis() as u64)
        .collect();
    // Provider requests that arrived while an on-demand call was open: a
    // call that starts a refresh waits for its answer, so any it caused is
    // among these (as is a scheduled one it merely joined, or one that
    // happened to arrive meanwhile).
    let open = |force: bool| -> u64 {
        calls
            .iter()
            .filter(|c| c.force == force)
            .map(|c| c.provider_requests)
            .sum()
    };
    let (open_reads, open_forced) = (open(false), open(true));
    let in_window = in_window.len();
    let failures: Vec<u32> = env
        .store()
        .unwrap()
        .load_all()
        .unwrap()
        .iter()
        .map(|c| c.failures)
        .collect();
    let max_failures = failures.iter().copied().max().unwrap_or(0);
    let cap = tokend::refresher::backoff(max_failures, initial, max, None, 1.0);
    eprintln!("outage over; waiting for recovery (at most {cap:?})");
    wait_for(
        "every credential recovered",
        cap + Duration::from_secs(60),
        || (provider.stats().refreshes_ok as usize >= n).then_some(()),
    );
    drop(daemon);
    let mut recovery: Vec<u64> = provider
        .requests()
        .iter()
        .filter(|r| r.status == 200 && r.at_ms >= end)
        .map(|r| r.at_ms - end)
        .collect();
    recovery.sort_unstable();
    let sim = simulated_counts(window, initial, max);
    let (sim_recovery, sim_plain) = simulated_recovery(n, window, initial, max);
    let minutes = window.as_secs_f64() / 60.0;
    let per_cred = in_window as f64 / n as f64;
    let bound = (window.as_secs_f64() / initial.as_secs_f64()).floor() + 1.0;
    let s = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
    println!(
        "### Outage: {n} credentials due, the provider answering 503 for {} (retry_initial {}, retry_max {})\n",
        humantime::format_duration(window),
        humantime::format_duration(initial),
        humantime::format_duration(max)
    );
    let expected = sim.iter().sum::<usize>() as f64 / TRIALS as f64;
    println!("| measure | result | bound / expected |");
    println!("|---|---|---|");
    if traffic.read_every.is_zero() {
        println!("| on-demand calls during the outage | none (TOKEND_CHAOS_READ_EVERY=0s) | — |");
    } else {
        for force in [false, true] {
            let mine: Vec<&Call> = calls.iter().filter(|c| c.force == force).collect();
            if mine.is_empty() {
                continue;
            }
            let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
            for c in &mine {
                *statuses.entry(c.status).or_default() += 1;
            }
            let statuses: Vec<String> = statuses
                .iter()
                .map(|(status, k)| format!("{k} × {status}"))
                .collect();
            let mut took: Vec<u64> = mine.iter().map(|c| c.done_ms - c.sent_ms).collect();
            took.sort_unstable();
            let (route, every, extra) = if force {
                let refreshed = mine.iter().filter(|c| c.refreshed == Some(true)).count();
                (
                    "POST /v1/credentials/NAME/refresh",
                    traffic.force_every,
                    format!(", `\"refreshed\": true` in {refreshed}"),
                )
            } else {
                ("GET /v1/tokens/NAME", traffic.read_every, String::new())
            };
            println!(
                "| on-demand `{route}`, every {} per credential | {} calls: {}{extra}; answered in {} ms median, {} ms max | — |",
                humantime::format_duration(every),
                mine.len(),
                statuses.join(", "),
                quantile(&took, 0.5),
                took[took.len() - 1]
            );
        }
        println!(
            "| provider requests that arrived while an on-demand call was open | {} (GET {open_reads}, POST {open_forced}) | none of their own: during the backoff they send nothing; a call that comes as an attempt the backoff has due starts joins it (or is the one to send it) |",
            open_reads + open_forced
        );
    }
    println!(
        "| requests per credential in the window | {per_cred:.1} | bound {bound:.0} (one per retry_initial); backoff expects {expected:.1} (p1 {}, p99 {}) |",
        quantile(&sim, 0.01),
        quantile(&sim, 0.99)
    );
    println!(
        "| requests per outage minute, per credential | {:.2} | bound {:.1}; backoff expects {:.2} |",
        per_cred / minutes,
        bound / minutes,
        expected / minutes
    );
    println!(
        "| requests per outage minute, all {n} | {:.1} | — |",
        in_window as f64 / minutes
    );
    println!(
        "| time to recover after the provider returns: min / median / max | {} / {} / {} | goal: median ≤ {}; median expected {} (p1 {}, p99 {}; ≤ {} in {:.0} % of simulated outages) with the recovery nudge, {} waiting out each backoff; the last delay's cap: {} |",
        s(recovery[0]),
        s(quantile(&recovery, 0.5)),
        s(recovery[recovery.len() - 1]),
        humantime::format_duration(RECOVERY_GOAL),
        s(quantile(&sim_recovery, 0.5)),
        s(quantile(&sim_recovery, 0.01)),
        s(quantile(&sim_recovery, 0.99)),
        humantime::format_duration(RECOVERY_GOAL),
        100.0
            * sim_recovery
                .iter()
                .filter(|m| **m <= RECOVERY_GOAL.as_millis() as u64)
                .count() as f64
            / TRIALS as f64,
        s(quantile(&sim_plain, 0.5)),
        humantime::format_duration(Duration::from_secs(cap.as_secs()))
    );
    println!();
}
