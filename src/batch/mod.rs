//! `BatchLayer`: background requests through the Message Batches API.
//!
//! Requests in the [`Priority::Background`] lane (the concurrency layer's
//! request extension), or marked [`Batchable`], are not sent one by one:
//! they are collected and sent together as one Message Batch
//! (`POST /v1/messages/batches`), which the API processes asynchronously
//! (most batches within an hour) at half the price of the Messages API, and
//! whose traffic does not draw on the Messages rate limits. Every other
//! request, a streamed one (`"stream": true`), one marked [`NoBatch`] and
//! one whose body is not a JSON object passes through to the inner service
//! unchanged.
//!
//! - **When a batch goes.** When [`max_requests`](BatchBuilder::max_requests)
//!   have gathered, or [`max_wait`](BatchBuilder::max_wait) after the first
//!   of them, and never past the API's limits (100,000 requests or 256 MB).
//!   Requests go in the same batch only when they share the API's address
//!   and the `x-api-key`, `authorization`, `anthropic-version` and
//!   `anthropic-beta` headers (the batch is sent with the first's headers).
//! - **While it runs.** The batch is polled with backoff
//!   ([`poll`](BatchBuilder::poll)), then its results (JSONL) are read. Each
//!   caller's future resolves with an `http::Response` as `/v1/messages` would
//!   have answered (JSON): a `succeeded` result is a `200` with the message;
//!   an `errored` one is the API's error answer (its status and error body);
//!   `canceled` and `expired` results are [`Error::Batch`] with
//!   [`BatchEnd::Canceled`](crate::BatchEnd::Canceled) or [`BatchEnd::Expired`](crate::BatchEnd::Expired). A batch that could not
//!   be created because the API refused it (a `4xx` other than 429) answers
//!   every one of its requests with that refusal.
//! - **Cancellation.** A future dropped before its batch is submitted removes
//!   its request. One dropped after is ignored: its result is discarded and
//!   no other request is touched.
//! - **Batch limits.** Every call to the batch endpoints is paced by a
//!   [`Ledger`] against the batch
//!   requests-per-minute limit (shared by all models; Tier 1: 50), and a batch
//!   is submitted only while the requests of this layer's batches waiting in
//!   the processing queue stay under the queue cap (Tier 1: 100,000), so that
//!   a submission does not draw a 429. A 429 or 5xx is retried after its
//!   `retry-after` or with backoff.
//!
//! # Composition
//!
//! The layer needs a transport for the batch endpoints: the same inner
//! service the rest of the stack sends through (a hyper client in real use),
//! given to [`BatchLayer::new`]. Put the layer outermost, over the preset, so
//! that background requests leave the Messages budget alone:
//!
//! ```
//! # use bytes::Bytes;
//! # use http_body_util::Full;
//! # use http::{Request, Response};
//! use tower_llm_limits::batch::BatchLayer;
//! use tower_llm_limits::budget::Tier;
//! use tower_llm_limits::preset::LimitsLayer;
//!
//! # let upstream = tower::service_fn(|_r: Request<Full<Bytes>>| async {
//! #     Ok::<_, std::io::Error>(Response::new(Full::new(Bytes::new())))
//! # });
//! let client = tower::ServiceBuilder::new()
//!     .layer(BatchLayer::new(upstream.clone()))   // background -> Message Batches
//!     .layer(LimitsLayer::anthropic(Tier::Tier1)) // the rest -> paced Messages
//!     .service(upstream);
//! # let _ = client;
//! ```
//!
//! # Restart safety
//!
//! Batches live on the server, not in the process: a batch submitted before
//! the process stopped is still processed, and billed, but the futures that
//! waited for it are gone, and requests not yet submitted are lost with them
//! (their callers saw their futures dropped). To collect the results of
//! batches in flight after a restart, give the layer a [`BatchHook`]: it is
//! told each batch's id and custom ids when the batch is created and when its
//! results have been handed out; store what it is told, and after a restart
//! call [`BatchLayer::collect`] for each batch that did not end.

mod driver;
mod results;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use tokio::sync::{oneshot, Notify};
use tower_layer::Layer;
use tower_service::Service;

use crate::budget::ledger::{InMemoryLedger, Ledger};
use crate::concurrency::Priority;
use crate::rewrite::{read_body, with_body};
use crate::{BoxError, Error};

pub use results::BatchResult;

/// The API's limit of requests in one batch.
pub const MAX_BATCH_REQUESTS: usize = 100_000;
/// The API's limit of one batch's size: 256 MB.
pub const MAX_BATCH_BYTES: usize = 256 * 1000 * 1000;

