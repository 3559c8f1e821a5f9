//! The emulator's own token counter and request reader.
//!
//! Deliberately *not* the client's estimator, so that a client estimating
//! with characters per token makes a real, measurable error, as it does
//! against the real API. Text is counted by a [`Tokenizer`]:
//! - [`Tokenizer::O200kBase`] (the default): a real byte-pair-encoding
//!   tokenizer, OpenAI's `o200k_base`, whose ranks are compiled into the
//!   emulator (nothing is downloaded); its counts are not Claude's, but they
//!   vary with the kind of text (code, prose, CJK, JSON, base64) as a real
//!   tokenizer's do;
//! - [`Tokenizer::Words`]: a word- and punctuation-based rule ([`count_text`]):
//!   a run of letters and digits (a "word") of `n` characters is `ceil(n / 4)`
//!   tokens, every other character that is not whitespace is 1 token.
//!
//! Around the text (deterministic, documented so tests and plots can reproduce it):
//! - each message adds [`MESSAGE_OVERHEAD`] tokens (its role framing);
//! - an image is [`IMAGE_TOKENS`] tokens whatever its size;
//! - a document with a base64 source is [`DOCUMENT_PAGE_TOKENS`] per started
//!   [`DOCUMENT_PAGE_CHARS`] characters of data; with a URL or file source, one page;
//!   with a text source, its text;
//! - a tool definition is counted as its JSON text (without `cache_control`);
//! - `tool_use` counts its name and its input as JSON text; `tool_result` counts its content;
//!   `thinking` its thinking text; any other block its JSON text;
//! - a [`TokenCounter`] with a scale other than 1 multiplies each piece's
//!   count (one per tool, system block or message block) by it, rounded to
//!   the nearest token: a model whose tokenizer the client does not know.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use http::request::Parts;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};

use super::rng::{fnv1a, FNV_OFFSET};
use tower_llm_limits::estimate::{Estimate, TokenEstimator};

/// Tokens added for each message (role framing).
pub const MESSAGE_OVERHEAD: u64 = 3;
/// Tokens charged for one image, whatever its size.
pub const IMAGE_TOKENS: u64 = 1_600;
/// Tokens charged per page of a base64 (PDF) document.
pub const DOCUMENT_PAGE_TOKENS: u64 = 2_000;
/// Characters of base64 data counted as one document page.
pub const DOCUMENT_PAGE_CHARS: usize = 100_000;

/// Counts the tokens of a text under the word rule ([`Tokenizer::Words`]).
///
/// # Examples
///
/// ```
/// use tower_llm_limits_emulator::count_text;
/// // "Hello" (5 chars -> 2), "," (1), "world" (2), "!" (1)
/// assert_eq!(count_text("Hello, world!"), 6);
/// assert_eq!(count_text("  "), 0);
/// ```
pub fn count_text(text: &str) -> u64 {
    let mut counter = TextCounter::default();
    counter.feed(text);
    counter.finish()
}

/// [`count_text`] over a text that arrives in pieces.
#[derive(Debug, Default)]
struct TextCounter {
    tokens: u64,
    /// Length of the current run of letters and digits.
    run: u64,
    /// The start of a character split between two pieces (at most 3 bytes).
    partial: Vec<u8>,
}

impl TextCounter {
    fn feed(&mut self, text: &str) {
        for c in text.chars() {
            if c.is_alphanumeric() {
                self.run += 1;
            } else {
                self.tokens += self.run.div_ceil(4);
                self.run = 0;
                if !c.is_whitespace() {
                    self.tokens += 1;
                }
            }
        }
    }

