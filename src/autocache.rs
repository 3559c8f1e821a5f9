//! `AutoCacheLayer`: `cache_control` breakpoints on the prefixes that repeat.
//!
//! The Messages API caches a prompt prefix only up to a `cache_control`
//! breakpoint the request places. A client that places none pays every
//! turn's whole history as uncached input, charged in full to the
//! input-tokens-per-minute limit; cache reads are not charged to it (for
//! most models) and cost a tenth of the input price.
//!
//! The layer adds breakpoints to a request that has none, in the API's
//! cache order:
//!
//! 1. on the last tool definition,
//! 2. at the end of the system prompt,
//! 3. on the last two user turns of the conversation (the last one writes
//!    the prefix the next turn reads; the one before reads what the previous
//!    turn wrote).
//!
//! Rules:
//!
//! - a breakpoint goes in only where the prefix up to it holds at least the
//!   model's minimum cacheable length ([`min_cacheable_tokens`]: 4,096
//!   tokens for Claude Opus 4.5 and Haiku 4.5, 2,048 for Haiku 3.5 and 3,
//!   1,024 for the others); the prefix is counted at four bytes of JSON per
//!   token, on the low side, so that a breakpoint is not wasted;
//! - never more than 4 per request (the API's limit);
//! - a request that already carries a breakpoint, one with the [`NoAutoCache`]
//!   extension, or one whose body is not a JSON object is never altered (its
//!   bytes are sent as they came);
//! - the rewrite is stable: the same request gives the same bytes out (JSON
//!   objects are written with their keys in a fixed order), so that the
//!   prefix of one turn is the prefix of the next;
//! - the breakpoints' time to live is 5 minutes, or 1 hour with
//!   [`CacheTtl::OneHour`].
//!
//! # Cost
//!
//! A cache write costs more than plain input (1.25 times the input price
//! with the 5-minute time to live, 2 times with 1 hour), a read 0.1 times.
//! [`AutoCacheSnapshot`] counts, over the requests the layer rewrote, the
//! tokens written and read as the responses' `usage` reported them, and the
//! estimated cost difference in input-token units
//! ([`AutoCacheSnapshot::cost_delta_tokens`]: negative is a saving).
//!
//! # Order with the budget
//!
//! Put the layer outside the token budget, so that the budget (and its
//! estimator's prompt-cache tracking) sees the breakpoints the layer adds and
//! charges cache reads as reads:
//!
//! ```
//! use tower_llm_limits::autocache::AutoCacheLayer;
//! use tower_llm_limits::budget::Tier;
//! use tower_llm_limits::preset::LimitsLayer;
//!
//! let cache = AutoCacheLayer::new();
//! let stack = tower::ServiceBuilder::new()
//!     .layer(cache.clone()) // outermost: rewrites once, before the budget estimates
//!     .layer(LimitsLayer::anthropic(Tier::Tier1));
//! # let _ = stack;
//! assert_eq!(cache.snapshot().rewritten, 0);
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use serde_json::{Map, Value};
use tower_layer::Layer;
use tower_service::Service;

use crate::rewrite::{read_body, with_body, DEFAULT_BODY_LIMIT};

/// The body of an [`AutoCache`] answer: the inner body, passed through
/// unchanged, whose `usage` is read as it passes (for [`AutoCacheSnapshot`]).
pub use crate::rewrite::UsageBody as AutoCacheBody;
use crate::wire::Usage;
use crate::BoxError;

/// The API's limit on cache breakpoints per request.
pub const MAX_BREAKPOINTS: usize = 4;

/// Bytes of JSON counted as one token when the layer sizes a prefix (low on
/// purpose: English text runs about 3.5 characters per token).
const BYTES_PER_TOKEN: usize = 4;

