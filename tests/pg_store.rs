//! The PostgreSQL store (issue 12) against a throwaway server
//! ([`support::pg::Server`]).

mod support;

use std::time::Instant;

use support::pg::Server;

/// The test kit's server starts, takes connections on its socket only,
/// gives each test a database of its own, and survives a crash restart.
#[test]
fn the_throwaway_server_starts_restarts_and_stops() {
    let started = Instant::now();
    let Some(mut server) = Server::start() else {
        return;
    };
    eprintln!("PostgreSQL started in {:?}", started.elapsed());
    let url = server.fresh_db();
    assert!(url.starts_with("postgresql://tokend@/t0?host="), "{url}");
    assert_eq!(server.psql("t0", "SELECT 1 + 1").trim(), "2");
    assert_eq!(server.psql("tokend", "SHOW listen_addresses").trim(), "");
    server.psql(
        "t0",
        "CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)",
    );
    let restarted = Instant::now();
    server.restart();
    eprintln!("PostgreSQL restarted in {:?}", restarted.elapsed());
    assert_eq!(server.psql("t0", "SELECT v FROM kept").trim(), "7");
    let dir = server.socket_dir().to_owned();
    drop(server);
    assert!(!dir.exists(), "the server's directory outlived it");
}
