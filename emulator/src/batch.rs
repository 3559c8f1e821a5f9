//! The Message Batches endpoints: `POST /v1/messages/batches` (create),
//! `GET /v1/messages/batches/{id}` (retrieve), `GET /v1/messages/batches`
//! (list), `GET /v1/messages/batches/{id}/results` (JSONL) and
//! `POST /v1/messages/batches/{id}/cancel`.
//!
//! A batch is processed [`BatchSettings::processing_delay`] after it was
//! created (tokio's clock); its results are drawn then, as the messages
//! endpoint would answer each request (same output lengths, no prompt
//! cache), and kept. Batch traffic has its own limits and never draws on the
//! Messages limits: a requests-per-minute limit shared by every batch
//! endpoint, and a cap on requests waiting in the processing queue (the sum
//! over batches not yet ended). Both are answered with `429
//! rate_limit_error` and a `retry-after`.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use http::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;
use tower_llm_limits::budget::Limits;
use tower_llm_limits::headers::format_rfc3339;
use tower_llm_limits::wire::error::ErrorKind;

use super::body::EmulatorBody;
use super::cache::CacheOutcome;
use super::limiter::{RateLimiter, RequestCost};
use super::response::{
    error_response, generate_text, insert_retry_after, json_response, message_json, random_id,
    rate_limit_message, UsageReport,
};
use super::rng::{mix, Rng};
use super::tokens::{parse_request, Endpoint};
use super::Shared;

/// The API's limit of requests in one batch.
pub const MAX_BATCH_REQUESTS: usize = 100_000;

/// The batch endpoints' settings (see [`EmulatorBuilder::batches`](super::EmulatorBuilder::batches)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Time from a batch's creation to its results (60 s by default).
    pub processing_delay: Duration,
    /// Requests per minute over all batch endpoints (Tier 1's 50 by default; `None`: unlimited).
    pub requests_per_minute: Option<u64>,
    /// Batch requests that may wait in the processing queue (Tier 1's 100,000 by default).
    pub queue_cap: u64,
    /// A batch whose processing would take longer than this expires
    /// (24 hours, as the API).
    pub expiry: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            processing_delay: Duration::from_secs(60),
            requests_per_minute: Some(50),
            queue_cap: 100_000,
            expiry: Duration::from_secs(24 * 3600),
        }
    }
}

/// What the batch endpoints did (see [`Emulator::batch_stats`](super::Emulator::batch_stats)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchStats {
    /// Batches created.
    pub created: u64,
    /// Requests in the batches created.
    pub requests: u64,
    /// Calls to the batch endpoints answered 429.
    pub rate_limited: u64,
    /// Results that succeeded.
    pub succeeded: u64,
    /// Results that errored.
    pub errored: u64,
    /// Results canceled.
    pub canceled: u64,
    /// Results expired.
    pub expired: u64,
}

#[derive(Debug)]
struct Item {
    custom_id: String,
    params: Value,
}

#[derive(Debug)]
struct Batch {
    id: String,
    created: Instant,
    created_wall: SystemTime,
    items: Vec<Item>,
    cancel_at: Option<Instant>,
    /// The results, one JSON line per request, once ended.
    results: Option<Vec<String>>,
    counts: [u64; 4],
}

/// The batches' run-time state.
#[derive(Debug)]
pub(crate) struct Batches {
    limiter: RateLimiter<()>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    batches: Vec<Batch>,
    stats: BatchStats,
}

