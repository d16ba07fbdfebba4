//! The slow-reader cut-off: once a write finds the socket buffer full, the
//! answer must be written within [`WRITE_TIMEOUT`], or the write fails and
//! the connection closes, so a client that does not read holds its
//! connection slot for a bounded time.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

use crate::socket::WRITE_TIMEOUT;

/// The clock of a write that waits for a full socket buffer: started at
/// the first write that cannot proceed, stopped when hyper's flush
/// completes (its whole answer is written).
#[derive(Default)]
pub(super) struct Stall {
    timer: Option<Pin<Box<Sleep>>>,
    running: bool,
}

impl Stall {
    /// A write cannot proceed: Pending (woken by the socket or the
    /// clock), or the error once WRITE_TIMEOUT has passed.
    pub(super) fn wait<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let deadline = Instant::now() + WRITE_TIMEOUT;
        if !self.running {
            self.running = true;
            tracing::debug!("a socket answer waits: the client is not reading");
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match self.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => {
                tracing::debug!(
                    "closing a socket connection whose client has not read its answer for 5 s"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client has not read its answer for 5 s",
                )))
            }
            _ => Poll::Pending,
        }
    }

    pub(super) fn done(&mut self) {
        self.running = false;
    }
}
