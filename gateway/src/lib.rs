//! `llm-gateway`: a gateway for the Anthropic Messages API that any SDK or
//! Claude Code can point at (`ANTHROPIC_BASE_URL`), built on
//! tower-llm-limits: a [`Pool`] of upstreams (keys, workspaces, endpoints)
//! with routing to the soonest admission, cache affinity, failover and
//! draining, and per caller its own budget in enforce mode (an
//! Anthropic-shaped 429 with an exact `retry-after` when over it), a
//! priority lane and an optional model allow-list. See [`config`] for the
//! TOML file.
//!
//! Routes: `POST /v1/messages` (JSON, and SSE streamed through without
//! buffering), `POST /v1/messages/count_tokens` (forwarded to an upstream in
//! rotation, outside the budgets), `GET /health`, `GET /metrics`
//! (Prometheus text).

pub mod config;
mod metrics;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::body::Body as AxumBody;
use axum::extract::{Request as AxumRequest, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_limits::budget::{CallerRefusal, Callers, TokenBudgetLayer};
use tower_llm_limits::concurrency::Priority;
use tower_llm_limits::pool::{Pool, PoolError, Upstream};
use tower_llm_limits::wire::error::{insert_retry_after, ErrorBody, ErrorKind};
use tower_llm_limits::BoxError;

pub use config::{Config, ConfigError};

/// The body the gateway's services answer with.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
/// The HTTP transport to the upstreams.
pub type Transport = BoxCloneSyncService<Request<Full<Bytes>>, http::Response<Body>, BoxError>;
type CallerService = BoxCloneSyncService<Request<Full<Bytes>>, http::Response<Body>, BoxError>;

fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A hyper-util client with rustls (webpki roots) speaking `https://` and
/// `http://`.
pub fn https_transport() -> Transport {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let client = client.clone();
        async move {
            let resp = client.request(req).await.map_err(BoxError::from)?;
            Ok::<_, BoxError>(resp.map(boxed))
        }
    });
    BoxCloneSyncService::new(svc)
}

/// One accepted caller.
struct Caller {
    name: String,
    key: Vec<u8>,
    priority: Priority,
    models: Option<HashSet<String>>,
    /// Its enforce-mode budget over the pool.
    service: CallerService,
}

/// What every request handler shares.
pub(crate) struct App {
    callers: Vec<Caller>,
    pool: Pool<Transport>,
    transport: Transport,
    /// Per upstream, its base URL and key (for `count_tokens`).
    upstreams: Vec<(String, HeaderValue)>,
    body_limit: usize,
    pub(crate) metrics: metrics::Metrics,
    /// Connections open now (counted by [`serve`]).
    pub(crate) connections: Arc<AtomicU64>,
}

/// Builds the gateway's router over `transport`.
///
/// # Errors
///
/// An upstream or caller the crate refuses (a [`PoolError`]).
pub fn router(config: &Config, transport: Transport) -> Result<Router, BoxError> {
    build(config, transport).map(|(router, _)| router)
}

