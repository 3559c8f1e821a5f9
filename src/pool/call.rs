//! One request through the pool: read, estimate, route, send, fail over.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;
use tower_service::Service;

use super::route::{self, Scan};
use super::upstream::{Ticket, UpstreamService, UpstreamState};
use super::{
    AllowFallback, DrainReason, PoolBody, PoolError, Shared, ALLOW_FALLBACK_HEADER, MODEL_HEADER,
    UPSTREAM_HEADER,
};
use crate::body::BufferedBytes;
use crate::estimate::{Estimate, Estimated};
use crate::{BoxError, Error};

/// The request as the pool keeps it between attempts.
struct Prepared {
    parts: Parts,
    body: Bytes,
    scan: Scan,
    estimate: Estimate,
    /// The model as the caller named it (or the fallback once chosen).
    model: Option<String>,
    allow_fallback: bool,
    fell_back: bool,
}

/// What became of one attempt.
enum Outcome {
    /// Hand this to the caller.
    Done(Result<Response<PoolBody>, BoxError>),
    /// Try another upstream; keep this as the answer if none is left.
    Failover(&'static str, Result<Response<PoolBody>, BoxError>),
    /// Drain the upstream, then try another.
    Drain(DrainReason, Result<Response<PoolBody>, BoxError>),
    /// The request left this upstream's queue, unsent: send it to that one.
    Moved(usize),
}

/// How often a request waiting in an upstream's budget queue looks for an
/// upstream that would admit it sooner.
const MOVE_CHECK: Duration = Duration::from_secs(1);
/// How much sooner another upstream must admit a waiting request for it to
/// move there (the affinity threshold instead, if its prompt cache is where
/// it waits).
const MOVE_MARGIN: Duration = Duration::from_secs(5);
/// The most times one request moves.
const MAX_MOVES: usize = 3;
/// Failover reasons that say nothing about the request or a lasting state
/// of the upstream: a 529 (`overloaded_error`, momentary) or a 429 (its
/// `retry-after` is in the upstream's cooldown, which its wait counts). A
/// request that failed over for one of these is first sent elsewhere, but
/// while it waits there it may move back to that upstream when it would
/// admit it clearly sooner; otherwise a request that failed over late, and
/// joined the back of another upstream's queue, could wait there while the
/// upstream that answered 529 stands idle.
const TRANSIENT: [&str; 2] = ["429", "529"];

pub(crate) async fn serve<S, B, ResB>(
    shared: Arc<Shared>,
    services: Arc<std::sync::Mutex<Vec<UpstreamService<S>>>>,
    request: Request<B>,
) -> Result<Response<PoolBody>, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    let mut prepared = prepare(&shared, request).await?;
    let n = shared.upstreams.len();
    let mut tried = vec![false; n];
    // The upstreams a waiting request may not move to: those tried, except
    // the ones that only said "later" (see `TRANSIENT`).
    let mut barred = vec![false; n];
    let mut last: Option<Result<Response<PoolBody>, BoxError>> = None;
    let (mut attempt, mut moves, mut moved_to) = (0, 0, None);
    while attempt < shared.max_attempts {
        attempt += 1;
        let chosen = match moved_to.take() {
            Some(j) => Ok(j),
            None => choose(&shared, &mut prepared, &tried),
        };
        let i = match chosen {
            Ok(i) => i,
            Err(e) => {
                shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                return last.unwrap_or(Err(e.into()));
            }
        };
        let up = &shared.upstreams[i];
        let service = services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(i)
            .cloned();
        let Some(service) = service else {
            break;
        };
        let may_move = (moves < MAX_MOVES).then_some(barred.as_slice());
        let outcome = attempt_on(&shared, i, service, &prepared, may_move).await;
        count_received(up, &outcome);
        let (reason, answer) = match outcome {
            Outcome::Moved(j) => {
                moves += 1;
                attempt -= 1;
                moved_to = Some(j);
                shared.counters.moved.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(from = %up.config.name, to = %shared.upstreams[j].config.name, "waiting request moved");
                continue;
            }
            Outcome::Done(answer) => {
                if answer.is_ok() {
                    up.succeeded.fetch_add(1, Ordering::Relaxed);
                    if let Some(key) = prepared.scan.affinity {
                        lock_affinity(&shared).set(key, i, Instant::now());
                    }
                } else {
                    shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                }
                return answer;
            }
            Outcome::Failover(reason, answer) => (reason, answer),
            Outcome::Drain(reason, answer) => {
                up.drain(reason, shared.drain_for);
                (reason.as_str(), answer)
            }
        };
        tried[i] = true;
        barred[i] = !TRANSIENT.contains(&reason);
        up.failovers.fetch_add(1, Ordering::Relaxed);
        if attempt < shared.max_attempts {
            shared.counters.failovers.fetch_add(1, Ordering::Relaxed);
            tracing::info!(upstream = %up.config.name, reason, attempt, "failover to another upstream");
        }
        last = Some(answer);
    }
    shared.counters.failed.fetch_add(1, Ordering::Relaxed);
    last.unwrap_or_else(|| Err(PoolError::NoUpstreams.into()))
}

