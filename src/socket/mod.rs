//! The socket API (README "The socket API"): HTTP/1.1 over a Unix socket, so that
//! `curl --unix-socket … http://localhost/v1/tokens/NAME` is all a consumer needs.
//!
//! Every connection is bounded: a cap on connections (one more is closed at
//! once), on header size, on body size, on the time to send headers, on the
//! time a request may take, and on the time an answer may wait for a client
//! that does not read it. A silent, slow, garbage, oversized or non-reading
//! client costs one connection slot for a few seconds at most.
//!
//! Every error is answered in JSON, a request head that cannot be parsed
//! included: [`conn`] serves HTTP/1.1 itself, and says why not hyper.

mod conn;
mod peer;
mod routes;

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::config::SocketConfig;
use crate::refresher::Refresher;

/// Connections served at once; one more is closed straight away.
const MAX_CONNECTIONS: usize = 512;
/// A request's headers must arrive within this (also closes idle keep-alive).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head we accept.
const MAX_HEAD: usize = 16 * 1024;
/// How long an answer may wait for a client that does not read it: from the
/// moment the socket buffer is full until the answer is all written (for
/// the streamed list, each part of it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one warning this often while connections are refused at the
/// limit, with how many were.
const LIMIT_LOG: Duration = Duration::from_secs(10);
/// How long shutdown lets requests in progress finish.
const DRAIN: Duration = Duration::from_secs(5);
// A consumer waiting for a refresh at shutdown is answered in time.
const _: () = assert!(DRAIN.as_secs() > crate::refresher::STOP_ANSWER.as_secs());

/// Why the socket could not be taken.
#[derive(Debug)]
pub struct BindError {
    pub message: String,
    /// The configuration is at fault (`socket` names something that is not
    /// a socket): exit 2, like any configuration error, rather than 1.
    pub config: bool,
}

impl BindError {
    fn failure(path: &Path, e: impl std::fmt::Display) -> BindError {
        BindError {
            message: format!("socket {}: {e}", path.display()),
            config: false,
        }
    }
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A bound socket, not yet served: binding comes before anything else
/// starts, so a daemon that cannot take its socket touches nothing.
pub struct Bound {
    listener: UnixListener,
    path: PathBuf,
}

/// The listening socket and its accept loop.
pub struct Server {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl Bound {
    /// Binds the socket (replacing a stale socket left by a crash, refusing
    /// a live one and anything that is not a socket) with its mode and group.
    pub async fn bind(cfg: &SocketConfig) -> Result<Bound, BindError> {
        let listener = bind(cfg).await?;
        Ok(Bound {
            listener,
            path: cfg.path.clone(),
        })
    }

    /// Starts serving.
    pub fn serve(self, refresher: Arc<Refresher>, shutdown: watch::Receiver<bool>) -> Server {
        let state = Arc::new(routes::State {
            refresher,
            own_uid: peer::own_uid(),
        });
        let task = tokio::spawn(accept_loop(self.listener, state, shutdown));
        Server {
            path: self.path,
            task,
        }
    }
}

impl Server {
    /// Waits for the accept loop to drain, then removes the socket file.
    pub async fn stop(self) {
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn bind(cfg: &SocketConfig) -> Result<UnixListener, BindError> {
    let path = &cfg.path;
    let fail = |e: io::Error| BindError::failure(path, e);
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(fail)?;
    }
    // What is there now, the link itself if it is one (never followed).
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(BindError::failure(
                    path,
                    "another tokend is listening there (stop it, or set another `socket`)",
                ));
            }
            // Nobody listens: a stale socket from a crash.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(fail(e)),
                    _ => {}
                }
            }
            Err(e) => {
                return Err(BindError::failure(
                    path,
                    format!(
                        "a socket is there, and whether anyone listens on it is unknown \
                         (connecting failed: {e}); remove it if it is stale"
                    ),
                ));
            }
        },
        Ok(meta) => {
            return Err(BindError {
                message: format!(
                    "socket: {} is {}, not a socket; tokend replaces only a stale socket \
                     and leaves anything else alone: set `socket` to another path",
                    path.display(),
                    describe(path, &meta)
                ),
                config: true,
            });
        }
    }
    let listener = bind_with_mode(path, cfg.mode).map_err(fail)?;
    if let Some((_, gid)) = &cfg.group {
        set_group(path, *gid).map_err(fail)?;
    }
    Ok(listener)
}

