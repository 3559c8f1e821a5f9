//! The `usage` object of a Messages response, and reading it out of a body
//! (JSON or event stream) as the body passes.

use serde::{Deserialize, Serialize};

use super::json::UsageScanner;
use super::sse::{SseDecoder, SseEvent};

/// Token usage the server reported for a response: the `usage` object of a
/// message, of a `message_start` event, or the final counts of a stream.
///
/// Absent counters read as 0 and `cache_creation` as `None`; fields this type
/// does not model (`service_tier`, `server_tool_use`, ...) are ignored when
/// reading. It is written back with the four counters always present and
/// `cache_creation` only when set.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::wire::{CacheCreation, Usage};
///
/// let usage: Usage = serde_json::from_str(
///     r#"{"input_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":0,
///         "cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":0},
///         "output_tokens":34,"service_tier":"standard"}"#,
/// )?;
/// assert_eq!(usage.output_tokens, 34);
/// assert_eq!(usage.cache_creation.map(|c| c.ephemeral_5m_input_tokens), Some(100));
/// // What counts toward the input-tokens-per-minute limit (cache reads do not, for most models).
/// assert_eq!(usage.charged_input_tokens(false), 112);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Uncached input tokens (after the last cache breakpoint).
    pub input_tokens: u64,
    /// Input tokens written to the prompt cache (charged to ITPM).
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the prompt cache (not charged to ITPM for most models).
    pub cache_read_input_tokens: u64,
    /// The cache writes split by time to live, when the server reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_creation: Option<CacheCreation>,
    /// Output tokens produced.
    pub output_tokens: u64,
}

/// The cache writes of a response split by the cache entries' time to live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheCreation {
    /// Tokens written with the default five-minute time to live.
    pub ephemeral_5m_input_tokens: u64,
    /// Tokens written with the one-hour time to live.
    pub ephemeral_1h_input_tokens: u64,
}

impl Usage {
    /// The input tokens the server charges to the input-tokens-per-minute
    /// limit: uncached input plus cache writes, and cache reads too when
    /// `cache_reads_count` (older models count them).
    pub fn charged_input_tokens(&self, cache_reads_count: bool) -> u64 {
        let input = self
            .input_tokens
            .saturating_add(self.cache_creation_input_tokens);
        if cache_reads_count {
            input.saturating_add(self.cache_read_input_tokens)
        } else {
            input
        }
    }

    /// Applies the counts of a `message_delta` event: they are cumulative, so
    /// each one present replaces the one held.
    pub fn apply(&mut self, delta: &UsageDelta) {
        let pairs = [
            (&mut self.input_tokens, delta.input_tokens),
            (&mut self.output_tokens, delta.output_tokens),
            (
                &mut self.cache_creation_input_tokens,
                delta.cache_creation_input_tokens,
            ),
            (
                &mut self.cache_read_input_tokens,
                delta.cache_read_input_tokens,
            ),
        ];
        for (held, new) in pairs {
            if let Some(v) = new {
                *held = v;
            }
        }
    }
}

/// The `usage` of a `message_delta` event: cumulative counts, any of which
/// may be absent (absent ones are not written back either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageDelta {
    /// Uncached input tokens, when the server restates them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// Input tokens written to the prompt cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
    /// Input tokens read from the prompt cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
    /// Output tokens produced so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
}

impl From<Usage> for UsageDelta {
    /// Every count of `usage`, as a `message_delta` restates them.
    fn from(usage: Usage) -> Self {
        UsageDelta {
            input_tokens: Some(usage.input_tokens),
            cache_creation_input_tokens: Some(usage.cache_creation_input_tokens),
            cache_read_input_tokens: Some(usage.cache_read_input_tokens),
            output_tokens: Some(usage.output_tokens),
        }
    }
}

/// How an event stream ended, as far as its events said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// A `message_stop` event arrived: the usage is final.
    Stopped,
    /// An `error` event arrived (possible after a 200): the server stopped;
    /// the usage is what the events said up to there.
    Errored,
}

/// The longest SSE line or event data [`StreamUsage`] keeps. `message_start`,
/// `message_delta`, `message_stop` and `error` events are a few hundred bytes;
/// longer lines (large `content_block_delta` events) are skipped unread.
pub const MAX_USAGE_EVENT: usize = 16 * 1024;