/// Counts the 429s and 529s an attempt received.
fn count_received(up: &UpstreamState, outcome: &Outcome) {
    match outcome {
        Outcome::Failover("429", _) => up.received_429.fetch_add(1, Ordering::Relaxed),
        Outcome::Failover("529", _) => up.received_529.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
}

fn lock_affinity(shared: &Shared) -> std::sync::MutexGuard<'_, route::Affinity> {
    shared
        .affinity
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Reads the body (up to the limit), scans and estimates it once.
async fn prepare<B>(shared: &Shared, request: Request<B>) -> Result<Prepared, BoxError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = request.into_parts();
    let limit = shared.buffer_limit;
    let body = match collect(body, limit).await {
        Ok(bytes) => bytes,
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(PoolError::BodyTooLarge { limit }.into())
        }
        Err(e) => return Err(Box::new(Error::Body(e))),
    };
    let by_header = parts
        .headers
        .remove(ALLOW_FALLBACK_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    let allow_fallback = by_header || parts.extensions.get::<AllowFallback>().is_some();
    let scan = route::scan(&body, &shared.hasher);
    let model = scan.model.and_then(|span| route::model_at(&body, span));
    let estimate = shared.estimator.estimate(&parts, &body);
    Ok(Prepared {
        parts,
        body,
        scan,
        estimate,
        model,
        allow_fallback,
        fell_back: false,
    })
}

/// The whole body, at most `limit` bytes, as a boxed future: its type
/// names no trait projection, so the request's future is `Send` whatever
/// the body's error type.
fn collect<B>(
    body: B,
    limit: usize,
) -> Pin<Box<dyn Future<Output = Result<Bytes, BoxError>> + Send>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Box::pin(async move { Ok(Limited::new(body, limit).collect().await?.to_bytes()) })
}

/// The upstream for the next attempt: the soonest to admit among those in
/// rotation and not yet tried (all of them again once each was tried), the
/// cache-affine one unless another admits more than the threshold sooner;
/// switches to the fallback model when allowed and every wait is too long.
fn choose(shared: &Shared, p: &mut Prepared, tried: &[bool]) -> Result<usize, PoolError> {
    let (i, wait) = soonest(shared, &p.estimate, tried)?;
    if let Some(f) = &shared.fallback {
        let wants = p.allow_fallback && !p.fell_back && wait > f.after;
        if wants && p.model.as_deref() != Some(f.model.as_str()) {
            if let Some(body) = p
                .scan
                .model
                .and_then(|s| route::with_model(&p.body, s, &f.model))
            {
                p.scan = route::scan(&body, &shared.hasher);
                p.estimate = shared.estimator.estimate(&p.parts, &body);
                p.body = body;
                p.model = Some(f.model.clone());
                p.fell_back = true;
                shared.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::info!(model = %f.model, wait_ms = wait.as_millis() as u64, "model fallback");
                return soonest(shared, &p.estimate, tried).map(|(i, _)| i);
            }
        }
    }
    let Some(key) = p.scan.affinity else {
        return Ok(i);
    };
    let now = Instant::now();
    let affine = lock_affinity(shared).get(key, now);
    match affine {
        Some(a) if a != i && eligible(shared, a, tried, now) => {
            let affine_wait = route::wait(&shared.upstreams[a], &p.estimate);
            if affine_wait <= wait.saturating_add(shared.affinity_threshold) {
                shared
                    .counters
                    .affinity_routed
                    .fetch_add(1, Ordering::Relaxed);
                Ok(a)
            } else {
                shared
                    .counters
                    .affinity_overridden
                    .fetch_add(1, Ordering::Relaxed);
                Ok(i)
            }
        }
        Some(a) if a == i => {
            shared
                .counters
                .affinity_routed
                .fetch_add(1, Ordering::Relaxed);
            Ok(i)
        }
        _ => Ok(i),
    }
}

fn eligible(shared: &Shared, i: usize, tried: &[bool], now: Instant) -> bool {
    let untried_left = shared
        .upstreams
        .iter()
        .enumerate()
        .any(|(j, u)| !tried[j] && u.drained_at(now).is_none());
    shared.upstreams[i].drained_at(now).is_none() && (!tried[i] || !untried_left)
}

