//! The run-time state every clone of one budget shares: the ledger, the
//! estimator, and per budget key a FIFO queue of waiting requests and what the
//! budget learned (output ratio, calibration, fallback estimates).
//!
//! # The wait queue
//!
//! Waiters are served in order of arrival, per key, in the crate's one wait
//! queue ([`WaitQueue`]). Only the head of a queue asks the ledger; it sleeps
//! for the time the ledger named, and is woken early when a settlement,
//! refund or sync frees capacity. When the head is admitted (or gives up, or
//! is dropped) it gives the turn to the next one, so wakeups are about as
//! many as admissions (no thundering herd). A request arriving behind a
//! waiting head may pass it only within a bound on the delay it causes the
//! head (see `admission.rs`), so a large request at the head is never
//! starved. A request that finds its key's queue empty asks the ledger at
//! once, without queueing. With no limits known, one probe goes first and
//! the rest wait for its response head (`admission.rs`).
//!
//! # Locks
//!
//! Each key has its own `Mutex`, found through a short lookup in the map of
//! keys when the request is charged; the map is split into 16 shards with a
//! lock each, and its lock is never held while a ledger operation runs, so
//! one key's operations never wait for another's. Sweeping idle keys and
//! snapshots lock one shard at a time (a sixteenth of the keys), then each
//! key under its own lock: no admission waits for work over all keys.
//! A ledger that answers at once (the in-memory one) is asked under the key's
//! lock; a ledger operation that takes a round trip runs with no lock held,
//! while its request keeps its place at the head of the key's queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::request::Parts;
use tokio::time::{Instant, Sleep};

use super::admission::{self, Probe};
use super::callers::CallerRefusal;
use super::config::{BudgetMode, KeyExtractor, LimitsConfig};
use super::count::{CountTokens, Counter};
use super::keys::{KeyMap, Keyed};
use super::lazy::{LazyQueue, Learners};
use super::learn::LearnRules;
use super::ledger::{
    BucketState, CostDelta, Costs, Epoch, Ledger, LedgerError, LedgerFuture, LinePlace,
    OutputSample, PackedBuckets, PrefixIntent, Reservation, Tick, LINE_GRACE, MAX_QUEUED_HOLD,
};
use super::limits::{Limits, ModelClass, OutputMode};
use super::prefix::{WriteGuard, Writers};
use super::snapshot::{BudgetSnapshot, DimensionSnapshot, KeySnapshot};
use crate::estimate::SlidingQuantile;
use crate::estimate::{Estimate, SharedPromptCache, TokenEstimator};
use crate::headers::{LimitStatus, Resets};
use crate::queue::Removed;
use crate::Dimension;

/// The settings fixed when the layer is built.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) limits: LimitsConfig,
    pub(crate) output_mode: OutputMode,
    pub(crate) mode: BudgetMode,
    pub(crate) enforce: bool,
    pub(crate) buffer_limit: usize,
    pub(crate) key_extractor: Option<KeyExtractor>,
    pub(crate) output_quantile: f64,
    pub(crate) output_ratio_prior: f64,
    pub(crate) output_ratio_min_samples: usize,
    pub(crate) output_ratio_window: usize,
    pub(crate) default_max_tokens: u64,
    /// Which reported limits are learned.
    pub(crate) learn: LearnRules,
    /// How long a key may stay unused before a later new key's admission
    /// forgets it.
    pub(crate) idle_key_eviction: Duration,
    /// The most keys the budget holds.
    pub(crate) max_keys: usize,
    /// The `on_wait`, `on_reject` and `on_settle` callbacks, and metrics.
    pub(crate) hooks: crate::observe::Hooks,
    /// The share of the input-token limit kept free in the bucket.
    pub(crate) input_headroom: f64,
    /// The `count_tokens` mode, if on.
    pub(crate) count_tokens: Option<CountTokens>,
    /// How long a request that could go now holds for a prefix being
    /// written (`prefix.rs`).
    pub(crate) cache_hold: Duration,
}

/// Counters of the decisions taken, for snapshots.
#[derive(Debug, Default)]
struct Counters {
    admitted: AtomicU64,
    waited: AtomicU64,
    rejected: AtomicU64,
    too_large: AtomicU64,
    settled: AtomicU64,
    refunded_429: AtomicU64,
    refunded_unsent: AtomicU64,
    wakeups: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the budget keeps per key: 160 bytes, the buckets of its own ledger
/// included, until the key has more than two samples of its output ratio,
/// limits reported by the server or waiters, when the parts that need them
/// are allocated.
#[derive(Debug)]
struct KeyState {
    /// The key's buckets when the budget keeps its own ledger (see
    /// [`Shared::own`]); unused with a ledger of the user's.
    buckets: PackedBuckets,
    /// When the key was last used, in nanoseconds from [`Shared::epoch`].
    last_used: i64,
    /// Allocated by the first waiter, freed by the last.
    queue: LazyQueue,
    /// Created at the third sample (its window is allocated up front), so a
    /// key that got few answers with usage stays small.
    output_ratio: Option<Box<RatioSamples>>,
    /// Saturating: a key estimated over 4 billion times reports that many.
    estimates: u32,
    fallback_estimates: u32,
    /// Requests admitted on an estimate whose input the server has not yet
    /// reported: the input headroom covers their errors.
    inexact: u32,
    /// The last estimate's calibration factor (NaN: none yet).
    calibration: f32,
    /// Input tokens a header sync took off the key's own bucket while
    /// requests admitted on an estimate were in flight: the server had
    /// already charged what those estimates missed, so their settlements
    /// do not charge it again, up to this many ([`Shared::apply`]).
    absorbed: u32,
    /// Requests in flight that reserved an expected output (realtime
    /// rule): the server charges their output as it is produced, before
    /// their settlement says how much it was.
    output_pending: u32,
    /// Output tokens a header sync took off the key's own bucket while
    /// such requests were in flight: the output the server had already
    /// charged them beyond their reservations, which their settlements do
    /// not charge again, up to this many.
    absorbed_output: u32,
    /// The first two outputs (tokens, `max_tokens`), kept inline until the
    /// windows are created (`max_tokens` 0: none).
    early_outputs: [(u32, u32); 2],
    /// The limits learned from the server's headers, per dimension
    /// (allocated at the first reported limit).
    learners: Learners,
    /// The model class: the key's configured limits are its class's.
    class: ModelClass,
    /// Unknown limits: whether a probe is needed or in flight.
    probe: Probe,
    /// The output-token rule learned from the probe's response, if any.
    output_rule: Option<OutputMode>,
    /// Whether the ledger answered this key's last reservation at once
    /// (only then may a request pass the head: asking a ledger a round
    /// trip away for every arrival would load it).
    ledger_at_once: bool,
}

/// The recent outputs of a key, as `output_tokens / max_tokens` ratios
/// and as tokens, and how many were seen.
#[derive(Debug)]
struct RatioSamples {
    window: SlidingQuantile,
    tokens: SlidingQuantile,
    seen: u64,
    /// Of `seen`, this budget's own answers.
    own: u64,
    /// The position in the ledger's shared outputs to read from next
    /// ([`Ledger::outputs_learned`]; 0 until the fleet's first output).
    fleet_position: u64,
}

impl KeyState {
    fn new(class: ModelClass, limits: &Limits, last_used: i64) -> Self {
        Self {
            buckets: PackedBuckets::default(),
            last_used,
            queue: LazyQueue::default(),
            output_ratio: None,
            estimates: 0,
            fallback_estimates: 0,
            inexact: 0,
            calibration: f32::NAN,
            absorbed: 0,
            output_pending: 0,
            absorbed_output: 0,
            early_outputs: [(0, 0); 2],
            learners: Learners::default(),
            class,
            probe: Probe::for_limits(limits),
            output_rule: None,
            ledger_at_once: false,
        }
    }

    /// The expected `output_tokens / max_tokens`: the prior until
    /// `settings.output_ratio_min_samples` responses were seen, then the
    /// `settings.output_quantile` of the recent ratios.
    fn expected_ratio(&self, settings: &Settings) -> f64 {
        let (q, prior) = (settings.output_quantile, settings.output_ratio_prior);
        // Without a window, at most two ratios were seen (inline), fewer
        // than the samples needed (see `push_ratio`).
        let Some(samples) = self.output_ratio.as_ref() else {
            return prior;
        };
        if samples.seen < settings.output_ratio_min_samples as u64 {
            return prior;
        }
        samples
            .window
            .quantile(q)
            .filter(|r| r.is_finite())
            .map_or(prior, |r| r.clamp(0.0, 1.0))
    }

    /// Answers with usage (and a `max_tokens`) the key has settled in this
    /// budget, as its output samples count them (the outputs other budgets
    /// on a ledger given to this one settled are not its answers: they do
    /// not calibrate its estimator).
    fn answers_seen(&self) -> u64 {
        match self.output_ratio.as_ref() {
            Some(samples) => samples.own,
            None => self.early_outputs.iter().filter(|s| s.1 > 0).count() as u64,
        }
    }

    /// The output to reserve for a request of `max_tokens` in realtime
    /// mode, in tokens: the prior share of `max_tokens` until
    /// `settings.output_ratio_min_samples` responses were seen, then the
    /// smaller of two learned bounds, each the `settings.output_quantile`
    /// of its window: the ratio's share of `max_tokens`, and the output in
    /// tokens. Answers are often bounded by what they say rather than by
    /// `max_tokens` (a 300-token answer under a `max_tokens` of 4,096),
    /// and where they are not, the ratio is the tighter bound.
    fn expected_output(&self, settings: &Settings, max_tokens: u64) -> f64 {
        let by_ratio = max_tokens as f64 * self.expected_ratio(settings);
        let Some(samples) = self.output_ratio.as_ref() else {
            return by_ratio;
        };
        if samples.seen < settings.output_ratio_min_samples as u64 {
            return by_ratio;
        }
        match samples
            .tokens
            .quantile(settings.output_quantile)
            .filter(|t| t.is_finite())
        {
            Some(tokens) => by_ratio.min(tokens.max(0.0)),
            None => by_ratio,
        }
    }

    /// Learns an answer's output: `output` tokens under a `max_tokens` of
    /// `max_tokens` (above 0). The first two are kept inline while more
    /// than two samples are needed before they count; the windows are
    /// created with the third (the two moved into them).
    fn push_output(&mut self, output: u64, max_tokens: u64, settings: &Settings) {
        self.push_sample(output, max_tokens, settings, true);
    }

    /// Learns an output another budget on a ledger given to this one
    /// settled ([`Ledger::outputs_learned`]): as [`push_output`](Self::push_output),
    /// but not as this budget's answer (the windows are created at once,
    /// so that the inline outputs stay this budget's own).
    fn push_fleet_output(&mut self, output: u64, max_tokens: u64, settings: &Settings) {
        self.push_sample(output, max_tokens, settings, false);
    }

    fn push_sample(&mut self, output: u64, max_tokens: u64, settings: &Settings, own: bool) {
        if max_tokens == 0 {
            return;
        }
        let small = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let (output, max_tokens) = (small(output.min(max_tokens)), small(max_tokens));
        if own && self.output_ratio.is_none() && settings.output_ratio_min_samples > 2 {
            if let Some(slot) = self.early_outputs.iter_mut().find(|s| s.1 == 0) {
                *slot = (output, max_tokens);
                return;
            }
        }
        let early = std::mem::take(&mut self.early_outputs);
        let samples = self.output_ratio.get_or_insert_with(|| {
            Box::new(RatioSamples {
                window: SlidingQuantile::new(settings.output_ratio_window),
                tokens: SlidingQuantile::new(settings.output_ratio_window),
                seen: 0,
                own: 0,
                fleet_position: 0,
            })
        });
        for (output, max_tokens, own) in early
            .into_iter()
            .filter(|s| s.1 > 0)
            .map(|(o, m)| (o, m, true))
            .chain(std::iter::once((output, max_tokens, own)))
        {
            samples
                .window
                .push(f64::from(output) / f64::from(max_tokens));
            samples.tokens.push(f64::from(output));
            samples.seen += 1;
            samples.own += u64::from(own);
        }
    }

