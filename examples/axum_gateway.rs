//! An axum gateway in front of many internal callers.
//!
//! ```text
//! ANTHROPIC_API_KEY=sk-ant-... GATEWAY_CALLERS='team-a=gw-key-a,team-b=gw-key-b' \
//!   cargo run --example axum_gateway
//! # then, from any client or official SDK, with the caller's gateway key:
//! curl -s localhost:8080/v1/messages -H 'x-api-key: gw-key-a' -H 'content-type: application/json' \
//!   -d '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}'
//! ```
//!
//! Two budgets, two jobs:
//! - **per caller, enforced** (server side): [`EnforceLayer`] on the route
//!   (its service's error is the route's own, so no `HandleErrorLayer`) gives every configured caller ([`Callers`]: a name and a
//!   gateway key, sent as `x-api-key` or `authorization: Bearer`, compared
//!   in constant time, never logged or echoed) its own RPM / ITPM / OTPM.
//!   An unknown or missing key is answered with 401 `authentication_error`,
//!   duplicate or conflicting keys with 400, before any budget is touched.
//!   A caller over budget is answered at once with an Anthropic-shaped 429
//!   (`retry-after`, `anthropic-ratelimit-*` headers, the error JSON), so the
//!   official SDKs back off correctly; admitted answers carry the caller's
//!   `anthropic-ratelimit-*` headers.
//! - **for the organisation, paced** (client side): the upstream client is
//!   the crate's preset stack (retry -> budget -> concurrency) over a
//!   hyper-util client, so all callers together stay under the key's limits.
//!
//! The server holds its connections to bounds (see [`serve`]): at most
//! [`MAX_CONNECTIONS`] open at once (more wait in the listen queue), a
//! request head must arrive within [`HEADER_READ_TIMEOUT`] (also between
//! requests on a kept-alive connection), and a whole request body within
//! [`BODY_READ_TIMEOUT`] (else 408 and the connection is closed). A
//! slow-loris client cannot hold a connection longer than that.
//!
//! Environment: `ANTHROPIC_API_KEY` (the upstream key, required),
//! `GATEWAY_CALLERS` (required: `name=key` pairs separated by commas),
//! `UPSTREAM_URL` (default `https://api.anthropic.com`), `GATEWAY_ADDR`
//! (default `127.0.0.1:8080`), `ANTHROPIC_TIER` (the upstream's tier: `1` to
//! `4`, `tier2`, `start`, `build`, `scale`; default `1`) or `ANTHROPIC_LIMITS`
//! (`rpm=50,itpm=30000,otpm=8000`), `CALLER_RPM` / `CALLER_ITPM` / `CALLER_OTPM` (each
//! caller's limits, default 20 / 10,000 / 2,000).

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request as AxumRequest, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

use http_body_util::Limited;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_llm_limits::budget::{
    error_response, forward_response, Callers, EnforceLayer, Limits, Tier,
};
use tower_llm_limits::preset::{BoxBody, BoxClient, LimitsLayer};
use tower_llm_limits::wire::error::{ErrorBody, ErrorKind};
use tower_llm_limits::BoxError;

/// The largest request body the gateway reads (the API's own limit).
const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// The most connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 1_024;

/// The time a request head (line and headers) has to arrive, counted from
/// the connection's start or the end of the previous answer.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The time a whole request body has to arrive once its head was read.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The upstream: the preset stack over a hyper-util client with rustls
/// (ring, webpki roots), speaking `https://` and, for local tests, `http://`.
#[derive(Clone)]
struct Anthropic {
    service: BoxClient,
    messages_uri: Uri,
    api_key: HeaderValue,
}

impl Anthropic {
    fn new(base_url: &str, api_key: &str, limits: LimitsLayer) -> Result<Self, BoxError> {
        let messages_uri: Uri =
            format!("{}/v1/messages", base_url.trim_end_matches('/')).parse()?;
        let mut api_key = HeaderValue::from_str(api_key)?;
        api_key.set_sensitive(true);
        let https: HttpsConnector<HttpConnector> = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let client: Client<_, BoxBody> = Client::builder(TokioExecutor::new()).build(https);
        Ok(Anthropic {
            service: limits.boxed(client),
            messages_uri,
            api_key,
        })
    }

    /// Sends a caller's body as it is, with the gateway's key; the answer
    /// streams back as it comes.
    async fn forward(&self, body: Bytes) -> Result<http::Response<BoxBody>, BoxError> {
        let req = Request::post(self.messages_uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("anthropic-version", "2023-06-01")
            .header("x-api-key", self.api_key.clone())
            .body(Full::new(body))?;
        self.service.clone().oneshot(req).await
    }
}

/// The gateway's router: `POST /v1/messages`, each caller's budget enforced,
/// forwarded through `upstream`. Returns the caller budget too, for its
/// snapshot.
fn router(upstream: Anthropic, caller_limits: Limits, callers: Callers) -> (Router, EnforceLayer) {
    let callers = EnforceLayer::new(caller_limits, callers);
    let router = Router::new()
        .route("/v1/messages", post(forward))
        .route_layer(callers.clone())
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(read_body_in_time))
        .with_state(upstream);
    (router, callers)
}

