//! The request head: parsed with httparse and held to the rules of
//! RFC 9112 on method, target, Content-Length, Transfer-Encoding and
//! Connection, which decide whether a head is refused (400 or 431), how
//! long its body is and whether the connection goes on after it.
//!
//! The rules are hyper's server's, whose limits the socket served with
//! until it answered requests itself (BENCHMARKS.md, "Socket API"): a
//! client that hyper served is served the same.

use std::mem::MaybeUninit;
use std::ops::Range;

use http::{Method, Uri};

use crate::socket::MAX_HEAD;

/// The most header fields a head may have.
pub(super) const MAX_HEADERS: usize = 100;
/// The largest Content-Length read as a number (a larger one is refused
/// as too large, a body this long later as over the body limit).
const MAX_BODY_LEN: u64 = u64::MAX - 2;

/// Why a head is refused.
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
    Good(Request),
    /// Not complete yet.
    Partial,
    Bad(Bad),
}

/// What a good head says, as offsets into its bytes rather than slices of
/// them, so that the connection's buffer can take more bytes (its body)
/// while the request is held.
#[derive(Debug, PartialEq)]
pub(super) struct Request {
    /// The head's length in bytes; its body (if any) follows.
    pub len: usize,
    pub method: Method,
    pub path: Target,
    pub body: Body,
    /// No request is read after this one: the connection closes once it
    /// is answered.
    pub last: bool,
    /// An HTTP/1.0 request: it cannot take a chunked answer.
    pub http10: bool,
    /// `Accept` names `application/json`.
    pub wants_json: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before it
    /// sends the body.
    pub expects_continue: bool,
}

/// The path of the request's target.
#[derive(Debug, PartialEq)]
pub(super) enum Target {
    /// Where it is in the head: an origin-form target (`/a/b?c`), the
    /// usual case, up to its query.
    Span(Range<usize>),
    /// Any other form (`http://host/a`, `*`): its path, as `Uri` gives it.
    Parsed(String),
}

impl Request {
    /// The path, given the head's bytes.
    pub(super) fn path<'a>(&'a self, head: &'a [u8]) -> &'a str {
        match &self.path {
            // The span was checked to be ASCII when the head was parsed.
            Target::Span(r) => std::str::from_utf8(&head[r.clone()]).unwrap_or_default(),
            Target::Parsed(p) => p,
        }
    }
}

#[derive(Debug, PartialEq)]
pub(super) enum Body {
    Length(u64),
    Chunked,
}

/// Parses and checks the request head at the start of `bytes`.
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
    let Ok(method) = Method::from_bytes(req.method.unwrap_or("").as_bytes()) else {
        return bad("malformed method");
    };
    let Some(path) = target(bytes, req.path.unwrap_or("")) else {
        return bad("malformed request target");
    };
    let http11 = req.version == Some(1);
    let (mut wants_json, mut saw_accept, mut expects_continue) = (false, false, false);
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
        } else if name.eq_ignore_ascii_case("accept") && !saw_accept {
            // The first Accept field decides, as a header map's `get` would.
            saw_accept = true;
            wants_json = field.value.windows(16).any(|w| w == b"application/json");
        } else if name.eq_ignore_ascii_case("expect") {
            // Not of HTTP/1.0, whose client would take the go-ahead for
            // the answer (RFC 9110 §10.1.1).
            expects_continue = http11 && field.value.eq_ignore_ascii_case(b"100-continue");
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
    Head::Good(Request {
        len,
        method,
        path,
        body,
        last: !keep_alive,
        http10: !http11,
        wants_json,
        expects_continue,
    })
}

/// The path of a request target `Uri` takes (None for one it refuses).
/// Origin-form targets of plain characters (all of which it takes) skip
/// the parse, which copies: their path is where it is in `head`, up to
/// the query.
fn target(head: &[u8], target: &str) -> Option<Target> {
    let b = target.as_bytes();
    if b.first() == Some(&b'/') && b.iter().all(|&c| PLAIN[usize::from(c)]) {
        // httparse's target is a slice of the head.
        let start = b.as_ptr() as usize - head.as_ptr() as usize;
        let len = b.iter().position(|&c| c == b'?').unwrap_or(b.len());
        return Some(Target::Span(start..start + len));
    }
    Uri::try_from(b)
        .ok()
        .map(|u| Target::Parsed(u.path().to_owned()))
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
