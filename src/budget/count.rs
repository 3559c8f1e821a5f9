//! The `count_tokens` mode: exact input counts from the API's free
//! `POST /v1/messages/count_tokens` for requests that wait anyway.
//!
//! # When a request is counted
//!
//! - A request whose body was counted before (the same bytes: answers are
//!   kept by a keyed hash of the body, in a bounded cache) is charged the
//!   known count at once.
//! - Otherwise a request is counted when the budget does not admit it at
//!   once (it waits anyway) and its estimate is at least
//!   [`CountTokens::min_input_tokens`] (0 by default: every request that
//!   waits; the call is free, it fits in the endpoint's own rate, and an
//!   exact charge for a request that waits frees the room an over-estimate
//!   would hold), or it carries an image or a document, whatever its size:
//!   their cost is estimated from the documented rule (`width × height /
//!   750`, pages), which the server's own resizing and rendering may not
//!   follow, so their error is not small. The count runs while the request waits, through the same inner
//!   service, with the request's own headers (API key, version, betas); if
//!   the request's turn comes first, it goes with its estimate and the count
//!   is dropped. A request that could go now is never delayed.
//! - The endpoint has its own requests-per-minute limit, separate from the
//!   Messages API's (Anthropic's token-counting page: 100, 2,000, 4,000 and
//!   8,000 RPM for tiers 1 to 4). Calls are spaced at least `60 s / rpm`
//!   apart, so that a server bucket of that rate never refuses one; a request
//!   that finds no call free goes with its estimate.
//! - Any failure (a status other than 2xx, a transport error, an answer that
//!   is not `{"input_tokens": N}`, no answer within
//!   [`CountTokens::timeout`]) leaves the estimate in place.
//!
//! # What is charged
//!
//! `count_tokens` answers the whole prompt, without caching logic, so the
//! prompt-cache tracker still decides what is a cache read: the input charge
//! is the count minus the tokens expected to be read from the cache (for the
//! classes whose cache reads count toward ITPM, the whole count).
//! Each new answer is also a calibration sample for the estimator
//! ([`TokenEstimator::observe_count`](crate::estimate::TokenEstimator::observe_count)):
//! an exact count costs no response, so requests estimated after it start
//! closer to the truth.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::limits::Tier;
use super::state::{Admission, Charge, Shared};
use crate::body::{BufferedBytes, ReplayBody};
use crate::estimate::{Estimate, TokenEstimator};

/// The largest `count_tokens` answer read (a real one is about 20 bytes).
const MAX_ANSWER: usize = 4 * 1024;

/// The request fields `count_tokens` takes; the others (`max_tokens`,
/// `stream`, sampling settings, `metadata`, ...) are left out.
const COUNT_FIELDS: [&str; 7] = [
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "thinking",
    "mcp_servers",
];

/// Settings of the opt-in `count_tokens` mode
/// ([`TokenBudgetBuilder::count_tokens`](super::TokenBudgetBuilder::count_tokens);
/// on in [`TokenBudgetLayer::anthropic`](super::TokenBudgetLayer::anthropic)
/// with the Tier 1 rate, 100 RPM). See the [module docs](super) for when a
/// request is counted.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_llm_limits::budget::{CountTokens, Tier, TokenBudgetLayer};
///
/// let layer = TokenBudgetLayer::builder()
///     .limits(Tier::Tier2)
///     .count_tokens(Some(
///         CountTokens::for_tier(Tier::Tier2)
///             .min_input_tokens(2_000)
///             .timeout(Duration::from_secs(2)),
///     ))
///     .build();
/// # let _ = layer;
/// assert_eq!(CountTokens::for_tier(Tier::Tier2).rpm(), 2_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountTokens {
    rpm: u64,
    min_input_tokens: u64,
    timeout: Duration,
    cache_entries: usize,
}

impl CountTokens {
    /// Counting at most `rpm` calls per minute (at least 1), requests of
    /// any size, a 5 s timeout, 1,024 answers kept.
    pub fn new(rpm: u64) -> Self {
        Self {
            rpm: rpm.max(1),
            min_input_tokens: 0,
            timeout: Duration::from_secs(5),
            cache_entries: 1_024,
        }
    }

