//! The crate's stack over a `reqwest::Client`: a Messages API client that
//! paces itself to its limits, stored as one type ([`BoxClient`]).
//!
//! ```text
//! ANTHROPIC_API_KEY=sk-ant-... cargo run --example reqwest_client --features reqwest -- "Say hi"
//! ```
//!
//! Environment:
//! - `ANTHROPIC_API_KEY` (required): sent as `x-api-key`, marked sensitive,
//!   never printed or logged;
//! - `ANTHROPIC_BASE_URL` (default `https://api.anthropic.com`): any
//!   API-compatible endpoint (the tests point it at the emulator on loopback);
//! - `ANTHROPIC_MODEL` (default `claude-sonnet-4-5`);
//! - `ANTHROPIC_TIER` (a published tier: `1` to `4`, `tier2`, `start`,
//!   `build`, `scale`) or `ANTHROPIC_LIMITS` (`rpm=50,itpm=30000,otpm=8000`);
//!   with neither, the limits are learned from the server's headers.
//!
//! The crate's `reqwest` feature chooses no TLS backend: this example's
//! reqwest (a dev-dependency with `rustls-no-provider`) speaks `https://`
//! with rustls over the `ring` provider, installed first in `main`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_llm_limits::preset::{BoxClient, LimitsLayer};
use tower_llm_limits::reqwest::ReqwestService;
use tower_llm_limits::BoxError;

/// A Messages API client: the preset stack over reqwest.
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
    /// A client of `base_url` with `api_key`, paced by `limits`, sending
    /// with `client` (its timeouts, TLS and pool).
    ///
    /// # Errors
    /// A base URL that does not parse, or a key that is not a header value.
    pub fn new(
        client: reqwest::Client,
        base_url: &str,
        api_key: &str,
        limits: LimitsLayer,
    ) -> Result<Self, BoxError> {
        let messages_uri: Uri =
            format!("{}/v1/messages", base_url.trim_end_matches('/')).parse()?;
        let mut api_key = HeaderValue::from_str(api_key)?;
        api_key.set_sensitive(true);
        Ok(Anthropic {
            service: limits.boxed(ReqwestService::new(client)),
            messages_uri,
            api_key,
            limits,
        })
    }

    /// A client configured from the environment (see the example's docs).
    ///
    /// # Errors
    /// `ANTHROPIC_API_KEY` unset, a bad URL, tier or limits.
    pub fn from_env() -> Result<Self, BoxError> {
        let key = std::env::var("ANTHROPIC_API_KEY")
            .map_err(|_| "set ANTHROPIC_API_KEY to your API key")?;
        let base = std::env::var("ANTHROPIC_BASE_URL")
            .unwrap_or_else(|_| "https://api.anthropic.com".to_string());
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .build()?;
        Self::new(client, &base, &key, LimitsLayer::from_env()?)
    }

    /// The stack's layers, for their snapshots.
    pub fn limits(&self) -> &LimitsLayer {
        &self.limits
    }

    /// Sends one Messages request and reads the whole answer (an SSE stream
    /// is read to its end as it arrives).
    ///
    /// # Errors
    /// What the stack returns (retries exhausted, a request too large for the
    /// limits, ...), a transport error, or a body that fails midway.
    pub async fn send(&self, body: &Value) -> Result<(StatusCode, Bytes), BoxError> {
        let request = Request::post(self.messages_uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("anthropic-version", "2023-06-01")
            .header("x-api-key", self.api_key.clone())
            .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
        let response = self.service.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
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
    // reqwest's rustls without a provider: use ring (already installed is fine).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Anthropic::from_env()?;
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Say hello in five languages, one line each.".to_string());
    let model =
        std::env::var("ANTHROPIC_MODEL").unwrap_or_else(|_| "claude-sonnet-4-5".to_string());
    let mut tasks = Vec::new();
    for i in 0..4 {
        let client = client.clone();
        let body = message(&model, &prompt, 256, i % 2 == 1);
        tasks.push(tokio::spawn(async move { (i, client.send(&body).await) }));
    }
    for task in tasks {
        match task.await? {
            (i, Ok((status, body))) => match tower_llm_limits::wire::usage_of(&body) {
                Some(u) => println!(
                    "request {i}: {status}, {} input tokens, {} output tokens",
                    u.input_tokens, u.output_tokens
                ),
                None => println!("request {i}: {status}: {}", String::from_utf8_lossy(&body)),
            },
            (i, Err(e)) => println!("request {i}: failed: {e}"),
        }
    }
    let retry = client.limits().retry().snapshot();
    println!(
        "retries: {}; budget: {} admitted",
        retry.retries,
        client.limits().budget().snapshot().admitted
    );
    Ok(())
}
