//! Token estimation for Messages requests.
//!
//! The contract between the budget and its estimators. The Anthropic estimator,
//! prompt-cache tracking and online calibration live in this module's children.

use http::request::Parts;

pub mod calibrate;

pub use calibrate::{Calibration, CalibrationConfig, ModelCalibration, SlidingQuantile};

/// What a request is expected to cost, before it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Estimate {
    /// The `model` field of the request, if it could be read.
    pub model: Option<String>,
    /// Uncached input tokens the server will charge to ITPM (calibration applied).
    pub input_tokens: u64,
    /// The raw estimate of uncached input tokens before calibration, kept so
    /// that settlement can learn actual/estimate.
    pub raw_input_tokens: u64,
    /// Input tokens expected to be read from the prompt cache (not charged to
    /// ITPM for most models).
    pub cache_read_tokens: u64,
    /// The request's `max_tokens`, if it could be read.
    pub max_tokens: Option<u64>,
    /// Whether the request asked for a streamed (SSE) answer.
    pub stream: bool,
    /// True when the body could not be read as a Messages request (not JSON,
    /// not an object, or too large to buffer) and the estimate is a
    /// conservative bound from its byte length.
    pub fallback: bool,
}

/// Token usage the server reported for a response (the `usage` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Uncached input tokens (after the last cache breakpoint).
    pub input_tokens: u64,
    /// Output tokens produced.
    pub output_tokens: u64,
    /// Input tokens written to the prompt cache (charged to ITPM).
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the prompt cache (not charged to ITPM for most models).
    pub cache_read_input_tokens: u64,
}

/// Estimates what a request will cost before it is sent.
///
/// Implement it to plug in your own estimate (for example one that calls the
/// free `count_tokens` endpoint).
pub trait TokenEstimator: Send + Sync + 'static {
    /// Estimates a request from its head and its whole body.
    fn estimate(&self, parts: &Parts, body: &[u8]) -> Estimate;

    /// Estimates a request whose body could not be buffered, from its head and
    /// its length if known. The result must have `fallback` set.
    fn estimate_unbuffered(&self, parts: &Parts, body_len: Option<u64>) -> Estimate;

    /// Feeds back what the server really charged for a request this estimator
    /// estimated, so it can calibrate. The default does nothing.
    fn observe(&self, estimate: &Estimate, usage: &Usage) {
        let _ = (estimate, usage);
    }
}
