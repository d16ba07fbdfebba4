//! `tokend refresh NAME`: a refresh now, through the daemon; without one,
//! directly, under the store's lease (so never racing a daemon that starts).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use super::Exit;
use super::args::{Global, Refresh};
use super::client::{self, Unreachable};
use crate::config;
use crate::provider;
use crate::refresher::Refresher;
use crate::store::Store;
use crate::wire::{Refreshed, State, Status};

pub fn run(global: &Global, args: &Refresh) -> Result<(), Exit> {
    let name = &args.name;
    let socket = config::socket_path(&global.config_path());
    let path = format!("/v1/credentials/{name}/refresh");
    let (status, refreshed) =
        match client::request(&socket, "POST", &path, true, Duration::from_secs(90)) {
            Ok(r) if r.status == 200 => {
                let Refreshed { refreshed, status } =
                    serde_json::from_slice(&r.body).map_err(|e| {
                        Exit::failure(format!("the daemon's answer is not a status: {e}"))
                    })?;
                (status, refreshed)
            }
            Ok(r) => return Err(Exit::failure(r.message())),
            Err(Unreachable::NotRunning(_)) => directly(global, name)?,
            Err(e) => return Err(super::token::unreachable(&socket, e)),
        };
    report(&status, refreshed, &global.config_path())
}

fn report(s: &Status, refreshed: bool, config: &std::path::Path) -> Result<(), Exit> {
    if refreshed {
        // Not println!: after a hangup (a direct refresh holds SIGHUP
        // until its token is stored) stdout may be a closed terminal, and
        // the refresh is done.
        let _ = writeln!(
            std::io::stdout(),
            "refreshed {}: the new token expires {}",
            s.name,
            s.expires_at.as_deref().unwrap_or("at an unknown time")
        );
        // Stored, so not a failure; but file readers do not have it yet.
        if let Some(e) = &s.last_publish_error {
            eprintln!(
                "warning: the new token is stored but its files could not be written ({e}); tokend keeps trying"
            );
        }
        return Ok(());
    }
    let why = s.last_error.as_deref().unwrap_or("no new token");
    let next = match s.state {
        State::NeedsReauthorization => format!(
            "; re-authorize with '{}'",
            crate::alerts::authorize_command(&s.name, &s.provider, config)
        ),
        State::Misconfigured => {
            "; nothing is sent until the provider's config is fixed and reloaded ('systemctl reload tokend')".into()
        }
        State::Retrying => match &s.next_attempt_at {
            // The backoff (and the provider's Retry-After) binds every path:
            // a forced refresh does not send early.
            Some(at) => format!(
                "; backing off: the next attempt is due at {at}, and nothing is sent before it"
            ),
            None => "; tokend keeps retrying with backoff".into(),
        },
        // Still in flight (tokend is stopping): its outcome is the status's.
        State::Refreshing => String::new(),
        _ => "; tokend keeps retrying with backoff".into(),
    };
    Err(Exit::failure(format!(
        "{} was not refreshed ({}): {why}{next}",
        s.name, s.state
    )))
}

/// No daemon: refresh in this process, through the same lease, commit and
/// publish path the daemon uses.
fn directly(global: &Global, name: &str) -> Result<(Status, bool), Exit> {
    let config = Arc::new(config::load(&global.config_path()).map_err(Exit::config)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Exit::failure(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async {
        let store = Store::open_config(&config)
            .map_err(|e| Exit::failure(format!("cannot open the database: {e}")))?;
        let client = provider::Client::new().map_err(Exit::failure)?;
        let r = Refresher::single(config, store, client, name)
            .await
            // Also what stores a pair a stopped daemon kept (its file's
            // error names the file), not only a read.
            .map_err(|e| Exit::failure(format!("cannot refresh {name}: {e}")))?
            .ok_or_else(|| {
                Exit::failure(format!(
                    "no credential named {name:?}; 'tokend list' shows those there are"
                ))
            })?;
        eprintln!("tokend is not running; refreshing {name} directly");
        let caught = Arc::new(AtomicI32::new(0));
        let held = hold_signals(&r, &caught)
            .map_err(|e| Exit::failure(format!("cannot handle signals: {e}")))?;
        let out = r
            .refresh_now(name)
            .await
            .ok_or_else(|| Exit::failure(format!("no credential named {name:?}")));
        // Leaving the runtime drops its tasks: the refresh must be over.
        r.settled().await;
        held.abort();
        match caught.load(Ordering::SeqCst) {
            0 => out,
            sig => match out {
                Ok((status, true)) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "tokend: signal {sig}: stopped after storing the refresh in flight"
                    );
                    Ok((status, true))
                }
                Ok((status, false)) => Err(Exit::failure(
                    match report(&status, false, &global.config_path()) {
                        Err(e) => format!("signal {sig}: stopped. {}", e.message),
                        Ok(()) => format!("signal {sig}: stopped"),
                    },
                )),
                Err(e) => Err(e),
            },
        }
    })
}

/// A signal that would end this process (Ctrl-C, a terminal closed, a
/// job runner's TERM) could land after the provider rotated the refresh
/// token and before the new one is stored: only this process would have
/// held it, and the grant would be lost. While the refresh runs, those
/// signals (and Ctrl-Z's) only stop a request not yet sent; one sent is
/// finished (within `request_timeout`) and its answer stored first
/// (README "Commands"). A second one does no more: the stored answer is
/// what the first waits for. The first one is recorded in `caught`.
fn hold_signals(
    r: &Arc<Refresher>,
    caught: &Arc<AtomicI32>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut quit = signal(SignalKind::quit())?;
    // Ctrl-Z too: stopped with its request out, it could outlive its
    // lease and see another process take the credential over.
    let mut tstp = signal(SignalKind::from_raw(libc::SIGTSTP))?;
    let (r, caught) = (r.clone(), caught.clone());
    Ok(tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                _ = int.recv() => libc::SIGINT,
                _ = term.recv() => libc::SIGTERM,
                _ = hup.recv() => libc::SIGHUP,
                _ = quit.recv() => libc::SIGQUIT,
                _ = tstp.recv() => libc::SIGTSTP,
            };
            r.stop();
            // Not eprintln!: after a hangup, stderr may be a closed
            // terminal, and a failed write must not end the task.
            if caught
                .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                let _ = writeln!(
                    std::io::stderr(),
                    "tokend: signal {sig}: sending nothing more; a refresh already at the \
                     provider is finished and stored first (its rotated token would \
                     otherwise be lost)"
                );
            }
        }
    }))
}
