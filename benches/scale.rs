//! The scale benchmark: `cargo bench --bench scale` (README "Bulk import",
//! BENCHMARKS.md "Scale").
//!
//! For each N (TOKEND_BENCH_SCALE, default "1000,10000,100000"), against
//! a fresh store and the fake provider answering after 20 ms:
//!
//! 1. **Import**: `tokend import --from FILE` of N JSON lines, timed; the
//!    database's size per credential after it (file and WAL).
//! 2. **Start-up to READY**: from spawning `tokend run` to its first
//!    socket answer. The socket is served only once every credential is
//!    loaded and published (src/daemon.rs), which is also when READY=1 is
//!    sent to systemd.
//! 3. **Sweep**: every credential is due (none has an access token);
//!    from the first refresh request to the last commit, at
//!    `max_concurrency = 64`, against a bare reqwest client sending the
//!    same N requests 64 at a time in the same run (the baseline).
//! 4. **RSS** of the daemon holding N credentials, after the sweep.
//! 5. **Listing**: `GET /v1/credentials` over the socket and `tokend list`.
//! 6. **Validation spread** (largest N only): a daemon on the same store
//!    with a sweep every minute; how the validations it sends fall across
//!    the sweep's spread (three quarters of the interval), in tenths.
//!
//! Prints a Markdown report to stdout; BENCHMARKS.md "Scale" holds one.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::io::Write;
use std::process::Stdio;

use std::time::{Duration, Instant, SystemTime};

use support::bench::{baseline_client, memory, wait_committed};
use support::{Daemon, Env, Knobs, QUIET_SWEEP, get, wait_for};

const LATENCY_MS: u64 = 20;
const CONCURRENCY: usize = 64;
/// The validation run's schedule: every minute, so a spread of 45 s.
const MINUTELY: &str = r#"validate_schedule = "0 * * * * *""#;
const SPREAD: Duration = Duration::from_secs(45);

struct Row {
    n: usize,
    import: Duration,
    db_bytes: u64,
    ready: Duration,
    sweep: Duration,
    baseline: Duration,
    rss_mib: f64,
    hwm_mib: f64,
    get_list: Duration,
    cli_list: Duration,
}

fn main() {
    let sizes: Vec<usize> = std::env::var("TOKEND_BENCH_SCALE")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 100_000]);
    let started = Instant::now();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rows: Vec<Row> = sizes.iter().map(|&n| scale(n)).collect();
    let spread = sizes.iter().max().map(|&n| validation_spread(n));

    println!(
        "## Scale benchmark ({LATENCY_MS} ms provider latency, max_concurrency {CONCURRENCY})\n"
    );
    println!(
        "Machine: {} cores; run: {}; load average before: {}\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        humantime::format_rfc3339_seconds(SystemTime::now()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "| credentials | import --from | DB per credential | start-up to READY (goal ≤ 1 s) | sweep | baseline | sweep ÷ baseline (goal ≤ 1.1) | RSS now / peak (goal ≤ 150 MiB) | GET /v1/credentials (goal ≤ 1 s) | tokend list (goal ≤ 1 s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.3} s | {} B | {:.3} s | {:.3} s | {:.3} s | {:.2} | {:.1} / {:.1} MiB | {:.3} s | {:.3} s |",
            r.n,
            r.import.as_secs_f64(),
            r.db_bytes / r.n as u64,
            r.ready.as_secs_f64(),
            r.sweep.as_secs_f64(),
            r.baseline.as_secs_f64(),
            r.sweep.as_secs_f64() / r.baseline.as_secs_f64(),
            r.rss_mib,
            r.hwm_mib,
            r.get_list.as_secs_f64(),
            r.cli_list.as_secs_f64(),
        );
    }
    if let Some((n, tenths)) = spread {
        println!(
            "\nValidation sweep of {n} credentials, spread {} s: validations per tenth of the spread\n",
            SPREAD.as_secs()
        );
        println!(
            "| tenth | {} |",
            (1..=10)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" | ")
        );
        println!("|---|{}", "---|".repeat(10));
        println!(
            "| validations | {} |",
            tenths
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    println!("\nWhole run: {:.0} s\n", started.elapsed().as_secs_f64());
}

fn env_for() -> Env {
    let env = Env::bench(Knobs {
        latency_ms: LATENCY_MS,
        ..Knobs::default()
    });
    env.write_config(
        &format!("[refresh]\nmax_concurrency = {CONCURRENCY}\n{QUIET_SWEEP}\n"),
        "",
    );
    env
}

