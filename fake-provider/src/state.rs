//! The provider's memory: registered clients, authorization codes, grants and
//! their tokens, the knobs, and the counters and records of what was seen.
//! Everything sits behind one mutex that is never held across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ring::digest::{SHA256, digest};

use crate::encoding::base64url_nopad;
use crate::oauth::{
    AuthorizeRequest, Challenge, DeviceAuthorization, GrantRequest, OAuthError, TokenRequest,
    TokenResponse, oidc_granted_scope, oidc_refresh_scope,
};
use crate::{Fault, FaultTarget, GrantInfo, Knobs, MintedGrant, RequestRecord, Stats};

/// How many request records are kept.
const MAX_RECORDS: usize = 20_000;

/// The scope a grant gets when the authorization request named none.
const DEFAULT_SCOPE: &str = "read+write";

/// The state and the clock it is measured against, shared by the handle and the server.
pub struct Shared {
    /// Provider start, the origin of [`RequestRecord::at_ms`].
    started: Instant,
    state: Mutex<State>,
}

impl Shared {
    pub fn new(knobs: Knobs) -> Self {
        Shared {
            started: Instant::now(),
            state: Mutex::new(State::new(knobs)),
        }
    }

    /// The state; a panic elsewhere while holding the lock does not make it unusable.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Milliseconds since start.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// An issued authorization code.
struct Code {
    client_id: String,
    /// The redirect_uri of the authorization request, which a token request
    /// that names one must repeat (RFC 6749 §4.1.3).
    redirect_uri: String,
    scope: String,
    challenge: Option<Challenge>,
    /// `None`: never expires (a lifetime too large for the clock).
    expires_at: Option<Instant>,
    /// The grant the code was exchanged for: a second exchange is reuse.
    used_by: Option<u64>,
}

/// One user's authorization of one client.
struct Grant {
    client_id: String,
    /// The scope the user authorized, as the authorization request (or
    /// mint_grant) named it; what is granted follows from it and the knobs
    /// ([`granted_scope`]).
    scope: String,
    alive: bool,
    revoked_reason: Option<String>,
    /// The one refresh token that works; older ones of this grant are rotated out.
    refresh_token: String,
    access_token: String,
    rotations: u64,
}

/// A device authorization (RFC 8628) waiting for its user, or decided.
struct Device {
    client_id: String,
    user_code: String,
    scope: String,
    expires_at: Option<Instant>,
    /// How far apart polls must be; grows by 5 s with each `slow_down`.
    interval: Duration,
    last_poll: Option<Instant>,
    /// None while the user has not decided; Some(true) approved.
    decision: Option<bool>,
    /// Exchanged for tokens: a second exchange is refused.
    used: bool,
}

/// An issued access token.
struct AccessToken {
    grant_id: u64,
    expires_at: Option<Instant>,
}

pub struct State {
    pub knobs: Knobs,
    pub stats: Stats,
    pub records: VecDeque<RequestRecord>,
    /// Client id to secret.
    clients: HashMap<String, String>,
    codes: HashMap<String, Code>,
    /// Grant `n` is at index `n - 1`.
    grants: Vec<Grant>,
    access_tokens: HashMap<String, AccessToken>,
    /// Every refresh token ever issued, current or rotated out, to its grant.
    refresh_tokens: HashMap<String, u64>,
    /// Device codes to their authorization.
    devices: HashMap<String, Device>,
}

/// `n` random lowercase hex digits.
pub fn random_hex(n: usize) -> String {
    (0..n)
        .map(|_| b"0123456789abcdef"[fastrand::usize(..16)] as char)
        .collect()
}

/// A token of a recognisable kind: `fat_` access, `frt_` refresh, `fcode_` code.
fn new_token(prefix: &str) -> String {
    format!("{prefix}{}", random_hex(40))
}

/// `secs` from now, or `None` (never) when that is beyond the clock's range,
/// so that a huge knob cannot make the provider panic.
fn deadline(secs: u64) -> Option<Instant> {
    Instant::now().checked_add(Duration::from_secs(secs))
}

fn expired(at: Option<Instant>) -> bool {
    at.is_some_and(|at| Instant::now() >= at)
}

/// The scope granted to a grant's refresh token, from the authorized scope:
/// verbatim, as PandaDoc does, or the strict OpenID reading with `oidc_scopes`.
fn granted_scope(authorized: &str, oidc_scopes: bool) -> String {
    if oidc_scopes {
        oidc_granted_scope(authorized)
    } else {
        authorized.to_owned()
    }
}

impl State {
    fn new(knobs: Knobs) -> Self {
        State {
            knobs,
            stats: Stats::default(),
            records: VecDeque::new(),
            clients: HashMap::new(),
            codes: HashMap::new(),
            grants: Vec::new(),
            access_tokens: HashMap::new(),
            refresh_tokens: HashMap::new(),
            devices: HashMap::new(),
        }
    }

