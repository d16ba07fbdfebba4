//! The TOML configuration (README "Configuration"): parsing, defaults, validation with errors
//! that name their key, and loading of client secrets.
//!
//! Parsing happens in two passes. serde rejects unknown keys and wrong types
//! (toml's error shows the offending line); then [`validate`] checks every
//! value and collects *all* problems, so `check-config` can list them at once
//! and the daemon never starts half-configured.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use crate::glob::glob_match;
use crate::names::check_name;
use crate::secret::Secret;
use crate::users;

/// Where the config lives when neither `-c` nor `TOKEND_CONFIG` says.
pub const DEFAULT_CONFIG: &str = "/etc/tokend/config.toml";
const DEFAULT_DATABASE: &str = "/var/lib/tokend/tokend.db";
const DEFAULT_SOCKET: &str = "/run/tokend/tokend.sock";

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
    pub database: PathBuf,
    pub socket: SocketConfig,
    pub refresh: RefreshConfig,
    pub providers: BTreeMap<String, Arc<ProviderConfig>>,
    pub sinks: Vec<Arc<SinkConfig>>,
    /// `[[access]]`: who, besides root and our own user, may read which tokens.
    pub access: Vec<AccessRule>,
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
    /// Position in the file, for messages ("sinks[1].path").
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

/// The longest duration any setting takes: ten years is past every token's
/// lifetime, and far from where instants in milliseconds overflow.
const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);
/// The longest path accepted (Linux's PATH_MAX, less the terminating NUL).
const MAX_PATH: usize = 4095;
/// The longest socket path: `sockaddr_un.sun_path` holds 108 bytes with the NUL.
const MAX_SOCKET_PATH: usize = 107;
/// How much of a value from the file a message repeats.
const SHOWN: usize = 64;
/// How much of a library's explanation (which may quote the value) a message keeps.
const EXPLAINED: usize = 200;

/// Text cut to `max` characters, "…" marking the cut: a megabyte pasted
/// into the file by mistake still gives a one-line error.
fn cut(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => s.into(),
        Some((i, _)) => format!("{}…", &s[..i]).into(),
    }
}

/// A value from the file, quoted and cut, as messages show it.
fn shown(s: &str) -> String {
    format!("{:?}", cut(s, SHOWN))
}

/// A library's error, cut.
fn explained(e: impl fmt::Display) -> String {
    cut(&e.to_string(), EXPLAINED).into_owned()
}

// ---- raw, as written in the file ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database: Option<String>,
    socket: Option<String>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    #[serde(default)]
    access: Vec<RawAccess>,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    sinks: Vec<RawSink>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    validate_schedule: Option<String>,
    refresh_before_expiry: Option<String>,
    max_concurrency: Option<i64>,
    request_timeout: Option<String>,
    retry_initial: Option<String>,
    retry_max: Option<String>,
    min_remaining: Option<String>,
    rejected_cooldown: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    credentials: Option<Vec<String>>,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    preset: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<String>,
    client_secret_env: Option<String>,
    client_secret_credential: Option<String>,
    redirect_uri: Option<String>,
    scope: Option<String>,
    refresh_scope: Option<bool>,
    authorize_url: Option<String>,
    token_url: Option<String>,
    validate_url: Option<String>,
    token_auth: Option<String>,
    pkce: Option<bool>,
    #[serde(default)]
    authorize_params: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    credentials: Option<Vec<String>>,
    path: Option<String>,
    format: Option<String>,
    mode: Option<String>,
    group: Option<String>,
    on_change: Option<Vec<String>>,
    on_change_timeout: Option<String>,
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
    #[derive(Deserialize)]
    struct OnlySocket {
        socket: Option<String>,
    }
    let from_file = std::fs::read_to_string(config)
        .ok()
        .and_then(|t| toml::from_str::<OnlySocket>(&t).ok())
        .and_then(|c| c.socket);
    match from_file {
        Some(s) => PathBuf::from(s),
        None => match ProcessEnv.var("RUNTIME_DIRECTORY") {
            Some(d) => PathBuf::from(d.split(':').next().unwrap_or(&d)).join("tokend.sock"),
            None => PathBuf::from(DEFAULT_SOCKET),
        },
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
    let raw: RawConfig = toml::from_str(text).map_err(|e| fail(vec![toml_problem(text, &e)]))?;
    validate(raw, path, env).map_err(fail)
}

