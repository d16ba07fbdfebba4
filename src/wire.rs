//! The socket API's wire contract (README "The socket API"): every JSON
//! shape the daemon writes and the command line reads back. Both sides use
//! these types, so a field renamed on one side cannot drift from the other,
//! and states are compared as values, not strings.

use serde::{Deserialize, Serialize};

/// Where a credential stands (README "Credential states"). The store keeps
/// it as the same snake_case text the socket shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Valid,
    Refreshing,
    Retrying,
    NeedsReauthorization,
    Misconfigured,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Valid => "valid",
            State::Refreshing => "refreshing",
            State::Retrying => "retrying",
            State::NeedsReauthorization => "needs_reauthorization",
            State::Misconfigured => "misconfigured",
        }
    }

    /// Reads a stored state. Unknown text (a row written by hand) reads as
    /// `valid`: the next validation finds out what the token is worth.
    pub(crate) fn parse(s: &str) -> State {
        match s {
            "refreshing" => State::Refreshing,
            "retrying" => State::Retrying,
            "needs_reauthorization" => State::NeedsReauthorization,
            "misconfigured" => State::Misconfigured,
            _ => State::Valid,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a credential gets its access tokens (README "Other grants"): the
/// socket and `tokend status` show it, since what can go wrong differs (a
/// client_credentials credential has no grant to lose).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    /// The refresh_token grant (RFC 6749 §6), after an authorization or an import.
    #[default]
    RefreshToken,
    /// The client_credentials grant (RFC 6749 §4.4).
    ClientCredentials,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::RefreshToken => "refresh_token",
            GrantKind::ClientCredentials => "client_credentials",
        }
    }
}

/// What the socket API and `tokend status` show of a credential: never a
/// secret. `GET /v1/credentials[/{name}]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub provider: String,
    /// Absent from an older daemon's answer: then it can only be a refresh token.
    #[serde(default)]
    pub grant: GrantKind,
    pub state: State,
    /// Whether an unexpired access token is published.
    pub has_token: bool,
    /// RFC 3339, or null when unknown.
    pub expires_at: Option<String>,
    pub expires_in_seconds: Option<i64>,
    pub last_refresh_at: Option<String>,
    pub last_validated_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub failures: u32,
    pub last_error: Option<String>,
    /// Why the token files could not be written (full disk, read-only or
    /// vanished directory), while they lag behind the store; null once a
    /// write succeeds. Known to the daemon only (the store does not hold it).
    #[serde(default)]
    pub last_publish_error: Option<String>,
}

/// `POST /v1/credentials/{name}/refresh`: the status after the attempt, and
/// whether a new token came of it (false during a backoff, for instance).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refreshed {
    pub refreshed: bool,
    #[serde(flatten)]
    pub status: Status,
}

/// `GET /v1/tokens/{name}` with `Accept: application/json`. Borrowed, so
/// the token is not copied on its way out.
#[derive(Debug, Serialize, Deserialize)]
pub struct Token<'a> {
    pub name: &'a str,
    pub access_token: &'a str,
    pub token_type: &'a str,
    /// RFC 3339, or null when the provider did not say.
    pub expires_at: Option<String>,
}

/// The `error` field of every error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: a request head or body tokend will not read.
    BadRequest,
    /// 431: a request head over the socket's bounds.
    RequestHeaderFieldsTooLarge,
    /// 403: the caller has no `[[access]]` rule for the name.
    Forbidden,
    /// 404: no such route.
    NotFound,
    /// 404: no credential of that name.
    UnknownCredential,
    /// 405: the route exists for another method.
    MethodNotAllowed,
    /// 503: the grant is dead until `tokend authorize`.
    NeedsReauthorization,
    /// 503: no unexpired token, and none to be had now.
    NoValidToken,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::RequestHeaderFieldsTooLarge => "request_header_fields_too_large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UnknownCredential => "unknown_credential",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::NeedsReauthorization => "needs_reauthorization",
            ErrorCode::NoValidToken => "no_valid_token",
        }
    }
}

/// The body of every error answer: `{"error": CODE, "message": …}`. The
/// code is text on the wire, so that a client reads a code it does not
/// know yet as well as one it does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Error {
    pub error: String,
    pub message: String,
}

impl Error {
    /// The serialized answer body.
    pub fn body(code: ErrorCode, message: &str) -> Vec<u8> {
        #[derive(Serialize)]
        struct E<'a> {
            error: &'static str,
            message: &'a str,
        }
        serde_json::to_vec(&E {
            error: code.as_str(),
            message,
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_back_as_written() {
        for s in [
            State::Valid,
            State::Refreshing,
            State::Retrying,
            State::NeedsReauthorization,
            State::Misconfigured,
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<State>(&json).unwrap(), s);
            assert_eq!(State::parse(s.as_str()), s);
        }
    }

    #[test]
    fn an_error_body_reads_back() {
        let body = Error::body(ErrorCode::NoValidToken, "no \"token\"");
        let e: Error = serde_json::from_slice(&body).unwrap();
        assert_eq!(e.error, "no_valid_token");
        assert_eq!(e.message, "no \"token\"");
    }

    #[test]
    fn a_refreshed_answer_is_a_status_with_one_more_field() {
        let s = Status {
            name: "a".into(),
            provider: "p".into(),
            grant: GrantKind::ClientCredentials,
            state: State::Retrying,
            has_token: false,
            expires_at: None,
            expires_in_seconds: None,
            last_refresh_at: None,
            last_validated_at: None,
            next_attempt_at: Some("2026-11-26T10:00:00Z".into()),
            failures: 2,
            last_error: None,
            last_publish_error: None,
        };
        let v = serde_json::to_value(Refreshed {
            refreshed: false,
            status: s,
        })
        .unwrap();
        assert_eq!(v["refreshed"], false);
        assert_eq!(v["state"], "retrying");
        let back: Refreshed = serde_json::from_value(v).unwrap();
        assert_eq!(back.status.state, State::Retrying);
        assert_eq!(back.status.grant, GrantKind::ClientCredentials);
        // An older daemon's status has no grant: only refresh tokens then.
        let mut old = serde_json::to_value(&back.status).unwrap();
        assert_eq!(old["grant"], "client_credentials");
        old.as_object_mut().unwrap().remove("grant");
        let old: Status = serde_json::from_value(old).unwrap();
        assert_eq!(old.grant, GrantKind::RefreshToken);
    }
}
