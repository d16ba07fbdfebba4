//! The connection's byte stream as hyper sees it, with two duties hyper
//! does not have.
//!
//! **Every request head is checked before hyper sees it.** hyper answers a
//! head it cannot parse itself, with a bare 400 or 431 and no body, before
//! any route runs. So the guard follows the client's bytes (heads, then
//! bodies by their Content-Length or chunked framing), parses each head
//! with hyper's parser (httparse, same limits) and applies hyper's checks
//! on it; a head hyper would refuse never reaches hyper. Instead, once hyper
//! has answered every request before it and sent those answers, the guard
//! writes the JSON error itself and ends the stream (hyper then closes the
//! connection as after a client's EOF). The check never changes the bytes
//! hyper gets, only withholds a refused head and what follows; should it
//! lose track of the framing (a chunked body hyper will refuse anyway) it
//! stops checking. Bytes go straight from the socket into hyper's buffer
//! and are checked there; only a head split across reads is gathered here
//! (at most [`MAX_HEAD`] bytes) and copied on once complete.
//!
//! **An answer may not wait forever for a client that does not read.** Once
//! a write finds the socket buffer full, the answer must be written within
//! [`WRITE_TIMEOUT`](super::WRITE_TIMEOUT); otherwise the write fails and
//! the connection closes.
//!
//! The parts, one job each: [`head`] checks a request head as hyper will,
//! [`chunk`] follows a chunked body to its end, [`stall`] is the clock of
//! an answer the client does not read. This file follows the stream and
//! answers a refused head.

mod chunk;
mod head;
mod stall;

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Client, MAX_HEAD};
use crate::wire::{self, ErrorCode};
use chunk::{Chunk, ChunkEnd};
use head::{Bad, Body, Head, check_head};
use stall::Stall;

/// How much a read that gathers a split head takes at a time.
const GATHER: usize = 4096;

pub struct Guard<S> {
    io: S,
    client: Arc<Client>,
    frame: Frame,
    /// Heads handed on (or checked and held to be handed on).
    heads: u64,
    /// Bytes read but not handed on yet: the checked ones first
    /// (`ready` of them), then the start of a head still incomplete.
    held: Vec<u8>,
    ready: usize,
    refusal: Option<Refusal>,
    /// hyper has written since its last completed flush.
    unflushed: bool,
    /// hyper's read, parked until the requests before a refused head
    /// are answered.
    parked: Option<Waker>,
    stall: Stall,
}

/// Where the client's byte stream is.
enum Frame {
    /// At a request head (or inside one, its start held).
    Head,
    /// Inside a body, this many bytes to go.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// hyper reads no further request here (the last one closes the
    /// connection, or its chunked body is malformed): not checked.
    Through,
    /// A head was refused: nothing more is handed on.
    Refused,
}

/// The JSON answer to a refused head, and how much of it is written.
struct Refusal {
    status: u16,
    answer: Vec<u8>,
    sent: usize,
    started: bool,
}

impl<S> Guard<S> {
    pub fn new(io: S, client: Arc<Client>) -> Guard<S> {
        Guard {
            io,
            client,
            frame: Frame::Head,
            heads: 0,
            held: Vec::new(),
            ready: 0,
            refusal: None,
            unflushed: false,
            parked: None,
            stall: Stall::default(),
        }
    }

    /// Follows `data` (of which `data[fresh..]` just arrived) from the
    /// current frame. Returns how many bytes may be handed to hyper; the
    /// rest are an incomplete head (the frame stays `Head`) or a refused
    /// one (the frame is `Refused`).
    fn scan(&mut self, data: &[u8], fresh: usize) -> usize {
        let mut at = 0;
        while at < data.len() {
            match &mut self.frame {
                Frame::Through => return data.len(),
                Frame::Refused => return at,
                Frame::Body(left) => {
                    let n = (*left).min((data.len() - at) as u64);
                    *left -= n;
                    at += n as usize;
                    if *left == 0 {
                        self.frame = Frame::Head;
                    }
                }
                Frame::Chunked(chunk) => {
                    let (n, end) = chunk.follow(&data[at..]);
                    at += n;
                    match end {
                        ChunkEnd::More => {}
                        ChunkEnd::Done => self.frame = Frame::Head,
                        ChunkEnd::Lost => self.frame = Frame::Through,
                    }
                }
                Frame::Head => {
                    let rest = &data[at..];
                    // A head begun in earlier bytes was incomplete then;
                    // it can have become complete (or wrong in a way the
                    // parser sees) only with a new line, or too large.
                    if at < fresh && !data[fresh..].contains(&b'\n') && rest.len() < MAX_HEAD {
                        return at;
                    }
                    match check_head(rest) {
                        Head::Partial => return at,
                        Head::Bad(bad) => {
                            self.refuse(bad);
                            return at;
                        }
                        Head::Good { len, body, last } => {
                            self.heads += 1;
                            at += len;
                            self.frame = match body {
                                _ if last => Frame::Through,
                                Body::Length(0) => Frame::Head,
                                Body::Length(n) => Frame::Body(n),
                                Body::Chunked => Frame::Chunked(Chunk::Start),
                            };
                        }
                    }
                }
            }
        }
        data.len()
    }

