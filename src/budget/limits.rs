//! Limits per model class, published tier presets, and the output-token rule.
//!
//! (Contract: the types below are fixed; their constructors, presets and docs
//! are completed by the ledger work.)

use crate::Dimension;

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

impl Limits {
    /// Limits for all three dimensions, per minute.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::limits::Limits;
    /// let limits = Limits::new(50, 30_000, 8_000);
    /// assert_eq!(limits.input_tokens_per_minute, Some(30_000));
    /// ```
    pub const fn new(
        requests_per_minute: u64,
        input_tokens_per_minute: u64,
        output_tokens_per_minute: u64,
    ) -> Self {
        Limits {
            requests_per_minute: Some(requests_per_minute),
            input_tokens_per_minute: Some(input_tokens_per_minute),
            output_tokens_per_minute: Some(output_tokens_per_minute),
        }
    }

    /// No limit configured: every limit is learned from the server's headers.
    pub const fn unknown() -> Self {
        Limits {
            requests_per_minute: None,
            input_tokens_per_minute: None,
            output_tokens_per_minute: None,
        }
    }

    /// With the requests-per-minute limit set.
    pub const fn with_requests_per_minute(mut self, limit: u64) -> Self {
        self.requests_per_minute = Some(limit);
        self
    }

    /// With the input-tokens-per-minute limit set.
    pub const fn with_input_tokens_per_minute(mut self, limit: u64) -> Self {
        self.input_tokens_per_minute = Some(limit);
        self
    }

    /// With the output-tokens-per-minute limit set.
    pub const fn with_output_tokens_per_minute(mut self, limit: u64) -> Self {
        self.output_tokens_per_minute = Some(limit);
        self
    }

    /// The configured limit of one dimension.
    pub const fn get(&self, dimension: Dimension) -> Option<u64> {
        match dimension {
            Dimension::Requests => self.requests_per_minute,
            Dimension::InputTokens => self.input_tokens_per_minute,
            Dimension::OutputTokens => self.output_tokens_per_minute,
        }
    }
}
