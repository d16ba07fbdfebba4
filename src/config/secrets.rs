//! Client secrets: exactly one of `client_secret_file`,
//! `client_secret_env` and `client_secret_credential` (systemd's
//! `LoadCredential=`) per provider, read at load unless the command never
//! talks to a provider. The only part of loading that reads secrets, so
//! what it may say about them is in one place.

use std::path::Path;

use super::Env;
use super::errors::{SHOWN, cut, shown};
use super::raw::RawProvider;
use crate::names::check_name;
use crate::secret::Secret;

/// The provider's client secret, or the key to blame and why. (Checked
/// text only: what a message says of a secret is decided here.)
pub(super) fn load_secret(
    name: &str,
    r: &RawProvider,
    env: &dyn Env,
) -> Result<Secret, (String, String)> {
    let k = |field: &str| format!("providers.{name}.{field}");
    let given = [
        r.client_secret_file.is_some(),
        r.client_secret_env.is_some(),
        r.client_secret_credential.is_some(),
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    if given != 1 {
        return Err((
            k("client_secret_file"),
            "give exactly one of client_secret_file, client_secret_env, client_secret_credential"
                .to_owned(),
        ));
    }
    if !env.read_secrets() {
        return Ok(Secret::new(""));
    }
    let (key, text) = if let Some(f) = &r.client_secret_file {
        (k("client_secret_file"), read_secret_file(Path::new(f)))
    } else if let Some(var) = &r.client_secret_env {
        (
            k("client_secret_env"),
            env.var(var).ok_or_else(|| {
                format!(
                    "the environment variable {} is not set or empty",
                    cut(var, SHOWN)
                )
            }),
        )
    } else {
        let cred = r.client_secret_credential.as_deref().unwrap_or_default();
        let text = match env.var("CREDENTIALS_DIRECTORY") {
            None => Err(
                "$CREDENTIALS_DIRECTORY is not set: pass the secret with LoadCredential= in the unit"
                    .to_owned(),
            ),
            Some(_) if check_name(cred).is_err() => {
                Err(format!("{} is not a credential name", shown(cred)))
            }
            Some(dir) => read_secret_file(&Path::new(&dir).join(cred)),
        };
        (k("client_secret_credential"), text)
    };
    match text {
        Ok(s) if !s.trim().is_empty() => Ok(Secret::new(s.trim())),
        Ok(_) => Err((key, "the secret is empty".to_owned())),
        Err(e) => Err((key, e)),
    }
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e}",
            cut(&path.display().to_string(), SHOWN)
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use crate::config::parse;
    use crate::config::testing::{FakeEnv, PANDADOC, problems};

    #[test]
    fn secret_from_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pd"), "from-cred\n").unwrap();
        let e = FakeEnv(HashMap::from([(
            "CREDENTIALS_DIRECTORY",
            dir.path().display().to_string(),
        )]));
        let text = PANDADOC.replace(
            "client_secret_env = \"PD_SECRET\"",
            "client_secret_credential = \"pd\"",
        );
        let c = parse(&text, Path::new("t.toml"), &e).unwrap();
        assert_eq!(c.providers["pandadoc"].client_secret.expose(), "from-cred");
        let e = problems(&text.replace("\"pd\"", "\"missing\""));
        assert!(e[0].contains("CREDENTIALS_DIRECTORY"), "{e:?}");
    }
}
