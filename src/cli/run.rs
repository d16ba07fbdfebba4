//! `tokend run`: the daemon in the foreground.

use super::Exit;
use super::args::{Global, Run};

pub fn run(global: &Global, args: &Run) -> Result<(), Exit> {
    super::init_logging(args.log_format, "info");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tokend")
        .build()
        .map_err(|e| Exit::failure(format!("cannot start the runtime: {e}")))?;
    let result = runtime.block_on(crate::daemon::run(global.config_path()));
    // Hooks and blocking file writes still running are not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
