//! The loopback listener that receives the browser's redirect during
//! `tokend authorize` (RFC 8252 §7.3): plain HTTP on the redirect URI's
//! address, answering only its path.
//!
//! It is small on purpose: one request per connection, a bounded head, a
//! read deadline, a few connections at a time. Other paths (a browser's
//! `/favicon.ico`) get 404 and the wait goes on; the redirect itself is
//! handed to the caller with its connection still open, so that the page
//! the browser shows can say how the whole authorization ended.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::authorize;
use crate::config;

/// A request head larger than this is not a browser's redirect.
const MAX_HEAD: usize = 16 * 1024;
/// A connection that has not sent its request by then is dropped: browsers
/// open speculative connections that never send anything.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Writing our small page never takes longer, unless the browser is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// The addresses to listen on for a redirect URI, or None when it is not
/// loopback `http` (then the browser's redirect cannot reach us directly).
/// `localhost` means both 127.0.0.1 and ::1, since browsers may try either.
pub fn loopback_addrs(redirect_uri: &Url) -> Option<Vec<SocketAddr>> {
    if redirect_uri.scheme() != "http" || !config::is_loopback(redirect_uri) {
        return None;
    }
    let port = redirect_uri.port_or_known_default()?;
    let ips = match redirect_uri.host_str()? {
        "localhost" => vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ],
        h => vec![
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()?,
        ],
    };
    Some(
        ips.into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect(),
    )
}

/// Listening on the redirect URI; dropping it stops listening.
pub struct Listener {
    /// Redirects to our path, with their connections.
    redirects: mpsc::Receiver<Redirect>,
    /// The accept loops, stopped on drop so the port is free at once.
    tasks: Vec<JoinHandle<()>>,
}

/// A request to the redirect URI's path that carries an authorization answer.
pub struct Redirect {
    /// The query string, undecoded.
    pub query: String,
    /// Kept open for [`Redirect::respond`].
    stream: TcpStream,
}

/// Why we could not listen: the caller turns it into advice (a port in
/// use has other remedies than a permission problem).
#[derive(Debug)]
pub struct BindError {
    /// The address that could not be bound.
    pub addr: SocketAddr,
    pub error: io::Error,
}

impl Listener {
    /// Binds every address before returning, so that a port in use is known
    /// before the user is sent to the browser. Of the second address of
    /// `localhost` (::1), only "in use" is an error: a host without IPv6
    /// still has 127.0.0.1.
    pub async fn bind(addrs: &[SocketAddr], path: &str) -> Result<Listener, BindError> {
        let mut listeners = Vec::new();
        for (i, &addr) in addrs.iter().enumerate() {
            match TcpListener::bind(addr).await {
                Ok(l) => listeners.push(l),
                Err(e) if i > 0 && e.kind() != io::ErrorKind::AddrInUse => {}
                Err(error) => return Err(BindError { addr, error }),
            }
        }
        let (tx, redirects) = mpsc::channel(4);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let path: Arc<str> = Arc::from(path);
        let tasks = listeners
            .into_iter()
            .map(|l| tokio::spawn(accept(l, path.clone(), tx.clone(), slots.clone())))
            .collect();
        Ok(Listener { redirects, tasks })
    }

    /// The next redirect to our path; None only if listening failed for good.
    pub async fn next(&mut self) -> Option<Redirect> {
        self.redirects.recv().await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Redirect {
    /// Shows the browser a page that says how it ended, then closes.
    pub async fn respond(mut self, ok: bool, message: &str) {
        let (status, title) = if ok {
            ("200 OK", "tokend: authorized")
        } else {
            ("400 Bad Request", "tokend: authorization failed")
        };
        let _ = tokio::time::timeout(
            WRITE_TIMEOUT,
            write_page(&mut self.stream, status, title, message),
        )
        .await;
    }
}

async fn accept(
    listener: TcpListener,
    path: Arc<str>,
    tx: mpsc::Sender<Redirect>,
    slots: Arc<Semaphore>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of descriptors, most likely: let some close first.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (path, tx) = (path.clone(), tx.clone());
        tokio::spawn(async move {
            if let Some(r) = serve(stream, &path).await {
                let _ = tx.send(r).await;
            }
            drop(slot);
        });
    }
}

/// Reads one request; answers it unless it is an authorization answer on
/// our path, which is returned with its connection.
async fn serve(mut stream: TcpStream, path: &str) -> Option<Redirect> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream))
        .await
        .ok()??;
    match asked(&head, path)? {
        Asked::Elsewhere => {
            reply(&mut stream, "404 Not Found", "Not found.").await;
            None
        }
        Asked::NotAnAnswer => {
            let text = "This address waits for the provider's redirect during 'tokend authorize'.";
            reply(&mut stream, "400 Bad Request", text).await;
            None
        }
        Asked::Answer(query) => Some(Redirect { query, stream }),
    }
}

