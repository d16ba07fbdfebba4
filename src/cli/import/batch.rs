//! `tokend import --from FILE|-`: many refresh-token credentials at once
//! (README "Onboarding", "Bulk import"), one JSON object a line.
//!
//! Every line is checked before anything is stored, and the batch is stored
//! in one transaction ([`StoreConn::insert_batch`]): a bad line leaves the
//! store as it was, and one sync covers them all. Messages name the line
//! and the field, never a value that could be a token: serde's own errors
//! are not shown, since they quote what they could not read.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::super::Exit;
use super::super::args::{Global, MAX_EXPIRES_IN};
use crate::clock::now_ms;
use crate::config::{self, Config};
use crate::names::check_name;
use crate::secret::Secret;
use crate::store::{Grant, NewCredential, StoreConn, StoreError};

const FIELDS: &str = "name, provider, refresh_token, access_token, expires_in, scope";

pub fn run(global: &Global, from: &str, force: bool) -> Result<(), Exit> {
    let path = global.config_path();
    let config = config::load_without_secrets(&path).map_err(Exit::config)?;
    let (batch, lines) = read(&config, from)?;
    let store = StoreConn::open_config(&config, true)
        .map_err(|e| Exit::failure(format!("cannot open the database: {e}")))?;
    let stored = if force {
        under_leases(&config, &store, &batch)
    } else {
        store.insert_batch(&batch, false)
    };
    match stored {
        Ok(0) => {
            println!(
                "imported {} credentials; a running daemon picks them up within seconds",
                batch.len()
            );
            Ok(())
        }
        Ok(unchanged) => {
            println!(
                "imported {} credentials ({unchanged} held these tokens already and were left \
                 as they were); a running daemon picks them up within seconds",
                batch.len() - unchanged
            );
            Ok(())
        }
        Err(StoreError::Spent(name)) => Err(Exit::failure(format!(
            "line {}: refused: {}; nothing was imported",
            lines.get(&name).copied().unwrap_or_default(),
            StoreError::Spent(name.clone())
        ))),
        Err(e @ StoreError::InUse(_)) => Err(Exit::failure(format!(
            "{e}, longer than a refresh may take: nothing was imported; try again"
        ))),
        Err(StoreError::Exists(name)) => Err(Exit::failure(format!(
            "line {}: a credential named {name:?} already exists; nothing was imported \
             (add --force to replace the stored ones)",
            lines.get(&name).copied().unwrap_or_default()
        ))),
        Err(e) => Err(Exit::failure(format!(
            "cannot store the credentials: {e}; nothing was imported"
        ))),
    }
}

/// `--force`: the batch's stored credentials are leased first, as a
/// refresh leases one, waiting out the refreshes in flight (for as long
/// as one may last); then no refresh starts on them until the batch is
/// written and the leases given back. Waiting for a moment when none of
/// them is leased would seldom come in a large store whose daemon is
/// refreshing.
fn under_leases(
    config: &Config,
    store: &StoreConn,
    batch: &[NewCredential],
) -> Result<usize, StoreError> {
    let names: Vec<String> = batch.iter().map(|n| n.name.clone()).collect();
    let wait = config.refresh.request_timeout + Duration::from_secs(10);
    // Through the waits and the write of a large batch: the write reads
    // and writes each row (on PostgreSQL, a few round trips each).
    let ttl = wait * 2 + Duration::from_secs(60) + Duration::from_millis(5) * batch.len() as u32;
    let deadline = Instant::now() + wait;
    let mut leased = Leased {
        store,
        holder: crate::lease::holder_id(),
        held: Vec::new(),
        ttl,
    };
    let (held, mut busy) = store.hold_leases(&names, &leased.holder, ttl)?;
    leased.held = held;
    let mut told = false;
    while !busy.is_empty() && Instant::now() < deadline {
        if !told {
            eprintln!(
                "tokend: {} of these credentials are being refreshed: waiting for those \
                 refreshes to finish",
                busy.len()
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(200));
        let (more, still) = store.hold_leases(&busy, &leased.holder, ttl)?;
        leased.held.extend(more);
        busy = still;
    }
    match busy.first() {
        None => store.insert_batch(batch, true),
        Some(name) => Err(StoreError::InUse(format!(
            "{name:?} and {} more of these credentials are being refreshed",
            busy.len() - 1
        ))),
    }
}

/// The batch's leases, given back however `under_leases` ends: left
/// behind, they would keep other hosts from refreshing these credentials
/// until they ran out.
struct Leased<'s> {
    store: &'s StoreConn,
    holder: String,
    held: Vec<(String, i64)>,
    ttl: Duration,
}