    /// The endpoint's published rate for a tier: 100, 2,000, 4,000 and 8,000
    /// RPM for tiers 1 to 4. The Start, Build and Scale tiers take the lower
    /// of the values published for them (2,000, 4,000 and 8,000).
    pub fn for_tier(tier: Tier) -> Self {
        Self::new(match tier {
            Tier::Tier1 => 100,
            Tier::Tier2 | Tier::Start => 2_000,
            Tier::Tier3 | Tier::Build => 4_000,
            Tier::Tier4 | Tier::Scale => 8_000,
        })
    }

    /// Only requests estimated at this many input tokens or more are counted
    /// (a cached answer is used whatever the size). Default 0: every request
    /// that waits is counted while calls are free; raise it to keep the
    /// endpoint's calls for large requests. (Measured on the crate's
    /// simulation, ten seeds: counting every waiting request instead of
    /// those of 1,000 tokens or more removed 2 of 3 429s and gave up to
    /// +0.009 of the workload minimum.)
    pub fn min_input_tokens(mut self, tokens: u64) -> Self {
        self.min_input_tokens = tokens;
        self
    }

    /// How long a count may take before the estimate stands (the request
    /// never waits for it: this only bounds the call).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The most answers kept (at least 1); the oldest go first.
    pub fn cache_entries(mut self, entries: usize) -> Self {
        self.cache_entries = entries.max(1);
        self
    }

    /// The calls per minute.
    pub fn rpm(&self) -> u64 {
        self.rpm
    }
}

/// The run-time state of the `count_tokens` mode, shared by a budget.
#[derive(Debug)]
pub(crate) struct Counter {
    pub(crate) config: CountTokens,
    hasher: RandomState,
    state: Mutex<CounterState>,
}

#[derive(Debug, Default)]
struct CounterState {
    /// When the next call may go.
    next: Option<Instant>,
    answers: HashMap<u64, u64>,
    order: VecDeque<u64>,
}

impl Counter {
    pub(crate) fn new(config: CountTokens) -> Self {
        Self {
            config,
            hasher: RandomState::new(),
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CounterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The keyed hash of a request body.
    pub(crate) fn hash(&self, body: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(body);
        h.finish()
    }

    /// The count known for a body hash.
    pub(crate) fn cached(&self, hash: u64) -> Option<u64> {
        self.lock().answers.get(&hash).copied()
    }

    /// The count known for a body: hashed only when some count is kept (a
    /// client that never waits asks for none).
    pub(crate) fn known(&self, body: &[u8]) -> Option<u64> {
        if self.lock().answers.is_empty() {
            return None;
        }
        self.cached(self.hash(body))
    }

    /// Whether counting this request is worth a call: not a fallback
    /// estimate, and large enough (or carrying media, which the estimator
    /// sizes by formula).
    fn worth(&self, charge: &Charge, body: &[u8]) -> bool {
        let size = charge
            .estimate
            .raw_input_tokens
            .saturating_add(charge.estimate.cache_read_tokens);
        let small = size < self.config.min_input_tokens && !carries_media(body);
        !charge.estimate.fallback && !small
    }

    /// When the next call is free, if not now.
    fn next_free(&self) -> Option<Instant> {
        self.lock().next.filter(|next| Instant::now() < *next)
    }

    /// Takes the next call slot if it is free now.
    fn take_slot(&self, now: Instant) -> bool {
        let spacing = Duration::from_secs(60) / u32::try_from(self.config.rpm).unwrap_or(u32::MAX);
        let mut state = self.lock();
        if state.next.is_some_and(|next| now < next) {
            return false;
        }
        state.next = Some(now + spacing);
        true
    }

    fn remember(&self, hash: u64, tokens: u64) {
        let mut state = self.lock();
        if state.answers.insert(hash, tokens).is_none() {
            state.order.push_back(hash);
        }
        while state.order.len() > self.config.cache_entries {
            if let Some(old) = state.order.pop_front() {
                state.answers.remove(&old);
            }
        }
    }

    /// Starts counting a request (built from its `head` and `body`)
    /// through `svc`, if it is worth it and a call is free now.
    pub(crate) fn start<S, B>(
        &self,
        charge: &Charge,
        head: HeadRef<'_>,
        body: &Bytes,
        svc: &mut Option<S>,
    ) -> Option<CountCall<S, S::Future, B>>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        if !self.worth(charge, body) || svc.is_none() {
            return None;
        }
        // Checked first, so that a request woken while no call is free does
        // not build its count request again.
        if self.next_free().is_some() {
            return None;
        }
        let count = count_request(head, body)?;
        if !self.take_slot(Instant::now()) {
            return None;
        }
        let svc = svc.take()?;
        Some(CountCall {
            hash: self.hash(body),
            sleep: Box::pin(tokio::time::sleep(self.config.timeout)),
            step: Step::Readying {
                svc: Some(svc),
                request: Some(count),
            },
        })
    }
}

/// Whether a body holds a content block of type `image` or `document` (a
/// JSON string that is exactly one of these words; a false match costs one
/// count call).
fn carries_media(body: &[u8]) -> bool {
    memchr::memmem::find(body, b"\"image\"").is_some()
        || memchr::memmem::find(body, b"\"document\"").is_some()
}

/// What a `count_tokens` request copies of its request's head: read from
/// the request, or from the retry layer's copy of the head a waiting
/// request is parked on ([`Parked`](crate::wait::Parked)).
#[derive(Clone, Copy)]
pub(crate) struct HeadRef<'a> {
    uri: &'a Uri,
    version: Version,
    headers: &'a HeaderMap,
}

