//! Reading (and writing) the headers an LLM API sends to pace its clients.
//!
//! [`RateLimitSnapshot::from_headers`] reads everything in one response that
//! matters for pacing into one value:
//!
//! - `retry-after-ms` (milliseconds, possibly fractional: the official SDKs read it
//!   first) and `retry-after`, as delta-seconds or as an HTTP-date in any of the
//!   three forms RFC 9110 accepts (IMF-fixdate, RFC 850, asctime);
//! - `x-should-retry: true | false`;
//! - Anthropic's `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`,
//!   where `reset` is an RFC 3339 instant;
//! - OpenAI-style `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, where
//!   `reset` is a duration such as `6m0s`, `1s` or `250ms`, so the crate serves
//!   OpenAI-compatible APIs too.
//!
//! Instants are turned into durations from "now" at parse time, so the layers can
//! work with tokio's clock.
//!
//! A value that is malformed, negative, not UTF-8, or (other than a plain
//! number) longer than 64 bytes is ignored (read as absent): a hostile or
//! broken server can never make the parser panic or overflow.
//!
//! A delay or reset longer than one year (366 days) is read as one year (366 days): a
//! number too large to represent, or with more digits than fit 64 bytes,
//! included. The reading is monotonic: a longer delay is never read as a
//! shorter one, so a layer that refuses delays above its cap refuses every
//! larger value too, instead of taking a huge one for a malformed one and
//! retrying at once.
//!
//! It only reads: deciding what to do (wait, retry, pace) is the layers'
//! work. It reads no other header, and never `x-api-key` or
//! `authorization`; [`RateLimitSnapshot`]'s `Debug` shows parsed numbers only.
//!
//! # Examples
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use http::HeaderMap;
//! use tower_llm_limits::headers::RateLimitSnapshot;
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("retry-after", "7".parse().unwrap());
//! headers.insert("anthropic-ratelimit-input-tokens-limit", "30000".parse().unwrap());
//! headers.insert("anthropic-ratelimit-input-tokens-remaining", "0".parse().unwrap());
//! headers.insert(
//!     "anthropic-ratelimit-input-tokens-reset",
//!     "2026-11-28T07:15:12Z".parse().unwrap(),
//! );
//! // 2026-11-28T07:15:00Z
//! let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_850_100);
//! let snap = RateLimitSnapshot::from_headers_at(&headers, now);
//! assert_eq!(snap.retry_after, Some(Duration::from_secs(7)));
//! assert_eq!(snap.input_tokens.limit, Some(30_000));
//! assert_eq!(snap.exhausted_reset(), Some(Duration::from_secs(12)));
//! ```

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::Dimension;

/// `retry-after-ms`: a delay in milliseconds, read before `retry-after`.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// `x-should-retry`: the server's own verdict on retrying (`true` or `false`).
pub const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// The longest delay or reset a header is read as: one year. A longer one
/// (however long) is read as exactly this, never ignored.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);

/// Header values longer than this are ignored without being parsed.
const MAX_VALUE_LEN: usize = 64;

/// What a response said about one limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LimitStatus {
    /// The limit per period (per minute for Anthropic).
    pub limit: Option<u64>,
    /// What is left of it now.
    pub remaining: Option<u64>,
    /// Time from the moment the headers were read until the limit is fully
    /// replenished (Anthropic) or resets (OpenAI).
    pub reset_in: Option<Duration>,
}

impl LimitStatus {
    /// Whether no field was present.
    pub fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset_in.is_none()
    }

    /// Whether the limit is known to be used up (`remaining` is 0).
    pub fn is_exhausted(&self) -> bool {
        self.remaining == Some(0)
    }
}

/// Everything in one response's headers that matters for pacing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RateLimitSnapshot {
    /// `retry-after-ms` if present and valid, else `retry-after`.
    pub retry_after: Option<Duration>,
    /// `x-should-retry`.
    pub should_retry: Option<bool>,
    /// `anthropic-ratelimit-requests-*`, or `x-ratelimit-*-requests`.
    pub requests: LimitStatus,
    /// `anthropic-ratelimit-tokens-*` (the most restrictive token limit, not a
    /// limit of its own), or `x-ratelimit-*-tokens`.
    pub tokens: LimitStatus,
    /// `anthropic-ratelimit-input-tokens-*`.
    pub input_tokens: LimitStatus,
    /// `anthropic-ratelimit-output-tokens-*`.
    pub output_tokens: LimitStatus,
}

impl RateLimitSnapshot {
    /// Reads the headers, taking instants relative to [`SystemTime::now`].
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Self::from_headers_at(headers, SystemTime::now())
    }

    /// Reads the headers, taking instants relative to `now` (deterministic).
    pub fn from_headers_at(headers: &HeaderMap, now: SystemTime) -> Self {
        let found = Found::collect(headers);
        let retry_after = found
            .get(RETRY_AFTER_MS_AT)
            .and_then(parse_retry_after_ms)
            .or_else(|| {
                found
                    .get(RETRY_AFTER_AT)
                    .and_then(|v| parse_retry_after(v, now))
            });
        let should_retry = found.get(SHOULD_RETRY_AT).and_then(parse_bool);
        let mut snap = RateLimitSnapshot {
            retry_after,
            should_retry,
            ..RateLimitSnapshot::default()
        };
        // Written in place: the limits are not returned through the
        // closure, which would copy them.
        Memory::with(|memory| {
            let mut reading = Reading {
                now: Now::new(Some(now)),
                last_reset: None,
                memory,
                resets: Resets::All,
            };
            let mut read =
                |kind: usize| reading.anthropic(found.fields(ANTHROPIC + 3 * kind), kind);
            snap.requests = read(0);
            snap.tokens = read(1);
            snap.input_tokens = read(2);
            snap.output_tokens = read(3);
        });
        if snap.requests.is_empty() {
            snap.requests = read_openai(found.fields(OPENAI), Resets::All);
        }
        if snap.tokens.is_empty() {
            snap.tokens = read_openai(found.fields(OPENAI + 3), Resets::All);
        }
        snap
    }

    /// What a token budget syncs its buckets to, `[requests, input tokens,
    /// output tokens]` (the order of [`Dimension::ALL`]), read in the same
    /// pass as [`from_headers`](Self::from_headers) reads, and as the budget
    /// reads its snapshot: the combined `tokens` limit (Anthropic's, else
    /// OpenAI-style) stands for input tokens only where the response says
    /// nothing of them, and is parsed only then; `retry-after` and
    /// `x-should-retry` are not parsed at all. `None` when no header is
    /// named as a rate-limit header (see [`is_rate_limit_header`]).
    ///
    /// With [`Resets::WithoutRemaining`], a limit's reset is read only
    /// where its `remaining` is not given (`reset_in` is `None` where it
    /// is): the budget's own buckets sync to the reset only then, so an
    /// answer's resets (an RFC 3339 instant each, from Anthropic) are
    /// neither compared nor turned into a time from now (nor is the clock
    /// read) for a sync that does not look at them. A ledger of the user's
    /// is given every reset ([`Resets::All`]).
    #[cfg(feature = "budget")]
    pub(crate) fn budget_statuses(headers: &HeaderMap, resets: Resets) -> Option<[LimitStatus; 3]> {
        Self::budget_statuses_with(headers, None, resets)
    }

    /// [`budget_statuses`](Self::budget_statuses) with instants relative to
    /// `now`, every reset read.
    #[cfg(all(feature = "budget", test))]
    pub(crate) fn budget_statuses_at(
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Option<[LimitStatus; 3]> {
        Self::budget_statuses_with(headers, Some(now), Resets::All)
    }

    /// [`budget_statuses`](Self::budget_statuses) with instants relative to
    /// `now` (read from the clock when a reset needs it, if `None`).
    #[cfg(feature = "budget")]
    fn budget_statuses_with(
        headers: &HeaderMap,
        now: Option<SystemTime>,
        resets: Resets,
    ) -> Option<[LimitStatus; 3]> {
        let found = Found::collect(headers);
        // Without one read, the names are looked at again (a response
        // without any is rare from the API).
        if !found.limits && !headers.keys().any(is_rate_limit_header) {
            return None;
        }
        let mut statuses = [LimitStatus::default(); 3];
        // Written in place: the statuses are not returned through the
        // closure, which would copy them.
        Memory::with(|memory| {
            let mut reading = Reading {
                now: Now::new(now),
                last_reset: None,
                memory,
                resets,
            };
            let mut read =
                |kind: usize| reading.anthropic(found.fields(ANTHROPIC + 3 * kind), kind);
            let mut requests = read(0);
            if requests.is_empty() {
                requests = read_openai(found.fields(OPENAI), resets);
            }
            let mut input = read(2);
            if input.is_empty() {
                input = read(1);
                if input.is_empty() {
                    input = read_openai(found.fields(OPENAI + 3), resets);
                }
            }
            statuses = [requests, input, read(3)];
        });
        Some(statuses)
    }

    /// The longest `reset_in` among the limits that are used up
    /// (`remaining: 0`): how long until every exhausted limit has room again.
    pub fn exhausted_reset(&self) -> Option<Duration> {
        [
            &self.requests,
            &self.tokens,
            &self.input_tokens,
            &self.output_tokens,
        ]
        .into_iter()
        .filter(|l| l.is_exhausted())
        .filter_map(|l| l.reset_in)
        .max()
    }

    /// The status of one of the three per-minute limits.
    pub fn dimension(&self, dimension: Dimension) -> &LimitStatus {
        match dimension {
            Dimension::Requests => &self.requests,
            Dimension::InputTokens => &self.input_tokens,
            Dimension::OutputTokens => &self.output_tokens,
        }
    }

    /// Whether the headers said nothing about pacing at all.
    pub fn is_empty(&self) -> bool {
        self.retry_after.is_none()
            && self.should_retry.is_none()
            && self.requests.is_empty()
            && self.tokens.is_empty()
            && self.input_tokens.is_empty()
            && self.output_tokens.is_empty()
    }
}

