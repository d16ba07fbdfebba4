//! The HTTP face: accepting connections, routing, latency, answer delay and
//! fault injection, and PandaDoc-shaped responses around what the state decides.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

use crate::oauth::{self, OAuthError, TokenResponse};
use crate::state::Shared;
use crate::{DEFAULT_CLIENT_ID, Fault, FaultTarget, Knobs, RequestRecord};

/// Larger request bodies get 413: no legitimate request here comes near it.
const MAX_BODY: usize = 64 * 1024;

type Body = Full<Bytes>;

/// How a request is answered.
enum Reply {
    Send(Response<Body>),
    /// Close the connection without a word.
    Drop,
    /// Never answer.
    Hang,
}

impl Reply {
    /// The status for the record: 0 when nothing is sent.
    fn status(&self) -> u16 {
        match self {
            Reply::Send(response) => response.status().as_u16(),
            Reply::Drop | Reply::Hang => 0,
        }
    }
}

/// Accepts connections until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection(stream, shared.clone()));
                }
                // Out of file descriptors or similar: breathe, then go on.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// Serves one keep-alive connection until the client closes it or a
/// `Drop` fault hangs up on it.
async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    let hang_up = Arc::new(Notify::new());
    let service = {
        let hang_up = hang_up.clone();
        service_fn(move |request| {
            let (shared, hang_up) = (shared.clone(), hang_up.clone());
            async move {
                let response = match handle(request, &shared).await {
                    Reply::Send(response) => response,
                    Reply::Drop => {
                        hang_up.notify_one();
                        std::future::pending().await
                    }
                    Reply::Hang => std::future::pending().await,
                };
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    // Dropping `conn` closes the socket without writing anything.
    tokio::select! {
        _ = conn => {}
        _ = hang_up.notified() => {}
    }
}

/// The endpoints, by path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Token,
    DeviceAuthorization,
    Revoke,
    Validate,
    Authorize,
    Admin(&'a str),
    Other,
}

impl<'a> Route<'a> {
    fn of(path: &'a str) -> Self {
        match path {
            "/oauth2/access_token" => Route::Token,
            "/oauth2/device_authorization" => Route::DeviceAuthorization,
            "/oauth2/revoke" => Route::Revoke,
            "/public/v1/members/current" => Route::Validate,
            "/oauth2/authorize" => Route::Authorize,
            _ => path
                .strip_prefix("/_admin/")
                .map_or(Route::Other, Route::Admin),
        }
    }

    /// The record's `endpoint`; `None` for admin routes, which are not recorded.
    fn record_name(self) -> Option<&'static str> {
        match self {
            Route::Token => Some("token"),
            Route::DeviceAuthorization => Some("device_authorization"),
            Route::Revoke => Some("revoke"),
            Route::Validate => Some("validate"),
            Route::Authorize => Some("authorize"),
            Route::Admin(_) => None,
            Route::Other => Some("other"),
        }
    }
}

async fn handle(request: Request<Incoming>, shared: &Shared) -> Reply {
    let (parts, body) = request.into_parts();
    let route = Route::of(parts.uri.path());
    let mut record = RequestRecord {
        at_ms: shared.elapsed_ms(),
        endpoint: route.record_name().unwrap_or("other").to_owned(),
        grant_type: None,
        form_fields: Vec::new(),
        content_type: header_str(&parts.headers, header::CONTENT_TYPE).map(str::to_owned),
        client_auth: None,
        status: 0,
        fault: false,
        scope_raw: None,
    };
    let body = match read_body(&parts.headers, body).await {
        Ok(body) => body,
        Err(status) => {
            let reply = Reply::Send(text(status, "request body rejected\n"));
            let mut state = shared.lock();
            if route == Route::Token {
                state.stats.token_requests += 1;
                state.stats.bad_requests += 1;
            }
            if route.record_name().is_some() {
                record.status = status;
                state.record(record);
            }
            return reply;
        }
    };
    match route {
        Route::Token => token(shared, &parts, &body, record).await,
        Route::DeviceAuthorization | Route::Revoke => {
            client_endpoint(shared, route, &parts, &body, record).await
        }
        Route::Validate => validate(shared, &parts, record).await,
        Route::Authorize => authorize(shared, &parts, record),
        Route::Admin(path) => Reply::Send(admin(shared, &parts.method, path, &body)),
        Route::Other => {
            let reply = Reply::Send(text(404, "not found\n"));
            record.status = 404;
            shared.lock().record(record);
            reply
        }
    }
}

/// The whole body, or 413 (too large) / 400 (broken) to answer instead.
async fn read_body(headers: &HeaderMap, body: Incoming) -> Result<Bytes, u16> {
    let declared = header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(413);
    }
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(413),
        Err(_) => Err(400),
    }
}

