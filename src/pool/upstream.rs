//! One upstream of a pool: its configuration, its layers and its state.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::Full;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::PoolError;
use crate::body::BufferedBytes;
use crate::budget::ledger::Costs;
use crate::budget::{LimitsConfig, TokenBudget, TokenBudgetLayer};
use crate::concurrency::{Concurrency, ConcurrencyLayer};
use crate::retry::{RetryAfter, RetryAfterLayer};
use crate::BoxError;

/// The header an upstream's key is sent in.
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// One upstream of a [`Pool`](super::Pool): an Anthropic key or workspace, or
/// any endpoint that speaks the Messages API.
///
/// Each upstream has its own base URL and key, an optional model-name map, a
/// weight, and its own layers: a [`TokenBudgetLayer`] (its limits, or limits
/// learned from its headers), a [`RetryAfterLayer`] whose shared cooldown
/// holds it after a 429 or 529 that names a delay (it makes no retry of its
/// own: the pool fails over instead), and a [`ConcurrencyLayer`].
///
/// The key is never printed: `Debug` shows `key: "<redacted>"`, snapshots
/// and tracing events name the upstream by its `name`.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::budget::Tier;
/// use tower_llm_limits::pool::Upstream;
///
/// let upstream = Upstream::new("workspace-a", "https://api.anthropic.com", Tier::Tier2)?
///     .key("sk-ant-example")?
///     .model("claude-sonnet-4-5", "claude-sonnet-4-5-20250929")
///     .weight(2);
/// assert!(!format!("{upstream:?}").contains("sk-ant-example"));
/// # Ok::<(), tower_llm_limits::pool::PoolError>(())
/// ```
#[derive(Clone)]
pub struct Upstream {
    pub(crate) name: Arc<str>,
    pub(crate) base: Base,
    pub(crate) key: Option<HeaderValue>,
    pub(crate) models: HashMap<String, String>,
    pub(crate) weight: u32,
    pub(crate) budget: TokenBudgetLayer,
    /// The limits of the default budget, until the pool builds it with its
    /// estimator; `None` once [`Upstream::budget`] replaced it.
    pub(crate) default_budget: Option<LimitsConfig>,
    pub(crate) retry: RetryAfterLayer,
    pub(crate) concurrency: ConcurrencyLayer,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base_url", &self.base.to_string())
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("models", &self.models)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

/// The scheme, authority and path prefix requests are sent to.
#[derive(Debug, Clone)]
pub(crate) struct Base {
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without its trailing `/` (empty for none).
    prefix: String,
}

impl fmt::Display for Base {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

impl Base {
    fn parse(url: &str) -> Result<Self, PoolError> {
        let bad = |reason: &'static str| PoolError::InvalidBaseUrl {
            url: url.to_string(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URI"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| bad("no scheme"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(bad("the scheme is neither http nor https"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL (give the key with `key`)"));
        }
        if uri.query().is_some() {
            return Err(bad("a query string"));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(Base {
            scheme,
            authority,
            prefix,
        })
    }

