//! [`TokenBudgetLayer`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::config::{
    BudgetMode, KeyExtractor, LimitsConfig, ANTHROPIC_CACHE_HOLD, ANTHROPIC_INPUT_HEADROOM,
    DEFAULT_IDLE_KEY_EVICTION, DEFAULT_LEARN_CONFIRMATIONS, DEFAULT_MAX_KEYS, DEFAULT_MAX_TOKENS,
    DEFAULT_OUTPUT_QUANTILE, OUTPUT_RATIO_MIN_SAMPLES, OUTPUT_RATIO_PRIOR, OUTPUT_RATIO_WINDOW,
};
use super::count::CountTokens;
use super::learn::LearnRules;
use super::ledger::Ledger;
use super::limits::{Limits, OutputMode};
use super::service::TokenBudget;
use super::snapshot::BudgetSnapshot;
use super::state::{Settings, Shared};
use crate::body::DEFAULT_BUFFER_LIMIT;
use crate::estimate::{AnthropicEstimator, TokenEstimator};
use crate::observe::{Hooks, RejectEvent, SettleEvent, WaitEvent};

/// A [`Layer`] that paces requests to a token budget: requests, input tokens
/// and output tokens per minute, per model class (and per caller in enforce
/// mode). See the [module docs](super) for the whole story.
///
/// Cheap to clone: clones share one budget, as do all the services the layer
/// builds (so the budget holds across every connection of a server).
///
/// # Examples
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_llm_limits::budget::{TokenBudgetLayer, Tier};
///
/// let layer = TokenBudgetLayer::anthropic(Tier::Tier2);
/// # let svc = tower::service_fn(|_req: http::Request<tower_llm_limits::body::ReplayBody<String>>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// # });
/// let client = ServiceBuilder::new().layer(layer.clone()).service(svc);
/// # let _ = client;
/// assert!(layer.snapshot().keys.is_empty());
/// ```
#[derive(Clone)]
pub struct TokenBudgetLayer {
    pub(super) shared: Arc<Shared>,
}

impl fmt::Debug for TokenBudgetLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBudgetLayer")
            .field("shared", &self.shared)
            .finish()
    }
}

impl TokenBudgetLayer {
    /// A client budget for Anthropic's Messages API with these limits (a
    /// [`Tier`](super::Tier), one [`Limits`](super::Limits) for every class, or a [`LimitsConfig`]),
    /// waiting when over budget, realtime output accounting, the in-memory
    /// ledger, the Anthropic estimator, and 2 % of the input-token limit
    /// kept free (see [`TokenBudgetBuilder::input_headroom`]), and the
    /// `count_tokens` mode ([`TokenBudgetBuilder::count_tokens`]) at the
    /// endpoint's rate for the tier given (Tier 1's 100 RPM when no tier is).
    pub fn anthropic(limits: impl Into<LimitsConfig>) -> Self {
        TokenBudgetBuilder::anthropic(limits).build()
    }

    /// A gateway budget: each of `callers` (see [`Callers`](super::Callers): authenticated
    /// caller keys, or any [`KeyExtractor`]) gets these limits; a request from
    /// no known caller is answered with 401 before any budget is touched,
    /// one with duplicate or conflicting keys with 400, and a request over its caller's budget is answered
    /// at once with an Anthropic-shaped 429. See the [module docs](super).
    ///
    /// The inner service receives `Request<ReplayBody<B>>`; in front of an
    /// axum `Router` (which takes `Request<axum::body::Body>`), map it back
    /// with `.map_request(|r: Request<ReplayBody<Body>>| r.map(Body::new))`.
    /// Errors (an unreadable request body, the inner service's own) are still
    /// errors: axum wants them handled (`HandleErrorLayer`).
    ///
    /// # Examples
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{Service, ServiceBuilder, ServiceExt};
    /// use tower_llm_limits::body::ReplayBody;
    /// use tower_llm_limits::budget::{Callers, Limits, TokenBudgetLayer};
    /// use tower_llm_limits::headers::RateLimitSnapshot;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_llm_limits::BoxError> {
    /// // The upstream the gateway forwards to (here: answers with a usage).
    /// let upstream = tower::service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
    ///     let body = r#"{"type":"message","usage":{"input_tokens":10,"output_tokens":20}}"#;
    ///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
    /// });
    /// // Each caller may send one request per minute.
    /// let limits = Limits::new().rpm(1).itpm(30_000).otpm(8_000);
    /// let callers = Callers::new().caller("caller-1", "sk-gw-caller-1");
    /// let mut gateway = ServiceBuilder::new()
    ///     .layer(TokenBudgetLayer::enforce(limits, callers))
    ///     .service(upstream);
    /// let call = || {
    ///     Request::post("/v1/messages")
    ///         .header("x-api-key", "sk-gw-caller-1")
    ///         .body(Full::new(Bytes::from(
    ///             r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"Hi"}]}"#,
    ///         )))
    /// };
    /// let first = gateway.ready().await?.call(call()?).await?;
    /// assert_eq!(first.status(), 200);
    /// assert_eq!(RateLimitSnapshot::from_headers(first.headers()).requests.remaining, Some(0));
    ///
    /// let second = gateway.ready().await?.call(call()?).await?;
    /// assert_eq!(second.status(), 429);
    /// let limits = RateLimitSnapshot::from_headers(second.headers());
    /// assert_eq!(limits.should_retry, Some(true));
    /// assert!(limits.retry_after.is_some());
    /// let body = second.into_body().collect().await?.to_bytes();
    /// let json: serde_json::Value = serde_json::from_slice(&body)?;
    /// assert_eq!(json["error"]["type"], "rate_limit_error");
    /// # Ok(())
    /// # }
    /// ```
    pub fn enforce(limits: impl Into<LimitsConfig>, callers: impl Into<KeyExtractor>) -> Self {
        Self::builder().limits(limits).enforce(callers).build()
    }

