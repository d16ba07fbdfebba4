//! Issue 9: every path that starts a refresh keeps the grant alive and the
//! provider calm. The fake provider rotates refresh tokens and revokes the
//! whole grant when an old one comes back, and `answer_delay_ms` makes it
//! act on a request before its answer is sent: the strictest server there
//! is. Each test here failed on the code before issue 9.

mod support;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::*;

const PATIENCE: Duration = Duration::from_secs(30);

/// A `[refresh]` section with short backoffs and the given knobs.
fn section(request_timeout: &str, min_remaining: &str) -> String {
    format!(
        "\n[refresh]\n{QUIET_SWEEP}\nrefresh_before_expiry = \"2s\"\nmin_remaining = \"{min_remaining}\"\n\
         retry_initial = \"500ms\"\nretry_max = \"2s\"\nrequest_timeout = \"{request_timeout}\"\n"
    )
}

/// No rotation was lost: the grant lives, and the store holds the refresh
/// token that works now.
fn assert_grant_kept(env: &Env, grant_id: u64, name: &str) {
    let info = env.provider.grant(grant_id).unwrap();
    assert!(info.alive, "the grant died: {:?}", info.revoked_reason);
    assert!(
        env.row(name).unwrap().refresh_token == info.refresh_token,
        "the store does not hold the current refresh token of {name}"
    );
    assert_eq!(env.provider.stats().reuse_detected, 0);
}

/// Waits until the store holds the grant's current refresh token.
fn wait_committed(env: &Env, grant_id: u64, name: &str) {
    wait_for("the rotated pair in the store", PATIENCE, || {
        let info = env.provider.grant(grant_id)?;
        (env.row(name)?.refresh_token == info.refresh_token && info.rotations > 0).then_some(())
    });
}

/// Sends a request over the socket and returns the open connection without
/// reading anything: dropping it hangs up, as `curl --max-time 1` does.
fn send_and_hold(socket: &Path, method: &str, path: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    s
}

// ---- 1. a refresh that may have reached the provider runs to its commit ----

