//! `tokend import`: a credential from an existing refresh token, or one of
//! the client_credentials grant (README "Other grants").

mod batch;

use std::io::Read;

use super::Exit;
use super::args::{Global, Import};
use crate::clock::now_ms;
use crate::config;
use crate::secret::Secret;
use crate::store::{Grant, NewCredential, Replaced, StoreConn, StoreError};

pub fn run(global: &Global, args: &Import) -> Result<(), Exit> {
    if let Some(from) = &args.from {
        return batch::run(global, from, args.force);
    }
    // clap requires NAME and --provider without --from.
    let (Some(name), Some(provider)) = (&args.name, &args.provider) else {
        return Err(Exit::usage("give NAME and --provider, or --from FILE"));
    };
    let refresh_from = args.refresh_token.as_deref();
    if refresh_from == Some("-") && args.access_token.as_deref() == Some("-") {
        return Err(Exit::usage(
            "only one of --refresh-token and --access-token can read stdin",
        ));
    }
    // (`--expires-in` is at most ten years: see args::expires_in.)
    if args.expires_in.is_some() && args.access_token.is_none() {
        return Err(Exit::usage(
            "--expires-in describes --access-token: give both",
        ));
    }
    let path = global.config_path();
    let config = config::load_without_secrets(&path).map_err(Exit::config)?;
    let p = super::provider_config(&config, &path, provider)?;
    // clap makes it exactly one of --refresh-token and --client-credentials.
    let grant = match refresh_from {
        Some(from) => Grant::RefreshToken(read_secret("--refresh-token", from)?),
        None if p.preset.is_some() => {
            return Err(Exit::config_message(format!(
                "nothing was stored: PandaDoc has no client_credentials grant for its API \
                 users (README \"Other grants\"), so tokend sends it none; onboard {name} \
                 with 'tokend authorize {name} --provider {provider}'"
            )));
        }
        None => Grant::ClientCredentials,
    };
    let access_token = match &args.access_token {
        Some(from) => Some(read_secret("--access-token", from)?),
        None => None,
    };
    let store = StoreConn::open_config(&config, true)
        .map_err(|e| Exit::failure(format!("cannot open the database: {e}")))?;
    let new = NewCredential {
        name: name.clone(),
        provider: provider.clone(),
        access_token,
        grant,
        scope: p.scope.clone(),
        expires_at: args.expires_in.map(|s| now_ms() + s as i64 * 1000),
        event: "imported",
    };
    let stored = if args.force {
        super::past_refreshes(&config, || store.replace(&new))
    } else {
        store.insert(&new).map(|c| Replaced::Stored(Box::new(c)))
    };
    match stored {
        Ok(Replaced::Stored(c)) => {
            let kind = match c.grant {
                Grant::RefreshToken(_) | Grant::Refused => "",
                Grant::ClientCredentials => ", client_credentials",
            };
            println!(
                "imported {name} (provider {provider}{kind}); a running daemon picks it up within seconds"
            );
            Ok(())
        }
        Ok(Replaced::Unchanged) => {
            println!("{name} already holds these tokens: nothing changed");
            Ok(())
        }
        Err(StoreError::Exists(_)) => Err(Exit::failure(format!(
            "a credential named {name:?} already exists; add --force to replace its tokens"
        ))),
        Err(e @ StoreError::Spent(_)) => Err(Exit::failure(format!(
            "refused: {e}: {}",
            crate::alerts::authorize_command(name, provider, &path)
        ))),
        Err(e @ StoreError::InUse(_)) => Err(Exit::failure(format!(
            "{e}, longer than a refresh may take: nothing was changed; try again"
        ))),
        Err(e) => Err(Exit::failure(format!("cannot store the credential: {e}"))),
    }
}

/// Reads a token from a file or, for "-", stdin; surrounding whitespace is
/// dropped (a trailing newline from `echo` or an editor is not part of it).
fn read_secret(option: &str, from: &str) -> Result<Secret, Exit> {
    let mut text = String::new();
    let read = if from == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::File::open(from).and_then(|mut f| f.read_to_string(&mut text).map(|_| ()))
    };
    // The path is not echoed: a token given here by mistake would be.
    read.map_err(|e| {
        Exit::usage(format!(
            "{option}: cannot read {}: {e} (give a file that holds the token, or - for stdin)",
            if from == "-" { "stdin" } else { "the file" }
        ))
    })?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(Exit::usage(format!(
            "{option}: expected one token, found {}",
            if token.is_empty() {
                "nothing"
            } else {
                "several words"
            }
        )));
    }
    Ok(Secret::new(token))
}
