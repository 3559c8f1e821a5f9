//! The ledger: one continuously refilling bucket per (key, dimension).
//!
//! (Contract: the trait and types below are fixed so the layer, the emulator and
//! the in-memory implementation can be written side by side; the implementation
//! and its docs are completed by the ledger work.)

use std::time::Duration;

use tokio::time::Instant;

use super::limits::Limits;
use crate::Dimension;

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
    /// Nothing was debited; the costs would fit at `at` if nothing else is
    /// reserved meanwhile. `dimension` is the limit that is furthest from fitting.
    WaitUntil {
        /// When the request could be admitted.
        at: Instant,
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
        /// The bucket's whole capacity.
        capacity: u64,
    },
}

/// What a response's `anthropic-ratelimit-<dimension>-*` headers said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitSync {
    /// `-limit`: the limit per minute.
    pub limit: Option<u64>,
    /// `-remaining`: what is left now (token counts are rounded by the API).
    pub remaining: Option<u64>,
    /// `-reset`: time until the bucket is full again.
    pub reset_in: Option<Duration>,
}

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
/// implementation backed by a shared store (a Redis Lua script) can replace the
/// in-memory one without touching the layer.
///
/// `key` names a budget (for example a caller and a model class); `limits` are
/// the configured limits for that key, passed on every call so that the ledger
/// itself holds no configuration; a `None` limit falls back to a limit learned
/// through [`Ledger::sync`], and with neither the dimension is not limited.
pub trait Ledger: Send + Sync + std::fmt::Debug + 'static {
    /// Debits `costs` in all three dimensions at once, or nothing.
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs, now: Instant) -> Reservation;

    /// Applies a correction after admission (settlement with real usage, or a refund).
    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta, now: Instant);

    /// Aligns one bucket with what the server's headers said: learns the limit
    /// if none is configured, and lowers what is available when the server
    /// says less is left (the server's view wins), without mistaking the
    /// API's rounding of token counts for a change.
    fn sync(&self, key: &str, limits: &Limits, dimension: Dimension, sync: LimitSync, now: Instant);

    /// The state of the key's three buckets (requests, input, output), if the key is known.
    fn state(&self, key: &str, limits: &Limits, now: Instant) -> Option<[BucketState; 3]>;
}
