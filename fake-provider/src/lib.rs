//! A stateful fake OAuth 2.0 provider that behaves like PandaDoc's, so that
//! tokend's integration tests, benchmarks and demo can run against something
//! faithful to PandaDoc's OpenAPI description (v8.8.0; the parts tokend
//! uses are in `tests/data/pandadoc-openapi-excerpt.json`) without the network.
//!
//! It serves, over HTTP/1.1 with keep-alive:
//!
//! * `GET /oauth2/authorize`: issues single-use codes (optionally PKCE-bound) by
//!   redirecting to the client's `redirect_uri`, as if the user had consented;
//! * `POST /oauth2/access_token` (operation `accessToken`): code exchange and
//!   refresh, with refresh-token rotation and reuse detection;
//! * `GET /public/v1/members/current` (operation `detailsCurrentMember`): the
//!   cheap call tokend validates access tokens with;
//! * beyond PandaDoc, the other grants of a standard server: the
//!   client_credentials grant (RFC 6749 §4.4) at the token endpoint, for the
//!   clients in [`Knobs::client_credentials_clients`]; the device
//!   authorization grant (RFC 8628): `POST /oauth2/device_authorization`
//!   and `grant_type=urn:ietf:params:oauth:grant-type:device_code` at the
//!   token endpoint, with `authorization_pending`, `slow_down`,
//!   `access_denied` and `expired_token`; and revocation (RFC 7009),
//!   `POST /oauth2/revoke`: a revoked refresh token kills its grant;
//! * JSON control routes for the standalone binary, never faulted, delayed or
//!   recorded: `GET /_admin/stats` ([`Stats`]), `DELETE /_admin/stats` (what
//!   [`FakeProvider::reset_stats`] does), `GET /_admin/requests`
//!   ([`RequestRecord`]s), `GET|PUT /_admin/knobs` ([`Knobs`]),
//!   `POST /_admin/grants` (`{"client_id":..,"scope":..}`, both optional, to
//!   a [`MintedGrant`]), `GET /_admin/grants/{id}` ([`GrantInfo`]), and
//!   `POST /_admin/device/approve` or `/_admin/device/deny`
//!   (`{"user_code":..}`), the user's decision on a device authorization,
//!   and `GET /_admin/device`, the user codes still pending.
//!
//! Anything else is 404; bodies over 64 KiB get 413. Latency, answer delay and
//! faults apply to the token and validate endpoints only (the device
//! authorization and revocation endpoints count as token endpoints).
//!
//! Tests drive it as a library: [`FakeProvider::start`] runs it on its own
//! runtime thread, [`Knobs`] change its behaviour at any moment (token
//! lifetime, latency, answer delay, scope strictness, injected [`Fault`]s),
//! and [`Stats`] and [`RequestRecord`]s say exactly what the client sent, so
//! that a test can assert "exactly one refresh" or "no refresh token was ever
//! reused".
//!
//! # Lost answers
//!
//! `latency_ms` delays a request before it is processed; `answer_delay_ms`
//! delays its answer after. During the second wait the provider has already
//! acted (rotated the refresh token, revoked a grant for reuse, used up a code)
//! and recorded the request in [`Stats`] and [`RequestRecord`]s, so a test can
//! watch "the provider rotated" happen before the client hears of it, and a
//! client that times out meanwhile holds a refresh token the provider has
//! rotated out. Fault answers are held back too; `drop` and `hang` are not.
//!
//! # Scope
//!
//! By default scope is handled as PandaDoc does: a grant's `scope` is what the
//! authorization request named (or `read+write`), token answers repeat it, and
//! a refresh's `scope` is accepted and ignored. With `oidc_scopes`, the
//! provider is a strict standard OpenID provider: scopes are space-separated
//! lists of names once form-decoded (so `read+write` sent as `read%2Bwrite`
//! is one name, and sent as `read+write` is two); the refresh token is granted
//! the authorized scope minus `offline_access`; a refresh whose `scope` names
//! anything else is answered 400 `invalid_scope` and rotates nothing
//! ([`Stats::scope_refused`]), one without `scope` gets the whole granted
//! scope, and one naming a part of it gets an access token of that part. [`GrantInfo::scope`] is the scope granted now,
//! and [`RequestRecord::scope_raw`] the `scope` parameter exactly as the
//! client encoded it.
//!
//! # JSON shapes
//!
//! [`Knobs`] serialize field by field; missing fields take their defaults, so
//! `PUT /_admin/knobs` with `{"latency_ms":200}` changes only the latency (from
//! the defaults, not from the current knobs). A [`Fault`] is internally tagged
//! by `kind`, in snake_case:
//!
//! ```json
//! {"token_lifetime_secs":31535999,"latency_ms":0,"answer_delay_ms":1500,
//!  "rotate_refresh_tokens":true,"strict_reuse":true,"error_rate_5xx":0.0,
//!  "fault":{"kind":"too_many_requests","retry_after_secs":5},
//!  "fault_on":"token","fault_count":2,"deny_authorization":false,"code_lifetime_secs":600,
//!  "oidc_scopes":true}
//! ```
//!
//! `kind` is one of `status500`, `status503`, `too_many_requests`, `garbage`,
//! `truncated`, `oversized`, `drop`, `hang`, `invalid_client`, `invalid_grant`,
//! `oauth_error` (with `status` and `error`), `token_type` (with
//! `token_type`: processed as usual, answered with that type); `fault_on`
//! one of `token`, `validate`, `both`.
//!
//! A [`RequestRecord`] of `GET /_admin/requests`, for a refresh whose form
//! body had `scope=openid%20offline_access` and was refused under `oidc_scopes`:
//!
//! ```json
//! {"at_ms":1042,"endpoint":"token","grant_type":"refresh_token",
//!  "form_fields":["grant_type","client_id","client_secret","refresh_token","scope"],
//!  "content_type":"application/x-www-form-urlencoded","client_auth":"client_secret_post",
//!  "status":400,"fault":false,"scope_raw":"openid%20offline_access"}
//! ```
//!
//! [`GrantInfo`] (`GET /_admin/grants/{id}`) says which scope is granted, as
//! in `"scope":"openid profile"`, and [`Stats`] (`GET /_admin/stats`) how many
//! refreshes were refused for scope, as in `"scope_refused":1`. Like the
//! knobs, these three fields take their defaults when missing, so JSON written
//! before they existed still reads.
//!
//! # Example
//!
//! ```
//! use tokend_fake_provider::{FakeProvider, Knobs};
//!
//! let provider = FakeProvider::start(Knobs::default()).unwrap();
//! let grant = provider.mint_grant(provider.client_id(), "read+write");
//! assert!(provider.access_token_valid(&grant.access_token));
//! assert!(grant.refresh_token.starts_with("frt_"));
//! ```

