//! A small fair semaphore with priority lanes and a limit that can move.
//!
//! # Why not `tokio::sync::Semaphore`
//!
//! tokio's semaphore is fair (FIFO) and fast, but this layer needs three things
//! it cannot do:
//! - **priority lanes**: it has one queue; a freed slot cannot go to an
//!   `Interactive` waiter ahead of an older `Background` one;
//! - **a limit that shrinks cleanly**: permits can be added, but taking them away
//!   while they are held means acquiring and "forgetting" them, a waiting task
//!   that competes with the real waiters; here the limit is one number and a
//!   release simply does not admit anyone while in flight is at or above it;
//! - **a hand-off to a chosen waiter**: a release here picks the waiter (highest
//!   lane, aging applied), marks its slot as granted under the lock and wakes
//!   exactly that task. No other waiter is woken, so there is no thundering herd,
//!   and no newcomer can steal the slot between the wake and the poll.
//!
//! The state is one `Mutex`: the crate's one wait queue
//! ([`WaitQueue`](crate::queue::WaitQueue): lanes, aging, hand-off), the
//! limit, the count in flight and, in adaptive mode, the [`Controller`].
//! Critical sections are a few pointer moves.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use super::adaptive::{Change, Controller, Outcome, Reason};
use super::{LaneCounts, Priority, Snapshot};
use crate::queue::{Removed, WaitQueue};