    pub fn add_client(&mut self, id: &str, secret: &str) {
        self.clients.insert(id.to_owned(), secret.to_owned());
    }

    /// Whether `id` is registered with this secret.
    pub fn client_secret_is(&self, id: &str, secret: &str) -> bool {
        self.clients.get(id).is_some_and(|s| s == secret)
    }

    pub fn has_client(&self, id: &str) -> bool {
        self.clients.contains_key(id)
    }

    pub fn record(&mut self, record: RequestRecord) {
        if self.records.len() == MAX_RECORDS {
            self.records.pop_front();
        }
        self.records.push_back(record);
    }

    /// The fault (if any) that answers the next request to `endpoint`, with
    /// `fault_count` consumed; `error_rate_5xx` is drawn only when no fault is set.
    pub fn take_fault(&mut self, endpoint: FaultTarget) -> Option<Fault> {
        let knobs = &mut self.knobs;
        let targeted = knobs.fault_on == FaultTarget::Both || knobs.fault_on == endpoint;
        let mut fault = None;
        if targeted && knobs.fault.is_some() {
            fault = match &mut knobs.fault_count {
                None => knobs.fault.clone(),
                Some(0) => None,
                Some(n) => {
                    *n -= 1;
                    knobs.fault.clone()
                }
            };
            if knobs.fault_count == Some(0) {
                knobs.fault = None;
                knobs.fault_count = None;
            }
        }
        if fault.is_none() && knobs.error_rate_5xx > 0.0 && fastrand::f64() < knobs.error_rate_5xx {
            fault = Some(Fault::Status503);
        }
        if fault.is_some() {
            self.stats.faults_injected += 1;
        }
        fault
    }

    /// Issues a code for an authorization request (the client is known).
    pub fn issue_code(&mut self, request: AuthorizeRequest) -> String {
        let code = new_token("fcode_");
        let scope = match request.scope.as_str() {
            "" => DEFAULT_SCOPE.to_owned(),
            scope => scope.to_owned(),
        };
        self.codes.insert(
            code.clone(),
            Code {
                client_id: request.client_id,
                redirect_uri: request.redirect_uri,
                scope,
                challenge: request.challenge,
                expires_at: deadline(self.knobs.code_lifetime_secs),
                used_by: None,
            },
        );
        code
    }