/// What a file that is not a socket is, for the error that names it
/// (here, and `check-config`'s).
pub(crate) fn describe(path: &Path, meta: &std::fs::Metadata) -> String {
    let t = meta.file_type();
    if t.is_symlink() {
        match std::fs::read_link(path) {
            Ok(to) => format!("a symbolic link (to {})", to.display()),
            Err(_) => "a symbolic link".into(),
        }
    } else if t.is_file() {
        "a regular file".into()
    } else if t.is_dir() {
        "a directory".into()
    } else if t.is_fifo() {
        "a FIFO".into()
    } else if t.is_char_device() {
        "a character device".into()
    } else if t.is_block_device() {
        "a block device".into()
    } else {
        "something else".into()
    }
}

/// Binds with the socket file born with exactly `mode`: bind(2) creates it
/// with 0777 minus the umask, so the umask is set to the complement of
/// `mode` around the call. No chmod by path follows, which a racing rename
/// could redirect to another file (and fchmod on the socket's descriptor
/// does not reach the file). The umask is the process's: nothing else
/// creates files while the daemon starts (the refresher has not started).
fn bind_with_mode(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let mask = !mode & 0o777;
    // SAFETY: umask cannot fail and has no preconditions.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

/// Gives the socket file we just bound the group `gid` without following
/// a symlink or trusting the path twice: the path is opened as a handle on
/// whatever is there (O_PATH, O_NOFOLLOW), that handle must be a socket
/// owned by us, and the chown goes through the handle.
fn set_group(path: &Path, gid: u32) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_socket() || meta.uid() != peer::own_uid() {
        return Err(io::Error::other(
            "the socket file was replaced before its group could be set",
        ));
    }
    // SAFETY: the descriptor is open for the call; with AT_EMPTY_PATH the
    // empty (NUL-terminated) path names that descriptor itself.
    let r = unsafe {
        libc::fchownat(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::uid_t::MAX, // -1: the owner stays
            gid,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

async fn accept_loop(
    listener: UnixListener,
    state: Arc<routes::State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (drain_tx, drain_rx) = watch::channel(false);
    // Connections refused at the limit, logged at most every LIMIT_LOG:
    // a client connecting in a loop would otherwise flood the journal.
    let (mut refused, mut logged): (u64, Option<tokio::time::Instant>) = (0, None);
    loop {
        let stream = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off a moment rather than spin.
                    tracing::warn!(error = %e, "socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if logged.is_none_or(|t| t.elapsed() >= LIMIT_LOG) {
                tracing::warn!(
                    refused,
                    "socket connection limit reached ({MAX_CONNECTIONS}); closing new connections"
                );
                (refused, logged) = (0, Some(tokio::time::Instant::now()));
            }
            continue;
        };
        let state = state.clone();
        let drain = drain_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let caller = match peer::Caller::of(&stream) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot identify a socket peer; closing");
                    return;
                }
            };
            if caller.uid != 0 && caller.uid != state.own_uid {
                // Access rules will need the caller's groups: look them up
                // off the runtime's threads (the user database may be LDAP).
                let c = caller.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    c.groups();
                })
                .await;
            }
            serve(stream, &state, &caller, drain).await;
        });
    }
    // Stop accepting first (the listener drops here), then let requests in
    // progress finish, cutting any still open after DRAIN.
    drop(listener);
    let _ = drain_tx.send(true);
    let _ = tokio::time::timeout(
        DRAIN + Duration::from_secs(1),
        slots.acquire_many(MAX_CONNECTIONS as u32),
    )
    .await;
}

