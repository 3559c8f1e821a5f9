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
//! - **begun**: its answer has begun (the prefix is readable): a stream's
//!   first output arrived (a `content_block_delta` event; a stream's head
//!   and `message_start` can come before the answer begins), or a JSON
//!   answer's body was read to its end (the server sends a JSON answer
//!   once it is whole, so its body follows its head at once, with the
//!   usage), and the body has not been settled yet (after that the
//!   estimator knows the prefix is warm and charges it as a read itself).
//!
//! # The prefix's size
//!
//! The writer's usage (`message_start`'s for a stream, the body's for a
//! JSON answer) says how many of the server's tokens the prefix holds:
//! `cache_creation_input_tokens + cache_read_input_tokens` is the prompt up
//! to the writer's last breakpoint. A waiter is told it with the prefix, and
//! a waiter charged its `count_tokens` answer subtracts that size, not the
//! estimate converted at the request's own ratio (a prefix estimated at
//! 89 % of a prompt that held 64 % left a request charged 517 tokens for
//! 1,737 uncached, and the server answered 429). A shorter prefix of the
//! same writer is sized in proportion to its estimate.
//!
//! # The rule
//!
//! A request whose [`cache_pending`](crate::estimate::Estimate::cache_pending)
//! prefix is written by a request in flight:
//!
//! 1. if the budget admits it now at full charge, it holds for the writer's
//!    answer to begin at most the budget's cache hold
//!    ([`TokenBudgetBuilder::cache_hold`](crate::budget::TokenBudgetBuilder::cache_hold):
//!    zero by default, so it goes now at full charge; 5 s in
//!    [`TokenBudgetLayer::anthropic`](crate::budget::TokenBudgetLayer::anthropic)),
//!    or, for a prefix whose refill at the key's input-token limit takes
//!    longer, that refill time (at most 30 s, see [`hold_bound`]), then goes
//!    charged only for what follows the prefix, or in full at the bound;
//! 2. else (it would wait anyway: for input-token, output-token or request
//!    room, or behind other waiters) it gives back its place in line and
//!    waits for the writer's answer to begin, then asks again charged only for
//!    what follows the prefix; if the writer fails, is refused (429, 529,
//!    503, any non-2xx) or is cancelled, it asks again charged in full. The
//!    request's own deadline still bounds the wait.
//!
//! 3. before each try, a request waiting in line reads the longest of its
//!    pending prefixes that has become readable through this budget since
//!    it was estimated (a writer's answer began, or one completed within
//!    the server's shortest cache lifetime, 5 minutes from its start) and
//!    whose size an answer said, when its input was counted (the count less
//!    that size is exact); and a read whose prefix stopped being
//!    readable is taken back ([`refresh`]). If instead a longer prefix of
//!    it has begun to be written meanwhile, it holds before asking, keeping
//!    its place in line, until that write begins, at most the hold bound of rule 1
//!    (once per request): tokens refill while it holds, so under an
//!    input-token limit the hold costs the others nothing. A hold for
//!    another process's request still queued in its line goes on past
//!    that bound while the request's marker lives (a request that asks
//!    nothing renews its own at most [`MAX_QUEUED_HOLD`]; [`hold_on`]).
//!
//! 4. with a fleet's ledger that has a writer grace
//!    ([`Ledger::writer_grace`]), a request that writes a prefix asks the
//!    first time with its pending prefixes shorter than its write that a
//!    cache entry can hold ([`fleet_intent`]): the ledger keeps it from
//!    going for the grace while one of them has no marker, so that a
//!    shorter request of another process that arrived with it is written
//!    first; answered the grace, it does not ask again before the grace
//!    is over, even if woken.
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
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::ledger::{Ledger, MAX_QUEUED_HOLD};
use super::state::{Charge, Shared};
use crate::estimate::CachePrefix;

/// The writers in flight of each prefix, shared by a budget's requests.
#[derive(Debug, Default)]
pub(crate) struct Writers {
    map: Mutex<HashMap<u64, Writing>>,
    /// The ledger that shares the fleet's prompt-cache view, when the
    /// budget holds for other processes' writers too (see
    /// [`Ledger::reserve_in_line_with_prefixes`]).
    fleet: Option<Arc<dyn Ledger>>,
}

#[derive(Debug, Default)]
struct Writing {
    sent: u32,
    begun: u32,
    /// The prefix's size as the server counted it, told by the first writer
    /// whose answer began with its usage (0: not known).
    served: u64,
    /// Until when a writer that completed here keeps the prefix readable
    /// (its start plus the server's shortest cache lifetime).
    written_until: Option<Instant>,
    waiters: Vec<Waiter>,
}

/// A request holding for a prefix: told the prefix's tokens through its
/// slot when the write begins (so it reads it even if the writer finished
/// before it was polled again).
#[derive(Debug)]
struct Waiter {
    waker: Waker,
    slot: Slot,
    prefix: CachePrefix,
}

/// Where a writer's answer tells a waiter the prefix it may read.
pub(crate) type Slot = Arc<Told>;

/// What a waiter is told when the write begins: the prefix's tokens as
/// estimated (0: not yet, or never) and as the server counted them (0: not
/// known).
#[derive(Debug, Default)]
pub(crate) struct Told {
    hash: AtomicU64,
    tokens: AtomicU64,
    served: AtomicU64,
}

