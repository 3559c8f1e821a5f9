//! [`Pool`]: one service over several upstreams (Anthropic keys or
//! workspaces, or any endpoint that speaks the Messages API), each paced by
//! its own budget, with routing to the upstream that can admit a request
//! soonest, cache affinity, failover, draining and an opt-in model fallback.
//!
//! One key shares one tier's limits; several keys (or workspaces, or
//! providers) behind one service raise the ceiling to the sum of their
//! limits. The pool is a tower [`Service`] over a transport (any
//! `Service<Request<Full<Bytes>>>`, a hyper-util client for example), with a
//! [`PoolLayer`] to build it in a `ServiceBuilder`.
//!
//! # Each upstream
//!
//! An [`Upstream`] has a base URL and a key (sent as `x-api-key`, never
//! printed), an optional model-name map, a weight, and its own layers around
//! the transport, as the [`preset`](crate::preset) orders them:
//! `RetryAfter -> TokenBudget -> Concurrency -> transport`. Its
//! [`RetryAfterLayer`](crate::retry::RetryAfterLayer) makes no retry
//! (`max_retries(0)`: the pool fails over instead) but keeps its shared
//! cooldown after a 429 or 529 that names a delay, and tells the spend-cap
//! 429 apart.
//!
//! # Routing
//!
//! The pool reads the request's body once (up to
//! [`PoolBuilder::buffer_limit`], 32 MiB by default), estimates it once
//! (with [`PoolBuilder::estimator`], by default an
//! [`AnthropicEstimator`]), and asks
//! each upstream in rotation how long until it could admit it: the longest
//! of its retry cooldown and, for each of requests, input tokens and output
//! tokens of the request's model class, the time its bucket needs to refill
//! what this request and the requests already routed there but not yet
//! admitted need beyond what it holds. The request goes to the upstream with
//! the shortest wait; among upstreams that would all admit at once (or
//! within a millisecond of each other), to the one with the fewest requests
//! waiting, then the fewest routed, per unit of [weight](Upstream::weight).
//! The request then waits in that upstream's budget queue, in order.
//!
//! While it waits there, unsent, it looks again every second: if another
//! upstream not yet tried would admit it more than 5 s sooner than its turn
//! can come where it waits (the affinity threshold instead, if its prompt
//! cache is there), it leaves the queue (giving back anything reserved for
//! it) and goes there; at most 3 times per request. Estimates are off, and
//! requests are cancelled: without this an upstream can sit idle at the end
//! of a burst while another still has a queue. An upstream that answered the
//! request only a 429 or a 529 counts as not tried here: the request fails
//! over elsewhere first, but may move back to it while it waits (a 529 is
//! momentary, and a 429's `retry-after` is in that upstream's cooldown,
//! which its wait counts).
//!
//! # One estimate
//!
//! The request carries the pool's estimate to the upstream
//! ([`Estimated`](crate::estimate::Estimated)). Each upstream's default
//! budget ([`TokenBudgetLayer::anthropic`](crate::budget::TokenBudgetLayer::anthropic)
//! with its limits) is built with the pool's estimator, so it charges that
//! estimate instead of estimating the body again; its `count_tokens` mode
//! still applies, and every upstream's responses calibrate the one
//! estimator. A budget given with [`Upstream::budget`] does the same if it
//! has the pool's estimator (the same `Arc`), else estimates the body
//! itself. The estimator's prompt-cache records are one for the pool, but a
//! cache lives in one upstream: a request's expected cache reads, and the
//! prefixes it may come to read while it waits (written by a request in
//! flight, or confirmed since it was estimated), are kept only on the
//! upstream its affinity key (below) last went to, and charged as input
//! elsewhere.
//!
//! # Cache affinity
//!
//! A prompt cache lives in one organization or workspace: a prefix that one
//! upstream has cached is cheap there only. A request that carries a
//! `cache_control` breakpoint has an affinity key, a hash of its `model`,
//! `tools`, `system` and first message (the prefix its cache entries start
//! with, the same across a conversation's turns). The pool remembers the
//! upstream each key last went to, for 5 minutes (the API's default cache
//! lifetime), and sends the request there again **unless another upstream
//! would admit it more than the affinity threshold sooner**
//! ([`PoolBuilder::affinity_threshold`], 5 s by default: a cache hit saves
//! most of the prefix's input tokens, worth a few seconds of wait, not a
//! long queue behind a saturated upstream).
//!
//! # Failover
//!
//! An attempt that ends in a 429, a 529, another 5xx, a 408, a connection
//! error, or any error of the upstream's layers (its retry cooldown too
//! long, a request that can never fit its limits, ...) is sent again to
//! another upstream, from the buffered body (bodies are replayable), at most
//! [`PoolBuilder::max_attempts`] attempts in all (default 4); each upstream
//! is tried once before any is tried again. The pool only fails over before
//! it hands the response to its caller: once a response's head is returned
//! (a stream has begun), it is never retried, and an error in the middle of
//! a stream reaches the caller as it is.
//!
//! # Draining
//!
//! An upstream that answers the spend-cap 429 (`enforced_spend_limit_reached`),
//! a 401 or a 403 is taken out of rotation for
//! [`PoolBuilder::drain_for`] (5 minutes by default), reported (a `warn`
//! event and [`UpstreamSnapshot::drained`]), and tried again after that
//! time; the request goes to another upstream. With every upstream drained,
//! a request fails at once with [`PoolError::AllDrained`].
//!
//! # Model fallback (opt-in)
//!
//! With [`PoolBuilder::fallback`] configured, a request that opts in (the
//! [`AllowFallback`] extension, or the header
//! `x-llm-limits-allow-fallback: true`, removed before sending) and that
//! every upstream would keep waiting longer than the bound is sent as the
//! fallback model instead. Every response carries `x-llm-limits-upstream`
//! (the upstream's name) and `x-llm-limits-model` (the model sent, as the
//! caller names it, before the upstream's model map).
//!
//! # Observability
//!
//! [`Pool::snapshot`] gives per upstream its budget, retry and concurrency
//! snapshots, its drain state and counters, and counters for the pool.
//! `tracing` events: `info` on each failover, `warn` on each drain, `info`
//! when a drained upstream returns. No key is ever printed.
//!
//! # Examples
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceExt};
//! use tower_llm_limits::budget::Tier;
//! use tower_llm_limits::pool::{Pool, Upstream};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_llm_limits::BoxError> {
//! // The transport: a hyper-util client in real use. Here `a` is
//! // overloaded and `b` answers.
//! let transport = service_fn(|req: Request<Full<Bytes>>| async move {
//!     assert!(req.headers().contains_key("x-api-key"));
//!     if req.uri().host() == Some("a.example") {
//!         let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
//!         let mut response = Response::new(Full::new(Bytes::from(body)));
//!         *response.status_mut() = http::StatusCode::from_u16(529)?;
//!         return Ok::<_, tower_llm_limits::BoxError>(response);
//!     }
//!     let body = r#"{"type":"message","usage":{"input_tokens":9,"output_tokens":2}}"#;
//!     Ok(Response::new(Full::new(Bytes::from(body))))
//! });
//! let pool = Pool::builder()
//!     .upstream(Upstream::new("a", "https://a.example", Tier::Tier1)?.key("sk-a")?)
//!     .upstream(Upstream::new("b", "https://b.example", Tier::Tier1)?.key("sk-b")?)
//!     .build(transport)?;
//! let request = Request::post("/v1/messages").body(Full::new(Bytes::from_static(
//!     br#"{"model":"claude-sonnet-4-5","max_tokens":32,"messages":[{"role":"user","content":"Hi"}]}"#,
//! )))?;
//! // The first request goes to `a`, gets a 529, and fails over to `b`.
//! let response = pool.clone().oneshot(request).await?;
//! assert_eq!(response.headers()["x-llm-limits-upstream"], "b");
//! let _ = response.into_body().collect().await?;
//! let snapshot = pool.snapshot();
//! assert_eq!((snapshot.failovers, snapshot.upstreams[1].succeeded), (1, 1));
//! # Ok(())
//! # }
//! ```
//!
//! # What it deliberately does not do
//!
//! - Pending costs (routed, not yet admitted) are counted per upstream, not
//!   per model class: a pool that mixes classes sees a little more wait than
//!   there is on an upstream busy with another class.
//! - It does not retry on the same upstream: a failed attempt goes to
//!   another, and the last failure is returned.