/// A TOML error as a problem with a key, but without toml's excerpt of the
/// offending line: that line may hold a secret (`client_secret = "…"` is a
/// common slip), and these messages reach logs. Quoted values in the message
/// are elided for the same reason; names in backquotes (keys, numbers) are
/// cut to [`SHOWN`] characters.
fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
    let mut message = String::new();
    // Inside "…" (elided) or `…` (cut): characters seen so far.
    let (mut quoted, mut backquoted) = (false, None::<usize>);
    for c in e.message().trim_end().chars() {
        match (c, quoted, backquoted) {
            ('"', false, None) => {
                quoted = true;
                message.push_str("\"…");
            }
            ('"', true, _) => {
                quoted = false;
                message.push('"');
            }
            (_, true, _) => {}
            ('`', false, None) => {
                backquoted = Some(0);
                message.push(c);
            }
            ('`', false, Some(_)) => {
                backquoted = None;
                message.push(c);
            }
            (_, false, Some(n)) => {
                if n < SHOWN {
                    message.push(c);
                } else if n == SHOWN {
                    message.push('…');
                }
                backquoted = Some(n + 1);
            }
            (_, false, None) => message.push(c),
        }
    }
    let Some(start) = e.span().map(|s| s.start.min(text.len())) else {
        return Problem {
            key: String::new(),
            message,
        };
    };
    let before = &text[..start];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;
    let line = text[line_start..].lines().next().unwrap_or_default();
    // A table header names the table: "[a.b]", "[[sinks]] # comment".
    fn header(l: &str) -> Option<&str> {
        let l = l.trim();
        l.starts_with('[').then(|| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
        })
    }
    // The key is what stands left of '='; the table, the last header above
    // (or the line itself, when the error is in a header).
    let (table, key) = match header(line) {
        Some(h) => (h, ""),
        None => (
            text[..line_start]
                .lines()
                .rev()
                .find_map(header)
                .unwrap_or(""),
            line.split_once('=').map(|(k, _)| k.trim()).unwrap_or(""),
        ),
    };
    let key = match (cut(table, SHOWN), cut(key, SHOWN)) {
        (t, k) if t.is_empty() => k.into_owned(),
        (t, k) if k.is_empty() => t.into_owned(),
        (t, k) => format!("{t}.{k}"),
    };
    Problem {
        key,
        message: format!("{message} (line {line_no}, column {column})"),
    }
}

fn validate(raw: RawConfig, path: &Path, env: &dyn Env) -> Result<Config, Vec<Problem>> {
    let mut p = Problems::default();

    let database = match raw.database.clone() {
        Some(d) => {
            p.path("database", &d, MAX_PATH);
            PathBuf::from(d)
        }
        None => match env.var("STATE_DIRECTORY") {
            // systemd may list several directories, separated by ':'.
            Some(dirs) => PathBuf::from(dirs.split(':').next().unwrap_or(&dirs)).join("tokend.db"),
            None => PathBuf::from(DEFAULT_DATABASE),
        },
    };

    let refresh = validate_refresh(&raw.refresh, &mut p);
    let socket = validate_socket(&raw, env, &mut p);

    let mut providers = BTreeMap::new();
    for (name, rp) in raw.providers {
        if let Some(pc) = validate_provider(&name, rp, env, &mut p) {
            providers.insert(name, Arc::new(pc));
        }
    }

    let mut sinks = Vec::new();
    let mut seen_paths = HashSet::new();
    for (i, rs) in raw.sinks.into_iter().enumerate() {
        if let Some(s) = validate_sink(i, rs, &mut p) {
            if !seen_paths.insert(s.path.clone()) {
                p.add(
                    format!("sinks[{i}].path"),
                    "another sink already writes this path",
                );
            }
            sinks.push(Arc::new(s));
        }
    }

    let access = raw
        .access
        .into_iter()
        .enumerate()
        .map(|(i, a)| validate_access(i, a, &mut p))
        .collect();

    p.finish(Config {
        path: path.to_owned(),
        database,
        socket,
        refresh,
        providers,
        sinks,
        access,
    })
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn finish<T>(self, value: T) -> Result<T, Vec<Problem>> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.0)
        }
    }

    /// A duration setting: `default` when absent, at most [`MAX_DURATION`].
    fn duration(&mut self, key: &str, value: &Option<String>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if d <= MAX_DURATION => d,
                Ok(_) => {
                    self.add(key, format!("{} is too long: at most 3650 days", shown(s)));
                    default
                }
                Err(e) => {
                    self.add(
                        key,
                        format!(
                            "{} is not a duration ({}); write e.g. \"30s\", \"15m\", \"1h\"",
                            shown(s),
                            explained(e)
                        ),
                    );
                    default
                }
            },
        }
    }

    /// A path setting: absolute, and no longer than the OS takes.
    fn path(&mut self, key: &str, path: &str, max: usize) {
        if !Path::new(path).is_absolute() {
            self.add(key, "must be an absolute path");
        } else if path.len() > max {
            self.add(key, format!("is {} bytes long: at most {max}", path.len()));
        }
    }
}