impl<'a> HeadRef<'a> {
    /// The head of `request`.
    pub(crate) fn of<B>(request: &'a Request<B>) -> Self {
        HeadRef {
            uri: request.uri(),
            version: request.version(),
            headers: request.headers(),
        }
    }

    /// A head in parts.
    pub(crate) fn of_parts(parts: &'a Parts) -> Self {
        HeadRef {
            uri: &parts.uri,
            version: parts.version,
            headers: &parts.headers,
        }
    }
}

/// The `count_tokens` request for a Messages request: same scheme, authority
/// and headers, path `…/messages/count_tokens`, the body's counted fields.
/// `None` if the path does not end in `/messages` or the body is not a JSON
/// object.
fn count_request<B>(head: HeadRef<'_>, body: &[u8]) -> Option<Request<ReplayBody<B>>> {
    let uri = head.uri;
    let path = uri.path().trim_end_matches('/');
    if !path.ends_with("/messages") {
        return None;
    }
    let mut fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).ok()?;
    fields.retain(|k, _| COUNT_FIELDS.contains(&k.as_str()));
    let json = Bytes::from(serde_json::to_vec(&fields).ok()?);
    let mut builder = Uri::builder();
    if let Some(scheme) = uri.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = uri.authority() {
        builder = builder.authority(authority.clone());
    }
    let uri = builder
        .path_and_query(format!("{path}/count_tokens"))
        .build()
        .ok()?;
    let mut count = Request::new(ReplayBody::full(json.clone(), None));
    *count.method_mut() = Method::POST;
    *count.uri_mut() = uri;
    *count.version_mut() = head.version;
    let headers = count.headers_mut();
    for (name, value) in head.headers {
        if name != CONTENT_LENGTH && name != TRANSFER_ENCODING {
            headers.append(name, value.clone());
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(json.len()));
    // Its whole body, as for any request a layer holds buffered: an inner
    // layer that sends the buffered bytes (a pool's upstream) can send it.
    count.extensions_mut().insert(BufferedBytes(json));
    Some(count)
}

/// Charges a request its exact count: the count minus the tokens expected to
/// be read from the prompt cache (the whole count for the classes whose
/// cache reads count toward ITPM).
///
/// The expected read is an estimate, in the estimator's units (the raw
/// estimate, before calibration), while the count is the server's: the
/// read is converted at the ratio of the count to the whole prompt as
/// estimated, and rounded down, so that a high estimate of the prefix never
/// lowers the charge below what the server will count. (Subtracting the raw
/// prefix from the exact count under-charged a request by a third of its
/// prefix when the estimator ran 35 % high, and the server answered 429.)
pub(crate) fn apply(charge: &mut Charge, counted: u64) {
    charge.counted = Some(counted);
    let read = if charge.cache_reads_count {
        0
    } else {
        read_in_counted_units(
            &charge.estimate,
            (super::prefix::read_charged(charge), charge.prefix_served),
            counted,
        )
    };
    let input = counted.saturating_sub(read);
    tracing::debug!(
        key = super::callers::logged_key(charge.key()),
        from = charge.costs.input_tokens,
        to = input,
        "budget: charged the count_tokens answer"
    );
    charge.costs.input_tokens = input;
}

