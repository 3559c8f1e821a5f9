//! The waits of one request, across layers: how long it waited in the
//! layers inside the retry layer (the token budget's queue, the concurrency
//! queue), and the deadline that bounds those waits.
//!
//! The retry layer puts a [`WaitLog`] in the extensions of each attempt of
//! the request it receives (a log per attempt, whose waits it adds up; the
//! log's allocation also holds the attempt's dispatch marker, see
//! [`crate::dispatch`]). An inner layer that makes the request wait adds the
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

use crate::dispatch::{Dispatch, Node};

/// The extension a retry layer puts on each attempt of a request: the
/// attempt's [`Log`], and the request's current [`Dispatch`] marker (see
/// [`crate::dispatch`]).
#[derive(Clone, Debug)]
pub(crate) struct WaitLog {
    log: Arc<Log>,
    marker: Option<Dispatch>,
}

/// Shared by the clones of one attempt of a request: the time it waited
/// inside the retry layer's inner layers and the request's deadline, and in
/// the same allocation the attempt's [`Dispatch`] node, taken by the first
/// budget inside.
#[derive(Debug)]
pub(crate) struct Log {
    /// Nanoseconds waited in inner layers (saturating).
    waited: AtomicU64,
    deadline: Option<Instant>,
    node: Node,
}

impl Log {
    /// A log for an attempt of a request with this deadline (if any); its
    /// dispatch node is chained to `parent` (the request's marker, if any).
    pub(crate) fn new(deadline: Option<Instant>, parent: Option<Dispatch>) -> Arc<Log> {
        Arc::new(Log {
            waited: AtomicU64::new(0),
            deadline,
            node: Node::new(parent),
        })
    }

    /// The dispatch node inside this log.
    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    /// The deadline of the request.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Adds a finished wait.
    pub(crate) fn add(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Saturating: a log of centuries is not a case to wrap on.
        let _ = self
            .waited
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_add(nanos))
            });
    }

    /// The time waited in inner layers so far.
    pub(crate) fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited.load(Ordering::Relaxed))
    }
}

impl WaitLog {
    /// The extension for an attempt: its log, and the request's marker.
    pub(crate) fn new(log: Arc<Log>, marker: Option<Dispatch>) -> Self {
        WaitLog { log, marker }
    }

    /// The log on a request, if a retry layer put one there.
    pub(crate) fn of(extensions: &http::Extensions) -> Option<WaitLog> {
        extensions.get::<WaitLog>().cloned()
    }

    /// The request's current dispatch marker, if one is kept here.
    pub(crate) fn marker(&self) -> Option<&Dispatch> {
        self.marker.as_ref()
    }

    /// Keeps `marker` as the request's current dispatch marker.
    pub(crate) fn set_marker(&mut self, marker: Dispatch) {
        self.marker = Some(marker);
    }

    /// The log holding the node, if no budget took the node yet (it is
    /// then taken).
    pub(crate) fn claim_node(&self) -> Option<Arc<Log>> {
        self.log.node.claim().then(|| Arc::clone(&self.log))
    }

    /// Adds a finished wait.
    pub(crate) fn add(&self, d: Duration) {
        self.log.add(d);
    }

    /// The time waited in inner layers so far.
    #[cfg(test)]
    pub(crate) fn waited(&self) -> Duration {
        self.log.waited()
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
            if let Some(deadline) = self.log.as_ref().and_then(|log| log.log.deadline) {
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
        let log = WaitLog::new(
            Log::new(Some(Instant::now() + Duration::from_secs(2)), None),
            None,
        );
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