fn validate_socket(raw: &RawConfig, env: &dyn Env, p: &mut Problems) -> SocketConfig {
    let path = match &raw.socket {
        Some(s) => {
            p.path("socket", s, MAX_SOCKET_PATH);
            PathBuf::from(s)
        }
        None => match env.var("RUNTIME_DIRECTORY") {
            Some(dirs) => {
                PathBuf::from(dirs.split(':').next().unwrap_or(&dirs)).join("tokend.sock")
            }
            None => PathBuf::from(DEFAULT_SOCKET),
        },
    };
    let mode = match raw.socket_mode.as_deref() {
        None => 0o660,
        Some(s) => match u32::from_str_radix(s, 8) {
            Ok(m) if m <= 0o777 => m,
            _ => {
                p.add(
                    "socket_mode",
                    format!("{} is not an octal mode like \"0660\"", shown(s)),
                );
                0o660
            }
        },
    };
    let group = raw
        .socket_group
        .as_deref()
        .and_then(|g| match resolve_group(g) {
            Ok(gid) => Some((g.to_owned(), gid)),
            Err(e) => {
                p.add("socket_group", e);
                None
            }
        });
    SocketConfig { path, mode, group }
}

fn validate_access(i: usize, a: RawAccess, p: &mut Problems) -> AccessRule {
    let k = |field: &str| format!("access[{i}].{field}");
    let credentials = a.credentials.unwrap_or_else(|| vec!["*".into()]);
    if credentials.is_empty() {
        p.add(k("credentials"), "must name at least one pattern");
    }
    if a.uids.is_empty() && a.groups.is_empty() {
        p.add(
            k("uids"),
            "give uids, groups or both: a rule for nobody grants nothing",
        );
    }
    let gids = a
        .groups
        .iter()
        .filter_map(|g| match resolve_group(g) {
            Ok(gid) => Some(gid),
            Err(e) => {
                p.add(k("groups"), e);
                None
            }
        })
        .collect();
    AccessRule {
        credentials,
        uids: a.uids,
        gids,
    }
}

