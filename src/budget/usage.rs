//! Settlement: correcting a request's charge with the usage its response reports.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::ledger::{CostDelta, Costs};
use super::state::{Charge, Shared};
use crate::headers::LimitStatus;
use crate::observe::SettleEvent;
use crate::wire::json::UsageScanner;
use crate::wire::{StreamEnd, StreamUsage, Usage};

pin_project! {
    /// The response body of a [`TokenBudget`](super::TokenBudget) service.
    ///
    /// Either the inner service's body, passed through frame by frame while
    /// its usage is read (see below), or, in enforce mode,
    /// the JSON of a 429 answer made by the budget itself.
    ///
    /// # Cancellation
    ///
    /// Dropping the body settles with what it had read so far.
    ///
    /// The response body is wrapped in [`ResponseBody`], which passes every frame on
    /// unchanged and at once, while a small scanner reads the bytes as they go by:
    /// the `message_start` and `message_delta` events of an event stream, or the
    /// top-level `usage` object of a JSON answer. Nothing is buffered beyond a
    /// bounded line (or the `usage` object itself). The charge is corrected
    /// (`actual - reserved`, per dimension) as soon as the usage is final:
    ///
    /// | The response | What is settled |
    /// |---|---|
    /// | event stream reaching `message_stop` | the usage the events reported, at that event |
    /// | event stream with an `event: error` (possible after a 200) | what the events said until then |
    /// | event stream ending or dropped before either | input from `message_start` if seen; output at the larger of what was reported and what was reserved (the server may have produced more than the last event said) |
    /// | JSON with a `usage` object | that usage, when the body ends (or is dropped after it) |
    /// | an error status (not 429) without usage | the output reservation is refunded (no output was produced); requests and input are kept |
    /// | anything else without usage | the charge is kept as reserved |
    ///
    /// With a final usage, the estimator is told (`TokenEstimator::observe`) and,
    /// when the request said its `max_tokens`, the output ratio
    /// (`output_tokens / max_tokens`) is learned for realtime mode.
    ///
    /// # Examples
    ///
    /// A streamed answer passes through byte for byte, and its usage settles the
    /// charge when `message_stop` goes by:
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_llm_limits::body::ReplayBody;
    /// use tower_llm_limits::budget::{Limits, TokenBudgetLayer};
    /// use tower_llm_limits::Dimension;
    ///
    /// const SSE: &str = "event: message_start\n\
    ///     data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n\
    ///     event: message_delta\n\
    ///     data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":40}}\n\n\
    ///     event: message_stop\n\
    ///     data: {\"type\":\"message_stop\"}\n\n";
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_llm_limits::BoxError> {
    /// let upstream = tower::service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
    ///     let response = Response::builder()
    ///         .header("content-type", "text/event-stream")
    ///         .body(Full::new(Bytes::from_static(SSE.as_bytes())))?;
    ///     Ok::<_, http::Error>(response)
    /// });
    /// let layer = TokenBudgetLayer::anthropic(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    /// let client = ServiceBuilder::new().layer(layer.clone()).service(upstream);
    /// let request = Request::post("/v1/messages").body(Full::new(Bytes::from(
    ///     r#"{"model":"claude-sonnet-4-5","max_tokens":1000,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
    /// )))?;
    /// let response = client.oneshot(request).await?;
    /// let seen = response.into_body().collect().await?.to_bytes();
    /// assert_eq!(seen, SSE.as_bytes());
    ///
    /// // 1,000 output tokens were reserved; the 40 produced are what stays charged.
    /// let snapshot = layer.snapshot();
    /// let output = snapshot.key("sonnet-4").map(|k| *k.dimension(Dimension::OutputTokens));
    /// assert!(output.and_then(|o| o.remaining).is_some_and(|r| r > 7_950.0));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # What it does not do
    ///
    /// - It does not change, delay or buffer the body: a frame is handed on as
    ///   soon as it arrives, and the scan keeps at most one bounded line.
    /// - It reads the Anthropic `usage` shape only (`input_tokens`,
    ///   `output_tokens`, `cache_*_input_tokens`); other shapes leave the charge
    ///   as reserved.
    /// - It does not settle a body that is neither read to its end nor dropped:
    ///   a response held forever keeps its reservation.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
            tracker: Option<Tracker>,
        },
        Full {
            data: Option<Bytes>,
        },
    }
}