    /// Answers a well-formed token request: client authentication, then the grant.
    pub fn token(&mut self, request: TokenRequest) -> Result<TokenResponse, OAuthError> {
        if self.clients.get(&request.client_id) != Some(&request.client_secret) {
            return Err(OAuthError::invalid_client());
        }
        let client_id = request.client_id;
        match request.grant {
            GrantRequest::Code {
                code,
                redirect_uri,
                code_verifier,
            } => {
                let response =
                    self.exchange_code(&client_id, &code, redirect_uri, code_verifier)?;
                self.stats.code_exchanges_ok += 1;
                Ok(response)
            }
            GrantRequest::Refresh {
                refresh_token,
                scope,
            } => {
                let response = self.refresh(&client_id, &refresh_token, scope.as_deref())?;
                self.stats.refreshes_ok += 1;
                Ok(response)
            }
            GrantRequest::ClientCredentials { scope } => {
                let response = self.client_credentials(&client_id, scope.as_deref())?;
                self.stats.client_credentials_ok += 1;
                Ok(response)
            }
            GrantRequest::DeviceCode { device_code } => self.device_poll(&client_id, &device_code),
        }
    }

    /// The client_credentials grant (RFC 6749 §4.4): a grant of its own for
    /// each access token, which has no refresh token (§4.4.3).
    fn client_credentials(
        &mut self,
        client_id: &str,
        scope: Option<&str>,
    ) -> Result<TokenResponse, OAuthError> {
        if !self
            .knobs
            .client_credentials_clients
            .iter()
            .any(|c| c == client_id)
        {
            return Err(OAuthError::code(
                "unauthorized_client",
                "this client may not use the client_credentials grant",
            ));
        }
        let scope = scope.unwrap_or(DEFAULT_SCOPE).to_owned();
        let grant_id = self.new_grant(client_id, &scope);
        if let Some(grant) = self.grant_mut(grant_id) {
            let refresh_token = std::mem::take(&mut grant.refresh_token);
            self.refresh_tokens.remove(&refresh_token);
        }
        let mut response = self.token_response(grant_id, scope);
        response.refresh_token = None;
        Ok(response)
    }

    /// Starts a device authorization (RFC 8628 §3.1, §3.2); `base` is the
    /// provider's URL, for the verification URI.
    pub fn issue_device_code(
        &mut self,
        client_id: &str,
        scope: Option<&str>,
        base: &str,
    ) -> DeviceAuthorization {
        const LETTERS: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
        let mut user_code: String = (0..8)
            .map(|_| LETTERS[fastrand::usize(..LETTERS.len())] as char)
            .collect();
        user_code.insert(4, '-');
        let device_code = new_token("fcode_dev_");
        let (interval, lifetime) = (
            self.knobs.device_interval_secs,
            self.knobs.device_code_lifetime_secs,
        );
        self.devices.insert(
            device_code.clone(),
            Device {
                client_id: client_id.to_owned(),
                user_code: user_code.clone(),
                scope: scope.unwrap_or(DEFAULT_SCOPE).to_owned(),
                expires_at: deadline(lifetime),
                interval: Duration::from_secs(interval),
                last_poll: None,
                decision: None,
                used: false,
            },
        );
        self.stats.device_codes_issued += 1;
        DeviceAuthorization {
            device_code,
            verification_uri: format!("{base}/device"),
            verification_uri_complete: format!("{base}/device?user_code={user_code}"),
            user_code,
            expires_in: lifetime,
            interval,
        }
    }

    /// A poll with a device code (RFC 8628 §3.4, §3.5).
    fn device_poll(
        &mut self,
        client_id: &str,
        device_code: &str,
    ) -> Result<TokenResponse, OAuthError> {
        self.stats.device_polls += 1;
        let forced_slow_down = self.knobs.device_slow_down > 0;
        let device = self
            .devices
            .get_mut(device_code)
            .ok_or_else(|| OAuthError::invalid_grant("unknown device code"))?;
        if device.client_id != client_id {
            return Err(OAuthError::invalid_grant(
                "device code was issued to another client",
            ));
        }
        if device.used {
            return Err(OAuthError::invalid_grant("device code already used"));
        }
        if expired(device.expires_at) {
            return Err(OAuthError::code("expired_token", "the device code expired"));
        }
        let now = Instant::now();
        let too_soon = device
            .last_poll
            .is_some_and(|last| now.duration_since(last) < device.interval);
        device.last_poll = Some(now);
        if forced_slow_down || too_soon {
            device.interval += Duration::from_secs(5);
            if forced_slow_down {
                self.knobs.device_slow_down -= 1;
            }
            return Err(OAuthError::code("slow_down", "polled too often"));
        }
        match device.decision {
            None => Err(OAuthError::code(
                "authorization_pending",
                "the user has not decided yet",
            )),
            Some(false) => Err(OAuthError::code("access_denied", "the user denied access")),
            Some(true) => {
                device.used = true;
                let scope = device.scope.clone();
                let grant_id = self.new_grant(client_id, &scope);
                let granted = granted_scope(&scope, self.knobs.oidc_scopes);
                Ok(self.token_response(grant_id, granted))
            }
        }
    }

