//! Tower middleware that keeps a client (or a gateway) of a rate-limited LLM API,
//! Anthropic's Messages API first, at the highest rate its limits allow, with
//! almost no `429 Too Many Requests` and no lost request.
//!
//! A 429 from the API means a per-minute limit was crossed: requests (RPM),
//! input tokens (ITPM) or output tokens (OTPM), per model class. Retrying after
//! the fact (what the official SDKs do) spends attempts and time; this crate
//! also *paces before sending*, charging each request what the server will
//! charge, when it will charge it, and settling with the `usage` it reports.
//!
//! Three layers, each a [`tower_layer::Layer`] whose service is a
//! `tower::Service<http::Request<B>>`, usable alone or together:
//!
//! | layer | what it does |
//! |---|---|
//! | [`retry::RetryAfterLayer`] | honours `retry-after-ms` / `retry-after` / `x-should-retry` and the `anthropic-ratelimit-*-reset` of an exhausted limit, else backs off with full jitter; replays the buffered body; one cooldown shared by every clone; bounded by attempts, a deadline and a retry budget |
//! | [`budget::TokenBudgetLayer`] | estimates each request's tokens ([`estimate::AnthropicEstimator`]), waits (or rejects) until RPM, ITPM and OTPM can take it, settles with the real usage (JSON or SSE, read as it passes), syncs with the server's headers and learns limits it was not given; in enforce mode, answers a gateway's callers with Anthropic-shaped 429s |
//! | [`concurrency::ConcurrencyLayer`] | caps requests in flight, fixed or adaptive (slow start, AIMD on 429/529/503 and timeouts), holds a slot until the response *body* ends, serves priority lanes in order |
//!
//! Three optional layers, each behind its feature, carry out the durable
//! fixes for 429s that are otherwise left to the user; put them outside the
//! preset (`ServiceBuilder::new().layer(x).layer(limits)`):
//!
//! | layer | feature | what it does |
//! |---|---|---|
//! | `batch::BatchLayer` | `batch` | sends background requests as Message Batches (half price, no draw on the Messages limits), paced against the batch limits, each future answered as `/v1/messages` would |
//! | `autocache::AutoCacheLayer` | `cache` | adds `cache_control` breakpoints where a request has none, on prefixes long enough to cache, and reports cache writes, reads and the cost difference |
//! | `context::ContextGuardLayer` | `context` | reports the input tokens each conversation resends, refuses a request above a cap before sending it, lets a callback trim it |
//!
//! [`preset::LimitsLayer::anthropic`] builds the recommended stack, `RetryAfter -> TokenBudget
//! -> Concurrency`, in one call. Retry is outermost so that every attempt is
//! paced and counted again; the budget waits before a concurrency slot is
//! taken, so a request waiting for tokens holds no slot.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_llm_limits::budget::Tier;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_llm_limits::BoxError> {
//! // Any `Service<http::Request<B>>`: a hyper-util client in real use.
//! let upstream = service_fn(|_req: Request<_>| async {
//!     let body = r#"{"type":"message","usage":{"input_tokens":9,"output_tokens":2}}"#;
//!     Ok::<_, std::io::Error>(Response::new(Full::new(Bytes::from(body))))
//! });
//!
//! let limits = tower_llm_limits::preset::LimitsLayer::anthropic(Tier::Tier1);
//! let client = ServiceBuilder::new().layer(limits.clone()).service(upstream);
//!
//! let request = Request::post("https://api.anthropic.com/v1/messages")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(
//!         br#"{"model":"claude-sonnet-4-5","max_tokens":32,"messages":[{"role":"user","content":"Hi"}]}"#,
//!     )))?;
//! let response = client.oneshot(request).await?;
//! let _usage = response.into_body().collect().await?; // settles the budget
//!
//! let snapshot = limits.budget().snapshot();
//! assert_eq!(snapshot.admitted, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Errors
//!
//! Every service returns `BoxError`, as tower's middleware does; errors made
//! by this crate are an [`Error`] inside it ([`Error::BudgetExceeded`] carries
//! `retry_in`, [`Error::RetriesExhausted`] the last status, ...), and the inner
//! service's own errors pass through as they are.
//!
//! A gateway's server cannot take a `BoxError` (axum's `Router` wants
//! `Infallible`): [`budget::EnforceLayer`] keeps the inner service's error
//! type and answers its own refusals as responses, and
//! [`budget::error_response`] turns any error of the stack into the answer
//! the API would give.
//!
//! # Compile errors you may meet
//!
//! - **"implementation of `From` is not general enough"** (with
//!   `tokio::spawn`). A stack of layers whose inner error type is `BoxError`,
//!   held across an `.await` inside `tokio::spawn(async move { .. })`, can be
//!   refused by rustc: its `Send` check of an `async` block erases lifetimes
//!   and then cannot prove `BoxError: From<BoxError>` for every lifetime
//!   (rust-lang/rust#64552). tower's own stack hits it too
//!   (`ServiceBuilder::new().timeout(..).concurrency_limit(..)` over a
//!   `service_fn` whose error is `BoxError`). The layers are not at fault.
//!   Any of these avoids it: spawn the future itself,
//!   `tokio::spawn(stack.oneshot(request))`; box the stack
//!   ([`preset::LimitsLayer::boxed`], or tower's `BoxCloneSyncService`), so
//!   the `async` block holds a concrete type; or give the innermost service a
//!   concrete error type (a hyper-util client, `reqwest::Error`,
//!   `std::io::Error`).
//! - **`Infallible: From<Box<dyn Error + Send + Sync>>` is not satisfied**
//!   (axum's `Router::layer(TokenBudgetLayer::enforce(..))`). axum's routes
//!   must not fail; [`budget::TokenBudgetLayer`]'s service returns
//!   `BoxError`. Use [`budget::EnforceLayer`] instead, whose service keeps
//!   the route's `Infallible` and answers its refusals as responses; or put
//!   axum's `HandleErrorLayer` in front of the budget.
//! - **`Service<Request<ReplayBody<ReplayBody<Full<Bytes>>>>>` is not
//!   implemented for a client**. The retry and budget layers hand their
//!   inner service a replayable body: a hyper-util client under the preset
//!   must be built for [`preset::TransportBody<B>`](preset::TransportBody),
//!   or for [`preset::BoxBody`] under [`preset::LimitsLayer::boxed`].
//! - **"`start_paused` requires the `test-util` feature"** (a test with
//!   `#[tokio::test(start_paused = true)]`, the way to test pacing and
//!   retries without real sleeps): add tokio's `test-util` feature to your
//!   dev-dependencies (`tokio = { version = "1", features = ["full",
//!   "test-util"] }`).
//!
//! # What it does not do
//!
//! - It is no HTTP client: bring one (hyper-util, or reqwest through
//!   `reqwest::ReqwestService` with the `reqwest` feature), with its TLS, and
//!   set `x-api-key` yourself (no layer logs it).
//! - It keeps budgets in one process; the [`budget::ledger::Ledger`] trait is
//!   the seam for a store shared by several.
//! - It reads the pacing headers of Anthropic and of OpenAI-style APIs only;
//!   it is not a general-purpose rate limiter for any HTTP API.
//!
//! # Architecture
//!
//! Each layer has tower's split into `layer`, `service` and `future`, and the
//! pieces the layers share stand beside them, one of each:
//!
//! - [`wire`]: the Messages API's wire format ([`wire::Usage`], the SSE
//!   decoder and encoder, the JSON scanner used by the estimator and by
//!   settlement, error bodies, the `anthropic-ratelimit-*` header writer);
//! - one fair wait queue (FIFO, priority lanes with aging, one wakeup per
//!   admission) behind the concurrency slots and the budget's per-key queues;
//! - [`body`]: the request-body buffer that retry and budget share;
//! - [`headers`], [`classify`], [`clock`]: reading the API's pacing headers,
//!   recognising timeouts and connection errors by type, the wall clock that
//!   resets are read on.
//!
//! A request through [`preset::LimitsLayer::anthropic`] flows through retry
//! (buffers the body, waits out a shared cooldown), then the budget (estimates
//! the request, waits its turn in its model class's FIFO queue, and at the head
//! asks the asynchronous [`budget::ledger::Ledger`] to reserve RPM, ITPM and
//! OTPM at once), then concurrency (takes a slot), then the transport. On the
//! way back the budget settles with the `usage` read as the body passes and
//! syncs with the rate-limit headers, the concurrency slot is held until the
//! body ends, and retry decides from the status and headers whether to try
//! again.
//!
//! The emulator of the API's rate limiter (with a limiter and a token counter
//! of its own, so that a simulation never judges this crate with its own
//! code) is the companion crate `tower-llm-limits-emulator`.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `retry` | yes | [`retry`] |
//! | `budget` | yes | [`budget`], [`estimate`] |
//! | `concurrency` | yes | [`concurrency`] |
//! | `reqwest` | no | `reqwest::ReqwestService`, a tower service over `reqwest::Client` |
//! | `metrics` | no | counters and histograms through the `metrics` facade (names in [`observe`]) |
//!
//! [`preset`] needs the three default features. [`headers`], [`body`],
//! [`wire`], [`classify`], [`clock`], [`observe`] (callbacks' events, the
//! tracing span's fields) and the [`Error`] types are always there.
//!
//! An emulator of the Messages API's rate limiter (axum, a library and a
//! standalone server) is the companion crate `tower-llm-limits-emulator`.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The buffer is used by retry and budget only.
#[cfg_attr(not(any(feature = "retry", feature = "budget")), allow(dead_code))]
pub mod body;
pub mod classify;
pub mod clock;
#[cfg(any(feature = "retry", feature = "budget", feature = "concurrency"))]
#[cfg_attr(not(feature = "budget"), allow(dead_code))]
mod dispatch;
mod error;
pub mod headers;
mod mix;
#[cfg_attr(
    not(all(feature = "retry", feature = "budget", feature = "concurrency")),
    allow(dead_code)
)]
pub mod observe;
#[cfg(any(feature = "budget", feature = "concurrency"))]
mod queue;
#[cfg(any(feature = "retry", feature = "budget", feature = "concurrency"))]
#[cfg_attr(
    not(all(feature = "retry", feature = "budget", feature = "concurrency")),
    allow(dead_code)
)]
mod wait;
pub mod wire;

