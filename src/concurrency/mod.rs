//! A cap on requests in flight, fixed or adaptive, with priority lanes, a
//! bounded wait queue, and slots held until the response body ends.
//!
//! Bursts are what trip per-minute limits and the API's limit on sharp
//! increases in usage. [`ConcurrencyLayer`] keeps the stream steady: at most
//! *limit* requests are in flight through the layer and all the services it
//! built; the others wait in line, and past a bound they are shed at once. In
//! adaptive mode the layer also finds how much parallelism the upstream really
//! takes.
//!
//! # When to use it
//!
//! Below a token budget (it should not hold a slot while waiting for tokens)
//! and above the HTTP client. Use [`ConcurrencyLayer::fixed`] when the right
//! number is known (an account's documented concurrency, a gateway's fair
//! share), [`ConcurrencyLayer::adaptive`] when it is not.
//!
//! # Examples
//!
//! ```
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use bytes::Bytes;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_llm_limits::concurrency::{ConcurrencyLayer, Priority};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_llm_limits::BoxError> {
//! let layer = ConcurrencyLayer::adaptive(1..=64);
//! let client = ServiceBuilder::new()
//!     .layer(layer.clone())
//!     .service(service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("{}"))))
//!     }));
//!
//! let mut request = Request::new(Full::new(Bytes::new()));
//! request.extensions_mut().insert(Priority::Interactive);
//! let response = client.oneshot(request).await?;
//! // The slot is held until the body ends.
//! assert_eq!(layer.snapshot().in_flight, 1);
//! let body = response.into_body().collect().await?.to_bytes();
//! assert_eq!(&body[..], b"{}");
//! assert_eq!(layer.snapshot().in_flight, 0);
//! # Ok(())
//! # }
//! ```
//!
//! # The slot lives until the body ends
//!
//! A streamed (SSE) answer keeps the upstream busy until its last event, so the
//! response body is wrapped in a [`ConcurrencyBody`] that holds the slot until
//! its end of stream, an error, or its drop. tower's `ConcurrencyLimit` frees
//! its permit when the response head arrives.
//!
//! # `poll_ready`, `call` and priorities
//!
//! tower's `poll_ready` cannot see the request, so it cannot know the request's
//! [`Priority`]. A slot taken in `poll_ready` would have to be taken in one lane
//! for every request, and priorities would mean nothing. So, as the token budget
//! does, [`Concurrency::poll_ready`](tower_service::Service::poll_ready) only
//! asks the inner service, and `call` takes the request's place in its lane at
//! once (the order in line is the order of `call`s). If a slot is free and
//! nobody waits, the inner service is called right there; otherwise the ready
//! inner service moves into the [`ResponseFuture`] (a clone stays behind), which
//! waits for its slot and then calls it. Consequences:
//! - the service never holds a slot, so a service that is only kept around, or
//!   a clone, holds nothing (tower's contract is kept trivially);
//! - the inner service must be `Clone` (HTTP clients are);
//! - a queued request carries its ready inner service while it waits: if that
//!   readiness reserves something (tower's `Buffer` reserves a buffer slot), the
//!   reservation waits too;
//! - backpressure is the queue bound: past it, a request fails at once with
//!   [`Error::Overloaded`](crate::Error::Overloaded) instead of piling up;
//!   the retry layer does not retry it and the token budget refunds it (it was
//!   never sent).
//!
//! # Priority lanes and aging
//!
//! Three lanes, [`Priority::Interactive`], [`Priority::Normal`] (the default,
//! and what a request without the extension gets), [`Priority::Background`],
//! each first in, first out. A freed slot goes to the head of the highest lane
//! that has a waiter, with **aging**: a waiter that has waited one aging period
//! (10 s by default, see [`ConcurrencyBuilder::aging`]) is treated as one lane higher, two periods two
//! lanes; between waiters of the same effective lane the one that has waited
//! longest wins. So a `Background` request waits at most about two aging periods
//! plus the drain of what was queued ahead of it at its (effective) level; it is
//! never starved forever by a steady stream of `Interactive` ones.
//!
//! # Adaptive mode, and where its ideas come from
//!
//! The limit starts at the minimum (or [`ConcurrencyBuilder::initial_limit`])
//! and:
//! - **slow start**: doubles after each window of successes (a window = as many
//!   successes as the limit) until the first drop signal, as TCP does, so a
//!   service that takes 40 in flight gets there in a handful of round trips;
//! - **additive increase** after that: +1 per window of successes;
//! - **multiplicative decrease** (×0.9) on a drop signal: a `429`, `503` or `529`
//!   response, an inner error that looks like a timeout, or time to the
//!   response head rising above twice its baseline; always within `min..=max`.
//!
//! Taken from **Vector's adaptive request concurrency** (ARC): AIMD with a 0.9
//! decrease; comparing the current round trip with a long-term baseline rather
//! than with a fixed number; growing only when the limit was reached. Changed:
//! ARC adjusts at most once per interval of its mean round trip, a window kept
//! by the clock, and with explicit `429`/`503` back pressure its limit swings
//! wildly ([vector#3998](https://github.com/vectordotdev/vector/issues/3998)): a clock window does not match which requests
//! were sent under which limit, so the `429`s of requests sent under the old,
//! higher limit, arriving after the window turned, cut again. Here the window
//! belongs to the requests: each slot records the *epoch* it was admitted in,
//! every cut starts a new epoch, and a drop signal from a request admitted
//! before the last cut is ignored. A burst of `429`s is one cut, as TCP makes one
//! reduction per round trip. ARC also times the whole request; here only the
//! time to the response head counts (below).
//!
//! Taken from **Netflix's concurrency-limits**: `AIMDLimit`'s cut,
//! `max(min, min(limit - 1, limit × 0.9))`, so a cut always removes at least one
//! slot, and its rule that the limit grows only while at least half of it is in
//! flight, so a quiet period does not inflate it (`Gradient2Limit` has the same
//! "app-limited" check). From `Gradient2Limit`, the pair of latency figures, a
//! short-term one against a long-term one, and the idea of letting the long-term
//! one come down quickly when latency recovers. Here the long-term figure is a
//! baseline of the best recent time to the head: a faster sample replaces it at
//! once, a slower one pulls it up by 1% of the gap, so a lasting change of the
//! upstream is learned while queueing shows as a gap; "well above" means above
//! the tolerance (2× by default, see [`ConcurrencyBuilder::latency_tolerance`]) times the baseline. Not
//! taken: Gradient2's `limit × gradient + queue` update on every sample, which
//! would chase the noise of LLM latencies; explicit `429`/`529` answers are much
//! clearer signals here, so latency is only one more drop signal.
//!
//! **Time to the response head, not total latency**: total latency grows with
//! the length of the answer. For streaming requests the head arrives with the
//! first event, so it measures queueing. For non-streaming requests the head
//! comes after the whole answer: turn the latency signal off with
//! [`ConcurrencyBuilder::latency_tolerance`]`(None)` if answer lengths vary a
//! lot.
//!
//! **Timeouts** are recognised by type, never by message: tower's and tokio's
//! `Elapsed` and an `io::Error` of kind `TimedOut`, anywhere in the error's
//! source chain (see [`classify`](crate::classify));
//! [`ConcurrencyBuilder::error_classifier`] adds a hook for types this crate
//! cannot know. Other inner errors teach nothing and change nothing.
//!
//! # Shrinking
//!
//! When the limit is cut below the requests in flight, nothing is revoked: no
//! new request is admitted until in flight is below the new limit.
//!
//! # Observability
//!
//! [`ConcurrencyLayer::snapshot`] (and [`Concurrency::snapshot`]) give the
//! current limit, in flight, waiting per lane, and the cuts and increases so
//! far. Each change of the limit is a `tracing` event (target
//! `tower_llm_limits::concurrency`; `info` for a cut, `debug` for a rise) with
//! the old and new limit and the reason.
//!
//! # What it deliberately does not do
//!
//! - It does not retry or delay on `429`s (the retry layer does) and does not
//!   pace tokens (the budget does): it only caps what is in flight.
//! - It never cancels or revokes a request in flight.
//! - The queue bound is shared by all lanes: a full queue sheds an `Interactive`
//!   request as it sheds a `Background` one.
//! - It does not share its limit across processes.

mod adaptive;
mod future;
mod layer;
mod semaphore;
mod service;

pub use future::{ConcurrencyBody, ResponseFuture};
pub use layer::{ConcurrencyBuilder, ConcurrencyLayer, ConfigError};
pub use service::Concurrency;

/// A request's lane in the wait queue: set it as a request extension.
///
/// A freed slot goes to the highest lane that has a waiter, with aging (see the
/// [module docs](self#priority-lanes-and-aging)). A request without it is
/// [`Priority::Normal`].
///
/// # Examples
///
/// ```
/// use tower_llm_limits::concurrency::Priority;
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(Priority::Background);
/// assert_eq!(Priority::default(), Priority::Normal);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    /// A user is waiting: admitted first.
    Interactive,
    /// The default.
    #[default]
    Normal,
    /// Batch work: admitted last, but never starved forever.
    Background,
}