    /// Feeds UTF-8 bytes; a character split at the end waits for the next
    /// piece, and an invalid byte counts as one symbol (as U+FFFD would).
    fn feed_bytes(&mut self, mut bytes: &[u8]) {
        while !self.partial.is_empty() && !bytes.is_empty() {
            self.partial.push(bytes[0]);
            bytes = &bytes[1..];
            match std::str::from_utf8(&self.partial) {
                Ok(s) => {
                    let s = s.to_owned();
                    self.feed(&s);
                    self.partial.clear();
                }
                Err(e) if e.error_len().is_some() => {
                    self.feed("\u{FFFD}");
                    self.partial.clear();
                }
                Err(_) => {}
            }
        }
        while !bytes.is_empty() {
            match std::str::from_utf8(bytes) {
                Ok(s) => {
                    self.feed(s);
                    return;
                }
                Err(e) => {
                    let (valid, rest) = bytes.split_at(e.valid_up_to());
                    // `valid` is valid UTF-8 up to `valid_up_to`.
                    self.feed(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            self.feed("\u{FFFD}");
                            bytes = &rest[n..];
                        }
                        None => {
                            self.partial.extend_from_slice(rest);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn finish(&self) -> u64 {
        let partial = u64::from(!self.partial.is_empty());
        self.tokens + self.run.div_ceil(4) + partial
    }
}

impl std::io::Write for TextCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The rule the emulator counts text with.
///
/// # Examples
///
/// ```
/// use tower_llm_limits_emulator::Tokenizer;
///
/// assert_eq!(Tokenizer::default(), Tokenizer::O200kBase);
/// assert_eq!(Tokenizer::Words.count("Hello, world!"), 6);
/// assert_eq!(Tokenizer::O200kBase.count("Hello, world!"), 4);
/// assert_eq!("words".parse::<Tokenizer>(), Ok(Tokenizer::Words));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tokenizer {
    /// OpenAI's `o200k_base` byte-pair encoding (its ranks ship inside the
    /// emulator): a real tokenizer, independent of any client's estimator.
    #[default]
    O200kBase,
    /// The word rule of [`count_text`]: `ceil(n / 4)` tokens per word of `n`
    /// letters and digits, one per other non-space character.
    Words,
}

impl Tokenizer {
    /// Both tokenizers, in the order `--help` lists them.
    pub const ALL: [Tokenizer; 2] = [Tokenizer::O200kBase, Tokenizer::Words];

    /// Its name on a command line and in reports: `o200k` or `words`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Tokenizer::O200kBase => "o200k",
            Tokenizer::Words => "words",
        }
    }

    /// The tokens of `text` under this tokenizer.
    pub fn count(self, text: &str) -> u64 {
        match self {
            Tokenizer::Words => count_text(text),
            Tokenizer::O200kBase => count_bpe(text),
        }
    }
}

impl fmt::Display for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tokenizer name that is neither `o200k` nor `words`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownTokenizer(pub String);

impl fmt::Display for UnknownTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown tokenizer {:?}: expected o200k or words", self.0)
    }
}

impl std::error::Error for UnknownTokenizer {}

impl FromStr for Tokenizer {
    type Err = UnknownTokenizer;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "o200k" | "o200k_base" | "bpe" => Ok(Tokenizer::O200kBase),
            "words" => Ok(Tokenizer::Words),
            _ => Err(UnknownTokenizer(s.to_string())),
        }
    }
}

/// The `o200k_base` encoder, built once per process from the ranks compiled
/// into the crate; `None` if they could not be read (then the word rule
/// counts, and an error is logged once).
fn bpe() -> Option<&'static tiktoken_rs::CoreBPE> {
    static BPE: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| match tiktoken_rs::o200k_base() {
        Ok(bpe) => Some(bpe),
        Err(e) => {
            tracing::error!(error = %e, "emulator: o200k_base failed to load; counting words");
            None
        }
    })
    .as_ref()
}

/// Texts at least this long are remembered by [`count_bpe`] (shorter ones
/// cost less to count than to look up).
const MEMO_MIN_BYTES: usize = 512;
/// The most texts [`count_bpe`] remembers; past it the memo starts afresh.
const MEMO_MAX_ENTRIES: usize = 16_384;
/// Texts longer than this are encoded in pieces of about this size, cut
/// before a space, so that encoding holds a bounded amount of memory.
const BPE_PIECE_BYTES: usize = 64 * 1024;

/// Counts under `o200k_base`, remembering long texts' counts (a
/// conversation resends its earlier turns, and every strategy of a
/// simulation the same bodies).
fn count_bpe(text: &str) -> u64 {
    static MEMO: OnceLock<Mutex<HashMap<(u64, usize), u64>>> = OnceLock::new();
    let Some(bpe) = bpe() else {
        return count_text(text);
    };
    if text.len() < MEMO_MIN_BYTES {
        return bpe.encode_ordinary(text).len() as u64;
    }
    let key = (fnv1a(FNV_OFFSET, text.as_bytes()), text.len());
    let memo = MEMO.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&n) = memo.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return n;
    }
    let mut n = 0u64;
    let mut rest = text;
    while !rest.is_empty() {
        let cut = piece_end(rest, BPE_PIECE_BYTES);
        n += bpe.encode_ordinary(&rest[..cut]).len() as u64;
        rest = &rest[cut..];
    }
    let mut memo = memo.lock().unwrap_or_else(|e| e.into_inner());
    if memo.len() >= MEMO_MAX_ENTRIES {
        memo.clear();
    }
    memo.insert(key, n);
    n
}

/// Where the next piece of `text` ends: all of it when it is at most `max`
/// bytes, else before the last space of its first `max` bytes (or at a
/// character boundary when there is none).
fn piece_end(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text[..end].rfind(' ') {
        Some(space) if space > 0 => space,
        _ => end.max(1),
    }
}

