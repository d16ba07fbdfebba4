//! The fleet benchmark: `cargo bench --bench fleet` (issue 12, a fleet
//! sharing its credentials through PostgreSQL).
//!
//! One throwaway PostgreSQL server with its durability on (`fsync`,
//! `full_page_writes`: every commit waits for its WAL flush, as in
//! production; [`Server::start_durable`]), on the bench's temporary
//! directory, and one fake provider answering after 20 ms. Each daemon
//! ("host") has its own directory, config, socket and a raw file sink on
//! tmpfs (/dev/shm, as a systemd host's /run) where there is one. Measured,
//! against references taken in the same run:
//!
//! 1. **Sweep, one host**: 10,000 credentials all due at once,
//!    `max_concurrency = 64`, on SQLite (the reference) and on PostgreSQL.
//!    The ideal is 10,000 × 20 ms / 64. Timed from the provider's first
//!    refresh request to the last refresh committed in the store (the
//!    store is polled once the provider has answered every request).
//! 2. **Sweep, several hosts** (three by default) on the same 10,000 rows
//!    in one database: the same timing, the provider's refresh requests
//!    (exactly one per credential: no duplicates), and when every host's
//!    files held every token.
//! 3. **Propagation**: on that fleet, `tokend refresh NAME` through one
//!    host's daemon, in turn on each host; the time from the commit (the
//!    row's `updated_at`, set in the committing transaction) to the new
//!    token in each other host's file (the file's mtime: same machine,
//!    same clock). p50 and p99 over the samples.
//!
//! Beside each sweep: the CPU seconds the PostgreSQL server and the daemons
//! used, and how busy the machine was (all cores, from /proc/stat): where
//! the time went, and whether the database (or the machine) was the limit.
//!
//! Environment: TOKEND_BENCH_CREDENTIALS (default 10000),
//! TOKEND_BENCH_HOSTS (default 3; 1 runs the one-host sweeps only),
//! TOKEND_BENCH_CONCURRENCY (`max_concurrency` per host, default 64),
//! TOKEND_BENCH_PROPAGATION (refreshes measured, default 200), and, read
//! by the daemons, TOKEND_PG_POOL (their pool's size, `src/store/pg/`). Prints a Markdown report to stdout; BENCHMARKS.md ("Fleet
//! on PostgreSQL") holds the latest one.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postgres::NoTls;
use support::bench::wait_committed;
use support::pg::Server;
use support::{Daemon, Env, Knobs, QUIET_SWEEP, wait_for};
use tokend::secret::Secret;
use tokend::store::{Database, Grant, NewCredential, PgUrl, StoreConn};

const LATENCY_MS: u64 = 20;
const TMPFS: &str = "/dev/shm";

