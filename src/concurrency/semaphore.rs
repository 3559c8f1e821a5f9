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
//!
//! # Fixed mode: no lock while nobody waits
//!
//! With a fixed limit, the free slots and whether anyone waits are one
//! atomic word ([`Slots`]), as tokio's semaphore keeps its permits: while
//! nobody waits, a request takes a slot and gives it back with one
//! compare-and-swap each, without the lock. The lock is taken only to join
//! the queue or to hand a slot to a waiter. Fairness holds: while the
//! waiting flag is set the word holds no free slot (every slot freed goes to
//! a waiter under the lock), so no newcomer passes the queue; the flag and
//! the queue change together, under the lock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use super::adaptive::{Change, Controller, Outcome, Reason};
use super::{LaneCounts, Priority, Snapshot};
use crate::observe::Hooks;
use crate::queue::{Removed, WaitQueue};

/// Decides whether an inner error is a timeout (a drop signal in adaptive mode).
pub(crate) type Classifier =
    Arc<dyn Fn(&(dyn std::error::Error + 'static)) -> bool + Send + Sync + 'static>;

/// The shared run-time state of one layer and every service it built.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Fixed mode: the free slots and the waiting flag (unused in adaptive
    /// mode, whose limit moves under the lock).
    slots: Slots,
    adaptive: bool,
    /// Adaptive mode with a latency tolerance: requests are timed (a clock
    /// reading when sent and one at the response head); otherwise not.
    timed: bool,
    classifier: Classifier,
    /// Callbacks and metrics; `None` when there are none. Here rather than
    /// in each service and queued request: one pointer fewer in each.
    hooks: Option<Hooks>,
}

/// Fixed mode's free slots and waiting flag in one word: `free << 1 |
/// WAITING`. The flag is set and cleared only under the lock, together with
/// the queue becoming non-empty or empty; while it is set, `free` is zero.
#[derive(Debug)]
struct Slots(AtomicUsize);

/// The flag of [`Slots`]: someone is in the queue.
const WAITING: usize = 1;
/// One free slot in [`Slots`].
const ONE: usize = 2;

impl Slots {
    /// Takes a free slot if nobody waits: one compare-and-swap.
    #[inline]
    fn try_take(&self) -> bool {
        let mut word = self.0.load(Ordering::Acquire);
        while word & WAITING == 0 && word >= ONE {
            match self.0.compare_exchange_weak(
                word,
                word - ONE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => word = now,
            }
        }
        false
    }

    /// Gives a slot back if nobody waits; `false` if someone does (the
    /// caller hands the slot over under the lock).
    #[inline]
    fn try_give(&self) -> bool {
        let mut word = self.0.load(Ordering::Acquire);
        while word & WAITING == 0 {
            match self.0.compare_exchange_weak(
                word,
                word + ONE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => word = now,
            }
        }
        false
    }

    /// Under the lock, with the queue empty: sets the waiting flag if no
    /// slot is free (`true`: the caller joins the queue), or takes a slot
    /// freed meanwhile (`false`: the caller is admitted).
    fn mark_waiting_or_take(&self) -> bool {
        let mut word = self.0.load(Ordering::Acquire);
        loop {
            let (next, waits) = if word >= ONE {
                (word - ONE, false)
            } else {
                (WAITING, true)
            };
            match self
                .0
                .compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return waits,
                Err(now) => word = now,
            }
        }
    }

    /// Under the lock, once the queue is empty again: clears the flag and
    /// adds `free` slots (a slot that had no waiter left to go to).
    fn clear_waiting(&self, free: usize) {
        // While the flag is set nothing else changes the word.
        self.0.store(free.saturating_mul(ONE), Ordering::Release);
    }

    /// Under the lock, with the queue empty: one more free slot (clearing
    /// the waiting flag if it was still set).
    fn give_locked(&self) {
        if self.0.load(Ordering::Acquire) & WAITING != 0 {
            self.clear_waiting(1);
        } else {
            // Only compare-and-swaps race with this add: no lost update.
            self.0.fetch_add(ONE, Ordering::AcqRel);
        }
    }

    fn free(&self) -> usize {
        self.0.load(Ordering::Acquire) >> 1
    }
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

    #[inline]
    fn wake(self) {
        let Some(first) = self.first else { return };
        first.wake();
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
        hooks: Option<Hooks>,
    ) -> Self {
        let limit = match &controller {
            Some(c) => c.initial_limit(),
            // At most half the word: the free count is kept shifted by one.
            None => limit.clamp(1, usize::MAX >> 1),
        };
        Shared {
            slots: Slots(AtomicUsize::new(limit.saturating_mul(ONE))),
            adaptive: controller.is_some(),
            timed: controller.as_ref().is_some_and(Controller::uses_latency),
            state: Mutex::new(State {
                limit,
                in_flight: 0,
                max_waiting,
                queue: WaitQueue::new(aging),
                controller,
            }),
            classifier,
            hooks,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything that
        // could panic, so a poisoned lock still holds a valid state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admit a request at once, queue it in its lane, or shed it.
    pub(crate) fn enqueue(self: &Arc<Self>, priority: Priority) -> Ticket {
        if !self.adaptive {
            return self.enqueue_fixed(priority);
        }
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

    /// [`enqueue`](Self::enqueue) in fixed mode: a free slot is taken
    /// without the lock while nobody waits.
    fn enqueue_fixed(self: &Arc<Self>, priority: Priority) -> Ticket {
        if self.slots.try_take() {
            return self.admitted(0);
        }
        let mut st = self.lock();
        let waiting = st.queue.len();
        if waiting >= st.max_waiting {
            return Ticket::Shed { waiting };
        }
        if waiting == 0 && !self.slots.mark_waiting_or_take() {
            // A slot was freed between the first try and the lock.
            drop(st);
            return self.admitted(0);
        }
        let key = st.queue.push(priority.lane(), Instant::now(), None);
        Ticket::Queued(Waiter {
            shared: Arc::clone(self),
            key: Some(key),
        })
    }

    fn admitted(self: &Arc<Self>, epoch: u64) -> Ticket {
        Ticket::Admitted(Permit {
            shared: Arc::clone(self),
            epoch,
        })
    }

    fn release(&self) {
        if !self.adaptive {
            if self.slots.try_give() {
                return;
            }
            let mut st = self.lock();
            let wakes = st.pass_on_fixed(&self.slots);
            drop(st);
            wakes.wake();
            return;
        }
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

    /// The layer's callbacks, if it has any.
    pub(crate) fn hooks(&self) -> Option<&Hooks> {
        self.hooks.as_ref()
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        let mut snap = st.snapshot();
        if !self.adaptive {
            // Under the lock the free count is exact, bar fast-path
            // admissions and releases racing with this read.
            snap.in_flight = st.limit.saturating_sub(self.slots.free());
        }
        snap
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

    /// Fixed mode, under the lock: a slot freed (a release, or a grant its
    /// waiter dropped) goes to the next waiter, or back to the free slots
    /// (clearing the waiting flag) if the queue emptied meanwhile.
    fn pass_on_fixed(&mut self, slots: &Slots) -> Wakes {
        let mut wakes = Wakes::default();
        match self.queue.grant_next(0) {
            Some(waker) => {
                if self.queue.is_empty() {
                    slots.clear_waiting(0);
                }
                if let Some(w) = waker {
                    wakes.push(w);
                }
            }
            None => slots.give_locked(),
        }
        wakes
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
    /// The layer's callbacks, if it has any.
    pub(crate) fn hooks(&self) -> Option<&Hooks> {
        self.shared.hooks()
    }

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
        if !self.shared.adaptive {
            let wakes = match st.queue.remove(key) {
                // A slot was handed to us but never used: pass it on.
                Removed::Granted(_) => st.pass_on_fixed(&self.shared.slots),
                Removed::Waiting { .. } => {
                    if st.queue.is_empty() {
                        self.shared.slots.clear_waiting(0);
                    }
                    Wakes::default()
                }
                Removed::Gone => Wakes::default(),
            };
            drop(st);
            wakes.wake();
            return;
        }
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

    /// Whether the time to the response head is wanted (adaptive mode with
    /// a latency tolerance): otherwise the clock is not read.
    pub(crate) fn is_timed(&self) -> bool {
        self.shared.timed
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
            None,
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
    async fn fixed_mode_no_newcomer_passes_a_waiter() {
        let s = shared(1, 100);
        let p = admitted(s.enqueue(Priority::Normal));
        let w = queued(s.enqueue(Priority::Normal));
        assert!(p.is_some() && w.is_some());
        // The slot goes to the waiter, not back to the free slots.
        drop(p);
        assert_eq!(s.snapshot().in_flight, 1);
        let newcomer = s.enqueue(Priority::Interactive);
        assert!(matches!(newcomer, Ticket::Queued(_)), "passed the queue");
        // The waiter gives up its unused grant: it goes to the newcomer.
        drop(w);
        let Ticket::Queued(mut newcomer) = newcomer else {
            panic!("not queued")
        };
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let permit = match newcomer.poll_acquire(&mut Context::from_waker(&waker)) {
            Poll::Ready(p) => p,
            Poll::Pending => panic!("the grant was not passed on"),
        };
        drop(permit);
        // Nobody waits: the slot is free again and taken without queueing.
        let snap = s.snapshot();
        assert_eq!((snap.in_flight, snap.waiting.total()), (0, 0));
        assert!(admitted(s.enqueue(Priority::Normal)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_mode_a_waiter_that_leaves_unblocks_the_fast_path() {
        let s = shared(2, 100);
        let a = admitted(s.enqueue(Priority::Normal));
        let b = admitted(s.enqueue(Priority::Normal));
        let w = queued(s.enqueue(Priority::Normal));
        assert!(a.is_some() && b.is_some() && w.is_some());
        drop(w);
        drop(a);
        // The waiter left before any release: the released slot is free.
        assert_eq!(s.snapshot().in_flight, 1);
        let c = admitted(s.enqueue(Priority::Normal));
        assert!(c.is_some());
        assert!(matches!(s.enqueue(Priority::Normal), Ticket::Queued(_)));
        drop((b, c));
    }

    /// Threads racing through the fast path and the queue: never more in
    /// flight than the limit, every request served, every slot back.
    #[test]
    fn fixed_mode_holds_its_limit_across_threads() {
        const LIMIT: usize = 3;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_time()
            .build()
            .expect("runtime");
        let s = shared(LIMIT, usize::MAX);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let (s, in_flight, peak) =
                        (Arc::clone(&s), Arc::clone(&in_flight), Arc::clone(&peak));
                    tokio::spawn(async move {
                        for _ in 0..2_000 {
                            let permit = match s.enqueue(Priority::Normal) {
                                Ticket::Admitted(p) => p,
                                Ticket::Queued(mut w) => {
                                    std::future::poll_fn(|cx| w.poll_acquire(cx)).await
                                }
                                Ticket::Shed { .. } => panic!("shed"),
                            };
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            drop(permit);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= LIMIT);
        let snap = s.snapshot();
        assert_eq!((snap.in_flight, snap.waiting.total()), (0, 0));
        assert_eq!(s.slots.free(), LIMIT);
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
