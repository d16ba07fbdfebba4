//! The socket benchmark: `cargo bench --bench socket`.
//!
//! 1. `GET /v1/tokens/NAME` throughput and latency, with 16 keep-alive
//!    connections and with a new connection per request, against a
//!    **baseline** measured in the same run: a minimal hyper HTTP/1.1 server
//!    over a Unix socket answering a constant 40-byte body (this binary,
//!    re-executed as a separate process, on the same tokio runtime setup).
//! 2. `tokend token NAME` as a whole process, against spawning `/bin/true`:
//!    the shape that skips clap, and one that goes through it.
//!
//! Environment: TOKEND_BENCH_SECS (seconds per load run, default 2) and
//! TOKEND_BENCH_ROUNDS (alternating rounds of each, default 5: the
//! medians then move by up to 0.2 between runs of one build, so telling
//! two builds apart takes more, BENCHMARKS.md "Socket API").
//!
//! With TOKEND_BENCH_INSTRUCTIONS set, the bench instead counts the
//! instructions each server runs in user space per keep-alive request,
//! under valgrind's callgrind: two runs of each server, 2,000 and 12,000
//! requests on one connection, the difference divided by 10,000, so that
//! start-up and shutdown cancel out. Unlike requests per second, the count
//! moves by well under 1 % between runs, so it tells apart changes worth
//! a few percent that the load runs cannot; it does not see the kernel's
//! share (reads and writes), which is the same for both servers.
//! BENCHMARKS.md holds the latest report.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::bench::{callgrind_total, under_callgrind, valgrind_present};
use support::{Daemon, Env, Knobs, bin, import_expiring, wait_serving};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const CONNECTIONS: usize = 16;
/// Alternating rounds of baseline and tokend per load shape, unless
/// TOKEND_BENCH_ROUNDS says.
const ROUNDS: usize = 5;
const BASELINE_FLAG: &str = "--baseline-server";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == BASELINE_FLAG) {
        return baseline_server(Path::new(&args[i + 1]));
    }
    let secs = std::env::var("TOKEND_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let window = Duration::from_secs(secs);
    let rounds: usize = std::env::var("TOKEND_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(ROUNDS);
    // tokend with one credential, its config's defaults, no sinks.
    let env = Env::bench(Knobs::default());
    env.write_config("", "");

    // The baseline: a constant 40-byte answer.
    let base_sock = env.dir.path().join("baseline.sock");
    let mut base = Command::new(std::env::current_exe().unwrap())
        .arg(BASELINE_FLAG)
        .arg(&base_sock)
        .spawn()
        .unwrap();
    wait_serving(&base_sock, Duration::from_secs(30));

    import_expiring(&env, "bench", 31_535_999);
    if std::env::var_os("TOKEND_BENCH_INSTRUCTIONS").is_some() {
        kill(&mut base);
        return instructions(&env);
    }
    let mut daemon = Daemon::start_with(&env, "bench", |cmd, _| {
        cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
    });
    let sock = env.socket.clone();
    wait_serving(&sock, Duration::from_secs(30));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let path = "/v1/tokens/bench";
    println!(
        "## Socket benchmark ({CONNECTIONS} connections, {rounds} alternating rounds of {secs} s)\n"
    );
    println!("| cores | load | server | requests/s | p50 | p99 | ratio to baseline |");
    println!("|---|---|---|---|---|---|---|");
    // Unpinned, then (where there are two cores or more) the load generator
    // on core 0 and the server under test on core 1.
    let pinnings: &[bool] = if cores() >= 2 {
        &[false, true]
    } else {
        &[false]
    };
    for &pinned in pinnings {
        if pinned {
            pin(std::process::id(), 0);
            pin(base.id(), 1);
            pin(daemon.child.id(), 1);
        }
        let cores = if pinned {
            "load on core 0, server on core 1"
        } else {
            "shared"
        };
        for keep_alive in [true, false] {
            let label = if keep_alive {
                "16 keep-alive connections"
            } else {
                "new connection per request"
            };
            // Alternate short runs of each, so that whatever else the
            // machine does weighs on both alike; report the medians.
            let (mut b, mut t) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                b.push(rt.block_on(load(&base_sock, "/", keep_alive, window)));
                t.push(rt.block_on(load(&sock, path, keep_alive, window)));
            }
            let ratios: Vec<f64> = b.iter().zip(&t).map(|(b, t)| t.rate / b.rate).collect();
            let (b, t) = (median_load(b), median_load(t));
            println!(
                "| {cores} | {label} | baseline (hyper, 40-byte constant) | {:.0} | {} | {} | 1.00 |",
                b.rate,
                us(b.p50),
                us(b.p99)
            );
            println!(
                "| {cores} | {label} | tokend GET {path} | {:.0} | {} | {} | {:.2} |",
                t.rate,
                us(t.p50),
                us(t.p99),
                median(ratios)
            );
        }
    }
    for id in [std::process::id(), base.id(), daemon.child.id()] {
        unpin(id);
    }

    // A whole process per token, as a shell script pays; interleaved with
    // /bin/true for the same reason. `-c PATH token NAME` is the shape the
    // CLI recognises before clap; `token NAME -c PATH` goes through clap
    // (src/cli/mod.rs, token_fast_path), shown for what that costs.
    let runs = 400;
    let bin = bin();
    let config = env.config_path.to_str().unwrap();
    let (mut true_t, mut token_t, mut clap_t) = (Vec::new(), Vec::new(), Vec::new());
    let token = |args: &[&str]| {
        let t = Instant::now();
        let out = Command::new(bin).args(args).output().unwrap();
        let elapsed = t.elapsed();
        assert!(out.status.success(), "{args:?}");
        elapsed
    };
    for _ in 0..runs {
        let t = Instant::now();
        Command::new("/bin/true").status().unwrap();
        true_t.push(t.elapsed());
        token_t.push(token(&["-c", config, "token", "bench"]));
        clap_t.push(token(&["token", "bench", "-c", config]));
    }
    let true_med = median(true_t);
    println!("\n| process | median of {runs} | ratio |");
    println!("|---|---|---|");
    println!("| /bin/true | {} | 1.00 |", us(true_med));
    for (label, times) in [
        ("tokend -c PATH token NAME", token_t),
        ("tokend token NAME -c PATH (through clap)", clap_t),
    ] {
        let med = median(times);
        println!(
            "| {label} | {} | {:.2} × /bin/true |",
            us(med),
            med.as_secs_f64() / true_med.as_secs_f64()
        );
    }
    println!();
    daemon.stop();
    kill(&mut base);
}

