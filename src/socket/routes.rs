//! The routes of the README's "The socket API". They ask the refresher; they never write tokens.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde::Serialize;

use super::peer::Caller;
use crate::clock::rfc3339;
use crate::metrics::TOKEN_ROUTE;
use crate::names::check_name;
use crate::refresher::{Refresher, StatusCursor, TokenError};
use crate::wire::{self, ErrorCode, Refreshed};

/// What every request handler shares.
pub struct State {
    pub refresher: Arc<Refresher>,
    /// Our own uid: like root, it may read everything.
    pub own_uid: u32,
}

impl State {
    fn may_read(&self, caller: &Caller, name: &str) -> bool {
        // The rules of the config in force: one place, swapped by a reload.
        caller.uid == 0
            || caller.uid == self.own_uid
            || self
                .refresher
                .config()
                .access
                .iter()
                .any(|r| r.grants(name, caller.uid, caller.groups()))
    }
}

/// A route's answer, which the connection frames and writes.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: &'static str,
    /// The `allow` header of a 405.
    pub allow: Option<&'static str>,
    pub payload: Payload,
}

pub enum Payload {
    Whole(Vec<u8>),
    /// The list of credentials, written a part at a time.
    List(List),
}

/// Statuses per part of the streamed list: about 30 KiB of JSON.
const LIST_PART: usize = 100;

/// `GET /v1/credentials`: one JSON array, written [`LIST_PART`] statuses
/// at a time as the connection takes them, so that the daemon never holds
/// the whole answer for 100,000 credentials.
pub struct List {
    cursor: StatusCursor,
    opened: bool,
}

impl List {
    /// Appends the next part of the array to `out`; false once it was the
    /// last.
    pub fn next_part(&mut self, out: &mut Vec<u8>) -> bool {
        let mut n = 0;
        for s in self.cursor.by_ref().take(LIST_PART) {
            out.push(if self.opened { b',' } else { b'[' });
            self.opened = true;
            n += 1;
            // A status is plain data: serializing it cannot fail.
            let _ = serde_json::to_writer(&mut *out, &s);
        }
        if n < LIST_PART {
            if !self.opened {
                out.push(b'[');
            }
            out.push(b']');
            return false;
        }
        true
    }
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Vec<u8>>) -> Answer {
    Answer {
        status,
        content_type,
        allow: None,
        payload: Payload::Whole(body.into()),
    }
}

fn list(cursor: StatusCursor) -> Answer {
    Answer {
        status: StatusCode::OK,
        content_type: "application/json",
        allow: None,
        payload: Payload::List(List {
            cursor,
            opened: false,
        }),
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Answer {
    let body = serde_json::to_vec(value).unwrap_or_default();
    text(status, "application/json", body)
}

/// A JSON error, the contract's shape (README "The socket API").
pub fn error(status: StatusCode, code: ErrorCode, message: impl AsRef<str>) -> Answer {
    text(
        status,
        "application/json",
        wire::Error::body(code, message.as_ref()),
    )
}

/// What the routes need of a request.
pub struct Call<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub wants_json: bool,
}

/// Routes a request; records it in the metrics under its route template.
pub async fn handle(state: &State, caller: &Caller, call: Call<'_>) -> Answer {
    let (route, answer) = route(state, caller, call).await;
    state
        .refresher
        .metrics()
        .socket_request(route, answer.status.as_u16());
    answer
}

/// The most path segments a route has; a longer path is no route.
const MAX_SEGMENTS: usize = 4;

async fn route(state: &State, caller: &Caller, call: Call<'_>) -> (&'static str, Answer) {
    let Call {
        method,
        path,
        wants_json,
    } = call;
    let mut segments = [""; MAX_SEGMENTS + 1];
    let n = split_path(path, &mut segments);
    // HEAD is answered as GET (the connection sends the head alone),
    // except on the token route, where a read may start a refresh.
    let get = *method == Method::GET || *method == Method::HEAD;
    match (method, &segments[..n]) {
        // Serving either way: degraded only says the database is out of
        // reach (README "Running a fleet").
        (_, ["health"]) if get => (
            "/health",
            match state.refresher.degraded() {
                Some(line) => text(StatusCode::OK, "text/plain", line),
                None => text(StatusCode::OK, "text/plain", "ok"),
            },
        ),
        (_, ["metrics"]) if get => (
            "/metrics",
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                state
                    .refresher
                    .render_metrics(|name| state.may_read(caller, name)),
            ),
        ),
        (_, ["v1", "credentials"]) if get => (
            "/v1/credentials",
            list(
                state
                    .refresher
                    .status_cursor(|name| state.may_read(caller, name)),
            ),
        ),
        (_, ["v1", "credentials", name]) if get => (
            "/v1/credentials/{name}",
            guarded(state, caller, name, |name| async move {
                match state.refresher.status(name) {
                    Some(s) => json(StatusCode::OK, &s),
                    None => unknown(name),
                }
            })
            .await,
        ),
        (&Method::POST, ["v1", "credentials", name, "refresh"]) => (
            "/v1/credentials/{name}/refresh",
            guarded(state, caller, name, |name| async move {
                match state.refresher.refresh_now(name).await {
                    Some((status, refreshed)) => {
                        json(StatusCode::OK, &Refreshed { refreshed, status })
                    }
                    None => unknown(name),
                }
            })
            .await,
        ),
        (&Method::GET, ["v1", "tokens", name]) => (
            TOKEN_ROUTE,
            guarded(state, caller, name, |name| token(state, name, wants_json)).await,
        ),
        (&Method::POST, ["v1", "tokens", name, "rejected"]) => (
            "/v1/tokens/{name}/rejected",
            guarded(state, caller, name, |name| async move {
                if state.refresher.rejected(name) {
                    text(StatusCode::ACCEPTED, "text/plain", "")
                } else {
                    unknown(name)
                }
            })
            .await,
        ),
        (_, ["health"] | ["metrics"] | ["v1", "credentials"] | ["v1", "credentials", _]) => {
            ("method_not_allowed", not_allowed(method, path, "GET, HEAD"))
        }
        (_, ["v1", "tokens", _]) => ("method_not_allowed", not_allowed(method, path, "GET")),
        (_, ["v1", "credentials", _, "refresh"] | ["v1", "tokens", _, "rejected"]) => {
            ("method_not_allowed", not_allowed(method, path, "POST"))
        }
        _ => (
            "not_found",
            error(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                format!("no route {path}"),
            ),
        ),
    }
}

