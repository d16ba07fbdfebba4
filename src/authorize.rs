//! The browser half of the authorization-code flow (RFC 6749 §4.1): the
//! authorization URL we send the user to, and the answer the provider's
//! redirect brings back. Pure, apart from drawing randomness, so that every
//! shape and every refusal is unit-tested; `tokend authorize` drives it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Url;
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::ProviderConfig;
use crate::provider::form_encode;
use crate::secret::Secret;

/// Random bytes behind `state` and the PKCE verifier: 256 bits, twice the
/// 128 that make guessing hopeless, and (base64url) the 43 characters RFC
/// 7636 §4.1 recommends for a verifier.
const RANDOM_BYTES: usize = 32;

/// The longest `error_description` we repeat: enough for a sentence, not
/// enough for a page pasted into the terminal.
const MAX_DESCRIPTION: usize = 200;

/// One authorization attempt: the URL to open and what checks its answer.
pub struct Request {
    /// Where the user's browser goes.
    pub url: String,
    /// What the redirect must carry back, so that a redirect we did not ask
    /// for (forged, or from an older attempt) is refused (RFC 6749 §10.12).
    pub state: String,
    /// The PKCE code_verifier (RFC 7636), sent with the code exchange; None
    /// when the provider has `pkce = false`.
    pub verifier: Option<Secret>,
}

impl Request {
    /// A fresh attempt for provider `p`, redirecting to `redirect_uri`, with
    /// `state` and the verifier drawn from the operating system's RNG.
    pub fn new(p: &ProviderConfig, redirect_uri: &Url) -> Result<Request, String> {
        let state = random_token()?;
        let verifier = if p.pkce {
            Some(Secret::new(random_token()?))
        } else {
            None
        };
        let challenge = verifier.as_ref().map(|v| pkce_challenge(v.expose()));
        Ok(Request {
            url: url(p, redirect_uri, &state, challenge.as_deref()),
            state,
            verifier,
        })
    }
}

fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; RANDOM_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the operating system's random number generator failed".to_owned())?;
    // Base64url without padding (RFC 4648 §5): URL-safe as it is.
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// RFC 7636 §4.2, S256: BASE64URL(SHA256(verifier)), without padding.
fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// The authorization URL, its parameters in the order PandaDoc documents
/// (README "Using it with PandaDoc"): client_id, redirect_uri, scope, response_type, then state, the
/// PKCE challenge and `authorize_params`.
fn url(p: &ProviderConfig, redirect_uri: &Url, state: &str, challenge: Option<&str>) -> String {
    let mut query = vec![
        format!("client_id={}", form_encode(&p.client_id)),
        format!("redirect_uri={}", form_encode(redirect_uri.as_str())),
    ];
    if let Some(scope) = &p.scope {
        query.push(format!("scope={}", encode_scope(scope)));
    }
    query.push("response_type=code".into());
    query.push(format!("state={}", form_encode(state)));
    if let Some(c) = challenge {
        query.push(format!("code_challenge={}", form_encode(c)));
        query.push("code_challenge_method=S256".into());
    }
    for (k, v) in &p.authorize_params {
        query.push(format!("{}={}", form_encode(k), form_encode(v)));
    }
    let base = p.authorize_url.as_str();
    let sep = match p.authorize_url.query() {
        None => "?",
        Some("") => "",
        Some(_) => "&",
    };
    format!("{base}{sep}{}", query.join("&"))
}

/// A scope is a list of names (RFC 6749 §3.3) separated by spaces; PandaDoc
/// writes that list with '+' (`scope=read+write`, the form encoding of a
/// space), and so may the config. Either separator goes out as a literal '+'.
fn encode_scope(scope: &str) -> String {
    scope
        .split(|c: char| c == '+' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(form_encode)
        .collect::<Vec<_>>()
        .join("+")
}

/// Why a redirect brought no usable code.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `state` is missing or not ours: forged, or from an older attempt.
    StateMismatch,
    /// The provider said no (`error=access_denied`, …), description sanitized.
    Provider {
        error: String,
        description: Option<String>,
    },
    /// Neither `code` nor `error`, or one of them twice: not an answer.
    Malformed(String),
}

