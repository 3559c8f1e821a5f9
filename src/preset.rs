//! The recommended stack in one call: `RetryAfter -> TokenBudget -> Concurrency`.
//!
//! [`LimitsLayer::anthropic`] builds the three layers this
//! crate is made of, in the order that works, with defaults chosen for
//! Anthropic's Messages API:
//!
//! | layer | default | why |
//! |---|---|---|
//! | [`RetryAfterLayer`] (outermost) | [`RetryAfterLayer::anthropic`]: 4 retries, full-jitter backoff 0.5 s doubling to 8 s, server delays waited up to 60 s, bodies up to 16 MiB replayed, one cooldown shared by clones, tower's retry budget | outermost, so every attempt is paced and counted again by the budget |
//! | [`TokenBudgetLayer`] | [`TokenBudgetLayer::anthropic`] with the limits you give (a [`Tier`], [`Limits`] for every model class, or a [`LimitsConfig`]): wait mode, realtime output accounting, the Anthropic estimator calibrated online | waits for RPM / ITPM / OTPM *before* a concurrency slot is taken, so a request waiting for tokens holds no slot |
//! | [`ConcurrencyLayer`] (innermost) | adaptive, 1 to 64 requests in flight, slow start from 4 (doubling per window of successes until the first drop signal), cut on 429 / 529 / 503 / timeouts; the latency signal off (answers of very different lengths make time to the head a noisy signal); no bound on the wait queue | smooths bursts and finds the parallelism the upstream takes; a slot lives until the response body ends |
//!
//! Each part can be replaced ([`LimitsLayer::with_retry`],
//! [`LimitsLayer::with_budget`], [`LimitsLayer::with_concurrency`]) and
//! inspected (their snapshots) through the layer, whose clones share every
//! piece of state: build one per API key, and clone it.
//!
//! # A burst waits
//!
//! The preset's concurrency queue has no bound: a burst of requests waits
//! for slots instead of failing locally. The token budget in front of it
//! already paces what is admitted, so the queue only holds what the budget
//! let through; each waiting request costs about 2 KB besides the request
//! itself (the three layers' state; a burst of 50,000 queues about 100 MB).
//! To fail fast instead, replace the concurrency layer with one whose
//! [`max_waiting`](ConcurrencyBuilder::max_waiting) is bounded: a
//! request past the bound fails at once with
//! [`Error::Overloaded`](crate::Error::Overloaded), a local error that the
//! retry layer neither retries nor charges to its retry budget, and whose
//! reservation the budget gives back in full (the request was never sent).
//!
//! # When to use it
//!
//! For a client (or a gateway's upstream client) of the Messages API: put it
//! over any `Service<http::Request<B>>`, a hyper-util client for example. For
//! a gateway's *own* callers, use [`TokenBudgetLayer`] in enforce mode on the
//! server instead (see the `axum_gateway` example).
//!
//! # Examples
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_llm_limits::budget::Tier;
//! use tower_llm_limits::preset::LimitsLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_llm_limits::BoxError> {
//! // Any HTTP client service; here one that answers like the API.
//! let upstream = service_fn(|_req: Request<_>| async {
//!     let body = r#"{"type":"message","usage":{"input_tokens":12,"output_tokens":3}}"#;
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
//! });
//!
//! let limits = LimitsLayer::anthropic(Tier::Tier1);
//! let client = ServiceBuilder::new().layer(limits.clone()).service(upstream);
//!
//! let request = Request::post("https://api.anthropic.com/v1/messages")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(
//!         r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}"#,
//!     )))?;
//! let response = client.oneshot(request).await?;
//! assert!(response.status().is_success());
//! let _ = response.into_body().collect().await?;
//! assert_eq!(limits.concurrency().snapshot().in_flight, 0);
//! # Ok(())
//! # }
//! ```
//!
//! # What it deliberately does not do
//!
//! - It adds no HTTP client, TLS or authentication: bring your own service and
//!   set `x-api-key` yourself (no layer logs it).
//! - It does not choose your limits: give your tier or your limits, or
//!   [`LimitsConfig::learned`] to learn them from the first responses' headers.
//! - It does not share budgets across processes (a ledger backed by a shared
//!   store is a later step).

use std::fmt;

use tower_layer::Layer;

use crate::budget::{LimitsConfig, TokenBudget, TokenBudgetLayer};
use crate::concurrency::{Concurrency, ConcurrencyBuilder, ConcurrencyLayer};
use crate::retry::{RetryAfter, RetryAfterLayer};

#[cfg(doc)]
use crate::budget::{Limits, Tier};

/// The smallest adaptive concurrency limit of the preset.
const DEFAULT_MIN_CONCURRENCY: usize = 1;
/// The largest adaptive concurrency limit of the preset.
const DEFAULT_MAX_CONCURRENCY: usize = 64;
/// Where the preset's adaptive concurrency limit starts.
const DEFAULT_INITIAL_CONCURRENCY: usize = 4;

