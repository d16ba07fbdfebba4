use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::*;
use crate::secret::Secret;

const REFRESH: &str = "SECRET-refresh-token-7f3a9c";
const ACCESS: &str = "SECRET-access-token-1b2c3d";

/// A key that is not text (a raw key of printable bytes is refused).
fn key_bytes(seed: u8) -> [u8; 32] {
    let mut k = [0xa5u8; 32];
    k[0] = seed;
    k[31] = seed.wrapping_add(1);
    k
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_key(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn kek(dir: &Path, seed: u8) -> Kek {
    let p = write_key(dir, &format!("key{seed}"), &key_bytes(seed), 0o600);
    Kek::load(&p, None).unwrap()
}

fn key_file_error(content: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write_key(dir.path(), "bad-key", content, 0o600);
    let e = Kek::load(&p, None).unwrap_err();
    assert!(
        matches!(
            e,
            SealError::KeyFile {
                problem: KeyFileProblem::Format(_),
                ..
            }
        ),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains(&*p.to_string_lossy()), "{text}");
    text
}

#[test]
fn seal_then_open_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let kek = kek(dir.path(), 1);
    let (ring, wrapped) = Keyring::create(&kek, 1_700_000_000_000).unwrap();
    assert_eq!((wrapped.id, wrapped.created_at), (1, 1_700_000_000_000));
    assert!(!wrapped.wrapped.contains(&hex(&key_bytes(1))));

    let sealed = ring
        .seal("sales-bot", Column::RefreshToken, &Secret::new(REFRESH))
        .unwrap();
    assert!(sealed.starts_with("tokend-seal:v1:1:"), "{sealed}");
    assert!(sealed.is_ascii() && !sealed.contains(REFRESH));
    assert!(is_sealed(&sealed));
    assert_eq!(sealed_with(&sealed), Some(1));
    let opened = ring
        .open("sales-bot", Column::RefreshToken, &sealed)
        .unwrap();
    assert_eq!(opened.expose(), REFRESH);

    // A fresh nonce each time; the empty value and non-ASCII survive too.
    let again = ring
        .seal("sales-bot", Column::RefreshToken, &Secret::new(REFRESH))
        .unwrap();
    assert_ne!(sealed, again);
    for v in ["", "jeton-é-✓"] {
        let s = ring
            .seal("sales-bot", Column::AccessToken, &Secret::new(v))
            .unwrap();
        let o = ring.open("sales-bot", Column::AccessToken, &s).unwrap();
        assert_eq!(o.expose(), v);
    }

    // The keys table, read back by another process with the same key file.
    let reloaded = Keyring::load(&kek, &[wrapped]).unwrap();
    let opened = reloaded
        .open("sales-bot", Column::RefreshToken, &sealed)
        .unwrap();
    assert_eq!(opened.expose(), REFRESH);
}

#[test]
fn a_value_moved_to_another_credential_or_column_does_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let (ring, _) = Keyring::create(&kek(dir.path(), 1), 0).unwrap();
    let sealed = ring
        .seal("sales-bot", Column::RefreshToken, &Secret::new(REFRESH))
        .unwrap();
    for (name, column) in [
        ("sales-bot", Column::AccessToken),
        ("other-bot", Column::RefreshToken),
        ("sales-bo", Column::RefreshToken),
    ] {
        let e = ring.open(name, column, &sealed).unwrap_err();
        assert!(
            matches!(&e, SealError::Corrupt { what: Subject::Value(n, c), key: Some(1) }
                if n == name && *c == column),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("copied from another credential or column"),
            "{text}"
        );
    }
}