/// FNV-1a over the bytes written to it, without keeping them.
struct HashWriter(u64);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = fnv1a(self.0, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A JSON object serialized without its `cache_control` field, in place of a
/// copy of the object without it (same bytes, same order).
struct Stripped<'a>(&'a Map<String, Value>);

impl Serialize for Stripped<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let len = self.0.len() - usize::from(self.0.contains_key("cache_control"));
        let mut map = serializer.serialize_map(Some(len))?;
        for (key, value) in self.0 {
            if key != "cache_control" {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

/// How long a prompt-cache entry lives after its last use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheTtl {
    /// `"ttl": "5m"` (the default).
    FiveMinutes,
    /// `"ttl": "1h"`.
    OneHour,
}

/// One piece of the prompt, in cache order (tools, then system, then messages).
#[derive(Debug, Clone)]
pub(crate) struct Unit {
    /// Its tokens.
    pub(crate) tokens: u64,
    /// Hash of the whole prefix up to and including this unit (and the model).
    pub(crate) prefix_hash: u64,
    /// A `cache_control` breakpoint on this unit.
    pub(crate) breakpoint: Option<CacheTtl>,
}

/// A request read and validated.
#[derive(Debug, Clone)]
pub(crate) struct ParsedRequest {
    pub(crate) model: String,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) stream: bool,
    pub(crate) units: Vec<Unit>,
    /// Sum of the units' tokens.
    pub(crate) total_tokens: u64,
    /// Hash of the whole body, for per-request draws that must not depend on order.
    pub(crate) content_hash: u64,
}

/// Which endpoint a body is validated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Messages,
    CountTokens,
}

/// The largest `max_tokens` the emulator accepts: the largest output limit of
/// any model (128k, with the extended-output beta). The API answers a larger
/// value with a 400; so does the emulator, for every model.
pub(crate) const MAX_OUTPUT_TOKENS: u64 = 128_000;

/// JSON values any body may hold, whatever its size (see [`value_budget`]).
pub(crate) const VALUE_BUDGET_FLOOR: u64 = 10_000;
/// Bytes of body per JSON value allowed beyond [`VALUE_BUDGET_FLOOR`].
pub(crate) const BYTES_PER_VALUE: u64 = 16;

/// The most JSON values (scalars, arrays, objects; not keys) a body of `len`
/// bytes may hold: [`VALUE_BUDGET_FLOOR`] plus one per [`BYTES_PER_VALUE`]
/// bytes. A value read into a tree costs 32 bytes or more, so a body of tiny
/// values (`[0,0,0,...]`, 2 bytes each) would take 16 times its size and
/// more; under the budget the tree stays within a few times the body.
/// Prompts are mostly text, far below the budget.
pub(crate) fn value_budget(len: usize) -> u64 {
    VALUE_BUDGET_FLOOR + len as u64 / BYTES_PER_VALUE
}

/// Counts a body's JSON values without building them, in memory bounded by
/// its nesting (serde_json's recursion limit); `Err` when they exceed
/// [`value_budget`]. A body that is not JSON passes: the parser that follows
/// reports its error.
fn check_value_budget(body: &[u8]) -> Result<(), String> {
    let budget = value_budget(body.len());
    let mut left = budget;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    match (ValueCounter { left: &mut left }).deserialize(&mut deserializer) {
        // Only the counter raises a data error (a syntax error is not one).
        Err(e) if e.is_data() => Err(format!(
            "The request body holds more than {budget} JSON values, the most the emulator \
             reads from a body of {} bytes ({VALUE_BUDGET_FLOOR} plus one per \
             {BYTES_PER_VALUE} bytes)",
            body.len()
        )),
        _ => Ok(()),
    }
}

/// A streaming pass over one JSON value that counts it and what it holds
/// against a budget, keeping none of it.
struct ValueCounter<'a> {
    left: &'a mut u64,
}

impl ValueCounter<'_> {
    fn take<E: serde::de::Error>(&mut self) -> Result<(), E> {
        match self.left.checked_sub(1) {
            Some(left) => {
                *self.left = left;
                Ok(())
            }
            None => Err(E::custom("too many JSON values")),
        }
    }
}

impl<'de> DeserializeSeed<'de> for ValueCounter<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueCounter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(mut self, _: bool) -> Result<(), E> {
        self.take()
    }

    fn visit_i64<E: serde::de::Error>(mut self, _: i64) -> Result<(), E> {
        self.take()
    }

    fn visit_u64<E: serde::de::Error>(mut self, _: u64) -> Result<(), E> {
        self.take()
    }

    fn visit_f64<E: serde::de::Error>(mut self, _: f64) -> Result<(), E> {
        self.take()
    }

    fn visit_str<E: serde::de::Error>(mut self, _: &str) -> Result<(), E> {
        self.take()
    }

    fn visit_unit<E: serde::de::Error>(mut self) -> Result<(), E> {
        self.take()
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.take()?;
        while seq
            .next_element_seed(ValueCounter {
                left: &mut *self.left,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.take()?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(ValueCounter {
                left: &mut *self.left,
            })?;
        }
        Ok(())
    }
}

