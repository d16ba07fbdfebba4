//! Validation: makes a [`Config`] of the raw file, checking every value
//! (durations, modes, paths, groups, the cron schedule; a provider's keys
//! in [`provider`]) and collecting *all* problems, each tied to its key, so
//! `check-config` can list them at once and the daemon never starts
//! half-configured.

mod database;
mod provider;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::errors::{explained, shown};
use super::raw::{RawAccess, RawConfig, RawNotify, RawRefresh, RawSink};
use super::{
    AccessRule, AlertEvent, Config, DEFAULT_DATABASE, DEFAULT_SOCKET, Env, Format, NotifyRule,
    Problem, RefreshConfig, SinkConfig, SocketConfig, systemd_path,
};
use crate::users;
use database::validate_database;
use provider::validate_provider;

pub use provider::is_loopback;

/// The longest duration any setting takes: ten years is past every token's
/// lifetime, and far from where instants in milliseconds overflow.
const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);
/// The longest path accepted (Linux's PATH_MAX, less the terminating NUL).
const MAX_PATH: usize = 4095;
/// The longest socket path: `sockaddr_un.sun_path` holds 108 bytes with the NUL.
const MAX_SOCKET_PATH: usize = 107;
pub(super) fn validate(raw: RawConfig, path: &Path, env: &dyn Env) -> Result<Config, Vec<Problem>> {
    let mut p = Problems::default();

    let database = validate_database(&raw, env, &mut p);
    let secret_files = secret_files(&raw);

    let sealing = super::secrets::load_encryption_key(&raw, env)
        .map_err(|(key, why)| p.add(key, why))
        .ok()
        .flatten();
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

    let notify = raw
        .notify
        .into_iter()
        .enumerate()
        .filter_map(|(i, n)| validate_notify(i, n, &mut p).map(Arc::new))
        .collect();

    p.finish(Config {
        path: path.to_owned(),
        database,
        socket,
        refresh,
        providers,
        sinks,
        access,
        notify,
        sealing,
        secret_files,
    })
}

/// [`Config::secret_files`], as given (relative paths as the process
/// resolves them).
fn secret_files(raw: &RawConfig) -> Vec<(String, PathBuf)> {
    let mut files: Vec<(String, PathBuf)> = [
        ("database_file", &raw.database_file),
        ("encryption_key_file", &raw.encryption_key_file),
    ]
    .into_iter()
    .filter_map(|(key, f)| Some((key.to_owned(), PathBuf::from(f.as_ref()?))))
    .collect();
    for (name, rp) in &raw.providers {
        if let Some(f) = &rp.client_secret_file {
            files.push((
                format!("providers.{name}.client_secret_file"),
                PathBuf::from(f),
            ));
        }
    }
    files
}

#[derive(Default)]
pub(super) struct Problems(Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
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

    /// A path setting: absolute, and no longer than the OS takes; whether
    /// it is. `quoted`: whether the message repeats a relative path.
    fn path(&mut self, key: &str, path: &str, max: usize, quoted: bool) -> bool {
        if !Path::new(path).is_absolute() {
            let message = match quoted {
                true => format!("{} must be an absolute path", shown(path)),
                false => "must be an absolute path".into(),
            };
            self.add(key, message);
        } else if path.len() > max {
            self.add(key, format!("is {} bytes long: at most {max}", path.len()));
        } else {
            return true;
        }
        false
    }

    /// An octal mode setting: `default` when absent. `refused` says why a
    /// mode is wrong here, if it is; past that, a mode must fit in the nine
    /// permission bits. `example` is a mode that would do.
    fn mode(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: u32,
        example: &str,
        refused: impl Fn(u32) -> Option<&'static str>,
    ) -> u32 {
        let Some(s) = value else {
            return default;
        };
        let message = match u32::from_str_radix(s, 8).map(|m| (m, refused(m))) {
            Ok((m, None)) if m <= 0o777 => return m,
            Ok((_, Some(why))) => format!("{} {why}", shown(s)),
            _ => format!("{} is not an octal mode like \"{example}\"", shown(s)),
        };
        self.add(key, message);
        default
    }

    /// A command setting (`on_change`, `notify[].command`): an argv run
    /// without a shell, so its program must be an absolute path (no $PATH
    /// lookup) to a file that we may execute, or the first run would be the
    /// first to find out.
    fn command(&mut self, key: &str, argv: &[String]) {
        let Some(prog) = argv.first() else {
            return self.add(key, "must name a program");
        };
        if !Path::new(prog).is_absolute() {
            return self.add(
                key,
                format!(
                    "{} must be an absolute path (no shell, no $PATH lookup)",
                    shown(prog)
                ),
            );
        }
        let why = match std::fs::metadata(prog) {
            Err(e) => format!("cannot be run: {e}"),
            Ok(m) if !m.is_file() => "is not a file".to_owned(),
            Ok(_) => match executable(Path::new(prog)) {
                Ok(()) => return,
                Err(e) => format!("is not executable: {e}"),
            },
        };
        self.add(key, format!("{} {why}", shown(prog)));
    }

    /// A group setting, a name or a gid: the gid, or None and a problem.
    fn group(&mut self, key: &str, group: &str) -> Option<u32> {
        resolve_group(group).map_err(|e| self.add(key, e)).ok()
    }
}