    /// A builder with every setting at its default.
    pub fn builder() -> TokenBudgetBuilder {
        TokenBudgetBuilder::default()
    }

    /// The state of the budget: per key and dimension, and decision counters.
    ///
    /// The buckets' levels come from [`Ledger::state`] when the ledger
    /// answers at once (the in-memory ledger does); a ledger that needs a
    /// round trip leaves them unknown (`None`) here and in the headers of
    /// enforce mode.
    pub fn snapshot(&self) -> BudgetSnapshot {
        self.shared.snapshot()
    }

    /// Forgets what the layer keeps per key (learned output ratio, counters,
    /// and the buckets of its own ledger) for keys not used for `idle`, with
    /// no request waiting and, with the budget's own ledger, with buckets full
    /// again; returns how many were forgotten. The layer does this by itself
    /// as new keys arrive (see [`TokenBudgetBuilder::idle_key_eviction`]);
    /// this forgets them now. A ledger given to the builder keeps its own
    /// keys ([`InMemoryLedger::evict_idle`](super::ledger::InMemoryLedger::evict_idle)).
    pub fn forget_idle(&self, idle: std::time::Duration) -> usize {
        self.shared.forget_idle(idle)
    }

    /// The ledger behind the budget: the one given to
    /// [`TokenBudgetBuilder::ledger`], or a view of the budget's own (its
    /// buckets kept in the budget's key entries, with the arithmetic of an
    /// [`InMemoryLedger`](super::ledger::InMemoryLedger) over a one-minute window).
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.shared.ledger
    }

    /// What `estimate` would be charged now (key, limits, costs), read
    /// without touching the budget: the pool routes with it.
    #[cfg(feature = "pool")]
    pub(crate) fn preview(&self, estimate: &crate::estimate::Estimate) -> super::state::Preview {
        self.shared.preview(estimate)
    }
}

impl<S> Layer<S> for TokenBudgetLayer {
    type Service = TokenBudget<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenBudget::new(inner, Arc::clone(&self.shared))
    }
}

/// Builds a [`TokenBudgetLayer`].
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use tower_llm_limits::budget::{BudgetMode, Limits, LimitsConfig, ModelClass, OutputMode, TokenBudgetLayer};
/// use tower_llm_limits::budget::ledger::InMemoryLedger;
///
/// let sonnet = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
/// let layer = TokenBudgetLayer::builder()
///     .limits(LimitsConfig::learned().with_class(ModelClass::Sonnet4, sonnet))
///     .output_mode(OutputMode::Reserve)
///     .mode(BudgetMode::Reject)
///     .ledger(Arc::new(InMemoryLedger::new()))
///     .build();
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct TokenBudgetBuilder {
    limits: LimitsConfig,
    output_mode: OutputMode,
    mode: BudgetMode,
    enforce: bool,
    ledger: Option<Arc<dyn Ledger>>,
    estimator: Option<Arc<dyn TokenEstimator>>,
    buffer_limit: usize,
    key_extractor: Option<KeyExtractor>,
    output_quantile: f64,
    output_ratio_prior: f64,
    output_ratio_min_samples: usize,
    output_ratio_window: usize,
    default_max_tokens: u64,
    learn: LearnRules,
    idle_key_eviction: std::time::Duration,
    max_keys: usize,
    hooks: Hooks,
    input_headroom: f64,
    count_tokens: Option<CountTokens>,
    cache_hold: Duration,
}

