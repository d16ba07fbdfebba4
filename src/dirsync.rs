//! Directory fsyncs shared by the writers of one directory, as a database
//! shares its commits' syncs (group commit).
//!
//! A replaced file is durable once its directory's entry is: an fsync of
//! the directory that *started after* the rename. When a hundred workers
//! rename files into one sink directory at once, each needs such an fsync,
//! not one of its own: the first to arrive runs one, those that renamed
//! while it ran wait for it to end and run the next one together, and so on.
//! Each writer still returns only once a sync that began after its rename
//! has finished (README "File sinks": a file is durable before tokend says
//! it is written).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Orders every sync's start (and, in the tests, every writer's rename) in
/// one sequence, so that "a sync that started after the rename" can be
/// checked, not only assumed.
static STAMP: AtomicU64 = AtomicU64::new(0);

/// One directory's syncs: `started` counts the syncs begun, `finished`
/// the last one ended, with its result.
#[derive(Default)]
struct Dir {
    state: Mutex<State>,
    ended: Condvar,
}

#[derive(Default)]
struct State {
    started: u64,
    finished: u64,
    running: bool,
    /// The result of sync `finished`, as an error's kind and text (io::Error
    /// is not Clone): every writer it covered gets it.
    last: Option<(io::ErrorKind, String)>,
    /// Where sync `finished` started in [`STAMP`]'s sequence.
    last_stamp: u64,
}

/// The directories being synced now, each with its writers; an entry goes
/// when its last writer leaves, so templated per-credential directories
/// do not pile up.
fn dirs() -> &'static Mutex<HashMap<PathBuf, Arc<Dir>>> {
    static DIRS: OnceLock<Mutex<HashMap<PathBuf, Arc<Dir>>>> = OnceLock::new();
    DIRS.get_or_init(Default::default)
}

/// Makes `dir`'s entries as of now durable: returns once an fsync of `dir`
/// that started after this call has finished, running it when no other
/// writer is.
pub fn sync(dir: &Path) -> io::Result<()> {
    sync_stamped(dir).0
}

/// [`sync`], and where the sync that covered the call started in
/// [`STAMP`]'s sequence.
fn sync_stamped(dir: &Path) -> (io::Result<()>, u64) {
    let d = dirs()
        .lock()
        .unwrap()
        .entry(dir.to_path_buf())
        .or_default()
        .clone();
    let result = d.sync(dir);
    let mut map = dirs().lock().unwrap();
    // Ours and the map's: nobody else is in this directory now.
    if Arc::strong_count(&d) == 2 {
        map.remove(dir);
    }
    result
}

impl Dir {
    fn sync(&self, dir: &Path) -> (io::Result<()>, u64) {
        let mut st = self.state.lock().unwrap();
        // The one running (if any) may have begun before our rename: only
        // the next one to start is sure to cover it.
        let need = st.started + 1;
        loop {
            if st.finished >= need {
                let r = match &st.last {
                    None => Ok(()),
                    Some((kind, text)) => Err(io::Error::new(*kind, text.clone())),
                };
                return (r, st.last_stamp);
            }
            if st.running {
                st = self.ended.wait(st).unwrap();
                continue;
            }
            st.running = true;
            st.started += 1;
            let this = st.started;
            let stamp = STAMP.fetch_add(1, Ordering::SeqCst) + 1;
            drop(st);
            let r = File::open(dir).and_then(|f| f.sync_all());
            st = self.state.lock().unwrap();
            st.running = false;
            st.finished = this;
            st.last_stamp = stamp;
            st.last = r.err().map(|e| (e.kind(), e.to_string()));
            self.ended.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn writers_of_one_directory_share_syncs_and_each_waits_for_one_started_after_its_rename() {
        let dir = tempfile::tempdir().unwrap();
        let (writers, rounds) = (32, 20);
        let barrier = Arc::new(Barrier::new(writers));
        let handles: Vec<_> = (0..writers)
            .map(|i| {
                let (barrier, path) = (barrier.clone(), dir.path().to_path_buf());
                std::thread::spawn(move || {
                    let mut stamps = Vec::new();
                    for round in 0..rounds {
                        barrier.wait();
                        std::fs::write(path.join(format!("f{i}-{round}")), b"x").unwrap();
                        let renamed = STAMP.fetch_add(1, Ordering::SeqCst) + 1;
                        let (r, began) = sync_stamped(&path);
                        r.unwrap();
                        // A sync already running when we renamed cannot
                        // count for us (checked: this fails with
                        // `need = st.started`).
                        assert!(
                            began > renamed,
                            "covered by a sync that began before the rename"
                        );
                        stamps.push(began);
                    }
                    stamps
                })
            })
            .collect();
        let mut syncs = std::collections::HashSet::new();
        for h in handles {
            syncs.extend(h.join().unwrap());
        }
        // Shared: far fewer syncs than writes.
        let writes = writers * rounds;
        assert!(
            syncs.len() < writes,
            "{} syncs for {writes} writes",
            syncs.len()
        );
        assert!(dirs().lock().unwrap().get(dir.path()).is_none());
    }

    #[test]
    fn a_failed_sync_is_every_waiting_writer_s_error() {
        let missing = Path::new("/nonexistent/tokend-dirsync-test");
        let e = sync(missing).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(dirs().lock().unwrap().get(missing).is_none());
    }
}
