//! The strategies compared: what people do today, and this crate.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_limits::budget::{Limits, LimitsConfig, OutputMode, TokenBudgetBuilder};
use tower_llm_limits::clock::WallClock;
use tower_llm_limits::estimate::{AnthropicEstimator, Estimate, TokenEstimator};
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::retry::RetryAfterLayer;
use tower_llm_limits::wire::Usage;
use tower_llm_limits::BoxError;

use super::args::Args;

use super::run::{box_response, Body, Client, Meter, REQUEST_ID};
use super::workload::Rng;

/// The strategies, in the order the table prints them; `--strategy` takes
/// their names or letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// (a) no middleware, the official SDKs' default retries.
    #[value(name = "naive", alias = "a")]
    Naive,
    /// (b) retry-after + exponential backoff + jitter + a semaphore of 8.
    #[value(name = "common-recipe", aliases = ["b", "common"])]
    CommonRecipe,
    /// (c) tower's ConcurrencyLimit + RateLimit + Retry.
    #[value(name = "tower", alias = "c")]
    Tower,
    /// (d) this crate's preset stack.
    #[value(name = "tower-llm-limits", aliases = ["d", "crate"])]
    Crate,
}

impl Kind {
    /// Every strategy, in the order the table prints them.
    pub const ALL: [Kind; 4] = [Kind::Naive, Kind::CommonRecipe, Kind::Tower, Kind::Crate];

    /// The name the table, the report and `--strategy` use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Naive => "naive",
            Kind::CommonRecipe => "common-recipe",
            Kind::Tower => "tower",
            Kind::Crate => "tower-llm-limits",
        }
    }
}

/// Rebuilds a request from its head and its bytes (for hand-written retries).
fn rebuild(parts: &http::request::Parts, body: &Bytes, retry_count: u32) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body.clone()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    if let Ok(v) = http::HeaderValue::from_str(&retry_count.to_string()) {
        req.headers_mut().insert("x-stainless-retry-count", v);
    }
    req
}

async fn split(req: Request<Full<Bytes>>) -> (http::request::Parts, Bytes) {
    let (parts, body) = req.into_parts();
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(never) => match never {},
    };
    (parts, bytes)
}

