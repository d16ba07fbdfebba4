//! Changes reach every host: each write transaction sends
//! `NOTIFY tokend_changes` (the credential's name as payload, delivered on
//! commit), and a connection of its own `LISTEN`s for them, on a thread
//! of its own. A wake-up is sent for others' commits only (this process's
//! own store connections are recognised by their backend pids), and one after
//! every (re)connection, since commits may have gone unheard meanwhile.
//! The daemon also re-reads every row's revision periodically, the safety
//! net for anything this misses.

use std::sync::Arc;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use tokio::sync::mpsc;

use super::super::{PgUrl, StoreError};
use super::{Health, Pids, Witness};

/// The channel every write transaction notifies.
pub(super) const CHANNEL: &str = "tokend_changes";

/// How long the listener waits for a notification before it checks that
/// the daemon still wants them and that the connection still answers (a
/// TCP connection whose peer vanished shows nothing until written to).
const POLL: Duration = Duration::from_secs(1);
const PING_EVERY: u32 = 15;

/// Reconnection backoff: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Starts the listener; its thread ends once the receiver is dropped.
pub(super) fn start(url: &PgUrl, own_pids: Arc<Pids>, health: Arc<Health>) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    let mut config = url.config();
    config.connect_timeout(Duration::from_secs(10));
    let spawned = std::thread::Builder::new()
        .name("tokend-pg-listen".into())
        .spawn(move || listen(&config, &own_pids, &health, &tx));
    if let Err(e) = spawned {
        // The periodic re-read still picks up every change, later.
        tracing::warn!(error = %e, "cannot start the database's change listener");
    }
    rx
}

fn listen(config: &postgres::Config, own_pids: &Pids, health: &Health, tx: &mpsc::Sender<()>) {
    let mut backoff = BACKOFF_FIRST;
    let mut was_down = false;
    while !tx.is_closed() {
        match config
            .connect(NoTls)
            .map_err(StoreError::from)
            .and_then(|mut c| {
                c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
                Ok(c)
            }) {
            Ok(mut client) => {
                if was_down {
                    tracing::info!("listening for other hosts' changes again");
                }
                health.up(Witness::Listener);
                backoff = BACKOFF_FIRST;
                // Whatever was committed while nobody listened.
                let _ = tx.try_send(());
                let e = follow(&mut client, own_pids, tx);
                if tx.is_closed() {
                    return;
                }
                tracing::warn!(error = %e, "lost the database's change notifications; reconnecting");
            }
            Err(e) => {
                // A connection lost is not an outage yet (a server's
                // restart): one that cannot be made again is.
                health.down(Witness::Listener, &e.to_string());
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot listen for the database's change notifications");
            }
        }
        was_down = true;
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Passes notifications on until the connection fails (the error) or the
/// receiver is gone.
fn follow(client: &mut Client, own_pids: &Pids, tx: &mpsc::Sender<()>) -> StoreError {
    let mut idle = 0;
    loop {
        let next = client.notifications().timeout_iter(POLL).next();
        match next {
            Ok(Some(n)) => {
                if !own_pids.contains(n.process_id()) {
                    // A full channel already holds a wake-up: one is enough.
                    let _ = tx.try_send(());
                }
            }
            Ok(None) => {
                if tx.is_closed() {
                    return StoreError::Closed;
                }
                idle += 1;
                if idle >= PING_EVERY || client.is_closed() {
                    idle = 0;
                    if let Err(e) = client.batch_execute("") {
                        return e.into();
                    }
                }
            }
            Err(e) => return e.into(),
        }
    }
}
