//! Running a workload through a client: the meter that sits right in front of
//! the server (it sees every attempt, retries included), and the workers that
//! issue the workload's requests.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Service, ServiceExt};
use tower_llm_limits::headers::RateLimitSnapshot;
use tower_llm_limits::wire::{usage_of, StreamEnd, StreamUsage, Usage};
use tower_llm_limits::BoxError;

use super::progress::Progress;
use super::workload::Item;

/// The body type every transport and client speaks.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
/// A server: the in-process emulator, or an HTTP client to a real endpoint.
pub type Transport = BoxCloneService<Request<Body>, Response<Body>, BoxError>;
/// A strategy's client, as the workers call it.
pub type Client = BoxCloneService<Request<Full<Bytes>>, Response<Body>, BoxError>;

/// The header the workers put on each request so the meter can tell a retry
/// from a first attempt; the meter removes it before the request leaves.
pub const REQUEST_ID: &str = "x-simulate-request";

/// Boxes any response body into [`Body`].
pub fn box_response<B>(resp: Response<B>) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    resp.map(|b| b.map_err(Into::into).boxed_unsync())
}

/// Boxes any request body into [`Body`].
pub fn box_request<B>(req: Request<B>) -> Request<Body>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    req.map(|b| b.map_err(Into::into).boxed_unsync())
}

/// One attempt, as the meter saw it.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The workload index of the request (None if the header was missing).
    pub request: Option<usize>,
    /// When it was sent, since the run's start.
    pub sent: Duration,
    /// Status, or None for a transport error.
    pub status: Option<u16>,
    /// Usage the response body reported, if it completed.
    pub usage: Option<Usage>,
}

/// The log of one run, shared by the meter's clones.
#[derive(Debug)]
pub struct Log {
    pub t0: Instant,
    pub attempts: Mutex<Vec<Attempt>>,
    /// The limits the server's `anthropic-ratelimit-*-limit` headers said
    /// last: (requests, input tokens, output tokens) per minute.
    pub server_limits: Mutex<Option<(u64, u64, u64)>>,
}

impl Log {
    pub fn new() -> Arc<Self> {
        Arc::new(Log {
            t0: Instant::now(),
            attempts: Mutex::new(Vec::new()),
            server_limits: Mutex::new(None),
        })
    }

    fn push(&self, a: Attempt) -> usize {
        let mut v = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        v.push(a);
        v.len() - 1
    }

    fn set_usage(&self, i: usize, u: Usage) {
        let mut v = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = v.get_mut(i) {
            a.usage = Some(u);
        }
    }

    fn learn(&self, headers: &http::HeaderMap) {
        let snap = RateLimitSnapshot::from_headers(headers);
        if let (Some(r), Some(i), Some(o)) = (
            snap.requests.limit,
            snap.input_tokens.limit,
            snap.output_tokens.limit,
        ) {
            if let Ok(mut l) = self.server_limits.lock() {
                *l = Some((r, i, o));
            }
        }
    }

    pub fn snapshot(&self) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A service right in front of the transport: records every attempt (its
/// time, status and the usage its body reports) and strips [`REQUEST_ID`].
#[derive(Clone)]
pub struct Meter {
    inner: Transport,
    log: Arc<Log>,
}

impl Meter {
    pub fn new(inner: Transport, log: Arc<Log>) -> Self {
        Meter { inner, log }
    }
}

impl<B> Service<Request<B>> for Meter
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mut req = box_request(req);
        let request = req
            .headers_mut()
            .remove(REQUEST_ID)
            .and_then(|v| v.to_str().ok().and_then(|s| s.parse::<usize>().ok()));
        let sent = self.log.t0.elapsed();
        let log = self.log.clone();
        // A token count the client asks for (`/v1/messages/count_tokens`) is
        // not an attempt of the request it counts: it goes to the server
        // unrecorded (the emulator counts it apart, with its own limit).
        if req.uri().path().ends_with("/count_tokens") {
            return Box::pin(self.inner.call(req));
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    log.learn(resp.headers());
                    let i = log.push(Attempt {
                        request,
                        sent,
                        status: Some(status),
                        usage: None,
                    });
                    if status != 200 {
                        return Ok(resp);
                    }
                    let (parts, body) = resp.into_parts();
                    let body = UsageTap {
                        inner: body,
                        seen: BytesMut::new(),
                        log,
                        index: i,
                        done: false,
                    };
                    Ok(Response::from_parts(parts, body.boxed_unsync()))
                }
                Err(e) => {
                    log.push(Attempt {
                        request,
                        sent,
                        status: None,
                        usage: None,
                    });
                    Err(e)
                }
            }
        })
    }
}

/// A response body that copies what passes (the simulation can afford it) and,
/// at its end, reads the usage the server reported.
struct UsageTap {
    inner: Body,
    seen: BytesMut,
    log: Arc<Log>,
    index: usize,
    done: bool,
}

