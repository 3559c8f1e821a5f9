//! Incremental readers of the `usage` a Messages response reports, fed with the
//! response body's bytes as they pass, in chunks split at any byte boundary.
//!
//! Both readers keep a small, bounded state: they never hold the whole body.
//! - [`SseScanner`] reads a `text/event-stream` answer (`"stream": true`): the
//!   `message_start` event (input, cache and first output counts), the
//!   `message_delta` events (cumulative output, sometimes input), and notes
//!   `message_stop` and `event: error`.
//! - [`JsonScanner`] reads a plain JSON answer and captures the value of the
//!   top-level `"usage"` key, wherever it sits in the object.

use serde::Deserialize;

use crate::estimate::Usage;

/// The longest SSE line or event data kept for parsing. `message_start`,
/// `message_delta`, `message_stop` and `error` events are a few hundred bytes;
/// longer lines (large `content_block_delta` events) are skipped unread.
const MAX_LINE: usize = 16 * 1024;

/// The longest `usage` object kept (it holds a few counters and small nested objects).
const MAX_USAGE_JSON: usize = 8 * 1024;

/// How an event stream ended, as far as its events said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// A `message_stop` event arrived: the usage is final.
    Stopped,
    /// An `error` event arrived (possible after a 200): the server stopped;
    /// the usage is what the events said up to there.
    Errored,
}

/// What the `event:` line of the current SSE event said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum EventName {
    /// No `event:` line (yet): the data's `type` decides.
    #[default]
    Unnamed,
    /// An event carrying usage or ending the stream: its data is parsed.
    Wanted,
    /// Any other event (`ping`, `content_block_*`, unknown types): skipped unread.
    Skipped,
}

/// Reads usage out of an Anthropic event stream as its bytes pass.
#[derive(Debug, Default)]
pub(crate) struct SseScanner {
    /// The current line, as far as it has arrived.
    line: Vec<u8>,
    /// The current line is not copied (too long, or data of a skipped event).
    discard: bool,
    /// The current line grew past [`MAX_LINE`].
    overflow: bool,
    /// The previous chunk ended with `\r`: a `\n` starting this one belongs to it.
    last_cr: bool,
    event: EventName,
    /// The data of the current event (its `data:` lines joined by `\n`).
    data: Vec<u8>,
    /// Part of the current event's data was lost: the event is not parsed.
    data_lost: bool,
    /// The usage the events reported so far.
    pub(crate) usage: Usage,
    /// A `message_start` event was read (input counts are known).
    pub(crate) saw_start: bool,
    /// How the stream ended, once it has.
    pub(crate) end: Option<StreamEnd>,
}

#[derive(Deserialize)]
struct SseEvent {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default)]
    usage: Option<DeltaUsage>,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<Usage>,
}

