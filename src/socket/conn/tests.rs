//! The head check and the chunk follower, case by case: the heads taken
//! and their framing, the heads refused, chunked bodies.

use http::{Method, Uri};

use super::chunk::{Chunk, ChunkEnd};
use super::head::{Bad, Body, Head, MAX_HEADERS, check_head};
use crate::socket::MAX_HEAD;

/// A good head's length, body and whether it is the connection's last.
fn framing(head: &[u8]) -> Option<(usize, Body, bool)> {
    match check_head(head) {
        Head::Good(r) => Some((r.len, r.body, r.last)),
        _ => None,
    }
}

#[test]
fn good_heads_are_taken_with_their_framing() {
    let h = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(framing(h), Some((h.len(), Body::Length(0), false)));
    // Followed by more (a body, a pipelined request): the head's length.
    let mut more = h.to_vec();
    more.extend_from_slice(b"GET /");
    assert_eq!(framing(&more), Some((h.len(), Body::Length(0), false)));
    for (head, body, last) in [
        (
            &b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\n"[..],
            Body::Length(5),
            false,
        ),
        (
            b"POST /a HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
            Body::Length(5),
            false,
        ),
        (
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            Body::Chunked,
            false,
        ),
        // Both: chunked wins, and the connection ends after it.
        (
            b"POST /a HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            Body::Chunked,
            true,
        ),
        (
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n",
            Body::Chunked,
            true,
        ),
        (b"GET /a HTTP/1.0\r\n\r\n", Body::Length(0), true),
        (
            b"GET /a HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
            Body::Length(0),
            false,
        ),
        (
            b"GET /a HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n",
            Body::Length(0),
            true,
        ),
        (
            b"GET /a HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
            Body::Length(0),
            true,
        ),
        (b"\r\n\r\nGET /a HTTP/1.1\r\n\r\n", Body::Length(0), false),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", Body::Length(0), false),
        (
            b"GET http://localhost/health HTTP/1.1\r\n\r\n",
            Body::Length(0),
            false,
        ),
    ] {
        assert_eq!(
            framing(head),
            Some((head.len(), body, last)),
            "{:?}",
            String::from_utf8_lossy(head)
        );
    }
}

/// What the routes are given: the method, the path without its query (of
/// any form of target), whether JSON is asked for, and the framing facts
/// the answer needs.
#[test]
fn a_good_head_gives_what_its_answer_needs() {
    let parse = |h: &[u8]| match check_head(h) {
        Head::Good(r) => r,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(h)),
    };
    let h = b"POST /v1/tokens/bot/rejected?x=1 HTTP/1.1\r\nAccept: text/plain, application/json\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n";
    let r = parse(h);
    assert_eq!(r.method, Method::POST);
    assert_eq!(r.path(h), "/v1/tokens/bot/rejected");
    assert!(r.wants_json && r.expects_continue && !r.http10 && !r.last);
    let h = b"GET http://localhost/health?a HTTP/1.0\r\nAccept: text/plain\r\nAccept: application/json\r\n\r\n";
    let r = parse(h);
    assert_eq!(r.path(h), "/health");
    assert!(!r.wants_json, "the first Accept field decides");
    assert!(r.http10 && r.last && !r.expects_continue);
    let h = b"HEAD /health HTTP/1.1\r\n\r\n";
    assert_eq!(parse(h).method, Method::HEAD);
    let h = b"POST /a HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n";
    assert!(!parse(h).expects_continue, "HTTP/1.0 has no go-ahead");
}

#[test]
fn bad_heads_are_refused() {
    for head in [
        &b"GET /health HTTP/1.1\r\nno colon\r\n\r\n"[..],
        b"GET /health HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        b"GET /health HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /health HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /a HTTP/2.0\r\n\r\n",
        b"GET /a<b HTTP/1.1\r\n\r\n",
        b"G(T /a HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\r\n\r\n",
    ] {
        assert!(
            matches!(check_head(head), Head::Bad(Bad::Malformed(_))),
            "{:?}: {:?}",
            String::from_utf8_lossy(head),
            check_head(head)
        );
    }
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(check_head(&many), Head::Bad(Bad::TooLarge));
    let mut long = b"GET / HTTP/1.1\r\nx: ".to_vec();
    long.resize(MAX_HEAD - 2, b'a');
    assert!(matches!(check_head(&long), Head::Partial));
    long.extend_from_slice(b"\r\n\r\n");
    assert_eq!(check_head(&long), Head::Bad(Bad::TooLarge));
    long.truncate(MAX_HEAD);
    assert_eq!(
        check_head(&long),
        Head::Bad(Bad::TooLarge),
        "incomplete at the limit"
    );
    assert_eq!(check_head(b"GET /a HTTP/1.1\r\nHost: x\r\n"), Head::Partial);
    assert_eq!(check_head(b"GET /a HT"), Head::Partial);
}

#[test]
fn plain_targets_are_ones_uri_takes() {
    let plain: Vec<u8> = (0u8..=255)
        .filter(
            |&c| matches!(c, b'!' | b'$'..=b';' | b'=' | b'?'..=b'Z' | b'_' | b'a'..=b'z' | b'~'),
        )
        .collect();
    for &c in &plain {
        for t in [
            vec![b'/', c],
            vec![b'/', c, c, b'/'],
            vec![b'/', b'a', b'?', c, c],
        ] {
            assert!(
                Uri::try_from(&t[..]).is_ok(),
                "{:?}",
                String::from_utf8_lossy(&t)
            );
        }
    }
}

#[test]
fn chunked_bodies_are_followed_to_their_end() {
    let body = b"3;ext=1\r\nabc\r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nGET";
    let end = body.len() - 3;
    // Whole, and a byte at a time.
    let mut c = Chunk::Start;
    assert_eq!(c.follow(body), (end, ChunkEnd::Done));
    let mut c = Chunk::Start;
    for (i, b) in body[..end].iter().enumerate() {
        let want = if i + 1 == end {
            ChunkEnd::Done
        } else {
            ChunkEnd::More
        };
        assert_eq!(c.follow(std::slice::from_ref(b)), (1, want), "at {i}");
    }
    for bad in [
        &b"x\r\n"[..],
        b"3\r\nabcX",
        b"3;a\nb",
        b"3\n",
        b"ffffffffffffffffff\r\n",
    ] {
        let mut c = Chunk::Start;
        assert_eq!(
            c.follow(bad).1,
            ChunkEnd::Lost,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}
