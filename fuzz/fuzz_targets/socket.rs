//! The socket API: arbitrary bytes as a client's connection, served by the
//! daemon's own HTTP settings and routes against a real refresher (a store
//! with one credential, a provider that refuses connections). No panic, no
//! hang, an HTTP answer or none, and the token (or even the credential's
//! name) only to callers allowed it.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokend::config::{self, Env};
use tokend::refresher::Refresher;
use tokend::secret::Secret;
use tokend::socket::serve_stream;
use tokend::store::{Grant, NewCredential, Store, StoreConn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "fuzz-access-token-7f3c9a1e";
/// A uid the one access rule lets read `bot`; 65534 (nobody) has no rule.
const GRANTED_UID: u32 = 1001;

struct Harness {
    runtime: tokio::runtime::Runtime,
    refresher: Arc<Refresher>,
    /// Kept, never sent: the refresher's scheduler and workers keep running.
    _shutdown: tokio::sync::watch::Sender<bool>,
}

struct FuzzEnv;

impl Env for FuzzEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "FUZZ_SECRET").then(|| "client-secret".to_owned())
    }
}

/// Where the scratch database lives; removed when libFuzzer exits.
static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_scratch() {
    if let Some(dir) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A directory for the database, on tmpfs where there is one (SQLite's
/// fsyncs cost nothing there). Named after our pid, so that the
/// directories of runs that crashed (libFuzzer's exit on a crash skips
/// `atexit`) are recognised and removed by the next run.
fn scratch_dir() -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_owned()
    } else {
        std::env::temp_dir()
    };
    const PREFIX: &str = "tokend-fuzz-socket-";
    for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = e.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(PREFIX));
        if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let dir = base.join(format!("{PREFIX}{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = scratch_dir();
        SCRATCH.set(dir.clone()).unwrap();
        // SAFETY: registers a plain function with no preconditions.
        unsafe { libc::atexit(remove_scratch) };
        let db = dir.join("tokend.db");
        // Port 1 on loopback: refused at once, so a refresh fails fast.
        let text = format!(
            "database = {db:?}\nsocket = \"/nonexistent/tokend.sock\"\n\
             [providers.fake]\nclient_id = \"c\"\nclient_secret_env = \"FUZZ_SECRET\"\n\
             authorize_url = \"http://127.0.0.1:1/authorize\"\n\
             token_url = \"http://127.0.0.1:1/token\"\nvalidate_url = \"http://127.0.0.1:1/me\"\n\
             [[access]]\ncredentials = [\"bot\"]\nuids = [{GRANTED_UID}]\n"
        );
        let config = config::parse(&text, Path::new("fuzz.toml"), &FuzzEnv).unwrap();
        StoreConn::open(&db, true)
            .unwrap()
            .insert(&NewCredential {
                name: "bot".into(),
                provider: "fake".into(),
                access_token: Some(Secret::new(TOKEN)),
                grant: Grant::RefreshToken(Secret::new("fuzz-refresh-token")),
                scope: None,
                // Valid for a year: handed out without a refresh.
                expires_at: Some(tokend::clock::now_ms() + 365 * 86_400_000),
                event: "imported",
            })
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let refresher = runtime.block_on(async {
            let store = Store::open(&db).unwrap();
            let client = tokend::provider::Client::new().unwrap();
            Refresher::start(Arc::new(config), store, client, shutdown)
                .await
                .unwrap()
                .0
        });
        Harness {
            runtime,
            refresher,
            _shutdown: shutdown_tx,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&who, request)) = data.split_first() else {
        return;
    };
    // root (also our own uid here), a uid with a grant, a uid without one.
    let (uid, may_read) = match who % 3 {
        0 => (0, true),
        1 => (GRANTED_UID, true),
        _ => (65534, false),
    };
    let h = harness();
    let reply = h.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let served = tokio::spawn(serve_stream(server, h.refresher.clone(), uid, uid));
        // The server may close first (a malformed head): that is fine.
        let _ = client.write_all(request).await;
        let _ = client.shutdown().await;
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut reply))
            .await
            .expect("the server neither answered nor closed within 30 s")
            .expect("reading the reply");
        served.await.expect("the connection task");
        reply
    });
    // Every answer is HTTP/1.1, an HTTP/1.0 request's too (RFC 9110 §6.2).
    assert!(
        reply.is_empty() || reply.starts_with(b"HTTP/1.1 "),
        "not an HTTP reply: {:?}",
        String::from_utf8_lossy(&reply)
    );
    // A uid without a grant gets neither the token nor the name (lists and
    // metrics leave it out). Either may come back in an echo of the request
    // itself (a 404's path), so only a request that does not carry it tells.
    let carries = |hay: &[u8], what: &str| hay.windows(what.len()).any(|w| w == what.as_bytes());
    for secret in [TOKEN, "bot"] {
        if !may_read && !carries(request, secret) {
            assert!(
                !carries(&reply, secret),
                "uid {uid} was shown {secret:?}: {:?}",
                String::from_utf8_lossy(&reply)
            );
        }
    }
});