mod encoding;
mod http;
mod oauth;
mod state;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::state::Shared;

/// The client every provider registers at start, so tests need no set-up.
pub const DEFAULT_CLIENT_ID: &str = "tokend-test-client";

/// What the provider does, changeable at any time while it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Knobs {
    /// `expires_in` of issued access tokens; PandaDoc's is one year minus a second.
    /// Short lifetimes let tests watch tokens expire.
    pub token_lifetime_secs: u64,
    /// Delay before processing token and validate requests, to model a slow
    /// provider: a client that gives up meanwhile has changed nothing.
    pub latency_ms: u64,
    /// Delay between processing a token or validate request and sending its
    /// answer, on top of `latency_ms`. The request's effects (a refresh token
    /// rotated, a grant revoked for reuse, a code used up) and its record and
    /// counters are in place before the wait, so a client that gives up during
    /// it has lost an answer whose effects already happened: the strictest
    /// behaviour of a real server, which tokend must survive. Fault answers
    /// wait too; `Drop` and `Hang` do not. The value in force when the request
    /// is processed applies.
    pub answer_delay_ms: u64,
    /// Every refresh returns a new refresh token and the old one dies (on), or
    /// the same refresh token stays valid forever (off).
    pub rotate_refresh_tokens: bool,
    /// Presenting a rotated-out refresh token, or reusing a code, revokes the
    /// whole grant, as strict providers do (RFC 6749 §4.1.2, RFC 9700 §4.14).
    pub strict_reuse: bool,
    /// Probability (0..1) that a token or validate request gets a 503.
    pub error_rate_5xx: f64,
    /// A failure injected on every request to `fault_on` while set.
    pub fault: Option<Fault>,
    /// Which endpoints `fault` hits.
    pub fault_on: FaultTarget,
    /// `None`: the fault stays until cleared; `Some(n)`: it hits the next `n`
    /// matching requests, then clears itself (`fault` and `fault_count` become `None`).
    pub fault_count: Option<u64>,
    /// The authorize endpoint redirects with `error=access_denied`, as when a
    /// user clicks "Deny".
    pub deny_authorization: bool,
    /// How long an authorization code can be exchanged.
    pub code_lifetime_secs: u64,
    /// Scope as a strict standard OpenID provider treats it, rather than as
    /// PandaDoc does (accepted and ignored on refresh). On: scopes are lists
    /// of names separated by spaces once decoded (RFC 6749 §3.3); a grant's
    /// refresh token is granted the authorized scope minus `offline_access`,
    /// which token answers report as `scope`; a refresh may name a `scope`,
    /// which must list only granted names, or it is answered 400
    /// `{"error":"invalid_scope","error_description":"refresh token missing requested scope"}`
    /// and nothing rotates (the refresh token stays valid). A refresh without
    /// `scope` gets the whole granted scope (RFC 6749 §6); one naming a subset
    /// gets an access token of that subset, while the refresh token keeps the
    /// whole. Read when a request is processed, so it also applies to grants
    /// made before it was turned on.
    pub oidc_scopes: bool,
    /// The clients that may use the client_credentials grant (RFC 6749
    /// §4.4); any other is answered 400 `unauthorized_client`. By default
    /// the client every provider registers at start.
    pub client_credentials_clients: Vec<String>,
    /// The `interval` a device authorization answer gives (RFC 8628 §3.2):
    /// a device code polled sooner after its previous poll is answered
    /// `slow_down`, and its interval grows by 5 s (§3.5).
    pub device_interval_secs: u64,
    /// The `expires_in` of device codes: polled later, `expired_token`.
    pub device_code_lifetime_secs: u64,
    /// The next this many device-code polls are answered `slow_down` (and
    /// grow the code's interval by 5 s) however they are spaced: how a
    /// test sees a client obey it.
    pub device_slow_down: u64,
    /// The revocation endpoint answers 400 `unsupported_token_type` (RFC
    /// 7009 §2.2.1), as a server that revokes no such tokens does.
    pub revocation_unsupported: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            token_lifetime_secs: 31_535_999,
            latency_ms: 0,
            rotate_refresh_tokens: true,
            strict_reuse: true,
            error_rate_5xx: 0.0,
            fault: None,
            fault_on: FaultTarget::Both,
            fault_count: None,
            deny_authorization: false,
            code_lifetime_secs: 600,
            answer_delay_ms: 0,
            oidc_scopes: false,
            client_credentials_clients: vec![DEFAULT_CLIENT_ID.to_owned()],
            device_interval_secs: 5,
            device_code_lifetime_secs: 600,
            device_slow_down: 0,
            revocation_unsupported: false,
        }
    }
}