mod call;
mod route;
mod snapshot;
mod upstream;

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::Full;
use tower_layer::Layer;
use tower_service::Service;

pub use snapshot::{PoolSnapshot, UpstreamSnapshot};
pub use upstream::{Address, Admit, Upstream, UpstreamFuture, UpstreamService};

use crate::budget::TokenBudgetBuilder;
use crate::concurrency::{ConcurrencyBuilder, ConcurrencyLayer};
use crate::estimate::{AnthropicEstimator, TokenEstimator};
use crate::BoxError;

/// The body of a pool's responses: the upstream's body, boxed.
pub type PoolBody = UnsyncBoxBody<Bytes, BoxError>;

/// The request header by which a request opts in to the model fallback
/// (value `true`); removed before the request is sent.
pub const ALLOW_FALLBACK_HEADER: &str = "x-llm-limits-allow-fallback";
/// The response header naming the upstream that answered.
pub const UPSTREAM_HEADER: &str = "x-llm-limits-upstream";
/// The response header naming the model the request was sent as (before
/// the upstream's model map).
pub const MODEL_HEADER: &str = "x-llm-limits-model";

/// The default for [`PoolBuilder::affinity_threshold`].
pub const DEFAULT_AFFINITY_THRESHOLD: Duration = Duration::from_secs(5);
/// The default for [`PoolBuilder::drain_for`].
pub const DEFAULT_DRAIN_FOR: Duration = Duration::from_secs(5 * 60);
/// The default for [`PoolBuilder::max_attempts`].
pub const DEFAULT_MAX_ATTEMPTS: usize = 4;
/// The default for [`PoolBuilder::buffer_limit`]: the API's own request
/// size limit (32 MB).
pub const DEFAULT_BUFFER_LIMIT: usize = 32 * 1024 * 1024;