/// Serves one connection: HTTP/1.1 with the daemon's limits, our routes,
/// until the client is done or `drain` says the daemon is stopping; then
/// a request in progress has DRAIN to be answered, and an idle connection
/// closes at once.
async fn serve<S>(io: S, state: &routes::State, caller: &peer::Caller, drain: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stop = AtomicBool::new(false);
    let conn = conn::serve(io, state, caller, &stop);
    tokio::pin!(conn);
    if until_drained(conn.as_mut(), drain).await {
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(DRAIN, conn).await;
    }
}

/// Polls `conn` to its end (false) or until `drain` says the daemon is
/// stopping (true).
///
/// Unlike a `select!` of the two, which polls the drain's `changed()` on
/// every wake of the connection (a lock of the channel's waiter list each
/// time, on every request), the drain is polled only when it has changed
/// or the task's waker is not the one it holds: once registered, its
/// notification wakes this task, and a version check (one atomic load)
/// tells the wake that is for it. It is polled outside tokio's cooperative
/// budget: a connection that used the task's budget up would otherwise
/// make that poll return without registering, and the drain would never
/// wake this task.
async fn until_drained<F: Future>(mut conn: Pin<&mut F>, drain: watch::Receiver<bool>) -> bool {
    let probe = drain.clone();
    let mut drain = drain;
    let changed = tokio::task::unconstrained(drain.changed());
    tokio::pin!(changed);
    let mut registered: Option<Waker> = None;
    std::future::poll_fn(|cx| {
        if conn.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        let stale = registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker()));
        // A closed channel (Err) ends serving as a drain does.
        if stale || probe.has_changed().unwrap_or(true) {
            if changed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(true);
            }
            if stale {
                registered = Some(cx.waker().clone());
            }
        }
        Poll::Pending
    })
    .await
}

/// Serves one connection over any byte stream exactly as the socket serves
/// a client (same HTTP settings, limits and routes), with the caller's uid
/// and gid given instead of read from SO_PEERCRED. It exists for the fuzz
/// target `fuzz/fuzz_targets/socket.rs`, which feeds hostile bytes through
/// an in-memory pipe: a Unix socket per input would be slower and would
/// always report our own uid.
pub async fn serve_stream<S>(io: S, refresher: Arc<Refresher>, uid: u32, gid: u32)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(routes::State {
        refresher,
        own_uid: peer::own_uid(),
    });
    // Held open so that `serve` sees no shutdown.
    let (_running, drain) = watch::channel(false);
    serve(io, &state, &peer::Caller::new(uid, gid), drain).await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A connection whose polls use up the task's cooperative budget (here
    /// by receiving a backlog, as a busy connection reads) still sees the
    /// drain once it goes quiet.
    #[tokio::test]
    async fn a_drain_reaches_a_connection_that_used_up_its_budget() {
        const BACKLOG: usize = 1000;
        let (stop, drain) = watch::channel(false);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for _ in 0..BACKLOG {
            tx.send(()).unwrap();
        }
        let taken = Arc::new(AtomicUsize::new(0));
        let counted = taken.clone();
        let serving = tokio::spawn(async move {
            let conn = std::future::poll_fn(move |cx| {
                while let Poll::Ready(Some(())) = rx.poll_recv(cx) {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                Poll::<()>::Pending
            });
            tokio::pin!(conn);
            until_drained(conn, drain).await
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while taken.load(Ordering::Relaxed) < BACKLOG {
            assert!(
                std::time::Instant::now() < deadline,
                "the backlog was not taken"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(true).unwrap();
        let drained = tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("the drain never reached the connection")
            .unwrap();
        assert!(drained);
        drop(tx);
    }
}