/// What a request asks of the listener.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    /// Another path (a browser's `/favicon.ico`): 404.
    Elsewhere,
    /// Our path, but not a GET carrying an authorization answer: 400.
    NotAnAnswer,
    /// The redirect: its query string, undecoded.
    Answer(String),
}

/// Reads a request head (anything a local process or a web page may send
/// to the port); None when it has no request line worth an answer. Public
/// for the fuzz target `fuzz/fuzz_targets/authorize.rs`.
pub fn asked(head: &str, path: &str) -> Option<Asked> {
    let mut words = head.lines().next()?.split(' ');
    let (method, target) = (words.next()?, words.next()?);
    // Origin form ("/callback?…"), or absolute form if a proxy is in between.
    let url = if target.starts_with('/') {
        Url::parse(&format!("http://localhost{target}")).ok()
    } else {
        Url::parse(target).ok()
    };
    let Some(url) = url.filter(|u| u.path() == path) else {
        return Some(Asked::Elsewhere);
    };
    let query = url.query().unwrap_or_default().to_owned();
    if method != "GET" || !authorize::is_answer(&query) {
        return Some(Asked::NotAnAnswer);
    }
    Some(Asked::Answer(query))
}

/// Answers a request that is not the redirect.
async fn reply(stream: &mut TcpStream, status: &str, text: &str) {
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write_page(stream, status, "tokend", text)).await;
}

/// The request line and headers, up to the blank line; None if the peer
/// closes first or sends too much.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_HEAD {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

async fn write_page(
    stream: &mut TcpStream,
    status: &str,
    title: &str,
    message: &str,
) -> io::Result<()> {
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>\n\
         <body style=\"font-family: sans-serif; max-width: 40em; margin: 3em auto\">\n\
         <h1>{t}</h1>\n<p>{m}</p>\n</body></html>\n",
        t = html_escape(title),
        m = html_escape(message),
    );
    // The redirect's URL holds the code: no caching, no Referer, no reuse.
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nCache-Control: no-store\r\nReferrer-Policy: no-referrer\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(u: &str) -> Option<Vec<SocketAddr>> {
        loopback_addrs(&Url::parse(u).unwrap())
    }

    #[test]
    fn only_loopback_http_is_listened_on() {
        assert_eq!(
            addrs("http://127.0.0.1:8765/callback"),
            Some(vec!["127.0.0.1:8765".parse().unwrap()])
        );
        assert_eq!(
            addrs("http://[::1]:9/cb"),
            Some(vec!["[::1]:9".parse().unwrap()])
        );
        assert_eq!(
            addrs("http://localhost/cb"),
            Some(vec![
                "127.0.0.1:80".parse().unwrap(),
                "[::1]:80".parse().unwrap()
            ])
        );
        assert_eq!(addrs("https://127.0.0.1:8765/callback"), None);
        assert_eq!(addrs("http://example.com:8765/callback"), None);
        assert_eq!(addrs("http://10.0.0.1:8765/callback"), None);
    }

    #[test]
    fn request_heads() {
        let a = |head| asked(head, "/cb");
        assert_eq!(
            a("GET /cb?code=c&state=s HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Asked::Answer("code=c&state=s".into()))
        );
        assert_eq!(
            a("GET http://127.0.0.1:9/cb?state=s HTTP/1.1\r\n\r\n"),
            Some(Asked::Answer("state=s".into()))
        );
        assert_eq!(
            a("POST /cb?code=c HTTP/1.1\r\n\r\n"),
            Some(Asked::NotAnAnswer)
        );
        assert_eq!(a("GET /cb HTTP/1.1\r\n\r\n"), Some(Asked::NotAnAnswer));
        assert_eq!(
            a("GET /favicon.ico HTTP/1.1\r\n\r\n"),
            Some(Asked::Elsewhere)
        );
        assert_eq!(a("GET\r\n\r\n"), None);
        assert_eq!(a(""), None);
    }

    #[test]
    fn pages_escape_what_they_show() {
        assert_eq!(
            html_escape("<b>\"x\" & 'y'</b>"),
            "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;"
        );
    }

    /// One raw HTTP exchange with the listener.
    async fn get(addr: SocketAddr, target: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn stray_requests_are_answered_and_the_redirect_is_handed_over() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let mut l = Listener::bind(&[addr], "/cb").await.unwrap();
        assert!(get(addr, "/favicon.ico").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/cb").await.starts_with("HTTP/1.1 400"));
        // A second listener on the same port is refused.
        let e = Listener::bind(&[addr], "/cb").await.err().unwrap();
        assert_eq!(e.error.kind(), io::ErrorKind::AddrInUse);
        let browser = tokio::spawn(get(addr, "/cb?code=c&state=s&iss=x"));
        let r = l.next().await.unwrap();
        assert_eq!(r.query, "code=c&state=s&iss=x");
        r.respond(true, "stored <bot>").await;
        let page = browser.await.unwrap();
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        assert!(page.contains("stored &lt;bot&gt;"), "{page}");
        assert!(page.contains("Cache-Control: no-store"), "{page}");
    }
}
