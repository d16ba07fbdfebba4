//! One client connection: HTTP/1.1 (RFC 9112) as the socket's routes need
//! it, with every bound the daemon promises.
//!
//! Why not a general HTTP server: the socket's routes take no request body,
//! answer a few hundred bytes and run on a local socket, where the kernel's
//! share of a request is small and every instruction in user space shows in
//! the throughput. Serving with hyper cost 1.8 times the instructions of a
//! bare hyper server per request, and a second parse of each head was needed to
//! answer a bad one in JSON rather than with hyper's bare 400
//! (BENCHMARKS.md, "Socket API"). Here each head is parsed once, by
//! httparse, and the same code answers good and bad ones.
//!
//! What a client gets:
//! - Keep-alive (HTTP/1.1 by default, HTTP/1.0 with `Connection:
//!   keep-alive`) and pipelining: requests are answered one after another,
//!   in order.
//! - A head that cannot be parsed, breaks a framing rule or is over
//!   [`MAX_HEAD`] bytes or [`head::MAX_HEADERS`] fields gets the JSON error
//!   (400 or 431), after the answers to the requests before it, and the
//!   connection closes.
//! - A body (no route needs one) is read and dropped: by Content-Length up
//!   to [`MAX_BODY`] bytes, or chunked up to as many bytes on the wire,
//!   within [`BODY_TIMEOUT`]; `Expect: 100-continue` is answered. A larger,
//!   slower or malformed body gets a 400 and the connection closes.
//! - A head must arrive within [`HEADER_TIMEOUT`] of the last answer
//!   (which also closes an idle connection), and an answer the client does
//!   not read fails once it has waited [`WRITE_TIMEOUT`] for a full socket
//!   buffer.
//! - Answers are whole (`content-length`), except the list of credentials,
//!   which is chunked (close-delimited to an HTTP/1.0 client); a HEAD
//!   request gets the head of the answer only.
//! - At shutdown an idle connection closes at once; a request in progress
//!   is answered with `connection: close`.

mod chunk;
mod head;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::peer::Caller;
use super::routes::{self, Answer, Call, Payload, State};
use super::{HEADER_TIMEOUT, MAX_HEAD, WRITE_TIMEOUT};
use crate::wire::ErrorCode;
use chunk::{Chunk, ChunkEnd};
use head::{Bad, Body, Head, Request, check_head};

/// The largest request body read and dropped (no route needs one).
const MAX_BODY: usize = 4096;
/// How long a body may take to arrive once its head has.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// The read buffer's first size: a request with a few headers, and a few
/// pipelined behind it. It grows to hold a head and its body at most.
const FIRST_BUFFER: usize = 4096;
const MAX_BUFFER: usize = MAX_HEAD + MAX_BODY;
/// The answer buffer's first size, and the most it keeps between answers.
const FIRST_OUT: usize = 512;
const KEPT_OUT: usize = 16 * 1024;
/// How long the whole streamed list may take to be read: each part has
/// WRITE_TIMEOUT, and a client taking one part just within it would
/// otherwise hold its slot for an hour on 100,000 credentials.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves a connection until the client leaves, a request closes it, a
/// bound runs out, or `stop` is set (the daemon is stopping: checked while
/// the connection waits for a head, complete or not).
pub(super) async fn serve<S>(io: S, state: &State, caller: &Caller, stop: &AtomicBool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Conn {
        io,
        stop,
        buf: vec![0; FIRST_BUFFER],
        start: 0,
        filled: 0,
        out: Vec::with_capacity(FIRST_OUT),
        clock: Clock::default(),
    };
    loop {
        let req = match c.next_head().await {
            Next::Head(req) => req,
            Next::Bad(bad) => {
                c.refuse(state, bad).await;
                break;
            }
            Next::Gone => break,
        };
        let body = match c.read_body(&req).await {
            Ok(n) => n,
            // The client left, or did not take the go-ahead.
            Err(None) => break,
            Err(Some(why)) => {
                tracing::debug!(reason = why, "refusing a socket request body");
                let answer = routes::error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, why);
                state.refresher.metrics().socket_request("bad_request", 400);
                let _ = c.answer(answer, &req, true).await;
                break;
            }
        };
        let head = &c.buf[c.start..c.start + req.len];
        let call = Call {
            method: &req.method,
            path: req.path(head),
            wants_json: req.wants_json,
        };
        let answer = routes::handle(state, caller, call).await;
        c.consume(req.len + body);
        // An HTTP/1.0 client has no chunked framing: the list's end is the
        // connection's.
        let close = req.last
            || c.stop.load(Ordering::Relaxed)
            || (req.http10 && matches!(answer.payload, Payload::List(_)));
        if c.answer(answer, &req, close).await.is_err() || close {
            break;
        }
        // The largest answers (metrics of many credentials) are not kept
        // for the connection's life.
        if c.out.capacity() > KEPT_OUT {
            c.out = Vec::with_capacity(FIRST_OUT);
        }
    }
    let _ = c.shutdown().await;
}

