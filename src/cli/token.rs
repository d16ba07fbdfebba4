//! `tokend token NAME`: the current access token, from the daemon.

use std::time::Duration;

use super::Exit;
use super::args::{Global, Token};
use super::client::{self, Unreachable};
use crate::config;

pub fn run(global: &Global, args: &Token) -> Result<(), Exit> {
    let name = &args.name;
    let socket = config::socket_path(&global.config_path());
    // Long enough for the daemon to refresh first (request_timeout is 30 s by default).
    match client::request(
        &socket,
        "GET",
        &format!("/v1/tokens/{name}"),
        false,
        Duration::from_secs(90),
    ) {
        Ok(r) if r.status == 200 => {
            let token = String::from_utf8(r.body)
                .map_err(|_| Exit::failure("the daemon sent a token that is not text"))?;
            println!("{token}");
            Ok(())
        }
        Ok(r) => Err(Exit::failure(r.message())),
        Err(e) => Err(unreachable(&socket, e)),
    }
}

/// What to tell the user when the daemon cannot be asked.
pub fn unreachable(socket: &std::path::Path, e: Unreachable) -> Exit {
    match e {
        Unreachable::NotRunning(e) => Exit::failure(format!(
            "tokend is not running (cannot connect to {}: {e}); start it with 'systemctl start tokend' or 'tokend run'",
            socket.display()
        )),
        Unreachable::Broken(e) => Exit::failure(format!(
            "the daemon at {} did not answer properly: {e}",
            socket.display()
        )),
    }
}
