//! The one fair wait queue behind the concurrency layer and the token budget.
//!
//! Like tokio's `batch_semaphore` (the one queue behind its `Semaphore`,
//! `RwLock` and `mpsc` permits), this is the waiting-list engine only: the
//! primitive that owns it keeps it inside its own `Mutex`, next to what it
//! counts (slots in flight, a key's ledger), and calls these methods under
//! that lock. Wakers are handed back to the caller, to be woken once the lock
//! is released.
//!
//! # The rules
//!
//! - **First come, first served**, per lane; across lanes the waiter with the
//!   best effective rank goes first: its lane, raised one step per `aging`
//!   period waited, ties to the one that has waited longest (a zero `aging`
//!   makes it plain FIFO across lanes).
//! - **One wakeup per admission.** Capacity is given to one chosen waiter at a
//!   time, either as a hand-off ([`WaitQueue::grant_next`]: the waiter leaves
//!   the line holding the grant, so no newcomer can take it between the wake
//!   and the poll) or as a turn ([`WaitQueue::notify_next`]: the waiter stays
//!   at the head and asks again, as the budget's head asks its ledger). No
//!   other waiter is woken: no thundering herd.
//! - **A dropped waiter gives back its place** ([`WaitQueue::remove`]), and
//!   tells its owner whether it held a grant (to be passed on) or was next in
//!   line (its turn goes to the one behind).
//! - **No lost wakeups.** A turn given to a waiter that is busy (no waker
//!   registered) is remembered ([`WaitQueue::take_notified`]).
//!
//! Waiters live in a slab of nodes, each in a doubly linked list of its lane:
//! push, pop and removal from the middle are O(1), and a node takes 64
//! bytes (88 before its links and flags were packed).

// Each primitive uses its own half of the engine: hand-off (concurrency) or
// turns (budget).
#![cfg_attr(
    not(all(feature = "budget", feature = "concurrency")),
    allow(dead_code)
)]

use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// How many lanes a queue has (the concurrency layer's three priorities).
pub(crate) const LANES: usize = 3;

/// A waiting list with lanes, aging and hand-off. See the module docs.
#[derive(Debug)]
pub(crate) struct WaitQueue {
    lanes: [Lane; LANES],
    nodes: Vec<Slot>,
    free: Option<usize>,
    aging: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
struct Lane {
    head: Option<usize>,
    tail: Option<usize>,
    len: usize,
}

#[derive(Debug)]
enum Slot {
    Vacant { next_free: Option<usize> },
    Occupied(Node),
}

/// Every waiting request holds a node (the slab keeps the capacity it grew
/// to): kept at 64 bytes, its links without an `Option`'s word each, its
/// flags in one.
#[derive(Debug)]
struct Node {
    since: Instant,
    waker: Option<Waker>,
    /// The tag [`WaitQueue::grant_next`] handed this waiter with capacity,
    /// once `granted`.
    tag: u64,
    prev: Link,
    next: Link,
    /// Below [`LANES`].
    lane: u8,
    /// Set once [`WaitQueue::grant_next`] handed this waiter capacity; it is
    /// then out of its lane's list.
    granted: bool,
    /// Set by [`WaitQueue::notify_next`], cleared by [`WaitQueue::take_notified`].
    notified: bool,
}

impl Node {
    /// The tag of the grant handed to this waiter, if it was granted.
    fn grant(&self) -> Option<u64> {
        self.granted.then_some(self.tag)
    }
}

/// A node's key in the slab, or none: an `Option<usize>` in one word (no
/// slab reaches `usize::MAX` nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link(usize);

impl Link {
    const NONE: Link = Link(usize::MAX);

    fn get(self) -> Option<usize> {
        (self != Link::NONE).then_some(self.0)
    }

    fn to(key: Option<usize>) -> Link {
        key.map_or(Link::NONE, Link)
    }

    fn take(&mut self) -> Option<usize> {
        std::mem::replace(self, Link::NONE).get()
    }
}

/// What [`WaitQueue::remove`] took out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removed {
    /// A waiter still in line; `was_next` if it was the one to be served next.
    Waiting {
        /// Whether it was the next in line (its turn passes on).
        was_next: bool,
    },
    /// A waiter that had been handed a grant (with this tag) it never took.
    Granted(u64),
    /// No such waiter (already taken out).
    Gone,
}

impl WaitQueue {
    /// An empty queue whose waiters rise one lane per `aging` period.
    pub(crate) fn new(aging: Duration) -> Self {
        WaitQueue {
            lanes: [Lane::default(); LANES],
            nodes: Vec::new(),
            free: None,
            aging,
        }
    }