#[test]
fn a_wrong_kek_is_named_with_both_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let right = kek(dir.path(), 1);
    let wrong = kek(dir.path(), 2);
    assert_ne!(right.fingerprint(), wrong.fingerprint());
    assert_eq!(right.fingerprint().len(), 16);
    let (_, wrapped) = Keyring::create(&right, 0).unwrap();

    let e = Keyring::load(&wrong, std::slice::from_ref(&wrapped)).unwrap_err();
    assert!(matches!(e, SealError::WrongKek { key: 1, .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains(right.fingerprint()) && text.contains(wrong.fingerprint()),
        "{text}"
    );

    // A wrapped key that claims the loaded key's fingerprint but was
    // wrapped by another is damaged, not "wrong key".
    let forged = WrappedKey {
        wrapped: wrapped
            .wrapped
            .replace(right.fingerprint(), wrong.fingerprint()),
        ..wrapped.clone()
    };
    let e = Keyring::load(&wrong, &[forged]).unwrap_err();
    assert!(
        matches!(
            e,
            SealError::Corrupt {
                what: Subject::DataKey(1),
                key: None
            }
        ),
        "{e:?}"
    );

    // A wrapped key moved to another id does not unwrap either.
    let moved = WrappedKey { id: 2, ..wrapped };
    let e = Keyring::load(&right, &[moved]).unwrap_err();
    assert!(
        matches!(
            e,
            SealError::Corrupt {
                what: Subject::DataKey(2),
                key: None
            }
        ),
        "{e:?}"
    );
}

#[test]
fn tampered_values_and_keys_are_corrupt_not_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let kek = kek(dir.path(), 1);
    let (mut ring, first) = Keyring::create(&kek, 0).unwrap();
    let sealed = ring
        .seal("sales-bot", Column::RefreshToken, &Secret::new(REFRESH))
        .unwrap();
    let body_at = "tokend-seal:v1:1:".len();

    // Every character of the body, changed, fails to open.
    for i in body_at..sealed.len() {
        let mut b = sealed.clone().into_bytes();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        let t = String::from_utf8(b).unwrap();
        let e = ring
            .open("sales-bot", Column::RefreshToken, &t)
            .unwrap_err();
        assert!(matches!(e, SealError::Corrupt { .. }), "at {i}: {e:?}");
    }
    // Truncated, padded, emptied, not base64, a malformed id.
    for t in [
        sealed[..sealed.len() - 1].to_owned(),
        format!("{sealed}A"),
        "tokend-seal:v1:1:".to_owned(),
        "tokend-seal:v1:1:!!!".to_owned(),
        sealed.replacen(":1:", ":01:", 1),
        sealed.replacen(":1:", ":+1:", 1),
        sealed.replacen(":1:", "::", 1),
        "tokend-seal:".to_owned(),
        "tokend-seal:x".to_owned(),
    ] {
        let e = ring
            .open("sales-bot", Column::RefreshToken, &t)
            .unwrap_err();
        assert!(matches!(e, SealError::Corrupt { .. }), "{t}: {e:?}");
    }
    // Sealed with another key of the same keyring: the id is bound in.
    ring.rotate(&kek, 1).unwrap();
    let e = ring
        .open(
            "sales-bot",
            Column::RefreshToken,
            &sealed.replacen(":1:", ":2:", 1),
        )
        .unwrap_err();
    assert!(
        matches!(e, SealError::Corrupt { key: Some(2), .. }),
        "{e:?}"
    );
    // An id no key has is not "corrupt": the keys table is behind.
    let e = ring
        .open(
            "sales-bot",
            Column::RefreshToken,
            &sealed.replacen(":1:", ":9:", 1),
        )
        .unwrap_err();
    assert!(matches!(e, SealError::UnknownKey { key: 9, .. }), "{e:?}");
    assert!(e.to_string().contains("data key 9"), "{e}");
    // A newer format is named as such.
    let e = ring
        .open("sales-bot", Column::RefreshToken, "tokend-seal:v2:1:AAAA")
        .unwrap_err();
    assert!(matches!(e, SealError::NewerFormat(_)), "{e:?}");
    assert!(e.to_string().contains("upgrade tokend"), "{e}");

    // A damaged wrapped key.
    let body_at = first.wrapped.rfind(':').unwrap() + 1;
    let mut b = first.wrapped.clone().into_bytes();
    b[body_at + 3] = if b[body_at + 3] == b'A' { b'B' } else { b'A' };
    let damaged = WrappedKey {
        wrapped: String::from_utf8(b).unwrap(),
        ..first.clone()
    };
    let e = Keyring::load(&kek, &[damaged]).unwrap_err();
    assert!(matches!(e, SealError::Corrupt { .. }), "{e:?}");
    let newer = WrappedKey {
        wrapped: "tokend-kek:v2:whatever".to_owned(),
        ..first
    };
    let e = Keyring::load(&kek, &[newer]).unwrap_err();
    assert!(
        matches!(e, SealError::NewerFormat(Subject::DataKey(1))),
        "{e:?}"
    );
    assert!(matches!(
        Keyring::load(&kek, &[]).unwrap_err(),
        SealError::NoKeys
    ));
}