/// Reads the whole request body within [`BODY_READ_TIMEOUT`] (and at most
/// [`BODY_LIMIT`] bytes) before anything else sees it: a body that trickles
/// in is answered with 408, one too large with 413, in the API's error shape.
async fn read_body_in_time(req: AxumRequest, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, BODY_LIMIT).collect());
    let bytes = match read.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        // Too large: 413 `request_too_large`, as the API answers.
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error_response(&*e).map(Body::from);
        }
        Ok(Err(e)) => {
            let message = e.to_string();
            let answer = ErrorBody::new(ErrorKind::InvalidRequest, &message);
            return answer.into_response().map(Body::from);
        }
        Err(_) => {
            let answer = ErrorBody::new(
                ErrorKind::InvalidRequest,
                "request body not received in time",
            );
            let mut resp = answer
                .into_response_with(StatusCode::REQUEST_TIMEOUT)
                .map(Body::from);
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    next.run(AxumRequest::from_parts(parts, Body::from(bytes)))
        .await
}

/// Serves `app` on `listener` over HTTP/1.1 with the gateway's bounds: at
/// most `max_connections` connections at once (the next is accepted when
/// one closes), and a request head must arrive within `header_read_timeout`
/// (a connection that stalls before or between requests is closed).
async fn serve(
    listener: TcpListener,
    app: Router,
    max_connections: usize,
    header_read_timeout: Duration,
) -> Result<(), BoxError> {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let slot = Arc::clone(&slots).acquire_owned().await?;
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // A failed accept (a reset, too many open files) ends only itself.
            Err(_) => continue,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

/// The callers of `GATEWAY_CALLERS`: `name=key` pairs separated by commas.
fn callers_from(spec: &str) -> Result<Callers, BoxError> {
    let mut callers = Callers::new();
    for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, key) = pair
            .split_once('=')
            .ok_or("GATEWAY_CALLERS: name=key pairs, separated by commas")?;
        if name.is_empty() || key.is_empty() {
            return Err("GATEWAY_CALLERS: a caller needs a name and a key".into());
        }
        callers = callers.caller(name, key);
    }
    Ok(callers)
}

/// Sends the caller's body upstream as it is (the caller's key stays here:
/// the upstream client sets the gateway's own) and streams the answer back
/// with the headers an API client reads; the stack's errors (retries
/// exhausted, a delay too long, ...) are answered in the API's words.
async fn forward(State(upstream): State<Anthropic>, body: Bytes) -> Response {
    match upstream.forward(body).await {
        Ok(resp) => forward_response(resp).map(Body::new),
        Err(e) => error_response(&*e).map(Body::from),
    }
}

fn env_u64(name: &str, default: u64) -> Result<u64, BoxError> {
    match std::env::var(name) {
        Ok(v) => Ok(v
            .parse()
            .map_err(|_| format!("{name}: not a number: {v}"))?),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let key = std::env::var("ANTHROPIC_API_KEY")
        .map_err(|_| "set ANTHROPIC_API_KEY (the upstream key)")?;
    let base = std::env::var("UPSTREAM_URL").unwrap_or_else(|_| "https://api.anthropic.com".into());
    let addr = std::env::var("GATEWAY_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let limits = match std::env::var_os("ANTHROPIC_TIER").or(std::env::var_os("ANTHROPIC_LIMITS")) {
        Some(_) => LimitsLayer::from_env()?,
        None => LimitsLayer::anthropic(Tier::Tier1),
    };
    let caller = Limits::new()
        .rpm(env_u64("CALLER_RPM", 20)?)
        .itpm(env_u64("CALLER_ITPM", 10_000)?)
        .otpm(env_u64("CALLER_OTPM", 2_000)?);
    let callers = std::env::var("GATEWAY_CALLERS")
        .map_err(|_| "set GATEWAY_CALLERS (name=key pairs: the callers and their gateway keys)")?;
    let callers = callers_from(&callers)?;
    let upstream = Anthropic::new(&base, &key, limits)?;
    let (app, _callers) = router(upstream, caller, callers);
    let listener = TcpListener::bind(&addr).await?;
    println!("gateway on http://{} -> {base}", listener.local_addr()?);
    serve(listener, app, MAX_CONNECTIONS, HEADER_READ_TIMEOUT).await
}
