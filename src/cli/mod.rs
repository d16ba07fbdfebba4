//! The command line (README "Commands"): parsing, help, exit codes, dispatch.
//!
//! What each command takes, and its help, is defined in [`args`], from
//! which clap parses argv and the shell completions and the man page are
//! made (`tokend completions SHELL`, `tokend man`). Each command lives in
//! its own file. Secrets never come from argv: options that carry one take
//! a file path or `-` for stdin.

pub mod args;
mod authorize;
mod check_config;
mod client;
mod docs;
mod exec;
mod import;
mod keys;
mod migrate;
mod refresh;
mod remove;
mod run;
mod status;
mod token;

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::config::{Config, ProviderConfig};
use crate::exit::Exit;
use crate::logging::{self, LogFormat};
use crate::store::StoreError;
use args::{Cli, Command};

pub use client::{Reply, parse_reply};

/// The configuration of provider `name`, or a usage error that lists the
/// configured ones.
fn provider_config<'c>(
    config: &'c Config,
    path: &Path,
    name: &str,
) -> Result<&'c Arc<ProviderConfig>, Exit> {
    config.providers.get(name).ok_or_else(|| {
        let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        Exit::usage(format!(
            "no provider {name:?} in {} (configured: {})",
            path.display(),
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        ))
    })
}

