//! `tokend list`: one line per credential, read from the store.

use super::{Args, Exit};
use crate::clock::{now_ms, relative};
use crate::config;
use crate::store::{StoreConn, StoreError};

pub fn run(args: &Args) -> Result<(), Exit> {
    args.only("list", &[], 0)?;
    let config = config::load_without_secrets(&args.config_path()).map_err(Exit::config)?;
    let store = match StoreConn::open(&config.database, false) {
        Ok(s) => s,
        Err(StoreError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "no credentials yet ({} does not exist); add one with 'tokend import'",
                config.database.display()
            );
            return Ok(());
        }
        Err(e) => return Err(Exit::failure(format!("cannot open the database: {e}"))),
    };
    let creds = store
        .load_all()
        .map_err(|e| Exit::failure(format!("cannot read the database: {e}")))?;
    let now = now_ms();
    let mut rows = vec![[
        "NAME".to_owned(),
        "PROVIDER".into(),
        "STATE".into(),
        "EXPIRES".into(),
        "LAST REFRESH".into(),
        "LAST ERROR".into(),
    ]];
    for c in &creds {
        rows.push([
            c.name.clone(),
            c.provider.clone(),
            c.state.as_str().into(),
            match (c.access_token.is_some(), c.expires_at) {
                (false, _) => "no token".into(),
                (true, None) => "unknown".into(),
                (true, Some(e)) => relative(e, now),
            },
            c.last_refresh_at
                .map_or("never".into(), |t| relative(t, now)),
            c.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
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