    /// `uri` sent to this base: its path and query after the base's prefix.
    fn rewrite(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let pq = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let pq = if self.prefix.is_empty() {
            PathAndQuery::try_from(pq)?
        } else {
            PathAndQuery::try_from(format!("{}{pq}", self.prefix))?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

impl Upstream {
    /// An upstream at `base_url` (scheme, host, optional port and path
    /// prefix, for example `https://api.anthropic.com`) with these limits (a
    /// [`Tier`](crate::budget::Tier), one [`Limits`](crate::budget::Limits)
    /// for every model class, or [`LimitsConfig::learned`]); weight 1, no key,
    /// no model map, the default layers (see [`Upstream`]).
    ///
    /// # Errors
    ///
    /// [`PoolError::InvalidBaseUrl`] for a URL that is not absolute http(s),
    /// holds credentials or a query.
    pub fn new(
        name: impl Into<String>,
        base_url: &str,
        limits: impl Into<LimitsConfig>,
    ) -> Result<Self, PoolError> {
        let base = Base::parse(base_url)?;
        let limits = limits.into();
        Ok(Upstream {
            name: Arc::from(name.into()),
            base,
            key: None,
            models: HashMap::new(),
            weight: 1,
            budget: TokenBudgetLayer::anthropic(limits.clone()),
            default_budget: Some(limits),
            retry: default_retry(),
            concurrency: super::default_concurrency(),
        })
    }

    /// The API key, sent as `x-api-key` (marked sensitive); the caller's own
    /// `x-api-key` and `authorization` headers are removed. Without a key,
    /// requests go with their own headers (an upstream that authenticates
    /// the caller itself).
    ///
    /// # Errors
    ///
    /// [`PoolError::InvalidKey`] if the key is not a valid header value
    /// (the error does not contain the key).
    pub fn key(mut self, key: impl AsRef<str>) -> Result<Self, PoolError> {
        let mut value = HeaderValue::from_str(key.as_ref()).map_err(|_| PoolError::InvalidKey {
            upstream: self.name.to_string(),
        })?;
        value.set_sensitive(true);
        self.key = Some(value);
        Ok(self)
    }

    /// Sends requests for model `from` to this upstream as model `to` (the
    /// JSON body's top-level `model` is rewritten; for example a dated name,
    /// or a Bedrock or Vertex name).
    pub fn model(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.models.insert(from.into(), to.into());
        self
    }

    /// The weight (default 1, at least 1): among upstreams that would admit a
    /// request equally soon, requests are spread in proportion to weights.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// Replaces the token budget (for example one with a shared ledger, or
    /// in reserve mode).
    ///
    /// The default budget ([`TokenBudgetLayer::anthropic`] with the limits
    /// given to [`Upstream::new`]) shares the pool's estimator, so a request
    /// is estimated once, by the pool. Give this budget the pool's estimator
    /// too ([`TokenBudgetBuilder::estimator`](crate::budget::TokenBudgetBuilder::estimator)
    /// with the `Arc` given to [`PoolBuilder::estimator`](super::PoolBuilder::estimator))
    /// for the same; with another estimator, it estimates each request again.
    pub fn budget(mut self, budget: TokenBudgetLayer) -> Self {
        self.budget = budget;
        self.default_budget = None;
        self
    }

    /// Replaces the retry layer. The pool fails over to another upstream
    /// itself; an upstream's own retries delay that, so keep
    /// `max_retries(0)` unless the upstream is alone.
    pub fn retry(mut self, retry: RetryAfterLayer) -> Self {
        self.retry = retry;
        self
    }

    /// Replaces the concurrency layer.
    pub fn concurrency(mut self, concurrency: ConcurrencyLayer) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The default retry layer of an upstream: no retry (the pool fails over),
/// the cooldown and the spend-cap detection of [`RetryAfterLayer`].
fn default_retry() -> RetryAfterLayer {
    RetryAfterLayer::builder().max_retries(0).build()
}

/// The layers of one upstream around the transport.
pub type UpstreamService<S> = RetryAfter<TokenBudget<Admit<Concurrency<Address<S>>>>>;

/// What the pool keeps per upstream at run time.
#[derive(Debug)]
pub(crate) struct UpstreamState {
    pub(crate) config: Upstream,
    /// Costs routed here and not yet admitted by its budget.
    pub(crate) pending: [AtomicU64; 3],
    /// Requests routed here and not yet admitted.
    pub(crate) pending_requests: AtomicU64,
    /// Requests routed here (attempts).
    pub(crate) routed: AtomicU64,
    pub(crate) succeeded: AtomicU64,
    pub(crate) failovers: AtomicU64,
    pub(crate) drains: AtomicU64,
    /// 429s (not the spend cap) and 529s received.
    pub(crate) received_429: AtomicU64,
    pub(crate) received_529: AtomicU64,
    /// Costs admitted by its budget (the routing estimates), per dimension.
    pub(crate) admitted: [AtomicU64; 3],
    pub(crate) drained: Mutex<Option<Drain>>,
}

/// Why and until when an upstream is out of rotation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drain {
    pub(crate) until: Instant,
    pub(crate) reason: super::DrainReason,
}

impl UpstreamState {
    pub(crate) fn new(config: Upstream) -> Self {
        UpstreamState {
            config,
            pending: Default::default(),
            pending_requests: AtomicU64::new(0),
            routed: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            drains: AtomicU64::new(0),
            received_429: AtomicU64::new(0),
            received_529: AtomicU64::new(0),
            admitted: Default::default(),
            drained: Mutex::new(None),
        }
    }

    /// The drain in force at `now`; an expired one is lifted (and logged).
    pub(crate) fn drained_at(&self, now: Instant) -> Option<Drain> {
        let mut drained = self.drained.lock().unwrap_or_else(PoisonError::into_inner);
        match *drained {
            Some(d) if d.until > now => Some(d),
            Some(_) => {
                *drained = None;
                tracing::info!(upstream = %self.config.name, "upstream back in rotation");
                None
            }
            None => None,
        }
    }

    /// Takes the upstream out of rotation for `for_`.
    pub(crate) fn drain(&self, reason: super::DrainReason, for_: Duration) {
        let until = Instant::now() + for_;
        let mut drained = self.drained.lock().unwrap_or_else(PoisonError::into_inner);
        *drained = Some(Drain { until, reason });
        self.drains.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            upstream = %self.config.name,
            reason = reason.as_str(),
            retry_in_s = for_.as_secs(),
            "upstream drained: out of rotation"
        );
    }

    /// The costs admitted by the budget so far (routing estimates).
    pub(crate) fn admitted(&self) -> Costs {
        Costs {
            requests: self.admitted[0].load(Ordering::Relaxed),
            input_tokens: self.admitted[1].load(Ordering::Relaxed),
            output_tokens: self.admitted[2].load(Ordering::Relaxed),
        }
    }

    /// The pending costs (not yet admitted by the budget).
    pub(crate) fn pending(&self) -> Costs {
        Costs {
            requests: self.pending[0].load(Ordering::Acquire),
            input_tokens: self.pending[1].load(Ordering::Acquire),
            output_tokens: self.pending[2].load(Ordering::Acquire),
        }
    }
}

/// A request's routed-but-not-admitted costs, counted in its upstream's
/// `pending` until the budget admits it or the request is dropped.
#[derive(Clone)]
pub(crate) struct Ticket(Arc<TicketInner>);

struct TicketInner {
    upstream: Arc<UpstreamState>,
    costs: Costs,
    released: AtomicBool,
}

impl Ticket {
    pub(crate) fn new(upstream: Arc<UpstreamState>, costs: Costs) -> Self {
        let c = [costs.requests, costs.input_tokens, costs.output_tokens];
        for (p, c) in upstream.pending.iter().zip(c) {
            p.fetch_add(c, Ordering::AcqRel);
        }
        upstream.pending_requests.fetch_add(1, Ordering::AcqRel);
        Ticket(Arc::new(TicketInner {
            upstream,
            costs,
            released: AtomicBool::new(false),
        }))
    }

    /// The request was admitted (or dropped): its costs leave `pending`.
    pub(crate) fn release(&self) {
        self.0.release();
    }

    /// Whether the request was admitted (or dropped).
    pub(crate) fn released(&self) -> bool {
        self.0.released.load(Ordering::Acquire)
    }

    /// The costs counted in the upstream's `pending`.
    pub(crate) fn costs(&self) -> Costs {
        self.0.costs
    }
}

impl TicketInner {
    fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let c = [
            self.costs.requests,
            self.costs.input_tokens,
            self.costs.output_tokens,
        ];
        for (p, c) in self.upstream.pending.iter().zip(c) {
            // Never below zero, whatever the order.
            let _ = p.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(c))
            });
        }
        let _ =
            self.upstream
                .pending_requests
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    Some(v.saturating_sub(1))
                });
    }
}

