//! The ledger: one continuously refilling bucket per (key, dimension).
//!
//! The token budget asks the ledger, before each request, whether the
//! request's costs fit (one request, its uncached input tokens, its expected
//! output tokens), and tells it afterwards what the request really cost and
//! what the server's `anthropic-ratelimit-*` headers said. The [`Ledger`]
//! trait is that conversation; [`InMemoryLedger`] is the implementation for
//! one process.
//!
//! # The model
//!
//! Per key and per [`Dimension`] a token bucket, as the API's own limiter
//! (Anthropic's documentation: "your capacity is continuously replenished up
//! to your maximum limit"):
//!
//! - capacity = the limit scaled to the enforcement window: with the default
//!   window of 60 s the capacity is the limit itself; with a 1 s window a
//!   60 RPM limit has capacity 1 ("60 RPM might be enforced as 1 request per
//!   second");
//! - refilled continuously at limit / 60 per second, never above capacity;
//! - a new bucket starts full.
//!
//! [`Ledger::reserve`] debits all three dimensions at once or none of them (a
//! request that waits on input tokens holds no request slot), and otherwise
//! says how long until the request would fit ([`Reservation::Wait`], exact:
//! asking again that much later is admitted if nothing else was reserved
//! meanwhile)
//! or that it never can ([`Reservation::Never`]). [`Ledger::settle`] charges
//! or refunds the difference once the real usage is known; an over-charge may
//! leave a bucket negative, which delays later requests until it is repaid.
//! [`Ledger::sync`] lets the server's view win when it says less is left.
//!
//! The trait is asynchronous (each operation returns a [`LedgerFuture`]) and
//! the ledger keeps its own clock, so that a store shared by several
//! processes can fill it; [`InMemoryLedger`] answers at once, reading tokio's
//! clock, and also offers each operation at an explicit instant
//! ([`InMemoryLedger::reserve_at`], ...) for tests and simulations.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_limits::budget::ledger::{Costs, CostDelta, InMemoryLedger, Ledger, Reservation};
//! use tower_llm_limits::budget::Limits;
//! use tower_llm_limits::Dimension;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_llm_limits::budget::ledger::LedgerError> {
//! let ledger = InMemoryLedger::new();
//! let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
//! let request = Costs { requests: 1, input_tokens: 20_000, output_tokens: 1_000 };
//!
//! // The first request fits the full bucket.
//! assert_eq!(ledger.reserve("sonnet", &limits, request).await?, Reservation::Admitted);
//!
//! // The second would take ITPM below zero: it fits once 10,000 input tokens
//! // have refilled, at 500 per second, that is in 20 s; nothing was debited.
//! let second = ledger.reserve("sonnet", &limits, request).await?;
//! assert_eq!(
//!     second,
//!     Reservation::Wait { retry_in: Duration::from_secs(20), dimension: Dimension::InputTokens }
//! );
//!
//! // The first response used 4,000 fewer input tokens than estimated: refund
//! // them, and the second request fits 8 s sooner.
//! let refund = CostDelta { input_tokens: -4_000, ..CostDelta::default() };
//! ledger.settle("sonnet", &limits, refund).await?;
//! tokio::time::advance(Duration::from_secs(12)).await;
//! assert_eq!(ledger.reserve("sonnet", &limits, request).await?, Reservation::Admitted);
//!
//! // A request above the whole ITPM limit can never be admitted.
//! let huge = Costs { requests: 1, input_tokens: 40_000, output_tokens: 0 };
//! assert!(matches!(ledger.reserve("sonnet", &limits, huge).await?, Reservation::Never { .. }));
//! # Ok(())
//! # }
//! ```
//!
//! # Why not governor
//!
//! [governor](https://docs.rs/governor) implements GCRA well, and the budget
//! needs what it does not offer:
//!
//! - refunds: a settlement gives back what an estimate over-charged, and a 429
//!   gives back everything; governor has no way to put capacity back
//!   (<https://github.com/boinkor-net/governor/issues/218>);
//! - limits that change at run time: limits learned from the server's headers,
//!   or lowered by them, must apply to an existing bucket without losing what
//!   it holds (governor's quota is fixed at construction: its issues
//!   [#39](https://github.com/boinkor-net/governor/issues/39) and
//!   [#273](https://github.com/boinkor-net/governor/issues/273));
//! - syncing to a server's `remaining`, which means setting the level;
//! - one decision over three dimensions, all or nothing: governor's limiters
//!   are independent, so a request admitted by one and refused by another
//!   would have to be given back (which it cannot);
//! - an exact "admissible at" for any cost up to the limit, without sleeping:
//!   `check_n` fails for costs above the burst and `until_n_ready` sleeps and
//!   re-checks on a timer (no queue, and tokio's paused clock does not drive
//!   it), where the budget needs an instant it can queue on.
//!
//! So the ledger keeps its own bucket, a few lines of integer arithmetic
//! (below), tested by unit tests and a property test (`tests/ledger.rs`).
//!
//! # Representation: fixed-point integers
//!
//! A bucket is a level and the instant it was last brought up to date
//! (equivalent to GCRA's theoretical arrival time `updated + (capacity -
//! level) / rate`, but a level survives a change of limit unchanged, which a
//! TAT does not). The level is an `i128` in units of 1/60,000,000,000 of a
//! token, one minute counted in nanoseconds; in those units a limit of `L` per
//! minute refills exactly `L` units per nanosecond, and the capacity for a
//! window of `w` nanoseconds is exactly `L * w` units. All the arithmetic is
//! therefore exact (no floating-point drift, so [`Reservation::Wait`] is
//! exact to the nanosecond: it is rounded up), and it cannot overflow: a cost
//! or a limit of `u64::MAX` scaled is about 1.1e30, far below `i128::MAX`
//! (1.7e38), and every operation saturates anyway. A clock that steps back
//! refills nothing and never moves a bucket's timestamp back.
//!
//! Only the level is stored in 128 bits. The products that make it (time
//! elapsed times the limit, a limit times the window, a deficit divided by
//! the limit) are done in 64 bits, where realistic values keep them (a
//! 60 s window times a limit up to 307 million per minute), with a 128-bit
//! path taken only on overflow, so the results are the same exact integers.
//! A full bucket skips the refill product altogether.
//!
//! The same state (two numbers per bucket) and the same operations fit a
//! Redis Lua script: each trait method is one atomic step on one key.
//!
//! # What it deliberately does not do
//!
//! - It does not wait: it answers with a duration, and the budget layer
//!   queues its waiters (in order, without a thundering herd) and decides who
//!   asks next.
//! - It does not know which model or caller a key stands for, nor which
//!   header maps to which dimension (the combined `anthropic-ratelimit-tokens-*`
//!   header is the layer's concern, not a fourth bucket here).
//! - Memory is bounded by the number of keys in use: a key holds about 220
//!   bytes, and a key unused for [`AUTO_EVICT_IDLE`] (10 minutes) whose
//!   buckets are full again is forgotten when a new key arrives (amortized:
//!   when the key's shard of the map doubled, or at most every 5 minutes).
//!   [`InMemoryLedger::evict_idle`] and [`InMemoryLedger::remove`] do it on
//!   demand.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use super::limits::Limits;
use crate::estimate::SharedPromptCache;
use crate::headers::LimitStatus;
use crate::{BoxError, Dimension};

/// What one request costs in each dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Costs {
    /// Requests (1 for a request).
    pub requests: u64,
    /// Uncached input tokens.
    pub input_tokens: u64,
    /// Output tokens (expected output in realtime mode, `max_tokens` in reserve mode).
    pub output_tokens: u64,
}

/// A correction applied after admission: positive charges more, negative refunds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CostDelta {
    /// Change in requests.
    pub requests: i64,
    /// Change in input tokens.
    pub input_tokens: i64,
    /// Change in output tokens.
    pub output_tokens: i64,
}

/// The answer of [`Ledger::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Debited in every dimension: send the request now.
    Admitted,
    /// Nothing was debited; the costs would fit `retry_in` from now (the
    /// ledger's now, on the ledger's clock) if nothing else is reserved
    /// meanwhile. `dimension` is the limit that is furthest from fitting.
    Wait {
        /// How long until the request could be admitted.
        retry_in: Duration,
        /// The limit that blocks it longest.
        dimension: Dimension,
    },
    /// Nothing was debited; the cost is above the whole capacity of `dimension`
    /// and can never be admitted.
    Never {
        /// The limit it can never fit.
        dimension: Dimension,
        /// Its cost in that dimension.
        cost: u64,
        /// The bucket's whole capacity: the limit per minute, the largest cost
        /// ever admissible (with a short enforcement window a cost above the
        /// window's share waits for a full bucket instead, see
        /// [`InMemoryLedger::with_window`]).
        capacity: u64,
    },
}

/// Who asks [`Ledger::reserve_in_line`]: the budget, and its request's
/// place in the budget's own line for the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinePlace {
    /// The asking budget: one id per budget (per process of a fleet), unique
    /// across the fleet ([`LinePlace::new_owner`]). The ledger keeps at most
    /// one ticket per owner and key: its head's.
    pub owner: u64,
    /// Whether the request is the head of its budget's line for the key (a
    /// refused head leaves a ticket in the fleet's line); `false` for a
    /// request that asks before joining a line or passes a waiting head.
    pub head: bool,
    /// The request, unique within its budget (a head that asks again keeps
    /// its ticket's date and place; a new head gets a new ticket).
    pub request: u64,
    /// How long the request has waited in its budget so far (zero for a
    /// first ask): the ledger dates its ticket that long before its own now,
    /// so the fleet's line is in order of arrival whatever the processes'
    /// clocks say.
    pub waited: Duration,
}

impl LinePlace {
    /// A random owner id for a new budget (64 bits from the standard
    /// library's per-process random hasher keys, the process id and the
    /// time): distinct across a fleet with overwhelming probability.
    pub fn new_owner() -> u64 {
        use std::hash::Hasher;
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    }
}

/// A prompt-cache prefix's size as the server counted it
/// ([`Ledger::prefixes_cached_sized`]): the name
/// [`CachePrefix::hash`](crate::estimate::CachePrefix::hash) gives it, and
/// its tokens in the server's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServedSize {
    /// The prefix's hash.
    pub hash: u64,
    /// Its tokens as the server counted them.
    pub tokens: u64,
}

impl ServedSize {
    /// The prefix `hash`, which the server counted as `tokens`.
    pub fn new(hash: u64, tokens: u64) -> Self {
        ServedSize { hash, tokens }
    }
}

/// What a reservation in the fleet's line tells a ledger that shares a
/// fleet's prompt-cache view about the request's `cache_control` prefixes
/// ([`Ledger::reserve_in_line_with_prefixes`]), as
/// [`CachePrefix::hash`](crate::estimate::CachePrefix::hash) names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrefixIntent<'a> {
    /// The prefixes the request writes: if it is admitted, the ledger marks
    /// them as being written by this process until
    /// [`Ledger::prefixes_written`] says the answer began (or the request
    /// ended without one), or the marker expires.
    pub writes: &'a [u64],
    /// The prefixes it would read if cached, longest first, longer than
    /// what it is already charged as reading, that it has not held for
    /// yet: while another process writes one of them, the ledger does not
    /// admit it, and answers a short [`Reservation::Wait`] after which
    /// [`Ledger::prefix_writing`] reports the writer (the budget then holds
    /// for it as for a writer of its own process).
    pub pending: &'a [u64],
    /// How long the budget holds a request for another process's writer at
    /// most (its [`cache_hold`](crate::budget::TokenBudgetBuilder::cache_hold),
    /// or the refill time of the longest pending prefix when longer):
    /// a head held keeps its ticket in the fleet's line that long, plus
    /// [`LINE_GRACE`].
    pub hold: Duration,
    /// The tokens of the longest prefix the request writes, as estimated
    /// (0: it writes none): the order of nested writes across processes
    /// (see [`Ledger::prefixes_queued`]).
    pub tokens: u64,
    /// How long a marker of `writes` as queued lives at least when the
    /// request is not admitted ([`Ledger::prefixes_queued`]); zero: no
    /// marker. A ledger that keeps the markers keeps them for the wait it
    /// answers plus [`LINE_GRACE`] when that is longer, and renews for as
    /// long the markers of the budget's other queued requests on the key
    /// when the request is the head of its line: they wait at least as
    /// long.
    pub queued_for: Duration,
    /// At the request's first ask only (empty otherwise): its pending
    /// prefixes shorter than its longest write that a cache entry can hold
    /// (at least 1,024 tokens), which a shorter request of another process
    /// may be about to write. A ledger with a writer grace
    /// ([`WRITER_GRACE`]) that would admit the request now while one of
    /// them has no marker (being written, queued, or cached, by any
    /// process) does not admit it: it marks `writes` as queued (as for a
    /// wait, see [`PrefixIntent::queued_for`]), keeps a head's ticket in
    /// the fleet's line with its costs, and answers a
    /// [`Reservation::Wait`] of the grace.
    pub shorter: &'a [u64],
}

impl<'a> PrefixIntent<'a> {
    /// The prefixes a request writes, and those it would read that another
    /// process may be writing; held at most `hold`.
    pub fn new(writes: &'a [u64], pending: &'a [u64], hold: Duration) -> Self {
        PrefixIntent {
            writes,
            pending,
            hold,
            tokens: 0,
            queued_for: Duration::ZERO,
            shorter: &[],
        }
    }

    /// At the request's first ask: with its pending prefixes shorter than
    /// its longest write that another process may be about to write (see
    /// [`PrefixIntent::shorter`] and [`WRITER_GRACE`]).
    pub fn first_ask(mut self, shorter: &'a [u64]) -> Self {
        self.shorter = shorter;
        self
    }

    /// With the tokens of the longest prefix the request writes, and how
    /// long its writes stay marked as queued if it is not admitted (see
    /// [`Ledger::prefixes_queued`]).
    pub fn queued(mut self, tokens: u64, queued_for: Duration) -> Self {
        self.tokens = tokens;
        self.queued_for = queued_for;
        self
    }

    /// Whether it says nothing (no write, nothing pending).
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.pending.is_empty()
    }
}