    /// Gives the head of the queue its turn to ask; returns its waker (to
    /// wake once the key's lock is released) if it waits for one.
    fn notify_head(&mut self, counters: &Counters) -> Option<Waker> {
        let waker = self.queue.notify_next();
        if waker.is_some() {
            bump(&counters.wakeups);
        }
        waker
    }
}

/// What a sync's lowering of a bucket by `lowered` tokens leaves to absorb:
/// added to `absorbed` while `pending` requests whose true cost the server
/// charges before their settlement are in flight; else nothing (the
/// lowering is another client's use of the key, or rounding).
fn carry(absorbed: u32, pending: u32, lowered: u64) -> u32 {
    if pending == 0 {
        0
    } else {
        absorbed.saturating_add(u32::try_from(lowered).unwrap_or(u32::MAX))
    }
}

/// Answers a key settles before its input headroom is the configured share:
/// until then it is at least [`COLD_HEADROOM`] (the estimator's calibration
/// needs as many samples of a model before it corrects it).
const COLD_ANSWERS: u64 = 5;

/// The least input headroom, as a share of the limit, before a key's first
/// [`COLD_ANSWERS`] answers, when the budget keeps one at all (the preset
/// keeps 2 % after them).
const COLD_HEADROOM: f64 = 0.1;

/// The share of a request's own estimate it may miss by before the key's
/// first [`COLD_ANSWERS`] answers calibrate the estimator: when no other
/// estimate of the key is in flight, the cold headroom is at most this
/// share of the request's input (an uncalibrated estimate of a tokenizer
/// the estimator does not know missed by up to 27 % at the p90).
const COLD_ERROR: f64 = 0.5;

/// Takes what a settlement's extra `debit` finds in `absorbed` off both,
/// while `pending` requests are in flight (see [`carry`]).
fn use_absorbed(pending: u32, absorbed: &mut u32, debit: &mut i64) {
    if *debit > 0 && pending > 0 && *absorbed > 0 {
        let taken = (*debit).min(i64::from(*absorbed));
        *debit -= taken;
        *absorbed -= u32::try_from(taken).unwrap_or(*absorbed);
    }
}

/// One key: its name, and its state behind its own lock.
#[derive(Debug)]
struct KeyCell {
    key: Box<str>,
    state: Mutex<KeyState>,
}

impl Keyed for KeyCell {
    fn key(&self) -> &str {
        &self.key
    }
}

/// A new key's entry.
fn new_cell(key: &str, class: ModelClass, limits: &Limits, last_used: i64) -> KeyCell {
    KeyCell {
        key: Box::from(key),
        state: Mutex::new(KeyState::new(class, limits, last_used)),
    }
}

/// Whether a key nothing else holds stays: used within `idle` before `now`,
/// with a request waiting, or, when the budget keeps its own ledger
/// (`own`: its configured limits), with buckets not full again. (A key held
/// elsewhere, by a charge in flight, always stays: see [`KeyMap`].)
fn key_stays(
    cell: &KeyCell,
    (now, epoch): (Instant, Epoch),
    idle: Duration,
    own: Option<&LimitsConfig>,
) -> bool {
    let ks = lock_key(cell);
    let now = epoch.tick(now);
    let since = now.nanos().saturating_sub(ks.last_used);
    let recent = u128::try_from(since).map_or(true, |n| n < idle.as_nanos());
    !ks.queue.is_empty()
        || recent
        || own.is_some_and(|config| !ks.buckets.is_full(&config.limits_for(ks.class), now))
}

fn lock_key(cell: &KeyCell) -> MutexGuard<'_, KeyState> {
    // Every critical section leaves the state consistent before anything
    // that could panic, so a poisoned lock still holds a valid state.
    cell.state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

/// The state shared by every clone of one budget.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    /// The ledger: the user's, or with [`Shared::own`] a view of the
    /// buckets kept in the budget's own key entries ([`OwnLedger`]).
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) estimator: Arc<dyn TokenEstimator>,
    /// The keys, sharded: no admission waits for work over all keys.
    keys: Arc<KeyMap<KeyCell>>,
    /// The hash of each class's name in [`Shared::keys`] (the key of a
    /// request without a caller), by [`ModelClass::ALL`]'s order: computed
    /// once, not per request.
    class_hashes: [u64; ModelClass::ALL.len()],
    /// Whether the budget keeps its own in-memory ledger inside its key
    /// entries (no ledger was given): one map of keys, one copy of each
    /// key's name, and the ledger's operations done under the key's lock.
    own: bool,
    /// The instant the key entries' times count from.
    epoch: Epoch,
    /// The `count_tokens` mode, if on.
    pub(crate) counter: Option<Counter>,
    counters: Counters,
    /// The prompt-cache prefixes being written by requests in flight.
    pub(crate) writers: Arc<Writers>,
    /// The prompt-cache view the ledger shares with other processes
    /// ([`Ledger::prompt_cache`]): waiting requests read the prefixes it
    /// says are cached, and responses tell the ledger the prefixes they
    /// wrote (`fleet.rs`).
    pub(crate) prompt_cache: Option<Arc<dyn SharedPromptCache>>,
    /// This budget's id in the fleet's line of a shared ledger
    /// ([`Ledger::reserve_in_line`]).
    line_owner: u64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

/// What one request reserved, and what settlement needs to correct it.
#[derive(Debug)]
pub(crate) struct Charge {
    cell: Arc<KeyCell>,
    pub(crate) limits: Limits,
    pub(crate) cache_reads_count: bool,
    pub(crate) costs: Costs,
    pub(crate) estimate: Estimate,
    /// Whether this request is its key's probe of unknown limits.
    probe: bool,
    /// The prompt-cache prefixes this request writes, while in flight
    /// (cache-aware admission, `prefix.rs`). Boxed: most requests write
    /// none, and every request waiting in an inner queue holds its charge
    /// inline (56 bytes inline, 8 boxed).
    pub(crate) writing: Option<Box<WriteGuard>>,
    /// The prefix tokens charged as a read by cache-aware admission.
    pub(crate) prefix_read: u64,
    /// That prefix's size as the server counted it, when its writer's
    /// answer said.
    pub(crate) prefix_served: Option<u64>,
    /// That prefix's hash.
    pub(crate) prefix_hash: u64,
    /// That prefix was read from what other processes told the fleet
    /// (`fleet.rs`), not through this budget's writers.
    pub(crate) prefix_from_fleet: bool,
    /// The estimated tokens of the longest pending prefix this request
    /// held for while another process wrote it (`prefix.rs`): it holds for
    /// another process's writer of a prefix no longer than that again.
    pub(crate) fleet_held: u64,
    /// It asked a fleet's ledger as the head of its line: the writer grace
    /// is for its first ask only (`prefix::fleet_intent`).
    pub(crate) fleet_asked: bool,
    /// Admitted on an estimate, counted in its key's `inexact` until the
    /// server reports its input.
    inexact: bool,
    /// Admitted with an expected output (realtime rule), counted in its
    /// key's `output_pending` until its settlement.
    output_pending: bool,
    /// Too large by its estimate: its input reservation was capped to the
    /// whole bucket until a count says what it is (it does not ask while
    /// its count is in flight; admitted uncounted, it is refused as too
    /// large).
    pub(crate) input_capped: bool,
    /// The `count_tokens` answer charged, if any (`count.rs`).
    pub(crate) counted: Option<u64>,
}

impl Charge {
    /// The budget key (`[caller/]class`) the request is charged to.
    pub(crate) fn key(&self) -> &str {
        &self.cell.key
    }

    /// Whether the input charged is what the server will count: a
    /// `count_tokens` answer, less a cache read the server sized (or none).
    fn input_exact(&self) -> bool {
        let reads = self.prefix_read.max(self.estimate.cache_read_tokens) > 0;
        let read_exact = !reads
            || super::count::served_read(&self.estimate, (self.prefix_read, self.prefix_served))
                .is_some();
        self.counted.is_some() && (read_exact || self.cache_reads_count)
    }

    /// Marks what [`Shared::count_in_flight`] counted: `(inexact,
    /// output_pending)`.
    fn counted_in_flight(&mut self, (inexact, output): (bool, bool)) {
        self.inexact |= inexact;
        self.output_pending |= output;
    }

    /// The server reported this request's input (or charged nothing): it
    /// no longer counts among its key's estimates in flight.
    pub(crate) fn release_inexact(&mut self) {
        if std::mem::take(&mut self.inexact) {
            let mut ks = lock_key(&self.cell);
            ks.inexact = ks.inexact.saturating_sub(1);
        }
    }

    /// The request's output is settled (or never will be): it no longer
    /// counts among its key's outputs in flight.
    pub(crate) fn release_output(&mut self) {
        if std::mem::take(&mut self.output_pending) {
            let mut ks = lock_key(&self.cell);
            ks.output_pending = ks.output_pending.saturating_sub(1);
            if ks.output_pending == 0 {
                ks.absorbed_output = 0;
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release_inexact();
        self.release_output();
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Denied {
    Exceeded {
        retry_in: Duration,
        dimension: Dimension,
    },
    TooLarge {
        dimension: Dimension,
        cost: u64,
        limit: u64,
    },
}

impl From<Denied> for crate::Error {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Exceeded {
                retry_in,
                dimension,
            } => crate::Error::BudgetExceeded {
                retry_in,
                dimension,
            },
            Denied::TooLarge {
                dimension,
                cost,
                limit,
            } => crate::Error::RequestTooLarge {
                dimension,
                cost,
                limit,
            },
        }
    }
}

/// Why a request was not admitted: a decision, or a ledger that failed.
#[derive(Debug)]
pub(crate) enum Refusal {
    Denied(Denied),
    Ledger(LedgerError),
}

/// A place in a key's queue; dropping it gives the place back (and the turn
/// to the next waiter if it was the head).
#[derive(Debug)]
struct Place {
    shared: Arc<Shared>,
    cell: Arc<KeyCell>,
    /// `None` once the place was left.
    id: Option<usize>,
}

impl Place {
    fn id(&self) -> usize {
        self.id.unwrap_or(usize::MAX)
    }

    /// Leaves the line under the key's lock (the caller holds it); returns
    /// the waker of the new head if the turn passed on.
    fn leave(mut self, ks: &mut KeyState) -> Option<Waker> {
        let id = self.id.take()?;
        match ks.queue.remove(id) {
            Removed::Waiting { was_next: true } => ks.notify_head(&self.shared.counters),
            _ => None,
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let mut ks = lock_key(&self.cell);
        let next = match ks.queue.remove(id) {
            Removed::Waiting { was_next } => {
                tracing::debug!(
                    key = super::callers::logged_key(&self.cell.key),
                    "budget: waiter cancelled, place given back"
                );
                if was_next {
                    ks.notify_head(&self.shared.counters)
                } else {
                    None
                }
            }
            _ => None,
        };
        drop(ks);
        wake(next);
    }
}

/// A reservation asked of a ledger that answers after a round trip.
///
/// # Cancellation
///
/// Dropped before its answer came, it cannot know whether the ledger debited
/// the costs: the operation is finished on the current tokio runtime, and an
/// admission is refunded at once.
struct Asking {
    fut: Option<LedgerFuture<Reservation>>,
    shared: Arc<Shared>,
    cell: Arc<KeyCell>,
    limits: Limits,
    costs: Costs,
    /// The request's charge when it asked (`costs` less any headroom).
    charged: Costs,
}

impl std::fmt::Debug for Asking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asking")
            .field("key", &self.cell.key)
            .finish()
    }
}

impl Asking {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Reservation, LedgerError>> {
        let Some(fut) = self.fut.as_mut() else {
            return Poll::Pending;
        };
        let answer = std::task::ready!(Pin::new(fut).poll(cx));
        self.fut = None;
        Poll::Ready(answer)
    }
}

impl Drop for Asking {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else { return };
        let (shared, cell) = (Arc::clone(&self.shared), Arc::clone(&self.cell));
        let (limits, costs) = (self.limits, self.costs);
        tracing::debug!(
            key = super::callers::logged_key(&cell.key),
            "budget: dropped while the ledger answered; refunded if admitted"
        );
        spawn_ledger_op(async move {
            if let Reservation::Admitted = fut.await? {
                shared
                    .ledger
                    .settle(&cell.key, &limits, CostDelta::refund(costs))
                    .await?;
                // Capacity came back: the head's turn.
                let next = lock_key(&cell).notify_head(&shared.counters);
                wake(next);
            }
            Ok(())
        });
    }
}

