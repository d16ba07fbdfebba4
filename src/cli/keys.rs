//! `tokend keys status|seal|rotate|rewrap`: sealing the store's token
//! columns and rotating its keys (README "Secrets at rest", docs/design.md
//! section 6). The work is the store's (`store/keys.rs`); this says what
//! was done. No key ever comes from argv: a new key is a file's path.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Exit;
use super::args::{Global, Keys};
use crate::config::{self, Config};
use crate::seal::{self, Kek};
use crate::store::{StoreConn, fingerprint_of};

pub fn run(global: &Global, args: &Keys) -> Result<(), Exit> {
    let path = global.config_path();
    // Client secrets are not needed; the encryption key is read all the same.
    let config = config::load_without_secrets(&path).map_err(Exit::config)?;
    let store = StoreConn::open_for_keys(&config)
        .map_err(|e| Exit::failure(format!("cannot open the database: {e}")))?;
    let failed = |e| Exit::failure(format!("tokend keys {}: {e}", args.action));
    match args.action.as_str() {
        "status" => status(&config, &store).map_err(failed),
        "seal" => {
            need_key(&config)?;
            let r = store.seal_store().map_err(failed)?;
            compact(&store);
            println!(
                "sealed the store: data key {} made, {} token value(s) sealed with it",
                r.active, r.sealed
            );
            Ok(())
        }
        "rotate" => {
            need_key(&config)?;
            let r = store.rotate_key().map_err(failed)?;
            compact(&store);
            println!(
                "data key {} is active; {} token value(s) sealed again with it",
                r.active, r.sealed
            );
            if !r.deleted.is_empty() {
                println!(
                    "deleted data key(s) no value uses any more: {:?}",
                    r.deleted
                );
            }
            if !r.plaintext.is_empty() {
                return Err(Exit::failure(format!(
                    "left as they are, refused on every read: plaintext tokens in a sealed \
                     store, for {} (authorize or import them again)",
                    r.plaintext.join(", ")
                )));
            }
            Ok(())
        }
        "rewrap" => {
            let old = need_key(&config)?;
            let file = args
                .new_key_file
                .as_deref()
                .ok_or_else(|| Exit::usage("rewrap needs --new-key-file PATH"))?;
            let new = Kek::load(file, None).map_err(|e| Exit::failure(e.to_string()))?;
            if new.fingerprint() == old.fingerprint() {
                return Err(Exit::usage(format!(
                    "{} is the key the config already gives (fingerprint {})",
                    file.display(),
                    new.fingerprint()
                )));
            }
            let (old_print, new_print) =
                (old.fingerprint().to_owned(), new.fingerprint().to_owned());
            let n = store.rewrap_keys(Arc::new(new)).map_err(failed)?;
            println!(
                "rewrapped {n} data key(s): key {old_print} -> key {new_print}.\n\
                 Now install {} as the key on every host (and restart them); keep the old \
                 key only beside backups taken before now.",
                file.display()
            );
            Ok(())
        }
        other => Err(Exit::usage(format!("no keys action {other:?}"))),
    }
}

/// The old values' bytes out of a SQLite file; a failure is worth a
/// warning, not a failed command: the sealing itself committed.
fn compact(store: &StoreConn) {
    if let Err(e) = store.compact() {
        eprintln!(
            "tokend: warning: the old values may remain in the database file's free pages \
             until it is vacuumed (sqlite3 FILE VACUUM): {e}"
        );
    }
}

fn need_key(config: &Config) -> Result<&Arc<Kek>, Exit> {
    config.sealing.as_ref().map(|s| &s.kek).ok_or_else(|| {
        Exit::config_message(format!(
            "{}: gives no encryption key: set encryption_key_file or \
             encryption_key_credential (README \"Secrets at rest\")",
            config.path.display()
        ))
    })
}

/// What the config gives and what the store holds; no key or value shown.
fn status(config: &Config, store: &StoreConn) -> Result<(), crate::store::StoreError> {
    match &config.sealing {
        Some(s) => println!(
            "config: sealing on, key from {} ({}), fingerprint {}",
            s.source,
            s.path.display(),
            s.kek.fingerprint()
        ),
        None => println!("config: sealing off (no encryption key)"),
    }
    let (keys, rows) = store.key_status()?;
    if keys.is_empty() {
        println!("store: not sealed (no data key)");
    } else {
        println!("store: sealed");
    }
    let mut per_key: BTreeMap<u32, usize> = BTreeMap::new();
    let mut plaintext = Vec::new();
    for t in &rows {
        for (_, v) in t.values() {
            match seal::sealed_with(v) {
                Some(id) => *per_key.entry(id).or_default() += 1,
                None => {
                    if !plaintext.contains(&t.name) {
                        plaintext.push(t.name.clone());
                    }
                }
            }
        }
    }
    let active = keys.iter().map(|k| k.id).max();
    for k in &keys {
        println!(
            "data key {}{}: wrapped by key {}, made {}, seals {} value(s)",
            k.id,
            if Some(k.id) == active {
                " (active)"
            } else {
                ""
            },
            fingerprint_of(k).unwrap_or("(unreadable)"),
            crate::clock::rfc3339(k.created_at),
            per_key.get(&k.id).copied().unwrap_or(0)
        );
        if let (Some(s), Some(print)) = (&config.sealing, fingerprint_of(k))
            && print != s.kek.fingerprint()
        {
            println!(
                "  not wrapped by this host's key ({}): install the store's key, or finish a \
                 rewrap",
                s.kek.fingerprint()
            );
        }
    }
    let unknown: Vec<u32> = per_key
        .keys()
        .copied()
        .filter(|id| !keys.iter().any(|k| k.id == *id))
        .collect();
    if !unknown.is_empty() {
        println!("values sealed with data keys the store does not hold: {unknown:?}");
    }
    println!("credentials: {}", rows.len());
    if !plaintext.is_empty() {
        println!(
            "plaintext tokens: {} ({})",
            plaintext.len(),
            if keys.is_empty() {
                "`tokend keys seal` seals them"
            } else {
                "refused on every read: authorize or import them again"
            }
        );
        for n in plaintext.iter().take(20) {
            println!("  {n}");
        }
    }
    Ok(())
}