impl<B> ResponseBody<B> {
    /// The inner body, passed through without reading its usage.
    pub(crate) fn plain(body: B) -> Self {
        Self {
            kind: Kind::Inner {
                body,
                tracker: None,
            },
        }
    }

    /// The inner body, settling the charge taken from `charge` (none: passed
    /// through) as its usage passes. The tracker is made where it stays,
    /// not moved in.
    pub(crate) fn settling(
        body: B,
        shared: &Arc<Shared>,
        charge: &mut Option<Box<Charge>>,
        sse: bool,
        error_status: bool,
        held_sync: Option<[LimitStatus; 3]>,
    ) -> Self {
        let Some(charge) = charge.take() else {
            return Self::plain(body);
        };
        Self {
            kind: Kind::Inner {
                body,
                tracker: Some(Tracker {
                    shared: Arc::clone(shared),
                    charge,
                    scanner: Scanner::new(sse),
                    error_status,
                    done: false,
                    reserved_input: None,
                    held_sync: held_sync.map(Box::new),
                    told_begun: false,
                }),
            },
        }
    }

    /// A body of these bytes (enforce mode's 429 answers).
    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Inner { mut body, tracker } => match ready!(body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let frame = frame.map_data(|mut d| d.copy_to_bytes(d.remaining()));
                    if let Some(t) = tracker.as_mut() {
                        if let Some(data) = frame.data_ref() {
                            t.push(data, body.is_end_stream());
                        }
                        if t.is_final() {
                            t.conclude(End::Final);
                            *tracker = None;
                        } else if body.is_end_stream() {
                            t.conclude(End::Ended);
                            *tracker = None;
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(e)) => {
                    if let Some(mut t) = tracker.take() {
                        t.conclude(End::Broken);
                    }
                    Poll::Ready(Some(Err(e)))
                }
                None => {
                    if let Some(mut t) = tracker.take() {
                        t.conclude(End::Ended);
                    }
                    Poll::Ready(None)
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Inner { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Inner { body, .. } => body.size_hint(),
        }
    }
}

/// The reader of the response's usage, chosen by its `content-type`.
#[derive(Debug)]
enum Scanner {
    Sse(Box<StreamUsage>),
    Json(UsageScanner),
}

impl Scanner {
    /// The reader for a response that is an event stream (`sse`) or JSON.
    fn new(sse: bool) -> Self {
        if sse {
            Scanner::Sse(Box::default())
        } else {
            Scanner::Json(UsageScanner::new())
        }
    }
}

/// How the body stopped being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The scanner saw the final event (`message_stop` or `error`).
    Final,
    /// The body ended normally.
    Ended,
    /// The body failed (a transport error mid-body).
    Broken,
    /// The body was dropped before it ended.
    Dropped,
}

/// Reads one response's usage and settles its charge once.
#[derive(Debug)]
pub(crate) struct Tracker {
    shared: Arc<Shared>,
    /// Boxed (made so by [`Shared::charge`]): a charge is a few hundred
    /// bytes, and every layer moves the response that holds it.
    charge: Box<Charge>,
    scanner: Scanner,
    error_status: bool,
    done: bool,
    /// The input tokens reserved at admission, when the reservation was
    /// corrected to a stream's `message_start` before the end (`None`: not
    /// corrected).
    reserved_input: Option<u64>,
    /// The response head's sync, held for the settlement
    /// ([`Ledger::sync_with_settlement`](crate::budget::ledger::Ledger::sync_with_settlement)).
    /// Boxed: only a ledger across a network holds one, and every response
    /// body carries this field.
    held_sync: Option<Box<[LimitStatus; 3]>>,
    /// Whether the fleet was told that the answer began (`fleet.rs`).
    told_begun: bool,
}

impl Tracker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        charge: Box<Charge>,
        sse: bool,
        error_status: bool,
    ) -> Self {
        Self {
            shared,
            charge,
            scanner: Scanner::new(sse),
            error_status,
            done: false,
            reserved_input: None,
            held_sync: None,
            told_begun: false,
        }
    }

    /// Holds the response head's sync until the settlement, which applies
    /// both in one ledger operation.
    pub(crate) fn hold_sync(&mut self, statuses: Option<[LimitStatus; 3]>) {
        self.held_sync = statuses.map(Box::new);
    }

    /// Settles a response whose body is empty (ended before any frame).
    pub(crate) fn conclude_empty(mut self) {
        self.conclude(End::Ended);
    }

    /// Reads the next bytes of the body (`last`: nothing follows them).
    fn push(&mut self, data: &[u8], last: bool) {
        match &mut self.scanner {
            Scanner::Sse(s) => {
                s.push(data);
                if self.reserved_input.is_none() && !self.error_status && s.started() {
                    let actual = s
                        .usage()
                        .charged_input_tokens(self.charge.cache_reads_count);
                    let reserved = self.charge.costs;
                    self.reserved_input = Some(reserved.input_tokens);
                    self.charge.costs.input_tokens = actual;
                    let delta = CostDelta::between(reserved, self.charge.costs);
                    self.shared.settle_input(&self.charge, delta);
                    self.charge.release_inexact();
                }
                if output_began(data) {
                    let so_far = s.usage();
                    let served = s.started().then(|| cached_prefix(&so_far));
                    self.begin_writes(served);
                    if self.shared.prompt_cache.is_some() {
                        self.tell_begun(&so_far);
                    }
                }
            }
            Scanner::Json(j) if last => j.push_last(data),
            Scanner::Json(j) => j.push(data),
        }
    }

    /// The answer has begun (a stream's first output arrived, or the
    /// answer completed): the prompt-cache prefixes it writes are readable
    /// from now on, and the requests holding for them go (see `prefix.rs`),
    /// told the prefix's size as the server counted it when the usage said
    /// (`message_start` for a stream; a JSON answer's usage comes with the
    /// whole answer, so its writes begin when its body ends).
    fn begin_writes(&mut self, served: Option<u64>) {
        if let Some(writing) = self.charge.writing.as_mut() {
            writing.begin(served);
        }
    }

    /// A stream's answer began and its `message_start` reported a cache
    /// write or read: the fleet is told now, not when the stream ends.
    fn tell_begun(&mut self, so_far: &Usage) {
        let cached = so_far.cache_creation_input_tokens > 0 || so_far.cache_read_input_tokens > 0;
        if cached && !std::mem::replace(&mut self.told_begun, true) {
            super::fleet::tell_cached(&self.shared, &self.charge, cached_prefix(so_far));
        }
    }

    /// Tells a ledger that shares the fleet's prompt-cache view the
    /// prefixes this response confirmed cached (any cache write or read
    /// reported, the rule the estimator applies to its own records); it
    /// goes with the settlement that follows.
    fn publish_cached(&self, usage: &Usage) {
        let cached = usage.cache_creation_input_tokens > 0 || usage.cache_read_input_tokens > 0;
        if cached && !self.told_begun {
            super::fleet::tell_cached(&self.shared, &self.charge, cached_prefix(usage));
        }
    }

    fn is_final(&self) -> bool {
        matches!(&self.scanner, Scanner::Sse(s) if s.end().is_some())
    }

    /// Settles the charge once, when the body ends or is dropped: reads the
    /// outcome, turns it into a correction, and applies it.
    fn conclude(&mut self, end: End) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let outcome = self.outcome(end);
        if let Outcome::Complete(usage) = &outcome {
            // An answer that completed wrote its prefixes (a stream's even if
            // no delta was seen: an empty answer, or a delta split across
            // frames).
            self.begin_writes(Some(cached_prefix(usage)));
        }
        let costs = self.charge.costs;
        let (delta, ratio, observed) = self.settlement(outcome);
        if let Some(usage) = observed.as_ref() {
            self.shared.estimator.observe(&self.charge.estimate, usage);
            self.publish_cached(usage);
        }
        // The estimator knows the prefixes it wrote from now on.
        self.charge.writing = None;
        let held = self.held_sync.take().map(|held| *held);
        self.shared
            .settle_response(&mut self.charge, delta, ratio, held);
        let reserved_input = self.reserved_input.unwrap_or(costs.input_tokens);
        self.shared.settings.hooks.settle(SettleEvent {
            reserved_input_tokens: reserved_input,
            reserved_output_tokens: costs.output_tokens,
            input_tokens: costs.input_tokens.saturating_add_signed(delta.input_tokens),
            output_tokens: costs
                .output_tokens
                .saturating_add_signed(delta.output_tokens),
            usage_known: matches!(outcome, Outcome::Complete(_) | Outcome::Stopped { .. }),
        });
        tracing::debug!(
            key = super::callers::logged_key(self.charge.key()),
            outcome = outcome.name(),
            end = ?end,
            reserved_input,
            reserved_output = costs.output_tokens,
            delta_input = delta.input_tokens,
            delta_output = delta.output_tokens,
            "budget: settled"
        );
    }

    /// What the response said about its usage, by the table in
    /// [`ResponseBody`]'s docs.
    fn outcome(&mut self, end: End) -> Outcome {
        match &mut self.scanner {
            Scanner::Sse(s) => {
                if end == End::Ended {
                    s.finish();
                }
                match s.end() {
                    Some(StreamEnd::Stopped) => Outcome::Complete(s.usage()),
                    Some(StreamEnd::Errored) => Outcome::Stopped {
                        usage: s.usage(),
                        input_known: s.started(),
                    },
                    None if end == End::Ended && self.error_status && !s.started() => {
                        Outcome::NoOutput
                    }
                    None => Outcome::Truncated {
                        usage: s.usage(),
                        input_known: s.started(),
                    },
                }
            }
            Scanner::Json(j) => match j.usage() {
                Some(usage) => Outcome::Complete(usage),
                None if self.error_status && end == End::Ended => Outcome::NoOutput,
                None => Outcome::Keep,
            },
        }
    }

    /// The correction an outcome calls for (`actual - reserved`), the output
    /// to learn (`(output_tokens, max_tokens)`), and the usage to tell the
    /// estimator.
    fn settlement(&self, outcome: Outcome) -> (CostDelta, Option<(u64, u64)>, Option<Usage>) {
        let reserved = self.charge.costs;
        let input_of = |u: &Usage, known: bool| {
            if known {
                u.charged_input_tokens(self.charge.cache_reads_count)
            } else {
                reserved.input_tokens
            }
        };
        let (actual, ratio, observed) = match outcome {
            Outcome::Complete(u) => {
                let ratio = self
                    .charge
                    .estimate
                    .max_tokens
                    .filter(|m| *m > 0)
                    .map(|m| (u.output_tokens, m));
                let actual = Costs {
                    input_tokens: input_of(&u, true),
                    output_tokens: u.output_tokens,
                    ..reserved
                };
                (actual, ratio, Some(u))
            }
            Outcome::Stopped { usage, input_known } => {
                let actual = Costs {
                    input_tokens: input_of(&usage, input_known),
                    output_tokens: usage.output_tokens,
                    ..reserved
                };
                (actual, None, input_known.then_some(usage))
            }
            Outcome::Truncated { usage, input_known } => {
                let actual = Costs {
                    input_tokens: input_of(&usage, input_known),
                    output_tokens: usage.output_tokens.max(reserved.output_tokens),
                    ..reserved
                };
                (actual, None, None)
            }
            Outcome::NoOutput => {
                let actual = Costs {
                    output_tokens: 0,
                    ..reserved
                };
                (actual, None, None)
            }
            Outcome::Keep => (reserved, None, None),
        };
        (CostDelta::between(reserved, actual), ratio, observed)
    }
}

