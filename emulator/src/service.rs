//! The emulator as a tower `Service`: request handling end to end.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use tokio::time::{sleep, Instant};

use super::batch;
use super::body::{EmulatorBody, Step};
use super::cache::CacheOutcome;
use super::config::{scale, Fault};
use super::limiter::{Headroom, RequestCost};
use super::response::{
    error_response, generate_text, insert_rate_limit_headers, insert_request_id,
    insert_retry_after, json_response, message_json, random_id, rate_limit_message,
    spend_limit_message, sse_closing, sse_error, sse_headers, sse_opening, sse_text_delta,
    UsageReport, ACCELERATION_MESSAGE,
};
use super::rng::{mix, Rng};
use super::tokens::{parse_request, Endpoint, ParsedRequest};
use super::Shared;
use tower_llm_limits::budget::{Limits, ModelClass, OutputMode};
use tower_llm_limits::wire::error::{ErrorBody, ErrorKind};
use tower_llm_limits::wire::ratelimit::LimitState;
use tower_llm_limits::{BoxError, Dimension};

#[derive(Serialize)]
struct CountTokensAnswer {
    input_tokens: u64,
}

/// The emulator as a `tower::Service<http::Request<B>>`: made by
/// [`Emulator::service`](super::Emulator::service), cheap to clone (every clone
/// shares the emulator's state).
///
/// Answers every request with an `http::Response<EmulatorBody>`, as the API
/// would, including its errors (400, 404, 413, 429, 500, 529). It fails
/// (`Err`) only to emulate a dropped connection: the `connection_reset` fault
/// (an [`std::io::Error`] of kind `ConnectionReset`), or a request body that
/// could not be read (the body's error), or a body that did not arrive
/// within the body read timeout (an [`std::io::Error`] of kind `TimedOut`).
///
/// # Cancellation
///
/// Dropping the response future (or a streamed body) of an admitted request
/// stops it: the request and its input stay charged (it reached the server),
/// output tokens are charged as produced so far.
#[derive(Clone)]
pub struct EmulatorService {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for EmulatorService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorService").finish_non_exhaustive()
    }
}

impl<B> tower_service::Service<Request<B>> for EmulatorService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<EmulatorBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> ResponseFuture {
        ResponseFuture {
            inner: Box::pin(handle(self.shared.clone(), request)),
        }
    }
}

/// The future of [`EmulatorService`]'s answer.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Response<EmulatorBody>, BoxError>> + Send>>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<EmulatorBody>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// An admitted request's output accounting, settled when finished or dropped.
pub(crate) struct Admission {
    shared: Arc<Shared>,
    class: ModelClass,
    mode: OutputMode,
    /// Output tokens charged so far (the reservation, then realtime charges).
    charged: u64,
    produced: u64,
    done: bool,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("class", &self.class)
            .field("charged", &self.charged)
            .field("produced", &self.produced)
            .finish()
    }
}

impl Admission {
    /// Accounts for `n` output tokens produced now.
    pub(crate) fn produce(&mut self, n: u64) {
        if self.done || n == 0 {
            return;
        }
        let now = Instant::now();
        self.produced += n;
        {
            let class = self.class.as_str();
            let mut stats = self.shared.lock_stats();
            stats.class(class).output_tokens += n;
            stats.at_second(class, now, |s| s.output_tokens += n);
        }
        if self.mode == OutputMode::Realtime && self.produced > self.charged {
            let extra = self.produced - self.charged;
            self.charged = self.produced;
            self.shared
                .limiter
                .charge(&self.class, Dimension::OutputTokens, extra, now);
        }
    }

    /// Settles the output to what was produced (refunds an unused reservation).
    pub(crate) fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let now = Instant::now();
        let limiter = &self.shared.limiter;
        if self.produced > self.charged {
            let extra = self.produced - self.charged;
            limiter.charge(&self.class, Dimension::OutputTokens, extra, now);
        } else if self.produced < self.charged {
            let unused = self.charged - self.produced;
            limiter.refund(&self.class, Dimension::OutputTokens, unused, now);
        }
        self.charged = self.produced;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Reads a request's body within the configured size and time, or the
/// 413 that a body too large gets (answered by the edge, Cloudflare, before
/// the API: no request id); `Err` if the body failed or timed out.
async fn read_or_refuse<B>(
    shared: &Shared,
    body: B,
) -> Result<Result<Bytes, Response<EmulatorBody>>, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let limit = shared.config.body_limit;
    match read_body(body, limit, shared.config.body_read_timeout).await {
        Ok(bytes) => Ok(Ok(bytes)),
        Err(ReadError::TooLarge) => Ok(Err(invalid(
            shared,
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RequestTooLarge,
            "Request exceeds the maximum allowed number of bytes.",
            None,
        ))),
        Err(ReadError::Failed(e)) => Err(e),
    }
}