/// How long a request that would write a prompt-cache prefix waits at its
/// first ask, when a shorter prefix of it that a cache entry can hold has
/// no marker yet ([`PrefixIntent::shorter`]): `RedisLedger`'s default
/// (`RedisLedgerBuilder::writer_grace`, feature `redis`).
///
/// # Why
///
/// Nested prefixes are written shortest first: a request holds for another
/// process's request that writes a shorter prefix of its prompt
/// ([`Ledger::prefixes_queued`]), but only once that request's marker is
/// in the ledger. A conversation's turns submitted at once, dealt to
/// different processes, reach the ledger within a round trip of each
/// other, and a queued request's marker waits up to the write delay
/// (2 ms) for its batch: traced on 4 processes over Redis, a
/// conversation's turn 4 (a 7,194-token prefix) was admitted at its first
/// ask before its turns 2 and 3 had asked in theirs, wrote its whole
/// prefix, and the server wrote theirs again (its entry ends at turn 4's
/// breakpoint, which a shorter breakpoint's look-back cannot reach).
/// During the grace the longer request's own writes are marked as queued,
/// so that a still longer request holds for it in turn; a shorter request
/// never waits for a longer one, so two writers cannot wait for each other.
///
/// Why 100 ms: it must cover the write delay (2 ms), a round trip (under a
/// millisecond on loopback, a few on a LAN) and the scheduling of the
/// other process's task on a loaded machine (reservations' p99 latency was
/// 11 to 24 ms in the crate's 4- and 16-process simulations on 2 shared
/// cores), with room to spare; and it is one interval of a held process's
/// watch. It costs a writer whose shorter prefixes no process marked 100 ms
/// at its first ask (and one more reservation call), and only there: not a
/// request that writes nothing, nor one whose shorter prefixes are all
/// marked or read, nor a later ask, nor a budget without a fleet's
/// prompt-cache view.
pub const WRITER_GRACE: Duration = Duration::from_millis(100);

/// How long the wait is that a ledger answers a request whose pending
/// prefix another process is writing
/// ([`Ledger::reserve_in_line_with_prefixes`]): enough for the budget to
/// look at [`Ledger::prefix_writing`] before it asks again.
pub const PREFIX_WRITING_WAIT: Duration = Duration::from_millis(1);

/// The longest a budget's head waits before asking a ledger that keeps the
/// fleet's line ([`Ledger::reserve_in_line`]) again, whatever wait the
/// ledger answered: 2 s, the line's own bound on how long others may delay
/// a head ([`LINE_DELAY_BOUND`]). That wait counts the other processes'
/// reservations as they stand, and their settlements give back what an
/// answer did not use (a reservation of `max_tokens`, 4,096 output tokens,
/// for an answer of 300) without waking this process, which learns it only
/// by asking: traced in virtual time (4 stacks on one ledger, seed 75),
/// four heads told to wait 30.7 s for output tokens slept through the
/// settlements that freed them a second later, and the fleet sent nothing
/// for half a minute with its input bucket full. A budget over its own
/// buckets is woken by its own settlements and waits the whole wait. It
/// costs a waiting head one reservation call every 2 s (a Redis call for
/// `RedisLedger`). In the simulation (`--fleet 4,16 --fleet-one-ledger`,
/// 40 seeds), asking again within 1 s instead gained nothing measurable.
pub const REASK_WITHIN: Duration = Duration::from_secs(2);

/// How long past its announced wait a ticket of the fleet's line lives
/// without its head asking again (a process that went away): the
/// [`InMemoryLedger`]'s; `RedisLedger` uses its `claim_grace`.
pub const LINE_GRACE: Duration = Duration::from_secs(1);

/// The most that requests passing the oldest ticket of the fleet's line may
/// delay it, in all: the budget's own head-of-line bound.
pub const LINE_DELAY_BOUND: Duration = super::admission::HEAD_DELAY_BOUND;

/// How long after the oldest ticket's due a request that waits behind it
/// asks again, at the latest ([`Ledger::reserve_in_line`]): time for that
/// ticket's head, whose own wait ends then, to ask first.
pub const LINE_RECHECK: Duration = Duration::from_millis(20);

/// The longest a request renews its own queued marker
/// ([`Ledger::prefixes_queued`]) while it asks the ledger nothing (it
/// holds in line, or waits behind its process's head), from the first
/// such wait; and how often a request holding for another process's
/// request that writes a shorter prefix of its prompt and is still queued
/// in its process's line ([`Ledger::prefix_queued`]) checks that it still
/// is. It holds while that marker lives (renewed by the queued request's
/// refused asks, as long as it waits its turn in the fleet's line),
/// through that request's admission until its answer begins: a hold for a
/// request that asks nothing, or a cycle of holds across processes, ends
/// within this bound of the marker's last renewal.
///
/// Why a minute: it is the limits' window. In a minute every bucket
/// refills whole, so a queued request that has not gone by then waits
/// behind more than a full minute of the fleet's traffic, or is stuck; and
/// it is how long a fleet believes an admitted writer's marker. Traced on
/// 16 processes, a conversation's turn 3 waited 34 s in its process's line
/// after its turn 4, in another process, began to hold for it: a hold
/// bounded by the prefix's refill time (14.4 s there) ended first, and the
/// server wrote turn 3's prefix twice. A hold capped at this minute ended
/// the same way while turn 3, alive, still waited its turn (71 s in all).
pub const MAX_QUEUED_HOLD: Duration = Duration::from_secs(60);

/// The state of one bucket, for snapshots.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    /// The limit per minute in force (configured or learned); `None` if unknown.
    pub limit: Option<u64>,
    /// Whether `limit` was learned from the server's headers.
    pub learned: bool,
    /// Tokens (or requests) available now; negative after an over-charge.
    pub available: f64,
    /// The bucket's capacity (the limit scaled to the enforcement window).
    pub capacity: f64,
}