/// `max_concurrency` per host: 64, as in the daemon benchmark, unless
/// TOKEND_BENCH_CONCURRENCY says otherwise (fewer makes the sweep wait on
/// the provider rather than the machine, so more hosts can show it).
fn concurrency() -> usize {
    env_or("TOKEND_BENCH_CONCURRENCY", 64).max(1) as usize
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let n = env_or("TOKEND_BENCH_CREDENTIALS", 10_000) as usize;
    let hosts = env_or("TOKEND_BENCH_HOSTS", 3).max(1) as usize;
    let samples = env_or("TOKEND_BENCH_PROPAGATION", 200) as usize;
    let per_host = concurrency();
    let ideal = Duration::from_millis(n as u64 * LATENCY_MS) / per_host as u32;
    println!(
        "## Fleet benchmark ({n} credentials, {LATENCY_MS} ms provider latency, max_concurrency {per_host} per host)\n"
    );
    println!(
        "Machine: {} cores, load average {} at the start; run: {}\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        humantime::format_rfc3339_seconds(SystemTime::now())
    );

    let sqlite = sqlite_sweep(n);
    let server = Server::start_durable().expect("the fleet benchmark needs PostgreSQL");
    let one = fleet(&server, n, 1, 0);
    // TOKEND_BENCH_HOSTS=1: the one-host sweeps only (measuring the pool).
    let many = (hosts > 1).then(|| fleet(&server, n, hosts, samples));

    println!("| measure | result | ratio |");
    println!("|---|---|---|");
    println!(
        "| ideal sweep (n × latency / concurrency) | {:.3} s | 1.00 |",
        ideal.as_secs_f64()
    );
    println!(
        "| SQLite, one host | {:.3} s | {:.2} × ideal |",
        sqlite.sweep.as_secs_f64(),
        ratio(sqlite.sweep, ideal)
    );
    println!(
        "| PostgreSQL, one host | {:.3} s | {:.2} × ideal, {:.2} × SQLite |",
        one.sweep.as_secs_f64(),
        ratio(one.sweep, ideal),
        ratio(one.sweep, sqlite.sweep)
    );
    let Some(many) = many else {
        for (label, r) in [
            ("SQLite, one host", &sqlite),
            ("PostgreSQL, one host", &one),
        ] {
            println!(
                "| CPU during the sweep, {label} | daemons {:.1} s, PostgreSQL {:.1} s | machine {:.0} % busy |",
                r.daemon_cpu,
                r.server_cpu,
                r.busy * 100.0
            );
        }
        println!();
        return;
    };
    println!(
        "| ideal sweep of {hosts} hosts (n × latency / ({hosts} × concurrency)) | {:.3} s | {:.2} × ideal |",
        (ideal / hosts as u32).as_secs_f64(),
        1.0 / hosts as f64
    );
    println!(
        "| PostgreSQL, {hosts} hosts | {:.3} s | {:.2} × ideal, {:.2} × one host |",
        many.sweep.as_secs_f64(),
        ratio(many.sweep, ideal),
        ratio(many.sweep, one.sweep)
    );
    println!(
        "| {hosts} hosts: provider refresh requests | {} | {:.3} per credential |",
        many.requests,
        many.requests as f64 / n as f64
    );
    println!(
        "| {hosts} hosts: every token in every host's files | {:.3} s | {:.2} × ideal |",
        many.everywhere.as_secs_f64(),
        ratio(many.everywhere, ideal)
    );
    for (label, r) in [
        ("SQLite, one host", &sqlite),
        ("PostgreSQL, one host", &one),
        (&format!("PostgreSQL, {hosts} hosts") as &str, &many),
    ] {
        println!(
            "| CPU during the sweep, {label} | daemons {:.1} s, PostgreSQL {:.1} s | machine {:.0} % busy |",
            r.daemon_cpu,
            r.server_cpu,
            r.busy * 100.0
        );
    }
    if let Some(p) = &many.propagation {
        println!(
            "| propagation, commit on one host to the file on another ({} refreshes × {} other hosts) | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms | |",
            samples,
            hosts - 1,
            percentile(p, 0.50),
            percentile(p, 0.99),
            percentile(p, 1.0)
        );
    }
    println!();
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// The `q` quantile (nearest rank) of `v`, sorted.
fn percentile(v: &[f64], q: f64) -> f64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

struct Sweep {
    sweep: Duration,
    /// Refresh requests the provider received.
    requests: u64,
    /// From the first request until every host's files held every token.
    everywhere: Duration,
    daemon_cpu: f64,
    server_cpu: f64,
    /// The machine's busy fraction over the sweep, all cores.
    busy: f64,
    /// Milliseconds, sorted.
    propagation: Option<Vec<f64>>,
}

/// A host's raw sink directory: on tmpfs where there is one.
fn sink_dir(env: &Env) -> (Option<tempfile::TempDir>, PathBuf) {
    if Path::new(TMPFS).is_dir() {
        let d = tempfile::tempdir_in(TMPFS).unwrap();
        let p = d.path().to_owned();
        (Some(d), p)
    } else {
        (None, env.tokens.clone())
    }
}

fn sink_block(dir: &Path) -> String {
    format!(
        "[[sinks]]\npath = \"{}/{{name}}\"\nformat = \"raw\"\nmode = \"0640\"\n",
        dir.display()
    )
}

fn refresh_block() -> String {
    format!(
        "[refresh]\nmax_concurrency = {}\n{QUIET_SWEEP}\n",
        concurrency()
    )
}

fn start_daemon(env: &Env) -> Daemon {
    Daemon::start_with(env, "bench", |cmd, _| {
        cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
    })
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |d| d.count())
}

/// The reference: the same sweep on SQLite.
fn sqlite_sweep(n: usize) -> Sweep {
    let env = Env::bench(Knobs {
        latency_ms: LATENCY_MS,
        ..Knobs::default()
    });
    let (_shm, sink) = sink_dir(&env);
    env.write_config(&refresh_block(), &sink_block(&sink));
    env.seed(n, None);
    let mut daemon = start_daemon(&env);
    wait_for("the first refresh request", Duration::from_secs(60), || {
        (env.provider.stats().refresh_requests > 0).then_some(())
    });
    let cpu = Cpu::start(&[daemon.child.id()], None);
    let first = Instant::now();
    let conn = env.raw_store();
    wait_committed(&env.provider, &conn, n, 0);
    let sweep = first.elapsed();
    let (daemon_cpu, server_cpu, busy) = cpu.stop();
    wait_for("every file written", Duration::from_secs(120), || {
        (count_files(&sink) >= n).then_some(())
    });
    let everywhere = first.elapsed();
    eprintln!("SQLite sweep: {:.3} s", sweep.as_secs_f64());
    let stats = env.provider.stats();
    assert_eq!(stats.refreshes_ok as usize, n, "one refresh each");
    daemon.stop();
    Sweep {
        sweep,
        requests: stats.refresh_requests,
        everywhere,
        daemon_cpu,
        server_cpu,
        busy,
        propagation: None,
    }
}