/// The minimum cacheable prompt length of a model, in tokens: 4,096 for
/// Claude Opus 4.5 and Haiku 4.5, 2,048 for Claude Haiku 3.5 and 3, 1,024
/// for the others (Opus 4.1 and 4, Sonnet 4.5, 4 and 3.7). A shorter prefix
/// is not cached even with a breakpoint.
///
/// ```
/// use tower_llm_limits::autocache::min_cacheable_tokens;
///
/// assert_eq!(min_cacheable_tokens("claude-sonnet-4-5"), 1_024);
/// assert_eq!(min_cacheable_tokens("claude-3-5-haiku-latest"), 2_048);
/// assert_eq!(min_cacheable_tokens("claude-haiku-4-5-20251001"), 4_096);
/// ```
pub fn min_cacheable_tokens(model: &str) -> u64 {
    let m = model.to_ascii_lowercase();
    if m.contains("opus-4-5") || m.contains("haiku-4-5") {
        4_096
    } else if m.contains("3-5-haiku") || m.contains("3-haiku") || m.contains("haiku-3") {
        2_048
    } else {
        1_024
    }
}

/// The time to live of the breakpoints the layer adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheTtl {
    /// Five minutes (the API's default; a write costs 1.25 times the input price).
    #[default]
    FiveMinutes,
    /// One hour (`"ttl": "1h"`; a write costs 2 times the input price).
    OneHour,
}

impl CacheTtl {
    fn control(self) -> Value {
        let mut control = Map::new();
        control.insert("type".into(), Value::from("ephemeral"));
        if self == CacheTtl::OneHour {
            control.insert("ttl".into(), Value::from("1h"));
        }
        Value::Object(control)
    }
}

/// A request extension: the layer leaves this request as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoAutoCache;

/// What the layer did, and what the rewritten requests' responses reported.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AutoCacheSnapshot {
    /// Requests seen.
    pub requests: u64,
    /// Requests the layer added breakpoints to.
    pub rewritten: u64,
    /// Breakpoints added.
    pub breakpoints: u64,
    /// Requests left alone because they carried breakpoints already.
    pub had_breakpoints: u64,
    /// Requests left alone because of [`NoAutoCache`].
    pub opted_out: u64,
    /// Tokens the rewritten requests wrote to the cache (5-minute TTL).
    pub write_5m_tokens: u64,
    /// Tokens the rewritten requests wrote to the cache (1-hour TTL).
    pub write_1h_tokens: u64,
    /// Tokens the rewritten requests read from the cache.
    pub read_tokens: u64,
    /// Uncached input tokens of the rewritten requests.
    pub uncached_tokens: u64,
}

impl AutoCacheSnapshot {
    /// The estimated cost difference of the breakpoints, in input-token
    /// units: what the writes cost above plain input (0.25 per 5-minute
    /// token, 1 per 1-hour token) minus what the reads saved (0.9 per
    /// token). Negative is a saving.
    pub fn cost_delta_tokens(&self) -> f64 {
        self.write_5m_tokens as f64 * 0.25 + self.write_1h_tokens as f64
            - self.read_tokens as f64 * 0.9
    }
}

