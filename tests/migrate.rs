//! `tokend migrate` (README "Moving to PostgreSQL"), the real binary
//! between a real SQLite file and a throwaway PostgreSQL: every credential
//! and event goes over and comes back unchanged, the copy refreshes
//! against a strict provider without a re-authorization, the old store can
//! refresh nothing more, and a move that cannot be done changes nothing.

mod support;

use std::time::Duration;

use support::pg::Server;
use support::*;
use tokend::store::{Database, PgUrl, StoreConn};

/// Opens the store a `database` value names, as `tokend list` would.
fn open(db: &str) -> StoreConn {
    let db = if Database::is_url(db) {
        Database::Postgres(PgUrl::parse(db).unwrap())
    } else {
        Database::Sqlite(db.into())
    };
    StoreConn::open_database(&db, false).unwrap()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The env's config with `database` set to `db`.
fn config_with(env: &Env, db: &str) {
    config_sealed(env, db, None);
}

/// The env's config with `database` set to `db`, and `key` as its
/// encryption_key_file (README "Secrets at rest") if given.
fn config_sealed(env: &Env, db: &str, key: Option<&std::path::Path>) {
    let key = key.map_or(String::new(), |k| {
        format!("encryption_key_file = \"{}\"\n", k.display())
    });
    // A request timeout well above the slow provider below: a refresh that
    // timed out while the provider went on to rotate would lose the grant.
    let refresh = fast_refresh_timeout("15s");
    let text = format!(
        "database = \"{db}\"\nsocket = \"{}\"\n{key}{refresh}\n{}\n{}",
        env.socket.display(),
        env.provider_block(),
        env.sink("raw", "0600")
    );
    std::fs::write(&env.config_path, text).unwrap();
}

#[test]
fn an_installation_moves_to_postgresql_and_back_unchanged_and_keeps_refreshing() {
    let Some(server) = Server::start() else {
        return;
    };
    let env = Env::new(Knobs::default());
    // Twelve credentials: six refreshed by a daemon (events, versions,
    // rotated tokens), six as imported.
    for i in 0..6 {
        import_expiring(&env, &format!("soon-{i}"), 1);
        import_expiring(&env, &format!("later-{i}"), 3600);
    }
    let mut daemon = env.start();
    wait_for("six refreshes", Duration::from_secs(30), || {
        (env.provider.stats().refreshes_ok >= 6).then_some(())
    });
    wait_for("six refreshed rows", Duration::from_secs(10), || {
        (0..6)
            .all(|i| {
                env.row(&format!("soon-{i}"))
                    .is_some_and(|r| r.state == "valid")
            })
            .then_some(())
    });
    daemon.stop();
    let sqlite = env.db.display().to_string();
    let before = open(&sqlite).dump().unwrap();
    assert_eq!(before.credentials(), 12);
    assert!(before.events() >= 18, "{} events", before.events());

    // To PostgreSQL: the destination is the config's database.
    let pg = server.fresh_db();
    config_with(&env, &pg);
    let said = ok(&env.cli(&["migrate", "--from", &format!("sqlite:{sqlite}")], ""));
    assert!(said.contains("moved 12 credential(s)"), "{said}");
    let moved = open(&pg).dump().unwrap();
    assert!(
        moved == before,
        "the PostgreSQL copy differs from the source"
    );
    assert!(
        open(&sqlite).dump().unwrap() == before,
        "the move changed the source's rows"
    );

    // And back, into a new SQLite file, from a URL on the command line.
    let back = env.dir.path().join("back/tokend.db").display().to_string();
    ok(&env.cli(
        &["migrate", "--from", &pg, "--to", &format!("sqlite:{back}")],
        "",
    ));
    assert!(
        open(&back).dump().unwrap() == before,
        "the round trip changed a row or an event"
    );

    // The copy in PostgreSQL was leased to the move on the way back: give
    // it a fresh database holding the first copy, and refresh from there
    // against the strict provider, with no re-authorization.
    let pg2 = server.fresh_db();
    config_with(&env, &pg2);
    ok(&env.cli(&["migrate", "--from", &format!("sqlite:{back}")], ""));
    let refreshes = env.provider.stats().refreshes_ok;
    let out = ok(&env.cli(&["refresh", "later-0"], ""));
    assert!(out.contains("later-0"), "{out}");
    assert_eq!(env.provider.stats().refreshes_ok, refreshes + 1);
    assert_eq!(env.provider.stats().reuse_detected, 0);
    assert_eq!(env.provider.stats().grants_revoked, 0);

    // The old stores refresh nothing any more: each of their copies is
    // leased to the move.
    config_with(&env, &sqlite);
    let out = env.cli(&["refresh", "later-1"], "");
    assert!(
        !out.status.success(),
        "the old store refreshed a moved credential"
    );
    assert_eq!(env.provider.stats().refreshes_ok, refreshes + 1);
}

#[test]
fn a_move_that_cannot_be_done_changes_nothing() {
    let Some(server) = Server::start() else {
        return;
    };
    let env = Env::new(Knobs::default());
    import_expiring(&env, "kept", 3600);
    import_expiring(&env, "taken", 3600);
    let sqlite = env.db.display().to_string();
    let from = format!("sqlite:{sqlite}");

    // The destination already holds one of the names: nothing is copied,
    // and the source is as it was (its credentials still refresh).
    let pg = server.fresh_db();
    config_with(&env, &pg);
    let g = env
        .provider
        .mint_grant(env.provider.client_id(), "read+write");
    ok(&env.cli(
        &[
            "import",
            "taken",
            "--provider",
            "fake",
            "--refresh-token",
            "-",
        ],
        &g.refresh_token,
    ));
    let out = env.cli(&["migrate", "--from", &from], "");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds \"taken\"") && err.contains("nothing was copied"),
        "{err}"
    );
    assert_eq!(open(&pg).dump().unwrap().credentials(), 1);
    config_with(&env, &sqlite);
    ok(&env.cli(&["refresh", "kept"], ""));

    // A refresh in flight on the source (a slow provider, within the
    // config's 15 s request timeout) refuses the move.
    let pg = server.fresh_db();
    env.provider.update_knobs(|k| k.latency_ms = 6000);
    let refresh = env
        .tokend(&["refresh", "kept"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the refresh's lease", Duration::from_secs(10), || {
        (env.state("kept").as_deref() == Some("refreshing")).then_some(())
    });
    // Held still until the move was tried, so that it meets the lease
    // however long the steps below take on a loaded machine (the lease
    // outlives the pause; the process is alive, only stopped).
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(refresh.id() as libc::pid_t, libc::SIGSTOP) };
    config_with(&env, &pg);
    let out = env.cli(&["migrate", "--from", &from], "");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("leased to a running tokend") && err.contains("nothing was copied"),
        "{err}"
    );
    assert_eq!(open(&pg).dump().unwrap().credentials(), 0);
    let mut refresh = refresh;
    // SAFETY: as above.
    unsafe { libc::kill(refresh.id() as libc::pid_t, libc::SIGCONT) };
    assert!(refresh.wait().unwrap().success());

    // Usage errors: a password on the command line, the same store twice.
    let out = env.cli(
        &[
            "migrate",
            "--from",
            &from,
            "--to",
            "postgresql://u:hunter2@h/db",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
    config_with(&env, &sqlite);
    let out = env.cli(&["migrate", "--from", &from], "");
    assert_eq!(out.status.code(), Some(2));
}

/// A sealed store moves sealed: its values and its (wrapped) data keys go
/// as they are, the copy opens with the same key, and plaintext rows are
/// refused by a sealed destination.
#[test]
fn a_sealed_store_moves_sealed_and_opens_with_the_same_key() {
    use std::os::unix::fs::PermissionsExt;
    let Some(server) = Server::start() else {
        return;
    };
    let env = Env::new(Knobs::default());
    let key = env.dir.path().join("key");
    let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    std::fs::write(&key, bytes).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sqlite = env.db.display().to_string();
    config_sealed(&env, &sqlite, Some(&key));
    let a = import_expiring(&env, "a", 3600);
    import_expiring(&env, "b", 3600);

    let pg = server.fresh_db();
    // postgresql://USER@/DB?host=…: its database's name.
    let db = pg
        .split("@/")
        .nth(1)
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    config_sealed(&env, &pg, Some(&key));
    ok(&env.cli(&["migrate", "--from", &format!("sqlite:{sqlite}")], ""));
    let stored = server.psql(&db, "SELECT refresh_token, access_token FROM credentials");
    assert!(!stored.contains(&a.refresh_token) && !stored.contains(&a.access_token));
    for line in stored.lines() {
        assert!(line.starts_with("tokend-seal:v1:"), "{line}");
    }
    assert_eq!(server.psql(&db, "SELECT count(*) FROM keys").trim(), "1");
    let before = env.provider.stats().refreshes_ok;
    ok(&env.cli(&["refresh", "a"], ""));
    assert_eq!(env.provider.stats().refreshes_ok, before + 1);
    let said = ok(&env.cli(&["status", "b"], ""));
    assert!(said.contains("valid"), "{said}");

    // A plaintext installation cannot go into the sealed store.
    let plain = env.dir.path().join("plain/tokend.db").display().to_string();
    config_with(&env, &plain);
    import_expiring(&env, "c", 3600);
    let out = env.cli(
        &["migrate", "--from", &format!("sqlite:{plain}"), "--to", &pg],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the destination is sealed and the source is not"),
        "{err}"
    );
    assert_eq!(
        server.psql(&db, "SELECT count(*) FROM credentials").trim(),
        "2"
    );
    // Nor the sealed store into that plaintext one: its own rows would be
    // plaintext in a sealed store, refused on every read.
    let out = env.cli(
        &["migrate", "--from", &pg, "--to", &format!("sqlite:{plain}")],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the source is sealed and the destination holds credentials in plaintext"),
        "{err}"
    );
    let said = ok(&env.cli(&["status"], ""));
    assert!(
        said.contains("valid") && !said.contains("needs_reauthorization"),
        "{said}"
    );
    assert!(!said.contains("\na\n"), "{said}");
}

/// A source moved already, moved again into the store that holds its
/// copies: the write fails (the names are there), and the source stays
/// leased to the move. Before, a failed write always unsealed the source,
/// so that both stores held live copies of every token, and daemons on
/// both would have refreshed them, each rotating the other's dead.
#[test]
fn a_source_moved_before_stays_sealed_when_moved_again() {
    let Some(server) = Server::start() else {
        return;
    };
    let env = Env::new(Knobs::default());
    import_expiring(&env, "a", 3600);
    import_expiring(&env, "b", 3600);
    let sqlite = env.db.display().to_string();
    let from = format!("sqlite:{sqlite}");
    let pg = server.fresh_db();
    config_with(&env, &pg);
    ok(&env.cli(&["migrate", "--from", &from], ""));

    let out = env.cli(&["migrate", "--from", &from], "");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds") && err.contains("stays leased"),
        "{err}"
    );
    let moved: i64 = env
        .raw_store()
        .query_row(
            "SELECT count(*) FROM leases WHERE holder = ?1",
            [tokend::store::MOVED],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(moved, 2, "the source was unsealed beside its live copy");
    assert_eq!(open(&pg).dump().unwrap().credentials(), 2);
}