impl Drop for TicketInner {
    fn drop(&mut self) {
        self.release();
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("upstream", &self.0.upstream.config.name)
            .field("costs", &self.0.costs)
            .finish()
    }
}

/// Sits between an upstream's budget and its concurrency layer: a request
/// that reaches it was admitted by the budget, so its costs leave the pool's
/// `pending` count of that upstream.
#[derive(Debug, Clone)]
pub struct Admit<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Admit<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = UpstreamFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    /// Releases the request's pending costs; refuses it, unsent, if its
    /// upstream was drained while it waited (the budget then refunds it,
    /// and the pool sends it elsewhere).
    fn call(&mut self, req: Request<B>) -> Self::Future {
        crate::dispatch::Dispatch::received(req.extensions());
        if let Some(ticket) = req.extensions().get::<Ticket>() {
            ticket.release();
            let upstream = &ticket.0.upstream;
            if upstream.drained_at(Instant::now()).is_some() {
                return UpstreamFuture::failed(Some(PoolError::Drained.into()));
            }
            let c = ticket.0.costs;
            for (a, c) in
                upstream
                    .admitted
                    .iter()
                    .zip([c.requests, c.input_tokens, c.output_tokens])
            {
                a.fetch_add(c, Ordering::Relaxed);
            }
        }
        UpstreamFuture::inner(self.inner.call(req))
    }
}

