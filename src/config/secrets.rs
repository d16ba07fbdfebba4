//! Client secrets: exactly one of `client_secret_file`,
//! `client_secret_env` and `client_secret_credential` (systemd's
//! `LoadCredential=`) per provider, read at load unless the command never
//! talks to a provider. The only part of loading that reads secrets, so
//! what it may say about them is in one place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::errors::{SHOWN, cut, shown};
use super::raw::{RawConfig, RawProvider};
use super::{Env, Sealing};
use crate::names::check_name;
use crate::seal::Kek;
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

/// The key that seals the store's token columns (README "Secrets at
/// rest"): `encryption_key_file` or `encryption_key_credential` (a name
/// under `$CREDENTIALS_DIRECTORY`), at most one. Read even by commands that
/// leave client secrets unread: every command that reads or writes a
/// token in a sealed store needs it. The message names the file and why
/// it is refused (unreadable, open to group or others, not 32 bytes),
/// never a byte of it.
pub(super) fn load_encryption_key(
    r: &RawConfig,
    env: &dyn Env,
) -> Result<Option<Sealing>, (String, String)> {
    let (source, path): (&'static str, PathBuf) =
        match (&r.encryption_key_file, &r.encryption_key_credential) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err((
                    "encryption_key_file".to_owned(),
                    "give at most one of encryption_key_file, encryption_key_credential".to_owned(),
                ));
            }
            (Some(f), None) => {
                if !Path::new(f).is_absolute() {
                    return Err((
                        "encryption_key_file".to_owned(),
                        format!("{} must be an absolute path", shown(f)),
                    ));
                }
                ("encryption_key_file", PathBuf::from(f))
            }
            (None, Some(cred)) => {
                let key = "encryption_key_credential";
                if check_name(cred).is_err() {
                    return Err((
                        key.to_owned(),
                        format!("{} is not a credential name", shown(cred)),
                    ));
                }
                match env.var("CREDENTIALS_DIRECTORY") {
                    None => {
                        return Err((
                            key.to_owned(),
                            "$CREDENTIALS_DIRECTORY is not set: pass the key with \
                             LoadCredential= in the unit (or use encryption_key_file)"
                                .to_owned(),
                        ));
                    }
                    Some(dir) => (key, Path::new(&dir).join(cred)),
                }
            }
        };
    let credentials_dir = env.var("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let kek = Kek::load(&path, credentials_dir.as_deref())
        .map_err(|e| (source.to_owned(), e.to_string()))?;
    Ok(Some(Sealing {
        source,
        path,
        kek: Arc::new(kek),
    }))
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

    fn key_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.display().to_string()
    }

    #[test]
    fn the_encryption_key_is_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let key = [0x5au8; 31]
            .iter()
            .chain(&[0x01])
            .copied()
            .collect::<Vec<u8>>();
        let good = key_file(dir.path(), "good", &key, 0o600);
        let c = crate::config::testing::parse_ok(&format!(
            "encryption_key_file = \"{good}\"\n{PANDADOC}"
        ));
        let s = c.sealing.expect("sealing on");
        assert_eq!(s.source, "encryption_key_file");
        assert_eq!(s.kek.fingerprint().len(), 16);
        assert!(crate::config::testing::parse_ok(PANDADOC).sealing.is_none());
        // Open to the group, too short, missing, relative, both keys.
        let loose = key_file(dir.path(), "loose", &key, 0o640);
        let short = key_file(dir.path(), "short", &[0xff; 20], 0o600);
        for (line, why) in [
            (
                format!("encryption_key_file = \"{loose}\""),
                "group or others may access it (mode 0640)",
            ),
            (
                format!("encryption_key_file = \"{short}\""),
                "holds 20 bytes",
            ),
            (
                "encryption_key_file = \"/nonexistent/key\"".to_owned(),
                "cannot read it",
            ),
            (
                "encryption_key_file = \"key\"".to_owned(),
                "must be an absolute path",
            ),
            (
                format!("encryption_key_file = \"{good}\"\nencryption_key_credential = \"k\""),
                "at most one",
            ),
            (
                "encryption_key_credential = \"k\"".to_owned(),
                "CREDENTIALS_DIRECTORY is not set",
            ),
        ] {
            let e = problems(&format!("{line}\n{PANDADOC}"));
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(
                e[0].contains("encryption_key_") && e[0].contains(why),
                "{e:?}"
            );
        }
        // A credential, which systemd keeps private whatever its mode.
        let creds = tempfile::tempdir().unwrap();
        key_file(creds.path(), "tokend-key", &key, 0o644);
        let e = FakeEnv(HashMap::from([
            ("PD_SECRET", "s".to_owned()),
            ("CREDENTIALS_DIRECTORY", creds.path().display().to_string()),
        ]));
        let text = format!("encryption_key_credential = \"tokend-key\"\n{PANDADOC}");
        let c = parse(&text, Path::new("t.toml"), &e).unwrap();
        assert_eq!(
            c.sealing.unwrap().kek.fingerprint(),
            s.kek.fingerprint(),
            "the same key, the same fingerprint"
        );
    }

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