/// The accounting behind the budget, one atomic step per operation, so that an
/// implementation backed by a shared store (a Redis Lua script per operation)
/// can replace the in-memory one without touching the layer.
///
/// `key` names a budget (for example a caller and a model class); `limits` are
/// the configured limits for that key, passed on every call so that the ledger
/// itself holds no configuration; a `None` limit falls back to a limit learned
/// through [`Ledger::sync`], and with neither the dimension is not limited.
///
/// # Asynchronous, with the ledger's own clock
///
/// Every operation returns a [`LedgerFuture`]: an implementation that answers
/// at once (the in-memory one) returns [`LedgerFuture::ready`], which costs no
/// allocation; one that crosses a network returns [`LedgerFuture::new`] over
/// its round trip. The caller never passes a time: the ledger reads its own
/// clock ([`InMemoryLedger`] reads tokio's, a Redis ledger would read `TIME`)
/// and answers with a duration ([`Reservation::Wait`]), which the layer adds
/// to its own clock.
///
/// The budget layer asks for one key's reservations one at a time, in the
/// order of its local FIFO queue: only the head of a key's queue calls
/// [`Ledger::reserve`], and the ledger never decides who asks next. Different
/// keys are independent, and no lock of the layer is held while a future
/// returned here is pending.
///
/// # Errors
///
/// A ledger that can fail (a network store) answers [`LedgerError`]. The
/// layer then fails the request with that error (boxed, downcast it), having
/// debited nothing for it and given back its place in line; a failed
/// [`Ledger::settle`] or [`Ledger::sync`] is logged (`warn`) and dropped, the
/// response is delivered all the same.
pub trait Ledger: Send + Sync + std::fmt::Debug + 'static {
    /// Debits `costs` in all three dimensions at once, or nothing.
    ///
    /// - [`Reservation::Admitted`]: debited everywhere; send the request.
    /// - [`Reservation::Wait`]: nothing debited; `retry_in` is the longest of
    ///   the waits after which each dimension could take its cost, exact
    ///   (asking again that much later, with nothing reserved meanwhile, is
    ///   admitted).
    /// - [`Reservation::Never`]: nothing debited; a cost is above its limit.
    ///
    /// A dimension whose cost is zero, or that has no limit, does not constrain
    /// the request.
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation>;

    /// [`Ledger::reserve`], for a caller that has just read tokio's clock:
    /// `now` is that reading. A ledger that keeps time on tokio's clock (the
    /// in-memory one) may take it instead of reading the clock again; a
    /// ledger on another clock ignores it. The budget calls this, with the
    /// instant it read for its own bookkeeping: one clock reading per
    /// admission, not two.
    ///
    /// The default calls [`Ledger::reserve`].
    fn reserve_with_clock(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        now: Instant,
    ) -> LedgerFuture<Reservation> {
        let _ = now;
        self.reserve(key, limits, costs)
    }

    /// Applies a correction after admission (settlement with real usage, or a refund).
    ///
    /// A positive amount charges more and may leave a bucket negative (a debt
    /// that delays later requests until the refill has repaid it); a negative
    /// amount refunds, never above the bucket's capacity. A key the ledger
    /// does not hold is ignored.
    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()>;

    /// Aligns one bucket with what the server's headers said: learns the limit
    /// if none is configured, and lowers what is available when the server
    /// says less is left (the server's view wins), without mistaking the
    /// API's rounding of token counts for a change.
    ///
    /// The caller maps headers to dimensions: the combined
    /// `anthropic-ratelimit-tokens-*` header is the most restrictive limit in
    /// force, not a bucket of its own.
    fn sync(
        &self,
        key: &str,
        limits: &Limits,
        dimension: Dimension,
        sync: LimitStatus,
    ) -> LedgerFuture<()>;

    /// Aligns the key's three buckets with one response's headers at once:
    /// `statuses` in [`Dimension::ALL`] order (requests, input tokens, output
    /// tokens), each as [`Ledger::sync`] takes it; an empty status
    /// ([`LimitStatus::is_empty`]) leaves its bucket alone.
    ///
    /// The budget calls this once per response. The default implementation
    /// calls [`Ledger::sync`] for each non-empty status, in order, and
    /// answers the first error once all of them have run; a ledger that can
    /// apply all three under one lock (or in one round trip) should override
    /// it.
    fn sync_all(&self, key: &str, limits: &Limits, statuses: [LimitStatus; 3]) -> LedgerFuture<()> {
        let mut first_error = None;
        let mut pending = Vec::new();
        for (dimension, status) in Dimension::ALL.into_iter().zip(statuses) {
            if status.is_empty() {
                continue;
            }
            match self.sync(key, limits, dimension, status).into_ready() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(op) => pending.push(op),
            }
        }
        if pending.is_empty() {
            return LedgerFuture::ready(first_error.map_or(Ok(()), Err));
        }
        LedgerFuture::new(async move {
            for op in pending {
                if let Err(e) = op.await {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }

    /// [`Ledger::reserve`] of `costs` that admits only when every bucket
    /// would still hold `headroom` after the debit, and debits `costs` alone.
    ///
    /// The budget keeps a share of the input limit free this way
    /// ([`input_headroom`](crate::budget::TokenBudgetBuilder::input_headroom)).
    /// The answers are those of `reserve(costs + headroom)` (a wait counts
    /// the headroom; [`Reservation::Never`] names `cost + headroom`). `None`
    /// (the default) means the ledger has no such operation: the budget then
    /// reserves `costs + headroom` and gives the headroom back with a
    /// [`Ledger::settle`], which leaves the buckets the same. A ledger across
    /// a network overrides it to save that second write.
    fn reserve_with_headroom(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
    ) -> Option<LedgerFuture<Reservation>> {
        let _ = (key, limits, costs, headroom);
        None
    }

    /// Whether the budget should hold a response's header sync until the
    /// response's usage is settled, and apply both with one
    /// [`Ledger::settle_and_sync`]. `false` (the default): the headers are
    /// synced when the response head arrives. A ledger across a network
    /// may answer `true`, so that a response costs it one write, not two;
    /// the server's view then reaches the ledger when the body ends, and
    /// the refill since the head is lost if the sync lowers the bucket
    /// (`RedisLedger` answers `false`, and buffers the sync until its next
    /// call instead).
    fn sync_with_settlement(&self) -> bool {
        false
    }

    /// [`Ledger::sync_all`] with `statuses`, then [`Ledger::settle`] with
    /// `delta` (a zero delta settles nothing), as one operation where the
    /// ledger can. The default runs the two in that order and answers the
    /// first error once both have run.
    fn settle_and_sync(
        &self,
        key: &str,
        limits: &Limits,
        delta: CostDelta,
        statuses: [LimitStatus; 3],
    ) -> LedgerFuture<()> {
        let sync = self.sync_all(key, limits, statuses);
        let settle = if delta.is_zero() {
            LedgerFuture::ready(Ok(()))
        } else {
            self.settle(key, limits, delta)
        };
        match (sync.into_ready(), settle.into_ready()) {
            (Ok(a), Ok(b)) => LedgerFuture::ready(a.and(b)),
            (a, b) => LedgerFuture::new(async move {
                let a = match a {
                    Ok(done) => done,
                    Err(op) => op.await,
                };
                let b = match b {
                    Ok(done) => done,
                    Err(op) => op.await,
                };
                a.and(b)
            }),
        }
    }

    /// The state of the key's three buckets (requests, input, output), if the
    /// key is known: a snapshot.
    ///
    /// Read-only: the refill up to now is computed, not stored. A dimension
    /// without any limit reports `limit: None` and an infinite `available`
    /// and `capacity`.
    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>>;

    /// The prompt-cache view this ledger shares with the other processes of
    /// a fleet, if it keeps one. A budget built with this ledger and without
    /// an estimator of its own gives it to its default
    /// [`AnthropicEstimator`](crate::estimate::AnthropicEstimator)
    /// ([`shared_prompt_cache`](crate::estimate::AnthropicEstimatorBuilder::shared_prompt_cache)).
    /// The default: `None`.
    fn prompt_cache(&self) -> Option<Arc<dyn SharedPromptCache>> {
        None
    }

    /// A response on `key` confirmed that the server cached the prompt
    /// prefixes `hashes` (its `cache_control` breakpoints, as
    /// [`CachePrefix::hash`](crate::estimate::CachePrefix::hash) names
    /// them): the ledger tells the other processes, with the response's
    /// settlement where it can. The budget calls it just before that
    /// settlement, only when [`prompt_cache`](Ledger::prompt_cache) is
    /// `Some`. The default does nothing.
    fn prefixes_cached(&self, key: &str, hashes: &[u64]) {
        let _ = (key, hashes);
    }

    /// [`Ledger::prefixes_cached`], with the size the server counted for
    /// the longest of `hashes` when the response's usage said (`served`:
    /// its `cache_creation_input_tokens + cache_read_input_tokens`, the
    /// prompt up to its last breakpoint): the ledger shares it with the
    /// name, and its view answers it in
    /// [`SharedPromptCache::served`], so that another process reading the
    /// prefix is charged its count less that size, as the writer's own
    /// process is. The budget calls this one; the default forgets the size
    /// and calls [`Ledger::prefixes_cached`].
    fn prefixes_cached_sized(&self, key: &str, hashes: &[u64], served: Option<ServedSize>) {
        let _ = served;
        self.prefixes_cached(key, hashes);
    }

    /// [`Ledger::reserve_with_headroom`] of `costs` (with `headroom` kept
    /// free; zero for none) in the line of every budget that shares this
    /// ledger: the fleet's line. `None` (the default) means the ledger keeps
    /// no such line; the budget then asks [`Ledger::reserve_with_headroom`]
    /// or [`Ledger::reserve`]. A budget with a ledger of the user's asks
    /// this first, every time.
    ///
    /// # The rule: the oldest waiting head first
    ///
    /// Inside one budget only the head of a key's line asks, so its large
    /// request is not overtaken there; budgets in other processes would take
    /// every bit of refill before its wait is over. So per key the ledger
    /// keeps a ticket for each budget's refused head: its owner, its costs
    /// (with headroom), and its date, the ledger's now less
    /// [`LinePlace::waited`] (the order of arrival). A reservation of a
    /// request of another owner that arrived later than the oldest ticket
    /// is admitted only
    ///
    /// - if it fits beside that ticket's costs (the ticket is not delayed at
    ///   all), or
    /// - if it fits and the refill time of its costs (in the tightest
    ///   dimension), added to what passing requests already delayed that
    ///   ticket, stays within [`LINE_DELAY_BOUND`] (2 s, the budget's own
    ///   head-of-line bound);
    ///
    /// otherwise it waits until it would fit after the ticket, but asks
    /// again no later than the ticket's due plus [`LINE_RECHECK`] (20 ms;
    /// or, for a ticket with costs whose head is late, after as long again
    /// as it is late, at least 20 ms): a budget in another process is not
    /// woken when the ticket's head goes, and that wait assumed the
    /// ticket's costs and headroom all taken from the refill, where its
    /// head, once admitted, leaves its headroom in the bucket and may have
    /// been charged less (a cache read, a count). A request of
    /// the oldest ticket's owner, or older than every ticket, reserves as
    /// [`Ledger::reserve_with_headroom`]. A head's admission removes its
    /// ticket; a head refused again dates and costs its ticket anew, with
    /// an expiry of its wait plus a grace ([`LINE_GRACE`]), so the ticket of
    /// a process that went away ends by itself. So the fleet admits its
    /// waiting heads in order of arrival, within the same bound as one
    /// budget, and nothing starves.
    fn reserve_in_line(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
    ) -> Option<LedgerFuture<Reservation>> {
        let _ = (key, limits, costs, headroom, place);
        None
    }
    /// [`Ledger::reserve_in_line`] of a request that writes or may read
    /// `cache_control` prefixes, for a ledger that shares a fleet's view of
    /// the prompt cache ([`Ledger::prompt_cache`]): the budget calls this
    /// instead when that view is shared and it holds for prefixes being
    /// written ([`cache_hold`](crate::budget::TokenBudgetBuilder::cache_hold)
    /// above zero).
    ///
    /// The server makes a prefix readable only once the first answer that
    /// writes it has begun; a request of another process sent before that
    /// pays the whole prefix again. So, in the same operation as the
    /// reservation:
    ///
    /// - if the request would be admitted now while one of
    ///   `prefixes.pending` is being written by another process (its writer
    ///   admitted, its answer not begun, its marker not expired), nothing
    ///   is debited and the answer is a [`Reservation::Wait`] of
    ///   [`PREFIX_WRITING_WAIT`]; a head keeps its place in the fleet's
    ///   line (its ticket's date and order, without costs: the others use
    ///   the refill meanwhile) for `prefixes.hold` plus [`LINE_GRACE`];
    ///   from then on [`Ledger::prefix_writing`] reports that writer. (A
    ///   request that waits for capacity anyway is answered that wait: it
    ///   asks again after it);
    ///   The same holds while another process's request that is still
    ///   queued writes one of `prefixes.pending` that is not among
    ///   `prefixes.writes`, with a longest write shorter than
    ///   `prefixes.tokens` ([`Ledger::prefixes_queued`]);
    /// - if the request is admitted, `prefixes.writes` are marked as being
    ///   written by this process (and no longer as queued);
    /// - if it is answered a wait and `prefixes.queued_for` is not zero,
    ///   `prefixes.writes` are marked as queued for that long;
    /// - at its first ask, if it would be admitted now while one of
    ///   `prefixes.shorter` has no marker at all (not being written, not
    ///   queued, not cached: a shorter request of another process may be
    ///   about to mark it), a ledger with a writer grace
    ///   ([`Ledger::writer_grace`], [`WRITER_GRACE`]) does not admit it
    ///   (nothing debited), marks its writes as queued, keeps a head's
    ///   ticket in the fleet's line with its costs, due at the grace's end
    ///   (the others do not take its share of the refill meanwhile), and
    ///   answers a [`Reservation::Wait`] of exactly the grace;
    ///   its next ask is as above.
    ///
    /// The default ignores `prefixes` and calls [`Ledger::reserve_in_line`].
    fn reserve_in_line_with_prefixes(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
        prefixes: PrefixIntent<'_>,
    ) -> Option<LedgerFuture<Reservation>> {
        let _ = prefixes;
        self.reserve_in_line(key, limits, costs, headroom, place)
    }

    /// How long this ledger keeps a writer whose shorter prefixes no
    /// process marked from going at its first ask
    /// ([`PrefixIntent::shorter`], [`WRITER_GRACE`]): the budget passes
    /// those prefixes only when this is above zero, and a request answered
    /// a wait of exactly this long at its first ask does not ask again
    /// before it is over, even if woken meanwhile. The default: zero (no
    /// grace).
    fn writer_grace(&self) -> Duration {
        Duration::ZERO
    }

    /// Whether another process of the fleet is writing the prompt-cache
    /// prefix `hash` (its writer admitted, its answer not begun), as far as
    /// this ledger's view knows. If so, `waker` is woken when that changes
    /// (the write began or ended, or its marker expired), so that a request
    /// holding for it asks again then. The default: `false`.
    fn prefix_writing(&self, hash: u64, waker: &std::task::Waker) -> bool {
        let _ = (hash, waker);
        false
    }

    /// Whether the writer of `hash` that [`Ledger::prefix_writing`]
    /// reports is a request still queued in another process's line (its
    /// marker of [`Ledger::prefixes_queued`] alive), not yet admitted.
    ///
    /// A hold for such a writer does not end at the bound of a hold for an
    /// admitted writer: the queued request may wait in the fleet's line for
    /// longer than that, and a request that goes before it writes the
    /// shared part of their prompts first, which the queued request then
    /// writes again (the server's entry for the longer prompt ends at its
    /// own breakpoint). The budget holds while this says so. The
    /// marker lives while its request waits and asks again (each refused
    /// ask renews it for its wait plus a grace), or holds itself, or waits
    /// in its process's line behind another (renewed before it lapses, at
    /// most [`MAX_QUEUED_HOLD`] from the first such wait), so a process
    /// that went away holds no one for long. The default: `false`.
    fn prefix_queued(&self, hash: u64) -> bool {
        let _ = hash;
        false
    }

    /// A request of this process that was admitted writing `hashes`
    /// ([`PrefixIntent::writes`]) no longer writes them: its answer began
    /// (the prefixes are readable), or it ended without one (refused,
    /// failed, cancelled). The ledger clears their markers, so that the
    /// other processes' requests holding for them go. The default does
    /// nothing.
    fn prefixes_written(&self, hashes: &[u64]) {
        let _ = hashes;
    }

    /// A request of this process on `key` that will write the prompt-cache
    /// prefixes `writes` (`tokens`: the longest of them, as estimated)
    /// joined its budget's line behind others: the ledger marks them as
    /// queued for the other processes for `queued_for`, until the request
    /// is admitted (its reservation turns the marker into one of a writer),
    /// or [`Ledger::prefixes_dequeued`] says it left the line. A ledger
    /// that remembers the wait it last answered the budget's head keeps
    /// the marker at least until that head asks again, plus the grace
    /// (the head's refused asks renew it: see
    /// [`PrefixIntent::queued_for`]), so that it lives while its request
    /// waits and ends by itself if the process went away. The budget calls
    /// this again for the same request to renew the marker while that
    /// request asks nothing itself (it holds, or waits behind a head that
    /// holds).
    ///
    /// # Why: nested prefixes are written shortest first
    ///
    /// When one request's cache prefix is a proper prefix of another's (a
    /// conversation's earlier turn and its later turn), the shorter should
    /// be written first: the longer then reads it and writes only the
    /// difference, where the reverse order writes the shorter twice (the
    /// server's entry for the longer ends at its breakpoint, which the
    /// shorter cannot read). Inside one process the budget's line sends the
    /// turns in order of arrival; across processes a request about to be
    /// admitted whose pending prefixes ([`PrefixIntent::pending`]) include
    /// one, not among its own writes, that another process's queued request
    /// writes, with a longest write shorter than its own
    /// ([`PrefixIntent::tokens`]; the strict order keeps two requests from
    /// holding for each other), holds for it as for a writer already
    /// admitted ([`Ledger::reserve_in_line_with_prefixes`]), within the same
    /// bound. A reservation in the line that is answered a wait marks its
    /// writes as queued itself ([`PrefixIntent::queued_for`]). `request` is
    /// [`LinePlace::request`]. The default does nothing.
    fn prefixes_queued(
        &self,
        key: &str,
        request: u64,
        writes: &[u64],
        tokens: u64,
        queued_for: Duration,
    ) {
        let _ = (key, request, writes, tokens, queued_for);
    }

    /// The request `request` ([`LinePlace::request`]) of this process on
    /// `key`, whose writes were marked as queued, left its budget's line
    /// without being admitted (cancelled, refused, out of time): the ledger
    /// clears its markers, so that requests holding for them go. Unknown
    /// requests are ignored. The default does nothing.
    fn prefixes_dequeued(&self, key: &str, request: u64) {
        let _ = (key, request);
    }

    /// A response on `key` reported its output: `sample`. A ledger shared by
    /// several budgets (the processes of a fleet) keeps the key's recent
    /// samples for the others ([`outputs_learned`](Ledger::outputs_learned)),
    /// with the response's settlement where it can (no call of its own). A
    /// budget over a ledger given to it calls it just before that
    /// settlement. The default does nothing.
    ///
    /// Why share them: a fleet's processes send the same kinds of requests on
    /// one key, so each answer is evidence about the others'. A process
    /// that learns its expected output alone sees 1/N of the answers and
    /// reserves `max_tokens` (the prior) until it has seen enough itself:
    /// traced at 16 processes, a 392-token request waited 30.7 s for a
    /// 4,096-token output reservation where the answers were at most 300
    /// tokens.
    fn output_learned(&self, key: &str, sample: OutputSample) {
        let _ = (key, sample);
    }

    /// Appends to `into` the output samples other budgets told this ledger
    /// on `key` ([`output_learned`](Ledger::output_learned)) from position
    /// `after` on, oldest first, and returns the position to ask from next
    /// time (start at 0: a budget joining a warm fleet gets the recent
    /// samples at once, as many as the ledger keeps). Read from memory, no
    /// call: a networked ledger brings the samples back with the key's
    /// calls. The budget learns them as its own answers' outputs (not its
    /// own answers: its estimator's calibration and cold input headroom
    /// still count only those). The default adds nothing and returns
    /// `after`.
    fn outputs_learned(&self, key: &str, after: u64, into: &mut Vec<OutputSample>) -> u64 {
        let _ = (key, into);
        after
    }
}

/// One answer's output, as a ledger shares it between budgets
/// ([`Ledger::output_learned`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputSample {
    /// The output tokens the answer's usage reported.
    pub output_tokens: u64,
    /// The request's `max_tokens` (above 0).
    pub max_tokens: u64,
}

/// A ledger's memory of the output samples it was told, per key, for the
/// budgets that read them ([`Ledger::outputs_learned`]): at most
/// [`OUTPUTS_KEPT`] per key, each at a position that counts every sample
/// the key was given.
#[derive(Debug, Default)]
pub struct OutputLog {
    keys: std::collections::HashMap<Arc<str>, KeyOutputs>,
}

#[derive(Debug, Default)]
struct KeyOutputs {
    /// The position of the next sample.
    next: u64,
    samples: std::collections::VecDeque<OutputSample>,
}

/// How many output samples an [`OutputLog`] (and a `RedisLedger`) keeps per
/// key: more than a budget's window of recent outputs (200 by default).
pub const OUTPUTS_KEPT: usize = 256;

impl OutputLog {
    /// Adds `samples` to `key`'s log.
    pub fn push(&mut self, key: &str, samples: impl IntoIterator<Item = OutputSample>) {
        let entry = match self.keys.get_mut(key) {
            Some(entry) => entry,
            None => self.keys.entry(Arc::from(key)).or_default(),
        };
        for sample in samples {
            if entry.samples.len() == OUTPUTS_KEPT {
                entry.samples.pop_front();
            }
            entry.samples.push_back(sample);
            entry.next += 1;
        }
    }

    /// Appends `key`'s samples from position `after` on (those still kept)
    /// to `into`; returns the position after the last.
    pub fn read(&self, key: &str, after: u64, into: &mut Vec<OutputSample>) -> u64 {
        let Some(entry) = self.keys.get(key) else {
            return after;
        };
        let first = entry.next - entry.samples.len() as u64;
        let skip = after.saturating_sub(first);
        if after > entry.next {
            // A position from before the log was cleared: all of it is new.
            into.extend(entry.samples.iter().copied());
        } else {
            into.extend(entry.samples.iter().skip(skip as usize).copied());
        }
        entry.next
    }

    /// Forgets `key`'s samples.
    pub fn remove(&mut self, key: &str) {
        self.keys.remove(key);
    }
}

/// The future of one [`Ledger`] operation: an answer ready at once (no
/// allocation), or a boxed future (a network round trip).
///
/// # Panics
///
/// Polling a `LedgerFuture` after it returned `Ready` panics.
pub struct LedgerFuture<T> {
    inner: Inner<T>,
}

enum Inner<T> {
    Ready(Option<Result<T, LedgerError>>),
    Boxed(Pin<Box<dyn Future<Output = Result<T, LedgerError>> + Send + 'static>>),
}

impl<T> fmt::Debug for LedgerFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.inner {
            Inner::Ready(Some(_)) => "ready",
            Inner::Ready(None) => "done",
            Inner::Boxed(_) => "pending",
        };
        f.debug_struct("LedgerFuture")
            .field("state", &state)
            .finish()
    }
}

