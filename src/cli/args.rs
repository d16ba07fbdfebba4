//! What the command line takes (README "Commands"): one struct per command,
//! each option documented next to its definition. `tokend --help`, `tokend
//! COMMAND --help`, the shell completions and the man page are all made
//! from these definitions.
//!
//! The first paragraph of a doc comment is the short help (`-h`), the whole
//! comment the long help (`--help`, the man page).

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::config;
use crate::logging::LogFormat;

/// Printed after `tokend --help`, and in the man page.
const AFTER_HELP: &str = "\
Secrets are never taken from the command line: FILE is a path to read, '-'
reads stdin (an authorization code may be given: it works once). list and
status ask the daemon, or read the store when no daemon answers. Logs go to
stderr; RUST_LOG sets the level (default: info).

Exit codes: 0 success, 1 the operation failed, 2 usage or configuration error.";

// Help text is wrapped by hand (`verbatim_doc_comment`): clap wraps only
// with its `wrap_help` feature, which would build rustix into the binary to
// ask the terminal's width. Lines stay within 70 columns, so that `--help`,
// which indents them by 10, fits 80.

/// Keeps OAuth 2.0 access tokens fresh and publishes them to files and a socket
///
/// tokend refreshes access tokens before they expire and publishes them to
/// files and a Unix socket, so that the programs that call an API never
/// speak OAuth. `tokend run` is the daemon; the other commands manage its
/// credentials and read its state.
#[derive(Parser, Debug)]
#[command(
    name = "tokend",
    version,
    verbatim_doc_comment,
    after_help = AFTER_HELP,
    subcommand_required = true,
    arg_required_else_help = true,
    disable_help_subcommand = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes, before or after its name.
#[derive(Args, Debug, Default)]
pub struct Global {
    /// The config file
    ///
    /// Default: $TOKEND_CONFIG, else /etc/tokend/config.toml.
    #[arg(
        short = 'c',
        long = "config",
        value_name = "PATH",
        global = true,
        verbatim_doc_comment
    )]
    pub config: Option<PathBuf>,
}

impl Global {
    /// `-c PATH`, else `$TOKEND_CONFIG` (unless empty), else the default.
    pub fn config_path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| {
            std::env::var_os("TOKEND_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG))
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    Run(Run),
    CheckConfig(CheckConfig),
    Authorize(Authorize),
    Import(Import),
    List(List),
    Status(Status),
    Token(Token),
    Exec(Exec),
    Refresh(Refresh),
    Remove(Remove),
    Migrate(Migrate),
    Keys(Keys),
    Completions(Completions),
    Man(Man),
}

/// Run the daemon in the foreground (what systemd starts)
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Run {
    /// How log lines look: text, journal or json
    ///
    /// text: timestamped lines for people.
    /// journal: no timestamps, a syslog priority (<3> error ... <7> debug)
    /// before each line, for journald.
    /// json: one JSON object per line.
    /// Default: journal when stderr is the journal ($JOURNAL_STREAM), else
    /// text.
    #[arg(
        long,
        value_name = "FORMAT",
        value_parser = log_format(),
        hide_possible_values = true,
        verbatim_doc_comment
    )]
    pub log_format: Option<LogFormat>,
}

/// Check the config, its secrets and paths; exit 0 or 2
///
/// Prints every problem with its key, at once, and changes nothing.
/// A SQLite store is read, only, to see that the daemon would take it
/// with the config's encryption key (or without one); a store others may
/// read, or its directory others may write, is a warning (exit 0).
/// Run as root, it also checks the sink and database directories and the
/// sink and socket groups as the service user meets them (by mode bits;
/// ACLs are not read), if that user exists.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct CheckConfig {
    /// The service user to check as, when run as root [default: tokend]
    #[arg(long, value_name = "USER")]
    pub as_user: Option<String>,
}

