//! Parts of a budget key's state allocated only when used, so that a key
//! that never waited and never saw a reported limit stays small (a gateway
//! holds one key per caller and model class).

use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use super::admission::Passing;
use super::learn::{LearnRules, LimitLearner};
use crate::queue::{Removed, WaitQueue};
use crate::Dimension;

/// A key's wait queue, allocated by the first waiter and freed when the
/// last one leaves (a [`WaitQueue`] with its lanes takes about 180 bytes),
/// with what requests passing its head have delayed that head.
///
/// The budget never grants (it gives turns), so an empty queue holds no
/// waiter at all and may be dropped: no waiter keeps an id into it.
#[derive(Debug, Default)]
pub(super) struct LazyQueue(Option<Box<Line>>);

/// A queue that has waiters.
#[derive(Debug)]
pub(super) struct Line {
    queue: WaitQueue,
    passing: Passing,
}

impl LazyQueue {
    /// Waiters in line.
    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |l| l.queue.len())
    }

    /// Whether nobody is in line.
    pub(super) fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|l| l.queue.is_empty())
    }

    /// Puts a new waiter at the back and returns its id.
    pub(super) fn push(&mut self, lane: usize, since: Instant, waker: Option<Waker>) -> usize {
        self.0
            .get_or_insert_with(|| {
                Box::new(Line {
                    queue: WaitQueue::new(Duration::ZERO),
                    passing: Passing::default(),
                })
            })
            .queue
            .push(lane, since, waker)
    }

    /// The id of the waiter to serve next.
    pub(super) fn next(&self) -> Option<usize> {
        self.0.as_ref().and_then(|l| l.queue.next())
    }

    /// Whether `id` is the waiter to serve next.
    pub(super) fn is_next(&self, id: usize) -> bool {
        self.0.as_ref().is_some_and(|l| l.queue.is_next(id))
    }

    /// See [`WaitQueue::notify_next`].
    pub(super) fn notify_next(&mut self) -> Option<Waker> {
        self.0.as_mut().and_then(|l| l.queue.notify_next())
    }

    /// See [`WaitQueue::take_notified`].
    pub(super) fn take_notified(&mut self, id: usize) -> bool {
        self.0.as_mut().is_some_and(|l| l.queue.take_notified(id))
    }

    /// See [`WaitQueue::register`].
    pub(super) fn register(&mut self, id: usize, waker: &Waker) {
        if let Some(l) = self.0.as_mut() {
            l.queue.register(id, waker);
        }
    }

    /// Takes a waiter out (see [`WaitQueue::remove`]); frees the queue once
    /// nobody is left in it.
    pub(super) fn remove(&mut self, id: usize) -> Removed {
        let Some(l) = self.0.as_mut() else {
            return Removed::Gone;
        };
        let removed = l.queue.remove(id);
        if l.queue.is_empty() {
            self.0 = None;
        }
        removed
    }

    /// Whether a request that delays the head `head` by `delay` may pass it
    /// now (see [`Passing::allow`]); never with nobody in line.
    pub(super) fn allow_passing(&mut self, head: usize, delay: Duration) -> bool {
        self.0
            .as_mut()
            .is_some_and(|l| l.passing.allow(head, delay))
    }

    /// Gives back a delay counted by [`LazyQueue::allow_passing`] for a
    /// request that did not pass after all.
    pub(super) fn give_back(&mut self, delay: Duration) {
        if let Some(l) = self.0.as_mut() {
            l.passing.give_back(delay);
        }
    }
}

/// The limits a key learned from the server's headers, per dimension:
/// allocated at the first reported limit (three learners take 120 bytes).
#[derive(Debug, Default)]
pub(super) struct Learners(Option<Box<[LimitLearner; 3]>>);

impl Learners {
    /// The limit learned for the dimension at `index`, if any.
    pub(super) fn adopted(&self, index: usize) -> Option<u64> {
        self.0
            .as_ref()
            .and_then(|l| l.get(index))
            .and_then(LimitLearner::adopted)
    }

    /// See [`LimitLearner::observe`], for the dimension at `index`.
    pub(super) fn observe(
        &mut self,
        index: usize,
        dimension: Dimension,
        reported: u64,
        rules: &LearnRules,
    ) -> Option<u64> {
        let learners = self.0.get_or_insert_with(Box::default);
        learners
            .get_mut(index)
            .and_then(|l| l.observe(dimension, reported, rules))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_is_allocated_by_its_first_waiter_and_freed_by_its_last() {
        let mut q = LazyQueue::default();
        assert!(q.is_empty() && q.next().is_none());
        let now = Instant::now();
        let a = q.push(0, now, None);
        let b = q.push(0, now, None);
        assert_eq!(q.len(), 2);
        assert!(q.is_next(a) && !q.is_next(b));
        assert!(matches!(q.remove(a), Removed::Waiting { was_next: true }));
        assert!(q.is_next(b));
        assert!(matches!(q.remove(b), Removed::Waiting { was_next: true }));
        assert!(q.0.is_none(), "the empty queue is freed");
        assert!(matches!(q.remove(b), Removed::Gone));
    }

    #[test]
    fn learners_are_allocated_at_the_first_report() {
        let rules = LearnRules {
            floor: super::super::Limits::new(),
            confirmations: 1,
        };
        let mut l = Learners::default();
        assert_eq!(l.adopted(1), None);
        assert!(l.0.is_none());
        assert_eq!(
            l.observe(1, Dimension::InputTokens, 30_000, &rules),
            Some(30_000)
        );
        assert_eq!(l.adopted(1), Some(30_000));
        assert_eq!(l.adopted(0), None);
    }
}