#[test]
fn a_caller_that_hangs_up_never_cancels_a_refresh() {
    // The provider rotates at once and answers 3 s later; the callers give
    // up after the rotation, long before the answer.
    let env = Env::bare(Knobs::default());
    env.write_config(&section("10s", "10m"), &env.sink("raw", "0600"));
    // "forced" has a year; "reader" 300 s, under min_remaining, so a read
    // refreshes it first (the scheduler would only at half its life).
    let forced = env.import("forced", true);
    let reader = import_expiring(&env, "reader", 300);
    let d = env.start();
    wait_serving(&env.socket, PATIENCE);
    wait_for("the start-up validations", PATIENCE, || {
        (env.provider.stats().validations_ok == 2).then_some(())
    });
    env.provider.update_knobs(|k| k.answer_delay_ms = 3000);

    for (name, grant, method, path) in [
        ("forced", &forced, "POST", "/v1/credentials/forced/refresh"),
        ("reader", &reader, "GET", "/v1/tokens/reader"),
    ] {
        let rotated = env.provider.stats().refreshes_ok + 1;
        let caller = send_and_hold(&env.socket, method, path);
        wait_for("the provider to rotate", PATIENCE, || {
            (env.provider.stats().refreshes_ok == rotated).then_some(())
        });
        drop(caller);
        // The refresh goes on without its caller: the answer is committed
        // and published.
        wait_committed(&env, grant.grant_id, name);
        let info = env.provider.grant(grant.grant_id).unwrap();
        wait_for("the new token in the file", PATIENCE, || {
            (env.read_token(name)? == info.access_token).then_some(())
        });
    }
    // The stored refresh tokens are the live ones: the next refreshes work.
    env.provider.update_knobs(|k| k.answer_delay_ms = 0);
    for name in ["forced", "reader"] {
        let out = env.cli(&["refresh", name], "");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_grant_kept(&env, forced.grant_id, "forced");
    assert_grant_kept(&env, reader.grant_id, "reader");
    drop(d);
}

#[test]
fn sigterm_lets_a_refresh_in_flight_commit_and_starts_no_other() {
    let env = Env::bare(Knobs::default());
    env.write_config(&section("10s", "1s"), &env.sink("raw", "0600"));
    let g = env.import("bot", true);
    let mut d = env.start();
    wait_serving(&env.socket, PATIENCE);
    wait_for("the start-up validation", PATIENCE, || {
        (env.provider.stats().validations_ok == 1).then_some(())
    });
    // The answer takes 7 s, more than the socket's 5 s drain.
    env.provider.update_knobs(|k| k.answer_delay_ms = 7000);
    let caller = send_and_hold(&env.socket, "POST", "/v1/credentials/bot/refresh");
    wait_for("the provider to rotate", PATIENCE, || {
        (env.provider.stats().refreshes_ok == 1).then_some(())
    });
    let asked = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "{status}");
    assert!(
        asked.elapsed() >= Duration::from_secs(4),
        "stopped before the answer came: {:?}",
        asked.elapsed()
    );
    drop(caller);
    let log = d.log();
    assert!(
        log.contains("waiting for refreshes in flight to finish and commit"),
        "{log}"
    );
    assert!(
        !log.contains("did not finish within the shutdown grace"),
        "{log}"
    );
    // Committed before the exit.
    let info = env.provider.grant(g.grant_id).unwrap();
    assert!(env.row("bot").unwrap().refresh_token == info.refresh_token);
    assert_eq!(env.provider.stats().token_requests, 1);
    drop(d);

    // After a restart the stored refresh token works.
    env.provider.update_knobs(|k| k.answer_delay_ms = 0);
    let d = env.start();
    let out = env.cli(&["refresh", "bot"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_grant_kept(&env, g.grant_id, "bot");
    drop(d);
}

#[test]
fn sigterm_gives_back_the_leases_waiting_for_a_provider_slot() {
    // One slot, three credentials due at once: the first request is in
    // flight (its answer takes 10 s: time to see the second lease and
    // signal, however loaded the machine) and a second credential holds a
    // lease taken ahead of its slot when SIGTERM comes (one slot, so one
    // lease ahead: docs/design.md §1); the third waits for that lease's turn.
    let env = Env::bare(Knobs::default());
    let config = format!("{}max_concurrency = 1\n", section("20s", "1s"));
    env.write_config(&config, &env.sink("raw", "0600"));
    let grants: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| (*n, import_expiring(&env, n, 1)))
        .collect();
    env.provider.update_knobs(|k| k.answer_delay_ms = 10_000);
    let mut d = env.start();
    wait_for("the first refresh to reach the provider", PATIENCE, || {
        (env.provider.stats().refreshes_ok == 1).then_some(())
    });
    wait_for("a second lease, waiting for the slot", PATIENCE, || {
        let leased = ["a", "b", "c"]
            .iter()
            .filter(|n| {
                env.credential(n)
                    .is_some_and(|c| c.refresh_started_at.is_some())
            })
            .count();
        (leased == 2).then_some(())
    });
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "{status}");
    assert_eq!(env.provider.stats().token_requests, 1, "{}", d.log());
    drop(d);
    // The one sent was committed; the lease never used left no mark, so
    // the next start sees nothing interrupted.
    for (name, g) in &grants {
        let c = env.credential(name).unwrap();
        assert!(
            c.refresh_started_at.is_none(),
            "{name} keeps a refresh mark"
        );
        assert_ne!(c.state.as_str(), "refreshing", "{name}");
        assert_grant_kept(&env, g.grant_id, name);
    }
    env.provider.update_knobs(|k| k.answer_delay_ms = 0);
    let d = env.start();
    wait_for("all three refreshed after the restart", PATIENCE, || {
        grants
            .iter()
            .all(|(n, g)| {
                env.provider
                    .grant(g.grant_id)
                    .is_some_and(|i| i.rotations > 0)
                    && env.row(n).is_some_and(|r| r.state == "valid")
            })
            .then_some(())
    });
    for (name, g) in &grants {
        assert_eq!(env.events(name, "refresh_interrupted"), 0, "{name}");
        assert_grant_kept(&env, g.grant_id, name);
    }
    drop(d);
}

/// Asks daemon `a` to refresh `bot` through its socket, the provider
/// rotating after `latency_ms`, and locks the store as another process
/// would (a `sqlite3` shell): returns once `a` has kept the rotated pair in
/// its file, with the lock, which its caller drops. With `failed`, that is
/// once the first commit has failed (after the daemon's 5 s busy timeout);
/// without, it must be while that commit still waits (a commit not landed
/// within a second keeps its pair).
fn refreshed_while_the_store_is_locked(
    env: &Env,
    a: &Daemon,
    latency_ms: u64,
    failed: bool,
) -> DbLock {
    env.provider.update_knobs(|k| k.latency_ms = latency_ms);
    let a_socket = env.socket.clone();
    let _caller = std::thread::spawn(move || {
        let _ = socket_request(
            &a_socket,
            "POST",
            "/v1/credentials/bot/refresh",
            &[],
            b"",
            Duration::from_secs(60),
        );
    });
    wait_for("the daemon's request", PATIENCE, || {
        (env.provider.stats().refresh_requests == 1).then_some(())
    });
    let lock = env.lock_store(Duration::from_secs(5));
    const RETRYING: &str = "cannot store the refreshed token pair; retrying";
    if failed {
        a.wait_log(RETRYING, PATIENCE);
    }
    let kept = env.db.parent().unwrap().join("tokend-pending/bot.json");
    wait_for("the pair kept in a file", PATIENCE, || {
        kept.exists().then_some(())
    });
    if !failed {
        assert!(
            !a.log().contains(RETRYING),
            "the pair was kept only once the first commit had failed"
        );
    }
    lock
}

