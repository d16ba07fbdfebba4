//! `tokend migrate --from SOURCE [--to DEST]`: move an installation to
//! another store (SQLite to PostgreSQL, for a fleet) without
//! re-authorizing anything (README "Moving to PostgreSQL").
//!
//! The copy is one transaction on each side, of the rows as stored: a
//! sealed store's values stay sealed, and its data keys go along (still
//! wrapped), so the copy opens with the same key (README "Secrets at
//! rest"). The source is leased for good
//! first (`StoreConn::seal_for_move`): a refresh token lives in one place
//! only, and a daemon left on the old store must not rotate the copy dead.

use std::path::{Path, PathBuf};

use super::Exit;
use super::args::{Global, Migrate};
use crate::config;
use crate::store::{Database, Dump, PgUrl, StoreConn, StoreError};

pub fn run(global: &Global, args: &Migrate) -> Result<(), Exit> {
    let from = parse(&args.from, "--from")?;
    let to = match &args.to {
        Some(to) => parse(to, "--to")?,
        None => {
            config::load_without_secrets(&global.config_path())
                .map_err(Exit::config)?
                .database
        }
    };
    if from == to {
        return Err(Exit::usage(format!(
            "--from and the destination are the same store ({}): set the config's database (or --to) to the new one",
            to.display()
        )));
    }
    // A pair a daemon kept because the source would not take it (the
    // daemon stopped first) is stored only by a daemon on the source: moved
    // without it, the copy would hold the token that pair replaced.
    match crate::refresher::unstored::Unstored::of(&from, false).kept() {
        Ok(kept) if kept.is_empty() => {}
        Ok(kept) => {
            return Err(Exit::failure(format!(
                "{} refreshed token pair(s) that {} did not take before tokend stopped wait to be \
                 stored in it: start tokend on it once (it stores them first), stop it, then \
                 migrate; nothing was copied",
                kept.len(),
                from.display()
            )));
        }
        Err(why) => return Err(Exit::failure(format!("{why}; nothing was copied"))),
    }
    let source = StoreConn::open_as_is(&from, false).map_err(|e| match e {
        StoreError::Io(_, e) if e.kind() == std::io::ErrorKind::NotFound => {
            Exit::failure(format!("{}: no database there", from.display()))
        }
        e => Exit::failure(format!("cannot open {}: {e}", from.display())),
    })?;
    let dest = StoreConn::open_as_is(&to, true)
        .map_err(|e| Exit::failure(format!("cannot open {}: {e}", to.display())))?;

    let dump = source.seal_for_move().map_err(|e| {
        Exit::failure(format!(
            "cannot move from {}: {e}; nothing was copied",
            from.display()
        ))
    })?;
    if let Err(e) = dest.restore(&dump) {
        failed_write(&source, &dest, &dump, &to, e)?;
    }
    println!(
        "moved {} credential(s) and {} event(s) from {} to {}",
        dump.credentials(),
        dump.events(),
        from.display(),
        to.display()
    );
    if dump.credentials() > 0 {
        println!(
            "the source keeps its copies leased to the move: no daemon still using it can refresh them. \
             Point every host's database at {} and restart its tokend.",
            to.display()
        );
    }
    Ok(())
}

/// A write to the destination that failed: the source is unsealed only
/// when the copy surely did not land and the source was not moved before.
/// Unsealed beside a live copy, both stores would refresh the same tokens,
/// and the provider would revoke the grants. Ok when the write turns out
/// to have landed after all.
fn failed_write(
    source: &StoreConn,
    dest: &StoreConn,
    dump: &Dump,
    to: &Database,
    e: StoreError,
) -> Result<(), Exit> {
    // A commit whose answer was lost (the connection dropped) may have
    // landed, or may land still (the server can be finishing it): the
    // copy found there is the move done; not found proves nothing, so the
    // source stays leased either way. The copy is one transaction: its
    // first name tells.
    if let StoreError::Commit(_) = e {
        let first = dump.names().into_iter().next();
        if let Ok(Some(Some(_))) = first.map(|n| dest.get(&n)).transpose() {
            return Ok(());
        }
        return Err(Exit::failure(format!(
            "cannot tell whether the copy reached {}: {e}. The source's credentials stay \
             leased to the move, so nothing refreshes them: run 'tokend migrate' again once \
             {} answers (it copies them, or says they are there)",
            to.display(),
            to.display()
        )));
    }
    let why = match e {
        StoreError::Exists(name) => format!("{} already holds {name:?}", to.display()),
        e => e.to_string(),
    };
    if dump.moved_before() {
        return Err(Exit::failure(format!(
            "cannot write to {}: {why}. This source had been leased to a move before this \
             run (an earlier move, or one that failed and could not be undone), so it stays \
             leased: another store may hold the live copies. If {} holds these credentials \
             already, it is the live store and nothing needs doing; otherwise fix what made \
             the write fail and run 'tokend migrate' again",
            to.display(),
            to.display()
        )));
    }
    let source_state = match source.unseal_after_failed_move() {
        Ok(()) => "the source is as it was".to_owned(),
        Err(u) => format!(
            "and the source's credentials are still leased to the move ({u}): run tokend migrate again, or wait for a fix"
        ),
    };
    Err(Exit::failure(format!(
        "cannot write to {}: {why}; nothing was copied, {source_state}",
        to.display()
    )))
}

/// `sqlite:PATH`, an absolute path, or a PostgreSQL URL without a password.
fn parse(value: &str, option: &str) -> Result<Database, Exit> {
    if Database::is_url(value) {
        let url = PgUrl::parse(value).map_err(|e| Exit::usage(format!("{option}: {e}")))?;
        if url.has_password() {
            return Err(Exit::usage(format!(
                "{option}: the URL holds a password, which the command line shows to every user (ps): \
                 name that store in the config's database key instead, and leave {option} out"
            )));
        }
        return Ok(Database::Postgres(url));
    }
    let path = Path::new(value.strip_prefix("sqlite:").unwrap_or(value));
    if !path.is_absolute() {
        return Err(Exit::usage(format!(
            "{option}: give sqlite:/ABSOLUTE/PATH or a postgresql:// URL"
        )));
    }
    Ok(Database::Sqlite(PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_named_by_path_or_url_never_with_a_password() {
        assert_eq!(
            parse("sqlite:/var/lib/tokend/tokend.db", "--from").ok(),
            Some(Database::Sqlite("/var/lib/tokend/tokend.db".into()))
        );
        assert_eq!(
            parse("/t.db", "--from").ok(),
            Some(Database::Sqlite("/t.db".into()))
        );
        assert!(matches!(
            parse("postgresql://app@/tokend?host=/run/postgresql", "--to"),
            Ok(Database::Postgres(_))
        ));
        for bad in ["t.db", "sqlite:t.db", "postgresql://app:hunter2@h/db"] {
            let Err(e) = parse(bad, "--to") else {
                panic!("{bad} was accepted");
            };
            assert_eq!(e.code, 2, "{bad}");
            assert!(!e.message.contains("hunter2"), "{}", e.message);
        }
    }
}
