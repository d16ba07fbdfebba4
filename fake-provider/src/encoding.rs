//! The wire encodings the provider must read and write by hand:
//! `application/x-www-form-urlencoded` (token bodies, authorize queries),
//! percent-encoding (redirect URLs), base64 (HTTP Basic client auth, RFC 6749
//! §2.3.1) and base64url without padding (PKCE S256 challenges, RFC 7636).

/// Why a form-encoded string could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum FormError {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// The decoded bytes are not UTF-8.
    NotUtf8,
}

/// Decodes one form-urlencoded component: `+` is a space, `%XX` a byte.
pub fn form_decode(s: &[u8]) -> Result<String, FormError> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = s.get(i + 1).and_then(|c| hex_val(*c));
                let lo = s.get(i + 2).and_then(|c| hex_val(*c));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(FormError::BadEscape),
                }
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| FormError::NotUtf8)
}

/// The raw (name, value) segments of a form body or query string, still
/// encoded. Empty segments (`a=1&&b=2`) are skipped; a name without `=` has an
/// empty value.
fn raw_pairs(s: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    s.split(|c| *c == b'&')
        .filter(|seg| !seg.is_empty())
        .map(|seg| match seg.iter().position(|c| *c == b'=') {
            Some(eq) => (&seg[..eq], &seg[eq + 1..]),
            None => (seg, &[][..]),
        })
}

/// Parses a whole form body or query string into decoded (name, value) pairs,
/// in order, with [`raw_pairs`]' segmentation.
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

/// Percent-encodes everything but RFC 3986 unreserved characters, so that the
/// result is safe as a query value (and as a form value).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding (RFC 4648 §5), the PKCE S256 challenge encoding.
pub fn base64url_nopad(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(B64URL[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

/// Decodes standard base64 (RFC 4648 §4), padding optional; `None` on any
/// invalid character, so a garbage Basic header becomes a 400, not a panic.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character cannot encode a byte.
    (bits < 6).then_some(out)
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
    }
}
