//! The request-head check: a head parsed with hyper's own parser
//! (httparse) and held to hyper's rules, so that the guard knows which
//! heads hyper would refuse (400 or 431) and how long each body is.

use std::mem::MaybeUninit;

use hyper::{Method, Uri};

use crate::socket::MAX_HEAD;

/// hyper's limit on header fields (its DEFAULT_MAX_HEADERS).
pub(super) const MAX_HEADERS: usize = 100;
/// hyper's largest Content-Length (its MAX_LEN).
const MAX_BODY_LEN: u64 = u64::MAX - 2;

/// Why a head is refused, as hyper would have.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Bad {
    /// 400, saying what is wrong.
    Malformed(&'static str),
    /// 431: over MAX_HEAD bytes or MAX_HEADERS fields.
    TooLarge,
}

/// What a head's checks decided.
#[derive(Debug, PartialEq)]
pub(super) enum Head {
    /// A head of `len` bytes hyper will take, then `body`; `last` when
    /// hyper will read no request after it.
    Good {
        len: usize,
        body: Body,
        last: bool,
    },
    /// Not complete yet.
    Partial,
    Bad(Bad),
}

#[derive(Debug, PartialEq)]
pub(super) enum Body {
    Length(u64),
    Chunked,
}

/// Checks a request head as hyper's server will parse it: the same parser
/// (httparse), limits and rules (RFC 9112) on method,
/// target, Content-Length, Transfer-Encoding and Connection.
pub(super) fn check_head(bytes: &[u8]) -> Head {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        bytes,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            return Head::Bad(Bad::TooLarge);
        }
        Ok(httparse::Status::Partial) if bytes.len() >= MAX_HEAD => {
            return Head::Bad(Bad::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(httparse::Error::Version) => {
            return Head::Bad(Bad::Malformed("not an HTTP/1.0 or HTTP/1.1 request"));
        }
        Err(_) => return Head::Bad(Bad::Malformed("malformed request line or header field")),
    };
    let bad = |what| Head::Bad(Bad::Malformed(what));
    if Method::from_bytes(req.method.unwrap_or("").as_bytes()).is_err() {
        return bad("malformed method");
    }
    if !target_ok(req.path.unwrap_or("")) {
        return bad("malformed request target");
    }
    let http11 = req.version == Some(1);
    let mut keep_alive = http11;
    let mut saw_close = false;
    let (mut is_te, mut chunked, mut is_cl) = (false, false, false);
    let mut length: Option<u64> = None;
    for field in req.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return bad("Transfer-Encoding in an HTTP/1.0 request");
            }
            is_te = true;
            length = None;
            chunked = visible(field.value).is_some_and(|v| {
                v.rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
            });
        } else if name.eq_ignore_ascii_case("content-length") {
            is_cl = true;
            if is_te {
                continue;
            }
            let Some(n) = digits(field.value) else {
                return bad("malformed Content-Length");
            };
            match length {
                Some(prev) if prev != n => return bad("differing Content-Length values"),
                Some(_) => {}
                None if n > MAX_BODY_LEN => return Head::Bad(Bad::TooLarge),
                None => length = Some(n),
            }
        } else if name.eq_ignore_ascii_case("connection") {
            if saw_close || has_token(field.value, "close") {
                saw_close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = has_token(field.value, "keep-alive");
            }
        }
    }
    if is_te && !chunked {
        return bad("a Transfer-Encoding other than chunked");
    }
    if is_te && is_cl {
        keep_alive = false;
    }
    let body = if is_te {
        Body::Chunked
    } else {
        Body::Length(length.unwrap_or(0))
    };
    Head::Good {
        len,
        body,
        last: !keep_alive,
    }
}

/// A request target hyper's `Uri` takes. Origin-form targets of plain
/// characters (all of which it takes) skip the parse, which copies.
fn target_ok(target: &str) -> bool {
    let b = target.as_bytes();
    let plain = b.first() == Some(&b'/') && b.iter().all(|&c| PLAIN[usize::from(c)]);
    plain || Uri::try_from(b).is_ok()
}

/// The plain characters of a target, as a table: a lookup per byte instead
/// of a chain of range tests, for every request.
const PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        table[c] =
            matches!(c as u8, b'!' | b'$'..=b';' | b'=' | b'?'..=b'Z' | b'_' | b'a'..=b'z' | b'~');
        c += 1;
    }
    table
};

/// The value as `HeaderValue::to_str` gives it: visible ASCII only.
fn visible(value: &[u8]) -> Option<&str> {
    if value.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Whether a comma-separated value holds `token` (hyper's `connection_has`).
fn has_token(value: &[u8], token: &str) -> bool {
    visible(value).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Decimal digits only, as hyper reads a Content-Length.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}