/// Onboard an API user: the authorization-code flow, or the device flow
///
/// Prints the provider's authorization URL, waits for the browser to come
/// back to the provider's loopback redirect_uri, checks its state,
/// exchanges the code and stores the credential. With --device, prints a
/// URL and a code instead and polls the provider. Nothing is stored unless
/// all of that succeeds.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Authorize {
    /// The credential's name (letters, digits, '-', '_', '.', '@')
    #[arg(value_name = "NAME", value_parser = name)]
    pub name: String,
    /// The provider, as named in the config ([providers.P])
    #[arg(long, value_name = "P")]
    pub provider: String,
    /// Do not listen: read the redirect's address from stdin
    ///
    /// Paste the address the browser lands on (or just the code). For a
    /// browser on another machine.
    #[arg(long, verbatim_doc_comment)]
    pub paste: bool,
    /// Exchange a code obtained some other way; '-' reads stdin
    #[arg(long, value_name = "CODE|-")]
    pub code: Option<String>,
    /// Headless: the device authorization grant (RFC 8628)
    ///
    /// Prints a URL and a code to enter there from any device with a
    /// browser, and polls until access is allowed, denied or the code
    /// expires. Needs the provider's device_authorization_url.
    #[arg(long, verbatim_doc_comment, conflicts_with_all = ["paste", "code", "timeout"])]
    pub device: bool,
    /// How long to wait for the browser [default: 5m]
    #[arg(long, value_name = "DURATION", value_parser = timeout)]
    pub timeout: Option<Duration>,
    /// Replace a credential of the same name, once new tokens are obtained
    #[arg(long)]
    pub force: bool,
}

/// Add a credential from an existing refresh token, or a client_credentials one
///
/// --refresh-token FILE: a grant someone authorized (refresh_token grant).
/// --client-credentials: no refresh token; the provider's client_id and
/// secret are the grant (RFC 6749 §4.4), for an API's machine users.
/// --from FILE: many refresh-token credentials at once, one JSON object a
/// line: {"name", "provider", "refresh_token", "access_token"?,
/// "expires_in"?, "scope"?}. Every line is checked before anything is
/// stored; then all are stored in one transaction, or none.
#[derive(Args, Debug)]
#[command(
    verbatim_doc_comment,
    group(ArgGroup::new("grant").required(true).args(["refresh_token", "client_credentials", "from"]))
)]
pub struct Import {
    /// The credential's name (letters, digits, '-', '_', '.', '@')
    #[arg(value_name = "NAME", value_parser = name, required_unless_present = "from")]
    pub name: Option<String>,
    /// The provider, as named in the config ([providers.P])
    #[arg(long, value_name = "P", required_unless_present = "from")]
    pub provider: Option<String>,
    /// A file of credentials, one JSON object a line; '-' reads stdin
    #[arg(
        long,
        value_name = "FILE|-",
        conflicts_with_all = ["name", "provider", "access_token", "expires_in"]
    )]
    pub from: Option<String>,
    /// The file that holds the refresh token; '-' reads stdin
    #[arg(long, value_name = "FILE|-")]
    pub refresh_token: Option<String>,
    /// No refresh token: fetch tokens with the client_credentials grant
    ///
    /// The daemon fetches a new access token before each one expires, with
    /// the provider's client_id, secret and scope; without --access-token,
    /// it fetches the first one at once.
    #[arg(long, verbatim_doc_comment)]
    pub client_credentials: bool,
    /// Also store its current access token, from FILE; '-' reads stdin
    #[arg(long, value_name = "FILE|-")]
    pub access_token: Option<String>,
    /// Seconds the access token has left (at most ten years)
    #[arg(long, value_name = "SECS", value_parser = expires_in)]
    pub expires_in: Option<u64>,
    /// Replace a credential of the same name
    #[arg(long)]
    pub force: bool,
}

/// One line per credential: name, provider, state, expiry, ...
///
/// The columns: name, provider, state, expiry, last refresh, last error.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct List {}

/// The same as list, in detail
#[derive(Args, Debug)]
pub struct Status {
    /// Only this credential
    #[arg(value_name = "NAME", value_parser = name)]
    pub name: Option<String>,
    /// For machines (never a secret)
    #[arg(long)]
    pub json: bool,
}

/// Print the current access token (asks the daemon)
///
/// Without --format: the token and a newline. With it: exactly the bytes
/// a file sink of that format holds, e.g.
/// curl -H "$(tokend token NAME --format header)" URL
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Token {
    /// The credential's name
    #[arg(value_name = "NAME", value_parser = name)]
    pub name: String,
    /// As a sink file of this format: raw, header, json or env
    #[arg(long, value_name = "FORMAT", value_parser = token_format())]
    pub format: Option<config::Format>,
}