impl HttpBody for UsageTap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.seen.extend_from_slice(d);
                }
            }
            Poll::Ready(None) if !this.done => {
                this.done = true;
                if let Some(u) = usage_of(&this.seen) {
                    this.log.set_usage(this.index, u);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How one logical request of the workload ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub index: usize,
    /// Whether it got a 200 whose body ended cleanly (no `event: error`).
    pub ok: bool,
    /// Why it failed, short.
    pub error: Option<String>,
    /// From the worker's call to the end of the body.
    pub latency: Duration,
    /// When it finished, since the run's start.
    pub finished: Duration,
}

/// Builds the HTTP request for a workload item.
pub fn request_for(
    item: &Item,
    index: usize,
    api_key: Option<&HeaderValue>,
    path: &str,
) -> Request<Full<Bytes>> {
    let mut b = Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("anthropic-version", "2023-06-01")
        .header(REQUEST_ID, index.to_string());
    if let Some(k) = api_key {
        b = b.header("x-api-key", k.clone());
    }
    match b.body(Full::new(item.body.clone())) {
        Ok(r) => r,
        Err(_) => Request::new(Full::new(item.body.clone())),
    }
}

/// Runs every item of the workload through `client` with `concurrency`
/// workers, each taking the next item when its last one ends.
pub async fn drive(
    client: Client,
    items: Arc<Vec<Item>>,
    concurrency: usize,
    log: Arc<Log>,
    api_key: Option<HeaderValue>,
    path: String,
    progress: Progress,
) -> Vec<Outcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let mut client = client.clone();
        let items = items.clone();
        let next = next.clone();
        let log = log.clone();
        let api_key = api_key.clone();
        let path = path.clone();
        let progress = progress.clone();
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let req = request_for(item, i, api_key.as_ref(), &path);
                let start = Instant::now();
                let result = match client.ready().await {
                    Ok(svc) => svc.call(req).await,
                    Err(e) => Err(e),
                };
                let (ok, error) = match result {
                    Ok(resp) => {
                        let status = resp.status();
                        match resp.into_body().collect().await {
                            Ok(c) => {
                                let bytes = c.to_bytes();
                                if !status.is_success() {
                                    (false, Some(format!("HTTP {}", status.as_u16())))
                                } else if stream_errored(&bytes) {
                                    (false, Some("stream error event".to_string()))
                                } else {
                                    (true, None)
                                }
                            }
                            Err(e) => (false, Some(short_error(&*e))),
                        }
                    }
                    Err(e) => (false, Some(short_error(&*e))),
                };
                let now = Instant::now();
                progress.record(ok);
                out.push(Outcome {
                    index: i,
                    ok,
                    error,
                    latency: now - start,
                    finished: now - log.t0,
                });
            }
            out
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        if let Ok(v) = w.await {
            all.extend(v);
        }
    }
    all.sort_by_key(|o| o.index);
    all
}

/// Whether a streamed body carried an `error` event.
fn stream_errored(b: &[u8]) -> bool {
    let mut stream = StreamUsage::new();
    stream.push(b);
    stream.finish();
    stream.end() == Some(StreamEnd::Errored)
}

/// A short name for an error, for the failure summary: the crate's own
/// errors by variant, anything else by its message.
pub fn short_error(e: &(dyn std::error::Error + Send + Sync + 'static)) -> String {
    use tower_llm_limits::Error;
    match e.downcast_ref::<Error>() {
        Some(Error::RetriesExhausted { last_status, .. }) => match last_status {
            Some(s) => format!("retries exhausted (last {})", s.as_u16()),
            None => "retries exhausted (transport)".to_string(),
        },
        Some(Error::RetryAfterTooLong { delay, .. }) => {
            format!("retry-after {}s above cap", delay.as_secs())
        }
        Some(Error::RequestTooLarge { dimension, .. }) => format!("too large for {dimension}"),
        Some(Error::BudgetExceeded { .. }) => "budget exceeded".to_string(),
        Some(Error::Overloaded { .. }) => "shed (queue full)".to_string(),
        Some(other) => other.to_string(),
        None => {
            let s = e.to_string();
            if s.len() > 60 {
                format!(
                    "{}...",
                    &s[..s.char_indices().nth(57).map_or(s.len(), |(i, _)| i)]
                )
            } else {
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_from_json_and_from_sse() {
        let json = br#"{"type":"message","usage":{"input_tokens":12,"cache_creation_input_tokens":3,"cache_read_input_tokens":40,"output_tokens":7}}"#;
        let u = usage_of(json).expect("json usage");
        assert_eq!(
            (
                u.charged_input_tokens(false),
                u.cache_read_input_tokens,
                u.output_tokens
            ),
            (15, 40, 7)
        );

        let sse = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let u = usage_of(sse).expect("sse usage");
        assert_eq!((u.input_tokens, u.output_tokens), (25, 15));
        assert_eq!(usage_of(b"not a body"), None);
    }
}