/// A request extension by which a request opts in to the model fallback
/// (like the header [`ALLOW_FALLBACK_HEADER`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllowFallback;

/// Why an upstream was drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DrainReason {
    /// A 429 with `enforced_spend_limit_reached`: the key's spend cap.
    SpendLimit,
    /// A 401: the key is not accepted.
    Unauthorized,
    /// A 403: the key may not do this.
    Forbidden,
}

impl DrainReason {
    /// A short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainReason::SpendLimit => "spend_limit",
            DrainReason::Unauthorized => "unauthorized",
            DrainReason::Forbidden => "forbidden",
        }
    }
}

/// An error of the pool itself (upstreams' errors are passed on as they are).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolError {
    /// The pool has no upstream.
    NoUpstreams,
    /// Two upstreams have the same name.
    DuplicateName {
        /// The name.
        name: String,
    },
    /// An upstream's base URL cannot be used.
    InvalidBaseUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An upstream's key is not a valid header value (the key is not shown).
    InvalidKey {
        /// The upstream's name.
        upstream: String,
    },
    /// The fallback model's bound is zero or the model name is empty.
    InvalidFallback,
    /// The request's body is larger than the pool buffers; it was not sent.
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Every upstream is drained; the first returns in `retry_in`.
    AllDrained {
        /// Until the first upstream is back in rotation.
        retry_in: Duration,
    },
    /// The request's upstream was drained while the request waited for its
    /// budget: it was not sent there (the pool sends it to another).
    Drained,
    /// A request reached an upstream's transport layer without the pool's
    /// buffered body (the upstream's layers were used outside a pool).
    NotBuffered,
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::NoUpstreams => f.write_str("pool: no upstream configured"),
            PoolError::DuplicateName { name } => {
                write!(f, "pool: two upstreams are named {name:?}")
            }
            PoolError::InvalidBaseUrl { url, reason } => {
                write!(f, "pool: base URL {url:?} cannot be used: {reason}")
            }
            PoolError::InvalidKey { upstream } => {
                write!(
                    f,
                    "pool: the key of upstream {upstream:?} is not a valid header value"
                )
            }
            PoolError::InvalidFallback => {
                f.write_str("pool: the fallback needs a model name and a bound above zero")
            }
            PoolError::BodyTooLarge { limit } => {
                write!(f, "pool: request body above {limit} bytes; not sent")
            }
            PoolError::AllDrained { retry_in } => write!(
                f,
                "pool: every upstream is drained; the first returns in {:.0} s",
                retry_in.as_secs_f64().ceil()
            ),
            PoolError::Drained => f.write_str("pool: the upstream was drained; not sent"),
            PoolError::NotBuffered => f.write_str("pool: request without the pool's buffered body"),
        }
    }
}

impl std::error::Error for PoolError {}

/// The model fallback: which model, and after how long a wait.
#[derive(Debug, Clone)]
pub(crate) struct Fallback {
    pub(crate) model: String,
    pub(crate) after: Duration,
}

