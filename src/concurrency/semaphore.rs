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
//! The state is one `Mutex`: a slab of waiter nodes, each in a doubly linked
//! FIFO list of its lane (O(1) to push, pop and remove from the middle when a
//! waiting future is dropped), the limit, the count in flight and, in adaptive
//! mode, the [`Controller`]. Critical sections are a few pointer moves.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use super::adaptive::{Change, Controller, Outcome, Reason};
use super::{LaneCounts, Priority, Snapshot};

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
    aging: Duration,
    lanes: [Lane; 3],
    nodes: Vec<Slot>,
    free: Option<usize>,
    controller: Option<Controller>,
}

#[derive(Default, Clone, Copy)]
struct Lane {
    head: Option<usize>,
    tail: Option<usize>,
    len: usize,
}

enum Slot {
    Vacant { next_free: Option<usize> },
    Occupied(Node),
}

struct Node {
    lane: usize,
    since: Instant,
    prev: Option<usize>,
    next: Option<usize>,
    waker: Option<Waker>,
    /// `Some(epoch)` once a release handed this waiter a slot.
    granted: Option<u64>,
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
                aging,
                lanes: [Lane::default(); 3],
                nodes: Vec::new(),
                free: None,
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
        let waiting = st.waiting();
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
        let key = st.push(priority.lane(), Instant::now());
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
    fn waiting(&self) -> usize {
        self.lanes.iter().map(|l| l.len).sum()
    }

    fn epoch(&self) -> u64 {
        self.controller.as_ref().map_or(0, Controller::epoch)
    }

    fn node(&self, key: usize) -> Option<&Node> {
        match self.nodes.get(key) {
            Some(Slot::Occupied(n)) => Some(n),
            _ => None,
        }
    }

    fn node_mut(&mut self, key: usize) -> Option<&mut Node> {
        match self.nodes.get_mut(key) {
            Some(Slot::Occupied(n)) => Some(n),
            _ => None,
        }
    }

    /// Put a new waiter at the back of its lane.
    fn push(&mut self, lane: usize, since: Instant) -> usize {
        let tail = self.lanes.get(lane).and_then(|l| l.tail);
        let node = Node {
            lane,
            since,
            prev: tail,
            next: None,
            waker: None,
            granted: None,
        };
        let key = match self.free {
            Some(key) => {
                let next_free = match self.nodes.get(key) {
                    Some(Slot::Vacant { next_free }) => *next_free,
                    _ => None,
                };
                self.free = next_free;
                if let Some(slot) = self.nodes.get_mut(key) {
                    *slot = Slot::Occupied(node);
                }
                key
            }
            None => {
                self.nodes.push(Slot::Occupied(node));
                self.nodes.len() - 1
            }
        };
        match tail.and_then(|t| self.node_mut(t)) {
            Some(t) => t.next = Some(key),
            None => {
                if let Some(l) = self.lanes.get_mut(lane) {
                    l.head = Some(key);
                }
            }
        }
        if let Some(l) = self.lanes.get_mut(lane) {
            l.tail = Some(key);
            l.len += 1;
        }
        key
    }

    /// Take a waiter out of its lane's list (it stays in the slab).
    fn unlink(&mut self, key: usize) {
        let Some(node) = self.node_mut(key) else {
            return;
        };
        let (lane, prev, next) = (node.lane, node.prev.take(), node.next.take());
        match prev.and_then(|p| self.node_mut(p)) {
            Some(p) => p.next = next,
            None => {
                if let Some(l) = self.lanes.get_mut(lane) {
                    l.head = next;
                }
            }
        }
        match next.and_then(|n| self.node_mut(n)) {
            Some(n) => n.prev = prev,
            None => {
                if let Some(l) = self.lanes.get_mut(lane) {
                    l.tail = prev;
                }
            }
        }
        if let Some(l) = self.lanes.get_mut(lane) {
            l.len = l.len.saturating_sub(1);
        }
    }