fn value_str(value: &HeaderValue) -> Option<&str> {
    if value.len() > MAX_VALUE_LEN {
        return None;
    }
    value.to_str().ok().map(str::trim)
}

/// A value that may be a plain number of any length (a delay): read whole,
/// so that a number too long for [`MAX_VALUE_LEN`] is not taken for garbage.
/// Parsing it stays linear in its length.
fn number_str(value: &HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?.trim();
    (s.len() <= MAX_VALUE_LEN || is_plain_number(s)).then_some(s)
}

/// A delay, never longer than [`MAX_DELAY`].
fn bounded(d: Duration) -> Duration {
    d.min(MAX_DELAY)
}

/// Reads a non-negative number of seconds (or milliseconds) as a duration;
/// one too large for a `Duration` (infinite included) is [`MAX_DELAY`].
fn duration_from_f64(value: f64, unit_secs: f64) -> Option<Duration> {
    if value.is_nan() || value < 0.0 {
        return None;
    }
    let secs = value * unit_secs;
    if secs >= MAX_DELAY.as_secs_f64() {
        return Some(MAX_DELAY);
    }
    Duration::try_from_secs_f64(secs).ok().map(bounded)
}

/// Only plain decimal numbers: digits with at most one dot; no sign,
/// exponent, "inf" or "nan".
fn is_plain_number(s: &str) -> bool {
    let mut dots = 0;
    !s.is_empty()
        && s != "."
        && s.bytes().all(|b| {
            if b == b'.' {
                dots += 1;
                true
            } else {
                b.is_ascii_digit()
            }
        })
        && dots <= 1
}

fn parse_number(s: &str) -> Option<f64> {
    // A plain number of any length parses (to infinity if too large).
    if !is_plain_number(s) {
        return None;
    }
    s.parse().ok()
}

fn parse_retry_after_ms(value: &HeaderValue) -> Option<Duration> {
    parse_number(number_str(value)?).and_then(|ms| duration_from_f64(ms, 0.001))
}

/// Parses a `retry-after` value: delta-seconds (a fractional value is accepted,
/// as the official SDKs do) or an HTTP-date, which is turned into the time from
/// `now` until then (zero if it has passed).
///
/// A delay longer than one year (366 days) (however long, or too large to
/// represent) is read as one year (366 days): a longer delay is never read as a
/// shorter one.
pub(crate) fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = number_str(value)?;
    if let Some(secs) = parse_number(s) {
        return duration_from_f64(secs, 1.0);
    }
    if s.len() > MAX_VALUE_LEN {
        return None;
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(bounded(at.duration_since(now).unwrap_or(Duration::ZERO)))
}

