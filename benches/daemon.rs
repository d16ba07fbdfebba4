//! The benchmark command: `cargo bench --bench daemon`.
//!
//! Measures, against baselines taken in the same run:
//!
//! 1. **Sweep**: 10,000 credentials all due at once, the fake provider
//!    answering after 20 ms, `max_concurrency = 64`. The ideal is
//!    10,000 × 20 ms / 64; the baseline is a bare reqwest client sending the
//!    same 10,000 refresh requests, 64 at a time, to the same provider:
//!    what this machine can do without tokend's store, files and scheduling.
//!    Run without sinks, with a raw file sink on the disk, and with one on
//!    tmpfs (/dev/shm, as a systemd host's /run) where there is one.
//! 2. **RSS** of the daemon holding those 10,000 credentials.
//! 3. **Idle**: nothing due; CPU seconds and context switches of the daemon
//!    over a measured window, scaled to an hour and a minute.
//!
//! Environment: TOKEND_BENCH_CREDENTIALS (default 10000),
//! TOKEND_BENCH_IDLE_SECS (default 60). Prints a Markdown report to stdout;
//! BENCHMARKS.md holds the latest one.
//!
//! With TOKEND_BENCH_INSTRUCTIONS set, the bench instead counts the
//! instructions the daemon runs in user space per refresh, under
//! valgrind's callgrind: a fresh store of 1,000 and then 3,000 credentials
//! all due at start, no sinks, the provider answering at once; the
//! difference of the two counts divided by 2,000, so that start-up and
//! shutdown cancel out. The count moves by well under 1 % between runs,
//! where a sweep's seconds move by far more: it is the figure to compare
//! two builds' refresh path with (BENCHMARKS.md, "Store").

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use support::bench::{
    baseline_client, callgrind_total, memory, under_callgrind, valgrind_present, wait_committed,
};
use support::{Daemon, Env, Knobs, QUIET_SWEEP, wait_for};

const LATENCY_MS: u64 = 20;
const CONCURRENCY: usize = 64;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let n = env_or("TOKEND_BENCH_CREDENTIALS", 10_000) as usize;
    let idle_secs = env_or("TOKEND_BENCH_IDLE_SECS", 60);
    if std::env::var_os("TOKEND_BENCH_INSTRUCTIONS").is_some() {
        return instructions();
    }
    let ideal = Duration::from_millis(n as u64 * LATENCY_MS) / CONCURRENCY as u32;
    println!(
        "## Daemon benchmark ({n} credentials, {LATENCY_MS} ms provider latency, max_concurrency {CONCURRENCY})\n"
    );
    println!(
        "Machine: {} cores; run: {}\n",
        cores(),
        humantime::format_rfc3339_seconds(SystemTime::now())
    );

    let baseline = baseline_client(n, LATENCY_MS, CONCURRENCY);
    let plain = sweep(n, Sink::None, 0);
    let sinks = sweep(n, Sink::Disk, idle_secs);
    let replacing = sweep(n, Sink::DiskReplacing, 0);
    let tmpfs = Path::new(TMPFS).is_dir().then(|| sweep(n, Sink::Tmpfs, 0));

    println!("| measure | result | ratio |");
    println!("|---|---|---|");
    println!(
        "| ideal sweep (n × latency / concurrency) | {:.3} s | 1.00 |",
        ideal.as_secs_f64()
    );
    println!(
        "| baseline: bare reqwest client, same requests | {:.3} s | {:.2} × ideal |",
        baseline.as_secs_f64(),
        ratio(baseline, ideal)
    );
    let mut sweeps = vec![
        ("tokend sweep, no sinks", &plain),
        ("tokend sweep, raw file sink, first files", &sinks),
        ("tokend sweep, raw file sink, replacing files", &replacing),
    ];
    if let Some(t) = &tmpfs {
        sweeps.push(("tokend sweep, raw file sink on tmpfs (as /run)", t));
    }
    for (label, s) in sweeps {
        println!(
            "| {label} | {:.3} s | {:.2} × ideal, {:.2} × baseline |",
            s.sweep.as_secs_f64(),
            ratio(s.sweep, ideal),
            ratio(s.sweep, baseline)
        );
    }
    for (label, s) in [("no sinks", &plain), ("raw file sink", &sinks)] {
        println!(
            "| RSS holding {n} credentials ({label}) | {:.1} MiB now, {:.1} MiB peak | goal ≤ 40 MiB |",
            s.rss_mib, s.hwm_mib
        );
    }
    if let Some(idle) = &sinks.idle {
        println!(
            "| idle CPU (measured over {idle_secs} s) | {:.3} s per hour | goal < 2 |",
            idle.cpu_per_hour
        );
        println!(
            "| idle context switches | {:.0} per minute | |",
            idle.switches_per_minute
        );
    }
    println!();
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// Credentials refreshed in the two runs that `instructions` compares.
const COUNTED: [usize; 2] = [1_000, 3_000];