impl<T> LedgerFuture<T> {
    /// An answer known at once.
    #[inline]
    pub fn ready(answer: Result<T, LedgerError>) -> Self {
        LedgerFuture {
            inner: Inner::Ready(Some(answer)),
        }
    }

    /// An answer that takes a round trip.
    pub fn new(future: impl Future<Output = Result<T, LedgerError>> + Send + 'static) -> Self {
        LedgerFuture {
            inner: Inner::Boxed(Box::pin(future)),
        }
    }

    /// The answer if it is known without polling, or the future back.
    ///
    /// # Errors
    ///
    /// `Err(self)` if the answer takes a round trip (or was already taken).
    #[inline]
    pub fn into_ready(self) -> Result<Result<T, LedgerError>, Self> {
        match self.inner {
            Inner::Ready(Some(answer)) => Ok(answer),
            inner => Err(LedgerFuture { inner }),
        }
    }
}

// The answer is held by value, never pinned: moving the future is fine.
impl<T> Unpin for LedgerFuture<T> {}

impl<T> Future for LedgerFuture<T> {
    type Output = Result<T, LedgerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            Inner::Ready(answer) => match answer.take() {
                Some(answer) => Poll::Ready(answer),
                None => panic!("`LedgerFuture` polled after completion"),
            },
            Inner::Boxed(fut) => {
                let answer = std::task::ready!(fut.as_mut().poll(cx));
                self.inner = Inner::Ready(None);
                Poll::Ready(answer)
            }
        }
    }
}

/// A ledger operation failed (a network store could not be reached, a script
/// failed). Opaque: its [`source`](std::error::Error::source) is the
/// implementation's own error.
#[derive(Debug)]
pub struct LedgerError {
    source: BoxError,
}

impl LedgerError {
    /// Wraps an implementation's error.
    pub fn new(source: impl Into<BoxError>) -> Self {
        LedgerError {
            source: source.into(),
        }
    }
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ledger operation failed")
    }
}

impl std::error::Error for LedgerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

impl Costs {
    /// The cost in one dimension.
    pub fn get(&self, dimension: Dimension) -> u64 {
        match dimension {
            Dimension::Requests => self.requests,
            Dimension::InputTokens => self.input_tokens,
            Dimension::OutputTokens => self.output_tokens,
        }
    }
}

impl CostDelta {
    /// The delta that gives back all of `costs` (a request the server never
    /// charged, for example one answered with a 429).
    ///
    /// Amounts above `i64::MAX` saturate.
    pub fn refund(costs: Costs) -> Self {
        CostDelta {
            requests: neg_saturating(costs.requests),
            input_tokens: neg_saturating(costs.input_tokens),
            output_tokens: neg_saturating(costs.output_tokens),
        }
    }

    /// The delta from what was reserved to what was really used, dimension by
    /// dimension (`actual - reserved`: negative refunds, positive charges more).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::ledger::{CostDelta, Costs};
    /// let reserved = Costs { requests: 1, input_tokens: 1_000, output_tokens: 4_096 };
    /// let actual = Costs { requests: 1, input_tokens: 1_150, output_tokens: 300 };
    /// let delta = CostDelta::between(reserved, actual);
    /// assert_eq!(delta, CostDelta { requests: 0, input_tokens: 150, output_tokens: -3_796 });
    /// ```
    pub fn between(reserved: Costs, actual: Costs) -> Self {
        CostDelta {
            requests: diff_saturating(actual.requests, reserved.requests),
            input_tokens: diff_saturating(actual.input_tokens, reserved.input_tokens),
            output_tokens: diff_saturating(actual.output_tokens, reserved.output_tokens),
        }
    }

    /// The change in one dimension.
    pub fn get(&self, dimension: Dimension) -> i64 {
        match dimension {
            Dimension::Requests => self.requests,
            Dimension::InputTokens => self.input_tokens,
            Dimension::OutputTokens => self.output_tokens,
        }
    }

    /// Whether the delta changes nothing.
    pub fn is_zero(&self) -> bool {
        *self == CostDelta::default()
    }
}

/// The next ticket number of a line: one above its newest.
/// Keeps (or makes) a held head's ticket: its date and place as a refused
/// head's, due now, expiring after `hold` plus the grace, with no costs:
/// the others use the refill while it holds (it asks again when the hold
/// ends, and its ticket then takes its costs, or goes with its admission).
fn hold_ticket(line: &mut Vec<Ticket>, place: LinePlace, hold: Duration, now: Instant) {
    keep_ticket(line, place, Costs::default(), now, hold, now);
}

/// Keeps a head's ticket in the fleet's line (its date and place), with
/// `costs` due at `due`, until `due` plus `hold` plus the grace.
fn keep_ticket(
    line: &mut Vec<Ticket>,
    place: LinePlace,
    costs: Costs,
    due: Instant,
    hold: Duration,
    now: Instant,
) {
    let mine = line.iter().position(|t| t.owner == place.owner);
    let same = mine.map(|j| line[j]).filter(|t| t.request == place.request);
    let ticket = Ticket {
        owner: place.owner,
        request: place.request,
        since: same.map_or_else(|| now.checked_sub(place.waited).unwrap_or(now), |t| t.since),
        seq: same.map_or_else(|| next_seq(line), |t| t.seq),
        costs,
        due,
        expires: due
            .checked_add(hold.saturating_add(LINE_GRACE))
            .unwrap_or(due),
        delayed: same.map_or(Duration::ZERO, |t| t.delayed),
    };
    match mine {
        Some(j) => line[j] = ticket,
        None => line.push(ticket),
    }
}

fn next_seq(line: &[Ticket]) -> u64 {
    line.iter()
        .map(|t| t.seq.saturating_add(1))
        .max()
        .unwrap_or(0)
}

/// `a + b` in every dimension, saturating.
pub(crate) fn add_costs(a: Costs, b: Costs) -> Costs {
    Costs {
        requests: a.requests.saturating_add(b.requests),
        input_tokens: a.input_tokens.saturating_add(b.input_tokens),
        output_tokens: a.output_tokens.saturating_add(b.output_tokens),
    }
}

fn neg_saturating(value: u64) -> i64 {
    i64::try_from(value).map_or(i64::MIN + 1, |v| -v)
}

fn diff_saturating(a: u64, b: u64) -> i64 {
    if a >= b {
        i64::try_from(a - b).unwrap_or(i64::MAX)
    } else {
        // `b - a` of 2^63 is exactly `i64::MIN`.
        i64::try_from(b - a).map_or(i64::MIN, |d| -d)
    }
}

/// The error of [`InMemoryLedger::with_window`]: the enforcement window must
/// be longer than zero and at most 60 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidWindow {
    window: Duration,
}

impl InvalidWindow {
    /// The window that was refused.
    pub fn window(&self) -> Duration {
        self.window
    }
}

impl fmt::Display for InvalidWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid enforcement window {:?}: it must be longer than zero and at most 60 s",
            self.window
        )
    }
}

impl std::error::Error for InvalidWindow {}

/// Units of a level per token: one minute in nanoseconds. A limit of `L` per
/// minute then refills exactly `L` units per nanosecond.
const UNITS_PER_TOKEN: i128 = 60_000_000_000;

/// The longest enforcement window (and the default): one minute.
const MINUTE: Duration = Duration::from_secs(60);

/// [`MINUTE`] in nanoseconds.
const MINUTE_NANOS: u64 = 60_000_000_000;

/// How far below the ledger's level a token `remaining` that is a multiple of
/// 1,000 may be before the ledger takes it for a change: the API rounds token
/// counts "to the nearest thousand", so the true value is below `r + 500`.
const TOKEN_ROUNDING_TOLERANCE: u64 = 500;

/// How much a `-reset` value may be off: the header has second precision.
const RESET_PRECISION_NANOS: u64 = 1_000_000_000;

/// The default in-memory implementation of [`Ledger`].
///
/// One bucket per (key, dimension), as the module docs describe. Keys live in
/// a map split into 16 shards, each behind a `RwLock`, each key with its own
/// `Mutex`, so operations on different keys do not wait for each other, a
/// sweep of idle keys locks one shard at a time, and an operation on one key
/// holds its lock for a few hundred nanoseconds at most (no lock is ever held
/// across an `.await`: every operation answers at once). A poisoned lock is taken
/// over (the state it guards is always consistent: every update is a few
/// integer assignments that cannot panic).
///
/// Cheap to share: wrap it in an `Arc` (the budget layer does).
///
/// # Limits in force
///
/// Per dimension, the limit in force is the configured one (the `limits`
/// argument); the server's `-limit` header, once seen, is remembered and wins
/// over nothing (a limit learned when none is configured) and over a higher
/// configured limit (a Workspace limit or a lower tier than configured), but
/// a configured limit stays when the server reports a higher one: raising a
/// limit is the user's decision. The latest report replaces earlier ones. A
/// reported limit of zero is ignored (the API does not advertise one, and a
/// garbled header must not block every request for ever). A bucket that gets
/// its first limit starts full, and a bucket whose limit shrinks is cut to
/// the new capacity.
///
/// # Syncing to the server's remaining
///
/// [`Ledger::sync`] only ever lowers a bucket, to what the server says is
/// left, and only when the ledger's level is above anything the server could
/// have meant:
///
/// - the API rounds token `remaining` values "to the nearest thousand"
///   (Anthropic's documentation), so a token `remaining` that is a multiple of 1,000 is
///   read as "below `remaining + 500`": a ledger 400 tokens above it is
///   consistent with the server and left alone, one 600 above is lowered to
///   `remaining`. A server that floors instead (up to 999 above) is handled
///   safely too: the ledger may then be lowered a little more than needed,
///   never left too high. Request counts and token counts that are not
///   multiples of 1,000 are exact;
/// - without `remaining`, `reset_in` (time until full) implies
///   `capacity - reset_in * rate`; the header has second precision, so a
///   difference smaller than one second of refill is not a change;
/// - the server's count does not know of requests admitted since it answered:
///   the ledger already debited those, which is why it never raises a bucket
///   to the server's value.
///
/// # Memory
///
/// Each key holds a small fixed-size state (three buckets, 176 bytes boxed,
/// about 220 with the map's overhead, plus the key). Keys are created by
/// [`Ledger::reserve`], [`Ledger::sync`] and [`Ledger::sync_all`] and stay
/// until [`InMemoryLedger::remove`] or [`InMemoryLedger::evict_idle`] drops
/// them, or until a new key's first operation finds them unused for
/// [`AUTO_EVICT_IDLE`] with full buckets (its shard swept when it doubled,
/// every shard at most every 5 minutes; no background task).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tokio::time::Instant;
/// use tower_llm_limits::budget::ledger::{Costs, InMemoryLedger, Reservation};
/// use tower_llm_limits::budget::Limits;
/// use tower_llm_limits::Dimension;
///
/// // 60 RPM enforced as 1 request per second.
/// let ledger = InMemoryLedger::with_window(Duration::from_secs(1))?;
/// let limits = Limits::new().rpm(60).itpm(100_000).otpm(20_000);
/// let now = Instant::now();
/// let costs = Costs { requests: 1, input_tokens: 10, output_tokens: 10 };
/// assert_eq!(ledger.reserve_at("k", &limits, costs, now), Reservation::Admitted);
/// assert_eq!(
///     ledger.reserve_at("k", &limits, costs, now),
///     Reservation::Wait { retry_in: Duration::from_secs(1), dimension: Dimension::Requests },
/// );
/// # Ok::<(), tower_llm_limits::budget::ledger::InvalidWindow>(())
/// ```
pub struct InMemoryLedger {
    /// At most 60 s: it fits in 64 bits.
    window_nanos: u64,
    /// The instant the buckets' timestamps count from (in nanoseconds: a
    /// bucket's refill is one subtraction).
    epoch: Epoch,
    /// The keys in [`SHARDS`] shards with a lock each: a sweep of idle keys
    /// locks one shard at a time, so no operation waits for work over all
    /// keys.
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    /// When every shard was last swept of idle keys.
    swept_at: Mutex<Instant>,
    /// The fleet's line per key ([`Ledger::reserve_in_line`]): only budgets
    /// that share this ledger through the trait touch it.
    lines: Mutex<HashMap<Box<str>, Vec<Ticket>>>,
}

/// One budget's waiting head in the fleet's line of a key.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    owner: u64,
    /// The head's [`LinePlace::request`].
    request: u64,
    /// When it arrived, on the ledger's clock.
    since: Instant,
    /// The line's count of tickets when it first waited there: the order
    /// among tickets that arrived at the same instant.
    seq: u64,
    /// Its costs, headroom included.
    costs: Costs,
    /// When its wait ends, as last told.
    due: Instant,
    /// When the ticket ends without its head asking again.
    expires: Instant,
    /// How much passing requests delayed it.
    delayed: Duration,
}

/// A wait of a request behind `ticket` (another owner's, older), cut to
/// end [`LINE_RECHECK`] after the ticket's due, when its head asks again
/// and the line moves; for a ticket with costs whose head is late, after as
/// long again as it is late (at least [`LINE_RECHECK`]), so that a process
/// that went away costs a few asks before its ticket expires. A ticket
/// held for a prefix's writer has no costs and no due to wait for.
fn until_line_moves(wait: Duration, ticket: &Ticket, now: Instant) -> Duration {
    let moves = if ticket.due > now {
        (ticket.due - now).saturating_add(LINE_RECHECK)
    } else if ticket.costs != Costs::default() {
        now.saturating_duration_since(ticket.due).max(LINE_RECHECK)
    } else {
        return wait;
    };
    wait.min(moves)
}

/// One shard of the map of keys. A key's state is boxed: the map's spare
/// capacity then costs a pointer per slot, not a whole state.
struct Shard {
    keys: HashMap<Arc<str>, Box<Mutex<KeyState>>>,
    /// The number of keys in this shard that calls for its next sweep.
    next_len: usize,
}

/// How many shards the ledger's map of keys has.
const SHARDS: usize = 16;

/// How long a key of an [`InMemoryLedger`] stays unused (and full) before a
/// new key's first operation forgets it.
pub const AUTO_EVICT_IDLE: Duration = Duration::from_secs(10 * 60);

/// The number of keys in one shard at which the ledger first sweeps it of
/// idle keys (then twice its size after each sweep).
const FIRST_SWEEP_LEN: usize = 64;

fn new_shards() -> Box<[RwLock<Shard>]> {
    (0..SHARDS)
        .map(|_| {
            RwLock::new(Shard {
                keys: HashMap::new(),
                next_len: FIRST_SWEEP_LEN,
            })
        })
        .collect()
}