/// Two waits closer than this are a tie, broken by load.
const TIE: Duration = Duration::from_millis(1);

/// The eligible upstream with the shortest wait, and that wait.
fn soonest(
    shared: &Shared,
    estimate: &Estimate,
    tried: &[bool],
) -> Result<(usize, Duration), PoolError> {
    let now = Instant::now();
    let mut best: Option<(usize, Duration, f64)> = None;
    for (i, up) in shared.upstreams.iter().enumerate() {
        if !eligible(shared, i, tried, now) {
            continue;
        }
        let wait = route::wait(up, estimate);
        let load = route::load(up);
        let better = match best {
            None => true,
            Some((_, w, l)) => {
                if wait + TIE < w {
                    true
                } else if w + TIE < wait {
                    false
                } else {
                    load < l
                }
            }
        };
        if better {
            best = Some((i, wait, load));
        }
    }
    best.map(|(i, w, _)| (i, w))
        .ok_or_else(|| all_drained(shared, now))
}

fn all_drained(shared: &Shared, now: Instant) -> PoolError {
    let retry_in = shared
        .upstreams
        .iter()
        .filter_map(|u| u.drained_at(now))
        .map(|d| d.until.saturating_duration_since(now))
        .min()
        .unwrap_or_default();
    PoolError::AllDrained { retry_in }
}

/// Sends the request to one upstream and sorts out what came back.
///
/// The request carries the pool's estimate ([`Estimated`]), so that an
/// upstream budget with the pool's estimator charges it without estimating
/// the body again; cache reads in it are kept only on the upstream its
/// prefix last went to (a prompt cache lives in one upstream), elsewhere
/// they are charged as input.
///
/// With `may_move` (the upstreams it may not move to: those tried, except
/// the ones that answered only a [`TRANSIENT`] failure), a request still waiting
/// for the budget of this upstream moves, unsent, to another that would
/// admit it clearly sooner (see [`better_elsewhere`]).
async fn attempt_on<S, ResB>(
    shared: &Shared,
    i: usize,
    service: UpstreamService<S>,
    p: &Prepared,
    may_move: Option<&[bool]>,
) -> Outcome
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let up = &shared.upstreams[i];
    up.routed.fetch_add(1, Ordering::Relaxed);
    let body = match (&p.model, p.scan.model) {
        (Some(model), Some(span)) => match up.config.models.get(model) {
            Some(mapped) => {
                route::with_model(&p.body, span, mapped).unwrap_or_else(|| p.body.clone())
            }
            None => p.body.clone(),
        },
        _ => p.body.clone(),
    };
    let nothing_cached = p.estimate.cache_read_tokens == 0 && p.estimate.cache_pending.is_empty();
    let cached_here = nothing_cached
        || p.scan
            .affinity
            .and_then(|key| lock_affinity(shared).get(key, Instant::now()))
            == Some(i);
    let estimate = if cached_here {
        p.estimate.clone()
    } else {
        route::uncached(&p.estimate)
    };
    let costs = up.config.budget.preview(&estimate).costs;
    let ticket = Ticket::new(Arc::clone(up), costs);
    let mut parts = p.parts.clone();
    parts.extensions.insert(BufferedBytes(body.clone()));
    parts.extensions.insert(ticket.clone());
    parts
        .extensions
        .insert(Estimated::new(estimate, Arc::clone(&shared.estimator)));
    let request = Request::from_parts(parts, Full::new(body));
    let mut attempt = oneshot(service, request);
    let Some(tried) = may_move else {
        return classify(attempt.await, up, p);
    };
    loop {
        let mut check = Box::pin(tokio::time::sleep(MOVE_CHECK));
        let ready = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = attempt.as_mut().poll(cx) {
                return Poll::Ready(Some(result));
            }
            check.as_mut().poll(cx).map(|()| None)
        })
        .await;
        if let Some(result) = ready {
            return classify(result, up, p);
        }
        if ticket.released() {
            return classify(attempt.await, up, p);
        }
        if let Some(j) = better_elsewhere(shared, i, p, &ticket, tried) {
            // Dropping the attempt takes it out of the budget's queue and
            // gives back anything reserved for it.
            drop(attempt);
            return Outcome::Moved(j);
        }
    }
}