/// `message_delta` usage: cumulative counts, any of which may be absent.
#[derive(Deserialize)]
struct DeltaUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl SseScanner {
    /// Feeds the next bytes of the stream.
    pub(crate) fn push(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.last_cr {
                self.last_cr = false;
                if let Some((b'\n', rest)) = chunk.split_first() {
                    chunk = rest;
                    continue;
                }
            }
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    let (head, rest) = chunk.split_at(i);
                    self.append(head);
                    let mut rest = rest.iter();
                    if rest.next() == Some(&b'\r') {
                        self.last_cr = true;
                    }
                    self.end_line();
                    chunk = rest.as_slice();
                }
                None => {
                    self.append(chunk);
                    break;
                }
            }
        }
    }

    /// The stream ended: a last event without its blank line is still read.
    pub(crate) fn finish(&mut self) {
        if !self.line.is_empty() || self.discard || self.overflow {
            self.end_line();
        }
        self.dispatch();
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.discard || bytes.is_empty() {
            return;
        }
        if self.line.len() + bytes.len() > MAX_LINE {
            self.overflow = true;
            self.discard = true;
            self.line.clear();
            return;
        }
        self.line.extend_from_slice(bytes);
        if self.event == EventName::Skipped && self.line.starts_with(b"data") {
            // Data of an event we do not read: stop copying it.
            self.discard = true;
            self.line.clear();
        }
    }

    fn end_line(&mut self) {
        let discard = std::mem::take(&mut self.discard);
        if std::mem::take(&mut self.overflow) {
            // An over-long line: if it was data of an event we read, that
            // event is incomplete and must not be parsed.
            if self.event != EventName::Skipped {
                self.data_lost = true;
            }
            self.line.clear();
            return;
        }
        if discard {
            self.line.clear();
            return;
        }
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch();
        } else if let Some(value) = field(&line, b"event") {
            self.event = match value {
                b"message_start" | b"message_delta" | b"message_stop" | b"error" => {
                    EventName::Wanted
                }
                _ => EventName::Skipped,
            };
        } else if let Some(value) = field(&line, b"data") {
            if self.event != EventName::Skipped {
                if !self.data.is_empty() {
                    self.data.push(b'\n');
                }
                if self.data.len() + value.len() > MAX_LINE {
                    self.data_lost = true;
                } else {
                    self.data.extend_from_slice(value);
                }
            }
        }
        // Keep the line's allocation for the next one.
        self.line = line;
        self.line.clear();
    }

    /// A blank line: the current event is complete.
    fn dispatch(&mut self) {
        let event = std::mem::take(&mut self.event);
        let lost = std::mem::take(&mut self.data_lost);
        if self.data.is_empty() || lost || event == EventName::Skipped {
            self.data.clear();
            return;
        }
        if let Ok(ev) = serde_json::from_slice::<SseEvent>(&self.data) {
            self.apply(ev);
        }
        self.data.clear();
    }

    fn apply(&mut self, ev: SseEvent) {
        match ev.kind.as_str() {
            "message_start" => {
                if let Some(usage) = ev.message.and_then(|m| m.usage) {
                    self.usage = usage;
                    self.saw_start = true;
                }
            }
            "message_delta" => {
                if let Some(u) = ev.usage {
                    // Counts in message_delta are cumulative: they replace.
                    if let Some(v) = u.output_tokens {
                        self.usage.output_tokens = v;
                    }
                    if let Some(v) = u.input_tokens {
                        self.usage.input_tokens = v;
                    }
                    if let Some(v) = u.cache_creation_input_tokens {
                        self.usage.cache_creation_input_tokens = v;
                    }
                    if let Some(v) = u.cache_read_input_tokens {
                        self.usage.cache_read_input_tokens = v;
                    }
                }
            }
            "message_stop" if self.end.is_none() => self.end = Some(StreamEnd::Stopped),
            "error" if self.end.is_none() => self.end = Some(StreamEnd::Errored),
            _ => {}
        }
    }
}

/// The value of an SSE field line `name:value` (one leading space removed).
fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?.strip_prefix(b":")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

/// Where the JSON scanner is relative to the top-level `"usage"` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum KeyPhase {
    #[default]
    None,
    /// The string `"usage"` just closed at depth 1: a `:` makes it a key.
    SawKey,
    /// `"usage":` was read: the next value is captured if it is an object.
    SawColon,
}

/// Reads the top-level `usage` object of a JSON body as its bytes pass.
///
/// A byte-level tokenizer that tracks only string/escape state and nesting
/// depth; it copies nothing but the `usage` value itself (bounded).
#[derive(Debug, Default)]
pub(crate) struct JsonScanner {
    depth: u32,
    in_string: bool,
    escape: bool,
    /// Matching the current depth-1 string against `usage`: bytes matched so
    /// far, or `None` once it cannot match.
    key_match: Option<usize>,
    phase: KeyPhase,
    capture: Option<Vec<u8>>,
    /// The `usage` object, once read.
    pub(crate) usage: Option<Usage>,
}

const USAGE_KEY: &[u8] = b"usage";

