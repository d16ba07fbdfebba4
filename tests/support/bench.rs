//! What the benches share: the bare-client baseline, the count of
//! committed refreshes and a process's memory. (Compiled into the tests
//! too, where it is unused.)

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokend_fake_provider::{FakeProvider, Knobs};

/// The baseline of the sweeps: the same `n` refresh requests, sent by a
/// bare reqwest client `concurrency` at a time to a fresh fake provider,
/// which is what this machine does with no store, files or scheduling.
pub fn baseline_client(n: usize, latency_ms: u64, concurrency: usize) -> Duration {
    let provider = FakeProvider::start(Knobs {
        latency_ms,
        ..Knobs::default()
    })
    .unwrap();
    let tokens: Vec<String> = (0..n)
        .map(|_| {
            provider
                .mint_grant(provider.client_id(), "read+write")
                .refresh_token
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("{}/oauth2/access_token", provider.url());
    let (id, secret) = (
        provider.client_id().to_owned(),
        provider.client_secret().to_owned(),
    );
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(0));
    let elapsed = rt.block_on(async move {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let start = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, url, id, secret, tokens, next) = (
                    client.clone(),
                    url.clone(),
                    id.clone(),
                    secret.clone(),
                    tokens.clone(),
                    next.clone(),
                );
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= tokens.len() {
                            return;
                        }
                        let form = [
                            ("grant_type", "refresh_token"),
                            ("client_id", &id),
                            ("client_secret", &secret),
                            ("refresh_token", &tokens[i]),
                            ("scope", "read+write"),
                        ];
                        let r = client.post(&url).form(&form).send().await.unwrap();
                        assert!(r.status().is_success());
                        r.bytes().await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    });
    assert_eq!(provider.stats().refreshes_ok as usize, n);
    elapsed
}

/// Credentials whose refresh is committed. Raw SQL on purpose
/// (`Env::raw_store`): a count, polled while the daemon works, where
/// loading every row through the store each time would weigh on what is
/// measured.
/// Waits until the `n` refreshes of a sweep are all committed. The store
/// is counted only once the provider has answered every request: the
/// count reads every row, and doing it every 20 ms through the sweep took
/// the machine's CPU and disk from the daemon it measures, more the more
/// rows (at 100,000, a 21 MiB scan each time; BENCHMARKS.md "Scale").
/// `past`: the expiry the rows were seeded with (0 for none), which a
/// committed refresh's later one replaces.
pub fn wait_committed(provider: &FakeProvider, conn: &rusqlite::Connection, n: usize, past: i64) {
    super::wait_for("every refresh answered", Duration::from_secs(600), || {
        (provider.stats().refreshes_ok as usize >= n).then_some(())
    });
    super::wait_for("every refresh committed", Duration::from_secs(600), || {
        (committed(conn, past) >= n).then_some(())
    });
}

pub fn committed(conn: &rusqlite::Connection, past: i64) -> usize {
    conn.query_row(
        "SELECT count(*) FROM credentials
         WHERE access_token IS NOT NULL AND refresh_started_at IS NULL
           AND expires_at > ?1",
        [past],
        |r| r.get::<_, i64>(0),
    )
    .unwrap_or(0) as usize
}

/// (VmRSS, VmHWM) in MiB.
pub fn memory(pid: u32) -> (f64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// Whether valgrind is installed, for the benches' instruction counts
/// (TOKEND_BENCH_INSTRUCTIONS); they say so and skip when it is not.
pub fn valgrind_present() -> bool {
    std::process::Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `cmd` run under valgrind's callgrind, its counts written to `out`:
/// the same program, arguments and environment.
pub fn under_callgrind(cmd: &std::process::Command, out: &Path) -> std::process::Command {
    let mut c = std::process::Command::new("valgrind");
    c.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// The instructions a callgrind run counted in all (its `summary:` line).
pub fn callgrind_total(out: &Path) -> u64 {
    let text = fs::read_to_string(out).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no summary in {}", out.display()))
}
