//! The socket API (README "The socket API"): HTTP/1.1 over a Unix socket, so that
//! `curl --unix-socket … http://localhost/v1/tokens/NAME` is all a consumer needs.
//!
//! Every connection is bounded: a cap on connections (one more is closed at
//! once), on header size, on body size, on the time to send headers, and on
//! the time a request may take. A silent, slow, garbage or oversized client
//! costs one connection slot for a few seconds at most.

mod peer;
mod routes;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::config::{AccessRule, SocketConfig};
use crate::refresher::Refresher;

/// Connections served at once; one more is closed straight away.
const MAX_CONNECTIONS: usize = 512;
/// A request's headers must arrive within this (also closes idle keep-alive).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read buffer, and so the largest request head we accept.
const MAX_HEAD: usize = 16 * 1024;
/// How long shutdown lets requests in progress finish.
const DRAIN: Duration = Duration::from_secs(5);

/// Who may read what, swapped on reload.
pub struct Access {
    pub rules: Vec<AccessRule>,
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
    /// Binds the socket (replacing a stale file left by a crash, refusing a
    /// live one) and sets its mode and group.
    pub async fn bind(cfg: &SocketConfig) -> Result<Bound, String> {
        let listener = bind(cfg)
            .await
            .map_err(|e| format!("socket {}: {e}", cfg.path.display()))?;
        Ok(Bound {
            listener,
            path: cfg.path.clone(),
        })
    }

    /// Starts serving.
    pub fn serve(
        self,
        refresher: Arc<Refresher>,
        access: Arc<std::sync::RwLock<Access>>,
        shutdown: watch::Receiver<bool>,
    ) -> Server {
        let state = Arc::new(routes::State {
            refresher,
            access,
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

async fn bind(cfg: &SocketConfig) -> io::Result<UnixListener> {
    let path = &cfg.path;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new().recursive(true).create(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another tokend is listening there (stop it, or set another `socket`)",
            ));
        }
        // Nobody answers: a stale socket from a crash.
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    set_mode(path, cfg.mode, cfg.group.as_ref().map(|g| g.1))?;
    Ok(listener)
}

fn set_mode(path: &Path, mode: u32, gid: Option<u32>) -> io::Result<()> {
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

async fn accept_loop(
    listener: UnixListener,
    state: Arc<routes::State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (drain_tx, drain_rx) = watch::channel(false);
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
            tracing::warn!("socket connection limit reached; closing a new connection");
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
            serve(stream, state, caller, drain).await;
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
/// until the client is done or `drain` says the daemon is stopping.
async fn serve<S>(
    io: S,
    state: Arc<routes::State>,
    caller: Arc<peer::Caller>,
    mut drain: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let caller = caller.clone();
        async move { Ok::<_, std::convert::Infallible>(routes::handle(&state, &caller, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = drain.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        }
    }
}

/// Serves one connection over any byte stream exactly as the socket serves
/// a client (same HTTP settings, limits and routes), with the caller's uid
/// and gid given instead of read from SO_PEERCRED. It exists for the fuzz
/// target `fuzz/fuzz_targets/socket.rs`, which feeds hostile bytes through
/// an in-memory pipe: a Unix socket per input would be slower and would
/// always report our own uid.
pub async fn serve_stream<S>(
    io: S,
    refresher: Arc<Refresher>,
    access: Arc<std::sync::RwLock<Access>>,
    uid: u32,
    gid: u32,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(routes::State {
        refresher,
        access,
        own_uid: peer::own_uid(),
    });
    // Held open so that `serve` sees no shutdown.
    let (_running, drain) = watch::channel(false);
    serve(io, state, Arc::new(peer::Caller::new(uid, gid)), drain).await;
}
