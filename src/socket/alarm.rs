//! The clock behind hyper's header-read bound ([`HEADER_TIMEOUT`]), one
//! per connection.
//!
//! hyper arms that bound for every request head: with tokio's timer as it
//! comes (`hyper_util`'s `TokioTimer`), each head costs a boxed timer
//! entry inserted into the runtime's timer wheel and taken out again as
//! soon as the head arrives, which on a busy keep-alive connection is most
//! of the bound's cost and none of its use. Here a connection keeps one
//! tokio timer, the alarm, and each bound hyper asks for shares it: the
//! alarm rings at the earliest deadline still possibly wanted, and a bound
//! woken before its own deadline moves the alarm there. With requests
//! coming in, the alarm moves about once per [`HEADER_TIMEOUT`]; a bound
//! that is not reached never touches the wheel.
//!
//! What hyper sees is unchanged: a bound completes at or after its
//! deadline, never before, and wakes its task when it does. The alarm holds
//! one waker, the last bound's: hyper's HTTP/1 server has at most one bound
//! per connection at a time, polled from the connection's task.
//!
//! [`HEADER_TIMEOUT`]: super::HEADER_TIMEOUT

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};

/// A connection's timer for hyper (`http1::Builder::timer`).
#[derive(Clone, Default)]
pub(super) struct Alarm {
    /// The one tokio timer the connection's bounds share; None until the
    /// first bound is polled.
    bell: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl Timer for Alarm {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    /// tokio's clock, which the alarm runs on (the same as the system's
    /// unless a test pauses it).
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(Bound {
            deadline,
            bell: self.bell.clone(),
        })
    }
}

/// One deadline hyper waits for.
struct Bound {
    deadline: Instant,
    bell: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl Sleep for Bound {}

impl Future for Bound {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let mut bell = self.bell.lock().unwrap_or_else(|e| e.into_inner());
        let bell = bell.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // Set for a later deadline (a bound polled after a later one; hyper
        // never does, its deadlines only grow): ring at ours instead.
        if bell.deadline() > deadline {
            bell.as_mut().reset(deadline);
        }
        // The alarm rings at or before our deadline; until it rings, it
        // holds our waker.
        while bell.as_mut().poll(cx).is_ready() {
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(());
            }
            // It rang for an earlier bound: ours is the one wanted now.
            bell.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Awaits `bound`, failing the test rather than hanging if it is never
    /// woken.
    async fn complete(bound: Pin<Box<dyn Sleep>>) {
        tokio::time::timeout(Duration::from_secs(10), bound)
            .await
            .expect("a bound that is never woken");
    }

    /// Polls `bound` once: whether it is still pending.
    async fn pending(bound: &mut Pin<Box<dyn Sleep>>) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(bound.as_mut().poll(cx).is_pending())).await
    }

    /// Bounds sharing the alarm each complete at their own deadline: never
    /// before it, and not held until another bound's later one.
    #[tokio::test]
    async fn each_bound_completes_at_its_own_deadline() {
        let alarm = Alarm::default();
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);

        // Armed early, then one later: the later waits past the first's.
        let mut first = alarm.sleep_until(at(100));
        let mut second = alarm.sleep_until(at(300));
        assert!(pending(&mut first).await);
        assert!(pending(&mut second).await);
        complete(second).await;
        assert!(Instant::now() >= at(300), "completed before its deadline");

        // The alarm last rang at 300: a later bound moves it.
        complete(alarm.sleep_until(at(500))).await;
        assert!(Instant::now() >= at(500), "completed before its deadline");

        // A bound earlier than the one the alarm is set for is not held
        // until the later deadline.
        let mut later = alarm.sleep_until(at(2000));
        assert!(pending(&mut later).await);
        complete(alarm.sleep_until(at(700))).await;
        let now = Instant::now();
        assert!(now >= at(700), "completed before its deadline");
        assert!(now < at(1800), "held until the later deadline");
        // The later one still completes, at its own deadline.
        complete(later).await;
        assert!(Instant::now() >= at(2000), "completed before its deadline");
    }

    /// A bound armed and dropped on every request (hyper's pattern) leaves
    /// the next one's deadline intact.
    #[tokio::test]
    async fn dropped_bounds_do_not_shorten_the_next() {
        let alarm = Alarm::default();
        for _ in 0..3 {
            let mut b = alarm.sleep(Duration::from_millis(100));
            assert!(pending(&mut b).await);
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let start = Instant::now();
        complete(alarm.sleep(Duration::from_millis(300))).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "took {took:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
}