/// A second daemon on the same database, with its own socket.
fn second_daemon(env: &Env) -> (Daemon, PathBuf) {
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let socket = env.dir.path().join("b.sock");
    let config = env.dir.path().join("b.toml");
    std::fs::write(
        &config,
        text.replace(
            &env.socket.display().to_string(),
            &socket.display().to_string(),
        ),
    )
    .unwrap();
    let cmd = tokend_command(&config, env.dir.path(), &["run"]);
    let d = Daemon::spawn(cmd, &config, env.dir.path().join("b.log"));
    wait_serving(&socket, PATIENCE);
    (d, socket)
}

/// A holder stalled past its lease, its rotated pair unstored: the next
/// holder is on another host (it cannot see the pair this host kept, see
/// `a_pair_the_store_would_not_take_survives_a_kill`), so it spends the
/// stored token; the stalled holder, woken, writes nothing over its
/// outcome.
#[test]
fn a_holder_whose_lease_passed_on_stores_nothing() {
    lease_passed_on(false);
}

/// The same, the next holder on the same host: it finds the pair the
/// stalled holder kept and stores it, instead of sending the spent token.
#[test]
fn a_holder_on_this_host_stores_the_pair_a_stalled_holder_kept() {
    lease_passed_on(true);
}

fn lease_passed_on(same_host: bool) {
    let env = Env::bare(Knobs::default());
    // request_timeout 10s: a lease lives 20 s.
    env.write_config(&section("10s", "1s"), &env.sink("raw", "0600"));
    let g = env.import("bot", true);
    let a = env.start();
    wait_serving(&env.socket, PATIENCE);
    let (b, b_socket) = second_daemon(&env);
    wait_for("the start-up validations", PATIENCE, || {
        (env.provider.stats().validations_ok >= 1).then_some(())
    });

    // A refreshes; the provider takes 3 s before it rotates, time enough
    // to lock the store however loaded the machine.
    // Someone holds the database, so A's commit of the rotated pair waits;
    // then A stalls (a VM paused, a swap storm) past its lease.
    let lock = refreshed_while_the_store_is_locked(&env, &a, 3000, true);
    a.pause();
    drop(lock);
    env.provider.update_knobs(|k| k.latency_ms = 0);
    let kept = env.db.parent().unwrap().join("tokend-pending/bot.json");
    if same_host {
        wait_for("B to take over", Duration::from_secs(60), || {
            let r = request(&b_socket, "POST", "/v1/credentials/bot/refresh");
            (r.status == 200 && !kept.exists()).then_some(())
        });
        wait_committed(&env, g.grant_id, "bot");
        wait_for("B to show it valid", PATIENCE, || {
            let r = request(&b_socket, "GET", "/v1/credentials/bot");
            (r.json()["state"] == "valid").then_some(())
        });
        a.signal(libc::SIGCONT);
        assert_grant_kept(&env, g.grant_id, "bot");
        drop(b);
        drop(a);
        return;
    }
    // Another host's view: none of this host's files.
    std::fs::remove_file(&kept).unwrap();

    // B takes the lease once it expires and spends the refresh token the
    // store still holds: the provider sees the reuse and revokes the grant.
    let answer = wait_for("B to take over", Duration::from_secs(60), || {
        let r = request(&b_socket, "POST", "/v1/credentials/bot/refresh");
        let state = r.json()["state"].as_str().unwrap_or_default().to_owned();
        (state == "needs_reauthorization").then_some(r)
    });
    assert_eq!(answer.status, 200);
    assert!(!env.provider.grant(g.grant_id).unwrap().alive);

    // A wakes up with the answer it got before B's turn: its lease has
    // passed on, so it stores nothing but an event that says so.
    a.signal(libc::SIGCONT);
    a.wait_log("lease had expired and passed to another holder", PATIENCE);
    wait_for("the lease_lost event", PATIENCE, || {
        (env.events("bot", "lease_lost") == 1).then_some(())
    });
    let row = env.row("bot").unwrap();
    assert_eq!(row.state, "needs_reauthorization");
    assert!(
        row.refresh_token == g.refresh_token,
        "the stale holder overwrote the store"
    );
    wait_for("the token file to go", PATIENCE, || {
        env.read_token("bot").is_none().then_some(())
    });
    drop(b);
    drop(a);
}