impl Batches {
    pub(crate) fn new() -> Self {
        Batches {
            limiter: RateLimiter::per_minute(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn stats(&self) -> BatchStats {
        self.lock().stats
    }
}

#[derive(Deserialize)]
struct CreateBody {
    requests: Vec<CreateItem>,
}

#[derive(Deserialize)]
struct CreateItem {
    custom_id: String,
    params: Value,
}

/// Answers a request to `/v1/messages/batches{rest}`.
pub(crate) fn answer(
    shared: &Shared,
    method: &Method,
    rest: &str,
    body: &[u8],
    rng: &mut Rng,
    request_id: &str,
) -> Response<EmulatorBody> {
    let now = Instant::now();
    let settings = &shared.config.batches;
    let limits = Limits {
        requests_per_minute: settings.requests_per_minute,
        ..Limits::new()
    };
    let cost = RequestCost {
        requests: 1,
        ..RequestCost::default()
    };
    let batches = &shared.batches;
    if let Some((dimension, retry_after)) = batches.limiter.admit((), &limits, cost, now).refusal()
    {
        batches.lock().stats.rate_limited += 1;
        return limited(
            &rate_limit_message(dimension, limits.get(dimension)),
            retry_after,
            request_id,
        );
    }
    let mut state = batches.lock();
    state.process(shared, now);
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (method, segments.as_slice()) {
        (&Method::POST, []) => state.create(shared, body, now, rng, request_id),
        (&Method::GET, []) => {
            let data: Vec<Value> = state
                .batches
                .iter()
                .rev()
                .map(|b| b.object(shared, now))
                .collect();
            let first = data.first().and_then(|b| b.get("id")).cloned();
            let last = data.last().and_then(|b| b.get("id")).cloned();
            let body = json!({"data": data, "has_more": false, "first_id": first, "last_id": last});
            json_response(StatusCode::OK, &body, Some(request_id))
        }
        (&Method::GET, [id]) => match state.find(id) {
            Some(b) => json_response(StatusCode::OK, &b.object(shared, now), Some(request_id)),
            None => not_found(id, request_id),
        },
        (&Method::GET, [id, "results"]) => match state.find(id) {
            Some(Batch {
                results: Some(lines),
                ..
            }) => {
                let mut out = lines.join("\n");
                out.push('\n');
                let mut response = Response::new(EmulatorBody::full(out.into()));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/binary"),
                );
                super::response::insert_request_id(response.headers_mut(), request_id);
                response
            }
            Some(b) => invalid(&format!("Batch {} has not ended yet.", b.id), request_id),
            None => not_found(id, request_id),
        },
        (&Method::POST, [id, "cancel"]) => {
            let Some(index) = state.batches.iter().position(|b| b.id == *id) else {
                return not_found(id, request_id);
            };
            let batch = &mut state.batches[index];
            let mut object = batch.object(shared, now);
            if batch.results.is_none() && batch.cancel_at.is_none() {
                batch.cancel_at = Some(now);
                object["processing_status"] = Value::from("canceling");
                object["cancel_initiated_at"] =
                    Value::from(format_rfc3339(shared.config.wall_clock.now()));
            }
            json_response(StatusCode::OK, &object, Some(request_id))
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            ErrorKind::NotFound,
            "Not Found",
            Some(request_id),
        ),
    }
}

fn limited(message: &str, retry_after: Duration, request_id: &str) -> Response<EmulatorBody> {
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::RateLimit,
        message,
        Some(request_id),
    );
    insert_retry_after(response.headers_mut(), retry_after);
    response
}

fn not_found(id: &str, request_id: &str) -> Response<EmulatorBody> {
    let shown: String = id.chars().take(64).collect();
    error_response(
        StatusCode::NOT_FOUND,
        ErrorKind::NotFound,
        &format!("No batch with id {shown}."),
        Some(request_id),
    )
}

fn invalid(message: &str, request_id: &str) -> Response<EmulatorBody> {
    error_response(
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidRequest,
        message,
        Some(request_id),
    )
}

impl State {
    fn find(&self, id: &str) -> Option<&Batch> {
        self.batches.iter().find(|b| b.id == id)
    }

    /// Requests of batches not yet ended.
    fn queued(&self) -> u64 {
        self.batches
            .iter()
            .filter(|b| b.results.is_none())
            .map(|b| b.items.len() as u64)
            .sum()
    }

    fn create(
        &mut self,
        shared: &Shared,
        body: &[u8],
        now: Instant,
        rng: &mut Rng,
        request_id: &str,
    ) -> Response<EmulatorBody> {
        let parsed: CreateBody = match serde_json::from_slice(body) {
            Ok(p) => p,
            Err(e) => return invalid(&format!("requests: {e}"), request_id),
        };
        let n = parsed.requests.len();
        if n == 0 || n > MAX_BATCH_REQUESTS {
            return invalid(
                &format!("requests: a batch holds 1 to {MAX_BATCH_REQUESTS} requests, not {n}."),
                request_id,
            );
        }
        let mut ids: Vec<&str> = parsed
            .requests
            .iter()
            .map(|r| r.custom_id.as_str())
            .collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return invalid(
                "requests: custom_id values must be unique within a batch.",
                request_id,
            );
        }
        if let Some(bad) = ids.iter().find(|id| id.is_empty() || id.len() > 64) {
            let shown: String = bad.chars().take(64).collect();
            return invalid(
                &format!("requests: custom_id {shown:?} must be 1 to 64 characters."),
                request_id,
            );
        }
        let cap = shared.config.batches.queue_cap;
        if self.queued() + n as u64 > cap {
            self.stats.rate_limited += 1;
            let wait = self
                .next_end(shared, now)
                .unwrap_or(Duration::from_secs(60));
            let message = format!(
                "This request would exceed the limit of {cap} batch requests waiting in the processing queue."
            );
            return limited(&message, wait, request_id);
        }
        let batch = Batch {
            id: random_id("msgbatch_", rng),
            created: now,
            created_wall: shared.config.wall_clock.now(),
            items: parsed
                .requests
                .into_iter()
                .map(|r| Item {
                    custom_id: r.custom_id,
                    params: r.params,
                })
                .collect(),
            cancel_at: None,
            results: None,
            counts: [0; 4],
        };
        self.stats.created += 1;
        self.stats.requests += n as u64;
        let object = batch.object(shared, now);
        self.batches.push(batch);
        json_response(StatusCode::OK, &object, Some(request_id))
    }

