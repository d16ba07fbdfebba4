//! The head check and the chunk follower, case by case: the heads hyper
//! takes and their framing, the heads it refuses, chunked bodies.

use hyper::Uri;

use super::chunk::{Chunk, ChunkEnd};
use super::head::{Bad, Body, Head, MAX_HEADERS, check_head};
use crate::socket::MAX_HEAD;

fn good(len: usize, body: Body, last: bool) -> Head {
    Head::Good { len, body, last }
}

#[test]
fn heads_hyper_takes_are_good_with_their_framing() {
    let h = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(check_head(h), good(h.len(), Body::Length(0), false));
    // Followed by more (a body, a pipelined request): the head's length.
    let mut more = h.to_vec();
    more.extend_from_slice(b"GET /");
    assert_eq!(check_head(&more), good(h.len(), Body::Length(0), false));
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
            check_head(head),
            good(head.len(), body, last),
            "{:?}",
            String::from_utf8_lossy(head)
        );
    }
}

#[test]
fn heads_hyper_refuses_are_bad() {
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
fn plain_targets_are_ones_hyper_takes() {
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