/// What waiting for a head brought.
enum Next {
    Head(Request),
    Bad(Bad),
    /// The client left, went silent past the bound, or the daemon is
    /// stopping: close without an answer.
    Gone,
}

struct Conn<'a, S> {
    io: S,
    stop: &'a AtomicBool,
    /// Bytes read: `buf[start..filled]` not yet consumed.
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    /// The answer being written, reused from one to the next.
    out: Vec<u8>,
    clock: Clock,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<'_, S> {
    /// Waits for the next request head, parsing what is read as it comes.
    /// At shutdown, one not complete yet is given up at once, as an idle
    /// connection is.
    async fn next_head(&mut self) -> Next {
        let deadline = Instant::now() + HEADER_TIMEOUT;
        // Bytes of the pending head already parsed and found incomplete: a
        // head can only become complete (or wrong in a way the parser sees)
        // with a new line, so a slow client sending a byte at a time does
        // not make every byte a parse of all before it.
        let mut parsed = 0;
        // Empty lines skipped before this head, at most as many bytes as a
        // head may have: a client sending them faster than they are read
        // would otherwise never fill the buffer, nor let a read wait long
        // enough for the head's deadline to be seen.
        let mut skipped = 0;
        loop {
            // Empty lines before a request line are skipped (RFC 9112 §2.2):
            // consumed here, or a client sending only those would have its
            // whole head parsed again at each.
            while self.start < self.filled && matches!(self.buf[self.start], b'\r' | b'\n') {
                self.consume(1);
                parsed = 0;
                skipped += 1;
            }
            if skipped > MAX_HEAD {
                return Next::Bad(Bad::TooLarge);
            }
            let data = &self.buf[self.start..self.filled];
            if !data.is_empty()
                && (parsed == 0 || data[parsed..].contains(&b'\n') || data.len() >= MAX_HEAD)
            {
                match check_head(data) {
                    Head::Good(req) => return Next::Head(req),
                    Head::Bad(bad) => return Next::Bad(bad),
                    Head::Partial => parsed = data.len(),
                }
            }
            match self.fill(deadline, true).await {
                Ok(0) | Err(_) => return Next::Gone,
                Ok(_) => {}
            }
        }
    }

    /// Reads the request's body and drops it; returns its length on the
    /// wire, to be consumed with the head. An error says why the body is
    /// refused, or (None) that the go-ahead could not be written: the
    /// connection closes without an answer, which would follow part of
    /// one.
    async fn read_body(&mut self, req: &Request) -> Result<usize, Option<&'static str>> {
        const TOO_MUCH: Option<&str> = Some("request body too large or too slow");
        let deadline = Instant::now() + BODY_TIMEOUT;
        match req.body {
            Body::Length(0) => Ok(0),
            Body::Length(n) if n > MAX_BODY as u64 => Err(TOO_MUCH),
            Body::Length(n) => {
                let want = req.len + n as usize;
                if req.expects_continue && self.filled - self.start < want {
                    self.write_all_out(b"HTTP/1.1 100 Continue\r\n\r\n", None)
                        .await
                        .map_err(|_| None)?;
                }
                while self.filled - self.start < want {
                    match self.fill(deadline, false).await {
                        Ok(0) | Err(_) => return Err(TOO_MUCH),
                        Ok(_) => {}
                    }
                }
                Ok(n as usize)
            }
            Body::Chunked => {
                if req.expects_continue && self.filled - self.start == req.len {
                    self.write_all_out(b"HTTP/1.1 100 Continue\r\n\r\n", None)
                        .await
                        .map_err(|_| None)?;
                }
                let mut chunk = Chunk::Start;
                let mut at = req.len;
                loop {
                    let (n, end) = chunk.follow(&self.buf[self.start + at..self.filled]);
                    at += n;
                    match end {
                        ChunkEnd::Done => return Ok(at - req.len),
                        ChunkEnd::Lost => return Err(Some("malformed chunked request body")),
                        ChunkEnd::More if at - req.len >= MAX_BODY => return Err(TOO_MUCH),
                        ChunkEnd::More => match self.fill(deadline, false).await {
                            Ok(0) | Err(_) => return Err(TOO_MUCH),
                            Ok(_) => {}
                        },
                    }
                }
            }
        }
    }

    /// Marks `n` bytes at the start of the buffer as used.
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.filled {
            (self.start, self.filled) = (0, 0);
        }
    }

    /// Reads more bytes: how many (0 at the client's end), an error once
    /// `deadline` has passed, or 0 if `between` (requests), the daemon is
    /// stopping and nothing more has come (what a client sent just before
    /// the shutdown is still read, and answered).
    async fn fill(&mut self, deadline: Instant, between: bool) -> io::Result<usize> {
        if self.filled == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.filled, 0);
                (self.start, self.filled) = (0, self.filled - self.start);
            } else {
                // Only a head still incomplete below MAX_HEAD, or a body
                // within MAX_BODY behind its head, asks for more: both fit.
                let size = (self.buf.len() * 2).min(MAX_BUFFER);
                self.buf.resize(size, 0);
            }
        }
        std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut self.buf[self.filled..]);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    self.filled += n;
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending if between && self.stop.load(Ordering::Relaxed) => Poll::Ready(Ok(0)),
                Poll::Pending => match self.clock.poll(cx, deadline) {
                    Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
                    Poll::Pending => Poll::Pending,
                },
            }
        })
        .await
    }

    /// Answers a refused head and counts it like any answer.
    async fn refuse(&mut self, state: &State, bad: Bad) {
        let (status, code, message) = match bad {
            Bad::Malformed(what) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest, what),
            Bad::TooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                ErrorCode::RequestHeaderFieldsTooLarge,
                "the request head is over 16384 bytes or 100 header fields",
            ),
        };
        tracing::debug!(
            status = status.as_u16(),
            reason = message,
            "refusing a socket request head"
        );
        state
            .refresher
            .metrics()
            .socket_request("bad_request", status.as_u16());
        let body = crate::wire::Error::body(code, message);
        self.out.clear();
        write_head(
            &mut self.out,
            status,
            "application/json",
            None,
            Length::Known(body.len()),
            Connection::Close,
        );
        self.out.extend_from_slice(&body);
        let _ = self.send_out().await;
    }

    /// Writes an answer to `req`; `close` says it is the connection's last.
    async fn answer(&mut self, answer: Answer, req: &Request, close: bool) -> io::Result<()> {
        let Answer {
            status,
            content_type,
            allow,
            payload,
        } = answer;
        let head_only = req.method == Method::HEAD;
        let connection = if close {
            Connection::Close
        } else if req.http10 {
            Connection::KeepAlive
        } else {
            Connection::Default
        };
        self.out.clear();
        match payload {
            Payload::Whole(body) => {
                write_head(
                    &mut self.out,
                    status,
                    content_type,
                    allow,
                    Length::Known(body.len()),
                    connection,
                );
                if head_only {
                    return self.send_out().await;
                }
                if body.len() <= KEPT_OUT {
                    self.out.extend_from_slice(&body);
                    return self.send_out().await;
                }
                // A large answer (the metrics of many credentials) is
                // written from where it is, not copied next to itself.
                self.send_out().await?;
                self.write_all_out(&body, None).await
            }
            Payload::List(mut list) => {
                // HTTP/1.0 has no chunked framing: the end of the
                // connection ends the answer.
                let (length, connection) = if req.http10 {
                    (Length::UntilClose, Connection::Close)
                } else {
                    (Length::Chunked, connection)
                };
                write_head(
                    &mut self.out,
                    status,
                    content_type,
                    allow,
                    length,
                    connection,
                );
                self.send_out().await?;
                if head_only {
                    return Ok(());
                }
                let by = Some(Instant::now() + LIST_TIMEOUT);
                let mut part = Vec::with_capacity(32 * 1024);
                loop {
                    part.clear();
                    let more = list.next_part(&mut part);
                    self.out.clear();
                    if req.http10 {
                        self.out.extend_from_slice(&part);
                    } else {
                        if !part.is_empty() {
                            self.out
                                .extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                            self.out.extend_from_slice(&part);
                            self.out.extend_from_slice(b"\r\n");
                        }
                        if !more {
                            self.out.extend_from_slice(b"0\r\n\r\n");
                        }
                    }
                    self.send_out_by(by).await?;
                    if !more {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn send_out(&mut self) -> io::Result<()> {
        self.send_out_by(None).await
    }

    /// [`send_out`](Self::send_out), failing also once `by` has passed
    /// while the client does not read.
    async fn send_out_by(&mut self, by: Option<Instant>) -> io::Result<()> {
        let out = std::mem::take(&mut self.out);
        let r = self.write_all_out(&out, by).await;
        self.out = out;
        r
    }

    /// Writes all of `bytes`, failing once a write has waited
    /// WRITE_TIMEOUT for the client to read, or has waited past `by`.
    async fn write_all_out(&mut self, bytes: &[u8], by: Option<Instant>) -> io::Result<()> {
        let mut sent = 0;
        let mut stalled: Option<Instant> = None;
        std::future::poll_fn(|cx| {
            while sent < bytes.len() {
                match Pin::new(&mut self.io).poll_write(cx, &bytes[sent..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        let deadline = *stalled.get_or_insert_with(|| {
                            tracing::debug!("a socket answer waits: the client is not reading");
                            let stall = Instant::now() + WRITE_TIMEOUT;
                            by.map_or(stall, |by| by.min(stall))
                        });
                        return match self.clock.poll(cx, deadline) {
                            Poll::Ready(()) => {
                                tracing::debug!(
                                    "closing a socket connection whose client has not read its answer in time"
                                );
                                Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
                            }
                            Poll::Pending => Poll::Pending,
                        };
                    }
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + WRITE_TIMEOUT;
        std::future::poll_fn(|cx| match Pin::new(&mut self.io).poll_shutdown(cx) {
            Poll::Pending => self.clock.poll(cx, deadline).map(|()| Ok(())),
            done => done,
        })
        .await
    }
}

/// How an answer's end is known.
enum Length {
    Known(usize),
    Chunked,
    UntilClose,
}

/// What the `connection` header says.
#[derive(Clone, Copy)]
enum Connection {
    /// Nothing: HTTP/1.1 keeps the connection.
    Default,
    /// `keep-alive`, which an HTTP/1.0 client needs to hear.
    KeepAlive,
    Close,
}

/// Writes an answer's status line and headers, lower-case as HTTP/2 and
/// hyper write them.
fn write_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    content_type: &str,
    allow: Option<&str>,
    length: Length,
    connection: Connection,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: ");
    out.extend_from_slice(content_type.as_bytes());
    if let Some(allow) = allow {
        out.extend_from_slice(b"\r\nallow: ");
        out.extend_from_slice(allow.as_bytes());
    }
    match length {
        Length::Known(n) => {
            out.extend_from_slice(b"\r\ncontent-length: ");
            decimal(out, n);
        }
        Length::Chunked => out.extend_from_slice(b"\r\ntransfer-encoding: chunked"),
        Length::UntilClose => {}
    }
    match connection {
        Connection::Default => {}
        Connection::KeepAlive => out.extend_from_slice(b"\r\nconnection: keep-alive"),
        Connection::Close => out.extend_from_slice(b"\r\nconnection: close"),
    }
    out.extend_from_slice(b"\r\ndate: ");
    date::now(out);
    out.extend_from_slice(b"\r\n\r\n");
}

/// `n` in decimal, without the formatting machinery a `write!` brings.
fn decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The `date` header (RFC 9110 §6.6.1: an origin server with a clock sends
/// one), formatted once a second per thread rather than per answer.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub(super) fn now(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, text)| {
            if *at != secs {
                *at = secs;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

/// The connection's one timer, which every bound it waits for shares.
///
/// A tokio timer armed and disarmed per request head costs an entry put
/// into the runtime's timer wheel and taken out again (about 340
/// instructions, most of a bound's cost and none of its use on a busy
/// connection). Here the timer rings at the earliest deadline still
/// possibly wanted, and moves to a later one only when it rings before
/// it: with requests coming in, about once per HEADER_TIMEOUT. A bound
/// completes at or after its deadline, never before.
#[derive(Default)]
struct Clock {
    bell: Option<(Pin<Box<Sleep>>, Instant)>,
}

impl Clock {
    /// Ready once `deadline` has passed; otherwise the task is woken when
    /// the bell rings (at or before `deadline`).
    fn poll(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        loop {
            match &mut self.bell {
                None => self.bell = Some((Box::pin(tokio::time::sleep_until(deadline)), deadline)),
                Some((bell, at)) if *at > deadline => {
                    bell.as_mut().reset(deadline);
                    *at = deadline;
                }
                Some((bell, at)) => {
                    if bell.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if *at >= deadline {
                        return Poll::Ready(());
                    }
                    // Rang for an earlier bound: on to this one.
                    bell.as_mut().reset(deadline);
                    *at = deadline;
                }
            }
        }
    }
}

#[cfg(test)]
mod hyper_tests;
#[cfg(test)]
mod tests;