/// The same stall, but the lease's next holder gave it back without
/// sending anything: `import --from FILE --force`, run by a configuration
/// tool with the tokens the credential already holds, leases every
/// credential it names and, finding nothing to change, gives the leases
/// back. The stalled holder's pair is then all that is left of the grant:
/// the provider rotated the stored refresh token for it. Before, it was
/// thrown away like a pair whose lease another holder had used, and the
/// next refresh spent the rotated-out token.
#[test]
fn a_holder_whose_lease_was_given_back_unused_stores_its_pair() {
    let env = Env::bare(Knobs::default());
    // request_timeout 5s: a lease lives 15 s.
    env.write_config(&section("5s", "1s"), &env.sink("raw", "0600"));
    let g = env.import("bot", true);
    let a = env.start();
    wait_serving(&env.socket, PATIENCE);
    wait_for("the start-up validation", PATIENCE, || {
        (env.provider.stats().validations_ok >= 1).then_some(())
    });

    let lock = refreshed_while_the_store_is_locked(&env, &a, 2000, true);
    a.pause();
    drop(lock);
    env.provider.update_knobs(|k| k.latency_ms = 0);
    assert_eq!(env.provider.grant(g.grant_id).unwrap().rotations, 1);

    // Once A's lease has expired, the import leases bot and gives it back.
    wait_for("A's lease to expire", Duration::from_secs(40), || {
        let until: i64 = env
            .raw_store()
            .query_row(
                "SELECT expires_at FROM leases WHERE name = 'bot'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (until < tokend::clock::now_ms()).then_some(())
    });
    let line = format!(
        "{{\"name\":\"bot\",\"provider\":\"fake\",\"refresh_token\":\"{}\"}}\n",
        g.refresh_token
    );
    let out = env.cli(&["import", "--from", "-", "--force"], &line);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leases: i64 = env
        .raw_store()
        .query_row("SELECT count(*) FROM leases", [], |r| r.get(0))
        .unwrap();
    assert_eq!(leases, 0, "the import kept a lease");

    // A wakes up and stores the pair the provider rotated to.
    a.signal(libc::SIGCONT);
    wait_for("A's pair in the store", PATIENCE, || {
        let info = env.provider.grant(g.grant_id).unwrap();
        (env.row("bot").unwrap().refresh_token == info.refresh_token).then_some(())
    });
    assert_eq!(env.events("bot", "lease_lost"), 0);
    // And it is the grant's live token: a refresh now rotates it once more.
    let out = env.cli(&["refresh", "bot"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.provider.stats().reuse_detected, 0);
    assert_grant_kept(&env, g.grant_id, "bot");
    drop(a);
}

/// Kills the daemon (SIGKILL: an OOM kill, systemd's stop timeout) while
/// its commit of `bot`'s refreshed pair waits for a store another process
/// has locked: after the first commit failed, or (`failed` false) while
/// it still waits. The pair is in a file of its own by then (0600, in a
/// 0700 directory), and nowhere else: the store holds the token it
/// replaced, which the provider has spent. Returns the grant and the file.
fn killed_with_a_kept_pair(env: &Env, failed: bool) -> (MintedGrant, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    env.write_config(&section("5s", "1s"), &env.sink("raw", "0600"));
    let g = env.import("bot", true);
    let mut a = env.start();
    wait_serving(&env.socket, PATIENCE);
    wait_for("the start-up validation", PATIENCE, || {
        (env.provider.stats().validations_ok >= 1).then_some(())
    });

    let lock = refreshed_while_the_store_is_locked(env, &a, 2000, failed);
    let dir = env.db.parent().unwrap().join("tokend-pending");
    let kept = dir.join("bot.json");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&kept), 0o600);
    assert_eq!(mode(&dir), 0o700);
    a.kill9();
    drop(lock);
    env.provider.update_knobs(|k| k.latency_ms = 0);
    let info = env.provider.grant(g.grant_id).unwrap();
    assert_eq!(info.rotations, 1);
    assert!(
        env.row("bot").unwrap().refresh_token != info.refresh_token,
        "the pair was stored before the kill: this test tests nothing"
    );
    (g, kept)
}

/// The daemon's next start stores the kept pair before anything else.
/// Before, the pair died with the process, and the next start sent the
/// refresh token the provider had already rotated: a provider that
/// detects reuse then revoked the grant.
#[test]
fn a_pair_the_store_would_not_take_survives_a_kill() {
    survives_a_kill(true);
}

