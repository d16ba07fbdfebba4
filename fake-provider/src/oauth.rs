//! The OAuth 2.0 wire protocol: turning raw token and authorize requests into
//! typed requests, rejecting whatever violates PandaDoc's OpenAPI description
//! or RFC 6749, and the error and success bodies the token endpoint answers.
//! Nothing here touches state, so every rejection is a schema violation.

use std::collections::HashMap;

use serde::Serialize;

use crate::encoding::{base64_decode, form_decode, parse_form, raw_form_value};

/// An error answer of the token endpoint (RFC 6749 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    /// HTTP status: 400 for most, 401 for invalid_client, 405 for a wrong method.
    pub status: u16,
    /// The `error` code.
    pub error: &'static str,
    /// The `error_description`, when it helps a developer.
    pub description: Option<String>,
}

impl OAuthError {
    pub fn invalid_request(description: impl Into<String>) -> Self {
        OAuthError {
            status: 400,
            error: "invalid_request",
            description: Some(description.into()),
        }
    }

    pub fn invalid_grant(description: impl Into<String>) -> Self {
        OAuthError {
            status: 400,
            error: "invalid_grant",
            description: Some(description.into()),
        }
    }

    /// A refresh asked for a scope name its refresh token was not granted
    /// (RFC 6749 §6, with the `oidc_scopes` knob).
    pub fn invalid_scope() -> Self {
        OAuthError {
            status: 400,
            error: "invalid_scope",
            description: Some("refresh token missing requested scope".into()),
        }
    }

    /// Any other error code of RFC 6749 §5.2, RFC 8628 §3.5 or RFC 7009 §2.2.1.
    pub fn code(error: &'static str, description: impl Into<String>) -> Self {
        OAuthError {
            status: 400,
            error,
            description: Some(description.into()),
        }
    }

    pub fn invalid_client() -> Self {
        OAuthError {
            status: 401,
            error: "invalid_client",
            description: None,
        }
    }

    /// The JSON body: `{"error":..}` plus `error_description` when there is one.
    pub fn body(&self) -> serde_json::Value {
        match &self.description {
            Some(d) => serde_json::json!({"error": self.error, "error_description": d}),
            None => serde_json::json!({"error": self.error}),
        }
    }
}

/// The token endpoint's success body (OAuth2AccessTokenResponse).
#[derive(Debug, Clone, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
    /// None for the client_credentials grant (RFC 6749 §4.4.3: no refresh token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    pub scope: String,
}

/// The device authorization endpoint's answer (RFC 8628 §3.2).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: String,
    pub expires_in: u64,
    pub interval: u64,
}

/// A well-formed token request, client credentials included (not yet checked).
#[derive(Debug)]
pub struct TokenRequest {
    pub client_id: String,
    pub client_secret: String,
    pub grant: GrantRequest,
}

/// The grant-specific part of a token request.
#[derive(Debug)]
pub enum GrantRequest {
    /// `grant_type=authorization_code` (OAuth2CreateAccessTokenRequest).
    Code {
        code: String,
        redirect_uri: Option<String>,
        code_verifier: Option<String>,
    },
    /// `grant_type=refresh_token` (OAuth2RefreshAccessTokenRequest).
    Refresh {
        refresh_token: String,
        /// The optional `scope` (RFC 6749 §6), decoded; `None` when omitted or
        /// empty. Only the `oidc_scopes` knob looks at it.
        scope: Option<String>,
    },
    /// `grant_type=client_credentials` (RFC 6749 §4.4.2).
    ClientCredentials { scope: Option<String> },
    /// `grant_type=urn:ietf:params:oauth:grant-type:device_code` (RFC 8628 §3.4).
    DeviceCode { device_code: String },
}

/// The device grant's `grant_type` (RFC 8628 §3.4).
pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// What a token request said, for the records, and what it asks for.
pub struct TokenCall {
    /// The `grant_type` sent, if any.
    pub grant_type: Option<String>,
    /// Form field names in order (only when the body is a form: names of
    /// another format could hold values).
    pub fields: Vec<String>,
    /// How the client authenticated, when unambiguous.
    pub client_auth: Option<&'static str>,
    /// The `scope` parameter as sent, still form-encoded (only when the body
    /// is a form, as for `fields`).
    pub scope_raw: Option<String>,
    /// The request, or why it violates the schema.
    pub request: Result<TokenRequest, OAuthError>,
}