/// Reads and validates a request body; `Err` carries the `invalid_request_error` message.
///
/// Fields are checked in the API's order: `model`, `max_tokens`, `stream`,
/// `messages`, then the prompt in cache order (tools, system, messages).
/// A body with more JSON values than [`value_budget`] allows is refused
/// before it is read into a tree.
pub(crate) fn parse_request(
    body: &[u8],
    endpoint: Endpoint,
    counter: &TokenCounter,
) -> Result<ParsedRequest, String> {
    check_value_budget(body)?;
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("There was an error parsing the body of your request: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "Input should be a valid dictionary or object".to_string())?;
    let model = read_model(obj)?;
    let max_tokens = read_max_tokens(obj, endpoint, &model)?;
    let stream = read_stream(obj)?;
    let messages = read_messages(obj)?;

    let mut builder = UnitBuilder::new(&model, *counter);
    builder.tools(obj.get("tools"))?;
    builder.system(obj.get("system"))?;
    for (i, message) in messages.iter().enumerate() {
        builder.message(message, &format!("messages.{i}"))?;
    }

    let total_tokens = builder.units.iter().map(|u| u.tokens).sum();
    Ok(ParsedRequest {
        model,
        max_tokens,
        stream,
        units: builder.units,
        total_tokens,
        content_hash: fnv1a(FNV_OFFSET, body),
    })
}

fn read_model(obj: &Map<String, Value>) -> Result<String, String> {
    match obj.get("model") {
        None | Some(Value::Null) => Err("model: Field required".into()),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err("model: String should have at least 1 character".into())
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err("model: Input should be a valid string".into()),
    }
}

/// `max_tokens`: required by `messages`, optional (and ignored) for
/// `count_tokens`, from 1 to [`MAX_OUTPUT_TOKENS`].
fn read_max_tokens(
    obj: &Map<String, Value>,
    endpoint: Endpoint,
    model: &str,
) -> Result<Option<u64>, String> {
    let v = match (obj.get("max_tokens"), endpoint) {
        (None | Some(Value::Null), Endpoint::Messages) => {
            return Err("max_tokens: Field required".into())
        }
        (None | Some(Value::Null), Endpoint::CountTokens) => return Ok(None),
        (Some(v), _) => v,
    };
    match v.as_u64() {
        Some(0) => Err("max_tokens: Input should be greater than or equal to 1".into()),
        Some(n) if n > MAX_OUTPUT_TOKENS => Err(format!(
            "max_tokens: {n} > {MAX_OUTPUT_TOKENS}, which is the maximum allowed number of output tokens for {model}"
        )),
        Some(n) => Ok(Some(n)),
        None if v.as_i64().is_some() => {
            Err("max_tokens: Input should be greater than or equal to 1".into())
        }
        None => Err("max_tokens: Input should be a valid integer".into()),
    }
}

fn read_stream(obj: &Map<String, Value>) -> Result<bool, String> {
    match obj.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err("stream: Input should be a valid boolean".into()),
    }
}

fn read_messages(obj: &Map<String, Value>) -> Result<&Vec<Value>, String> {
    let messages = match obj.get("messages") {
        None | Some(Value::Null) => return Err("messages: Field required".into()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err("messages: Input should be a valid list".into()),
    };
    if messages.is_empty() {
        return Err("messages: at least one message is required".into());
    }
    Ok(messages)
}

/// `obj` as a JSON object, or the API's error for `path`.
fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{path}: Input should be a valid dictionary"))
}

/// The prompt's units in cache order, each with the hash of the prefix up to it.
struct UnitBuilder {
    hash: u64,
    units: Vec<Unit>,
    counter: TokenCounter,
}

impl UnitBuilder {
    fn new(model: &str, counter: TokenCounter) -> Self {
        UnitBuilder {
            hash: fnv1a(FNV_OFFSET, model.as_bytes()),
            units: Vec::new(),
            counter,
        }
    }

    /// Adds a unit of `tokens` (before the counter's scale); `canonical`
    /// (its JSON text) extends the prefix hash.
    fn push<T: Serialize + ?Sized>(
        &mut self,
        tokens: u64,
        canonical: &T,
        breakpoint: Option<CacheTtl>,
    ) {
        let mut hash = HashWriter(self.hash ^ 0xFF);
        // Serializing a JSON tree into a writer that cannot fail does not fail.
        let _ = serde_json::to_writer(&mut hash, canonical);
        self.hash = hash.0;
        self.units.push(Unit {
            tokens: self.counter.scaled(tokens),
            prefix_hash: self.hash,
            breakpoint,
        });
    }

