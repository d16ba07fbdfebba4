//! Secrets at rest: envelope encryption of the token columns, for a store
//! that lives in a database other people administer (docs/design.md
//! section 6, which also says how to make and rotate each key).
//!
//! A key-encryption key ([`Kek`], from a file or a systemd credential, the
//! same on every host) wraps random data keys; the data keys, kept wrapped
//! in the store ([`WrappedKey`]), seal the tokens ([`Keyring`]). A stored
//! value is `tokend-seal:v1:<data key id>:<base64url(nonce || ciphertext
//! || tag)>`, AES-256-GCM, with the credential's name and the column as
//! associated data. A value without the prefix is plaintext and opens as
//! itself.

mod kek;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::secret::Secret;

pub use kek::{KEY_CREDENTIAL, Kek, find_key_file};

/// What every sealed value starts with; nothing else may, so that a value
/// without it is known to be plaintext from before sealing was turned on.
pub const SEALED_PREFIX: &str = "tokend-seal:";

/// The prefix of a wrapped data key, the fingerprint of the KEK that
/// wrapped it after it.
const WRAPPED_PREFIX: &str = "tokend-kek:v1:";

const FORMAT: &str = "v1:";
const DATA_KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// The column a value belongs to. It is bound into the ciphertext, so a
/// sealed refresh token copied into the access token column (or another
/// credential's row) does not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    AccessToken,
    RefreshToken,
}

impl Column {
    fn as_str(self) -> &'static str {
        match self {
            Column::AccessToken => "access_token",
            Column::RefreshToken => "refresh_token",
        }
    }
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Column::AccessToken => "access token",
            Column::RefreshToken => "refresh token",
        })
    }
}

/// A data key as the store keeps it (the `keys` table): only ever wrapped
/// by the KEK, so the database alone never holds a usable key. `id` is the
/// table's primary key and the number in each sealed value; the highest is
/// the active key. `created_at` is in milliseconds since the epoch, like
/// every instant in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    pub id: u32,
    pub wrapped: String,
    pub created_at: i64,
}

/// The unwrapped data keys, for sealing with the newest and opening with
/// any: a key stays until no value sealed with it is left.
pub struct Keyring {
    keys: BTreeMap<u32, LessSafeKey>,
    active: u32,
}

impl Keyring {
    /// The first data key, for a store that has none yet: persist the
    /// returned [`WrappedKey`] before sealing anything with the keyring.
    pub fn create(kek: &Kek, now_ms: i64) -> Result<(Keyring, WrappedKey), SealError> {
        let (key, wrapped) = new_data_key(kek, 1, now_ms)?;
        let ring = Keyring {
            keys: BTreeMap::from([(1, key)]),
            active: 1,
        };
        Ok((ring, wrapped))
    }

    /// The keyring from the store's `keys` table. A key wrapped by another
    /// KEK is [`SealError::WrongKek`] (this host has an old or a different
    /// key file), told apart from a damaged one.
    pub fn load(kek: &Kek, keys: &[WrappedKey]) -> Result<Keyring, SealError> {
        let mut ring = BTreeMap::new();
        for k in keys {
            ring.insert(k.id, unwrap_key(kek, k)?);
        }
        let active = *ring.keys().next_back().ok_or(SealError::NoKeys)?;
        Ok(Keyring { keys: ring, active })
    }

    /// A new active data key, for when one may have leaked or has sealed
    /// long enough: values sealed from now on use it, older ones keep
    /// opening with theirs until a re-seal pass ([`Keyring::reseal`]).
    /// Persist the returned key before sealing with the keyring; a store
    /// shared by hosts that rotate at once sees two keys with the same id,
    /// which its primary key refuses.
    pub fn rotate(&mut self, kek: &Kek, now_ms: i64) -> Result<WrappedKey, SealError> {
        let id = self.active.checked_add(1).ok_or(SealError::IdsExhausted)?;
        let (key, wrapped) = new_data_key(kek, id, now_ms)?;
        self.keys.insert(id, key);
        self.active = id;
        Ok(wrapped)
    }