/// Splits `path` at its slashes (leading ones skipped) into `segments`,
/// as `path.trim_start_matches('/').split('/')` would, up to their number;
/// returns how many it filled. It runs for every request, so it splits on
/// bytes and allocates nothing (`str`'s char patterns cost several times
/// more for a path this short).
fn split_path<'p>(path: &'p str, segments: &mut [&'p str]) -> usize {
    let bytes = path.as_bytes();
    let mut start = bytes.iter().position(|&b| b != b'/').unwrap_or(bytes.len());
    let mut n = 0;
    while n < segments.len() {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'/')
            .map_or(bytes.len(), |i| start + i);
        // '/' is ASCII: both ends are character boundaries.
        segments[n] = &path[start..end];
        n += 1;
        if end == bytes.len() {
            break;
        }
        start = end + 1;
    }
    n
}

fn not_allowed(method: &Method, path: &str, allow: &'static str) -> Answer {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {path}; use {allow}"),
    );
    r.allow = Some(allow);
    r
}

/// Runs `f` if the caller may read `name`: 403 otherwise (whether or not it
/// exists, so names are not revealed to those without a grant).
async fn guarded<'a, F, Fut>(state: &State, caller: &Caller, name: &'a str, f: F) -> Answer
where
    F: FnOnce(&'a str) -> Fut,
    Fut: Future<Output = Answer>,
{
    if !state.may_read(caller, name) {
        return error(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!(
                "uid {} may not read {name:?}: add an [[access]] rule for it",
                caller.uid
            ),
        );
    }
    if check_name(name).is_err() {
        return unknown(name);
    }
    f(name).await
}

fn unknown(name: &str) -> Answer {
    error(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownCredential,
        format!("no credential named {name:?}"),
    )
}

async fn token(state: &State, name: &str, wants_json: bool) -> Answer {
    let wait = state.refresher.config().refresh.request_timeout + Duration::from_secs(2);
    match state.refresher.fresh_token(name, wait).await {
        Ok((token, expires_at)) if wants_json => json(
            StatusCode::OK,
            &wire::Token {
                name,
                access_token: token.expose(),
                token_type: "Bearer",
                expires_at: expires_at.map(rfc3339),
            },
        ),
        Ok((token, _)) => text(StatusCode::OK, "text/plain", token.into_exposed()),
        Err(TokenError::Unknown) => unknown(name),
        Err(TokenError::NeedsReauthorization(why)) => {
            let provider = state
                .refresher
                .status(name)
                .map(|s| s.provider)
                .unwrap_or_default();
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::NeedsReauthorization,
                format!(
                    "{name} needs re-authorization ({}): run '{}'",
                    why.unwrap_or_else(|| "the grant is dead".into()),
                    crate::alerts::authorize_command(
                        name,
                        &provider,
                        &state.refresher.config().path
                    )
                ),
            )
        }
        Err(TokenError::NoValidToken { why, next_attempt }) => {
            let why = why.unwrap_or_else(|| "no answer in time".into());
            let message = match next_attempt {
                Some(at) => format!(
                    "no unexpired token for {name} ({why}); the next attempt is due at {}",
                    rfc3339(at)
                ),
                None => format!("no unexpired token for {name}, and refreshing failed ({why})"),
            };
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::NoValidToken,
                message,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_as_str_split_does() {
        for path in [
            "",
            "/",
            "//",
            "/health",
            "health",
            "/v1/tokens/a",
            "//v1//tokens/",
            "/v1/tokens/a/",
            "/v1/credentials/a/refresh",
            "/a/b/c/d/e/f/g",
            "/é/ü/x",
            "/v1/tokens/a%2Fb",
        ] {
            let mut segments = [""; MAX_SEGMENTS + 1];
            let n = split_path(path, &mut segments);
            let want: Vec<&str> = path
                .trim_start_matches('/')
                .split('/')
                .take(MAX_SEGMENTS + 1)
                .collect();
            assert_eq!(&segments[..n], &want[..], "{path:?}");
        }
    }
}
