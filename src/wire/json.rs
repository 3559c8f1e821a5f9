//! A JSON scanner over `&[u8]` that walks values without building them, and
//! [`UsageScanner`], which finds a response's top-level `usage` object in a
//! body that arrives in chunks.
//!
//! [`Scanner`] is what the estimator reads requests with: skip whitespace,
//! find the end of a string while counting its characters (ASCII and
//! non-ASCII apart, escapes decoded only as far as counting needs), skip any
//! value (optionally counting the characters of every string inside), and read
//! small scalars. Strings are scanned sixteen and eight bytes at a time (SWAR:
//! a `u64` word tests for `"` and `\` and counts UTF-8 lead bytes with a few
//! integer operations), which is what lets it run at memory speed on text.
//!
//! The scanner is lenient where leniency cannot crash or loop: it does not
//! validate numbers or UTF-8, and it checks structure only as far as walking
//! needs (balanced brackets, quotes). Every malformed input ends in `Err`.
//!
//! # Examples
//!
//! ```
//! use tower_llm_limits::wire::json::{Chars, Scanner};
//!
//! let body = r#"{"model": "claude-sonnet-4-5", "max_tokens": 512, "system": "héllo"}"#;
//! let mut sc = Scanner::new(body.as_bytes());
//! sc.expect(b'{')?;
//! let mut max_tokens = None;
//! let mut text = Chars::default();
//! loop {
//!     match sc.key()? {
//!         b"max_tokens" => max_tokens = sc.u64_value()?,
//!         b"system" => text.add(sc.string(true)?.1),
//!         _ => sc.skip_value(None)?,
//!     }
//!     if !sc.next_or_close(b'}')? {
//!         break;
//!     }
//! }
//! assert_eq!(max_tokens, Some(512));
//! assert_eq!((text.ascii, text.non_ascii), (4, 1));
//! assert!(sc.is_at_end());
//! # Ok::<(), tower_llm_limits::wire::json::Malformed>(())
//! ```

use crate::wire::usage::Usage;
use crate::wire::usage_read::read_usage;

/// The scanner met something it cannot walk (the body is not JSON, or is cut short).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("malformed JSON")
    }
}

impl std::error::Error for Malformed {}

/// The result of a scanner step.
pub type Result<T> = std::result::Result<T, Malformed>;

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// Deepest nesting `skip_value` walks (serde_json's default limit is 128).
const MAX_DEPTH: u32 = 512;

/// Characters counted in text, split by kind because they tokenize differently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Chars {
    /// ASCII characters (an escape such as `\n` counts as one).
    pub ascii: u64,
    /// Non-ASCII characters (UTF-8 lead bytes, or `\u` escapes above 0x7f).
    pub non_ascii: u64,
}

impl Chars {
    /// Adds `other`'s counts (saturating).
    pub fn add(&mut self, other: Chars) {
        self.ascii = self.ascii.saturating_add(other.ascii);
        self.non_ascii = self.non_ascii.saturating_add(other.non_ascii);
    }
}

/// Where a string's contents lie: `bytes[start..end]`, without the quotes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    /// The index of the first byte after the opening quote.
    pub start: usize,
    /// The index of the closing quote.
    pub end: usize,
    /// True when the contents hold at least one backslash escape.
    pub escaped: bool,
}

/// Skips sixteen bytes at a time while no quote or backslash is in sight;
/// returns where it stopped. A pure-ASCII pair costs one test; other pairs
/// add to per-byte-lane counters (no popcount per word), summed at the end
/// and every 127 pairs, before a lane could overflow.
#[inline(always)]
fn skip_plain_pairs(b: &[u8], mut i: usize, count: bool, c: &mut Chars) -> usize {
    let mut lanes_high = 0u64;
    let mut lanes_lead = 0u64;
    let mut pairs = 0u32;
    let mut fast = 0u64;
    while let Some(chunk) = b.get(i..i.saturating_add(16)) {
        let (w0, w1) = chunk.split_at(8);
        let (Ok(w0), Ok(w1)) = (<[u8; 8]>::try_from(w0), <[u8; 8]>::try_from(w1)) else {
            break;
        };
        let (w0, w1) = (u64::from_le_bytes(w0), u64::from_le_bytes(w1));
        let special =
            has_byte(w0, b'"') | has_byte(w0, b'\\') | has_byte(w1, b'"') | has_byte(w1, b'\\');
        if special != 0 {
            break;
        }
        i += 16;
        if count {
            fast += 16;
            if (w0 | w1) & HI != 0 {
                lanes_high += ((w0 >> 7) & LO) + ((w1 >> 7) & LO);
                lanes_lead += (((w0 & (w0 << 1)) >> 7) & LO) + (((w1 & (w1 << 1)) >> 7) & LO);
                pairs += 1;
                if pairs == 127 {
                    let high = lane_sum(lanes_high);
                    c.ascii += fast - high;
                    c.non_ascii += lane_sum(lanes_lead);
                    (lanes_high, lanes_lead, pairs, fast) = (0, 0, 0, 0);
                }
            }
        }
    }
    if count {
        let high = lane_sum(lanes_high);
        c.ascii += fast - high;
        c.non_ascii += lane_sum(lanes_lead);
    }
    i
}