/// A request extension: send this request through a batch even if it is
/// not in the background lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Batchable;

/// A request extension: never batch this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoBatch;

/// Told where each batch stands, to persist the batch ids so that a
/// restarted process can [`BatchLayer::collect`] their results.
pub trait BatchHook: Send + Sync + 'static {
    /// A batch was created with these requests (`custom_id`s).
    fn submitted(&self, batch_id: &str, custom_ids: &[String]);
    /// A batch's results were read and handed out: nothing to collect any more.
    fn ended(&self, batch_id: &str);
}

/// What the layer did so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchSnapshot {
    /// Requests collected for a batch.
    pub collected: u64,
    /// Requests removed before submission because their future was dropped.
    pub dropped_unsent: u64,
    /// Batches created.
    pub batches: u64,
    /// Requests submitted in those batches.
    pub submitted: u64,
    /// Results handed to a waiting caller.
    pub delivered: u64,
    /// Results discarded because their caller had gone.
    pub discarded: u64,
    /// Calls to the batch endpoints answered 429, 5xx or not at all (retried).
    pub retried: u64,
    /// Polls of a batch's status.
    pub polls: u64,
    /// Requests of this layer's batches in the processing queue now.
    pub queued: u64,
}

/// The layer's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) max_requests: usize,
    pub(crate) max_bytes: usize,
    pub(crate) max_wait: Duration,
    pub(crate) poll_initial: Duration,
    pub(crate) poll_max: Duration,
    pub(crate) rpm: Option<u64>,
    pub(crate) queue_cap: u64,
    pub(crate) max_attempts: u32,
    pub(crate) body_limit: usize,
}

/// A request waiting for its batch.
pub(crate) struct Item {
    pub(crate) key: u64,
    pub(crate) params: Bytes,
    pub(crate) tx: oneshot::Sender<Result<Response<Bytes>, Error>>,
}

/// Requests waiting for a batch to the same address with the same headers.
pub(crate) struct Route {
    pub(crate) items: Vec<Item>,
    pub(crate) bytes: usize,
    pub(crate) since: Option<tokio::time::Instant>,
    pub(crate) flusher: bool,
    pub(crate) full: Arc<Notify>,
    pub(crate) base: String,
    pub(crate) headers: HeaderMap,
}

pub(crate) struct State {
    pub(crate) routes: HashMap<String, Route>,
    pub(crate) next_key: u64,
    pub(crate) snapshot: BatchSnapshot,
}

pub(crate) struct Shared<T> {
    pub(crate) transport: T,
    pub(crate) config: Config,
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) hook: Option<Arc<dyn BatchHook>>,
    pub(crate) state: Mutex<State>,
    pub(crate) queue_changed: Notify,
}

impl<T> Shared<T> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Builds a [`BatchLayer`].
pub struct BatchBuilder<T> {
    transport: T,
    config: Config,
    ledger: Arc<dyn Ledger>,
    hook: Option<Arc<dyn BatchHook>>,
}

impl<T> std::fmt::Debug for BatchBuilder<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<T> BatchBuilder<T> {
    /// A batch goes out when this many requests have gathered (1,000 by
    /// default; at most 100,000).
    pub fn max_requests(mut self, n: usize) -> Self {
        self.config.max_requests = n.clamp(1, MAX_BATCH_REQUESTS);
        self
    }

    /// A batch goes out at the latest this long after its first request
    /// gathered (10 s by default).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.config.max_wait = wait;
        self
    }

    /// A batch goes out before its body would pass this many bytes (256 MB
    /// by default, the API's limit, which it cannot exceed).
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.config.max_bytes = bytes.min(MAX_BATCH_BYTES);
        self
    }

    /// Polling of a batch: first after `initial`, then doubling up to `max`
    /// (10 s and 60 s by default).
    pub fn poll(mut self, initial: Duration, max: Duration) -> Self {
        self.config.poll_initial = initial;
        self.config.poll_max = max.max(initial);
        self
    }

    /// The batch endpoints' requests-per-minute limit, shared by all models
    /// (50 by default, Tier 1's; Tier 2: 1,000; Tier 3: 2,000; Tier 4:
    /// 4,000; `None`: not paced).
    pub fn requests_per_minute(mut self, rpm: Option<u64>) -> Self {
        self.config.rpm = rpm;
        self
    }

    /// Batch requests this layer lets wait in the processing queue at once
    /// (100,000 by default, Tier 1's; Tier 2: 200,000; Tier 3: 300,000;
    /// Tier 4: 500,000).
    pub fn queue_cap(mut self, requests: u64) -> Self {
        self.config.queue_cap = requests.max(1);
        self
    }

    /// The ledger pacing the batch endpoints (by default an
    /// [`InMemoryLedger`] of its own; share one to pace several processes).
    pub fn ledger(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.ledger = ledger;
        self
    }

    /// Told each batch's id when it is created and when it ended (see
    /// [Restart safety](self#restart-safety)).
    pub fn hook(mut self, hook: impl BatchHook) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Attempts at each call to a batch endpoint answered 429, 5xx or not
    /// at all (8 by default).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts.max(1);
        self
    }

    /// The largest request body read (16 MiB by default).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// The layer.
    pub fn build(self) -> BatchLayer<T> {
        BatchLayer {
            shared: Arc::new(Shared {
                transport: self.transport,
                config: self.config,
                ledger: self.ledger,
                hook: self.hook,
                state: Mutex::new(State {
                    routes: HashMap::new(),
                    next_key: 0,
                    snapshot: BatchSnapshot::default(),
                }),
                queue_changed: Notify::new(),
            }),
        }
    }
}

