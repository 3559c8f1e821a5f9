//! Token budget: pace requests, input tokens and output tokens per minute
//! before sending, and settle with what the server really charged.
//!
//! [`TokenBudgetLayer`] keeps a client (or each caller of a gateway) under an
//! Anthropic-style rate limit: requests per minute (RPM), uncached input tokens
//! per minute (ITPM) and output tokens per minute (OTPM), per model class. It
//! charges what the server charges, when the server charges it, so that
//! requests wait on the client side instead of being answered with a 429.
//!
//! # How a request goes through
//!
//! 1. **Estimate.** The body is read once (up to a bound) and handed to the
//!    [`TokenEstimator`](crate::estimate::TokenEstimator): input tokens (minus
//!    warm prompt-cache prefixes), `max_tokens`, the model. If an outer layer
//!    (the retry layer) already holds the body, its
//!    [`BufferedBytes`](crate::body::BufferedBytes) are used and the body is
//!    passed through unread and uncopied. A body past the bound passes
//!    through too and is estimated from its length.
//! 2. **Reserve** in the [`Ledger`](ledger::Ledger), in all three dimensions
//!    at once or none: RPM 1; ITPM the input estimate (plus expected cache
//!    reads for the classes whose cache reads count, Haiku 3.5); OTPM per
//!    [`OutputMode`]: `max_tokens` in `Reserve` mode, or in `Realtime` mode
//!    (the default) an expected output, `ceil(max_tokens × r)` where `r` is
//!    the p90 of `output_tokens / max_tokens` over the key's recent responses
//!    (the prior `r = 1.0`, the whole `max_tokens`, until 20 were seen;
//!    at least one token). A request without `max_tokens` counts
//!    4,096 (see [`TokenBudgetBuilder::default_max_tokens`]). With no limit configured for a dimension,
//!    nothing is paced there until a response's headers teach the limit.
//!    With no limit configured at all for a model class, one request (the
//!    probe) is sent and the others of that class wait for its response
//!    head: its `anthropic-ratelimit-*` headers teach the limits, and how
//!    its `output-tokens-remaining` moved tells the output rule (about the
//!    probe's whole `max_tokens` held: the server reserves it at admission,
//!    and the class is paced in `Reserve` mode; about nothing held: output
//!    is counted as generated, `Realtime`). A probe answered without such
//!    headers ends the holding; one never sent, or whose connection failed,
//!    hands the role to the next request.
//!    **Cache-aware admission.** The server makes a prompt-cache entry
//!    readable only once the first response that writes it has begun, so a
//!    request sent while its `cache_control` prefix is still being written
//!    pays that prefix again. The budget knows which prefixes the requests
//!    in flight write ([`Estimate::cache_writes`](crate::estimate::Estimate::cache_writes))
//!    and which a request could read once written
//!    ([`Estimate::cache_pending`](crate::estimate::Estimate::cache_pending)).
//!    The rule: a request whose pending prefix a request in flight writes
//!    (sent, response head not yet arrived) goes now at full charge if the
//!    budget admits it now (it is never delayed); else (it would wait anyway) it
//!    gives back its place in line, waits for the writer's response head,
//!    and asks again charged only for what follows the prefix. A writer
//!    that fails, is refused (any non-2xx) or is cancelled releases it,
//!    charged in full; its own deadline still bounds the wait. Classes whose
//!    cache reads count toward ITPM (Haiku 3.5) are never held.
//!
//!    **Exact counts.** With the `count_tokens` mode
//!    ([`TokenBudgetBuilder::count_tokens`], on in
//!    [`TokenBudgetLayer::anthropic`]), a request estimated at
//!    [`CountTokens::min_input_tokens`] (1,000) or more that is not admitted
//!    at once is counted by the API's free `POST /v1/messages/count_tokens`,
//!    through the same inner service with the request's headers, while it
//!    waits; it is charged the count minus the tokens expected to be read
//!    from the prompt cache. Calls are spaced to the endpoint's own
//!    requests-per-minute limit, answers are kept by body hash, a request
//!    whose turn comes first goes with its estimate, and any failure leaves
//!    the estimate.
//! 3. **Wait or fail.** In [`BudgetMode::Wait`] (the default) requests that
//!    do not fit wait in a FIFO queue per key: only the head asks the ledger
//!    and sleeps for the time it named; a settlement that frees capacity
//!    wakes the head only. A request arriving behind a waiting head may go
//!    first when the ledger admits it at once and what it takes delays the
//!    head little: by its refill time in the tightest dimension (`cost ×
//!    60 s / limit`), at most 2 seconds in all for one head; past that,
//!    everyone waits for the head, so nothing starves. A headroom
//!    ([`TokenBudgetBuilder::input_headroom`], 2 % of ITPM with
//!    [`TokenBudgetLayer::anthropic`]) is kept free in the input bucket. In
//!    [`BudgetMode::Reject`] the request fails at once with
//!    [`Error::BudgetExceeded`](crate::Error::BudgetExceeded). A request that
//!    can never fit (input above the whole ITPM; in `Reserve` mode
//!    `max_tokens` above OTPM) fails at once with
//!    [`Error::RequestTooLarge`](crate::Error::RequestTooLarge) and is never
//!    sent. (In `Realtime` mode an expected output above OTPM is capped to it.)
//!    A request whose `model` is longer than any model name
//!    ([`MAX_MODEL_LEN`](crate::estimate::MAX_MODEL_LEN), 256 bytes) fails
//!    before it is charged, with
//!    [`Error::ModelTooLong`](crate::Error::ModelTooLong) (a 400
//!    `invalid_request_error` in enforce mode), and is never sent.
//! 4. **Send**, then **settle** from the response (see [`ResponseBody`]): its
//!    `anthropic-ratelimit-*` headers sync the ledger (the server's view wins
//!    when it says less is left; unconfigured limits are learned from them,
//!    if plausible: never below
//!    [`learned_limit_floor`](TokenBudgetBuilder::learned_limit_floor), by
//!    default the smallest published tier value, and a learned limit changes
//!    only after 3 responses in a row (a setting) report
//!    the new value, so one garbled header cannot move the budget),
//!    and its `usage` (JSON, or the SSE `message_start` / `message_delta`
//!    events read as they pass) corrects the charge. A 429 refunds the whole
//!    reservation: the server charged nothing.
//! 5. **Refund what was never sent.** The budget marks the request it passes
//!    on, and the crate's other layers note on that mark whether they held it
//!    (the concurrency queue, the retry layer's waits) or handed it to the
//!    transport. A request that never reached the transport is refunded in
//!    full, whatever the order of the layers: dropped by its caller while an
//!    inner layer held it, shed with
//!    [`Error::Overloaded`](crate::Error::Overloaded), refused by an inner
//!    layer (an inner budget), or failed with an I/O `ConnectionRefused`
//!    (no byte left). The charge is kept for any other error, and for a
//!    request dropped after it was sent: bytes may have reached the server.
//!    A foreign layer that defers the call (tower's `Buffer`) counts as the
//!    transport, the safe side. Counted in
//!    [`BudgetSnapshot::refunded_unsent`].
//!
//! `poll_ready` only forwards the inner service's readiness: a request's cost
//! is known only from the request ([tower#713](https://github.com/tower-rs/tower/issues/713)), so admission happens in
//! `call` (a request whose body an outer layer already read, as the retry
//! layer does: it takes its place in line there, and is handed on at once if
//! admitted) or in the response future (one whose body the budget reads
//! first, and any request that waits). State lives in one `Arc` shared by every clone and
//! every service the layer builds (unlike tower's `RateLimit`, whose state is
//! per clone and so does not limit under axum).
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_llm_limits::body::ReplayBody;
//! use tower_llm_limits::budget::{Limits, TokenBudgetLayer};
//! use tower_llm_limits::Dimension;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_llm_limits::BoxError> {
//! // Stands for the HTTP client: answers with the usage the server would report.
//! let upstream = tower::service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
//!     let body = r#"{"type":"message","usage":{"input_tokens":12,"output_tokens":30}}"#;
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
//! });
//! let layer = TokenBudgetLayer::anthropic(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
//! let mut client = ServiceBuilder::new().layer(layer.clone()).service(upstream);
//!
//! let request = Request::post("https://api.anthropic.com/v1/messages").body(Full::new(Bytes::from(
//!     r#"{"model":"claude-sonnet-4-5","max_tokens":1000,"messages":[{"role":"user","content":"Hi"}]}"#,
//! )))?;
//! let response = client.ready().await?.call(request).await?;
//! // Reading the body to its end settles the charge with the real usage.
//! let _ = response.into_body().collect().await?;
//!
//! let snapshot = layer.snapshot();
//! let sonnet = snapshot.key("sonnet-4").expect("one request was charged to Sonnet 4.x");
//! let output = sonnet.dimension(Dimension::OutputTokens);
//! assert_eq!(output.limit, Some(8_000));
//! // 1,000 output tokens were reserved (max_tokens); 30 were produced.
//! assert!(output.remaining.is_some_and(|r| r >= 7_970.0 - 1.0));
//! # Ok(())
//! # }
//! ```
//!
//! # Limits, model classes and tiers
//!
//! The API limits each *model class* separately (Anthropic's rate-limits
//! page: "Rate limits are applied separately for each model"), with pools
//! shared by a family: Opus 4, 4.1 and 4.5 draw from one Opus 4.x limit,
//! Sonnet 4 and 4.5 from one Sonnet 4.x limit. [`ModelClass::of`] maps a model
//! name to its class, so the budget keys its buckets by class, not by model
//! name. [`Tier`] holds the published standard limits of both tier tables
//! Anthropic has published on its rate-limits page (the older Tier 1-4 table
//! and the newer Start / Build / Scale one), exactly as published.
//!
//! ```
//! use tower_llm_limits::budget::{Limits, ModelClass, Tier};
//!
//! let class = ModelClass::of("claude-sonnet-4-5-20250929");
//! assert_eq!(class, ModelClass::Sonnet4);
//! assert_eq!(Tier::Tier1.limits(class), Limits::new().rpm(50).itpm(30_000).otpm(8_000));
//! assert_eq!(
//!     Tier::Build.limits(class),
//!     Limits::new().rpm(5_000).itpm(5_000_000).otpm(1_000_000)
//! );
//!
//! // Haiku 3.5 counts cache reads toward ITPM; the 4.x models do not.
//! assert!(ModelClass::of("claude-3-5-haiku-20241022").cache_reads_count_toward_itpm());
//! assert!(!class.cache_reads_count_toward_itpm());
//!
//! // Nothing configured: every limit is learned from the response headers.
//! assert_eq!(Limits::new().requests_per_minute, None);
//! ```
//!
//! The presets do not know your organisation's tier or any custom, Evaluation
//! or Workspace limits: configure those with [`Limits`], or leave limits
//! unknown and let the budget learn them from the `anthropic-ratelimit-*`
//! headers (the server's report wins over a preset that is too high). There
//! are no long-context (1M) limits and no Priority Tier limits: the presets
//! are the standard Messages API rows only. The tables change; the numbers
//! here are Anthropic's published standard limits as of this release
//! (<https://platform.claude.com/docs/en/api/rate-limits>).
//!
//! # Enforce (server) mode
//!
//! [`TokenBudgetLayer::enforce`] turns the budget around for a gateway (axum,
//! or any tower server) in front of many callers. Each caller has its own
//! budget, keyed by its [`Callers`] entry (authenticated caller keys, sent as
//! `x-api-key` or `authorization: Bearer`, compared in constant time) or any
//! [`KeyExtractor`]. A request from no known caller is answered with 401
//! (`authentication_error`), one with duplicate or conflicting keys with 400
//! (`invalid_request_error`), before any budget is touched; a key is never
//! logged, echoed, or used as a budget's name. A request over its caller's budget is answered at once
//! with a 429 shaped like Anthropic's:
//!
//! - body `{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate limit for your organization of 30,000 input tokens per minute. ..."},"request_id":"req_..."}`
//!   and the same id in a `request-id` header;
//! - `retry-after` in whole seconds, rounded up, and `x-should-retry: true`
//!   (a request that can never fit gets `x-should-retry: false` and no
//!   `retry-after`);
//! - the `anthropic-ratelimit-{requests,input-tokens,output-tokens,tokens}-{limit,remaining,reset}`
//!   headers, token counts rounded to the nearest thousand as the API's are,
//!   resets in RFC 3339.
//!
//! [`TokenBudgetLayer`]'s service fails with `BoxError` for what it does not
//! answer itself; axum's `Router::layer` needs the inner service's error
//! type: use [`EnforceLayer`] there, which answers every refusal as a
//! response (see its table) and passes the inner service's errors on
//! unchanged.
//!
//! Every admitted response carries the same headers. The inner service's
//! responses are settled as in client mode (their `usage`), and their own
//! rate-limit headers (`anthropic-ratelimit-*`, `x-ratelimit-*`: the
//! organization's limits) are removed before the caller's are written, so a
//! caller never sees them, even for a dimension its budget does not limit.
//!
//! # Spawning a stack of layers
//!
//! rustc (as of 1.95) refuses some `Send` futures that hold a layer whose
//! inner service's error type is `BoxError` (one of this crate's layers, or a
//! `BoxCloneService<_, _, BoxError>`), with "implementation of `From` is not
//! general enough": its Send check of an `async` block erases lifetimes and
//! then cannot prove `BoxError: Into<BoxError>`. It shows in
//! `tokio::spawn(async move { stack.oneshot(req).await })` over two stacked
//! layers, or in hyper's connection task over a service with a `BoxError`.
//! The layers are not at fault, and any of these avoids it:
//!
//! - box the whole stack: `ServiceBuilder::new().boxed_clone()` as the
//!   outermost layer (the async block then holds a concrete type);
//! - spawn the future itself: `tokio::spawn(stack.oneshot(req))`;
//! - give the innermost service a concrete error type (an axum `Router` has
//!   `Infallible`, hyper-util's client its own error).