impl fmt::Debug for InMemoryLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys may be derived from callers' credentials: count them, never print them.
        f.debug_struct("InMemoryLedger")
            .field("window", &self.window())
            .field("keys", &self.len())
            .finish()
    }
}

impl Default for InMemoryLedger {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryLedger {
    /// A ledger enforcing each limit over the whole minute (capacity = limit).
    pub fn new() -> Self {
        InMemoryLedger {
            window_nanos: MINUTE_NANOS,
            shards: new_shards(),
            hasher: RandomState::new(),
            swept_at: Mutex::new(Instant::now()),
            lines: Mutex::new(HashMap::new()),
            epoch: Epoch::now(),
        }
    }

    /// A ledger enforcing each limit over a shorter window: the capacity is the
    /// limit scaled to the window (a 60 RPM limit with a 1 s window has
    /// capacity 1), the refill rate is unchanged (limit / 60 per second).
    ///
    /// A request that costs more than the window's capacity but no more than
    /// the limit per minute (a 5,000-token prompt under 30,000 ITPM enforced
    /// per second, capacity 500) is not refused for ever, which the API does
    /// not do either: it is admitted when the bucket is full, and leaves it
    /// negative until the refill has repaid it, so the rate over a minute
    /// still stays within the limit.
    ///
    /// # Errors
    ///
    /// [`InvalidWindow`] if `window` is zero or longer than 60 s.
    pub fn with_window(window: Duration) -> Result<Self, InvalidWindow> {
        if window.is_zero() || window > MINUTE {
            return Err(InvalidWindow { window });
        }
        Ok(InMemoryLedger {
            // Validated above: at most 60 s.
            window_nanos: u64::try_from(window.as_nanos()).unwrap_or(MINUTE_NANOS),
            shards: new_shards(),
            hasher: RandomState::new(),
            swept_at: Mutex::new(Instant::now()),
            lines: Mutex::new(HashMap::new()),
            epoch: Epoch::now(),
        })
    }

    /// The enforcement window.
    pub fn window(&self) -> Duration {
        // Validated at construction: at most 60 s, so it fits in u64 nanoseconds.
        Duration::from_nanos(self.window_nanos)
    }

    /// The number of keys held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| read(s).keys.len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| read(s).keys.is_empty())
    }

    /// Forgets a key (its buckets and its learned limits). Returns whether it
    /// was held. The next operation on the key starts with full buckets.
    pub fn remove(&self, key: &str) -> bool {
        write(self.shard(key)).keys.remove(key).is_some()
    }

    /// Forgets every key that has not been used for at least `idle` before
    /// `now` and whose buckets are all full again at `now` (no debt pending),
    /// so forgetting it changes nothing for limits that are configured.
    /// Returns how many keys were dropped.
    ///
    /// Limits a dropped key had learned from the server are forgotten too:
    /// they are learned again from the next response's headers, and until
    /// then that dimension is not paced for the key. Choose `idle` long
    /// (minutes) where limits are learned rather than configured.
    pub fn evict_idle(&self, now: Instant, idle: Duration) -> usize {
        let window_nanos = self.window_nanos;
        let now = self.epoch.tick(now);
        // One shard at a time: operations on the others go on meanwhile.
        self.shards
            .iter()
            .map(|s| evict_from(&mut write(s), now, idle, window_nanos))
            .sum()
    }

    fn shard(&self, key: &str) -> &RwLock<Shard> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[i]
    }

    /// After a new key: sweeps its shard of keys idle for
    /// [`AUTO_EVICT_IDLE`] when the shard doubled since its last sweep, and
    /// every shard, one at a time, when half that time passed.
    fn sweep_if_due(&self, now: Instant) {
        let due = {
            let mut at = self.swept_at.lock().unwrap_or_else(|e| e.into_inner());
            let due = now.saturating_duration_since(*at) >= AUTO_EVICT_IDLE / 2;
            if due {
                *at = now;
            }
            due
        };
        if due {
            self.evict_idle(now, AUTO_EVICT_IDLE);
        }
    }

    /// Runs `f` on the key's state, creating the key first if `create`.
    /// Returns `None` if the key is unknown and not created.
    fn with_key<R>(
        &self,
        key: &str,
        create: bool,
        now: Instant,
        f: impl FnOnce(&mut KeyState) -> R,
    ) -> Option<R> {
        let shard = self.shard(key);
        {
            let keys = read(shard);
            if let Some(state) = keys.keys.get(key) {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                return Some(f(&mut state));
            }
        }
        if !create {
            return None;
        }
        let (answer, created) = {
            let mut shard = write(shard);
            let created = !shard.keys.contains_key(key);
            if created && shard.keys.len() + 1 >= shard.next_len {
                let now = self.epoch.tick(now);
                evict_from(&mut shard, now, AUTO_EVICT_IDLE, self.window_nanos);
            }
            let state = shard
                .keys
                .entry(Arc::from(key))
                .or_insert_with(|| Box::new(Mutex::new(KeyState::new(now))));
            let state = state.get_mut().unwrap_or_else(|e| e.into_inner());
            (f(state), created)
        };
        if created {
            self.sweep_if_due(now);
        }
        Some(answer)
    }
}

fn read(shard: &RwLock<Shard>) -> std::sync::RwLockReadGuard<'_, Shard> {
    shard.read().unwrap_or_else(|e| e.into_inner())
}

fn write(shard: &RwLock<Shard>) -> std::sync::RwLockWriteGuard<'_, Shard> {
    shard.write().unwrap_or_else(|e| e.into_inner())
}

/// Drops the keys unused for `idle` before `now` whose buckets are full
/// again; returns how many.
fn evict_from(shard: &mut Shard, now: Tick, idle: Duration, window_nanos: u64) -> usize {
    let keys = &mut shard.keys;
    let before = keys.len();
    keys.retain(|_, state| {
        let state = state.get_mut().unwrap_or_else(|e| e.into_inner());
        let idle_enough = now.at.saturating_duration_since(state.touched) >= idle;
        !(idle_enough && state.is_full(now.nanos, window_nanos))
    });
    let dropped = before - keys.len();
    if dropped > 0 {
        tracing::debug!(dropped, kept = keys.len(), "ledger evicted idle keys");
    }
    // A shard that shrank to a quarter gives its memory back.
    if keys.capacity() > 4 * keys.len().max(16) {
        keys.shrink_to_fit();
    }
    shard.next_len = shard.keys.len().saturating_mul(2).max(FIRST_SWEEP_LEN);
    dropped
}

/// One key's three buckets, in [`Dimension::ALL`] order.
#[derive(Debug, Clone)]
struct KeyState {
    buckets: [Bucket; 3],
    /// The latest instant an operation was applied at (for idle eviction).
    touched: Instant,
}

impl KeyState {
    fn new(now: Instant) -> Self {
        KeyState {
            buckets: [Bucket::default(); 3],
            touched: now,
        }
    }

    fn touch(&mut self, now: Instant) {
        if now > self.touched {
            self.touched = now;
        }
    }

    fn is_full(&self, now: i64, window_nanos: u64) -> bool {
        self.buckets.iter().all(|bucket| match bucket.last_limit {
            None => true,
            Some(limit) => {
                let limit = limit.get();
                let capacity = capacity_units(limit, window_nanos);
                let mut copy = *bucket;
                copy.refill(limit, capacity, now);
                copy.level >= capacity
            }
        })
    }
}

/// One bucket: a level in fixed-point units (see the module docs) and when it
/// was last brought up to date.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Meaningful only once `updated` is set.
    level: i128,
    /// When the level was last brought up to date, in nanoseconds from the
    /// ledger's [`Epoch`]; [`Bucket::NEVER`] until the bucket first had a
    /// limit: it then starts full.
    updated: i64,
    /// The last limit the server reported (`-limit` header; never zero).
    learned: Option<NonZeroU64>,
    /// The limit in force at the last operation (for idle eviction; a zero
    /// limit, whose bucket holds nothing, counts as none).
    last_limit: Option<NonZeroU64>,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            level: 0,
            updated: Bucket::NEVER,
            learned: None,
            last_limit: None,
        }
    }
}

impl Bucket {
    /// `updated` of a bucket that never had a limit (no instant converts
    /// to it: [`Epoch::nanos`] saturates one above).
    const NEVER: i64 = i64::MIN;

    /// The limit in force: the configured one, lowered by a learned one; the
    /// learned one alone; or none. The flag says whether it is the learned one.
    fn limit(&self, configured: Option<u64>) -> Option<(u64, bool)> {
        match (configured, self.learned.map(NonZeroU64::get)) {
            (Some(c), Some(l)) if l < c => Some((l, true)),
            (Some(c), _) => Some((c, false)),
            (None, Some(l)) => Some((l, true)),
            (None, None) => None,
        }
    }

    /// Brings the level up to `now`: adds the refill since the last update,
    /// never above `capacity` (and lowers a level above a capacity that
    /// shrank). A bucket without a level yet starts full. A clock that went
    /// back refills nothing and leaves the timestamp where it was.
    ///
    /// `now` is in nanoseconds from the ledger's [`Epoch`]: the elapsed time
    /// is one subtraction, not a conversion of two instants.
    #[inline]
    fn refill(&mut self, limit: u64, capacity: i128, now: i64) {
        if self.updated == Bucket::NEVER {
            self.level = capacity;
            self.updated = now;
        } else if now > self.updated {
            self.level = if self.level < capacity {
                let elapsed = now.abs_diff(self.updated);
                let added = refill_units(elapsed, limit);
                self.level.saturating_add(added).min(capacity)
            } else {
                // Full (or above a capacity that shrank): cut to it.
                capacity
            };
            self.updated = now;
        } else {
            // A clock that went back refills nothing; a shrunk capacity
            // still cuts the level.
            self.level = self.level.min(capacity);
        }
        self.last_limit = NonZeroU64::new(limit);
    }
}

impl Bucket {
    /// What [`Ledger::sync`] does to one bucket (see [`InMemoryLedger`]'s
    /// docs): learns the reported limit, lowers the level to the server's.
    /// Returns by how many units it lowered the level (0: left alone).
    fn sync(
        &mut self,
        limits: &Limits,
        dimension: Dimension,
        sync: LimitStatus,
        now: i64,
        window_nanos: u64,
    ) -> i128 {
        // A server never advertises a zero limit; taking a garbled header
        // for one would refuse every request for ever.
        if let Some(limit) = sync.limit.and_then(NonZeroU64::new) {
            if self.learned != Some(limit) {
                tracing::debug!(%dimension, limit, "ledger learned a limit from the server");
            }
            self.learned = Some(limit);
        }
        let Some((limit, _)) = self.limit(configured(limits, dimension)) else {
            return 0;
        };
        let capacity = capacity_units(limit, window_nanos);
        self.refill(limit, capacity, now);
        let (server, tolerance) = match (sync.remaining, sync.reset_in) {
            (Some(remaining), _) => {
                let rounded = dimension != Dimension::Requests && remaining % 1_000 == 0;
                let tolerance = if rounded { TOKEN_ROUNDING_TOLERANCE } else { 0 };
                (units(remaining), units(tolerance))
            }
            (None, Some(reset_in)) => {
                // Full at `reset_in` means `capacity - reset_in * rate` now.
                let refill = refill_units(nanos(reset_in), limit);
                let implied = capacity.saturating_sub(refill).max(0);
                let tolerance = refill_units(RESET_PRECISION_NANOS, limit);
                (implied, tolerance)
            }
            (None, None) => return 0,
        };
        if self.level > server.saturating_add(tolerance) {
            tracing::debug!(
                %dimension,
                ledger = to_tokens(self.level),
                server = to_tokens(server),
                "ledger lowered to the server's remaining"
            );
            let lowered = self.level.saturating_sub(server);
            self.level = server;
            return lowered;
        }
        0
    }
}

// The arithmetic: levels are `i128` units (exact, see the module docs), but
// every product below is first tried in 64 bits, where realistic limits,
// costs and delays keep it (a limit times a window of 60 s fits up to 307
// million per minute), and only an overflow takes the 128-bit path; the
// results are the same either way.

/// `elapsed` nanoseconds of refill at `limit` per minute, in units:
/// `elapsed * limit`.
#[inline]
fn refill_units(elapsed: u64, limit: u64) -> i128 {
    match elapsed.checked_mul(limit) {
        Some(units) => i128::from(units),
        // At most (2^64)^2 < 2^128: exact in u128; clamped into i128.
        None => i128::try_from(u128::from(elapsed) * u128::from(limit)).unwrap_or(i128::MAX),
    }
}

/// A duration in nanoseconds, saturating at `u64::MAX` (584 years).
#[inline]
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(u64::from(d.subsec_nanos())))
        .unwrap_or(u64::MAX)
}

#[inline]
fn units(tokens: u64) -> i128 {
    // At most 2^64 * 6e10 < 2^100: exact.
    i128::from(tokens) * UNITS_PER_TOKEN
}

#[inline]
fn capacity_units(limit: u64, window_nanos: u64) -> i128 {
    refill_units(window_nanos, limit)
}

/// The nanoseconds of refill at `limit` per minute that cover `deficit`
/// units, rounded up (`limit > 0`).
#[inline]
fn refill_nanos(deficit: u128, limit: u64) -> u128 {
    match u64::try_from(deficit) {
        Ok(d) => u128::from(d.div_ceil(limit)),
        Err(_) => deficit.div_ceil(u128::from(limit)),
    }
}

fn to_tokens(units: i128) -> f64 {
    units as f64 / UNITS_PER_TOKEN as f64
}

fn index(dimension: Dimension) -> usize {
    match dimension {
        Dimension::Requests => 0,
        Dimension::InputTokens => 1,
        Dimension::OutputTokens => 2,
    }
}

fn configured(limits: &Limits, dimension: Dimension) -> Option<u64> {
    limits.get(dimension)
}

