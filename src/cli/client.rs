//! A minimal blocking HTTP/1.1 client over the Unix socket, for the commands
//! that ask the daemon. No runtime, no config beyond the socket's path: a
//! shell script calling `tokend token` pays for a connect, a write and a read.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A reply from the daemon.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The `message` of a JSON error reply, or the body as text.
    pub fn message(&self) -> String {
        serde_json::from_slice::<crate::wire::Error>(&self.body).map_or_else(
            |_| String::from_utf8_lossy(&self.body).trim().to_owned(),
            |e| e.message,
        )
    }
}

/// Why the daemon could not be asked.
pub enum Unreachable {
    /// No socket, or nobody listening: the daemon is not running.
    NotRunning(io::Error),
    /// The socket is there, but this user may not connect to it: the
    /// daemon may well be running (and must not be worked around).
    Denied(io::Error),
    /// Connected, but the exchange failed.
    Broken(io::Error),
}

/// Sends one request and reads the whole reply. `timeout` bounds each read
/// and write (a token read may wait for a refresh).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    json: bool,
    timeout: Duration,
) -> Result<Reply, Unreachable> {
    let mut s = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => Unreachable::Denied(e),
        _ => Unreachable::NotRunning(e),
    })?;
    let mut exchange = || -> io::Result<Reply> {
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        // One buffer, one write: `write!` on the unbuffered stream sends
        // each piece of the format string in its own sendto, and the daemon
        // wakes for each.
        s.write_all(&request_bytes(method, path, json))?;
        let mut raw = Vec::with_capacity(1024);
        s.read_to_end(&mut raw)?;
        parse_reply(&raw)
    };
    exchange().map_err(Unreachable::Broken)
}

/// The whole request: a head with no body, `Connection: close`.
fn request_bytes(method: &str, path: &str, json: bool) -> Vec<u8> {
    let accept = if json { "application/json" } else { "*/*" };
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// Reads a whole HTTP/1.1 reply (`Connection: close`, so the body runs to
/// the end of the stream unless Content-Length says less). Public only for
/// the fuzz target `fuzz/fuzz_targets/reply.rs`: whatever the other end of
/// the socket sends, this must answer with a reply or an error.
pub fn parse_reply(raw: &[u8]) -> io::Result<Reply> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed reply from the daemon",
        )
    };
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| bad())?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    let rest = &raw[head_end + 4..];
    // The list of credentials comes in chunks (README "The socket API").
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let body = dechunk(rest).ok_or_else(bad)?;
        return Ok(Reply { status, body });
    }
    let mut body = rest.to_vec();
    let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = length {
        if body.len() < n {
            return Err(bad());
        }
        body.truncate(n);
    }
    Ok(Reply { status, body })
}

/// A chunked body (RFC 9112 §7.1), whole: None if it is cut short or malformed.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(rest.len());
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&rest[..eol]).ok()?;
        // Chunk extensions (after ';') carry nothing we use.
        let size_hex = line.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some(body);
        }
        let end = size.checked_add(2)?;
        if rest.len() < end || &rest[size..end] != b"\r\n" {
            return None;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[end..];
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_request_is_one_head() {
        assert_eq!(
            super::request_bytes("GET", "/v1/tokens/bot", false),
            b"GET /v1/tokens/bot HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn parses_a_reply() {
        let r =
            super::parse_reply(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"{}");
        assert!(super::parse_reply(b"garbage").is_err());
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                        2\r\n[1\r\nb;x=y\r\n,2,3,4,5,6]\r\n0\r\n\r\n";
        assert_eq!(super::parse_reply(chunked).unwrap().body, b"[1,2,3,4,5,6]");
        assert!(super::parse_reply(&chunked[..chunked.len() - 7]).is_err());
    }
}
