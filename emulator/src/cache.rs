//! The emulator's prompt cache: which prefixes were seen, until when.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::tokens::{parse_request, CacheTtl, Endpoint, TokenCounter, Unit};

/// What the cache makes of a request's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CacheOutcome {
    /// Tokens read from the cache (the longest live prefix ending at a breakpoint).
    pub(crate) read: u64,
    /// Tokens written to the cache with a 5-minute TTL.
    pub(crate) write_5m: u64,
    /// Tokens written to the cache with a 1-hour TTL.
    pub(crate) write_1h: u64,
    /// Tokens after the last breakpoint (or not cacheable).
    pub(crate) uncached: u64,
}

impl CacheOutcome {
    /// All cache writes.
    pub(crate) fn written(&self) -> u64 {
        self.write_5m + self.write_1h
    }
}

/// One cached prefix: readable from `readable_at` (when the answer of the
/// request that wrote it began) until `expires`.
#[derive(Debug, Clone, Copy)]
struct Entry {
    readable_at: Instant,
    expires: Instant,
}

impl Entry {
    fn readable(&self, now: Instant) -> bool {
        self.readable_at <= now && now < self.expires
    }
}

/// Blocks at and before a breakpoint where the cache looks for an entry to
/// read: the API checks "all previous content block boundaries (up to
/// approximately 20 blocks before your explicit breakpoint)", so a
/// breakpoint moved to the newest turn still reads the prefix written at the
/// previous one.
pub(crate) const LOOKBACK_BLOCKS: usize = 20;

/// The longest prefix a request reads: for each breakpoint whose prefix is
/// cacheable (at least `min_tokens`), the nearest of it and the
/// [`LOOKBACK_BLOCKS`] - 1 blocks before it whose prefix is `cached`.
fn longest_read(units: &[Unit], min_tokens: u64, mut cached: impl FnMut(u64) -> bool) -> u64 {
    let mut cumulative = Vec::with_capacity(units.len());
    let mut sum = 0u64;
    for unit in units {
        sum += unit.tokens;
        cumulative.push(sum);
    }
    let mut read = 0u64;
    for (i, unit) in units.iter().enumerate() {
        if unit.breakpoint.is_none() || cumulative[i] < min_tokens {
            continue;
        }
        let first = i.saturating_sub(LOOKBACK_BLOCKS - 1);
        for j in (first..=i).rev() {
            if cumulative[j] < min_tokens || cumulative[j] <= read {
                break;
            }
            if cached(units[j].prefix_hash) {
                read = cumulative[j];
                break;
            }
        }
    }
    read
}

/// Prefix hash -> entry, per model (the model is part of the hash).
#[derive(Debug, Default)]
pub(crate) struct PromptCache {
    entries: HashMap<u64, Entry>,
    min_tokens: u64,
    last_prune: Option<Instant>,
}

fn ttl(t: CacheTtl) -> Duration {
    match t {
        CacheTtl::FiveMinutes => Duration::from_secs(5 * 60),
        CacheTtl::OneHour => Duration::from_secs(60 * 60),
    }
}

impl PromptCache {
    /// A cache that only stores prefixes of at least `min_tokens` tokens.
    pub(crate) fn new(min_tokens: u64) -> Self {
        PromptCache {
            entries: HashMap::new(),
            min_tokens,
            last_prune: None,
        }
    }

    /// Works out reads and writes for `units` without changing the cache.
    ///
    /// The longest prefix that is readable (its writer's answer has begun,
    /// and it has not expired) and ends at a breakpoint or at one of the
    /// [`LOOKBACK_BLOCKS`] blocks before one is read; the
    /// tokens from there to the last breakpoint are written (each span with
    /// the TTL of the breakpoint that closes it); the rest is uncached input.
    /// A prefix shorter than the minimum cacheable length is neither read nor
    /// written.
    pub(crate) fn lookup(&self, units: &[Unit], now: Instant) -> CacheOutcome {
        let read = longest_read(units, self.min_tokens, |hash| {
            self.entries.get(&hash).is_some_and(|e| e.readable(now))
        });
        let mut cumulative = 0u64;
        let mut last_breakpoint = 0u64;
        let mut spans: Vec<(u64, CacheTtl)> = Vec::new();
        for unit in units {
            cumulative += unit.tokens;
            if let Some(t) = unit.breakpoint {
                if cumulative < self.min_tokens {
                    continue;
                }
                spans.push((cumulative, t));
                last_breakpoint = cumulative;
            }
        }
        let mut outcome = CacheOutcome {
            read,
            uncached: cumulative - last_breakpoint,
            ..CacheOutcome::default()
        };
        let mut start = read;
        for (end, t) in spans {
            if end <= start {
                continue;
            }
            match t {
                CacheTtl::FiveMinutes => outcome.write_5m += end - start,
                CacheTtl::OneHour => outcome.write_1h += end - start,
            }
            start = end;
        }
        outcome
    }