/// The media type a token request must have.
const FORM: &str = "application/x-www-form-urlencoded";

fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|media| media.trim().eq_ignore_ascii_case(FORM))
    })
}

/// Parses a token request from its method, headers and body.
pub fn parse_token_request(
    is_post: bool,
    content_type: Option<&str>,
    authorization: Option<&str>,
    body: &[u8],
) -> TokenCall {
    let form = if is_form(content_type) {
        parse_form(body).ok()
    } else {
        None
    };
    let fields = form
        .iter()
        .flatten()
        .map(|(name, _)| name.clone())
        .collect();
    let grant_type = form
        .iter()
        .flatten()
        .find(|(name, _)| name == "grant_type")
        .map(|(_, value)| value.clone());
    let basic = authorization.is_some_and(|h| {
        h.trim_start()
            .get(..6)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("basic "))
    });
    let scope_raw = is_form(content_type)
        .then(|| raw_form_value(body, "scope"))
        .flatten()
        .map(|raw| String::from_utf8_lossy(raw).into_owned());
    let form_secret = form.iter().flatten().any(|(n, _)| n == "client_secret");
    let client_auth = match (basic, form_secret) {
        (true, false) => Some("client_secret_basic"),
        (false, true) => Some("client_secret_post"),
        _ => None,
    };
    let request = if !is_post {
        Err(OAuthError {
            status: 405,
            error: "invalid_request",
            description: Some("the token endpoint takes POST".into()),
        })
    } else if !is_form(content_type) {
        Err(OAuthError::invalid_request(format!(
            "Content-Type must be {FORM}"
        )))
    } else {
        match form {
            Some(pairs) => token_request(pairs, authorization),
            None => Err(OAuthError::invalid_request("malformed form body")),
        }
    };
    TokenCall {
        grant_type,
        fields,
        client_auth,
        scope_raw,
        request,
    }
}

fn token_request(
    pairs: Vec<(String, String)>,
    authorization: Option<&str>,
) -> Result<TokenRequest, OAuthError> {
    let mut params = single_valued(pairs)?;
    let grant_type = params
        .remove("grant_type")
        .ok_or_else(|| OAuthError::invalid_request("missing required parameter grant_type"))?;
    if ![
        "authorization_code",
        "refresh_token",
        "client_credentials",
        DEVICE_GRANT,
    ]
    .contains(&grant_type.as_str())
    {
        return Err(OAuthError {
            status: 400,
            error: "unsupported_grant_type",
            description: None,
        });
    }
    let (client_id, client_secret) = authenticate(&mut params, authorization)?;
    let mut take = |name: &str| params.remove(name);
    let required = |v: Option<String>, name: &str| {
        v.ok_or_else(|| OAuthError::invalid_request(format!("missing required parameter {name}")))
    };
    let grant = match grant_type.as_str() {
        "authorization_code" => GrantRequest::Code {
            code: required(take("code"), "code")?,
            redirect_uri: take("redirect_uri"),
            code_verifier: take("code_verifier"),
        },
        "refresh_token" => GrantRequest::Refresh {
            refresh_token: required(take("refresh_token"), "refresh_token")?,
            scope: take("scope"),
        },
        "client_credentials" => GrantRequest::ClientCredentials {
            scope: take("scope"),
        },
        _ => GrantRequest::DeviceCode {
            device_code: required(take("device_code"), "device_code")?,
        },
    };
    Ok(TokenRequest {
        client_id,
        client_secret,
        grant,
    })
}

