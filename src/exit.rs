//! How a command or the daemon ends: the exit codes of the contract (README
//! "Commands"). Its own module so that neither the command line nor the
//! daemon owns it: `cli` runs `daemon::run`, and both speak `Exit`.

use crate::config::ConfigError;

/// Exit codes of the contract: 0 success, 1 the operation failed, 2 usage
/// or configuration error.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl Exit {
    pub fn usage(message: impl Into<String>) -> Exit {
        Exit {
            code: 2,
            message: format!("{}\nRun 'tokend --help' for usage.", message.into()),
        }
    }

    pub fn config(e: ConfigError) -> Exit {
        Exit {
            code: 2,
            message: e.to_string(),
        }
    }

    /// A configuration that cannot do what was asked, explained without
    /// pointing at `--help` (the fix is in the config file).
    pub fn config_message(message: impl Into<String>) -> Exit {
        Exit {
            code: 2,
            message: message.into(),
        }
    }

    pub fn failure(message: impl Into<String>) -> Exit {
        Exit {
            code: 1,
            message: message.into(),
        }
    }
}