    /// Free a slab slot.
    fn remove(&mut self, key: usize) -> Option<Node> {
        let slot = self.nodes.get_mut(key)?;
        let old = std::mem::replace(
            slot,
            Slot::Vacant {
                next_free: self.free,
            },
        );
        match old {
            Slot::Occupied(node) => {
                self.free = Some(key);
                Some(node)
            }
            vacant => {
                *slot = vacant;
                None
            }
        }
    }

    /// The waiter a free slot goes to: the head of the lane with the best
    /// effective rank (its lane, raised one step per aging period waited);
    /// ties go to the one that has waited longest.
    fn pick(&self) -> Option<usize> {
        let busy = self.lanes.iter().filter(|l| l.len > 0).count();
        if busy <= 1 {
            return self.lanes.iter().find_map(|l| l.head);
        }
        let now = Instant::now();
        let mut best: Option<(usize, Instant, usize)> = None;
        for head in self.lanes.iter().filter_map(|l| l.head) {
            let Some(node) = self.node(head) else {
                continue;
            };
            let rank = effective_rank(
                node.lane,
                now.saturating_duration_since(node.since),
                self.aging,
            );
            let better = match best {
                None => true,
                Some((r, since, _)) => rank < r || (rank == r && node.since < since),
            };
            if better {
                best = Some((rank, node.since, head));
            }
        }
        best.map(|(_, _, key)| key)
    }

    /// Hand free slots to waiters, one at a time, and collect their wakers.
    fn grant_free_slots(&mut self) -> Wakes {
        let mut wakes = Wakes::default();
        while self.in_flight < self.limit {
            let Some(key) = self.pick() else { break };
            self.unlink(key);
            let epoch = self.epoch();
            let Some(node) = self.node_mut(key) else {
                break;
            };
            node.granted = Some(epoch);
            let waker = node.waker.take();
            self.in_flight += 1;
            if let Some(w) = waker {
                wakes.push(w);
            }
        }
        wakes
    }

    fn snapshot(&self) -> Snapshot {
        let len = |p: Priority| self.lanes.get(p.lane()).map_or(0, |l| l.len);
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

/// A waiter's lane, raised one step (towards `Interactive`) per whole `aging`
/// period waited. A zero period makes every waiter rank first: plain FIFO
/// across lanes.
pub(crate) fn effective_rank(lane: usize, waited: Duration, aging: Duration) -> usize {
    if aging.is_zero() {
        return 0;
    }
    let periods = waited.as_nanos() / aging.as_nanos();
    let periods = usize::try_from(periods).unwrap_or(usize::MAX);
    lane.saturating_sub(periods)
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
        let mut st = self.shared.lock();
        let Some(node) = st.node_mut(key) else {
            return Poll::Pending;
        };
        if let Some(epoch) = node.granted {
            st.remove(key);
            drop(st);
            self.key = None;
            return Poll::Ready(Permit {
                shared: Arc::clone(&self.shared),
                epoch,
            });
        }
        match &mut node.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut st = self.shared.lock();
        let granted = st.node(key).and_then(|n| n.granted);
        match granted {
            Some(_) => {
                // A slot was handed to us but never used: pass it on.
                st.remove(key);
                st.in_flight = st.in_flight.saturating_sub(1);
                let wakes = st.grant_free_slots();
                drop(st);
                wakes.wake();
            }
            None => {
                st.unlink(key);
                st.remove(key);
            }
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

    #[test]
    fn rank_rises_one_lane_per_aging_period() {
        let a = Duration::from_secs(10);
        assert_eq!(effective_rank(2, Duration::from_secs(9), a), 2);
        assert_eq!(effective_rank(2, Duration::from_secs(10), a), 1);
        assert_eq!(effective_rank(2, Duration::from_secs(25), a), 0);
        assert_eq!(effective_rank(1, Duration::from_secs(1000), a), 0);
        assert_eq!(effective_rank(2, Duration::ZERO, Duration::ZERO), 0);
    }
}