/// Requests on one keep-alive connection in the two runs of each server
/// that `instructions` compares.
const COUNTED: [u64; 2] = [2_000, 12_000];

/// Instructions per keep-alive request, baseline and tokend, each server
/// run under callgrind (module doc).
fn instructions(env: &Env) {
    if !valgrind_present() {
        println!("valgrind is not installed (apt-get install valgrind): no instruction count");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let base_sock = env.dir.path().join("baseline-counted.sock");
    let exe = std::env::current_exe().unwrap();
    let mut baseline = Command::new(&exe);
    baseline.arg(BASELINE_FLAG).arg(&base_sock);
    let servers = [
        (
            "baseline (hyper, 40-byte constant)",
            baseline,
            base_sock,
            "/",
        ),
        (
            "tokend GET /v1/tokens/bench",
            env.tokend(&["run"]),
            env.socket.clone(),
            "/v1/tokens/bench",
        ),
    ];
    println!(
        "## Instructions per keep-alive request (callgrind, user space; {} and {} requests on one connection)\n",
        COUNTED[0], COUNTED[1]
    );
    println!("| server | instructions per request | ratio to baseline |");
    println!("|---|---|---|");
    let mut base_count = None;
    for (label, cmd, sock, path) in servers {
        let mut totals = Vec::new();
        for n in COUNTED {
            let out = env.dir.path().join(format!("counted-{n}.callgrind"));
            let mut child = under_callgrind(&cmd, &out).spawn().unwrap();
            wait_serving(&sock, Duration::from_secs(120));
            rt.block_on(sequential(&sock, path, n));
            kill(&mut child);
            totals.push(callgrind_total(&out));
        }
        let per = (totals[1] - totals[0]) as f64 / (COUNTED[1] - COUNTED[0]) as f64;
        let base = *base_count.get_or_insert(per);
        println!("| {label} | {per:.0} | {:.2} |", per / base);
    }
    println!();
}

/// `n` requests for `path`, one after another on one connection.
async fn sequential(sock: &Path, path: &str, n: u64) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes();
    let mut s = UnixStream::connect(sock).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for _ in 0..n {
        s.write_all(&request).await.unwrap();
        read_reply(&mut s, &mut buf).await;
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Moves every thread of process `pid` to core `cpu`; threads it starts
/// later inherit the mask.
fn pin(pid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set_affinity(pid, &set);
}

/// Lets every thread of `pid` run on every core again.
fn unpin(pid: u32) {
    // SAFETY: as in `pin`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..cores() {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set_affinity(pid, &set);
}

fn set_affinity(pid: u32, set: &libc::cpu_set_t) {
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let tid: i32 = task.file_name().to_str().unwrap().parse().unwrap();
        // SAFETY: a valid set of the size given; a thread that exited
        // meanwhile only makes the call fail.
        unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set) };
    }
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn kill(child: &mut Child) {
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn median_load(mut v: Vec<Load>) -> Load {
    v.sort_by(|a, b| a.rate.partial_cmp(&b.rate).unwrap());
    v.swap_remove(v.len() / 2)
}

struct Load {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// CONNECTIONS clients sending requests back to back for `window`.
async fn load(sock: &Path, path: &str, keep_alive: bool, window: Duration) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes();
    let request = Arc::new(request);
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (stop, request, sock) = (stop.clone(), request.clone(), sock.to_owned());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(100_000);
                let mut conn = None;
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if conn.is_none() {
                        conn = Some(UnixStream::connect(&sock).await.unwrap());
                    }
                    let s = conn.as_mut().unwrap();
                    s.write_all(&request).await.unwrap();
                    read_reply(s, &mut buf).await;
                    lat.push(t.elapsed());
                    if !keep_alive {
                        conn = None;
                    }
                }
                lat
            })
        })
        .collect();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    all.sort();
    Load {
        rate: all.len() as f64 / elapsed.as_secs_f64(),
        p50: all[all.len() / 2],
        p99: all[all.len() * 99 / 100],
    }
}

/// Reads one HTTP/1.1 reply with a Content-Length body, asserting a 200.
async fn read_reply(s: &mut UnixStream, buf: &mut [u8]) {
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..]).await.unwrap();
        assert!(n > 0, "the server closed the connection");
        have += n;
        let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..end]).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap();
        if have >= end + 4 + len {
            return;
        }
    }
}

/// The baseline: hyper's HTTP/1.1 server answering 40 constant bytes.
fn baseline_server(path: &Path) {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _ = fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"0123456789012345678901234567890123456789"),
                    )))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
