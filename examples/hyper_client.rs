//! The crate's stack over a hyper-util client with a rustls HTTPS connector:
//! a Messages API client that paces itself to its limits.
//!
//! ```text
//! ANTHROPIC_API_KEY=sk-ant-... cargo run --example hyper_client -- "Say hi in five languages"
//! ```
//!
//! Environment:
//! - `ANTHROPIC_API_KEY` (required): sent as `x-api-key`, marked sensitive,
//!   never printed or logged;
//! - `ANTHROPIC_BASE_URL` (default `https://api.anthropic.com`): any
//!   API-compatible endpoint, `http://` or `https://` (the tests point it at
//!   the `tower-llm-limits-emulator` server on loopback);
//! - `ANTHROPIC_MODEL` (default `claude-sonnet-4-5`);
//! - `ANTHROPIC_TIER` (a published tier: `1` to `4`, `tier2`, `start`,
//!   `build`, `scale`; default `1`) or `ANTHROPIC_LIMITS`
//!   (`rpm=50,itpm=30000,otpm=8000`): the limits to pace to.
//!
//! It sends the prompt five times at once, streamed and not, and prints each
//! answer's status and usage, then what the budget and the concurrency layer
//! saw. HTTPS is rustls with the `ring` provider and the webpki roots, so
//! nothing beyond the Rust toolchain and a C compiler is needed to build it.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_llm_limits::budget::Tier;
use tower_llm_limits::preset::{BoxBody, BoxClient, LimitsLayer};
use tower_llm_limits::BoxError;

/// A hyper-util client over rustls (ring, webpki roots), HTTP/1.1, speaking
/// `https://` and, for tests and local gateways, `http://`.
pub fn https_client() -> Client<HttpsConnector<HttpConnector>, BoxBody> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https)
}

/// A Messages API client: the preset stack over [`https_client`].
#[derive(Clone)]
pub struct Anthropic {
    service: BoxClient,
    messages_uri: Uri,
    api_key: HeaderValue,
    limits: LimitsLayer,
}

impl std::fmt::Debug for Anthropic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is never printed.
        f.debug_struct("Anthropic")
            .field("messages_uri", &self.messages_uri)
            .finish_non_exhaustive()
    }
}

impl Anthropic {
    /// A client of `base_url` (e.g. `https://api.anthropic.com`) with
    /// `api_key`, paced by `limits` (e.g. `LimitsLayer::anthropic(Tier::Tier1)`).
    ///
    /// # Errors
    /// A base URL that does not parse, or a key that is not a header value.
    pub fn new(base_url: &str, api_key: &str, limits: LimitsLayer) -> Result<Self, BoxError> {
        let messages_uri: Uri =
            format!("{}/v1/messages", base_url.trim_end_matches('/')).parse()?;
        let mut api_key = HeaderValue::from_str(api_key)?;
        api_key.set_sensitive(true);
        Ok(Anthropic {
            service: limits.boxed(https_client()),
            messages_uri,
            api_key,
            limits,
        })
    }

    /// The stack's layers, for their snapshots.
    pub fn limits(&self) -> &LimitsLayer {
        &self.limits
    }

    /// A client configured from the environment (see the example's docs).
    ///
    /// # Errors
    /// `ANTHROPIC_API_KEY` unset, or a bad URL, tier or limits.
    pub fn from_env() -> Result<Self, BoxError> {
        let key = std::env::var("ANTHROPIC_API_KEY")
            .map_err(|_| "set ANTHROPIC_API_KEY to your API key")?;
        let base = std::env::var("ANTHROPIC_BASE_URL")
            .unwrap_or_else(|_| "https://api.anthropic.com".to_string());
        let limits =
            match std::env::var_os("ANTHROPIC_TIER").or(std::env::var_os("ANTHROPIC_LIMITS")) {
                Some(_) => LimitsLayer::from_env()?,
                None => LimitsLayer::anthropic(Tier::Tier1),
            };
        Self::new(&base, &key, limits)
    }

    /// Sends a Messages request body as it is and returns the answer as it
    /// comes (an SSE stream is passed on as it arrives).
    ///
    /// # Errors
    /// What the stack returns (retries exhausted, a request too large for the
    /// limits, ...) or a transport error.
    pub async fn forward(&self, body: Bytes) -> Result<Response<BoxBody>, BoxError> {
        let req = Request::post(self.messages_uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("anthropic-version", "2023-06-01")
            .header("x-api-key", self.api_key.clone())
            .body(Full::new(body))?;
        self.service.clone().oneshot(req).await
    }

    /// Sends one Messages request and reads the whole answer (an SSE stream
    /// is read to its end).
    ///
    /// # Errors
    /// As [`forward`](Self::forward), and a body that fails midway.
    pub async fn send(&self, body: &Value) -> Result<(StatusCode, Bytes), BoxError> {
        let resp = self.forward(Bytes::from(serde_json::to_vec(body)?)).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}

/// `usage` from a JSON answer, or from an SSE stream's `message_start` and
/// `message_delta` events: (input, output) tokens.
pub fn usage_of(body: &[u8]) -> Option<(u64, u64)> {
    tower_llm_limits::wire::usage_of(body).map(|u| (u.input_tokens, u.output_tokens))
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

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let client = Anthropic::from_env()?;
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Say hello in five languages, one line each.".to_string());
    let model =
        std::env::var("ANTHROPIC_MODEL").unwrap_or_else(|_| "claude-sonnet-4-5".to_string());
    let mut tasks = Vec::new();
    for i in 0..5 {
        let client = client.clone();
        let body = message(&model, &prompt, 256, i % 2 == 1);
        tasks.push(tokio::spawn(async move { (i, client.send(&body).await) }));
    }
    for t in tasks {
        match t.await? {
            (i, Ok((status, body))) => match usage_of(&body) {
                Some((input, output)) => {
                    println!("request {i}: {status}, {input} input tokens, {output} output tokens")
                }
                None => println!("request {i}: {status}: {}", String::from_utf8_lossy(&body)),
            },
            (i, Err(e)) => println!("request {i}: failed: {e}"),
        }
    }
    let retry = client.limits().retry().snapshot();
    let concurrency = client.limits().concurrency().snapshot();
    println!(
        "retries: {}; concurrency limit now {} ({} in flight)",
        retry.retries, concurrency.limit, concurrency.in_flight
    );
    for key in &client.limits().budget().snapshot().keys {
        let remaining: Vec<String> = key
            .dimensions
            .iter()
            .map(|d| match (d.remaining, d.limit) {
                (Some(r), Some(l)) => format!("{}: {r:.0} of {l} left", d.dimension),
                _ => format!("{}: not limited yet", d.dimension),
            })
            .collect();
        println!("budget {}: {}", key.key, remaining.join("; "));
    }
    Ok(())
}