#[cfg(feature = "budget")]
#[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
pub mod budget;
#[cfg(feature = "concurrency")]
#[cfg_attr(docsrs, doc(cfg(feature = "concurrency")))]
pub mod concurrency;
#[cfg(feature = "budget")]
#[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
pub mod estimate;
#[cfg(feature = "pool")]
#[cfg_attr(docsrs, doc(cfg(feature = "pool")))]
pub mod pool;
#[cfg(all(feature = "retry", feature = "budget", feature = "concurrency"))]
#[cfg_attr(
    docsrs,
    doc(cfg(all(feature = "retry", feature = "budget", feature = "concurrency")))
)]
pub mod preset;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
#[cfg(feature = "retry")]
#[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
pub mod retry;

#[cfg(any(feature = "cache", feature = "context", feature = "batch"))]
mod rewrite;

#[cfg(feature = "cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
pub mod autocache;
#[cfg(feature = "batch")]
#[cfg_attr(docsrs, doc(cfg(feature = "batch")))]
pub mod batch;
#[cfg(feature = "context")]
#[cfg_attr(docsrs, doc(cfg(feature = "context")))]
pub mod context;

pub use error::{BatchEnd, BoxError, Dimension, Error, GiveUpReason, LastResponse};

/// The README's examples, compiled and run as doc tests.
#[cfg(all(
    doctest,
    feature = "retry",
    feature = "budget",
    feature = "concurrency"
))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