    fn refuse(&mut self, bad: Bad) {
        let (status, reason, code, message) = match bad {
            Bad::Malformed(what) => (400, "Bad Request", ErrorCode::BadRequest, what),
            Bad::TooLarge => (
                431,
                "Request Header Fields Too Large",
                ErrorCode::RequestHeaderFieldsTooLarge,
                "the request head is over 16384 bytes or 100 header fields",
            ),
        };
        let body = wire::Error::body(code, message);
        let mut answer = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        tracing::debug!(status, reason = message, "refusing a socket request head");
        self.frame = Frame::Refused;
        self.refusal = Some(Refusal {
            status,
            answer,
            sent: 0,
            started: false,
        });
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guard<S> {
    /// Writes to the socket, failing once the answer has waited
    /// WRITE_TIMEOUT for a full socket buffer.
    fn poll_send(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, bytes) {
            Poll::Pending => self.stall.wait(cx),
            done => done,
        }
    }

    /// The read of a connection whose head was refused: nothing until
    /// every request before it is answered and the answers are sent,
    /// then the JSON error, then the end of the stream.
    fn poll_refused(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(mut refusal) = self.refusal.take() else {
            return Poll::Ready(Ok(()));
        };
        if !refusal.started {
            if self.client.answered.load(Ordering::Acquire) < self.heads || self.unflushed {
                self.parked = Some(cx.waker().clone());
                self.refusal = Some(refusal);
                return Poll::Pending;
            }
            refusal.started = true;
            self.client.refused.store(refusal.status, Ordering::Relaxed);
        }
        while refusal.sent < refusal.answer.len() {
            let r = self.poll_send(cx, &refusal.answer[refusal.sent..]);
            match r {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => refusal.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.refusal = Some(refusal);
                    return Poll::Pending;
                }
            }
        }
        self.stall.done();
        // Sent: hyper gets the end of the stream, and closes.
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Checked bytes held back from an earlier read go first.
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.held[..n]);
                this.held.drain(..n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if let Frame::Refused = this.frame {
                return this.poll_refused(cx);
            }
            if this.held.is_empty() {
                // The usual case: straight into hyper's buffer, checked there.
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                let filled = buf.filled().len();
                if filled == before {
                    return Poll::Ready(Ok(())); // the client's EOF
                }
                let ok = this.scan(&buf.filled()[before..], 0);
                if before + ok < filled {
                    if let Frame::Head = this.frame {
                        // An incomplete head: gathered here until complete.
                        this.held.extend_from_slice(&buf.filled()[before + ok..]);
                    }
                    buf.set_filled(before + ok);
                }
                if ok > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // A head split across reads: gather more of it.
            let old = this.held.len();
            let mut chunk = [MaybeUninit::<u8>::uninit(); GATHER];
            let want = (MAX_HEAD + 1).saturating_sub(old).clamp(1, GATHER);
            let mut rb = ReadBuf::uninit(&mut chunk[..want]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // The client left mid-head: hyper saw none of it, so to
                // hyper this is a clean end.
                this.held.clear();
                return Poll::Ready(Ok(()));
            }
            this.held.extend_from_slice(rb.filled());
            let held = std::mem::take(&mut this.held);
            let ok = this.scan(&held, old);
            this.held = held;
            if let Frame::Refused = this.frame {
                this.held.truncate(ok);
            }
            this.ready = ok;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.unflushed = true;
        this.poll_send(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.unflushed = true;
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.stall.wait(cx),
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// hyper flushes once all it has buffered is written: the answer
    /// went out, so the stall clock stops.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.stall.wait(cx),
            Poll::Ready(r) => {
                if r.is_ok() {
                    this.unflushed = false;
                    this.stall.done();
                    if this.parked.is_some()
                        && this.client.answered.load(Ordering::Acquire) >= this.heads
                        && let Some(w) = this.parked.take()
                    {
                        w.wake();
                    }
                }
                Poll::Ready(r)
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Pending => this.stall.wait(cx),
            done => done,
        }
    }
}

#[cfg(test)]
mod hyper_tests;
#[cfg(test)]
mod tests;