impl Priority {
    /// A short name: `interactive`, `normal` or `background` (the `lane`
    /// field of the request's tracing span).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Normal => "normal",
            Priority::Background => "background",
        }
    }

    /// 0 for the highest lane.
    pub(crate) fn lane(self) -> usize {
        match self {
            Priority::Interactive => 0,
            Priority::Normal => 1,
            Priority::Background => 2,
        }
    }
}

/// Waiting requests per lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct LaneCounts {
    /// Waiting in the [`Priority::Interactive`] lane.
    pub interactive: usize,
    /// Waiting in the [`Priority::Normal`] lane.
    pub normal: usize,
    /// Waiting in the [`Priority::Background`] lane.
    pub background: usize,
}

impl LaneCounts {
    /// All lanes together.
    pub fn total(&self) -> usize {
        self.interactive + self.normal + self.background
    }

    /// The count of one lane.
    pub fn get(&self, priority: Priority) -> usize {
        match priority {
            Priority::Interactive => self.interactive,
            Priority::Normal => self.normal,
            Priority::Background => self.background,
        }
    }
}

/// The state of a [`ConcurrencyLayer`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// The current limit (fixed, or the adaptive one).
    pub limit: usize,
    /// Requests holding a slot: called and not yet finished with their body.
    pub in_flight: usize,
    /// Requests waiting for a slot, per lane.
    pub waiting: LaneCounts,
    /// Adaptive cuts so far (0 in fixed mode).
    pub cuts: u64,
    /// Adaptive increases so far, slow start included (0 in fixed mode).
    pub increases: u64,
    /// Whether the limit is adaptive.
    pub adaptive: bool,
    /// Adaptive mode: still in slow start (no drop signal seen yet).
    pub slow_start: bool,
}