#[derive(Debug)]
struct Shared {
    ttl: CacheTtl,
    body_limit: usize,
    min_tokens: Option<u64>,
    snapshot: Mutex<AutoCacheSnapshot>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, AutoCacheSnapshot> {
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Adds `cache_control` breakpoints to requests that have none (see the
/// [module docs](self)). Clones share one [`AutoCacheSnapshot`].
#[derive(Debug, Clone)]
pub struct AutoCacheLayer {
    shared: Arc<Shared>,
}

impl Default for AutoCacheLayer {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl AutoCacheLayer {
    /// The layer with 5-minute breakpoints and each model's minimum.
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder.
    pub fn builder() -> AutoCacheBuilder {
        AutoCacheBuilder {
            ttl: CacheTtl::FiveMinutes,
            body_limit: DEFAULT_BODY_LIMIT,
            min_tokens: None,
        }
    }

    /// What the layer did so far.
    pub fn snapshot(&self) -> AutoCacheSnapshot {
        *self.shared.lock()
    }
}

/// Builds an [`AutoCacheLayer`].
#[derive(Debug, Clone)]
pub struct AutoCacheBuilder {
    ttl: CacheTtl,
    body_limit: usize,
    min_tokens: Option<u64>,
}

impl AutoCacheBuilder {
    /// The breakpoints' time to live (5 minutes by default).
    pub fn ttl(mut self, ttl: CacheTtl) -> Self {
        self.ttl = ttl;
        self
    }

    /// One minimum cacheable length for every model, instead of each model's
    /// ([`min_cacheable_tokens`]).
    pub fn min_tokens(mut self, tokens: u64) -> Self {
        self.min_tokens = Some(tokens);
        self
    }

    /// The largest body rewritten (16 MiB by default); a larger one fails
    /// with [`Error::Body`](crate::Error::Body), unsent.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The layer.
    pub fn build(self) -> AutoCacheLayer {
        AutoCacheLayer {
            shared: Arc::new(Shared {
                ttl: self.ttl,
                body_limit: self.body_limit,
                min_tokens: self.min_tokens,
                snapshot: Mutex::new(AutoCacheSnapshot::default()),
            }),
        }
    }
}

impl<S> Layer<S> for AutoCacheLayer {
    type Service = AutoCache<S>;

    fn layer(&self, inner: S) -> AutoCache<S> {
        AutoCache {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`AutoCacheLayer`].
#[derive(Debug, Clone)]
pub struct AutoCache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, R> Service<Request<B>> for AutoCache<S>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<AutoCacheBody<R>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = read_body(body, shared.body_limit).await?;
            let opted_out = parts.extensions.get::<NoAutoCache>().is_some();
            let (bytes, added) = rewrite_counted(&shared, bytes, opted_out);
            let response = inner
                .call(with_body(parts, bytes))
                .await
                .map_err(Into::into)?;
            let on_usage = (added > 0).then(|| {
                let shared = shared.clone();
                Box::new(move |usage: Usage| record_usage(&shared, &usage)) as _
            });
            Ok(response.map(|body| AutoCacheBody::new(body, on_usage)))
        })
    }
}

fn record_usage(shared: &Shared, usage: &Usage) {
    let mut s = shared.lock();
    match usage.cache_creation {
        Some(split) => {
            s.write_5m_tokens += split.ephemeral_5m_input_tokens;
            s.write_1h_tokens += split.ephemeral_1h_input_tokens;
        }
        None if shared.ttl == CacheTtl::OneHour => {
            s.write_1h_tokens += usage.cache_creation_input_tokens;
        }
        None => s.write_5m_tokens += usage.cache_creation_input_tokens,
    }
    s.read_tokens += usage.cache_read_input_tokens;
    s.uncached_tokens += usage.input_tokens;
}

/// Rewrites a body and counts what was done: the bytes to send and the
/// breakpoints added.
fn rewrite_counted(shared: &Shared, bytes: Bytes, opted_out: bool) -> (Bytes, usize) {
    let outcome = if opted_out {
        Outcome::OptedOut
    } else {
        rewrite(&bytes, shared.ttl, shared.min_tokens)
    };
    let mut s = shared.lock();
    s.requests += 1;
    match outcome {
        Outcome::Rewritten(out, added) => {
            s.rewritten += 1;
            s.breakpoints += added as u64;
            (out, added)
        }
        Outcome::HadBreakpoints => {
            s.had_breakpoints += 1;
            (bytes, 0)
        }
        Outcome::OptedOut => {
            s.opted_out += 1;
            (bytes, 0)
        }
        Outcome::Unchanged => (bytes, 0),
    }
}

/// What [`rewrite`] did with a body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// New bytes, with this many breakpoints added.
    Rewritten(Bytes, usize),
    /// The request carried breakpoints already.
    HadBreakpoints,
    /// The request asked to be left alone.
    OptedOut,
    /// Not a JSON object, or no prefix long enough.
    Unchanged,
}

/// Adds breakpoints to a Messages request body that has none.
fn rewrite(body: &[u8], ttl: CacheTtl, min_tokens: Option<u64>) -> Outcome {
    let Ok(Value::Object(mut request)) = serde_json::from_slice::<Value>(body) else {
        return Outcome::Unchanged;
    };
    let prompt = ["tools", "system", "messages"];
    if prompt
        .iter()
        .any(|k| request.get(*k).is_some_and(has_breakpoint))
    {
        return Outcome::HadBreakpoints;
    }
    let model = request.get("model").and_then(Value::as_str).unwrap_or("");
    let min = min_tokens.unwrap_or_else(|| min_cacheable_tokens(model));
    let added = add_breakpoints(&mut request, min, &ttl.control());
    if added == 0 {
        return Outcome::Unchanged;
    }
    match serde_json::to_vec(&Value::Object(request)) {
        Ok(out) => Outcome::Rewritten(Bytes::from(out), added),
        Err(_) => Outcome::Unchanged,
    }
}

/// Whether any object under `value` has a `cache_control` key.
fn has_breakpoint(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.contains_key("cache_control") || map.values().any(has_breakpoint),
        Value::Array(items) => items.iter().any(has_breakpoint),
        _ => false,
    }
}

