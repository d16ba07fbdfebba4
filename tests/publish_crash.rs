//! Many files published at once survive a crash as one does: SIGKILL
//! while a sweep's worth of credentials is being published leaves every
//! file whole and holding a token its credential committed, and the next
//! start brings every file in step with the store (docs/design.md rules 1
//! and 4; README "File sinks").

mod support;

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use support::*;

/// Credentials due at once in each round: enough that many files are
/// being written at any moment of the sweep.
const CREDENTIALS: usize = 200;

/// Rounds, each with its own store and provider; set
/// `TOKEND_PUBLISH_CRASH_ITERATIONS` for a longer soak.
const DEFAULT_ITERATIONS: usize = 6;

/// The fake provider's access tokens: "fat_" and 40 lowercase hex digits.
fn is_access_token(s: &str) -> bool {
    s.len() == 44
        && s.starts_with("fat_")
        && s[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Every credential's stored access token and state.
fn stored(env: &Env) -> HashMap<String, (Option<String>, String)> {
    env.store()
        .expect("the store exists")
        .load_all()
        .expect("reading the store")
        .into_iter()
        .map(|c| {
            let token = c.access_token.map(|t| t.expose().to_owned());
            (c.name, (token, c.state.as_str().to_owned()))
        })
        .collect()
}

/// The sink directory's entries: (token files by name, temp files).
fn files(env: &Env) -> (HashMap<String, Vec<u8>>, usize) {
    let (mut tokens, mut temps) = (HashMap::new(), 0);
    let Ok(dir) = fs::read_dir(&env.tokens) else {
        return (tokens, temps);
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            temps += 1;
        } else if let Ok(bytes) = fs::read(e.path()) {
            tokens.insert(name, bytes);
        }
    }
    (tokens, temps)
}

#[test]
fn sigkill_while_many_files_are_published_leaves_only_whole_committed_tokens() {
    let iterations = std::env::var("TOKEND_PUBLISH_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS);
    let mut rng = seeded("TOKEND_PUBLISH_CRASH_SEED");
    let mut partial = 0;
    for round in 0..iterations {
        // Tokens for a year: each credential is refreshed once, so the one
        // token its row ever holds is the only one its file may hold.
        let env = Env::bare(Knobs {
            latency_ms: 20,
            ..Knobs::default()
        });
        env.write_config(
            &format!("[refresh]\nmax_concurrency = 16\n{QUIET_SWEEP}\n"),
            &env.sink("raw", "0640"),
        );
        env.seed(CREDENTIALS, None);

        let mut d = env.start();
        wait_for("the first refresh request", Duration::from_secs(30), || {
            (env.provider.stats().refresh_requests > 0).then_some(())
        });
        // The random delay is the point: the kill lands anywhere in the
        // sweep (about 250 ms: 200 × 20 ms / 16), between files' temp
        // writes, their renames and their directory's fsyncs.
        std::thread::sleep(Duration::from_millis(rng.u64(0..=300)));
        d.kill9();
        drop(d);
        let when = format!("round {round}, after the kill");
        assert_eq!(env.integrity_check(), "ok", "{when}: database integrity");

        let rows = stored(&env);
        let (written, temps) = files(&env);
        for (name, bytes) in &written {
            let text = String::from_utf8_lossy(bytes);
            assert!(
                is_access_token(&text),
                "{when}: {name} is torn or foreign ({} bytes)",
                bytes.len()
            );
            let (token, _) = rows
                .get(name)
                .unwrap_or_else(|| panic!("{when}: a file for {name}, which is not stored"));
            // Not assert_eq!: its message would print both tokens.
            assert!(
                token.as_deref() == Some(&*text),
                "{when}: {name}'s file holds a token its row never committed"
            );
        }
        if !written.is_empty() && written.len() < CREDENTIALS {
            partial += 1;
        }
        eprintln!(
            "round {round}: {} files and {temps} temp files at the kill",
            written.len()
        );

        let mut d = env.start();
        wait_for(
            "every file in step with the store",
            Duration::from_secs(60),
            || {
                let rows = stored(&env);
                let (written, temps) = files(&env);
                let settled = rows.iter().all(|(name, (token, state))| {
                    let file = written.get(name).map(|b| String::from_utf8_lossy(b));
                    match (state.as_str(), token) {
                        ("needs_reauthorization", _) => file.is_none(),
                        (_, Some(t)) => file.as_deref() == Some(t.as_str()),
                        (_, None) => false,
                    }
                });
                (settled && temps == 0 && rows.len() == CREDENTIALS).then_some(())
            },
        );
        wait_serving(&env.socket, Duration::from_secs(30));
        let status = d.stop();
        assert!(status.success(), "round {round}: stopped with {status}");
    }
    eprintln!("{partial} of {iterations} kills landed mid-sweep");
}