    /// User codes still waiting for the user's decision, oldest first.
    pub fn pending_user_codes(&self) -> Vec<String> {
        let mut pending: Vec<(&Device, &String)> = self
            .devices
            .values()
            .filter(|d| d.decision.is_none() && !expired(d.expires_at))
            .map(|d| (d, &d.user_code))
            .collect();
        pending.sort_by_key(|(d, _)| d.expires_at);
        pending.into_iter().map(|(_, c)| c.clone()).collect()
    }

    /// The user's decision on the pending authorization with `user_code`.
    pub fn decide_device(&mut self, user_code: &str, approve: bool) -> bool {
        match self
            .devices
            .values_mut()
            .find(|d| d.user_code == user_code && d.decision.is_none() && !expired(d.expires_at))
        {
            Some(device) => {
                device.decision = Some(approve);
                true
            }
            None => false,
        }
    }

    /// Token revocation (RFC 7009 §2.1), for an authenticated client: a
    /// refresh token takes its grant with it, an access token goes alone;
    /// a token it does not know is answered as revoked (§2.2).
    pub fn revoke_token(
        &mut self,
        client_id: &str,
        client_secret: &str,
        token: Option<&str>,
    ) -> Result<(), OAuthError> {
        if self.clients.get(client_id).map(String::as_str) != Some(client_secret) {
            return Err(OAuthError::invalid_client());
        }
        let token =
            token.ok_or_else(|| OAuthError::invalid_request("missing required parameter token"))?;
        if self.knobs.revocation_unsupported {
            return Err(OAuthError::code(
                "unsupported_token_type",
                "this server does not revoke tokens of this type",
            ));
        }
        if let Some(&grant_id) = self.refresh_tokens.get(token) {
            if self
                .grant_info(grant_id)
                .is_some_and(|g| g.client_id != client_id)
            {
                return Err(OAuthError::invalid_request(
                    "the token was issued to another client",
                ));
            }
            self.revoke(grant_id, "refresh token revoked by the client (RFC 7009)");
            self.stats.revocations += 1;
        } else if let Some(access) = self.access_tokens.get(token) {
            if self
                .grant_info(access.grant_id)
                .is_some_and(|g| g.client_id != client_id)
            {
                return Err(OAuthError::invalid_request(
                    "the token was issued to another client",
                ));
            }
            self.access_tokens.remove(token);
            self.stats.revocations += 1;
        }
        Ok(())
    }