fn scale(n: usize) -> Row {
    let env = env_for();
    // The JSON lines a user would import: refresh tokens only, so every
    // credential is due at once when the daemon starts.
    let file = env.dir.path().join("batch.jsonl");
    {
        let mut w = std::io::BufWriter::new(fs::File::create(&file).unwrap());
        for i in 0..n {
            let g = env
                .provider
                .mint_grant(env.provider.client_id(), "read+write");
            writeln!(
                w,
                r#"{{"name":"user-{i:06}","provider":"fake","refresh_token":"{}"}}"#,
                g.refresh_token
            )
            .unwrap();
        }
    }
    let t = Instant::now();
    let out = env
        .tokend(&["import", "--from", &file.display().to_string()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let import = t.elapsed();
    assert!(out.status.success(), "import of {n} failed");
    let db_bytes = ["", "-wal"]
        .iter()
        .map(|s| fs::metadata(format!("{}{s}", env.db.display())).map_or(0, |m| m.len()))
        .sum();

    let t = Instant::now();
    let mut daemon = Daemon::start_with(&env, "scale", |cmd, _| {
        cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
    });
    wait_for("the first socket answer", Duration::from_secs(60), || {
        support::socket_request(
            &env.socket,
            "GET",
            "/health",
            &[],
            b"",
            Duration::from_secs(5),
        )
        .ok()
        .filter(|r| r.status == 200)
    });
    let ready = t.elapsed();
    wait_for("the first refresh request", Duration::from_secs(60), || {
        (env.provider.stats().refresh_requests > 0).then_some(())
    });
    let first = Instant::now();
    let conn = env.raw_store();
    wait_committed(&env.provider, &conn, n, 0);
    let sweep = first.elapsed();
    assert_eq!(env.provider.stats().refreshes_ok as usize, n);
    let (rss_mib, hwm_mib) = memory(daemon.child.id());

    let t = Instant::now();
    let r = get(&env.socket, "/v1/credentials");
    let get_list = t.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().map(Vec::len), Some(n));
    let t = Instant::now();
    let out = env.tokend(&["list"]).output().unwrap();
    let cli_list = t.elapsed();
    assert!(out.status.success());
    assert_eq!(
        out.stdout
            .split(|b| *b == b'\n')
            .filter(|l| l.starts_with(b"user-"))
            .count(),
        n
    );
    daemon.stop();
    drop(conn);

    let baseline = baseline_client(n, LATENCY_MS, CONCURRENCY);
    eprintln!(
        "{n}: import {import:?}, ready {ready:?}, sweep {sweep:?}, baseline {baseline:?}, rss {rss_mib:.1} MiB"
    );
    Row {
        n,
        import,
        db_bytes,
        ready,
        sweep,
        baseline,
        rss_mib,
        hwm_mib,
        get_list,
        cli_list,
    }
}

/// A store of `n` credentials with valid tokens and a daemon validating
/// them every minute: the validations of one sweep, counted per tenth of
/// its spread (from the minute's tick).
fn validation_spread(n: usize) -> (usize, Vec<u64>) {
    let env = env_for();
    env.write_config(
        &format!("[refresh]\nmax_concurrency = {CONCURRENCY}\n{MINUTELY}\n"),
        "",
    );
    let far = tokend::clock::now_ms() + 365 * 86_400_000;
    env.seed(n, Some(far));
    let mut daemon = Daemon::start_with(&env, "spread", |cmd, _| {
        cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
    });
    // Tokens never validated are validated at once on load (a burst, not
    // the sweep): let it pass, then wait for the next minute's tick.
    wait_for("the validations on load", Duration::from_secs(300), || {
        (env.provider.stats().validations >= n as u64).then_some(())
    });
    let to_tick = 60_000 - (tokend::clock::now_ms() % 60_000) as u64;
    let tick = Instant::now() + Duration::from_millis(to_tick);
    std::thread::sleep(Duration::from_millis(to_tick));
    let mut seen = env.provider.stats().validations;
    let mut tenths = vec![0u64; 10];
    let end = tick + SPREAD + Duration::from_secs(5);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        let v = env.provider.stats().validations;
        let at = tick.elapsed().as_secs_f64() / SPREAD.as_secs_f64();
        let i = ((at * 10.0) as usize).min(9);
        tenths[i] += v - seen;
        seen = v;
    }
    daemon.stop();
    (n, tenths)
}