impl Default for TokenBudgetBuilder {
    fn default() -> Self {
        Self {
            limits: LimitsConfig::learned(),
            output_mode: OutputMode::default(),
            mode: BudgetMode::default(),
            enforce: false,
            ledger: None,
            estimator: None,
            buffer_limit: DEFAULT_BUFFER_LIMIT,
            key_extractor: None,
            output_quantile: DEFAULT_OUTPUT_QUANTILE,
            output_ratio_prior: OUTPUT_RATIO_PRIOR,
            output_ratio_min_samples: OUTPUT_RATIO_MIN_SAMPLES,
            output_ratio_window: OUTPUT_RATIO_WINDOW,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            idle_key_eviction: DEFAULT_IDLE_KEY_EVICTION,
            max_keys: DEFAULT_MAX_KEYS,
            hooks: Hooks::default(),
            input_headroom: 0.0,
            count_tokens: None,
            cache_hold: Duration::ZERO,
            learn: LearnRules {
                floor: Limits::smallest_published(),
                confirmations: DEFAULT_LEARN_CONFIRMATIONS,
            },
        }
    }
}

impl fmt::Debug for TokenBudgetBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBudgetBuilder")
            .field("limits", &self.limits)
            .field("output_mode", &self.output_mode)
            .field("mode", &self.mode)
            .field("enforce", &self.enforce)
            .field("ledger", &self.ledger)
            .field("buffer_limit", &self.buffer_limit)
            .field("key_extractor", &self.key_extractor)
            .field("output_quantile", &self.output_quantile)
            .field("output_ratio_prior", &self.output_ratio_prior)
            .field("output_ratio_min_samples", &self.output_ratio_min_samples)
            .field("output_ratio_window", &self.output_ratio_window)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("learn", &self.learn)
            .field("hooks", &self.hooks)
            .field("count_tokens", &self.count_tokens)
            .field("cache_hold", &self.cache_hold)
            .finish_non_exhaustive()
    }
}

impl TokenBudgetBuilder {
    /// The builder of [`TokenBudgetLayer::anthropic`]: every setting of that
    /// budget (the limits, 2 % of the input-token limit kept free, the
    /// `count_tokens` mode at the tier's rate), to change one and keep the
    /// rest.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::{OutputMode, Tier, TokenBudgetBuilder};
    ///
    /// // The preset's budget, for a server that reserves `max_tokens`.
    /// let budget = TokenBudgetBuilder::anthropic(Tier::Tier2)
    ///     .output_mode(OutputMode::Reserve)
    ///     .build();
    /// # let _ = budget;
    /// ```
    pub fn anthropic(limits: impl Into<LimitsConfig>) -> Self {
        let limits = limits.into();
        let count = match limits.tier() {
            Some(tier) => CountTokens::for_tier(tier),
            None => CountTokens::for_tier(super::Tier::Tier1),
        };
        TokenBudgetLayer::builder()
            .limits(limits)
            .input_headroom(ANTHROPIC_INPUT_HEADROOM)
            .count_tokens(Some(count))
            .cache_hold(ANTHROPIC_CACHE_HOLD)
    }
}

impl TokenBudgetBuilder {
    /// Replaces the limits (default: none configured, all learned from the
    /// server's headers).
    pub fn limits(mut self, limits: impl Into<LimitsConfig>) -> Self {
        self.limits = limits.into();
        self
    }

    /// How output tokens are charged (default [`OutputMode::Realtime`]).
    pub fn output_mode(mut self, mode: OutputMode) -> Self {
        self.output_mode = mode;
        self
    }

    /// Wait (default) or fail at once when over budget.
    pub fn mode(mut self, mode: BudgetMode) -> Self {
        self.mode = mode;
        self
    }