enum ReadError {
    TooLarge,
    Failed(BoxError),
}

/// Reads the whole body, up to `limit` bytes and within `timeout`.
async fn read_body<B>(body: B, limit: usize, timeout: Duration) -> Result<Bytes, ReadError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ReadError::TooLarge),
        Ok(Err(e)) => Err(ReadError::Failed(e)),
        Err(_) => Err(ReadError::Failed(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the request body did not arrive within {timeout:?}"),
        )))),
    }
}

/// The checks the API makes beyond the body's shape: a model it serves, and
/// at most so many cache breakpoints. `Err` carries the message.
fn validate(shared: &Shared, parsed: &ParsedRequest) -> Result<(), String> {
    let config = &shared.config;
    if !config.allow_unknown_models && ModelClass::of(&parsed.model) == ModelClass::Other {
        let shown: String = parsed.model.chars().take(MODEL_SHOWN_CHARS).collect();
        let more = if shown.len() < parsed.model.len() {
            "..."
        } else {
            ""
        };
        return Err(format!(
            "model: {shown}{more} is not a known model (Claude Opus 4, Sonnet 4, Sonnet 3.7, \
             Haiku 4.5, Haiku 3.5 or Haiku 3)"
        ));
    }
    if let Some(max) = config.max_cache_breakpoints {
        let found = parsed
            .units
            .iter()
            .filter(|u| u.breakpoint.is_some())
            .count();
        if found > max {
            return Err(format!(
                "A maximum of {max} blocks with cache_control may be provided. Found {found}."
            ));
        }
    }
    Ok(())
}

/// How much of an unknown model name an error message repeats.
const MODEL_SHOWN_CHARS: usize = 256;

/// Sleeps on tokio's clock, not at all for zero (a zero sleep still waits
/// for the timer's next tick, about a millisecond, on a running clock).
async fn pause(d: Duration) {
    if !d.is_zero() {
        sleep(d).await;
    }
}

/// `d * n`, saturating.
fn times(d: Duration, n: u64) -> Duration {
    if d.is_zero() || n == 0 {
        return Duration::ZERO;
    }
    u32::try_from(n)
        .ok()
        .and_then(|n| d.checked_mul(n))
        .unwrap_or(Duration::MAX)
}

fn connection_reset() -> BoxError {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "connection reset by the emulator (injected fault)",
    ))
}

/// Handles one request from start to answer.
async fn handle<B>(
    shared: Arc<Shared>,
    request: Request<B>,
) -> Result<Response<EmulatorBody>, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let seq = shared.next_seq();
    let mut rng = Rng::new(mix(shared.config.seed, seq));
    let request_id = random_id("req_", &mut rng);
    let (parts, body) = request.into_parts();

    if let Some(rest) = batch_path(parts.uri.path()) {
        let bytes = match read_or_refuse(&shared, body).await? {
            Ok(bytes) => bytes,
            Err(too_large) => return Ok(too_large),
        };
        let method = &parts.method;
        return Ok(batch::answer(
            &shared,
            method,
            rest,
            &bytes,
            &mut rng,
            &request_id,
        ));
    }
    let endpoint = match route(&parts.method, parts.uri.path()) {
        Ok(endpoint) => endpoint,
        Err((status, kind, message)) => {
            return Ok(invalid(&shared, status, kind, message, Some(&request_id)));
        }
    };
    let bytes = match read_or_refuse(&shared, body).await? {
        Ok(bytes) => bytes,
        Err(too_large) => return Ok(too_large),
    };
    let parsed = match parse_request(&bytes, endpoint, &shared.config.token_counter)
        .and_then(|p| validate(&shared, &p).map(|()| p))
    {
        Ok(p) => p,
        Err(message) => {
            return Ok(invalid(
                &shared,
                StatusCode::BAD_REQUEST,
                ErrorKind::InvalidRequest,
                &message,
                Some(&request_id),
            ));
        }
    };

    match endpoint {
        Endpoint::CountTokens => Ok(count_tokens(&shared, &parsed, &request_id)),
        Endpoint::Messages => messages(shared, parsed, rng, request_id).await,
    }
}