impl JsonScanner {
    /// Feeds the next bytes of the body.
    pub(crate) fn push(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.in_string && !self.escape {
                // Inside a string (most of a response is text): jump to the
                // next quote or backslash, matching a candidate key on the way.
                let end = chunk.iter().position(|&b| b == b'"' || b == b'\\');
                let (segment, rest) = chunk.split_at(end.unwrap_or(chunk.len()));
                self.capture_extend(segment);
                if let Some(n) = self.key_match {
                    let expected = USAGE_KEY.get(n..n + segment.len());
                    self.key_match = (expected == Some(segment)).then_some(n + segment.len());
                }
                chunk = rest;
                if chunk.is_empty() {
                    return;
                }
            }
            if let Some((&b, rest)) = chunk.split_first() {
                self.byte(b);
                chunk = rest;
            }
        }
    }

    fn capture_extend(&mut self, bytes: &[u8]) {
        if let Some(cap) = self.capture.as_mut() {
            if cap.len() + bytes.len() > MAX_USAGE_JSON {
                self.capture = None;
            } else {
                cap.extend_from_slice(bytes);
            }
        }
    }

    fn byte(&mut self, b: u8) {
        if let Some(cap) = self.capture.as_mut() {
            if cap.len() >= MAX_USAGE_JSON {
                self.capture = None;
            } else {
                cap.push(b);
            }
        }
        if self.in_string {
            if self.escape {
                self.escape = false;
                self.key_match = None;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if let Some(n) = self.key_match.take() {
                    if n == USAGE_KEY.len() {
                        self.phase = KeyPhase::SawKey;
                    }
                }
            } else if let Some(n) = self.key_match {
                self.key_match = (USAGE_KEY.get(n) == Some(&b)).then_some(n + 1);
            }
            return;
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'"' => {
                self.in_string = true;
                if self.depth == 1 && self.capture.is_none() {
                    self.key_match = Some(0);
                }
                self.phase = KeyPhase::None;
            }
            b':' => {
                self.phase = if self.phase == KeyPhase::SawKey && self.depth == 1 {
                    KeyPhase::SawColon
                } else {
                    KeyPhase::None
                };
            }
            b'{' | b'[' => {
                if b == b'{' && self.phase == KeyPhase::SawColon && self.depth == 1 {
                    self.capture = Some(vec![b'{']);
                }
                self.phase = KeyPhase::None;
                self.depth = self.depth.saturating_add(1);
            }
            b'}' | b']' => {
                self.phase = KeyPhase::None;
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 1 {
                    if let Some(cap) = self.capture.take() {
                        if let Ok(usage) = serde_json::from_slice::<Usage>(&cap) {
                            self.usage = Some(usage);
                        }
                    }
                }
            }
            _ => {
                self.phase = KeyPhase::None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "event: message_start\r\n\
data: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude-sonnet-4-5\", \"stop_reason\": null, \"stop_sequence\": null, \"usage\": {\"input_tokens\": 25, \"cache_creation_input_tokens\": 7, \"cache_read_input_tokens\": 100, \"output_tokens\": 1}}}\r\n\
\r\n\
event: content_block_start\n\
data: {\"type\": \"content_block_start\", \"index\": 0, \"content_block\": {\"type\": \"text\", \"text\": \"\"}}\n\
\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\
\n\
event: content_block_delta\n\
data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"usage: {\\\"output_tokens\\\": 999}\"}}\n\
\n\
event: content_block_stop\r\
data: {\"type\": \"content_block_stop\", \"index\": 0}\r\
\r\
event: message_delta\n\
data: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"end_turn\", \"stop_sequence\":null}, \"usage\": {\"output_tokens\": 15}}\n\
\n\
event: message_stop\n\
data: {\"type\": \"message_stop\"}\n\
\n";

    fn expected() -> Usage {
        Usage {
            input_tokens: 25,
            output_tokens: 15,
            cache_creation_input_tokens: 7,
            cache_read_input_tokens: 100,
        }
    }

    #[test]
    fn sse_whole_stream() {
        let mut s = SseScanner::default();
        s.push(STREAM.as_bytes());
        assert_eq!(s.usage, expected());
        assert!(s.saw_start);
        assert_eq!(s.end, Some(StreamEnd::Stopped));
    }

    #[test]
    fn sse_every_split_point() {
        let bytes = STREAM.as_bytes();
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            let mut s = SseScanner::default();
            s.push(a);
            s.push(b);
            assert_eq!(s.usage, expected(), "split at {i}");
            assert_eq!(s.end, Some(StreamEnd::Stopped), "split at {i}");
        }
    }

    #[test]
    fn sse_byte_by_byte() {
        let mut s = SseScanner::default();
        for b in STREAM.as_bytes() {
            s.push(std::slice::from_ref(b));
        }
        assert_eq!(s.usage, expected());
        assert_eq!(s.end, Some(StreamEnd::Stopped));
    }

    #[test]
    fn sse_error_event_keeps_what_was_said() {
        let stream = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":40,\"output_tokens\":1}}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":9}}\n\n\
event: error\n\
data: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";
        let mut s = SseScanner::default();
        s.push(stream.as_bytes());
        assert_eq!(s.end, Some(StreamEnd::Errored));
        assert_eq!(s.usage.input_tokens, 40);
        assert_eq!(s.usage.output_tokens, 9);
    }

    #[test]
    fn sse_unnamed_events_and_final_event_without_blank_line() {
        let stream = "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n\
: a comment\n\
data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":4,\"input_tokens\":5}}";
        let mut s = SseScanner::default();
        s.push(stream.as_bytes());
        assert_eq!(s.usage.output_tokens, 1);
        s.finish();
        assert_eq!(s.usage.output_tokens, 4);
        assert_eq!(s.usage.input_tokens, 5);
        assert_eq!(s.end, None);
    }

    #[test]
    fn sse_long_lines_are_skipped_and_bounded() {
        let long = "x".repeat(MAX_LINE * 3);
        let stream = format!(
            "event: content_block_delta\ndata: {{\"text\":\"{long}\"}}\n\n\
data: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":\"{long}\"}}}}\n\n\
event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":8}}}}\n\n"
        );
        let mut s = SseScanner::default();
        for chunk in stream.as_bytes().chunks(1000) {
            s.push(chunk);
            assert!(s.line.capacity() <= MAX_LINE * 2);
            assert!(s.data.len() <= MAX_LINE);
        }
        assert_eq!(s.usage.output_tokens, 8);
    }

    const BODY: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5",
 "content":[{"type":"text","text":"the \"usage\": {\"input_tokens\": 9} of it"},
  {"type":"tool_use","id":"t","name":"n","input":{"usage":{"input_tokens":77}}}],
 "stop_reason":"end_turn","stop_sequence":null,
 "usage" : {"input_tokens":12,"cache_creation_input_tokens":3,"cache_read_input_tokens":4,
  "cache_creation":{"ephemeral_5m_input_tokens":3,"ephemeral_1h_input_tokens":0},
  "output_tokens":34,"service_tier":"standard","server_tool_use":null}}"#;

    #[test]
    fn json_usage_at_every_split_point() {
        let want = Usage {
            input_tokens: 12,
            output_tokens: 34,
            cache_creation_input_tokens: 3,
            cache_read_input_tokens: 4,
        };
        let bytes = BODY.as_bytes();
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            let mut s = JsonScanner::default();
            s.push(a);
            s.push(b);
            assert_eq!(s.usage, Some(want), "split at {i}");
        }
    }

    #[test]
    fn json_without_usage_or_not_json() {
        for body in [
            r#"{"type":"error","error":{"type":"overloaded_error","message":"usage"}}"#,
            "not json at all \"usage\": {\"input_tokens\": 1}",
            r#"{"usage": 5}"#,
            "",
        ] {
            let mut s = JsonScanner::default();
            s.push(body.as_bytes());
            assert_eq!(s.usage, None, "{body}");
        }
    }

    proptest::proptest! {
        /// Any chunking of a stream gives the same usage as the whole.
        #[test]
        fn any_chunking_gives_the_same_usage(sizes in proptest::collection::vec(1usize..64, 1..200)) {
            let bytes = STREAM.as_bytes();
            let mut sse = SseScanner::default();
            let body = BODY.as_bytes();
            let mut json = JsonScanner::default();
            let (mut i, mut j) = (0, 0);
            for n in sizes.iter().cycle().take(4 * bytes.len()) {
                if i < bytes.len() {
                    let end = (i + n).min(bytes.len());
                    sse.push(&bytes[i..end]);
                    i = end;
                }
                if j < body.len() {
                    let end = (j + n).min(body.len());
                    json.push(&body[j..end]);
                    j = end;
                }
            }
            proptest::prop_assert_eq!(sse.usage, expected());
            proptest::prop_assert_eq!(sse.end, Some(StreamEnd::Stopped));
            proptest::prop_assert_eq!(json.usage.map(|u| u.output_tokens), Some(34));
        }
    }
}