/// The same, killed while the first commit still waits for the store:
/// before, the pair went to the file only once that commit had failed,
/// after the busy timeout (5 s; on PostgreSQL, a dead connection's
/// commit waits longer), and a kill in that wait lost it.
#[test]
fn a_pair_whose_commit_hangs_survives_a_kill() {
    survives_a_kill(false);
}

fn survives_a_kill(failed: bool) {
    let env = Env::bare(Knobs::default());
    let (g, kept) = killed_with_a_kept_pair(&env, failed);
    let b = env.start();
    wait_serving(&env.socket, PATIENCE);
    wait_committed(&env, g.grant_id, "bot");
    b.wait_log(
        "stored the token pair a refresh got before tokend stopped",
        PATIENCE,
    );
    assert!(!kept.exists(), "the kept pair's file stayed");
    wait_for("the new token published", PATIENCE, || {
        let info = env.provider.grant(g.grant_id)?;
        (env.read_token("bot")? == info.access_token).then_some(())
    });
    assert_grant_kept(&env, g.grant_id, "bot");
    drop(b);
}

/// A crash after a kept pair's commit landed, before its file went: the
/// next start finds the pair already in the store, says so, and removes
/// the file, rather than reporting a pair discarded.
#[test]
fn a_kept_pair_found_stored_already_is_not_reported_lost() {
    let env = Env::bare(Knobs::default());
    let (g, kept) = killed_with_a_kept_pair(&env, true);
    let copy = kept.with_extension("copy");
    std::fs::copy(&kept, &copy).unwrap();
    let mut b = env.start();
    wait_serving(&env.socket, PATIENCE);
    b.wait_log(
        "stored the token pair a refresh got before tokend stopped",
        PATIENCE,
    );
    assert!(b.stop().success());
    // As the crash would have left it: stored, and still kept.
    std::fs::rename(&copy, &kept).unwrap();
    let c = env.start();
    wait_serving(&env.socket, PATIENCE);
    c.wait_log("was stored already; its file is removed", PATIENCE);
    assert!(!kept.exists(), "the kept pair's file stayed");
    assert!(
        !c.log().contains("was not stored"),
        "a stored pair was reported discarded"
    );
    assert_grant_kept(&env, g.grant_id, "bot");
}