/// Skips eight bytes at a time while no quote or backslash is in sight; at
/// the word that holds one, counts the bytes before it and stops there (the
/// lowest flagged byte is exact: false positives of the zero-byte test only
/// appear above a true match). Returns where it stopped.
#[inline(always)]
fn skip_plain_words(b: &[u8], mut i: usize, count: bool, c: &mut Chars) -> usize {
    while let Some(w) = word_at(b, i) {
        let special = has_byte(w, b'"') | has_byte(w, b'\\');
        if special == 0 {
            if count {
                count_word(w, c);
            }
            i += 8;
            continue;
        }
        let bits = special.trailing_zeros() & !7;
        if count && bits > 0 {
            count_masked(w, (1u64 << bits) - 1, c);
        }
        return i + (bits / 8) as usize;
    }
    i
}

#[inline(always)]
fn has_byte(w: u64, b: u8) -> u64 {
    let x = w ^ (LO.wrapping_mul(u64::from(b)));
    x.wrapping_sub(LO) & !x & HI
}

#[inline(always)]
fn count_word(w: u64, c: &mut Chars) {
    let hi = w & HI;
    if hi == 0 {
        c.ascii += 8;
    } else {
        c.ascii += u64::from((!w & HI).count_ones());
        // Lead bytes of multi-byte sequences: bits 7 and 6 set.
        c.non_ascii += u64::from((w & (w << 1) & HI).count_ones());
    }
}

/// The sum of a word's eight byte lanes (each at most 255).
#[inline(always)]
fn lane_sum(x: u64) -> u64 {
    const M: u64 = 0x00ff_00ff_00ff_00ff;
    let y = (x & M) + ((x >> 8) & M);
    y.wrapping_mul(0x0001_0001_0001_0001) >> 48
}

/// Counts the bytes of `w` selected by `mask` (whole bytes).
#[inline(always)]
fn count_masked(w: u64, mask: u64, c: &mut Chars) {
    let hi = HI & mask;
    c.ascii += u64::from((!w & hi).count_ones());
    c.non_ascii += u64::from((w & (w << 1) & hi).count_ones());
}

#[inline(always)]
fn count_byte(x: u8, c: &mut Chars) {
    if x < 0x80 {
        c.ascii += 1;
    } else if x >= 0xC0 {
        c.non_ascii += 1;
    }
}

#[inline(always)]
fn word_at(b: &[u8], i: usize) -> Option<u64> {
    let chunk = b.get(i..i.checked_add(8)?)?;
    let arr: [u8; 8] = chunk.try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}

fn hex4(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &d in b {
        let x = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u32::from(x);
    }
    Some(v)
}

/// Counts the characters of raw bytes (no escapes interpreted): used for JSON
/// values tokenized as they are written (tool inputs, schemas).
pub fn count_raw(b: &[u8]) -> Chars {
    let mut c = Chars::default();
    let mut chunks = b.chunks_exact(8);
    for chunk in &mut chunks {
        let mut arr = [0u8; 8];
        arr.copy_from_slice(chunk);
        count_word(u64::from_le_bytes(arr), &mut c);
    }
    for &x in chunks.remainder() {
        count_byte(x, &mut c);
    }
    c
}

/// Counts the characters of a string's contents (the bytes between the
/// quotes), decoding escapes as it goes.
pub fn count_span(b: &[u8], span: Span) -> Chars {
    let Some(s) = b.get(span.start..span.end) else {
        return Chars::default();
    };
    if !span.escaped {
        return count_raw(s);
    }
    let mut sc = Scanner { b: s, i: 0 };
    let mut c = Chars::default();
    // Walk the contents as if a closing quote followed them.
    while sc.i < s.len() {
        match sc.escape_or_byte(&mut c) {
            Ok(()) => {}
            Err(Malformed) => break,
        }
    }
    c
}

