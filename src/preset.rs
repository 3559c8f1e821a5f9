//! The recommended stack in one call: `RetryAfter -> TokenBudget -> Concurrency`.
//!
//! [`LimitsLayer::anthropic`] builds the three layers this
//! crate is made of, in the order that works, with defaults chosen for
//! Anthropic's Messages API:
//!
//! | layer | default | why |
//! |---|---|---|
//! | [`RetryAfterLayer`] (outermost) | [`RetryAfterLayer::anthropic`]: 4 retries, full-jitter backoff 0.5 s doubling to 8 s, server delays waited up to 60 s, bodies up to 16 MiB replayed, one cooldown shared by clones, tower's retry budget, no deadline, a give-up answered with an error that carries the last response ([`GiveUpPolicy::Error`](crate::retry::GiveUpPolicy::Error)) | outermost, so every attempt is paced and counted again by the budget, and its deadline bounds the budget's and the concurrency queue's waits too |
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
//! let through; each waiting request costs about 0.5 to 0.9 KB besides the
//! request itself (the three layers' state, and the head the retry layer
//! keeps to send it again: 523 bytes measured for a request of two headers,
//! 883 for one of six; a burst of 50,000 queues 26 to 45 MB).
//! To fail fast instead, replace the concurrency layer with one whose
//! [`max_waiting`](ConcurrencyBuilder::max_waiting) is bounded: a
//! request past the bound fails at once with
//! [`Error::Overloaded`](crate::Error::Overloaded), a local error that the
//! retry layer neither retries nor charges to its retry budget, and whose
//! reservation the budget gives back in full (the request was never sent).
//!
//! # When it gives up
//!
//! By default a request the retry layer gives up on fails with
//! [`Error::RetriesExhausted`](crate::Error::RetriesExhausted), whose
//! [`last_response`](crate::Error::last_response) keeps the last answer's
//! status, headers, `request-id` and body: the preset is first a client's
//! stack, and a client acts on a typed error, as the official SDKs raise
//! one. A gateway that forwards its upstream's answers sets
//! [`GiveUpPolicy::LastResponse`](crate::retry::GiveUpPolicy::LastResponse)
//! so that its callers get the API's own 429 or 529 as it came:
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_limits::budget::Tier;
//! use tower_llm_limits::preset::LimitsLayer;
//! use tower_llm_limits::retry::{GiveUpPolicy, RetryAfterLayer};
//!
//! let upstream = LimitsLayer::anthropic(Tier::Tier2).with_retry(
//!     RetryAfterLayer::builder()
//!         .give_up(GiveUpPolicy::LastResponse)
//!         // The whole request, budget waits included, within two minutes.
//!         .deadline(Duration::from_secs(120))
//!         .build(),
//! );
//! # let _ = upstream;
//! ```
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
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ReplayBody;
use crate::budget::{ConfigError, LimitsConfig, TokenBudget, TokenBudgetLayer};
use crate::concurrency::{Concurrency, ConcurrencyBuilder, ConcurrencyLayer};
use crate::retry::{RetryAfter, RetryAfterLayer};
use crate::BoxError;

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

/// The request body the transport under [`Limited`] receives when the stack
/// is called with bodies of type `B`: the retry layer's replayable body
/// around the budget's. A hyper-util client under the preset is a
/// `Client<C, TransportBody<Full<Bytes>>>`; or see [`LimitsLayer::boxed`].
pub type TransportBody<B> = ReplayBody<ReplayBody<B>>;

/// A boxed body of bytes: what a [`BoxClient`] answers with and what its
/// transport receives.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// The preset stack over a transport, boxed: one type to store in a struct
/// or an axum state, whatever the transport. Built by
/// [`LimitsLayer::boxed`]; cheap to clone, `Send + Sync`; requests of body
/// `B` (`Full<Bytes>` unless said otherwise), answers of body [`BoxBody`].
pub struct BoxClient<B = Full<Bytes>> {
    inner: Box<dyn CloneService<B>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A cloneable, shareable service of the boxed stack.
trait CloneService<B>: Send + Sync {
    fn poll_ready_boxed(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>;
    fn call_boxed(&mut self, request: Request<B>)
        -> BoxFuture<Result<Response<BoxBody>, BoxError>>;
    fn clone_boxed(&self) -> Box<dyn CloneService<B>>;
}

impl<S, B, ResB> CloneService<B> for S
where
    S: Service<Request<B>, Response = Response<ResB>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    fn poll_ready_boxed(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.poll_ready(cx)
    }

