//! A point-in-time view of a budget, for metrics and debugging.

use crate::Dimension;

/// The state of a budget: per key (caller and model class) and dimension, and
/// counters of the decisions taken since it was built.
///
/// Taken with [`TokenBudgetLayer::snapshot`](super::TokenBudgetLayer::snapshot)
/// or [`TokenBudget::snapshot`](super::TokenBudget::snapshot); every clone of
/// one budget reports the same state.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct BudgetSnapshot {
    /// One entry per key seen, sorted by key.
    pub keys: Vec<KeySnapshot>,
    /// Requests admitted (sent).
    pub admitted: u64,
    /// Requests that had to wait before admission (or were queued and then dropped).
    pub waited: u64,
    /// Requests refused at once because the budget could not admit them now
    /// (reject and enforce modes).
    pub rejected: u64,
    /// Requests refused because they can never fit a limit.
    pub too_large: u64,
    /// Corrections applied (settlements and refunds).
    pub settled: u64,
    /// Requests refunded entirely because the server refused them (429, 529 or 503).
    pub refunded_429: u64,
    /// Requests refunded entirely because they never reached the transport
    /// (cancelled or shed while an inner layer held them, refused by an inner
    /// layer, or the connection was refused).
    pub refunded_unsent: u64,
    /// Waiters woken by the queue (a promotion to the head, or capacity freed
    /// while at the head), not counting timer wakeups.
    pub wakeups: u64,
}

impl BudgetSnapshot {
    /// The entry of one key, if it was seen.
    pub fn key(&self, key: &str) -> Option<&KeySnapshot> {
        self.keys.iter().find(|k| k.key == key)
    }
}

/// The state of one budget key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct KeySnapshot {
    /// The key: the model class, prefixed by `caller/` when a key extractor
    /// named a caller.
    pub key: String,
    /// Requests, input tokens, output tokens, in that order.
    pub dimensions: [DimensionSnapshot; 3],
    /// Requests waiting in this key's queue now.
    pub waiting: usize,
    /// The calibration factor the estimator applied to the latest estimate
    /// (`input_tokens / raw_input_tokens`), if it had a raw estimate.
    pub calibration_factor: Option<f64>,
    /// Estimates made from the body's length only (body not JSON, not a
    /// Messages request, or too large to buffer).
    pub fallback_estimates: u64,
    /// Estimates made in all.
    pub estimates: u64,
    /// The share of `max_tokens` reserved as expected output in realtime mode
    /// (the prior until enough responses were seen, then the learned quantile).
    pub expected_output_ratio: f64,
}

impl KeySnapshot {
    /// The state of one dimension.
    pub fn dimension(&self, dimension: Dimension) -> &DimensionSnapshot {
        let [r, i, o] = &self.dimensions;
        match dimension {
            Dimension::Requests => r,
            Dimension::InputTokens => i,
            Dimension::OutputTokens => o,
        }
    }
}

/// The state of one bucket of a key.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct DimensionSnapshot {
    /// Which limit.
    pub dimension: Dimension,
    /// The limit per minute in force, configured or learned; `None` while unknown
    /// (the dimension is then not paced).
    pub limit: Option<u64>,
    /// Whether the limit was learned from the server's headers.
    pub learned: bool,
    /// What is available now (negative after an over-charge); `None` if the
    /// ledger does not hold the key, infinite while the limit is unknown.
    pub remaining: Option<f64>,
    /// The bucket's capacity; `None` if the ledger does not hold the key.
    pub capacity: Option<f64>,
}