/// Sends background requests through the Message Batches API (see the
/// [module docs](self)). Clones share one collection and one snapshot.
pub struct BatchLayer<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for BatchLayer<T> {
    fn clone(&self) -> Self {
        BatchLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<T> std::fmt::Debug for BatchLayer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<T> BatchLayer<T> {
    /// The layer with the defaults, sending batch calls through `transport`.
    pub fn new(transport: T) -> Self {
        Self::builder(transport).build()
    }

    /// A builder: 1,000 requests or 10 s a batch, polls from 10 s to 60 s,
    /// Tier 1's batch limits (50 RPM, 100,000 queued).
    pub fn builder(transport: T) -> BatchBuilder<T> {
        BatchBuilder {
            transport,
            config: Config {
                max_requests: 1_000,
                max_bytes: MAX_BATCH_BYTES,
                max_wait: Duration::from_secs(10),
                poll_initial: Duration::from_secs(10),
                poll_max: Duration::from_secs(60),
                rpm: Some(50),
                queue_cap: 100_000,
                max_attempts: 8,
                body_limit: crate::rewrite::DEFAULT_BODY_LIMIT,
            },
            ledger: Arc::new(InMemoryLedger::new()),
            hook: None,
        }
    }

    /// What the layer did so far.
    pub fn snapshot(&self) -> BatchSnapshot {
        self.shared.lock().snapshot
    }
}

impl<S, T> Layer<S> for BatchLayer<T> {
    type Service = Batch<S, T>;

    fn layer(&self, inner: S) -> Batch<S, T> {
        Batch {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`BatchLayer`].
pub struct Batch<S, T> {
    inner: S,
    shared: Arc<Shared<T>>,
}

impl<S: Clone, T> Clone for Batch<S, T> {
    fn clone(&self) -> Self {
        Batch {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, T> std::fmt::Debug for Batch<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

/// The answer of a [`Batch`] service: the inner service's body for a request
/// that passed through, the message (or error) bytes for a batched one.
pub type BatchBody<R> = Either<R, Full<Bytes>>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, T, B, R, RT> Service<Request<B>> for Batch<S, T>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    T: Service<Request<B>, Response = Response<RT>> + Clone + Send + Sync + 'static,
    T::Future: Send,
    T::Error: Into<BoxError>,
    RT: Body + Send + 'static,
    RT::Data: Send,
    RT::Error: Into<BoxError>,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<BatchBody<R>>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let wants_batch = request.extensions().get::<NoBatch>().is_none()
            && (request.extensions().get::<Batchable>().is_some()
                || request.extensions().get::<Priority>() == Some(&Priority::Background));
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !wants_batch {
            let future = inner.call(request);
            return Box::pin(async move {
                let response = future.await.map_err(Into::into)?;
                Ok(response.map(Either::Left))
            });
        }
        let shared = self.shared.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = read_body(body, shared.config.body_limit).await?;
            if !batchable_body(&bytes) {
                let response = inner
                    .call(with_body(parts, bytes))
                    .await
                    .map_err(Into::into)?;
                return Ok(response.map(Either::Left));
            }
            let answer = driver::enqueue(&shared, &parts, bytes).await?;
            Ok(answer.map(|b| Either::Right(Full::new(b))))
        })
    }
}

/// A body that can go in a batch: a JSON object that does not ask for a stream.
fn batchable_body(bytes: &[u8]) -> bool {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(map)) => {
            map.get("stream").and_then(serde_json::Value::as_bool) != Some(true)
        }
        _ => false,
    }
}