    /// The tool definitions, each counted as its JSON text.
    fn tools(&mut self, tools: Option<&Value>) -> Result<(), String> {
        let tools = match tools {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(tools)) => tools,
            Some(_) => return Err("tools: Input should be a valid list".into()),
        };
        for (i, tool) in tools.iter().enumerate() {
            let path = format!("tools.{i}");
            let tool = object(tool, &path)?;
            let ttl = breakpoint(tool, &path)?;
            let stripped = Stripped(tool);
            self.push(count_json(&self.counter, &stripped), &stripped, ttl);
        }
        Ok(())
    }

    /// The system prompt: a string, or a list of blocks.
    fn system(&mut self, system: Option<&Value>) -> Result<(), String> {
        let blocks = match system {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::String(s)) => {
                self.push(self.counter.text(s), s.as_str(), None);
                return Ok(());
            }
            Some(Value::Array(blocks)) => blocks,
            Some(_) => return Err("system: Input should be a valid string or list".into()),
        };
        for (i, block) in blocks.iter().enumerate() {
            let path = format!("system.{i}");
            let block = object(block, &path)?;
            let tokens = count_block(&self.counter, block, &path)?;
            let ttl = breakpoint(block, &path)?;
            self.push(tokens, &Stripped(block), ttl);
        }
        Ok(())
    }

    /// One message: its role framing ([`MESSAGE_OVERHEAD`], hashed with the
    /// first block) and its content, a string or a list of blocks.
    fn message(&mut self, message: &Value, path: &str) -> Result<(), String> {
        let message = object(message, path)?;
        let role = match message.get("role") {
            Some(Value::String(r)) if r == "user" || r == "assistant" => r.as_str(),
            None => return Err(format!("{path}.role: Field required")),
            Some(_) => {
                return Err(format!(
                    "{path}.role: Input should be 'user' or 'assistant'"
                ))
            }
        };
        let blocks = match message.get("content") {
            None | Some(Value::Null) => return Err(format!("{path}.content: Field required")),
            Some(Value::String(s)) => {
                // A pair serializes as the JSON list `[role, content]`.
                self.push(MESSAGE_OVERHEAD + self.counter.text(s), &(role, s), None);
                return Ok(());
            }
            Some(Value::Array(blocks)) => blocks,
            Some(_) => {
                return Err(format!(
                    "{path}.content: Input should be a valid string or list"
                ))
            }
        };
        if blocks.is_empty() {
            self.push(MESSAGE_OVERHEAD, role, None);
        }
        for (j, block) in blocks.iter().enumerate() {
            let bpath = format!("{path}.content.{j}");
            let block = object(block, &bpath)?;
            let mut tokens = count_block(&self.counter, block, &bpath)?;
            let ttl = breakpoint(block, &bpath)?;
            let stripped = Stripped(block);
            if j == 0 {
                tokens += MESSAGE_OVERHEAD;
                self.push(tokens, &(role, stripped), ttl);
            } else {
                self.push(tokens, &stripped, ttl);
            }
        }
        Ok(())
    }
}

fn breakpoint(obj: &Map<String, Value>, path: &str) -> Result<Option<CacheTtl>, String> {
    match obj.get("cache_control") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(cc)) => {
            match cc.get("type") {
                Some(Value::String(t)) if t == "ephemeral" => {}
                _ => {
                    return Err(format!(
                        "{path}.cache_control.type: Input should be 'ephemeral'"
                    ))
                }
            }
            match cc.get("ttl") {
                None | Some(Value::Null) => Ok(Some(CacheTtl::FiveMinutes)),
                Some(Value::String(t)) if t == "5m" => Ok(Some(CacheTtl::FiveMinutes)),
                Some(Value::String(t)) if t == "1h" => Ok(Some(CacheTtl::OneHour)),
                Some(_) => Err(format!(
                    "{path}.cache_control.ttl: Input should be '5m' or '1h'"
                )),
            }
        }
        Some(_) => Err(format!(
            "{path}.cache_control: Input should be a valid dictionary"
        )),
    }
}

/// The count of a value's JSON text (under the word rule, without writing
/// the text out).
fn count_json<T: Serialize + ?Sized>(c: &TokenCounter, value: &T) -> u64 {
    match c.tokenizer {
        Tokenizer::Words => {
            let mut counter = TextCounter::default();
            // Serializing a JSON tree into a writer that cannot fail does not fail.
            let _ = serde_json::to_writer(&mut counter, value);
            counter.finish()
        }
        Tokenizer::O200kBase => {
            // Serializing a JSON tree into a string does not fail.
            let text = serde_json::to_string(value).unwrap_or_default();
            c.text(&text)
        }
    }
}