/// The client's credentials (RFC 6749 §2.3.1): the Basic header or
/// `client_id` and `client_secret` in the form, one way only. Taken out of
/// `params`.
fn authenticate(
    params: &mut HashMap<String, String>,
    authorization: Option<&str>,
) -> Result<(String, String), OAuthError> {
    let form_id = params.remove("client_id");
    let form_secret = params.remove("client_secret");
    match (authorization, form_secret) {
        (Some(_), Some(_)) => Err(OAuthError::invalid_request(
            "client credentials in both the Authorization header and the form",
        )),
        (Some(header), None) => {
            let (id, secret) = parse_basic(header)?;
            if form_id.as_ref().is_some_and(|form_id| *form_id != id) {
                return Err(OAuthError::invalid_request(
                    "client_id in the form differs from the Basic credentials",
                ));
            }
            Ok((id, secret))
        }
        (None, Some(secret)) => {
            let id = form_id.ok_or_else(|| {
                OAuthError::invalid_request("missing required parameter client_id")
            })?;
            Ok((id, secret))
        }
        // A registered client here is confidential: it must authenticate
        // (RFC 6749 §3.2.1, RFC 8628 §3.1, RFC 7009 §2.1).
        (None, None) => Err(OAuthError::invalid_request(
            "missing required parameter client_secret",
        )),
    }
}

/// A request to the device authorization endpoint (RFC 8628 §3.1) or the
/// revocation endpoint (RFC 7009 §2.1): the client, authenticated as at the
/// token endpoint, and the other parameters.
pub struct ClientCall {
    /// Form field names in order.
    pub fields: Vec<String>,
    pub client_auth: Option<&'static str>,
    pub scope_raw: Option<String>,
    /// (client_id, client_secret, the other parameters), or why not.
    pub request: Result<(String, String, HashMap<String, String>), OAuthError>,
}

/// Parses a form POST that authenticates the client as the token endpoint does.
pub fn parse_client_request(
    is_post: bool,
    content_type: Option<&str>,
    authorization: Option<&str>,
    body: &[u8],
) -> ClientCall {
    let call = parse_token_request(is_post, content_type, authorization, body);
    let request = if !is_post {
        Err(OAuthError {
            status: 405,
            error: "invalid_request",
            description: Some("this endpoint takes POST".into()),
        })
    } else if !is_form(content_type) {
        Err(OAuthError::invalid_request(format!(
            "Content-Type must be {FORM}"
        )))
    } else {
        match parse_form(body) {
            Ok(pairs) => single_valued(pairs).and_then(|mut params| {
                let (id, secret) = authenticate(&mut params, authorization)?;
                Ok((id, secret, params))
            }),
            Err(_) => Err(OAuthError::invalid_request("malformed form body")),
        }
    };
    ClientCall {
        fields: call.fields,
        client_auth: call.client_auth,
        scope_raw: call.scope_raw,
        request,
    }
}

/// RFC 6749 §3.1: parameters must not repeat, and an empty one counts as omitted.
fn single_valued(pairs: Vec<(String, String)>) -> Result<HashMap<String, String>, OAuthError> {
    let mut params = HashMap::new();
    for (name, value) in pairs {
        if params.contains_key(&name) {
            return Err(OAuthError::invalid_request(format!(
                "parameter {name} is repeated"
            )));
        }
        params.insert(name, value);
    }
    params.retain(|_, value| !value.is_empty());
    Ok(params)
}