/// Runs a store write that replaces credentials, again while a refresh in
/// flight keeps it out ([`StoreError::InUse`]: that refresh's rotated
/// token would be thrown away), for as long as that refresh's lease can
/// last: the request's timeout and a margin, as `remove --revoke` waits.
fn past_refreshes<T>(
    config: &Config,
    mut write: impl FnMut() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let deadline = Instant::now() + config.refresh.request_timeout + Duration::from_secs(10);
    let mut told = false;
    loop {
        match write() {
            Err(StoreError::InUse(why)) if Instant::now() < deadline => {
                if !told {
                    eprintln!("tokend: {why}: waiting for that refresh to finish");
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

/// Runs the command line; returns the process exit code.
pub fn main() -> u8 {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let parsed = match token_fast_path(&argv) {
        Some(cli) => Ok(cli),
        None => parse(argv),
    };
    let cli = match parsed {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let config = &cli.global;
    let result = match &cli.command {
        Command::Run(a) => run::run(config, a),
        Command::CheckConfig(a) => check_config::run(config, a),
        Command::Import(a) => import::run(config, a),
        Command::Authorize(a) => authorize::run(config, a),
        Command::List(_) => status::list(config),
        Command::Status(a) => status::status(config, a),
        Command::Token(a) => token::run(config, a),
        Command::Exec(a) => exec::run(config, a),
        Command::Refresh(a) => refresh::run(config, a),
        Command::Remove(a) => remove::run(config, a),
        Command::Migrate(a) => migrate::run(config, a),
        Command::Keys(a) => keys::run(config, a),
        Command::Completions(a) => docs::completions(a.shell),
        Command::Man(_) => docs::man(),
    };
    match result {
        Ok(()) => 0,
        Err(e) => report(e),
    }
}

/// `tokend token NAME` and `tokend -c PATH token NAME` (or `--config
/// PATH`), the shapes a script calls once per API request, recognised
/// without clap: building clap's definitions of every command costs that
/// call more than the rest of its work on this side of the socket
/// (BENCHMARKS.md, "Socket API"). Only argv that clap parses to the same
/// `Token` is taken: a valid name, a non-empty path that does not start
/// with '-'. Anything else (other spellings, `--help`, errors) goes to
/// clap; `tests::the_token_fast_path_agrees_with_clap` holds the two
/// together.
fn token_fast_path(argv: &[OsString]) -> Option<Cli> {
    let (config, rest) = match argv.get(1..)? {
        [c, path, rest @ ..] if c == "-c" || c == "--config" => {
            let p = path.as_encoded_bytes();
            if p.is_empty() || p.starts_with(b"-") {
                return None;
            }
            (Some(path.into()), rest)
        }
        rest => (None, rest),
    };
    let [command, name] = rest else {
        return None;
    };
    let name = name.to_str()?;
    if command != "token" || crate::names::check_name(name).is_err() {
        return None;
    }
    Some(Cli {
        global: args::Global { config },
        command: Command::Token(args::Token {
            name: name.to_owned(),
            format: None,
        }),
    })
}

/// Parses argv (with the program's name first). Help and the version are
/// printed here (exit 0), and so are usage errors (exit 2).
fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Cli, u8> {
    Cli::try_parse_from(argv).map_err(|e| {
        // A closed stdout (`tokend --help | head -1`) is not an error.
        let _ = e.print();
        // clap's usage errors are 2, as ours; help and version 0.
        e.exit_code() as u8
    })
}

/// Logs to stderr in the format `--log-format` chose, else the one that
/// suits stderr; `RUST_LOG` overrides `default`.
fn init_logging(format: Option<LogFormat>, default: &str) {
    logging::init(default, format.unwrap_or_else(LogFormat::detect));
}

/// Prints why the command failed. Once logging is set up for the journal or
/// JSON, the reason is logged as an error instead, so that it reaches the
/// journal at error priority and a log shipper as a JSON line.
fn report(e: Exit) -> u8 {
    if !e.message.is_empty() {
        match logging::format() {
            Some(LogFormat::Journal | LogFormat::Json) => {
                tracing::error!(exit_code = e.code, "{}", e.message)
            }
            _ => eprintln!("tokend: {}", e.message.replace('\n', "\ntokend: ")),
        }
    }
    e.code
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use clap::CommandFactory;

    use super::*;

    fn p(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tokend").chain(args.iter().copied()))
    }

    /// The exit code a parse ends with: 0 for help and version, 2 for a
    /// usage error.
    fn code(args: &[&str]) -> i32 {
        p(args).expect_err("not parsed").exit_code()
    }

    /// Every argv of up to four words (the most the fast path takes) from
    /// a set of troublesome ones:
    /// whatever the fast path takes, clap parses to the same `Token`.
    #[test]
    fn the_token_fast_path_agrees_with_clap() {
        let words = [
            "token",
            "bot",
            "-c",
            "--config",
            "/x.toml",
            "",
            "-x",
            "../x",
            "--",
            "-h",
            "--config=/y",
            "-c/z",
        ];
        let mut argv = vec![vec!["tokend"]];
        let mut taken = 0;
        for words_now in 0..=4 {
            let mut longer = Vec::new();
            for a in &argv {
                let fast = token_fast_path(&a.iter().map(OsString::from).collect::<Vec<_>>());
                if let Some(fast) = fast {
                    taken += 1;
                    let cli = Cli::try_parse_from(a).unwrap_or_else(|e| panic!("{a:?}: {e}"));
                    assert_eq!(format!("{cli:?}"), format!("{fast:?}"), "{a:?}");
                }
                if words_now < 4 {
                    longer.extend(words.iter().map(|w| [&a[..], &[*w]].concat()));
                }
            }
            argv = longer;
        }
        // Shapes it takes: "token bot", "token token", "-c P token bot"...
        assert!(taken >= 10, "{taken}");
        let take = |a: &[&str]| {
            token_fast_path(
                &["tokend"]
                    .iter()
                    .chain(a)
                    .map(OsString::from)
                    .collect::<Vec<_>>(),
            )
            .is_some()
        };
        assert!(take(&["token", "bot"]));
        assert!(take(&["-c", "/x.toml", "token", "bot"]));
        assert!(take(&["--config", "/x.toml", "token", "bot"]));
        assert!(!take(&["token", "bot", "-c", "/x.toml"]));
        assert!(!take(&["-c", "-x", "token", "bot"]));
        assert!(!take(&["token", "--help"]));
        assert!(!take(&["token", "../x"]));
    }

    #[test]
    fn the_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_config_anywhere() {
        for args in [
            &[
                "import",
                "bot",
                "-c",
                "/x.toml",
                "--provider",
                "pd",
                "--refresh-token",
                "-",
            ][..],
            &[
                "-c",
                "/x.toml",
                "import",
                "bot",
                "--provider",
                "pd",
                "--refresh-token",
                "-",
            ],
            &[
                "import",
                "--config",
                "/x.toml",
                "bot",
                "--provider",
                "pd",
                "--refresh-token",
                "-",
            ],
        ] {
            let cli = p(args).unwrap();
            assert_eq!(cli.global.config, Some(PathBuf::from("/x.toml")));
            let Command::Import(a) = cli.command else {
                panic!("{args:?}")
            };
            assert_eq!(
                (a.name.as_deref(), a.provider.as_deref()),
                (Some("bot"), Some("pd"))
            );
            assert_eq!(a.refresh_token.as_deref(), Some("-"));
        }
        assert_eq!(p(&["list"]).unwrap().global.config, None);
    }

    #[test]
    fn authorize_options() {
        let cli = p(&[
            "authorize",
            "bot",
            "--provider",
            "pd",
            "--code",
            "-",
            "--paste",
            "--timeout",
            "30s",
        ])
        .unwrap();
        let Command::Authorize(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.code.as_deref(), Some("-"));
        assert_eq!(a.timeout, Some(Duration::from_secs(30)));
        assert!(a.paste && !a.force);
        assert_eq!(
            code(&["authorize", "bot", "--provider", "pd", "--timeout", "0s"]),
            2
        );
        assert_eq!(
            code(&["authorize", "bot", "--provider", "pd", "--timeout", "soon"]),
            2
        );
        assert_eq!(code(&["authorize", "--provider", "pd"]), 2);
        assert_eq!(code(&["authorize", "bot"]), 2);
    }

    /// Each command takes its own options, and no others: the old parser
    /// took any option anywhere and left each command to refuse it.
    #[test]
    fn commands_refuse_foreign_options() {
        for args in [
            &["list", "--force"][..],
            &["list", "--bogus"],
            &["list", "--as-user", "x"],
            &["list", "extra"],
            &["token", "bot", "--timeout", "5s"],
            &["token", "bot", "--json"],
            &["token", "bot", "other"],
            &["status", "--paste"],
            &["refresh", "bot", "--force"],
            &["remove", "bot", "--provider", "pd"],
            &["run", "--as-user", "x"],
            &["check-config", "--log-format", "json"],
            &[
                "import",
                "bot",
                "--provider",
                "pd",
                "--refresh-token",
                "-",
                "--code",
                "x",
            ],
        ] {
            assert_eq!(code(args), 2, "{args:?}");
        }
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &[][..],
            &["nope"],
            &["token"],
            &["token", "../x"],
            &["token", "-x"],
            &["import", "bot", "--provider", "pd"],
            &["import", "bot", "--refresh-token", "-"],
            &[
                "import",
                "bot",
                "--provider",
                "pd",
                "--refresh-token",
                "-",
                "--expires-in",
                "soon",
            ],
            &["completions", "tcsh"],
        ] {
            assert_eq!(code(args), 2, "{args:?}");
        }
        let e = p(&["token", "../x"]).unwrap_err().to_string();
        assert!(e.contains("bad credential name \"../x\""), "{e}");
    }

    #[test]
    fn help_and_version_exit_0() {
        for args in [
            &["--help"][..],
            &["-h"],
            &["-V"],
            &["--version"],
            &["token", "--help"],
            &["import", "-h"],
            &["-c", "/x.toml", "status", "--help"],
        ] {
            assert_eq!(code(args), 0, "{args:?}");
        }
        let version = p(&["-V"]).unwrap_err().to_string();
        assert_eq!(version, format!("tokend {}\n", env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn check_config_takes_as_user() {
        let Command::CheckConfig(a) = p(&["check-config", "--as-user", "tokend"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(a.as_user.as_deref(), Some("tokend"));
    }

    #[test]
    fn log_format_is_checked() {
        let Command::Run(a) = p(&["run", "--log-format", "json"]).unwrap().command else {
            panic!()
        };
        assert_eq!(a.log_format, Some(LogFormat::Json));
        assert_eq!(code(&["run", "--log-format", "xml"]), 2);
        let e = p(&["run", "--log-format", "xml"]).unwrap_err().to_string();
        assert!(e.contains("text, journal, json"), "{e}");
    }

    #[test]
    fn expires_in_is_at_most_ten_years() {
        let import = |secs: &str| {
            p(
                &["import", "bot", "--provider", "pd", "--refresh-token", "-"]
                    .into_iter()
                    .chain(["--access-token", "f", "--expires-in", secs])
                    .collect::<Vec<_>>(),
            )
        };
        let Command::Import(a) = import("3600").unwrap().command else {
            panic!()
        };
        assert_eq!(a.expires_in, Some(3600));
        assert!(import(&args::MAX_EXPIRES_IN.to_string()).is_ok());
        let e = import(&(args::MAX_EXPIRES_IN + 1).to_string()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("ten years"), "{e}");
    }
}