#[test]
fn plaintext_passes_through_and_is_resealed() {
    let dir = tempfile::tempdir().unwrap();
    let (ring, _) = Keyring::create(&kek(dir.path(), 1), 0).unwrap();
    let opened = ring
        .open("sales-bot", Column::RefreshToken, REFRESH)
        .unwrap();
    assert_eq!(opened.expose(), REFRESH);
    assert!(!is_sealed(REFRESH));
    assert_eq!(sealed_with(REFRESH), None);

    let sealed = ring
        .reseal("sales-bot", Column::RefreshToken, REFRESH)
        .unwrap()
        .expect("plaintext is re-sealed");
    assert_eq!(sealed_with(&sealed), Some(1));
    let opened = ring
        .open("sales-bot", Column::RefreshToken, &sealed)
        .unwrap();
    assert_eq!(opened.expose(), REFRESH);
    // Already sealed with the active key: nothing to write.
    assert_eq!(
        ring.reseal("sales-bot", Column::RefreshToken, &sealed)
            .unwrap(),
        None
    );
}

#[test]
fn kek_rotation_rewraps_the_keys_and_every_value_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let old = kek(dir.path(), 1);
    let new = kek(dir.path(), 2);
    let (mut ring, k1) = Keyring::create(&old, 10).unwrap();
    let names = ["a", "b", "c"];
    let mut values: Vec<String> = names
        .iter()
        .map(|n| {
            ring.seal(
                n,
                Column::RefreshToken,
                &Secret::new(format!("{REFRESH}-{n}")),
            )
            .unwrap()
        })
        .collect();
    let k2 = ring.rotate(&old, 20).unwrap();
    values.push(
        ring.seal("d", Column::AccessToken, &Secret::new(ACCESS))
            .unwrap(),
    );

    let table = rewrap(&[k1.clone(), k2.clone()], &old, &new).unwrap();
    assert_eq!(
        table
            .iter()
            .map(|k| (k.id, k.created_at))
            .collect::<Vec<_>>(),
        [(1, 10), (2, 20)]
    );
    assert_ne!(table[0].wrapped, k1.wrapped);
    assert!(table[0].wrapped.contains(new.fingerprint()));

    let ring = Keyring::load(&new, &table).unwrap();
    assert_eq!(ring.active_key(), 2);
    for (n, v) in names.iter().zip(&values) {
        let opened = ring.open(n, Column::RefreshToken, v).unwrap();
        assert_eq!(opened.expose(), format!("{REFRESH}-{n}"));
    }
    let opened = ring.open("d", Column::AccessToken, &values[3]).unwrap();
    assert_eq!(opened.expose(), ACCESS);

    // The old key no longer opens the table; rewrapping with the wrong
    // old key is refused before anything is written.
    let e = Keyring::load(&old, &table).unwrap_err();
    assert!(matches!(e, SealError::WrongKek { .. }), "{e:?}");
    let e = rewrap(&table, &old, &new).unwrap_err();
    assert!(matches!(e, SealError::WrongKek { .. }), "{e:?}");
}

#[test]
fn dek_rotation_keeps_old_values_and_seals_with_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let kek = kek(dir.path(), 1);
    let (mut ring, k1) = Keyring::create(&kek, 0).unwrap();
    let old = ring
        .seal("sales-bot", Column::RefreshToken, &Secret::new(REFRESH))
        .unwrap();
    let k2 = ring.rotate(&kek, 5).unwrap();
    assert_eq!((k2.id, k2.created_at, ring.active_key()), (2, 5, 2));
    let new = ring
        .seal("sales-bot", Column::RefreshToken, &Secret::new(REFRESH))
        .unwrap();
    assert!(new.starts_with("tokend-seal:v1:2:"), "{new}");
    for v in [&old, &new] {
        let opened = ring.open("sales-bot", Column::RefreshToken, v).unwrap();
        assert_eq!(opened.expose(), REFRESH);
    }

    // A host that loads the table sees the same: the highest id is active.
    let other = Keyring::load(&kek, &[k2.clone(), k1.clone()]).unwrap();
    assert_eq!(other.active_key(), 2);
    let opened = other.open("sales-bot", Column::RefreshToken, &old).unwrap();
    assert_eq!(opened.expose(), REFRESH);

    // The re-seal pass moves old values to the new key; once none is
    // left, key 1 can go, and the keyring opens everything without it.
    let moved = ring
        .reseal("sales-bot", Column::RefreshToken, &old)
        .unwrap()
        .unwrap();
    assert_eq!(sealed_with(&moved), Some(2));
    let without_1 = Keyring::load(&kek, &[k2]).unwrap();
    let opened = without_1
        .open("sales-bot", Column::RefreshToken, &moved)
        .unwrap();
    assert_eq!(opened.expose(), REFRESH);
    let e = without_1
        .open("sales-bot", Column::RefreshToken, &old)
        .unwrap_err();
    assert!(matches!(e, SealError::UnknownKey { key: 1, .. }), "{e:?}");
}