/// Builds a [`Pool`] or a [`PoolLayer`].
#[derive(Clone)]
pub struct PoolBuilder {
    upstreams: Vec<Upstream>,
    affinity_threshold: Duration,
    drain_for: Duration,
    max_attempts: usize,
    buffer_limit: usize,
    fallback: Option<Fallback>,
    estimator: Option<Arc<dyn TokenEstimator>>,
}

impl fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("upstreams", &self.upstreams)
            .field("affinity_threshold", &self.affinity_threshold)
            .field("drain_for", &self.drain_for)
            .field("max_attempts", &self.max_attempts)
            .field("buffer_limit", &self.buffer_limit)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl Default for PoolBuilder {
    fn default() -> Self {
        PoolBuilder {
            upstreams: Vec::new(),
            affinity_threshold: DEFAULT_AFFINITY_THRESHOLD,
            drain_for: DEFAULT_DRAIN_FOR,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            buffer_limit: DEFAULT_BUFFER_LIMIT,
            fallback: None,
            estimator: None,
        }
    }
}

impl PoolBuilder {
    /// Adds an upstream.
    pub fn upstream(mut self, upstream: Upstream) -> Self {
        self.upstreams.push(upstream);
        self
    }

    /// How much sooner another upstream must admit a request for it to
    /// leave the upstream that holds its prompt cache (default 5 s).
    pub fn affinity_threshold(mut self, threshold: Duration) -> Self {
        self.affinity_threshold = threshold;
        self
    }

    /// How long an upstream stays out of rotation after a spend-cap 429, a
    /// 401 or a 403 (default 5 minutes).
    pub fn drain_for(mut self, time: Duration) -> Self {
        self.drain_for = time;
        self
    }

    /// Attempts per request across upstreams, the first included (default
    /// 4, at least 1).
    pub fn max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The largest request body the pool buffers (default 32 MiB); a larger
    /// one fails with [`PoolError::BodyTooLarge`], unsent.
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self
    }

    /// Opt-in model fallback: a request that allows it (see the module
    /// docs) and that every upstream would keep waiting longer than `after`
    /// is sent as `model` instead.
    pub fn fallback(mut self, model: impl Into<String>, after: Duration) -> Self {
        self.fallback = Some(Fallback {
            model: model.into(),
            after,
        });
        self
    }

    /// The estimator the pool routes with (default: a new
    /// [`AnthropicEstimator`]). Each upstream's default budget shares it,
    /// so that a request is estimated once and calibration learns from every
    /// upstream's responses; see [`Upstream::budget`] for a budget of your
    /// own.
    pub fn estimator(mut self, estimator: Arc<dyn TokenEstimator>) -> Self {
        self.estimator = Some(estimator);
        self
    }

    fn validate(&self) -> Result<(), PoolError> {
        if self.upstreams.is_empty() {
            return Err(PoolError::NoUpstreams);
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            if self.upstreams[..i].iter().any(|o| o.name == u.name) {
                return Err(PoolError::DuplicateName {
                    name: u.name.to_string(),
                });
            }
        }
        if let Some(f) = &self.fallback {
            if f.model.is_empty() || f.after.is_zero() {
                return Err(PoolError::InvalidFallback);
            }
        }
        Ok(())
    }

    /// A layer that builds the pool over a transport.
    ///
    /// # Errors
    ///
    /// [`PoolError::NoUpstreams`], [`PoolError::DuplicateName`],
    /// [`PoolError::InvalidFallback`].
    pub fn into_layer(self) -> Result<PoolLayer, PoolError> {
        self.validate()?;
        let estimator = self
            .estimator
            .unwrap_or_else(|| Arc::new(AnthropicEstimator::new()));
        let upstreams = self
            .upstreams
            .into_iter()
            .map(|mut u| {
                if let Some(limits) = u.default_budget.take() {
                    u.budget = TokenBudgetBuilder::anthropic(limits)
                        .estimator(Arc::clone(&estimator))
                        .build();
                }
                Arc::new(upstream::UpstreamState::new(u))
            })
            .collect();
        Ok(PoolLayer {
            shared: Arc::new(Shared {
                upstreams,
                affinity_threshold: self.affinity_threshold,
                drain_for: self.drain_for,
                max_attempts: self.max_attempts,
                buffer_limit: self.buffer_limit,
                fallback: self.fallback,
                estimator,
                hasher: RandomState::new(),
                affinity: Mutex::new(route::Affinity::default()),
                counters: Counters::default(),
            }),
        })
    }

    /// The pool over `transport` (cloned once per upstream).
    ///
    /// # Errors
    ///
    /// As [`PoolBuilder::into_layer`].
    pub fn build<S: Clone>(self, transport: S) -> Result<Pool<S>, PoolError> {
        Ok(self.into_layer()?.layer(transport))
    }
}