    fn exchange_code(
        &mut self,
        client_id: &str,
        code: &str,
        redirect_uri: Option<String>,
        code_verifier: Option<String>,
    ) -> Result<TokenResponse, OAuthError> {
        let strict = self.knobs.strict_reuse;
        let entry = self
            .codes
            .get(code)
            .ok_or_else(|| OAuthError::invalid_grant("unknown authorization code"))?;
        if entry.client_id != client_id {
            return Err(OAuthError::invalid_grant(
                "code was issued to another client",
            ));
        }
        if let Some(grant_id) = entry.used_by {
            self.stats.reuse_detected += 1;
            if strict {
                self.revoke(grant_id, "authorization code reused");
            }
            return Err(OAuthError::invalid_grant("authorization code already used"));
        }
        if expired(entry.expires_at) {
            return Err(OAuthError::invalid_grant("authorization code expired"));
        }
        if redirect_uri.is_some_and(|uri| uri != entry.redirect_uri) {
            return Err(OAuthError::invalid_grant("redirect_uri does not match"));
        }
        if let Some(challenge) = &entry.challenge {
            let verifier =
                code_verifier.ok_or_else(|| OAuthError::invalid_grant("missing code_verifier"))?;
            let matches = match challenge {
                Challenge::S256(c) => {
                    base64url_nopad(digest(&SHA256, verifier.as_bytes()).as_ref()) == *c
                }
                Challenge::Plain(c) => verifier == *c,
            };
            if !matches {
                return Err(OAuthError::invalid_grant("code_verifier does not match"));
            }
        }
        let scope = entry.scope.clone();
        let grant_id = self.new_grant(client_id, &scope);
        if let Some(entry) = self.codes.get_mut(code) {
            entry.used_by = Some(grant_id);
        }
        let granted = granted_scope(&scope, self.knobs.oidc_scopes);
        Ok(self.token_response(grant_id, granted))
    }

    /// A refresh; `scope` is the request's optional scope, which only
    /// `oidc_scopes` checks, after the token (so reuse is still detected) and
    /// before anything changes (so a refused refresh rotates nothing).
    fn refresh(
        &mut self,
        client_id: &str,
        refresh_token: &str,
        scope: Option<&str>,
    ) -> Result<TokenResponse, OAuthError> {
        let unknown = || OAuthError::invalid_grant("unknown refresh token");
        let grant_id = *self.refresh_tokens.get(refresh_token).ok_or_else(unknown)?;
        let (strict, rotate) = (self.knobs.strict_reuse, self.knobs.rotate_refresh_tokens);
        let oidc_scopes = self.knobs.oidc_scopes;
        let grant = self.grant_mut(grant_id).ok_or_else(unknown)?;
        if grant.client_id != client_id {
            return Err(OAuthError::invalid_grant(
                "refresh token was issued to another client",
            ));
        }
        if grant.refresh_token != refresh_token {
            self.stats.reuse_detected += 1;
            if strict {
                self.revoke(grant_id, "rotated-out refresh token reused");
            }
            return Err(OAuthError::invalid_grant("refresh token was rotated out"));
        }
        if !grant.alive {
            return Err(OAuthError::invalid_grant("grant revoked"));
        }
        let access_scope = if oidc_scopes {
            match oidc_refresh_scope(&oidc_granted_scope(&grant.scope), scope) {
                Ok(access_scope) => access_scope,
                Err(error) => {
                    self.stats.scope_refused += 1;
                    return Err(error);
                }
            }
        } else {
            grant.scope.clone()
        };
        grant.rotations += 1;
        if rotate {
            let new = new_token("frt_");
            grant.refresh_token = new.clone();
            self.refresh_tokens.insert(new, grant_id);
        }
        Ok(self.token_response(grant_id, access_scope))
    }

    /// Creates a live grant with a first token pair; returns its id.
    fn new_grant(&mut self, client_id: &str, scope: &str) -> u64 {
        let grant_id = self.grants.len() as u64 + 1;
        let refresh_token = new_token("frt_");
        self.refresh_tokens.insert(refresh_token.clone(), grant_id);
        self.grants.push(Grant {
            client_id: client_id.to_owned(),
            scope: scope.to_owned(),
            alive: true,
            revoked_reason: None,
            refresh_token,
            access_token: String::new(),
            rotations: 0,
        });
        grant_id
    }