/// `POST /oauth2/access_token` (operation `accessToken`).
async fn token(shared: &Shared, parts: &Parts, body: &[u8], mut record: RequestRecord) -> Reply {
    let call = oauth::parse_token_request(
        parts.method == Method::POST,
        header_str(&parts.headers, header::CONTENT_TYPE),
        header_str(&parts.headers, header::AUTHORIZATION),
        body,
    );
    {
        let mut state = shared.lock();
        let stats = &mut state.stats;
        stats.token_requests += 1;
        match call.grant_type.as_deref() {
            Some("refresh_token") => stats.refresh_requests += 1,
            Some("authorization_code") => stats.code_exchanges += 1,
            _ => {}
        }
        if call.request.is_err() {
            stats.bad_requests += 1;
        }
    }
    record.grant_type = call.grant_type;
    record.form_fields = call.fields;
    record.client_auth = call.client_auth.map(str::to_owned);
    record.scope_raw = call.scope_raw;

    delay(shared).await;
    let (reply, answer_delay_ms) = {
        let mut state = shared.lock();
        let fault = state.take_fault(FaultTarget::Token);
        record.fault = fault.is_some();
        let reply = match fault {
            Some(Fault::TokenType { token_type }) => Reply::Send(
                match call.request.and_then(|request| state.token(request)) {
                    Ok(tokens) => token_json(&TokenResponse {
                        token_type,
                        ..tokens
                    }),
                    Err(error) => oauth_error(&error),
                },
            ),
            Some(fault) => fault_reply(&fault),
            None => Reply::Send(
                match call.request.and_then(|request| state.token(request)) {
                    Ok(tokens) => token_json(&tokens),
                    Err(error) => oauth_error(&error),
                },
            ),
        };
        record.status = reply.status();
        state.record(record);
        (reply, state.knobs.answer_delay_ms)
    };
    hold_back(reply, answer_delay_ms).await
}