/// The approximate tokens of a JSON value (four bytes a token, rounded down).
fn approx_tokens(value: &Value) -> u64 {
    (value.to_string().len() / BYTES_PER_TOKEN) as u64
}

/// Walks the prompt in cache order (tools, system, messages), adding a
/// breakpoint at each candidate whose prefix holds at least `min` tokens.
fn add_breakpoints(request: &mut Map<String, Value>, min: u64, control: &Value) -> usize {
    let mut prefix = 0u64;
    let mut added = 0usize;
    if let Some(Value::Array(tools)) = request.get_mut("tools") {
        prefix += tools.iter().map(approx_tokens).sum::<u64>();
        if prefix >= min {
            if let Some(Value::Object(last)) = tools.last_mut() {
                last.insert("cache_control".into(), control.clone());
                added += 1;
            }
        }
    }
    if let Some(system) = request.get_mut("system") {
        prefix += approx_tokens(system);
        if prefix >= min && mark_content(system, control) {
            added += 1;
        }
    }
    let Some(Value::Array(messages)) = request.get_mut("messages") else {
        return added;
    };
    let users: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|(i, _)| i)
        .collect();
    let targets = &users[users.len().saturating_sub(2)..];
    for (i, message) in messages.iter_mut().enumerate() {
        if added >= MAX_BREAKPOINTS {
            break;
        }
        prefix += message.get("content").map_or(0, approx_tokens);
        if targets.contains(&i) && prefix >= min {
            if let Some(content) = message.get_mut("content") {
                if mark_content(content, control) {
                    added += 1;
                }
            }
        }
    }
    added
}