/// The innermost layer of an upstream: rewrites the request's scheme,
/// authority and path to the upstream's base URL, sets its key, and sends
/// the pool's buffered body as [`Full<Bytes>`] (the transport sees one body
/// type whatever the layers above).
#[derive(Clone)]
pub struct Address<S> {
    inner: S,
    base: Base,
    key: Option<HeaderValue>,
}

impl<S> fmt::Debug for Address<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Address")
            .field("base_url", &self.base.to_string())
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<B>> for Address<S>
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = UpstreamFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, _body) = req.into_parts();
        let Some(bytes) = parts.extensions.get::<BufferedBytes>().map(|b| b.0.clone()) else {
            return UpstreamFuture::failed(Some(PoolError::NotBuffered.into()));
        };
        match self.base.rewrite(&parts.uri) {
            Ok(uri) => parts.uri = uri,
            Err(e) => return UpstreamFuture::failed(Some(e.into())),
        }
        parts.headers.remove(HOST);
        if let Some(key) = &self.key {
            parts.headers.remove(AUTHORIZATION);
            parts.headers.insert(API_KEY, key.clone());
        }
        let request = Request::from_parts(parts, Full::new(bytes));
        UpstreamFuture::inner(self.inner.call(request))
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Admit`] and [`Address`]: the inner service's, or an
    /// error raised before calling it.
    #[derive(Debug)]
    pub struct UpstreamFuture<F> {
        #[pin]
        future: Option<F>,
        error: Option<BoxError>,
    }
}

impl<F> UpstreamFuture<F> {
    fn inner(future: F) -> Self {
        UpstreamFuture {
            future: Some(future),
            error: None,
        }
    }
    fn failed(error: Option<BoxError>) -> Self {
        UpstreamFuture {
            future: None,
            error,
        }
    }
}

impl<F, R, E> Future for UpstreamFuture<F>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.future.as_pin_mut() {
            Some(future) => future.poll(cx).map_err(Into::into),
            None => Poll::Ready(Err(this
                .error
                .take()
                .unwrap_or_else(|| PoolError::NotBuffered.into()))),
        }
    }
}

/// Builds an upstream's layered service over a clone of the transport.
pub(crate) fn stack<S: Clone>(up: &Upstream, transport: S) -> UpstreamService<S> {
    let address = Address {
        inner: transport,
        base: up.base.clone(),
        key: up.key.clone(),
    };
    let concurrency = up.concurrency.layer(address);
    let admit = Admit { inner: concurrency };
    up.retry.layer(up.budget.layer(admit))
}