/// `POST /oauth2/device_authorization` (RFC 8628 §3.1) and `POST
/// /oauth2/revoke` (RFC 7009 §2.1): the client authenticates as at the
/// token endpoint; latency, faults and the answer delay apply as there.
async fn client_endpoint(
    shared: &Shared,
    route: Route<'_>,
    parts: &Parts,
    body: &[u8],
    mut record: RequestRecord,
) -> Reply {
    let call = oauth::parse_client_request(
        parts.method == Method::POST,
        header_str(&parts.headers, header::CONTENT_TYPE),
        header_str(&parts.headers, header::AUTHORIZATION),
        body,
    );
    if call.request.is_err() {
        shared.lock().stats.bad_requests += 1;
    }
    record.form_fields = call.fields;
    record.client_auth = call.client_auth.map(str::to_owned);
    record.scope_raw = call.scope_raw;
    let base = header_str(&parts.headers, header::HOST)
        .map(|host| format!("http://{host}"))
        .unwrap_or_default();
    delay(shared).await;
    let (reply, answer_delay_ms) = {
        let mut state = shared.lock();
        let fault = state
            .take_fault(FaultTarget::Token)
            .filter(|f| !matches!(f, Fault::TokenType { .. }));
        record.fault = fault.is_some();
        let reply = match fault {
            Some(fault) => fault_reply(&fault),
            None => Reply::Send(match call.request {
                Err(error) => oauth_error(&error),
                Ok((client_id, client_secret, params)) if route == Route::Revoke => {
                    match state.revoke_token(
                        &client_id,
                        &client_secret,
                        params.get("token").map(String::as_str),
                    ) {
                        Ok(()) => respond(200, "application/json", "{}"),
                        Err(error) => oauth_error(&error),
                    }
                }
                Ok((client_id, client_secret, params)) => {
                    if !state.client_secret_is(&client_id, &client_secret) {
                        oauth_error(&OAuthError::invalid_client())
                    } else {
                        let answer = state.issue_device_code(
                            &client_id,
                            params.get("scope").map(String::as_str),
                            &base,
                        );
                        with_header(
                            json(200, &answer),
                            header::CACHE_CONTROL,
                            HeaderValue::from_static("no-store"),
                        )
                    }
                }
            }),
        };
        record.status = reply.status();
        state.record(record);
        (reply, state.knobs.answer_delay_ms)
    };
    hold_back(reply, answer_delay_ms).await
}

/// `GET /public/v1/members/current` (operation `detailsCurrentMember`).
async fn validate(shared: &Shared, parts: &Parts, record: RequestRecord) -> Reply {
    shared.lock().stats.validations += 1;
    delay(shared).await;
    let (reply, answer_delay_ms) = validate_now(shared, parts, record);
    hold_back(reply, answer_delay_ms).await
}

/// Answers a validation once its latency is over: the answer, recorded, and
/// the `answer_delay_ms` in force.
fn validate_now(shared: &Shared, parts: &Parts, mut record: RequestRecord) -> (Reply, u64) {
    let mut state = shared.lock();
    // A token_type fault has nothing to change in a validation: it answers as usual.
    let fault = state
        .take_fault(FaultTarget::Validate)
        .filter(|f| !matches!(f, Fault::TokenType { .. }));
    let reply = if let Some(fault) = fault {
        record.fault = true;
        fault_reply(&fault)
    } else if parts.method != Method::GET {
        Reply::Send(json(
            405,
            &json!({"type": "request_error", "detail": "Method not allowed."}),
        ))
    } else {
        let token = oauth::bearer_token(header_str(&parts.headers, header::AUTHORIZATION));
        match token.map(|token| state.validate(token)) {
            Some(Some(grant_id)) => {
                state.stats.validations_ok += 1;
                Reply::Send(json(200, &member_details(grant_id)))
            }
            // The 401 body has the `{type, detail}` shape of the spec's error responses.
            Some(None) => Reply::Send(json(
                401,
                &json!({"type": "authentication_error", "detail": "Invalid token."}),
            )),
            None => Reply::Send(json(
                401,
                &json!({"type": "authentication_error",
                        "detail": "Authentication credentials were not provided."}),
            )),
        }
    };
    record.status = reply.status();
    state.record(record);
    (reply, state.knobs.answer_delay_ms)
}

/// A MemberDetailsResponse for the grant's user.
fn member_details(grant_id: u64) -> serde_json::Value {
    json!({
        "user_id": format!("fakeuser{grant_id:014}"),
        "membership_id": format!("fakemember{grant_id:012}"),
        "email": format!("user-{grant_id}@example.com"),
        "first_name": "Fake",
        "last_name": format!("User {grant_id}"),
        "is_active": true,
        "workspace": "fakeworkspace0000000000",
        "workspace_name": "Fake Workspace",
        "email_verified": true,
        "role": "Admin",
        "user_license": "Full",
        "date_created": "2024-01-01T00:00:00.000000Z",
        "date_modified": "2024-01-01T00:00:00.000000Z",
    })
}

