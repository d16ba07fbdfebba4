//! `tokend exec NAME -- COMMAND…` (README "Running a program with a
//! token"): runs a program with the token in its environment, the way a
//! supervisor would. No runtime: one thread waits for the child, one asks
//! the daemon for a new token every `--interval`, and the main thread acts
//! on what they report.
//!
//! Signals reach the child from a signal handler that does nothing but
//! `kill(2)` (async-signal-safe). A signal the kernel sent (a terminal's
//! Ctrl-C, Ctrl-\, hangup or resize: `si_code` SI_KERNEL) is not passed on:
//! the kernel sends it to the whole foreground process group, which the
//! child shares with tokend exec, so the child has it already.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::Exit;
use super::args::{Exec, Global};
use super::token::fetch;
use crate::config;
use crate::secret::Secret;

/// The variable that holds the token unless `--env` says otherwise: the
/// name the env sink format writes (README "File sinks").
pub const DEFAULT_VAR: &str = "ACCESS_TOKEN";

/// How often the daemon is asked for a new token unless `--interval` says
/// otherwise: a refresh happens `refresh_before_expiry` ahead, minutes at
/// least, so the child learns of a new token long before the old one dies.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// How long a child has to exit after SIGTERM on a restart before SIGKILL.
const GRACE: Duration = Duration::from_secs(10);

/// The signals passed on to the child.
const FORWARDED: [i32; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// The running child's pid, for the signal handler; 0 when none runs. The
/// waiting thread sets it to 0 before it reaps the child (which it waits for
/// with `WNOWAIT` first), so the pid is never reused while it is set.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// What the main thread waits for.
enum Event {
    /// The child (by pid) exited.
    Exited(u32, ExitStatus),
    /// The daemon answered a token other than the child's.
    Changed(Secret),
}

pub fn run(global: &Global, args: &Exec) -> Result<(), Exit> {
    let socket = config::socket_path(&global.config_path());
    let mut token = fetch(&socket, &args.name)?;
    let var = args.env.as_deref().unwrap_or(DEFAULT_VAR);
    forward_signals()?;

    let (tx, rx) = mpsc::channel();
    let mut child = spawn(&args.command, var, &token, &tx)?;
    if args.restart_on_change || args.signal.is_some() {
        let interval = args.interval.unwrap_or(DEFAULT_INTERVAL);
        watch(
            socket,
            args.name.clone(),
            token.clone(),
            interval,
            tx.clone(),
        );
    }
    loop {
        match rx.recv().expect("the waiting thread reports") {
            Event::Exited(pid, status) if pid == child => return exit_with(status),
            Event::Exited(..) => {}
            Event::Changed(new) => {
                token = new;
                if let Some(sig) = args.signal {
                    send(sig);
                } else if args.restart_on_change {
                    let pid = child;
                    send(libc::SIGTERM);
                    if !exited(&rx, pid, GRACE, &mut token) {
                        send(libc::SIGKILL);
                        exited(&rx, pid, Duration::MAX, &mut token);
                    }
                    child = spawn(&args.command, var, &token, &tx)?;
                }
            }
        }
    }
}

/// Waits up to `timeout` for child `pid` to exit; a newer token that turns
/// up meanwhile replaces `token`, so the next child starts with it.
fn exited(rx: &mpsc::Receiver<Event>, pid: u32, timeout: Duration, token: &mut Secret) -> bool {
    let deadline = std::time::Instant::now().checked_add(timeout);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let event = match left {
            Some(left) => match rx.recv_timeout(left) {
                Ok(e) => e,
                Err(_) => return false,
            },
            None => rx.recv().expect("the waiting thread reports"),
        };
        match event {
            Event::Exited(p, _) if p == pid => return true,
            Event::Exited(..) => {}
            Event::Changed(new) => *token = new,
        }
    }
}

/// Starts the child with the token in `var`, and a thread that reports its
/// exit.
fn spawn(
    command: &[OsString],
    var: &str,
    token: &Secret,
    tx: &mpsc::Sender<Event>,
) -> Result<u32, Exit> {
    // Our handlers do not survive the exec, and std empties the signal
    // mask: the child starts with the default dispositions.
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]).env(var, token.expose());
    let child = cmd.spawn().map_err(|e| {
        // As env(1) and shells: 127 when there is no such program, 126
        // when it cannot be run.
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        Exit {
            code,
            message: format!("cannot run {}: {e}", Path::new(&command[0]).display()),
        }
    })?;
    let pid = child.id();
    CHILD.store(pid as i32, Ordering::SeqCst);
    let tx = tx.clone();
    std::thread::spawn(move || {
        wait_exited(pid);
        CHILD.store(0, Ordering::SeqCst);
        // The child is a zombie until now: its pid was not reused while
        // the handler could still signal it.
        let mut status = 0;
        // SAFETY: plain waitpid on our own child.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        let _ = tx.send(Event::Exited(pid, ExitStatus::from_raw(status)));
    });
    Ok(pid)
}

/// Blocks until child `pid` has exited, without reaping it.
fn wait_exited(pid: u32) {
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// Sends `sig` to the running child, if one runs.
fn send(sig: i32) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Installs the handlers that pass [`FORWARDED`] signals on to the child.
fn forward_signals() -> Result<(), Exit> {
    for sig in FORWARDED {
        // SAFETY: the action only reads an atomic and calls kill(2), both
        // async-signal-safe.
        unsafe {
            signal_hook_registry::register_sigaction(sig, move |info: &libc::siginfo_t| {
                if info.si_code != libc::SI_KERNEL {
                    send(sig);
                }
            })
        }
        .map_err(|e| Exit::failure(format!("cannot install a signal handler: {e}")))?;
    }
    Ok(())
}

/// Asks the daemon for the token every `interval` and reports one that
/// differs from the last seen. A failed ask is said once on stderr (the
/// daemon's message, never a token) and retried at the next interval; the
/// child keeps what it has.
fn watch(
    socket: PathBuf,
    name: String,
    mut current: Secret,
    interval: Duration,
    tx: mpsc::Sender<Event>,
) {
    std::thread::spawn(move || {
        let mut failing = false;
        loop {
            std::thread::sleep(interval);
            match fetch(&socket, &name) {
                Ok(t) => {
                    failing = false;
                    if t.expose() != current.expose() {
                        current = t.clone();
                        if tx.send(Event::Changed(t)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if !failing {
                        eprintln!("tokend: cannot check {name} for a new token: {}", e.message);
                    }
                    failing = true;
                }
            }
        }
    });
}

/// Ends as the child did: its exit code, or 128+N when signal N killed it.
fn exit_with(status: ExitStatus) -> Result<(), Exit> {
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    if code == 0 {
        return Ok(());
    }
    Err(Exit {
        code: code as u8,
        message: String::new(),
    })
}
