//! Collecting requests into batches, submitting, polling and answering.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::{oneshot, Notify};
use tokio::time::{sleep, timeout_at, Instant};
use tower_service::Service;

use super::results::{parse, BatchResult};
use super::{BatchLayer, Item, Route, Shared};
use crate::budget::ledger::{Costs, Reservation};
use crate::budget::Limits;
use crate::{BatchEnd, BoxError, Error};

/// The headers a batch is sent with, and that requests must share to go in
/// the same batch.
const ROUTE_HEADERS: [&str; 4] = [
    "x-api-key",
    "authorization",
    "anthropic-version",
    "anthropic-beta",
];

/// The ledger key of the batch endpoints' requests-per-minute limit.
const LEDGER_KEY: &str = "message-batches";

/// Bytes a request adds to the batch body beyond its params.
const ITEM_OVERHEAD: usize = 48;

/// Longest wait between two attempts at a batch endpoint.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn batch_error(batch_id: Option<&str>, end: BatchEnd, detail: impl Into<String>) -> Error {
    Error::Batch {
        batch_id: batch_id.map(str::to_owned),
        end,
        detail: detail.into(),
    }
}

/// The route of a request: its key, the API's address, its headers.
fn route_of(parts: &Parts) -> (String, String, HeaderMap) {
    let base = match (parts.uri.scheme_str(), parts.uri.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}"),
        _ => String::new(),
    };
    let mut key = base.clone();
    let mut headers = HeaderMap::new();
    for name in ROUTE_HEADERS {
        key.push('\n');
        for value in parts.headers.get_all(name) {
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
            headers.append(name, value.clone());
        }
    }
    (key, base, headers)
}

/// Removes a request from its route if its future is dropped before its
/// batch took it.
struct Unsent<T> {
    shared: Arc<Shared<T>>,
    route: String,
    key: u64,
    armed: bool,
}

impl<T> Drop for Unsent<T> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.shared.lock();
        let mut removed = false;
        if let Some(route) = state.routes.get_mut(&self.route) {
            if let Some(i) = route.items.iter().position(|item| item.key == self.key) {
                let item = route.items.remove(i);
                route.bytes = route
                    .bytes
                    .saturating_sub(item.params.len() + ITEM_OVERHEAD);
                removed = true;
            }
        }
        if removed {
            state.snapshot.dropped_unsent += 1;
        }
    }
}

/// Adds a request to its route's next batch and waits for its answer.
pub(crate) async fn enqueue<T, B, RT>(
    shared: &Arc<Shared<T>>,
    parts: &Parts,
    params: Bytes,
) -> Result<Response<Bytes>, BoxError>
where
    T: Service<Request<B>, Response = Response<RT>> + Clone + Send + Sync + 'static,
    T::Future: Send,
    T::Error: Into<BoxError>,
    RT: Body + Send + 'static,
    RT::Data: Send,
    RT::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
{
    let (route_key, base, headers) = route_of(parts);
    let (tx, rx) = oneshot::channel();
    let (key, spawn) = {
        let config = shared.config;
        let mut state = shared.lock();
        let key = state.next_key;
        state.next_key += 1;
        state.snapshot.collected += 1;
        let route = state
            .routes
            .entry(route_key.clone())
            .or_insert_with(|| Route {
                items: Vec::new(),
                bytes: 0,
                since: None,
                flusher: false,
                full: Arc::new(Notify::new()),
                base,
                headers,
            });
        if route.items.is_empty() {
            route.since = Some(Instant::now());
        }
        route.bytes += params.len() + ITEM_OVERHEAD;
        route.items.push(Item { key, params, tx });
        if route.items.len() >= config.max_requests || route.bytes >= config.max_bytes {
            route.full.notify_one();
        }
        let spawn = !route.flusher;
        route.flusher = true;
        (key, spawn)
    };
    if spawn {
        tokio::spawn(flush::<T, B, RT>(shared.clone(), route_key.clone()));
    }
    let mut unsent = Unsent {
        shared: shared.clone(),
        route: route_key,
        key,
        armed: true,
    };
    let answer = rx.await;
    unsent.armed = false;
    match answer {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(Box::new(e)),
        Err(_) => Err(Box::new(batch_error(
            None,
            BatchEnd::Failed,
            "the batch task stopped before answering",
        ))),
    }
}

