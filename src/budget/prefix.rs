//! Cache-aware admission: a request that would wait anyway waits for the
//! prompt-cache prefix another request is writing, and is then charged only
//! for what follows it.
//!
//! The server makes a cache entry readable only once the first response that
//! writes it has begun; requests sent before that pay the whole prefix again.
//! So the budget tracks, per prefix hash (see
//! [`Estimate::cache_writes`](crate::estimate::Estimate::cache_writes)), the
//! requests in flight that write it:
//!
//! - **sent**: admitted, its answer not yet begun;
//! - **begun**: its answer has begun (the prefix is readable): a JSON
//!   answer's success head arrived, or a stream's first output (a
//!   `content_block_delta` event; a stream's head and `message_start` can
//!   come before the answer begins), and its body has not been settled
//!   yet (after that the estimator knows the prefix is warm and charges it
//!   as a read itself).
//!
//! # The rule
//!
//! A request whose [`cache_pending`](crate::estimate::Estimate::cache_pending)
//! prefix is written by a request in flight:
//!
//! 1. if the budget admits it now at full charge, goes now at full charge
//!    (it is never delayed);
//! 2. else (it would wait anyway: for input-token, output-token or request
//!    room, or behind other waiters) it gives back its place in line and
//!    waits for the writer's answer to begin, then asks again charged only for
//!    what follows the prefix; if the writer fails, is refused (429, 529,
//!    503, any non-2xx) or is cancelled, it asks again charged in full. The
//!    request's own deadline still bounds the wait.
//!
//! Classes whose cache reads count toward ITPM (Haiku 3.5) gain nothing and
//! are never held. The longest pending prefix with a writer in flight
//! decides. A request that arrives after the writer's answer began is not
//! charged as a read here: the estimator does so once a response confirmed
//! the write (`cache_creation_input_tokens`), since a head alone does not
//! say the server cached the prefix (measured: charging such late requests
//! as reads made the crate's default simulation slower, 128.6 s against
//! 125.5 s without it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};

use super::state::Charge;
use crate::estimate::CachePrefix;

/// The writers in flight of each prefix, shared by a budget's requests.
#[derive(Debug, Default)]
pub(crate) struct Writers {
    map: Mutex<HashMap<u64, Writing>>,
}

#[derive(Debug, Default)]
struct Writing {
    sent: u32,
    begun: u32,
    waiters: Vec<Waiter>,
}

/// A request holding for a prefix: told the prefix's tokens through its
/// slot when the write begins (so it reads it even if the writer finished
/// before it was polled again).
#[derive(Debug)]
struct Waiter {
    waker: Waker,
    slot: Slot,
    tokens: u64,
}

/// Where a writer's response head tells a waiter the tokens it may read (0:
/// not yet, or never).
pub(crate) type Slot = Arc<AtomicU64>;

impl Writing {
    fn idle(&self) -> bool {
        self.sent == 0 && self.begun == 0
    }
}

/// Where a request's pending prefix stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrefixState {
    /// No request in flight writes it.
    Unwritten,
    /// A writer was sent and its response has not begun (the waker was
    /// registered).
    Writing,
    /// A writer's response began: a prefix of this many tokens is readable.
    Readable(u64),
}

/// Where a request stands with cache-aware admission (lives in its
/// response future).
#[derive(Debug, Clone, Default)]
pub(crate) enum PrefixWait {
    /// Not looked at yet.
    #[default]
    Unchecked,
    /// A writer is in flight: held if the budget says wait.
    Candidate(Slot),
    /// Out of line, waiting for the writer's response head.
    Holding(Slot),
    /// Decided (charged as a read, or in full).
    Done,
}

impl Writers {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Writing>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks a request's prefixes as being written, until the returned
    /// guard begins or drops.
    pub(crate) fn start(self: &Arc<Self>, writes: &[CachePrefix]) -> Option<WriteGuard> {
        if writes.is_empty() {
            return None;
        }
        let mut map = self.lock();
        for w in writes {
            let e = map.entry(w.hash).or_default();
            e.sent = e.sent.saturating_add(1);
        }
        Some(WriteGuard {
            writers: Arc::clone(self),
            hashes: writes.iter().map(|w| w.hash).collect(),
            begun: false,
        })
    }

    /// Where the longest of `pending` with a writer stands; registers the
    /// waker and `slot` when it is still being written.
    pub(crate) fn poll(
        &self,
        pending: &[CachePrefix],
        cx: &Context<'_>,
        slot: &Slot,
    ) -> PrefixState {
        let told = slot.load(Ordering::Acquire);
        if told > 0 {
            return PrefixState::Readable(told);
        }
        let mut map = self.lock();
        for p in pending {
            let Some(e) = map.get_mut(&p.hash) else {
                continue;
            };
            if e.begun > 0 {
                return PrefixState::Readable(p.tokens);
            }
            if e.sent > 0 {
                match e.waiters.iter_mut().find(|w| Arc::ptr_eq(&w.slot, slot)) {
                    Some(w) => w.waker.clone_from(cx.waker()),
                    None => e.waiters.push(Waiter {
                        waker: cx.waker().clone(),
                        slot: Arc::clone(slot),
                        tokens: p.tokens,
                    }),
                }
                return PrefixState::Writing;
            }
        }
        PrefixState::Unwritten
    }