/// The rest of a Message Batches path (`/v1/messages/batches...`).
fn batch_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/messages/batches")?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// The endpoint of a path and method, or the error to answer (`404` for an
/// unknown path, `405` for another method than `POST`).
fn route(method: &Method, path: &str) -> Result<Endpoint, (StatusCode, ErrorKind, &'static str)> {
    let endpoint = match path {
        "/v1/messages" => Endpoint::Messages,
        "/v1/messages/count_tokens" => Endpoint::CountTokens,
        _ => return Err((StatusCode::NOT_FOUND, ErrorKind::NotFound, "Not Found")),
    };
    if method != Method::POST {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::InvalidRequest,
            "Method Not Allowed",
        ));
    }
    Ok(endpoint)
}

/// An error answer to a request that is not charged anywhere (counted as invalid).
fn invalid(
    shared: &Shared,
    status: StatusCode,
    kind: ErrorKind,
    message: &str,
    request_id: Option<&str>,
) -> Response<EmulatorBody> {
    shared.lock_stats().invalid_requests += 1;
    error_response(status, kind, message, request_id)
}

fn count_tokens(
    shared: &Shared,
    parsed: &ParsedRequest,
    request_id: &str,
) -> Response<EmulatorBody> {
    let now = Instant::now();
    let limits = Limits {
        requests_per_minute: shared.config.count_tokens_rpm,
        ..Limits::new()
    };
    let cost = RequestCost {
        requests: 1,
        ..RequestCost::default()
    };
    let verdict = shared.count_limiter.admit((), &limits, cost, now);
    let mut response = match verdict.refusal() {
        None => {
            shared.lock_stats().count_tokens.requests_admitted += 1;
            json_response(
                StatusCode::OK,
                &CountTokensAnswer {
                    input_tokens: parsed.total_tokens,
                },
                Some(request_id),
            )
        }
        Some((dimension, retry_after)) => {
            shared.lock_stats().count_tokens.rate_limited += 1;
            let mut r = rate_limited(dimension, limits.get(dimension), request_id);
            insert_retry_after(r.headers_mut(), retry_after);
            r
        }
    };
    insert_headroom(
        shared,
        response.headers_mut(),
        shared.count_limiter.headroom(&(), now),
    );
    response
}

fn rate_limited(
    dimension: Dimension,
    limit: Option<u64>,
    request_id: &str,
) -> Response<EmulatorBody> {
    error_response(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::RateLimit,
        &rate_limit_message(dimension, limit),
        Some(request_id),
    )
}

/// Adds the class's current `anthropic-ratelimit-*` headers, once it has buckets.
fn with_limit_headers(
    shared: &Shared,
    class: ModelClass,
    mut response: Response<EmulatorBody>,
) -> Response<EmulatorBody> {
    let headroom = shared.limiter.headroom(&class, Instant::now());
    insert_headroom(shared, response.headers_mut(), headroom);
    response
}

/// Writes the `anthropic-ratelimit-*` headers of a key's buckets, if it has any.
fn insert_headroom(
    shared: &Shared,
    headers: &mut HeaderMap,
    headroom: Option<[Option<Headroom>; 3]>,
) {
    if let Some(headroom) = headroom {
        let now = shared.config.wall_clock.now();
        insert_rate_limit_headers(headers, &limit_states(headroom), now);
    }
}

/// The limiter's headroom as the header writer takes it: a bucket's limit,
/// its whole remaining units and its time to full, unrounded (the writer
/// rounds as the API does).
fn limit_states(headroom: [Option<Headroom>; 3]) -> [Option<LimitState>; 3] {
    headroom.map(|h| {
        h.map(|h| LimitState {
            limit: h.limit,
            remaining: h.remaining,
            reset_in: h.reset_in,
        })
    })
}