    /// The id new values are sealed with, for status output and for a
    /// re-seal pass's progress.
    pub fn active_key(&self) -> u32 {
        self.active
    }

    /// Whether the keyring holds data key `id`: a value sealed with one it
    /// does not hold means the store's `keys` table has to be read again.
    pub fn has_key(&self, id: u32) -> bool {
        self.keys.contains_key(&id)
    }

    /// The stored form of a token. A fresh random nonce each time: the same
    /// token sealed twice gives two different strings.
    pub fn seal(&self, name: &str, column: Column, value: &Secret) -> Result<String, SealError> {
        let key = &self.keys[&self.active];
        let aad = value_aad(self.active, column, name);
        let body = seal_bytes(key, &aad, value.expose().as_bytes())?;
        Ok(format!(
            "{SEALED_PREFIX}{FORMAT}{}:{}",
            self.active,
            URL_SAFE_NO_PAD.encode(body)
        ))
    }

    /// The token a stored value holds. A value without the prefix is
    /// plaintext, written before sealing was turned on, and is returned as
    /// it is, so that turning sealing on needs no flag day.
    pub fn open(&self, name: &str, column: Column, stored: &str) -> Result<Secret, SealError> {
        let subject = || Subject::Value(name.to_owned(), column);
        let (id, body) = match parse_sealed(stored) {
            Parsed::Plaintext => return Ok(Secret::new(stored)),
            Parsed::Newer => return Err(SealError::NewerFormat(subject())),
            Parsed::Malformed => {
                return Err(SealError::Corrupt {
                    what: subject(),
                    key: None,
                });
            }
            Parsed::Sealed { id, body } => (id, body),
        };
        let key = self.keys.get(&id).ok_or_else(|| SealError::UnknownKey {
            what: subject(),
            key: id,
        })?;
        let corrupt = || SealError::Corrupt {
            what: subject(),
            key: Some(id),
        };
        let plain = open_bytes(key, &value_aad(id, column, name), body).ok_or_else(corrupt)?;
        let text = std::str::from_utf8(&plain).map_err(|_| corrupt())?;
        Ok(Secret::new(text))
    }

