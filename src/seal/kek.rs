//! The key-encryption key: where it is found, what a key file may hold, and
//! who may read it (docs/design.md section 6).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT;
use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use ring::hkdf;
use zeroize::Zeroizing;

use super::{KeyFileProblem, SealError};

/// The name of the key under `$CREDENTIALS_DIRECTORY`, so that a unit's
/// `LoadCredential=tokend-key:/etc/tokend/key` (or `LoadCredentialEncrypted=`)
/// is all it takes to turn sealing on.
pub const KEY_CREDENTIAL: &str = "tokend-key";

/// The bytes of a key, whatever the file's spelling.
const KEY_LEN: usize = 32;

/// Larger than any accepted spelling (64 hex digits and a CRLF): a file
/// this long is not a key, and is not read further.
const MAX_FILE_LEN: usize = 128;

/// HKDF salt: the KEK is input keying material for two unrelated uses.
const KDF_SALT: &[u8] = b"tokend-seal:v1";
const WRAP_INFO: &[u8] = b"wrap data keys";
const FINGERPRINT_INFO: &[u8] = b"fingerprint";
const FINGERPRINT_LEN: usize = 8;

/// The key-encryption key. It never encrypts a token itself: it wraps the
/// data keys, so that replacing it re-wraps a handful of keys instead of
/// re-encrypting every row.
pub struct Kek {
    wrap: LessSafeKey,
    fingerprint: String,
}

impl Kek {
    /// Reads a key file as an operator makes one (`head -c 32 /dev/urandom`,
    /// `openssl rand -hex 32`, `openssl rand -base64 32`) and refuses one
    /// that others may read, unless systemd put it in `credentials_dir`
    /// (`$CREDENTIALS_DIRECTORY`, private to the service) for us. Errors name
    /// the file and the reason, never a byte of it.
    pub fn load(path: &Path, credentials_dir: Option<&Path>) -> Result<Kek, SealError> {
        let problem = |problem| SealError::KeyFile {
            path: path.to_owned(),
            problem,
        };
        let mut file = File::open(path).map_err(|e| problem(KeyFileProblem::Unreadable(e)))?;
        let meta = file
            .metadata()
            .map_err(|e| problem(KeyFileProblem::Unreadable(e)))?;
        if !meta.is_file() {
            return Err(problem(KeyFileProblem::NotAFile));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 && !is_inside(path, credentials_dir) {
            return Err(problem(KeyFileProblem::OpenToOthers(mode)));
        }
        // A fixed buffer, wiped on drop: `read_to_end` would grow a vector
        // and leave copies behind in freed memory.
        let mut buf = Zeroizing::new([0u8; MAX_FILE_LEN + 1]);
        let mut len = 0;
        while len < buf.len() {
            match file.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(problem(KeyFileProblem::Unreadable(e))),
            }
        }
        if len > MAX_FILE_LEN {
            return Err(problem(KeyFileProblem::Format(format!(
                "is larger than {MAX_FILE_LEN} bytes: {SPELLINGS}"
            ))));
        }
        let key = parse_key(&buf[..len]).map_err(|why| problem(KeyFileProblem::Format(why)))?;
        Ok(Kek::from_key(&key))
    }

    /// A short, one-way name for the key, so that operators can tell which
    /// host holds which key (and which key wrapped the database's data keys)
    /// without ever showing the key.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn from_key(key: &[u8; KEY_LEN]) -> Kek {
        // Two keys from one (RFC 5869): the fingerprint must say nothing
        // about the key that wraps.
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(key);
        let wrap = prk
            .expand(&[WRAP_INFO], &AES_256_GCM)
            .map(UnboundKey::from)
            .expect("HKDF-SHA256 yields 32 bytes");
        let mut print = [0u8; FINGERPRINT_LEN];
        prk.expand(&[FINGERPRINT_INFO], Len(FINGERPRINT_LEN))
            .and_then(|okm| okm.fill(&mut print))
            .expect("HKDF-SHA256 yields 8 bytes");
        Kek {
            wrap: LessSafeKey::new(wrap),
            fingerprint: print.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    pub(super) fn wrapping_key(&self) -> &LessSafeKey {
        &self.wrap
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek({})", self.fingerprint)
    }
}

/// Where the key is, if sealing is on: an explicit path wins; otherwise
/// the systemd credential `tokend-key`, so that the unit alone decides.
/// A credential whose presence cannot be checked is returned anyway, for
/// [`Kek::load`] to say why: a key that is there but unreadable must not
/// quietly turn sealing off.
pub fn find_key_file(explicit: Option<&Path>, credentials_dir: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_owned());
    }
    let dir = credentials_dir.filter(|d| !d.as_os_str().is_empty())?;
    let p = dir.join(KEY_CREDENTIAL);
    match p.try_exists() {
        Ok(false) => None,
        Ok(true) | Err(_) => Some(p),
    }
}

const SPELLINGS: &str = "a key file holds 32 random bytes, 64 hex digits or the base64 of 32 bytes";

/// The key a file's bytes spell, or why they spell none (lengths and kinds
/// only: never the bytes).
fn parse_key(bytes: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if bytes.len() == KEY_LEN {
        // Random bytes are all printable once in 10^14 keys; 32 printable
        // bytes are a password or a short hex or base64 string.
        if bytes.iter().all(u8::is_ascii_graphic) {
            return Err(format!(
                "holds 32 characters of text, not 32 random bytes: {SPELLINGS}"
            ));
        }
        key.copy_from_slice(bytes);
    } else {
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let text = &bytes[..end];
        if text.is_empty() {
            return Err(format!("is empty: {SPELLINGS}"));
        }
        if text.len() == 2 * KEY_LEN {
            if !text.iter().all(u8::is_ascii_hexdigit) {
                return Err("holds 64 characters that are not all hex digits".to_owned());
            }
            for (k, pair) in key.iter_mut().zip(text.chunks(2)) {
                *k = (hex_digit(pair[0]) << 4) | hex_digit(pair[1]);
            }
        } else {
            let decoded = Zeroizing::new(
                STANDARD_PAD_INDIFFERENT
                    .decode(text)
                    .map_err(|_| format!("holds {} bytes: {SPELLINGS}", bytes.len()))?,
            );
            if decoded.len() != KEY_LEN {
                return Err(format!(
                    "holds the base64 of {} bytes, not 32: {SPELLINGS}",
                    decoded.len()
                ));
            }
            key.copy_from_slice(&decoded);
        }
    }
    if key.iter().all(|&b| b == 0) {
        return Err("holds a key of zero bytes only (from /dev/zero?)".to_owned());
    }
    Ok(key)
}

fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// Whether systemd put `path` in its credentials directory. Both sides are
/// resolved, so a symlink there to a file elsewhere is not excused.
fn is_inside(path: &Path, credentials_dir: Option<&Path>) -> bool {
    let Some(dir) = credentials_dir.filter(|d| !d.as_os_str().is_empty()) else {
        return false;
    };
    match (path.canonicalize(), dir.canonicalize()) {
        (Ok(p), Ok(d)) => p != d && p.starts_with(&d),
        _ => false,
    }
}

/// An HKDF output length (ring asks for a type).
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}
