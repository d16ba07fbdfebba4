//! The command line (README "Commands"): parsing, help, exit codes, dispatch.
//!
//! Every option is documented next to its definition in [`USAGE`]; each
//! command lives in its own file. Secrets never come from argv: options that
//! carry one take a file path or `-` for stdin.

mod authorize;
mod check_config;
mod client;
mod import;
mod refresh;
mod remove;
mod run;
mod status;
mod token;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{self, Config, ProviderConfig};
use crate::exit::Exit;
use crate::logging::{self, LogFormat};

pub use client::{Reply, parse_reply};

pub const USAGE: &str = "\
tokend keeps OAuth 2.0 access tokens fresh and publishes them to files.

Usage: tokend [-c PATH] COMMAND [ARGS]

Commands:
  run                   Run the daemon in the foreground (what systemd starts).
      --log-format FORMAT     text: timestamped lines for people. journal:
                              no timestamps, a syslog priority (<3> error ...
                              <7> debug) before each line, for journald.
                              json: one JSON object per line. Default:
                              journal when stderr is the journal
                              ($JOURNAL_STREAM), else text.
  check-config          Validate the config, its secrets and paths; print every
                        problem with its key. Exit 0 if all is well, 2 if not.
                        Run as root, it checks the sink and database
                        directories and the sink and socket groups as the
                        service user meets them (by mode bits; ACLs are not
                        read), if that user exists.
      --as-user USER          The service user. Default: tokend.
  authorize NAME --provider P
                        Onboard an API user: print the provider's authorization
                        URL, wait for the browser to come back to the
                        provider's loopback redirect_uri, check its state,
                        exchange the code and store the credential.
      --paste                 Do not listen: read the address the browser
                              lands on (or just the code) from stdin. For a
                              browser on another machine.
      --code CODE|-           Exchange a code obtained some other way; '-'
                              reads it from stdin.
      --timeout DURATION      How long to wait for the browser. Default: 5m.
      --force                 Replace a credential of the same name, once the
                              new tokens are obtained.
  import NAME --provider P --refresh-token FILE|-
                        Add a credential from an existing refresh token.
      --access-token FILE|-   Also store its current access token.
      --expires-in SECS       Seconds the access token has left.
      --force                 Replace a credential of the same name.
  list                  One line per credential: name, provider, state,
                        expiry, last refresh, last error.
  status [NAME]         The same, in detail.
      --json                  For machines.
  token NAME            Print the current access token (asks the daemon).
  refresh NAME          Refresh now, through the daemon (directly, under the
                        store's lease, when no daemon runs); report the outcome.
  remove NAME           Forget a credential and remove its published files.

list and status ask the daemon, or read the store when no daemon answers.

Global options:
  -c, --config PATH     The config file. Default: $TOKEND_CONFIG, else
                        /etc/tokend/config.toml.
  -h, --help            Print this help.
  -V, --version         Print the version.

Secrets are never taken from the command line: FILE is a path to read, '-'
reads stdin (an authorization code may be: it works once). Logs go to
stderr; RUST_LOG sets the level (default: info).
Exit codes: 0 success, 1 the operation failed, 2 usage or configuration error.
";

/// Everything the command line said, before each command checks its part.
#[derive(Default)]
struct Args {
    config: Option<PathBuf>,
    log_format: Option<LogFormat>,
    command: Option<String>,
    positionals: Vec<String>,
    provider: Option<String>,
    refresh_token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<String>,
    code: Option<String>,
    timeout: Option<String>,
    as_user: Option<String>,
    paste: bool,
    force: bool,
    json: bool,
    /// Options given, by name, so a command can refuse those it does not take.
    given: Vec<&'static str>,
}

impl Args {
    fn config_path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| {
            std::env::var_os("TOKEND_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG))
        })
    }

    /// Refuses options and extra arguments this command does not take.
    fn only(&self, command: &str, options: &[&str], positionals: usize) -> Result<(), Exit> {
        if let Some(o) = self.given.iter().find(|o| !options.contains(o)) {
            return Err(Exit::usage(format!("'{command}' does not take --{o}")));
        }
        if self.positionals.len() > positionals {
            return Err(Exit::usage(format!(
                "'{command}' does not take the argument {:?}",
                self.positionals[positionals]
            )));
        }
        Ok(())
    }

    /// `--provider P`, which `command` requires.
    fn provider(&self, command: &str) -> Result<String, Exit> {
        self.provider
            .clone()
            .ok_or_else(|| Exit::usage(format!("'{command}' needs --provider P")))
    }

    fn name(&self, command: &str) -> Result<String, Exit> {
        let name = self
            .positionals
            .first()
            .ok_or_else(|| Exit::usage(format!("'{command}' needs a credential NAME")))?;
        config::check_name(name)
            .map_err(|e| Exit::usage(format!("bad credential name {name:?}: {e}")))?;
        Ok(name.clone())
    }
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Option<Args>, Exit> {
    use lexopt::prelude::*;
    let mut a = Args::default();
    let mut p = lexopt::Parser::from_args(args);
    let bad = |e: lexopt::Error| Exit::usage(e.to_string());
    while let Some(arg) = p.next().map_err(bad)? {
        // Options that take a value: note the name, then read the value.
        let valued = match arg {
            Short('h') | Long("help") => {
                print!("{USAGE}");
                return Ok(None);
            }
            Short('V') | Long("version") => {
                println!("tokend {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            Short('c') | Long("config") => "config",
            Long("log-format") => "log-format",
            Long("provider") => "provider",
            Long("refresh-token") => "refresh-token",
            Long("access-token") => "access-token",
            Long("expires-in") => "expires-in",
            Long("code") => "code",
            Long("timeout") => "timeout",
            Long("as-user") => "as-user",
            Long("force") => {
                a.given.push("force");
                a.force = true;
                continue;
            }
            Long("json") => {
                a.given.push("json");
                a.json = true;
                continue;
            }
            Long("paste") => {
                a.given.push("paste");
                a.paste = true;
                continue;
            }
            Value(v) => {
                let v = v
                    .into_string()
                    .map_err(|_| Exit::usage("arguments must be valid UTF-8"))?;
                if a.command.is_none() {
                    a.command = Some(v);
                } else {
                    a.positionals.push(v);
                }
                continue;
            }
            other => return Err(bad(other.unexpected())),
        };
        a.given.push(valued);
        let value = p
            .value()
            .map_err(bad)?
            .into_string()
            .map_err(|_| Exit::usage(format!("--{valued} is not valid UTF-8")))?;
        match valued {
            "config" => a.config = Some(value.into()),
            "log-format" => a.log_format = Some(LogFormat::parse(&value).map_err(Exit::usage)?),
            "provider" => a.provider = Some(value),
            "refresh-token" => a.refresh_token = Some(value),
            "access-token" => a.access_token = Some(value),
            "expires-in" => a.expires_in = Some(value),
            "code" => a.code = Some(value),
            "as-user" => a.as_user = Some(value),
            _ => a.timeout = Some(value),
        }
    }
    a.given.retain(|o| *o != "config");
    Ok(Some(a))
}

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

/// Runs the command line; returns the process exit code.
pub fn main() -> u8 {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => return 0,
        Err(e) => return report(e),
    };
    let result = match args.command.as_deref() {
        Some("run") => run::run(&args),
        Some("check-config") => check_config::run(&args),
        Some("import") => import::run(&args),
        Some("authorize") => authorize::run(&args),
        Some("list") => status::list(&args),
        Some("status") => status::status(&args),
        Some("token") => token::run(&args),
        Some("refresh") => refresh::run(&args),
        Some("remove") => remove::run(&args),
        Some(other) => Err(Exit::usage(format!("unknown command {other:?}"))),
        None => Err(Exit::usage("no command given")),
    };
    match result {
        Ok(()) => 0,
        Err(e) => report(e),
    }
}

/// Logs to stderr in the format `--log-format` chose, else the one that
/// suits stderr; `RUST_LOG` overrides `default`.
fn init_logging(args: &Args, default: &str) {
    logging::init(default, args.log_format.unwrap_or_else(LogFormat::detect));
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
    use super::*;

    fn p(args: &[&str]) -> Result<Option<Args>, Exit> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn global_config_anywhere() {
        let a = p(&["import", "bot", "-c", "/x.toml", "--provider", "pd"])
            .unwrap()
            .unwrap();
        assert_eq!(a.config, Some(PathBuf::from("/x.toml")));
        assert_eq!(a.command.as_deref(), Some("import"));
        assert_eq!(a.positionals, ["bot"]);
        assert_eq!(a.provider.as_deref(), Some("pd"));
        assert_eq!(a.given, ["provider"]);
    }

    #[test]
    fn authorize_options() {
        let a = p(&[
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
        .unwrap()
        .unwrap();
        assert_eq!(a.code.as_deref(), Some("-"));
        assert_eq!(a.timeout.as_deref(), Some("30s"));
        assert!(a.paste);
        assert_eq!(a.given, ["provider", "code", "paste", "timeout"]);
    }

    #[test]
    fn commands_refuse_foreign_options() {
        let a = p(&["list", "--force"]).unwrap().unwrap();
        let e = a.only("list", &[], 0).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.message.contains("--force"));
        assert!(p(&["list", "--bogus"]).is_err());
    }

    #[test]
    fn check_config_takes_as_user() {
        let a = p(&["check-config", "--as-user", "tokend"])
            .unwrap()
            .unwrap();
        assert_eq!(a.as_user.as_deref(), Some("tokend"));
        assert!(a.only("check-config", &["as-user"], 0).is_ok());
        let a = p(&["list", "--as-user", "x"]).unwrap().unwrap();
        assert!(a.only("list", &[], 0).is_err());
    }

    #[test]
    fn log_format_is_checked() {
        let a = p(&["run", "--log-format", "json"]).unwrap().unwrap();
        assert_eq!(a.log_format, Some(LogFormat::Json));
        let e = p(&["run", "--log-format", "xml"]).err().unwrap();
        assert_eq!(e.code, 2);
        assert!(e.message.contains("text, journal or json"), "{}", e.message);
    }
}