/// Run a program with the token in its environment (asks the daemon)
///
/// The token goes into the child's environment only (never its argv);
/// signals sent to tokend exec are passed on to the child, and tokend
/// exec exits with the child's status (128+N if signal N killed it).
/// tokend exec asks the daemon for a new token every --interval; when
/// it changed, --restart-on-change restarts the child with it (SIGTERM,
/// then SIGKILL after 10 s), --signal SIG sends SIG to the child. With
/// neither, the child keeps its first token.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Exec {
    /// The credential's name
    #[arg(value_name = "NAME", value_parser = name)]
    pub name: String,
    /// The child's variable that holds the token [default: ACCESS_TOKEN]
    #[arg(long = "env", value_name = "VAR", value_parser = env_var)]
    pub env: Option<String>,
    /// Restart the child when the token changes
    #[arg(long, conflicts_with = "signal")]
    pub restart_on_change: bool,
    /// Send SIG (HUP, USR1, ...) to the child when the token changes
    #[arg(long, value_name = "SIG", value_parser = signal)]
    pub signal: Option<i32>,
    /// How often to ask the daemon whether the token changed [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = interval)]
    pub interval: Option<Duration>,
    /// The program and its arguments, after '--'
    #[arg(value_name = "COMMAND", last = true, required = true)]
    pub command: Vec<std::ffi::OsString>,
}

/// Refresh now, through the daemon, and report the outcome
///
/// With no daemon running, refreshes directly, under the store's lease.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Refresh {
    /// The credential's name
    #[arg(value_name = "NAME", value_parser = name)]
    pub name: String,
}

/// Forget a credential and remove its published files
///
/// Without --revoke the grant is not revoked at the provider: its tokens
/// stay valid until they expire.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Remove {
    /// The credential's name
    #[arg(value_name = "NAME", value_parser = name)]
    pub name: String,
    /// First revoke the grant at the provider's revocation_url (RFC 7009)
    ///
    /// Revokes the refresh token (a client_credentials credential's access
    /// token), then forgets the credential. If the provider does not
    /// confirm, nothing is removed. A provider without revocation_url
    /// cannot revoke: then nothing is removed, exit code 2.
    #[arg(long, verbatim_doc_comment)]
    pub revoke: bool,
}

/// Move every credential to another store, without re-authorizing
///
/// Copies every credential (its tokens, state and backoff) and its events
/// from SOURCE into the store the config's `database` names (or --to), in
/// one transaction: all or nothing. The source's credentials stay behind,
/// leased for good to the move, so that no daemon still pointed at the old
/// store can refresh them and rotate the copy dead. Stop every daemon that
/// uses the source first; a refresh in flight refuses the move.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Migrate {
    /// Where the credentials are now
    ///
    /// sqlite:PATH (or an absolute PATH) for a SQLite file; a PostgreSQL
    /// URL without a password (a password on the command line shows in
    /// ps(1): use the config's database key for such a store).
    #[arg(long, value_name = "SOURCE", verbatim_doc_comment)]
    pub from: String,
    /// Where to put them; default: the config's database
    ///
    /// The same forms as --from. It must not hold any of the names moved.
    #[arg(long, value_name = "DEST", verbatim_doc_comment)]
    pub to: Option<String>,
}

/// Seal the store's tokens, rotate its keys (README "Secrets at rest")
///
/// With encryption_key_file or encryption_key_credential in the config,
/// the store's token columns are sealed with data keys that this key
/// wraps. ACTION is one of:
///   status  whether the config gives a key (its fingerprint), the
///           store's data keys, and the values each one seals
///   seal    seal an existing store's plaintext tokens, every row in
///           one transaction: how an installation turns sealing on
///   rotate  a new data key; every value is sealed again with it, and
///           the old keys are deleted once no value uses them
///   rewrap  wrap the data keys with a new key-encryption key, read
///           from --new-key-file; then install that file as the key on
///           every host. No token is touched.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Keys {
    /// status, seal, rotate or rewrap
    #[arg(value_name = "ACTION", value_parser = ["status", "seal", "rotate", "rewrap"])]
    pub action: String,
    /// For rewrap: the new key file (32 bytes, mode 0600)
    #[arg(long, value_name = "PATH", required_if_eq("action", "rewrap"))]
    pub new_key_file: Option<PathBuf>,
}

