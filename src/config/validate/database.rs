//! `database`, `database_file` and `database_credential`: where the store
//! is (README "Configuration", "Running a fleet"). A PostgreSQL URL may
//! hold a password, so it may come from a file or a systemd credential
//! (`LoadCredential=`) instead of the config; what a message says about
//! such a value never quotes it.

use std::path::{Path, PathBuf};

use super::super::errors::shown;
use super::super::raw::RawConfig;
use super::Env;
use super::{DEFAULT_DATABASE, MAX_PATH, Problems};
use crate::names::check_name;
use crate::store::{Database, PgUrl};

/// The largest file a connection URL is read from: a URL is short, and a
/// mistyped path could name something huge.
const MAX_URL_FILE: u64 = 64 * 1024;

pub(super) fn validate_database(raw: &RawConfig, env: &dyn Env, p: &mut Problems) -> Database {
    let given = [
        raw.database.is_some(),
        raw.database_file.is_some(),
        raw.database_credential.is_some(),
    ];
    if given.iter().filter(|&&g| g).count() > 1 {
        p.add(
            "database",
            "give at most one of database, database_file, database_credential",
        );
        return Database::Sqlite(PathBuf::new());
    }
    if let Some(d) = &raw.database {
        return if Database::is_url(d) {
            // Its form is checked here, not the server.
            match PgUrl::parse(d) {
                Ok(url) => Database::Postgres(url),
                Err(e) => {
                    p.add("database", e);
                    Database::Sqlite(PathBuf::new())
                }
            }
        } else {
            p.path("database", d, MAX_PATH, false);
            Database::Sqlite(PathBuf::from(d))
        };
    }
    let read = if let Some(f) = &raw.database_file {
        p.path("database_file", f, MAX_PATH, false)
            .then(|| ("database_file", read_url(Path::new(f))))
    } else if let Some(c) = &raw.database_credential {
        Some((
            "database_credential",
            match env.var("CREDENTIALS_DIRECTORY") {
                None => Err("$CREDENTIALS_DIRECTORY is not set: pass the URL with \
                     LoadCredential= in the unit"
                    .to_owned()),
                Some(_) if check_name(c).is_err() => {
                    Err(format!("{} is not a credential name", shown(c)))
                }
                Some(dir) => read_url(&Path::new(&dir).join(c)),
            },
        ))
    } else {
        return Database::Sqlite(super::systemd_path(
            env,
            "STATE_DIRECTORY",
            "tokend.db",
            DEFAULT_DATABASE,
        ));
    };
    match read {
        Some((_, Ok(url))) => return Database::Postgres(url),
        Some((key, Err(e))) => p.add(key, e),
        None => {}
    }
    Database::Sqlite(PathBuf::new())
}

/// The connection URL a file holds (one line; surrounding white space is
/// ignored). Errors name the file, never its content.
fn read_url(path: &Path) -> Result<PgUrl, String> {
    let cannot = |e: &dyn std::fmt::Display| format!("cannot read {}: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| cannot(&e))?;
    if meta.len() > MAX_URL_FILE {
        return Err(format!(
            "{} is {} bytes long: a connection URL is at most {MAX_URL_FILE}",
            path.display(),
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| cannot(&e))?;
    let url = text.trim();
    if !Database::is_url(url) {
        return Err(format!(
            "{} must hold a postgresql:// URL (a SQLite path goes in database)",
            path.display()
        ));
    }
    PgUrl::parse(url).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use crate::config::parse;
    use crate::config::testing::FakeEnv;
    use crate::store::Database;

    /// Every problem, as text.
    fn problems(text: &str, env: &FakeEnv) -> String {
        match parse(text, Path::new("t.toml"), env) {
            Ok(_) => panic!("expected an error: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_url_comes_from_a_file_or_a_credential_and_is_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db-url");
        std::fs::write(&file, "postgresql://app:hunter2@db.internal/tokend\n").unwrap();
        let env = FakeEnv(HashMap::from([(
            "CREDENTIALS_DIRECTORY",
            dir.path().display().to_string(),
        )]));
        for text in [
            format!("database_file = \"{}\"\n", file.display()),
            "database_credential = \"db-url\"\n".to_owned(),
        ] {
            let c = parse(&text, Path::new("t.toml"), &env).unwrap();
            assert_eq!(
                c.database.display().to_string(),
                "postgresql://app@db.internal:5432/tokend"
            );
            assert!(matches!(c.database, Database::Postgres(_)));
        }

        std::fs::write(&file, "postgresq://app:hunter2@db.internal/tokend").unwrap();
        let shown = problems(&format!("database_file = \"{}\"\n", file.display()), &env);
        assert!(shown.contains("database_file: "), "{shown}");
        assert!(shown.contains("must hold a postgresql:// URL"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        std::fs::write(&file, "postgresql://app:hunter2@db/t?sslmode=require").unwrap();
        let shown = problems("database_credential = \"db-url\"\n", &env);
        assert!(shown.contains("database_credential: "), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");

        let shown = problems(
            &format!(
                "database = \"/a.db\"\ndatabase_file = \"{}\"\n",
                file.display()
            ),
            &env,
        );
        assert!(shown.contains("at most one of database"), "{shown}");
        let shown = problems("database_file = \"/nonexistent/url\"\n", &env);
        assert!(shown.contains("cannot read /nonexistent/url"), "{shown}");
        let shown = problems(
            "database_credential = \"db-url\"\n",
            &FakeEnv(HashMap::new()),
        );
        assert!(
            shown.contains("CREDENTIALS_DIRECTORY is not set"),
            "{shown}"
        );
    }
}