fn validate_refresh(r: &RawRefresh, p: &mut Problems) -> RefreshConfig {
    let d = RefreshConfig::default();
    let validate_schedule = match &r.validate_schedule {
        None => d.validate_schedule.clone(),
        Some(s) => {
            if let Err(e) = check_cron(s) {
                p.add("refresh.validate_schedule", e);
            }
            s.clone()
        }
    };
    let refresh_before_expiry = p.duration(
        "refresh.refresh_before_expiry",
        &r.refresh_before_expiry,
        d.refresh_before_expiry,
    );
    let max_concurrency = match r.max_concurrency {
        None => d.max_concurrency,
        Some(n) if (1..=4096).contains(&n) => n as usize,
        Some(n) => {
            p.add(
                "refresh.max_concurrency",
                format!("{n} is out of range: give 1 to 4096"),
            );
            d.max_concurrency
        }
    };
    let request_timeout = p.duration(
        "refresh.request_timeout",
        &r.request_timeout,
        d.request_timeout,
    );
    if request_timeout.is_zero() || request_timeout > Duration::from_secs(600) {
        p.add(
            "refresh.request_timeout",
            "must be more than 0s and at most 10m",
        );
    }
    let retry_initial = p.duration("refresh.retry_initial", &r.retry_initial, d.retry_initial);
    if retry_initial < Duration::from_millis(100) {
        p.add("refresh.retry_initial", "must be at least 100ms");
    }
    let retry_max = p.duration("refresh.retry_max", &r.retry_max, d.retry_max);
    if retry_max < retry_initial {
        p.add(
            "refresh.retry_max",
            "must be at least refresh.retry_initial",
        );
    }
    let min_remaining = p.duration("refresh.min_remaining", &r.min_remaining, d.min_remaining);
    let rejected_cooldown = p.duration(
        "refresh.rejected_cooldown",
        &r.rejected_cooldown,
        d.rejected_cooldown,
    );
    RefreshConfig {
        rejected_cooldown,
        validate_schedule,
        refresh_before_expiry,
        max_concurrency,
        request_timeout,
        retry_initial,
        retry_max,
        min_remaining,
    }
}

/// Parses a cron expression the way tokio-cron-scheduler will (seconds first),
/// but keeps croner's explanation of what is wrong.
pub fn check_cron(s: &str) -> Result<(), String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(s)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{} is not a cron expression with seconds first ({}); e.g. \"0 */15 * * * *\"",
                shown(s),
                explained(e)
            )
        })
}

fn check_url(key: &str, s: &str, p: &mut Problems) -> Option<Url> {
    let url = match Url::parse(s) {
        Ok(u) => u,
        Err(e) => {
            p.add(key, format!("{} is not a URL ({e})", shown(s)));
            return None;
        }
    };
    match url.scheme() {
        "https" => Some(url),
        // Plain HTTP would send secrets in clear: only to this machine (tests, the demo).
        "http" if is_loopback(&url) => Some(url),
        _ => {
            p.add(
                key,
                format!(
                    "{} must be https (plain http is allowed only to 127.0.0.1, [::1] or localhost)",
                    shown(s)
                ),
            );
            None
        }
    }
}

/// Whether a URL points at this machine.
pub fn is_loopback(url: &Url) -> bool {
    match url.host_str() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback()),
        None => false,
    }
}

/// Parameters of the authorization URL that `tokend authorize` sets: a
/// second copy from `authorize_params` would leave the provider to pick one.
const AUTHORIZE_OWN_PARAMS: [&str; 7] = [
    "client_id",
    "redirect_uri",
    "scope",
    "response_type",
    "state",
    "code_challenge",
    "code_challenge_method",
];