/// `POST /v1/messages`: the spend cap, faults before admission, the
/// limits, then the answer (see the module docs for the order).
async fn messages(
    shared: Arc<Shared>,
    parsed: ParsedRequest,
    mut rng: Rng,
    request_id: String,
) -> Result<Response<EmulatorBody>, BoxError> {
    let class = ModelClass::of(&parsed.model);
    let now = Instant::now();
    if shared.spend_limit_reached() {
        return Ok(spend_limited(&shared, class, &request_id));
    }
    let fault = shared.config.faults.draw(&mut rng, parsed.stream);
    if let Some(response) = fault_before_admission(&shared, class, fault, &request_id) {
        return Ok(response);
    }
    let charges = Charges::of(&shared, class, &parsed, now);
    if let Some(response) = acceleration_limited(&shared, class, &charges, now, &request_id) {
        return Ok(response);
    }
    let mut admission = match admit(&shared, class, &charges, now) {
        Ok(admission) => admission,
        Err(refusal) => return Ok(refused(&shared, class, refusal, now, &request_id)),
    };
    let answer = Answer::draw(&shared, class, &parsed, &charges, fault, &mut rng);
    let begins = answer_begins(now, answer.slow.saturating_add(answer.time_to_first_token));
    record_admission(&shared, class, &parsed, &charges, now, begins);
    if fault == Some(Fault::ConnectionReset) {
        shared.lock_stats().class(class.as_str()).connection_resets += 1;
        admission.finish();
        return Err(connection_reset());
    }
    let response = if parsed.stream {
        streamed_answer(&shared, class, answer, admission, rng, &request_id).await
    } else {
        json_answer(answer, admission, &request_id).await
    };
    Ok(with_limit_headers(&shared, class, response))
}

/// The spend-cap 429: no `retry-after`, `details.error_code` set.
fn spend_limited(shared: &Shared, class: ModelClass, request_id: &str) -> Response<EmulatorBody> {
    shared.lock_stats().class(class.as_str()).spend_limited += 1;
    let message = spend_limit_message(shared.config.wall_clock.now());
    let body = ErrorBody::new(ErrorKind::RateLimit, &message)
        .with_request_id(request_id)
        .with_error_code("enforced_spend_limit_reached");
    let response = json_response(StatusCode::TOO_MANY_REQUESTS, &body, Some(request_id));
    with_limit_headers(shared, class, response)
}

/// The answer of a fault drawn to strike before admission (`529`, `500`),
/// or `None` to go on.
fn fault_before_admission(
    shared: &Shared,
    class: ModelClass,
    fault: Option<Fault>,
    request_id: &str,
) -> Option<Response<EmulatorBody>> {
    let response = match fault? {
        Fault::Overloaded => {
            shared.lock_stats().class(class.as_str()).overloaded += 1;
            error_response(
                ErrorKind::Overloaded.status(),
                ErrorKind::Overloaded,
                "Overloaded",
                Some(request_id),
            )
        }
        Fault::ServerError => {
            shared.lock_stats().class(class.as_str()).server_errors += 1;
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorKind::Api,
                "Internal server error",
                Some(request_id),
            )
        }
        _ => return None,
    };
    Some(with_limit_headers(shared, class, response))
}

/// What a request is charged at admission.
struct Charges {
    /// The prompt cache's outcome (what is read, written, uncached).
    cache: CacheOutcome,
    /// Charged to ITPM: the uncached input and cache writes, plus cache
    /// reads where they count.
    input: u64,
    /// The request's `max_tokens` (at least 1).
    max_tokens: u64,
    /// Charged to OTPM at admission: `max_tokens` in reserve mode, the first
    /// token in realtime mode.
    reserved_output: u64,
}

impl Charges {
    fn of(shared: &Shared, class: ModelClass, parsed: &ParsedRequest, now: Instant) -> Self {
        let cache = shared.lock_cache().lookup(&parsed.units, now);
        let reads = if shared.cache_reads_count(class) {
            cache.read
        } else {
            0
        };
        let max_tokens = parsed.max_tokens.unwrap_or(1).max(1);
        let reserved_output = match shared.config.output_mode {
            OutputMode::Reserve => max_tokens,
            OutputMode::Realtime => 1,
        };
        Charges {
            cache,
            input: cache.uncached + cache.written() + reads,
            max_tokens,
            reserved_output,
        }
    }

    fn cost(&self) -> RequestCost {
        RequestCost {
            requests: 1,
            input_tokens: self.input,
            output_tokens: self.reserved_output,
        }
    }
}

/// The acceleration limit's 429, or `None` if it is off or not reached.
fn acceleration_limited(
    shared: &Shared,
    class: ModelClass,
    charges: &Charges,
    now: Instant,
    request_id: &str,
) -> Option<Response<EmulatorBody>> {
    let acc = shared.config.acceleration.as_ref()?;
    let name = class.as_str();
    {
        let mut stats = shared.lock_stats();
        let tokens = charges.input.saturating_add(charges.reserved_output);
        if !stats.accelerating(name, acc, tokens, now) {
            return None;
        }
        let c = stats.class(name);
        c.rate_limited += 1;
        c.acceleration_limited += 1;
        stats.at_second(name, now, |s| s.rate_limited += 1);
    }
    tracing::debug!(class = %name, "emulator: acceleration limit");
    let mut r = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::RateLimit,
        ACCELERATION_MESSAGE,
        Some(request_id),
    );
    insert_retry_after(r.headers_mut(), acc.window);
    Some(with_limit_headers(shared, class, r))
}

