//! The TOML configuration (README "Configuration"): the validated model
//! that the rest of tokend reads, and how a file becomes one.
//!
//! Parsing happens in two passes. serde rejects unknown keys and wrong types
//! (`raw.rs`; `errors.rs` names the key without echoing the line); then
//! `validate.rs` checks every value and collects *all* problems, so
//! `check-config` can list them at once and the daemon never starts
//! half-configured. `secrets.rs` reads the client secrets on the way.

mod errors;
mod raw;
mod secrets;
#[cfg(test)]
mod testing;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;

use crate::glob::glob_match;
use crate::secret::Secret;
use crate::store::Database;

pub use validate::{check_cron, is_loopback};

/// Where the config lives when neither `-c` nor `TOKEND_CONFIG` says.
pub const DEFAULT_CONFIG: &str = "/etc/tokend/config.toml";
const DEFAULT_DATABASE: &str = "/var/lib/tokend/tokend.db";
const DEFAULT_SOCKET: &str = "/run/tokend/tokend.sock";

/// Where the database (`STATE_DIRECTORY`) or the socket
/// (`RUNTIME_DIRECTORY`) is when the file does not say: `file` in the
/// directory systemd made for it (the first, as it may list several,
/// separated by ':'), else `usual`.
fn systemd_path(env: &dyn Env, var: &str, file: &str, usual: &str) -> PathBuf {
    match env.var(var) {
        Some(dirs) => PathBuf::from(dirs.split(':').next().unwrap_or(&dirs)).join(file),
        None => PathBuf::from(usual),
    }
}

/// One problem with the configuration, tied to the key that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `providers.pandadoc.token_url`; empty for the file as a whole.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {p}", self.path.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration. Built only by [`load`] or [`parse`], so holding
/// one means every value was checked and every secret could be read.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, reloaded on SIGHUP.
    pub path: PathBuf,
    /// A SQLite file, or a PostgreSQL database several hosts share.
    pub database: Database,
    pub socket: SocketConfig,
    pub refresh: RefreshConfig,
    pub providers: BTreeMap<String, Arc<ProviderConfig>>,
    pub sinks: Vec<Arc<SinkConfig>>,
    /// `[[access]]`: who, besides root and our own user, may read which tokens.
    pub access: Vec<AccessRule>,
    /// `[[notify]]`: whom to tell when a credential needs a human.
    pub notify: Vec<Arc<NotifyRule>>,
    /// `encryption_key_file` or `encryption_key_credential`: the key that
    /// seals the token columns (README "Secrets at rest"); None: off.
    pub sealing: Option<Sealing>,
    /// The files secrets are read from at start (`client_secret_file`,
    /// `database_file`, `encryption_key_file`), each with its key: the
    /// service user must be able to read them, which `check-config
    /// --as-user` checks. systemd's credentials are not among them: systemd
    /// reads those as root and hands them over.
    pub secret_files: Vec<(String, PathBuf)>,
}

/// The key-encryption key, loaded and checked with the config (its file's
/// mode, length and spelling), so that a bad key is a config error naming
/// its key.
#[derive(Debug, Clone)]
pub struct Sealing {
    /// The config key it was given with, for messages.
    pub source: &'static str,
    /// Where it was read from.
    pub path: PathBuf,
    pub kek: Arc<crate::seal::Kek>,
}

/// The Unix socket's place and permissions.
#[derive(Debug, Clone, PartialEq)]
pub struct SocketConfig {
    pub path: PathBuf,
    pub mode: u32,
    /// The group given to the socket file, resolved to a gid at load.
    pub group: Option<(String, u32)>,
}

/// One `[[access]]` rule: callers with one of these uids, or in one of these
/// groups, may read the credentials matching these patterns.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessRule {
    pub credentials: Vec<String>,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl AccessRule {
    /// Whether this rule lets a caller (uid, groups) read `name`.
    pub fn grants(&self, name: &str, uid: u32, groups: &[u32]) -> bool {
        (self.uids.contains(&uid) || self.gids.iter().any(|g| groups.contains(g)))
            && self.credentials.iter().any(|p| glob_match(p, name))
    }
}

