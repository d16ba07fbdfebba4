//! Wiring and lifecycle of `tokend run`: start, signals, reload, shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::watch;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::{self, Config};
use crate::exit::Exit;
use crate::notify::Systemd;
use crate::provider;
use crate::publish;
use crate::refresher::{self, Refresher};
use crate::socket::Bound;
use crate::store::{Changed, Changes, Store};
use crate::watch::DirWatch;

/// How long after a change notice we wait for more before reloading: a
/// peer's burst of commits costs one reload, not one per commit.
const CHANGE_DEBOUNCE: Duration = Duration::from_millis(100);

/// How often a store that announces its changes (PostgreSQL) is read again
/// all the same: the safety net for a notification missed.
const FULL_REREAD: Duration = Duration::from_secs(30);

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config_path: PathBuf) -> Result<(), Exit> {
    let config = load(&config_path).await.map_err(Exit::config)?;
    let config = Arc::new(config);
    let problems = publish::check_dirs(&config.sinks, true);
    if !problems.is_empty() {
        return Err(Exit::config(config::ConfigError {
            path: config_path,
            problems,
        }));
    }
    let store = Store::open_config(&config)
        .map_err(|e| Exit::failure(format!("cannot open the database: {e}")))?;
    let client = provider::Client::new().map_err(Exit::failure)?;
    // Signals first: a SIGTERM during start-up must not kill us half-way.
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| Exit::failure(format!("cannot install signal handlers: {e}")))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // The socket before any work: a daemon that cannot take it (another one
    // runs) must not have refreshed anything on its way out.
    let bound = Bound::bind(&config.socket).await.map_err(|e| {
        if e.config {
            // `socket` names something that is not a socket: the config's fault.
            Exit::config_message(format!("{}: {e}", config_path.display()))
        } else {
            Exit::failure(e.message)
        }
    })?;
    let systemd = Systemd::from_env();

    let (refresher, tasks) =
        Refresher::start(config.clone(), store.clone(), client, shutdown_rx.clone())
            .await
            .map_err(|e| Exit::failure(format!("cannot load credentials: {e}")))?;

    let server = bound.serve(refresher.clone(), shutdown_rx.clone());
    let mut sweep = Sweep::start(refresher.clone(), &config.refresh.validate_schedule)
        .await
        .map_err(Exit::failure)?;
    let watcher = match store.subscribe() {
        Some(changes) => tokio::spawn(follow_changes(
            changes,
            refresher.clone(),
            shutdown_rx.clone(),
        )),
        None => tokio::spawn(watch_store(
            config.database.file().map(Path::to_owned),
            store,
            refresher.clone(),
            shutdown_rx.clone(),
        )),
    };
    tracing::info!(
        config = %config_path.display(),
        database = %config.database.display(),
        socket = %config.socket.path.display(),
        providers = config.providers.len(),
        sinks = config.sinks.len(),
        "tokend running"
    );
    // The store is open, the first publish is done (Refresher::start
    // returns after it) and the socket listens (bound above, served now).
    let notify_tasks = systemd.ready(&refresher);

    let mut current = config;
    while let Some(sig) = signals.next().await {
        match sig {
            SIGHUP => {
                systemd.reloading();
                if let Some(new) = reload(&current, &config_path).await {
                    if new.refresh.validate_schedule != current.refresh.validate_schedule {
                        match Sweep::start(refresher.clone(), &new.refresh.validate_schedule).await
                        {
                            Ok(s) => {
                                sweep.stop().await;
                                sweep = s;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot start the new validation schedule")
                            }
                        }
                    }
                    refresher.reload(new.clone()).await;
                    current = new;
                    tracing::info!("configuration reloaded");
                }
                // Refused or applied, the reload is over.
                systemd.reloaded();
            }
            _ => {
                systemd.stopping();
                tracing::info!(signal = sig, "shutting down");
                break;
            }
        }
    }
    signals.handle().close();
    // First, so that the watchdog does not take the scheduler's exit for a wedge.
    for t in notify_tasks {
        t.abort();
    }
    // No provider request starts from now on; those in flight finish.
    refresher.stop();
    let _ = shutdown_tx.send(true);
    sweep.stop().await;
    watcher.abort();
    // The listener closes at once; requests in progress get a few seconds
    // (they only wait for refreshes, never own them). Meanwhile a refresh in
    // flight completes and commits: its request is bounded by
    // request_timeout, its commit by the grace after it.
    tokio::join!(
        server.stop(),
        tasks.join(current.refresh.request_timeout + refresher::SHUTDOWN_COMMIT_GRACE)
    );
    tracing::info!("stopped");
    Ok(())
}

async fn load(path: &Path) -> Result<Config, config::ConfigError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || config::load(&path))
        .await
        .expect("config loading does not panic")
}

