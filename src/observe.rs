//! Observing the layers: callbacks, and metrics through the `metrics` crate.
//!
//! # Callbacks
//!
//! In the manner of tower-http's `on_*` hooks, each layer's builder takes
//! closures called as things happen, on the task that polls the request:
//!
//! | callback | builder | called when |
//! |---|---|---|
//! | `on_retry` | [`RetryAfterBuilder`](crate::retry::RetryAfterBuilder::on_retry) | a failed attempt is about to be retried, with the delay before it ([`RetryEvent`]) |
//! | `on_wait` | [`TokenBudgetBuilder`](crate::budget::TokenBudgetBuilder::on_wait), [`ConcurrencyBuilder`](crate::concurrency::ConcurrencyBuilder::on_wait) | a request that had to wait for the budget or a concurrency slot stops waiting ([`WaitEvent`]) |
//! | `on_reject` | [`TokenBudgetBuilder`](crate::budget::TokenBudgetBuilder::on_reject), [`ConcurrencyBuilder`](crate::concurrency::ConcurrencyBuilder::on_reject) | the layer refuses a request without sending it ([`RejectEvent`]) |
//! | `on_settle` | [`TokenBudgetBuilder`](crate::budget::TokenBudgetBuilder::on_settle) | a response's usage settles its charge ([`SettleEvent`]) |
//!
//! A callback must be quick and must not block: it runs inside the
//! request's `poll`. No event carries an API key or a caller's key.
//!
//! A layer built without callbacks pays one branch per event, and nothing
//! is allocated for them.
//!
//! # Tracing
//!
//! The retry layer runs each request in a span named `llm_request` (level
//! INFO) with the fields `attempt` (1 for the first), `model` (the
//! request's `model`, filled in by the token budget) and `lane` (the
//! concurrency lane: `interactive`, `normal` or `background`, filled in by
//! the concurrency layer). The layers' own events (retries, waits,
//! settlements, give-ups) are recorded inside it. No span or event carries
//! an API key or a caller's key: a caller of enforce mode appears by the name
//! it was configured with, or by its model class when keys are hashed.
//!
//! # Metrics
//!
//! With the `metrics` feature, the layers also record through the
//! [`metrics`](https://docs.rs/metrics) facade, so that the exporter the
//! application already installs (Prometheus, OpenTelemetry, StatsD, ...)
//! receives them. No recorder installed: nothing is recorded. The names:
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `tower_llm_limits_requests_total` | counter | | requests received by a retry layer |
//! | `tower_llm_limits_retries_total` | counter | `cause`: `server_delay`, `inner_delay`, `backoff`, `replay` | retries planned |
//! | `tower_llm_limits_retry_delay_seconds` | histogram | `cause` | the delay before each retry |
//! | `tower_llm_limits_give_ups_total` | counter | `reason`: `max_retries`, `deadline`, `budget`, `sent` | requests the retry layer gave up on |
//! | `tower_llm_limits_wait_seconds` | histogram | `layer`: `budget`, `concurrency` | how long a request that waited waited |
//! | `tower_llm_limits_rejections_total` | counter | `layer`; `reason`: `budget_exceeded`, `too_large`, `overloaded`, `deadline` | requests refused unsent |
//! | `tower_llm_limits_settled_tokens_total` | counter | `dimension`: `input`, `output` | tokens the responses' usage reported (as charged to the limits) |
//! | `tower_llm_limits_reserved_tokens_total` | counter | `dimension` | tokens reserved for those same responses before they were sent |
//!
//! `settled / reserved` is how close the estimates are (above 1: the budget
//! under-reserved). Labels never carry a key or a model name: their
//! cardinality is fixed.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::Error;

/// Why a retry waits before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryCause {
    /// The server named the delay (`retry-after-ms`, `retry-after`, or the
    /// reset of an exhausted limit).
    ServerDelay,
    /// An inner layer named the delay (the token budget's
    /// [`Error::BudgetExceeded::retry_in`](crate::Error::BudgetExceeded)).
    InnerDelay,
    /// Exponential backoff with full jitter.
    Backoff,
    /// Backoff before replaying an attempt that may have reached the server.
    Replay,
}