/// Runs a ledger operation that did not answer at once to its end, on the
/// current tokio runtime; its failure is logged. Without a runtime the
/// operation is dropped (and logged).
fn spawn_ledger_op(op: impl Future<Output = Result<(), LedgerError>> + Send + 'static) {
    let run = async move {
        if let Err(e) = op.await {
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "budget: ledger operation failed");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(run);
        }
        Err(_) => {
            tracing::warn!("budget: no tokio runtime to finish a ledger operation; dropped");
        }
    }
}

/// The admission progress of one request (lives in its response future).
#[derive(Debug, Default)]
pub(crate) struct Admission {
    place: Option<Place>,
    /// Boxed: only a ledger that answers over a round trip (Redis) makes
    /// one, and every waiting request holds this field inline.
    asking: Option<Box<Asking>>,
    sleep: Option<Pin<Box<Sleep>>>,
    started: Option<Instant>,
    /// Set while this request holds its key's probe role and is not yet
    /// admitted: dropping the admission hands the role on.
    probe: Option<ProbeRole>,
    /// Held behind a probe: the output reservation is recomputed (the
    /// probe may have taught the output rule) before asking again.
    held_by_probe: bool,
    /// The input tokens of headroom added to the last question to the
    /// ledger, given back once admitted.
    headroom: u64,
    /// Set when the request fits only without the headroom.
    no_headroom: bool,
    /// Set when the ledger kept the headroom itself (nothing to give back).
    headroom_kept: bool,
    /// This request's id in the fleet's line (0 until it first asks there).
    line_id: u64,
    /// Its writes may be marked as queued for the fleet
    /// ([`Ledger::prefixes_queued`]): cleared if it leaves unadmitted.
    queued: bool,
    /// The question in flight was its first on a fleet's ledger, with
    /// shorter prefixes another process may be about to write
    /// ([`PrefixIntent::shorter`]).
    graced: bool,
    /// Answered the ledger's writer grace: it does not ask again before its
    /// sleep's deadline, the grace's end, even if woken
    /// (`prefix::fleet_intent`).
    in_grace: bool,
    /// Its queued marker's renewal while it holds (boxed: made only for a
    /// request marked as queued for a fleet).
    renewal: Option<Box<Renewal>>,
}

/// When a request's queued marker lapses, and its renewal while the request
/// holds in line ([`Shared::renew_queued`]).
#[derive(Debug)]
struct Renewal {
    /// When the marker it last wrote lapses at the earliest (the ledger may
    /// keep it longer).
    until: Instant,
    /// When it first held in line for a longer prefix being written, or
    /// waited behind another in its process's line: it renews its marker
    /// while it does, until [`MAX_QUEUED_HOLD`] after.
    held_since: Option<Instant>,
    /// Wakes a holding request to renew its marker before it lapses.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Admission {
    /// Its writes were marked as queued, the marker lapsing at `until` at
    /// the earliest.
    fn marked_until(&mut self, until: Instant) {
        self.queued = true;
        match self.renewal.as_mut() {
            Some(r) => r.until = until,
            None => {
                self.renewal = Some(Box::new(Renewal {
                    until,
                    held_since: None,
                    timer: None,
                }));
            }
        }
    }
}

/// A request that leaves the line unadmitted (cancelled, out of time)
/// takes its writes' queued markers with it.
impl Drop for Admission {
    fn drop(&mut self) {
        if !std::mem::take(&mut self.queued) {
            return;
        }
        if let Some(place) = &self.place {
            place
                .shared
                .ledger
                .prefixes_dequeued(&place.cell.key, self.line_id);
        }
    }
}

/// A new request id for the fleet's line, unique in the process (from 1).
fn next_line_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Admission {
    /// Whether a reservation is in flight (the charge's costs must not
    /// change meanwhile).
    pub(crate) fn is_asking(&self) -> bool {
        self.asking.is_some()
    }

    /// Whether the request has waited (refused once, or queued behind
    /// another).
    pub(crate) fn has_waited(&self) -> bool {
        self.started.is_some()
    }

    /// Whether the request waits at its queue's head for the time the ledger
    /// named (the requests behind it wait for their turn, with no timer).
    pub(crate) fn waits_at_head(&self) -> bool {
        self.sleep.is_some() && self.place.is_some()
    }

    /// Whether the request waits in its queue behind another, for its
    /// turn (no timer of its own, no question in flight).
    pub(crate) fn waits_behind(&self) -> bool {
        self.place.is_some() && self.sleep.is_none() && self.asking.is_none()
    }
}

/// The probe role of a request not yet admitted.
#[derive(Debug)]
struct ProbeRole {
    shared: Arc<Shared>,
    cell: Arc<KeyCell>,
    /// False once the request was admitted (the role passed to its charge).
    armed: bool,
}

impl Drop for ProbeRole {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut ks = lock_key(&self.cell);
        if ks.probe != Probe::InFlight {
            return;
        }
        ks.probe = Probe::Needed;
        let next = ks.notify_head(&self.shared.counters);
        drop(ks);
        wake(next);
    }
}

/// Who asks, and when (one clock reading per question).
struct Turn<'a> {
    waker: &'a Waker,
    now: Instant,
}

enum Step {
    Admitted,
    Refused(Refusal),
    /// Waiting in line for the turn.
    Queued,
    /// A ledger answer is on its way.
    Asking,
    /// Ask again now (a turn came while asking).
    Again,
    /// Ask again now with the output reservation capped to this.
    Capped(u64),
    /// Ask again now with the input reservation capped to this (the whole
    /// bucket), until a `count_tokens` answer says what it really is.
    CappedInput(u64),
    Sleep(Instant),
}

impl Shared {
    /// The budget's state, over `ledger`, or over a ledger of its own kept
    /// inside its key entries if `None`.
    pub(crate) fn new(
        settings: Settings,
        ledger: Option<Arc<dyn Ledger>>,
        estimator: Arc<dyn TokenEstimator>,
    ) -> Self {
        let keys = Arc::new(KeyMap::new());
        let class_hashes = ModelClass::ALL.map(|class| keys.hash(class.as_str()));
        let epoch = Epoch::now();
        let own = ledger.is_none();
        let ledger = ledger.unwrap_or_else(|| {
            Arc::new(OwnLedger {
                keys: Arc::clone(&keys),
                limits: settings.limits.clone(),
                max_keys: settings.max_keys,
                idle: settings.idle_key_eviction,
                epoch,
            })
        });
        let prompt_cache = ledger.prompt_cache();
        // Another process's writers are held for through the ledger where
        // it shares the fleet's prompt-cache view and the budget holds.
        let fleet_writes =
            (prompt_cache.is_some() && !settings.cache_hold.is_zero()).then(|| Arc::clone(&ledger));
        Self {
            prompt_cache,
            counter: settings.count_tokens.map(Counter::new),
            settings,
            ledger,
            estimator,
            keys,
            class_hashes,
            own,
            epoch,
            counters: Counters::default(),
            writers: Arc::new(Writers::new(fleet_writes)),
            line_owner: if own { 0 } else { LinePlace::new_owner() },
        }
    }

    /// The caller a request is charged to, from its head, or why it is
    /// refused (enforce mode refuses a request with no caller).
    pub(crate) fn caller(&self, parts: &Parts) -> Result<Option<String>, CallerRefusal> {
        let caller = match &self.settings.key_extractor {
            Some(k) => k.key(parts)?,
            None => None,
        };
        if caller.is_none() && self.settings.enforce {
            return Err(CallerRefusal::MissingKey);
        }
        Ok(caller)
    }

    /// The key's name and state, created if new: one short lookup under the
    /// lock of the key's shard of the map. A new key sweeps idle keys out
    /// when its shard doubled since its last sweep, or every shard (one at a
    /// time) when half the idle time passed: amortized O(1) per new key, and
    /// no background task.
    /// `None` if the key is new and the budget holds its most keys, none idle.
    ///
    /// A key without a caller is its class's name, one of a few: its hash
    /// was computed once, when the budget was made ([`Shared::class_hashes`]).
    fn key_cell(
        &self,
        caller: Option<&str>,
        class: ModelClass,
        limits: &Limits,
    ) -> Option<Arc<KeyCell>> {
        let name = class.as_str();
        let lookup;
        let (lookup, hash) = match caller {
            None => {
                let hash = self.class_hashes.get(class as usize).copied();
                (name, hash.unwrap_or_else(|| self.keys.hash(name)))
            }
            Some(caller) => {
                lookup = format!("{caller}/{name}");
                (lookup.as_str(), self.keys.hash(&lookup))
            }
        };
        let idle = self.settings.idle_key_eviction;
        // The clock is read only for a new key (or a sweep), not for every
        // request on a known one.
        let now = std::cell::OnceCell::new();
        let now = || *now.get_or_init(Instant::now);
        self.keys.get_or_insert_hashed(
            lookup,
            hash,
            self.settings.max_keys,
            idle / 2,
            |key| new_cell(key, class, limits, self.epoch.nanos(now())),
            |cell| self.keeps(cell, now(), idle),
        )
    }

    /// Whether a key nothing else holds stays: used within `idle` before
    /// `now`, with a request waiting, or (own ledger) with buckets not full
    /// again. (A key held elsewhere, by a charge in flight, always stays:
    /// see [`KeyMap`].)
    fn keeps(&self, cell: &KeyCell, now: Instant, idle: Duration) -> bool {
        let own = self.own.then_some(&self.settings.limits);
        key_stays(cell, (now, self.epoch), idle, own)
    }

    /// Turns an estimate into the costs to reserve under the request's key.
    /// Refused if the key is new and the budget holds its most keys.
    pub(crate) fn charge(
        &self,
        caller: Option<&str>,
        estimate: Estimate,
    ) -> Result<Box<Charge>, CallerRefusal> {
        let class = class_of(estimate.model.as_ref());
        let limits = self.settings.limits.limits_for(class);
        let cache_reads_count = class.cache_reads_count_toward_itpm();
        let cell = self
            .key_cell(caller, class, &limits)
            .ok_or(CallerRefusal::TooManyKeys)?;
        let output_tokens = {
            let mut ks = lock_key(&cell);
            ks.estimates = ks.estimates.saturating_add(1);
            if estimate.fallback {
                ks.fallback_estimates = ks.fallback_estimates.saturating_add(1);
            }
            if estimate.raw_input_tokens > 0 {
                ks.calibration =
                    (estimate.input_tokens as f64 / estimate.raw_input_tokens as f64) as f32;
            }
            self.learn_fleet_outputs(&cell.key, &mut ks);
            self.output_tokens(&ks, estimate.max_tokens)
        };
        let input_tokens = if cache_reads_count {
            estimate
                .input_tokens
                .saturating_add(estimate.cache_read_tokens)
        } else {
            estimate.input_tokens
        };
        Ok(Box::new(Charge {
            cell,
            limits,
            cache_reads_count,
            costs: Costs {
                requests: 1,
                input_tokens,
                output_tokens,
            },
            estimate,
            probe: false,
            writing: None,
            prefix_read: 0,
            prefix_served: None,
            prefix_hash: 0,
            prefix_from_fleet: false,
            fleet_held: 0,
            fleet_asked: false,
            inexact: false,
            output_pending: false,
            input_capped: false,
            counted: None,
        }))
    }

