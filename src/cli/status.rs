//! `tokend status [NAME] [--json]` and `tokend list`: from the daemon if it
//! runs, else from the store.

use std::time::{Duration, UNIX_EPOCH};

use super::Exit;
use super::args::{self, Global};
use super::client::{self, Unreachable};
use crate::clock::{self, now_ms, relative};
use crate::config;
use crate::store::{Credential, StoreConn, StoreError};
use crate::wire::{State, Status};

/// Statuses of every credential, or of one.
fn fetch(global: &Global, name: Option<&str>) -> Result<Vec<Status>, Exit> {
    let socket = config::socket_path(&global.config_path());
    let path = match name {
        Some(n) => format!("/v1/credentials/{n}"),
        None => "/v1/credentials".to_owned(),
    };
    match client::request(&socket, "GET", &path, true, Duration::from_secs(10)) {
        Ok(r) if r.status == 200 => {
            warn_if_degraded(&socket);
            let parsed = match name {
                Some(_) => serde_json::from_slice::<Status>(&r.body).map(|s| vec![s]),
                None => serde_json::from_slice::<Vec<Status>>(&r.body),
            };
            parsed.map_err(|e| Exit::failure(format!("the daemon's answer is not a status: {e}")))
        }
        Ok(r) => Err(Exit::failure(r.message())),
        Err(Unreachable::NotRunning(_)) => from_store(global, name),
        Err(e) => Err(super::token::unreachable(&socket, e)),
    }
}

/// Says on stderr (stdout may be JSON for a machine) that the daemon
/// cannot reach its database, if it says so itself.
fn warn_if_degraded(socket: &std::path::Path) {
    if let Ok(r) = client::request(socket, "GET", "/health", false, Duration::from_secs(10))
        && r.status == 200
        && r.body.starts_with(b"degraded")
    {
        eprintln!("tokend: {}", String::from_utf8_lossy(&r.body).trim_end());
    }
}

/// The store's view, when no daemon answers.
fn from_store(global: &Global, name: Option<&str>) -> Result<Vec<Status>, Exit> {
    let config = config::load_without_secrets(&global.config_path()).map_err(Exit::config)?;
    let store = match StoreConn::open_config(&config, false) {
        Ok(s) => s,
        Err(StoreError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return match name {
                Some(n) => Err(unknown(n)),
                None => Ok(Vec::new()),
            };
        }
        Err(e) => return Err(Exit::failure(format!("cannot open the database: {e}"))),
    };
    let now = now_ms();
    let all = store
        .load_all()
        .map_err(|e| Exit::failure(format!("cannot read the database: {e}")))?;
    let statuses: Vec<Status> = all
        .iter()
        .filter(|c| name.is_none_or(|n| c.name == n))
        .map(|c| status_of(c, now))
        .collect();
    if let (Some(n), true) = (name, statuses.is_empty()) {
        return Err(unknown(n));
    }
    Ok(statuses)
}

/// A row's status. Its expiry is whatever was written into the store (an
/// older `import` took epoch milliseconds for seconds): it is shown within
/// what an instant can show, which also keeps `Status::of`'s
/// `expires_at - now` from overflowing.
fn status_of(c: &Credential, now: i64) -> Status {
    let expires_at = clock::bounded(c.expires_at);
    if expires_at == c.expires_at {
        return Status::of(c, now);
    }
    Status::of(
        &Credential {
            expires_at,
            ..c.clone()
        },
        now,
    )
}

fn unknown(name: &str) -> Exit {
    Exit::failure(format!(
        "no credential named {name:?}; 'tokend list' shows those there are"
    ))
}

fn ms(rfc3339: &Option<String>) -> Option<i64> {
    let t = humantime::parse_rfc3339(rfc3339.as_deref()?).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64)
}

fn expires(s: &Status, now: i64) -> String {
    match (s.has_token, ms(&s.expires_at)) {
        (false, _) => "no token".into(),
        (true, None) => "unknown".into(),
        (true, Some(e)) => relative(e, now),
    }
}

pub fn status(global: &Global, args: &args::Status) -> Result<(), Exit> {
    let name = args.name.as_deref();
    let statuses = fetch(global, name)?;
    if args.json {
        let out = match name {
            Some(_) => serde_json::to_string_pretty(&statuses[0]),
            None => serde_json::to_string_pretty(&statuses),
        };
        println!("{}", out.expect("statuses serialize"));
        return Ok(());
    }
    let now = now_ms();
    for (i, s) in statuses.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let when = |t: &Option<String>| ms(t).map_or("never".into(), |t| relative(t, now));
        println!("{}", s.name);
        println!("  provider:        {}", s.provider);
        println!("  grant:           {}", s.grant.as_str());
        println!("  state:           {}", s.state);
        println!(
            "  token:           {}{}",
            if s.has_token {
                "published, expires "
            } else {
                "none published"
            },
            if s.has_token {
                format!(
                    "{} ({})",
                    expires(s, now),
                    s.expires_at.as_deref().unwrap_or("expiry unknown")
                )
            } else {
                String::new()
            }
        );
        println!("  last refresh:    {}", when(&s.last_refresh_at));
        println!("  last validated:  {}", when(&s.last_validated_at));
        if let Some(next) = ms(&s.next_attempt_at) {
            println!("  next attempt:    {}", relative(next, now));
        }
        println!("  failures:        {}", s.failures);
        println!(
            "  last error:      {}",
            s.last_error.as_deref().unwrap_or("-")
        );
        if let Some(e) = &s.last_publish_error {
            println!(
                "  publish error:   {e} (its files hold an older token, or none yet; tokend retries)"
            );
        }
        if s.state == State::NeedsReauthorization {
            println!(
                "  to fix:          {}",
                crate::alerts::authorize_command(&s.name, &s.provider, &global.config_path())
            );
        }
    }
    Ok(())
}

pub fn list(global: &Global) -> Result<(), Exit> {
    let statuses = fetch(global, None)?;
    if statuses.is_empty() {
        eprintln!("no credentials yet; add one with 'tokend import' or 'tokend authorize'");
        return Ok(());
    }
    let now = now_ms();
    let mut rows = vec![[
        "NAME".to_owned(),
        "PROVIDER".into(),
        "STATE".into(),
        "EXPIRES".into(),
        "LAST REFRESH".into(),
        "LAST ERROR".into(),
    ]];
    for s in &statuses {
        rows.push([
            s.name.clone(),
            s.provider.clone(),
            s.state.to_string(),
            expires(s, now),
            ms(&s.last_refresh_at).map_or("never".into(), |t| relative(t, now)),
            last_error(s),
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

/// The LAST ERROR column: the provider's or the store's, else a failure to
/// write the files, which leaves consumers on an older token.
fn last_error(s: &Status) -> String {
    match (&s.last_error, &s.last_publish_error) {
        (Some(e), _) => e.clone(),
        (None, Some(e)) => format!("publish: {e}"),
        (None, None) => "-".into(),
    }
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            if i + 1 < N {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            } else {
                out.push_str(cell);
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns() {
        let rows = [
            ["A".to_owned(), "BB".into(), "x".into()],
            ["ccc".into(), "d".into(), "y".into()],
        ];
        assert_eq!(super::table(&rows), "A    BB  x\nccc  d   y\n");
    }
}
