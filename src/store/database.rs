//! [`Database`]: where the store is, as the config's `database` key says
//! (README "Configuration", "PostgreSQL store"): a SQLite file, or a
//! PostgreSQL connection URL, which may hold a password and so is shown
//! only redacted.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::secret::Secret;

/// The store's location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// The embedded default: one file on this host.
    Sqlite(PathBuf),
    /// A server several hosts share (issue 12).
    Postgres(PgUrl),
}

impl Database {
    /// Whether a `database` value names a PostgreSQL server rather than a
    /// file: libpq's URL schemes.
    pub fn is_url(value: &str) -> bool {
        value.starts_with("postgresql://") || value.starts_with("postgres://")
    }

    /// What logs and messages may show: the path, or the URL without its
    /// password.
    pub fn display(&self) -> impl fmt::Display + '_ {
        struct Shown<'a>(&'a Database);
        impl fmt::Display for Shown<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.0 {
                    Database::Sqlite(p) => write!(f, "{}", p.display()),
                    Database::Postgres(u) => f.write_str(&u.redacted),
                }
            }
        }
        Shown(self)
    }

    /// The SQLite file, if the store is one: only a file has a directory
    /// to check, create or watch.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Database::Sqlite(p) => Some(p),
            Database::Postgres(_) => None,
        }
    }
}

/// A PostgreSQL connection URL, parsed. Its text (which may hold a
/// password) is kept as a [`Secret`]; `Debug` shows the redacted form.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    url: Secret,
    redacted: String,
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl PgUrl {
    /// Parses a libpq URL; the error says what is wrong without repeating
    /// the URL, which may hold a password.
    pub fn parse(url: &str) -> Result<PgUrl, String> {
        let config = postgres::Config::from_str(url).map_err(|e| {
            // The parser's messages name an option or a character, never
            // the text around it.
            format!("is not a PostgreSQL connection URL: {e}")
        })?;
        if config.get_ssl_mode() == postgres::config::SslMode::Require {
            return Err("sslmode=require: this tokend connects without TLS (README \
                 \"PostgreSQL store\"): use a Unix socket or a trusted network"
                .into());
        }
        if config.get_hosts().is_empty() {
            return Err(
                "names no host: add one (postgresql://USER@HOST/DB) or a socket \
                 directory (postgresql://USER@/DB?host=/run/postgresql)"
                    .into(),
            );
        }
        if config.get_user().is_none() {
            return Err("names no user: postgresql://USER@HOST/DB".into());
        }
        Ok(PgUrl {
            redacted: redact(&config),
            url: Secret::new(url),
        })
    }

    /// Whether the URL holds a password: such a URL must not come from the
    /// command line, where ps(1) shows it to everyone.
    pub fn has_password(&self) -> bool {
        self.config().get_password().is_some()
    }

    /// The connection settings, password included, with this process's
    /// lease holder id (`lease::holder_id`) as `application_name`, so that a
    /// DBA's `pg_stat_activity` tells every tokend's connections apart.
    pub(super) fn config(&self) -> postgres::Config {
        let mut c = postgres::Config::from_str(self.url.expose()).expect("parsed when it was made");
        if c.get_application_name().is_none() {
            c.application_name(&format!("tokend {}", crate::lease::holder_id()));
        }
        c
    }
}

/// `postgresql://USER@HOST:PORT/DB`, or `postgresql://USER@/DB?host=DIR`
/// for a socket directory: everything but the password.
fn redact(c: &postgres::Config) -> String {
    use postgres::config::Host;
    let user = c.get_user().unwrap_or_default();
    let db = c.get_dbname().unwrap_or_default();
    let port = c.get_ports().first().map(|p| format!(":{p}"));
    match c.get_hosts().first() {
        Some(Host::Tcp(h)) => format!("postgresql://{user}@{h}{}/{db}", port.unwrap_or_default()),
        Some(Host::Unix(dir)) => format!(
            "postgresql://{user}@/{db}?host={}{}",
            dir.display(),
            c.get_ports()
                .first()
                .map(|p| format!("&port={p}"))
                .unwrap_or_default()
        ),
        None => format!("postgresql://{user}@/{db}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_shown_without_its_password() {
        let u = PgUrl::parse("postgresql://app:hunter2@db.example:5433/tokens").unwrap();
        let db = Database::Postgres(u.clone());
        assert_eq!(
            db.display().to_string(),
            "postgresql://app@db.example:5433/tokens"
        );
        assert!(!format!("{db:?}").contains("hunter2"));
        assert_eq!(u.config().get_password(), Some(&b"hunter2"[..]));
        // Each process's connections carry its lease holder id, unless the
        // URL names them itself.
        let name = format!("tokend {}", crate::lease::holder_id());
        assert_eq!(u.config().get_application_name(), Some(name.as_str()));
        let named = PgUrl::parse("postgresql://app@h/db?application_name=mine").unwrap();
        assert_eq!(named.config().get_application_name(), Some("mine"));
        let s = PgUrl::parse("postgres://app@/tokens?host=/run/postgresql").unwrap();
        assert_eq!(s.redacted, "postgresql://app@/tokens?host=/run/postgresql");
    }

    #[test]
    fn a_bad_url_is_refused_without_being_repeated() {
        for (url, why) in [
            ("postgresql://app:hunter2@h/db?nosuch=1", "not a PostgreSQL"),
            (
                "postgresql://app:hunter2@h/db?sslmode=require",
                "without TLS",
            ),
            ("postgresql:///db", "no host"),
            ("postgresql://h/db", "no user"),
        ] {
            let e = PgUrl::parse(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