/// `now + nanos`, or an instant decades away where that overflows (a debt
/// so large it will never be repaid in practice).
fn instant_after(now: Instant, nanos: u128) -> Instant {
    let wait = match u64::try_from(nanos) {
        Ok(n) => Duration::from_nanos(n),
        Err(_) => {
            let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
            // The remainder is below 10^9: it fits in u32 and cannot carry.
            let sub = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
            Duration::new(secs, sub)
        }
    };
    now.checked_add(wait)
        .or_else(|| now.checked_add(Duration::from_secs(30 * 365 * 86_400)))
        .or_else(|| now.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(now)
}

impl InMemoryLedger {
    /// [`Ledger::reserve`] at `now` on tokio's clock; `Wait`'s `retry_in` is
    /// counted from `now`.
    pub fn reserve_at(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        now: Instant,
    ) -> Reservation {
        let window_nanos = self.window_nanos;
        let tick = self.epoch.tick(now);
        let answer = self.with_key(key, true, now, |state| {
            state.reserve(limits, costs, tick, window_nanos)
        });
        // `with_key` with `create` always runs the closure.
        answer.unwrap_or(Reservation::Admitted)
    }

    /// [`InMemoryLedger::reserve_in_line_at`], for a request that another
    /// process's writer of its prefix holds if it would be admitted now
    /// (`hold`: the budget's cache hold; see
    /// [`Ledger::reserve_in_line_with_prefixes`]): then nothing is debited,
    /// the line is as it was, a head keeps its ticket (its date and place)
    /// for `hold` plus [`LINE_GRACE`], and the answer is a
    /// [`Reservation::Wait`] of [`PREFIX_WRITING_WAIT`]. For a ledger that
    /// keeps a fleet's prompt-cache view in memory (the simulation's
    /// fleets sharing one ledger), with the same rule as `RedisLedger`.
    #[allow(clippy::too_many_arguments)]
    pub fn reserve_in_line_or_hold_at(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
        hold: Option<Duration>,
        now: Instant,
    ) -> Reservation {
        let Some(hold) = hold else {
            return self.reserve_in_line_at(key, limits, costs, headroom, place, now);
        };
        self.reserve_in_line_or_keep(
            key,
            limits,
            costs,
            headroom,
            place,
            now,
            PREFIX_WRITING_WAIT,
            |line| hold_ticket(line, place, hold, now),
        )
    }

    /// [`InMemoryLedger::reserve_in_line_at`] of a writer at its first ask
    /// that the ledger keeps from going for its writer grace (`grace`; see
    /// [`PrefixIntent::shorter`]) if it would be admitted now: then nothing
    /// is debited, a head keeps its ticket in the fleet's line with its
    /// costs (headroom included) due at the grace's end (the others do not
    /// take its share of the refill meanwhile; the ticket ends
    /// [`LINE_GRACE`] after that), and the answer is a
    /// [`Reservation::Wait`] of `grace`. Any other answer stands. For a
    /// ledger that keeps a fleet's prompt-cache view in memory, with the
    /// same rule as `RedisLedger`.
    #[allow(clippy::too_many_arguments)]
    pub fn reserve_in_line_or_grace_at(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
        grace: Duration,
        now: Instant,
    ) -> Reservation {
        self.reserve_in_line_or_keep(key, limits, costs, headroom, place, now, grace, |line| {
            let due = now.checked_add(grace).unwrap_or(now);
            let with = add_costs(costs, headroom);
            keep_ticket(line, place, with, due, Duration::ZERO, now);
        })
    }

    /// The rule both of the above share: [`InMemoryLedger::reserve_in_line_at`],
    /// except that a request it would admit is not: its reservation is
    /// refunded, the line is put back as it was, `keep` changes the line
    /// for a head (its ticket), and the answer is a [`Reservation::Wait`] of
    /// `wait`. Any other answer stands.
    #[allow(clippy::too_many_arguments)]
    fn reserve_in_line_or_keep(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
        now: Instant,
        wait: Duration,
        keep: impl FnOnce(&mut Vec<Ticket>),
    ) -> Reservation {
        let window_nanos = self.window_nanos;
        let tick = self.epoch.tick(now);
        let answer = self.in_line(key, now, |line| {
            let before = line.clone();
            let answer = self.with_key(key, true, now, |state| {
                let answer =
                    state.reserve_in_line(limits, costs, headroom, place, line, tick, window_nanos);
                if answer == Reservation::Admitted {
                    state.settle(limits, CostDelta::refund(costs), tick, window_nanos);
                }
                answer
            });
            let answer = answer.unwrap_or(Reservation::Admitted);
            if answer == Reservation::Admitted {
                *line = before;
                if place.head {
                    keep(line);
                }
            }
            answer
        });
        match answer {
            Reservation::Admitted => Reservation::Wait {
                retry_in: wait,
                dimension: Dimension::InputTokens,
            },
            other => other,
        }
    }

    /// [`Ledger::reserve_in_line`] at `now` on tokio's clock (see the rule
    /// there); `Wait`'s `retry_in` is counted from `now`.
    pub fn reserve_in_line_at(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
        now: Instant,
    ) -> Reservation {
        let window_nanos = self.window_nanos;
        let tick = self.epoch.tick(now);
        self.in_line(key, now, |line| {
            let answer = self.with_key(key, true, now, |state| {
                state.reserve_in_line(limits, costs, headroom, place, line, tick, window_nanos)
            });
            answer.unwrap_or(Reservation::Admitted)
        })
    }

    /// Runs `f` on `key`'s tickets in the fleet's line, the expired gone,
    /// under the lines' lock; then forgets an emptied line, or keeps a
    /// new one.
    fn in_line<R>(&self, key: &str, now: Instant, f: impl FnOnce(&mut Vec<Ticket>) -> R) -> R {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut empty = Vec::new();
        let line = lines.get_mut(key).unwrap_or(&mut empty);
        line.retain(|t| t.expires > now);
        let answer = f(line);
        if line.is_empty() {
            lines.remove(key);
        } else if !empty.is_empty() {
            lines.insert(Box::from(key), empty);
        }
        answer
    }

    /// [`Ledger::settle`] at `now` on tokio's clock.
    pub fn settle_at(&self, key: &str, limits: &Limits, delta: CostDelta, now: Instant) {
        if delta.is_zero() {
            return;
        }
        let window_nanos = self.window_nanos;
        let tick = self.epoch.tick(now);
        let known = self.with_key(key, false, now, |state| {
            state.settle(limits, delta, tick, window_nanos);
        });
        if known.is_none() {
            tracing::trace!("ledger settle for a key it does not hold: ignored");
        }
    }

    /// [`Ledger::sync`] at `now` on tokio's clock.
    pub fn sync_at(
        &self,
        key: &str,
        limits: &Limits,
        dimension: Dimension,
        sync: LimitStatus,
        now: Instant,
    ) {
        let window_nanos = self.window_nanos;
        let tick = self.epoch.tick(now);
        self.with_key(key, true, now, |state| {
            state.touch(now);
            let _lowered = state.buckets[index(dimension)].sync(
                limits,
                dimension,
                sync,
                tick.nanos,
                window_nanos,
            );
        });
    }

    /// [`Ledger::sync_all`] at `now` on tokio's clock: the three buckets
    /// under one lock. Creates the key only if some status is not empty.
    pub fn sync_all_at(
        &self,
        key: &str,
        limits: &Limits,
        statuses: [LimitStatus; 3],
        now: Instant,
    ) {
        if statuses.iter().all(LimitStatus::is_empty) {
            return;
        }
        let window_nanos = self.window_nanos;
        let tick = self.epoch.tick(now);
        self.with_key(key, true, now, |state| {
            let _lowered = state.sync_all(limits, &statuses, tick, window_nanos);
        });
    }

    /// [`Ledger::state`] at `now` on tokio's clock.
    pub fn state_at(&self, key: &str, limits: &Limits, now: Instant) -> Option<[BucketState; 3]> {
        let window_nanos = self.window_nanos;
        let tick = self.epoch.tick(now);
        self.with_key(key, false, now, |state| {
            state.state(limits, tick.nanos, window_nanos)
        })
    }
}

/// The operations of [`InMemoryLedger`] on one key's buckets, wherever they
/// are kept (in the ledger's map, or packed in a budget's own key entry).
impl KeyState {
    /// [`InMemoryLedger::reserve_at`] on these buckets.
    #[inline]
    fn reserve(
        &mut self,
        limits: &Limits,
        costs: Costs,
        now: Tick,
        window_nanos: u64,
    ) -> Reservation {
        self.reserve_debiting(limits, costs, costs, now, window_nanos)
    }

    /// Admits if `costs` fit (as [`reserve`](Self::reserve) does), and
    /// then debits `debit` (at most `costs` in each dimension) instead.
    fn reserve_debiting(
        &mut self,
        limits: &Limits,
        costs: Costs,
        debit: Costs,
        now: Tick,
        window_nanos: u64,
    ) -> Reservation {
        let state = self;
        state.touch(now.at);
        // First pass: bring each limited bucket up to date and find the
        // longest wait. Nothing is debited unless every dimension fits.
        let mut latest: Option<(Instant, Dimension)> = None;
        for dimension in Dimension::ALL {
            let bucket = &mut state.buckets[index(dimension)];
            let Some((limit, _)) = bucket.limit(configured(limits, dimension)) else {
                continue;
            };
            let capacity = capacity_units(limit, window_nanos);
            bucket.refill(limit, capacity, now.nanos);
            let cost = costs.get(dimension);
            if cost == 0 {
                continue;
            }
            if cost > limit {
                return Reservation::Never {
                    dimension,
                    cost,
                    capacity: limit,
                };
            }
            // A cost above a short window's capacity waits for a full bucket.
            let needed = units(cost).min(capacity);
            if bucket.level < needed {
                let deficit = needed.saturating_sub(bucket.level).unsigned_abs();
                // limit > 0 here (cost > 0 and cost <= limit); round up so
                // that the refill at `at` covers the deficit exactly.
                let wait = refill_nanos(deficit, limit);
                // Counted from the bucket's own timestamp, which is later
                // than `now` if the clock stepped back.
                let from = if bucket.updated > now.nanos {
                    now.epoch.instant(bucket.updated)
                } else {
                    now.at
                };
                let at = instant_after(from, wait);
                if latest.is_none_or(|(latest, _)| at > latest) {
                    latest = Some((at, dimension));
                }
            }
        }
        if let Some((at, dimension)) = latest {
            return Reservation::Wait {
                retry_in: at.saturating_duration_since(now.at),
                dimension,
            };
        }
        for dimension in Dimension::ALL {
            let bucket = &mut state.buckets[index(dimension)];
            if bucket.limit(configured(limits, dimension)).is_some() {
                bucket.level = bucket.level.saturating_sub(units(debit.get(dimension)));
            }
        }
        Reservation::Admitted
    }

    /// [`InMemoryLedger::reserve_in_line_at`] on these buckets, with the
    /// key's line (expired tickets already dropped).
    #[allow(clippy::too_many_arguments)]
    fn reserve_in_line(
        &mut self,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
        line: &mut Vec<Ticket>,
        tick: Tick,
        window_nanos: u64,
    ) -> Reservation {
        let now = tick.at;
        let with = add_costs(costs, headroom);
        let mine = line
            .iter()
            .position(|t| t.owner == place.owner && t.request == place.request);
        // A head asking again keeps its date; a new one is dated by its wait.
        let since = match mine {
            Some(j) => line[j].since,
            None => now.checked_sub(place.waited).unwrap_or(now),
        };
        // In order of arrival; of two that arrived together, the one that
        // waited in the line first.
        let seq = mine.map_or(u64::MAX, |j| line[j].seq);
        let oldest = line
            .iter()
            .enumerate()
            .filter(|(_, t)| t.owner != place.owner && (t.since, t.seq) < (since, seq))
            .min_by_key(|(_, t)| (t.since, t.seq))
            .map(|(i, _)| i);
        let answer = match oldest {
            None => self.reserve_keeping(limits, with, headroom, tick, window_nanos),
            Some(i) => {
                let ticket = line[i];
                let beside = add_costs(with, ticket.costs);
                match self.reserve(limits, beside, tick, window_nanos) {
                    Reservation::Admitted => {
                        let back = CostDelta::refund(add_costs(ticket.costs, headroom));
                        self.settle(limits, back, tick, window_nanos);
                        Reservation::Admitted
                    }
                    refused => {
                        let delay = self.refill_time(limits, costs);
                        let passes = ticket
                            .delayed
                            .checked_add(delay)
                            .is_some_and(|d| d <= LINE_DELAY_BOUND);
                        let alone = if passes {
                            self.reserve_keeping(limits, with, headroom, tick, window_nanos)
                        } else {
                            refused
                        };
                        match (alone, refused) {
                            (Reservation::Admitted, _) => {
                                line[i].delayed = ticket.delayed.saturating_add(delay);
                                Reservation::Admitted
                            }
                            (Reservation::Never { .. }, _) if passes => alone,
                            (_, Reservation::Wait { .. }) => refused,
                            (
                                _,
                                Reservation::Never {
                                    dimension,
                                    capacity,
                                    ..
                                },
                            ) => {
                                if with.get(dimension) > capacity {
                                    Reservation::Never {
                                        dimension,
                                        cost: with.get(dimension),
                                        capacity,
                                    }
                                } else {
                                    // Never beside it: after it.
                                    let after = ticket.due.saturating_duration_since(now);
                                    Reservation::Wait {
                                        retry_in: after
                                            .saturating_add(self.refill_time(limits, with))
                                            .max(Duration::from_millis(1)),
                                        dimension,
                                    }
                                }
                            }
                            (_, Reservation::Admitted) => Reservation::Admitted,
                        }
                    }
                }
            }
        };
        // A wait behind another owner's ticket ends, at the latest, when
        // the line moves (see `Ledger::reserve_in_line`).
        let answer = match (answer, oldest) {
            (
                Reservation::Wait {
                    retry_in,
                    dimension,
                },
                Some(i),
            ) => Reservation::Wait {
                retry_in: until_line_moves(retry_in, &line[i], now),
                dimension,
            },
            (answer, _) => answer,
        };
        if place.head {
            let mine = line.iter().position(|t| t.owner == place.owner);
            match answer {
                Reservation::Wait { retry_in, .. } => {
                    let due = instant_after(now, retry_in.as_nanos());
                    // The same head keeps its place and what it was delayed.
                    let same = mine.map(|j| line[j]);
                    let ticket = Ticket {
                        owner: place.owner,
                        request: place.request,
                        since,
                        seq: same.map_or_else(|| next_seq(line), |t| t.seq),
                        costs: with,
                        due,
                        expires: due.checked_add(LINE_GRACE).unwrap_or(due),
                        delayed: same.map_or(Duration::ZERO, |t| t.delayed),
                    };
                    match mine {
                        Some(j) => line[j] = ticket,
                        None => line.push(ticket),
                    }
                }
                _ => {
                    if let Some(j) = mine {
                        line.swap_remove(j);
                    }
                }
            }
        }
        answer
    }

    /// Reserves `with` (costs and headroom) and gives the headroom back
    /// once admitted.
    fn reserve_keeping(
        &mut self,
        limits: &Limits,
        with: Costs,
        headroom: Costs,
        now: Tick,
        window_nanos: u64,
    ) -> Reservation {
        // The headroom is never debited: in one pass, what reserving
        // `with` and then refunding `headroom` leaves (the refund, at the
        // same instant, can only undo the debit: the level after the
        // refill is at most the capacity).
        let debit = Costs {
            requests: with.requests.saturating_sub(headroom.requests),
            input_tokens: with.input_tokens.saturating_sub(headroom.input_tokens),
            output_tokens: with.output_tokens.saturating_sub(headroom.output_tokens),
        };
        self.reserve_debiting(limits, with, debit, now, window_nanos)
    }

    /// The refill time of `costs` in the tightest dimension with a limit in
    /// force (zero for none).
    fn refill_time(&self, limits: &Limits, costs: Costs) -> Duration {
        Dimension::ALL
            .into_iter()
            .filter_map(|d| {
                let (limit, _) = self.buckets[index(d)].limit(configured(limits, d))?;
                let nanos = refill_nanos(units(costs.get(d)).unsigned_abs(), limit.max(1));
                Some(Duration::from_nanos(
                    u64::try_from(nanos).unwrap_or(u64::MAX),
                ))
            })
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// [`InMemoryLedger::settle_at`] on these buckets.
    fn settle(&mut self, limits: &Limits, delta: CostDelta, now: Tick, window_nanos: u64) {
        let state = self;
        state.touch(now.at);
        for dimension in Dimension::ALL {
            let change = delta.get(dimension);
            if change == 0 {
                continue;
            }
            let bucket = &mut state.buckets[index(dimension)];
            let Some((limit, _)) = bucket.limit(configured(limits, dimension)) else {
                continue;
            };
            let capacity = capacity_units(limit, window_nanos);
            bucket.refill(limit, capacity, now.nanos);
            let amount = i128::from(change).saturating_mul(UNITS_PER_TOKEN);
            if amount > 0 {
                // A charge: may leave the bucket negative (a debt).
                bucket.level = bucket.level.saturating_sub(amount);
            } else {
                // A refund never fills above capacity.
                bucket.level = bucket.level.saturating_sub(amount).min(capacity);
            }
        }
    }

    /// [`InMemoryLedger::sync_all_at`] on these buckets. Returns the input
    /// and output tokens by which it lowered those buckets, rounded down.
    fn sync_all(
        &mut self,
        limits: &Limits,
        statuses: &[LimitStatus; 3],
        now: Tick,
        window_nanos: u64,
    ) -> [u64; 2] {
        let state = self;
        state.touch(now.at);
        let mut lowered_tokens = [0; 2];
        for (dimension, &status) in Dimension::ALL.into_iter().zip(statuses) {
            if !status.is_empty() {
                let lowered = state.buckets[index(dimension)].sync(
                    limits,
                    dimension,
                    status,
                    now.nanos,
                    window_nanos,
                );
                let slot = match dimension {
                    Dimension::Requests => None,
                    Dimension::InputTokens => lowered_tokens.get_mut(0),
                    Dimension::OutputTokens => lowered_tokens.get_mut(1),
                };
                // Mostly nothing was lowered: no 128-bit division then.
                if let Some(slot) = slot.filter(|_| lowered > 0) {
                    *slot = u64::try_from(lowered / UNITS_PER_TOKEN).unwrap_or(0);
                }
            }
        }
        lowered_tokens
    }

    /// [`InMemoryLedger::state_at`] on these buckets.
    fn state(&self, limits: &Limits, now: i64, window_nanos: u64) -> [BucketState; 3] {
        let state = self;
        Dimension::ALL.map(|dimension| {
            let bucket = state.buckets[index(dimension)];
            match bucket.limit(configured(limits, dimension)) {
                None => BucketState {
                    limit: None,
                    learned: false,
                    available: f64::INFINITY,
                    capacity: f64::INFINITY,
                },
                Some((limit, learned)) => {
                    let capacity = capacity_units(limit, window_nanos);
                    let mut copy = bucket;
                    copy.refill(limit, capacity, now);
                    BucketState {
                        limit: Some(limit),
                        learned,
                        available: to_tokens(copy.level),
                        capacity: to_tokens(capacity),
                    }
                }
            }
        })
    }
}

/// Instants as signed nanoseconds from an epoch: 8 bytes where an
/// [`Instant`] takes 16 (exact to the nanosecond within ±292 years).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Epoch(Instant);

impl Epoch {
    /// An epoch at the present instant.
    pub(crate) fn now() -> Self {
        Epoch(Instant::now())
    }

    /// `at` as nanoseconds from the epoch (negative before it).
    #[inline]
    pub(crate) fn nanos(self, at: Instant) -> i64 {
        match at.checked_duration_since(self.0) {
            Some(after) => i64::try_from(nanos(after)).unwrap_or(i64::MAX),
            None => {
                let before = nanos(self.0.saturating_duration_since(at));
                i64::try_from(before).map_or(i64::MIN + 1, |n| -n)
            }
        }
    }

    /// The instant `nanos` from the epoch.
    pub(crate) fn instant(self, nanos: i64) -> Instant {
        let offset = Duration::from_nanos(nanos.unsigned_abs());
        if nanos >= 0 {
            self.0.checked_add(offset).unwrap_or(self.0)
        } else {
            self.0.checked_sub(offset).unwrap_or(self.0)
        }
    }

    /// `at` as the buckets count it: converted once per operation, so that
    /// each bucket's refill is one subtraction of integers.
    #[inline]
    pub(crate) fn tick(self, at: Instant) -> Tick {
        Tick {
            at,
            nanos: self.nanos(at),
            epoch: self,
        }
    }
}

/// One operation's instant, both as an [`Instant`] (for the answers that
/// name one, and idle eviction) and in nanoseconds from the [`Epoch`] the
/// buckets' timestamps count from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tick {
    at: Instant,
    nanos: i64,
    epoch: Epoch,
}

impl Tick {
    /// The instant.
    pub(crate) fn at(&self) -> Instant {
        self.at
    }

    /// The instant in nanoseconds from its epoch.
    pub(crate) fn nanos(&self) -> i64 {
        self.nanos
    }
}

/// One key's three buckets, packed for a budget that keeps its ledger in its
/// own key entries (one map of keys, one key string): 72 bytes inline, and
/// the limits learned from the server boxed once there are any, where an
/// [`InMemoryLedger`]'s map holds 176 bytes per key beside its own copy of
/// the key. The arithmetic is the same: each operation copies the buckets
/// out, runs [`InMemoryLedger`]'s operation on them and copies them back,
/// with a one-minute window (the timestamps are nanoseconds from the
/// budget's epoch either way: nothing is converted).
#[derive(Debug, Default)]
pub(crate) struct PackedBuckets {
    buckets: [PackedBucket; 3],
    learned: Option<Box<[Option<NonZeroU64>; 3]>>,
}

/// A bucket's level (an `i128` in two halves: 8-byte alignment, not 16) and
/// when it was last brought up to date ([`Bucket::NEVER`] before its first
/// limit).
#[derive(Debug, Clone, Copy)]
struct PackedBucket {
    level_lo: u64,
    level_hi: i64,
    updated: i64,
}

impl Default for PackedBucket {
    fn default() -> Self {
        PackedBucket {
            level_lo: 0,
            level_hi: 0,
            updated: Bucket::NEVER,
        }
    }
}

impl PackedBuckets {
    #[inline]
    fn unpack(&self, now: Tick) -> KeyState {
        let learned = self.learned.as_deref().copied().unwrap_or_default();
        KeyState {
            buckets: std::array::from_fn(|i| {
                let p = self.buckets[i];
                Bucket {
                    level: (i128::from(p.level_hi) << 64) | i128::from(p.level_lo),
                    updated: p.updated,
                    learned: learned[i],
                    last_limit: None,
                }
            }),
            touched: now.at,
        }
    }

    /// The levels and timestamps back (the learned limits change only in a
    /// sync: see [`PackedBuckets::pack_learned`]).
    #[inline]
    fn pack(&mut self, state: &KeyState) {
        for (p, b) in self.buckets.iter_mut().zip(&state.buckets) {
            // The two halves of the level: truncation is the point.
            p.level_lo = b.level as u64;
            p.level_hi = (b.level >> 64) as i64;
            p.updated = b.updated;
        }
    }

    fn pack_learned(&mut self, state: &KeyState) {
        let learned = state.buckets.map(|b| b.learned);
        match (&mut self.learned, learned.iter().any(Option::is_some)) {
            (Some(boxed), true) => **boxed = learned,
            (None, true) => self.learned = Some(Box::new(learned)),
            (_, false) => self.learned = None,
        }
    }

    /// [`InMemoryLedger::reserve_at`] on these buckets.
    pub(crate) fn reserve(&mut self, limits: &Limits, costs: Costs, now: Tick) -> Reservation {
        let mut state = self.unpack(now);
        let answer = state.reserve(limits, costs, now, MINUTE_NANOS);
        self.pack(&state);
        answer
    }

    /// [`InMemoryLedger::reserve_at`] of `with` (costs and headroom) on
    /// these buckets, giving the headroom back once admitted, in one pass
    /// (as [`Ledger::reserve_with_headroom`]).
    pub(crate) fn reserve_keeping(
        &mut self,
        limits: &Limits,
        with: Costs,
        headroom: Costs,
        now: Tick,
    ) -> Reservation {
        let mut state = self.unpack(now);
        let answer = state.reserve_keeping(limits, with, headroom, now, MINUTE_NANOS);
        self.pack(&state);
        answer
    }

    /// [`InMemoryLedger::settle_at`] on these buckets.
    pub(crate) fn settle(&mut self, limits: &Limits, delta: CostDelta, now: Tick) {
        if delta.is_zero() {
            return;
        }
        let mut state = self.unpack(now);
        state.settle(limits, delta, now, MINUTE_NANOS);
        self.pack(&state);
    }

    /// [`InMemoryLedger::sync_all_at`] on these buckets. Returns the input
    /// and output tokens by which it lowered those buckets.
    pub(crate) fn sync_all(
        &mut self,
        limits: &Limits,
        statuses: [LimitStatus; 3],
        now: Tick,
    ) -> [u64; 2] {
        if statuses.iter().all(LimitStatus::is_empty) {
            return [0; 2];
        }
        let mut state = self.unpack(now);
        let lowered = state.sync_all(limits, &statuses, now, MINUTE_NANOS);
        self.pack(&state);
        if statuses.iter().any(|s| s.limit.is_some()) {
            self.pack_learned(&state);
        }
        lowered
    }

    /// A response's statuses, then its settlement's `delta`, on these
    /// buckets in one pass (as [`Ledger::settle_and_sync`]): the buckets
    /// are copied out and back once. Returns the input and output tokens by
    /// which the sync lowered those buckets; `delta` is made by
    /// `settlement` from them (the tokens it lowered that the settlement
    /// would charge again are taken off it).
    pub(crate) fn sync_and_settle(
        &mut self,
        limits: &Limits,
        statuses: Option<&[LimitStatus; 3]>,
        now: Tick,
        settlement: impl FnOnce([u64; 2]) -> Option<CostDelta>,
    ) -> [u64; 2] {
        let statuses = statuses.filter(|s| !s.iter().all(LimitStatus::is_empty));
        let mut state = self.unpack(now);
        let lowered = match statuses {
            Some(statuses) => state.sync_all(limits, statuses, now, MINUTE_NANOS),
            None => [0; 2],
        };
        let delta = settlement(lowered).filter(|d| !d.is_zero());
        if let Some(delta) = delta {
            state.settle(limits, delta, now, MINUTE_NANOS);
        }
        if statuses.is_some() || delta.is_some() {
            self.pack(&state);
        }
        if statuses.is_some_and(|s| s.iter().any(|s| s.limit.is_some())) {
            self.pack_learned(&state);
        }
        lowered
    }

    /// [`InMemoryLedger::state_at`] on these buckets.
    pub(crate) fn state(&self, limits: &Limits, now: Tick) -> [BucketState; 3] {
        self.unpack(now).state(limits, now.nanos, MINUTE_NANOS)
    }

    /// Whether every bucket with a limit in force (under `limits`) is full
    /// again at `now`: forgetting the key then changes nothing.
    pub(crate) fn is_full(&self, limits: &Limits, now: Tick) -> bool {
        let mut state = self.unpack(now);
        for dimension in Dimension::ALL {
            let bucket = &mut state.buckets[index(dimension)];
            bucket.last_limit = bucket
                .limit(configured(limits, dimension))
                .and_then(|(limit, _)| NonZeroU64::new(limit));
        }
        state.is_full(now.nanos, MINUTE_NANOS)
    }
}

/// Every operation answers at once ([`LedgerFuture::ready`], no allocation)
/// at `tokio::time::Instant::now()`, and never fails.
impl Ledger for InMemoryLedger {
    #[inline]
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        LedgerFuture::ready(Ok(self.reserve_at(key, limits, costs, Instant::now())))
    }

    #[inline]
    fn reserve_with_clock(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        now: Instant,
    ) -> LedgerFuture<Reservation> {
        LedgerFuture::ready(Ok(self.reserve_at(key, limits, costs, now)))
    }

    #[inline]
    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.settle_at(key, limits, delta, Instant::now());
        LedgerFuture::ready(Ok(()))
    }

    fn sync(
        &self,
        key: &str,
        limits: &Limits,
        dimension: Dimension,
        sync: LimitStatus,
    ) -> LedgerFuture<()> {
        self.sync_at(key, limits, dimension, sync, Instant::now());
        LedgerFuture::ready(Ok(()))
    }

    fn sync_all(&self, key: &str, limits: &Limits, statuses: [LimitStatus; 3]) -> LedgerFuture<()> {
        self.sync_all_at(key, limits, statuses, Instant::now());
        LedgerFuture::ready(Ok(()))
    }

    fn reserve_in_line(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
    ) -> Option<LedgerFuture<Reservation>> {
        let answer = self.reserve_in_line_at(key, limits, costs, headroom, place, Instant::now());
        Some(LedgerFuture::ready(Ok(answer)))
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        LedgerFuture::ready(Ok(self.state_at(key, limits, Instant::now())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(tokens: u64) -> Costs {
        Costs {
            requests: 0,
            input_tokens: tokens,
            output_tokens: 0,
        }
    }

    fn at(owner: u64, request: u64, head: bool) -> LinePlace {
        LinePlace {
            owner,
            head,
            request,
            waited: Duration::ZERO,
        }
    }

    /// 6,000,000 ITPM: 100 tokens per millisecond, 2 s of refill is
    /// 200,000 tokens.
    fn fast() -> Limits {
        Limits::new().itpm(6_000_000)
    }

    /// The fleet's line: a waiting head of one budget is not starved by
    /// another budget's requests. They pass it only beside its costs or
    /// within the head-of-line bound (2 s of its refill in all); its own
    /// budget's requests are not held by its ticket; once admitted, its
    /// ticket is gone.
    #[tokio::test(start_paused = true)]
    async fn the_fleets_line_holds_the_refill_for_the_oldest_head() {
        let ledger = InMemoryLedger::new();
        let (l, none) = (fast(), Costs::default());
        let ask =
            |costs, place| ledger.reserve_in_line_at("k", &l, costs, none, place, Instant::now());
        // Budget 1 leaves 250,000 tokens, then its head needs 280,000: a
        // 300 ms wait.
        assert_eq!(ask(input(5_750_000), at(1, 1, true)), Reservation::Admitted);
        let Reservation::Wait { retry_in, .. } = ask(input(280_000), at(1, 2, true)) else {
            panic!("the head waits");
        };
        assert_eq!(retry_in, Duration::from_millis(300));
        // Budget 2's 250,000 fits alone but not beside it, and would delay it
        // 2.5 s: it waits until it fits after the head (2.8 s), but asks
        // again when the head's wait is over, 20 ms after its due: nothing
        // wakes it when the head goes.
        let Reservation::Wait { retry_in, .. } = ask(input(250_000), at(2, 10, true)) else {
            panic!("held for the head");
        };
        assert_eq!(retry_in, Duration::from_millis(300) + LINE_RECHECK);
        // Two of 100,000 delay it 1 s each: within the bound; a third is not.
        assert_eq!(ask(input(100_000), at(2, 11, false)), Reservation::Admitted);
        assert_eq!(ask(input(100_000), at(2, 12, false)), Reservation::Admitted);
        assert!(matches!(
            ask(input(10_000), at(2, 13, false)),
            Reservation::Wait { .. }
        ));
        // Its own budget's requests are not held by its ticket.
        assert_eq!(ask(input(10_000), at(1, 3, false)), Reservation::Admitted);
        // The plain reservation, outside the line, would have taken it.
        assert_eq!(
            ledger.reserve_at("k", &l, input(10_000), Instant::now()),
            Reservation::Admitted
        );
        ledger.settle_at("k", &l, CostDelta::refund(input(10_000)), Instant::now());
        // The head asks again when its wait is over (its ticket keeps its
        // place), and is admitted when the refill covers it: 280,000 less
        // the 40,000 left, 2.4 s from the start.
        tokio::time::advance(Duration::from_millis(300)).await;
        let Reservation::Wait { retry_in, .. } = ask(input(280_000), at(1, 2, true)) else {
            panic!("still short");
        };
        assert_eq!(retry_in, Duration::from_millis(2_100));
        tokio::time::advance(Duration::from_millis(2_099)).await;
        assert!(matches!(
            ask(input(280_000), at(1, 2, true)),
            Reservation::Wait { .. }
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(ask(input(280_000), at(1, 2, true)), Reservation::Admitted);
        // Its ticket is gone: budget 2's head now goes when it fits.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(ask(input(10_000), at(2, 10, true)), Reservation::Admitted);
        assert!(ledger.lines.lock().map(|l| l.is_empty()).unwrap_or(false));
    }

    /// Tickets are in order of arrival ([`LinePlace::waited`]), then of
    /// first refusal; a head that went away loses its ticket at its wait
    /// plus [`LINE_GRACE`].
    #[tokio::test(start_paused = true)]
    async fn the_line_is_in_order_of_arrival_and_a_lost_head_expires() {
        let ledger = InMemoryLedger::new();
        let (l, none) = (fast(), Costs::default());
        let ask =
            |costs, place| ledger.reserve_in_line_at("k", &l, costs, none, place, Instant::now());
        let wait = |r| matches!(r, Reservation::Wait { .. });
        // Heads of 300,000 tokens: 3 s of refill, above the 2 s bound.
        let head = input(300_000);
        assert_eq!(
            ask(input(6_000_000), at(9, 1, false)),
            Reservation::Admitted
        );
        // Two heads refused at the same instant: the first refused is older.
        assert!(wait(ask(head, at(1, 1, true))));
        assert!(wait(ask(head, at(2, 1, true))));
        // A head that arrived 5 s ago is older than both.
        let early = LinePlace {
            waited: Duration::from_secs(5),
            ..at(3, 1, true)
        };
        assert!(wait(ask(head, early)));
        // At 3 s the refill covers one of them: the oldest.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(wait(ask(head, at(2, 1, true))));
        assert!(wait(ask(head, at(1, 1, true))));
        assert_eq!(ask(head, early), Reservation::Admitted);
        // The other two were told to ask again 20 ms after its due (the
        // line moves then): the first refused is now the oldest, and waits
        // for its refill, until 6 s.
        tokio::time::advance(LINE_RECHECK).await;
        assert!(wait(ask(head, at(1, 1, true))));
        assert!(wait(ask(head, at(2, 1, true))));
        // At 6 s, the first refused of the other two goes first...
        tokio::time::advance(Duration::from_secs(3) - LINE_RECHECK).await;
        assert!(wait(ask(head, at(2, 1, true))));
        // ...but head 1 never asks again: its ticket ends at its wait (6 s)
        // plus the grace, and head 2 goes.
        tokio::time::advance(LINE_GRACE - Duration::from_millis(1)).await;
        assert!(wait(ask(head, at(2, 1, true))));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(ask(head, at(2, 1, true)), Reservation::Admitted);
        assert!(ledger.lines.lock().map(|l| l.is_empty()).unwrap_or(false));
    }

    /// A small deterministic generator, so each seed replays.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn upto(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn maybe(&mut self, value: impl FnOnce(&mut Self) -> u64) -> Option<u64> {
            let value = value(self);
            (self.upto(3) > 0).then_some(value)
        }
    }

    /// A reservation that keeps a headroom free (`reserve_keeping`, one
    /// pass over the buckets) answers and leaves the buckets as reserving
    /// the costs with the headroom and then refunding the headroom does,
    /// from buckets full, partly used, in debt or never used, with limits
    /// configured or not.
    #[test]
    fn keeping_a_headroom_is_reserving_it_and_refunding_it() {
        for seed in 0..200 {
            let mut rng = Lcg(seed);
            let epoch = Epoch::now();
            let start = Instant::now();
            let limits = Limits {
                requests_per_minute: rng.maybe(|g| 1 + g.upto(100)),
                input_tokens_per_minute: rng.maybe(|g| 1_000 + g.upto(100_000)),
                output_tokens_per_minute: rng.maybe(|g| 500 + g.upto(20_000)),
            };
            let (mut one, mut two) = (PackedBuckets::default(), PackedBuckets::default());
            let mut now = start;
            for step in 0..60 {
                now += Duration::from_nanos(rng.upto(3_000_000_000));
                let tick = epoch.tick(now);
                if rng.upto(4) == 0 {
                    // A charge or refund between the reservations.
                    let delta = CostDelta {
                        requests: 0,
                        input_tokens: rng.upto(60_000) as i64 - 20_000,
                        output_tokens: rng.upto(6_000) as i64 - 2_000,
                    };
                    one.settle(&limits, delta, tick);
                    two.settle(&limits, delta, tick);
                }
                let costs = Costs {
                    requests: rng.upto(2),
                    input_tokens: rng.upto(30_000),
                    output_tokens: rng.upto(3_000),
                };
                let headroom = Costs {
                    requests: 0,
                    input_tokens: rng.upto(10_000),
                    output_tokens: 0,
                };
                let with = add_costs(costs, headroom);
                let kept = one.reserve_keeping(&limits, with, headroom, tick);
                let reserved = two.reserve(&limits, with, tick);
                if reserved == Reservation::Admitted {
                    two.settle(&limits, CostDelta::refund(headroom), tick);
                }
                assert_eq!(kept, reserved, "seed {seed} step {step}");
                // The levels, to the unit, and their timestamps.
                assert_eq!(
                    format!("{one:?}"),
                    format!("{two:?}"),
                    "seed {seed} step {step}"
                );
            }
        }
    }

    /// The packed buckets a budget keeps in its own key entries give the
    /// same answers and the same state as an [`InMemoryLedger`] (one-minute
    /// window) over random operations: reservations, charges and refunds,
    /// syncs to reported limits and remainings, time going forward and back,
    /// and instants before the epoch.
    #[test]
    fn packed_buckets_answer_as_the_in_memory_ledger() {
        const KEY: &str = "k";
        for seed in 0..40 {
            let mut rng = Lcg(seed);
            let ledger = InMemoryLedger::new();
            let start = Instant::now();
            // Some instants fall before the epoch: negative offsets.
            let epoch = Epoch(start + Duration::from_secs(2));
            let mut packed = PackedBuckets::default();
            let limits = Limits {
                requests_per_minute: rng.maybe(|g| 1 + g.upto(100)),
                input_tokens_per_minute: rng.maybe(|g| 1_000 + g.upto(100_000)),
                output_tokens_per_minute: rng.maybe(|g| 500 + g.upto(20_000)),
            };
            let mut now = start;
            for step in 0..400 {
                match rng.upto(7) {
                    0 | 1 => {
                        let costs = Costs {
                            requests: rng.upto(2),
                            input_tokens: rng.upto(5_000),
                            output_tokens: rng.upto(2_000),
                        };
                        let a = ledger.reserve_at(KEY, &limits, costs, now);
                        let b = packed.reserve(&limits, costs, epoch.tick(now));
                        assert_eq!(a, b, "seed {seed} step {step}");
                    }
                    2 => {
                        let signed = |r: &mut Lcg, n: u64| r.upto(2 * n) as i64 - n as i64;
                        let delta = CostDelta {
                            requests: signed(&mut rng, 2),
                            input_tokens: signed(&mut rng, 3_000),
                            output_tokens: signed(&mut rng, 1_000),
                        };
                        ledger.settle_at(KEY, &limits, delta, now);
                        if ledger.state_at(KEY, &limits, now).is_some() {
                            packed.settle(&limits, delta, epoch.tick(now));
                        }
                    }
                    3 => {
                        let status = |r: &mut Lcg| LimitStatus {
                            limit: r.maybe(|g| 1 + g.upto(50_000)),
                            remaining: r.maybe(|g| g.upto(50_000)),
                            reset_in: r.maybe(|g| g.upto(60_000)).map(Duration::from_millis),
                        };
                        let statuses = [status(&mut rng), status(&mut rng), status(&mut rng)];
                        ledger.sync_all_at(KEY, &limits, statuses, now);
                        packed.sync_all(&limits, statuses, epoch.tick(now));
                    }
                    4 => now += Duration::from_nanos(rng.upto(5_000_000_000)),
                    5 => {
                        // A response's sync and its settlement in one pass,
                        // as the two operations one after the other.
                        let status = |r: &mut Lcg| LimitStatus {
                            limit: r.maybe(|g| 1 + g.upto(50_000)),
                            remaining: r.maybe(|g| g.upto(50_000)),
                            reset_in: None,
                        };
                        let statuses = [status(&mut rng), status(&mut rng), status(&mut rng)];
                        let delta = CostDelta {
                            requests: 0,
                            input_tokens: rng.upto(2_000) as i64 - 1_000,
                            output_tokens: rng.upto(600) as i64 - 300,
                        };
                        ledger.sync_all_at(KEY, &limits, statuses, now);
                        ledger.settle_at(KEY, &limits, delta, now);
                        if ledger.state_at(KEY, &limits, now).is_some() {
                            let tick = epoch.tick(now);
                            packed.sync_and_settle(&limits, Some(&statuses), tick, |_| Some(delta));
                        }
                    }
                    _ => {
                        let back = Duration::from_nanos(rng.upto(1_000_000_000));
                        now = now.checked_sub(back).unwrap_or(now);
                    }
                }
                if let Some(state) = ledger.state_at(KEY, &limits, now) {
                    assert_eq!(
                        state,
                        packed.state(&limits, epoch.tick(now)),
                        "seed {seed} step {step}"
                    );
                }
            }
            let later = now + Duration::from_secs(600);
            let ledger_full = ledger.with_key(KEY, false, later, |s| {
                s.is_full(ledger.epoch.nanos(later), MINUTE_NANOS)
            });
            if let Some(full) = ledger_full {
                assert_eq!(
                    full,
                    packed.is_full(&limits, epoch.tick(later)),
                    "seed {seed}"
                );
            }
        }
    }

    #[test]
    fn an_epoch_converts_instants_both_ways_exactly() {
        let at = Instant::now() + Duration::from_secs(100);
        let epoch = Epoch(at);
        for offset in [0, 1, 999_999_999, 86_400_000_000_123] {
            let later = at + Duration::from_nanos(offset);
            assert_eq!(epoch.nanos(later), offset as i64);
            assert_eq!(epoch.instant(epoch.nanos(later)), later);
            if let Some(earlier) = at.checked_sub(Duration::from_nanos(offset)) {
                assert_eq!(epoch.nanos(earlier), -(offset as i64));
                assert_eq!(epoch.instant(epoch.nanos(earlier)), earlier);
            }
        }
    }

    #[test]
    fn packed_buckets_are_small() {
        // Three buckets inline, the learned limits boxed.
        assert!(std::mem::size_of::<PackedBuckets>() <= 80);
    }
    use proptest::prelude::*;

    /// Small values (the 64-bit paths) and any values (the 128-bit ones).
    fn value() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..1 << 32, 0u64..1 << 40, any::<u64>()]
    }

    proptest! {
        #[test]
        fn the_64_bit_paths_give_the_exact_128_bit_results(
            elapsed in value(),
            limit in value(),
            deficit in prop_oneof![(0u64..1 << 48).prop_map(u128::from), any::<u128>()],
            secs in value(),
            sub in 0u32..1_000_000_000,
        ) {
            let product = u128::from(elapsed) * u128::from(limit);
            prop_assert_eq!(
                refill_units(elapsed, limit),
                i128::try_from(product).unwrap_or(i128::MAX)
            );
            let d = Duration::new(secs, sub);
            prop_assert_eq!(u128::from(nanos(d)), d.as_nanos().min(u128::from(u64::MAX)));
            let limit = limit.max(1);
            prop_assert_eq!(refill_nanos(deficit, limit), deficit.div_ceil(u128::from(limit)));
            let (a, b) = (elapsed, limit);
            let exact = i128::from(a) - i128::from(b);
            prop_assert_eq!(
                i128::from(diff_saturating(a, b)),
                exact.clamp(i128::from(i64::MIN), i128::from(i64::MAX))
            );
        }
    }
}