    /// Waiters in line (not counting those granted and not yet polled).
    pub(crate) fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.len).sum()
    }

    /// Whether nobody is in line.
    pub(crate) fn is_empty(&self) -> bool {
        self.lanes.iter().all(|l| l.len == 0)
    }

    /// Waiters in line in one lane.
    pub(crate) fn lane_len(&self, lane: usize) -> usize {
        self.lanes.get(lane).map_or(0, |l| l.len)
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

    /// Puts a new waiter at the back of `lane` (clamped to the last lane) and
    /// returns its key.
    pub(crate) fn push(&mut self, lane: usize, since: Instant, waker: Option<Waker>) -> usize {
        let lane = lane.min(LANES - 1);
        let tail = self.lanes.get(lane).and_then(|l| l.tail);
        let node = Node {
            since,
            waker,
            tag: 0,
            prev: Link::to(tail),
            next: Link::NONE,
            lane: lane as u8,
            granted: false,
            notified: false,
        };
        let key = self.alloc(node);
        match tail.and_then(|t| self.node_mut(t)) {
            Some(t) => t.next = Link(key),
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

    fn alloc(&mut self, node: Node) -> usize {
        match self.free {
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
        }
    }

    /// Takes a waiter out of its lane's list (it stays in the slab).
    fn unlink(&mut self, key: usize) {
        let Some(node) = self.node_mut(key) else {
            return;
        };
        if node.granted {
            return;
        }
        let (lane, prev, next) = (usize::from(node.lane), node.prev.take(), node.next.take());
        match prev.and_then(|p| self.node_mut(p)) {
            Some(p) => p.next = Link::to(next),
            None => {
                if let Some(l) = self.lanes.get_mut(lane) {
                    l.head = next;
                }
            }
        }
        match next.and_then(|n| self.node_mut(n)) {
            Some(n) => n.prev = Link::to(prev),
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

    /// Frees a slab slot.
    fn free_slot(&mut self, key: usize) -> Option<Node> {
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

    /// The waiter to serve next: the head of the lane with the best effective
    /// rank (see [`effective_rank`]); ties go to the one that has waited
    /// longest. Reads the clock only when two lanes or more are busy.
    pub(crate) fn next(&self) -> Option<usize> {
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
                usize::from(node.lane),
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

    /// Whether `key` is the waiter to serve next.
    pub(crate) fn is_next(&self, key: usize) -> bool {
        self.next() == Some(key)
    }

    /// Hands capacity to the next waiter: takes it out of line, marks it
    /// granted with `tag`, and returns its waker (if it registered one).
    /// `None` if nobody is waiting.
    pub(crate) fn grant_next(&mut self, tag: u64) -> Option<Option<Waker>> {
        let key = self.next()?;
        self.unlink(key);
        let node = self.node_mut(key)?;
        node.granted = true;
        node.tag = tag;
        Some(node.waker.take())
    }

    /// Gives the next waiter its turn without taking it out of line: marks it
    /// notified and returns its waker, if one is registered (a waiter busy
    /// elsewhere finds the mark through [`WaitQueue::take_notified`]).
    pub(crate) fn notify_next(&mut self) -> Option<Waker> {
        let key = self.next()?;
        let node = self.node_mut(key)?;
        node.notified = true;
        node.waker.take()
    }

    /// Clears and returns the waiter's notified mark.
    pub(crate) fn take_notified(&mut self, key: usize) -> bool {
        self.node_mut(key)
            .is_some_and(|n| std::mem::replace(&mut n.notified, false))
    }

    /// Registers the task to wake when the waiter is granted or notified.
    pub(crate) fn register(&mut self, key: usize, waker: &Waker) {
        if let Some(node) = self.node_mut(key) {
            match &mut node.waker {
                Some(w) if w.will_wake(waker) => {}
                slot => *slot = Some(waker.clone()),
            }
        }
    }

    /// Takes the grant handed to this waiter (freeing its node), or registers
    /// `waker` and stays pending.
    pub(crate) fn poll_grant(&mut self, key: usize, waker: &Waker) -> Poll<u64> {
        match self.node(key).and_then(Node::grant) {
            Some(tag) => {
                self.free_slot(key);
                Poll::Ready(tag)
            }
            None => {
                self.register(key, waker);
                Poll::Pending
            }
        }
    }

    /// Takes a waiter out, whatever its state: gives its place back, and
    /// reports a grant it held (the owner passes it on) or whether it was
    /// next (the owner gives the turn to the one behind).
    pub(crate) fn remove(&mut self, key: usize) -> Removed {
        let Some(node) = self.node(key) else {
            return Removed::Gone;
        };
        if let Some(tag) = node.grant() {
            self.free_slot(key);
            return Removed::Granted(tag);
        }
        let was_next = self.is_next(key);
        self.unlink(key);
        self.free_slot(key);
        Removed::Waiting { was_next }
    }
}

/// A waiter's lane, raised one step (towards lane 0) per whole `aging`
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (Arc::clone(&c), Waker::from(c))
    }

    fn queue() -> WaitQueue {
        WaitQueue::new(Duration::from_secs(10))
    }

    fn wake(w: Option<Option<Waker>>) {
        if let Some(Some(w)) = w {
            w.wake();
        }
    }

    /// Every waiting request holds a slot (and the slab the capacity it
    /// grew to): a guard against it growing unnoticed.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_node_stays_small() {
        let size = std::mem::size_of::<Slot>();
        assert!(size <= 64, "a queue slot is {size} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn one_lane_is_served_first_come_first_served() {
        let mut q = queue();
        let keys: Vec<usize> = (0..5).map(|_| q.push(1, Instant::now(), None)).collect();
        let mut served = Vec::new();
        while let Some(key) = q.next() {
            assert!(q.grant_next(0).is_some());
            assert_eq!(q.poll_grant(key, &counter().1), Poll::Ready(0));
            served.push(key);
        }
        assert_eq!(served, keys);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_higher_lane_goes_first_until_an_older_waiter_has_aged() {
        let mut q = queue();
        let background = q.push(2, Instant::now(), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        let interactive = q.push(0, Instant::now(), None);
        assert_eq!(q.next(), Some(interactive));
        // 20 s waited: two aging periods, background now ranks as lane 0 and
        // is older.
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(q.next(), Some(background));
        assert_eq!(q.lane_len(0), 1);
        assert_eq!(q.lane_len(2), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_aging_is_fifo_across_lanes() {
        let mut q = WaitQueue::new(Duration::ZERO);
        let first = q.push(2, Instant::now(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        q.push(0, Instant::now(), None);
        assert_eq!(q.next(), Some(first));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_gives_back_its_place() {
        let mut q = queue();
        let a = q.push(1, Instant::now(), None);
        let b = q.push(1, Instant::now(), None);
        let c = q.push(1, Instant::now(), None);
        assert_eq!(q.remove(b), Removed::Waiting { was_next: false });
        assert_eq!(q.len(), 2);
        assert_eq!(q.remove(a), Removed::Waiting { was_next: true });
        assert_eq!(q.next(), Some(c));
        assert_eq!(q.remove(a), Removed::Gone);
        // The freed nodes are reused.
        let d = q.push(1, Instant::now(), None);
        assert!(d == a || d == b);
        assert_eq!(q.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_passes_on_a_grant_it_was_handed() {
        let mut q = queue();
        let (first_count, first_waker) = counter();
        let (second_count, second_waker) = counter();
        let first = q.push(1, Instant::now(), Some(first_waker));
        let second = q.push(1, Instant::now(), Some(second_waker));
        wake(q.grant_next(7));
        assert_eq!(first_count.0.load(Ordering::SeqCst), 1);
        // Dropped before taking its grant: the owner learns of the grant and
        // hands it to the next one.
        assert_eq!(q.remove(first), Removed::Granted(7));
        wake(q.grant_next(7));
        assert_eq!(second_count.0.load(Ordering::SeqCst), 1);
        assert_eq!(q.poll_grant(second, &counter().1), Poll::Ready(7));
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn one_admission_wakes_exactly_one_waiter() {
        let mut q = queue();
        let counts: Vec<(Arc<Count>, Waker)> = (0..5).map(|_| counter()).collect();
        for (_, w) in &counts {
            q.push(1, Instant::now(), Some(w.clone()));
        }
        wake(q.grant_next(0));
        if let Some(w) = q.notify_next() {
            w.wake();
        }
        let woken: Vec<usize> = counts
            .iter()
            .map(|(c, _)| c.0.load(Ordering::SeqCst))
            .collect();
        assert_eq!(woken, vec![1, 1, 0, 0, 0]);
        // A second notification of the same head finds no waker: no double wake.
        assert!(q.notify_next().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_given_to_a_busy_waiter_is_not_lost() {
        let mut q = queue();
        let head = q.push(1, Instant::now(), None);
        assert!(!q.take_notified(head));
        // No waker registered (the head is busy asking): the mark remains.
        assert!(q.notify_next().is_none());
        assert!(q.take_notified(head));
        assert!(!q.take_notified(head));
        // A waiter that registers after its grant finds it at once.
        let (count, waker) = counter();
        wake(q.grant_next(3));
        assert_eq!(q.poll_grant(head, &waker), Poll::Ready(3));
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
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

    #[test]
    fn a_waiter_node_is_small() {
        assert!(
            std::mem::size_of::<Slot>() <= 96,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }
}