/// Asks the class's buckets to admit the request: the admission to account
/// its output with, or the limit that refused it and the `retry-after`.
fn admit(
    shared: &Arc<Shared>,
    class: ModelClass,
    charges: &Charges,
    now: Instant,
) -> Result<Admission, (Dimension, Duration)> {
    let limits = shared.limits_for(class);
    let verdict = shared.limiter.admit(class, &limits, charges.cost(), now);
    match verdict.refusal() {
        Some(refusal) => Err(refusal),
        None => Ok(Admission {
            shared: shared.clone(),
            class,
            mode: shared.config.output_mode,
            charged: charges.reserved_output,
            produced: 0,
            done: false,
        }),
    }
}

/// The 429 of a request the class's buckets refused.
fn refused(
    shared: &Shared,
    class: ModelClass,
    (dimension, retry_after): (Dimension, Duration),
    now: Instant,
    request_id: &str,
) -> Response<EmulatorBody> {
    let name = class.as_str();
    {
        let mut stats = shared.lock_stats();
        stats.class(name).rate_limited += 1;
        stats.at_second(name, now, |s| s.rate_limited += 1);
    }
    tracing::debug!(class = %name, ?dimension, ?retry_after, "emulator: rate limited");
    let limit = shared.limits_for(class).get(dimension);
    let mut r = rate_limited(dimension, limit, request_id);
    insert_retry_after(r.headers_mut(), retry_after);
    with_limit_headers(shared, class, r)
}

/// `now + after`, or an hour from now if that is past the clock's range.
fn answer_begins(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(3_600)))
        .unwrap_or(now)
}

/// An admitted request reached the model: the cache learns its prefixes,
/// readable once its answer `begins`, and the counters its input.
fn record_admission(
    shared: &Shared,
    class: ModelClass,
    parsed: &ParsedRequest,
    charges: &Charges,
    now: Instant,
    begins: Instant,
) {
    shared.lock_cache().commit(&parsed.units, now, begins);
    let name = class.as_str();
    let cache = &charges.cache;
    let input = charges.input;
    let mut stats = shared.lock_stats();
    let c = stats.class(name);
    c.requests_admitted += 1;
    c.input_tokens += input;
    c.uncached_input_tokens += cache.uncached;
    c.cache_read_input_tokens += cache.read;
    c.cache_creation_input_tokens += cache.written();
    stats.at_second(name, now, |s| {
        s.requests += 1;
        s.input_tokens += input;
    });
}

/// The answer to an admitted request, drawn before it is produced.
struct Answer {
    message_id: String,
    model: String,
    cache: CacheOutcome,
    output_tokens: u64,
    /// The text, one chunk per delta.
    chunks: Vec<String>,
    /// Output tokens in each chunk.
    chunk_sizes: Vec<u64>,
    stop_reason: &'static str,
    time_to_first_token: Duration,
    per_token: Duration,
    /// The `slow` fault's extra delay (zero without it).
    slow: Duration,
    /// Whether the `stream_error` fault cuts the stream.
    stream_error: bool,
}

/// The generator of an answer's pace (its latency jitter factor): from the
/// seed and the request's content only, apart from its length and text, so
/// that the same request is answered at the same pace whoever sends it and
/// in whatever order, and a bound can know it ([`crate::Emulator::answer_pace`]).
pub(crate) fn pace_rng(seed: u64, content_hash: u64) -> Rng {
    Rng::new(mix(mix(seed, content_hash), PACE_STREAM))
}

/// Tells the pace's draws apart from the content's.
const PACE_STREAM: u64 = 0x7061_6365;