/// A failure the provider can be told to produce, one per way a real provider
/// (or the network in front of it) lets a client down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 500 with an HTML body.
    Status500,
    /// 503 with an HTML body.
    Status503,
    /// 429 `{"type":"throttled","detail":"Request was throttled."}`, with a
    /// `Retry-After` header only when `retry_after_secs` is set (PandaDoc does
    /// not promise one).
    TooManyRequests {
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    /// 200 `text/html` with a body that is not JSON (a captive portal, a proxy page).
    Garbage,
    /// 200 `application/json` whose JSON body is cut off.
    Truncated,
    /// 200 `application/json` of 80 KiB (a token response padded out):
    /// more than a client should read, yet a success.
    Oversized,
    /// The connection is closed without an answer.
    Drop,
    /// No answer ever; the connection stays open until the client gives up.
    Hang,
    /// 401 `{"error":"invalid_client"}`: the client's credentials were revoked.
    InvalidClient,
    /// 400 `{"error":"invalid_grant"}`: the grant died on the provider's side.
    InvalidGrant,
    /// `status` with `{"error": error}`: any other error code, such as RFC
    /// 6749 §5.2's `temporarily_unavailable` or a provider's own.
    OauthError { status: u16, error: String },
    /// The request is processed as usual (a refresh rotates the refresh
    /// token), but the success answer says this `token_type` instead of
    /// Bearer: the rotated refresh token is in an answer a client may be
    /// tempted to throw away.
    TokenType { token_type: String },
}