impl Told {
    fn tell(&self, prefix: CachePrefix, served: u64) {
        // The rest first: a reader that sees `tokens` sees them too.
        self.hash.store(prefix.hash, Ordering::Relaxed);
        self.served.store(served, Ordering::Relaxed);
        self.tokens.store(prefix.tokens, Ordering::Release);
    }

    fn read(&self) -> Option<Readable> {
        let tokens = self.tokens.load(Ordering::Acquire);
        (tokens > 0).then(|| Readable {
            hash: self.hash.load(Ordering::Relaxed),
            tokens,
            served: nonzero(self.served.load(Ordering::Relaxed)),
        })
    }
}

fn nonzero(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

/// A prefix that a request may read from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Readable {
    /// Its hash.
    pub(crate) hash: u64,
    /// Its tokens as estimated (before calibration).
    pub(crate) tokens: u64,
    /// Its tokens as the server counted them, when the writer's answer said
    /// (`cache_creation_input_tokens + cache_read_input_tokens`).
    pub(crate) served: Option<u64>,
}

impl Writing {
    fn idle(&self, now: Instant) -> bool {
        self.sent == 0 && self.begun == 0 && self.written_until.is_none_or(|u| u <= now)
    }
}

/// The server's default (and shortest) prompt-cache lifetime, counted from
/// the start of the request that wrote the entry.
const CACHE_TTL: Duration = Duration::from_secs(5 * 60);

/// The fewest tokens a prompt-cache entry holds for any model (the API's
/// minimum cacheable prompt length is 1,024 tokens for Sonnet and Opus,
/// more for some models): a prefix whose writer's usage sizes it below this
/// was not written.
const MIN_CACHED_TOKENS: u64 = 1_024;

/// Prefixes remembered before the idle ones are dropped.
const PRUNE_AT: usize = 4_096;

/// The longest a request holds for a writer of its prefix, however large
/// the prefix: a writer whose answer has not begun by then is most likely
/// stuck (a slow upstream, a lost connection), and the held request's own
/// latency matters too.
pub(crate) const MAX_CACHE_HOLD: Duration = Duration::from_secs(30);

/// How long a request may hold for a writer of a prefix of `tokens` (as
/// estimated): the budget's cache hold (`cache_hold`; zero: never held),
/// or longer for a large prefix, up to the time the key's input-token
/// limit takes to refill the prefix (`tokens · 60 s / ITPM`), at most
/// [`MAX_CACHE_HOLD`].
///
/// Holding is worth it while waiting costs less than writing the prefix a
/// second time costs: the second write takes the prefix's tokens from the
/// bucket, which the whole stack (or fleet) then waits for, so a hold
/// shorter than the refill time gives up more than it saves. (Traced on
/// the crate's 16-process simulation: a request held for another process's
/// writer of a 3,870-token prefix went at the fixed 5 s bound, charged in
/// full, and the writer's answer began at 5.8 s; the prefix's refill at
/// 30,000 ITPM is 7.7 s.) With the input-token limit unknown, the cache
/// hold alone.
pub(crate) fn hold_bound(cache_hold: Duration, itpm: Option<u64>, tokens: u64) -> Duration {
    if cache_hold.is_zero() {
        return Duration::ZERO;
    }
    let refill = match itpm {
        Some(itpm) if itpm > 0 => {
            let micros = u128::from(tokens).saturating_mul(60_000_000) / u128::from(itpm);
            Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))
        }
        _ => Duration::ZERO,
    };
    cache_hold.max(refill.min(MAX_CACHE_HOLD))
}

/// Where a request's pending prefix stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrefixState {
    /// No request in flight writes it.
    Unwritten,
    /// A writer was sent and its response has not begun (the waker was
    /// registered): the prefix's tokens as estimated.
    Writing(u64),
    /// A writer's response began: this prefix is readable.
    Readable(Readable),
}

/// Where a request stands with cache-aware admission (lives in its
/// response future).
#[derive(Debug, Default)]
pub(crate) enum PrefixWait {
    /// Not looked at yet.
    #[default]
    Unchecked,
    /// A writer is in flight: held if the budget says wait.
    Candidate(Slot),
    /// Out of line, waiting for the writer's answer to begin: until it
    /// does, or (for a request that could have gone at once) until the
    /// bound of the budget's cache hold.
    Holding(Slot, Option<Pin<Box<Sleep>>>),
    /// Decided (charged as a read, or in full).
    Done,
    /// In line (its place kept), a longer prefix began to be written while
    /// it waited: it does not ask until that write begins, or until the
    /// bound of the cache hold. The flag: the writer it holds for was seen
    /// queued in another process's line during the hold.
    InLine(Pin<Box<Sleep>>, bool),
    /// In line as `InLine`, past that hold's bound, because the writer it
    /// holds for is another process's request still queued there: it
    /// holds while that request's marker lives, through its admission
    /// until its answer begins (see [`hold_on`]).
    InLineQueued(Pin<Box<Sleep>>),
    /// In line as `InLine`, past the bound of a hold for another process's
    /// request that was queued and has since been admitted: it holds for
    /// that request's answer to begin, at most one more bound of the
    /// cache hold from when the hold saw it admitted (see [`hold_on`]);
    /// then it asks without holding again (`HeldToBound`).
    InLineAdmitted(Pin<Box<Sleep>>),
    /// Held to the bound of the cache hold, which it does not do twice.
    HeldToBound,
}