impl Refusal {
    /// What went wrong and what to do about it, for the terminal and the page.
    pub fn describe(&self) -> String {
        match self {
            Refusal::StateMismatch => {
                "the redirect's state does not match this run's: it is forged, \
                 or the browser finished an older authorization (a stale tab). \
                 Run 'tokend authorize' again and use only the URL it prints"
                    .into()
            }
            Refusal::Provider { error, description } => {
                let desc = description
                    .as_ref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                let hint = match error.as_str() {
                    "access_denied" => {
                        "the user declined, or may not authorize this app; \
                         run 'tokend authorize' again and allow access"
                    }
                    "invalid_scope" => "check the provider's scope in the config",
                    "unauthorized_client" | "invalid_request" | "unsupported_response_type" => {
                        "check the provider's client_id, and that its redirect_uri is the one \
                         registered for the app"
                    }
                    _ => {
                        "run 'tokend authorize' again; if it persists, check the provider's settings"
                    }
                };
                format!("the provider refused the authorization: {error}{desc}; {hint}")
            }
            Refusal::Malformed(why) => {
                format!("the redirect is not an authorization answer: {why}")
            }
        }
    }
}

/// Reads a redirect's query: the code, if `state` is ours and the provider
/// said yes. Extra parameters (`iss`, `scope`, …) are ignored.
pub fn answer(query: &str, expected_state: &str) -> Result<Secret, Refusal> {
    let url = Url::parse(&format!("http://localhost/?{query}"))
        .map_err(|_| Refusal::Malformed("the query cannot be read".into()))?;
    let (mut code, mut state, mut error, mut description) = (None, None, None, None);
    for (k, v) in url.query_pairs() {
        let slot = match k.as_ref() {
            "code" => &mut code,
            "state" => &mut state,
            "error" => &mut error,
            "error_description" => &mut description,
            _ => continue,
        };
        if slot.replace(v.into_owned()).is_some() {
            return Err(Refusal::Malformed(format!("{k} is given twice")));
        }
    }
    match (&state, &error) {
        (Some(s), _) if !constant_time_eq(s.as_bytes(), expected_state.as_bytes()) => {
            return Err(Refusal::StateMismatch);
        }
        // An error with no state stores nothing either way: report it.
        (None, None) => return Err(Refusal::StateMismatch),
        _ => {}
    }
    if let Some(error) = error {
        return Err(Refusal::Provider {
            error: sanitize(&error),
            description: description.map(|d| sanitize(&d)).filter(|d| !d.is_empty()),
        });
    }
    match code {
        Some(c) if !c.is_empty() => Ok(Secret::new(c)),
        _ => Err(Refusal::Malformed("it has neither code nor error".into())),
    }
}

/// What `tokend authorize --paste` read.
#[derive(Debug)]
pub struct Pasted {
    pub code: Secret,
    /// False for a bare code: it came without a `state` to check.
    pub state_checked: bool,
}

/// The code in what the user pasted: the whole redirect address (state is
/// checked), its query, or the bare code (nothing to check it against).
/// The error says why nothing usable was pasted.
pub fn pasted(text: &str, state: &str) -> Result<Pasted, String> {
    if text.is_empty() {
        return Err("nothing was pasted".into());
    }
    let query = if text.contains("://") {
        let url =
            Url::parse(text).map_err(|e| format!("the pasted address cannot be read ({e})"))?;
        url.query().unwrap_or_default().to_owned()
    } else if text.contains('=') {
        text.trim_start_matches('?').to_owned()
    } else if text.contains(char::is_whitespace) {
        return Err(
            "paste the whole address from the browser's address bar, or just the code".into(),
        );
    } else {
        return Ok(Pasted {
            code: Secret::new(text),
            state_checked: false,
        });
    };
    let code = answer(&query, state).map_err(|r| r.describe())?;
    Ok(Pasted {
        code,
        state_checked: true,
    })
}

/// Whether a query looks like an authorization answer at all (carries
/// `code`, `error` or `state`), as opposed to a stray visit to the path.
pub fn is_answer(query: &str) -> bool {
    query.split('&').any(|kv| {
        let k = kv.split('=').next().unwrap_or_default();
        matches!(k, "code" | "error" | "state")
    })
}