/// The server's delay, read as the official SDKs read it: `retry-after-ms`,
/// then `retry-after` as (float) seconds, then as an HTTP date.
fn server_delay(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
    {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = v.trim().parse::<f64>() {
        if (0.0..1e9).contains(&secs) {
            return Some(Duration::from_secs_f64(secs));
        }
        return None;
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The official SDKs' `_should_retry`: `x-should-retry` first, then 408, 409,
/// 429 and every 5xx.
fn sdk_should_retry(status: StatusCode, headers: &HeaderMap) -> bool {
    match headers.get("x-should-retry").and_then(|v| v.to_str().ok()) {
        Some("true") => return true,
        Some("false") => return false,
        _ => {}
    }
    matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error()
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// (a) No middleware: the official SDKs' retry loop, reproduced from
/// anthropic-sdk-python `_base_client.py`: 2 retries; `retry-after` honoured
/// only when 0 < it <= 60 s; else 0.5 s doubling, 8 s cap, times a factor in
/// (0.75, 1].
pub fn naive(meter: Meter, seed: u64) -> Client {
    let rng = Arc::new(Mutex::new(Rng::new(seed ^ 0xA)));
    BoxCloneService::new(tower::service_fn(move |req: Request<Full<Bytes>>| {
        let mut meter = meter.clone();
        let rng = rng.clone();
        let fut: BoxFut = Box::pin(async move {
            let (parts, bytes) = split(req).await;
            let max_retries = 2u32;
            let mut retries = 0u32;
            loop {
                let attempt = ServiceExt::<Request<Full<Bytes>>>::ready(&mut meter)
                    .await?
                    .call(rebuild(&parts, &bytes, retries))
                    .await;
                let delay = match &attempt {
                    Ok(resp)
                        if retries < max_retries
                            && sdk_should_retry(resp.status(), resp.headers()) =>
                    {
                        server_delay(resp.headers())
                            .filter(|d| !d.is_zero() && *d <= Duration::from_secs(60))
                    }
                    Err(_) if retries < max_retries => None,
                    _ => return attempt,
                };
                let delay = delay.unwrap_or_else(|| {
                    let base = (0.5 * 2f64.powi(retries as i32)).min(8.0);
                    let jitter = 1.0 - 0.25 * rng.lock().map(|mut r| r.f64()).unwrap_or(0.0);
                    Duration::from_secs_f64(base * jitter)
                });
                if let Ok(resp) = attempt {
                    // Read the error body, as the SDK does, before waiting.
                    let _ = resp.into_body().collect().await;
                }
                tokio::time::sleep(delay).await;
                retries += 1;
            }
        });
        fut
    }))
}

/// (b) The common recipe: a semaphore of 8 around the call (held while it
/// retries and until the answer is read, as `async with sem:` around a
/// retrying call is written), up to
/// 6 retries, each waiting the server's `retry-after` when it sent one, else
/// exponential backoff with full jitter (1 s doubling, 60 s cap).
pub fn common_recipe(meter: Meter, seed: u64) -> Client {
    let rng = Arc::new(Mutex::new(Rng::new(seed ^ 0xB)));
    let sem = Arc::new(Semaphore::new(8));
    BoxCloneService::new(tower::service_fn(move |req: Request<Full<Bytes>>| {
        let mut meter = meter.clone();
        let rng = rng.clone();
        let sem = sem.clone();
        let fut: BoxFut = Box::pin(async move {
            let _permit = sem.acquire_owned().await?;
            let (parts, bytes) = split(req).await;
            let max_retries = 6u32;
            let mut retries = 0u32;
            loop {
                let attempt = ServiceExt::<Request<Full<Bytes>>>::ready(&mut meter)
                    .await?
                    .call(rebuild(&parts, &bytes, retries))
                    .await;
                let server = match &attempt {
                    Ok(resp)
                        if retries < max_retries
                            && sdk_should_retry(resp.status(), resp.headers()) =>
                    {
                        server_delay(resp.headers())
                    }
                    Err(_) if retries < max_retries => None,
                    _ => {
                        // `async with sem:` ends when the whole answer has
                        // been read (a stream included): read it under the
                        // permit and hand it on complete.
                        let resp = attempt?;
                        let (parts, body) = resp.into_parts();
                        let bytes = body.collect().await?.to_bytes();
                        return Ok(box_response(Response::from_parts(parts, Full::new(bytes))));
                    }
                };
                let delay = server.unwrap_or_else(|| {
                    let cap = (1.0 * 2f64.powi(retries as i32)).min(60.0);
                    Duration::from_secs_f64(cap * rng.lock().map(|mut r| r.f64()).unwrap_or(0.5))
                });
                if let Ok(resp) = attempt {
                    let _ = resp.into_body().collect().await;
                }
                tokio::time::sleep(delay).await;
                retries += 1;
            }
        });
        fut
    }))
}

/// (c)'s retry policy: what a tower user writes first. Retries 429, 408, 409,
/// 5xx and transport errors up to 3 times with exponential backoff and jitter
/// (0.5 s doubling); tower's `Retry` does not read `retry-after`, and this
/// policy does not either.
#[derive(Clone)]
pub struct SimplePolicy {
    attempts: u32,
    rng: Arc<Mutex<Rng>>,
}

impl<E> tower::retry::Policy<Request<Full<Bytes>>, Response<Body>, E> for SimplePolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _req: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<Body>, E>,
    ) -> Option<Self::Future> {
        let retry = match result {
            Ok(resp) => {
                let s = resp.status().as_u16();
                matches!(s, 408 | 409 | 429) || resp.status().is_server_error()
            }
            Err(_) => true,
        };
        if !retry || self.attempts >= 3 {
            return None;
        }
        let base = 0.5 * 2f64.powi(self.attempts as i32);
        let jitter = 0.5 + 0.5 * self.rng.lock().map(|mut r| r.f64()).unwrap_or(0.5);
        self.attempts += 1;
        Some(tokio::time::sleep(Duration::from_secs_f64(base * jitter)))
    }

    fn clone_request(&mut self, req: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        let mut r = Request::new(req.body().clone());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.version_mut() = req.version();
        *r.headers_mut() = req.headers().clone();
        Some(r)
    }
}

/// (c) tower's own layers: `Retry(SimplePolicy)` over `ConcurrencyLimit(8)`
/// over `RateLimit(RPM per minute)` (tower has no token-aware limiter, so the
/// request rate is what a tower user can pace). `RateLimit` is not `Clone`,
/// so it sits behind a `Buffer`, as tower's docs advise.
pub fn tower_stack(meter: Meter, rpm: u64, seed: u64) -> Client {
    let rate_limited = ServiceBuilder::new()
        .buffer(1024)
        .rate_limit(rpm.max(1), Duration::from_secs(60))
        .service(meter);
    let policy = SimplePolicy {
        attempts: 0,
        rng: Arc::new(Mutex::new(Rng::new(seed ^ 0xC))),
    };
    let svc = ServiceBuilder::new()
        .retry(policy)
        .concurrency_limit(8)
        .service(rate_limited.map_response(box_response));
    BoxCloneService::new(svc)
}

/// The boxed future type shared by the clients.
#[allow(dead_code)]
pub type ClientFuture = <Client as Service<Request<Full<Bytes>>>>::Future;

/// The estimates the crate's stack paced with, against what the server
/// charged: filled by [`Recording`] as the budget settles each request.
#[derive(Debug, Default)]
pub struct Estimates {
    pairs: Mutex<Vec<(u64, u64)>>,
    /// Per workload request (its last attempt): the requests settled before
    /// it was estimated, and its whole prompt as estimated (calibration
    /// applied, cache reads included).
    by_request: Mutex<HashMap<usize, (usize, u64)>>,
    settled: AtomicUsize,
}

impl Estimates {
    /// Per workload request: (requests settled before its estimate, its
    /// whole-prompt estimate).
    pub fn by_request(&self) -> HashMap<usize, (usize, u64)> {
        self.by_request
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// (mean absolute error in tokens, the same relative to the mean charge),
    /// or None if nothing was settled.
    pub fn mean_absolute_error(&self) -> Option<(f64, f64)> {
        let pairs = self.pairs.lock().ok()?;
        if pairs.is_empty() {
            return None;
        }
        let n = pairs.len() as f64;
        let err: f64 = pairs
            .iter()
            .map(|(e, a)| (*e as f64 - *a as f64).abs())
            .sum::<f64>()
            / n;
        let mean: f64 = pairs.iter().map(|(_, a)| *a as f64).sum::<f64>() / n;
        Some((err, if mean > 0.0 { err / mean } else { 0.0 }))
    }
}

/// The crate's estimator, unchanged, plus a record of each estimate next to
/// the usage the budget settled it with (`observe` is the calibration hook
/// the budget calls with the server's `usage`).
#[derive(Debug)]
struct Recording {
    inner: AnthropicEstimator,
    log: Arc<Estimates>,
}

impl TokenEstimator for Recording {
    fn estimate(&self, parts: &http::request::Parts, body: &[u8]) -> Estimate {
        let e = self.inner.estimate(parts, body);
        let index = parts
            .headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<usize>().ok());
        if let Some(index) = index {
            // The calibration factor the estimate applied, on the whole prompt.
            let factor = if e.raw_input_tokens > 0 {
                e.input_tokens as f64 / e.raw_input_tokens as f64
            } else {
                1.0
            };
            let whole = ((e.raw_input_tokens + e.cache_read_tokens) as f64 * factor).round() as u64;
            let settled = self.log.settled.load(Ordering::Relaxed);
            if let Ok(mut m) = self.log.by_request.lock() {
                m.insert(index, (settled, whole));
            }
        }
        e
    }

    fn estimate_unbuffered(&self, parts: &http::request::Parts, body_len: Option<u64>) -> Estimate {
        self.inner.estimate_unbuffered(parts, body_len)
    }

    fn observe(&self, estimate: &Estimate, usage: &Usage) {
        let charged = usage.input_tokens + usage.cache_creation_input_tokens;
        if let Ok(mut p) = self.log.pairs.lock() {
            p.push((estimate.input_tokens, charged));
        }
        self.log.settled.fetch_add(1, Ordering::Relaxed);
        self.inner.observe(estimate, usage);
    }

    fn observe_count(&self, estimate: &Estimate, counted: u64) {
        self.inner.observe_count(estimate, counted);
    }

    fn recheck_cache_read(&self, estimate: &Estimate) -> Option<Estimate> {
        self.inner.recheck_cache_read(estimate)
    }
}

/// (d) This crate: `LimitsLayer::anthropic(limits)`, its budget
/// (`TokenBudgetBuilder::anthropic`, every setting of the preset's) given the
/// recording estimator (the same `AnthropicEstimator` the preset uses).
///
/// # Errors
/// None today; kept fallible for settings that can be refused.
pub fn crate_stack(
    meter: Meter,
    args: &Args,
    clock: WallClock,
) -> Result<(Client, Arc<Estimates>), String> {
    let log = Arc::new(Estimates::default());
    let estimator = Recording {
        inner: AnthropicEstimator::new(),
        log: log.clone(),
    };
    let limits: LimitsConfig = if args.target.is_some() && !args.limits_given {
        LimitsConfig::learned()
    } else {
        LimitsConfig::from(Limits::new().rpm(args.rpm).itpm(args.itpm).otpm(args.otpm))
    };
    let budget = TokenBudgetBuilder::anthropic(limits.clone())
        .output_mode(if args.reserve_mode() {
            OutputMode::Reserve
        } else {
            OutputMode::Realtime
        })
        .estimator(Arc::new(estimator))
        .build();
    // Backoff jitter drawn from the run's seed (the preset's default is
    // seeded per process), and reset instants read on the emulator's clock:
    // the same seed gives the same run.
    let retry = RetryAfterLayer::builder()
        .jitter(seeded_jitter(args.seed))
        .wall_clock(clock)
        .build();
    let layer = LimitsLayer::anthropic(limits)
        .with_budget(budget)
        .with_retry(retry);
    let svc = ServiceBuilder::new()
        .map_response(box_response)
        .layer(layer)
        .service(meter);
    Ok((BoxCloneService::new(svc), log))
}

/// Backoff jitter drawn from the run's seed, so that the same seed gives the
/// same run (the retry layer's own default is seeded per process).
fn seeded_jitter(seed: u64) -> impl Fn() -> f64 + Send + Sync + 'static {
    let rng = std::sync::Mutex::new(crate::workload::Rng::new(seed));
    move || rng.lock().map_or(0.5, |mut r| r.f64())
}