fn validate_socket(raw: &RawConfig, env: &dyn Env, p: &mut Problems) -> SocketConfig {
    let path = match &raw.socket {
        Some(s) => {
            p.path("socket", s, MAX_SOCKET_PATH, false);
            PathBuf::from(s)
        }
        None => systemd_path(env, "RUNTIME_DIRECTORY", "tokend.sock", DEFAULT_SOCKET),
    };
    // Connecting takes write permission: a mode that shuts out the
    // socket's owner (tokend's own commands, as its user) is a mistake.
    let mode = p.mode(
        "socket_mode",
        raw.socket_mode.as_deref(),
        0o660,
        "0660",
        |m| (m & 0o600 != 0o600).then_some("must let the owner read and write, e.g. \"0660\""),
    );
    let group = raw
        .socket_group
        .as_deref()
        .and_then(|g| Some((g.to_owned(), p.group("socket_group", g)?)));
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
        .filter_map(|g| p.group(&k("groups"), g))
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
    } else if p.path(&k("path"), &path, MAX_PATH, true) {
        if path.ends_with('/') {
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
    let mode = p.mode(&k("mode"), r.mode.as_deref(), 0o600, "0640", |m| {
        (m > 0o777 || m & 0o022 != 0 || m & 0o400 == 0)
            .then_some("must let the owner read and nobody but the owner write, e.g. \"0640\"")
    });
    let group = r
        .group
        .as_deref()
        .and_then(|g| Some((g.to_owned(), p.group(&k("group"), g)?)));
    if let Some(argv) = &r.on_change {
        p.command(&k("on_change"), argv);
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

fn validate_notify(i: usize, r: RawNotify, p: &mut Problems) -> Option<NotifyRule> {
    let k = |field: &str| format!("notify[{i}].{field}");
    let before = p.0.len();
    let credentials = r.credentials.unwrap_or_else(|| vec!["*".into()]);
    if credentials.is_empty() {
        p.add(k("credentials"), "must name at least one pattern");
    }
    let mut events = Vec::new();
    match &r.events {
        None => p.add(
            k("events"),
            "is required: give one or more of \"needs_reauthorization\", \"misconfigured\", \"retrying\", \"recovered\"",
        ),
        Some(list) if list.is_empty() => p.add(k("events"), "must name at least one event"),
        Some(list) => {
            for e in list {
                match AlertEvent::ALL.into_iter().find(|a| a.as_str() == e) {
                    Some(a) if !events.contains(&a) => events.push(a),
                    Some(_) => {}
                    None => p.add(
                        k("events"),
                        format!(
                            "{} is not one of \"needs_reauthorization\", \"misconfigured\", \"retrying\", \"recovered\"",
                            shown(e)
                        ),
                    ),
                }
            }
        }
    }
    match &r.command {
        None => p.add(k("command"), "is required: the argv to run"),
        Some(argv) => p.command(&k("command"), argv),
    }
    let timeout = p.duration(&k("timeout"), &r.timeout, Duration::from_secs(30));
    if timeout.is_zero() {
        p.add(k("timeout"), "must be more than 0s");
    }
    let interval = p.duration(&k("interval"), &r.interval, Duration::from_secs(3600));
    let after = match r.after {
        None => 3,
        Some(n) if (1..=1000).contains(&n) => n as u32,
        Some(n) => {
            p.add(k("after"), format!("{n} is out of range: give 1 to 1000"));
            3
        }
    };
    if r.after.is_some() && !events.contains(&AlertEvent::Retrying) {
        p.add(
            k("after"),
            "applies to the \"retrying\" event only: add it to events, or remove after",
        );
    }
    if p.0.len() > before {
        return None;
    }
    Some(NotifyRule {
        index: i,
        credentials,
        events,
        command: r.command.unwrap_or_default(),
        timeout,
        interval,
        after,
    })
}

/// Whether we may execute `path` (by mode bits and ACLs, as the kernel decides).
fn executable(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
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
    use crate::config::testing::{parse_ok, problems};

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

    /// Issue 12: a URL selects PostgreSQL; its form is checked, and the
    /// problem never repeats it (it may hold a password).
    #[test]
    fn a_postgresql_url_selects_the_shared_store() {
        let c = parse_ok("database = \"postgresql://app:pw@db.internal:5433/tokend\"\n");
        assert_eq!(
            c.database.display().to_string(),
            "postgresql://app@db.internal:5433/tokend"
        );
        let c = parse_ok("database = \"postgres://app@/tokend?host=/run/postgresql\"\n");
        assert!(c.database.file().is_none());
        for (text, message) in [
            (
                "database = \"postgresql://app:pw@h/db?sslmode=require\"\n",
                "database: sslmode=require: this tokend connects without TLS",
            ),
            (
                "database = \"postgresql://app:pw@h/db?frobnicate=1\"\n",
                "database: is not a PostgreSQL connection URL",
            ),
            (
                "database = \"postgresql:///db\"\n",
                "database: names no host",
            ),
        ] {
            let found = problems(text);
            assert!(
                found.len() == 1 && found[0].starts_with(message),
                "{found:?}"
            );
            assert!(!found[0].contains("pw@"), "{found:?}");
        }
    }

    #[test]
    fn a_single_file_sink_must_name_one_credential() {
        let e = problems("[[sinks]]\npath = \"/run/t/token\"\n");
        assert!(e[0].contains("must contain {name}"), "{e:?}");
        let c = parse_ok("[[sinks]]\ncredentials = [\"bot\"]\npath = \"/run/t/token\"\n");
        assert!(c.sinks[0].matches("bot"));
    }

    /// Socket and sinks share the mode, group and path checks; each keeps
    /// its own default, example and wording.
    #[test]
    fn modes_groups_and_paths_name_what_is_wrong() {
        for (text, message) in [
            (
                "socket_mode = \"66x\"\n",
                "socket_mode: \"66x\" is not an octal mode like \"0660\"",
            ),
            (
                "socket_mode = \"1777\"\n",
                "socket_mode: \"1777\" is not an octal mode like \"0660\"",
            ),
            (
                "socket_mode = \"0066\"\n",
                "socket_mode: \"0066\" must let the owner read and write, e.g. \"0660\"",
            ),
            (
                "socket_group = \"no-such-group-tokend\"\n",
                "socket_group: no group \"no-such-group-tokend\" on this system",
            ),
            ("socket = \"t.sock\"\n", "socket: must be an absolute path"),
            (
                "database = \"t.db\"\n",
                "database: must be an absolute path",
            ),
            (
                "[[access]]\nuids = [1]\ngroups = [\"0\", \"no-such-group-tokend\"]\n",
                "access[0].groups: no group \"no-such-group-tokend\" on this system",
            ),
        ] {
            assert_eq!(problems(text), [message]);
        }
        let sink =
            |line: &str| problems(&format!("[[sinks]]\npath = \"/run/t/{{name}}\"\n{line}\n"));
        let owner = "must let the owner read and nobody but the owner write, e.g. \"0640\"";
        for mode in ["0666", "0240", "1640"] {
            assert_eq!(
                sink(&format!("mode = \"{mode}\"")),
                [format!("sinks[0].mode: \"{mode}\" {owner}")]
            );
        }
        assert_eq!(
            sink("mode = \"rw\""),
            ["sinks[0].mode: \"rw\" is not an octal mode like \"0640\""]
        );
        assert_eq!(
            sink("group = \"no-such-group-tokend\""),
            ["sinks[0].group: no group \"no-such-group-tokend\" on this system"]
        );
        assert_eq!(
            problems("[[sinks]]\npath = \"t/{name}\"\n"),
            ["sinks[0].path: \"t/{name}\" must be an absolute path"]
        );
        assert_eq!(
            problems("[[sinks]]\npath = \"/run/t/\"\n"),
            ["sinks[0].path: \"/run/t/\" names a directory, not a file"]
        );
        let c =
            parse_ok("socket_group = \"0\"\n[[sinks]]\npath = \"/t/{name}\"\nmode = \"0440\"\n");
        assert_eq!(
            (c.socket.mode, c.socket.group),
            (0o660, Some(("0".into(), 0)))
        );
        assert_eq!((c.sinks[0].mode, c.sinks[0].group.clone()), (0o440, None));
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