/// What a route's flusher does next.
enum Next {
    /// Nothing left: the flusher ends.
    Done,
    /// Wait for the batch to fill, or its deadline.
    Wait(Arc<Notify>, Instant),
    /// A batch is ready.
    Send,
}

fn next_step<T>(shared: &Shared<T>, route_key: &str) -> Next {
    let config = shared.config;
    let mut state = shared.lock();
    let Some(route) = state.routes.get_mut(route_key) else {
        return Next::Done;
    };
    if route.items.is_empty() {
        state.routes.remove(route_key);
        return Next::Done;
    }
    let deadline = route.since.unwrap_or_else(Instant::now) + config.max_wait;
    let full = route.items.len() >= config.max_requests || route.bytes >= config.max_bytes;
    if full || Instant::now() >= deadline {
        Next::Send
    } else {
        Next::Wait(route.full.clone(), deadline)
    }
}

/// Takes the next batch of a route, at most `room` requests; counts them queued.
fn take<T>(
    shared: &Shared<T>,
    route_key: &str,
    room: u64,
) -> Option<(String, HeaderMap, Vec<Item>)> {
    let config = shared.config;
    let mut state = shared.lock();
    let route = state.routes.get_mut(route_key)?;
    let limit = config
        .max_requests
        .min(usize::try_from(room).unwrap_or(usize::MAX));
    let mut bytes = 0usize;
    let mut n = 0usize;
    for item in &route.items {
        let size = item.params.len() + ITEM_OVERHEAD;
        if n >= limit || (n > 0 && bytes + size > config.max_bytes) {
            break;
        }
        bytes += size;
        n += 1;
    }
    let items: Vec<Item> = route.items.drain(..n).collect();
    route.bytes = route.bytes.saturating_sub(bytes);
    route.since = (!route.items.is_empty()).then(Instant::now);
    let taken = (route.base.clone(), route.headers.clone(), items);
    state.snapshot.queued += n as u64;
    Some(taken)
}

/// Room left in the processing queue, waiting until there is some.
async fn queue_room<T>(shared: &Shared<T>) -> u64 {
    loop {
        let notified = shared.queue_changed.notified();
        let queued = shared.lock().snapshot.queued;
        if queued < shared.config.queue_cap {
            return shared.config.queue_cap - queued;
        }
        notified.await;
    }
}

/// Sends a route's batches as they fill or their time comes; ends when the
/// route is empty.
async fn flush<T, B, RT>(shared: Arc<Shared<T>>, route_key: String)
where
    T: Service<Request<B>, Response = Response<RT>> + Clone + Send + Sync + 'static,
    T::Future: Send,
    T::Error: Into<BoxError>,
    RT: Body + Send + 'static,
    RT::Data: Send,
    RT::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
{
    loop {
        match next_step(&shared, &route_key) {
            Next::Done => return,
            Next::Wait(full, deadline) => {
                let _ = timeout_at(deadline, full.notified()).await;
            }
            Next::Send => {
                let room = queue_room(&shared).await;
                if let Some((base, headers, items)) = take(&shared, &route_key, room) {
                    if !items.is_empty() {
                        tokio::spawn(run_batch::<T, B, RT>(shared.clone(), base, headers, items));
                    }
                }
            }
        }
    }
}

