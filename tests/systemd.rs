//! Spec §1.5: tokend as a systemd service. The daemon runs as the unit runs
//! it (`UMask=0077`); the tests play the service manager's part.

mod support;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use support::*;

/// The unit's `UMask=0077`, for a daemon started by a test.
fn umask_0077(cmd: &mut Command) {
    // SAFETY: umask(2) is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
}

#[test]
fn sink_directories_stay_reachable_under_umask_0077() {
    let env = Env::new(Knobs::default());
    env.import("bot", true);
    let mut d = Daemon::start_with(&env, "daemon", |cmd, _| umask_0077(cmd));
    wait_for("the token file", Duration::from_secs(20), || {
        env.read_token("bot")
    });
    // A consumer in the sink's group must be able to reach its file.
    assert_eq!(mode(&env.tokens), 0o755);
    assert_eq!(mode(&env.token_file("bot")), 0o600);
    assert!(d.stop().success());
}