/// Puts a breakpoint on the last block of a content (a string becomes one
/// text block): false when there is no block to mark.
fn mark_content(content: &mut Value, control: &Value) -> bool {
    match content {
        Value::String(text) => {
            let mut block = Map::new();
            block.insert("type".into(), Value::from("text"));
            block.insert("text".into(), Value::from(std::mem::take(text)));
            block.insert("cache_control".into(), control.clone());
            *content = Value::Array(vec![Value::Object(block)]);
            true
        }
        Value::Array(blocks) => match blocks.last_mut() {
            Some(Value::Object(last)) => {
                last.insert("cache_control".into(), control.clone());
                true
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(turns: usize, words: usize) -> Value {
        let text = "lorem ipsum dolor ".repeat(words);
        let mut messages = Vec::new();
        for t in 0..turns {
            messages.push(serde_json::json!({"role": "user", "content": format!("{t} {text}")}));
            if t + 1 < turns {
                messages.push(serde_json::json!({"role": "assistant", "content": "ok"}));
            }
        }
        serde_json::json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "system": text,
            "tools": [{"name": "a", "input_schema": {"type": "object"}}, {"name": "b", "input_schema": {"type": "object"}}],
            "messages": messages,
        })
    }

    fn count(bytes: &[u8]) -> usize {
        memchr::memmem::find_iter(bytes, b"\"cache_control\"").count()
    }

    #[test]
    fn long_prefixes_get_breakpoints_at_most_four_and_stable() {
        let body = serde_json::to_vec(&conversation(4, 400)).expect("json");
        let Outcome::Rewritten(out, added) = rewrite(&body, CacheTtl::FiveMinutes, None) else {
            panic!("not rewritten");
        };
        // system + the last two user turns: the tools alone are too short.
        assert_eq!(added, 3);
        assert_eq!(count(&out), 3);
        // Same input, same bytes.
        assert_eq!(
            rewrite(&body, CacheTtl::FiveMinutes, None),
            Outcome::Rewritten(out.clone(), 3)
        );
        // Every candidate long enough: tools, system and two user turns = 4.
        let Outcome::Rewritten(out, added) = rewrite(&body, CacheTtl::FiveMinutes, Some(0)) else {
            panic!("not rewritten");
        };
        assert_eq!((added, count(&out)), (4, 4));
    }

    #[test]
    fn the_prefix_of_one_turn_is_the_prefix_of_the_next() {
        let first = serde_json::to_vec(&conversation(3, 400)).expect("json");
        let second = serde_json::to_vec(&conversation(4, 400)).expect("json");
        let (Outcome::Rewritten(a, _), Outcome::Rewritten(b, _)) = (
            rewrite(&first, CacheTtl::FiveMinutes, None),
            rewrite(&second, CacheTtl::FiveMinutes, None),
        ) else {
            panic!("not rewritten");
        };
        let a: Value = serde_json::from_slice(&a).expect("json");
        let b: Value = serde_json::from_slice(&b).expect("json");
        // Turn 3's last user message (index 4) carries the same breakpoint in
        // turn 4, where it is the user turn before the last.
        assert_eq!(a["messages"][4], b["messages"][4]);
        assert!(b["messages"][6]["content"][0]["cache_control"].is_object());
    }

    #[test]
    fn short_prefixes_marked_requests_and_non_json_are_left_alone() {
        let short = serde_json::to_vec(&conversation(2, 3)).expect("json");
        assert_eq!(
            rewrite(&short, CacheTtl::FiveMinutes, None),
            Outcome::Unchanged
        );
        let mut marked = conversation(4, 400);
        marked["messages"][0]["content"] =
            serde_json::json!([{"type":"text","text":"x","cache_control":{"type":"ephemeral"}}]);
        let marked = serde_json::to_vec(&marked).expect("json");
        assert_eq!(
            rewrite(&marked, CacheTtl::FiveMinutes, None),
            Outcome::HadBreakpoints
        );
        assert_eq!(
            rewrite(b"not json", CacheTtl::FiveMinutes, None),
            Outcome::Unchanged
        );
        // Haiku 4.5 needs 4,096 tokens: ~2,700 are not enough (Sonnet's
        // 1,024 are).
        let mut haiku = conversation(2, 200);
        let sonnet = serde_json::to_vec(&haiku).expect("json");
        assert!(matches!(
            rewrite(&sonnet, CacheTtl::FiveMinutes, None),
            Outcome::Rewritten(..)
        ));
        haiku["model"] = Value::from("claude-haiku-4-5");
        haiku.as_object_mut().map(|m| m.remove("tools"));
        let haiku = serde_json::to_vec(&haiku).expect("json");
        assert_eq!(
            rewrite(&haiku, CacheTtl::FiveMinutes, None),
            Outcome::Unchanged
        );
    }

    #[test]
    fn one_hour_ttl_is_written() {
        let body = serde_json::to_vec(&conversation(2, 400)).expect("json");
        let Outcome::Rewritten(out, _) = rewrite(&body, CacheTtl::OneHour, None) else {
            panic!("not rewritten");
        };
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["messages"][2]["content"][0]["cache_control"]["ttl"], "1h");
    }
}
