//! Server-sent events (`text/event-stream`): an incremental decoder and an
//! encoder.
//!
//! The decoder follows the WHATWG rules: lines end with CRLF, LF or CR; a
//! line starting with `:` is a comment; `field: value` loses one space after
//! the colon; a line without a colon is a field with an empty value; the
//! `data` lines of an event are joined with `\n`; a blank line ends the
//! event, and an event without any `data` line is not dispatched. A UTF-8 BOM
//! at the start of the stream is ignored. Bytes may arrive split anywhere,
//! even inside a CRLF.
//!
//! # Examples
//!
//! ```
//! use tower_llm_limits::wire::sse::{SseDecoder, SseEvent};
//!
//! let events = [
//!     SseEvent::new("message_stop", r#"{"type":"message_stop"}"#),
//!     SseEvent { event: None, data: "two\nlines".into(), id: Some("7".into()), retry: None },
//! ];
//! let bytes: Vec<u8> = events.iter().flat_map(|e| e.to_bytes()).collect();
//!
//! let mut decoder = SseDecoder::new();
//! let mut decoded = Vec::new();
//! for chunk in bytes.chunks(3) {
//!     decoder.push(chunk);
//!     while let Some(event) = decoder.next_event() {
//!         decoded.push(event);
//!     }
//! }
//! assert_eq!(decoded, events);
//! assert_eq!(decoder.last_event_id(), Some("7"));
//! ```

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};
use serde::Serialize;

/// The media type of an event stream.
pub const EVENT_STREAM: &str = "text/event-stream";

/// Whether `headers` say the body is an event stream (`content-type:
/// text/event-stream`, parameters allowed); `None` without a `content-type`.
///
/// ```
/// use http::HeaderMap;
/// use tower_llm_limits::wire::sse::{insert_stream_headers, is_event_stream};
///
/// let mut headers = HeaderMap::new();
/// assert_eq!(is_event_stream(&headers), None);
/// insert_stream_headers(&mut headers);
/// assert_eq!(is_event_stream(&headers), Some(true));
/// ```
pub fn is_event_stream(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get(CONTENT_TYPE)?;
    // The type is compared on the bytes first: a value that is not an
    // event stream (a JSON answer) is not checked as text at all. A value
    // that is text (what `to_str` accepts) has no blank before its type but
    // spaces and tabs.
    let bytes = value.as_bytes();
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let is_type = bytes
        .get(start..start + EVENT_STREAM.len())
        .is_some_and(|t| t.eq_ignore_ascii_case(EVENT_STREAM.as_bytes()));
    Some(is_type && value.to_str().is_ok())
}

/// The headers the API sends with a streamed answer: `content-type:
/// text/event-stream; charset=utf-8` and `cache-control: no-cache`.
pub fn insert_stream_headers(headers: &mut HeaderMap) {
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

/// One event of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field: the event's type (`None` when absent or empty,
    /// which a browser reads as `message`).
    pub event: Option<String>,
    /// The event's data: its `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` field given in this event, if any (see also
    /// [`SseDecoder::last_event_id`]).
    pub id: Option<String>,
    /// The `retry:` field given in this event (milliseconds), if any.
    pub retry: Option<u64>,
}

impl SseEvent {
    /// An event of type `event` carrying `data`.
    pub fn new(event: impl Into<String>, data: impl Into<String>) -> Self {
        SseEvent {
            event: Some(event.into()),
            data: data.into(),
            id: None,
            retry: None,
        }
    }

    /// The event's type, `message` when it has none.
    pub fn kind(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    /// The event's wire form.
    ///
    /// Each line of `data` (split at CRLF, LF or CR) becomes one `data:`
    /// line, so data holding a CR reads back with `\n` in its place. Line
    /// breaks in `event` and `id` cannot be written and are left out.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.data.len() + 32);
        if let Some(event) = &self.event {
            put_field(&mut out, "event", event);
        }
        if let Some(id) = &self.id {
            put_field(&mut out, "id", id);
        }
        if let Some(retry) = self.retry {
            put_field(&mut out, "retry", &retry.to_string());
        }
        let mut rest = self.data.as_str();
        loop {
            match rest.find(['\r', '\n']) {
                Some(i) => {
                    put_field(&mut out, "data", &rest[..i]);
                    let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                    rest = &rest[i + skip..];
                }
                None => {
                    put_field(&mut out, "data", rest);
                    break;
                }
            }
        }
        out.put_u8(b'\n');
        out.freeze()
    }
}

fn put_field(out: &mut BytesMut, name: &str, value: &str) {
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    for piece in value.split(['\r', '\n']) {
        out.put_slice(piece.as_bytes());
    }
    out.put_u8(b'\n');
}