/// Decides whether an inner error is a timeout (a drop signal in adaptive mode).
pub(crate) type Classifier =
    Arc<dyn Fn(&(dyn std::error::Error + 'static)) -> bool + Send + Sync + 'static>;

/// The shared run-time state of one layer and every service it built.
pub(crate) struct Shared {
    state: Mutex<State>,
    adaptive: bool,
    classifier: Classifier,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

struct State {
    limit: usize,
    in_flight: usize,
    max_waiting: usize,
    queue: WaitQueue,
    controller: Option<Controller>,
}

/// What [`Shared::enqueue`] decided for a new request.
pub(crate) enum Ticket {
    /// A slot was free and nobody was waiting: admitted at once.
    Admitted(Permit),
    /// Queued in its lane.
    Queued(Waiter),
    /// The queue was full.
    Shed {
        /// Requests waiting at that moment.
        waiting: usize,
    },
}

/// A place in line. Dropping it gives the place (or a slot granted to it) back.
pub(crate) struct Waiter {
    shared: Arc<Shared>,
    key: Option<usize>,
}

/// A slot in flight. Dropping it releases the slot to the next waiter.
pub(crate) struct Permit {
    shared: Arc<Shared>,
    epoch: u64,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").field("key", &self.key).finish()
    }
}

/// Wakers to wake once the lock is released: usually one, more only when the
/// limit grows.
#[derive(Default)]
struct Wakes {
    first: Option<Waker>,
    rest: Vec<Waker>,
}

impl Wakes {
    fn push(&mut self, waker: Waker) {
        if self.first.is_none() {
            self.first = Some(waker);
        } else {
            self.rest.push(waker);
        }
    }

    fn wake(self) {
        if let Some(w) = self.first {
            w.wake();
        }
        for w in self.rest {
            w.wake();
        }
    }
}

impl Shared {
    pub(crate) fn new(
        limit: usize,
        max_waiting: usize,
        aging: Duration,
        controller: Option<Controller>,
        classifier: Classifier,
    ) -> Self {
        let limit = match &controller {
            Some(c) => c.initial_limit(),
            None => limit.max(1),
        };
        Shared {
            adaptive: controller.is_some(),
            state: Mutex::new(State {
                limit,
                in_flight: 0,
                max_waiting,
                queue: WaitQueue::new(aging),
                controller,
            }),
            classifier,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything that
        // could panic, so a poisoned lock still holds a valid state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admit a request at once, queue it in its lane, or shed it.
    pub(crate) fn enqueue(self: &Arc<Self>, priority: Priority) -> Ticket {
        let mut st = self.lock();
        let waiting = st.queue.len();
        if waiting == 0 && st.in_flight < st.limit {
            st.in_flight += 1;
            let epoch = st.epoch();
            drop(st);
            return Ticket::Admitted(Permit {
                shared: Arc::clone(self),
                epoch,
            });
        }
        if waiting >= st.max_waiting {
            return Ticket::Shed { waiting };
        }
        let key = st.queue.push(priority.lane(), Instant::now(), None);
        Ticket::Queued(Waiter {
            shared: Arc::clone(self),
            key: Some(key),
        })
    }

    fn release(&self) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        let wakes = st.grant_free_slots();
        drop(st);
        wakes.wake();
    }

    /// Learn from a response (adaptive mode only) and apply the change.
    pub(crate) fn observe(&self, outcome: Outcome, permit: &Permit) {
        if !self.adaptive {
            return;
        }
        let mut st = self.lock();
        let limit = st.limit;
        let in_flight = st.in_flight;
        let change = match st.controller.as_mut() {
            Some(c) => c.observe(outcome, permit.epoch, in_flight, limit),
            None => None,
        };
        let Some(change) = change else { return };
        st.limit = change.to;
        let wakes = st.grant_free_slots();
        let snapshot = st.snapshot();
        drop(st);
        trace_change(change, &snapshot);
        wakes.wake();
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        self.lock().snapshot()
    }
}

fn trace_change(change: Change, s: &Snapshot) {
    match change.reason {
        Reason::Cut(_) => tracing::info!(
            target: "tower_llm_limits::concurrency",
            from = change.from,
            to = change.to,
            reason = %change.reason,
            in_flight = s.in_flight,
            waiting = s.waiting.total(),
            "concurrency limit cut"
        ),
        Reason::SlowStart | Reason::Increase => tracing::debug!(
            target: "tower_llm_limits::concurrency",
            from = change.from,
            to = change.to,
            reason = %change.reason,
            in_flight = s.in_flight,
            waiting = s.waiting.total(),
            "concurrency limit raised"
        ),
    }
}

impl State {
    fn epoch(&self) -> u64 {
        self.controller.as_ref().map_or(0, Controller::epoch)
    }

    /// Hand free slots to waiters, one at a time, and collect their wakers.
    fn grant_free_slots(&mut self) -> Wakes {
        let mut wakes = Wakes::default();
        while self.in_flight < self.limit {
            let epoch = self.epoch();
            let Some(waker) = self.queue.grant_next(epoch) else {
                break;
            };
            self.in_flight += 1;
            if let Some(w) = waker {
                wakes.push(w);
            }
        }
        wakes
    }

    fn snapshot(&self) -> Snapshot {
        let len = |p: Priority| self.queue.lane_len(p.lane());
        Snapshot {
            limit: self.limit,
            in_flight: self.in_flight,
            waiting: LaneCounts {
                interactive: len(Priority::Interactive),
                normal: len(Priority::Normal),
                background: len(Priority::Background),
            },
            cuts: self.controller.as_ref().map_or(0, Controller::cuts),
            increases: self.controller.as_ref().map_or(0, Controller::increases),
            adaptive: self.controller.is_some(),
            slow_start: self
                .controller
                .as_ref()
                .is_some_and(Controller::in_slow_start),
        }
    }
}

impl Waiter {
    /// Wait for the slot a release hands to this waiter.
    ///
    /// # Cancellation
    ///
    /// Dropping the waiter before it is ready gives back its place in line, or
    /// the slot if one was already handed to it.
    pub(crate) fn poll_acquire(&mut self, cx: &mut Context<'_>) -> Poll<Permit> {
        let Some(key) = self.key else {
            // Already acquired: never polled again by the response future.
            return Poll::Pending;
        };
        let epoch = ready!(self.shared.lock().queue.poll_grant(key, cx.waker()));
        self.key = None;
        Poll::Ready(Permit {
            shared: Arc::clone(&self.shared),
            epoch,
        })
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut st = self.shared.lock();
        if let Removed::Granted(_) = st.queue.remove(key) {
            // A slot was handed to us but never used: pass it on.
            st.in_flight = st.in_flight.saturating_sub(1);
            let wakes = st.grant_free_slots();
            drop(st);
            wakes.wake();
        }
    }
}

impl Permit {
    /// Learn from the response this permit's request got (adaptive mode only).
    pub(crate) fn observe(&self, outcome: Outcome) {
        self.shared.observe(outcome, self);
    }

    /// Whether adaptive mode wants outcomes (fixed mode skips the work).
    pub(crate) fn is_adaptive(&self) -> bool {
        self.shared.adaptive
    }

    /// Whether the layer's classifier calls this inner error a timeout.
    pub(crate) fn is_timeout(&self, err: &(dyn std::error::Error + 'static)) -> bool {
        (self.shared.classifier)(err)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shared.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn shared(limit: usize, max_waiting: usize) -> Arc<Shared> {
        Arc::new(Shared::new(
            limit,
            max_waiting,
            Duration::from_secs(10),
            None,
            Arc::new(|_| false),
        ))
    }

    fn admitted(t: Ticket) -> Option<Permit> {
        match t {
            Ticket::Admitted(p) => Some(p),
            _ => None,
        }
    }

    fn queued(t: Ticket) -> Option<Waiter> {
        match t {
            Ticket::Queued(w) => Some(w),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn release_wakes_exactly_the_chosen_waiter() {
        let s = shared(1, 100);
        let p = admitted(s.enqueue(Priority::Normal));
        assert!(p.is_some());
        let counts: Vec<Arc<Count>> = (0..5)
            .map(|_| Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        let mut waiters: Vec<Waiter> = (0..5)
            .filter_map(|_| queued(s.enqueue(Priority::Normal)))
            .collect();
        assert_eq!(waiters.len(), 5);
        for (w, c) in waiters.iter_mut().zip(&counts) {
            let waker = Waker::from(Arc::clone(c));
            assert!(w
                .poll_acquire(&mut Context::from_waker(&waker))
                .is_pending());
        }
        drop(p);
        let woken: Vec<usize> = counts.iter().map(|c| c.0.load(Ordering::SeqCst)).collect();
        assert_eq!(woken, vec![1, 0, 0, 0, 0]);
        assert_eq!(s.snapshot().in_flight, 1);
        assert_eq!(s.snapshot().waiting.total(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_middle_waiter_unlinks() {
        let s = shared(1, 100);
        let p = admitted(s.enqueue(Priority::Normal));
        let a = queued(s.enqueue(Priority::Normal));
        let b = queued(s.enqueue(Priority::Normal));
        let c = queued(s.enqueue(Priority::Normal));
        drop(b);
        assert_eq!(s.snapshot().waiting.normal, 2);
        drop(p);
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        let (Some(mut a), Some(mut c)) = (a, c) else {
            panic!("not queued")
        };
        let pa = match a.poll_acquire(&mut cx) {
            Poll::Ready(p) => p,
            Poll::Pending => panic!("a first"),
        };
        assert!(c.poll_acquire(&mut cx).is_pending());
        drop(pa);
        assert!(c.poll_acquire(&mut cx).is_ready());
        assert_eq!(s.snapshot().waiting.total(), 0);
    }
}