    /// Server mode: reject over-budget requests with an Anthropic-shaped 429
    /// response (not an error), write `anthropic-ratelimit-*` headers on every
    /// response, and key budgets per caller, as `callers` names them (see
    /// [`Callers`](super::Callers); it replaces any [`key_extractor`](Self::key_extractor)).
    /// A request with no caller is answered with 401 (`authentication_error`),
    /// one with duplicate or conflicting API keys with 400, before any budget
    /// is touched. Implies [`BudgetMode::Reject`].
    pub fn enforce(mut self, callers: impl Into<KeyExtractor>) -> Self {
        self.enforce = true;
        self.key_extractor = Some(callers.into());
        self.mode = BudgetMode::Reject;
        self
    }

    /// The ledger (default: one of the budget's own, with the arithmetic of
    /// an [`InMemoryLedger`](super::ledger::InMemoryLedger) over a one-minute window, its buckets kept in
    /// the budget's key entries so that a key's name is stored once). Pass
    /// one ledger to several layers to make them share limits.
    pub fn ledger(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// The estimator (default: a new [`AnthropicEstimator`]).
    pub fn estimator(mut self, estimator: Arc<dyn TokenEstimator>) -> Self {
        self.estimator = Some(estimator);
        self
    }

    /// The largest request body read to estimate it. Default 16 MiB (16 × 1024
    /// × 1024 bytes); larger bodies pass through unread and are
    /// estimated from their length (counted as fallback estimates).
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self
    }

    /// How callers are told apart in client mode. Default: not at all (one
    /// budget per model class). Enforce mode takes its callers from
    /// [`enforce`](Self::enforce).
    pub fn key_extractor(mut self, extractor: KeyExtractor) -> Self {
        self.key_extractor = Some(extractor);
        self
    }

    /// The quantile of recent answers reserved as expected output in
    /// realtime mode: the smaller of that quantile of `output_tokens /
    /// max_tokens` times the request's `max_tokens`, and that quantile of
    /// `output_tokens` (answers are often bounded by what they say, not by
    /// `max_tokens`). A request that waits asks with the expectation of its
    /// turn (never more than it was charged). Default 0.9 (p90), so the
    /// reservation covers most answers and the rare longer one is charged at
    /// settlement. Clamped to `[0, 1]`, NaN taken as 1.
    pub fn output_quantile(mut self, q: f64) -> Self {
        self.output_quantile = if q.is_nan() { 1.0 } else { q.clamp(0.0, 1.0) };
        self
    }

    /// The share of `max_tokens` reserved as expected output in realtime mode
    /// until [`output_ratio_min_samples`](Self::output_ratio_min_samples)
    /// responses of a key were seen. Default 1.0: the whole `max_tokens`, so a
    /// cold client budget never under-reserves. A server that charges output only
    /// as it is produced (an emulator of the realtime rule) may set 0.0: a
    /// request then reserves one output token, enough to be held back while
    /// the output bucket is in debt. Clamped to `[0, 1]`, NaN taken as 1.
    pub fn output_ratio_prior(mut self, ratio: f64) -> Self {
        self.output_ratio_prior = if ratio.is_nan() {
            1.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        self
    }

    /// Responses per key before the learned output ratio replaces the
    /// [prior](Self::output_ratio_prior) in realtime mode. Default 20.
    pub fn output_ratio_min_samples(mut self, responses: usize) -> Self {
        self.output_ratio_min_samples = responses;
        self
    }

    /// The number of recent responses per key the output ratio's
    /// [quantile](Self::output_quantile) is taken from. Default 200 (0 is
    /// taken as 1).
    pub fn output_ratio_window(mut self, responses: usize) -> Self {
        self.output_ratio_window = responses.max(1);
        self
    }

    /// The `max_tokens` assumed for a request that does not say. Default
    /// 4,096. The API requires the field, so such a request is normally
    /// refused with a 400, which refunds the output reservation.
    pub fn default_max_tokens(mut self, tokens: u64) -> Self {
        self.default_max_tokens = tokens;
        self
    }

    /// The lowest limit learned from the server's `-limit` headers, per
    /// dimension (default [`Limits::smallest_published`]: 50 RPM, 30,000
    /// ITPM, 8,000 OTPM, the smallest values of the published tiers). A
    /// lower report is ignored, so one garbled or hostile header cannot
    /// throttle the client. A dimension left `None` has no floor.
    ///
    /// Lower it for limits below the published tiers (a Workspace limit, an
    /// OpenAI-compatible API's small tier), or configure those limits
    /// directly: a configured limit needs no header.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::{Limits, TokenBudgetLayer};
    ///
    /// // A Workspace capped at 10 RPM and 5,000 ITPM: learn limits that low.
    /// let layer = TokenBudgetLayer::builder()
    ///     .learned_limit_floor(Limits::new().rpm(1).itpm(1_000).otpm(1_000))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn learned_limit_floor(mut self, floor: Limits) -> Self {
        self.learn.floor = floor;
        self
    }