/// One event whose data is `data` written as JSON: `event: <name>\ndata:
/// <json>\n\n` (compact JSON holds no line break, so it is one `data:` line).
///
/// # Errors
///
/// When `data` cannot be written as JSON (its `Serialize` fails, or a map
/// has keys that are not strings).
///
/// # Examples
///
/// ```
/// use tower_llm_limits::wire::sse::json_event;
///
/// let bytes = json_event("ping", &serde_json::json!({"type": "ping"}))?;
/// assert_eq!(&bytes[..], b"event: ping\ndata: {\"type\":\"ping\"}\n\n");
/// # Ok::<(), serde_json::Error>(())
/// ```
pub fn json_event(name: &str, data: &impl Serialize) -> Result<Bytes, serde_json::Error> {
    let mut out = BytesMut::with_capacity(name.len() + 128).writer();
    out.get_mut().put_slice(b"event: ");
    for piece in name.split(['\r', '\n']) {
        out.get_mut().put_slice(piece.as_bytes());
    }
    out.get_mut().put_slice(b"\ndata: ");
    serde_json::to_writer(&mut out, data)?;
    out.get_mut().put_slice(b"\n\n");
    Ok(out.into_inner().freeze())
}

/// An incremental decoder of an event stream: bytes in (split anywhere),
/// [`SseEvent`]s out.
///
/// By default it keeps any line and event whole. [`with_max_len`](Self::with_max_len)
/// bounds what it keeps, and [`with_filter`](Self::with_filter) skips events
/// by type without copying their data, so a reader interested in a few small
/// events can watch a long stream with bounded memory.
#[derive(Debug)]
pub struct SseDecoder {
    /// The current line, as far as it has arrived.
    line: Vec<u8>,
    /// The rest of the current line is not copied (too long, or data of a skipped event).
    discard: bool,
    /// The current line grew past `max_len`.
    overflow: bool,
    /// The previous chunk ended with `\r`: a `\n` starting this one belongs to it.
    last_cr: bool,
    /// The first line is still to come (a BOM may start it).
    first_line: bool,
    /// The current event's fields.
    event: Option<String>,
    data: Vec<u8>,
    has_data: bool,
    id: Option<String>,
    retry: Option<u64>,
    /// The current event's type was refused by the filter.
    skip: bool,
    /// Part of the current event was not kept: it is not dispatched.
    lost: bool,
    last_id: Option<String>,
    max_len: usize,
    filter: Option<fn(&str) -> bool>,
    ready: VecDeque<SseEvent>,
    /// The last event name the filter refused.
    refused: ShortName,
}

/// A short byte string kept inline (no allocation); longer ones are not kept.
#[derive(Debug, Clone, Copy, Default)]
struct ShortName {
    bytes: [u8; 32],
    /// 0 when nothing is kept.
    len: u8,
}

impl ShortName {
    fn matches(&self, name: &[u8]) -> bool {
        self.len > 0 && self.bytes.get(..usize::from(self.len)) == Some(name)
    }

    fn remember(&mut self, name: &[u8]) {
        match (self.bytes.get_mut(..name.len()), u8::try_from(name.len())) {
            (Some(slot), Ok(len)) if len > 0 => {
                slot.copy_from_slice(name);
                self.len = len;
            }
            _ => self.len = 0,
        }
    }
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SseDecoder {
    /// A decoder at the start of a stream, keeping every event whole.
    pub fn new() -> Self {
        SseDecoder {
            line: Vec::new(),
            discard: false,
            overflow: false,
            last_cr: false,
            first_line: true,
            event: None,
            data: Vec::new(),
            has_data: false,
            id: None,
            retry: None,
            skip: false,
            lost: false,
            last_id: None,
            max_len: usize::MAX,
            filter: None,
            ready: VecDeque::new(),
            refused: ShortName::default(),
        }
    }

    /// Bounds what is kept: a line longer than `max_len` bytes is dropped,
    /// and so is an event that had such a line or whose data grows past
    /// `max_len` (it is not dispatched at all, rather than cut), counting
    /// its data as dispatched (invalid UTF-8 replaced by U+FFFD).
    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }

    /// Dispatches only events whose `event:` type `keep` accepts; the data of
    /// the others is skipped without being copied. Events without an
    /// `event:` line are always dispatched.
    pub fn with_filter(mut self, keep: fn(&str) -> bool) -> Self {
        self.filter = Some(keep);
        self
    }