/// Print a shell completion script
#[derive(Args, Debug)]
#[command(hide = true)]
pub struct Completions {
    /// The shell
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// Print the man page (roff)
#[derive(Args, Debug)]
#[command(hide = true)]
pub struct Man {}

/// A credential name, checked as the config checks names.
fn name(s: &str) -> Result<String, String> {
    crate::names::check_name(s)
        .map(|()| s.to_owned())
        .map_err(|e| format!("bad credential name {s:?}: {e}"))
}

/// `--log-format`: its three values, listed in the help and completions.
fn log_format() -> impl TypedValueParser<Value = LogFormat> {
    PossibleValuesParser::new(["text", "journal", "json"])
        .map(|s| LogFormat::parse(&s).expect("one of the possible values"))
}

/// `token --format`: the sink formats (README "File sinks").
fn token_format() -> impl TypedValueParser<Value = config::Format> {
    PossibleValuesParser::new(["raw", "header", "json", "env"]).map(|s| match s.as_str() {
        "header" => config::Format::Header,
        "json" => config::Format::Json,
        "env" => config::Format::Env,
        _ => config::Format::Raw,
    })
}

/// `exec --env VAR`: a name a shell can expand, so that the child's
/// scripts can read it.
fn env_var(s: &str) -> Result<String, String> {
    let mut chars = s.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "--env {s:?} is not a variable name: letters, digits and '_', not starting with a digit"
        ))
    }
}

/// The signals `exec --signal` takes, by name (with or without "SIG").
const SIGNALS: [(&str, i32); 9] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("TERM", libc::SIGTERM),
    ("WINCH", libc::SIGWINCH),
    ("CONT", libc::SIGCONT),
    ("ALRM", libc::SIGALRM),
];

/// `exec --signal SIG`: a name from [`SIGNALS`] or its number.
fn signal(s: &str) -> Result<i32, String> {
    let upper = s.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(n, _)| *n == bare)
        .map(|(_, v)| *v)
        .or_else(|| {
            s.parse()
                .ok()
                .filter(|n| SIGNALS.iter().any(|(_, v)| v == n))
        })
        .ok_or_else(|| {
            let names: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            format!("--signal {s:?} is not one of {}", names.join(", "))
        })
}

/// `exec --interval DURATION`: at least 100 ms, so that polling never
/// becomes a busy loop on the daemon.
fn interval(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d >= Duration::from_millis(100) => Ok(d),
        _ => Err(format!(
            "--interval {s:?} is not a duration of at least 100ms; write e.g. \"10s\", \"1m\""
        )),
    }
}

/// `--timeout DURATION`: a humantime duration above zero.
fn timeout(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!(
            "--timeout {s:?} is not a duration above zero; write e.g. \"90s\", \"10m\""
        )),
    }
}

/// The longest lifetime `--expires-in` takes: ten years, as for the
/// `expires_in` of a provider's answer (src/provider/classify.rs caps it alike).
/// Every instant in the store then stays far from what RFC 3339 can write
/// (year 9999) and from where milliseconds overflow an i64.
pub const MAX_EXPIRES_IN: u64 = 3650 * 86_400;

/// `--expires-in SECS`: a number of seconds, at most [`MAX_EXPIRES_IN`].
fn expires_in(s: &str) -> Result<u64, String> {
    let secs = s
        .parse::<u64>()
        .map_err(|_| format!("--expires-in {s:?} is not a number of seconds"))?;
    if secs > MAX_EXPIRES_IN {
        return Err(format!(
            "--expires-in {secs} is more than ten years ({MAX_EXPIRES_IN} seconds): is it \
             milliseconds, or an epoch timestamp? Give the seconds the access token has \
             left (the provider's expires_in, e.g. 3600)"
        ));
    }
    Ok(secs)
}
