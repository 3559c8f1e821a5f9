//! An axum gateway in front of many internal callers.
//!
//! ```text
//! ANTHROPIC_API_KEY=sk-ant-... cargo run --example axum_gateway
//! # then, from any client or official SDK, with the caller's own key:
//! curl -s localhost:8080/v1/messages -H 'x-api-key: team-a' -H 'content-type: application/json' \
//!   -d '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}'
//! ```
//!
//! Two budgets, two jobs:
//! - **per caller, enforced** (server side): [`TokenBudgetLayer::enforce`]
//!   on the route gives every caller (told apart by a hash of its
//!   `x-api-key`, which is never logged or echoed) its own RPM / ITPM / OTPM.
//!   A caller over budget is answered at once with an Anthropic-shaped 429
//!   (`retry-after`, `anthropic-ratelimit-*` headers, the error JSON), so the
//!   official SDKs back off correctly; admitted answers carry the caller's
//!   `anthropic-ratelimit-*` headers.
//! - **for the organisation, paced** (client side): the upstream client is
//!   the crate's preset stack (retry -> budget -> concurrency) over a
//!   hyper-util client, so all callers together stay under the key's limits.
//!
//! Environment: `ANTHROPIC_API_KEY` (the upstream key, required),
//! `UPSTREAM_URL` (default `https://api.anthropic.com`), `GATEWAY_ADDR`
//! (default `127.0.0.1:8080`), `ANTHROPIC_TIER` (the upstream's tier, `1` to
//! `4`, default `1`), `CALLER_RPM` / `CALLER_ITPM` / `CALLER_OTPM` (each
//! caller's limits, default 20 / 10,000 / 2,000).

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_limits::budget::{Limits, Tier, TokenBudgetLayer};
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::{BoxError, Error};

/// The largest request body the gateway reads (the API's own limit).
const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// The body the upstream hyper client sends and the stack answers with.
type ClientBody = UnsyncBoxBody<Bytes, BoxError>;

fn boxed<B>(body: B) -> ClientBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// The upstream: the preset stack over a hyper-util client with rustls
/// (ring, webpki roots), speaking `https://` and, for local tests, `http://`.
#[derive(Clone)]
struct Anthropic {
    service: BoxCloneSyncService<Request<Full<Bytes>>, http::Response<ClientBody>, BoxError>,
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
        let client: Client<_, ClientBody> = Client::builder(TokioExecutor::new()).build(https);
        let service = ServiceBuilder::new()
            .map_response(|r: http::Response<_>| r.map(boxed))
            .layer(limits)
            .map_request(|r: Request<_>| r.map(boxed))
            .service(client);
        Ok(Anthropic {
            service: BoxCloneSyncService::new(service),
            messages_uri,
            api_key,
        })
    }

    /// Sends a caller's body as it is, with the gateway's key; the answer
    /// streams back as it comes.
    async fn forward(&self, body: Bytes) -> Result<http::Response<ClientBody>, BoxError> {
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
fn router(upstream: Anthropic, caller_limits: Limits) -> (Router, TokenBudgetLayer) {
    let callers = TokenBudgetLayer::enforce(caller_limits);
    let router = Router::new()
        .route("/v1/messages", post(forward))
        .route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(handle_error))
                .layer(callers.clone()),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(upstream);
    (router, callers)
}

/// Sends the caller's body upstream as it is (the caller's key stays here:
/// the upstream client sets the gateway's own) and streams the answer back.
async fn forward(State(upstream): State<Anthropic>, body: Bytes) -> Response {
    match upstream.forward(body).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let mut out = Response::new(Body::new(body));
            *out.status_mut() = parts.status;
            for name in [
                "content-type",
                "request-id",
                "retry-after",
                "x-should-retry",
            ] {
                if let Some(v) = parts.headers.get(name) {
                    out.headers_mut().insert(name, v.clone());
                }
            }
            out
        }
        Err(e) => upstream_error(&*e),
    }
}

/// The errors of the upstream stack, said to the caller in the API's words.
fn upstream_error(e: &(dyn std::error::Error + Send + Sync + 'static)) -> Response {
    let (status, kind, retry_after) = match e.downcast_ref::<Error>() {
        Some(Error::RetryAfterTooLong { delay, .. }) => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some(delay.as_secs().max(1)),
        ),
        Some(Error::BudgetExceeded { retry_in, .. }) => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some(retry_in.as_secs().max(1)),
        ),
        Some(Error::RequestTooLarge { .. }) => {
            (StatusCode::BAD_REQUEST, "invalid_request_error", None)
        }
        Some(Error::Overloaded { .. }) => (
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            None,
        ),
        _ => (StatusCode::BAD_GATEWAY, "api_error", None),
    };
    let body = json!({
        "type": "error",
        "error": {"type": kind, "message": format!("upstream: {e}")},
    });
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(secs) = retry_after {
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
    }
    resp
}

/// Errors of the caller budget itself (its body could not be read).
async fn handle_error(e: BoxError) -> Response {
    let body = json!({
        "type": "error",
        "error": {"type": "invalid_request_error", "message": e.to_string()},
    });
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
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
    let tier = match std::env::var("ANTHROPIC_TIER").as_deref() {
        Err(_) | Ok("1") => Tier::Tier1,
        Ok("2") => Tier::Tier2,
        Ok("3") => Tier::Tier3,
        Ok("4") => Tier::Tier4,
        Ok(other) => return Err(format!("ANTHROPIC_TIER: 1 to 4, not {other}").into()),
    };
    let caller = Limits::new()
        .rpm(env_u64("CALLER_RPM", 20)?)
        .itpm(env_u64("CALLER_ITPM", 10_000)?)
        .otpm(env_u64("CALLER_OTPM", 2_000)?);
    let upstream = Anthropic::new(&base, &key, LimitsLayer::anthropic(tier))?;
    let (app, _callers) = router(upstream, caller);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("gateway on http://{} -> {base}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