/// `GET /oauth2/authorize`: the user consents at once (or denies, by knob),
/// and the browser is sent back to the client's redirect_uri.
fn authorize(shared: &Shared, parts: &Parts, mut record: RequestRecord) -> Reply {
    let query = parts.uri.query().unwrap_or("");
    let (names, request) = oauth::parse_authorize(query);
    record.form_fields = names;
    record.scope_raw = crate::encoding::raw_form_value(query.as_bytes(), "scope")
        .map(|raw| String::from_utf8_lossy(raw).into_owned());
    let mut state = shared.lock();
    let response = match request {
        _ if parts.method != Method::GET => text(405, "method not allowed\n"),
        Err(reason) => text(400, &format!("authorization request rejected: {reason}\n")),
        Ok(request) if !state.has_client(&request.client_id) => {
            text(400, "authorization request rejected: unknown client_id\n")
        }
        Ok(request) => {
            let redirect_uri = request.redirect_uri.clone();
            let client_state = request.state.clone();
            let mut params = vec![if state.knobs.deny_authorization {
                ("error", "access_denied".to_owned())
            } else {
                ("code", state.issue_code(request))
            }];
            params.extend(client_state.map(|s| ("state", s)));
            let query: Vec<String> = params
                .iter()
                .map(|(name, value)| format!("{name}={}", crate::encoding::percent_encode(value)))
                .collect();
            let separator = match redirect_uri.find('?') {
                None => "?",
                Some(_) if redirect_uri.ends_with(['?', '&']) => "",
                Some(_) => "&",
            };
            let location = format!("{redirect_uri}{separator}{}", query.join("&"));
            match HeaderValue::from_str(&location) {
                Ok(location) => with_header(text(302, "redirecting\n"), header::LOCATION, location),
                Err(_) => text(400, "authorization request rejected: bad redirect_uri\n"),
            }
        }
    };
    record.status = response.status().as_u16();
    state.record(record);
    Reply::Send(response)
}

/// `POST /_admin/grants` body.
#[derive(Deserialize, Default)]
#[serde(default)]
struct MintRequest {
    client_id: Option<String>,
    scope: Option<String>,
}

/// `POST /_admin/device/approve` and `/deny` body.
#[derive(Deserialize)]
struct DeviceDecision {
    user_code: String,
}