/// Before a new try of a request that has waited: when the prompt-cache
/// read its estimate counts may have left the server's cache while it
/// waited (`TokenEstimator::recheck_cache_read`), it is charged the whole
/// prompt again: the estimate without the read, or its count whole (less
/// a prefix cache-aware admission charges as read, which its own writer's
/// answer keeps readable, `prefix::refresh`). Not while a reservation is in
/// flight: its costs are the ones asked.
pub(crate) fn recheck_read(shared: &Shared, charge: &mut Charge, adm: &Admission) {
    if charge.estimate.cache_read_tokens == 0 || adm.is_asking() || !adm.has_waited() {
        return;
    }
    let Some(estimate) = shared.estimator.recheck_cache_read(&charge.estimate) else {
        return;
    };
    charge.estimate = estimate;
    if let Some(counted) = charge.counted {
        apply(charge, counted);
    } else if charge.input_capped {
        // Capped at the whole bucket until its count comes: it stays so.
    } else if charge.prefix_read > 0 {
        super::prefix::charge_read(charge);
    } else {
        charge.costs.input_tokens = charge.estimate.input_tokens;
    }
}

/// The server's size of the cache read a request expects (the longer of the
/// estimate's and the prefix charged as read by cache-aware admission), if
/// an answer said it; `None` too when no read is expected.
pub(crate) fn served_read(
    estimate: &Estimate,
    (prefix_read, prefix_served): (u64, Option<u64>),
) -> Option<u64> {
    if prefix_read > estimate.cache_read_tokens {
        prefix_served
    } else if estimate.cache_read_tokens > 0 {
        estimate.cache_read_served
    } else {
        None
    }
}

/// The cache read expected for a request (the longer of the estimate's and
/// the prefix charged as read by cache-aware admission, each as estimated
/// and, when a response said, as the server counted it), in the count's
/// units, at most `counted`: the server's size when known, else the
/// estimate converted at `read * counted / estimated whole prompt`,
/// rounded down.
fn read_in_counted_units(
    estimate: &Estimate,
    (prefix_read, prefix_served): (u64, Option<u64>),
    counted: u64,
) -> u64 {
    if let Some(served) = served_read(estimate, (prefix_read, prefix_served)) {
        return served.min(counted);
    }
    let read = estimate.cache_read_tokens.max(prefix_read);
    let whole = estimate
        .raw_input_tokens
        .saturating_add(estimate.cache_read_tokens)
        .max(read);
    if whole == 0 {
        return 0;
    }
    let converted = u128::from(read) * u128::from(counted) / u128::from(whole);
    u64::try_from(converted).unwrap_or(u64::MAX).min(counted)
}

pin_project! {
    /// One `count_tokens` call: readiness, the call, then its body, within
    /// the timeout.
    pub(crate) struct CountCall<S, F, B> {
        hash: u64,
        sleep: Pin<Box<Sleep>>,
        #[pin]
        step: Step<S, F, B>,
    }
}

pin_project! {
    #[project = StepProj]
    enum Step<S, F, B> {
        Readying {
            svc: Option<S>,
            request: Option<Request<ReplayBody<B>>>,
        },
        Calling {
            #[pin]
            fut: F,
        },
        Done,
    }
}

impl<S, B> CountCall<S, S::Future, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    /// Polls the call up to its response head; the body is read by
    /// [`CountBody`]. `Ready(None)`: failed (the estimate stands).
    pub(crate) fn poll_head(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(u64, S::Response)>> {
        let mut this = self.project();
        if this.sleep.as_mut().poll(cx).is_ready() {
            tracing::debug!("budget: count_tokens timed out; the estimate stands");
            return Poll::Ready(None);
        }
        loop {
            match this.step.as_mut().project() {
                StepProj::Readying { svc, request } => {
                    let Some(s) = svc.as_mut() else {
                        return Poll::Ready(None);
                    };
                    if ready!(s.poll_ready(cx)).is_err() {
                        this.step.set(Step::Done);
                        return Poll::Ready(None);
                    }
                    let (Some(mut s), Some(request)) = (svc.take(), request.take()) else {
                        return Poll::Ready(None);
                    };
                    let fut = s.call(request);
                    this.step.set(Step::Calling { fut });
                }
                StepProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx));
                    this.step.set(Step::Done);
                    return Poll::Ready(result.ok().map(|r| (*this.hash, r)));
                }
                StepProj::Done => return Poll::Ready(None),
            }
        }
    }

    /// Whether the timeout passed.
    pub(crate) fn timed_out(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        self.project().sleep.as_mut().poll(cx).is_ready()
    }
}

