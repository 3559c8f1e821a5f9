//! Limits per model class, published tier presets, and the output-token rule.
//!
//! (Contract: the types below are fixed; their constructors, presets and docs
//! are completed by the ledger work.)

/// Per-minute limits of one model class. `None` means not configured: the
/// budget then learns the limit from the server's `anthropic-ratelimit-*`
/// headers and does not pace that dimension until it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Uncached input tokens per minute.
    pub input_tokens_per_minute: Option<u64>,
    /// Output tokens per minute.
    pub output_tokens_per_minute: Option<u64>,
}

/// How output tokens are charged, a setting because the API's docs changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputMode {
    /// Only tokens really produced count (the current rule). The budget
    /// reserves an expected output, learned per model, and settles to the truth.
    #[default]
    Realtime,
    /// `max_tokens` is debited at admission and the difference refunded when
    /// the response ends (the older rule).
    Reserve,
}