/// The preset's bound on requests waiting for a concurrency slot: none
/// (`usize::MAX`), so that a burst waits rather than fails locally (see the
/// [module docs](self#a-burst-waits)).
const DEFAULT_MAX_WAITING: usize = usize::MAX;

/// The service [`LimitsLayer`] builds: retry over budget over concurrency over `S`.
pub type Limited<S> = RetryAfter<TokenBudget<Concurrency<S>>>;

/// A layer applying `RetryAfter -> TokenBudget -> Concurrency` (outermost
/// first) to a service. Cheap to clone; clones share all state.
#[derive(Clone)]
pub struct LimitsLayer {
    retry: RetryAfterLayer,
    budget: TokenBudgetLayer,
    concurrency: ConcurrencyLayer,
}

impl fmt::Debug for LimitsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitsLayer")
            .field("retry", &self.retry)
            .field("budget", &self.budget)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl LimitsLayer {
    /// The recommended stack for Anthropic's Messages API: the three layers
    /// with the defaults of the [module docs](self), pacing to `limits` (a
    /// [`Tier`], [`Limits`] for every model class, or a [`LimitsConfig`]).
    ///
    /// The concurrency limit is adaptive, from 1 to 64, and starts at 4 (it
    /// then doubles per window of successes until the first drop signal): 4
    /// rather than 1 because the budget already paces tokens, and against an
    /// endpoint that is not token-bound a start at 1 takes about five round
    /// trips to reach 32. Replace any layer with [`with_retry`](Self::with_retry),
    /// [`with_budget`](Self::with_budget) or
    /// [`with_concurrency`](Self::with_concurrency).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::{Limits, Tier};
    /// use tower_llm_limits::preset::LimitsLayer;
    ///
    /// let by_tier = LimitsLayer::anthropic(Tier::Tier2);
    /// let custom = LimitsLayer::anthropic(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    /// # let _ = (by_tier, custom);
    /// ```
    pub fn anthropic(limits: impl Into<LimitsConfig>) -> Self {
        LimitsLayer {
            retry: RetryAfterLayer::anthropic(),
            budget: TokenBudgetLayer::anthropic(limits),
            concurrency: default_concurrency(),
        }
    }

    /// Replaces the retry layer.
    pub fn with_retry(mut self, retry: RetryAfterLayer) -> Self {
        self.retry = retry;
        self
    }

    /// Replaces the token budget.
    pub fn with_budget(mut self, budget: TokenBudgetLayer) -> Self {
        self.budget = budget;
        self
    }

    /// Replaces the concurrency layer.
    pub fn with_concurrency(mut self, concurrency: ConcurrencyLayer) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// The retry layer (its snapshot: retries, cooldown, budget).
    pub fn retry(&self) -> &RetryAfterLayer {
        &self.retry
    }

    /// The token budget (its snapshot: remaining per dimension, waiters, calibration).
    pub fn budget(&self) -> &TokenBudgetLayer {
        &self.budget
    }

    /// The concurrency layer (its snapshot: limit, in flight, waiting).
    pub fn concurrency(&self) -> &ConcurrencyLayer {
        &self.concurrency
    }
}

fn default_concurrency() -> ConcurrencyLayer {
    ConcurrencyBuilder::adaptive(DEFAULT_MIN_CONCURRENCY..=DEFAULT_MAX_CONCURRENCY)
        .initial_limit(DEFAULT_INITIAL_CONCURRENCY)
        .latency_tolerance(None)
        .max_waiting(DEFAULT_MAX_WAITING)
        .build()
        .unwrap_or_else(|_| {
            ConcurrencyLayer::adaptive(DEFAULT_MIN_CONCURRENCY..=DEFAULT_MAX_CONCURRENCY)
        })
}

impl<S> Layer<S> for LimitsLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.retry
            .layer(self.budget.layer(self.concurrency.layer(inner)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Tier;

    #[test]
    fn defaults_are_the_documented_ones() {
        let layer = LimitsLayer::anthropic(Tier::Tier1);
        let snap = layer.concurrency().snapshot();
        // The module docs: adaptive, 1 to 64, slow start from 4.
        assert_eq!((DEFAULT_MIN_CONCURRENCY, DEFAULT_MAX_CONCURRENCY), (1, 64));
        assert_eq!(snap.limit, 4);
        assert!(snap.adaptive && snap.slow_start, "{snap:?}");
        assert_eq!(snap.in_flight, 0);
        assert_eq!(DEFAULT_MAX_WAITING, usize::MAX);
    }

    #[test]
    fn parts_can_be_replaced() {
        let layer =
            LimitsLayer::anthropic(Tier::Tier1).with_concurrency(ConcurrencyLayer::fixed(3));
        assert_eq!(layer.concurrency().snapshot().limit, 3);
    }
}