impl Answer {
    /// Draws the answer: its length, text and pace from the seed and the
    /// request only (every strategy of a run gets the same), its id from the
    /// request's own draws.
    fn draw(
        shared: &Shared,
        class: ModelClass,
        parsed: &ParsedRequest,
        charges: &Charges,
        fault: Option<Fault>,
        rng: &mut Rng,
    ) -> Self {
        let mut content_rng = Rng::new(mix(shared.config.seed, parsed.content_hash));
        let max_tokens = charges.max_tokens;
        let output_tokens = shared
            .config
            .output_length
            .draw(&mut content_rng, max_tokens);
        let latency = shared.config.latency;
        let per_delta = latency.tokens_per_delta.max(1);
        let chunks = generate_text(&mut content_rng, output_tokens, per_delta);
        let chunk_sizes = (0..chunks.len() as u64)
            .map(|i| per_delta.min(output_tokens.saturating_sub(i.saturating_mul(per_delta))))
            .collect();
        let factor = latency.factor(&mut pace_rng(shared.config.seed, parsed.content_hash));
        let message_id = random_id("msg_", rng);
        let slow = if fault == Some(Fault::Slow) {
            shared.lock_stats().class(class.as_str()).slow_responses += 1;
            shared.config.faults.slow_delay
        } else {
            Duration::ZERO
        };
        Answer {
            message_id,
            model: parsed.model.clone(),
            cache: charges.cache,
            output_tokens,
            chunks,
            chunk_sizes,
            stop_reason: if output_tokens >= max_tokens {
                "max_tokens"
            } else {
                "end_turn"
            },
            time_to_first_token: scale(latency.time_to_first_token, factor),
            per_token: scale(latency.per_output_token, factor),
            slow,
            stream_error: fault == Some(Fault::StreamError),
        }
    }

    /// The `usage` with `output_tokens` produced.
    fn usage(&self, output_tokens: u64) -> UsageReport {
        UsageReport {
            cache: self.cache,
            output_tokens,
        }
    }
}

/// A non-streamed answer: the whole generation, then one JSON message.
async fn json_answer(
    answer: Answer,
    mut admission: Admission,
    request_id: &str,
) -> Response<EmulatorBody> {
    pause(answer.slow.saturating_add(answer.time_to_first_token)).await;
    for &n in &answer.chunk_sizes {
        pause(times(answer.per_token, n)).await;
        admission.produce(n);
    }
    admission.finish();
    let usage = answer.usage(answer.output_tokens);
    let text = answer.chunks.concat();
    let body = message_json(
        &answer.message_id,
        &answer.model,
        &text,
        answer.stop_reason,
        &usage,
    );
    json_response(StatusCode::OK, &body, Some(request_id))
}

/// A streamed answer: the head after any slow delay, then the events paced
/// by the latency model (or cut by an `event: error`); the first delta comes
/// when the answer begins, once its prompt has been read and its prefixes
/// are readable in the cache.
async fn streamed_answer(
    shared: &Shared,
    class: ModelClass,
    answer: Answer,
    admission: Admission,
    mut rng: Rng,
    request_id: &str,
) -> Response<EmulatorBody> {
    pause(answer.slow).await;
    let error_after = if answer.stream_error {
        shared.lock_stats().class(class.as_str()).stream_errors += 1;
        // Somewhere in the middle: after at least one delta when there are two or more.
        let n = answer.chunks.len() as u64;
        Some(rng.below(n).max(u64::from(n > 1)))
    } else {
        None
    };
    let steps = stream_script(&answer, error_after);
    let mut response = Response::new(EmulatorBody::script(steps, admission));
    sse_headers(response.headers_mut());
    insert_request_id(response.headers_mut(), request_id);
    response
}

/// The steps of a streamed answer: the opening events, the time to first
/// token, then per chunk a wait, the output it charges and its delta, then
/// the closing events; or,
/// cut after `error_after` deltas, the end of the accounting and an
/// `event: error`.
fn stream_script(answer: &Answer, error_after: Option<u64>) -> VecDeque<Step> {
    let mut steps = VecDeque::with_capacity(answer.chunks.len() * 3 + 4);
    let opening = sse_opening(&answer.message_id, &answer.model, &answer.usage(1));
    steps.push_back(Step::Emit(opening));
    steps.push_back(Step::Wait(answer.time_to_first_token));
    let chunks = answer.chunks.iter().zip(&answer.chunk_sizes);
    for (i, (text, &n)) in chunks.enumerate() {
        if error_after == Some(i as u64) {
            steps.push_back(Step::Finish);
            steps.push_back(Step::Emit(sse_error()));
            return steps;
        }
        steps.push_back(Step::Wait(times(answer.per_token, n)));
        steps.push_back(Step::Produce(n));
        steps.push_back(Step::Emit(sse_text_delta(text)));
    }
    steps.push_back(Step::Finish);
    let usage = answer.usage(answer.output_tokens);
    steps.push_back(Step::Emit(sse_closing(answer.stop_reason, &usage)));
    steps
}