mod sealed {
    pub trait Sealed {}
    impl<B> Sealed for http::Response<B> {}
}

/// An HTTP response as the budget's inner service answers it
/// (`http::Response<B>`, the only implementation): lets the budget's
/// response future name the body of its own `count_tokens` calls. You never
/// implement or call it.
pub trait HttpResponse: sealed::Sealed {
    /// The response's body type.
    type Body;
}

impl<B> HttpResponse for Response<B> {
    type Body = B;
}

/// Reads a `count_tokens` answer body: `{"input_tokens": N}`.
pub(crate) struct CountBody<RB> {
    hash: u64,
    body: Pin<Box<RB>>,
    buf: BytesMut,
}

impl<RB: Body> CountBody<RB> {
    /// The body of a response head, if it is a success.
    pub(crate) fn new(hash: u64, response: Response<RB>) -> Option<Self> {
        if !response.status().is_success() {
            tracing::debug!(
                status = response.status().as_u16(),
                "budget: count_tokens refused; the estimate stands"
            );
            return None;
        }
        Some(Self {
            hash,
            body: Box::pin(response.into_body()),
            buf: BytesMut::new(),
        })
    }

    /// Reads the body to its end; `Ready(Some(n))` with the count (also
    /// remembered in `counter`), `Ready(None)` if it failed.
    pub(crate) fn poll(&mut self, counter: &Counter, cx: &mut Context<'_>) -> Poll<Option<u64>> {
        loop {
            match ready!(self.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while bytes::Buf::has_remaining(&data) {
                            let chunk = bytes::Buf::chunk(&data);
                            let n = chunk.len();
                            if self.buf.len() + n > MAX_ANSWER {
                                return Poll::Ready(None);
                            }
                            self.buf.extend_from_slice(chunk);
                            bytes::Buf::advance(&mut data, n);
                        }
                    }
                }
                Some(Err(_)) => return Poll::Ready(None),
                None => {
                    let counted = parse_answer(&self.buf);
                    match counted {
                        Some(n) => counter.remember(self.hash, n),
                        None => tracing::debug!(
                            "budget: count_tokens answer unreadable; the estimate stands"
                        ),
                    }
                    return Poll::Ready(counted);
                }
            }
        }
    }
}

impl<RB> std::fmt::Debug for CountBody<RB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountBody")
            .field("read", &self.buf.len())
            .finish()
    }
}

/// A request's `count_tokens` progress (lives in its response future).
pub(crate) struct Counting<S, F, B, RB> {
    /// A clone of the inner service for the call, until it is made.
    svc: Option<S>,
    /// The request body, to count and to hash.
    body: Option<Bytes>,
    checked: bool,
    call: Option<Pin<Box<CountCall<S, F, B>>>>,
    reading: Option<CountBody<RB>>,
    /// Wakes a request waiting at its queue's head, uncounted, when the next
    /// call is free ([`retry_when_free`](Self::retry_when_free)).
    retry: Option<Pin<Box<Sleep>>>,
}