#[test]
fn key_files_raw_hex_and_base64_are_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_bytes(7);
    let b64 = STANDARD.encode(key);
    let spellings: Vec<Vec<u8>> = vec![
        key.to_vec(),
        hex(&key).into_bytes(),
        format!("{}\n", hex(&key)).into_bytes(),
        format!("{}\r\n", hex(&key).to_uppercase()).into_bytes(),
        b64.clone().into_bytes(),
        format!("{b64}\n").into_bytes(),
        format!("{}\n", b64.trim_end_matches('=')).into_bytes(),
    ];
    let prints: Vec<String> = spellings
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = write_key(dir.path(), &format!("k{i}"), s, 0o600);
            Kek::load(&p, None).unwrap().fingerprint().to_owned()
        })
        .collect();
    assert!(prints.iter().all(|p| *p == prints[0]), "{prints:?}");
    // A file of 32 bytes is raw even when it ends in a newline byte.
    let mut raw = key;
    raw[31] = b'\n';
    let p = write_key(dir.path(), "raw-nl", &raw, 0o400);
    assert_ne!(Kek::load(&p, None).unwrap().fingerprint(), prints[0]);
}

#[test]
fn key_files_in_no_accepted_spelling_are_refused_with_the_reason() {
    let key = key_bytes(7);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (Vec::new(), "is empty"),
        (b"\n".to_vec(), "is empty"),
        (key[..31].to_vec(), "holds 31 bytes"),
        ([&key[..], b"\n"].concat(), "holds 33 bytes"),
        (
            format!("{}zz", &hex(&key)[..62]).into_bytes(),
            "not all hex digits",
        ),
        (hex(&key[..16]).into_bytes(), "32 characters of text"),
        (
            format!("{}\n", STANDARD.encode(&key[..24])).into_bytes(),
            "base64 of 24 bytes",
        ),
        (vec![0u8; 32], "zero bytes only"),
        ("0".repeat(64).into_bytes(), "zero bytes only"),
        (vec![b'a'; 500], "larger than 128 bytes"),
    ];
    for (content, reason) in cases {
        let text = key_file_error(&content);
        assert!(text.contains(reason), "{reason:?} not in {text:?}");
        assert!(!text.contains(&hex(&key[..16])), "{text}");
    }

    let dir = tempfile::tempdir().unwrap();
    let e = Kek::load(&dir.path().join("missing"), None).unwrap_err();
    assert!(
        matches!(&e, SealError::KeyFile { problem: KeyFileProblem::Unreadable(_), path }
            if path.ends_with("missing")),
        "{e:?}"
    );
    let e = Kek::load(dir.path(), None).unwrap_err();
    assert!(e.to_string().contains("is not a regular file"), "{e}");
}

#[test]
fn a_key_file_others_may_read_is_refused_outside_the_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    let creds = tempfile::tempdir().unwrap();
    let key = key_bytes(3);
    for mode in [0o640, 0o604, 0o620, 0o610, 0o644, 0o666] {
        let p = write_key(dir.path(), "key", &key, mode);
        let e = Kek::load(&p, Some(creds.path())).unwrap_err();
        assert!(
            matches!(&e, SealError::KeyFile { problem: KeyFileProblem::OpenToOthers(m), .. }
                if *m == mode),
            "{mode:o}: {e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains(&format!("mode 0{mode:o}")) && text.contains("chmod 600"),
            "{text}"
        );
    }
    for mode in [0o600, 0o400] {
        let p = write_key(dir.path(), "key", &key, mode);
        Kek::load(&p, None).unwrap();
    }

    // systemd's credentials directory is private to the service: a
    // group-readable credential there is fine, a symlink there to a loose
    // file elsewhere is not.
    let p = write_key(creds.path(), KEY_CREDENTIAL, &key, 0o440);
    Kek::load(&p, Some(creds.path())).unwrap();
    let e = Kek::load(&p, None).unwrap_err();
    assert!(e.to_string().contains("mode 0440"), "{e}");
    let loose = write_key(dir.path(), "loose", &key, 0o644);
    let link = creds.path().join("link");
    symlink(&loose, &link).unwrap();
    let e = Kek::load(&link, Some(creds.path())).unwrap_err();
    assert!(e.to_string().contains("mode 0644"), "{e}");
    let climbing = creds
        .path()
        .join("..")
        .join(dir.path().file_name().unwrap())
        .join("loose");
    let e = Kek::load(&climbing, Some(creds.path())).unwrap_err();
    assert!(e.to_string().contains("mode 0644"), "{e}");
}