fn validate_provider(
    name: &str,
    r: RawProvider,
    env: &dyn Env,
    p: &mut Problems,
) -> Option<ProviderConfig> {
    // A name too long to be valid is cut in the keys that name it.
    let name = &*cut(name, SHOWN);
    let k = |field: &str| format!("providers.{name}.{field}");
    let before = p.0.len();
    if let Err(e) = check_name(name) {
        p.add(
            format!("providers.{name}"),
            format!("bad provider name: {e}"),
        );
    }
    let preset = match r.preset.as_deref() {
        None => None,
        Some(s) => {
            let preset = Preset::parse(s);
            if preset.is_none() {
                p.add(
                    k("preset"),
                    format!(
                        "unknown preset {}: known are \"pandadoc\" and \"pandadoc-eu\"",
                        shown(s)
                    ),
                );
            }
            preset
        }
    };
    let client_id = r.client_id.clone().unwrap_or_default();
    if client_id.is_empty() {
        p.add(k("client_id"), "is required");
    }
    let client_secret = load_secret(name, &r, env, p);

    let urls = preset.map(Preset::urls);
    let mut url = |field: &str, given: &Option<String>, preset_value: Option<&str>| match given
        .as_deref()
        .or(preset_value)
    {
        Some(s) => check_url(&k(field), s, p),
        None => {
            p.add(k(field), "is required (or set a preset)");
            None
        }
    };
    let authorize_url = url("authorize_url", &r.authorize_url, urls.map(|u| u.0));
    let token_url = url("token_url", &r.token_url, urls.map(|u| u.1));
    let validate_url = url("validate_url", &r.validate_url, urls.map(|u| u.2));

    let redirect_uri = r.redirect_uri.as_deref().and_then(|s| match Url::parse(s) {
        Ok(u) => Some(u),
        Err(e) => {
            p.add(
                k("redirect_uri"),
                format!("{} is not a URL ({e})", shown(s)),
            );
            None
        }
    });
    let scope = r
        .scope
        .clone()
        .or_else(|| preset.map(|_| "read+write".to_owned()));
    let token_auth = match r.token_auth.as_deref() {
        None | Some("client_secret_post") => TokenAuth::ClientSecretPost,
        Some("client_secret_basic") => TokenAuth::ClientSecretBasic,
        Some(s) => {
            p.add(
                k("token_auth"),
                format!(
                    "{} is not one of \"client_secret_post\", \"client_secret_basic\"",
                    shown(s)
                ),
            );
            TokenAuth::ClientSecretPost
        }
    };
    // PandaDoc's presets send exactly what PandaDoc's OpenAPI description
    // has (accessToken): client_id and client_secret in the form body, and
    // no PKCE parameters, which it does not describe.
    if let Some(preset) = r.preset.as_deref().filter(|_| preset.is_some()) {
        if token_auth == TokenAuth::ClientSecretBasic {
            p.add(
                k("token_auth"),
                format!(
                    "\"client_secret_basic\" cannot be used with preset \"{preset}\": PandaDoc's \
                     OpenAPI description has the token request carry client_id and client_secret \
                     in the form body (\"client_secret_post\", the preset's default); remove the key"
                ),
            );
        }
        if r.pkce == Some(true) {
            p.add(
                k("pkce"),
                format!(
                    "cannot be used with preset \"{preset}\": PandaDoc's OpenAPI description has \
                     no PKCE parameters (code_challenge, code_verifier); remove the key"
                ),
            );
        }
    }
    for key in r.authorize_params.keys() {
        if AUTHORIZE_OWN_PARAMS.contains(&key.as_str()) {
            p.add(
                k(&format!("authorize_params.{}", cut(key, SHOWN))),
                "tokend sets this parameter itself (use the provider's own key for it, if any)",
            );
        }
    }
    if p.0.len() > before {
        return None;
    }
    Some(ProviderConfig {
        name: name.to_owned(),
        preset,
        client_id,
        client_secret: client_secret?,
        redirect_uri,
        scope,
        refresh_scope: r.refresh_scope.unwrap_or(preset.is_some()),
        authorize_url: authorize_url?,
        token_url: token_url?,
        validate_url: validate_url?,
        token_auth,
        pkce: r.pkce.unwrap_or(false),
        authorize_params: r.authorize_params,
    })
}

fn load_secret(name: &str, r: &RawProvider, env: &dyn Env, p: &mut Problems) -> Option<Secret> {
    let k = |field: &str| format!("providers.{name}.{field}");
    let given = [
        r.client_secret_file.is_some(),
        r.client_secret_env.is_some(),
        r.client_secret_credential.is_some(),
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    if given != 1 {
        p.add(
            k("client_secret_file"),
            "give exactly one of client_secret_file, client_secret_env, client_secret_credential",
        );
        return None;
    }
    if !env.read_secrets() {
        return Some(Secret::new(""));
    }
    let (key, text) = if let Some(f) = &r.client_secret_file {
        (k("client_secret_file"), read_secret_file(Path::new(f)))
    } else if let Some(var) = &r.client_secret_env {
        (
            k("client_secret_env"),
            env.var(var).ok_or_else(|| {
                format!(
                    "the environment variable {} is not set or empty",
                    cut(var, SHOWN)
                )
            }),
        )
    } else {
        let cred = r.client_secret_credential.as_deref().unwrap_or_default();
        let text = match env.var("CREDENTIALS_DIRECTORY") {
            None => Err(
                "$CREDENTIALS_DIRECTORY is not set: pass the secret with LoadCredential= in the unit"
                    .to_owned(),
            ),
            Some(_) if check_name(cred).is_err() => {
                Err(format!("{} is not a credential name", shown(cred)))
            }
            Some(dir) => read_secret_file(&Path::new(&dir).join(cred)),
        };
        (k("client_secret_credential"), text)
    };
    match text {
        Ok(s) if !s.trim().is_empty() => Some(Secret::new(s.trim())),
        Ok(_) => {
            p.add(key, "the secret is empty");
            None
        }
        Err(e) => {
            p.add(key, e);
            None
        }
    }
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e}",
            cut(&path.display().to_string(), SHOWN)
        )
    })
}