    /// Prefixes tracked (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A request's writes in flight; dropped without [`begin`](Self::begin) it
/// releases the requests waiting for them (charged in full).
#[derive(Debug)]
pub(crate) struct WriteGuard {
    writers: Arc<Writers>,
    hashes: Vec<u64>,
    begun: bool,
}

impl WriteGuard {
    /// The writer's response head arrived with a success: its prefixes are
    /// readable; the waiters are woken.
    pub(crate) fn begin(&mut self) {
        if std::mem::replace(&mut self.begun, true) {
            return;
        }
        let mut wake = Vec::new();
        let mut map = self.writers.lock();
        for h in &self.hashes {
            if let Some(e) = map.get_mut(h) {
                e.sent = e.sent.saturating_sub(1);
                e.begun = e.begun.saturating_add(1);
                for w in e.waiters.drain(..) {
                    w.slot.store(w.tokens, Ordering::Release);
                    wake.push(w.waker);
                }
            }
        }
        drop(map);
        wake.into_iter().for_each(Waker::wake);
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut wake = Vec::new();
        let mut map = self.writers.lock();
        for h in &self.hashes {
            let Some(e) = map.get_mut(h) else {
                continue;
            };
            if self.begun {
                e.begun = e.begun.saturating_sub(1);
            } else {
                e.sent = e.sent.saturating_sub(1);
            }
            if e.sent == 0 {
                // No write left in flight: the waiters go, in full.
                wake.extend(e.waiters.drain(..).map(|w| w.waker));
            }
            if e.idle() {
                map.remove(h);
            }
        }
        drop(map);
        wake.into_iter().for_each(Waker::wake);
    }
}

/// Whether cache-aware admission applies to a charge: a prefix may be in
/// flight, and cache reads do not count toward its ITPM.
pub(crate) fn applies(charge: &Charge) -> bool {
    !charge.cache_reads_count && !charge.estimate.cache_pending.is_empty()
}

/// Charges a request as reading a prefix of `tokens` (as estimated, before
/// calibration) from the cache: its input reservation shrinks by the part of
/// the prefix it was charged for, at its calibration.
pub(crate) fn read_prefix(charge: &mut Charge, tokens: u64) {
    charge.prefix_read = charge.prefix_read.max(tokens);
    if let Some(counted) = charge.counted {
        super::count::apply(charge, counted);
        return;
    }
    let raw = charge.estimate.raw_input_tokens;
    let extra = tokens.saturating_sub(charge.estimate.cache_read_tokens);
    if raw == 0 || extra == 0 {
        return;
    }
    let factor = charge.costs.input_tokens as f64 / raw as f64;
    let uncached = raw.saturating_sub(extra);
    let input = (uncached as f64 * factor).ceil() as u64;
    tracing::debug!(
        key = super::callers::logged_key(charge.key()),
        from = charge.costs.input_tokens,
        to = input,
        "budget: prefix written by a request in flight; charged as a cache read"
    );
    charge.costs.input_tokens = input.min(charge.costs.input_tokens);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Context;

    fn prefix(hash: u64, tokens: u64) -> CachePrefix {
        CachePrefix { hash, tokens }
    }

    #[test]
    fn a_write_is_readable_once_begun_and_forgotten_once_done() {
        let writers = Arc::new(Writers::default());
        let cx = Context::from_waker(Waker::noop());
        let pending = [prefix(1, 5_000)];
        let later = Slot::default();
        assert_eq!(writers.poll(&pending, &cx, &later), PrefixState::Unwritten);
        let mut guard = writers.start(&pending).expect("one write");
        let held = Slot::default();
        assert_eq!(writers.poll(&pending, &cx, &held), PrefixState::Writing);
        guard.begin();
        assert_eq!(
            writers.poll(&pending, &cx, &later),
            PrefixState::Readable(5_000)
        );
        drop(guard);
        // A request that held for the write reads it even after the writer
        // finished; one that arrives later finds nothing in flight (the
        // estimator knows the prefix is warm by then).
        assert_eq!(
            writers.poll(&pending, &cx, &held),
            PrefixState::Readable(5_000)
        );
        assert_eq!(
            writers.poll(&pending, &cx, &Slot::default()),
            PrefixState::Unwritten
        );
        assert_eq!(writers.len(), 0);
    }

    #[test]
    fn a_failed_write_releases_and_the_longest_decides() {
        let writers = Arc::new(Writers::default());
        let cx = Context::from_waker(Waker::noop());
        let short = writers.start(&[prefix(2, 2_000)]).expect("one write");
        let mut short = short;
        short.begin();
        let long = writers.start(&[prefix(1, 6_000)]).expect("one write");
        let pending = [prefix(1, 6_000), prefix(2, 2_000)];
        let slot = Slot::default();
        assert_eq!(writers.poll(&pending, &cx, &slot), PrefixState::Writing);
        drop(long);
        assert_eq!(
            writers.poll(&pending, &cx, &slot),
            PrefixState::Readable(2_000)
        );
        drop(short);
        assert_eq!(writers.len(), 0);
    }
}