/// `[refresh]`: when and how hard tokend talks to providers.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshConfig {
    /// Cron expression, seconds first, of the validation sweep.
    pub validate_schedule: String,
    pub refresh_before_expiry: Duration,
    /// Provider requests in flight across all credentials.
    pub max_concurrency: usize,
    pub request_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// A token with less than this left is refreshed before anything hands it out;
    /// the refresher therefore never lets a token get this close to expiry.
    pub min_remaining: Duration,
    /// A consumer's "this token was refused" triggers at most one
    /// re-validation per credential this often.
    pub rejected_cooldown: Duration,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        RefreshConfig {
            validate_schedule: "0 */15 * * * *".into(),
            refresh_before_expiry: Duration::from_secs(600),
            max_concurrency: 8,
            request_timeout: Duration::from_secs(30),
            retry_initial: Duration::from_secs(5),
            retry_max: Duration::from_secs(900),
            min_remaining: Duration::from_secs(60),
            rejected_cooldown: Duration::from_secs(30),
        }
    }
}

impl RefreshConfig {
    /// How long before expiry a refresh is due: never closer than `min_remaining`.
    pub fn lead(&self) -> Duration {
        self.refresh_before_expiry.max(self.min_remaining)
    }
}

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAuth {
    /// client_id and client_secret in the form body: what PandaDoc wants.
    ClientSecretPost,
    /// HTTP Basic with the client credentials.
    ClientSecretBasic,
}

/// `[providers.NAME]`: one OAuth 2.0 client registration.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    /// Which preset filled in the URLs, if any. PandaDoc's presets also mean
    /// "send exactly the fields of PandaDoc's OpenAPI description".
    pub preset: Option<Preset>,
    pub client_id: String,
    pub client_secret: Secret,
    pub redirect_uri: Option<Url>,
    pub scope: Option<String>,
    /// Whether refresh requests carry `scope`. RFC 6749 §6 makes it optional
    /// and a standard OpenID provider refuses names the refresh token was not
    /// granted (`offline_access`), so only PandaDoc's presets send it, as
    /// PandaDoc's OpenAPI example of the refresh request does.
    pub refresh_scope: bool,
    pub authorize_url: Url,
    pub token_url: Url,
    pub validate_url: Url,
    /// RFC 7009's endpoint, for `tokend remove --revoke`; None: the
    /// provider revokes nothing on request (PandaDoc), so tokend must say
    /// that a removed grant stays alive there.
    pub revocation_url: Option<Url>,
    /// RFC 8628 §3.1's endpoint, for `tokend authorize --device`; None: the
    /// provider has no device flow (PandaDoc).
    pub device_authorization_url: Option<Url>,
    pub token_auth: TokenAuth,
    pub pkce: bool,
    pub authorize_params: BTreeMap<String, String>,
}

impl ProviderConfig {
    /// The `scope` of a token request's form. PandaDoc's one scope is named
    /// `read+write` (its OpenAPI description, and its SDK sends that name,
    /// which form encoding writes `read%2Bwrite`): presets send the name as
    /// configured. Other providers get the RFC 6749 §3.3 list, names
    /// separated by spaces, whichever of `+` and spaces the config used.
    pub fn token_scope(&self) -> Option<String> {
        let scope = self.scope.as_deref()?;
        if self.preset.is_some() {
            return Some(scope.to_owned());
        }
        let names: Vec<&str> = scope.split([' ', '+']).filter(|n| !n.is_empty()).collect();
        (!names.is_empty()).then(|| names.join(" "))
    }
}

/// Known providers whose URLs need not be written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Pandadoc,
    PandadocEu,
}

impl Preset {
    fn parse(s: &str) -> Option<Preset> {
        match s {
            "pandadoc" => Some(Preset::Pandadoc),
            "pandadoc-eu" => Some(Preset::PandadocEu),
            _ => None,
        }
    }

    /// (authorize_url, token_url, validate_url)
    fn urls(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Preset::Pandadoc => (
                "https://app.pandadoc.com/oauth2/authorize",
                "https://api.pandadoc.com/oauth2/access_token",
                "https://api.pandadoc.com/public/v1/members/current",
            ),
            Preset::PandadocEu => (
                "https://app.pandadoc.eu/oauth2/authorize",
                "https://api.pandadoc.eu/oauth2/access_token",
                "https://api.pandadoc.eu/public/v1/members/current",
            ),
        }
    }
}

/// What a sink file holds (README "File sinks").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Header,
    Env,
    Json,
}

