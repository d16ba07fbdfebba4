//! The guard and its check against hyper itself: hyper behind the guard
//! serves well-formed pipelines byte for byte as it does alone, and the
//! check refuses exactly the heads hyper refuses.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Guard;
use super::head::{Bad, Head, check_head};
use crate::socket::peer::Caller;
use crate::socket::{Client, MAX_HEAD};

/// What a connection answers to `input`, written in pieces of
/// `piece` bytes through a pipe that carries `pipe` bytes at a
/// time, served by hyper behind the guard (`guarded`) or alone. The
/// service answers with what it got; `date` headers are dropped.
async fn served(input: Vec<u8>, piece: usize, pipe: usize, guarded: bool) -> Vec<u8> {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client, server) = tokio::io::duplex(pipe);
    let conn = Arc::new(Client::new(Caller::new(0, 0)));
    let counter = conn.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let counter = counter.clone();
        async move {
            let what = format!("{} {}", req.method(), req.uri());
            let body = match req.into_body().collect().await {
                Ok(b) => format!("{} bytes", b.to_bytes().len()),
                Err(_) => "a bad body".into(),
            };
            counter.answered.fetch_add(1, Ordering::Release);
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                bytes::Bytes::from(format!("{what}: {body}")),
            )))
        }
    });
    let builder = {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.max_buf_size(MAX_HEAD);
        b
    };
    let task = if guarded {
        let io = hyper_util::rt::TokioIo::new(Guard::new(server, conn));
        tokio::spawn(async move {
            let _ = builder.serve_connection(io, service).await;
        })
    } else {
        let io = hyper_util::rt::TokioIo::new(server);
        tokio::spawn(async move {
            let _ = builder.serve_connection(io, service).await;
        })
    };
    let writer = tokio::spawn(async move {
        let (mut rd, mut wr) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        });
        for part in input.chunks(piece) {
            if wr.write_all(part).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        // No shutdown: a half-close would cut requests in flight.
        let out = reader.await.unwrap();
        drop(wr);
        out
    });
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), writer)
        .await
        .expect("the connection ends")
        .unwrap();
    let _ = task.await;
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split("\r\n")
        .filter(|l| !l.starts_with("date: "))
        .collect::<Vec<_>>()
        .join("\r\n")
        .into_bytes()
}

/// Behind the guard, hyper serves well-formed pipelines exactly as
/// it does alone, however the bytes are cut up on the way; a bad
/// head after them gets the same answers first, then the JSON
/// error instead of hyper's bare one.
#[test]
fn the_guard_changes_nothing_for_well_formed_requests() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let big = format!("GET /big HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
    let requests: Vec<Vec<u8>> = vec![
        b"GET /a?x=1 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n".to_vec(),
        b"HEAD /d HTTP/1.1\r\n\r\n".to_vec(),
        b"GET /e HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".to_vec(),
        b"\r\nGET /f HTTP/1.1\r\n\r\n".to_vec(),
        b"GET /g HTTP/1.1\nHost: x\n\n".to_vec(),
        b"OPTIONS * HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        format!("GET /h HTTP/1.1\r\nX-Long: {}\r\n\r\n", "b".repeat(700)).into_bytes(),
        big.into_bytes(),
    ];
    let last = b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec();
    let bad = b"GET /bad HTTP/1.1\r\nno colon\r\n\r\n".to_vec();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for case in 0..300 {
        let mut input = Vec::new();
        for _ in 0..1 + next(6) {
            input.extend_from_slice(&requests[next(requests.len())]);
        }
        let refused = case % 3 == 0;
        input.extend_from_slice(if refused { &bad } else { &last });
        let (piece, pipe) = (1 + next(200), 1 + next(300));
        let alone = rt.block_on(served(input.clone(), piece, pipe, false));
        let guarded = rt.block_on(served(input.clone(), piece, pipe, true));
        let shown = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if !refused {
            assert_eq!(
                shown(&guarded),
                shown(&alone),
                "case {case}: {}",
                shown(&input)
            );
            continue;
        }
        // The last answer (hyper answers HTTP/1.0 in kind).
        let split = |b: &[u8]| {
            let at = b
                .windows(7)
                .rposition(|w| w == b"HTTP/1.")
                .unwrap_or_else(|| {
                    panic!("case {case}: no answer in {:?}", String::from_utf8_lossy(b))
                });
            (b[..at].to_vec(), b[at..].to_vec())
        };
        let (alone_before, alone_error) = split(&alone);
        let (guarded_before, guarded_error) = split(&guarded);
        assert_eq!(
            shown(&guarded_before),
            shown(&alone_before),
            "case {case}: {}",
            shown(&input)
        );
        assert!(
            shown(&alone_error).get(8..26) == Some(" 400 Bad Request\r\n"),
            "{}",
            shown(&alone_error)
        );
        assert!(!shown(&alone_error).contains("application/json"));
        assert!(
            shown(&guarded_error)
                .starts_with("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n")
                && shown(&guarded_error).ends_with("\"}"),
            "case {case}: {}",
            shown(&guarded_error)
        );
    }
}

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
            Head::Good { .. } => Ok(true),
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
