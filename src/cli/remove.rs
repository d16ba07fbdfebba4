//! `tokend remove NAME`: forget a credential and remove its published files;
//! with `--revoke`, revoke its grant at the provider first (RFC 7009,
//! README "Other grants"). A running daemon sees the row go and forgets it
//! too.

use std::time::{Duration, Instant};

use super::Exit;
use super::args::{Global, Remove};
use crate::config::{self, Config, ProviderConfig};
use crate::provider::{Client, Failure};
use crate::secret::Secret;
use crate::store::{Credential, Grant, Lease, StoreConn, StoreError};

/// Revocation attempts on a transient failure (a 503 asks for another,
/// RFC 7009 §2.2.1), and the longest wait between two.
const REVOKE_ATTEMPTS: u32 = 3;
const REVOKE_WAIT_MAX: Duration = Duration::from_secs(10);

pub fn run(global: &Global, args: &Remove) -> Result<(), Exit> {
    let name = &args.name;
    let path = global.config_path();
    // Revoking authenticates the client: only then are secrets loaded.
    let config = if args.revoke {
        config::load(&path)
    } else {
        config::load_without_secrets(&path)
    }
    .map_err(Exit::config)?;
    let store = match StoreConn::open_config(&config, false) {
        Ok(s) => s,
        Err(StoreError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(missing(name));
        }
        Err(e) => return Err(Exit::failure(format!("cannot open the database: {e}"))),
    };
    let revoked = if args.revoke {
        Some(revoke_and_remove(&config, &store, name)?)
    } else {
        let existed = store
            .remove(name)
            .map_err(|e| Exit::failure(format!("cannot remove the credential: {e}")))?;
        if !existed {
            return Err(missing(name));
        }
        None
    };
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
    match revoked {
        Some(what) => println!("{what}; removed {name} and {removed} published file(s)"),
        None => println!("removed {name} and {removed} published file(s)"),
    }
    Ok(())
}

fn missing(name: &str) -> Exit {
    Exit::failure(format!(
        "no credential named {name:?}; 'tokend list' shows those there are"
    ))
}

/// Under the credential's lease (so no refresh is in flight, and none
/// starts to rotate the token being revoked), revokes its grant and removes
/// the row. Returns what was revoked; on failure the credential is kept.
fn revoke_and_remove(config: &Config, store: &StoreConn, name: &str) -> Result<String, Exit> {
    let cred = store
        .get(name)
        .map_err(|e| Exit::failure(format!("cannot read the database: {e}")))?
        .ok_or_else(|| missing(name))?;
    let p = config.providers.get(&cred.provider).ok_or_else(|| {
        Exit::config_message(format!(
            "nothing was removed: {name} belongs to provider {:?}, which is not in the \
             configuration, so its grant cannot be revoked; add [providers.{}] with its \
             revocation_url, or run 'tokend remove {name}' without --revoke to forget it (the \
             grant then stays alive at the provider)",
            cred.provider, cred.provider
        ))
    })?;
    let Some(url) = &p.revocation_url else {
        let why = if p.preset.is_some() {
            " (PandaDoc has no revocation endpoint)"
        } else {
            ""
        };
        return Err(Exit::config_message(format!(
            "nothing was removed: providers.{}.revocation_url is not set{why}, so tokend cannot \
             revoke {name}'s grant: it stays alive at the provider until it is revoked there. \
             'tokend remove {name}' without --revoke forgets the credential anyway",
            p.name
        )));
    };
    let holder = crate::lease::holder_id();
    let timeout = config.refresh.request_timeout;
    // Long enough for every attempt and the waits between them.
    let ttl = (timeout + REVOKE_WAIT_MAX) * REVOKE_ATTEMPTS;
    let (cred, fence) = take_lease(store, name, &holder, ttl, timeout)?;
    let outcome = revoke(p, url, &cred, timeout);
    let result = match outcome {
        Ok(what) => match store.remove_held(name, &holder, fence) {
            Ok(true) => Ok(what),
            Ok(false) => Err(Exit::failure(format!(
                "the revocation was sent, but {name}'s lease passed to another process meanwhile \
                 (this command was stopped longer than it): that process may have refreshed \
                 {name}, so its current grant may not be the one revoked. Nothing was removed: \
                 run 'tokend remove {name} --revoke' again"
            ))),
            Err(e) => Err(Exit::failure(format!(
                "the grant was revoked, but the credential could not be removed: {e}; run \
                     'tokend remove {name}' to forget it"
            ))),
        },
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = store.release_lease(name, &holder, fence);
    }
    result
}