/// `[[sinks]]`: one family of published files.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Position in the file, for messages (`sinks[1].path`).
    pub index: usize,
    /// Glob patterns (`*`, `?`) over credential names.
    pub credentials: Vec<String>,
    /// Path template; `{name}` is replaced by the credential's name.
    pub path: String,
    pub format: Format,
    pub mode: u32,
    /// The group the file is given, resolved to a gid once at load.
    pub group: Option<(String, u32)>,
    pub on_change: Option<Vec<String>>,
    pub on_change_timeout: Duration,
}

impl SinkConfig {
    pub fn matches(&self, name: &str) -> bool {
        self.credentials.iter().any(|p| glob_match(p, name))
    }

    /// The file this sink writes for a credential.
    pub fn path_for(&self, name: &str) -> PathBuf {
        PathBuf::from(self.path.replace("{name}", name))
    }
}

/// A change of a credential's state that a `[[notify]]` rule may ask to hear
/// about (README "Notifications").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertEvent {
    NeedsReauthorization,
    Misconfigured,
    Retrying,
    Recovered,
}

impl AlertEvent {
    pub const ALL: [AlertEvent; 4] = [
        AlertEvent::NeedsReauthorization,
        AlertEvent::Misconfigured,
        AlertEvent::Retrying,
        AlertEvent::Recovered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertEvent::NeedsReauthorization => "needs_reauthorization",
            AlertEvent::Misconfigured => "misconfigured",
            AlertEvent::Retrying => "retrying",
            AlertEvent::Recovered => "recovered",
        }
    }
}

/// `[[notify]]`: a command to run when matching credentials reach one of
/// `events`, so that a dead grant reaches a human before its consumers do.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifyRule {
    /// Position in the file, for messages (`notify[0].command`).
    pub index: usize,
    /// Glob patterns (`*`, `?`) over credential names.
    pub credentials: Vec<String>,
    pub events: Vec<AlertEvent>,
    /// The argv, no shell: its first word is an absolute path.
    pub command: Vec<String>,
    /// A run that outlives this is killed.
    pub timeout: Duration,
    /// At most one run per credential and event this often: a credential
    /// that flaps must not page someone every minute.
    pub interval: Duration,
    /// `retrying` fires when this many consecutive failures are reached:
    /// one blip that the backoff absorbs is nobody's business.
    pub after: u32,
}

impl NotifyRule {
    pub fn matches(&self, name: &str) -> bool {
        self.credentials.iter().any(|p| glob_match(p, name))
    }
}

/// What the configuration may read from the process environment; a seam so
/// tests can give `$STATE_DIRECTORY` and friends without touching the real one.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;

    /// Whether client secrets are read (and their absence an error).
    fn read_secrets(&self) -> bool {
        true
    }
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// Only the socket's path, for the quick client commands (`token`): reads
/// the one key it needs, validates nothing else, and falls back to the
/// default when the file is missing or unreadable (the connection will then
/// say whether a daemon listens).
pub fn socket_path(config: &Path) -> PathBuf {
    let from_file = std::fs::read_to_string(config)
        .ok()
        .and_then(|t| toml::from_str::<raw::OnlySocket>(&t).ok())
        .and_then(|c| c.socket);
    match from_file {
        Some(s) => PathBuf::from(s),
        None => systemd_path(
            &ProcessEnv,
            "RUNTIME_DIRECTORY",
            "tokend.sock",
            DEFAULT_SOCKET,
        ),
    }
}

/// Reads and validates a config file, secrets included.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &ProcessEnv)
}

/// Reads a config file for a command that never talks to a provider
/// (`import`, `list`): client secrets are left unread, so an operator who may
/// not read them can still run it.
pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &WithoutSecrets)
}

/// Marks a load that must not read secrets.
struct WithoutSecrets;

impl Env for WithoutSecrets {
    fn var(&self, name: &str) -> Option<String> {
        ProcessEnv.var(name)
    }

    fn read_secrets(&self) -> bool {
        false
    }
}

fn load_with(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        problems: vec![Problem {
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        }],
    })?;
    parse(&text, path, env)
}

