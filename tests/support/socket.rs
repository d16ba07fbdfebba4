//! HTTP/1.1 over the daemon's Unix socket.

use super::*;

/// A reply read over the daemon's Unix socket.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) over a Unix socket and
/// reads the reply to the end. `timeout` bounds each read and write.
pub fn socket_request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Reply> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_reply(&raw)
}

/// Parses a whole HTTP/1.1 response (Content-Length, chunked, or to EOF).
pub fn parse_reply(raw: &[u8]) -> std::io::Result<Reply> {
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what}: {:?}", String::from_utf8_lossy(raw)),
        )
    };
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = rest[at..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("bad chunk"))?;
            let size = std::str::from_utf8(&rest[at..at + line_end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| bad("bad chunk size"))?;
            at += line_end + 2;
            if size == 0 {
                break;
            }
            body.extend_from_slice(rest.get(at..at + size).ok_or_else(|| bad("short chunk"))?);
            at += size + 2;
        }
        body
    } else if let Some(n) = find("content-length") {
        let n: usize = n.parse().map_err(|_| bad("bad content-length"))?;
        rest.get(..n).ok_or_else(|| bad("short body"))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// A request over the socket that must get an answer (10 s per read/write).
pub fn request(socket: &Path, method: &str, path: &str) -> Reply {
    socket_request(socket, method, path, &[], b"", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{method} {path} over {}: {e}", socket.display()))
}

/// `GET path` over the socket.
pub fn get(socket: &Path, path: &str) -> Reply {
    request(socket, "GET", path)
}

/// Waits until the daemon answers `GET /health` with 200.
pub fn wait_serving(socket: &Path, timeout: Duration) {
    wait_for("the socket to serve /health", timeout, || {
        socket_request(socket, "GET", "/health", &[], b"", Duration::from_secs(5))
            .ok()
            .filter(|r| r.status == 200)
            .map(|_| ())
    });
}

/// The names `GET /v1/credentials` lists.
pub fn listed_names(socket: &Path) -> Vec<String> {
    let r = get(socket, "/v1/credentials");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|s| s["name"].as_str().expect("a name").to_owned())
        .collect()
}
