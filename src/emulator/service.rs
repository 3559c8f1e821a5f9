//! The emulator as a tower `Service`: request handling end to end.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use tokio::time::{sleep, Instant};

use super::body::{EmulatorBody, Step};
use super::cache::CacheOutcome;
use super::config::{scale, Fault};
use super::response::{
    error_json, error_response, generate_text, insert_rate_limit_headers, insert_request_id,
    insert_retry_after, json_response, message_json, random_id, rate_limit_message,
    spend_limit_message, sse_closing, sse_error, sse_headers, sse_opening, sse_text_delta,
    UsageReport, ACCELERATION_MESSAGE,
};
use super::rng::{mix, Rng};
use super::tokens::{parse_request, Endpoint, ParsedRequest};
use super::Shared;
use crate::budget::ledger::{CostDelta, Costs, Reservation};
use crate::budget::limits::{Limits, ModelClass, OutputMode};
use crate::{BoxError, Dimension};

#[derive(Serialize)]
struct CountTokensAnswer {
    input_tokens: u64,
}

/// The ledger key of the `count_tokens` endpoint's own limiter.
const COUNT_TOKENS_KEY: &str = "count_tokens";

/// The emulator as a `tower::Service<http::Request<B>>`: made by
/// [`Emulator::service`](super::Emulator::service), cheap to clone (every clone
/// shares the emulator's state).
///
/// Answers every request with an `http::Response<EmulatorBody>`, as the API
/// would, including its errors (400, 404, 413, 429, 500, 529). It fails
/// (`Err`) only to emulate a dropped connection: the `connection_reset` fault
/// (an [`std::io::Error`] of kind `ConnectionReset`), or a request body that
/// could not be read (the body's error).
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
    class: &'static str,
    limits: Limits,
    mode: OutputMode,
    /// Output tokens debited so far (the reservation, then realtime charges).
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
            let mut stats = self.shared.lock_stats();
            stats.class(self.class).output_tokens += n;
            stats.at_second(self.class, now, |s| s.output_tokens += n);
        }
        if self.mode == OutputMode::Realtime && self.produced > self.charged {
            let extra = self.produced - self.charged;
            self.charged = self.produced;
            self.shared.ledger.settle_at(
                self.class,
                &self.limits,
                CostDelta {
                    output_tokens: i64::try_from(extra).unwrap_or(i64::MAX),
                    ..CostDelta::default()
                },
                now,
            );
        }
    }

    /// Settles the output to what was produced (refunds an unused reservation).
    pub(crate) fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if self.produced != self.charged {
            let delta = i128::from(self.produced) - i128::from(self.charged);
            let delta = i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
            self.shared.ledger.settle_at(
                self.class,
                &self.limits,
                CostDelta {
                    output_tokens: delta,
                    ..CostDelta::default()
                },
                Instant::now(),
            );
            self.charged = self.produced;
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.finish();
    }
}

enum ReadError {
    TooLarge,
    Failed(BoxError),
}