    fn call_boxed(
        &mut self,
        request: Request<B>,
    ) -> BoxFuture<Result<Response<BoxBody>, BoxError>> {
        let future = self.call(request);
        Box::pin(async move { Ok(future.await?.map(|b| b.map_err(Into::into).boxed_unsync())) })
    }

    fn clone_boxed(&self) -> Box<dyn CloneService<B>> {
        Box::new(self.clone())
    }
}

impl<B> Clone for BoxClient<B> {
    fn clone(&self) -> Self {
        BoxClient {
            inner: self.inner.clone_boxed(),
        }
    }
}

impl<B> fmt::Debug for BoxClient<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxClient").finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for BoxClient<B> {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready_boxed(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.inner.call_boxed(request)
    }
}

/// A transport of requests of [`BoxBody`] that takes requests of any body
/// of bytes, boxing each body: what [`LimitsLayer::boxed`] puts under the
/// stack.
#[derive(Clone, Debug)]
pub struct BoxRequests<T> {
    transport: T,
}

impl<T> BoxRequests<T> {
    /// Boxes the request bodies `transport` receives.
    pub fn new(transport: T) -> Self {
        BoxRequests { transport }
    }
}

impl<T, B> Service<Request<B>> for BoxRequests<T>
where
    T: Service<Request<BoxBody>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = T::Response;
    type Error = T::Error;
    type Future = T::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.transport.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.transport
            .call(request.map(|b| b.map_err(Into::into).boxed_unsync()))
    }
}

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

    /// The recommended stack ([`anthropic`](Self::anthropic)) pacing to the
    /// limits the environment names: `ANTHROPIC_TIER` (a published tier:
    /// `1` to `4`, `tier2`, `start`, `build`, `scale`) or `ANTHROPIC_LIMITS`
    /// (explicit limits for every model class: `rpm=50,itpm=30000,otpm=8000`);
    /// with neither, every limit is learned from the server's
    /// `anthropic-ratelimit-*` headers. See [`LimitsConfig::from_env`].
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when a value does not parse, is not Unicode, or both
    /// variables are set.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use tower_llm_limits::preset::LimitsLayer;
    ///
    /// // ANTHROPIC_TIER=2 cargo run
    /// let limits = LimitsLayer::from_env()?;
    /// # let _ = limits;
    /// # Ok::<(), tower_llm_limits::budget::ConfigError>(())
    /// ```
    pub fn from_env() -> Result<Self, ConfigError> {
        LimitsConfig::from_env().map(Self::anthropic)
    }

    /// The stack over `transport`, boxed into one type to store: a
    /// [`BoxClient`] taking requests of body `B` (`Full<Bytes>` by default)
    /// and answering with a [`BoxBody`]. The transport receives requests of
    /// body [`BoxBody`] (a hyper-util `Client<C, BoxBody>`, a
    /// `ReqwestService`, any `Service<http::Request<BoxBody>>`).
    ///
    /// # Examples
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{service_fn, ServiceExt};
    /// use tower_llm_limits::budget::Tier;
    /// use tower_llm_limits::preset::{BoxBody, BoxClient, LimitsLayer};
    ///
    /// struct App {
    ///     anthropic: BoxClient, // one type, whatever the transport
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_llm_limits::BoxError> {
    /// let transport = service_fn(|_req: Request<BoxBody>| async {
    ///     let body = r#"{"type":"message","usage":{"input_tokens":9,"output_tokens":2}}"#;
    ///     Ok::<_, std::io::Error>(Response::new(Full::new(Bytes::from(body))))
    /// });
    /// let app = App { anthropic: LimitsLayer::anthropic(Tier::Tier1).boxed(transport) };
    /// let request = Request::post("https://api.anthropic.com/v1/messages")
    ///     .body(Full::new(Bytes::from_static(br#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[]}"#)))?;
    /// let response = app.anthropic.clone().oneshot(request).await?;
    /// let body = response.into_body().collect().await?.to_bytes();
    /// assert_eq!(tower_llm_limits::wire::usage_of(&body).map(|u| u.output_tokens), Some(2));
    /// # Ok(())
    /// # }
    /// ```
    pub fn boxed<T, B, R>(&self, transport: T) -> BoxClient<B>
    where
        Limited<BoxRequests<T>>: Service<Request<B>, Response = Response<R>, Error = BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
        <Limited<BoxRequests<T>> as Service<Request<B>>>::Future: Send + 'static,
        R: Body<Data = Bytes> + Send + 'static,
        R::Error: Into<BoxError>,
    {
        BoxClient {
            inner: Box::new(self.layer(BoxRequests { transport })),
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