/// Instructions per refresh (module doc).
fn instructions() {
    if !valgrind_present() {
        println!("valgrind is not installed (apt-get install valgrind): no instruction count");
        return;
    }
    let mut totals = Vec::new();
    for n in COUNTED {
        let env = Env::bench(Knobs::default());
        env.write_config(
            &format!("[refresh]\nmax_concurrency = {CONCURRENCY}\n{QUIET_SWEEP}\n"),
            "",
        );
        env.seed(n, None);
        let out = env.dir.path().join("sweep.callgrind");
        let mut run = env.tokend(&["run"]);
        run.env("RUST_LOG", "warn");
        let mut daemon = under_callgrind(&run, &out).spawn().unwrap();
        wait_committed(&env.provider, &env.raw_store(), n, 0);
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
        assert!(
            daemon.wait().unwrap().success(),
            "the daemon under callgrind failed"
        );
        assert_eq!(
            env.provider.stats().refreshes_ok as usize,
            n,
            "one refresh each"
        );
        totals.push(callgrind_total(&out));
    }
    let per = (totals[1] - totals[0]) as f64 / (COUNTED[1] - COUNTED[0]) as f64;
    println!(
        "## Instructions per refresh (callgrind, user space; {} and {} credentials due at start, no sinks)\n",
        COUNTED[0], COUNTED[1]
    );
    println!("| measure | instructions |");
    println!("|---|---|");
    println!("| per refresh | {per:.0} |\n");
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

struct SweepResult {
    sweep: Duration,
    rss_mib: f64,
    hwm_mib: f64,
    idle: Option<Idle>,
}

struct Idle {
    cpu_per_hour: f64,
    switches_per_minute: f64,
}

/// Where the sweep's raw file sink writes, if anywhere.
#[derive(Clone, Copy, PartialEq)]
enum Sink {
    None,
    /// The bench's temporary directory, on the disk; each file is new.
    Disk,
    /// The same, but each credential starts with a live token inside its
    /// refresh window, published at start-up: the sweep replaces every
    /// file, as a daemon's every later rotation does, and the file system
    /// deletes each file replaced.
    DiskReplacing,
    /// A directory under [`TMPFS`]: a systemd host's /run is tmpfs, where
    /// an fsync costs nothing, so this is the publishing path's CPU alone.
    Tmpfs,
}

const TMPFS: &str = "/dev/shm";

fn sweep(n: usize, at: Sink, idle_secs: u64) -> SweepResult {
    let env = Env::bench(Knobs {
        latency_ms: LATENCY_MS,
        ..Knobs::default()
    });
    let shm = (at == Sink::Tmpfs).then(|| tempfile::tempdir_in(TMPFS).unwrap());
    let tokens = shm
        .as_ref()
        .map_or(env.tokens.clone(), |d| d.path().to_owned());
    let sink = match at {
        Sink::None => String::new(),
        _ => format!(
            "[[sinks]]\npath = \"{}/{{name}}\"\nformat = \"raw\"\nmode = \"0640\"\n",
            tokens.display()
        ),
    };
    env.write_config(
        &format!("[refresh]\nmax_concurrency = {CONCURRENCY}\n{QUIET_SWEEP}\n"),
        &sink,
    );
    // Each needs a refresh now (no access token, or one that expires within
    // `refresh_before_expiry` but is still served). One transaction:
    // importing ten thousand one by one would only time our fsyncs.
    let seeded = (at == Sink::DiskReplacing).then(|| tokend::clock::now_ms() + 300_000);
    env.seed(n, seeded);
    if seeded.is_some() {
        // Issued an hour ago: tokend never refreshes a token in the first
        // half of its life (README, "What tokend does").
        env.raw_store()
            .execute("UPDATE credentials SET issued_at = issued_at - 3600000", [])
            .unwrap();
    }

    let mut daemon = Daemon::start_with(&env, "bench", |cmd, _| {
        cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
    });
    let started = Instant::now();
    wait_for("the first refresh request", Duration::from_secs(60), || {
        (env.provider.stats().refresh_requests > 0).then_some(())
    });
    let first = Instant::now();
    let conn = env.raw_store();
    wait_committed(&env.provider, &conn, n, seeded.unwrap_or(0));
    let sweep = first.elapsed();
    eprintln!(
        "sweep ({}): start-up {:.3} s, sweep {:.3} s",
        match at {
            Sink::None => "no sink",
            Sink::Disk => "sink",
            Sink::DiskReplacing => "sink, replacing",
            Sink::Tmpfs => "tmpfs sink",
        },
        (first - started).as_secs_f64(),
        sweep.as_secs_f64()
    );
    let stats = env.provider.stats();
    assert_eq!(stats.refreshes_ok as usize, n, "one refresh each");
    assert_eq!(stats.reuse_detected, 0);
    if at != Sink::None {
        // Every file holds its row's committed token.
        let stale = || {
            let mut q = conn
                .prepare("SELECT name, access_token FROM credentials")
                .unwrap();
            let rows = q
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .unwrap();
            rows.map(Result::unwrap)
                .filter(|(name, token)| {
                    fs::read(tokens.join(name)).ok().as_deref() != Some(token.as_bytes())
                })
                .count()
        };
        eprintln!("files not yet written at commit time: {}", stale());
        wait_for("every file written", Duration::from_secs(60), || {
            (stale() == 0).then_some(())
        });
    }
    let pid = daemon.child.id();
    let (rss_mib, hwm_mib) = memory(pid);
    let idle = (idle_secs > 0).then(|| idle(pid, Duration::from_secs(idle_secs)));
    daemon.stop();
    SweepResult {
        sweep,
        rss_mib,
        hwm_mib,
        idle,
    }
}

/// Per thread: (CPU nanoseconds, context switches). CPU time comes from
/// schedstat (nanoseconds), since clock ticks (10 ms) are too coarse for an
/// idle process.
fn usage(pid: u32) -> HashMap<String, (u64, u64)> {
    let mut m = HashMap::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let sched = fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let cpu_ns = sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let s = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let switches = s
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        m.insert(
            task.file_name().to_string_lossy().into_owned(),
            (cpu_ns, switches),
        );
    }
    m
}

fn idle(pid: u32, window: Duration) -> Idle {
    // Let the tail of the sweep (file writes, WAL checkpoint) finish, and
    // tokio's idle blocking threads exit (10 s keep-alive), first.
    std::thread::sleep(Duration::from_secs(12));
    let before = usage(pid);
    std::thread::sleep(window);
    let after = usage(pid);
    // Per thread, so a thread that exits during the window cannot make the
    // sum go backwards; a thread born during it counts from zero.
    let (mut cpu_ns, mut switches) = (0, 0);
    for (tid, (c1, s1)) in &after {
        let (c0, s0) = before.get(tid).copied().unwrap_or_default();
        cpu_ns += c1.saturating_sub(c0);
        switches += s1.saturating_sub(s0);
    }
    let secs = window.as_secs_f64();
    Idle {
        cpu_per_hour: cpu_ns as f64 / 1e9 * 3600.0 / secs,
        switches_per_minute: switches as f64 * 60.0 / secs,
    }
}
