//! `tokend remove NAME`: forget a credential and remove its published files.
//! A running daemon sees the row go and forgets it too.

use super::Exit;
use super::args::{Global, Remove};
use crate::config;
use crate::store::{StoreConn, StoreError};

pub fn run(global: &Global, args: &Remove) -> Result<(), Exit> {
    let name = &args.name;
    let config = config::load_without_secrets(&global.config_path()).map_err(Exit::config)?;
    let missing = || {
        Exit::failure(format!(
            "no credential named {name:?}; 'tokend list' shows those there are"
        ))
    };
    let store = match StoreConn::open(&config.database, false) {
        Ok(s) => s,
        Err(StoreError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(missing());
        }
        Err(e) => return Err(Exit::failure(format!("cannot open the database: {e}"))),
    };
    let existed = store
        .remove(name)
        .map_err(|e| Exit::failure(format!("cannot remove the credential: {e}")))?;
    if !existed {
        return Err(missing());
    }
    let mut removed = 0;
    for s in config.sinks.iter().filter(|s| s.matches(name)) {
        let path = s.path_for(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("tokend: cannot remove {}: {e}", path.display()),
        }
    }
    // Temp files a crash left beside them hold a token too.
    crate::publish::sweep_temp_files(&config.sinks, [name.as_str()]);
    println!("removed {name} and {removed} published file(s)");
    Ok(())
}