    /// The value sealed with the active key, or `None` when it already is:
    /// the one step of a re-seal pass, which turns the plaintext rows of
    /// a store from before sealing, and values sealed with retired keys,
    /// into values the active key opens.
    pub fn reseal(
        &self,
        name: &str,
        column: Column,
        stored: &str,
    ) -> Result<Option<String>, SealError> {
        if sealed_with(stored) == Some(self.active) {
            return Ok(None);
        }
        let value = self.open(name, column, stored)?;
        self.seal(name, column, &value).map(Some)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

/// Re-wraps every data key under a new KEK: rotating the KEK touches the
/// `keys` table only, never a token. The store writes the result in one
/// transaction; ids and creation times are kept.
pub fn rewrap(keys: &[WrappedKey], old: &Kek, new: &Kek) -> Result<Vec<WrappedKey>, SealError> {
    keys.iter()
        .map(|k| {
            let raw = unwrap_raw(old, k)?;
            Ok(WrappedKey {
                id: k.id,
                wrapped: wrap_raw(new, k.id, &raw)?,
                created_at: k.created_at,
            })
        })
        .collect()
}

/// Whether a stored value is sealed, for a re-seal pass and for a store
/// that, once every row is sealed, refuses plaintext.
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(SEALED_PREFIX)
}

/// The data key a stored value was sealed with, `None` for plaintext (and
/// for a damaged value, which [`Keyring::open`] reports): what tells a
/// re-seal pass which rows still need an old key, and so when that key may
/// be deleted.
pub fn sealed_with(stored: &str) -> Option<u32> {
    match parse_sealed(stored) {
        Parsed::Sealed { id, .. } => Some(id),
        _ => None,
    }
}

/// What a stored value or a wrapped key could not do, and which one. No
/// variant holds a token, a key, a ciphertext or a byte of a key file:
/// their `Display` goes to logs and terminals.
#[derive(Debug)]
pub enum SealError {
    /// The key file cannot be used.
    KeyFile {
        path: PathBuf,
        problem: KeyFileProblem,
    },
    /// The key file is not the KEK that wrapped the database's data keys:
    /// the operator has to install the right key, not restore a backup.
    WrongKek {
        key: u32,
        wrapped_by: String,
        loaded: String,
    },
    /// A value was sealed with a data key the keyring does not hold: a key
    /// added by another host since the keyring was loaded (load it again),
    /// or one deleted too soon.
    UnknownKey { what: Subject, key: u32 },
    /// Does not authenticate or does not parse: altered, truncated, or
    /// (for a value) copied from another credential or column.
    Corrupt { what: Subject, key: Option<u32> },
    /// Written by a newer tokend in a format this one does not know.
    NewerFormat(Subject),
    /// The `keys` table is empty: [`Keyring::create`] makes the first key.
    NoKeys,
    /// Every data key id has been used.
    IdsExhausted,
    /// The operating system's random number generator failed.
    Random,
}

/// Why a key file is refused.
#[derive(Debug)]
pub enum KeyFileProblem {
    Unreadable(io::Error),
    NotAFile,
    /// Group or others may access it; the mode.
    OpenToOthers(u32),
    /// Not a key in one of the accepted spellings; why, without the bytes.
    Format(String),
}

/// What an error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Value(String, Column),
    DataKey(u32),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Value(name, column) => write!(f, "the {column} of {name}"),
            Subject::DataKey(id) => write!(f, "data key {id}"),
        }
    }
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealError::KeyFile { path, problem } => {
                write!(f, "key file {}: ", path.display())?;
                match problem {
                    KeyFileProblem::Unreadable(e) => write!(f, "cannot read it: {e}"),
                    KeyFileProblem::NotAFile => f.write_str("is not a regular file"),
                    KeyFileProblem::OpenToOthers(mode) => write!(
                        f,
                        "group or others may access it (mode {mode:04o}): chmod 600 it, \
                         or pass it to the service with LoadCredential="
                    ),
                    KeyFileProblem::Format(why) => f.write_str(why),
                }
            }
            SealError::WrongKek {
                key,
                wrapped_by,
                loaded,
            } => write!(
                f,
                "data key {key} was wrapped by the key with fingerprint {wrapped_by}, \
                 but this host's key file has fingerprint {loaded}: install the \
                 database's current key on this host"
            ),
            SealError::UnknownKey { what, key } => write!(
                f,
                "{what} is sealed with data key {key}, which this keyring does not hold \
                 (added by another host since, or deleted before every value was re-sealed)"
            ),
            SealError::Corrupt {
                what,
                key: Some(key),
            } => write!(
                f,
                "{what} does not open with data key {key}: it was altered, truncated, \
                 or copied from another credential or column"
            ),
            SealError::Corrupt { what, key: None } => {
                write!(
                    f,
                    "{what} is damaged: altered, truncated, or not written by tokend"
                )
            }
            SealError::NewerFormat(what) => write!(
                f,
                "{what} is in a newer format than this tokend reads (v1): upgrade tokend"
            ),
            SealError::NoKeys => f.write_str("the store holds no data key to open values with"),
            SealError::IdsExhausted => f.write_str("no data key id is left to rotate to"),
            SealError::Random => {
                f.write_str("the operating system's random number generator failed")
            }
        }
    }
}

impl std::error::Error for SealError {}

enum Parsed<'a> {
    Plaintext,
    Sealed { id: u32, body: &'a str },
    Newer,
    Malformed,
}

fn parse_sealed(stored: &str) -> Parsed<'_> {
    let Some(rest) = stored.strip_prefix(SEALED_PREFIX) else {
        return Parsed::Plaintext;
    };
    let Some(rest) = rest.strip_prefix(FORMAT) else {
        return if rest.starts_with('v') {
            Parsed::Newer
        } else {
            Parsed::Malformed
        };
    };
    match rest
        .split_once(':')
        .and_then(|(id, body)| Some((parse_id(id)?, body)))
    {
        Some((id, body)) => Parsed::Sealed { id, body },
        None => Parsed::Malformed,
    }
}