/// The lease, waiting out a refresh in flight (its lease lasts the
/// request's timeout and a margin); the row as it is under the lease, and
/// the lease's fence.
fn take_lease(
    store: &StoreConn,
    name: &str,
    holder: &str,
    ttl: Duration,
    request_timeout: Duration,
) -> Result<(Credential, i64), Exit> {
    let deadline = Instant::now() + request_timeout + Duration::from_secs(10);
    loop {
        match store.hold_lease(name, holder, ttl) {
            Ok(Lease::Taken {
                credential, fence, ..
            }) => return Ok((*credential, fence)),
            Ok(Lease::Gone) => return Err(missing(name)),
            Ok(Lease::Busy { .. } | Lease::Changed(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(Lease::Busy { .. } | Lease::Changed(_)) => {
                return Err(Exit::failure(format!(
                    "nothing was removed: another process is refreshing {name} and did not \
                     finish in time; try again"
                )));
            }
            Err(e) => return Err(Exit::failure(format!("cannot take {name}'s lease: {e}"))),
        }
    }
}

/// Revokes the credential's refresh token (a client_credentials one's
/// access token); returns what to tell the user.
fn revoke(
    p: &ProviderConfig,
    url: &reqwest::Url,
    cred: &Credential,
    timeout: Duration,
) -> Result<String, Exit> {
    let name = &cred.name;
    let (token, hint, what): (&Secret, _, _) = match (&cred.grant, &cred.access_token) {
        (Grant::RefreshToken(t), _) => (t, "refresh_token", "revoked the grant at the provider"),
        // No grant to revoke: the client's registration is the grant. The
        // token it holds now can go.
        (Grant::ClientCredentials, Some(t)) => (
            t,
            "access_token",
            "revoked the access token at the provider (a client_credentials credential has no \
             other grant: the client's registration stays)",
        ),
        // Never sent to the provider: the row's value may have been planted
        // (a lease's read refuses such a row before this is reached).
        (Grant::Refused, _) => {
            return Err(Exit::failure(format!(
                "nothing was revoked or removed: {name}'s stored refresh token was refused \
                 ({}); run 'tokend remove {name}' without --revoke",
                cred.last_error.as_deref().unwrap_or("it cannot be read")
            )));
        }
        (Grant::ClientCredentials, None) => {
            return Ok(
                "there was no token to revoke (a client_credentials credential without \
                       an access token)"
                    .to_owned(),
            );
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Exit::failure(format!("cannot start the async runtime: {e}")))?;
    let client = Client::new().map_err(Exit::failure)?;
    let mut attempt = 1;
    loop {
        let result = runtime.block_on(client.revoke(p, url, token, hint, timeout));
        let failure = match result {
            Ok(()) => return Ok(what.to_owned()),
            Err(f) => f,
        };
        match &failure {
            // A Retry-After longer than this command waits is the
            // provider's to keep: it is told, not cut short.
            Failure::Transient { retry_after, .. }
                if attempt < REVOKE_ATTEMPTS
                    && retry_after.is_none_or(|r| r <= REVOKE_WAIT_MAX) =>
            {
                let wait = retry_after.unwrap_or(Duration::from_secs(u64::from(attempt)));
                eprintln!(
                    "tokend: revocation attempt {attempt} failed ({}); trying again in {}",
                    failure.describe(),
                    humantime::format_duration(wait)
                );
                std::thread::sleep(wait);
                attempt += 1;
            }
            _ => {
                let again = match &failure {
                    Failure::Transient {
                        retry_after: Some(r),
                        ..
                    } => format!("try again in {}", humantime::format_duration(*r)),
                    _ => "try again".to_owned(),
                };
                return Err(Exit::failure(format!(
                    "nothing was removed: revoking {name}'s {} at providers.{}.revocation_url \
                     failed: {}. The credential is kept: {again}, or run 'tokend remove \
                     {name}' without --revoke to forget it (its grant then stays alive at the \
                     provider)",
                    hint.replace('_', " "),
                    p.name,
                    failure.describe()
                )));
            }
        }
    }
}