    /// Learns the outputs other budgets on a ledger given to this one
    /// settled on the key since it last looked ([`Ledger::outputs_learned`]):
    /// the fleet's answers count toward the key's expected output as this
    /// budget's own do. Nothing with the budget's own ledger.
    fn learn_fleet_outputs(&self, key: &str, ks: &mut KeyState) {
        if self.own {
            return;
        }
        // Until the fleet's first output the windows may not exist: the
        // ledger is read from the start (its other budgets' outputs only).
        let after = ks.output_ratio.as_ref().map_or(0, |s| s.fleet_position);
        let mut learned = Vec::new();
        let next = self.ledger.outputs_learned(key, after, &mut learned);
        for sample in learned {
            ks.push_fleet_output(sample.output_tokens, sample.max_tokens, &self.settings);
        }
        if let Some(samples) = ks.output_ratio.as_mut() {
            samples.fleet_position = next;
        }
    }

    /// The output tokens to reserve, per the output mode.
    fn output_tokens(&self, ks: &KeyState, max_tokens: Option<u64>) -> u64 {
        let max_tokens = max_tokens.unwrap_or(self.settings.default_max_tokens);
        match ks.output_rule.unwrap_or(self.settings.output_mode) {
            OutputMode::Reserve => max_tokens,
            OutputMode::Realtime => {
                let expected = ks.expected_output(&self.settings, max_tokens);
                // Round up, but not for floating-point noise (4000 × 0.025).
                let nearest = expected.round();
                let expected = if (expected - nearest).abs() < 1e-6 {
                    nearest as u64
                } else {
                    expected.ceil() as u64
                };
                // At least one token, so that an output bucket in debt (a
                // response longer than expected) holds new requests back.
                expected.max(1).min(max_tokens.max(1))
            }
        }
    }

