//! Token pairs the provider gave that the store has not taken yet.
//!
//! A refresh whose commit fails (SQLite locked, PostgreSQL unreachable)
//! keeps retrying, but only for as long as the process lives: stopped at
//! the end of the shutdown grace, killed by systemd or the OOM killer, it
//! took the rotated refresh token with it, and the provider had already
//! spent the stored one. So once a commit has failed, the pair is also
//! written to a file of its own (mode 0600, in a 0700 directory, synced)
//! until a commit answers; the next start of the daemon stores it first,
//! as the commit would have (the same lease and token checks: a pair is
//! never written over a credential that changed since), and removes it.
//!
//! The file holds the tokens as the provider sent them, like the sink
//! files and a plaintext store: on this host, readable by tokend's user
//! only, which also reads the key file of a sealed store.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::secret::Secret;
use crate::store::{Database, TokenAt, TokenUpdate};

/// The directory's name, beside a SQLite store or in the state directory.
const DIR: &str = "tokend-pending";

/// Where unstored pairs are kept; None: nowhere (no place to keep them,
/// or not the daemon).
#[derive(Debug, Clone, Default)]
pub struct Unstored {
    dir: Option<PathBuf>,
}

/// One pair and what its commit needs: the lease it was refreshed under
/// and the token it replaces.
#[derive(Serialize, Deserialize)]
struct Record {
    name: String,
    holder: String,
    fence: i64,
    version: i64,
    created_at: i64,
    access_token: Option<String>,
    refresh_token: Option<String>,
    scope: Option<String>,
    expires_at: Option<i64>,
}

/// A pair read back at start.
pub struct Kept {
    pub name: String,
    pub holder: String,
    pub fence: i64,
    pub at: TokenAt,
    pub update: TokenUpdate,
}

impl Unstored {
    /// The daemon's: beside a SQLite store, or in `$STATE_DIRECTORY` (then
    /// `$RUNTIME_DIRECTORY`) for PostgreSQL.
    pub fn for_daemon(config: &Config) -> Unstored {
        let base = match &config.database {
            Database::Sqlite(p) => p.parent().map(Path::to_path_buf),
            Database::Postgres(_) => ["STATE_DIRECTORY", "RUNTIME_DIRECTORY"]
                .iter()
                .find_map(std::env::var_os)
                .and_then(|v| {
                    let first = v.to_string_lossy().split(':').next()?.to_owned();
                    (!first.is_empty()).then(|| PathBuf::from(first))
                }),
        };
        Unstored {
            dir: base.map(|b| b.join(DIR)),
        }
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        Some(self.dir.as_ref()?.join(format!("{name}.json")))
    }

    /// Writes `name`'s pair, durably, before its commit is retried.
    pub fn keep(
        &self,
        name: &str,
        holder: &str,
        fence: i64,
        at: TokenAt,
        u: &TokenUpdate,
    ) -> io::Result<()> {
        let (Some(dir), Some(path)) = (&self.dir, self.path(name)) else {
            return Ok(());
        };
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let record = Record {
            name: name.to_owned(),
            holder: holder.to_owned(),
            fence,
            version: at.version,
            created_at: at.created_at,
            access_token: u.access_token.as_ref().map(|s| s.expose().to_owned()),
            refresh_token: u.refresh_token.as_ref().map(|s| s.expose().to_owned()),
            scope: u.scope.clone(),
            expires_at: u.expires_at,
        };
        let bytes = Secret::new(serde_json::to_string(&record).map_err(io::Error::other)?);
        crate::publish::write_atomic(&path, bytes.expose().as_bytes(), 0o600, None).map(drop)
    }

    /// Removes `name`'s pair once a commit answered (stored, or refused
    /// for good).
    pub fn forget(&self, name: &str) {
        if let Some(path) = self.path(name) {
            remove(&path);
        }
    }

    /// Every pair kept; a file that cannot be read back is logged (never
    /// its content) and left where it is for a human.
    pub fn kept(&self) -> Vec<Kept> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut kept = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let text = fs::read_to_string(&path).map(Secret::new);
            match text.map(|t| serde_json::from_str::<Record>(t.expose())) {
                Ok(Ok(r)) if self.path(&r.name).as_ref() != Some(&path) => tracing::error!(
                    file = %path.display(),
                    "an unstored token pair's file is not named after its credential; left as it is"
                ),
                Ok(Ok(r)) => kept.push(Kept {
                    at: TokenAt {
                        version: r.version,
                        created_at: r.created_at,
                    },
                    update: TokenUpdate {
                        access_token: r.access_token.map(Secret::new),
                        refresh_token: r.refresh_token.map(Secret::new),
                        scope: r.scope,
                        expires_at: r.expires_at,
                    },
                    name: r.name,
                    holder: r.holder,
                    fence: r.fence,
                }),
                Ok(Err(e)) => tracing::error!(
                    file = %path.display(),
                    error = what(&e),
                    "an unstored token pair's file does not parse; left as it is"
                ),
                Err(e) => tracing::error!(
                    file = %path.display(),
                    error = %e,
                    "cannot read an unstored token pair's file; left as it is"
                ),
            }
        }
        kept
    }
}

fn remove(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                let _ = crate::dirsync::sync(dir);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a stored pair's file")
        }
    }
}

/// What kind of parse error, without serde's excerpt of the input (which
/// could be a token).
fn what(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "not a token pair",
        serde_json::error::Category::Eof => "cut short",
    }
}