impl RetryCause {
    /// A short name: `server_delay`, `inner_delay`, `backoff` or `replay`.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::ServerDelay => "server_delay",
            RetryCause::InnerDelay => "inner_delay",
            RetryCause::Backoff => "backoff",
            RetryCause::Replay => "replay",
        }
    }
}

/// A failed attempt about to be retried.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RetryEvent<'a> {
    /// The number of the attempt about to be made (2 for the first retry).
    pub attempt: u32,
    /// The status of the failed attempt's response, if it got one.
    pub status: Option<StatusCode>,
    /// The failed attempt's error, if it got no response.
    pub error: Option<&'a (dyn std::error::Error + Send + Sync + 'static)>,
    /// How long the retry waits before it is sent.
    pub delay: Duration,
    /// Where the delay comes from.
    pub cause: RetryCause,
}

/// The layer an event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerKind {
    /// The token budget.
    Budget,
    /// The concurrency layer.
    Concurrency,
}

impl LayerKind {
    /// A short name: `budget` or `concurrency`.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::Budget => "budget",
            LayerKind::Concurrency => "concurrency",
        }
    }
}

/// A request that had to wait stopped waiting: it was admitted, got a slot,
/// or its deadline passed.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct WaitEvent {
    /// The layer it waited in.
    pub layer: LayerKind,
    /// How long it waited.
    pub waited: Duration,
    /// Whether it stopped waiting because the request's deadline passed
    /// (it was not sent).
    pub deadline_reached: bool,
}

/// A request refused without being sent.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RejectEvent<'a> {
    /// The layer that refused it.
    pub layer: LayerKind,
    /// Why: [`Error::BudgetExceeded`], [`Error::RequestTooLarge`] or
    /// [`Error::Overloaded`]. In enforce mode the budget answers a 429
    /// instead of returning the error; the event carries it all the same.
    pub error: &'a Error,
}

/// A response's usage settled the charge of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SettleEvent {
    /// Input tokens reserved before the request was sent.
    pub reserved_input_tokens: u64,
    /// Output tokens reserved before the request was sent.
    pub reserved_output_tokens: u64,
    /// Input tokens charged after the response (as the input-tokens limit
    /// counts them).
    pub input_tokens: u64,
    /// Output tokens charged after the response.
    pub output_tokens: u64,
    /// Whether the response reported its usage (`false`: the charge was
    /// kept or bounded without it: a body dropped early, an error answer).
    pub usage_known: bool,
}

/// A callback taking an event by reference.
pub(crate) type Callback<E> = Arc<dyn Fn(&E) + Send + Sync>;

/// A callback over an event with a lifetime.
pub(crate) type RetryCallback = Arc<dyn for<'a> Fn(&RetryEvent<'a>) + Send + Sync>;
/// A reject callback.
pub(crate) type RejectCallback = Arc<dyn for<'a> Fn(&RejectEvent<'a>) + Send + Sync>;

/// The callbacks of the budget or the concurrency layer.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) on_wait: Option<Callback<WaitEvent>>,
    pub(crate) on_reject: Option<RejectCallback>,
    pub(crate) on_settle: Option<Callback<SettleEvent>>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("on_wait", &self.on_wait.is_some())
            .field("on_reject", &self.on_reject.is_some())
            .field("on_settle", &self.on_settle.is_some())
            .finish()
    }
}

impl Hooks {
    /// A request stopped waiting.
    pub(crate) fn wait(&self, event: WaitEvent) {
        #[cfg(feature = "metrics")]
        metrics::histogram!("tower_llm_limits_wait_seconds", "layer" => event.layer.as_str())
            .record(event.waited.as_secs_f64());
        if let Some(f) = &self.on_wait {
            f(&event);
        }
    }

