//! `ContextGuardLayer`: see, and optionally bound, the context each request
//! resends.
//!
//! A conversation with the Messages API resends its whole history on every
//! turn, so its input grows turn by turn (an agent loop that keeps every
//! tool result grows fastest). The layer estimates each request's input
//! tokens (cached and uncached) before it is sent and keeps, per
//! conversation, what each turn resent and how that grows
//! ([`ConversationStats`]). A conversation is named by a
//! [`ConversationId`] extension on the request, or else by a hash of its
//! system prompt and first message (every turn of a conversation resends
//! the same beginning).
//!
//! With a [cap](ContextGuardBuilder::cap), a request that would resend more
//! input tokens than the cap is refused before it is sent, with
//! [`Error::ContextTooLarge`]: never after a 429 and never silently
//! truncated. A [trim callback](ContextGuardBuilder::trim) gets the request
//! as JSON first and may shorten it (for example by dropping old tool
//! results); the layer estimates again what the callback returns, sends it
//! if it fits, and counts the tokens saved.
//!
//! # Examples
//!
//! ```
//! use serde_json::Value;
//! use tower_llm_limits::context::ContextGuardLayer;
//!
//! // Refuse requests above 150,000 input tokens, after dropping the oldest
//! // turns while the conversation is too long.
//! let guard = ContextGuardLayer::builder()
//!     .cap(150_000)
//!     .trim(|request: &mut Value, _over| {
//!         if let Some(messages) = request.get_mut("messages").and_then(Value::as_array_mut) {
//!             if messages.len() > 3 {
//!                 messages.drain(1..3); // keep the first turn and the recent ones
//!             }
//!         }
//!     })
//!     .build();
//! let stack = tower::ServiceBuilder::new().layer(guard.clone());
//! # let _ = stack;
//! assert_eq!(guard.snapshot().refused, 0);
//! ```
//!
//! Put it outside the budget layer (`ServiceBuilder::new().layer(guard).layer(limits)`):
//! a refused request is then never charged, and a trimmed one is charged for
//! what is really sent.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::Body;
use serde_json::Value;
use tower_layer::Layer;
use tower_service::Service;

use crate::estimate::{AnthropicEstimator, TokenEstimator};
use crate::rewrite::{read_body, with_body, DEFAULT_BODY_LIMIT};
use crate::{BoxError, Error};

/// Names the conversation a request belongs to (a request extension). Without
/// it, a conversation is named by a hash of its system prompt and first message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConversationId(pub String);

/// What the trim callback is told about the request it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Over {
    /// The request's estimated input tokens.
    pub tokens: u64,
    /// The cap it is above.
    pub cap: u64,
}

type TrimFn = dyn Fn(&mut Value, Over) + Send + Sync;

/// What one conversation resent so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConversationStats {
    /// Requests sent.
    pub turns: u64,
    /// Estimated input tokens of the first request sent.
    pub first_tokens: u64,
    /// Estimated input tokens of the last request sent.
    pub last_tokens: u64,
    /// The most any request of it resent.
    pub max_tokens: u64,
    /// Estimated input tokens of all its requests together: the context
    /// resent, turn after turn.
    pub total_tokens: u64,
    /// Growth of the last request over the one before (negative after a trim).
    pub last_growth: i64,
    /// Requests the trim callback shortened.
    pub trimmed: u64,
    /// Input tokens the trim callback removed, over all its requests.
    pub tokens_saved: u64,
    /// Requests refused by the cap.
    pub refused: u64,
}

/// Every conversation's [`ConversationStats`], and the totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextSnapshot {
    /// Per conversation, by name (a [`ConversationId`] or `hash-<16 hex digits>`).
    pub conversations: Vec<(String, ConversationStats)>,
    /// Requests sent.
    pub sent: u64,
    /// Requests refused by the cap.
    pub refused: u64,
    /// Requests the trim callback shortened.
    pub trimmed: u64,
    /// Input tokens the trim callback removed.
    pub tokens_saved: u64,
}