/// Text from the redirect, fit to print: control characters (terminal
/// escapes) dropped, bounded.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_DESCRIPTION)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Compares without an early exit, so timing says nothing about `state`.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Env};
    use std::path::Path;

    struct NoSecrets;
    impl Env for NoSecrets {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
        fn read_secrets(&self) -> bool {
            false
        }
    }

    fn provider(extra: &str) -> ProviderConfig {
        let text = format!(
            "[providers.p]\nclient_id = \"cid 1\"\nclient_secret_env = \"X\"\n\
             redirect_uri = \"http://127.0.0.1:8765/callback\"\n{extra}"
        );
        let c =
            config::parse(&text, Path::new("t.toml"), &NoSecrets).unwrap_or_else(|e| panic!("{e}"));
        (*c.providers["p"]).clone()
    }

    #[test]
    fn pandadoc_url_has_the_documented_shape() {
        let p = provider("preset = \"pandadoc\"\n");
        let r = Request::new(&p, p.redirect_uri.as_ref().unwrap()).unwrap();
        let expected = "https://app.pandadoc.com/oauth2/authorize?client_id=cid+1\
            &redirect_uri=http%3A%2F%2F127.0.0.1%3A8765%2Fcallback&scope=read+write\
            &response_type=code&state=";
        assert!(r.url.starts_with(expected), "{}", r.url);
        assert_eq!(r.url[expected.len()..], r.state);
        assert!(r.verifier.is_none());
        let eu = provider("preset = \"pandadoc-eu\"\n");
        let r = Request::new(&eu, eu.redirect_uri.as_ref().unwrap()).unwrap();
        assert!(
            r.url
                .starts_with("https://app.pandadoc.eu/oauth2/authorize?client_id=")
        );
    }

    #[test]
    fn state_is_fresh_and_long() {
        let p = provider("preset = \"pandadoc\"\n");
        let a = Request::new(&p, p.redirect_uri.as_ref().unwrap()).unwrap();
        let b = Request::new(&p, p.redirect_uri.as_ref().unwrap()).unwrap();
        assert_ne!(a.state, b.state);
        // 256 bits in base64url: 43 characters of the URL-safe alphabet.
        assert_eq!(a.state.len(), 43);
        assert!(
            a.state
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn pkce_and_extra_params_follow_the_documented_ones() {
        let p = provider(
            "authorize_url = \"https://id.example/auth?tenant=t\"\n\
             token_url = \"https://id.example/token\"\nvalidate_url = \"https://id.example/me\"\n\
             scope = \"openid email\"\npkce = true\n\
             authorize_params = { prompt = \"consent\", access_type = \"offline\" }\n",
        );
        let r = Request::new(&p, p.redirect_uri.as_ref().unwrap()).unwrap();
        let v = r.verifier.as_ref().unwrap();
        assert_eq!(v.expose().len(), 43);
        let tail = format!(
            "&scope=openid+email&response_type=code&state={}&code_challenge={}\
             &code_challenge_method=S256&access_type=offline&prompt=consent",
            r.state,
            pkce_challenge(v.expose())
        );
        assert!(
            r.url
                .starts_with("https://id.example/auth?tenant=t&client_id="),
            "{}",
            r.url
        );
        assert!(r.url.ends_with(&tail), "{}", r.url);
    }

    #[test]
    fn pkce_s256_matches_rfc_7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn scope_separators_become_literal_plus() {
        assert_eq!(encode_scope("read+write"), "read+write");
        assert_eq!(encode_scope(" read  write "), "read+write");
        assert_eq!(encode_scope("a:b/c"), "a%3Ab%2Fc");
    }

    #[test]
    fn answers() {
        let code = answer("code=c1&state=s&iss=https%3A%2F%2Fx", "s").unwrap();
        assert_eq!(code.expose(), "c1");
        assert_eq!(answer("code=c1&state=t", "s"), Err(Refusal::StateMismatch));
        assert_eq!(answer("code=c1", "s"), Err(Refusal::StateMismatch));
        assert_eq!(answer("", "s"), Err(Refusal::StateMismatch));
        assert!(matches!(
            answer("code=a&code=b&state=s", "s"),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(answer("state=s", "s"), Err(Refusal::Malformed(_))));
        let denied = answer(
            "error=access_denied&error_description=User+said+%1B%5B31mno&state=s",
            "s",
        )
        .unwrap_err();
        assert_eq!(
            denied,
            Refusal::Provider {
                error: "access_denied".into(),
                description: Some("User said [31mno".into())
            }
        );
        assert!(denied.describe().contains("access_denied (User said"));
        // A forged error is still a forgery.
        assert_eq!(
            answer("error=access_denied&state=x", "s"),
            Err(Refusal::StateMismatch)
        );
        assert!(matches!(
            answer("error=server_error", "s"),
            Err(Refusal::Provider { .. })
        ));
        assert!(is_answer("x=1&code=2"));
        assert!(!is_answer("x=1&codes=2"));
    }

    #[test]
    fn pasted_addresses_queries_and_codes() {
        let code = |t| pasted(t, "s").map(|p| (p.code.expose().to_owned(), p.state_checked));
        assert_eq!(
            code("http://127.0.0.1:8765/callback?code=c1&state=s").unwrap(),
            ("c1".into(), true)
        );
        assert_eq!(code("?code=c2&state=s").unwrap(), ("c2".into(), true));
        assert_eq!(code("c3").unwrap(), ("c3".into(), false));
        let e = code("http://127.0.0.1:8765/callback?code=c1&state=old").unwrap_err();
        assert!(e.contains("state does not match"), "{e}");
        assert!(code("").is_err());
        assert!(code("two words").is_err());
        let e = code("https://x/cb?error=access_denied&state=s").unwrap_err();
        assert!(e.contains("access_denied"), "{e}");
    }
}