/// The router, and the count of open connections its `/metrics` reports
/// (kept by [`serve`]).
fn build(config: &Config, transport: Transport) -> Result<(Router, Arc<AtomicU64>), BoxError> {
    let mut pool = Pool::builder().buffer_limit(config.body_limit);
    let mut upstreams = Vec::new();
    for u in &config.upstreams {
        let mut up = Upstream::new(&u.name, &u.base_url, u.limits.clone())?
            .key(&u.key)?
            .weight(u.weight);
        for (from, to) in &u.models {
            up = up.model(from, to);
        }
        pool = pool.upstream(up);
        let mut key = HeaderValue::from_str(&u.key)?;
        key.set_sensitive(true);
        upstreams.push((u.base_url.trim_end_matches('/').to_string(), key));
    }
    let pool = pool.build(transport.clone())?;
    let callers = config
        .callers
        .iter()
        .map(|c| {
            let budget = TokenBudgetLayer::enforce(
                c.limits.clone(),
                Callers::new().caller(&c.name, c.key.as_bytes()),
            );
            let svc = ServiceBuilder::new()
                .map_response(|r: http::Response<_>| r.map(boxed))
                .layer(budget)
                .service(pool.clone());
            Caller {
                name: c.name.clone(),
                key: c.key.as_bytes().to_vec(),
                priority: c.priority,
                models: c.models.as_ref().map(|m| m.iter().cloned().collect()),
                service: BoxCloneSyncService::new(svc),
            }
        })
        .collect();
    let open = Arc::new(AtomicU64::new(0));
    let app = Arc::new(App {
        connections: Arc::clone(&open),
        callers,
        pool,
        transport,
        upstreams,
        body_limit: config.body_limit,
        metrics: metrics::Metrics::default(),
    });
    let router = Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/health", get(health))
        .route("/metrics", get(metrics::render))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            config.body_read_timeout,
        ))
        .with_state(app);
    Ok((router, open))
}

/// Serves `config` on `listener` until `shutdown` resolves; then refuses new
/// connections and lets the answers in flight (streams included) finish,
/// for at most `config.shutdown_grace`.
///
/// Each connection is HTTP/1.1 with a header read timeout
/// (`config.header_read_timeout`): a client that has not sent a whole
/// request head that long after the connection began waiting for one (a
/// half-sent request line, or an idle keep-alive connection) is
/// disconnected, so slow clients cannot hold connections open. The body
/// has its own timeout (`config.body_read_timeout`, answered with 408).
///
/// # Errors
///
/// The router cannot be built.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let (app, open) = build(&config, transport)?;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: wait a little, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let guard = metrics::Open::new(&open);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(guard);
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; finishing answers in flight");
    tokio::select! {
        () = graceful.shutdown() => Ok(()),
        () = tokio::time::sleep(config.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; answers still in flight were cut");
            Ok(())
        }
    }
}

/// How long the accept loop pauses after a failed `accept`.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

fn error(kind: ErrorKind, message: &str) -> Response {
    ErrorBody::new(kind, message)
        .into_response()
        .map(AxumBody::from)
}

/// The caller a request's `x-api-key` or `authorization: Bearer` names,
/// compared in constant time with every configured key.
fn authenticate<'a>(app: &'a App, headers: &HeaderMap) -> Result<&'a Caller, CallerRefusal> {
    let presented = headers
        .get("x-api-key")
        .map(HeaderValue::as_bytes)
        .or_else(|| {
            headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        })
        .ok_or(CallerRefusal::MissingKey)?;
    let mut found = None;
    for c in &app.callers {
        if constant_time_eq(&c.key, presented) {
            found = Some(c);
        }
    }
    found.ok_or(CallerRefusal::UnknownKey)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(serde::Deserialize)]
struct ModelOnly {
    model: Option<String>,
}

async fn messages(State(app): State<Arc<App>>, request: AxumRequest) -> Response {
    let (mut parts, body) = request.into_parts();
    let caller = match authenticate(&app, &parts.headers) {
        Ok(c) => c,
        Err(refusal) => {
            app.metrics.served("", refusal.status());
            return refusal.into_response().map(AxumBody::from);
        }
    };
    let bytes = match axum::body::to_bytes(body, app.body_limit).await {
        Ok(b) => b,
        Err(e) => {
            let response = unread(&e);
            app.metrics.served(&caller.name, response.status());
            return response;
        }
    };
    if let Some(allowed) = &caller.models {
        let model = serde_json::from_slice::<ModelOnly>(&bytes)
            .ok()
            .and_then(|m| m.model);
        if !model.is_some_and(|m| allowed.contains(&m)) {
            app.metrics.served(&caller.name, StatusCode::FORBIDDEN);
            return error(ErrorKind::Permission, "this key may not use this model");
        }
    }
    parts.extensions.insert(caller.priority);
    let request = Request::from_parts(parts, Full::new(bytes));
    let response = match caller.service.clone().oneshot(request).await {
        Ok(r) => r.map(AxumBody::new),
        Err(e) => failure(&e),
    };
    app.metrics.served(&caller.name, response.status());
    response
}