/// Without a daemon, `tokend refresh` stores the kept pair first and
/// refreshes from it; `tokend migrate` refuses to move a store while a
/// pair waits to be stored in it (the copy would hold the spent token).
#[test]
fn a_direct_refresh_stores_a_kept_pair_first_and_migrate_waits_for_it() {
    let env = Env::bare(Knobs::default());
    let (g, kept) = killed_with_a_kept_pair(&env, true);
    let elsewhere = env.dir.path().join("moved/moved.db");
    let out = env.cli(
        &[
            "migrate",
            "--from",
            &format!("sqlite:{}", env.db.display()),
            "--to",
            &format!("sqlite:{}", elsewhere.display()),
        ],
        "",
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("wait to be stored") && said.contains("nothing was copied"),
        "{said}"
    );
    assert!(kept.exists());

    let out = env.cli(&["refresh", "bot"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!kept.exists(), "the kept pair's file stayed");
    let info = env.provider.grant(g.grant_id).unwrap();
    assert_eq!(info.rotations, 2, "refreshed from the kept pair");
    assert_grant_kept(&env, g.grant_id, "bot");
}

// ---- 3. on-demand requests obey the backoff, Retry-After and misconfigured ----

#[test]
fn reads_and_forced_refreshes_during_a_backoff_send_nothing() {
    let env = Env::bare(Knobs {
        fault: Some(Fault::TooManyRequests {
            retry_after_secs: Some(30),
        }),
        fault_on: FaultTarget::Token,
        ..Knobs::default()
    });
    env.write_config(&section("3s", "10m"), &env.sink("raw", "0600"));
    // 300 s left, under min_remaining: every read wants a refresh.
    let g = import_expiring(&env, "bot", 300);
    // No access token at all: the scheduler refreshes it at once.
    env.import("empty", false);
    let mut d = env.start();
    wait_serving(&env.socket, PATIENCE);
    wait_for("the start-up refresh of empty", PATIENCE, || {
        (env.state("empty")? == "retrying").then_some(())
    });

    // The first read tries once, is refused with Retry-After 30, and gets
    // the current token: unexpired, it is still the best there is.
    let r = get(&env.socket, "/v1/tokens/bot");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text() == g.access_token);
    assert_eq!(env.provider.stats().token_requests, 2);
    assert_eq!(env.state("bot").as_deref(), Some("retrying"));

    // 40 reads and 10 forced refreshes: answered at once, nothing sent.
    let burst = Instant::now();
    for _ in 0..40 {
        let r = get(&env.socket, "/v1/tokens/bot");
        assert_eq!(r.status, 200);
        assert!(r.text() == g.access_token);
    }
    for _ in 0..10 {
        let r = request(&env.socket, "POST", "/v1/credentials/bot/refresh");
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["refreshed"], false);
        assert_eq!(v["state"], "retrying");
        let next = humantime::parse_rfc3339(v["next_attempt_at"].as_str().unwrap()).unwrap();
        let left = next
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        assert!(
            left > Duration::from_secs(20),
            "Retry-After 30 is a floor: {left:?}"
        );
    }
    let out = env.cli(&["refresh", "bot"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the next attempt is due at")
            && stderr.contains("nothing is sent before it"),
        "{stderr}"
    );
    assert!(burst.elapsed() < Duration::from_secs(20));
    // Without a token to fall back on, a read says when the next try is.
    let r = get(&env.socket, "/v1/tokens/empty");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "no_valid_token");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("the next attempt is due at"),
        "{}",
        r.text()
    );
    assert_eq!(env.provider.stats().token_requests, 2);

    // SIGHUP does not clear a backoff the provider asked for.
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded", PATIENCE);
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(1500) {
        assert_eq!(get(&env.socket, "/v1/tokens/bot").status, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(env.provider.stats().token_requests, 2);
    assert!(d.stop().success());
}

#[test]
fn a_misconfigured_credential_sends_nothing_until_a_reload() {
    let env = Env::bare(Knobs::default());
    env.write_config(&section("3s", "1s"), &env.sink("raw", "0600"));
    let g = env.import("bot", true);
    let mut d = env.start();
    wait_serving(&env.socket, PATIENCE);
    env.provider.update_knobs(|k| {
        k.fault = Some(Fault::InvalidClient);
        k.fault_on = FaultTarget::Token;
        k.fault_count = Some(1);
    });
    let out = env.cli(&["refresh", "bot"], "");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(env.state("bot").as_deref(), Some("misconfigured"));
    assert_eq!(env.provider.stats().token_requests, 1);
    // The provider is fine again, but until a reload nothing is sent.
    for _ in 0..5 {
        let out = env.cli(&["refresh", "bot"], "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("nothing is sent until"), "{stderr}");
        // The token stays published until it expires, and is handed out.
        assert!(get(&env.socket, "/v1/tokens/bot").text() == g.access_token);
    }
    assert_eq!(env.provider.stats().token_requests, 1);
    // A reload (the fix, in real life) lets it try again.
    d.signal(libc::SIGHUP);
    wait_for("the reload to clear the state", PATIENCE, || {
        (env.state("bot")? == "valid").then_some(())
    });
    let out = env.cli(&["refresh", "bot"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.provider.stats().refreshes_ok, 1);
    assert_grant_kept(&env, g.grant_id, "bot");
    assert!(d.stop().success());
}

// ---- 4. classification never kills a live grant nor hides a rotation ----

#[test]
fn only_invalid_grant_declares_a_grant_dead() {
    let env = Env::bare(Knobs::default());
    env.write_config(&section("3s", "1s"), &env.sink("raw", "0600"));
    let g = env.import("bot", true);
    let d = env.start();
    wait_serving(&env.socket, PATIENCE);
    for code in [
        "temporarily_unavailable",
        "server_error",
        "slow_down",
        "quota_exceeded",
    ] {
        env.provider.update_knobs(|k| {
            k.fault = Some(Fault::OauthError {
                status: 400,
                error: code.into(),
            });
            k.fault_on = FaultTarget::Token;
            k.fault_count = Some(1);
        });
        let out = env.cli(&["refresh", "bot"], "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{code}: {stderr}");
        assert!(stderr.contains("(retrying)"), "{code}: {stderr}");
        assert_eq!(env.state("bot").as_deref(), Some("retrying"), "{code}");
        assert!(env.read_token("bot").is_some(), "{code}: the files stay");
        // Once the backoff has passed, the grant still works.
        wait_for("the backoff to pass", PATIENCE, || {
            env.cli(&["refresh", "bot"], "")
                .status
                .success()
                .then_some(())
        });
    }
    assert_grant_kept(&env, g.grant_id, "bot");
    drop(d);
}

#[test]
fn a_token_type_that_is_not_bearer_still_stores_the_rotated_refresh_token() {
    let env = Env::bare(Knobs::default());
    env.write_config(&section("3s", "1s"), &env.sink("raw", "0600"));
    let g = env.import("bot", true);
    let mut d = env.start();
    wait_serving(&env.socket, PATIENCE);
    env.provider.update_knobs(|k| {
        k.fault = Some(Fault::TokenType {
            token_type: "mac".into(),
        });
        k.fault_on = FaultTarget::Token;
        k.fault_count = Some(1);
    });
    let out = env.cli(&["refresh", "bot"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("token_type"), "{stderr}");
    assert_eq!(env.state("bot").as_deref(), Some("misconfigured"));
    // The provider rotated: the store holds the new refresh token, and the
    // old access token, still valid, stays in the store and the file.
    let info = env.provider.grant(g.grant_id).unwrap();
    assert_eq!(info.rotations, 1);
    let row = env.row("bot").unwrap();
    assert!(
        row.refresh_token == info.refresh_token,
        "the rotation was lost"
    );
    assert!(row.access_token.as_deref() == Some(g.access_token.as_str()));
    assert!(env.read_token("bot").unwrap() == g.access_token);
    // After a reload, a refresh with the stored refresh token works.
    d.signal(libc::SIGHUP);
    wait_for("the reload to clear the state", PATIENCE, || {
        (env.state("bot")? == "valid").then_some(())
    });
    let out = env.cli(&["refresh", "bot"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.provider.stats().refreshes_ok, 2);
    assert_grant_kept(&env, g.grant_id, "bot");
    assert!(d.stop().success());
}

#[test]
fn a_validation_failure_leaves_a_peer_s_refresh_mark() {
    let env = Env::bare(Knobs::default());
    env.write_config(&section("5s", "1s"), &env.sink("raw", "0600"));
    env.import("bot", true);
    let d = env.start();
    wait_serving(&env.socket, PATIENCE);
    wait_for("the start-up validation", PATIENCE, || {
        (env.provider.stats().validations_ok == 1).then_some(())
    });
    // A consumer reports the token refused: the re-validation takes 2 s and
    // gets a 503. Meanwhile a peer on another host starts a refresh.
    env.provider.update_knobs(|k| {
        k.latency_ms = 2000;
        k.fault = Some(Fault::Status503);
        k.fault_on = FaultTarget::Validate;
    });
    assert_eq!(
        request(&env.socket, "POST", "/v1/tokens/bot/rejected").status,
        202
    );
    wait_for("the re-validation", PATIENCE, || {
        (env.provider.stats().validations == 2).then_some(())
    });
    env.take_lease("bot", "peer-host/1/1", Duration::from_secs(600));
    d.wait_log("transient failure; will retry", PATIENCE);
    wait_for("the failure in the store", PATIENCE, || {
        (env.events("bot", "validation_failed") == 1).then_some(())
    });
    let mark = env.credential("bot").unwrap().refresh_started_at;
    assert!(mark.is_some(), "the validation cleared the peer's mark");
    drop(d);
}

/// A credential that comes due while its provider looks down waits for
/// another credential's probe. Meanwhile its status and a token read say
/// why nothing is sent and when the next attempt is due; before, once its
/// token expired, it showed `valid` with no token and neither.
#[test]
fn a_credential_waiting_for_the_probe_says_so() {
    let env = Env::bare(Knobs {
        fault: Some(Fault::Status503),
        fault_on: FaultTarget::Token,
        ..Knobs::default()
    });
    // retry_max 60 s: the provider is probed every 30 s (the probe's
    // interval, at most retry_max).
    env.write_config(
        &format!(
            "\n[refresh]\n{QUIET_SWEEP}\nrefresh_before_expiry = \"2s\"\nmin_remaining = \"1s\"\n\
             retry_initial = \"500ms\"\nretry_max = \"60s\"\nrequest_timeout = \"3s\"\n"
        ),
        &env.sink("raw", "0600"),
    );
    for n in ["c0", "c1"] {
        env.import(n, false);
    }
    env.import("steady", true);
    let d = env.start();
    wait_serving(&env.socket, PATIENCE);
    d.wait_log("the provider looks down", PATIENCE);
    // The first probe goes at once (c0 or c1, retrying): once it has, the
    // next is 30 s away, and `late` cannot be it.
    d.wait_log("probing a provider that looks down", PATIENCE);
    let g = import_expiring(&env, "late", 3);
    let before = env.provider.stats().token_requests;
    let status = wait_for("late to wait for the probe", PATIENCE, || {
        let s = get(&env.socket, "/v1/credentials/late").json();
        s["next_attempt_at"].is_string().then_some(s)
    });
    assert_eq!(status["state"], "valid");
    let why = status["last_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("looks down"),
        "the status gives no reason: {why:?}"
    );
    wait_for("late's token to expire", PATIENCE, || {
        let s = get(&env.socket, "/v1/credentials/late").json();
        (s["has_token"] == false).then_some(())
    });
    let r = get(&env.socket, "/v1/tokens/late");
    assert_eq!(r.status, 503);
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("looks down") && message.contains("the next attempt is due at"),
        "a token read is not told why or when: {message}"
    );
    assert_eq!(
        env.provider.grant(g.grant_id).unwrap().rotations,
        0,
        "late was refreshed"
    );
    assert!(
        env.provider.stats().token_requests - before <= 1,
        "more than one probe: {}",
        env.provider.stats().token_requests - before
    );
    // Only the token endpoint fails: a validation goes out at once, and
    // does not wait for (or take) the token endpoint's probe.
    let validated = env.provider.stats().validations_ok;
    assert_eq!(
        request(&env.socket, "POST", "/v1/tokens/steady/rejected").status,
        202
    );
    // Well before the next probe, 30 s away.
    wait_for("steady's validation", Duration::from_secs(10), || {
        (env.provider.stats().validations_ok > validated).then_some(())
    });
    // A validation answered 401 sends its refresh to the token endpoint:
    // that refresh waits for the probe like any other, instead of going
    // out (and failing: `retrying`) with the validation.
    import_with_access(&env, "stale", Some("not-a-token-the-provider-knows"), 3600);
    let status = wait_for("stale's refresh to wait", Duration::from_secs(10), || {
        let s = get(&env.socket, "/v1/credentials/stale").json();
        s["next_attempt_at"].is_string().then_some(s)
    });
    assert_eq!(status["state"], "valid", "{status}");
    drop(d);
}

#[test]
fn an_outage_costs_a_provider_one_probe_per_interval_and_its_return_is_seen_soon() {
    // Six credentials due at once while the provider answers 503. With
    // retry_max 2 s the provider is probed every 2 s: each credential's own
    // backoff (0.5 to 2 s) would send about four times as much.
    let env = Env::bare(Knobs {
        fault: Some(Fault::Status503),
        fault_on: FaultTarget::Token,
        ..Knobs::default()
    });
    env.write_config(&section("3s", "1s"), &env.sink("raw", "0600"));
    let names: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    for n in &names {
        env.import(n, false);
    }
    let d = env.start();
    wait_serving(&env.socket, PATIENCE);
    wait_for("every credential to fail once", PATIENCE, || {
        names
            .iter()
            .all(|n| env.state(n).as_deref() == Some("retrying"))
            .then_some(())
    });
    d.wait_log("the provider looks down", PATIENCE);
    let before = env.provider.stats().token_requests;
    let window = Instant::now();
    // Consumers keep asking meanwhile: nothing of theirs reaches the provider,
    // and each is told when the next attempt is due as the status says it,
    // not a time gone by (the held credentials were told their own
    // backoff's end, seconds past, while the status gave the hold's).
    let due_at = |text: &str| {
        let due = text.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
        humantime::parse_rfc3339(due).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    };
    while window.elapsed() < Duration::from_secs(8) {
        for n in &names {
            let status = get(&env.socket, &format!("/v1/credentials/{n}")).json();
            let told = status["next_attempt_at"].as_str().map(due_at);
            let r = get(&env.socket, &format!("/v1/tokens/{n}"));
            assert_eq!(r.status, 503);
            let message = r.json()["message"].as_str().unwrap().to_owned();
            let due = message
                .split_once("the next attempt is due at ")
                .map(|(_, t)| due_at(t))
                .unwrap_or_else(|| panic!("no next attempt: {message}"));
            let late = std::time::SystemTime::now()
                .duration_since(due)
                .unwrap_or_default();
            assert!(
                late < Duration::from_millis(1500) || told.is_none_or(|t| due >= t),
                "{n}: due {late:?} ago, before the status's {}: {message}",
                status["next_attempt_at"]
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let during = env.provider.stats().token_requests - before;
    assert!(
        (2..=6).contains(&during),
        "{during} requests in 8 s of outage: the provider was not probed one request at a time"
    );

    // The provider returns: the next probe sees it, and the others follow
    // within a few seconds, without waiting out their backoffs.
    env.provider.update_knobs(|k| k.fault = None);
    let back = Instant::now();
    wait_for("every credential to recover", PATIENCE, || {
        names
            .iter()
            .all(|n| env.state(n).as_deref() == Some("valid"))
            .then_some(())
    });
    assert!(
        back.elapsed() < Duration::from_secs(10),
        "recovery took {:?}",
        back.elapsed()
    );
    d.wait_log("the provider answers again", PATIENCE);
    drop(d);
}
