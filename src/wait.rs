//! The waits of one request, across layers: how long it waited in the
//! layers inside the retry layer (the token budget's queue, the concurrency
//! queue), and the deadline that bounds those waits.
//!
//! The retry layer puts a [`WaitLog`] in the extensions of the request it
//! receives; every attempt carries a clone of it (extensions are cloned with
//! the request head). An inner layer that makes the request wait adds the
//! time to the log when the wait ends, and stops waiting when the request's
//! deadline passes, failing the attempt with [`DeadlineReached`]: the retry
//! layer then gives up with [`GiveUpReason::Deadline`](crate::GiveUpReason::Deadline),
//! counting the inner waits in the `waited` it reports.
//!
//! A layer that finds no log on a request (no retry layer outside it) waits
//! without a deadline. A request that never waits costs nothing; a wait
//! costs one clock read at each end.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Shared by the attempts of one request: the time they waited inside the
/// retry layer's inner layers, and the request's deadline.
#[derive(Clone, Debug)]
pub(crate) struct WaitLog(Arc<Log>);

#[derive(Debug)]
struct Log {
    /// Nanoseconds waited in inner layers (saturating).
    waited: AtomicU64,
    deadline: Option<Instant>,
}

impl WaitLog {
    /// A log for a request with this deadline (if any).
    pub(crate) fn new(deadline: Option<Instant>) -> Self {
        WaitLog(Arc::new(Log {
            waited: AtomicU64::new(0),
            deadline,
        }))
    }

    /// The log on a request, if a retry layer put one there.
    pub(crate) fn of(extensions: &http::Extensions) -> Option<WaitLog> {
        extensions.get::<WaitLog>().cloned()
    }

    /// Adds a finished wait.
    pub(crate) fn add(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Saturating: a log of centuries is not a case to wrap on.
        let _ = self
            .0
            .waited
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_add(nanos))
            });
    }

    /// The time waited in inner layers so far.
    pub(crate) fn waited(&self) -> Duration {
        Duration::from_nanos(self.0.waited.load(Ordering::Relaxed))
    }
}

/// A wait in an inner layer: started at the first `Pending`, recorded in the
/// request's [`WaitLog`] when it ends (or is dropped), cut at the request's
/// deadline.
#[derive(Default)]
pub(crate) struct Wait {
    log: Option<WaitLog>,
    started: Option<Instant>,
    /// The deadline's timer, armed at the first `Pending` (boxed: only
    /// requests that wait under a deadline pay for it).
    timer: Option<Pin<Box<Sleep>>>,
}

impl fmt::Debug for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wait")
            .field("log", &self.log)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Wait {
    /// A wait for the request with these extensions.
    pub(crate) fn of(extensions: &http::Extensions) -> Self {
        Wait {
            log: WaitLog::of(extensions),
            started: None,
            timer: None,
        }
    }

    /// Called when the awaited thing said `Pending`: starts the wait's clock
    /// and deadline timer (once), and tells whether the deadline passed
    /// (`Ready`: stop waiting; the wait is recorded).
    pub(crate) fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<DeadlineReached> {
        if self.started.is_none() {
            self.started = Some(Instant::now());
            if let Some(deadline) = self.log.as_ref().and_then(|log| log.0.deadline) {
                self.timer = Some(Box::pin(tokio::time::sleep_until(deadline)));
            }
        }
        let reached = match self.timer.as_mut() {
            Some(timer) => timer.as_mut().poll(cx).is_ready(),
            None => false,
        };
        if reached {
            self.finish();
            return Poll::Ready(DeadlineReached);
        }
        Poll::Pending
    }

    /// The wait is over: records it (once).
    pub(crate) fn finish(&mut self) {
        if let (Some(log), Some(started)) = (&self.log, self.started.take()) {
            log.add(started.elapsed());
        }
        self.timer = None;
    }

    /// When the request started waiting, if it did (a `Pending` was seen).
    pub(crate) fn started(&self) -> Option<Instant> {
        self.started
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The request's deadline passed while it waited in a layer inside the retry
/// layer (the token budget or the concurrency queue). The request was not
/// sent; the retry layer gives up with
/// [`GiveUpReason::Deadline`](crate::GiveUpReason::Deadline) and keeps this
/// error as the source of its [`Error::RetriesExhausted`](crate::Error::RetriesExhausted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeadlineReached;

impl fmt::Display for DeadlineReached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request's deadline passed while it waited to be sent")
    }
}

impl std::error::Error for DeadlineReached {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_is_recorded_and_cut_at_the_deadline() {
        let log = WaitLog::new(Some(Instant::now() + Duration::from_secs(2)));
        let mut ext = http::Extensions::new();
        ext.insert(log.clone());
        let mut wait = Wait::of(&ext);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(wait.poll_deadline(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(wait.poll_deadline(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(wait.poll_deadline(&mut cx), Poll::Ready(DeadlineReached));
        assert_eq!(log.waited(), Duration::from_secs(2));
        // Recorded once.
        drop(wait);
        assert_eq!(log.waited(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_log_a_wait_has_no_deadline() {
        let mut wait = Wait::of(&http::Extensions::new());
        assert_eq!(wait.started(), None);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(wait.poll_deadline(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(wait.poll_deadline(&mut cx).is_pending());
        assert!(wait.started().is_some());
    }
}