struct Shared {
    estimator: Arc<dyn TokenEstimator>,
    cap: Option<u64>,
    trim: Option<Arc<TrimFn>>,
    body_limit: usize,
    max_conversations: usize,
    state: Mutex<HashMap<String, (u64, ConversationStats)>>,
    clock: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (u64, ConversationStats)>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates a conversation's record; the least recently used one is
    /// forgotten when the map is full.
    fn record(&self, key: &str, update: impl FnOnce(&mut ConversationStats)) {
        let tick = self
            .clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut state = self.lock();
        if !state.contains_key(key) && state.len() >= self.max_conversations {
            let oldest = state
                .iter()
                .min_by_key(|(_, (seen, _))| *seen)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                state.remove(&oldest);
            }
        }
        let entry = state.entry(key.to_owned()).or_default();
        entry.0 = tick;
        update(&mut entry.1);
    }
}

/// Builds a [`ContextGuardLayer`].
pub struct ContextGuardBuilder {
    estimator: Arc<dyn TokenEstimator>,
    cap: Option<u64>,
    trim: Option<Arc<TrimFn>>,
    body_limit: usize,
    max_conversations: usize,
}

impl std::fmt::Debug for ContextGuardBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextGuardBuilder")
            .field("cap", &self.cap)
            .field("trim", &self.trim.is_some())
            .finish_non_exhaustive()
    }
}

impl ContextGuardBuilder {
    /// Refuses requests estimated above `tokens` input tokens (after the trim
    /// callback) with [`Error::ContextTooLarge`]. No cap by default.
    pub fn cap(mut self, tokens: u64) -> Self {
        self.cap = Some(tokens);
        self
    }

    /// Called with a request above the cap, as JSON, before it is refused:
    /// it may shorten it in place. What it leaves is estimated again, and
    /// sent if it fits the cap.
    pub fn trim(mut self, trim: impl Fn(&mut Value, Over) + Send + Sync + 'static) -> Self {
        self.trim = Some(Arc::new(trim));
        self
    }

    /// The estimator (by default an [`AnthropicEstimator`] of its own).
    pub fn estimator(mut self, estimator: impl TokenEstimator) -> Self {
        self.estimator = Arc::new(estimator);
        self
    }

    /// The largest request body read (16 MiB by default); a larger one fails
    /// with [`Error::Body`], unsent.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// How many conversations are remembered (10,000 by default); past
    /// that, the least recently seen one is forgotten.
    pub fn max_conversations(mut self, n: usize) -> Self {
        self.max_conversations = n.max(1);
        self
    }

    /// The layer.
    pub fn build(self) -> ContextGuardLayer {
        ContextGuardLayer {
            shared: Arc::new(Shared {
                estimator: self.estimator,
                cap: self.cap,
                trim: self.trim,
                body_limit: self.body_limit,
                max_conversations: self.max_conversations,
                state: Mutex::new(HashMap::new()),
                clock: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }
}

/// Reports the input tokens each conversation resends, refuses requests
/// above a cap, and lets a callback trim them (see the [module docs](self)).
/// Clones share one report.
#[derive(Clone)]
pub struct ContextGuardLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ContextGuardLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextGuardLayer")
            .field("cap", &self.shared.cap)
            .finish_non_exhaustive()
    }
}

impl Default for ContextGuardLayer {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl ContextGuardLayer {
    /// A layer that only reports (no cap, no trim).
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder: no cap, no trim callback, its own [`AnthropicEstimator`].
    pub fn builder() -> ContextGuardBuilder {
        ContextGuardBuilder {
            estimator: Arc::new(AnthropicEstimator::new()),
            cap: None,
            trim: None,
            body_limit: DEFAULT_BODY_LIMIT,
            max_conversations: 10_000,
        }
    }

    /// One conversation's record.
    pub fn conversation(&self, name: &str) -> Option<ConversationStats> {
        self.shared.lock().get(name).map(|(_, s)| s.clone())
    }

    /// Every conversation's record, sorted by name, and the totals.
    pub fn snapshot(&self) -> ContextSnapshot {
        let state = self.shared.lock();
        let mut snapshot = ContextSnapshot::default();
        for (name, (_, stats)) in state.iter() {
            snapshot.sent += stats.turns;
            snapshot.refused += stats.refused;
            snapshot.trimmed += stats.trimmed;
            snapshot.tokens_saved += stats.tokens_saved;
            snapshot.conversations.push((name.clone(), stats.clone()));
        }
        drop(state);
        snapshot.conversations.sort_by(|a, b| a.0.cmp(&b.0));
        snapshot
    }
}

impl<S> Layer<S> for ContextGuardLayer {
    type Service = ContextGuard<S>;