    /// Records the request's breakpoints as seen at `now`, readable from
    /// `readable_at` (when its answer begins; an entry already readable
    /// stays so). The lifetime counts from `now`, the start of the request,
    /// and a read refreshes it, as the API does.
    pub(crate) fn commit(&mut self, units: &[Unit], now: Instant, readable_at: Instant) {
        let mut cumulative = 0u64;
        for unit in units {
            cumulative += unit.tokens;
            if let Some(t) = unit.breakpoint {
                if cumulative < self.min_tokens {
                    continue;
                }
                let fresh = Entry {
                    readable_at: readable_at.max(now),
                    expires: now + ttl(t),
                };
                let entry = self.entries.entry(unit.prefix_hash).or_insert(fresh);
                if entry.expires <= now {
                    *entry = fresh;
                } else {
                    entry.readable_at = entry.readable_at.min(fresh.readable_at);
                    entry.expires = entry.expires.max(fresh.expires);
                }
            }
        }
        let due = self
            .last_prune
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60));
        if due {
            self.entries.retain(|_, e| e.expires > now);
            self.last_prune = Some(now);
        }
    }
}

/// The least input any client could be charged for a sequence of requests:
/// each request's prompt as a [`TokenCounter`] counts it, less the longest
/// prefix that an earlier request of the sequence wrote at one of its
/// `cache_control` breakpoints, found at a breakpoint or up to 20 blocks
/// before one, as the emulator's cache finds it (prefixes shorter than the cache's minimum are never
/// cached). It is what the emulator would charge if every request were sent
/// after the answers of all earlier ones had begun and no entry expired:
/// the best a client can do, whatever its strategy.
///
/// # Examples
///
/// ```
/// use tower_llm_limits_emulator::{CacheBound, TokenCounter};
///
/// let system = "abcd ".repeat(2_000);
/// let body = |q: &str| serde_json::to_vec(&serde_json::json!({
///     "model": "claude-sonnet-4-5", "max_tokens": 10,
///     "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
///     "messages": [{"role": "user", "content": q}]})).unwrap();
/// let mut bound = CacheBound::new(TokenCounter::words(), 1_024);
/// let first = bound.charge(&body("What now?"))?;
/// assert_eq!((first.total, first.read), (2_000 + 3 + 3, 0));
/// let second = bound.charge(&body("And then?"))?;
/// assert_eq!((second.total, second.read), (2_000 + 3 + 3, 2_000));
/// assert_eq!(second.charged(), 6);
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone)]
pub struct CacheBound {
    counter: TokenCounter,
    min_tokens: u64,
    written: HashSet<u64>,
}

/// What [`CacheBound::charge`] makes of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BoundCharge {
    /// The whole prompt's tokens.
    pub total: u64,
    /// Tokens an ideal client reads from the cache.
    pub read: u64,
}

impl BoundCharge {
    /// What ITPM is charged: the prompt less the cache read.
    pub fn charged(&self) -> u64 {
        self.total - self.read
    }
}

impl CacheBound {
    /// A bound counting with `counter`, for a cache that stores prefixes of
    /// at least `min_tokens` tokens (the emulator's default is
    /// [`DEFAULT_CACHE_MIN_TOKENS`](crate::DEFAULT_CACHE_MIN_TOKENS)).
    pub fn new(counter: TokenCounter, min_tokens: u64) -> Self {
        CacheBound {
            counter,
            min_tokens,
            written: HashSet::new(),
        }
    }