    /// Issues a new access token for a grant and answers with the grant's
    /// pair and the access token's `scope`.
    fn token_response(&mut self, grant_id: u64, scope: String) -> TokenResponse {
        let access_token = new_token("fat_");
        let expires_in = self.knobs.token_lifetime_secs;
        self.access_tokens.insert(
            access_token.clone(),
            AccessToken {
                grant_id,
                expires_at: deadline(expires_in),
            },
        );
        let grant = &mut self.grants[grant_id as usize - 1];
        grant.access_token = access_token.clone();
        TokenResponse {
            access_token,
            token_type: "Bearer".to_owned(),
            expires_in,
            refresh_token: Some(grant.refresh_token.clone()),
            scope,
        }
    }

    fn grant_mut(&mut self, grant_id: u64) -> Option<&mut Grant> {
        self.grants
            .get_mut(usize::try_from(grant_id).ok()?.checked_sub(1)?)
    }

    fn revoke(&mut self, grant_id: u64, reason: &str) {
        if let Some(grant) = self.grant_mut(grant_id)
            && grant.alive
        {
            grant.alive = false;
            grant.revoked_reason = Some(reason.to_owned());
            self.stats.grants_revoked += 1;
        }
    }

    /// The grant an access token belongs to, if the token works now.
    pub fn validate(&self, access_token: &str) -> Option<u64> {
        let token = self.access_tokens.get(access_token)?;
        let alive = self.grant_info(token.grant_id)?.alive;
        (alive && !expired(token.expires_at)).then_some(token.grant_id)
    }

    pub fn mint_grant(&mut self, client_id: &str, scope: &str) -> MintedGrant {
        let scope = if scope.is_empty() {
            DEFAULT_SCOPE
        } else {
            scope
        };
        let grant_id = self.new_grant(client_id, scope);
        let granted = granted_scope(scope, self.knobs.oidc_scopes);
        let response = self.token_response(grant_id, granted);
        MintedGrant {
            grant_id,
            access_token: response.access_token,
            refresh_token: response.refresh_token.unwrap_or_default(),
            expires_in: response.expires_in,
        }
    }

    pub fn grant_info(&self, grant_id: u64) -> Option<GrantInfo> {
        let grant = self
            .grants
            .get(usize::try_from(grant_id).ok()?.checked_sub(1)?)?;
        Some(GrantInfo {
            grant_id,
            client_id: grant.client_id.clone(),
            alive: grant.alive,
            refresh_token: grant.refresh_token.clone(),
            access_token: grant.access_token.clone(),
            rotations: grant.rotations,
            revoked_reason: grant.revoked_reason.clone(),
            scope: granted_scope(&grant.scope, self.knobs.oidc_scopes),
        })
    }