impl Writers {
    /// Writers of this budget, and of the fleet's other processes through
    /// `fleet`'s view if given.
    pub(crate) fn new(fleet: Option<Arc<dyn Ledger>>) -> Self {
        Writers {
            map: Mutex::default(),
            fleet,
        }
    }

    /// The ledger through which the budget holds for other processes'
    /// writers, if it does.
    pub(crate) fn fleet(&self) -> Option<&Arc<dyn Ledger>> {
        self.fleet.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Writing>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks a request's prefixes as being written, until the returned
    /// guard begins or drops.
    pub(crate) fn start(self: &Arc<Self>, writes: &[CachePrefix]) -> Option<WriteGuard> {
        if writes.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= PRUNE_AT {
            map.retain(|_, e| !e.idle(now));
        }
        for w in writes {
            let e = map.entry(w.hash).or_default();
            e.sent = e.sent.saturating_add(1);
        }
        Some(WriteGuard {
            writers: Arc::clone(self),
            writes: writes.to_vec(),
            begun: false,
            started: now,
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
        if let Some(told) = slot.read() {
            return PrefixState::Readable(told);
        }
        let mut map = self.lock();
        for p in pending {
            let Some(e) = map.get_mut(&p.hash) else {
                continue;
            };
            if e.begun > 0 {
                return PrefixState::Readable(Readable {
                    hash: p.hash,
                    tokens: p.tokens,
                    served: nonzero(e.served),
                });
            }
            if e.sent > 0 {
                match e.waiters.iter_mut().find(|w| Arc::ptr_eq(&w.slot, slot)) {
                    Some(w) => w.waker.clone_from(cx.waker()),
                    None => e.waiters.push(Waiter {
                        waker: cx.waker().clone(),
                        slot: Arc::clone(slot),
                        prefix: *p,
                    }),
                }
                return PrefixState::Writing(p.tokens);
            }
        }
        PrefixState::Unwritten
    }

    /// Whether the prefix `hash` is readable now (a writer's answer has
    /// begun, or one completed here within the cache's lifetime), and then
    /// its size as the server counted it, if an answer said.
    fn readable(&self, hash: u64, now: Instant) -> Option<Option<u64>> {
        self.lock()
            .get(&hash)
            .filter(|e| e.begun > 0 || e.written_until.is_some_and(|u| u > now))
            .map(|e| nonzero(e.served))
    }

    /// Wakes the task of `cx` when a writer of `prefix` in flight begins or
    /// goes (once: the task asks again); whether one is in flight.
    fn watch(&self, prefix: &CachePrefix, cx: &Context<'_>) -> bool {
        let mut map = self.lock();
        let Some(e) = map.get_mut(&prefix.hash).filter(|e| e.sent > 0) else {
            return false;
        };
        if !e.waiters.iter().any(|w| w.waker.will_wake(cx.waker())) {
            e.waiters.push(Waiter {
                waker: cx.waker().clone(),
                slot: Slot::default(),
                prefix: *prefix,
            });
        }
        true
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
    writes: Vec<CachePrefix>,
    begun: bool,
    /// When the writer was admitted: the server's cache lifetime counts
    /// from the request's start, no sooner.
    started: Instant,
}

impl WriteGuard {
    /// The writer's answer has begun with a success: its prefixes are
    /// readable; the waiters are woken.
    ///
    /// `served` is what the answer's usage says the server cached or read
    /// (`cache_creation_input_tokens + cache_read_input_tokens`), when
    /// known: the size, in the server's tokens, of the writer's longest
    /// prefix (the server caches up to the last breakpoint). A shorter
    /// prefix of the same request is sized in proportion to its estimate
    /// (see [`served_share`]). A prefix so sized below the minimum any model
    /// caches (1,024 tokens) was not written: it is not readable, and the
    /// requests holding for it go in full (an answer whose usage says the
    /// server cached and read nothing wrote none of its prefixes).
    pub(crate) fn begin(&mut self, served: Option<u64>) {
        if std::mem::replace(&mut self.begun, true) {
            return;
        }
        self.tell_fleet();
        let longest = self.writes.iter().map(|w| w.tokens).max().unwrap_or(0);
        let now = Instant::now();
        let mut wake = Vec::new();
        let mut map = self.writers.lock();
        let writes = std::mem::take(&mut self.writes);
        for w in writes {
            let Some(e) = map.get_mut(&w.hash) else {
                continue;
            };
            e.sent = e.sent.saturating_sub(1);
            let size = served.map(|served| served_share(served, w.tokens, longest));
            if size.is_some_and(|size| size < MIN_CACHED_TOKENS) {
                // The answer says the server holds less of the prompt than
                // any model caches: this prefix was not written (nothing
                // was, or it is a shorter breakpoint below the minimum).
                // Its waiters go as after a failed write, in full.
                if e.sent == 0 {
                    wake.extend(e.waiters.drain(..).map(|w| w.waker));
                }
                if e.idle(now) {
                    map.remove(&w.hash);
                }
                continue;
            }
            e.begun = e.begun.saturating_add(1);
            if let Some(size) = size {
                e.served = size;
            }
            for waiter in e.waiters.drain(..) {
                waiter.slot.tell(waiter.prefix, e.served);
                wake.push(waiter.waker);
            }
            self.writes.push(w);
        }
        drop(map);
        wake.into_iter().for_each(Waker::wake);
    }
}

impl WriteGuard {
    /// Tells the fleet's other processes that this request no longer
    /// writes its prefixes (once: at its answer's beginning, or when it
    /// ends without one).
    fn tell_fleet(&self) {
        if let Some(fleet) = &self.writers.fleet {
            let hashes: Vec<u64> = self.writes.iter().map(|w| w.hash).collect();
            fleet.prefixes_written(&hashes);
        }
    }
}

/// The server's size of a prefix of `tokens` (as estimated), from the
/// server's size of the writer's longest prefix (`longest` as estimated):
/// in proportion, rounded down, at most `served`.
fn served_share(served: u64, tokens: u64, longest: u64) -> u64 {
    crate::estimate::cache::share(served, tokens, longest)
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if !self.begun {
            self.tell_fleet();
        }
        let now = Instant::now();
        let mut wake = Vec::new();
        let mut map = self.writers.lock();
        for w in &self.writes {
            let h = &w.hash;
            let Some(e) = map.get_mut(h) else {
                continue;
            };
            if self.begun {
                e.begun = e.begun.saturating_sub(1);
                let until = self.started + CACHE_TTL;
                e.written_until = Some(e.written_until.map_or(until, |u| u.max(until)));
            } else {
                e.sent = e.sent.saturating_sub(1);
            }
            if e.sent == 0 {
                // No write left in flight: the waiters go, in full.
                wake.extend(e.waiters.drain(..).map(|w| w.waker));
            }
            if e.idle(now) {
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

/// Before each try of a waiting request: the longest of its pending
/// prefixes, longer than what it is charged as reading, that has become
/// readable through this budget since it was estimated is charged as read,
/// at the size its writer's answer said: a writer's answer has begun, or
/// one completed within the server's shortest cache lifetime (5 minutes
/// from its start). A conversation's turns queued together are estimated
/// before any is answered: each turn reads the turn before it, whose write
/// is confirmed only while it waits. Only this budget's own writers count:
/// a cache lives in one organization, and a budget paces one upstream.
///
/// A longer prefix whose writer is in flight wakes the request when that
/// writer's answer begins, so that it asks again then, charged less (it
/// keeps its place in line meanwhile); returns its tokens (as estimated)
/// if there is one.
pub(crate) fn refresh(shared: &Shared, charge: &mut Charge, cx: &Context<'_>) -> Option<u64> {
    if !applies(charge) {
        return None;
    }
    let now = Instant::now();
    if charge.prefix_read > 0
        && !charge.prefix_from_fleet
        && shared.writers.readable(charge.prefix_hash, now).is_none()
    {
        // Its write failed, or the server's cache lifetime may have ended
        // while the request waited: charged in full again.
        unread(charge);
    }
    let floor = charge.prefix_read.max(charge.estimate.cache_read_tokens);
    let mut watched = None;
    let mut found = None;
    let mut fleet_held = charge.fleet_held;
    for p in charge
        .estimate
        .cache_pending
        .iter()
        .take_while(|p| p.tokens > floor)
    {
        // Read only where the charge is exact (a count less the served
        // size): a remainder estimated after a read errs by more than itself.
        if let (Some(Some(served)), Some(_)) =
            (shared.writers.readable(p.hash, now), charge.counted)
        {
            found = Some(Readable {
                hash: p.hash,
                tokens: p.tokens,
                served: Some(served),
            });
            break;
        }
        if watched.is_none()
            && (shared.writers.watch(p, cx)
                || fleet_writing(shared, charge.key(), &mut fleet_held, p, cx))
        {
            watched = Some(p.tokens);
        }
    }
    charge.fleet_held = fleet_held;
    if let Some(read) = found {
        read_prefix(charge, read);
        return None;
    }
    watched
}

/// Whether another process of the fleet writes `p` (through the ledger's
/// view, which then wakes the task of `cx` when that changes), and the
/// request may hold for it: once per prefix at most as long as the longest
/// it held for (the hold ends when the write begins or at the cache hold's
/// bound, and the request then asks without holding for it again).
fn fleet_writing(
    shared: &Shared,
    key: &str,
    held: &mut u64,
    p: &CachePrefix,
    cx: &Context<'_>,
) -> bool {
    let Some(fleet) = shared.writers.fleet() else {
        return false;
    };
    if p.tokens < *held || !fleet.prefix_writing(p.hash, cx.waker()) {
        return false;
    }
    if p.tokens > *held {
        tracing::debug!(
            key = super::callers::logged_key(key),
            tokens = p.tokens,
            "budget: another process writes a prefix of this request; holding for its answer"
        );
        *held = p.tokens;
    }
    true
}

/// Whether the writer of the prefix a request holds for (the longest it
/// held for, `Charge::fleet_held`) is another process's request still
/// queued in its line ([`Ledger::prefix_queued`]).
pub(crate) fn writer_queued(shared: &Shared, charge: &Charge) -> bool {
    let Some(fleet) = shared.writers.fleet() else {
        return false;
    };
    charge.fleet_held > 0
        && charge
            .estimate
            .cache_pending
            .iter()
            .any(|p| p.tokens == charge.fleet_held && fleet.prefix_queued(p.hash))
}

/// Whether a request in line, holding for a longer prefix being written
/// (`state`: [`PrefixWait::InLine`] or [`PrefixWait::InLineQueued`];
/// `writing`: the tokens of the prefix [`refresh`] found being written),
/// goes on holding now that its hold's timer fired:
///
/// - **Its writer still queued.** Only past the first bound, and only
///   while the writer is another process's request still queued in its line
///   ([`Ledger::prefix_queued`]); then the timer is set to end the hold
///   [`MAX_QUEUED_HOLD`] after it began, and `state` becomes
///   `InLineQueued`; when that timer fires with the writer still queued, it
///   is set again, [`MAX_QUEUED_HOLD`] on. A marker lives that long only
///   while its request asks (its refused asks renew it for their wait plus
///   the line's grace: it waits its turn in the fleet's line, which it will
///   get): one that holds, or waits behind its process's head, renews its
///   own at most [`MAX_QUEUED_HOLD`] from the first such wait, so a hold
///   for a stuck request, or a cycle of holds across processes, ends then.
/// - **Its writer, seen queued, now admitted** (its write not begun): the
///   hold goes on for that answer to begin, at most one more first bound
///   ([`hold_bound`]) from now, as for a writer admitted when the hold
///   began; `state` becomes `InLineAdmitted`, which does not go on again,
///   and after which the request does not hold again (as after a hold
///   that reached its bound): traced in virtual time (4 stacks, seed 50),
///   a conversation's turn that went on holding for its earlier turn's
///   answer, then for the next earlier turn, queued behind its own
///   process's held head, chained holds across the stacks until the
///   queued markers' 60 s lapsed.
///
/// Why: a hold bounded as for an admitted writer ended while the queued
/// writer still waited in the fleet's line, and the held request, sent
/// first, wrote the shared prefix that the queued one then wrote again
/// (traced on 16 processes on Redis: turn 4 of a conversation held 14.4 s
/// for its turn 3, went, and turn 3 went 14 s later). Sent after it, the
/// held request reads it. The hold ends sooner when the marker goes: its
/// request admitted and its answer begun, cancelled, refused, or its
/// process gone (the marker is renewed by its request's asks, and while
/// its request itself holds or waits behind its process's head,
/// `Shared::renew_queued`); the ledger's view
/// then wakes the held request. And a hold that ended at
/// [`MAX_QUEUED_HOLD`] while its writer, alive, still waited its turn in
/// the fleet's line let the held request go first (traced on 16 processes
/// on Redis: turn 4 held 60 s for turn 3, went, and turn 3 went 11 s
/// later; 1,713 tokens written twice). And the first bound, the prefix's
/// refill time, is about when a queued writer of that prefix is admitted
/// (the same tokens refill for it): a hold that ended then, with its
/// writer admitted a moment before and its answer not begun, sent the held
/// request beside it, and both wrote the prefix (traced in virtual time on
/// 4 stacks).
pub(crate) fn hold_on(
    shared: &Shared,
    charge: &Charge,
    state: &mut PrefixWait,
    writing: Option<u64>,
    cx: &mut Context<'_>,
) -> bool {
    let queued = writer_queued(shared, charge);
    let itpm = charge.limits.input_tokens_per_minute;
    let first = || hold_bound(shared.settings.cache_hold, itpm, charge.fleet_held);
    let (rest, admitted) = match (&*state, queued) {
        (PrefixWait::InLine(..), true) => (MAX_QUEUED_HOLD.saturating_sub(first()), false),
        (PrefixWait::InLineQueued(_), true) => (MAX_QUEUED_HOLD, false),
        (PrefixWait::InLine(_, true) | PrefixWait::InLineQueued(_), false)
            if charge.fleet_held > 0 && writing == Some(charge.fleet_held) =>
        {
            (first(), true)
        }
        _ => return false,
    };
    if rest.is_zero() {
        return false;
    }
    if admitted {
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            tokens = charge.fleet_held,
            "budget: the writer held for was admitted in another process; holding for its answer"
        );
    } else {
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            tokens = charge.fleet_held,
            "budget: the writer held for is still queued in another process; holding on"
        );
    }
    let (PrefixWait::InLine(mut timer, _) | PrefixWait::InLineQueued(mut timer)) =
        std::mem::take(state)
    else {
        return false;
    };
    timer.as_mut().reset(Instant::now() + rest);
    let going_on = std::future::Future::poll(timer.as_mut(), cx).is_pending();
    *state = if admitted {
        PrefixWait::InLineAdmitted(timer)
    } else {
        PrefixWait::InLineQueued(timer)
    };
    going_on
}

/// What a reservation tells a ledger that shares the fleet's prompt-cache
/// view ([`PrefixIntent`](super::ledger::PrefixIntent)).
#[derive(Debug, Default)]
pub(crate) struct FleetIntent {
    /// The prefixes the request writes.
    pub(crate) writes: Vec<u64>,
    /// In wait mode where cache-aware admission applies, its pending
    /// prefixes longer than what it reads and than any it already held for
    /// (so that a prefix being written elsewhere makes it hold once, not
    /// every time it asks).
    pub(crate) pending: Vec<u64>,
    /// How long it would hold at most: the [`hold_bound`] of the longest
    /// of `pending`.
    pub(crate) hold: Duration,
    /// At its first ask (`first`), those of `pending` shorter than its
    /// longest write that a cache entry can hold: the ledger gives it the
    /// writer grace while one of them has no marker
    /// ([`PrefixIntent::shorter`](super::ledger::PrefixIntent::shorter)).
    pub(crate) shorter: Vec<u64>,
}

/// [`FleetIntent`] of a request; `first`: its first ask of the ledger as
/// the head of its line.
pub(crate) fn fleet_intent(shared: &Shared, charge: &Charge, first: bool) -> FleetIntent {
    let writes = write_hashes(charge);
    let cache_hold = shared.settings.cache_hold;
    if shared.settings.mode != super::BudgetMode::Wait || !applies(charge) {
        return FleetIntent {
            writes,
            hold: cache_hold,
            ..FleetIntent::default()
        };
    }
    let floor = charge
        .prefix_read
        .max(charge.estimate.cache_read_tokens)
        .max(charge.fleet_held);
    let pending: Vec<&CachePrefix> = charge
        .estimate
        .cache_pending
        .iter()
        .take_while(|p| p.tokens > floor)
        .collect();
    let longest = pending.iter().map(|p| p.tokens).max().unwrap_or(0);
    let hold = hold_bound(cache_hold, charge.limits.input_tokens_per_minute, longest);
    let shorter = match charge.estimate.cache_writes.iter().map(|w| w.tokens).max() {
        Some(write) if first => pending
            .iter()
            .filter(|p| p.tokens < write && p.tokens >= MIN_CACHED_TOKENS)
            .map(|p| p.hash)
            .collect(),
        _ => Vec::new(),
    };
    FleetIntent {
        writes,
        pending: pending.iter().map(|p| p.hash).collect(),
        hold,
        shorter,
    }
}

/// The hashes of the prompt-cache prefixes a charge writes, as a fleet's
/// ledger is told them ([`Ledger::prefixes_queued`](super::ledger::Ledger::prefixes_queued),
/// [`fleet_intent`]).
pub(crate) fn write_hashes(charge: &Charge) -> Vec<u64> {
    charge
        .estimate
        .cache_writes
        .iter()
        .map(|w| w.hash)
        .collect()
}

/// How a request's writes are marked as queued for the fleet
/// ([`Ledger::prefixes_queued`](super::ledger::Ledger::prefixes_queued)):
/// the tokens of its longest write, and how long the marker lives, the
/// longest another process's request holds for a write of that size
/// ([`hold_bound`]) plus the line's grace (a marker that outlives every
/// hold for it holds no one more; a head refused again marks its writes
/// anew). `None` where nothing is marked: no write, no fleet to tell, or
/// not in wait mode (a request is never queued in reject mode).
pub(crate) fn queued_marker(shared: &Shared, charge: &Charge) -> Option<(u64, Duration)> {
    shared.writers.fleet()?;
    if shared.settings.mode != super::BudgetMode::Wait {
        return None;
    }
    let tokens = charge
        .estimate
        .cache_writes
        .iter()
        .map(|w| w.tokens)
        .max()?;
    let itpm = charge.limits.input_tokens_per_minute;
    let hold = hold_bound(shared.settings.cache_hold, itpm, tokens);
    Some((tokens, hold.saturating_add(super::ledger::LINE_GRACE)))
}

/// Takes back a prefix read: the request is charged as if it read only what
/// its estimate expected.
fn unread(charge: &mut Charge) {
    tracing::debug!(
        key = super::callers::logged_key(charge.key()),
        "budget: the prefix charged as a read is no longer readable; charged in full"
    );
    charge.prefix_read = 0;
    charge.prefix_served = None;
    charge.prefix_hash = 0;
    charge.prefix_from_fleet = false;
    match charge.counted {
        Some(counted) => super::count::apply(charge, counted),
        None => charge.costs.input_tokens = charge.estimate.input_tokens,
    }
}

/// Charges a request as reading a prefix (`tokens` as estimated, before
/// calibration) from the cache: its input reservation shrinks by the part of
/// the prefix it was charged for, at its calibration; a counted request's,
/// by the prefix's size as the server counted it when its writer's answer
/// said (see `count.rs`).
pub(crate) fn read_prefix(charge: &mut Charge, read: Readable) {
    note_read(charge, read, false);
    charge_read(charge);
}

/// [`read_prefix`] of a prefix the fleet's view says another process
/// cached (`fleet.rs`): without its size as the server counted it, it is
/// charged with a margin ([`read_charged`]).
pub(crate) fn read_fleet_prefix(charge: &mut Charge, read: Readable) {
    note_read(charge, read, true);
    charge_read(charge);
}

/// Records the read on the charge, if at least as long as the one it has.
fn note_read(charge: &mut Charge, read: Readable, fleet: bool) {
    if read.tokens >= charge.prefix_read {
        charge.prefix_read = read.tokens;
        charge.prefix_served = read.served;
        charge.prefix_hash = read.hash;
        charge.prefix_from_fleet = fleet;
    }
}

/// The prefix tokens (as estimated) the charge counts as read by
/// cache-aware admission: all of `prefix_read`, but for a prefix read from
/// the fleet's view whose size no process told, which is charged with the
/// margin of `estimate::unsized_fleet_read` (the rest of it as uncached
/// input).
pub(crate) fn read_charged(charge: &Charge) -> u64 {
    if charge.prefix_from_fleet && charge.prefix_served.is_none() {
        crate::estimate::unsized_fleet_read(charge.prefix_read)
    } else {
        charge.prefix_read
    }
}

/// Charges the read the charge records (see [`read_prefix`]).
pub(crate) fn charge_read(charge: &mut Charge) {
    if let Some(counted) = charge.counted {
        super::count::apply(charge, counted);
        return;
    }
    let estimate = &charge.estimate;
    let raw = estimate.raw_input_tokens;
    let extra = read_charged(charge).saturating_sub(estimate.cache_read_tokens);
    if raw == 0 || extra == 0 {
        return;
    }
    // What follows the prefix, at the estimate's calibration; and, when the
    // writer's answer sized the prefix, the calibrated whole less that
    // size. The larger stands: a prefix that is most of the prompt leaves
    // a remainder whose estimate errs by more than itself.
    let factor = estimate.input_tokens as f64 / raw as f64;
    let after = (raw.saturating_sub(extra) as f64 * factor).ceil() as u64;
    let less_served = charge
        .prefix_served
        .map_or(0, |served| estimate.input_tokens.saturating_sub(served));
    let input = after.max(less_served).min(estimate.input_tokens);
    tracing::debug!(
        key = super::callers::logged_key(charge.key()),
        from = charge.costs.input_tokens,
        to = input,
        "budget: prefix written by a request in flight; charged as a cache read"
    );
    charge.costs.input_tokens = input;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Context;

    fn prefix(hash: u64, tokens: u64) -> CachePrefix {
        CachePrefix { hash, tokens }
    }

    fn readable(hash: u64, tokens: u64, served: Option<u64>) -> PrefixState {
        PrefixState::Readable(Readable {
            hash,
            tokens,
            served,
        })
    }

    #[test]
    fn the_writers_usage_sizes_its_prefixes_in_the_servers_tokens() {
        let writers = Arc::new(Writers::default());
        let cx = Context::from_waker(Waker::noop());
        // The writer writes two breakpoints, estimated 2,000 and 8,000
        // tokens; its answer says the server cached or read 6,000.
        let mut guard = writers
            .start(&[prefix(1, 2_000), prefix(2, 8_000)])
            .expect("two writes");
        let (long, short) = (Slot::default(), Slot::default());
        assert_eq!(
            writers.poll(&[prefix(2, 8_000)], &cx, &long),
            PrefixState::Writing(8_000)
        );
        assert_eq!(
            writers.poll(&[prefix(1, 2_000)], &cx, &short),
            PrefixState::Writing(2_000)
        );
        guard.begin(Some(6_000));
        // The held requests are told: the longest exactly, the shorter in
        // proportion.
        assert_eq!(
            writers.poll(&[prefix(2, 8_000)], &cx, &long),
            readable(2, 8_000, Some(6_000))
        );
        assert_eq!(
            writers.poll(&[prefix(1, 2_000)], &cx, &short),
            readable(1, 2_000, Some(1_500))
        );
        // A request that looks after the write began is told the same.
        assert_eq!(
            writers.poll(&[prefix(2, 8_000)], &cx, &Slot::default()),
            readable(2, 8_000, Some(6_000))
        );
        drop(guard);
        // Both stay readable here, with their sizes, after the writer ends.
        assert_eq!(writers.readable(2, Instant::now()), Some(Some(6_000)));
        assert_eq!(writers.readable(1, Instant::now()), Some(Some(1_500)));
    }

    /// A shorter breakpoint that the writer's usage sizes below the
    /// minimum any model caches was not written: not readable, and its
    /// waiters go in full; an answer that cached nothing wrote nothing.
    #[test]
    fn a_prefix_the_usage_sizes_below_the_minimum_was_not_written() {
        let writers = Arc::new(Writers::default());
        let cx = Context::from_waker(Waker::noop());
        // Estimated 1,100 and 3,400 tokens; the server holds 2,700 of the
        // prompt: the shorter one is about 873 of its tokens.
        let mut guard = writers
            .start(&[prefix(1, 1_100), prefix(2, 3_400)])
            .expect("two writes");
        let short = Slot::default();
        assert_eq!(
            writers.poll(&[prefix(1, 1_100)], &cx, &short),
            PrefixState::Writing(1_100)
        );
        guard.begin(Some(2_700));
        assert_eq!(
            writers.poll(&[prefix(1, 1_100)], &cx, &short),
            PrefixState::Unwritten
        );
        assert_eq!(writers.readable(1, Instant::now()), None);
        assert_eq!(writers.readable(2, Instant::now()), Some(Some(2_700)));
        drop(guard);
        assert_eq!(writers.readable(1, Instant::now()), None);
        assert_eq!(writers.readable(2, Instant::now()), Some(Some(2_700)));

        let mut nothing = writers.start(&[prefix(3, 5_000)]).expect("one write");
        nothing.begin(Some(0));
        assert_eq!(writers.readable(3, Instant::now()), None);
        drop(nothing);
        assert_eq!(writers.readable(3, Instant::now()), None);
    }

    /// A hold lasts while waiting costs less than a second write: the
    /// cache hold, or the prefix's refill time at the key's input-token
    /// limit when that is longer, at most `MAX_CACHE_HOLD`; never with the
    /// cache hold off.
    #[test]
    fn a_hold_is_bounded_by_the_prefixs_refill_time() {
        let hold = Duration::from_secs(5);
        // 3,870 tokens at 30,000 ITPM: 7.74 s of refill.
        assert_eq!(
            hold_bound(hold, Some(30_000), 3_870),
            Duration::from_millis(7_740)
        );
        // A small prefix refills sooner than the cache hold: the hold stands.
        assert_eq!(hold_bound(hold, Some(30_000), 1_024), hold);
        // A whole minute's refill is capped.
        assert_eq!(hold_bound(hold, Some(30_000), 30_000), MAX_CACHE_HOLD);
        // Unknown limit: the cache hold; cache hold off: no hold.
        assert_eq!(hold_bound(hold, None, 30_000), hold);
        assert_eq!(hold_bound(hold, Some(0), 30_000), hold);
        assert_eq!(
            hold_bound(Duration::ZERO, Some(30_000), 3_870),
            Duration::ZERO
        );
        // A cache hold above the cap is kept.
        let long = Duration::from_secs(45);
        assert_eq!(hold_bound(long, Some(30_000), 3_870), long);
        assert_eq!(hold_bound(hold, Some(1), u64::MAX), MAX_CACHE_HOLD);
    }

    #[test]
    fn a_share_never_exceeds_the_served_size() {
        assert_eq!(served_share(6_000, 8_000, 8_000), 6_000);
        assert_eq!(served_share(6_000, 9_000, 8_000), 6_000);
        assert_eq!(served_share(6_000, 1, 8_000), 0);
        assert_eq!(served_share(6_000, 4_000, 0), 6_000);
        assert_eq!(served_share(u64::MAX, u64::MAX - 1, u64::MAX), u64::MAX - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_is_readable_once_begun_and_for_the_caches_lifetime() {
        let writers = Arc::new(Writers::default());
        let cx = Context::from_waker(Waker::noop());
        let pending = [prefix(1, 5_000)];
        let later = Slot::default();
        assert_eq!(writers.poll(&pending, &cx, &later), PrefixState::Unwritten);
        let mut guard = writers.start(&pending).expect("one write");
        let held = Slot::default();
        assert_eq!(
            writers.poll(&pending, &cx, &held),
            PrefixState::Writing(5_000)
        );
        guard.begin(None);
        assert_eq!(
            writers.poll(&pending, &cx, &later),
            readable(1, 5_000, None)
        );
        drop(guard);
        // A request that held for the write reads it even after the writer
        // finished; one that arrives later finds nothing in flight (the
        // estimator knows the prefix is warm by then).
        assert_eq!(writers.poll(&pending, &cx, &held), readable(1, 5_000, None));
        assert_eq!(
            writers.poll(&pending, &cx, &Slot::default()),
            PrefixState::Unwritten
        );
        // Remembered as readable for the server's shortest cache lifetime
        // from the writer's start, then dropped at the next write.
        assert_eq!(writers.readable(1, Instant::now()), Some(None));
        tokio::time::advance(CACHE_TTL).await;
        assert_eq!(writers.readable(1, Instant::now()), None);
        drop(writers.start(&[prefix(1, 5_000)]));
        assert_eq!(writers.len(), 0);
    }

    /// A waiting request's read is refreshed before each try: the longest
    /// pending prefix readable with a known size is read, and a read whose
    /// prefix stopped being readable is taken back.
    #[tokio::test(start_paused = true)]
    async fn a_read_is_refreshed_and_taken_back() {
        let writers = Arc::new(Writers::default());
        let mut guard = writers.start(&[prefix(3, 6_000)]).expect("one write");
        assert_eq!(writers.readable(3, Instant::now()), None, "not begun");
        guard.begin(Some(4_000));
        assert_eq!(writers.readable(3, Instant::now()), Some(Some(4_000)));
        drop(guard);
        tokio::time::advance(CACHE_TTL - Duration::from_secs(1)).await;
        assert_eq!(writers.readable(3, Instant::now()), Some(Some(4_000)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            writers.readable(3, Instant::now()),
            None,
            "may have expired"
        );
    }

    #[test]
    fn a_failed_write_releases_and_the_longest_decides() {
        let writers = Arc::new(Writers::default());
        let cx = Context::from_waker(Waker::noop());
        let short = writers.start(&[prefix(2, 2_000)]).expect("one write");
        let mut short = short;
        short.begin(None);
        let long = writers.start(&[prefix(1, 6_000)]).expect("one write");
        let pending = [prefix(1, 6_000), prefix(2, 2_000)];
        let slot = Slot::default();
        assert_eq!(
            writers.poll(&pending, &cx, &slot),
            PrefixState::Writing(6_000)
        );
        drop(long);
        assert_eq!(writers.poll(&pending, &cx, &slot), readable(2, 2_000, None));
        drop(short);
        // The failed write is forgotten; the one that began is remembered.
        assert_eq!(writers.len(), 1);
        assert_eq!(writers.readable(1, Instant::now()), None);
    }
}
