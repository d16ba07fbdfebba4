//! `tokend token NAME [--format F]`: the current access token, from the daemon.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use super::Exit;
use super::args::{Global, Token};
use super::client::{self, Unreachable};
use crate::config::{self, Format};
use crate::secret::Secret;

/// Long enough for the daemon to refresh first (request_timeout is 30 s by default).
const WAIT: Duration = Duration::from_secs(90);

pub fn run(global: &Global, args: &Token) -> Result<(), Exit> {
    let socket = config::socket_path(&global.config_path());
    let bytes = match args.format {
        None => {
            let mut token = fetch(&socket, &args.name)?.expose().as_bytes().to_vec();
            token.push(b'\n');
            token
        }
        // The sink's bytes, from the same renderer: `expires_at` is the
        // daemon's, so only the JSON answer carries everything.
        Some(Format::Json) => {
            let (token, expires_at) = fetch_json(&socket, &args.name)?;
            crate::publish::render(Format::Json, &token, expires_at)
        }
        Some(format) => crate::publish::render(format, &fetch(&socket, &args.name)?, None),
    };
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head -c0`) is the reader's choice, not our failure.
    let _ = out.write_all(&bytes).and_then(|()| out.flush());
    Ok(())
}

/// The current token of `name`, as the daemon answers `tokend token`:
/// access rules apply, and a token about to expire is refreshed first.
pub fn fetch(socket: &Path, name: &str) -> Result<Secret, Exit> {
    match client::request(socket, "GET", &format!("/v1/tokens/{name}"), false, WAIT) {
        Ok(r) if r.status == 200 => String::from_utf8(r.body)
            .map(Secret::new)
            .map_err(|_| Exit::failure("the daemon sent a token that is not text")),
        Ok(r) => Err(Exit::failure(r.message())),
        Err(e) => Err(unreachable(socket, e)),
    }
}

/// The token and its expiry (epoch ms), from the JSON answer.
fn fetch_json(socket: &Path, name: &str) -> Result<(Secret, Option<i64>), Exit> {
    let r = client::request(socket, "GET", &format!("/v1/tokens/{name}"), true, WAIT)
        .map_err(|e| unreachable(socket, e))?;
    if r.status != 200 {
        return Err(Exit::failure(r.message()));
    }
    let bad = || Exit::failure("the daemon's JSON answer for the token is malformed");
    let answer: crate::wire::Token = serde_json::from_slice(&r.body).map_err(|_| bad())?;
    let expires_at = match answer.expires_at {
        Some(at) => {
            let t = humantime::parse_rfc3339(&at).map_err(|_| bad())?;
            let ms = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| bad())?;
            Some(ms.as_millis() as i64)
        }
        None => None,
    };
    Ok((Secret::new(answer.access_token), expires_at))
}

/// What to tell the user when the daemon cannot be asked.
pub fn unreachable(socket: &std::path::Path, e: Unreachable) -> Exit {
    match e {
        Unreachable::NotRunning(e) => Exit::failure(format!(
            "tokend is not running (cannot connect to {}: {e}); start it with 'systemctl start tokend' or 'tokend run'",
            socket.display()
        )),
        Unreachable::Denied(e) => Exit::failure(format!(
            "cannot connect to {}: {e}; the daemon's socket admits its owner and the \
             members of its group (socket_mode, socket_group): run this as one of them",
            socket.display()
        )),
        Unreachable::Broken(e) => Exit::failure(format!(
            "the daemon at {} did not answer properly: {e}",
            socket.display()
        )),
    }
}