    fn layer(&self, inner: S) -> ContextGuard<S> {
        ContextGuard {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`ContextGuardLayer`].
#[derive(Clone)]
pub struct ContextGuard<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for ContextGuard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextGuard").finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<B>> for ContextGuard<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

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
            let name = conversation_name(&parts, &bytes);
            let bytes = guard(&shared, &parts, bytes, &name)?;
            inner
                .call(with_body(parts, bytes))
                .await
                .map_err(Into::into)
        })
    }
}

/// The request's conversation: its [`ConversationId`], else a hash of its
/// system prompt and first message (which every later turn resends).
fn conversation_name(parts: &http::request::Parts, body: &[u8]) -> String {
    if let Some(ConversationId(id)) = parts.extensions.get::<ConversationId>() {
        return id.clone();
    }
    let mut hasher = DefaultHasher::new();
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        value.get("system").map(Value::to_string).hash(&mut hasher);
        if let Some(messages) = value.get("messages").and_then(Value::as_array) {
            for m in messages.iter().take(1) {
                m.to_string().hash(&mut hasher);
            }
        }
    } else {
        body.hash(&mut hasher);
    }
    format!("hash-{:016x}", hasher.finish())
}

/// Estimated input tokens of a request, cached and uncached.
fn tokens_of(shared: &Shared, parts: &http::request::Parts, body: &[u8]) -> u64 {
    let estimate = shared.estimator.estimate(parts, body);
    estimate
        .input_tokens
        .saturating_add(estimate.cache_read_tokens)
}

/// Checks a request against the cap (trimming it if a callback is set) and
/// records it: the bytes to send, or the refusal.
fn guard(
    shared: &Shared,
    parts: &http::request::Parts,
    bytes: Bytes,
    name: &str,
) -> Result<Bytes, Error> {
    let tokens = tokens_of(shared, parts, &bytes);
    let (bytes, sent, saved) = match shared.cap {
        Some(cap) if tokens > cap => match trimmed(shared, parts, &bytes, tokens, cap) {
            Some((trimmed, after)) if after <= cap => (trimmed, after, tokens - after),
            refused => {
                let after = refused.map_or(tokens, |(_, after)| after);
                shared.record(name, |s| s.refused += 1);
                tracing::debug!(
                    conversation = name,
                    tokens = after,
                    cap,
                    "context cap: refused"
                );
                return Err(Error::ContextTooLarge { tokens: after, cap });
            }
        },
        _ => (bytes, tokens, 0),
    };
    shared.record(name, |s| {
        if s.turns == 0 {
            s.first_tokens = sent;
        }
        s.last_growth = if s.turns == 0 {
            0
        } else {
            i64::try_from(sent).unwrap_or(i64::MAX)
                - i64::try_from(s.last_tokens).unwrap_or(i64::MAX)
        };
        s.turns += 1;
        s.last_tokens = sent;
        s.max_tokens = s.max_tokens.max(sent);
        s.total_tokens = s.total_tokens.saturating_add(sent);
        if saved > 0 {
            s.trimmed += 1;
            s.tokens_saved = s.tokens_saved.saturating_add(saved);
        }
    });
    tracing::trace!(conversation = name, tokens = sent, saved, "context: turn");
    Ok(bytes)
}

/// Runs the trim callback on a request above the cap: the new bytes and
/// their estimate, or `None` without a callback or a JSON body.
fn trimmed(
    shared: &Shared,
    parts: &http::request::Parts,
    bytes: &[u8],
    tokens: u64,
    cap: u64,
) -> Option<(Bytes, u64)> {
    let trim = shared.trim.as_ref()?;
    let mut value: Value = serde_json::from_slice(bytes).ok()?;
    trim(&mut value, Over { tokens, cap });
    let out = Bytes::from(serde_json::to_vec(&value).ok()?);
    let after = tokens_of(shared, parts, &out);
    Some((out, after))
}