    pub fn grant_of_refresh_token(&self, refresh_token: &str) -> Option<u64> {
        self.refresh_tokens.get(refresh_token).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(oidc_scopes: bool) -> State {
        let mut state = State::new(Knobs {
            oidc_scopes,
            ..Knobs::default()
        });
        state.add_client("c", "s");
        state
    }

    fn refresh(
        state: &mut State,
        refresh_token: &str,
        scope: Option<&str>,
    ) -> Result<TokenResponse, OAuthError> {
        state.token(TokenRequest {
            client_id: "c".into(),
            client_secret: "s".into(),
            grant: GrantRequest::Refresh {
                refresh_token: refresh_token.into(),
                scope: scope.map(str::to_owned),
            },
        })
    }

    #[test]
    fn oidc_refresh_gets_the_granted_scope_or_a_subset() {
        let mut state = state(true);
        let minted = state.mint_grant("c", "openid offline_access profile");
        let info = state.grant_info(minted.grant_id).unwrap();
        assert_eq!(info.scope, "openid profile");

        let first = refresh(&mut state, &minted.refresh_token, None).unwrap();
        assert_eq!(first.scope, "openid profile");
        assert_ne!(first.refresh_token.as_ref(), Some(&minted.refresh_token));
        let second = refresh(
            &mut state,
            first.refresh_token.as_deref().unwrap(),
            Some("profile"),
        )
        .unwrap();
        assert_eq!(second.scope, "profile");
        // The refresh token keeps the whole granted scope (RFC 6749 §6).
        let third = refresh(
            &mut state,
            second.refresh_token.as_deref().unwrap(),
            Some("profile openid"),
        )
        .unwrap();
        assert_eq!(third.scope, "profile openid");
        let info = state.grant_info(minted.grant_id).unwrap();
        assert_eq!((info.scope.as_str(), info.rotations), ("openid profile", 3));
        assert_eq!(
            (state.stats.refreshes_ok, state.stats.scope_refused),
            (3, 0)
        );
    }

    #[test]
    fn oidc_refused_scope_rotates_nothing() {
        let mut state = state(true);
        let minted = state.mint_grant("c", "openid offline_access");
        let before = state.grant_info(minted.grant_id).unwrap();

        let refused = refresh(
            &mut state,
            &minted.refresh_token,
            Some("openid offline_access"),
        );
        let error = refused.unwrap_err();
        assert_eq!(error, OAuthError::invalid_scope());
        assert_eq!(
            refresh(&mut state, &minted.refresh_token, Some("email"))
                .unwrap_err()
                .error,
            "invalid_scope"
        );
        assert_eq!(state.grant_info(minted.grant_id), Some(before));
        assert_eq!(
            (
                state.stats.scope_refused,
                state.stats.refreshes_ok,
                state.stats.reuse_detected
            ),
            (2, 0, 0)
        );
        assert!(state.validate(&minted.access_token).is_some());

        // The refresh token still works, and once rotated out, reuse is
        // detected before scope is looked at.
        let ok = refresh(&mut state, &minted.refresh_token, None).unwrap();
        assert_eq!(ok.scope, "openid");
        let reused = refresh(&mut state, &minted.refresh_token, Some("email")).unwrap_err();
        assert_eq!(reused.error, "invalid_grant");
        assert_eq!(
            (state.stats.scope_refused, state.stats.reuse_detected),
            (2, 1)
        );
    }

    #[test]
    fn scope_is_ignored_without_oidc_scopes() {
        let mut state = state(false);
        let minted = state.mint_grant("c", "openid offline_access");
        assert_eq!(
            state.grant_info(minted.grant_id).unwrap().scope,
            "openid offline_access"
        );
        let ok = refresh(&mut state, &minted.refresh_token, Some("anything at all")).unwrap();
        assert_eq!(ok.scope, "openid offline_access");
        assert_eq!(state.stats.scope_refused, 0);
        // PandaDoc's default scope, verbatim.
        let default = state.mint_grant("c", "");
        assert_eq!(
            state.grant_info(default.grant_id).unwrap().scope,
            "read+write"
        );
    }

    #[test]
    fn oidc_scopes_apply_to_code_grants_and_earlier_grants() {
        let mut state = state(false);
        let earlier = state.mint_grant("c", "openid offline_access");
        state.knobs.oidc_scopes = true;
        assert_eq!(state.grant_info(earlier.grant_id).unwrap().scope, "openid");
        assert!(refresh(&mut state, &earlier.refresh_token, Some("offline_access")).is_err());

        let code = state.issue_code(AuthorizeRequest {
            client_id: "c".into(),
            redirect_uri: "http://x/cb".into(),
            scope: "offline_access openid read".into(),
            state: None,
            challenge: None,
        });
        let exchanged = state
            .token(TokenRequest {
                client_id: "c".into(),
                client_secret: "s".into(),
                grant: GrantRequest::Code {
                    code,
                    redirect_uri: None,
                    code_verifier: None,
                },
            })
            .unwrap();
        assert_eq!(exchanged.scope, "openid read");
        let refreshed = refresh(
            &mut state,
            exchanged.refresh_token.as_deref().unwrap(),
            Some("read"),
        )
        .unwrap();
        assert_eq!(refreshed.scope, "read");
    }
}
