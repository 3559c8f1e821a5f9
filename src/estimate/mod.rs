//! Token estimation for Messages requests.
//!
//! The budget must charge a request *before* it is sent, so it needs a guess of
//! what the server will charge: the uncached input tokens (ITPM), `max_tokens`
//! (OTPM in the older accounting) and the model (which bucket). This module
//! holds the contract ([`TokenEstimator`], [`Estimate`]; the server's answer
//! is a [`Usage`]) and its
//! implementation for Anthropic's Messages API, [`AnthropicEstimator`]: a
//! single pass over the body's bytes (no tree of values is built), image and
//! PDF costs from their headers, prompt-cache tracking, and online
//! [calibration](Calibration) per model from the usage of settled responses.
//!
//! Use [`AnthropicEstimator`] as it is (the budget's default), tune it with its
//! builder, or implement [`TokenEstimator`] yourself, for example with the free
//! `count_tokens` endpoint.
//!
//! # Examples
//!
//! ```
//! use tower_llm_limits::estimate::{AnthropicEstimator, TokenEstimator};
//! use tower_llm_limits::wire::Usage;
//!
//! let estimator = AnthropicEstimator::new();
//! let (parts, ()) = http::Request::post("/v1/messages").body(()).unwrap().into_parts();
//! let body = br#"{"model":"claude-sonnet-4-5","max_tokens":512,"stream":true,
//!     "system":"You are terse.",
//!     "messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]}]}"#;
//! let estimate = estimator.estimate(&parts, body);
//! assert!(estimate.stream);
//! assert!(estimate.input_tokens > 0);
//!
//! // After the response, feed back what the server counted.
//! let usage = Usage { input_tokens: 30, output_tokens: 5, ..Usage::default() };
//! estimator.observe(&estimate, &usage);
//! assert_eq!(estimator.snapshot().models[0].samples, 1);
//! ```
//!
//! # What it does not do
//!
//! No tokenizer is shipped: estimates come from a model over character
//! classes fitted offline against a byte-pair tokenizer, corrected by
//! calibration. Output tokens are not estimated beyond
//! `max_tokens` (the budget learns expected output per model itself).

use std::fmt;
use std::sync::Arc;

use http::request::Parts;

use crate::wire::Usage;

mod anthropic;
pub(crate) mod cache;
mod calibrate;
mod classes;
#[cfg(test)]
mod corpus;
mod fit;
mod media;
mod shared;

pub use anthropic::{AnthropicEstimator, AnthropicEstimatorBuilder, EstimatorSnapshot};
pub(crate) use calibrate::SlidingQuantile;
pub use calibrate::{Calibration, CalibrationConfig, ModelCalibration};
pub(crate) use shared::unsized_fleet_read;
pub use shared::SharedPromptCache;

/// The longest `model` name, in bytes, that the estimator learns from and the
/// budget admits (no model name comes near it).
///
/// A longer name is estimated but never stored (neither for calibration nor
/// in the prompt-cache records), and the budget refuses the request with
/// [`Error::ModelTooLong`](crate::Error::ModelTooLong) without sending it, so
/// that a caller cannot make the process hold large copies of its input.
pub const MAX_MODEL_LEN: usize = crate::error::MAX_MODEL_LEN;

