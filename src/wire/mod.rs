//! The wire format of Anthropic's Messages API, modelled once for the whole
//! crate: the estimator, the budget's settlement and enforce mode read and
//! write it through this module, and so does the emulator of the API
//! (the `tower-llm-limits-emulator` crate).
//!
//! | module | what it holds |
//! |---|---|
//! | [`Usage`] and its readers | the `usage` object (serde), the `message_delta` counts, and readers of a response's usage as its body passes: [`StreamUsage`] for an event stream, [`json::UsageScanner`] for JSON, [`usage_of`] for a whole body |
//! | [`sse`] | server-sent events: an incremental decoder ([`sse::SseDecoder`]) and an encoder |
//! | [`json`] | a JSON scanner that walks a body without building it (the estimator reads requests with it) |
//! | [`error`] | the error JSON and its types, the 429 message, `retry-after`, JSON answers with a `request-id` |
//! | [`ratelimit`] | the `anthropic-ratelimit-*` headers as the API writes them, from a neutral per-limit state |
//!
//! Always compiled: it needs no feature.
//!
//! # Examples
//!
//! A streamed answer, written with the encoder and read back in arbitrary
//! chunks:
//!
//! ```
//! use tower_llm_limits::wire::sse::json_event;
//! use tower_llm_limits::wire::{StreamEnd, StreamUsage, Usage, UsageDelta};
//! use serde_json::json;
//!
//! let usage = Usage { input_tokens: 25, output_tokens: 1, ..Usage::default() };
//! let mut body = Vec::new();
//! body.extend(json_event("message_start", &json!({"type": "message_start", "message": {"usage": usage}}))?);
//! body.extend(json_event("ping", &json!({"type": "ping"}))?);
//! let done = UsageDelta { output_tokens: Some(15), ..UsageDelta::default() };
//! body.extend(json_event("message_delta", &json!({"type": "message_delta", "usage": done}))?);
//! body.extend(json_event("message_stop", &json!({"type": "message_stop"}))?);
//!
//! let mut reader = StreamUsage::new();
//! for chunk in body.chunks(11) {
//!     reader.push(chunk);
//! }
//! assert_eq!(reader.end(), Some(StreamEnd::Stopped));
//! assert_eq!(reader.usage(), Usage { input_tokens: 25, output_tokens: 15, ..Usage::default() });
//! # Ok::<(), serde_json::Error>(())
//! ```

pub mod error;
pub mod json;
pub mod ratelimit;
pub mod sse;
mod usage;
mod usage_read;

pub use usage::{
    usage_of, CacheCreation, StreamEnd, StreamUsage, Usage, UsageDelta, MAX_USAGE_EVENT,
};