    /// Polls a request's admission.
    ///
    /// # Cancellation
    ///
    /// Dropping `adm` while pending gives back the place in line (and the
    /// turn to the next waiter if it was the head); nothing was debited, and
    /// a reservation in flight is refunded if the ledger admitted it.
    pub(crate) fn poll_admit(
        self: &Arc<Self>,
        charge: &mut Charge,
        adm: &mut Admission,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Refusal>> {
        loop {
            let step = match adm.asking.as_mut() {
                Some(asking) => {
                    let answer = std::task::ready!(asking.poll(cx));
                    let charged = asking.charged;
                    adm.asking = None;
                    let turn = Turn {
                        waker: cx.waker(),
                        now: Instant::now(),
                    };
                    let mut ks = lock_key(&charge.cell);
                    let (step, next) = self.on_answer(&mut ks, charge, adm, answer, &turn);
                    drop(ks);
                    wake(next);
                    self.recharged(charge, charged, step)
                }
                None => {
                    // Behind a probe, whose answer may teach the output
                    // rule: the output is worked out again. A request that
                    // waited asks with no more than the output the budget
                    // expects now (answers that settled meanwhile may have
                    // lowered it since it was charged); never more, so a
                    // reservation capped to the bucket stays capped.
                    let held = std::mem::take(&mut adm.held_by_probe);
                    if held || adm.place.is_some() {
                        let mut ks = lock_key(&charge.cell);
                        self.learn_fleet_outputs(&charge.cell.key, &mut ks);
                        let now = self.output_tokens(&ks, charge.estimate.max_tokens);
                        let output = &mut charge.costs.output_tokens;
                        *output = if held { now } else { now.min(*output) };
                    }
                    self.ask(charge, adm, cx.waker())
                }
            };
            match step {
                Step::Admitted if charge.input_capped && charge.counted.is_none() => {
                    // Admitted at the whole bucket with no count to say the
                    // estimate was high: too large, as it said.
                    self.correct(charge, CostDelta::refund(charge.costs), None);
                    let refusal = Refusal::Denied(Denied::TooLarge {
                        dimension: Dimension::InputTokens,
                        cost: charge.estimate.input_tokens,
                        limit: charge.costs.input_tokens,
                    });
                    self.refused(charge, &refusal);
                    return Poll::Ready(Err(refusal));
                }
                Step::Admitted => {
                    // Its reservation turned its queued markers into a
                    // writer's.
                    adm.queued = false;
                    if let Some(mut role) = adm.probe.take() {
                        // The role now ends with the charge (see `end_probe`).
                        role.armed = false;
                        charge.probe = true;
                    }
                    self.admitted(charge, adm);
                    // Counted under the lock that admitted it, if it was
                    // answered at once; else now.
                    let (inexact, expected_output) = self.in_flight(charge);
                    if inexact || expected_output {
                        let counted = self.count_in_flight(&mut lock_key(&charge.cell), charge);
                        charge.counted_in_flight(counted);
                    }
                    return Poll::Ready(Ok(()));
                }
                Step::Refused(refusal) => {
                    if std::mem::take(&mut adm.queued) {
                        self.ledger.prefixes_dequeued(charge.key(), adm.line_id);
                    }
                    self.refused(charge, &refusal);
                    return Poll::Ready(Err(refusal));
                }
                Step::Queued => return Poll::Pending,
                Step::Asking | Step::Again => {}
                Step::Capped(output_tokens) => charge.costs.output_tokens = output_tokens,
                Step::CappedInput(capacity) => {
                    charge.input_capped = true;
                    charge.costs.input_tokens = capacity;
                    // Its future starts the count, then asks again (see
                    // `input_capped`).
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Step::Sleep(at) => {
                    if !poll_sleep(adm, at, cx) {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// The answer to a question asked with the charge `charged`, when the
    /// charge changed while the question was in flight (a `count_tokens`
    /// answer, or a prefix read, came back meanwhile): an admission debited
    /// what was asked, so the difference is settled now; a wait was for
    /// what was asked, so the request asks again at once with its charge.
    /// (Traced on a 4-process `RedisLedger` fleet: counts that came back
    /// during the round trip left 1,667 tokens charged too much at the
    /// start, and a head counted at 15,539 tokens slept 2.4 s more on the
    /// wait named for its 21,357-token estimate.)
    fn recharged(self: &Arc<Self>, charge: &Charge, charged: Costs, step: Step) -> Step {
        if charged == charge.costs {
            return step;
        }
        match step {
            Step::Admitted => {
                let diff = |now: u64, then: u64| {
                    i64::try_from(now).unwrap_or(i64::MAX) - i64::try_from(then).unwrap_or(i64::MAX)
                };
                let delta = CostDelta {
                    requests: diff(charge.costs.requests, charged.requests),
                    input_tokens: diff(charge.costs.input_tokens, charged.input_tokens),
                    output_tokens: diff(charge.costs.output_tokens, charged.output_tokens),
                };
                let freed = delta.input_tokens < 0 || delta.output_tokens < 0;
                self.apply(charge, Some(delta), None, freed);
                Step::Admitted
            }
            Step::Sleep(_) => Step::Again,
            step => step,
        }
    }

    /// Whether an admitted request is yet to be counted among its key's
    /// estimates in flight (its input is an estimate) and among its
    /// outputs in flight (it reserved an expected output, not its
    /// `max_tokens`).
    fn in_flight(&self, charge: &Charge) -> (bool, bool) {
        let inexact = !charge.inexact && !charge.input_exact();
        let expected_output = self.own
            && !charge.output_pending
            && charge.costs.output_tokens > 0
            && charge
                .estimate
                .max_tokens
                .unwrap_or(self.settings.default_max_tokens)
                > charge.costs.output_tokens;
        (inexact, expected_output)
    }

    /// Counts an admitted request in flight (see [`in_flight`](Self::in_flight))
    /// under the key's lock (`ks`); returns what it counted, for
    /// [`Charge::counted_in_flight`].
    fn count_in_flight(&self, ks: &mut KeyState, charge: &Charge) -> (bool, bool) {
        let (inexact, expected_output) = self.in_flight(charge);
        if inexact {
            ks.inexact += 1;
        }
        if expected_output {
            ks.output_pending += 1;
        }
        (inexact, expected_output)
    }

    fn admitted(&self, charge: &Charge, adm: &Admission) {
        bump(&self.counters.admitted);
        if let Some(started) = adm.started {
            tracing::debug!(
                key = super::callers::logged_key(charge.key()),
                waited_ms = Instant::now()
                    .saturating_duration_since(started)
                    .as_millis() as u64,
                input_tokens = charge.costs.input_tokens,
                output_tokens = charge.costs.output_tokens,
                writes = charge.estimate.cache_writes.iter().map(|w| w.tokens).max(),
                reads = charge.prefix_read.max(charge.estimate.cache_read_tokens),
                "budget: admitted after waiting"
            );
        } else if self.writers.fleet().is_some() {
            tracing::debug!(
                key = super::callers::logged_key(charge.key()),
                input_tokens = charge.costs.input_tokens,
                writes = charge.estimate.cache_writes.iter().map(|w| w.tokens).max(),
                reads = charge.prefix_read.max(charge.estimate.cache_read_tokens),
                "budget: admitted at its first ask"
            );
        }
    }

    fn refused(&self, charge: &Charge, refusal: &Refusal) {
        match refusal {
            Refusal::Denied(Denied::Exceeded {
                retry_in,
                dimension,
            }) => {
                bump(&self.counters.rejected);
                tracing::debug!(key = super::callers::logged_key(charge.key()), %dimension, retry_in_ms = retry_in.as_millis() as u64, "budget: rejected");
            }
            Refusal::Denied(Denied::TooLarge {
                dimension,
                cost,
                limit,
            }) => {
                bump(&self.counters.too_large);
                tracing::debug!(key = super::callers::logged_key(charge.key()), %dimension, cost, limit, "budget: request can never fit");
            }
            Refusal::Ledger(e) => {
                tracing::warn!(key = super::callers::logged_key(charge.key()), error = %e, "budget: ledger failed; request not sent");
            }
        }
    }

    /// Puts a new waiter at the back of the key's line; the place is given
    /// back when dropped.
    fn join(
        self: &Arc<Self>,
        ks: &mut KeyState,
        charge: &Charge,
        adm: &mut Admission,
        turn: &Turn<'_>,
    ) {
        let now = turn.now;
        let id = ks.queue.push(0, now, Some(turn.waker.clone()));
        adm.place = Some(Place {
            shared: Arc::clone(self),
            cell: Arc::clone(&charge.cell),
            id: Some(id),
        });
        if adm.started.is_none() {
            adm.started = Some(now);
            bump(&self.counters.waited);
        }
    }

    /// Tells the fleet that a request that joined the line behind others
    /// will write its prefixes ([`Ledger::prefixes_queued`]), so that a
    /// request of another process that would write a longer prefix of them
    /// holds for it (`prefix.rs`). Costs no call of its own on a ledger
    /// that buffers it.
    fn mark_queued(&self, charge: &Charge, adm: &mut Admission) {
        let Some((tokens, queued_for)) = super::prefix::queued_marker(self, charge) else {
            return;
        };
        if adm.line_id == 0 {
            adm.line_id = next_line_id();
        }
        let writes = super::prefix::write_hashes(charge);
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            tokens,
            queued_for_ms = queued_for.as_millis() as u64,
            "budget: behind others in line; its writes marked as queued"
        );
        self.ledger
            .prefixes_queued(charge.key(), adm.line_id, &writes, tokens, queued_for);
        adm.marked_until(Instant::now() + queued_for);
    }

    /// While a request holds in line for a longer prefix being written, or
    /// waits in its process's line behind another (it asks the ledger
    /// nothing meanwhile, and a head that holds asks nothing either),
    /// renews its own queued marker ([`Ledger::prefixes_queued`])
    /// [`LINE_GRACE`] before it would lapse, and wakes the request then:
    /// the requests of other processes that hold for it hold on. At most
    /// until [`MAX_QUEUED_HOLD`] after it first held or waited so, so a
    /// stuck process holds no one for ever.
    ///
    /// Why: a held turn 3 whose marker lapsed after 13.4 s let turn 4 of
    /// its conversation, holding for it in another process, go with turn
    /// 2, writing their shared prefix twice (traced at 16 processes). A
    /// request behind a held head lost its marker the same way: only its
    /// head's refused asks renewed it, and a held head asks nothing
    /// (`tests/fleet_cache.rs`: the later turn went at 6 s, 39 s before
    /// it).
    pub(crate) fn renew_queued(&self, charge: &Charge, adm: &mut Admission, cx: &mut Context<'_>) {
        let marker = super::prefix::queued_marker(self, charge);
        let (Some((tokens, queued_for)), true, Some(r)) =
            (marker, adm.queued && adm.line_id != 0, adm.renewal.as_mut())
        else {
            return;
        };
        let now = Instant::now();
        let end = *r.held_since.get_or_insert(now) + MAX_QUEUED_HOLD;
        if now + LINE_GRACE >= r.until && now < end {
            let renewed = (now + queued_for).min(end);
            if renewed > r.until {
                let writes = super::prefix::write_hashes(charge);
                tracing::debug!(
                    key = super::callers::logged_key(charge.key()),
                    "budget: a held request renews its queued marker"
                );
                self.ledger.prefixes_queued(
                    charge.key(),
                    adm.line_id,
                    &writes,
                    tokens,
                    renewed - now,
                );
                r.until = renewed;
            }
        }
        let at = r.until.checked_sub(LINE_GRACE).unwrap_or(r.until);
        if at <= now || at >= end {
            r.timer = None;
            return;
        }
        let timer = r
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        // Pending: it wakes the task at `at`.
        let _ = timer.as_mut().poll(cx);
    }

    /// Asks the ledger if this request's turn has come, or waits in line.
    fn ask(self: &Arc<Self>, charge: &mut Charge, adm: &mut Admission, waker: &Waker) -> Step {
        // One clock reading per question: the in-memory ledger reads the
        // same clock, so its waits count from (about) the same instant.
        let turn = Turn {
            waker,
            now: Instant::now(),
        };
        let tick = self.epoch.tick(turn.now);
        let mut ks = lock_key(&charge.cell);
        ks.last_used = tick.nanos();
        let at_head = match &adm.place {
            None => self.settings.mode == BudgetMode::Reject || ks.queue.is_empty(),
            Some(place) => ks.queue.is_next(place.id()),
        };
        if !at_head {
            if let Some(step) = self.try_pass(&mut ks, charge, adm) {
                return step;
            }
            // Behind a probe: its answer may teach the output rule.
            adm.held_by_probe |= ks.probe != Probe::Off;
            match &adm.place {
                None => {
                    self.join(&mut ks, charge, adm, &turn);
                    drop(ks);
                    self.mark_queued(charge, adm);
                }
                Some(place) => ks.queue.register(place.id(), waker),
            }
            return Step::Queued;
        }
        if let Some(place) = &adm.place {
            // A turn given from now on is one this question may not see.
            ks.queue.take_notified(place.id());
        }
        if let Some(step) = self.hold_for_probe(&mut ks, charge, adm, &turn) {
            return step;
        }
        if std::mem::take(&mut adm.in_grace) {
            if let (Some(sleep), Some(place)) = (&adm.sleep, &adm.place) {
                let until = sleep.deadline();
                if turn.now < until {
                    // In the writer grace: woken early, it does not ask yet.
                    adm.in_grace = true;
                    ks.queue.register(place.id(), waker);
                    return Step::Sleep(until);
                }
            }
        }
        let (answer, costs) = self.reserve(&mut ks, charge, adm, tick, true);
        charge.fleet_asked = true;
        ks.ledger_at_once = answer.is_ok();
        match answer {
            Ok(answer) => {
                let (step, next) = self.on_answer(&mut ks, charge, adm, answer, &turn);
                let counted = if matches!(step, Step::Admitted)
                    && !(charge.input_capped && charge.counted.is_none())
                {
                    // Counted in flight under this lock, not another.
                    self.count_in_flight(&mut ks, charge)
                } else {
                    (false, false)
                };
                drop(ks);
                charge.counted_in_flight(counted);
                wake(next);
                step
            }
            Err(fut) => {
                // A round trip: hold the place at the head while it runs.
                if adm.place.is_none() && self.settings.mode == BudgetMode::Wait {
                    self.join(&mut ks, charge, adm, &turn);
                }
                drop(ks);
                adm.asking = Some(Box::new(Asking {
                    fut: Some(fut),
                    shared: Arc::clone(self),
                    cell: Arc::clone(&charge.cell),
                    limits: charge.limits,
                    costs,
                    charged: charge.costs,
                }));
                Step::Asking
            }
        }
    }

    /// Acts on the ledger's answer, under the key's lock; returns the next
    /// step and the waker of a new head to wake once the lock is released.
    fn on_answer(
        self: &Arc<Self>,
        ks: &mut KeyState,
        charge: &Charge,
        adm: &mut Admission,
        answer: Result<Reservation, LedgerError>,
        turn: &Turn<'_>,
    ) -> (Step, Option<Waker>) {
        let leave =
            |adm: &mut Admission, ks: &mut KeyState| adm.place.take().and_then(|p| p.leave(ks));
        let graced = std::mem::take(&mut adm.graced);
        match answer {
            Err(e) => (Step::Refused(Refusal::Ledger(e)), leave(adm, ks)),
            Ok(Reservation::Admitted) => {
                self.release_headroom(ks, charge, adm);
                (Step::Admitted, leave(adm, ks))
            }
            Ok(Reservation::Wait {
                retry_in,
                dimension,
            }) => {
                if self.settings.mode == BudgetMode::Reject {
                    let denied = Denied::Exceeded {
                        retry_in,
                        dimension,
                    };
                    return (Step::Refused(Refusal::Denied(denied)), leave(adm, ks));
                }
                // Its sleep ends the grace (see `ask`).
                adm.in_grace = graced && retry_in == self.ledger.writer_grace();
                tracing::debug!(
                    key = super::callers::logged_key(charge.key()),
                    retry_in_ms = retry_in.as_millis() as u64,
                    %dimension,
                    grace = adm.in_grace,
                    "budget: the ledger answered a wait"
                );
                (
                    self.wait(ks, charge, adm, (retry_in, dimension), turn),
                    None,
                )
            }
            Ok(Reservation::Never {
                dimension,
                cost,
                capacity,
            }) => {
                if dimension == Dimension::InputTokens && adm.headroom > 0 {
                    // It fits only into the headroom: ask again without it.
                    adm.no_headroom = true;
                    return (Step::Again, None);
                }
                if dimension == Dimension::InputTokens
                    && self.counter.is_some()
                    && charge.counted.is_none()
                    && !charge.input_capped
                    && !charge.estimate.fallback
                {
                    // Too large by its estimate only: it waits for the
                    // whole bucket while `count_tokens` says what it is
                    // (an estimate can run 40 % high before calibration).
                    return (Step::CappedInput(capacity), None);
                }
                if dimension == Dimension::OutputTokens
                    && ks.output_rule.unwrap_or(self.settings.output_mode) == OutputMode::Realtime
                    && charge.costs.output_tokens > capacity
                {
                    // In realtime mode the output reservation is only an
                    // expectation: cap it to what can ever fit and ask again.
                    return (Step::Capped(capacity), None);
                }
                let denied = Denied::TooLarge {
                    dimension,
                    cost,
                    limit: capacity,
                };
                (Step::Refused(Refusal::Denied(denied)), leave(adm, ks))
            }
        }
    }

    /// The head waits `retry_in` (or is woken sooner by a settlement).
    fn wait(
        self: &Arc<Self>,
        ks: &mut KeyState,
        charge: &Charge,
        adm: &mut Admission,
        (retry_in, dimension): (Duration, Dimension),
        turn: &Turn<'_>,
    ) -> Step {
        let first = adm.started.is_none();
        match &adm.place {
            None => self.join(ks, charge, adm, turn),
            Some(place) => {
                if ks.queue.take_notified(place.id()) {
                    // Capacity was freed while the ledger answered.
                    return Step::Again;
                }
                ks.queue.register(place.id(), turn.waker);
            }
        }
        if first {
            tracing::debug!(
                key = super::callers::logged_key(charge.key()),
                %dimension,
                wait_ms = retry_in.as_millis() as u64,
                "budget: waiting for capacity"
            );
        }
        // A ledger must name a wait after now; guard against a spin if one
        // does not. A shared ledger's wait may end sooner, by other
        // processes' settlements that do not wake this one.
        let mut sleep = retry_in.max(Duration::from_millis(1));
        if adm.line_id != 0 {
            sleep = sleep.min(super::ledger::REASK_WITHIN);
        }
        Step::Sleep(turn.now + sleep)
    }

    /// Runs a ledger operation that answers nothing: at once if it can, else
    /// on the runtime; then gives the key's head its turn if `wake_head`.
    fn run(self: &Arc<Self>, charge: &Charge, op: LedgerFuture<()>, wake_head: bool) {
        match op.into_ready() {
            Ok(result) => {
                if let Err(e) = result {
                    tracing::warn!(key = super::callers::logged_key(charge.key()), error = %e, "budget: ledger operation failed");
                }
                if wake_head {
                    let next = lock_key(&charge.cell).notify_head(&self.counters);
                    wake(next);
                }
            }
            Err(op) => {
                let cell = Arc::clone(&charge.cell);
                let shared = Arc::clone(self);
                spawn_ledger_op(async move {
                    let result = op.await;
                    if wake_head {
                        let next = lock_key(&cell).notify_head(&shared.counters);
                        wake(next);
                    }
                    result
                });
            }
        }
    }

    /// Applies a correction to a request's charge; wakes the key's head when
    /// capacity was freed, and learns the answer's output if given
    /// (`(output_tokens, max_tokens)`).
    pub(crate) fn correct(
        self: &Arc<Self>,
        charge: &Charge,
        delta: CostDelta,
        output: Option<(u64, u64)>,
    ) {
        self.correct_and_sync(charge, delta, output, None);
    }

    /// [`correct`](Self::correct), with the header sync held for it
    /// ([`Ledger::sync_with_settlement`]) applied in the same operation.
    pub(crate) fn correct_and_sync(
        self: &Arc<Self>,
        charge: &Charge,
        delta: CostDelta,
        output: Option<(u64, u64)>,
        held_sync: Option<[LimitStatus; 3]>,
    ) {
        self.end_probe(charge, Probe::Off);
        let freed = delta.requests < 0 || delta.input_tokens < 0 || delta.output_tokens < 0;
        if let Some((tokens, max_tokens)) = output {
            if !self.own && max_tokens > 0 {
                let sample = OutputSample {
                    output_tokens: tokens,
                    max_tokens,
                };
                self.ledger.output_learned(charge.key(), sample);
            }
            lock_key(&charge.cell).push_output(tokens, max_tokens, &self.settings);
        }
        if held_sync.is_some() {
            self.apply(charge, Some(delta), held_sync, true);
        } else if !delta.is_zero() {
            self.apply(charge, Some(delta), None, freed);
        }
        bump(&self.counters.settled);
    }

    /// A response's settlement: [`correct_and_sync`](Self::correct_and_sync),
    /// then the request no longer counts among its key's estimates and
    /// outputs in flight ([`Charge::release_inexact`],
    /// [`Charge::release_output`]). With the budget's own buckets, all of it
    /// under one lock of the key (it took four).
    pub(crate) fn settle_response(
        self: &Arc<Self>,
        charge: &mut Charge,
        delta: CostDelta,
        output: Option<(u64, u64)>,
        held_sync: Option<[LimitStatus; 3]>,
    ) {
        if !self.own {
            self.correct_and_sync(charge, delta, output, held_sync);
            charge.release_inexact();
            charge.release_output();
            return;
        }
        self.end_probe(charge, Probe::Off);
        let freed = delta.requests < 0 || delta.input_tokens < 0 || delta.output_tokens < 0;
        let mut ks = lock_key(&charge.cell);
        if let Some((tokens, max_tokens)) = output {
            ks.push_output(tokens, max_tokens, &self.settings);
        }
        let next = if held_sync.is_some() || !delta.is_zero() {
            let wake_head = held_sync.is_some() || freed;
            self.apply_own(&mut ks, charge, Some(delta), held_sync.as_ref(), wake_head)
        } else {
            None
        };
        if std::mem::take(&mut charge.inexact) {
            ks.inexact = ks.inexact.saturating_sub(1);
        }
        if std::mem::take(&mut charge.output_pending) {
            ks.output_pending = ks.output_pending.saturating_sub(1);
            if ks.output_pending == 0 {
                ks.absorbed_output = 0;
            }
        }
        drop(ks);
        wake(next);
        bump(&self.counters.settled);
    }

    /// Applies a response's statuses (if any) and then `delta` (if any) to
    /// the request's key: in the budget's own buckets under the key's lock,
    /// else in one ledger operation (`sync_all`, `settle` or
    /// `settle_and_sync`); then gives the key's head its turn if
    /// `wake_head`.
    fn apply(
        self: &Arc<Self>,
        charge: &Charge,
        delta: Option<CostDelta>,
        statuses: Option<[LimitStatus; 3]>,
        wake_head: bool,
    ) {
        if !self.own {
            let (key, limits) = (charge.key(), &charge.limits);
            let op = match (delta, statuses) {
                (Some(delta), Some(statuses)) => {
                    self.ledger.settle_and_sync(key, limits, delta, statuses)
                }
                (Some(delta), None) => self.ledger.settle(key, limits, delta),
                (None, Some(statuses)) => self.ledger.sync_all(key, limits, statuses),
                (None, None) => return,
            };
            return self.run(charge, op, wake_head);
        }
        let mut ks = lock_key(&charge.cell);
        let next = self.apply_own(&mut ks, charge, delta, statuses.as_ref(), wake_head);
        drop(ks);
        wake(next);
    }

    /// [`apply`](Self::apply) on the budget's own buckets, under the key's
    /// lock (`ks`); returns the waker of the head to wake once it is
    /// released.
    fn apply_own(
        &self,
        ks: &mut KeyState,
        charge: &Charge,
        delta: Option<CostDelta>,
        statuses: Option<&[LimitStatus; 3]>,
        wake_head: bool,
    ) -> Option<Waker> {
        let now = self.epoch.tick(Instant::now());
        let synced = statuses.is_some();
        // The sync and the settlement in one pass over the buckets.
        ks.buckets
            .sync_and_settle(&charge.limits, statuses, now, |[lowered, lowered_output]| {
                if synced {
                    // Lowered while estimates are in flight: the server's
                    // remaining already holds what they missed, which their
                    // settlements would charge again. With none in flight,
                    // the lowering is another client's use of the key (or
                    // rounding): nothing to carry. The same for output: the
                    // server charges it as it is produced, before the
                    // settlements of the requests producing it.
                    ks.absorbed = carry(ks.absorbed, ks.inexact, lowered);
                    ks.absorbed_output =
                        carry(ks.absorbed_output, ks.output_pending, lowered_output);
                }
                let mut delta = delta?;
                use_absorbed(ks.inexact, &mut ks.absorbed, &mut delta.input_tokens);
                use_absorbed(
                    ks.output_pending,
                    &mut ks.absorbed_output,
                    &mut delta.output_tokens,
                );
                Some(delta)
            });
        if wake_head {
            ks.notify_head(&self.counters)
        } else {
            None
        }
    }

    /// Corrects a request's input reservation (`delta` in input tokens
    /// only) as soon as the server said what it charged, before the answer
    /// ends: a stream's `message_start` carries the final input usage, and
    /// the server charged it when it admitted the request, so an
    /// over-reservation is given back while the answer is still being
    /// generated (an answer can take a minute).
    pub(crate) fn settle_input(self: &Arc<Self>, charge: &Charge, delta: CostDelta) {
        if !delta.is_zero() {
            self.apply(charge, Some(delta), None, delta.input_tokens < 0);
        }
    }

    /// Refunds everything a request reserved: the server answered 429 and
    /// charged nothing.
    pub(crate) fn refund(self: &Arc<Self>, charge: &Charge) {
        bump(&self.counters.refunded_429);
        self.correct(charge, CostDelta::refund(charge.costs), None);
    }

    /// Refunds everything a request reserved: it was admitted but never sent
    /// (the inner service failed before taking it).
    pub(crate) fn refund_unsent(self: &Arc<Self>, charge: &Charge) {
        // Never sent: the next request probes instead.
        self.end_probe(charge, Probe::Needed);
        bump(&self.counters.refunded_unsent);
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            "budget: admitted request not sent; refunded"
        );
        self.correct(charge, CostDelta::refund(charge.costs), None);
    }

    /// Which of a response's `anthropic-ratelimit-*-reset` headers a sync
    /// looks at: with the budget's own buckets, only those of a limit whose
    /// `remaining` is not given (they sync to `remaining` where it is); a
    /// ledger of the user's is given every one.
    pub(crate) fn resets_synced(&self) -> Resets {
        if self.own {
            Resets::WithoutRemaining
        } else {
            Resets::All
        }
    }

    /// Aligns the key's buckets with a response's `anthropic-ratelimit-*`
    /// headers, read by
    /// [`RateLimitSnapshot::budget_statuses`](crate::headers::RateLimitSnapshot::budget_statuses).
    ///
    /// The combined `anthropic-ratelimit-tokens-*` header is the most
    /// restrictive limit in force, not a fourth bucket: it is used for input
    /// tokens only when the response has no `input-tokens` headers. A
    /// reported limit reaches the ledger only once it is plausible (see
    /// `learn`): never below the floor, and never from one response that
    /// disagrees with the last ones.
    ///
    /// With `hold` and a ledger that asks for it
    /// ([`Ledger::sync_with_settlement`]), the statuses are not applied now
    /// but returned, for the response's settlement to apply.
    pub(crate) fn sync(
        self: &Arc<Self>,
        charge: &Charge,
        mut statuses: [LimitStatus; 3],
        hold: bool,
    ) -> Option<[LimitStatus; 3]> {
        let mut locked = None;
        if statuses.iter().any(|s| s.limit.is_some()) {
            let ks = locked.insert(lock_key(&charge.cell));
            for (i, dimension) in Dimension::ALL.into_iter().enumerate() {
                if let Some(reported) = statuses[i].limit {
                    statuses[i].limit =
                        ks.learners
                            .observe(i, dimension, reported, &self.settings.learn);
                }
            }
            if charge.probe && ks.probe == Probe::InFlight {
                let output = statuses[dim_index(Dimension::OutputTokens)];
                ks.output_rule = admission::output_rule(charge.estimate.max_tokens, &output);
                tracing::debug!(key = super::callers::logged_key(charge.key()), rule = ?ks.output_rule, "budget: limits learned from the probe");
            }
        }
        let mut held = None;
        if !statuses.iter().all(LimitStatus::is_empty) {
            match (self.own, locked.as_mut()) {
                (true, Some(ks)) => {
                    // The budget's own buckets: synced under the lock the
                    // limits were learned under.
                    let next = self.apply_own(ks, charge, None, Some(&statuses), true);
                    drop(locked.take());
                    wake(next);
                }
                _ => {
                    drop(locked.take());
                    if hold && !self.own && self.ledger.sync_with_settlement() {
                        held = Some(statuses);
                    } else {
                        self.apply(charge, None, Some(statuses), true);
                    }
                }
            }
        }
        drop(locked);
        self.end_probe(charge, Probe::Off);
        held
    }

    /// A request that may have reached the server will get no answer (its
    /// connection failed, or its caller dropped it): if it was the probe of
    /// unknown limits, the next request probes instead.
    pub(crate) fn lost(self: &Arc<Self>, charge: &Charge) {
        self.end_probe(charge, Probe::Needed);
    }

    /// Ends a probe: its key goes to `to` and the head of its line gets the
    /// turn. Nothing happens for a request that is not its key's probe in
    /// flight.
    fn end_probe(self: &Arc<Self>, charge: &Charge, to: Probe) {
        if !charge.probe {
            return;
        }
        let mut ks = lock_key(&charge.cell);
        if ks.probe != Probe::InFlight {
            return;
        }
        ks.probe = to;
        let next = ks.notify_head(&self.counters);
        drop(ks);
        wake(next);
    }

    /// The costs to ask the ledger for: the request's, plus the input
    /// headroom (a share of the input limit in force, kept free in the
    /// bucket: a request is admitted only when it leaves that much).
    fn with_headroom(&self, ks: &KeyState, charge: &Charge, adm: &mut Admission) -> Costs {
        let itpm = limits_in_force(ks, charge)[dim_index(Dimension::InputTokens)];
        // The headroom absorbs estimate errors: none is needed when this
        // request's input is exact and no request admitted on an estimate
        // awaits the server's count. A ledger of the user's may be shared
        // by other processes, whose estimates in flight this budget does
        // not see: the headroom is kept for every request there.
        let own_exact = ks.inexact == 0 && charge.input_exact();
        let exact = self.own && own_exact;
        adm.headroom = match itpm {
            Some(limit) if !adm.no_headroom && !exact && charge.costs.input_tokens > 0 => {
                // Before the key's first answers, nothing has measured the
                // estimator's error on this traffic and tokenizer, and the
                // whole bucket is there to be filled at once: keep more,
                // where this budget's own estimates are at stake (this
                // request's, or one in flight). A counted request with none
                // in flight on a shared ledger keeps the configured share
                // for the other processes' estimates: a process's coldness
                // says nothing of theirs (a 16-process fleet, each process
                // seeing two answers, kept 10 % of ITPM idle all run).
                let configured =
                    (limit as f64 * self.settings.input_headroom.min(0.5)).ceil() as u64;
                if self.settings.input_headroom > 0.0
                    && ks.answers_seen() < COLD_ANSWERS
                    && !own_exact
                {
                    let mut cold = (limit as f64 * COLD_HEADROOM).ceil() as u64;
                    if ks.inexact == 0 {
                        // Only this request's estimate is at stake: it
                        // cannot miss by more than its own error (a
                        // 157-token request at the end of a 16-process
                        // fleet's run kept 3,000 tokens idle for 5 s).
                        let own = (charge.costs.input_tokens as f64 * COLD_ERROR).ceil() as u64;
                        cold = cold.min(own);
                    }
                    configured.max(cold)
                } else {
                    configured
                }
            }
            _ => 0,
        };
        let mut costs = charge.costs;
        costs.input_tokens = costs.input_tokens.saturating_add(adm.headroom);
        costs
    }

    /// Asks for a reservation under the key's lock (`ks`) of the request's
    /// costs with the input headroom kept free: answered at once by the
    /// budget's own buckets, else by the ledger (`Err` with its future if it
    /// needs a round trip), in one operation where the ledger has one, else
    /// as `costs + headroom` (given back once admitted). Returns the answer
    /// and the costs it debits if admitted.
    #[allow(clippy::type_complexity)]
    fn reserve(
        &self,
        ks: &mut KeyState,
        charge: &Charge,
        adm: &mut Admission,
        tick: Tick,
        head: bool,
    ) -> (
        Result<Result<Reservation, LedgerError>, LedgerFuture<Reservation>>,
        Costs,
    ) {
        let with = self.with_headroom(ks, charge, adm);
        adm.headroom_kept = false;
        let headroom = Costs {
            requests: 0,
            input_tokens: adm.headroom,
            output_tokens: 0,
        };
        if self.own {
            if adm.headroom == 0 {
                let answer = ks.buckets.reserve(&charge.limits, with, tick);
                return (Ok(Ok(answer)), with);
            }
            // The headroom is given back in the same pass over the buckets.
            let answer = ks
                .buckets
                .reserve_keeping(&charge.limits, with, headroom, tick);
            adm.headroom_kept = true;
            return (Ok(Ok(answer)), charge.costs);
        }
        let now = tick.at();
        // The fleet's line, where the ledger keeps one (shared by budgets
        // in other processes): the oldest waiting head first.
        if adm.line_id == 0 {
            adm.line_id = next_line_id();
        }
        let place = LinePlace {
            owner: self.line_owner,
            head,
            request: adm.line_id,
            waited: adm
                .started
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s)),
        };
        let fut = match self.writers.fleet() {
            Some(_) => {
                let first = head && !charge.fleet_asked && !self.ledger.writer_grace().is_zero();
                let intent = super::prefix::fleet_intent(self, charge, first);
                adm.graced = !intent.shorter.is_empty();
                let mut prefixes = PrefixIntent::new(&intent.writes, &intent.pending, intent.hold)
                    .first_ask(&intent.shorter);
                if let Some((tokens, queued_for)) = super::prefix::queued_marker(self, charge) {
                    // Marked as queued if answered a wait (and as a writer
                    // if admitted) by the reservation itself.
                    prefixes = prefixes.queued(tokens, queued_for);
                    adm.marked_until(now + queued_for);
                }
                self.ledger.reserve_in_line_with_prefixes(
                    charge.key(),
                    &charge.limits,
                    charge.costs,
                    headroom,
                    place,
                    prefixes,
                )
            }
            None => self.ledger.reserve_in_line(
                charge.key(),
                &charge.limits,
                charge.costs,
                headroom,
                place,
            ),
        };
        if let Some(fut) = fut {
            adm.headroom_kept = true;
            return (fut.into_ready(), charge.costs);
        }
        if adm.headroom > 0 {
            let kept = self.ledger.reserve_with_headroom(
                charge.key(),
                &charge.limits,
                charge.costs,
                headroom,
            );
            if let Some(fut) = kept {
                adm.headroom_kept = true;
                return (fut.into_ready(), charge.costs);
            }
        }
        let fut = self
            .ledger
            .reserve_with_clock(charge.key(), &charge.limits, with, now);
        (fut.into_ready(), with)
    }

    /// Gives back the headroom an admitted request's reservation held
    /// (under the key's lock, `ks`).
    fn release_headroom(self: &Arc<Self>, ks: &mut KeyState, charge: &Charge, adm: &mut Admission) {
        let headroom = std::mem::take(&mut adm.headroom);
        if headroom == 0 || std::mem::take(&mut adm.headroom_kept) {
            return;
        }
        let delta = CostDelta {
            input_tokens: -(i64::try_from(headroom).unwrap_or(i64::MAX)),
            ..CostDelta::default()
        };
        if self.own {
            ks.buckets
                .settle(&charge.limits, delta, self.epoch.tick(Instant::now()));
        } else {
            let op = self.ledger.settle(charge.key(), &charge.limits, delta);
            self.run(charge, op, false);
        }
    }

    /// Unknown limits: takes the probe role for this request if it is
    /// needed, or holds it in line while the probe is in flight.
    fn hold_for_probe(
        self: &Arc<Self>,
        ks: &mut KeyState,
        charge: &Charge,
        adm: &mut Admission,
        turn: &Turn<'_>,
    ) -> Option<Step> {
        if self.settings.mode != BudgetMode::Wait || self.settings.enforce {
            // Reject mode answers at once; a gateway writes its own limits.
            return None;
        }
        match ks.probe {
            Probe::Off => None,
            Probe::Needed => {
                ks.probe = Probe::InFlight;
                // (A role already held is kept: dropping it here, under the
                // key's lock, would lock the key again.)
                if adm.probe.is_none() {
                    adm.probe = Some(ProbeRole {
                        shared: Arc::clone(self),
                        cell: Arc::clone(&charge.cell),
                        armed: true,
                    });
                }
                None
            }
            Probe::InFlight if adm.probe.is_some() => None,
            Probe::InFlight => {
                match &adm.place {
                    None => self.join(ks, charge, adm, turn),
                    Some(place) => ks.queue.register(place.id(), turn.waker),
                }
                adm.held_by_probe = true;
                Some(Step::Queued)
            }
        }
    }

    /// Head of line: lets a request behind a waiting head go now when the
    /// ledger admits it at once and the capacity it takes delays the head by
    /// little (see [`admission`]). `None` when it must wait its turn.
    fn try_pass(
        self: &Arc<Self>,
        ks: &mut KeyState,
        charge: &Charge,
        adm: &mut Admission,
    ) -> Option<Step> {
        if self.settings.mode != BudgetMode::Wait || ks.probe != Probe::Off || !ks.ledger_at_once {
            return None;
        }
        let head = ks.queue.next()?;
        let delay = admission::head_delay(&charge.costs, limits_in_force(ks, charge));
        if !ks.queue.allow_passing(head, delay) {
            return None;
        }
        let now = self.epoch.tick(Instant::now());
        let (answer, costs) = self.reserve(ks, charge, adm, now, false);
        match answer {
            Ok(Ok(Reservation::Admitted)) => {
                self.release_headroom(ks, charge, adm);
                let next = adm.place.take().and_then(|p| p.leave(ks));
                wake(next);
                tracing::debug!(
                    key = super::callers::logged_key(charge.key()),
                    delay_ms = delay.as_millis() as u64,
                    "budget: passed the waiting head"
                );
                Some(Step::Admitted)
            }
            Ok(Ok(_)) | Ok(Err(_)) => {
                ks.queue.give_back(delay);
                None
            }
            Err(fut) => {
                // A ledger that needs a round trip: no passing (and a
                // reservation it made is refunded when this drops).
                ks.queue.give_back(delay);
                drop(Asking {
                    fut: Some(fut),
                    shared: Arc::clone(self),
                    cell: Arc::clone(&charge.cell),
                    limits: charge.limits,
                    costs,
                    charged: charge.costs,
                });
                None
            }
        }
    }

    /// The state of the key's buckets if the ledger knows it at once (the
    /// in-memory ledger always does); `None` for an unknown key, a ledger
    /// that needs a round trip (the operation is dropped), or a failure.
    pub(crate) fn state_now(&self, key: &str, limits: &Limits) -> Option<[BucketState; 3]> {
        match self.ledger.state(key, limits).into_ready() {
            Ok(Ok(state)) => state,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "budget: ledger state failed");
                None
            }
            Err(_) => {
                tracing::debug!("budget: ledger state not known at once; left out");
                None
            }
        }
    }

    /// Forgets the keys not used for `idle`, with no request waiting and none
    /// charged and not yet admitted (what was learned for them: output ratio,
    /// counters). Returns how many.
    pub(crate) fn forget_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        self.keys.retain(|cell| self.keeps(cell, now, idle))
    }