/// What a request is expected to cost, before it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Estimate {
    /// The `model` field of the request, if it could be read (shared: the
    /// estimator hands out the same name for every request of a model,
    /// with no allocation).
    pub model: Option<Arc<str>>,
    /// Uncached input tokens the server will charge to ITPM (calibration applied).
    pub input_tokens: u64,
    /// The raw estimate of uncached input tokens before calibration, kept so
    /// that settlement can learn actual/estimate.
    pub raw_input_tokens: u64,
    /// Input tokens expected to be read from the prompt cache (not charged to
    /// ITPM for most models).
    pub cache_read_tokens: u64,
    /// The prefix counted in `cache_read_tokens` as the server counted it,
    /// when an earlier response reported it (its
    /// `cache_creation_input_tokens + cache_read_input_tokens`, for the
    /// request whose last breakpoint ended the prefix): a budget that
    /// subtracts the read from an exact count subtracts this, in the
    /// server's tokens, rather than converting the estimate.
    pub cache_read_served: Option<u64>,
    /// The request's `max_tokens`, if it could be read.
    pub max_tokens: Option<u64>,
    /// Whether the request asked for a streamed (SSE) answer.
    pub stream: bool,
    /// True when the body could not be read as a Messages request (not JSON,
    /// not an object, or too large to buffer) and the estimate is a
    /// conservative bound from its byte length.
    pub fallback: bool,
    /// The prefixes this request asks the server to cache: one per
    /// `cache_control` breakpoint whose prefix is long enough to be cached.
    /// The budget marks them as being written while the request is in flight
    /// (see cache-aware admission in [`budget`](crate::budget)).
    pub cache_writes: Vec<CachePrefix>,
    /// Prefixes of this request longer than the one counted in
    /// `cache_read_tokens` that an earlier request sent with a breakpoint and
    /// no response has confirmed yet: their write may still be in flight.
    /// With a fleet's shared prompt-cache view
    /// ([`shared_prompt_cache`](AnthropicEstimatorBuilder::shared_prompt_cache)),
    /// every longer prefix where the cache may hold one (its breakpoints and
    /// the boundaries a look-back reaches): another process may be writing
    /// it. Longest first.
    pub cache_pending: Vec<CachePrefix>,
}

/// A request prefix that ends where the prompt cache may hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CachePrefix {
    /// A keyed hash of the prefix and the model (keyed per estimator: two
    /// estimators give the same prefix different hashes, unless they share
    /// a fleet's key through
    /// [`shared_prompt_cache`](AnthropicEstimatorBuilder::shared_prompt_cache)).
    pub hash: u64,
    /// The input tokens of the whole prefix, as estimated (before
    /// calibration).
    pub tokens: u64,
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

    /// Feeds back an exact count of a request's whole prompt (input, cache
    /// writes and cache reads together), such as the API's free
    /// `count_tokens` answer, for a request this estimator estimated: a
    /// calibration sample that needs no response. The default does nothing.
    fn observe_count(&self, estimate: &Estimate, counted: u64) {
        let _ = (estimate, counted);
    }

    /// Checks again, before a new try of a request that has waited, the
    /// prompt-cache read its estimate counts (`cache_read_tokens`): a
    /// prefix that was warm when the request was estimated leaves the
    /// server's cache when its lifetime ends with no read to extend it, and
    /// a request that waited in line past that is charged for the whole
    /// prefix. Returns the estimate without that read (its tokens moved to
    /// `raw_input_tokens` and `input_tokens`), which the estimator then
    /// expects the request's usage against; `None` while the read stands,
    /// or when the estimator cannot tell (the default).
    fn recheck_cache_read(&self, estimate: &Estimate) -> Option<Estimate> {
        let _ = estimate;
        None
    }
}

/// A request extension: an estimate made before the request reached the
/// budget, and the estimator that made it.
///
/// A pool (`pool::Pool`, feature `pool`) estimates each request to route
/// it and attaches this, so that the upstream's budget does not estimate the same
/// bytes again. A [`TokenBudget`](crate::budget::TokenBudget) whose
/// estimator is the same one (the same `Arc`) charges this estimate instead
/// of estimating the body (its `count_tokens` mode still applies, and the
/// response's usage still teaches that estimator, so calibration learns as
/// usual); a budget with another estimator ignores it and estimates the body
/// itself, since its calibration and prompt-cache records are its own.
#[derive(Clone)]
pub struct Estimated {
    estimate: Estimate,
    by: Arc<dyn TokenEstimator>,
}

impl Estimated {
    /// `estimate`, made by `by`.
    pub fn new(estimate: Estimate, by: Arc<dyn TokenEstimator>) -> Self {
        Estimated { estimate, by }
    }

    /// The estimate.
    pub fn estimate(&self) -> &Estimate {
        &self.estimate
    }

    /// Whether `estimator` is the one that made the estimate (the same
    /// `Arc`).
    pub fn made_by(&self, estimator: &Arc<dyn TokenEstimator>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.by), Arc::as_ptr(estimator))
    }

    /// The estimate, taken out.
    pub fn into_estimate(self) -> Estimate {
        self.estimate
    }
}

impl fmt::Debug for Estimated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Estimated")
            .field("estimate", &self.estimate)
            .finish_non_exhaustive()
    }
}