/// What every clone of a pool shares.
pub(crate) struct Shared {
    pub(crate) upstreams: Vec<Arc<upstream::UpstreamState>>,
    pub(crate) affinity_threshold: Duration,
    pub(crate) drain_for: Duration,
    pub(crate) max_attempts: usize,
    pub(crate) buffer_limit: usize,
    pub(crate) fallback: Option<Fallback>,
    pub(crate) estimator: Arc<dyn TokenEstimator>,
    pub(crate) hasher: RandomState,
    pub(crate) affinity: Mutex<route::Affinity>,
    pub(crate) counters: Counters,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("upstreams", &self.upstreams.len())
            .field("affinity_threshold", &self.affinity_threshold)
            .field("drain_for", &self.drain_for)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// The pool's own counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) failovers: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) affinity_routed: AtomicU64,
    pub(crate) affinity_overridden: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
    pub(crate) moved: AtomicU64,
}

/// A [`Layer`] that builds a [`Pool`] over a transport. Clones share the
/// upstreams' state (budgets, cooldowns, drains).
#[derive(Debug, Clone)]
pub struct PoolLayer {
    shared: Arc<Shared>,
}

impl PoolLayer {
    /// The state of the pool and of each upstream.
    pub fn snapshot(&self) -> PoolSnapshot {
        snapshot::of(&self.shared)
    }
}

impl<S: Clone> Layer<S> for PoolLayer {
    type Service = Pool<S>;

    fn layer(&self, transport: S) -> Pool<S> {
        let services = self
            .shared
            .upstreams
            .iter()
            .map(|u| upstream::stack(&u.config, transport.clone()))
            .collect();
        Pool {
            shared: Arc::clone(&self.shared),
            services: Arc::new(Mutex::new(services)),
        }
    }
}

/// One service over several upstreams: see the [module docs](self).
pub struct Pool<S> {
    shared: Arc<Shared>,
    /// Behind a lock so that the pool is `Sync` whatever the transport;
    /// held only to clone one upstream's service.
    services: Arc<Mutex<Vec<UpstreamService<S>>>>,
}

impl<S> Clone for Pool<S> {
    fn clone(&self) -> Self {
        Pool {
            shared: Arc::clone(&self.shared),
            services: Arc::clone(&self.services),
        }
    }
}

impl<S> fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl Pool<()> {
    /// A builder with no upstream and every setting at its default.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }
}

impl<S> Pool<S> {
    /// The state of the pool and of each upstream.
    pub fn snapshot(&self) -> PoolSnapshot {
        snapshot::of(&self.shared)
    }

    /// Sends a request through the pool: the same as `Service::call` (the
    /// pool is always ready), from `&self`.
    ///
    /// Prefer it in a spawned task when the transport's error or body error
    /// is [`BoxError`] itself: the future is the concrete [`PoolFuture`], so
    /// the task's future holds no `<Pool<S> as Service<_>>::Future`
    /// projection, which rustc cannot prove `Send` there ("implementation of
    /// `From` is not general enough").
    pub fn send<B, ResB>(&self, request: Request<B>) -> PoolFuture
    where
        S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let shared = Arc::clone(&self.shared);
        let services = Arc::clone(&self.services);
        Box::pin(call::serve(shared, services, request))
    }
}

/// The future of a [`Pool`]'s response.
pub type PoolFuture = Pin<Box<dyn Future<Output = Result<Response<PoolBody>, BoxError>> + Send>>;

impl<S, B, ResB> Service<Request<B>> for Pool<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<PoolBody>;
    type Error = BoxError;
    type Future = PoolFuture;

    /// Always ready: each upstream's readiness is awaited in the response
    /// future, once the upstream is chosen.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.send(request)
    }
}

/// The concurrency layer of an upstream by default: the preset's.
pub(crate) fn default_concurrency() -> ConcurrencyLayer {
    ConcurrencyBuilder::adaptive(1..=64)
        .initial_limit(4)
        .latency_tolerance(None)
        .build()
        .unwrap_or_else(|_| ConcurrencyLayer::adaptive(1..=64))
}