fn str_field<'a>(
    block: &'a Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<&'a str, String> {
    match block.get(field) {
        Some(Value::String(s)) => Ok(s),
        None => Err(format!("{path}.{field}: Field required")),
        Some(_) => Err(format!("{path}.{field}: Input should be a valid string")),
    }
}

/// Counts one content block (validating what the count depends on).
fn count_block(c: &TokenCounter, block: &Map<String, Value>, path: &str) -> Result<u64, String> {
    let kind = str_field(block, "type", path)?;
    match kind {
        "text" => Ok(c.text(str_field(block, "text", path)?)),
        "image" => Ok(IMAGE_TOKENS),
        "document" => count_document(c, block, path),
        "tool_use" | "server_tool_use" => {
            let name = block.get("name").and_then(Value::as_str).unwrap_or("");
            let input = block.get("input").map_or(0, |v| count_json(c, v));
            Ok(c.text(name) + input)
        }
        "tool_result" => match block.get("content") {
            None | Some(Value::Null) => Ok(0),
            Some(Value::String(s)) => Ok(c.text(s)),
            Some(Value::Array(blocks)) => count_blocks(c, blocks, &format!("{path}.content")),
            Some(_) => Err(format!(
                "{path}.content: Input should be a valid string or list"
            )),
        },
        "thinking" => Ok(c.text(block.get("thinking").and_then(Value::as_str).unwrap_or(""))),
        "redacted_thinking" => Ok(c.text(block.get("data").and_then(Value::as_str).unwrap_or(""))),
        _ => Ok(count_json(c, &Stripped(block))),
    }
}

/// Counts a list of content blocks at `path` (`path.0`, `path.1`, ...).
fn count_blocks(c: &TokenCounter, blocks: &[Value], path: &str) -> Result<u64, String> {
    let mut sum = 0;
    for (k, b) in blocks.iter().enumerate() {
        let bpath = format!("{path}.{k}");
        sum += count_block(c, object(b, &bpath)?, &bpath)?;
    }
    Ok(sum)
}

/// A document block: its source (text, content blocks, base64 pages, or one
/// page for a URL or file), plus its title and context.
fn count_document(c: &TokenCounter, block: &Map<String, Value>, path: &str) -> Result<u64, String> {
    let source = block
        .get("source")
        .and_then(Value::as_object)
        .ok_or_else(|| format!("{path}.source: Field required"))?;
    let mut tokens = match source.get("type").and_then(Value::as_str) {
        Some("text") => c.text(source.get("data").and_then(Value::as_str).unwrap_or("")),
        Some("content") => match source.get("content") {
            Some(Value::String(s)) => c.text(s),
            Some(Value::Array(blocks)) => {
                count_blocks(c, blocks, &format!("{path}.source.content"))?
            }
            _ => 0,
        },
        Some("base64") => {
            let len = source
                .get("data")
                .and_then(Value::as_str)
                .map_or(0, str::len);
            DOCUMENT_PAGE_TOKENS * (len.div_ceil(DOCUMENT_PAGE_CHARS).max(1) as u64)
        }
        _ => DOCUMENT_PAGE_TOKENS,
    };
    for field in ["title", "context"] {
        if let Some(Value::String(s)) = block.get(field) {
            tokens += c.text(s);
        }
    }
    Ok(tokens)
}

/// The emulator's token counter: a [`Tokenizer`] and a scale. Also a
/// [`TokenEstimator`]: a perfect estimate of what an emulator with the same
/// counter will count, without its prompt-cache state (cache reads are
/// counted as uncached input).
///
/// Useful as the "oracle" beside a real estimator in a simulation, and to
/// compute true counts in tests. It is not what a client of the real API can
/// know.
///
/// # Examples
///
/// ```
/// use tower_llm_limits_emulator::{TokenCounter, Tokenizer};
///
/// let body = br#"{"model":"claude-sonnet-4-5","max_tokens":10,
///     "messages":[{"role":"user","content":"Hello, world!"}]}"#;
/// // 6 tokens of text under the word rule + 3 for the message
/// assert_eq!(TokenCounter::words().count_request(body), Ok(9));
/// // 4 under o200k_base (the default) + 3
/// assert_eq!(TokenCounter::default().count_request(body), Ok(7));
/// // A model whose tokenizer counts 30% more.
/// let more = TokenCounter::new(Tokenizer::O200kBase).with_scale(1.3)?;
/// assert_eq!(more.count_request(body), Ok(9)); // round(7 * 1.3)
/// # Ok::<(), tower_llm_limits_emulator::InvalidScale>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenCounter {
    tokenizer: Tokenizer,
    scale: f64,
}