    /// The next request of the sequence: its tokens and its ideal cache read;
    /// its breakpoints are written for the requests that follow.
    ///
    /// # Errors
    ///
    /// The `invalid_request_error` message, when the body is not a valid
    /// Messages request.
    pub fn charge(&mut self, body: &[u8]) -> Result<BoundCharge, String> {
        let parsed = parse_request(body, Endpoint::Messages, &self.counter)?;
        let read = longest_read(&parsed.units, self.min_tokens, |hash| {
            self.written.contains(&hash)
        });
        let mut cumulative = 0u64;
        for unit in &parsed.units {
            cumulative += unit.tokens;
            if unit.breakpoint.is_some() && cumulative >= self.min_tokens {
                self.written.insert(unit.prefix_hash);
            }
        }
        Ok(BoundCharge {
            total: parsed.total_tokens,
            read,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(system: &str, user: &str) -> Vec<Unit> {
        let body = serde_json::json!({"model":"m","max_tokens":1,
            "system":[{"type":"text","text":system,"cache_control":{"type":"ephemeral"}}],
            "messages":[{"role":"user","content":user}]});
        parse_request(
            &serde_json::to_vec(&body).unwrap(),
            Endpoint::Messages,
            &TokenCounter::words(),
        )
        .unwrap()
        .units
    }

    #[tokio::test(start_paused = true)]
    async fn write_then_read_then_expire() {
        let mut cache = PromptCache::new(0);
        let u = units("abcd abcd abcd", "hello");
        let now = Instant::now();
        let first = cache.lookup(&u, now);
        assert_eq!(
            first,
            CacheOutcome {
                read: 0,
                write_5m: 3,
                write_1h: 0,
                uncached: 2 + 3
            }
        );
        cache.commit(&u, now, now);
        let second = cache.lookup(&u, now + Duration::from_secs(299));
        assert_eq!(second.read, 3);
        assert_eq!(second.written(), 0);
        // the read at 299 s refreshes it
        let later = now + Duration::from_secs(299);
        cache.commit(&u, later, later);
        assert_eq!(cache.lookup(&u, now + Duration::from_secs(500)).read, 3);
        assert_eq!(cache.lookup(&u, now + Duration::from_secs(600)).read, 0);
        // a different prefix misses
        assert_eq!(cache.lookup(&units("other", "hello"), now).read, 0);
    }

    /// A prefix is readable only once its writer's answer has begun: a
    /// request admitted before that writes it again.
    #[tokio::test(start_paused = true)]
    async fn readable_only_after_the_writers_answer_begins() {
        let mut cache = PromptCache::new(0);
        let u = units("abcd abcd abcd", "hello");
        let now = Instant::now();
        let begins = now + Duration::from_millis(600);
        cache.commit(&u, now, begins);
        let before = cache.lookup(&u, now + Duration::from_millis(599));
        assert_eq!((before.read, before.written()), (0, 3));
        // A second writer before that does not delay the first one's entry.
        cache.commit(
            &u,
            now + Duration::from_millis(100),
            now + Duration::from_secs(5),
        );
        let after = cache.lookup(&u, begins);
        assert_eq!((after.read, after.written()), (3, 0));
        // Its lifetime counts from the start of the request.
        assert_eq!(cache.lookup(&u, now + Duration::from_secs(301)).read, 0);
    }

    /// A conversation turn's body: its texts alternate user and assistant,
    /// the breakpoint on the last one.
    fn turn(texts: &[&str]) -> Vec<u8> {
        let n = texts.len();
        let messages: Vec<serde_json::Value> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut block = serde_json::json!({"type": "text", "text": t});
                if i + 1 == n {
                    block["cache_control"] = serde_json::json!({"type": "ephemeral"});
                }
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                serde_json::json!({"role": role, "content": [block]})
            })
            .collect();
        let body = serde_json::json!({"model": "m", "max_tokens": 1, "messages": messages});
        serde_json::to_vec(&body).unwrap()
    }

    fn units_of(body: &[u8]) -> Vec<Unit> {
        parse_request(body, Endpoint::Messages, &TokenCounter::words())
            .unwrap()
            .units
    }

    /// A breakpoint moved to the newest turn reads the prefix written at the
    /// previous one (the look-back), and writes only what follows it; the
    /// bound reads the same.
    #[tokio::test(start_paused = true)]
    async fn a_moved_breakpoint_reads_the_previous_one() {
        let first = turn(&["abcd abcd"]);
        let second = turn(&["abcd abcd", "efgh", "ijkl ijkl ijkl"]);
        let mut cache = PromptCache::new(0);
        let now = Instant::now();
        cache.commit(&units_of(&first), now, now);
        let o = cache.lookup(&units_of(&second), now);
        // 2 + 3 framing read; the answer (1 + 3) and the new turn (3 + 3) written.
        assert_eq!((o.read, o.write_5m, o.uncached), (5, 10, 0));

        let mut bound = CacheBound::new(TokenCounter::words(), 0);
        let b1 = bound.charge(&first).unwrap();
        assert_eq!((b1.total, b1.read), (5, 0));
        let b2 = bound.charge(&second).unwrap();
        assert_eq!((b2.total, b2.read, b2.charged()), (15, 5, 10));
        // Past the minimum cacheable prefix, nothing is read.
        let mut strict = CacheBound::new(TokenCounter::words(), 6);
        strict.charge(&first).unwrap();
        assert_eq!(strict.charge(&second).unwrap().read, 0);
    }

    #[test]
    fn below_minimum_is_not_cached() {
        let cache = PromptCache::new(1024);
        let o = cache.lookup(&units("abcd", "hi"), Instant::now());
        assert_eq!(o.written(), 0);
        assert_eq!(o.uncached, 1 + 1 + 3);
    }
}