/// Loads and checks the file again; on any problem, logs every one and
/// keeps the old configuration.
async fn reload(current: &Config, path: &Path) -> Option<Arc<Config>> {
    let new = match load(path).await {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                tracing::error!(problem = %p, "configuration rejected; the old one stays in force");
            }
            return None;
        }
    };
    let sinks = new.sinks.clone();
    let problems = tokio::task::spawn_blocking(move || publish::check_dirs(&sinks, true))
        .await
        .unwrap_or_default();
    if !problems.is_empty() {
        for p in &problems {
            tracing::error!(problem = %p, "configuration rejected; the old one stays in force");
        }
        return None;
    }
    let mut new = new;
    if new.socket != current.socket {
        tracing::warn!(
            socket = %new.socket.path.display(),
            "a new socket path, mode or group takes effect only after a restart; keeping the current one"
        );
        new.socket = current.socket.clone();
    }
    if new.database != current.database {
        tracing::warn!(
            database = %new.database.display(),
            "a new database path takes effect only after a restart; keeping the current one"
        );
        new.database = current.database.clone();
    }
    // The store unwrapped its data keys with the key it opened with, and
    // keeps them: a new key (after `tokend keys rewrap`) is read at the
    // next start (README "Secrets at rest"). Fingerprints only, never a key.
    let print = |c: &Config| c.sealing.as_ref().map(|s| s.kek.fingerprint().to_owned());
    let (old_print, new_print) = (print(current), print(&new));
    if new_print != old_print {
        let show = |p: &Option<String>| p.clone().unwrap_or_else(|| "none".into());
        tracing::warn!(
            now = %show(&old_print),
            configured = %show(&new_print),
            "a new encryption key takes effect only after a restart; keeping the current one"
        );
        new.sealing = current.sealing.clone();
    }
    if new.refresh.max_concurrency != current.refresh.max_concurrency {
        tracing::warn!(
            "a new max_concurrency takes effect for provider requests now, for worker count after a restart"
        );
    }
    Some(Arc::new(new))
}

/// The cron job that runs the validation sweep.
struct Sweep {
    scheduler: JobScheduler,
}

impl Sweep {
    async fn start(refresher: Arc<Refresher>, schedule: &str) -> Result<Sweep, String> {
        let err = |e: tokio_cron_scheduler::JobSchedulerError| format!("validation schedule: {e}");
        let scheduler = JobScheduler::new().await.map_err(err)?;
        let spread = sweep_spread(schedule);
        let job = Job::new_async(schedule, move |_, _| {
            let r = refresher.clone();
            // The sweep only flags work, so overlapping runs are harmless.
            Box::pin(async move { r.sweep(spread) })
        })
        .map_err(err)?;
        scheduler.add(job).await.map_err(err)?;
        scheduler.start().await.map_err(err)?;
        Ok(Sweep { scheduler })
    }

    async fn stop(&mut self) {
        let _ = self.scheduler.shutdown().await;
    }
}

/// Over how long one validation sweep spreads its requests: three quarters
/// of the time between two runs of `schedule` (so a sweep is over before the
/// next starts), at most an hour. Zero if the schedule's runs cannot be found.
fn sweep_spread(schedule: &str) -> Duration {
    let Ok(cron) = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(schedule)
    else {
        return Duration::ZERO;
    };
    let now = chrono::Utc::now();
    let interval = cron
        .find_next_occurrence(&now, false)
        .and_then(|a| Ok((a, cron.find_next_occurrence(&a, false)?)))
        .ok()
        .and_then(|(a, b)| (b - a).to_std().ok())
        .unwrap_or_default();
    (interval * 3 / 4).min(Duration::from_secs(3600))
}

/// Picks up what other processes (other hosts') wrote to a store that
/// announces its commits: the rows it names, and every [`FULL_REREAD`]
/// every row's revision, whatever it announced.
async fn follow_changes(
    mut changes: Changes,
    refresher: Arc<Refresher>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reread = tokio::time::interval(FULL_REREAD);
    reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now: start-up has just read everything.
    reread.tick().await;
    let mut announced = true;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            alive = changes.changed(), if announced => {
                if !alive {
                    // No listener: the periodic re-read alone, from now on.
                    announced = false;
                    continue;
                }
                tokio::time::sleep(CHANGE_DEBOUNCE).await;
                if let Changed::Names(names) = changes.take() {
                    if let Err(e) = refresher.rows_changed(names).await {
                        tracing::warn!(error = %e, "cannot read changes from the store");
                    }
                    continue;
                }
            }
            _ = reread.tick() => {}
        }
        if let Err(e) = refresher.store_changed().await {
            tracing::warn!(error = %e, "cannot read changes from the store");
        }
    }
}

/// Picks up what other processes wrote to a SQLite store (`database`, its
/// file: a store without one announces its changes instead).
async fn watch_store(
    database: Option<PathBuf>,
    store: Store,
    refresher: Arc<Refresher>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(database) = database else {
        return;
    };
    let dir = database
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    let watch = match DirWatch::new(&dir) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the database directory; changes by other processes are seen only after a restart or SIGHUP");
            return;
        }
    };
    let mut version = store.data_version().await.ok();
    // A wake whose change is not visible yet (the commit's last write still
    // on its way, on a slow disk or a loaded machine) brings no second
    // event: look again a few times, later and later, before giving up.
    let mut rechecks: u32 = 0;
    loop {
        let recheck = CHANGE_DEBOUNCE * 4u32.saturating_pow(4 - rechecks.min(4));
        tokio::select! {
            _ = shutdown.changed() => return,
            r = watch.changed() => match r {
                Ok(()) => rechecks = 3,
                Err(e) => {
                    tracing::warn!(error = %e, "database watch failed");
                    return;
                }
            },
            _ = tokio::time::sleep(recheck), if rechecks > 0 => rechecks -= 1,
        }
        tokio::time::sleep(CHANGE_DEBOUNCE).await;
        // Our own commits wake the watch too; data_version moves only for others'.
        let now = store.data_version().await.ok();
        if now.is_some() && now != version {
            version = now;
            rechecks = 0;
            if let Err(e) = refresher.store_changed().await {
                tracing::warn!(error = %e, "cannot read changes from the store");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_spreads_over_three_quarters_of_its_interval_at_most_an_hour() {
        assert_eq!(sweep_spread("0 */15 * * * *"), Duration::from_secs(675));
        assert_eq!(sweep_spread("*/10 * * * * *"), Duration::from_millis(7500));
        assert_eq!(sweep_spread("0 0 0 1 1 *"), Duration::from_secs(3600));
        assert_eq!(sweep_spread("every minute"), Duration::ZERO);
    }
}