/// What an answer's usage says of its prompt-cache prefix: the server read
/// the longest cached prefix and wrote the rest up to the last breakpoint,
/// so their sum is the size of the prefix up to that breakpoint, in the
/// server's tokens (0 when nothing was cached).
fn cached_prefix(usage: &Usage) -> u64 {
    usage
        .cache_creation_input_tokens
        .saturating_add(usage.cache_read_input_tokens)
}

/// Whether a chunk of an event stream carries the answer's first output: a
/// `content_block_delta` event. The server makes a prefix readable only once
/// the answer that writes it has begun; for a stream, the response head and
/// `message_start` may come before that (they do in the crate's emulator),
/// so they do not count.
fn output_began(data: &[u8]) -> bool {
    memchr::memmem::find(data, b"content_block_delta").is_some()
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.conclude(End::Dropped);
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The final usage is known.
    Complete(Usage),
    /// The server stopped (an `error` event): what the events said is final.
    Stopped { usage: Usage, input_known: bool },
    /// The stream stopped being read before its end.
    Truncated { usage: Usage, input_known: bool },
    /// An error answer with no usage: no output was produced.
    NoOutput,
    /// Nothing is known: the charge stands.
    Keep,
}

impl Outcome {
    fn name(&self) -> &'static str {
        match self {
            Outcome::Complete(_) => "complete",
            Outcome::Stopped { .. } => "stopped",
            Outcome::Truncated { .. } => "truncated",
            Outcome::NoOutput => "no_output",
            Outcome::Keep => "kept",
        }
    }
}
