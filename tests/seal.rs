//! Secrets at rest (issue 12, README "Secrets at rest"): the real binary
//! with `encryption_key_file`. The store (SQLite, read raw and with SQL;
//! PostgreSQL's rows) holds no token in plaintext, yet the daemon
//! refreshes and publishes the provider's real token; a wrong key is
//! refused and changes nothing; `tokend keys seal|rotate|rewrap` keep
//! every credential usable, for a second host too; a planted plaintext
//! token is refused.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::pg::Server;
use support::*;

/// What every sealed value starts with.
const SEALED: &str = "tokend-seal:v1:";

/// A key file of 32 random bytes, mode 0600, in the test's directory.
fn key_file(env: &Env, name: &str) -> PathBuf {
    let p = env.dir.path().join(name);
    // Random: two keys of one test must differ, whatever a seed says.
    let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    fs::write(&p, bytes).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A config at `path` for `database`, with `key` as encryption_key_file.
fn write_config_at(env: &Env, path: &Path, database: &str, key: Option<&Path>) {
    let key = key.map_or(String::new(), |k| {
        format!("encryption_key_file = \"{}\"\n", k.display())
    });
    let text = format!(
        "database = \"{database}\"\nsocket = \"{}\"\n{key}{FAST_REFRESH}\n{}\n{}",
        env.socket.display(),
        env.provider_block(),
        env.sink("raw", "0600")
    );
    fs::write(path, text).unwrap();
}

fn write_config(env: &Env, key: Option<&Path>) {
    write_config_at(env, &env.config_path, &env.db.display().to_string(), key);
}

/// `tokend -c CONFIG ARGS…`, as [`Env::tokend`] makes it but with another
/// config (a second host's).
fn tokend_at(env: &Env, config: &Path, args: &[&str]) -> std::process::Command {
    tokend_command(config, env.dir.path(), args)
}

/// Runs a command with another config (a second host's); its stderr is
/// audited.
fn cli_with(env: &Env, config: &Path, args: &[&str]) -> std::process::Output {
    run_cli(tokend_at(env, config, args), "")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Every byte of the SQLite file and its companions.
fn raw_bytes(env: &Env) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        if let Ok(b) = fs::read(format!("{}{suffix}", env.db.display())) {
            all.extend(b);
        }
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The store holds none of `tokens`, nor any of the fake provider's
/// token markers, in any byte of its files; and every token column holds
/// a sealed value (read with SQL, as a DBA would).
fn assert_sealed_sqlite(env: &Env, tokens: &[&str]) {
    let bytes = raw_bytes(env);
    assert!(!bytes.is_empty());
    for t in tokens {
        assert!(!contains(&bytes, t), "a token is in the database file");
    }
    for m in ["fat_", "frt_"] {
        assert!(!contains(&bytes, m), "a {m} token is in the database file");
    }
    let c = env.raw_store();
    let mut st = c
        .prepare("SELECT name, access_token, refresh_token FROM credentials")
        .unwrap();
    let rows: Vec<(String, Option<String>, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!rows.is_empty());
    for (name, access, refresh) in rows {
        assert!(refresh.starts_with(SEALED), "{name}'s refresh token");
        if let Some(a) = access {
            assert!(a.starts_with(SEALED), "{name}'s access token");
        }
    }
}

/// Starts a daemon on `config` and waits until `name`'s published token is
/// a new one the provider accepts.
fn daemon_publishes(env: &Env, config: &Path, name: &str, old: &str) -> String {
    let log = env
        .dir
        .path()
        .join(format!("daemon-{name}-{}.log", fastrand::u32(..)));
    let mut daemon = Daemon::spawn(tokend_at(env, config, &["run"]), config, log);
    let token = wait_for(
        "the refreshed token in the sink",
        Duration::from_secs(20),
        || env.read_token(name).filter(|t| !t.is_empty() && t != old),
    );
    assert!(
        env.provider.access_token_valid(&token),
        "the published token is not the provider's"
    );
    daemon.stop();
    token
}

#[test]
fn sqlite_holds_no_plaintext_token_and_the_daemon_publishes_the_real_one() {
    let env = Env::bare(Knobs::default());
    let key = key_file(&env, "key");
    write_config(&env, Some(&key));
    let said = ok(&env.cli(&["check-config"], ""), "check-config");
    assert!(said.contains("sealing on, key fingerprint "), "{said}");
    let key_bytes = fs::read(&key).unwrap();
    let said_bytes = said.as_bytes();
    assert!(
        !said_bytes
            .windows(8)
            .any(|w| key_bytes.windows(8).any(|k| k == w)),
        "check-config shows the key"
    );

    let g = import_expiring(&env, "bot", 1);
    assert_sealed_sqlite(&env, &[&g.access_token, &g.refresh_token]);
    let status = ok(&env.cli(&["keys", "status"], ""), "keys status");
    assert!(status.contains("store: sealed"), "{status}");
    assert!(status.contains("data key 1 (active)"), "{status}");
    assert!(!status.contains("plaintext"), "{status}");

    let published = daemon_publishes(&env, &env.config_path, "bot", &g.access_token);
    assert_sealed_sqlite(&env, &[&g.access_token, &g.refresh_token, &published]);
    // The CLI opens what the daemon sealed.
    let listed = ok(&env.cli(&["status", "bot"], ""), "status");
    assert!(listed.contains("valid"), "{listed}");
}

#[test]
fn a_wrong_or_missing_or_bad_key_is_refused_and_changes_nothing() {
    let env = Env::bare(Knobs::default());
    let key = key_file(&env, "key");
    write_config(&env, Some(&key));
    import_expiring(&env, "bot", 3600);
    let before = raw_rows(&env);

    // Another key: refused with both fingerprints, the store untouched.
    let other = key_file(&env, "other");
    write_config(&env, Some(&other));
    // check-config finds it first, reading the store only (below: the
    // store is unchanged).
    let out = env.cli(&["check-config"], "");
    assert_eq!(
        out.status.code(),
        Some(2),
        "check-config with the wrong key"
    );
    let e = text(&out.stderr);
    assert!(
        e.contains("database") && e.contains("wrapped by the key with fingerprint"),
        "{e}"
    );
    for args in [&["status"][..], &["refresh", "bot"], &["list"]] {
        let out = env.cli(args, "");
        assert!(!out.status.success(), "{args:?} with the wrong key");
        let e = text(&out.stderr);
        assert!(
            e.contains("wrapped by the key with fingerprint") && e.contains("this host's key file"),
            "{args:?}: {e}"
        );
    }
    let mut daemon = Daemon::start(&env, "wrong-key");
    assert!(!daemon.wait_exit(Duration::from_secs(20)).success());
    assert!(daemon.log().contains("fingerprint"), "{}", daemon.log());
    // No key at all: refused too, never read as plaintext.
    write_config(&env, None);
    let out = env.cli(&["check-config"], "");
    assert_eq!(out.status.code(), Some(2), "check-config without a key");
    assert!(
        text(&out.stderr).contains("store is sealed"),
        "{}",
        text(&out.stderr)
    );
    let out = env.cli(&["refresh", "bot"], "");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("store is sealed"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(raw_rows(&env), before, "a refused key changed the store");

    // Keys that are no keys: a config error naming the key and the reason.
    let loose = env.dir.path().join("loose");
    fs::copy(&key, &loose).unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
    let short = env.dir.path().join("short");
    fs::write(&short, [7u8; 16]).unwrap();
    fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
    for (file, why) in [
        (loose, "group or others may access it (mode 0644)"),
        (short, "holds 16 bytes"),
        (env.dir.path().join("missing"), "cannot read it"),
    ] {
        write_config(&env, Some(&file));
        let out = env.cli(&["check-config"], "");
        assert_eq!(out.status.code(), Some(2), "{}", file.display());
        let e = text(&out.stderr);
        assert!(e.contains("encryption_key_file") && e.contains(why), "{e}");
    }
    assert_eq!(raw_rows(&env), before);
    write_config(&env, Some(&key));
    ok(
        &env.cli(&["refresh", "bot"], ""),
        "refresh with the right key",
    );
}

/// Every credential row and data key, as stored.
fn raw_rows(env: &Env) -> Vec<String> {
    let c = env.raw_store();
    let mut out = Vec::new();
    for sql in [
        "SELECT name || '|' || COALESCE(access_token, '') || '|' || refresh_token || '|' || version FROM credentials ORDER BY name",
        "SELECT id || '|' || wrapped FROM keys ORDER BY id",
    ] {
        let mut st = c.prepare(sql).unwrap();
        out.extend(
            st.query_map([], |r| r.get::<_, String>(0))
                .unwrap()
                .map(Result::unwrap),
        );
    }
    out
}

#[test]
fn rotating_the_data_key_and_the_kek_keeps_every_credential_usable() {
    let env = Env::bare(Knobs::default());
    let key = key_file(&env, "key");
    write_config(&env, Some(&key));
    for name in ["a", "b", "c"] {
        import_expiring(&env, name, 3600);
    }

    let said = ok(&env.cli(&["keys", "rotate"], ""), "keys rotate");
    assert!(
        said.contains("data key 2 is active; 6 token value(s)"),
        "{said}"
    );
    assert!(
        said.contains("deleted data key(s) no value uses any more: [1]"),
        "{said}"
    );
    let c = env.raw_store();
    let on_2: i64 = c
        .query_row(
            "SELECT count(*) FROM credentials WHERE access_token LIKE 'tokend-seal:v1:2:%'
                AND refresh_token LIKE 'tokend-seal:v1:2:%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(on_2, 3);
    let keys: Vec<i64> = c
        .prepare("SELECT id FROM keys")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(keys, [2]);
    drop(c);
    for name in ["a", "b"] {
        let out = ok(&env.cli(&["refresh", name], ""), "refresh after rotate");
        assert!(out.contains(&format!("refreshed {name}")), "{out}");
    }
    assert_sealed_sqlite(&env, &[]);

    // A new key-encryption key: the data keys rewrapped, no token touched.
    let tokens_before: Vec<String> = raw_rows(&env)
        .into_iter()
        .filter(|r| !r.starts_with("2|"))
        .collect();
    let new_key = key_file(&env, "new-key");
    let said = ok(
        &env.cli(
            &[
                "keys",
                "rewrap",
                "--new-key-file",
                new_key.to_str().unwrap(),
            ],
            "",
        ),
        "keys rewrap",
    );
    assert!(said.contains("rewrapped 1 data key(s)"), "{said}");
    let tokens_after: Vec<String> = raw_rows(&env)
        .into_iter()
        .filter(|r| !r.starts_with("2|"))
        .collect();
    assert_eq!(tokens_before, tokens_after, "rewrap touched a token");
    // The old key no longer opens the store; a second host with the new
    // config does, and so does this one once switched.
    let out = env.cli(&["status", "a"], "");
    assert!(!out.status.success(), "the old key still opens the store");
    let second = env.dir.path().join("second.toml");
    write_config_at(&env, &second, &env.db.display().to_string(), Some(&new_key));
    for name in ["a", "b", "c"] {
        ok(&cli_with(&env, &second, &["refresh", name]), "second host");
    }
    let g = daemon_publishes(&env, &second, "c", "");
    assert!(!g.is_empty());
    write_config(&env, Some(&new_key));
    ok(&env.cli(&["refresh", "a"], ""), "switched host");
    assert_sealed_sqlite(&env, &[&g]);
}

/// A sealed store holding `bot` (its token good for an hour), and a
/// daemon serving it, its start-up validation done; with the key file.
fn sealed_daemon(env: &Env) -> (PathBuf, Daemon) {
    let key = key_file(env, "key");
    write_config(env, Some(&key));
    import_expiring(env, "bot", 3600);
    let daemon = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    // The start-up validation done: one still in flight would read back a
    // value a test plants, and stop the credential before the test acts.
    wait_for("the start-up validation", Duration::from_secs(20), || {
        let s = get(&env.socket, "/v1/credentials/bot").json();
        (!s["last_validated_at"].is_null()).then_some(())
    });
    (key, daemon)
}

/// Plants `token` in plaintext as `name`'s `column`, with SQL, as someone
/// with write access to the database would: no `rev` is bumped, so no
/// store watch sees it.
fn plant(env: &Env, name: &str, column: &str, token: &str) {
    let n = env
        .raw_store()
        .execute(
            &format!("UPDATE credentials SET {column} = ?1 WHERE name = ?2"),
            [token, name],
        )
        .unwrap();
    assert_eq!(n, 1);
}

/// What `tokend status NAME` says of a refused row: it succeeds, and shows
/// the credential stopped with the reason.
fn assert_status_refused(env: &Env, name: &str, token: &str) {
    let said = ok(
        &env.cli(&["status", name], ""),
        "status of a refused credential",
    );
    assert!(said.contains("needs_reauthorization"), "{said}");
    assert!(
        said.contains(&format!(
            "refresh token of \"{name}\" is stored in plaintext in a sealed store"
        )),
        "{said}"
    );
    assert!(!said.contains(token), "status printed the planted token");
}

#[test]
fn a_planted_plaintext_token_is_refused() {
    let env = Env::bare(Knobs::default());
    let key = key_file(&env, "key");
    write_config(&env, Some(&key));
    import_expiring(&env, "bot", 3600);
    import_expiring(&env, "other", 3600);
    let mut daemon = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    assert!(env.read_token("bot").is_some());

    // Someone with write access to the database plants a refresh token of
    // their own under the running daemon: a grant they control.
    let planted = env.provider.mint_grant(env.provider.client_id(), "read");
    plant(&env, "bot", "refresh_token", &planted.refresh_token);
    // A forced refresh meets it: nothing is sent, the credential stops,
    // its files go, and the reason names it, never the value.
    let out = env.cli(&["refresh", "bot"], "");
    assert!(!out.status.success(), "a refresh with a planted token");
    let e = text(&out.stderr);
    assert!(
        e.contains("refresh token of \"bot\" is stored in plaintext in a sealed store"),
        "{e}"
    );
    assert!(!e.contains(&planted.refresh_token));
    wait_for("bot's file removed", Duration::from_secs(10), || {
        (!env.token_file("bot").exists()).then_some(())
    });
    let r = get(&env.socket, "/v1/tokens/bot");
    // Not the body in the message: a 200 would carry the token.
    assert_eq!(r.status, 503, "GET /v1/tokens/bot");
    assert!(r.text().contains("needs_reauthorization"), "{}", r.text());
    assert_eq!(get(&env.socket, "/v1/tokens/other").status, 200);
    assert_status_refused(&env, "bot", &planted.refresh_token);
    // The lease the refresh took on the row was given back, unmarked: no
    // other process is kept out, nor told a refresh was cut off.
    let (leases, state, mark): (i64, String, Option<i64>) = env
        .raw_store()
        .query_row(
            "SELECT (SELECT count(*) FROM leases), state, refresh_started_at \
             FROM credentials WHERE name = 'bot'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((leases, state.as_str(), mark), (0, "valid", None));
    daemon.stop();

    // A start-up that finds the planted row serves every other credential
    // and shows this one stopped, for the daemon and without it.
    let mut daemon = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    daemon.wait_log("credential refused", Duration::from_secs(5));
    assert_eq!(get(&env.socket, "/v1/tokens/other").status, 200);
    assert_eq!(get(&env.socket, "/v1/tokens/bot").status, 503);
    assert!(!env.token_file("bot").exists());
    assert_status_refused(&env, "bot", &planted.refresh_token);
    daemon.stop();
    assert_status_refused(&env, "bot", &planted.refresh_token);
    let listed = ok(&env.cli(&["list"], ""), "list");
    assert!(
        listed.contains("other") && listed.contains("bot"),
        "{listed}"
    );
    let out = env.cli(&["refresh", "bot"], "");
    assert!(!out.status.success(), "a direct refresh of a planted token");
    assert!(
        text(&out.stderr).contains("stored in plaintext in a sealed store"),
        "{}",
        text(&out.stderr)
    );
    // Revoking would send the planted token to the provider: refused,
    // with a provider that can revoke, and the lease it took given back.
    let config = fs::read_to_string(&env.config_path).unwrap();
    let revoking = env.dir.path().join("revoking.toml");
    fs::write(
        &revoking,
        config.replace(
            "[providers.fake]\n",
            &format!(
                "[providers.fake]\nrevocation_url = \"{}/oauth2/revoke\"\n",
                env.provider.url()
            ),
        ),
    )
    .unwrap();
    let out = cli_with(&env, &revoking, &["remove", "bot", "--revoke"]);
    assert!(!out.status.success(), "remove --revoke of a planted token");
    let e = text(&out.stderr);
    assert!(e.contains("stored in plaintext in a sealed store"), "{e}");
    assert!(!e.contains(&planted.refresh_token));
    assert_eq!(
        env.provider.stats().grants_revoked,
        0,
        "something was revoked"
    );
    let leases: i64 = env
        .raw_store()
        .query_row("SELECT count(*) FROM leases", [], |r| r.get(0))
        .unwrap();
    assert_eq!(leases, 0, "a lease on the refused row was kept");

    // The planted token never reached the provider, nor was it sealed.
    let grant = env
        .provider
        .grant_of_refresh_token(&planted.refresh_token)
        .unwrap();
    assert_eq!(grant.rotations, 0, "the planted token was used");
    let said = env.cli(&["keys", "rotate"], "");
    assert!(!said.status.success());
    assert!(text(&said.stderr).contains("bot"), "{}", text(&said.stderr));
    let stored: String = env
        .raw_store()
        .query_row(
            "SELECT refresh_token FROM credentials WHERE name = 'bot'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // Compared, never printed: a failure message must not show a token.
    assert!(
        stored == planted.refresh_token,
        "rotate sealed a planted token"
    );

    // The operator's ways out: a new import brings it back under a running
    // daemon; remove drops it.
    let daemon = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    env.reimport("bot");
    let token = wait_for("bot served again", Duration::from_secs(20), || {
        let r = get(&env.socket, "/v1/tokens/bot");
        (r.status == 200).then(|| r.text())
    });
    assert!(env.provider.access_token_valid(&token));
    drop(daemon);
    ok(&env.cli(&["refresh", "other"], ""), "the other credential");

    // A sealed value copied from another row does not open there: the
    // same refusal, for this credential alone.
    env.raw_store()
        .execute(
            "UPDATE credentials SET refresh_token = \
             (SELECT refresh_token FROM credentials WHERE name = 'other') WHERE name = 'bot'",
            [],
        )
        .unwrap();
    let said = ok(&env.cli(&["status"], ""), "status with a copied value");
    assert!(said.contains("copied from another credential"), "{said}");
    assert!(said.contains("needs_reauthorization"), "{said}");
    // So is one naming a data key that never existed (keys are stored
    // before anything is sealed with them).
    plant(
        &env,
        "bot",
        "refresh_token",
        "tokend-seal:v1:99:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    );
    let said = ok(&env.cli(&["status"], ""), "status with a made-up key id");
    assert!(said.contains("data key 99"), "{said}");
    assert!(said.contains("needs_reauthorization"), "{said}");
    ok(&env.cli(&["refresh", "other"], ""), "the other credential");
    ok(&env.cli(&["remove", "bot"], ""), "remove");
}

/// A planted refresh token found by a validation (the row it writes back
/// is read with the planted value) stops the credential there too.
#[test]
fn a_planted_plaintext_token_found_by_a_validation_stops_the_credential() {
    let env = Env::bare(Knobs::default());
    let (_, daemon) = sealed_daemon(&env);
    let validations = env.provider.stats().validations;
    let planted = env.provider.mint_grant(env.provider.client_id(), "read");
    plant(&env, "bot", "refresh_token", &planted.refresh_token);
    // A consumer reports the token refused: tokend validates it again.
    let r = request(&env.socket, "POST", "/v1/tokens/bot/rejected");
    assert_eq!(r.status, 202, "{}", r.text());
    wait_for("bot's file removed", Duration::from_secs(10), || {
        (!env.token_file("bot").exists()).then_some(())
    });
    assert!(env.provider.stats().validations > validations);
    assert_eq!(get(&env.socket, "/v1/tokens/bot").status, 503);
    assert_status_refused(&env, "bot", &planted.refresh_token);
    drop(daemon);
    let grant = env
        .provider
        .grant_of_refresh_token(&planted.refresh_token)
        .unwrap();
    assert_eq!(grant.rotations, 0, "the planted token was used");
}

/// An access token planted in plaintext is never published: the row's
/// refresh token still opens, so the daemon fetches a new access token
/// with it, and the planted one is overwritten.
#[test]
fn a_planted_plaintext_access_token_is_never_published() {
    let env = Env::bare(Knobs::default());
    let key = key_file(&env, "key");
    write_config(&env, Some(&key));
    import_expiring(&env, "bot", 3600);
    let planted = env.provider.mint_grant(env.provider.client_id(), "read");
    plant(&env, "bot", "access_token", &planted.access_token);
    let daemon = env.start();
    wait_serving(&env.socket, Duration::from_secs(20));
    assert!(
        env.read_token("bot").as_deref() != Some(planted.access_token.as_str()),
        "the planted access token was published at start-up"
    );
    let token = wait_for("a new token for bot", Duration::from_secs(20), || {
        env.read_token("bot")
    });
    assert!(
        token != planted.access_token,
        "the planted access token was published"
    );
    assert!(env.provider.access_token_valid(&token));
    drop(daemon);
    // Overwritten, sealed (the old bytes may linger in free pages until a
    // VACUUM, as README "Secrets at rest" says of a store sealed late).
    let stored: String = env
        .raw_store()
        .query_row(
            "SELECT access_token FROM credentials WHERE name = 'bot'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(stored.starts_with(SEALED), "bot's access token");
}

/// SIGHUP with another key in the config (say, before `keys rewrap`)
/// keeps the key the store was opened with, says so by fingerprint, and
/// keeps refreshing: the new key is read at the next start.
#[test]
fn a_new_key_on_reload_waits_for_a_restart() {
    let env = Env::bare(Knobs::default());
    let (key, daemon) = sealed_daemon(&env);
    let other = key_file(&env, "other-key");
    write_config(&env, Some(&other));
    // check-config says what a restart would meet: the store's data keys
    // are not wrapped by this key (before `keys rewrap`).
    let out = env.cli(&["check-config"], "");
    assert_eq!(out.status.code(), Some(2), "check-config with a new key");
    let said = text(&out.stderr);
    let configured = said
        .split("this host's key file has fingerprint ")
        .nth(1)
        .map(|s| s[..16].to_owned())
        .unwrap_or_else(|| panic!("no fingerprint in {said:?}"));
    daemon.signal(libc::SIGHUP);
    daemon.wait_log(
        "a new encryption key takes effect only after a restart",
        Duration::from_secs(10),
    );
    assert!(daemon.log().contains(&configured), "{}", daemon.log());
    let before = env.read_token("bot").unwrap();
    let r = request(&env.socket, "POST", "/v1/credentials/bot/refresh");
    assert_eq!(r.status, 200, "{}", r.text());
    let after = wait_for("the refreshed token", Duration::from_secs(10), || {
        env.read_token("bot").filter(|t| *t != before)
    });
    assert!(env.provider.access_token_valid(&after));
    drop(daemon);
    // Sealed with the store's own data key, which the first key opens.
    write_config(&env, Some(&key));
    ok(
        &env.cli(&["refresh", "bot"], ""),
        "refresh with the first key",
    );
}

#[test]
fn turning_sealing_on_for_an_existing_installation_loses_nothing() {
    let env = Env::bare(Knobs::default());
    write_config(&env, None);
    let a = import_expiring(&env, "a", 1);
    let b = import_expiring(&env, "b", 3600);
    let said = ok(&env.cli(&["check-config"], ""), "check-config");
    assert!(said.contains("sealing off"), "{said}");
    assert!(
        contains(&raw_bytes(&env), &b.refresh_token),
        "the test's premise"
    );

    let key = key_file(&env, "key");
    write_config(&env, Some(&key));
    // check-config says so before the daemon would refuse to start.
    let out = env.cli(&["check-config"], "");
    assert_eq!(out.status.code(), Some(2), "check-config over plaintext");
    assert!(
        text(&out.stderr).contains("2 credentials in plaintext: run `tokend keys seal`"),
        "{}",
        text(&out.stderr)
    );
    // A store with plaintext credentials is not written half sealed: it
    // waits for the one command that seals every row.
    let out = env.cli(&["status"], "");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("tokend keys seal"),
        "{}",
        text(&out.stderr)
    );
    let status = ok(&env.cli(&["keys", "status"], ""), "keys status");
    assert!(status.contains("store: not sealed"), "{status}");
    assert!(status.contains("plaintext tokens: 2"), "{status}");

    let said = ok(&env.cli(&["keys", "seal"], ""), "keys seal");
    assert!(said.contains("4 token value(s) sealed"), "{said}");
    assert_sealed_sqlite(
        &env,
        &[
            &a.access_token,
            &a.refresh_token,
            &b.access_token,
            &b.refresh_token,
        ],
    );
    let again = env.cli(&["keys", "seal"], "");
    assert!(!again.status.success(), "sealed twice");
    ok(&env.cli(&["check-config"], ""), "check-config once sealed");

    daemon_publishes(&env, &env.config_path, "a", &a.access_token);
    ok(&env.cli(&["refresh", "b"], ""), "refresh b");
    assert_sealed_sqlite(&env, &[&b.refresh_token]);
}

#[test]
fn keys_is_in_the_help_the_completions_and_the_man_page() {
    let env = Env::bare(Knobs::default());
    let help = ok(&env.cli(&["--help"], ""), "help");
    assert!(help.contains("\n  keys "), "{help}");
    let page = ok(&env.cli(&["man"], ""), "man");
    assert!(page.contains(".SS \"tokend keys\""), "{page}");
    assert!(page.contains(r"\-\-new\-key\-file"), "{page}");
    let bash = ok(&env.cli(&["completions", "bash"], ""), "completions");
    assert!(bash.contains("new-key-file") && bash.contains("rewrap"));
    // rewrap without the new key is a usage error.
    write_config(&env, None);
    assert_eq!(env.cli(&["keys", "rewrap"], "").status.code(), Some(2));
}

#[test]
fn postgresql_rows_hold_no_plaintext_and_a_second_host_reads_them() {
    let Some(server) = Server::start() else {
        return;
    };
    let env = Env::bare(Knobs::default());
    let url = server.fresh_db();
    let key = key_file(&env, "key");
    write_config_at(&env, &env.config_path, &url, Some(&key));
    let g = import_expiring(&env, "bot", 1);
    import_expiring(&env, "other", 3600);
    let plain = "SELECT count(*) FROM credentials WHERE access_token NOT LIKE 'tokend-seal:v1:%' \
                 OR refresh_token NOT LIKE 'tokend-seal:v1:%' OR access_token LIKE '%fat_%' \
                 OR refresh_token LIKE '%frt_%'";
    assert_eq!(server.psql("t0", plain).trim(), "0");
    let dump = server.psql("t0", "SELECT * FROM credentials");
    assert!(!dump.contains(&g.refresh_token) && !dump.contains("frt_"));
    assert_eq!(server.psql("t0", "SELECT id FROM keys").trim(), "1");

    let published = daemon_publishes(&env, &env.config_path, "bot", &g.access_token);
    assert_eq!(server.psql("t0", plain).trim(), "0");
    let dump = server.psql("t0", "SELECT * FROM credentials");
    assert!(!dump.contains(&published) && !dump.contains("fat_"));

    // Rotations, each followed by a second host that reads every row.
    ok(&env.cli(&["keys", "rotate"], ""), "keys rotate");
    assert_eq!(server.psql("t0", "SELECT id FROM keys").trim(), "2");
    let new_key = key_file(&env, "new-key");
    ok(
        &env.cli(
            &[
                "keys",
                "rewrap",
                "--new-key-file",
                new_key.to_str().unwrap(),
            ],
            "",
        ),
        "keys rewrap",
    );
    let second = env.dir.path().join("second.toml");
    write_config_at(&env, &second, &url, Some(&new_key));
    for name in ["bot", "other"] {
        ok(&cli_with(&env, &second, &["refresh", name]), "second host");
    }
    assert_eq!(server.psql("t0", plain).trim(), "0");
    // A planted plaintext token is refused here too.
    let planted = env.provider.mint_grant(env.provider.client_id(), "read");
    server.psql(
        "t0",
        &format!(
            "UPDATE credentials SET refresh_token = '{}' WHERE name = 'other'",
            planted.refresh_token
        ),
    );
    let out = cli_with(&env, &second, &["refresh", "other"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("plaintext in a sealed store"));
    // It stops that credential alone: the others are still read, and
    // `status` shows it stopped with the reason.
    let said = ok(&cli_with(&env, &second, &["status"]), "status");
    assert!(!said.contains(&planted.refresh_token));
    let of = |name: &str| {
        said.split("\n\n")
            .find(|block| block.starts_with(&format!("{name}\n")))
            .unwrap_or_else(|| panic!("no {name} in {said}"))
            .to_owned()
    };
    let other = of("other");
    assert!(other.contains("needs_reauthorization"), "{other}");
    assert!(other.contains("plaintext in a sealed store"), "{other}");
    assert!(!of("bot").contains("needs_reauthorization"), "{said}");
    ok(
        &cli_with(&env, &second, &["refresh", "bot"]),
        "bot beside it",
    );
    // No lease of the failed refresh above was kept.
    assert_eq!(server.psql("t0", "SELECT count(*) FROM leases").trim(), "0");
}

/// Each credential's name and the key its refresh token is sealed with: the
/// seal's prefix and key id only, never a token's characters, for a
/// failure message.
fn seals(server: &Server, db: &str) -> String {
    server.psql(
        db,
        "SELECT name, coalesce(substring(refresh_token FROM '^tokend-seal:v1:[0-9]+'), \
         'not sealed') FROM credentials",
    )
}

/// A daemon that missed a rotation of the data key (run from another host,
/// which then deletes the old key once no value uses it) must not commit a
/// refresh sealed with the retired key, which no host could open again:
/// its commit finds the active key changed, reads the keys again and
/// seals with the new one. On PostgreSQL the commit's own statement reads
/// the active key (src/store/pg/ops.rs, `COMMIT_REFRESH`).
#[test]
fn postgresql_a_refresh_after_another_hosts_rotation_is_sealed_with_the_new_key() {
    let Some(server) = Server::start() else {
        return;
    };
    let env = Env::bare(Knobs::default());
    let url = server.fresh_db();
    let db = Server::db_name(&url);
    let key = key_file(&env, "key");
    write_config_at(&env, &env.config_path, &url, Some(&key));
    // Room for the provider's slow answer below (FAST_REFRESH waits 3 s).
    let config = fs::read_to_string(&env.config_path).unwrap();
    assert!(config.contains("request_timeout = \"3s\""));
    fs::write(
        &env.config_path,
        config.replace("request_timeout = \"3s\"", "request_timeout = \"30s\""),
    )
    .unwrap();
    let g = import_expiring(&env, "bot", 3600);
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(
        tokend_at(&env, &env.config_path, &["run"]),
        &env.config_path,
        log,
    );
    wait_serving(&env.socket, Duration::from_secs(20));
    assert!(
        env.read_token("bot").as_deref() == Some(&*g.access_token),
        "bot's file does not hold the provider's token"
    );

    // A refresh whose answer takes 12 s (time for the rotation however
    // loaded the machine); while the provider holds it, another host
    // rotates: every value sealed with key 2, key 1 deleted. The daemon
    // read its row (and the keys) before the rotation and commits after it.
    env.provider.update_knobs(|k| k.answer_delay_ms = 12_000);
    let socket = env.socket.clone();
    // Waited for longer than `request`'s 20 s: the answer's 12 s, then a
    // commit that meets the new keys, on a machine running the suite.
    let refresh = std::thread::spawn(move || {
        socket_request(
            &socket,
            "POST",
            "/v1/credentials/bot/refresh",
            &[],
            b"",
            Duration::from_secs(60),
        )
        .expect("the refresh's answer")
    });
    wait_for(
        "the refresh request at the provider",
        Duration::from_secs(20),
        || {
            env.provider
                .requests()
                .iter()
                .any(|r| r.grant_type.as_deref() == Some("refresh_token"))
                .then_some(())
        },
    );
    let said = ok(&env.cli(&["keys", "rotate"], ""), "keys rotate");
    assert!(
        said.contains("deleted data key(s) no value uses any more: [1]"),
        "{said}"
    );
    assert!(
        !refresh.is_finished(),
        "the refresh ended before the rotation did: the machine was too slow for this test"
    );
    let reply = refresh.join().unwrap();
    env.provider.update_knobs(|k| k.answer_delay_ms = 0);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["refreshed"], true, "{}", reply.text());

    let on_2 = format!(
        "SELECT count(*) FROM credentials WHERE name = 'bot' \
         AND access_token LIKE '{SEALED}2:%' AND refresh_token LIKE '{SEALED}2:%'"
    );
    assert_eq!(
        server.psql(&db, &on_2).trim(),
        "1",
        "the refresh was not sealed with the active key: {}",
        seals(&server, &db)
    );
    assert_eq!(server.psql(&db, "SELECT id FROM keys").trim(), "2");
    // And it was this test's case: the commit, not the lease, met the new key.
    daemon.wait_log(
        "the data keys changed since this refresh was sealed",
        Duration::from_secs(5),
    );
    let published = env.read_token("bot").unwrap_or_default();
    assert!(
        published != g.access_token,
        "the old access token is still published"
    );
    assert!(env.provider.access_token_valid(&published));
    daemon.stop();
    // A host that starts now opens the row and refreshes it again.
    let out = ok(&env.cli(&["refresh", "bot"], ""), "refresh after restart");
    assert!(out.contains("refreshed bot"), "{out}");
}

/// `tokend keys rotate` must not delete the data key that a credential
/// being imported under a new name was sealed with. The new row is
/// invisible to the rotation until its transaction commits, so without a
/// lock the rotation re-seals every row it can see, deletes the old key,
/// and the import then commits a row no host can open: a grant lost. The
/// import's commit is held here the way a slow disk or a synchronous
/// standby holds it: `synchronous_standby_names` names a standby that
/// never answers, and only the importing role waits for it.
#[test]
fn postgresql_a_rotation_during_an_import_of_a_new_name_keeps_its_key() {
    let Some(server) = Server::start() else {
        return;
    };
    let env = Env::bare(Knobs::default());
    let url = server.fresh_db();
    let db = Server::db_name(&url);
    let key = key_file(&env, "key");
    write_config_at(&env, &env.config_path, &url, Some(&key));
    import_expiring(&env, "bot", 3600);
    assert_eq!(server.psql(&db, "SELECT id FROM keys").trim(), "1");

    // A second host's config, connecting as a role whose commits wait
    // for the standby; this one's (and psql's) do not.
    server.psql(&db, "CREATE ROLE importer LOGIN SUPERUSER");
    server.psql(&db, "ALTER ROLE tokend SET synchronous_commit = local");
    let importing = env.dir.path().join("importer.toml");
    assert!(url.starts_with("postgresql://tokend@"), "{url}");
    let importer_url = url.replacen("tokend@", "importer@", 1);
    write_config_at(&env, &importing, &importer_url, Some(&key));
    server.psql(&db, "ALTER SYSTEM SET synchronous_standby_names = 'nobody'");
    server.psql(&db, "SELECT pg_reload_conf()");

    let g = env
        .provider
        .mint_grant(env.provider.client_id(), "read+write");
    let import = {
        let (env_dir, refresh) = (env.dir.path().to_owned(), g.refresh_token.clone());
        let cmd = tokend_command(
            &importing,
            &env_dir,
            &[
                "import",
                "newbie",
                "--provider",
                "fake",
                "--refresh-token",
                "-",
            ],
        );
        std::thread::spawn(move || run_cli(cmd, &refresh))
    };
    let waiting = |event: &str| {
        let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE wait_event = '{event}'");
        server.psql(&db, &sql).trim() != "0"
    };
    wait_for(
        "the import's commit waiting for the standby",
        Duration::from_secs(20),
        || waiting("SyncRep").then_some(()),
    );
    let rotate = {
        let cmd = tokend_at(&env, &env.config_path, &["keys", "rotate"]);
        std::thread::spawn(move || run_cli(cmd, ""))
    };
    // The rotation must wait for the import (or have finished, which is
    // the loss this test is about: it is caught below).
    wait_for(
        "the rotation waiting for the import, or done",
        Duration::from_secs(20),
        || {
            (rotate.is_finished()
                || server
                    .psql(
                        &db,
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                         AND query LIKE '%keys%'",
                    )
                    .trim()
                    != "0")
                .then_some(())
        },
    );
    server.psql(&db, "ALTER SYSTEM RESET synchronous_standby_names");
    server.psql(&db, "SELECT pg_reload_conf()");
    ok(&import.join().unwrap(), "import");
    ok(&rotate.join().unwrap(), "keys rotate");

    // Every row sealed with the active key, and the old one gone.
    assert_eq!(server.psql(&db, "SELECT id FROM keys").trim(), "2");
    let on_2 = format!(
        "SELECT name FROM credentials WHERE refresh_token LIKE '{SEALED}2:%' ORDER BY name"
    );
    assert_eq!(
        server.psql(&db, &on_2).trim(),
        "bot\nnewbie",
        "a credential is not sealed with the active key: {}",
        seals(&server, &db)
    );
    // And the new credential opens and refreshes with the provider.
    let out = ok(&env.cli(&["refresh", "newbie"], ""), "refresh newbie");
    assert!(out.contains("refreshed newbie"), "{out}");
}