/// The answer to a request whose body could not be read: above the size
/// limit (413), or not received in time (408).
fn unread(e: &axum::Error) -> Response {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return error(ErrorKind::RequestTooLarge, "request body too large");
        }
        source = err.source();
    }
    let mut r = error(
        ErrorKind::InvalidRequest,
        "request body not received in time",
    );
    *r.status_mut() = StatusCode::REQUEST_TIMEOUT;
    r
}

/// The answer to a request the pool could not serve.
fn failure(e: &BoxError) -> Response {
    if let Some(PoolError::AllDrained { retry_in }) = e.downcast_ref::<PoolError>() {
        let mut r = error(ErrorKind::Overloaded, "every upstream is out of rotation");
        insert_retry_after(r.headers_mut(), *retry_in);
        return r;
    }
    if let Some(tower_llm_limits::Error::RequestTooLarge { .. }) = e.downcast_ref() {
        return error(
            ErrorKind::InvalidRequest,
            "the request exceeds every upstream's rate limits",
        );
    }
    // Every upstream tried was rate limited or overloaded: the gateway's
    // capacity is, not the caller's budget; the SDKs retry a 529.
    if let Some(
        err @ tower_llm_limits::Error::RetriesExhausted {
            last_status: Some(_),
            ..
        },
    ) = e.downcast_ref::<tower_llm_limits::Error>()
    {
        let mut r = error(ErrorKind::Overloaded, "every upstream is busy");
        if let Some(d) = err.retry_in() {
            insert_retry_after(r.headers_mut(), d);
        }
        return r;
    }
    tracing::warn!(error = %e, "no upstream answered");
    let mut r = error(ErrorKind::Api, "no upstream answered");
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

async fn count_tokens(State(app): State<Arc<App>>, request: AxumRequest) -> Response {
    let (mut parts, body) = request.into_parts();
    if let Err(refusal) = authenticate(&app, &parts.headers) {
        return refusal.into_response().map(AxumBody::from);
    }
    let bytes = match axum::body::to_bytes(body, app.body_limit).await {
        Ok(b) => b,
        Err(e) => return unread(&e),
    };
    let snapshot = app.pool.snapshot();
    let Some(i) = snapshot.upstreams.iter().position(|u| u.drained.is_none()) else {
        return error(ErrorKind::Overloaded, "every upstream is out of rotation");
    };
    let Some((base, key)) = app.upstreams.get(i) else {
        return error(ErrorKind::Api, "no upstream");
    };
    let Ok(uri) = format!("{base}/v1/messages/count_tokens").parse::<Uri>() else {
        return error(ErrorKind::Api, "bad upstream address");
    };
    parts.uri = uri;
    parts.headers.remove(http::header::HOST);
    parts.headers.remove(http::header::AUTHORIZATION);
    parts.headers.insert("x-api-key", key.clone());
    match app
        .transport
        .clone()
        .oneshot(Request::from_parts(parts, Full::new(bytes)))
        .await
    {
        Ok(r) => r.map(AxumBody::new),
        Err(e) => failure(&e),
    }
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let snapshot = app.pool.snapshot();
    let upstreams: Vec<serde_json::Value> = snapshot
        .upstreams
        .iter()
        .map(|u| serde_json::json!({"name": u.name, "in_rotation": u.drained.is_none()}))
        .collect();
    let any = snapshot.upstreams.iter().any(|u| u.drained.is_none());
    let status = if any {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({"status": if any { "ok" } else { "no upstream in rotation" }, "upstreams": upstreams});
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