/// The event types that carry usage or end a stream.
const USAGE_EVENTS: [&str; 4] = ["message_start", "message_delta", "message_stop", "error"];

/// Reads the usage of a Messages event stream (`"stream": true`) as its bytes
/// pass, in chunks split at any byte boundary: the `message_start` event
/// (input, cache and first output counts), the `message_delta` events
/// (cumulative output, sometimes input), `message_stop` and `error`.
///
/// Its state is bounded: events of other types are skipped without copying
/// their data, and any line or event longer than [`MAX_USAGE_EVENT`] is dropped.
/// An event is recognised by the `type` in its data, so streams without
/// `event:` lines are read too.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::wire::{StreamEnd, StreamUsage};
///
/// let stream = "event: message_start\n\
///     data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n\
///     event: message_delta\n\
///     data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":40}}\n\n\
///     event: message_stop\n\
///     data: {\"type\":\"message_stop\"}\n\n";
/// let mut reader = StreamUsage::new();
/// for chunk in stream.as_bytes().chunks(5) {
///     reader.push(chunk);
/// }
/// assert_eq!(reader.end(), Some(StreamEnd::Stopped));
/// assert_eq!((reader.usage().input_tokens, reader.usage().output_tokens), (12, 40));
/// ```
#[derive(Debug)]
pub struct StreamUsage {
    decoder: SseDecoder,
    usage: Usage,
    started: bool,
    end: Option<StreamEnd>,
}

impl Default for StreamUsage {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Deserialize)]
struct EventData {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default)]
    usage: Option<UsageDelta>,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<Usage>,
}

impl StreamUsage {
    /// A reader at the start of a stream.
    pub fn new() -> Self {
        StreamUsage {
            decoder: SseDecoder::new()
                .with_max_len(MAX_USAGE_EVENT)
                .with_filter(|name| USAGE_EVENTS.contains(&name)),
            usage: Usage::default(),
            started: false,
            end: None,
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.decoder.push(chunk);
        self.drain();
    }

    /// The stream's bytes ended: a last event without its blank line is
    /// still read.
    pub fn finish(&mut self) {
        self.decoder.finish();
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(event) = self.decoder.next_event() {
            self.observe(&event);
        }
    }

    /// Reads one decoded event (for a caller that decodes the stream itself).
    pub fn observe(&mut self, event: &SseEvent) {
        let Ok(data) = serde_json::from_str::<EventData>(&event.data) else {
            return;
        };
        match data.kind.as_str() {
            "message_start" => {
                if let Some(usage) = data.message.and_then(|m| m.usage) {
                    self.usage = usage;
                    self.started = true;
                }
            }
            "message_delta" => {
                if let Some(delta) = data.usage {
                    self.usage.apply(&delta);
                }
            }
            "message_stop" if self.end.is_none() => self.end = Some(StreamEnd::Stopped),
            "error" if self.end.is_none() => self.end = Some(StreamEnd::Errored),
            _ => {}
        }
    }

    /// The usage the events reported so far.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// True once a `message_start` event was read (the input counts are known).
    pub fn started(&self) -> bool {
        self.started
    }

    /// How the stream ended, once an event said so.
    pub fn end(&self) -> Option<StreamEnd> {
        self.end
    }
}

/// The usage of a whole response body: a JSON message's top-level `usage`,
/// or an event stream's (read with [`StreamUsage`]; `None` unless its
/// `message_start` was seen). The first byte that is not whitespace tells
/// which: `{` is JSON.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::wire::usage_of;
///
/// let json = br#"{"type":"message","usage":{"input_tokens":9,"output_tokens":2}}"#;
/// assert_eq!(usage_of(json).map(|u| u.output_tokens), Some(2));
/// assert_eq!(usage_of(b"not a body"), None);
/// ```
pub fn usage_of(body: &[u8]) -> Option<Usage> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first == b'{' {
        let mut scanner = UsageScanner::new();
        scanner.push(body);
        return scanner.usage();
    }
    let mut stream = StreamUsage::new();
    stream.push(body);
    stream.finish();
    stream.started().then(|| stream.usage())
}