fn validate_sink(i: usize, r: RawSink, p: &mut Problems) -> Option<SinkConfig> {
    let k = |field: &str| format!("sinks[{i}].{field}");
    let before = p.0.len();
    let credentials = r.credentials.unwrap_or_else(|| vec!["*".into()]);
    if credentials.is_empty() {
        p.add(k("credentials"), "must name at least one pattern");
    }
    let path = r.path.unwrap_or_default();
    if path.is_empty() {
        p.add(k("path"), "is required");
    } else if !Path::new(&path).is_absolute() {
        p.add(
            k("path"),
            format!("{} must be an absolute path", shown(&path)),
        );
    } else if path.len() > MAX_PATH {
        p.add(
            k("path"),
            format!("is {} bytes long: at most {MAX_PATH}", path.len()),
        );
    } else if path.ends_with('/') {
        p.add(
            k("path"),
            format!("{} names a directory, not a file", shown(&path)),
        );
    } else if !path.contains("{name}")
        && (credentials.len() != 1 || credentials[0].contains(['*', '?']))
    {
        p.add(
            k("path"),
            "must contain {name} unless credentials names exactly one credential",
        );
    }
    let format = match r.format.as_deref() {
        None | Some("raw") => Format::Raw,
        Some("header") => Format::Header,
        Some("env") => Format::Env,
        Some("json") => Format::Json,
        Some(s) => {
            p.add(
                k("format"),
                format!(
                    "{} is not one of \"raw\", \"header\", \"env\", \"json\"",
                    shown(s)
                ),
            );
            Format::Raw
        }
    };
    let mode = match r.mode.as_deref() {
        None => 0o600,
        Some(s) => match u32::from_str_radix(s, 8) {
            Ok(m) if m <= 0o777 && m & 0o022 == 0 && m & 0o400 != 0 => m,
            Ok(_) => {
                p.add(
                    k("mode"),
                    format!(
                        "{} must let the owner read and nobody but the owner write, e.g. \"0640\"",
                        shown(s)
                    ),
                );
                0o600
            }
            Err(_) => {
                p.add(
                    k("mode"),
                    format!("{} is not an octal mode like \"0640\"", shown(s)),
                );
                0o600
            }
        },
    };
    let group = r.group.as_deref().and_then(|g| match resolve_group(g) {
        Ok(gid) => Some((g.to_owned(), gid)),
        Err(e) => {
            p.add(k("group"), e);
            None
        }
    });
    if let Some(argv) = &r.on_change {
        match argv.first() {
            None => p.add(k("on_change"), "must name a program"),
            Some(prog) if !Path::new(prog).is_absolute() => p.add(
                k("on_change"),
                format!(
                    "{} must be an absolute path (no shell, no $PATH lookup)",
                    shown(prog)
                ),
            ),
            _ => {}
        }
    }
    let on_change_timeout = p.duration(
        &k("on_change_timeout"),
        &r.on_change_timeout,
        Duration::from_secs(30),
    );
    if p.0.len() > before {
        return None;
    }
    Some(SinkConfig {
        index: i,
        credentials,
        path,
        format,
        mode,
        group,
        on_change: r.on_change,
        on_change_timeout,
    })
}