fn parse_bool(value: &HeaderValue) -> Option<bool> {
    let s = value_str(value)?;
    if s.eq_ignore_ascii_case("true") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// A whole number, blanks around it allowed; one pass over the bytes (no
/// UTF-8 check: anything but a digit, a space or a tab refuses the value).
#[inline(always)]
fn parse_u64(value: &HeaderValue) -> Option<u64> {
    let bytes = value.as_bytes();
    if bytes.len() > MAX_VALUE_LEN {
        return None;
    }
    let mut digits = bytes;
    while let [b' ' | b'\t', rest @ ..] = digits {
        digits = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = digits {
        digits = rest;
    }
    if digits.is_empty() {
        return None;
    }
    if digits.len() <= MAX_EXACT_DIGITS {
        // Too few digits to overflow: no check per digit, and eight or
        // four of them read at a time.
        let mut n = 0u64;
        let mut rest = digits;
        while let Some((eight, tail)) = rest.split_first_chunk::<8>() {
            n = n * 100_000_000 + eight_digits(u64::from_le_bytes(*eight))?;
            rest = tail;
        }
        if let Some((four, tail)) = rest.split_first_chunk::<4>() {
            n = n * 10_000 + u64::from(four_digits(u32::from_le_bytes(*four))?);
            rest = tail;
        }
        return rest.iter().try_fold(n, |n, &b| {
            let digit = b.wrapping_sub(b'0');
            (digit <= 9).then(|| n * 10 + u64::from(digit))
        });
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The value of eight ASCII digits read as one little-endian word (the
/// first digit in the lowest byte), `None` if a byte is not a digit.
#[inline]
fn eight_digits(word: u64) -> Option<u64> {
    const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    // A byte is a digit when its high nibble is 3 before and after adding
    // 6 (a carry comes only from a byte above 0xF9, itself no digit).
    let nibbles = (word & HIGH) | ((word.wrapping_add(0x0606_0606_0606_0606) & HIGH) >> 4);
    if nibbles != 0x3333_3333_3333_3333 {
        return None;
    }
    let v = word - 0x3030_3030_3030_3030;
    // Pairs, then groups of four, then the whole: no lane overflows.
    let v = (v.wrapping_mul(10) + (v >> 8)) & 0x00FF_00FF_00FF_00FF;
    let v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
    Some((v & 0xFFFF_FFFF) * 10_000 + (v >> 32))
}

/// [`eight_digits`] for four.
#[inline]
fn four_digits(word: u32) -> Option<u32> {
    const HIGH: u32 = 0xF0F0_F0F0;
    let nibbles = (word & HIGH) | ((word.wrapping_add(0x0606_0606) & HIGH) >> 4);
    if nibbles != 0x3333_3333 {
        return None;
    }
    let v = word - 0x3030_3030;
    let v = (v.wrapping_mul(10) + (v >> 8)) & 0x00FF_00FF;
    Some((v & 0xFFFF) * 100 + (v >> 16))
}

/// The most decimal digits that always fit a `u64` (`u64::MAX` has 20).
const MAX_EXACT_DIGITS: usize = 19;

/// One response header per field of a limit: `limit`, `remaining`, `reset`.
type Fields<'a> = [Option<&'a HeaderValue>; 3];

/// Where [`Found`] keeps `anthropic-ratelimit-{kind}-{field}`: at
/// `ANTHROPIC + 3 * kind + field`, kinds in the order requests, tokens,
/// input tokens, output tokens; fields in the order limit, remaining, reset.
const ANTHROPIC: usize = 0;
/// Where [`Found`] keeps `x-ratelimit-{field}-{kind}`: at
/// `OPENAI + 3 * kind + field`, kinds in the order requests, tokens.
const OPENAI: usize = 12;
/// Where [`Found`] keeps `retry-after-ms`.
const RETRY_AFTER_MS_AT: usize = 18;
/// Where [`Found`] keeps `retry-after`.
const RETRY_AFTER_AT: usize = 19;
/// Where [`Found`] keeps `x-should-retry`.
const SHOULD_RETRY_AT: usize = 20;
/// How many headers [`Found`] keeps.
const SLOTS: usize = 21;

/// The headers [`RateLimitSnapshot`] reads, gathered in one pass over the
/// map: for each name its first value, as [`HeaderMap::get`] gives it.
struct Found<'a> {
    /// By the places [`slot_of`] gives.
    values: [Option<&'a HeaderValue>; SLOTS],
    /// Whether a rate-limit header (`anthropic-ratelimit-*` or
    /// `x-ratelimit-*`) that is read was found.
    limits: bool,
}

impl<'a> Found<'a> {
    #[inline]
    fn collect(headers: &'a HeaderMap) -> Self {
        let mut found = Found {
            values: [None; SLOTS],
            limits: false,
        };
        for (name, value) in headers {
            let Some(at) = slot_of(name.as_str().as_bytes()) else {
                continue;
            };
            if let Some(slot) = found.values.get_mut(at) {
                slot.get_or_insert(value);
                found.limits |= at < RETRY_AFTER_MS_AT;
            }
        }
        found
    }

    /// The value kept at `at`.
    #[inline]
    fn get(&self, at: usize) -> Option<&'a HeaderValue> {
        self.values.get(at).copied().flatten()
    }

    /// The three fields of a limit kept from `at`.
    #[inline]
    fn fields(&self, at: usize) -> Fields<'a> {
        [self.get(at), self.get(at + 1), self.get(at + 2)]
    }
}

/// Where [`Found`] keeps the header `name`, if it is one that is read. The
/// names are a closed set: the length and at most two bytes say which name
/// it can be, and that one is compared whole (against a constant, in a few
/// wide compares).
#[inline]
fn slot_of(name: &[u8]) -> Option<usize> {
    let at = |i: usize| name.get(i).copied().unwrap_or(0);
    match name.len() {
        11 => is(name, b"retry-after", RETRY_AFTER_AT),
        14 => match at(0) {
            b'r' => is(name, b"retry-after-ms", RETRY_AFTER_MS_AT),
            _ => is(name, b"x-should-retry", SHOULD_RETRY_AT),
        },
        // `x-ratelimit-{field}-{kind}`: `limit` and `reset` differ at 14.
        24 => match at(14) {
            b'm' => is(name, b"x-ratelimit-limit-tokens", OPENAI + 3),
            _ => is(name, b"x-ratelimit-reset-tokens", OPENAI + 5),
        },
        26 => match at(14) {
            b'm' => is(name, b"x-ratelimit-limit-requests", OPENAI),
            _ => is(name, b"x-ratelimit-reset-requests", OPENAI + 2),
        },
        28 => is(name, b"x-ratelimit-remaining-tokens", OPENAI + 4),
        30 => is(name, b"x-ratelimit-remaining-requests", OPENAI + 1),
        // `anthropic-ratelimit-{kind}-{field}`: the field's first byte
        // tells `limit` from `reset`.
        32 => match at(27) {
            b'l' => is(name, b"anthropic-ratelimit-tokens-limit", ANTHROPIC + 3),
            _ => is(name, b"anthropic-ratelimit-tokens-reset", ANTHROPIC + 5),
        },
        34 => match at(29) {
            b'l' => is(name, b"anthropic-ratelimit-requests-limit", ANTHROPIC),
            _ => is(name, b"anthropic-ratelimit-requests-reset", ANTHROPIC + 2),
        },
        36 => is(name, b"anthropic-ratelimit-tokens-remaining", ANTHROPIC + 4),
        38 => match (at(20), at(33)) {
            (b'r', _) => is(
                name,
                b"anthropic-ratelimit-requests-remaining",
                ANTHROPIC + 1,
            ),
            (_, b'l') => is(
                name,
                b"anthropic-ratelimit-input-tokens-limit",
                ANTHROPIC + 6,
            ),
            _ => is(
                name,
                b"anthropic-ratelimit-input-tokens-reset",
                ANTHROPIC + 8,
            ),
        },
        39 => match at(34) {
            b'l' => is(
                name,
                b"anthropic-ratelimit-output-tokens-limit",
                ANTHROPIC + 9,
            ),
            _ => is(
                name,
                b"anthropic-ratelimit-output-tokens-reset",
                ANTHROPIC + 11,
            ),
        },
        42 => is(
            name,
            b"anthropic-ratelimit-input-tokens-remaining",
            ANTHROPIC + 7,
        ),
        43 => is(
            name,
            b"anthropic-ratelimit-output-tokens-remaining",
            ANTHROPIC + 10,
        ),
        _ => None,
    }
}

/// `Some(at)` if `name` is `want`. Compared in parts of at most 32 bytes,
/// as the compiler compares constants of up to that length without a call.
#[inline(always)]
fn is<const N: usize>(name: &[u8], want: &[u8; N], at: usize) -> Option<usize> {
    let (head, tail) = want.split_at(N.min(32));
    let (name_head, name_tail) = name.split_at_checked(head.len())?;
    (name_head == head && name_tail == tail).then_some(at)
}

/// Which `anthropic-ratelimit-*-reset` values a reading parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resets {
    /// Every one, as [`RateLimitSnapshot::from_headers`] does.
    All,
    /// Only those of a limit whose `remaining` is not given (where it is,
    /// `reset_in` is `None`): what the budget's own buckets sync to.
    #[cfg_attr(not(feature = "budget"), allow(dead_code))]
    WithoutRemaining,
}

/// What reading one answer's `anthropic-ratelimit-*` limits carries from
/// one limit to the next.
struct Reading<'a, 'm> {
    now: Now,
    /// The last reset value read and what it gave, reused when the next
    /// value is the same bytes (the API writes the same instant in several
    /// headers).
    last_reset: Option<(&'a [u8], Option<Duration>)>,
    memory: Option<&'m mut Memory>,
    /// Which resets are read.
    resets: Resets,
}

impl<'a> Reading<'a, '_> {
    /// One `anthropic-ratelimit-*` limit.
    fn anthropic(&mut self, [limit, remaining, reset]: Fields<'a>, kind: usize) -> LimitStatus {
        let remaining = remaining.and_then(parse_u64);
        let reset = reset.filter(|_| remaining.is_none() || self.resets == Resets::All);
        let reset_in = reset.and_then(|value| {
            let raw = value.as_bytes();
            match self.last_reset {
                Some((seen, reset_in)) if seen == raw => reset_in,
                _ => {
                    let reset_in = parse_reset(self.memory.as_deref_mut(), value, kind)
                        .map(|at| self.now.until(at));
                    self.last_reset = Some((raw, reset_in));
                    reset_in
                }
            }
        });
        LimitStatus {
            limit: limit.and_then(|value| parse_limit(self.memory.as_deref_mut(), value, kind)),
            remaining,
            reset_in,
        }
    }
}

/// The longest limit value [`parse_limit`] remembers.
const LIMIT_KEPT: usize = 24;

/// The longest reset value [`parse_reset`] remembers.
const RESET_KEPT: usize = 32;

/// The bytes of the value last read in one slot (up to `N`, with their
/// length) and what they gave.
type Kept<const N: usize, T> = Option<([u8; N], usize, T)>;

/// The limit and reset values last read on this thread, of each kind
/// (requests, tokens, input, output tokens), with what they gave: a key's
/// limit is the same in every answer until its tier changes, and the API
/// writes a limit's reset instant rounded to the second, the same in every
/// answer of that second. Taken once per answer, compared in place.
struct Memory {
    limits: [Kept<LIMIT_KEPT, Option<u64>>; 4],
    resets: [Kept<RESET_KEPT, Option<Duration>>; 4],
}

impl Memory {
    /// Nothing remembered.
    const NEW: Memory = Memory {
        limits: [None; 4],
        resets: [None; 4],
    };

    /// `read` with this thread's memory (none if `read` is already using
    /// it, which a reading never does).
    fn with<R>(read: impl FnOnce(Option<&mut Memory>) -> R) -> R {
        thread_local! {
            static MEMORY: RefCell<Memory> = const { RefCell::new(Memory::NEW) };
        }
        MEMORY.with(|memory| read(memory.try_borrow_mut().ok().as_deref_mut()))
    }
}

/// What `read` gives for a header value of bytes `raw`, remembered in
/// `slot`: the value last read there is read again only when its bytes
/// change. A value longer than `N` is read and not remembered.
fn remembered<const N: usize, T: Copy>(
    slot: Option<&mut Kept<N, T>>,
    raw: &[u8],
    read: impl FnOnce() -> T,
) -> T {
    let Some(slot) = slot.filter(|_| raw.len() <= N) else {
        return read();
    };
    if let Some((kept, len, value)) = slot {
        if kept.get(..*len) == Some(raw) {
            return *value;
        }
    }
    let value = read();
    let mut kept = [0u8; N];
    if let Some(head) = kept.get_mut(..raw.len()) {
        head.copy_from_slice(raw);
        *slot = Some((kept, raw.len(), value));
    }
    value
}

/// An `anthropic-ratelimit-*-limit` value read as [`parse_u64`] reads it,
/// remembered in `memory` by its `kind`.
fn parse_limit(memory: Option<&mut Memory>, value: &HeaderValue, kind: usize) -> Option<u64> {
    let slot = memory.and_then(|memory| memory.limits.get_mut(kind));
    remembered(slot, value.as_bytes(), || parse_u64(value))
}

/// An `anthropic-ratelimit-*-reset` value read as RFC 3339, as the time
/// since the epoch (of an instant a [`SystemTime`] can hold), remembered
/// in `memory` by its `kind`.
fn parse_reset(memory: Option<&mut Memory>, value: &HeaderValue, kind: usize) -> Option<Duration> {
    let slot = memory.and_then(|memory| memory.resets.get_mut(kind));
    remembered(slot, value.as_bytes(), || {
        value_str(value)
            .and_then(rfc3339_since_epoch)
            .filter(|&at| UNIX_EPOCH.checked_add(at).is_some())
    })
}

/// The instant headers are read at, and its time since the epoch once a
/// reset needs it: taken once, each reset is then one subtraction.
struct Now {
    /// `None` until needed (read from the clock then), unless given.
    at: Option<SystemTime>,
    /// `None` until needed; then `Some(None)` if `at` is before the epoch.
    since_epoch: Option<Option<Duration>>,
}

impl Now {
    /// At `at`, or at the clock's time when first needed if `None`.
    fn new(at: Option<SystemTime>) -> Self {
        Now {
            at,
            since_epoch: None,
        }
    }

    /// The time from now until `reset` (a time since the epoch that a
    /// [`SystemTime`] can hold): zero if it has passed, at most
    /// [`MAX_DELAY`].
    fn until(&mut self, reset: Duration) -> Duration {
        let at = *self.at.get_or_insert_with(SystemTime::now);
        let since_epoch = *self
            .since_epoch
            .get_or_insert_with(|| at.duration_since(UNIX_EPOCH).ok());
        let until = match since_epoch {
            Some(now) => reset.saturating_sub(now),
            None => UNIX_EPOCH
                .checked_add(reset)
                .and_then(|reset| reset.duration_since(at).ok())
                .unwrap_or(Duration::ZERO),
        };
        bounded(until)
    }
}

/// One `x-ratelimit-*` limit (OpenAI-style), its reset read as `resets`
/// says.
fn read_openai([limit, remaining, reset]: Fields<'_>, resets: Resets) -> LimitStatus {
    let remaining = remaining.and_then(parse_u64);
    let reset = reset.filter(|_| remaining.is_none() || resets == Resets::All);
    LimitStatus {
        limit: limit.and_then(parse_u64),
        remaining,
        reset_in: reset.and_then(number_str).and_then(parse_go_duration),
    }
}

/// Parses a duration written as OpenAI's headers write it (Go's form): one or
/// more `<number><unit>` with units `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`, as in
/// `6m0s`, `1s`, `250ms` or `1h2m3.5s`. A bare number is read as seconds.
/// A duration longer than one year (366 days) is read as one year (366 days).
pub(crate) fn parse_go_duration(s: &str) -> Option<Duration> {
    if let Some(secs) = parse_number(s) {
        return duration_from_f64(secs, 1.0);
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let value = parse_number(num)?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_secs = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total = bounded(total.saturating_add(duration_from_f64(value, unit_secs)?));
        rest = tail;
    }
    Some(total)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (the inverse of `days_from_civil`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

fn digits(s: &[u8], range: std::ops::Range<usize>) -> Option<i64> {
    let part = s.get(range)?;
    if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        part.iter()
            .fold(0i64, |acc, b| acc * 10 + i64::from(b - b'0')),
    )
}

/// Parses an RFC 3339 date-time (`2026-11-28T07:15:00Z`, with optional
/// fractional seconds and a `Z` or `±hh:mm` offset). Instants before 1970 are
/// rejected.
#[cfg(test)]
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    rfc3339_since_epoch(s).and_then(|since| UNIX_EPOCH.checked_add(since))
}

/// [`parse_rfc3339`], as the time since the epoch.
fn rfc3339_since_epoch(s: &str) -> Option<Duration> {
    let b = s.trim().as_bytes();
    if b.len() < 20 || b.len() > MAX_VALUE_LEN {
        return None;
    }
    let (y, mo, d) = (digits(b, 0..4)?, digits(b, 5..7)?, digits(b, 8..10)?);
    let (h, mi, se) = (digits(b, 11..13)?, digits(b, 14..16)?, digits(b, 17..19)?);
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !matches!(b.get(10), Some(b'T' | b't' | b' '))
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
        || !(1..=12).contains(&mo)
        || d < 1
        || d > days_in_month(y, mo)
        || h > 23
        || mi > 59
        || se > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..9 {
            nanos = nanos.saturating_mul(10);
        }
    }
    let offset_secs = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && b.get(i + 3) == Some(&b':') => {
            let oh = digits(b, i + 1..i + 3)?;
            let om = digits(b, i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh * 3600 + om * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se.min(59) - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    // `nanos` is below a second: no carry into `secs`, no overflow.
    Some(Duration::new(secs, nanos))
}

/// Formats an instant as RFC 3339 to the second with a `Z`, as the API writes
/// its `anthropic-ratelimit-*-reset` headers (`2026-11-28T07:15:00Z`).
/// Instants before 1970 are written as 1970-01-01T00:00:00Z.
pub fn format_rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match rfc3339_bytes(secs) {
        // Only ASCII digits and punctuation: always UTF-8.
        Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        None => {
            let secs = i64::try_from(secs).unwrap_or(i64::MAX / 2);
            let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
            let rem = secs.rem_euclid(86_400);
            format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
                rem / 3600,
                (rem / 60) % 60,
                rem % 60
            )
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a unix second, written without allocating;
/// `None` past year 9999 (five digits).
pub(crate) fn rfc3339_bytes(secs: u64) -> Option<[u8; 20]> {
    let secs = i64::try_from(secs).ok()?;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    if !(0..=9999).contains(&y) {
        return None;
    }
    let rem = secs.rem_euclid(86_400);
    let mut out = *b"0000-00-00T00:00:00Z";
    let mut put = |at: usize, value: i64, width: usize| {
        let mut v = value;
        for i in (at..at + width).rev() {
            if let (Some(slot), Ok(digit)) = (out.get_mut(i), u8::try_from(v % 10)) {
                *slot = b'0' + digit;
            }
            v /= 10;
        }
    };
    put(0, y, 4);
    put(5, m, 2);
    put(8, d, 2);
    put(11, rem / 3600, 2);
    put(14, (rem / 60) % 60, 2);
    put(17, rem % 60, 2);
    Some(out)
}

/// Whether a header reports rate limits (`anthropic-ratelimit-*` or the
/// OpenAI-style `x-ratelimit-*`).
#[cfg(feature = "budget")]
pub(crate) fn is_rate_limit_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("anthropic-ratelimit-") || name.starts_with("x-ratelimit-")
}

/// The request's `content-length`, if it is a plain number (the body's size
/// when the body itself was not read).
#[cfg(feature = "budget")]
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget's statuses are what it read from the whole snapshot
    /// (input tokens from the combined `tokens` limit when the response
    /// says nothing of them), for any mix of Anthropic's, OpenAI-style and
    /// other headers, well-formed or not; none without a rate-limit header.
    /// For the budget's own buckets, the same without the resets of limits
    /// whose `remaining` is given.
    #[test]
    #[cfg(feature = "budget")]
    fn the_budget_reads_what_the_snapshot_says() {
        let now = UNIX_EPOCH + Duration::from_secs(1_795_850_100);
        let openai = ["limit", "remaining", "reset"]
            .map(|f| ["requests", "tokens"].map(|k| format!("x-ratelimit-{f}-{k}")));
        let kinds = ["requests", "tokens", "input-tokens", "output-tokens"];
        let names: Vec<String> = kinds
            .iter()
            .flat_map(|k| {
                ["limit", "remaining", "reset"].map(|f| format!("anthropic-ratelimit-{k}-{f}"))
            })
            .chain(openai.into_iter().flatten())
            .chain(["retry-after".into(), "anthropic-ratelimit-other".into()])
            .collect();
        let values = [
            "4000000",
            "3999000",
            " 12 ",
            "0",
            "2026-11-28T07:15:12Z",
            "2026-11-28T07:15:00Z",
            "6m0s",
            "x",
            "",
        ];
        let mut seed = 42u64;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as usize % n
        };
        for round in 0..2_000 {
            let mut headers = HeaderMap::new();
            headers.insert("content-type", HeaderValue::from_static("application/json"));
            for _ in 0..next(14) {
                let name = HeaderName::try_from(names[next(names.len())].as_str()).unwrap();
                headers.append(name, HeaderValue::from_static(values[next(values.len())]));
            }
            let snap = RateLimitSnapshot::from_headers_at(&headers, now);
            let want = Dimension::ALL.map(|d| match *snap.dimension(d) {
                s if d == Dimension::InputTokens && s.is_empty() => snap.tokens,
                s => s,
            });
            let named = headers.keys().any(is_rate_limit_header);
            let got = RateLimitSnapshot::budget_statuses_at(&headers, now);
            assert_eq!(got, named.then_some(want), "round {round}: {headers:?}");
            // The budget's own buckets: a reset only where no `remaining`.
            let own = want.map(|s| LimitStatus {
                reset_in: s.reset_in.filter(|_| s.remaining.is_none()),
                ..s
            });
            let got = RateLimitSnapshot::budget_statuses_with(
                &headers,
                Some(now),
                Resets::WithoutRemaining,
            );
            assert_eq!(got, named.then_some(own), "round {round}: {headers:?}");
        }
    }

    /// Each name that is read has its own place, by its kind and field;
    /// a name that differs from one of them by a byte, a byte more or a
    /// byte less has none.
    #[test]
    fn names_are_told_apart_by_every_byte() {
        let fields = ["limit", "remaining", "reset"];
        let mut names = vec![
            ("retry-after-ms".to_string(), RETRY_AFTER_MS_AT),
            ("retry-after".to_string(), RETRY_AFTER_AT),
            ("x-should-retry".to_string(), SHOULD_RETRY_AT),
        ];
        for (k, kind) in ["requests", "tokens", "input-tokens", "output-tokens"]
            .iter()
            .enumerate()
        {
            for (f, field) in fields.iter().enumerate() {
                let name = format!("anthropic-ratelimit-{kind}-{field}");
                names.push((name, ANTHROPIC + 3 * k + f));
            }
        }
        for (k, kind) in ["requests", "tokens"].iter().enumerate() {
            for (f, field) in fields.iter().enumerate() {
                names.push((format!("x-ratelimit-{field}-{kind}"), OPENAI + 3 * k + f));
            }
        }
        let mut places: Vec<usize> = names.iter().map(|(_, at)| *at).collect();
        places.sort_unstable();
        assert_eq!(places, (0..SLOTS).collect::<Vec<_>>());
        for (name, at) in &names {
            let name = name.as_bytes();
            assert_eq!(slot_of(name), Some(*at), "{name:?}");
            let read = |other: &[u8]| {
                names
                    .iter()
                    .find(|(n, _)| n.as_bytes() == other)
                    .map(|(_, at)| *at)
            };
            for i in 0..name.len() {
                for b in [b'-', b'a', b'e', b'i', b'l', b'r', b's', b't', b'x', b'z'] {
                    let mut other = name.to_vec();
                    other[i] = b;
                    assert_eq!(slot_of(&other), read(&other), "{other:?}");
                }
                assert_eq!(slot_of(&name[..i]), read(&name[..i]), "{name:?} cut at {i}");
                assert_eq!(slot_of(&name[i + 1..]), read(&name[i + 1..]));
            }
            let longer = [name, b"s"].concat();
            assert_eq!(slot_of(&longer), None, "{longer:?}");
        }
    }

    use crate::wire::ratelimit::insert_limit_headers;
    use http::header::RETRY_AFTER;

    /// A remembered limit is the limit of the value read, whatever values
    /// of that kind or another came before it on the thread.
    #[test]
    fn a_remembered_limit_is_the_value_read() {
        let values = [
            "50",
            "50",
            " 50 ",
            "60",
            "x",
            "",
            "4000000",
            "18446744073709551616",
            "123456789012345678901234",
            "1234567890123456789012345",
            "50",
        ];
        let mut memory = Memory::NEW;
        for kind in [0, 1, 2, 3, 0, 4] {
            for raw in values.iter().chain(values.iter().rev()) {
                let value = HeaderValue::from_static(raw);
                let limit = parse_limit(Some(&mut memory), &value, kind);
                assert_eq!(limit, parse_u64(&value), "{raw:?}");
            }
        }
        // Through the headers: a changed limit is read, not the last one.
        for limit in [50, 60, 50] {
            let mut h = HeaderMap::new();
            h.insert(
                "anthropic-ratelimit-requests-limit",
                HeaderValue::from(limit),
            );
            let snap = RateLimitSnapshot::from_headers(&h);
            assert_eq!(snap.requests.limit, Some(limit));
        }
    }

    #[test]
    fn whole_numbers_parse_as_str_parse_does() {
        for (raw, expected) in [
            ("0", Some(0)),
            (" 42\t", Some(42)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("9999999999999999999", Some(9_999_999_999_999_999_999)),
            ("09999999999999999999", Some(9_999_999_999_999_999_999)),
            ("99999999999999999999", None),
            ("999999999999999999/", None),
            ("", None),
            ("  ", None),
            ("+1", None),
            ("-1", None),
            ("1 2", None),
            ("1.0", None),
            ("٣", None),
        ] {
            let value = HeaderValue::from_bytes(raw.as_bytes());
            assert_eq!(value.ok().as_ref().and_then(parse_u64), expected, "{raw:?}");
        }
        let long = format!("{}1", "0".repeat(MAX_VALUE_LEN));
        assert_eq!(
            parse_u64(&HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static("x"))),
            None
        );
    }

    /// Every length up to 20 digits, each with one byte made a non-digit
    /// (the bytes next to `0` and `9` among them) or left alone.
    #[test]
    fn digit_groups_parse_as_str_parse_does() {
        let digits = b"98765432109876543210";
        for len in 1..=digits.len() {
            for pos in 0..=len {
                for bad in [b'/', b':', b'a', b' ', b'\t', 0x80, 0xfa, 0xff] {
                    let mut raw = digits[..len].to_vec();
                    if let Some(b) = raw.get_mut(pos) {
                        *b = bad;
                    }
                    let Ok(value) = HeaderValue::from_bytes(&raw) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&raw);
                    let trimmed = text.trim_matches([' ', '\t']);
                    let expected = (!trimmed.is_empty()
                        && trimmed.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| trimmed.parse::<u64>().ok())
                    .flatten();
                    assert_eq!(parse_u64(&value), expected, "{raw:?}");
                }
            }
        }
    }

    /// The reset remembered from the last answer is used only for the same
    /// bytes: a new value, or one that does not parse, is read afresh.
    #[test]
    fn a_remembered_reset_is_used_only_for_the_same_value() {
        let mut memory = Memory::NEW;
        let mut read = |s: &'static str, kind| {
            parse_reset(Some(&mut memory), &HeaderValue::from_static(s), kind)
                .map(|since| UNIX_EPOCH + since)
        };
        let base = UNIX_EPOCH + Duration::from_secs(1_795_850_100);
        assert_eq!(read("2026-11-28T07:15:00Z", 0), Some(base));
        assert_eq!(read("2026-11-28T07:15:00Z", 0), Some(base));
        let next = read("2026-11-28T07:15:01Z", 0);
        assert_eq!(next, Some(base + Duration::from_secs(1)));
        assert_eq!(read("2026-11-28T07:15:0xZ", 0), None);
        assert_eq!(read("2026-11-28T07:15:00Z", 0), Some(base));
        let long = "2026-11-28T07:15:00.000000000000+00:00";
        assert!(long.len() > RESET_KEPT);
        assert_eq!(read(long, 0), Some(base));
        // Each kind of limit remembers its own.
        let other = "2026-11-28T07:16:00Z";
        assert_eq!(read(other, 1), Some(base + Duration::from_secs(60)));
        assert_eq!(read("2026-11-28T07:15:00Z", 0), Some(base));
        assert_eq!(read(other, 1), Some(base + Duration::from_secs(60)));
        assert_eq!(read(other, 4), Some(base + Duration::from_secs(60)));
    }

    /// The time until a reset is what `SystemTime` arithmetic gives, for a
    /// now before, at or after the epoch and a reset passed or to come.
    #[test]
    fn time_until_a_reset_is_the_system_time_difference() {
        let instants = [
            0,
            1,
            999_999_999,
            1_000_000_000,
            1_795_850_100_250_000_000,
            1_795_850_112_000_000_000,
        ];
        for now_nanos in instants {
            for before_epoch in [false, true] {
                let offset = Duration::from_nanos(now_nanos);
                let now = if before_epoch {
                    UNIX_EPOCH.checked_sub(offset).unwrap_or(UNIX_EPOCH)
                } else {
                    UNIX_EPOCH + offset
                };
                let mut clock = Now::new(Some(now));
                for reset_nanos in instants.iter().chain(&[u64::MAX]) {
                    let reset = Duration::from_nanos(*reset_nanos);
                    let want = (UNIX_EPOCH + reset)
                        .duration_since(now)
                        .unwrap_or(Duration::ZERO)
                        .min(MAX_DELAY);
                    assert_eq!(clock.until(reset), want, "{now:?} until {reset:?}");
                }
            }
        }
    }

    #[test]
    fn one_pass_reads_the_first_value_of_each_name_as_get_does() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.append(
            "anthropic-ratelimit-requests-limit",
            HeaderValue::from_static("50"),
        );
        h.append(
            "anthropic-ratelimit-requests-limit",
            HeaderValue::from_static("7"),
        );
        h.append(
            "anthropic-ratelimit-output-tokens-remaining",
            HeaderValue::from_static("x"),
        );
        h.append(
            "anthropic-ratelimit-output-tokens-remaining",
            HeaderValue::from_static("9"),
        );
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("123"),
        );
        h.insert(
            "x-ratelimit-reset-tokens",
            HeaderValue::from_static("1m30s"),
        );
        h.insert(
            "anthropic-ratelimit-bogus-limit",
            HeaderValue::from_static("1"),
        );
        h.insert("x-ratelimit-limit-bogus", HeaderValue::from_static("1"));
        h.insert("x-should-retry", HeaderValue::from_static("false"));
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let snap = RateLimitSnapshot::from_headers_at(&h, UNIX_EPOCH);
        assert_eq!(snap.requests.limit, Some(50));
        // A malformed first value reads as absent, as with `HeaderMap::get`.
        assert_eq!(snap.output_tokens.remaining, None);
        assert_eq!(snap.tokens.remaining, Some(123));
        assert_eq!(snap.tokens.reset_in, Some(Duration::from_secs(90)));
        assert_eq!(snap.should_retry, Some(false));
        assert_eq!(snap.retry_after, Some(Duration::from_secs(3)));
        assert!(snap.input_tokens.is_empty());
    }

    #[test]
    fn written_resets_are_right_when_cached_seconds_share_a_slot() {
        // Seconds 8 apart share a cache slot: each must still be written as
        // its own instant, in any order, again and again.
        let base = 1_795_850_100u64;
        for round in 0..3 {
            for secs in [base, base + 8, base + 16, base + 1, base] {
                let at = UNIX_EPOCH + Duration::from_secs(secs);
                let mut h = HeaderMap::new();
                insert_limit_headers(&mut h, "requests", 50, 49, at);
                let reset = h.get("anthropic-ratelimit-requests-reset");
                let reset = reset.and_then(|v| v.to_str().ok()).and_then(parse_rfc3339);
                assert_eq!(reset, Some(at), "round {round}, second {secs}");
                assert_eq!(h["anthropic-ratelimit-requests-limit"], "50");
                assert_eq!(h["anthropic-ratelimit-requests-remaining"], "49");
            }
        }
    }

    #[test]
    fn rfc3339_without_allocating_matches_the_calendar() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_795_850_109, "2026-11-28T07:15:09Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(
                rfc3339_bytes(secs).as_ref().map(|b| &b[..]),
                Some(text.as_bytes())
            );
        }
        assert_eq!(rfc3339_bytes(253_402_300_800), None);
        let far = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(format_rfc3339(far), "10000-01-01T00:00:00Z");
    }
    use proptest::prelude::*;

    fn at(s: &str) -> SystemTime {
        parse_rfc3339(s).unwrap_or(UNIX_EPOCH)
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const NOW: &str = "2026-11-28T07:15:00Z";

    #[test]
    fn retry_after_delta_seconds() {
        let s = RateLimitSnapshot::from_headers_at(&map(&[("retry-after", "505")]), at(NOW));
        assert_eq!(s.retry_after, Some(Duration::from_secs(505)));
        let s = RateLimitSnapshot::from_headers_at(&map(&[("retry-after", " 1.5 ")]), at(NOW));
        assert_eq!(s.retry_after, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn retry_after_all_three_http_date_forms() {
        let now = at("1994-11-06T08:49:30Z");
        for form in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            let s = RateLimitSnapshot::from_headers_at(&map(&[("retry-after", form)]), now);
            assert_eq!(s.retry_after, Some(Duration::from_secs(7)), "{form}");
        }
    }

    #[test]
    fn retry_after_date_in_the_past_is_zero() {
        let s = RateLimitSnapshot::from_headers_at(
            &map(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")]),
            at(NOW),
        );
        assert_eq!(s.retry_after, Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_ms_wins_over_retry_after() {
        let h = map(&[("retry-after", "3"), ("retry-after-ms", "250.5")]);
        let s = RateLimitSnapshot::from_headers_at(&h, at(NOW));
        assert_eq!(s.retry_after, Some(Duration::from_micros(250_500)));
        // A malformed retry-after-ms falls back to retry-after.
        let h = map(&[("retry-after", "3"), ("retry-after-ms", "soon")]);
        let s = RateLimitSnapshot::from_headers_at(&h, at(NOW));
        assert_eq!(s.retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn malformed_negative_and_huge_values_are_ignored() {
        for bad in [
            "-1",
            "1e3",
            "inf",
            "NaN",
            "",
            "..",
            "Mon, 99 Foo 2026 99:99:99 GMT",
            "+5",
        ] {
            let h = map(&[
                ("retry-after", bad),
                ("retry-after-ms", bad),
                ("anthropic-ratelimit-requests-remaining", bad),
                ("x-should-retry", bad),
            ]);
            let s = RateLimitSnapshot::from_headers_at(&h, at(NOW));
            assert_eq!(s.retry_after, None, "{bad:?}");
            if !bad.bytes().all(|b| b.is_ascii_digit()) {
                assert_eq!(s.requests.remaining, None, "{bad:?}");
            }
            assert_eq!(s.should_retry, None, "{bad:?}");
        }
        let long = "x".repeat(200);
        let s = RateLimitSnapshot::from_headers_at(&map(&[("retry-after", &long)]), at(NOW));
        assert_eq!(s.retry_after, None);
    }

    /// A delay above a year, however large, is a year: never mistaken for a
    /// malformed value (which a layer would retry at once).
    #[test]
    fn huge_delays_are_read_as_the_longest_delay() {
        let digits = "9".repeat(400);
        for huge in [
            "31622401",
            "31622400.5",
            "1000000000000",
            "99999999999999",
            "99999999999999999999999999",
            digits.as_str(),
        ] {
            let h = map(&[("retry-after", huge)]);
            let s = RateLimitSnapshot::from_headers_at(&h, at(NOW));
            assert_eq!(s.retry_after, Some(MAX_DELAY), "retry-after {huge}");
            assert_eq!(parse_go_duration(huge), Some(MAX_DELAY), "{huge}");
        }
        for huge_ms in ["31622401000", "1000000000000", digits.as_str()] {
            let h = map(&[("retry-after-ms", huge_ms)]);
            let s = RateLimitSnapshot::from_headers_at(&h, at(NOW));
            assert_eq!(s.retry_after, Some(MAX_DELAY), "retry-after-ms {huge_ms}");
        }
        let just_below = map(&[("retry-after", "31622399")]);
        let s = RateLimitSnapshot::from_headers_at(&just_below, at(NOW));
        assert_eq!(s.retry_after, Some(Duration::from_secs(31_622_399)));
        let far = map(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]);
        let s = RateLimitSnapshot::from_headers_at(&far, at(NOW));
        assert_eq!(s.retry_after, Some(MAX_DELAY));
        let mut h = HeaderMap::new();
        insert_limit_headers(&mut h, "requests", 50, 0, at("9999-01-01T00:00:00Z"));
        let s = RateLimitSnapshot::from_headers_at(&h, at(NOW));
        assert_eq!(s.exhausted_reset(), Some(MAX_DELAY));
        assert_eq!(parse_go_duration("99999999999h"), Some(MAX_DELAY));
    }

    #[test]
    fn non_utf8_values_are_ignored() {
        let mut h = HeaderMap::new();
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_bytes(b"\xff\xfe").unwrap_or(HeaderValue::from_static("x")),
        );
        h.insert(
            "anthropic-ratelimit-tokens-limit",
            HeaderValue::from_bytes(b"1\xff").unwrap_or(HeaderValue::from_static("x")),
        );
        let s = RateLimitSnapshot::from_headers_at(&h, at(NOW));
        assert!(s.is_empty());
    }

    #[test]
    fn should_retry_true_and_false() {
        let s = RateLimitSnapshot::from_headers_at(&map(&[("x-should-retry", "TRUE")]), at(NOW));
        assert_eq!(s.should_retry, Some(true));
        let s = RateLimitSnapshot::from_headers_at(&map(&[("x-should-retry", "false")]), at(NOW));
        assert_eq!(s.should_retry, Some(false));
    }

    #[test]
    fn anthropic_limits_all_dimensions() {
        let mut h = HeaderMap::new();
        let reset = at("2026-11-28T07:15:30Z");
        insert_limit_headers(&mut h, "requests", 50, 49, reset);
        insert_limit_headers(&mut h, "tokens", 38_000, 37_000, reset);
        insert_limit_headers(&mut h, "input-tokens", 30_000, 29_000, reset);
        insert_limit_headers(
            &mut h,
            "output-tokens",
            8_000,
            0,
            at("2026-11-28T07:16:00Z"),
        );
        let s = RateLimitSnapshot::from_headers_at(&h, at(NOW));
        let thirty = Some(Duration::from_secs(30));
        assert_eq!(
            s.requests,
            LimitStatus {
                limit: Some(50),
                remaining: Some(49),
                reset_in: thirty
            }
        );
        assert_eq!(s.tokens.limit, Some(38_000));
        assert_eq!(s.dimension(Dimension::InputTokens).remaining, Some(29_000));
        assert_eq!(s.dimension(Dimension::Requests).limit, Some(50));
        assert_eq!(s.dimension(Dimension::OutputTokens).limit, Some(8_000));
        assert_eq!(s.exhausted_reset(), Some(Duration::from_secs(60)));
    }

    #[test]
    fn openai_limits_and_go_durations() {
        let h = map(&[
            ("x-ratelimit-limit-requests", "500"),
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-limit-tokens", "30000"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        let s = RateLimitSnapshot::from_headers_at(&h, at(NOW));
        assert_eq!(s.requests.limit, Some(500));
        assert_eq!(s.requests.reset_in, Some(Duration::from_millis(120)));
        assert_eq!(s.tokens.reset_in, Some(Duration::from_secs(360)));
        assert_eq!(s.exhausted_reset(), Some(Duration::from_secs(360)));
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("7"), Some(Duration::from_secs(7)));
        for bad in ["", "s", "1x", "1.2.3s", "-1s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_forms() {
        let base = at("2026-11-28T07:15:00Z");
        assert_eq!(
            parse_rfc3339("2026-11-28T07:15:00.250Z"),
            base.checked_add(Duration::from_millis(250))
        );
        assert_eq!(parse_rfc3339("2026-11-28T09:15:00+02:00"), Some(base));
        assert_eq!(parse_rfc3339("2026-11-28t07:15:00z"), Some(base));
        for bad in [
            "2026-02-30T00:00:00Z",
            "2026-11-28T24:00:00Z",
            "2026-11-28T07:15:00",
            "1969-12-31T23:59:59Z",
            "2026-11-28T07:15:00+2:00",
            "2026-11-28T07:15:00.Z",
            "not a date at all, at all",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z")
                .map(format_rfc3339)
                .as_deref(),
            Some("2024-02-29T00:00:00Z")
        );
    }

    #[test]
    fn format_is_second_precision_with_z() {
        let t = at("2026-11-28T07:15:09Z") + Duration::from_millis(999);
        assert_eq!(format_rfc3339(t), "2026-11-28T07:15:09Z");
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80), secs in 0u64..10_000_000_000) {
            let now = UNIX_EPOCH + Duration::from_secs(secs);
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let mut h = HeaderMap::new();
                for name in ["retry-after", "retry-after-ms", "x-should-retry",
                             "anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset",
                             "x-ratelimit-reset-tokens", "x-ratelimit-limit-requests"] {
                    h.insert(HeaderName::from_static(name), v.clone());
                }
                let s = RateLimitSnapshot::from_headers_at(&h, now);
                if let Some(d) = s.retry_after { prop_assert!(d <= MAX_DELAY); }
                if let Some(d) = s.tokens.reset_in { prop_assert!(d <= MAX_DELAY); }
            }
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = parse_rfc3339(s);
                let _ = parse_go_duration(s);
            }
        }

        /// Any number, with leading zeros up to 20 digits, or any bytes,
        /// read as `str::parse` reads the digits.
        #[test]
        fn whole_numbers_parse_as_str_parse_does_for_any(n in any::<u64>(), zeros in 0usize..20, bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            let text = format!("{}{n}", "0".repeat(zeros));
            let value = HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("x"));
            prop_assert_eq!(parse_u64(&value), text.parse::<u64>().ok(), "{}", text);
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                let text = String::from_utf8_lossy(&bytes);
                let trimmed = text.trim_matches([' ', '\t']);
                let expected = (!trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| trimmed.parse::<u64>().ok())
                    .flatten();
                prop_assert_eq!(parse_u64(&value), expected, "{:?}", bytes);
            }
        }

        #[test]
        fn rfc3339_round_trips(secs in 0u64..253_402_300_799) {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            prop_assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }

        /// A longer delay is never read as a shorter one.
        #[test]
        fn retry_after_is_monotonic(a in any::<u128>(), b in any::<u128>(), zeros in 0usize..40) {
            let (small, large) = (a.min(b), a.max(b));
            let read = |n: u128, unit: &str, pad: usize| {
                let text = format!("{}{}", "0".repeat(pad), n);
                let h = map(&[(unit, &text)]);
                RateLimitSnapshot::from_headers_at(&h, UNIX_EPOCH).retry_after
            };
            for unit in ["retry-after", "retry-after-ms"] {
                let (s, l) = (read(small, unit, 0), read(large, unit, zeros));
                prop_assert!(s.is_some() && l.is_some());
                prop_assert!(s <= l, "{unit}: {small} read as {s:?}, {large} as {l:?}");
            }
        }

        #[test]
        fn retry_after_seconds_round_trip(secs in 0u64..=MAX_DELAY.as_secs()) {
            let h = map(&[("retry-after", &secs.to_string())]);
            let s = RateLimitSnapshot::from_headers_at(&h, UNIX_EPOCH);
            prop_assert_eq!(s.retry_after, Some(Duration::from_secs(secs)));
        }
    }
}