    /// A snapshot of every key this budget has seen.
    pub(crate) fn snapshot(&self) -> BudgetSnapshot {
        // Copied one shard at a time, then each key read under its own lock.
        let cells = self.keys.entries();
        let now = Instant::now();
        let mut out: Vec<KeySnapshot> = cells
            .into_iter()
            .map(|cell| {
                let ks = lock_key(&cell);
                let limits = self.settings.limits.limits_for(ks.class);
                let waiting = ks.queue.len();
                let partial = KeySnapshot {
                    key: cell.key.to_string(),
                    dimensions: Dimension::ALL.map(|d| DimensionSnapshot {
                        dimension: d,
                        limit: None,
                        learned: false,
                        remaining: None,
                        capacity: None,
                    }),
                    waiting,
                    calibration_factor: (!ks.calibration.is_nan())
                        .then_some(f64::from(ks.calibration)),
                    fallback_estimates: u64::from(ks.fallback_estimates),
                    estimates: u64::from(ks.estimates),
                    expected_output_ratio: ks.expected_ratio(&self.settings),
                };
                // The budget's own buckets are read under the key's lock
                // already held; a ledger's are asked with no lock held.
                let own = self
                    .own
                    .then(|| ks.buckets.state(&limits, self.epoch.tick(now)));
                drop(ks);
                let states = own.or_else(|| self.state_now(&partial.key, &limits));
                with_buckets(partial, states)
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        let c = &self.counters;
        BudgetSnapshot {
            keys: out,
            admitted: c.admitted.load(Ordering::Relaxed),
            waited: c.waited.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            too_large: c.too_large.load(Ordering::Relaxed),
            settled: c.settled.load(Ordering::Relaxed),
            refunded_429: c.refunded_429.load(Ordering::Relaxed),
            refunded_unsent: c.refunded_unsent.load(Ordering::Relaxed),
            wakeups: c.wakeups.load(Ordering::Relaxed),
        }
    }
}

/// Fills a key's snapshot with its buckets' states, if known.
fn with_buckets(mut snap: KeySnapshot, states: Option<[BucketState; 3]>) -> KeySnapshot {
    snap.dimensions = Dimension::ALL.map(|d| {
        let st = states.as_ref().and_then(|s| s.get(dim_index(d)).copied());
        DimensionSnapshot {
            dimension: d,
            limit: st.and_then(|s| s.limit),
            learned: st.is_some_and(|s| s.learned),
            remaining: st.map(|s| s.available),
            capacity: st.map(|s| s.capacity),
        }
    });
    snap
}

/// Sleeps until `at`; whether the sleep is over.
/// The limit in force per dimension: the configured one, or the learned one
/// when lower or when none is configured.
fn limits_in_force(ks: &KeyState, charge: &Charge) -> [Option<u64>; 3] {
    Dimension::ALL.map(|d| {
        let learned = ks.learners.adopted(dim_index(d));
        match (charge.limits.get(d), learned) {
            (Some(c), Some(l)) => Some(c.min(l)),
            (c, l) => c.or(l),
        }
    })
}

fn poll_sleep(adm: &mut Admission, at: Instant, cx: &mut Context<'_>) -> bool {
    match adm.sleep.as_mut() {
        Some(sleep) => {
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
        }
        None => adm.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
    }
    adm.sleep
        .as_mut()
        .is_some_and(|s| s.as_mut().poll(cx).is_ready())
}

pub(crate) fn dim_index(d: Dimension) -> usize {
    match d {
        Dimension::Requests => 0,
        Dimension::InputTokens => 1,
        Dimension::OutputTokens => 2,
    }
}

/// What a request would be charged, read without touching the budget: the
/// pool routes with it.
#[cfg(feature = "pool")]
#[derive(Debug, Clone)]
pub(crate) struct Preview {
    /// The budget key (the model class's name; no caller).
    pub(crate) key: String,
    /// The limits configured for the key's class.
    pub(crate) limits: Limits,
    /// The costs [`Shared::charge`] would reserve now.
    pub(crate) costs: Costs,
}

#[cfg(feature = "pool")]
impl Shared {
    /// The key, limits and costs that [`Shared::charge`] would give `estimate`
    /// (without a caller), without creating the key or counting an estimate.
    pub(crate) fn preview(&self, estimate: &Estimate) -> Preview {
        let class = class_of(estimate.model.as_ref());
        let limits = self.settings.limits.limits_for(class);
        let name = class.as_str();
        let cell = self.keys.get(name);
        let output_tokens = match cell {
            Some(cell) => self.output_tokens(&lock_key(&cell), estimate.max_tokens),
            None => self.output_tokens(&KeyState::new(class, &limits, 0), estimate.max_tokens),
        };
        let input_tokens = if class.cache_reads_count_toward_itpm() {
            estimate
                .input_tokens
                .saturating_add(estimate.cache_read_tokens)
        } else {
            estimate.input_tokens
        };
        Preview {
            key: name.to_string(),
            limits,
            costs: Costs {
                requests: 1,
                input_tokens,
                output_tokens,
            },
        }
    }
}

/// The ledger of a budget built without one, kept in the budget's own key
/// entries, seen through the [`Ledger`] trait (for
/// [`TokenBudgetLayer::ledger`](super::TokenBudgetLayer::ledger) and the
/// pool). Each operation finds the key's entry and runs under its lock, as
/// an [`InMemoryLedger`](super::ledger::InMemoryLedger) with a one-minute
/// window would; a new key's class is read from its name
/// (`[caller/]class`). The budget itself does not go through it: it runs the
/// same operations under the key's lock it already holds.
struct OwnLedger {
    keys: Arc<KeyMap<KeyCell>>,
    limits: LimitsConfig,
    max_keys: usize,
    idle: Duration,
    epoch: Epoch,
}

impl std::fmt::Debug for OwnLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys may be derived from callers' credentials: count them only.
        f.debug_struct("OwnLedger")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl OwnLedger {
    /// Runs `f` on the key's state at `now`, creating the key if `create`
    /// (`None` if it is unknown and not created, or the budget is full).
    fn with_key<R>(
        &self,
        key: &str,
        limits: &Limits,
        create: bool,
        f: impl FnOnce(&mut KeyState, Tick) -> R,
    ) -> Option<R> {
        let now = Instant::now();
        let cell = if create {
            let class = key
                .rsplit('/')
                .next()
                .and_then(|c| c.parse::<ModelClass>().ok())
                .unwrap_or(ModelClass::Other);
            let last_used = self.epoch.nanos(now);
            self.keys.get_or_insert(
                key,
                self.max_keys,
                self.idle / 2,
                |key| new_cell(key, class, limits, last_used),
                |cell| key_stays(cell, (now, self.epoch), self.idle, Some(&self.limits)),
            )?
        } else {
            self.keys.get(key)?
        };
        let mut ks = lock_key(&cell);
        Some(f(&mut ks, self.epoch.tick(now)))
    }
}

impl Ledger for OwnLedger {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        let answer = self.with_key(key, limits, true, |ks, now| {
            ks.last_used = now.nanos();
            ks.buckets.reserve(limits, costs, now)
        });
        LedgerFuture::ready(answer.ok_or_else(|| LedgerError::new(CallerRefusal::TooManyKeys)))
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.with_key(key, limits, false, |ks, now| {
            ks.buckets.settle(limits, delta, now);
        });
        LedgerFuture::ready(Ok(()))
    }

    fn sync(
        &self,
        key: &str,
        limits: &Limits,
        dimension: Dimension,
        sync: LimitStatus,
    ) -> LedgerFuture<()> {
        let mut statuses = [LimitStatus::default(); 3];
        statuses[dim_index(dimension)] = sync;
        self.sync_all(key, limits, statuses)
    }

    fn sync_all(&self, key: &str, limits: &Limits, statuses: [LimitStatus; 3]) -> LedgerFuture<()> {
        if statuses.iter().all(LimitStatus::is_empty) {
            return LedgerFuture::ready(Ok(()));
        }
        self.with_key(key, limits, true, |ks, now| {
            ks.buckets.sync_all(limits, statuses, now);
        });
        LedgerFuture::ready(Ok(()))
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        let state = self.with_key(key, limits, false, |ks, now| ks.buckets.state(limits, now));
        LedgerFuture::ready(Ok(state))
    }
}

/// The longest model name whose class [`class_of`] remembers.
const CLASS_KEPT_LEN: usize = 64;

/// [`ModelClass::of`] the request's model name. The last name of at most
/// [`CLASS_KEPT_LEN`] bytes seen on this thread is remembered with its
/// class: requests mostly name one model, or a few, and the class is read
/// again only when the name changes (the estimator hands out one shared
/// name per model: mostly a pointer compare).
fn class_of(model: Option<&Arc<str>>) -> ModelClass {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Arc<str>, ModelClass)>> =
            const { std::cell::RefCell::new(None) };
    }
    let Some(model) = model else {
        return ModelClass::of("");
    };
    if model.len() > CLASS_KEPT_LEN {
        return ModelClass::of(model);
    }
    LAST.with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return ModelClass::of(model);
        };
        if let Some((name, class)) = last.as_ref() {
            if Arc::ptr_eq(name, model) || **name == **model {
                return *class;
            }
        }
        let class = ModelClass::of(model);
        *last = Some((Arc::clone(model), class));
        class
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::TokenBudgetLayer;

    fn settings(min_samples: usize) -> Settings {
        let layer = TokenBudgetLayer::builder()
            .output_ratio_min_samples(min_samples)
            .output_quantile(0.5)
            .build();
        layer.shared.settings.clone()
    }

    /// A request without a caller is found under its class's name by the
    /// hash computed when the budget was made: each class's is its name's,
    /// at the class's place.
    #[test]
    fn each_class_key_is_found_by_its_names_hash() {
        let layer = TokenBudgetLayer::builder().build();
        let shared = &layer.shared;
        for (i, class) in ModelClass::ALL.into_iter().enumerate() {
            assert_eq!(class as usize, i, "{class}");
            assert_eq!(
                shared.class_hashes[i],
                shared.keys.hash(class.as_str()),
                "{class}"
            );
        }
    }

    /// The class a request is charged under is its model name's, whatever
    /// names came before it on the thread (the same name shared or copied,
    /// another name, one too long to remember, none).
    #[test]
    fn a_remembered_class_is_the_class_of_the_name() {
        let names = [
            "claude-sonnet-4-5",
            "claude-3-5-haiku-latest",
            "claude-opus-4-1-20250805",
            "claude-sonnet-4-5",
            "claude-2.1",
            "",
        ];
        let long = format!("claude-haiku-4-5-{}", "x".repeat(CLASS_KEPT_LEN));
        let shared: Vec<Arc<str>> = names.iter().map(|n| Arc::from(*n)).collect();
        for round in 0..3 {
            for (i, name) in names.iter().chain([&long.as_str()]).enumerate() {
                let arc: Arc<str> = match shared.get(i) {
                    Some(a) if round != 1 => Arc::clone(a),
                    _ => Arc::from(*name),
                };
                assert_eq!(class_of(Some(&arc)), ModelClass::of(name), "{name}");
                assert_eq!(class_of(Some(&arc)), ModelClass::of(name), "{name}");
            }
            assert_eq!(class_of(None), ModelClass::of(""));
        }
        assert_eq!(ModelClass::of(&long), ModelClass::Haiku45);
    }

    /// A key's state stays small: a gateway holds one per caller and model
    /// class (with its name and the map's slot: under 256 bytes).
    #[test]
    fn a_key_entry_is_small() {
        assert!(std::mem::size_of::<KeyState>() <= 160);
        assert!(std::mem::size_of::<KeyCell>() <= 184);
    }

    /// The first two outputs are kept inline and moved, exact, into the
    /// windows created by the third: the learned ratio is the one a window
    /// fed from the start gives.
    #[test]
    fn early_outputs_move_into_the_window_exactly() {
        let settings = settings(3);
        let mut ks = KeyState::new(ModelClass::Other, &Limits::new().rpm(10), 0);
        let outputs = [(200, 1_000), (700, 1_000), (450, 1_000), (50, 1_000)];
        ks.push_output(outputs[0].0, outputs[0].1, &settings);
        ks.push_output(outputs[1].0, outputs[1].1, &settings);
        assert!(ks.output_ratio.is_none(), "no window for two samples");
        assert_eq!(ks.expected_ratio(&settings), settings.output_ratio_prior);
        ks.push_output(outputs[2].0, outputs[2].1, &settings);
        let mut direct = SlidingQuantile::new(settings.output_ratio_window);
        for (o, m) in &outputs[..3] {
            direct.push(*o as f64 / *m as f64);
        }
        assert_eq!(ks.output_ratio.as_ref().map(|s| s.seen), Some(3));
        assert_eq!(Some(ks.expected_ratio(&settings)), direct.quantile(0.5));
        assert_eq!(ks.expected_ratio(&settings), 0.45);
        ks.push_output(outputs[3].0, outputs[3].1, &settings);
        direct.push(0.05);
        assert_eq!(Some(ks.expected_ratio(&settings)), direct.quantile(0.5));
    }

    /// With a ratio learned from the first samples, no output is held
    /// inline (the windows are created at once).
    #[test]
    fn one_sample_needed_creates_the_window_at_once() {
        let settings = settings(1);
        let mut ks = KeyState::new(ModelClass::Other, &Limits::new().rpm(10), 0);
        ks.push_output(300, 1_000, &settings);
        assert_eq!(ks.expected_ratio(&settings), 0.3);
    }

    /// The expected output is the smaller of the ratio's share of
    /// `max_tokens` and the learned output in tokens: answers of 300
    /// tokens under `max_tokens` from 512 to 4,096 expect 300 of a request
    /// of 4,096 (the ratio alone says about 900), and of a request of 256
    /// the ratio's share (the tokens alone say more than it may produce).
    #[test]
    fn the_expected_output_is_the_tighter_of_ratio_and_tokens() {
        let settings = settings(1);
        let mut ks = KeyState::new(ModelClass::Other, &Limits::new().rpm(10), 0);
        for max_tokens in [512, 1_024, 2_048, 4_096] {
            ks.push_output(300, max_tokens, &settings);
        }
        assert_eq!(ks.expected_output(&settings, 4_096), 300.0);
        let by_ratio = 256.0 * ks.expected_ratio(&settings);
        assert!(by_ratio < 300.0, "{by_ratio}");
        assert_eq!(ks.expected_output(&settings, 256), by_ratio);
        // An answer longer than `max_tokens` (it cannot be) is taken at it.
        ks.push_output(5_000, 100, &settings);
        assert_eq!(ks.output_ratio.as_ref().map(|s| s.seen), Some(5));
    }

    /// The outputs of a fleet's other budgets teach the expected output as
    /// this budget's answers do, but are not its answers: its cold input
    /// headroom (its estimator's calibration) still counts only its own,
    /// and its own first outputs stay inline until the windows exist.
    #[test]
    fn the_fleets_outputs_teach_the_output_but_are_not_own_answers() {
        let settings = settings(3);
        let mut ks = KeyState::new(ModelClass::Other, &Limits::new().rpm(10), 0);
        ks.push_output(200, 4_096, &settings);
        assert!(ks.output_ratio.is_none(), "one own output, inline");
        for _ in 0..3 {
            ks.push_fleet_output(300, 4_096, &settings);
        }
        assert_eq!(ks.expected_output(&settings, 4_096), 300.0);
        assert_eq!(ks.answers_seen(), 1);
        assert_eq!(ks.output_ratio.as_ref().map(|s| s.seen), Some(4));
        ks.push_output(100, 4_096, &settings);
        assert_eq!(ks.answers_seen(), 2);
    }
}