    /// A request was refused unsent.
    pub(crate) fn reject(&self, layer: LayerKind, error: &Error) {
        #[cfg(feature = "metrics")]
        metrics::counter!(
            "tower_llm_limits_rejections_total",
            "layer" => layer.as_str(),
            "reason" => reject_reason(error),
        )
        .increment(1);
        if let Some(f) = &self.on_reject {
            f(&RejectEvent { layer, error });
        }
    }

    /// A request that waited stopped at its deadline.
    pub(crate) fn deadline(&self, layer: LayerKind, waited: Duration) {
        #[cfg(feature = "metrics")]
        metrics::counter!(
            "tower_llm_limits_rejections_total",
            "layer" => layer.as_str(),
            "reason" => "deadline",
        )
        .increment(1);
        self.wait(WaitEvent {
            layer,
            waited,
            deadline_reached: true,
        });
    }

    /// A charge settled.
    pub(crate) fn settle(&self, event: SettleEvent) {
        #[cfg(feature = "metrics")]
        {
            let c = |name: &'static str, dimension: &'static str, n: u64| {
                metrics::counter!(name, "dimension" => dimension).increment(n);
            };
            c(
                "tower_llm_limits_reserved_tokens_total",
                "input",
                event.reserved_input_tokens,
            );
            c(
                "tower_llm_limits_reserved_tokens_total",
                "output",
                event.reserved_output_tokens,
            );
            c(
                "tower_llm_limits_settled_tokens_total",
                "input",
                event.input_tokens,
            );
            c(
                "tower_llm_limits_settled_tokens_total",
                "output",
                event.output_tokens,
            );
        }
        if let Some(f) = &self.on_settle {
            f(&event);
        }
    }
}

/// The `reason` label of a rejection.
#[cfg(feature = "metrics")]
fn reject_reason(error: &Error) -> &'static str {
    match error {
        Error::BudgetExceeded { .. } => "budget_exceeded",
        Error::RequestTooLarge { .. } => "too_large",
        Error::Overloaded { .. } => "overloaded",
        _ => "other",
    }
}

/// The retry layer's callback and metrics.
#[derive(Clone, Default)]
pub(crate) struct RetryHooks {
    pub(crate) on_retry: Option<RetryCallback>,
}

impl fmt::Debug for RetryHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryHooks")
            .field("on_retry", &self.on_retry.is_some())
            .finish()
    }
}

impl RetryHooks {
    /// A request was received.
    #[inline]
    pub(crate) fn request(&self) {
        #[cfg(feature = "metrics")]
        metrics::counter!("tower_llm_limits_requests_total").increment(1);
    }

    /// A retry was planned.
    pub(crate) fn retry(&self, event: &RetryEvent<'_>) {
        #[cfg(feature = "metrics")]
        {
            let cause = event.cause.as_str();
            metrics::counter!("tower_llm_limits_retries_total", "cause" => cause).increment(1);
            metrics::histogram!("tower_llm_limits_retry_delay_seconds", "cause" => cause)
                .record(event.delay.as_secs_f64());
        }
        if let Some(f) = &self.on_retry {
            f(event);
        }
    }

    /// The layer gave up on a request.
    #[inline]
    pub(crate) fn give_up(&self, reason: crate::GiveUpReason) {
        #[cfg(feature = "metrics")]
        metrics::counter!("tower_llm_limits_give_ups_total", "reason" => give_up_label(reason))
            .increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = reason;
    }
}

/// The `reason` label of a give-up.
#[cfg(feature = "metrics")]
fn give_up_label(reason: crate::GiveUpReason) -> &'static str {
    match reason {
        crate::GiveUpReason::MaxRetries => "max_retries",
        crate::GiveUpReason::Deadline => "deadline",
        crate::GiveUpReason::Budget => "budget",
        crate::GiveUpReason::Sent => "sent",
    }
}

/// Records a field of the current span (the retry layer's `llm_request`
/// span when the request runs inside one; a span without that field
/// ignores it). Costs one atomic load when no subscriber was ever set.
#[inline]
pub(crate) fn record_span(field: &'static str, value: impl tracing::Value) {
    if tracing::dispatcher::has_been_set() {
        tracing::Span::current().record(field, value);
    }
}