impl Default for TokenCounter {
    /// `o200k_base`, scale 1.
    fn default() -> Self {
        TokenCounter::new(Tokenizer::default())
    }
}

/// A token scale that is not a finite number above 0 (and at most 100).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InvalidScale(pub f64);

impl fmt::Display for InvalidScale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "token scale {} is not a number above 0 and at most {MAX_TOKEN_SCALE}",
            self.0
        )
    }
}

impl std::error::Error for InvalidScale {}

/// The largest token scale a [`TokenCounter`] takes.
pub const MAX_TOKEN_SCALE: f64 = 100.0;

impl TokenCounter {
    /// Counts with `tokenizer`, scale 1.
    pub const fn new(tokenizer: Tokenizer) -> Self {
        TokenCounter {
            tokenizer,
            scale: 1.0,
        }
    }

    /// Counts with the word rule ([`count_text`]), scale 1.
    pub const fn words() -> Self {
        TokenCounter::new(Tokenizer::Words)
    }

    /// With every count multiplied by `scale` (per prompt piece, rounded to
    /// the nearest token): a model whose tokenizer counts `scale` times what
    /// this one does.
    ///
    /// # Errors
    ///
    /// [`InvalidScale`] when `scale` is not finite, not above 0 or above
    /// [`MAX_TOKEN_SCALE`].
    pub fn with_scale(mut self, scale: f64) -> Result<Self, InvalidScale> {
        if !(scale.is_finite() && scale > 0.0 && scale <= MAX_TOKEN_SCALE) {
            return Err(InvalidScale(scale));
        }
        self.scale = scale;
        Ok(self)
    }

    /// Its tokenizer.
    pub const fn tokenizer(&self) -> Tokenizer {
        self.tokenizer
    }

    /// Its scale.
    pub const fn scale(&self) -> f64 {
        self.scale
    }

    /// Loads the tokenizer's tables now (`o200k_base` builds them on first
    /// use, which takes a moment), so that no request waits for them.
    pub(crate) fn warm(&self) {
        if self.tokenizer == Tokenizer::O200kBase {
            let _ = bpe();
        }
    }

    /// The tokens of a text under the tokenizer, before the scale.
    fn text(&self, text: &str) -> u64 {
        self.tokenizer.count(text)
    }

    /// `tokens` times the scale, rounded to the nearest token.
    fn scaled(&self, tokens: u64) -> u64 {
        if self.scale == 1.0 {
            tokens
        } else {
            (tokens as f64 * self.scale).round() as u64
        }
    }

    /// Counts the input tokens of a Messages (or count_tokens) request body,
    /// without cache state: what `POST /v1/messages/count_tokens` answers.
    ///
    /// # Errors
    ///
    /// The `invalid_request_error` message the emulator would answer with,
    /// when the body is not a valid request.
    pub fn count_request(&self, body: &[u8]) -> Result<u64, String> {
        parse_request(body, Endpoint::CountTokens, self).map(|p| p.total_tokens)
    }
}

impl TokenEstimator for TokenCounter {
    fn estimate(&self, parts: &Parts, body: &[u8]) -> Estimate {
        match parse_request(body, Endpoint::CountTokens, self) {
            Ok(p) => Estimate {
                model: Some(p.model.into()),
                input_tokens: p.total_tokens,
                raw_input_tokens: p.total_tokens,
                cache_read_tokens: 0,
                max_tokens: p.max_tokens,
                stream: p.stream,
                fallback: false,
                ..Estimate::default()
            },
            Err(_) => self.estimate_unbuffered(parts, Some(body.len() as u64)),
        }
    }