/// A cursor over JSON bytes.
#[derive(Debug, Clone)]
pub struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    /// A scanner at the start of `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Self { b, i: 0 }
    }

    /// The bytes being scanned.
    #[inline]
    pub fn input(&self) -> &'a [u8] {
        self.b
    }

    /// The index of the next byte to read.
    #[inline]
    pub fn position(&self) -> usize {
        self.i
    }

    /// Moves the cursor to `position` (at most the input's length).
    #[inline]
    pub fn set_position(&mut self, position: usize) {
        self.i = position.min(self.b.len());
    }

    /// Steps over the next byte (the caller has looked at it with
    /// [`peek`](Self::peek)). Past the end, every read fails with [`Malformed`].
    #[inline]
    pub fn bump(&mut self) {
        self.i += 1;
    }

    /// True when every byte has been read.
    #[inline]
    pub fn is_at_end(&self) -> bool {
        self.i >= self.b.len()
    }

    /// Skips JSON whitespace.
    #[inline]
    pub fn skip_ws(&mut self) {
        while let Some(&x) = self.b.get(self.i) {
            if matches!(x, b' ' | b'\n' | b'\r' | b'\t') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    /// The next non-whitespace byte, not consumed.
    #[inline]
    pub fn peek(&mut self) -> Result<u8> {
        self.skip_ws();
        self.b.get(self.i).copied().ok_or(Malformed)
    }

    /// Consumes `x` (after whitespace) or fails.
    #[inline]
    pub fn expect(&mut self, x: u8) -> Result<()> {
        if self.peek()? == x {
            self.i += 1;
            Ok(())
        } else {
            Err(Malformed)
        }
    }

    /// Handles one byte or escape inside a string (not the closing quote).
    #[inline]
    fn escape_or_byte(&mut self, c: &mut Chars) -> Result<()> {
        let x = *self.b.get(self.i).ok_or(Malformed)?;
        if x == b'\\' {
            let e = *self.b.get(self.i + 1).ok_or(Malformed)?;
            if e == b'u' {
                let hex = self.b.get(self.i + 2..self.i + 6).ok_or(Malformed)?;
                let cp = hex4(hex).ok_or(Malformed)?;
                if cp < 0x80 {
                    c.ascii += 1;
                } else {
                    c.non_ascii += 1;
                }
                self.i += 6;
            } else {
                c.ascii += 1;
                self.i += 2;
            }
        } else {
            count_byte(x, c);
            self.i += 1;
        }
        Ok(())
    }

    /// Scans a string whose opening quote is next (after whitespace); returns
    /// its span and, when `count` is set, its characters.
    #[inline]
    pub fn string(&mut self, count: bool) -> Result<(Span, Chars)> {
        self.expect(b'"')?;
        self.string_body(count)
    }

    /// Scans a string whose opening quote was just consumed.
    #[inline]
    pub fn string_body(&mut self, count: bool) -> Result<(Span, Chars)> {
        let start = self.i;
        // Most keys and many values are short and plain: their closing quote
        // is in the next sixteen bytes, before any backslash, found by a test
        // of each word (the lowest flagged byte is exact).
        let mut c = Chars::default();
        let mut at = start;
        for _ in 0..2 {
            let Some(w) = word_at(self.b, at) else {
                break;
            };
            let special = has_byte(w, b'"') | has_byte(w, b'\\');
            if special == 0 {
                if count {
                    count_word(w, &mut c);
                }
                at += 8;
                continue;
            }
            let bits = special.trailing_zeros() & !7;
            let end = at + (bits / 8) as usize;
            if self.b.get(end) != Some(&b'"') {
                break;
            }
            if count && bits > 0 {
                count_masked(w, (1u64 << bits) - 1, &mut c);
            }
            self.i = end + 1;
            let span = Span {
                start,
                end,
                escaped: false,
            };
            return Ok((span, c));
        }
        self.string_rest(count)
    }

    /// [`string_body`](Self::string_body) when its first sixteen bytes did
    /// not end it (scanned again from the start).
    #[inline(never)]
    fn string_rest(&mut self, count: bool) -> Result<(Span, Chars)> {
        let start = self.i;
        let mut c = Chars::default();
        let mut escaped = false;
        let b = self.b;
        let mut i = self.i;
        loop {
            i = skip_plain_pairs(b, i, count, &mut c);
            i = skip_plain_words(b, i, count, &mut c);
            let x = *b.get(i).ok_or(Malformed)?;
            if x == b'"' {
                self.i = i + 1;
                return Ok((
                    Span {
                        start,
                        end: i,
                        escaped,
                    },
                    c,
                ));
            }
            if x == b'\\' {
                escaped = true;
            }
            self.i = i;
            self.escape_or_byte(&mut c)?;
            i = self.i;
        }
    }

    /// Skips any value. When `count` is given, the characters of every string
    /// inside (keys too: they are tokens of the prompt) are added to it.
    /// Iterative, so deep nesting cannot overflow the stack.
    pub fn skip_value(&mut self, mut count: Option<&mut Chars>) -> Result<()> {
        let mut depth: u32 = 0;
        loop {
            let x = self.peek()?;
            match x {
                b'"' => {
                    self.i += 1;
                    let (_, c) = self.string_body(count.is_some())?;
                    if let Some(acc) = count.as_deref_mut() {
                        acc.add(c);
                    }
                }
                b'{' | b'[' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(Malformed);
                    }
                    self.i += 1;
                    continue;
                }
                b'}' | b']' => {
                    if depth == 0 {
                        return Err(Malformed);
                    }
                    depth -= 1;
                    self.i += 1;
                }
                b',' | b':' => {
                    if depth == 0 {
                        return Err(Malformed);
                    }
                    self.i += 1;
                    continue;
                }
                _ => self.scalar()?,
            }
            if depth == 0 {
                return Ok(());
            }
        }
    }

    /// Skips a number or literal (`true`, `false`, `null`).
    fn scalar(&mut self) -> Result<()> {
        let start = self.i;
        while let Some(&x) = self.b.get(self.i) {
            if x.is_ascii_alphanumeric() || matches!(x, b'-' | b'+' | b'.') {
                self.i += 1;
            } else {
                break;
            }
        }
        if self.i == start {
            Err(Malformed)
        } else {
            Ok(())
        }
    }

    /// Reads a value as a non-negative integer if it is one; any other value
    /// is skipped and gives `None`.
    pub fn u64_value(&mut self) -> Result<Option<u64>> {
        let x = self.peek()?;
        if !x.is_ascii_digit() {
            self.skip_value(None)?;
            return Ok(None);
        }
        let start = self.i;
        self.scalar()?;
        let text = self.b.get(start..self.i).ok_or(Malformed)?;
        let mut v: u64 = 0;
        for &d in text {
            if !d.is_ascii_digit() {
                return Ok(None);
            }
            v = match v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(d - b'0')))
            {
                Some(v) => v,
                None => return Ok(None),
            };
        }
        Ok(Some(v))
    }

    /// Reads `true` / `false`; any other value is skipped and gives `None`.
    pub fn bool_value(&mut self) -> Result<Option<bool>> {
        let x = self.peek()?;
        if x != b't' && x != b'f' {
            self.skip_value(None)?;
            return Ok(None);
        }
        let start = self.i;
        self.scalar()?;
        Ok(match self.b.get(start..self.i) {
            Some(b"true") => Some(true),
            Some(b"false") => Some(false),
            _ => None,
        })
    }

    /// After an element of an object or array: consumes `,` and returns true
    /// when another element follows, or consumes `close` and returns false.
    #[inline]
    pub fn next_or_close(&mut self, close: u8) -> Result<bool> {
        let x = self.peek()?;
        self.i += 1;
        if x == b',' {
            Ok(true)
        } else if x == close {
            Ok(false)
        } else {
            Err(Malformed)
        }
    }

    /// Just after `{` or `[`: consumes `close` and returns true when the
    /// container is empty.
    #[inline]
    pub fn empty(&mut self, close: u8) -> Result<bool> {
        if self.peek()? == close {
            self.i += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Reads an object key and its colon; returns the raw key bytes (escapes
    /// not decoded: keys this crate looks for never need them).
    #[inline]
    pub fn key(&mut self) -> Result<&'a [u8]> {
        let (span, _) = self.string(false)?;
        self.expect(b':')?;
        self.b.get(span.start..span.end).ok_or(Malformed)
    }
}

/// The longest `usage` object [`UsageScanner`] keeps (it holds a few counters
/// and small nested objects).
const MAX_USAGE_JSON: usize = 8 * 1024;

/// Where [`UsageScanner`] is relative to the top-level `"usage"` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum KeyPhase {
    #[default]
    None,
    /// The string `"usage"` just closed at depth 1: a `:` makes it a key.
    SawKey,
    /// `"usage":` was read: the next value is captured if it is an object.
    SawColon,
}