//! # What it deliberately does not do
//!
//! - It does not retry: put [`RetryAfterLayer`](crate::retry) outside it.
//!   Each attempt is then paced and charged again.
//! - It does not limit requests in flight; a request waiting for the budget
//!   holds no concurrency slot if the concurrency layer sits inside it.
//! - It does not keep budgets across processes by itself: the
//!   [`Ledger`](ledger::Ledger) trait is the seam for a shared store, and
//!   with the `redis` feature `RedisLedger` (in the `redis` module) is
//!   one, with a fail-open or fail-closed policy of its own. The trait's
//!   operations are asynchronous and use the ledger's own clock; a ledger
//!   that fails a reservation fails the request with its
//!   [`LedgerError`](ledger::LedgerError) (nothing debited, nothing sent),
//!   and a failed settlement or sync is logged.
//! - A key (a caller and model class) costs about 1.1 KB while idle (budget
//!   and in-memory ledger). Keys unused for
//!   [`idle_key_eviction`](TokenBudgetBuilder::idle_key_eviction) (10 min by
//!   default) are forgotten as new keys are admitted, and at most
//!   [`max_keys`](TokenBudgetBuilder::max_keys) (100,000 by default) are held;
//!   [`TokenBudgetLayer::forget_idle`] forgets idle keys on demand.

mod admission;
pub(crate) mod answer;
mod callers;
mod config;
mod count;
mod enforce;
mod fleet;
mod future;
mod gateway;
mod keys;
mod layer;
mod lazy;
mod learn;
pub mod ledger;
mod limits;
mod parse;
mod prefix;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod service;
mod snapshot;
mod state;
mod usage;

pub use callers::{CallerRefusal, Callers};
pub use config::{BudgetMode, KeyExtractor, LimitsConfig};
pub use count::{CountTokens, HttpResponse};
pub use future::ResponseFuture;
pub use gateway::{
    copy_forwarded_headers, error_response, forward_response, Enforce, EnforceFuture, EnforceLayer,
    FORWARDED_HEADERS,
};
pub use layer::{TokenBudgetBuilder, TokenBudgetLayer};
pub use limits::{Limits, ModelClass, OutputMode, Tier};
pub use parse::{ConfigError, ENV_LIMITS, ENV_TIER};
pub use service::TokenBudget;
pub use snapshot::{BudgetSnapshot, DimensionSnapshot, KeySnapshot};
pub use usage::ResponseBody;