/// The standalone binary's control routes; not recorded and never faulted.
fn admin(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Response<Body> {
    let mut state = shared.lock();
    let bad = |detail: String| json(400, &json!({"error": "bad_request", "detail": detail}));
    match (method.as_str(), path) {
        ("GET", "stats") => json(200, &state.stats),
        ("DELETE", "stats") => {
            state.stats = Default::default();
            state.records.clear();
            json(200, &state.stats)
        }
        ("GET", "requests") => json(200, &state.records),
        ("GET", "knobs") => json(200, &state.knobs),
        ("PUT", "knobs") => match serde_json::from_slice::<Knobs>(body) {
            Ok(knobs) => {
                state.knobs = knobs;
                json(200, &state.knobs)
            }
            Err(e) => bad(e.to_string()),
        },
        ("POST", "grants") => {
            let request = if body.iter().all(u8::is_ascii_whitespace) {
                Ok(MintRequest::default())
            } else {
                serde_json::from_slice::<MintRequest>(body)
            };
            match request {
                Err(e) => bad(e.to_string()),
                Ok(request) => {
                    let client_id = request.client_id.as_deref().unwrap_or(DEFAULT_CLIENT_ID);
                    if state.has_client(client_id) {
                        let grant =
                            state.mint_grant(client_id, request.scope.as_deref().unwrap_or(""));
                        json(200, &grant)
                    } else {
                        bad(format!("unknown client {client_id:?}"))
                    }
                }
            }
        }
        ("POST", "device/approve" | "device/deny") => {
            match serde_json::from_slice::<DeviceDecision>(body) {
                Err(e) => bad(e.to_string()),
                Ok(d) if state.decide_device(&d.user_code, path == "device/approve") => {
                    json(200, &json!({"user_code": d.user_code}))
                }
                Ok(_) => json(
                    404,
                    &json!({"error": "no pending authorization with that user_code"}),
                ),
            }
        }
        ("GET", "device") => json(200, &state.pending_user_codes()),
        ("GET", path) => match path.strip_prefix("grants/").map(str::parse::<u64>) {
            Some(Ok(id)) => match state.grant_info(id) {
                Some(grant) => json(200, &grant),
                None => json(404, &json!({"error": "not_found"})),
            },
            _ => json(404, &json!({"error": "not_found"})),
        },
        _ => json(404, &json!({"error": "not_found"})),
    }
}

/// Waits out the `latency_ms` knob, before the request is processed.
async fn delay(shared: &Shared) {
    let ms = shared.lock().knobs.latency_ms;
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Holds a processed request's answer back for `ms` (the `answer_delay_ms`
/// knob), so that its effects are visible at the provider before the client
/// can see them. A dropped or hung connection has nothing to hold back.
async fn hold_back(reply: Reply, ms: u64) -> Reply {
    if ms > 0 && matches!(reply, Reply::Send(_)) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    reply
}

fn fault_reply(fault: &Fault) -> Reply {
    Reply::Send(match fault {
        Fault::Status500 => html(
            500,
            "<html><body><h1>500 Internal Server Error</h1></body></html>\n",
        ),
        Fault::Status503 => html(
            503,
            "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>\n",
        ),
        Fault::TooManyRequests { retry_after_secs } => {
            let response = json(
                429,
                &json!({"type": "throttled", "detail": "Request was throttled."}),
            );
            match retry_after_secs {
                Some(secs) => with_header(response, header::RETRY_AFTER, HeaderValue::from(*secs)),
                None => response,
            }
        }
        Fault::Garbage => html(
            200,
            "<!DOCTYPE html><html><head><title>Maintenance</title></head><body>Back soon.</body></html>\n",
        ),
        Fault::Truncated => respond(
            200,
            "application/json",
            r#"{"access_token":"fat_3f9a0c2e7b","token_type":"Bea"#,
        ),
        Fault::Oversized => respond(
            200,
            "application/json",
            format!(
                r#"{{"access_token":"fat_3f9a0c2e7b","token_type":"Bearer","padding":"{}"}}"#,
                "x".repeat(80 * 1024)
            ),
        ),
        Fault::Drop => return Reply::Drop,
        Fault::Hang => return Reply::Hang,
        Fault::InvalidClient => json(401, &json!({"error": "invalid_client"})),
        Fault::InvalidGrant => json(400, &json!({"error": "invalid_grant"})),
        Fault::OauthError { status, error } => json(*status, &json!({"error": error})),
        // Answered by `token` itself, which processes the request first.
        Fault::TokenType { .. } => json(500, &json!({"error": "server_error"})),
    })
}

/// A successful token answer; RFC 6749 §5.1 forbids caching it.
fn token_json(tokens: &TokenResponse) -> Response<Body> {
    let response = json(200, tokens);
    let response = with_header(
        response,
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    with_header(
        response,
        header::PRAGMA,
        HeaderValue::from_static("no-cache"),
    )
}

fn oauth_error(error: &OAuthError) -> Response<Body> {
    let response = json(error.status, &error.body());
    if error.status == 405 {
        return with_header(response, header::ALLOW, HeaderValue::from_static("POST"));
    }
    response
}

fn header_str(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn respond(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: u16, value: &impl Serialize) -> Response<Body> {
    respond(
        status,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

fn text(status: u16, body: &str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body.to_owned())
}

fn html(status: u16, body: &'static str) -> Response<Body> {
    respond(status, "text/html; charset=utf-8", body)
}

fn with_header(
    mut response: Response<Body>,
    name: HeaderName,
    value: HeaderValue,
) -> Response<Body> {
    response.headers_mut().insert(name, value);
    response
}