impl<S, F, B, RB> std::fmt::Debug for Counting<S, F, B, RB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counting")
            .field("calling", &self.call.is_some())
            .field("reading", &self.reading.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, F, B, RB> Counting<S, F, B, RB> {
    /// Counting with this service clone and body (`None`: the mode is off,
    /// or the body was not buffered).
    pub(crate) fn new(svc: Option<S>, body: Option<Bytes>) -> Self {
        Self {
            svc: body.as_ref().and(svc),
            body,
            checked: false,
            call: None,
            reading: None,
            retry: None,
        }
    }

    fn finish(&mut self) {
        self.svc = None;
        self.body = None;
        self.call = None;
        self.reading = None;
        self.retry = None;
    }
}

impl<S, B, RB> Counting<S, S::Future, B, RB>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>>,
    RB: Body,
{
    /// Before each question to the budget: a known count for the body, or
    /// the running call's answer, becomes the request's input charge; a new
    /// answer also goes to `estimator` as a calibration sample.
    pub(crate) fn poll(
        &mut self,
        counter: Option<&Counter>,
        estimator: &dyn TokenEstimator,
        charge: &mut Charge,
        cx: &mut Context<'_>,
    ) {
        let Some(counter) = counter else {
            return;
        };
        if !std::mem::replace(&mut self.checked, true) {
            let known = self.body.as_ref().and_then(|b| counter.known(b));
            if let Some(n) = known {
                apply(charge, n);
                self.finish();
                return;
            }
        }
        if let Some(call) = self.call.as_mut() {
            if self.reading.is_none() {
                match call.as_mut().poll_head(cx) {
                    Poll::Pending => return,
                    Poll::Ready(None) => return self.finish(),
                    Poll::Ready(Some((hash, response))) => match CountBody::new(hash, response) {
                        Some(body) => self.reading = Some(body),
                        None => return self.finish(),
                    },
                }
            } else if call.as_mut().timed_out(cx) {
                return self.finish();
            }
        }
        if let Some(reading) = self.reading.as_mut() {
            if let Poll::Ready(answer) = reading.poll(counter, cx) {
                if let Some(n) = answer {
                    // An exact count is a free calibration sample: requests
                    // estimated from now on start closer to the truth.
                    estimator.observe_count(&charge.estimate, n);
                    apply(charge, n);
                }
                self.finish();
            }
        }
    }

    /// Whether a count is being asked or read.
    pub(crate) fn in_flight(&self) -> bool {
        self.call.is_some() || self.reading.is_some()
    }

    /// The request waits at its queue's head (the ledger named a wait) and
    /// no count call was free when it was refused: wakes it when the next
    /// call is free, so that it is counted then rather than admitted later
    /// on its estimate. The requests behind the head ask for no wakeup (a
    /// count each as they arrive, when a call is free): one task wakes per
    /// call.
    pub(crate) fn retry_when_free(
        &mut self,
        counter: Option<&Counter>,
        charge: &Charge,
        cx: &mut Context<'_>,
    ) {
        let Some(counter) = counter else {
            return;
        };
        let worth = self.body.as_ref().is_some_and(|b| counter.worth(charge, b));
        if !worth || self.svc.is_none() || self.in_flight() || charge.counted.is_some() {
            self.retry = None;
            return;
        }
        let Some(next) = counter.next_free() else {
            // A call is free, and yet none started: nothing to wait for.
            self.retry = None;
            return;
        };
        let sleep = self
            .retry
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
        if sleep.deadline() != next {
            sleep.as_mut().reset(next);
        }
        if sleep.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }

    /// The budget said wait: starts the count if it is worth it and a call
    /// is free. True if it started (poll it next).
    pub(crate) fn start(
        &mut self,
        counter: Option<&Counter>,
        charge: &Charge,
        head: Option<HeadRef<'_>>,
    ) -> bool {
        let (Some(counter), Some(head)) = (counter, head) else {
            return false;
        };
        if self.call.is_some() || charge.counted.is_some() {
            return false;
        }
        let Some(body) = self.body.as_ref() else {
            return false;
        };
        match counter.start(charge, head, body, &mut self.svc) {
            Some(call) => {
                self.call = Some(Box::pin(call));
                true
            }
            None => false,
        }
    }
}

/// `input_tokens` of a `count_tokens` answer.
fn parse_answer(bytes: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v.get("input_tokens")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_is_found_as_a_content_type_only() {
        assert!(carries_media(
            br#"{"messages":[{"role":"user","content":[{"type":"image","source":{}}]}]}"#
        ));
        assert!(carries_media(br#"{"content":[{"type": "document"}]}"#));
        // The word inside a text (quoted there or not) is not a block.
        assert!(!carries_media(
            br#"{"content":"an image, a \"document\", \"image\""}"#
        ));
    }

    #[test]
    fn reads_answers() {
        assert_eq!(parse_answer(br#"{"input_tokens": 1234}"#), Some(1234));
        assert_eq!(parse_answer(br#"{"input_tokens": -1}"#), None);
        assert_eq!(parse_answer(br#"{"tokens": 3}"#), None);
        assert_eq!(parse_answer(b"not json"), None);
    }

    #[test]
    fn builds_the_count_request() {
        let body = br#"{"model":"m","max_tokens":5,"stream":true,"temperature":0.5,"system":"s","messages":[]}"#;
        let req = Request::post("https://api.example/anthropic/v1/messages?beta=true")
            .header("x-api-key", "k")
            .header("content-length", body.len())
            .body(ReplayBody::<()>::full(Bytes::from_static(body), None))
            .unwrap();
        let count = count_request::<()>(HeadRef::of(&req), body).unwrap();
        assert_eq!(
            count.uri(),
            "https://api.example/anthropic/v1/messages/count_tokens"
        );
        assert_eq!(count.headers()["x-api-key"], "k");
        let len: usize = count.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, r#"{"messages":[],"model":"m","system":"s"}"#.len());
        let other = Request::post("/v1/complete")
            .body(ReplayBody::<()>::full(Bytes::from_static(body), None))
            .unwrap();
        assert!(count_request::<()>(HeadRef::of(&other), body).is_none());
    }

    #[test]
    fn the_read_is_subtracted_in_the_counts_units() {
        // Estimated 10,000 tokens in all, 6,000 of them a prefix read; the
        // server counts 7,000 for the whole prompt (the estimate ran 43 %
        // high): the prefix is about 4,200 of the server's tokens, not 6,000.
        let estimate = Estimate {
            raw_input_tokens: 4_000,
            cache_read_tokens: 6_000,
            ..Estimate::default()
        };
        assert_eq!(read_in_counted_units(&estimate, (0, None), 7_000), 4_200);
        // A longer prefix charged as read by cache-aware admission decides.
        assert_eq!(
            read_in_counted_units(&estimate, (8_000, None), 7_000),
            5_600
        );
        // Never more than the count, nothing to read without an estimate.
        let odd = Estimate {
            raw_input_tokens: 0,
            cache_read_tokens: 0,
            ..Estimate::default()
        };
        assert_eq!(read_in_counted_units(&odd, (500, None), 300), 300);
        assert_eq!(
            read_in_counted_units(&Estimate::default(), (0, None), 300),
            0
        );
    }

    #[test]
    fn the_servers_size_of_the_prefix_beats_a_conversion() {
        // The estimate put 89 % of the prompt in the prefix; the server's
        // answer to the writer said the prefix is 3,114 of its tokens. The
        // count is 4,851: 1,737 are charged, not 517.
        let estimate = Estimate {
            raw_input_tokens: 600,
            cache_read_tokens: 0,
            ..Estimate::default()
        };
        assert_eq!(
            read_in_counted_units(&estimate, (5_000, Some(3_114)), 4_851),
            3_114
        );
        // A prefix the estimator believes warm, sized by an earlier answer.
        let warm = Estimate {
            raw_input_tokens: 600,
            cache_read_tokens: 5_000,
            cache_read_served: Some(3_114),
            ..Estimate::default()
        };
        assert_eq!(read_in_counted_units(&warm, (0, None), 4_851), 3_114);
        // The longer of the two decides, with its own size.
        assert_eq!(
            read_in_counted_units(&warm, (6_000, Some(4_000)), 4_851),
            4_000
        );
        assert_eq!(
            read_in_counted_units(&warm, (6_000, None), 4_851),
            6_000 * 4_851 / 6_000
        );
        // Never more than the count.
        assert_eq!(read_in_counted_units(&warm, (0, None), 3_000), 3_000);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_are_spaced_and_answers_bounded() {
        let counter = Counter::new(CountTokens::new(120).cache_entries(2));
        let now = Instant::now();
        assert!(counter.take_slot(now));
        assert!(!counter.take_slot(now + Duration::from_millis(499)));
        assert!(counter.take_slot(now + Duration::from_millis(500)));
        for h in 0..3 {
            counter.remember(h, h * 10);
        }
        assert_eq!(counter.cached(0), None);
        assert_eq!(counter.cached(2), Some(20));
    }
}
