//! Helpers the integration tests share: an API on loopback (the emulator
//! crate), the preset stack over a real hyper-util client, and request
//! bodies.
//!
//! Each test file that needs them declares `mod support;`; not every file
//! uses every helper.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::BoxError;
use tower_llm_limits_emulator::{Emulator, Latency, Limits};

/// Serves `router` on a fresh loopback port (`127.0.0.1:0`) in a spawned
/// task and returns its address.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

/// A seeded emulator with `limits` that answers within a few milliseconds
/// (for tests on the real clock).
pub fn quick_emulator(limits: Limits) -> Emulator {
    Emulator::builder()
        .limits(limits)
        .latency(
            Latency::none()
                .with_time_to_first_token(Duration::from_millis(5))
                .with_per_output_token(Duration::from_micros(200)),
        )
        .seed(11)
        .build()
        .expect("emulator settings")
}

/// [`quick_emulator`] served on loopback.
pub async fn serve_emulator(limits: Limits) -> (Emulator, SocketAddr) {
    let emulator = quick_emulator(limits);
    let addr = serve(emulator.router()).await;
    (emulator, addr)
}

/// Requests the emulator admitted and refused with a 429, over all classes.
pub fn admitted_and_rate_limited(e: &Emulator) -> (u64, u64) {
    e.stats().classes.values().fold((0, 0), |(a, r), c| {
        (a + c.requests_admitted, r + c.rate_limited)
    })
}

/// Requests the emulator refused with a 429, over all classes.
pub fn rate_limited(e: &Emulator) -> u64 {
    admitted_and_rate_limited(e).1
}

/// A Messages request body for `prompt`.
pub fn message(model: &str, prompt: &str, max_tokens: u64, stream: bool) -> Value {
    json!({
        "model": model,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    })
}

/// `usage` of a JSON answer or an SSE stream: (input, output) tokens.
pub fn usage_of(body: &[u8]) -> Option<(u64, u64)> {
    tower_llm_limits::wire::usage_of(body).map(|u| (u.input_tokens, u.output_tokens))
}

/// The body type of [`PresetClient`]'s requests to hyper and its answers.
pub type ClientBody = UnsyncBoxBody<Bytes, BoxError>;

fn boxed<B>(body: B) -> ClientBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A Messages API client: the given preset stack over a plain-HTTP
/// hyper-util client, as a user builds one.
#[derive(Clone)]
pub struct PresetClient {
    service: BoxCloneSyncService<Request<Full<Bytes>>, Response<ClientBody>, BoxError>,
    messages_uri: Uri,
    api_key: HeaderValue,
}

impl PresetClient {
    /// A client of `http://{addr}/v1/messages` with `api_key`, paced by `limits`.
    pub fn new(addr: SocketAddr, api_key: &str, limits: LimitsLayer) -> Self {
        let hyper: Client<_, ClientBody> = Client::builder(TokioExecutor::new()).build_http();
        let service = ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(boxed))
            .layer(limits)
            .map_request(|r: Request<_>| r.map(boxed))
            .service(hyper);
        let mut api_key = HeaderValue::from_str(api_key).expect("api key");
        api_key.set_sensitive(true);
        PresetClient {
            service: BoxCloneSyncService::new(service),
            messages_uri: format!("http://{addr}/v1/messages").parse().expect("uri"),
            api_key,
        }
    }

    /// Sends a request body as it is; the answer streams as it comes.
    pub async fn forward(&self, body: Bytes) -> Result<Response<ClientBody>, BoxError> {
        let req = Request::post(self.messages_uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("anthropic-version", "2023-06-01")
            .header("x-api-key", self.api_key.clone())
            .body(Full::new(body))?;
        self.service.clone().oneshot(req).await
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(&self, body: &Value) -> Result<(StatusCode, Bytes), BoxError> {
        let resp = self.forward(Bytes::from(serde_json::to_vec(body)?)).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}

/// One plain (unpaced) `POST /v1/messages` to `addr` with `caller_key`:
/// the status, headers and whole body of the answer.
pub async fn post_message(
    addr: SocketAddr,
    caller_key: &str,
    body: &Value,
) -> (StatusCode, HeaderMap, Bytes) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{addr}/v1/messages"))
        .header("content-type", "application/json")
        .header("x-api-key", caller_key)
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("json"),
        )))
        .expect("request");
    let resp = client.request(req).await.expect("server answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}
