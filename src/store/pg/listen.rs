//! Changes reach every host: each write transaction sends
//! `NOTIFY tokend_changes` (the credential's name as payload, delivered on
//! commit), and a connection of its own `LISTEN`s for them, on a thread
//! of its own. Others' commits only are passed on (this process's own
//! store connections are recognised by their backend pids), as the names
//! they changed, so that a daemon re-reads those rows and no others; after
//! every (re)connection, "everything", since commits may have gone unheard
//! meanwhile. The daemon also re-reads every row's revision periodically,
//! the safety net for anything this misses.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
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

/// Names gathered between two reads of [`Changes`] beyond which the
/// daemon is told to re-read everything instead: one read of every row's
/// revision then costs less than a read per name.
const MAX_NAMES: usize = 4096;

/// What other processes changed since the daemon last looked.
pub enum Changed {
    /// These credentials' rows.
    Names(Vec<String>),
    /// Anything: a notification without a name, too many names, or a time
    /// when nobody listened.
    Everything,
}

#[derive(Default)]
struct Pending {
    names: HashSet<String>,
    everything: bool,
}

impl Pending {
    fn add(&mut self, name: &str) {
        if self.everything {
            return;
        }
        if name.is_empty() || self.names.len() >= MAX_NAMES {
            self.everything();
        } else {
            self.names.insert(name.to_owned());
        }
    }

    fn everything(&mut self) {
        self.everything = true;
        self.names = HashSet::new();
    }
}

/// The daemon's end of the listener: wake-ups, and what they are about.
pub struct Changes {
    wake: mpsc::Receiver<()>,
    pending: Arc<Mutex<Pending>>,
}

impl Changes {
    /// Waits until something changed; false once the listener is gone for
    /// good.
    pub async fn changed(&mut self) -> bool {
        self.wake.recv().await.is_some()
    }

    /// What changed since the last call, and forgets it.
    pub fn take(&mut self) -> Changed {
        while self.wake.try_recv().is_ok() {}
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let p = std::mem::take(&mut *p);
        if p.everything {
            Changed::Everything
        } else {
            Changed::Names(p.names.into_iter().collect())
        }
    }
}

/// The listener's end: gathers names, wakes the daemon.
struct Notifier {
    wake: mpsc::Sender<()>,
    pending: Arc<Mutex<Pending>>,
}

impl Notifier {
    fn gone(&self) -> bool {
        self.wake.is_closed()
    }

    fn note(&self, f: impl FnOnce(&mut Pending)) {
        f(&mut self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        // A full channel already holds a wake-up: one is enough.
        let _ = self.wake.try_send(());
    }
}

/// Reconnection backoff: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Starts the listener; its thread ends once the receiver is dropped.
pub(super) fn start(url: &PgUrl, own_pids: Arc<Pids>, health: Arc<Health>) -> Changes {
    let (wake, rx) = mpsc::channel(1);
    let pending = Arc::new(Mutex::new(Pending::default()));
    let tx = Notifier {
        wake,
        pending: pending.clone(),
    };
    let mut config = url.config();
    config.connect_timeout(Duration::from_secs(10));
    let spawned = std::thread::Builder::new()
        .name("tokend-pg-listen".into())
        .spawn(move || listen(&config, &own_pids, &health, &tx));
    if let Err(e) = spawned {
        // The periodic re-read still picks up every change, later.
        tracing::warn!(error = %e, "cannot start the database's change listener");
    }
    Changes { wake: rx, pending }
}

fn listen(config: &postgres::Config, own_pids: &Pids, health: &Health, tx: &Notifier) {
    let mut backoff = BACKOFF_FIRST;
    let mut was_down = false;
    while !tx.gone() {
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
                tx.note(Pending::everything);
                let e = follow(&mut client, own_pids, tx);
                if tx.gone() {
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
fn follow(client: &mut Client, own_pids: &Pids, tx: &Notifier) -> StoreError {
    let mut idle = 0;
    loop {
        let next = client.notifications().timeout_iter(POLL).next();
        match next {
            Ok(Some(n)) => {
                if !own_pids.contains(n.process_id()) {
                    tx.note(|p| p.add(n.payload()));
                }
            }
            Ok(None) => {
                if tx.gone() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_gathered_until_too_many_or_one_without_a_name() {
        let (wake, rx) = mpsc::channel(1);
        let pending = Arc::new(Mutex::new(Pending::default()));
        let n = Notifier {
            wake,
            pending: pending.clone(),
        };
        let mut c = Changes { wake: rx, pending };
        n.note(|p| p.add("a"));
        n.note(|p| p.add("b"));
        n.note(|p| p.add("a"));
        let Changed::Names(mut names) = c.take() else {
            panic!("everything")
        };
        names.sort();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(c.take(), Changed::Names(v) if v.is_empty()));
        n.note(|p| p.add(""));
        n.note(|p| p.add("c"));
        assert!(matches!(c.take(), Changed::Everything));
        for i in 0..=MAX_NAMES {
            n.note(|p| p.add(&format!("n{i}")));
        }
        assert!(matches!(c.take(), Changed::Everything));
    }
}