    /// Time until the first batch still processing ends.
    fn next_end(&self, shared: &Shared, now: Instant) -> Option<Duration> {
        let delay = shared.config.batches.processing_delay;
        self.batches
            .iter()
            .filter(|b| b.results.is_none())
            .map(|b| (b.created + delay).saturating_duration_since(now))
            .min()
    }

    /// Ends every batch whose processing time has come, or that was canceled.
    fn process(&mut self, shared: &Shared, now: Instant) {
        let settings = shared.config.batches;
        let mut stats = self.stats;
        for batch in self.batches.iter_mut().filter(|b| b.results.is_none()) {
            let done = batch.created + settings.processing_delay;
            let outcome = if batch.cancel_at.is_some() && now < done {
                Some(Outcome::Canceled)
            } else if settings.processing_delay > settings.expiry {
                (now >= batch.created + settings.expiry).then_some(Outcome::Expired)
            } else {
                (now >= done).then_some(Outcome::Processed)
            };
            if let Some(outcome) = outcome {
                batch.end(shared, outcome, &mut stats);
            }
        }
        self.stats = stats;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Processed,
    Canceled,
    Expired,
}

impl Batch {
    fn end(&mut self, shared: &Shared, outcome: Outcome, stats: &mut BatchStats) {
        let mut lines = Vec::with_capacity(self.items.len());
        for item in &self.items {
            let result = match outcome {
                Outcome::Canceled => json!({"type": "canceled"}),
                Outcome::Expired => json!({"type": "expired"}),
                Outcome::Processed => result_of(shared, &item.params),
            };
            let slot = match result.get("type").and_then(Value::as_str) {
                Some("succeeded") => 0,
                Some("errored") => 1,
                Some("canceled") => 2,
                _ => 3,
            };
            self.counts[slot] += 1;
            lines.push(json!({"custom_id": item.custom_id, "result": result}).to_string());
        }
        stats.succeeded += self.counts[0];
        stats.errored += self.counts[1];
        stats.canceled += self.counts[2];
        stats.expired += self.counts[3];
        self.results = Some(lines);
    }

    /// The batch object the endpoints answer with.
    fn object(&self, shared: &Shared, now: Instant) -> Value {
        let settings = shared.config.batches;
        let ended = self.results.is_some();
        let status = if ended {
            "ended"
        } else if self.cancel_at.is_some() {
            "canceling"
        } else {
            "in_progress"
        };
        let wall = |t: Instant| {
            let offset = t.saturating_duration_since(self.created);
            format_rfc3339(self.created_wall + offset)
        };
        let processing = if ended { 0 } else { self.items.len() as u64 };
        let end_time = (self.created + settings.processing_delay).min(now);
        json!({
            "id": self.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": {
                "processing": processing,
                "succeeded": self.counts[0],
                "errored": self.counts[1],
                "canceled": self.counts[2],
                "expired": self.counts[3],
            },
            "ended_at": ended.then(|| wall(end_time)),
            "created_at": wall(self.created),
            "expires_at": wall(self.created + settings.expiry),
            "cancel_initiated_at": self.cancel_at.map(wall),
            "archived_at": null,
            "results_url": ended.then(|| format!("/v1/messages/batches/{}/results", self.id)),
        })
    }
}

/// One request's result, drawn as the messages endpoint would answer it
/// (the same output length for the same request and seed; no prompt cache).
fn result_of(shared: &Shared, params: &Value) -> Value {
    let errored = |message: &str| {
        json!({"type": "errored", "error": {"type": "error", "error": {
            "type": "invalid_request_error", "message": message}}})
    };
    let bytes = params.to_string();
    let parsed = match parse_request(
        bytes.as_bytes(),
        Endpoint::Messages,
        &shared.config.token_counter,
    ) {
        Ok(p) => p,
        Err(message) => return errored(&message),
    };
    if parsed.stream {
        return errored("stream: streaming is not supported in a batch.");
    }
    let mut rng = Rng::new(mix(shared.config.seed, parsed.content_hash));
    let max_tokens = parsed.max_tokens.unwrap_or(1).max(1);
    let output_tokens = shared.config.output_length.draw(&mut rng, max_tokens);
    let text = generate_text(&mut rng, output_tokens, 64).concat();
    let id = random_id("msg_", &mut rng);
    let usage = UsageReport {
        cache: CacheOutcome {
            uncached: parsed.total_tokens,
            ..CacheOutcome::default()
        },
        output_tokens,
    };
    let stop = if output_tokens >= max_tokens {
        "max_tokens"
    } else {
        "end_turn"
    };
    let message = message_json(&id, &parsed.model, &text, stop, &usage);
    json!({"type": "succeeded", "message": message})
}