impl Drop for Leased<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.store.release_leases(&self.held, &self.holder) {
            eprintln!(
                "tokend: cannot give back the leases of the batch ({e}); they run out by \
                 themselves within {} s",
                self.ttl.as_secs()
            );
        }
    }
}

/// The whole batch, checked, and the line each name came from.
fn read(config: &Config, from: &str) -> Result<(Vec<NewCredential>, HashMap<String, usize>), Exit> {
    let input: Box<dyn BufRead> = if from == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        // The path is not echoed: a token given here by mistake would be.
        let f = std::fs::File::open(from)
            .map_err(|e| Exit::config_message(format!("--from: cannot read the file: {e}")))?;
        Box::new(BufReader::with_capacity(1 << 16, f))
    };
    let now = now_ms();
    let (mut batch, mut lines) = (Vec::new(), HashMap::new());
    for (i, line) in input.lines().enumerate() {
        let number = i + 1;
        // Exit 2 as a usage error, without its "Run 'tokend --help'":
        // the file is at fault, not the command line.
        let bad = |why: String| Exit::config_message(format!("--from: line {number}: {why}"));
        let line = line.map_err(|e| bad(format!("cannot read it: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let new = parse(config, &line, now).map_err(bad)?;
        if let Some(first) = lines.insert(new.name.clone(), number) {
            return Err(bad(format!(
                "name {:?} is also on line {first}: a batch names each credential once",
                new.name
            )));
        }
        batch.push(new);
    }
    if batch.is_empty() {
        return Err(Exit::config_message(
            "--from: no credentials in the input (one JSON object a line)",
        ));
    }
    Ok((batch, lines))
}

/// One line: a JSON object with the fields of [`FIELDS`].
fn parse(config: &Config, line: &str, now: i64) -> Result<NewCredential, String> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| format!("not valid JSON (at column {})", e.column()))?;
    let Value::Object(mut obj) = value else {
        return Err(format!("expected a JSON object with {FIELDS}"));
    };
    let name = string(&mut obj, "name")?.ok_or("name: missing")?;
    check_name(&name).map_err(|why| format!("name {name:?} {why}"))?;
    let provider = string(&mut obj, "provider")?.ok_or("provider: missing")?;
    let Some(p) = config.providers.get(&provider) else {
        let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        return Err(format!(
            "provider {provider:?} is not in the config (configured: {})",
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        ));
    };
    let refresh_token = token(&mut obj, "refresh_token")?.ok_or("refresh_token: missing")?;
    let access_token = token(&mut obj, "access_token")?;
    let expires_in = match obj.remove("expires_in") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let secs = v
                .as_u64()
                .ok_or("expires_in: must be a whole number of seconds")?;
            if secs > MAX_EXPIRES_IN {
                return Err(format!(
                    "expires_in: more than ten years ({MAX_EXPIRES_IN} seconds): is it \
                     milliseconds, or an epoch timestamp? Give the seconds the access token has left"
                ));
            }
            Some(secs)
        }
    };
    if expires_in.is_some() && access_token.is_none() {
        return Err("expires_in describes access_token: give both".into());
    }
    let scope = string(&mut obj, "scope")?.or_else(|| p.scope.clone());
    if let Some(key) = obj.keys().next() {
        return Err(format!("unknown field {key:?} (expected {FIELDS})"));
    }
    Ok(NewCredential {
        name,
        provider,
        access_token,
        grant: Grant::RefreshToken(refresh_token),
        scope,
        expires_at: expires_in.map(|s| now + s as i64 * 1000),
        event: "imported",
    })
}

/// An optional string field, taken out of the object.
fn string(obj: &mut Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{key}: must be a string")),
    }
}

/// An optional token field: one word, as `--refresh-token FILE` takes it.
fn token(obj: &mut Map<String, Value>, key: &str) -> Result<Option<Secret>, String> {
    let Some(s) = string(obj, key)? else {
        return Ok(None);
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("{key}: empty"));
    }
    if t.contains(char::is_whitespace) {
        return Err(format!("{key}: expected one token, found several words"));
    }
    Ok(Some(Secret::new(t)))
}