/// The endpoints a [`Fault`] applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultTarget {
    /// `POST /oauth2/access_token` only.
    Token,
    /// `GET /public/v1/members/current` only.
    Validate,
    /// Both.
    #[default]
    Both,
}

/// Counters of what the provider saw, so tests can assert on the client's behaviour.
/// Requests answered by an injected fault are counted as received too.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests to the token endpoint.
    pub token_requests: u64,
    /// Token requests with `grant_type=refresh_token`.
    pub refresh_requests: u64,
    /// Refreshes answered 200.
    pub refreshes_ok: u64,
    /// Token requests with `grant_type=authorization_code`.
    pub code_exchanges: u64,
    /// Code exchanges answered 200.
    pub code_exchanges_ok: u64,
    /// Requests to `members/current`.
    pub validations: u64,
    /// Validations answered 200.
    pub validations_ok: u64,
    /// Rotated-out refresh tokens and already-used codes presented.
    pub reuse_detected: u64,
    /// Grants revoked because of reuse, or by an RFC 7009 revocation of
    /// their refresh token.
    pub grants_revoked: u64,
    /// Requests answered by an injected fault (including `error_rate_5xx`).
    pub faults_injected: u64,
    /// Token requests that violate the OpenAPI description: wrong method or
    /// content type, malformed or repeated parameters, missing required fields,
    /// an Authorization header alongside (or instead of) form credentials, an
    /// unknown grant_type, an oversized body.
    pub bad_requests: u64,
    /// Refreshes answered `invalid_scope` (only with the `oidc_scopes` knob).
    #[serde(default)]
    pub scope_refused: u64,
    /// client_credentials grants answered 200.
    #[serde(default)]
    pub client_credentials_ok: u64,
    /// Device codes issued (RFC 8628 §3.2).
    #[serde(default)]
    pub device_codes_issued: u64,
    /// Polls with a device code (RFC 8628 §3.4), whatever their answer.
    #[serde(default)]
    pub device_polls: u64,
    /// Tokens revoked at the revocation endpoint (RFC 7009), known ones only.
    #[serde(default)]
    pub revocations: u64,
}

/// One request as the provider saw it, without any secret value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Milliseconds since the provider started, at arrival.
    pub at_ms: u64,
    /// `token`, `validate`, `authorize` or `other` (admin routes are not recorded).
    pub endpoint: String,
    /// The `grant_type` sent to the token endpoint.
    pub grant_type: Option<String>,
    /// Form field names in the order received (query parameter names for `authorize`).
    pub form_fields: Vec<String>,
    /// The request's Content-Type header.
    pub content_type: Option<String>,
    /// `client_secret_post` or `client_secret_basic`, when the token request
    /// authenticated the client one unambiguous way.
    pub client_auth: Option<String>,
    /// The status answered; 0 when the connection was dropped or hung.
    pub status: u16,
    /// Whether an injected fault answered.
    pub fault: bool,
    /// The `scope` parameter of a token request's form body or an authorize
    /// query exactly as sent, still encoded (`read%2Bwrite` and `read+write`
    /// are different scopes once decoded); `None` when absent. Scope is no
    /// secret.
    #[serde(default)]
    pub scope_raw: Option<String>,
}