/// The names in a scope (RFC 6749 §3.3: separated by spaces, order and
/// repetition meaningless), each once, in order of first appearance. Runs of
/// spaces are tolerated rather than refused: the point of `oidc_scopes` is
/// which names a client asks for, not its whitespace.
pub fn scope_names(scope: &str) -> Vec<&str> {
    let mut names = Vec::new();
    for name in scope.split(' ').filter(|name| !name.is_empty()) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// What a strict OpenID provider grants a refresh token for an authorized
/// scope: the same names but `offline_access`, which asked for the refresh
/// token itself (OpenID Connect Core §11) and is not kept as a scope of it. A
/// client that repeats its authorization scope on refresh is then refused.
pub fn oidc_granted_scope(authorized: &str) -> String {
    scope_names(authorized)
        .into_iter()
        .filter(|name| *name != "offline_access")
        .collect::<Vec<_>>()
        .join(" ")
}

/// The scope a refresh's access token gets under `oidc_scopes` (RFC 6749
/// §6): the requested names when the request names any and all of them were
/// granted, else `invalid_scope`; the whole granted scope when it names none.
pub fn oidc_refresh_scope(granted: &str, requested: Option<&str>) -> Result<String, OAuthError> {
    let requested = requested.map(scope_names).unwrap_or_default();
    if requested.is_empty() {
        return Ok(granted.to_owned());
    }
    let granted = scope_names(granted);
    if requested.iter().any(|name| !granted.contains(name)) {
        return Err(OAuthError::invalid_scope());
    }
    Ok(requested.join(" "))
}

/// Client credentials from `Authorization: Basic` (RFC 6749 §2.3.1: the id
/// and secret are form-urlencoded, joined by `:`, then base64-encoded). Any
/// other scheme on the token endpoint is a schema violation.
fn parse_basic(header: &str) -> Result<(String, String), OAuthError> {
    let bad = || OAuthError::invalid_request("malformed Basic client credentials");
    let (scheme, credentials) = header.trim().split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(OAuthError::invalid_request(
            "the token endpoint takes no Authorization header other than Basic client credentials",
        ));
    }
    let decoded = base64_decode(credentials.trim()).ok_or_else(bad)?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let (id, secret) = text.split_once(':').ok_or_else(bad)?;
    let id = form_decode(id.as_bytes()).map_err(|_| bad())?;
    let secret = form_decode(secret.as_bytes()).map_err(|_| bad())?;
    if id.is_empty() || secret.is_empty() {
        return Err(bad());
    }
    Ok((id, secret))
}

/// A PKCE code challenge (RFC 7636 §4.3).
#[derive(Debug, Clone)]
pub enum Challenge {
    S256(String),
    Plain(String),
}

/// A well-formed authorization request.
#[derive(Debug)]
pub struct AuthorizeRequest {
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub state: Option<String>,
    pub challenge: Option<Challenge>,
}

/// Parses `GET /oauth2/authorize`'s query. Returns the parameter names (for
/// the record) and the request or a reason for the 400 page. Whether the
/// client exists is checked against state later.
pub fn parse_authorize(query: &str) -> (Vec<String>, Result<AuthorizeRequest, String>) {
    let pairs = match parse_form(query.as_bytes()) {
        Ok(pairs) => pairs,
        Err(_) => return (Vec::new(), Err("malformed query string".into())),
    };
    let names = pairs.iter().map(|(name, _)| name.clone()).collect();
    let request = single_valued(pairs)
        .map_err(|e| e.description.unwrap_or_default())
        .and_then(|mut params| {
            let mut required = |name: &str| {
                params
                    .remove(name)
                    .ok_or_else(|| format!("missing required parameter {name}"))
            };
            let client_id = required("client_id")?;
            let redirect_uri = required("redirect_uri")?;
            if required("response_type")? != "code" {
                return Err("response_type must be code".into());
            }
            if redirect_uri.contains('#') {
                return Err("redirect_uri must not have a fragment".into());
            }
            let challenge = match (
                params.remove("code_challenge"),
                params.remove("code_challenge_method").as_deref(),
            ) {
                (None, _) => None,
                (Some(c), Some("S256")) => Some(Challenge::S256(c)),
                (Some(c), None | Some("plain")) => Some(Challenge::Plain(c)),
                (Some(_), Some(_)) => return Err("unsupported code_challenge_method".into()),
            };
            Ok(AuthorizeRequest {
                client_id,
                redirect_uri,
                scope: params.remove("scope").unwrap_or_default(),
                state: params.remove("state"),
                challenge,
            })
        });
    (names, request)
}

