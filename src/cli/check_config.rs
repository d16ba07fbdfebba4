//! `tokend check-config`: every problem with the config, at once.

use super::{Args, Exit};
use crate::config::{self, ConfigError};
use crate::publish;

pub fn run(args: &Args) -> Result<(), Exit> {
    args.only("check-config", &[], 0)?;
    let path = args.config_path();
    let config = config::load(&path).map_err(Exit::config)?;
    let mut problems = publish::check_dirs(&config.sinks, false);
    if let Err(e) = publish::writable(config.database.parent().unwrap_or(&config.database)) {
        problems.push(config::Problem {
            key: "database".into(),
            message: format!("cannot create or write {}: {e}", config.database.display()),
        });
    }
    if !problems.is_empty() {
        return Err(Exit::config(ConfigError { path, problems }));
    }
    println!(
        "{}: ok ({} provider{}, {} sink{}, database {})",
        path.display(),
        config.providers.len(),
        if config.providers.len() == 1 { "" } else { "s" },
        config.sinks.len(),
        if config.sinks.len() == 1 { "" } else { "s" },
        config.database.display()
    );
    Ok(())
}