/// Stores `n` credentials `user-00000`… from fresh grants, each due at
/// once (no access token), in one transaction.
fn seed_pg(env: &Env, url: &str, n: usize) {
    let new: Vec<NewCredential> = (0..n)
        .map(|i| {
            let g = env
                .provider
                .mint_grant(env.provider.client_id(), "read+write");
            NewCredential {
                name: format!("user-{i:05}"),
                provider: "fake".into(),
                access_token: None,
                grant: Grant::RefreshToken(Secret::new(g.refresh_token)),
                scope: Some("read+write".into()),
                expires_at: None,
                event: "imported",
            }
        })
        .collect();
    let db = Database::Postgres(PgUrl::parse(url).unwrap());
    StoreConn::open_database(&db, true)
        .unwrap()
        .insert_all(&new)
        .unwrap();
}

/// `hosts` daemons on one fresh database of `server` holding `n`
/// credentials due at once; then `samples` propagation measurements.
fn fleet(server: &Server, n: usize, hosts: usize, samples: usize) -> Sweep {
    let url = server.fresh_db();
    // TOKEND_BENCH_PG_SETTING="name=value": a server setting for every
    // session on the database (ALTER DATABASE … SET), to measure one.
    if let Ok(setting) = std::env::var("TOKEND_BENCH_PG_SETTING")
        && let Some((name, value)) = setting.split_once('=')
    {
        let db = url.split_once("@/").unwrap().1.split('?').next().unwrap();
        server.psql(
            "postgres",
            &format!("ALTER DATABASE {db} SET {name} = '{value}'"),
        );
        eprintln!("{db}: {name} = {value}");
    }
    let envs: Vec<Env> = (0..hosts)
        .map(|_| {
            Env::bench(Knobs {
                latency_ms: LATENCY_MS,
                ..Knobs::default()
            })
        })
        .collect();
    // One provider for the fleet: the first host's.
    let provider = &envs[0].provider;
    let sinks: Vec<_> = envs.iter().map(sink_dir).collect();
    for (env, (_, sink)) in envs.iter().zip(&sinks) {
        let text = format!(
            "database = \"{url}\"\nsocket = \"{}\"\n{}\n{}\n{}",
            env.socket.display(),
            refresh_block(),
            envs[0].provider_block(),
            sink_block(sink)
        );
        fs::write(&env.config_path, text).unwrap();
    }
    let seeding = Instant::now();
    seed_pg(&envs[0], &url, n);
    eprintln!(
        "seeded {n} rows into PostgreSQL in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let mut db = postgres::Client::connect(&url, NoTls).unwrap();
    let mut daemons: Vec<Daemon> = envs.iter().map(start_daemon).collect();
    wait_for("the first refresh request", Duration::from_secs(60), || {
        (provider.stats().refresh_requests > 0).then_some(())
    });
    let pids: Vec<u32> = daemons.iter().map(|d| d.child.id()).collect();
    let cpu = Cpu::start(&pids, server.postmaster_pid());
    let first = Instant::now();
    // The provider's count first (in this process, free), the database's
    // after: a count over every row every 20 ms would be a load of its own
    // on the server measured.
    wait_for("every refresh answered", Duration::from_secs(900), || {
        (provider.stats().refreshes_ok as usize >= n).then_some(())
    });
    wait_for("every refresh committed", Duration::from_secs(900), || {
        let done: i64 = db
            .query_one(
                "SELECT count(*) FROM credentials
                 WHERE access_token IS NOT NULL AND refresh_started_at IS NULL",
                &[],
            )
            .ok()?
            .get(0);
        (done as usize >= n).then_some(())
    });
    let sweep = first.elapsed();
    let (daemon_cpu, server_cpu, busy) = cpu.stop();
    eprintln!(
        "PostgreSQL sweep, {hosts} host(s): {:.3} s",
        sweep.as_secs_f64()
    );
    wait_for(
        "every token in every host's files",
        Duration::from_secs(300),
        || sinks.iter().all(|(_, s)| count_files(s) >= n).then_some(()),
    );
    let everywhere = first.elapsed();
    let stats = provider.stats();
    eprintln!(
        "{hosts} host(s): {} refresh requests, {} ok, {} reuse detected",
        stats.refresh_requests, stats.refreshes_ok, stats.reuse_detected
    );
    assert_eq!(stats.reuse_detected, 0, "a refresh token was used twice");

    let propagation = (hosts > 1 && samples > 0).then(|| {
        let dirs: Vec<&Path> = sinks.iter().map(|(_, s)| s.as_path()).collect();
        propagation(&envs, &dirs, &mut db, n, samples)
    });
    for d in &mut daemons {
        d.stop();
    }
    Sweep {
        sweep,
        requests: stats.refresh_requests,
        everywhere,
        daemon_cpu,
        server_cpu,
        busy,
        propagation,
    }
}

/// Refreshes through each host's daemon in turn and measures, for every
/// other host, the commit-to-file time in milliseconds (sorted).
fn propagation(
    envs: &[Env],
    sinks: &[&Path],
    db: &mut postgres::Client,
    n: usize,
    samples: usize,
) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..samples {
        let name = format!("user-{:05}", (i * n / samples) % n);
        let from = i % envs.len();
        let before: Vec<Option<String>> = sinks
            .iter()
            .map(|s| fs::read_to_string(s.join(&name)).ok())
            .collect();
        let r = envs[from].cli(&["refresh", &name], "");
        assert!(
            r.status.success(),
            "tokend refresh {name}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let committed_at: i64 = db
            .query_one(
                "SELECT updated_at FROM credentials WHERE name = $1",
                &[&name],
            )
            .unwrap()
            .get(0);
        for (h, sink) in sinks.iter().enumerate() {
            if h == from {
                continue;
            }
            let file = sink.join(&name);
            let mtime = wait_for(
                "the refreshed token in another host's file",
                Duration::from_secs(60),
                || {
                    let now = fs::read_to_string(&file).ok();
                    (now != before[h]).then(|| fs::metadata(&file).ok()?.modified().ok())?
                },
            );
            let at = mtime.duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0;
            out.push(at - committed_at as f64);
        }
    }
    out.sort_by(f64::total_cmp);
    out
}

/// CPU time of the daemons and of the PostgreSQL server (its main process
/// and its children, the backends) over a window, and the machine's busy
/// fraction.
struct Cpu {
    daemons: Vec<u32>,
    postmaster: Option<u32>,
    before: HashMap<u32, u64>,
    machine: (u64, u64),
}

impl Cpu {
    fn start(daemons: &[u32], postmaster: Option<u32>) -> Cpu {
        let mut c = Cpu {
            daemons: daemons.to_vec(),
            postmaster,
            before: HashMap::new(),
            machine: machine(),
        };
        c.before = c.ticks();
        c
    }

    /// Ticks (utime + stime) of every process measured, by pid.
    fn ticks(&self) -> HashMap<u32, u64> {
        let mut m = HashMap::new();
        let server = self.postmaster.map(|p| {
            let mut v = children(p);
            v.push(p);
            v
        });
        for pid in self.daemons.iter().chain(server.iter().flatten()) {
            if let Some(t) = stat(*pid).map(|s| s.1) {
                m.insert(*pid, t);
            }
        }
        m
    }

    /// (daemons' CPU seconds, server's CPU seconds, machine busy fraction).
    fn stop(self) -> (f64, f64, f64) {
        let after = self.ticks();
        let (idle1, total1) = machine();
        let tick = clock_ticks();
        let (mut daemons, mut server) = (0u64, 0u64);
        for (pid, t) in &after {
            let used = t.saturating_sub(self.before.get(pid).copied().unwrap_or(0));
            if self.daemons.contains(pid) {
                daemons += used;
            } else {
                server += used;
            }
        }
        let (idle0, total0) = self.machine;
        let busy = 1.0 - (idle1 - idle0) as f64 / (total1 - total0).max(1) as f64;
        (daemons as f64 / tick, server as f64 / tick, busy)
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// (parent pid, utime + stime in ticks) from /proc/PID/stat.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": comm may hold spaces.
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

fn children(pid: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| stat(*p).is_some_and(|s| s.0 == pid))
        .collect()
}

/// (idle, total) jiffies of the whole machine, from /proc/stat.
fn machine() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (idle, v.iter().sum())
}