async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ReadError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ReadError::TooLarge),
        Err(e) => Err(ReadError::Failed(e)),
    }
}

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

    let endpoint = match parts.uri.path() {
        "/v1/messages" => Endpoint::Messages,
        "/v1/messages/count_tokens" => Endpoint::CountTokens,
        _ => {
            shared.lock_stats().invalid_requests += 1;
            return Ok(error_response(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "Not Found",
                Some(&request_id),
            ));
        }
    };
    if parts.method != Method::POST {
        shared.lock_stats().invalid_requests += 1;
        return Ok(error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method Not Allowed",
            Some(&request_id),
        ));
    }

    let bytes = match read_body(body, shared.config.body_limit).await {
        Ok(b) => b,
        Err(ReadError::TooLarge) => {
            shared.lock_stats().invalid_requests += 1;
            // Answered by the edge (Cloudflare) before the API: no request id.
            return Ok(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "Request exceeds the maximum allowed number of bytes.",
                None,
            ));
        }
        Err(ReadError::Failed(e)) => return Err(e),
    };

    let parsed = match parse_request(&bytes, endpoint) {
        Ok(p) => p,
        Err(message) => {
            shared.lock_stats().invalid_requests += 1;
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
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

fn count_tokens(
    shared: &Shared,
    parsed: &ParsedRequest,
    request_id: &str,
) -> Response<EmulatorBody> {
    let now = Instant::now();
    let limits = Limits {
        requests_per_minute: shared.config.count_tokens_rpm,
        ..Limits::unknown()
    };
    let costs = Costs {
        requests: 1,
        ..Costs::default()
    };
    let verdict = shared
        .count_ledger
        .reserve_at(COUNT_TOKENS_KEY, &limits, costs, now);
    let mut response = match verdict {
        Reservation::Admitted => {
            shared.lock_stats().count_tokens.requests_admitted += 1;
            json_response(
                StatusCode::OK,
                &CountTokensAnswer {
                    input_tokens: parsed.total_tokens,
                },
                Some(request_id),
            )
        }
        Reservation::Wait { retry_in, .. } => {
            shared.lock_stats().count_tokens.rate_limited += 1;
            let mut r = rate_limited(Dimension::Requests, limits.requests_per_minute, request_id);
            insert_retry_after(r.headers_mut(), retry_in);
            r
        }
        Reservation::Never { dimension, .. } => {
            shared.lock_stats().count_tokens.rate_limited += 1;
            let mut r = rate_limited(dimension, limits.requests_per_minute, request_id);
            insert_retry_after(r.headers_mut(), Duration::from_secs(60));
            r
        }
    };
    if let Some(states) = shared.count_ledger.state_at(COUNT_TOKENS_KEY, &limits, now) {
        insert_rate_limit_headers(response.headers_mut(), &states, SystemTime::now());
    }
    response
}

fn rate_limited(
    dimension: Dimension,
    limit: Option<u64>,
    request_id: &str,
) -> Response<EmulatorBody> {
    error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        &rate_limit_message(dimension, limit),
        Some(request_id),
    )
}

/// Adds the class's current `anthropic-ratelimit-*` headers, if its buckets exist.
fn with_limit_headers(
    shared: &Shared,
    class: &str,
    limits: &Limits,
    mut response: Response<EmulatorBody>,
) -> Response<EmulatorBody> {
    if let Some(states) = shared.ledger.state_at(class, limits, Instant::now()) {
        insert_rate_limit_headers(response.headers_mut(), &states, SystemTime::now());
    }
    response
}

async fn messages(
    shared: Arc<Shared>,
    parsed: ParsedRequest,
    mut rng: Rng,
    request_id: String,
) -> Result<Response<EmulatorBody>, BoxError> {
    let model_class = ModelClass::of(&parsed.model);
    let class = model_class.as_str();
    let limits = shared.limits_for(model_class);
    let now = Instant::now();

    if shared.spend_limit_reached() {
        shared.lock_stats().class(class).spend_limited += 1;
        let message = spend_limit_message(SystemTime::now());
        let body = error_json(
            "rate_limit_error",
            &message,
            Some(&request_id),
            Some("enforced_spend_limit_reached"),
        );
        let response = json_response(StatusCode::TOO_MANY_REQUESTS, &body, Some(&request_id));
        return Ok(with_limit_headers(&shared, class, &limits, response));
    }

    let fault = shared.config.faults.draw(&mut rng, parsed.stream);
    match fault {
        Some(Fault::Overloaded) => {
            shared.lock_stats().class(class).overloaded += 1;
            let r = error_response(
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "overloaded_error",
                "Overloaded",
                Some(&request_id),
            );
            return Ok(with_limit_headers(&shared, class, &limits, r));
        }
        Some(Fault::ServerError) => {
            shared.lock_stats().class(class).server_errors += 1;
            let r = error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "Internal server error",
                Some(&request_id),
            );
            return Ok(with_limit_headers(&shared, class, &limits, r));
        }
        _ => {}
    }

    let cache: CacheOutcome = shared.lock_cache().lookup(&parsed.units, now);
    let input_charge = cache.uncached
        + cache.written()
        + if shared.cache_reads_count(model_class) {
            cache.read
        } else {
            0
        };
    let max_tokens = parsed.max_tokens.unwrap_or(1).max(1);
    let reserved_output = match shared.config.output_mode {
        OutputMode::Reserve => max_tokens,
        OutputMode::Realtime => 1,
    };
    let costs = Costs {
        requests: 1,
        input_tokens: input_charge,
        output_tokens: reserved_output,
    };

    if let Some(acc) = &shared.config.acceleration {
        let mut stats = shared.lock_stats();
        if stats.accelerating(
            class,
            acc,
            input_charge.saturating_add(reserved_output),
            now,
        ) {
            let c = stats.class(class);
            c.rate_limited += 1;
            c.acceleration_limited += 1;
            stats.at_second(class, now, |s| s.rate_limited += 1);
            drop(stats);
            tracing::debug!(class = %class, "emulator: acceleration limit");
            let mut r = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                ACCELERATION_MESSAGE,
                Some(&request_id),
            );
            insert_retry_after(r.headers_mut(), acc.window);
            return Ok(with_limit_headers(&shared, class, &limits, r));
        }
    }

    let wait = match shared.ledger.reserve_at(class, &limits, costs, now) {
        Reservation::Admitted => None,
        Reservation::Wait {
            retry_in,
            dimension,
        } => Some((dimension, retry_in)),
        // Above the whole capacity: the API answers 429 too (facts file 4.2,
        // "reduce the prompt length or the maximum tokens requested").
        Reservation::Never { dimension, .. } => Some((dimension, Duration::from_secs(60))),
    };
    if let Some((dimension, retry_after)) = wait {
        {
            let mut stats = shared.lock_stats();
            stats.class(class).rate_limited += 1;
            stats.at_second(class, now, |s| s.rate_limited += 1);
        }
        tracing::debug!(class = %class, ?dimension, ?retry_after, "emulator: rate limited");
        let mut r = rate_limited(dimension, limits.get(dimension), &request_id);
        insert_retry_after(r.headers_mut(), retry_after);
        return Ok(with_limit_headers(&shared, class, &limits, r));
    }

    // Admitted: the request reached the model.
    shared.lock_cache().commit(&parsed.units, now);
    {
        let mut stats = shared.lock_stats();
        let c = stats.class(class);
        c.requests_admitted += 1;
        c.input_tokens += input_charge;
        c.uncached_input_tokens += cache.uncached;
        c.cache_read_input_tokens += cache.read;
        c.cache_creation_input_tokens += cache.written();
        stats.at_second(class, now, |s| {
            s.requests += 1;
            s.input_tokens += input_charge;
        });
    }
    let mut admission = Admission {
        shared: shared.clone(),
        class,
        limits,
        mode: shared.config.output_mode,
        charged: reserved_output,
        produced: 0,
        done: false,
    };

    if fault == Some(Fault::ConnectionReset) {
        shared.lock_stats().class(class).connection_resets += 1;
        admission.finish();
        return Err(connection_reset());
    }

    // The answer: its length and text depend on the seed and the request only.
    let mut content_rng = Rng::new(mix(shared.config.seed, parsed.content_hash));
    let output_tokens = shared
        .config
        .output_length
        .draw(&mut content_rng, max_tokens);
    let latency = shared.config.latency;
    let per_delta = latency.tokens_per_delta.max(1);
    let chunks = generate_text(&mut content_rng, output_tokens, per_delta);
    let stop_reason = if output_tokens >= max_tokens {
        "max_tokens"
    } else {
        "end_turn"
    };
    let factor = latency.factor(&mut rng);
    let ttft = scale(latency.time_to_first_token, factor);
    let per_token = scale(latency.per_output_token, factor);
    let message_id = random_id("msg_", &mut rng);
    let slow = if fault == Some(Fault::Slow) {
        shared.lock_stats().class(class).slow_responses += 1;
        shared.config.faults.slow_delay
    } else {
        Duration::ZERO
    };
    let chunk_sizes = (0..chunks.len() as u64)
        .map(|i| per_delta.min(output_tokens.saturating_sub(i.saturating_mul(per_delta))));

    if !parsed.stream {
        pause(slow.saturating_add(ttft)).await;
        for n in chunk_sizes {
            pause(times(per_token, n)).await;
            admission.produce(n);
        }
        admission.finish();
        let usage = UsageReport {
            cache,
            output_tokens,
        };
        let text = chunks.concat();
        let body = message_json(&message_id, &parsed.model, &text, stop_reason, &usage);
        let r = json_response(StatusCode::OK, &body, Some(&request_id));
        return Ok(with_limit_headers(&shared, class, &limits, r));
    }

    // Streamed: the head after any slow delay, then events paced by the latency model.
    pause(slow).await;
    let error_after = if fault == Some(Fault::StreamError) {
        shared.lock_stats().class(class).stream_errors += 1;
        // Somewhere in the middle: after at least one delta when there are two or more.
        Some(
            rng.below(chunks.len() as u64)
                .max(u64::from(chunks.len() > 1)),
        )
    } else {
        None
    };
    let start_usage = UsageReport {
        cache,
        output_tokens: 1,
    };
    let mut steps = VecDeque::with_capacity(chunks.len() * 3 + 4);
    steps.push_back(Step::Emit(sse_opening(
        &message_id,
        &parsed.model,
        &start_usage,
    )));
    steps.push_back(Step::Wait(ttft));
    for (i, (text, n)) in chunks.iter().zip(chunk_sizes).enumerate() {
        if error_after == Some(i as u64) {
            steps.push_back(Step::Finish);
            steps.push_back(Step::Emit(sse_error()));
            break;
        }
        steps.push_back(Step::Wait(times(per_token, n)));
        steps.push_back(Step::Produce(n));
        steps.push_back(Step::Emit(sse_text_delta(text)));
    }
    if error_after.is_none() {
        steps.push_back(Step::Finish);
        let usage = UsageReport {
            cache,
            output_tokens,
        };
        steps.push_back(Step::Emit(sse_closing(stop_reason, &usage)));
    }
    let mut response = Response::new(EmulatorBody::script(steps, admission));
    sse_headers(response.headers_mut());
    insert_request_id(response.headers_mut(), &request_id);
    Ok(with_limit_headers(&shared, class, &limits, response))
}