/// The body of `POST /v1/messages/batches`.
fn create_body(items: &[Item]) -> Bytes {
    let size: usize = items.iter().map(|i| i.params.len() + ITEM_OVERHEAD).sum();
    let mut out = Vec::with_capacity(size + 16);
    out.extend_from_slice(b"{\"requests\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = write!(out, "{{\"custom_id\":\"r{}\",\"params\":", item.key);
        out.extend_from_slice(&item.params);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    Bytes::from(out)
}

/// One batch from creation to answers.
async fn run_batch<T, B, RT>(
    shared: Arc<Shared<T>>,
    base: String,
    headers: HeaderMap,
    items: Vec<Item>,
) where
    T: Service<Request<B>, Response = Response<RT>> + Clone + Send + Sync + 'static,
    T::Future: Send,
    T::Error: Into<BoxError>,
    RT: Body + Send + 'static,
    RT::Data: Send,
    RT::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
{
    let n = items.len() as u64;
    let uri = format!("{base}/v1/messages/batches");
    let created =
        call::<T, B, RT>(&shared, Method::POST, &uri, &headers, create_body(&items)).await;
    let outcome = match created {
        Ok((status, body)) if status.is_success() => {
            let id = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned));
            id.ok_or_else(|| {
                Answer::Fail(batch_error(
                    None,
                    BatchEnd::Failed,
                    "no batch id in the answer",
                ))
            })
        }
        Ok((status, body)) => Err(Answer::Refused(status, body)),
        Err(e) => Err(Answer::Fail(batch_error(
            None,
            BatchEnd::Failed,
            e.to_string(),
        ))),
    };
    let id = match outcome {
        Ok(id) => id,
        Err(answer) => {
            answer_all(&shared, items, &answer);
            release(&shared, n);
            return;
        }
    };
    {
        let mut state = shared.lock();
        state.snapshot.batches += 1;
        state.snapshot.submitted += n;
    }
    if let Some(hook) = &shared.hook {
        let ids: Vec<String> = items.iter().map(|i| format!("r{}", i.key)).collect();
        hook.submitted(&id, &ids);
    }
    match wait_results::<T, B, RT>(&shared, &base, &headers, &id).await {
        Ok(results) => deliver(&shared, &id, items, results),
        Err(e) => answer_all(&shared, items, &Answer::Fail(e)),
    }
    release(&shared, n);
    if let Some(hook) = &shared.hook {
        hook.ended(&id);
    }
}

/// How every request of a batch that did not run is answered.
enum Answer {
    /// The API refused the batch: its answer, for each request.
    Refused(StatusCode, Bytes),
    /// The batch could not be created or read.
    Fail(Error),
}

fn answer_all<T>(shared: &Shared<T>, items: Vec<Item>, answer: &Answer) {
    for item in items {
        let result = match answer {
            Answer::Refused(status, body) => {
                let mut response = Response::new(body.clone());
                *response.status_mut() = *status;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Ok(response)
            }
            Answer::Fail(Error::Batch {
                batch_id,
                end,
                detail,
            }) => Err(batch_error(batch_id.as_deref(), *end, detail.clone())),
            Answer::Fail(other) => Err(batch_error(None, BatchEnd::Failed, other.to_string())),
        };
        send(shared, item, result);
    }
}

fn send<T>(shared: &Shared<T>, item: Item, result: Result<Response<Bytes>, Error>) {
    let delivered = item.tx.send(result).is_ok();
    let mut state = shared.lock();
    if delivered {
        state.snapshot.delivered += 1;
    } else {
        state.snapshot.discarded += 1;
    }
}

/// Hands each request its result.
fn deliver<T>(shared: &Shared<T>, id: &str, items: Vec<Item>, results: Vec<(String, BatchResult)>) {
    let mut by_id: HashMap<String, BatchResult> = results.into_iter().collect();
    for item in items {
        let result = match by_id.remove(&format!("r{}", item.key)) {
            Some(result) => result.into_response(id),
            None => Err(batch_error(
                Some(id),
                BatchEnd::Failed,
                "no result for this request",
            )),
        };
        send(shared, item, result);
    }
}

/// The batch's requests left the processing queue.
fn release<T>(shared: &Shared<T>, n: u64) {
    {
        let mut state = shared.lock();
        state.snapshot.queued = state.snapshot.queued.saturating_sub(n);
    }
    shared.queue_changed.notify_waiters();
}