/// Parses and validates config text; `path` is used for messages and reloads.
pub fn parse(text: &str, path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
    let fail = |problems| ConfigError {
        path: path.to_owned(),
        problems,
    };
    let raw: raw::RawConfig =
        toml::from_str(text).map_err(|e| fail(vec![errors::toml_problem(text, &e)]))?;
    validate::validate(raw, path, env).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use testing::{FakeEnv, PANDADOC, env, parse_ok, problems};

    #[test]
    fn preset_fills_urls_and_defaults_apply() {
        let c = parse_ok(PANDADOC);
        let p = &c.providers["pandadoc"];
        assert_eq!(
            p.token_url.as_str(),
            "https://api.pandadoc.com/oauth2/access_token"
        );
        assert_eq!(
            p.validate_url.as_str(),
            "https://api.pandadoc.com/public/v1/members/current"
        );
        assert_eq!(p.scope.as_deref(), Some("read+write"));
        assert!(
            p.refresh_scope,
            "PandaDoc's OpenAPI example sends scope on refresh"
        );
        assert_eq!(p.client_secret.expose(), "s3cret");
        assert_eq!(p.token_auth, TokenAuth::ClientSecretPost);
        assert_eq!(c.refresh, RefreshConfig::default());
    }

    #[test]
    fn eu_preset_uses_eu_hosts() {
        let c = parse_ok(&PANDADOC.replace("\"pandadoc\"\n", "\"pandadoc-eu\"\n"));
        assert_eq!(
            c.providers["pandadoc"].authorize_url.as_str(),
            "https://app.pandadoc.eu/oauth2/authorize"
        );
    }

    #[test]
    fn database_defaults_to_state_directory() {
        let e = FakeEnv(HashMap::from([(
            "STATE_DIRECTORY",
            "/var/lib/tokend:/other".to_owned(),
        )]));
        let c = parse("", Path::new("t.toml"), &e).unwrap();
        assert_eq!(
            c.database,
            Database::Sqlite(PathBuf::from("/var/lib/tokend/tokend.db"))
        );
        let c = parse("", Path::new("t.toml"), &FakeEnv(HashMap::new())).unwrap();
        assert_eq!(
            c.database,
            Database::Sqlite(PathBuf::from(DEFAULT_DATABASE))
        );
    }

    #[test]
    fn sinks_parse_with_defaults() {
        let c = parse_ok(&format!(
            "{PANDADOC}\n[[sinks]]\npath = \"/run/t/{{name}}\"\nformat = \"json\"\nmode = \"0640\"\ngroup = \"0\"\n"
        ));
        let s = &c.sinks[0];
        assert_eq!(s.mode, 0o640);
        assert_eq!(s.format, Format::Json);
        assert_eq!(s.group, Some(("0".into(), 0)));
        assert!(s.matches("anything"));
        assert_eq!(s.path_for("bot"), PathBuf::from("/run/t/bot"));
    }

    #[test]
    fn the_example_config_is_valid() {
        struct NoSecrets;
        impl Env for NoSecrets {
            fn var(&self, _: &str) -> Option<String> {
                None
            }
            fn read_secrets(&self) -> bool {
                false
            }
        }
        let c = parse(
            include_str!("../../config.example.toml"),
            Path::new("config.example.toml"),
            &NoSecrets,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.refresh, RefreshConfig::default());
        assert_eq!(c.sinks[0].mode, 0o640);
    }

    #[test]
    fn socket_and_access() {
        let c = parse_ok(
            "socket = \"/tmp/t.sock\"\nsocket_mode = \"0600\"\n[[access]]\ncredentials = [\"sales-*\"]\nuids = [1001]\ngroups = [\"0\"]\n",
        );
        assert_eq!(c.socket.path, PathBuf::from("/tmp/t.sock"));
        assert_eq!(c.socket.mode, 0o600);
        let a = &c.access[0];
        assert!(a.grants("sales-bot", 1001, &[]));
        assert!(a.grants("sales-bot", 5, &[7, 0]));
        assert!(!a.grants("ops-bot", 1001, &[]));
        assert!(!a.grants("sales-bot", 5, &[7]));
        let e = FakeEnv(HashMap::from([(
            "RUNTIME_DIRECTORY",
            "/run/tokend".to_owned(),
        )]));
        let c = parse("", Path::new("t.toml"), &e).unwrap();
        assert_eq!(c.socket.path, PathBuf::from("/run/tokend/tokend.sock"));
        assert_eq!(c.socket.mode, 0o660);
        let e = problems("[[access]]\ncredentials = [\"*\"]\n");
        assert!(e[0].starts_with("access[0].uids"), "{e:?}");
    }

    /// Wrong types, numbers out of range, durations past any use, values of
    /// megabytes, nesting past toml's limit: each is an error that names its
    /// key and fits on a line, never a panic and never a value repeated whole.
    #[test]
    fn hostile_values_get_clear_errors() {
        let big = "x".repeat(10 << 20);
        let cases = [
            (
                "[refresh]\nmax_concurrency = 1e30\n".to_owned(),
                "refresh.max_concurrency: invalid type: floating point",
            ),
            (
                "[refresh]\nmax_concurrency = 99999999999999999999\n".into(),
                "refresh.max_concurrency: invalid type: integer",
            ),
            (
                "[refresh]\nmax_concurrency = 9223372036854775807\n".into(),
                "refresh.max_concurrency: 9223372036854775807 is out of range: give 1 to 4096",
            ),
            (
                "[refresh]\nmax_concurrency = nan\n".into(),
                "refresh.max_concurrency: invalid type: floating point",
            ),
            (
                "[refresh]\nretry_max = 15\n".into(),
                "refresh.retry_max: invalid type: integer",
            ),
            (
                "database = [\"/a\"]\n".into(),
                "database: invalid type: sequence",
            ),
            ("providers = 3\n".into(), "providers: invalid type: integer"),
            (
                "[[access]]\nuids = [4294967296]\n".into(),
                "access.uids: invalid value: integer",
            ),
            (
                "[refresh]\nretry_max = \"500000000000y\"\n".into(),
                "refresh.retry_max: \"500000000000y\" is too long: at most 3650 days",
            ),
            (
                "[refresh]\nmin_remaining = \"300000000 years\"\n".into(),
                "refresh.min_remaining: \"300000000 years\" is too long",
            ),
            (
                "[refresh]\nretry_max = \"99999999999999999999999s\"\n".into(),
                "refresh.retry_max: \"99999999999999999999999s\" is not a duration",
            ),
            ("x = \"\n".into(), "x: invalid basic string"),
            ("[refresh]\n[refresh]\n".into(), "refresh: "),
            (
                format!("database = \"/{big}\"\n"),
                "database: is 10485761 bytes long: at most 4095",
            ),
            (
                format!("socket = \"/run/{}\"\n", "s".repeat(103)),
                "socket: is 108 bytes long: at most 107",
            ),
            (
                format!("[[sinks]]\npath = \"/{big}/{{name}}\"\n"),
                "sinks[0].path: is 10485768 bytes long: at most 4095",
            ),
            (
                format!("[refresh]\nvalidate_schedule = \"{big}\"\n"),
                "refresh.validate_schedule: \"xxxxxxxx",
            ),
            (
                format!("{PANDADOC}token_url = \"{big}\"\n"),
                "providers.pandadoc.token_url: \"xxxxxxxx",
            ),
            (format!("[providers.{big}]\n"), "providers.xxxxxxxx"),
            (format!("{big} = 1\n"), "xxxxxxxx"),
            (
                format!("a = {}{}", "[".repeat(100_000), "]".repeat(100_000)),
                "a: cannot recurse further",
            ),
            (
                format!("a = {}{}", "{b=".repeat(100_000), "}".repeat(100_000)),
                "a: cannot recurse further",
            ),
            (
                format!("[{}]\n", vec!["a"; 100_000].join(".")),
                "recursion limit",
            ),
        ];
        for (text, start) in cases {
            let e = problems(&text);
            let head: String = text.chars().take(40).collect();
            assert!(e[0].starts_with(start), "{head:?}: {e:?}");
            for p in &e {
                assert!(p.len() < 400 && !p.contains('\n'), "{head:?}: {p:?}");
            }
        }
    }

    /// TOML strings are UTF-8, so only the config file's own path can be
    /// anything else; and a file that is not UTF-8 is not TOML.
    #[test]
    fn non_utf8_paths_and_contents() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir
            .path()
            .join(std::ffi::OsStr::from_bytes(b"conf\xff.toml"));
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("conf\u{fffd}.toml: cannot read the config file: No such file"),
            "{e}"
        );
        std::fs::write(&path, "[refresh]\nretry_max = \"1m\"\n").unwrap();
        let c = load_without_secrets(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.path, path);
        assert_eq!(c.refresh.retry_max, Duration::from_secs(60));
        let e = parse("[refresh]\nretry_max = \"1\"\n", &path, &env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("conf\u{fffd}.toml: refresh.retry_max: "), "{e}");
        std::fs::write(&path, b"database = \"/x\xff\"\n").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.ends_with("cannot read the config file: stream did not contain valid UTF-8"),
            "{e}"
        );
    }
}
