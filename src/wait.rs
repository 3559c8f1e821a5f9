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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::request::Parts;
use http::Request;
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
/// inside the retry layer's inner layers and the request's deadline, the
/// head the retry layer keeps to send the request again, and in the same
/// allocation the attempt's [`Dispatch`] node, taken by the first budget
/// inside.
#[derive(Debug)]
pub(crate) struct Log {
    /// Nanoseconds waited in inner layers (saturating).
    waited: AtomicU64,
    deadline: Option<Instant>,
    node: Node,
    /// The retry layer's copy of the head (see [`Kept`]).
    head: Mutex<Kept>,
}

/// The head a retry layer keeps to send its request again, in the
/// attempt's log rather than in its own future: so that a layer inside it
/// that holds the attempt waiting (the concurrency queue, the budget's
/// line) can hold the request without its head while its head is equal
/// ([`Parked`]): a waiting request carries one head, not two.
// The copy inline: boxed, it would cost an allocation per request, and the
// log's allocation holds the slot anyway.
#[allow(clippy::large_enum_variant)]
#[derive(Default)]
enum Kept {
    /// No copy: the body cannot be sent again, or the head went out with
    /// the attempt.
    #[default]
    Empty,
    /// The head as the retry layer sent the attempt (before the layers
    /// inside it), without the extensions it adds to each attempt.
    Head {
        head: Parts,
        /// Whether a [`Parked`] request stands on the copy (its own head
        /// was equal, and dropped): the copy is then cloned, never taken,
        /// until that request is passed on or dropped. One at a
        /// time: a second request of the attempt (a hedging layer's clone)
        /// waits whole. (A flag, not a variant: the enum stays the size of
        /// the head.)
        parked: bool,
    },
}

impl Kept {
    fn head(head: Parts) -> Kept {
        Kept::Head {
            head,
            parked: false,
        }
    }

    /// Takes the copy, or clones it if a parked request stands on it.
    fn take(&mut self) -> Option<Parts> {
        match self {
            Kept::Head { head, parked: true } => Some(head.clone()),
            Kept::Head { .. } => match std::mem::take(self) {
                Kept::Head { head, .. } => Some(head),
                _ => None,
            },
            _ => None,
        }
    }

    /// The parked request that stood on the copy left.
    fn unpark(&mut self) {
        if let Kept::Head { parked, .. } = self {
            *parked = false;
        }
    }
}

impl fmt::Debug for Kept {
    // Never the headers: they hold the API key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kept::Empty => "Empty",
            Kept::Head { parked: false, .. } => "Head",
            Kept::Head { parked: true, .. } => "Parked",
        })
    }
}

/// Whether `copy` and the request's head have the same method, URI,
/// version and headers (extensions are not compared: a parked request
/// keeps its own).
fn same_head<B>(copy: &Parts, request: &Request<B>) -> bool {
    copy.method == request.method()
        && copy.version == request.version()
        && copy.uri == *request.uri()
        && copy.headers == *request.headers()
}

impl Log {
    /// A log for an attempt of a request with this deadline (if any); its
    /// dispatch node is chained to `parent` (the request's marker, if any).
    pub(crate) fn new(deadline: Option<Instant>, parent: Option<Dispatch>) -> Arc<Log> {
        Self::with(deadline, parent, Kept::Empty)
    }

    /// A log keeping `head` from the start, the retry layer's copy to send
    /// the request again ([`Kept`]): the head is moved once, into the log's
    /// allocation, not into an empty log after.
    pub(crate) fn with_head(
        deadline: Option<Instant>,
        parent: Option<Dispatch>,
        head: Parts,
    ) -> Arc<Log> {
        Self::with(deadline, parent, Kept::head(head))
    }

    fn with(deadline: Option<Instant>, parent: Option<Dispatch>, kept: Kept) -> Arc<Log> {
        Arc::new(Log {
            waited: AtomicU64::new(0),
            deadline,
            node: Node::new(parent),
            head: Mutex::new(kept),
        })
    }

    fn kept(&self) -> MutexGuard<'_, Kept> {
        // A panic while the lock was held left a whole value: use it.
        self.head.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `head`, the retry layer's copy to send the request again
    /// (without a lock while the log is not shared yet: the attempt's
    /// request is made after).
    #[cfg(test)]
    pub(crate) fn keep_head(log: &mut Arc<Log>, head: Parts) {
        match Arc::get_mut(log) {
            Some(log) => {
                *log.head.get_mut().unwrap_or_else(PoisonError::into_inner) = Kept::head(head);
            }
            None => {
                let mut kept = log.kept();
                match &mut *kept {
                    // A request parked on the copy stands on the new one.
                    Kept::Head { head: old, .. } => *old = head,
                    _ => *kept = Kept::head(head),
                }
            }
        }
    }

