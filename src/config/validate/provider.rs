//! Validation of `[providers.NAME]`, one OAuth 2.0 client registration:
//! its name, preset, URLs (https, or http to this machine), token
//! authentication, and the authorization parameters tokend sets itself.
//! Apart from the rest of validation because a provider has the most keys
//! and the most rules between them.

use reqwest::Url;

use super::Problems;
use crate::config::errors::{SHOWN, cut, shown};
use crate::config::raw::RawProvider;
use crate::config::secrets::load_secret;
use crate::config::{Env, Preset, ProviderConfig, TokenAuth};
use crate::names::check_name;

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

pub(super) fn validate_provider(
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
    let client_secret = load_secret(name, &r, env)
        .map_err(|(key, why)| p.add(key, why))
        .ok();

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
    // Optional, and no preset has them: PandaDoc offers neither.
    let revocation_url = r
        .revocation_url
        .as_deref()
        .map(|s| check_url(&k("revocation_url"), s, p));
    let device_authorization_url = r
        .device_authorization_url
        .as_deref()
        .map(|s| check_url(&k("device_authorization_url"), s, p));

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
        revocation_url: revocation_url.flatten(),
        device_authorization_url: device_authorization_url.flatten(),
        token_auth,
        pkce: r.pkce.unwrap_or(false),
        authorize_params: r.authorize_params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{PANDADOC, parse_ok, problems};

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

    /// Issue 13: the optional endpoints of RFC 7009 and RFC 8628 are URLs
    /// like the others; presets have neither (PandaDoc offers neither).
    #[test]
    fn revocation_and_device_authorization_urls() {
        let c = parse_ok(PANDADOC);
        let p = &c.providers["pandadoc"];
        assert!(p.revocation_url.is_none() && p.device_authorization_url.is_none());
        let c = parse_ok(
            r#"
            [providers.other]
            client_id = "c"
            client_secret_env = "PD_SECRET"
            authorize_url = "https://id.example.com/authorize"
            token_url = "https://id.example.com/token"
            validate_url = "https://api.example.com/me"
            revocation_url = "https://id.example.com/revoke"
            device_authorization_url = "https://id.example.com/device"
            "#,
        );
        let p = &c.providers["other"];
        assert_eq!(
            p.revocation_url.as_ref().map(|u| u.as_str()),
            Some("https://id.example.com/revoke")
        );
        assert_eq!(
            p.device_authorization_url.as_ref().map(|u| u.as_str()),
            Some("https://id.example.com/device")
        );
        let e = problems(&format!(
            "{PANDADOC}revocation_url = \"http://example.com/revoke\"\n\
             device_authorization_url = \"nonsense\"\n"
        ));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e.iter()
                .any(|e| e.starts_with("providers.pandadoc.revocation_url: ")
                    && e.contains("must be https")),
            "{e:?}"
        );
        assert!(
            e.iter().any(
                |e| e.starts_with("providers.pandadoc.device_authorization_url: ")
                    && e.contains("is not a URL")
            ),
            "{e:?}"
        );
    }
}