    /// How many responses in a row must report the same new limit before it
    /// replaces one learned earlier (default
    /// 3; 0 is taken as 1). The first
    /// plausible report is learned at once: there is nothing for it to
    /// disagree with.
    pub fn learned_limit_confirmations(mut self, responses: u32) -> Self {
        self.learn.confirmations = responses.max(1);
        self
    }

    /// How long a budget key (a caller and model class) may stay unused
    /// before it is forgotten. Default 10 minutes. Forgetting is done when a
    /// new key is admitted (each time the number of keys doubled, and at most
    /// every half of this time), with no background task; a key with a
    /// request waiting or in flight is kept. What a forgotten key had learned
    /// (its output ratio, limits learned from headers) is learned again. A
    /// key is kept until its buckets are full again (the budget's own
    /// ledger); a ledger given to the builder keeps its buckets until then
    /// (see [`InMemoryLedger`](super::ledger::InMemoryLedger)). Set it above the ledger's window (1 minute)
    /// so a forgotten key has nothing left to enforce.
    pub fn idle_key_eviction(mut self, idle: std::time::Duration) -> Self {
        self.idle_key_eviction = idle;
        self
    }

    /// The most budget keys (caller and model class) held at once. Default
    /// 100,000: about 24 MB of budget and ledger state while keys have seen
    /// fewer than three responses with usage (about 240 bytes a key, its
    /// name included); a key's window of output ratios then grows with its
    /// samples, up to 3.2 KB at the default window of 200. A request
    /// that needs a new key while the budget holds this many, none of them
    /// idle for [`idle_key_eviction`](Self::idle_key_eviction), is refused
    /// before anything is reserved: with a 529 `overloaded_error` in
    /// enforce mode, with [`CallerRefusal::TooManyKeys`](super::CallerRefusal)
    /// otherwise. Keys already held are still served. 0 is taken as 1.
    pub fn max_keys(mut self, keys: usize) -> Self {
        self.max_keys = keys.max(1);
        self
    }

    /// The share of the input-token limit kept free in the bucket: with
    /// 0.02, a request is admitted only when the input-token bucket keeps
    /// 2 % of the limit after it. Default 0 (an exact estimator needs none);
    /// [`TokenBudgetLayer::anthropic`] sets 0.02. The Anthropic estimator's
    /// input estimates are calibrated to the median of what the server
    /// charged (plus a margin from their spread), so some come out low; the
    /// headroom absorbs a run of those. A request that fits only into the
    /// headroom (larger than 98 % of the limit) is still admitted once the
    /// bucket is full. A request whose input is exact (a `count_tokens`
    /// answer, less a cache read whose size the server reported) skips the
    /// headroom while no request admitted on an estimate awaits the
    /// server's count of its input: there is no error to absorb. Until a
    /// key has settled 5 answers, a share above 0 is taken as at least
    /// 0.1: nothing has yet measured the estimator's error
    /// on the traffic, and the whole bucket is there to be filled at once;
    /// then a request on an estimate with none of its key's other
    /// estimates in flight keeps only the larger of the share and half its
    /// own input (it can only miss by its own error).
    /// Clamped to `[0, 0.5]`; NaN is taken as 0.
    pub fn input_headroom(mut self, share: f64) -> Self {
        self.input_headroom = if share.is_nan() {
            0.0
        } else {
            share.clamp(0.0, 0.5)
        };
        self
    }

    /// The opt-in `count_tokens` mode (off by default; on in
    /// [`TokenBudgetLayer::anthropic`]): a request that waits anyway (of
    /// any size, unless [`CountTokens::min_input_tokens`] says otherwise) is counted
    /// exactly by the API's free `POST /v1/messages/count_tokens` through
    /// the same inner service while it waits, paced to the endpoint's own
    /// rate; answers are kept by body hash. A request that could go now is
    /// never delayed, and any failure leaves the estimate. See
    /// [`CountTokens`].
    pub fn count_tokens(mut self, count: Option<CountTokens>) -> Self {
        self.count_tokens = count;
        self
    }