/// The token from `Authorization: Bearer T`, if the header has that shape.
pub fn bearer_token(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: Option<&str>, body: &str) -> TokenCall {
        parse_token_request(true, Some(FORM), auth, body.as_bytes())
    }

    fn error_of(call: TokenCall) -> &'static str {
        call.request.unwrap_err().error
    }

    #[test]
    fn post_credentials() {
        let c = call(
            None,
            "grant_type=refresh_token&client_id=a&client_secret=s%2Bx&refresh_token=r&scope=read+write",
        );
        assert_eq!(
            c.fields,
            [
                "grant_type",
                "client_id",
                "client_secret",
                "refresh_token",
                "scope"
            ]
        );
        assert_eq!(c.client_auth, Some("client_secret_post"));
        let r = c.request.unwrap();
        assert_eq!(
            (r.client_id.as_str(), r.client_secret.as_str()),
            ("a", "s+x")
        );
        assert!(matches!(
            r.grant,
            GrantRequest::Refresh { refresh_token, scope }
                if refresh_token == "r" && scope.as_deref() == Some("read write")
        ));
        assert_eq!(c.scope_raw.as_deref(), Some("read+write"));
    }

    #[test]
    fn refresh_scope_is_optional_and_single() {
        let ok = "grant_type=refresh_token&client_id=a&client_secret=s&refresh_token=r";
        let scope_of = |body: &str| match call(None, body).request.unwrap().grant {
            GrantRequest::Refresh { scope, .. } => scope,
            _ => panic!("not a refresh"),
        };
        assert_eq!(scope_of(ok), None);
        // An empty parameter counts as omitted (RFC 6749 §3.1).
        assert_eq!(scope_of(&format!("{ok}&scope=")), None);
        assert_eq!(
            scope_of(&format!("{ok}&scope=read%2Bwrite")).as_deref(),
            Some("read+write")
        );
        assert_eq!(
            scope_of(&format!("scope=openid+profile&{ok}")).as_deref(),
            Some("openid profile")
        );
        let repeated = call(None, &format!("{ok}&scope=a&scope=b"));
        assert_eq!(repeated.scope_raw.as_deref(), Some("a"));
        assert_eq!(error_of(repeated), "invalid_request");
        // A bad escape anywhere still rejects the body, yet the raw scope is recorded.
        let malformed = call(None, &format!("{ok}&scope=a%2Bb&x=%zz"));
        assert!(malformed.fields.is_empty());
        assert_eq!(malformed.scope_raw.as_deref(), Some("a%2Bb"));
        assert_eq!(error_of(malformed), "invalid_request");
        // A code exchange may carry one too, ignored as before.
        let code = call(
            None,
            "grant_type=authorization_code&client_id=a&client_secret=s&code=c&scope=x",
        );
        assert_eq!(code.scope_raw.as_deref(), Some("x"));
        assert!(matches!(
            code.request.unwrap().grant,
            GrantRequest::Code { .. }
        ));
        assert_eq!(call(None, ok).scope_raw, None);
        // Not a form: neither names nor the scope are read from it.
        let json = parse_token_request(true, Some("application/json"), None, b"scope=x");
        assert_eq!(json.scope_raw, None);
    }

    #[test]
    fn scope_lists() {
        assert_eq!(scope_names("openid  read openid "), ["openid", "read"]);
        assert!(scope_names("").is_empty());
        assert_eq!(scope_names("read+write"), ["read+write"]);
        assert_eq!(
            oidc_granted_scope("openid offline_access read offline_access"),
            "openid read"
        );
        assert_eq!(oidc_granted_scope("offline_access"), "");
        assert_eq!(oidc_granted_scope("read+write"), "read+write");
    }

    #[test]
    fn oidc_refresh_scopes() {
        let granted = "openid profile read";
        assert_eq!(oidc_refresh_scope(granted, None).unwrap(), granted);
        assert_eq!(oidc_refresh_scope(granted, Some(" ")).unwrap(), granted);
        assert_eq!(
            oidc_refresh_scope(granted, Some("read  openid read")).unwrap(),
            "read openid"
        );
        assert_eq!(
            oidc_refresh_scope(granted, Some("read profile openid")).unwrap(),
            "read profile openid"
        );
        let refused = oidc_refresh_scope(granted, Some("openid offline_access")).unwrap_err();
        assert_eq!(
            refused.body(),
            serde_json::json!({"error": "invalid_scope",
                               "error_description": "refresh token missing requested scope"})
        );
        assert_eq!(refused.status, 400);
        assert!(oidc_refresh_scope("", Some("openid")).is_err());
        // PandaDoc's scope is one name with a plus in it, not two names.
        assert!(oidc_refresh_scope("read+write", Some("read write")).is_err());
        assert!(oidc_refresh_scope("read+write", Some("read+write")).is_ok());
    }

    #[test]
    fn basic_credentials() {
        // "a b:s:1" form-encoded as "a+b:s%3A1".
        let header = format!("Basic {}", "YStiOnMlM0Ex");
        let c = call(Some(&header), "grant_type=authorization_code&code=c");
        assert_eq!(c.client_auth, Some("client_secret_basic"));
        let r = c.request.unwrap();
        assert_eq!(
            (r.client_id.as_str(), r.client_secret.as_str()),
            ("a b", "s:1")
        );
        assert_eq!(
            error_of(call(
                Some("Basic !!"),
                "grant_type=refresh_token&refresh_token=r"
            )),
            "invalid_request"
        );
        assert_eq!(
            error_of(call(
                Some("Bearer x"),
                "grant_type=refresh_token&refresh_token=r"
            )),
            "invalid_request"
        );
    }

    #[test]
    fn schema_violations() {
        let ok = "grant_type=refresh_token&client_id=a&client_secret=s&refresh_token=r";
        assert_eq!(
            error_of(call(
                None,
                "grant_type=password&client_id=a&client_secret=s"
            )),
            "unsupported_grant_type"
        );
        assert_eq!(
            error_of(call(None, "client_id=a&client_secret=s&refresh_token=r")),
            "invalid_request"
        );
        assert_eq!(
            error_of(call(
                None,
                "grant_type=refresh_token&client_id=a&client_secret=s"
            )),
            "invalid_request"
        );
        assert_eq!(
            error_of(call(
                None,
                "grant_type=refresh_token&client_id=a&client_secret=s&refresh_token="
            )),
            "invalid_request"
        );
        assert_eq!(
            error_of(call(None, &format!("{ok}&refresh_token=r"))),
            "invalid_request"
        );
        assert_eq!(
            error_of(call(None, &format!("{ok}&x=%zz"))),
            "invalid_request"
        );
        assert_eq!(error_of(call(Some("Basic YTpz"), ok)), "invalid_request");
        let json = parse_token_request(
            true,
            Some("application/json"),
            None,
            br#"{"client_secret":"s"}"#,
        );
        assert!(json.fields.is_empty());
        assert_eq!(json.request.unwrap_err().error, "invalid_request");
        assert!(
            parse_token_request(
                true,
                Some("application/x-www-form-urlencoded; charset=UTF-8"),
                None,
                ok.as_bytes()
            )
            .request
            .is_ok()
        );
        assert_eq!(
            parse_token_request(false, Some(FORM), None, ok.as_bytes())
                .request
                .unwrap_err()
                .status,
            405
        );
    }

    #[test]
    fn authorize_queries() {
        let (names, r) = parse_authorize(
            "client_id=c&redirect_uri=http%3A%2F%2Fx%2Fcb&response_type=code&state=s&code_challenge=abc&code_challenge_method=S256",
        );
        assert_eq!(names.len(), 6);
        let r = r.unwrap();
        assert_eq!(r.redirect_uri, "http://x/cb");
        assert!(matches!(r.challenge, Some(Challenge::S256(c)) if c == "abc"));
        assert!(
            parse_authorize("client_id=c&redirect_uri=x&response_type=token")
                .1
                .is_err()
        );
        assert!(parse_authorize("client_id=c&response_type=code").1.is_err());
        assert!(parse_authorize("client_id=c&redirect_uri=x&response_type=code&code_challenge=a&code_challenge_method=S512").1.is_err());
    }

    #[test]
    fn bearer() {
        assert_eq!(bearer_token(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(Some("Basic abc")), None);
        assert_eq!(bearer_token(Some("Bearer ")), None);
        assert_eq!(bearer_token(None), None);
    }
}