    /// Takes the kept head, leaving a copy of it if `copy` (one operation:
    /// the first attempt's).
    pub(crate) fn swap_head(log: &mut Arc<Log>, copy: bool) -> Option<Parts> {
        let swapped = |kept: &mut Kept| match kept {
            Kept::Head { head, .. } if copy => {
                let copied = head.clone();
                Some(std::mem::replace(head, copied))
            }
            _ => kept.take(),
        };
        match Arc::get_mut(log) {
            Some(log) => swapped(log.head.get_mut().unwrap_or_else(PoisonError::into_inner)),
            None => swapped(&mut log.kept()),
        }
    }

    /// Takes the kept head, if there is one (`None` if the body cannot be
    /// sent again, or a layer inside still holds the attempt); without a
    /// lock if no attempt's request holds the log any more.
    pub(crate) fn take_head(log: &mut Arc<Log>) -> Option<Parts> {
        match Arc::get_mut(log) {
            Some(log) => log
                .head
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
            None => log.kept().take(),
        }
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

/// A request that a layer inside a retry layer holds while it waits (the
/// concurrency queue), without its head: the retry layer's copy of the
/// head in the attempt's [`Log`] was the same, and stands for it until the
/// request is passed on ([`unpark`](Self::unpark), which makes the head
/// again from the copy) or dropped. A waiting request so carries one head,
/// and the layer that holds it keeps its body and extensions only.
pub(crate) struct Parked<B> {
    body: B,
    /// The request's own extensions (the copy has none of the attempt's).
    extensions: http::Extensions,
    on: StandingOn,
}

/// A parked request's claim on its log's copy of the head
/// (its `parked` flag, while it lives).
struct StandingOn(Option<Arc<Log>>);

impl Drop for StandingOn {
    /// The claim ends: the copy may be taken again.
    fn drop(&mut self) {
        if let Some(log) = self.0.take() {
            log.kept().unpark();
        }
    }
}

impl<B> fmt::Debug for Parked<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parked").finish_non_exhaustive()
    }
}

impl<B> Parked<B> {
    /// Parks `request`, this attempt's (whose log is `log`), if the retry
    /// layer's copy of the head is the same as its head (no layer in
    /// between changed it) and no other request stands on it; gives it
    /// back whole otherwise.
    // The `Err` is no error, and no copy: the request itself, handed back
    // to wait whole.
    #[allow(clippy::result_large_err)]
    pub(crate) fn park(request: Request<B>, log: &Arc<Log>) -> Result<Self, Request<B>> {
        {
            let mut kept = log.kept();
            match &mut *kept {
                Kept::Head {
                    head,
                    parked: parked @ false,
                } if same_head(head, &request) => *parked = true,
                _ => return Err(request),
            }
        }
        // Its method, URI and headers are dropped outside the lock.
        let (parts, body) = request.into_parts();
        Ok(Parked {
            body,
            extensions: parts.extensions,
            on: StandingOn(Some(Arc::clone(log))),
        })
    }

    /// `f` of the head it stands on (the retry layer's copy, under its
    /// log's lock: keep `f` short); `None` if the copy is gone, which a
    /// parked request prevents.
    pub(crate) fn with_head<R>(&self, f: impl FnOnce(&Parts) -> R) -> Option<R> {
        let log = self.on.0.as_ref()?;
        let kept = log.kept();
        match &*kept {
            Kept::Head { head, parked: true } => Some(f(head)),
            _ => None,
        }
    }

    /// The request's extensions.
    pub(crate) fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    /// The same, to change them (a budget's dispatch marker).
    pub(crate) fn extensions_mut(&mut self) -> &mut http::Extensions {
        &mut self.extensions
    }

    /// The request again, its head a copy of the retry layer's (with the
    /// request's own extensions), to pass it on. `None` only if the copy
    /// is gone, which a parked request prevents: the copy it stands on is
    /// cloned, never taken, while it does.
    pub(crate) fn unpark(mut self) -> Option<Request<B>> {
        let log = self.on.0.take()?;
        let mut head = {
            let mut kept = log.kept();
            let Kept::Head {
                head: copy,
                parked: true,
            } = &*kept
            else {
                return None;
            };
            let (mut head, ()) = Request::new(()).into_parts();
            head.method = copy.method.clone();
            head.uri = copy.uri.clone();
            head.version = copy.version;
            head.headers = copy.headers.clone();
            kept.unpark();
            head
        };
        head.extensions = self.extensions;
        Some(Request::from_parts(head, self.body))
    }
}

