//! The file as serde reads it: every key optional, unknown keys and wrong
//! types refused, nothing else checked. These structs stay apart from the
//! model so the model never holds an unchecked value: validate.rs makes a
//! `Config` of a `RawConfig`.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) database: Option<String>,
    pub(super) database_file: Option<String>,
    pub(super) database_credential: Option<String>,
    pub(super) socket: Option<String>,
    pub(super) socket_mode: Option<String>,
    pub(super) socket_group: Option<String>,
    pub(super) encryption_key_file: Option<String>,
    pub(super) encryption_key_credential: Option<String>,
    #[serde(default)]
    pub(super) access: Vec<RawAccess>,
    #[serde(default)]
    pub(super) refresh: RawRefresh,
    #[serde(default)]
    pub(super) providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub(super) sinks: Vec<RawSink>,
    #[serde(default)]
    pub(super) notify: Vec<RawNotify>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRefresh {
    pub(super) validate_schedule: Option<String>,
    pub(super) refresh_before_expiry: Option<String>,
    pub(super) max_concurrency: Option<i64>,
    pub(super) request_timeout: Option<String>,
    pub(super) retry_initial: Option<String>,
    pub(super) retry_max: Option<String>,
    pub(super) min_remaining: Option<String>,
    pub(super) rejected_cooldown: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    pub(super) credentials: Option<Vec<String>>,
    #[serde(default)]
    pub(super) uids: Vec<u32>,
    #[serde(default)]
    pub(super) groups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) preset: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret_file: Option<String>,
    pub(super) client_secret_env: Option<String>,
    pub(super) client_secret_credential: Option<String>,
    pub(super) redirect_uri: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) refresh_scope: Option<bool>,
    pub(super) authorize_url: Option<String>,
    pub(super) token_url: Option<String>,
    pub(super) validate_url: Option<String>,
    pub(super) revocation_url: Option<String>,
    pub(super) device_authorization_url: Option<String>,
    pub(super) token_auth: Option<String>,
    pub(super) pkce: Option<bool>,
    #[serde(default)]
    pub(super) authorize_params: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    pub(super) credentials: Option<Vec<String>>,
    pub(super) path: Option<String>,
    pub(super) format: Option<String>,
    pub(super) mode: Option<String>,
    pub(super) group: Option<String>,
    pub(super) on_change: Option<Vec<String>>,
    pub(super) on_change_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNotify {
    pub(super) credentials: Option<Vec<String>>,
    pub(super) events: Option<Vec<String>>,
    pub(super) command: Option<Vec<String>>,
    pub(super) timeout: Option<String>,
    pub(super) interval: Option<String>,
    pub(super) after: Option<i64>,
}

/// What `socket_path` reads: the one key, every other ignored.
#[derive(Deserialize)]
pub(super) struct OnlySocket {
    pub(super) socket: Option<String>,
}