#[test]
fn the_key_is_found_explicitly_else_in_the_credentials_directory() {
    let creds = tempfile::tempdir().unwrap();
    let explicit = Path::new("/etc/tokend/key");
    assert_eq!(find_key_file(None, None), None);
    assert_eq!(find_key_file(None, Some(creds.path())), None);
    assert_eq!(find_key_file(None, Some(Path::new(""))), None);
    assert_eq!(
        find_key_file(Some(explicit), Some(creds.path())).as_deref(),
        Some(explicit)
    );

    let p = write_key(creds.path(), KEY_CREDENTIAL, &key_bytes(4), 0o400);
    assert_eq!(find_key_file(None, Some(creds.path())), Some(p.clone()));
    assert_eq!(
        find_key_file(Some(explicit), Some(creds.path())).as_deref(),
        Some(explicit)
    );
    let found = find_key_file(None, Some(creds.path())).unwrap();
    let kek = Kek::load(&found, Some(creds.path())).unwrap();
    assert_eq!(format!("{kek:?}"), format!("Kek({})", kek.fingerprint()));
}

#[test]
fn error_texts_hold_no_secret_key_or_ciphertext() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_bytes(1);
    let right = kek(dir.path(), 1);
    let other = kek(dir.path(), 2);
    let (ring, wrapped) = Keyring::create(&right, 0).unwrap();
    let sealed = ring
        .seal("sales-bot", Column::RefreshToken, &Secret::new(REFRESH))
        .unwrap();
    let body = sealed.rsplit(':').next().unwrap().to_owned();
    let wrapped_body = wrapped.wrapped.rsplit(':').next().unwrap().to_owned();

    let mut errors = vec![
        Keyring::load(&other, std::slice::from_ref(&wrapped)).unwrap_err(),
        ring.open("other", Column::RefreshToken, &sealed)
            .unwrap_err(),
        ring.open("sales-bot", Column::AccessToken, &sealed)
            .unwrap_err(),
        ring.open("x", Column::RefreshToken, &sealed.replacen(":1:", ":7:", 1))
            .unwrap_err(),
        ring.open("x", Column::RefreshToken, &format!("{sealed}!"))
            .unwrap_err(),
        ring.open("x", Column::RefreshToken, &format!("tokend-seal:v9:{body}"))
            .unwrap_err(),
    ];
    // A fingerprint field that is not one is not echoed from the database.
    let planted = WrappedKey {
        wrapped: format!("tokend-kek:v1:{REFRESH}:{wrapped_body}"),
        ..wrapped.clone()
    };
    errors.push(Keyring::load(&right, &[planted]).unwrap_err());
    for content in [
        format!("{}{}", &hex(&key)[..60], "SECR"),
        format!("{REFRESH}{REFRESH}"),
        format!("{}\n", STANDARD.encode(&key[..31])),
        format!("{REFRESH}12345"),
    ] {
        let p = write_key(dir.path(), "bad", content.as_bytes(), 0o600);
        errors.push(Kek::load(&p, None).unwrap_err());
    }
    let loose = write_key(dir.path(), "loose", &key, 0o644);
    errors.push(Kek::load(&loose, None).unwrap_err());

    let forbidden = [
        REFRESH.to_owned(),
        "SECR".to_owned(),
        hex(&key),
        hex(&key[..8]),
        STANDARD.encode(key),
        body.clone(),
        body[..12].to_owned(),
        wrapped_body.clone(),
        wrapped_body[..12].to_owned(),
    ];
    for e in &errors {
        for shown in [e.to_string(), format!("{e:?}")] {
            for f in &forbidden {
                assert!(!shown.contains(f.as_str()), "{f:?} in {shown:?}");
            }
        }
    }
    for shown in [format!("{ring:?}"), format!("{right:?}")] {
        assert!(!shown.contains(&hex(&key)), "{shown}");
    }
}