/// A key id in its one spelling (no sign, no leading zero).
fn parse_id(text: &str) -> Option<u32> {
    let id: u32 = text.parse().ok()?;
    (id.to_string() == text).then_some(id)
}

/// Binds a value to its key, column and credential: the column comes from
/// a fixed set and ends at a NUL, so no two triples give the same bytes.
fn value_aad(id: u32, column: Column, name: &str) -> Vec<u8> {
    let mut aad = b"tokend-seal:v1:value\0".to_vec();
    aad.extend_from_slice(&id.to_be_bytes());
    aad.extend_from_slice(column.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Binds a wrapped data key to its id: a wrapped key copied to another id
/// does not unwrap.
fn key_aad(id: u32) -> Vec<u8> {
    let mut aad = b"tokend-seal:v1:data-key\0".to_vec();
    aad.extend_from_slice(&id.to_be_bytes());
    aad
}

/// nonce || ciphertext || tag, with a fresh random nonce.
fn seal_bytes(key: &LessSafeKey, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SealError::Random)?;
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        )
        .expect("AES-GCM seals any value shorter than 64 GiB");
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// The plaintext of `seal_bytes`'s base64url output, or `None` if it does
/// not authenticate. Wiped on drop, as is the buffer it was opened in.
fn open_bytes(key: &LessSafeKey, aad: &[u8], body: &str) -> Option<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(URL_SAFE_NO_PAD.decode(body).ok()?);
    if buf.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, sealed) = buf.split_at_mut(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let plain = key.open_in_place(nonce, Aad::from(aad), sealed).ok()?;
    Some(Zeroizing::new(plain.to_vec()))
}

fn new_data_key(kek: &Kek, id: u32, now_ms: i64) -> Result<(LessSafeKey, WrappedKey), SealError> {
    let mut raw = Zeroizing::new([0u8; DATA_KEY_LEN]);
    SystemRandom::new()
        .fill(raw.as_mut())
        .map_err(|_| SealError::Random)?;
    let wrapped = WrappedKey {
        id,
        wrapped: wrap_raw(kek, id, raw.as_ref())?,
        created_at: now_ms,
    };
    Ok((aes_key(raw.as_ref()), wrapped))
}

fn wrap_raw(kek: &Kek, id: u32, raw: &[u8]) -> Result<String, SealError> {
    let body = seal_bytes(kek.wrapping_key(), &key_aad(id), raw)?;
    Ok(format!(
        "{WRAPPED_PREFIX}{}:{}",
        kek.fingerprint(),
        URL_SAFE_NO_PAD.encode(body)
    ))
}

fn unwrap_key(kek: &Kek, k: &WrappedKey) -> Result<LessSafeKey, SealError> {
    unwrap_raw(kek, k).map(|raw| aes_key(&raw))
}

fn unwrap_raw(kek: &Kek, k: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let what = Subject::DataKey(k.id);
    let Some(rest) = k.wrapped.strip_prefix(WRAPPED_PREFIX) else {
        return Err(if k.wrapped.starts_with("tokend-kek:v") {
            SealError::NewerFormat(what)
        } else {
            SealError::Corrupt { what, key: None }
        });
    };
    let corrupt = || SealError::Corrupt {
        what: Subject::DataKey(k.id),
        key: None,
    };
    let (print, body) = rest.split_once(':').ok_or_else(corrupt)?;
    if print != kek.fingerprint() {
        // Shown only once it looks like a fingerprint: it comes from the
        // database, and this text goes to logs.
        if print.len() != kek.fingerprint().len() || !print.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(corrupt());
        }
        return Err(SealError::WrongKek {
            key: k.id,
            wrapped_by: print.to_owned(),
            loaded: kek.fingerprint().to_owned(),
        });
    }
    let raw = open_bytes(kek.wrapping_key(), &key_aad(k.id), body).ok_or_else(corrupt)?;
    if raw.len() != DATA_KEY_LEN {
        return Err(corrupt());
    }
    Ok(raw)
}

fn aes_key(raw: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw).expect("a data key is 32 bytes"))
}