/// Another upstream, not barred (see [`TRANSIENT`]), that would admit a request waiting on
/// upstream `i` more than [`MOVE_MARGIN`] sooner than its turn comes there
/// (at most: what is pending there before it); more than the affinity
/// threshold sooner if `i` holds its prompt cache.
fn better_elsewhere(
    shared: &Shared,
    i: usize,
    p: &Prepared,
    ticket: &Ticket,
    tried: &[bool],
) -> Option<usize> {
    let here = route::wait_excluding(&shared.upstreams[i], &p.estimate, ticket.costs());
    if here <= MOVE_MARGIN {
        return None;
    }
    let mut others = tried.to_vec();
    if let Some(t) = others.get_mut(i) {
        *t = true;
    }
    let (j, there) = soonest(shared, &p.estimate, &others).ok()?;
    if j == i {
        return None;
    }
    let cached_here = p
        .scan
        .affinity
        .and_then(|key| lock_affinity(shared).get(key, Instant::now()))
        == Some(i);
    let margin = if cached_here {
        shared.affinity_threshold.max(MOVE_MARGIN)
    } else {
        MOVE_MARGIN
    };
    (there.saturating_add(margin) < here).then_some(j)
}

/// One call of an upstream's service (readiness, then the call), its
/// response body boxed; a boxed future, built outside any `async` block, so
/// that the request's future holds no trait projection (rustc could not
/// prove it `Send`).
fn oneshot<S, ResB>(service: UpstreamService<S>, request: Request<Full<Bytes>>) -> Attempt
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    Box::pin(Oneshot {
        service,
        request: Some(request),
        future: None,
    })
}

type Attempt = Pin<Box<dyn Future<Output = Result<Response<PoolBody>, BoxError>> + Send>>;

pin_project_lite::pin_project! {
    struct Oneshot<Svc, Req, F> {
        service: Svc,
        request: Option<Req>,
        #[pin]
        future: Option<F>,
    }
}

impl<Svc, Req, R> Future for Oneshot<Svc, Req, Svc::Future>
where
    Svc: Service<Req, Response = Response<R>, Error = BoxError>,
    R: Body<Data = Bytes> + Send + 'static,
    R::Error: Into<BoxError>,
{
    type Output = Result<Response<PoolBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(future) = this.future.as_mut().as_pin_mut() {
                let response = ready!(future.poll(cx))?;
                return Poll::Ready(Ok(response.map(|b| b.map_err(Into::into).boxed_unsync())));
            }
            ready!(this.service.poll_ready(cx))?;
            let Some(request) = this.request.take() else {
                return Poll::Ready(Err(PoolError::NotBuffered.into()));
            };
            this.future.set(Some(this.service.call(request)));
        }
    }
}

/// Sorts one attempt's result into done, failover or drain.
fn classify(
    result: Result<Response<PoolBody>, BoxError>,
    up: &UpstreamState,
    p: &Prepared,
) -> Outcome {
    let mut response = match result {
        Ok(response) => response,
        Err(e) => return classify_error(e),
    };
    let status = response.status();
    label(&mut response, up, p);
    let answer = Ok(response);
    match status {
        StatusCode::UNAUTHORIZED => Outcome::Drain(DrainReason::Unauthorized, answer),
        StatusCode::FORBIDDEN => Outcome::Drain(DrainReason::Forbidden, answer),
        StatusCode::TOO_MANY_REQUESTS => Outcome::Failover("429", answer),
        StatusCode::REQUEST_TIMEOUT => Outcome::Failover("408", answer),
        s if s.is_server_error() => {
            Outcome::Failover(if s.as_u16() == 529 { "529" } else { "5xx" }, answer)
        }
        _ => Outcome::Done(answer),
    }
}

fn classify_error(e: BoxError) -> Outcome {
    let reason = match e.downcast_ref::<Error>() {
        Some(Error::SpendLimitReached) => return Outcome::Drain(DrainReason::SpendLimit, Err(e)),
        Some(Error::RetriesExhausted { last_status, .. }) => {
            match last_status.map(|s| s.as_u16()) {
                Some(429) => "429",
                Some(529) => "529",
                Some(_) => "5xx",
                None => "connection error",
            }
        }
        Some(Error::RetryAfterTooLong { .. }) => "cooldown too long",
        Some(Error::BudgetExceeded { .. }) => "budget",
        Some(Error::RequestTooLarge { .. }) => "request too large for its limits",
        Some(Error::Overloaded { .. }) => "local queue full",
        Some(_) => return Outcome::Done(Err(e)),
        None if matches!(e.downcast_ref::<PoolError>(), Some(PoolError::Drained)) => "drained",
        None if e.is::<PoolError>() => return Outcome::Done(Err(e)),
        None => "connection error",
    };
    Outcome::Failover(reason, Err(e))
}

/// Names the upstream and the model on a response.
fn label(response: &mut Response<PoolBody>, up: &UpstreamState, p: &Prepared) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&up.config.name) {
        headers.insert(UPSTREAM_HEADER, v);
    }
    if let Some(v) = p
        .model
        .as_deref()
        .and_then(|m| HeaderValue::from_str(m).ok())
    {
        headers.insert(MODEL_HEADER, v);
    }
}