const USAGE_KEY: &[u8] = b"usage";

/// The bytes [`UsageScanner`] must look at outside strings when no `usage`
/// key is pending: `"`, and those that open or close an object or array.
static OPENS_OR_CLOSES: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'[' as usize] = true;
    t[b'}' as usize] = true;
    t[b']' as usize] = true;
    t
};

/// How many bytes of a string are searched a word at a time before `memchr`.
const SHORT_STRING: usize = 32;

/// The index of the first `"` in `bytes`. Most strings of an answer are
/// short keys and values: eight bytes at a time finds their end sooner than
/// a vector search starts; past [`SHORT_STRING`] bytes, `memchr`.
#[inline]
pub(super) fn find_quote(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < SHORT_STRING {
        let Some(word) = bytes
            .get(i..i + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
        else {
            // Fewer than eight bytes left.
            let tail = bytes.get(i..).unwrap_or_default();
            return tail.iter().position(|&b| b == b'"').map(|j| i + j);
        };
        // The lowest flagged byte is exact (a false flag can only follow a
        // true one).
        let hit = has_byte(u64::from_le_bytes(word), b'"');
        if hit != 0 {
            return Some(i + (hit.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let tail = bytes.get(i..).unwrap_or_default();
    memchr::memchr(b'"', tail).map(|j| i + j)
}

/// Reads the top-level `usage` object of a JSON body as its bytes pass, in
/// chunks split at any byte boundary.
///
/// A byte-level tokenizer that tracks only string/escape state and nesting
/// depth. It keeps nothing but the `usage` value itself (at most 8 KiB), so it
/// can watch a body of any size as it streams by. Inside strings (most of a
/// response is text) it jumps from one quote to the next, telling an escaped
/// quote by the run of backslashes before it. The `usage` object is read
/// where it lies when it ends in the chunk it began in (no copy); otherwise
/// its bytes are copied once per chunk. A `"usage"` anywhere but as a key of the top-level object (inside text, in a
/// tool's input) is ignored; a body that is not JSON gives no usage.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::wire::json::UsageScanner;
///
/// let body = br#"{"type":"message","content":[{"type":"text","text":"usage: none"}],
///     "usage":{"input_tokens":12,"output_tokens":34}}"#;
/// let mut scanner = UsageScanner::new();
/// for chunk in body.chunks(7) {
///     scanner.push(chunk);
/// }
/// let usage = scanner.usage().map(|u| (u.input_tokens, u.output_tokens));
/// assert_eq!(usage, Some((12, 34)));
/// ```
#[derive(Debug, Default)]
pub struct UsageScanner {
    depth: u32,
    in_string: bool,
    escape: bool,
    /// Matching the current depth-1 string against `usage`: bytes matched so
    /// far, or `None` once it cannot match.
    key_match: Option<usize>,
    phase: KeyPhase,
    capture: Capture,
    usage: Option<Usage>,
    /// Whether any bytes were pushed.
    pushed: bool,
}

/// The index of the last byte of `body[..end]` that is not JSON whitespace.
fn last_non_blank(body: &[u8], end: usize) -> Option<usize> {
    body.get(..end)?
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// How many `{` [`trailing_usage`] tries, the last first, as
/// the start of the `usage` object (one each for the objects nested in it,
/// as `cache_creation`) before it leaves the body to the forward walk.
const TRAILING_CANDIDATES: usize = 8;

/// Whether the bytes before the `{` at `open` are `"usage":` as a key of
/// an object: a `,` or `{` before the key (blanks allowed anywhere), so
/// that its first quote is not escaped and opens the string.
fn usage_key_before(body: &[u8], open: usize) -> bool {
    let Some(colon) = last_non_blank(body, open) else {
        return false;
    };
    let Some(quote) = last_non_blank(body, colon) else {
        return false;
    };
    let Some(key) = quote.checked_sub(USAGE_KEY.len() + 1) else {
        return false;
    };
    body.get(colon) == Some(&b':')
        && body.get(key..=quote) == Some(&b"\"usage\""[..])
        && last_non_blank(body, key)
            .and_then(|before| body.get(before))
            .is_some_and(|b| matches!(b, b',' | b'{'))
}

/// The `usage` object that is the last member of the top-level object
/// `body` (blanks around it allowed), read where it lies; `None` if the body
/// does not end so, or that object does not read as a usage.
///
/// The object is found from its end without walking its bytes: each `{`
/// before its closing `}` (the last first) that follows a key `"usage":`
/// is tried as its start, and it is the one when the bytes from there to
/// that `}` read as one usage object. In a valid body a `{` so placed
/// cannot be inside a string (its key's opening quote follows a `,` or a
/// `{`, so it is not escaped, and a string cannot end just before
/// `usage"`), and the value it opens reads whole only if it ends at that
/// `}`, whose object then ends at the body's last `}`: the top level.
fn trailing_usage(body: &[u8]) -> Option<Usage> {
    let first = body
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    let end = last_non_blank(body, body.len())?;
    if body.get(first) != Some(&b'{') || body.get(end) != Some(&b'}') {
        return None;
    }
    let close = last_non_blank(body, end)?;
    if body.get(close) != Some(&b'}') {
        return None;
    }
    // No start further back than the longest object the scanner keeps.
    let floor = (close + 1).saturating_sub(MAX_USAGE_JSON).max(first + 1);
    let mut before = close;
    for _ in 0..TRAILING_CANDIDATES {
        let open = floor + memchr::memrchr(b'{', body.get(floor..before)?)?;
        if usage_key_before(body, open) {
            if let Some(usage) = body.get(open..=close).and_then(read_usage) {
                return Some(usage);
            }
        }
        before = open;
    }
    None
}

/// Where the bytes of the `usage` object being read are.
#[derive(Debug, Default)]
enum Capture {
    /// Not inside the `usage` object.
    #[default]
    Off,
    /// It began at this offset of the chunk being pushed: read in place if
    /// it ends in the same chunk (no copy, no allocation).
    InChunk(usize),
    /// It began in an earlier chunk: its bytes up to the chunk being pushed,
    /// all of which belongs to it so far.
    Buffered(Vec<u8>),
}

impl UsageScanner {
    /// A scanner at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// The `usage` object, once it has been read whole.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Feeds the last bytes of the body (the same as [`push`](Self::push)
    /// followed by nothing).
    ///
    /// When nothing was pushed before (`chunk` is the whole body, as a short
    /// answer often comes in one frame) and the top-level object ends with
    /// its `usage` member, as the Messages API writes it, the `usage` object
    /// is read where it lies, found from the end of the body by the `{`
    /// bytes before its end (one `memrchr` each): the answer before it is
    /// not walked at all, and the object once, as it is read. For a body that is valid
    /// JSON this reads what [`push`](Self::push) reads; for one that ends
    /// otherwise, it is `push`.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::wire::json::UsageScanner;
    ///
    /// let body = br#"{"type":"message","content":[{"type":"text","text":"}}"}],
    ///     "usage":{"input_tokens":12,"output_tokens":34}}"#;
    /// let mut scanner = UsageScanner::new();
    /// scanner.push_last(body);
    /// assert_eq!(scanner.usage().map(|u| u.output_tokens), Some(34));
    /// ```
    pub fn push_last(&mut self, chunk: &[u8]) {
        if !self.pushed {
            if let Some(usage) = trailing_usage(chunk) {
                self.pushed = true;
                self.usage = Some(usage);
                return;
            }
        }
        self.push(chunk);
    }

    /// Feeds the next bytes of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.pushed = true;
        let mut pos = 0;
        while let Some(&b) = chunk.get(pos) {
            if self.in_string {
                pos = self.string_run(chunk, pos);
                continue;
            }
            if self.phase == KeyPhase::None && !OPENS_OR_CLOSES[usize::from(b)] {
                // Outside strings with no key pending, a byte that neither
                // opens a string nor opens or closes a value changes
                // nothing (blanks, `:`, `,`, numbers, literals): jump to the
                // next one that does.
                let rest = chunk.get(pos..).unwrap_or_default();
                match rest.iter().position(|&b| OPENS_OR_CLOSES[usize::from(b)]) {
                    Some(i) => pos += i,
                    None => break,
                }
                continue;
            }
            self.structural_byte(b, chunk, pos);
            pos += 1;
        }
        // A `usage` object still open at the end of the chunk: its bytes are
        // kept (once per chunk, at most `MAX_USAGE_JSON` of them).
        self.capture = match std::mem::take(&mut self.capture) {
            Capture::Off => Capture::Off,
            Capture::InChunk(start) => Self::buffered(Vec::new(), chunk.get(start..)),
            Capture::Buffered(kept) => Self::buffered(kept, Some(chunk)),
        };
    }

    fn buffered(mut kept: Vec<u8>, more: Option<&[u8]>) -> Capture {
        let more = more.unwrap_or_default();
        if kept.len() + more.len() > MAX_USAGE_JSON {
            return Capture::Off;
        }
        if kept.capacity() == 0 {
            kept.reserve(more.len().max(256));
        }
        kept.extend_from_slice(more);
        Capture::Buffered(kept)
    }

    /// Inside a string, at `pos`: jumps to the next quote (one `memchr` per
    /// quote, not per escape), decides from the backslashes before it
    /// whether it is escaped, and returns the position after it (after the
    /// string, or after an escaped quote, still inside it).
    fn string_run(&mut self, chunk: &[u8], pos: usize) -> usize {
        let rest = chunk.get(pos..).unwrap_or_default();
        let end = find_quote(rest).unwrap_or(rest.len());
        let segment = rest.get(..end).unwrap_or_default();
        if let Some(n) = self.key_match {
            // A segment equal to part of `usage` holds no backslash: only an
            // escape pending from before it can make it another string.
            let expected = USAGE_KEY.get(n..n + segment.len());
            self.key_match =
                (!self.escape && expected == Some(segment)).then_some(n + segment.len());
        }
        // The escape state after the segment: a run of backslashes toggles it;
        // any other byte ends an escape.
        let trailing = match segment.last() {
            Some(b'\\') => segment.iter().rev().take_while(|&&b| b == b'\\').count(),
            _ => 0,
        };
        let odd = trailing % 2 == 1;
        self.escape = if trailing == segment.len() {
            self.escape ^ odd
        } else {
            odd
        };
        if end == rest.len() {
            return chunk.len();
        }
        if std::mem::take(&mut self.escape) {
            // An escaped quote: still inside the string.
            self.key_match = None;
        } else {
            self.in_string = false;
            if self.key_match.take() == Some(USAGE_KEY.len()) {
                self.phase = KeyPhase::SawKey;
            }
        }
        pos + end + 1
    }

    /// A byte outside strings, at `pos` in `chunk`.
    fn structural_byte(&mut self, b: u8, chunk: &[u8], pos: usize) {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'"' => {
                self.in_string = true;
                if self.depth == 1 && matches!(self.capture, Capture::Off) {
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
                    self.capture = Capture::InChunk(pos);
                }
                self.phase = KeyPhase::None;
                self.depth = self.depth.saturating_add(1);
            }
            b'}' | b']' => {
                self.phase = KeyPhase::None;
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 1 {
                    self.close_capture(chunk, pos);
                }
            }
            _ => self.phase = KeyPhase::None,
        }
    }

    /// The `usage` object ended at `pos` in `chunk`: reads it.
    fn close_capture(&mut self, chunk: &[u8], pos: usize) {
        let parsed = match std::mem::take(&mut self.capture) {
            Capture::Off => return,
            Capture::InChunk(start) => chunk
                .get(start..=pos)
                .filter(|json| json.len() <= MAX_USAGE_JSON)
                .and_then(read_usage),
            Capture::Buffered(mut kept) => {
                let tail = chunk.get(..=pos).unwrap_or_default();
                (kept.len() + tail.len() <= MAX_USAGE_JSON)
                    .then(|| {
                        kept.extend_from_slice(tail);
                        read_usage(&kept)
                    })
                    .flatten()
            }
        };
        if let Some(usage) = parsed {
            self.usage = Some(usage);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward_and_whole(body: &str) -> (Option<Usage>, Option<Usage>) {
        let mut forward = UsageScanner::new();
        forward.push(body.as_bytes());
        let mut whole = UsageScanner::new();
        whole.push_last(body.as_bytes());
        (forward.usage(), whole.usage())
    }

    /// A whole body read from its end gives the usage the forward walk
    /// gives: a trailing one, one among other members, one only nested, a
    /// text full of quotes, backslashes and braces before it.
    #[test]
    fn a_whole_body_is_read_from_its_end_as_forward() {
        for body in [
            r#"{"type":"message","usage":{"input_tokens":3,"output_tokens":4}}"#,
            " {\"usage\" : {\"input_tokens\":3,\"output_tokens\":4} } \n",
            r#"{"usage":{"input_tokens":3,"output_tokens":4},"type":"message"}"#,
            r#"{"text":"a\"}\\","usage":{"input_tokens":5,"output_tokens":6}}"#,
            r#"{"text":"\\\"usage\\\":{}}","usage":{"input_tokens":7,"output_tokens":8}}"#,
            r#"{"a":{"usage":{"input_tokens":1,"output_tokens":1}}}"#,
            r#"{"a":1,"usage":{"input_tokens":"x"}}"#,
            r#"{"usage":{"input_tokens":1,"output_tokens":2},"usage":{"input_tokens":3,"output_tokens":4}}"#,
            r#"["usage",{"input_tokens":1}]"#,
            "",
            // Objects inside the usage, braces in its strings, a key ending
            // in an escaped `"usage`, a usage inside the usage, and a last
            // usage that does not read after one that does.
            r#"{"usage":{"input_tokens":1,"cache_creation":{"ephemeral_5m_input_tokens":2},"output_tokens":3}}"#,
            r#"{"usage":{"input_tokens":1,"tier":"{\"usage\":{","output_tokens":3}}"#,
            r#"{"x\"usage":{"input_tokens":1,"output_tokens":2}}"#,
            r#"{"x":"a\\","usage":{"input_tokens":1,"output_tokens":2}}"#,
            r#"{"usage":{"a":1,"usage":{"input_tokens":5}}}"#,
            r#"{"usage":{"input_tokens":1},"usage":{"input_tokens":"x"}}"#,
            r#"{"usage":{"input_tokens":1},"usage":{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{}}}}}}}}}}}"#,
            r#"{"usage" : { "input_tokens" : 1 } , "usage" : {"output_tokens":2} }"#,
        ] {
            let (forward, whole) = forward_and_whole(body);
            assert_eq!(forward, whole, "{body}");
        }
        assert_eq!(
            forward_and_whole(r#"{"x":"}","usage":{"input_tokens":9,"output_tokens":1}}"#)
                .1
                .map(|u| u.input_tokens),
            Some(9)
        );
    }

    /// The read from the end finds the usage object's start past the
    /// braces, escaped quotes and backslashes of the strings in it.
    #[test]
    fn the_read_from_the_end_finds_the_start_past_braces_in_strings() {
        let body = r#"{"id":"x","usage":{"input_tokens":1,"tier":"a\"{[\\","output_tokens":2}}"#;
        let usage = trailing_usage(body.as_bytes()).map(|u| (u.input_tokens, u.output_tokens));
        assert_eq!(usage, Some((1, 2)));
        // Not the last member, or not at the top: not read from the end.
        assert!(trailing_usage(br#"{"usage":{"input_tokens":1},"a":{}}"#).is_none());
        assert!(trailing_usage(br#"{"a":{"usage":{"input_tokens":1}}}"#).is_none());
    }

    /// After bytes were pushed, the last ones are walked forward too (the
    /// end of the body is not the whole body).
    #[test]
    fn the_last_chunk_of_several_is_walked_forward() {
        // Alone, the tail would be a body whose top-level usage is last.
        let (head, tail) = (
            r#"{"a":"#,
            r#"{"usage":{"input_tokens":1,"output_tokens":2}}"#,
        );
        let mut s = UsageScanner::new();
        s.push(head.as_bytes());
        s.push_last(tail.as_bytes());
        assert_eq!(s.usage(), None);
    }

    fn str_chars(json: &str) -> (Chars, usize) {
        let mut s = Scanner::new(json.as_bytes());
        let (_, c) = s.string(true).unwrap_or_default();
        (c, s.i)
    }

    #[test]
    fn counts_ascii_and_non_ascii_across_word_boundaries() {
        let (c, end) = str_chars("\"hello world, this is text\" tail");
        assert_eq!(c.ascii, 25);
        assert_eq!(c.non_ascii, 0);
        assert_eq!(end, 27);
        let (c, _) = str_chars("\"héllo 日本語 and more ascii text\"");
        assert_eq!(c.non_ascii, 4);
        assert_eq!(c.ascii, "hllo  and more ascii text".len() as u64);
    }

    #[test]
    fn counts_escapes_as_one_char() {
        let (c, _) = str_chars(r#""a\nb\"c\\d\u00e9\u0041 long enough to use words""#);
        // a \n b \" c \\ d A + the tail = ascii; \u00e9 = non-ascii
        assert_eq!(c.non_ascii, 1);
        assert_eq!(c.ascii, 8 + " long enough to use words".len() as u64);
    }

    #[test]
    fn escaped_span_counts_match() {
        let text = r#""x\ty\u4e2dz 0123456789abcdef""#;
        let mut s = Scanner::new(text.as_bytes());
        let (span, c) = s.string(true).unwrap_or_default();
        assert!(span.escaped);
        assert_eq!(count_span(text.as_bytes(), span), c);
    }

    /// The word-at-a-time path agrees with a byte-at-a-time reference on
    /// strings dense with escapes and multi-byte characters.
    #[test]
    fn fast_path_matches_reference() {
        let pieces = [
            "a", "\\n", "\\\"", "\\u00e9", "\\u0041", "é", "日", "xyz ", "\\\\",
        ];
        let mut seed: u64 = 7;
        for _ in 0..300 {
            let mut body = String::from("\"");
            let mut expect = Chars::default();
            let n = (seed >> 40) % 40;
            for _ in 0..n {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let p = pieces[((seed >> 33) % pieces.len() as u64) as usize];
                body.push_str(p);
                match p {
                    "\\u00e9" | "é" | "日" => expect.non_ascii += 1,
                    "xyz " => expect.ascii += 4,
                    _ => expect.ascii += 1,
                }
            }
            body.push_str("\" trailing");
            let mut s = Scanner::new(body.as_bytes());
            let (span, c) = s.string(true).unwrap_or_default();
            assert_eq!(c, expect, "{body}");
            assert_eq!(&body.as_bytes()[s.i..], b" trailing");
            assert_eq!(count_span(body.as_bytes(), span), expect);
        }
    }

    /// Long runs without escapes take the sixteen-byte path and its lane
    /// counters (flushed every 127 pairs); they must agree with a plain count.
    #[test]
    fn long_runs_count_exactly() {
        for unit in ["a", "é", "日本", "ab é日 xyz", "\u{1f600}q"] {
            for reps in [1, 7, 300, 2500] {
                let text = unit.repeat(reps);
                let body = format!("\"{text}\"");
                let mut s = Scanner::new(body.as_bytes());
                let (_, c) = s.string(true).unwrap_or_default();
                let ascii = text.chars().filter(char::is_ascii).count() as u64;
                let non_ascii = text.chars().count() as u64 - ascii;
                assert_eq!(
                    (c.ascii, c.non_ascii),
                    (ascii, non_ascii),
                    "{unit} x {reps}"
                );
                assert_eq!(count_raw(text.as_bytes()), c);
            }
        }
    }

    #[test]
    fn unterminated_string_is_malformed() {
        let mut s = Scanner::new(b"\"abcdefghijklmnop");
        assert_eq!(s.string(true), Err(Malformed));
        let mut s = Scanner::new(b"\"abc\\");
        assert_eq!(s.string(true), Err(Malformed));
    }

    #[test]
    fn skip_value_counts_nested_strings() {
        let json = br#"{"a": [1, true, null, {"bc": "def"}], "g": -1.5e3} rest"#;
        let mut s = Scanner::new(json);
        let mut c = Chars::default();
        s.skip_value(Some(&mut c)).unwrap_or(());
        assert_eq!(&json[s.i..], b" rest");
        assert_eq!(c.ascii, 1 + 2 + 3 + 1);
    }

    #[test]
    fn skip_value_rejects_garbage_and_depth() {
        assert!(Scanner::new(b"}").skip_value(None).is_err());
        assert!(Scanner::new(b"[1,2").skip_value(None).is_err());
        let deep = "[".repeat(10_000);
        assert!(Scanner::new(deep.as_bytes()).skip_value(None).is_err());
    }

    #[test]
    fn reads_scalars() {
        assert_eq!(Scanner::new(b" 1024,").u64_value(), Ok(Some(1024)));
        assert_eq!(Scanner::new(b"1.5").u64_value(), Ok(None));
        assert_eq!(Scanner::new(b"-3").u64_value(), Ok(None));
        assert_eq!(Scanner::new(b"\"7\"").u64_value(), Ok(None));
        assert_eq!(
            Scanner::new(b"99999999999999999999999").u64_value(),
            Ok(None)
        );
        assert_eq!(Scanner::new(b"true").bool_value(), Ok(Some(true)));
        assert_eq!(Scanner::new(b"false}").bool_value(), Ok(Some(false)));
        assert_eq!(Scanner::new(b"null").bool_value(), Ok(None));
    }

    fn scan_in(chunks: &[&[u8]]) -> Option<(u64, u64)> {
        let mut s = UsageScanner::new();
        for c in chunks {
            s.push(c);
        }
        s.usage().map(|u| (u.input_tokens, u.output_tokens))
    }

    #[test]
    fn usage_scanner_reads_escapes_split_anywhere() {
        let bodies: [&[u8]; 5] = [
            // Strings longer than the byte-by-byte head, escapes past it.
            br#"{"text":"0123456789abcdefghij\"klmnopqrstuvwxyz0123456789\\","usage":{"input_tokens":3,"output_tokens":4}}"#,
            // Escaped quotes hide a fake usage in text; an escaped backslash
            // ends the text.
            br#"{"content":[{"text":"a \"usage\":{\"input_tokens\":99} \\"}],"usage":{"input_tokens":3,"output_tokens":4}}"#,
            // Runs of backslashes before quotes, odd and even.
            br#"{"text":"x\\\"y\\\\","usage":{"input_tokens":3,"output_tokens":4},"z":"\\\\\""}"#,
            // An escaped key is not the key `usage`.
            br#"{"us\u0061ge":{"input_tokens":99},"usage":{"input_tokens":3,"output_tokens":4}}"#,
            // Escapes inside the captured usage object itself.
            br#"{"usage":{"input_tokens":3,"service_tier":"st\"and\\ard","output_tokens":4}}"#,
        ];
        for body in bodies {
            let text = String::from_utf8_lossy(body);
            assert_eq!(scan_in(&[body]), Some((3, 4)), "{text}");
            for cut in 0..=body.len() {
                let (a, b) = body.split_at(cut);
                assert_eq!(scan_in(&[a, b]), Some((3, 4)), "{text} cut at {cut}");
            }
            let bytes: Vec<&[u8]> = body.chunks(1).collect();
            assert_eq!(scan_in(&bytes), Some((3, 4)), "{text} byte by byte");
        }
    }

    /// The word-at-a-time quote search agrees with a plain search at every
    /// length and position, quotes next to multi-byte characters included.
    #[test]
    fn find_quote_matches_position() {
        for len in 0..80 {
            for at in 0..=len {
                let mut bytes: Vec<u8> = "é日a\\".bytes().cycle().take(len).collect();
                if at < len {
                    bytes[at] = b'"';
                    if at + 1 < len {
                        bytes[at + 1] = b'"';
                    }
                }
                let want = bytes.iter().position(|&b| b == b'"');
                assert_eq!(find_quote(&bytes), want, "len {len} at {at}");
            }
        }
    }

    /// The key `usage` is read across blanks and any split; a `usage` that
    /// is not a top-level key followed by an object (a value, a key not
    /// followed by `:`, a nested key, one followed by a number or an array)
    /// is not.
    #[test]
    fn usage_scanner_reads_only_a_top_level_usage_object() {
        let found: [&[u8]; 3] = [
            b"{ \"usage\" \t:\n { \"input_tokens\" : 3 , \"output_tokens\":4 } }",
            br#"{"a":"usage","b":["usage",{"usage":{"input_tokens":9}}],"usage":{"input_tokens":3,"output_tokens":4}}"#,
            br#"{"usage" ,"x":1,"usage":12,"y":{"usage":{}},"usage":{"input_tokens":3,"output_tokens":4}}"#,
        ];
        let missed: [&[u8]; 4] = [
            br#"{"usage":12,"input_tokens":3}"#,
            br#"{"usage":[{"input_tokens":3,"output_tokens":4}]}"#,
            br#"{"x":{"usage":{"input_tokens":3,"output_tokens":4}}}"#,
            br#"[{"usage":{"input_tokens":3,"output_tokens":4}}]"#,
        ];
        for (bodies, want) in [(&found[..], Some((3, 4))), (&missed[..], None)] {
            for body in bodies {
                let text = String::from_utf8_lossy(body);
                for cut in 0..=body.len() {
                    let (a, b) = body.split_at(cut);
                    assert_eq!(scan_in(&[a, b]), want, "{text} cut at {cut}");
                }
                let bytes: Vec<&[u8]> = body.chunks(1).collect();
                assert_eq!(scan_in(&bytes), want, "{text} byte by byte");
            }
        }
    }

    #[test]
    fn usage_scanner_ignores_usage_in_an_unterminated_escape() {
        // The quote after the backslash is escaped: the string never closes,
        // so what follows is text, not a key.
        let body = br#"{"text":"\","usage":{"input_tokens":3,"output_tokens":4}}"#;
        assert_eq!(scan_in(&[body]), None);
    }
}