/// A grant (one user's authorization of one client) as it stands now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    /// Identifies the grant for [`FakeProvider::grant`].
    pub grant_id: u64,
    /// The client the grant belongs to.
    pub client_id: String,
    /// False once revoked: none of its tokens work any more.
    pub alive: bool,
    /// The refresh token that works now.
    pub refresh_token: String,
    /// The access token issued last.
    pub access_token: String,
    /// Successful refreshes.
    pub rotations: u64,
    /// Why the grant was revoked.
    pub revoked_reason: Option<String>,
    /// The scope granted to the grant's refresh token now: the authorized
    /// scope, minus `offline_access` while the `oidc_scopes` knob is on.
    #[serde(default)]
    pub scope: String,
}

/// A grant created directly, as after a user's consent and a code exchange:
/// what `tokend import` is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintedGrant {
    /// Identifies the grant for [`FakeProvider::grant`].
    pub grant_id: u64,
    /// A valid access token.
    pub access_token: String,
    /// The grant's current refresh token.
    pub refresh_token: String,
    /// The access token's lifetime in seconds.
    pub expires_in: u64,
}

/// A running fake provider. It serves on its own thread and runtime, so it
/// works the same from sync tests, async tests and benchmarks; dropping it
/// stops the server, closes every connection and frees the port.
pub struct FakeProvider {
    /// Where it listens, for [`FakeProvider::url`].
    addr: SocketAddr,
    /// The default client's secret, generated at start.
    client_secret: String,
    /// Grants, clients, knobs and counters, shared with the server.
    shared: Arc<Shared>,
    /// Tells the server to stop; taken by Drop.
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// The server thread, joined by Drop so that the port is free afterwards.
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeProvider {
    /// The address only: the client secret stays out of test output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl FakeProvider {
    /// Starts a provider on 127.0.0.1 with a free port.
    pub fn start(knobs: Knobs) -> std::io::Result<FakeProvider> {
        FakeProvider::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), knobs)
    }

    /// Starts a provider on `addr` (the standalone binary's `--listen`).
    pub fn start_on(addr: SocketAddr, knobs: Knobs) -> std::io::Result<FakeProvider> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let client_secret = format!("fake-client-secret-{}", state::random_hex(32));
        let shared = Arc::new(Shared::new(knobs));
        shared.lock().add_client(DEFAULT_CLIENT_ID, &client_secret);

        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-provider".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("fake-provider-worker")
                    .enable_all()
                    .build();
                let runtime = match runtime {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let _ = ready_tx.send(Ok(()));
                            http::serve(listener, server_shared, shutdown_rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
                // Dropping the runtime here cancels every connection task,
                // hung ones included, before Drop's join returns.
            })?;
        let started = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("fake provider thread died")));
        if let Err(e) = started {
            let _ = thread.join();
            return Err(e);
        }
        Ok(FakeProvider {
            addr,
            client_secret,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The base URL, `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The default client's id, registered at start.
    pub fn client_id(&self) -> &str {
        DEFAULT_CLIENT_ID
    }

    /// The default client's secret as generated at start.
    pub fn client_secret(&self) -> &str {
        &self.client_secret
    }

    /// Registers a client (or replaces its secret), for tests with several apps.
    pub fn add_client(&self, id: &str, secret: &str) {
        self.shared.lock().add_client(id, secret);
    }

    /// The knobs in force.
    pub fn knobs(&self) -> Knobs {
        self.shared.lock().knobs.clone()
    }

    /// Replaces all knobs; requests already waiting out their latency see the new ones.
    pub fn set_knobs(&self, knobs: Knobs) {
        self.shared.lock().knobs = knobs;
    }

    /// Changes some knobs atomically with respect to requests.
    pub fn update_knobs(&self, f: impl FnOnce(&mut Knobs)) {
        f(&mut self.shared.lock().knobs);
    }

    /// Creates a grant directly, as if a user authorized `client_id` and the
    /// code was exchanged: the material for importing a credential. The client
    /// need not be registered, but refreshing needs it to be.
    pub fn mint_grant(&self, client_id: &str, scope: &str) -> MintedGrant {
        self.shared.lock().mint_grant(client_id, scope)
    }

    /// A grant's current state.
    pub fn grant(&self, grant_id: u64) -> Option<GrantInfo> {
        self.shared.lock().grant_info(grant_id)
    }

    /// The grant a refresh token (current or rotated-out) belongs to.
    pub fn grant_of_refresh_token(&self, refresh_token: &str) -> Option<GrantInfo> {
        let state = self.shared.lock();
        state
            .grant_of_refresh_token(refresh_token)
            .and_then(|id| state.grant_info(id))
    }

    /// Whether `members/current` would accept this token now: known, not
    /// expired, and its grant alive.
    pub fn access_token_valid(&self, token: &str) -> bool {
        self.shared.lock().validate(token).is_some()
    }

    /// The counters since start or the last [`FakeProvider::reset_stats`].
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// The user codes of device authorizations still waiting for the user,
    /// oldest first.
    pub fn pending_user_codes(&self) -> Vec<String> {
        self.shared.lock().pending_user_codes()
    }

    /// The user approves (`approve`) or denies the device authorization
    /// with this user code, as on the verification page; false when no
    /// pending one has it. `POST /_admin/device/approve` and `/deny` do the
    /// same over HTTP.
    pub fn decide_device(&self, user_code: &str, approve: bool) -> bool {
        self.shared.lock().decide_device(user_code, approve)
    }

    /// The last 20 000 requests, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().records.iter().cloned().collect()
    }

    /// Clears counters and request records (grants, clients and knobs stay),
    /// so a test can measure one phase.
    pub fn reset_stats(&self) {
        let mut state = self.shared.lock();
        state.stats = Stats::default();
        state.records.clear();
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_knobs_json_parses() {
        let knobs: Knobs = serde_json::from_str(
            r#"{"token_lifetime_secs":31535999,"latency_ms":0,"answer_delay_ms":1500,
                "rotate_refresh_tokens":true,"strict_reuse":true,"error_rate_5xx":0.0,
                "fault":{"kind":"too_many_requests","retry_after_secs":5},
                "fault_on":"token","fault_count":2,"deny_authorization":false,
                "code_lifetime_secs":600,"oidc_scopes":true}"#,
        )
        .unwrap();
        assert_eq!((knobs.answer_delay_ms, knobs.oidc_scopes), (1500, true));
        let defaults: Knobs = serde_json::from_str(r#"{"latency_ms":200}"#).unwrap();
        assert_eq!((defaults.answer_delay_ms, defaults.oidc_scopes), (0, false));
        assert_eq!(
            serde_json::to_value(Knobs::default()).unwrap()["answer_delay_ms"],
            0
        );
    }

    #[test]
    fn new_fields_may_be_missing() {
        let record: RequestRecord = serde_json::from_str(
            r#"{"at_ms":1,"endpoint":"token","grant_type":null,"form_fields":[],
                "content_type":null,"client_auth":null,"status":200,"fault":false}"#,
        )
        .unwrap();
        assert_eq!(record.scope_raw, None);
        let record: RequestRecord = serde_json::from_str(
            r#"{"at_ms":1042,"endpoint":"token","grant_type":"refresh_token",
                "form_fields":["grant_type","client_id","client_secret","refresh_token","scope"],
                "content_type":"application/x-www-form-urlencoded",
                "client_auth":"client_secret_post",
                "status":400,"fault":false,"scope_raw":"openid%20offline_access"}"#,
        )
        .unwrap();
        assert_eq!(record.scope_raw.as_deref(), Some("openid%20offline_access"));
        let grant: GrantInfo = serde_json::from_str(
            r#"{"grant_id":1,"client_id":"c","alive":true,"refresh_token":"frt_x",
                "access_token":"fat_x","rotations":0,"revoked_reason":null}"#,
        )
        .unwrap();
        assert_eq!(grant.scope, "");
        let mut stats = serde_json::to_value(Stats::default()).unwrap();
        assert_eq!(stats["scope_refused"], 0);
        stats.as_object_mut().unwrap().remove("scope_refused");
        assert_eq!(
            serde_json::from_value::<Stats>(stats).unwrap(),
            Stats::default()
        );
    }
}
