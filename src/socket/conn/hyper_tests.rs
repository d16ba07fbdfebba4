//! The head check against hyper itself (a dev-dependency, the socket's
//! server before this one and the baseline of its benchmark): the check
//! refuses exactly the heads hyper's server refuses, so a client hyper
//! served is served the same.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::head::{Bad, Head, check_head};
use crate::socket::MAX_HEAD;

/// What hyper itself does with `bytes` (then the end of the
/// stream): dispatches a request, answers with its own error
/// status, or neither.
async fn hyper_on(bytes: &[u8]) -> Result<bool, u16> {
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let called = Arc::new(AtomicBool::new(false));
    let seen = called.clone();
    let service = hyper::service::service_fn(move |_req| {
        seen.store(true, Ordering::SeqCst);
        async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"x"),
            )))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .serve_connection(hyper_util::rt::TokioIo::new(server), service);
    let task = tokio::spawn(conn);
    client.write_all(bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    let _ = task.await;
    if called.load(Ordering::SeqCst) {
        return Ok(true);
    }
    match out.get(9..12).and_then(|s| std::str::from_utf8(s).ok()) {
        Some(status) => Err(status.parse().unwrap()),
        None => Ok(false),
    }
}

/// The check and hyper agree on what to refuse, over tricky heads
/// and thousands of mutations of good ones.
#[test]
fn the_check_agrees_with_hyper() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seeds: [&[u8]; 6] = [
        b"GET /v1/tokens/bot HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n",
        b"POST /v1/tokens/bot/rejected HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        b"GET /a?b=c HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 00\r\n\r\n",
        b"GET http://x/a HTTP/1.1\r\nX: \t v\r\nContent-Length: 1\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nUpgrade: x\r\n\r\n",
    ];
    let alphabet = b" \t\r\n:;,/?#@%<>{}\"\\^`|~\x00\x7f\x80\xffaZ09-_.!*'()[]=+&$";
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut cases: Vec<Vec<u8>> = seeds.iter().map(|s| s.to_vec()).collect();
    for odd in [
        &b"GET /a?b={\"c\":1} HTTP/1.1\r\n\r\n"[..],
        b"GET a HTTP/1.1\r\n\r\n",
        b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",
        b"GET /a#b HTTP/1.1\r\n\r\n",
        b"GET // HTTP/1.1\r\n\r\n",
        b"GET http:// HTTP/1.1\r\n\r\n",
        b"CONNECT x:1 HTTP/1.1\r\n\r\n",
        b"GET /a HTTP/1.1\r\nX: \x80\r\n\r\n",
        b"GET /a HTTP/1.1\r\nX : 1\r\n\r\n",
        b"GET /a HTTP/1.1\r\n X: 1\r\n\r\n",
        b"GET /a HTTP/1.1\nX: 1\n\n",
        b"GET  /a HTTP/1.1\r\n\r\n",
        b"GET /a HTTP/1.1\r\nTransfer-Encoding: \xff\r\n\r\n",
        b"GET /a HTTP/1.1\r\nTransfer-Encoding: Chunked \r\n\r\n",
        b"GET /a HTTP/1.1\r\nContent-Length: \r\n\r\n",
        b"GET /a HTTP/1.1\r\nContent-Length: 18446744073709551614\r\n\r\n",
        b"GET /a HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n",
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZ /a HTTP/1.1\r\n\r\n",
    ] {
        cases.push(odd.to_vec());
    }
    for _ in 0..3000 {
        let mut h = seeds[next() as usize % seeds.len()].to_vec();
        let body_end = h.len() - 4;
        for _ in 0..1 + next() % 3 {
            let at = next() as usize % body_end;
            let c = alphabet[next() as usize % alphabet.len()];
            match next() % 3 {
                0 => h[at] = c,
                1 => h.insert(at, c),
                _ => {
                    h.remove(at);
                }
            }
        }
        cases.push(h);
    }
    let mut disagreements = Vec::new();
    let (mut taken, mut refused) = (0, 0);
    for h in &cases {
        // hyper parses once it sees an end of head: give it one.
        if !h.ends_with(b"\r\n\r\n") {
            continue;
        }
        let ours = match check_head(h) {
            Head::Good(_) => Ok(true),
            Head::Partial => Ok(false),
            Head::Bad(Bad::Malformed(_)) => Err(400),
            Head::Bad(Bad::TooLarge) => Err(431),
        };
        let theirs = rt.block_on(hyper_on(h));
        match theirs {
            Ok(true) => taken += 1,
            Err(_) => refused += 1,
            Ok(false) => {}
        }
        // hyper answers nothing for an HTTP/2 preface: we do (400).
        if ours != theirs && !h.starts_with(b"PRI ") {
            disagreements.push(format!(
                "{:?}: ours {ours:?}, hyper {theirs:?}",
                String::from_utf8_lossy(h)
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    assert!(
        taken > 300 && refused > 300,
        "{taken} taken, {refused} refused"
    );
}
