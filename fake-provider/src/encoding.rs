//! The wire encodings the provider reads and writes:
//! `application/x-www-form-urlencoded` (token bodies, authorize queries),
//! percent-encoding (redirect URLs), base64 (HTTP Basic client auth, RFC 6749
//! §2.3.1) and base64url without padding (PKCE S256 challenges, RFC 7636).
//! The crates do the coding; what is ours is the strictness a provider needs
//! (a malformed escape or non-UTF-8 text is an error, not a guess) and the
//! raw, undecoded view of a parameter that the request records show.

use std::borrow::Cow;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode, utf8_percent_encode};

/// Why a form-encoded string could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum FormError {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// The decoded bytes are not UTF-8.
    NotUtf8,
}

/// Decodes one form-urlencoded component: `+` is a space, `%XX` a byte.
/// Stricter than `form_urlencoded::parse`, which keeps a malformed escape as
/// it is and replaces bytes that are not UTF-8: both are errors here.
pub fn form_decode(s: &[u8]) -> Result<String, FormError> {
    let escapes_well_formed = s.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || s.get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_well_formed {
        return Err(FormError::BadEscape);
    }
    let spaced: Vec<u8> = s
        .iter()
        .map(|c| if *c == b'+' { b' ' } else { *c })
        .collect();
    percent_decode(&spaced)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| FormError::NotUtf8)
}

/// The raw (name, value) segments of a form body or query string, still
/// encoded (`form_urlencoded::parse` only yields them decoded). Empty
/// segments (`a=1&&b=2`) are skipped; a name without `=` has an empty value.
fn raw_pairs(s: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    s.split(|c| *c == b'&')
        .filter(|seg| !seg.is_empty())
        .map(|seg| match seg.iter().position(|c| *c == b'=') {
            Some(eq) => (&seg[..eq], &seg[eq + 1..]),
            None => (seg, &[][..]),
        })
}

/// Parses a whole form body or query string into decoded (name, value) pairs,
/// in order, with [`raw_pairs`]' segmentation (so that the decoded and the
/// raw view of a request always agree on what its parameters are).
pub fn parse_form(s: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    raw_pairs(s)
        .map(|(name, value)| Ok((form_decode(name)?, form_decode(value)?)))
        .collect()
}

/// The value of the first parameter called `name` (compared decoded), exactly
/// as it was sent: not decoded, so that a record can show how the client
/// encoded it. `read%2Bwrite` and `read+write` decode to different scopes
/// (`read+write` and `read write`), a mistake invisible once decoded. Works on
/// a body that does not decode as a whole; `None` when there is no such parameter.
pub fn raw_form_value<'a>(s: &'a [u8], name: &str) -> Option<&'a [u8]> {
    raw_pairs(s).find_map(|(n, value)| (form_decode(n).ok()? == name).then_some(value))
}

/// Everything but RFC 3986 unreserved characters.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes everything but RFC 3986 unreserved characters, so that the
/// result is safe as a query value (and as a form value).
pub fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

/// base64url without padding (RFC 4648 §5), the PKCE S256 challenge encoding.
pub fn base64url_nopad(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// Standard base64 as Basic credentials are read: padding optional (any
/// trailing `=` are dropped before decoding), unused low bits of the last
/// character ignored.
const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// Decodes standard base64 (RFC 4648 §4), padding optional; `None` on any
/// invalid character, so a garbage Basic header becomes a 400, not a panic.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    LENIENT_STANDARD.decode(s.trim_end_matches('=')).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        let pairs = parse_form(b"a=1+2&b=%2Fx%3d&&c&d=").unwrap();
        let expect = [("a", "1 2"), ("b", "/x="), ("c", ""), ("d", "")];
        assert_eq!(pairs.len(), expect.len());
        for ((n, v), (en, ev)) in pairs.iter().zip(expect) {
            assert_eq!((n.as_str(), v.as_str()), (en, ev));
        }
        assert_eq!(parse_form(b"a=%zz").unwrap_err(), FormError::BadEscape);
        assert_eq!(parse_form(b"a=%4").unwrap_err(), FormError::BadEscape);
        assert_eq!(parse_form(b"a=%ff").unwrap_err(), FormError::NotUtf8);
        assert_eq!(form_decode(b"caf%C3%A9").unwrap(), "café");
    }

    #[test]
    fn raw_values_stay_encoded() {
        let body = b"grant_type=refresh_token&scope=read%2Bwrite&x=%zz";
        assert_eq!(raw_form_value(body, "scope"), Some(&b"read%2Bwrite"[..]));
        assert_eq!(
            raw_form_value(b"response_type=code&scope=read+write", "scope"),
            Some(&b"read+write"[..])
        );
        // Names are compared decoded; the first of repeated parameters wins.
        assert_eq!(
            raw_form_value(b"sc%6Fpe=a%20b&scope=c", "scope"),
            Some(&b"a%20b"[..])
        );
        assert_eq!(raw_form_value(b"a=1&&scope=&b", "scope"), Some(&b""[..]));
        assert_eq!(raw_form_value(b"a=1&scope", "scope"), Some(&b""[..]));
        assert_eq!(raw_form_value(b"scopes=x&a=scope", "scope"), None);
        assert_eq!(raw_form_value(b"", "scope"), None);
    }

    #[test]
    fn percent_encoding_round_trips() {
        let s = "http://x/cb?a=b c&d=é+~";
        assert_eq!(form_decode(percent_encode(s).as_bytes()).unwrap(), s);
    }

    #[test]
    fn base64() {
        assert_eq!(base64url_nopad(b""), "");
        assert_eq!(base64url_nopad(b"f"), "Zg");
        assert_eq!(base64url_nopad(b"fo"), "Zm8");
        assert_eq!(base64url_nopad(b"foo"), "Zm9v");
        assert_eq!(base64url_nopad(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64_decode("Zm9vYmE=").unwrap(), b"fooba");
        assert_eq!(base64_decode("Zm9vYg").unwrap(), b"foob");
        assert_eq!(base64_decode("Zm9vYmFy").unwrap(), b"foobar");
        assert!(base64_decode("Zm9v!").is_none());
        assert!(base64_decode("Z").is_none());
        // As lenient as before the base64 crate: extra padding, and unused
        // low bits in the last character, are accepted.
        assert_eq!(base64_decode("Zm9v==").unwrap(), b"foo");
        assert_eq!(base64_decode("Zh==").unwrap(), b"f");
    }
}