    /// The last `id:` the stream gave (it carries over from event to event,
    /// as a client sends it back in `Last-Event-ID`).
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// The next complete event, if one is ready.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    /// Feeds the next bytes of the stream; completed events become available
    /// from [`next_event`](Self::next_event).
    pub fn push(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if std::mem::take(&mut self.last_cr) {
                if let Some((b'\n', rest)) = chunk.split_first() {
                    chunk = rest;
                    continue;
                }
            }
            if let Some((&b @ (b'\n' | b'\r'), rest)) = chunk.split_first() {
                // A line end at once (most often the blank line that ends an
                // event): no search.
                self.last_cr = b == b'\r';
                self.end_line();
                chunk = rest;
                continue;
            }
            match memchr::memchr2(b'\n', b'\r', chunk) {
                Some(i) => {
                    let (head, rest) = chunk.split_at(i);
                    self.last_cr = rest.first() == Some(&b'\r');
                    if self.line.is_empty() && !self.discard {
                        // The whole line is in this chunk: read in place.
                        self.whole_line(head);
                    } else {
                        self.append(head);
                        self.end_line();
                    }
                    chunk = rest.get(1..).unwrap_or_default();
                }
                None => {
                    self.append(chunk);
                    break;
                }
            }
        }
    }

    /// The stream ended. Unlike a browser, which drops an event cut short,
    /// this dispatches a last event that lacks only its blank line: a server
    /// that closes right after its final `data:` line still said it.
    pub fn finish(&mut self) {
        if !self.line.is_empty() || self.discard || self.overflow {
            self.end_line();
        }
        self.dispatch();
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.discard || bytes.is_empty() {
            return;
        }
        if self.skip && self.line.is_empty() && bytes.starts_with(b"data") {
            // The data of an event that is skipped is never copied.
            self.discard = true;
            self.lost = true;
            return;
        }
        if self.line.len().saturating_add(bytes.len()) > self.max_len {
            self.overflow = true;
            self.discard = true;
            self.line.clear();
            return;
        }
        self.line.extend_from_slice(bytes);
        if self.skip && self.line.starts_with(b"data") {
            // Data of an event that will not be dispatched: stop copying it.
            self.discard = true;
            self.lost = true;
            self.line.clear();
        }
    }

    fn end_line(&mut self) {
        let discard = std::mem::take(&mut self.discard);
        if std::mem::take(&mut self.overflow) {
            self.lost = true;
        }
        if discard {
            self.line.clear();
            self.first_line = false;
            return;
        }
        let mut line = std::mem::take(&mut self.line);
        let start = if std::mem::take(&mut self.first_line) && line.starts_with(b"\xEF\xBB\xBF") {
            3
        } else {
            0
        };
        self.field(line.get(start..).unwrap_or_default());
        // Keep the line's allocation for the next one.
        line.clear();
        self.line = line;
    }

    /// Handles one complete line.
    /// A line that arrived whole: what `append` then `end_line` do, without
    /// copying it.
    fn whole_line(&mut self, line: &[u8]) {
        if self.skip && line.starts_with(b"data") {
            // The data of a skipped event, as `append` drops it.
            self.lost = true;
            self.first_line = false;
            return;
        }
        if line.len() > self.max_len {
            self.lost = true;
            self.first_line = false;
            return;
        }
        let start = if std::mem::take(&mut self.first_line) && line.starts_with(b"\xEF\xBB\xBF") {
            3
        } else {
            0
        };
        self.field(line.get(start..).unwrap_or_default());
    }

    /// An `event:` line: the filter's verdict, remembered for the last name
    /// refused (a stream repeats one type of event many times over).
    fn event_line(&mut self, value: &[u8]) {
        if self.refused.matches(value) {
            self.skip = true;
            self.event = None;
            return;
        }
        let event = match std::str::from_utf8(value) {
            Ok(name) => std::borrow::Cow::Borrowed(name),
            Err(_) => String::from_utf8_lossy(value),
        };
        self.skip = self.filter.is_some_and(|keep| !keep(&event));
        if self.skip {
            self.refused.remember(value);
        }
        // A skipped event is never dispatched: its name is not kept.
        self.event = (!self.skip && !event.is_empty()).then(|| event.into_owned());
    }

    fn field(&mut self, line: &[u8]) {
        if line.is_empty() {
            self.dispatch();
            return;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(0) => return, // a comment
            Some(i) => {
                let value = line.get(i + 1..).unwrap_or_default();
                let name = line.get(..i).unwrap_or_default();
                (name, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match name {
            b"event" => self.event_line(value),
            b"data" => self.data_line(value),
            b"id" if !value.contains(&0) => {
                let id = String::from_utf8_lossy(value).into_owned();
                self.last_id = Some(id.clone());
                self.id = Some(id);
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                self.retry = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            }
            _ => {}
        }
    }

    fn data_line(&mut self, value: &[u8]) {
        if self.skip {
            self.lost = true;
            return;
        }
        let extra = value.len() + usize::from(self.has_data);
        if self.data.len().saturating_add(extra) > self.max_len {
            self.lost = true;
            return;
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
    }

    /// A blank line: the current event is complete.
    fn dispatch(&mut self) {
        let event = self.event.take();
        let id = self.id.take();
        let retry = self.retry.take();
        let has_data = std::mem::take(&mut self.has_data);
        let dropped = std::mem::take(&mut self.skip) | std::mem::take(&mut self.lost);
        if dropped || !has_data {
            self.data.clear();
            return;
        }
        let data = std::mem::take(&mut self.data);
        let data = String::from_utf8(data)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        if data.len() > self.max_len {
            // Invalid UTF-8 replaced by U+FFFD (3 bytes a byte) outgrew the bound.
            return;
        }
        self.ready.push_back(SseEvent {
            event,
            data,
            id,
            retry,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The content type is read as text, blanks before it and case
    /// ignored; a value that is not text is not an event stream.
    #[test]
    fn an_event_stream_is_told_by_its_content_type() {
        let of = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_bytes(value).ok()?);
            is_event_stream(&headers)
        };
        assert_eq!(of(b"text/event-stream"), Some(true));
        assert_eq!(of(b" \tText/Event-Stream; charset=utf-8"), Some(true));
        assert_eq!(of(b"application/json"), Some(false));
        assert_eq!(of(b"text/event"), Some(false));
        assert_eq!(of(b"text/event-stream; x=\xff"), Some(false));
        assert_eq!(of(b"\xfftext/event-stream"), Some(false));
        assert_eq!(is_event_stream(&HeaderMap::new()), None);
    }

    fn decode_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        for c in chunks {
            d.push(c);
            out.extend(std::iter::from_fn(|| d.next_event()));
        }
        d.finish();
        out.extend(std::iter::from_fn(|| d.next_event()));
        out
    }

    #[test]
    fn spec_examples() {
        let events = decode_all(&[b"data: YHOO\ndata: +2\ndata: 10\n\n"]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "YHOO\n+2\n10");
        let events = decode_all(&[b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"]);
        let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["first event", "second event", " third event"]);
        assert_eq!(events[0].id.as_deref(), Some("1"));
        assert_eq!(events[1].id.as_deref(), Some(""));
        let events = decode_all(&[b"data\n\ndata\ndata\n\ndata:"]);
        let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["", "\n", ""]);
    }

    #[test]
    fn crlf_split_between_chunks_and_bom() {
        let events = decode_all(&[b"\xEF\xBB\xBFevent: a\r", b"\ndata: x\r", b"\n\r", b"\n"]);
        assert_eq!(events, [SseEvent::new("a", "x")]);
    }

    #[test]
    fn bounded_decoder_drops_long_lines_and_keeps_little() {
        let long = "x".repeat(4096);
        let stream =
            format!("event: skipped\ndata: {long}\n\ndata: {long}\n\nevent: kept\ndata: small\n\n");
        let mut d = SseDecoder::new()
            .with_max_len(1024)
            .with_filter(|n| n == "kept");
        for chunk in stream.as_bytes().chunks(300) {
            d.push(chunk);
            assert!(d.line.capacity() <= 2048);
            assert!(d.data.len() <= 1024);
        }
        assert_eq!(d.next_event(), Some(SseEvent::new("kept", "small")));
        assert_eq!(d.next_event(), None);
    }

    #[test]
    fn a_skipped_event_is_not_copied_and_split_anywhere_decodes_the_same() {
        let stream: &[u8] = b"event: skipped\ndata: {\"text\":\"a long delta\"}\n\n\
            event: kept\ndata: one\ndata: two\n\nevent: skipped\r\ndata: x\r\n\r\n\
            event: kept\ndatum: ignored\ndata: three\n\n";
        let expected = [
            SseEvent::new("kept", "one\ntwo"),
            SseEvent::new("kept", "three"),
        ];
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let mut d = SseDecoder::new().with_filter(|n| n == "kept");
            d.push(a);
            // A skipped event's data line never reaches the line buffer (the
            // longest other line is 14 bytes).
            assert!(d.line.len() <= 14, "cut {cut}: {:?}", d.line);
            d.push(b);
            d.finish();
            let events: Vec<SseEvent> = std::iter::from_fn(|| d.next_event()).collect();
            assert_eq!(events, expected, "cut {cut}");
        }
    }

    #[test]
    fn encoder_splits_data_lines() {
        let e = SseEvent {
            event: Some("a\nb".into()),
            data: "1\r\n2\r3".into(),
            id: None,
            retry: Some(5),
        };
        assert_eq!(
            &e.to_bytes()[..],
            b"event: ab\nretry: 5\ndata: 1\ndata: 2\ndata: 3\n\n"
        );
    }
}