/// A group name or a numeric gid to a gid; else what is wrong, for a
/// problem's message.
fn resolve_group(g: &str) -> Result<u32, String> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    match users::group_id(g) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => Err(format!("no group {} on this system", shown(g))),
        Err(e) => Err(format!("cannot look up group {}: {e}", shown(g))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, String>);
    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    fn env() -> FakeEnv {
        FakeEnv(HashMap::from([("PD_SECRET", "s3cret".to_owned())]))
    }

    fn parse_ok(text: &str) -> Config {
        parse(text, Path::new("t.toml"), &env()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text, Path::new("t.toml"), &env()) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    const PANDADOC: &str = r#"
        database = "/tmp/x/tokend.db"
        [providers.pandadoc]
        preset = "pandadoc"
        client_id = "cid"
        client_secret_env = "PD_SECRET"
    "#;

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

    /// Issue 10: PandaDoc's OpenAPI description has the token request carry
    /// client_id and client_secret in the form body and knows no PKCE; a
    /// preset that sent anything else would send requests it does not
    /// describe.
    #[test]
    fn pandadoc_presets_refuse_basic_auth_and_pkce() {
        for preset in ["pandadoc", "pandadoc-eu"] {
            let base = PANDADOC.replace("\"pandadoc\"\n", &format!("\"{preset}\"\n"));
            let e = problems(&format!("{base}token_auth = \"client_secret_basic\"\n"));
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(e[0].starts_with("providers.pandadoc.token_auth: "), "{e:?}");
            assert!(
                e[0].contains("client_id and client_secret in the form body"),
                "{e:?}"
            );
            assert!(e[0].contains(preset), "{e:?}");
            let e = problems(&format!("{base}pkce = true\n"));
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(e[0].starts_with("providers.pandadoc.pkce: "), "{e:?}");
            assert!(e[0].contains("PKCE"), "{e:?}");
            let e = problems(&format!(
                "{base}token_auth = \"client_secret_basic\"\npkce = true\n"
            ));
            assert_eq!(e.len(), 2, "both at once: {e:?}");
            // What the presets do anyway may be written out.
            let c = parse_ok(&format!(
                "{base}token_auth = \"client_secret_post\"\npkce = false\n"
            ));
            let p = &c.providers["pandadoc"];
            assert_eq!(p.token_auth, TokenAuth::ClientSecretPost);
            assert!(!p.pkce);
        }
        // A provider without a preset takes both.
        let c = parse_ok(
            r#"
            [providers.other]
            client_id = "c"
            client_secret_env = "PD_SECRET"
            authorize_url = "https://id.example.com/authorize"
            token_url = "https://id.example.com/token"
            validate_url = "https://api.example.com/me"
            token_auth = "client_secret_basic"
            pkce = true
            "#,
        );
        assert_eq!(
            c.providers["other"].token_auth,
            TokenAuth::ClientSecretBasic
        );
        assert!(c.providers["other"].pkce);
    }

    #[test]
    fn database_defaults_to_state_directory() {
        let e = FakeEnv(HashMap::from([(
            "STATE_DIRECTORY",
            "/var/lib/tokend:/other".to_owned(),
        )]));
        let c = parse("", Path::new("t.toml"), &e).unwrap();
        assert_eq!(c.database, PathBuf::from("/var/lib/tokend/tokend.db"));
        let c = parse("", Path::new("t.toml"), &FakeEnv(HashMap::new())).unwrap();
        assert_eq!(c.database, PathBuf::from(DEFAULT_DATABASE));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = problems("[refresh]\nretry_maxx = \"1m\"\n");
        assert!(
            e[0].starts_with("refresh.retry_maxx: unknown field"),
            "{e:?}"
        );
        assert!(e[0].contains("line 2"), "{e:?}");
    }

    #[test]
    fn parse_errors_never_echo_values() {
        let e = problems("[providers.x]\nclient_secret = \"hunter2-secret\"\n");
        assert!(e[0].starts_with("providers.x.client_secret: "), "{e:?}");
        assert!(!e[0].contains("hunter2"), "{e:?}");
        let e = problems("[refresh]\nmax_concurrency = \"hunter2-secret\"\n");
        assert!(
            e[0].starts_with("refresh.max_concurrency: invalid type"),
            "{e:?}"
        );
        assert!(!e[0].contains("hunter2"), "{e:?}");
    }

    #[test]
    fn every_bad_value_is_reported_with_its_key() {
        let e = problems(
            r#"
            [refresh]
            retry_max = "15x"
            max_concurrency = 0
            validate_schedule = "every minute"
            [providers.generic]
            client_id = ""
            client_secret_file = "/nonexistent/secret"
            token_url = "http://example.com/token"
            [[sinks]]
            path = "relative/{name}"
            format = "yaml"
            mode = "0666"
            "#,
        );
        let joined = e.join("\n");
        for key in [
            "refresh.retry_max:",
            "refresh.max_concurrency:",
            "refresh.validate_schedule:",
            "providers.generic.client_id:",
            "providers.generic.client_secret_file: cannot read /nonexistent/secret",
            "providers.generic.token_url: \"http://example.com/token\" must be https",
            "providers.generic.authorize_url: is required",
            "sinks[0].path:",
            "sinks[0].format:",
            "sinks[0].mode:",
        ] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
    }

    #[test]
    fn generic_provider_over_loopback_http() {
        let c = parse_ok(
            r#"
            [providers.fake]
            client_id = "c"
            client_secret_env = "PD_SECRET"
            authorize_url = "http://127.0.0.1:9/authorize"
            token_url = "http://127.0.0.1:9/token"
            validate_url = "http://localhost:9/me"
            token_auth = "client_secret_basic"
            "#,
        );
        let p = &c.providers["fake"];
        assert_eq!(p.token_auth, TokenAuth::ClientSecretBasic);
        assert_eq!(p.scope, None);
        assert!(!p.refresh_scope, "RFC 6749 §6: omitted unless asked for");
    }

    #[test]
    fn authorize_params_cannot_override_what_tokend_sets() {
        let e = problems(&format!(
            "{PANDADOC}authorize_params = {{ prompt = \"consent\", state = \"x\" }}\n"
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("providers.pandadoc.authorize_params.state: tokend sets"),
            "{e:?}"
        );
    }

    #[test]
    fn secret_from_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pd"), "from-cred\n").unwrap();
        let e = FakeEnv(HashMap::from([(
            "CREDENTIALS_DIRECTORY",
            dir.path().display().to_string(),
        )]));
        let text = PANDADOC.replace(
            "client_secret_env = \"PD_SECRET\"",
            "client_secret_credential = \"pd\"",
        );
        let c = parse(&text, Path::new("t.toml"), &e).unwrap();
        assert_eq!(c.providers["pandadoc"].client_secret.expose(), "from-cred");
        let e = problems(&text.replace("\"pd\"", "\"missing\""));
        assert!(e[0].contains("CREDENTIALS_DIRECTORY"), "{e:?}");
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
    fn a_single_file_sink_must_name_one_credential() {
        let e = problems("[[sinks]]\npath = \"/run/t/token\"\n");
        assert!(e[0].contains("must contain {name}"), "{e:?}");
        let c = parse_ok("[[sinks]]\ncredentials = [\"bot\"]\npath = \"/run/t/token\"\n");
        assert!(c.sinks[0].matches("bot"));
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

    #[test]
    fn errors_in_table_headers_name_the_table() {
        let e = problems("[refresh]\n[refresh]\n");
        assert!(e[0].starts_with("refresh: "), "{e:?}");
        let e = problems("[[sinks]] # x\npath = \"/a/{name}\"\nmode = 1\n");
        assert!(e[0].starts_with("sinks.mode: invalid type"), "{e:?}");
    }

    #[test]
    fn groups_by_name_or_gid() {
        assert_eq!(resolve_group("root"), Ok(0));
        assert_eq!(resolve_group("4242"), Ok(4242));
        assert_eq!(
            resolve_group("no-such-group-tokend"),
            Err("no group \"no-such-group-tokend\" on this system".into())
        );
    }
}
