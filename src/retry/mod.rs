//! Retry honouring `retry-after`: backoff with jitter, body replay, one shared cooldown.
//!
//! [`RetryAfterLayer`] retries the requests an LLM API failed transiently, the
//! way the API asks to be retried, and never in a way that makes things worse:
//!
//! - **What is retried**: 408, 409, 429 and 500–599 (529 `overloaded_error`
//!   included), and inner errors before any response: timeouts and connection
//!   errors, recognised by type (see [`classify`](crate::classify)), and
//!   errors of a type unknown here too, as the official SDKs retry every
//!   connection-level failure; a hook
//!   ([`RetryAfterBuilder::error_classifier`]) can declare an error
//!   permanent, and [`AfterSend::Fail`] refuses to replay a request that
//!   failed after it may have reached the server. Never another 4xx. `x-should-retry: false` stops,
//!   `x-should-retry: true` retries even a status outside the list (as the
//!   official SDKs do). Responses below 400 are returned untouched.
//! - **Never retried**: the monthly spend-cap 429 (error body
//!   `error.details.error_code` = `enforced_spend_limit_reached`): it fails at
//!   once with [`Error::SpendLimitReached`](crate::Error::SpendLimitReached). To
//!   tell it apart, the error body of a 429 without `retry-after` is read (at
//!   most 64 KiB, within
//!   [`error_body_timeout`](RetryAfterBuilder::error_body_timeout): a body
//!   that stalls is dropped and the 429 retried as a rate-limit one). Inner errors that are this crate's non-transient errors
//!   (`RequestTooLarge`, `SpendLimitReached`, `NotReplayable`, `Body`, or a
//!   nested retry layer's verdict) are returned as they are, and so is
//!   `Overloaded` (a full concurrency queue is local back-pressure: it is
//!   neither retried nor charged to the retry budget);
//!   `BudgetExceeded { retry_in }` is retried after `retry_in`.
//! - **Delay**, the first that applies: `retry-after-ms`; `retry-after`
//!   (seconds or HTTP-date); the reset time of an exhausted
//!   `anthropic-ratelimit-*` limit (remaining 0); else exponential backoff with
//!   full jitter (0.5 s doubling to 8 s by default; the random source is
//!   injectable, see [`Jitter`]).
//! - **A long server delay is never degraded into short backoff.** A delay
//!   above [`max_server_delay`](RetryAfterBuilder::max_server_delay) (default
//!   60 s) is not waited: the request fails at once with
//!   [`Error::RetryAfterTooLong`](crate::Error::RetryAfterTooLong) carrying it.
//!   (The Python SDK instead ignores a `retry-after` above 60 s and burns its
//!   retries in seconds, while real ITPM 429s have said `retry-after: 505`.)
//!   Raise the cap for batch jobs, which then wait the delay out.
//! - **Bounds**: [`max_retries`](RetryAfterBuilder::max_retries) (default 4), an
//!   optional [`deadline`](RetryAfterBuilder::deadline) per request (no attempt
//!   starts after it), and a [`RetryBudget`] shared by the layer's services.
//!   When a bound stops retries after a retryable response, the caller gets
//!   [`Error::RetriesExhausted`](crate::Error::RetriesExhausted) (with the last
//!   status, the attempts, the time waited, and the [`GiveUpReason`](crate::GiveUpReason)),
//!   not the last response: a typed error is harder to mistake for success,
//!   and a gateway can still map it back to the status.
//! - **Readiness**: `poll_ready` forwards the inner service's readiness; the
//!   first attempt uses the service that was ready (moved into the future, a
//!   clone left in its place, as tower does), and the future polls that service
//!   ready again before each retry (after its wait, so no inner permit is held
//!   while waiting). An error from that `poll_ready` is returned as is.
//! - **Shared cooldown**: a 429 or 529 naming a delay pauses *every* request
//!   through the layer (all services it built and their clones), new requests
//!   and retries alike, until that instant. The shared cooldown is clamped
//!   to the cap: a longer delay fails the request that received it at once
//!   (`RetryAfterTooLong`), while the others wait the cap and then ask the
//!   server again. [`RetryAfterLayer::reset_cooldown`] ends it at once.
//! - **Bodies**: bodies up to [`buffer_limit`](RetryAfterBuilder::buffer_limit)
//!   (default 16 MiB) are read once and replayed; each attempt carries the
//!   bytes in the [`BufferedBytes`](crate::body::BufferedBytes) extension, so
//!   inner layers need not read the body again. A larger body passes through
//!   unchanged, its request is sent once and never retried: a retryable status
//!   is then returned as is, an inner error becomes
//!   [`Error::NotReplayable`](crate::Error::NotReplayable); both are counted in
//!   [`RetrySnapshot::not_replayable`].
//! - **Retry header**: attempts after the first carry [`RETRY_COUNT`]
//!   (`x-stainless-retry-count`, the number of retries so far), the header the
//!   official SDKs send, so a server treats these retries as it treats theirs.
//! - **Observability**: a `tracing` event per retry (attempt, status or error,
//!   delay, cause) and per give-up; header values are never logged (so neither
//!   `x-api-key` nor `authorization` can leak). [`RetryAfterLayer::snapshot`]
//!   reports the counters, the cooldown and the budget.
//!
//! # Examples
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_llm_limits::body::ReplayBody;
//! use tower_llm_limits::retry::RetryAfterLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_llm_limits::BoxError> {
//! // A server that is rate limited once, then answers.
//! let calls = Arc::new(AtomicUsize::new(0));
//! let seen = calls.clone();
//! let api = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
//!     let n = seen.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let status = if n == 0 { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::OK };
//!         Ok::<_, http::Error>(
//!             Response::builder()
//!                 .status(status)
//!                 .header("retry-after", "2")
//!                 .body(Full::new(Bytes::new()))?,
//!         )
//!     }
//! });
//!
//! let layer = RetryAfterLayer::anthropic();
//! let client = ServiceBuilder::new().layer(layer.clone()).service(api);
//! let started = tokio::time::Instant::now();
//! let response = client
//!     .oneshot(Request::new(Full::new(Bytes::from_static(b"{\"model\":\"claude\"}"))))
//!     .await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! assert_eq!(started.elapsed(), Duration::from_secs(2)); // retry-after honoured
//! assert_eq!(layer.snapshot().retries, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # What it does not do
//!
//! - It does not time out an attempt in flight; put `tower::timeout` inside it.
//! - It does not retry a stream that failed after its response started (a
//!   mid-stream SSE `error` event): the response was already returned.
//! - It does not pace requests before the first 429; that is the token
//!   budget's job (`TokenBudgetLayer`), which sits inside it.
//! - It does not add an idempotency key: Anthropic's API has none. A request
//!   that failed after it may have reached the server (a reset mid-request)
//!   is replayed by default, as the SDKs do, and counted
//!   ([`RetrySnapshot::replays_after_send`]); [`AfterSend::Fail`] refuses
//!   such replays.

mod backoff;
mod budget;
mod cooldown;
mod future;
mod layer;
mod policy;
mod service;
mod snapshot;

pub use backoff::Jitter;
pub use budget::RetryBudget;
pub use future::ResponseFuture;
pub use layer::{AfterSend, GiveUpPolicy, RetryAfterBuilder, RetryAfterLayer};
pub use service::RetryAfter;
pub use snapshot::{GiveUps, RetrySnapshot};

/// The header telling the server how many retries came before this attempt:
/// `x-stainless-retry-count`, as the official Anthropic SDKs send it. Set on
/// attempts after the first only (1 on the first retry); the first attempt's
/// headers are left as the caller made them.
pub const RETRY_COUNT: http::HeaderName = http::HeaderName::from_static("x-stainless-retry-count");