    fn estimate_unbuffered(&self, _parts: &Parts, body_len: Option<u64>) -> Estimate {
        // At most one token per byte under either tokenizer, times the scale.
        let bound = self.scaled(body_len.unwrap_or(0));
        Estimate {
            model: None,
            input_tokens: bound,
            raw_input_tokens: bound,
            cache_read_tokens: 0,
            max_tokens: None,
            stream: false,
            fallback: true,
            ..Estimate::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: TokenCounter = TokenCounter::words();

    #[test]
    fn words_and_punctuation() {
        assert_eq!(count_text(""), 0);
        assert_eq!(count_text("a"), 1);
        assert_eq!(count_text("abcd"), 1);
        assert_eq!(count_text("abcde"), 2);
        assert_eq!(count_text("a.b"), 3);
        assert_eq!(count_text("snake_case"), 2 + 1 + 1);
        assert_eq!(count_text("été déjà"), 2);
    }

    #[test]
    fn request_units_and_breakpoints() {
        let body = br#"{"model":"m","max_tokens":5,
            "tools":[{"name":"get","input_schema":{"type":"object"}}],
            "system":[{"type":"text","text":"abcd abcd","cache_control":{"type":"ephemeral"}}],
            "messages":[{"role":"user","content":[
                {"type":"text","text":"hi","cache_control":{"type":"ephemeral","ttl":"1h"}},
                {"type":"image","source":{"type":"base64","media_type":"image/png","data":"xx"}}]}]}"#;
        let p = parse_request(body, Endpoint::Messages, &W).unwrap();
        assert_eq!(p.units.len(), 4);
        assert_eq!(p.units[1].tokens, 2);
        assert_eq!(p.units[1].breakpoint, Some(CacheTtl::FiveMinutes));
        assert_eq!(p.units[2].tokens, 1 + MESSAGE_OVERHEAD);
        assert_eq!(p.units[2].breakpoint, Some(CacheTtl::OneHour));
        assert_eq!(p.units[3].tokens, IMAGE_TOKENS);
        assert_eq!(
            p.total_tokens,
            p.units.iter().map(|u| u.tokens).sum::<u64>()
        );
        assert!(!p.stream);
    }

    #[test]
    fn prefix_hash_ignores_cache_control_but_not_content() {
        let a = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text","text":"x","cache_control":{"type":"ephemeral"}}]}]}"#;
        let b = br#"{"model":"m","max_tokens":9,"messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#;
        let c = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text","text":"y"}]}]}"#;
        let d = br#"{"model":"n","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#;
        let h = |b: &[u8]| parse_request(b, Endpoint::Messages, &W).unwrap().units[0].prefix_hash;
        assert_eq!(h(a), h(b));
        assert_ne!(h(a), h(c));
        assert_ne!(h(a), h(d));
    }

    #[test]
    fn validation_messages() {
        let cases: [(&[u8], &str); 8] = [
            (b"{", "error parsing"),
            (b"[]", "dictionary"),
            (br#"{"max_tokens":1,"messages":[]}"#, "model: Field required"),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#, "max_tokens: Field required"),
            (br#"{"model":"m","max_tokens":"9","messages":[]}"#, "max_tokens: Input should be a valid integer"),
            (br#"{"model":"m","max_tokens":1}"#, "messages: Field required"),
            (br#"{"model":"m","max_tokens":1,"messages":[{"role":"bot","content":"x"}]}"#, "messages.0.role"),
            (br#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"text","text":"x","cache_control":{"type":"ephemeral","ttl":"2h"}}]}]}"#, "ttl"),
        ];
        for (body, want) in cases {
            let err = parse_request(body, Endpoint::Messages, &W).unwrap_err();
            assert!(err.contains(want), "{err} should contain {want}");
        }
        // count_tokens does not need max_tokens
        let ok = br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#;
        assert!(parse_request(ok, Endpoint::CountTokens, &W).is_ok());
    }

    /// The streamed count and hash give what the text written out would.
    #[test]
    fn streamed_count_and_hash_match_the_written_text() {
        let block = serde_json::json!({"type":"x","b":[1,2.5,"é\u{1}\"q"],"a":{"z":null},
            "cache_control":{"type":"ephemeral"},"text":"naïve façade — 日本語 ok"});
        let map = block.as_object().unwrap();
        let mut copy = map.clone();
        copy.remove("cache_control");
        let copy = Value::Object(copy);
        let text = serde_json::to_string(&copy).unwrap();
        assert_eq!(count_json(&W, &Stripped(map)), count_text(&text));
        let bpe = TokenCounter::default();
        assert_eq!(count_json(&bpe, &Stripped(map)), bpe.text(&text));
        let mut hash = HashWriter(7);
        serde_json::to_writer(&mut hash, &("user", Stripped(map))).unwrap();
        let pair = serde_json::to_vec(&Value::Array(vec![Value::from("user"), copy])).unwrap();
        assert_eq!(hash.0, fnv1a(7, &pair));
        // Split anywhere, even inside a character.
        let bytes = text.as_bytes();
        for at in 0..=bytes.len() {
            let mut counter = TextCounter::default();
            counter.feed_bytes(&bytes[..at]);
            counter.feed_bytes(&bytes[at..]);
            assert_eq!(counter.finish(), count_text(&text), "split at {at}");
        }
    }

    #[test]
    fn documents_by_pages() {
        let data = "A".repeat(DOCUMENT_PAGE_CHARS + 1);
        let body = serde_json::json!({"model":"m","max_tokens":1,"messages":[{"role":"user","content":[
            {"type":"document","source":{"type":"base64","media_type":"application/pdf","data":data}}]}]});
        let p = parse_request(&serde_json::to_vec(&body).unwrap(), Endpoint::Messages, &W).unwrap();
        assert_eq!(p.total_tokens, 2 * DOCUMENT_PAGE_TOKENS + MESSAGE_OVERHEAD);
    }
}