impl WaitLog {
    /// The extension for an attempt: its log, and the request's marker.
    pub(crate) fn new(log: Arc<Log>, marker: Option<Dispatch>) -> Self {
        WaitLog { log, marker }
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
    log: Option<Arc<Log>>,
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
            log: extensions.get::<WaitLog>().map(|w| Arc::clone(&w.log)),
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
            if let Some(deadline) = self.log.as_ref().and_then(|log| log.deadline) {
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

    /// The log of the request's attempt, if a retry layer put one there
    /// (to [park](Parked::park) the request on it).
    pub(crate) fn log(&self) -> Option<&Arc<Log>> {
        self.log.as_ref()
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

    /// Every request waiting in an inner layer under a retry layer holds
    /// its attempt's log: a guard against it growing unnoticed (280 bytes
    /// when the copy could be lent, 288 with the flag of a request parked
    /// on it).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_log_stays_small() {
        let size = std::mem::size_of::<Log>();
        assert!(size <= 288, "Log is {size} bytes");
    }

    fn keep(log: &WaitLog, head: Parts) {
        Log::keep_head(&mut Arc::clone(&log.log), head);
    }

    fn take(log: &WaitLog) -> Option<Parts> {
        Log::take_head(&mut Arc::clone(&log.log))
    }

    fn head(name: &'static str) -> Request<()> {
        let mut request = Request::post("/v1/messages")
            .header("x-request-name", name)
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        request.extensions_mut().insert(7u32);
        request
    }

    /// A layer that holds the attempt parks it on an equal copy: the
    /// request keeps its body and extensions, and is made again from the
    /// copy (with its own extensions) when it is passed on; the copy stays.
    #[test]
    fn a_parked_request_is_made_again_from_the_copy() {
        let log = WaitLog::new(Log::new(None, None), None);
        let (copy, ()) = head("a").into_parts();
        keep(&log, copy);
        let mut attempt = head("a").map(|()| "body");
        attempt.extensions_mut().insert(log.clone());
        attempt.extensions_mut().insert(9u32);
        let parked = Parked::park(attempt, &log.log).unwrap_or_else(|_| panic!("parked"));
        let request = parked.unpark().unwrap_or_else(|| panic!("unparked"));
        assert_eq!(request.headers()["x-request-name"], "a");
        assert_eq!(request.uri(), "/v1/messages");
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(*request.body(), "body");
        assert_eq!(request.extensions().get::<u32>(), Some(&9));
        assert!(request.extensions().get::<WaitLog>().is_some());
        let copy = take(&log).unwrap_or_else(|| panic!("the copy stays"));
        assert_eq!(copy.extensions.get::<u32>(), Some(&7));
    }

    /// While a request stands on the copy, the retry layer gets a clone of
    /// it (a hedging layer's next attempt), and no second request parks on
    /// it; dropped, the parked request leaves the copy.
    #[test]
    fn the_copy_a_request_stands_on_is_cloned_not_taken() {
        let log = WaitLog::new(Log::new(None, None), None);
        keep(&log, head("a").into_parts().0);
        let parked = Parked::park(head("a"), &log.log).unwrap_or_else(|_| panic!("parked"));
        let clone = take(&log).unwrap_or_else(|| panic!("cloned"));
        assert_eq!(clone.headers["x-request-name"], "a");
        assert!(
            Parked::park(head("a"), &log.log).is_err(),
            "one request parks at a time"
        );
        drop(parked);
        let copy = take(&log).unwrap_or_else(|| panic!("left"));
        assert_eq!(copy.headers["x-request-name"], "a");
        assert!(take(&log).is_none(), "taken, once nobody stands on it");
    }

    /// A head that a layer in between changed is not parked: the request
    /// is given back whole, and the copy stays.
    #[test]
    fn a_changed_head_is_not_parked() {
        let log = WaitLog::new(Log::new(None, None), None);
        keep(&log, head("a").into_parts().0);
        let whole = Parked::park(head("b"), &log.log)
            .err()
            .unwrap_or_else(|| panic!("not parked"));
        assert_eq!(whole.headers()["x-request-name"], "b");
        let kept = take(&log).unwrap_or_else(|| panic!("kept"));
        assert_eq!(kept.headers["x-request-name"], "a");
    }
}