    /// How long a request that could be admitted now may hold for the
    /// prompt-cache prefix that a request in flight is writing (cache-aware
    /// admission; default zero: it goes at once, charged in full;
    /// [`TokenBudgetLayer::anthropic`] sets 5 s).
    ///
    /// The server makes a cache entry readable only once the answer that
    /// writes it has begun, and a request sent before then pays the whole
    /// prefix again, against the input-token limit. Holding trades this
    /// request's latency (at most `hold`) for those tokens, which under an
    /// input-token limit are the whole stack's throughput: in the crate's
    /// simulation, a burst of requests sharing a system prompt otherwise
    /// wrote it two or three times. A request that would wait for room
    /// anyway holds until the write begins, whatever this is. The writer's
    /// answer shows it has begun at a stream's first output, and a JSON
    /// answer only at its end, so a hold for a JSON writer often lasts the
    /// whole bound.
    ///
    /// A prefix whose refill takes longer than `hold` at the key's
    /// configured input-token limit (`prefix tokens · 60 s / ITPM`) is held
    /// for up to that refill time, at most 30 s: holding is worth it while
    /// waiting costs less than a second write of the prefix costs the
    /// budget.
    pub fn cache_hold(mut self, hold: Duration) -> Self {
        self.cache_hold = hold;
        self
    }

    /// Builds the layer (and the budget its services share).
    pub fn build(self) -> TokenBudgetLayer {
        let key_extractor = self.key_extractor;
        let settings = Settings {
            limits: self.limits,
            output_mode: self.output_mode,
            mode: self.mode,
            enforce: self.enforce,
            buffer_limit: self.buffer_limit,
            key_extractor,
            output_quantile: self.output_quantile,
            output_ratio_prior: self.output_ratio_prior,
            output_ratio_min_samples: self.output_ratio_min_samples,
            output_ratio_window: self.output_ratio_window,
            default_max_tokens: self.default_max_tokens,
            learn: self.learn,
            idle_key_eviction: self.idle_key_eviction,
            max_keys: self.max_keys,
            hooks: self.hooks,
            input_headroom: self.input_headroom,
            count_tokens: self.count_tokens,
            cache_hold: self.cache_hold,
        };
        let ledger = self.ledger;
        let estimator = self.estimator.unwrap_or_else(|| {
            let shared = ledger.as_ref().and_then(|l| l.prompt_cache());
            match shared {
                Some(shared) => Arc::new(
                    AnthropicEstimator::builder()
                        .shared_prompt_cache(shared)
                        .build(),
                ),
                None => Arc::new(AnthropicEstimator::new()),
            }
        });
        TokenBudgetLayer {
            shared: Arc::new(Shared::new(settings, ledger, estimator)),
        }
    }
}

/// Callbacks (see [`observe`](crate::observe)). Each runs inside the
/// request's `poll`, on the task that polls it: keep it quick.
impl TokenBudgetBuilder {
    /// Called when a request that had to wait for the budget stops waiting:
    /// admitted, or stopped at its deadline ([`WaitEvent`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::{Tier, TokenBudgetLayer};
    ///
    /// let layer = TokenBudgetLayer::builder()
    ///     .limits(Tier::Tier1)
    ///     .on_wait(|event| eprintln!("waited {:?} for the budget", event.waited))
    ///     .on_reject(|event| eprintln!("refused: {}", event.error))
    ///     .on_settle(|event| {
    ///         let _ = (event.reserved_input_tokens, event.input_tokens);
    ///     })
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_wait<F>(mut self, f: F) -> Self
    where
        F: Fn(&WaitEvent) + Send + Sync + 'static,
    {
        self.hooks.on_wait = Some(Arc::new(f));
        self
    }

    /// Called when the budget refuses a request without sending it
    /// ([`RejectEvent`]): [`Error::BudgetExceeded`](crate::Error::BudgetExceeded)
    /// in reject or enforce mode, [`Error::RequestTooLarge`](crate::Error::RequestTooLarge).
    pub fn on_reject<F>(mut self, f: F) -> Self
    where
        F: for<'a> Fn(&RejectEvent<'a>) + Send + Sync + 'static,
    {
        self.hooks.on_reject = Some(Arc::new(f));
        self
    }

    /// Called when a response's usage settles its request's charge
    /// ([`SettleEvent`]: what was reserved, what was charged).
    pub fn on_settle<F>(mut self, f: F) -> Self
    where
        F: Fn(&SettleEvent) + Send + Sync + 'static,
    {
        self.hooks.on_settle = Some(Arc::new(f));
        self
    }
}