/// Polls a batch with backoff until it ended, then reads its results.
async fn wait_results<T, B, RT>(
    shared: &Shared<T>,
    base: &str,
    headers: &HeaderMap,
    id: &str,
) -> Result<Vec<(String, BatchResult)>, Error>
where
    T: Service<Request<B>, Response = Response<RT>> + Clone + Send + Sync + 'static,
    T::Future: Send,
    T::Error: Into<BoxError>,
    RT: Body + Send + 'static,
    RT::Data: Send,
    RT::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
{
    let failed = |detail: String| batch_error(Some(id), BatchEnd::Failed, detail);
    let mut delay = shared.config.poll_initial;
    let uri = format!("{base}/v1/messages/batches/{id}");
    let results_url = loop {
        sleep(delay).await;
        delay = (delay * 2).min(shared.config.poll_max);
        shared.lock().snapshot.polls += 1;
        let (status, body) = call::<T, B, RT>(shared, Method::GET, &uri, headers, Bytes::new())
            .await
            .map_err(|e| failed(e.to_string()))?;
        if !status.is_success() {
            return Err(failed(format!("retrieving the batch: {status}")));
        }
        let object: Value = serde_json::from_slice(&body).map_err(|e| failed(e.to_string()))?;
        if object.get("processing_status").and_then(Value::as_str) == Some("ended") {
            break object
                .get("results_url")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
    };
    let url = match results_url {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => url,
        Some(path) if path.starts_with('/') => format!("{base}{path}"),
        _ => format!("{uri}/results"),
    };
    let (status, body) = call::<T, B, RT>(shared, Method::GET, &url, headers, Bytes::new())
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !status.is_success() {
        return Err(failed(format!("reading the results: {status}")));
    }
    Ok(parse(&body))
}

/// Waits for the ledger to admit one call to a batch endpoint.
async fn pace<T>(shared: &Shared<T>) -> Result<(), BoxError> {
    let Some(rpm) = shared.config.rpm else {
        return Ok(());
    };
    let limits = Limits::new().rpm(rpm);
    let costs = Costs {
        requests: 1,
        ..Costs::default()
    };
    loop {
        match shared.ledger.reserve(LEDGER_KEY, &limits, costs).await? {
            Reservation::Admitted => return Ok(()),
            Reservation::Wait { retry_in, .. } => sleep(retry_in).await,
            Reservation::Never {
                dimension,
                cost,
                capacity,
            } => {
                return Err(Box::new(Error::RequestTooLarge {
                    dimension,
                    cost,
                    limit: capacity,
                }))
            }
        }
    }
}

/// The `retry-after` of an answer, in whole seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// One call to a batch endpoint, paced, retried on 429, 5xx and transport
/// errors: its status and whole body.
async fn call<T, B, RT>(
    shared: &Shared<T>,
    method: Method,
    uri: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Bytes), BoxError>
where
    T: Service<Request<B>, Response = Response<RT>> + Clone + Send + Sync + 'static,
    T::Future: Send,
    T::Error: Into<BoxError>,
    RT: Body + Send + 'static,
    RT::Data: Send,
    RT::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
{
    let mut backoff = Duration::from_secs(1);
    let mut attempt = 1;
    loop {
        pace(shared).await?;
        let result = once::<T, B, RT>(shared, method.clone(), uri, headers, body.clone()).await;
        let wait = match &result {
            Ok((status, answer_headers, _))
                if *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() =>
            {
                Some(retry_after(answer_headers).unwrap_or(backoff))
            }
            Err(_) => Some(backoff),
            Ok(_) => None,
        };
        match wait {
            Some(wait) if attempt < shared.config.max_attempts => {
                shared.lock().snapshot.retried += 1;
                sleep(wait).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
            _ => return result.map(|(status, _, body)| (status, body)),
        }
    }
}

async fn once<T, B, RT>(
    shared: &Shared<T>,
    method: Method,
    uri: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, HeaderMap, Bytes), BoxError>
where
    T: Service<Request<B>, Response = Response<RT>> + Clone + Send + Sync + 'static,
    T::Future: Send,
    T::Error: Into<BoxError>,
    RT: Body + Send + 'static,
    RT::Data: Send,
    RT::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
{
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(h) = request.headers_mut() {
        h.extend(headers.clone());
        if !body.is_empty() {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    let request = request.body(B::from(body))?;
    let mut transport = shared.transport.clone();
    poll_fn(|cx| transport.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    let response = transport.call(request).await.map_err(Into::into)?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
    Ok((parts.status, parts.headers, bytes))
}

impl<T> BatchLayer<T> {
    /// Waits for a batch submitted earlier (by this process before a restart:
    /// see [Restart safety](super#restart-safety)) to end and reads its
    /// results, by `custom_id`. `base` is the API's address
    /// (`https://api.anthropic.com`), `headers` the `x-api-key` and
    /// `anthropic-version` to send. Paced and polled as the layer's own batches.
    pub async fn collect<B, RT>(
        &self,
        base: &str,
        headers: HeaderMap,
        batch_id: &str,
    ) -> Result<Vec<(String, BatchResult)>, Error>
    where
        T: Service<Request<B>, Response = Response<RT>> + Clone + Send + Sync + 'static,
        T::Future: Send,
        T::Error: Into<BoxError>,
        RT: Body + Send + 'static,
        RT::Data: Send,
        RT::Error: Into<BoxError>,
        B: From<Bytes> + Send + 'static,
    {
        let base = base.trim_end_matches('/');
        wait_results::<T, B, RT>(&self.shared, base, &headers, batch_id).await
    }
}
