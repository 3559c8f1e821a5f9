//! What the estimator believes is in the server's prompt cache.
//!
//! Keys are hashes of request prefixes that end at a `cache_control`
//! breakpoint (tools, then system, then messages, as the API orders them),
//! values are when the prefix was last sent and for how long the server keeps
//! it (5 minutes, or 1 hour for `"ttl": "1h"`). An entry becomes *warm* only
//! once a response confirmed the cache took it (`cache_creation_input_tokens`
//! or `cache_read_input_tokens` above zero): the server writes a prefix when
//! the first response that carries it starts, so requests sent together
//! before that all pay full price, and the estimator must charge them so.
//!
//! Memory is bounded: at most `max_entries` prefixes; past that, expired
//! entries go first, then the least recently seen.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// The server's default cache lifetime.
pub(crate) const TTL_5M: Duration = Duration::from_secs(5 * 60);
/// The lifetime asked for with `"ttl": "1h"`.
pub(crate) const TTL_1H: Duration = Duration::from_secs(60 * 60);

/// Estimates with cache activity kept for matching with their usage.
const MAX_PENDING: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Entry {
    last_seen: Instant,
    ttl: Duration,
    confirmed: bool,
    /// The prefix's size as the server counted it, when a response said (0:
    /// not known).
    served: u64,
}

impl Entry {
    fn alive(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_seen) < self.ttl
    }
}

/// A request's cache activity, remembered until its usage comes back.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// The keyed hash of the request's model name (`None` hashed too): the
    /// name is not copied, so a record stays small whatever the name.
    pub(crate) model: u64,
    pub(crate) raw_input_tokens: u64,
    pub(crate) cache_read_tokens: u64,
    /// The prefix charged as a cache read, if any.
    pub(crate) read: Option<u64>,
    /// Prefixes this request writes (its breakpoints), with their lifetimes
    /// and their tokens as estimated.
    pub(crate) written: Vec<(u64, Duration, u64)>,
    pub(crate) at: Instant,
}

#[derive(Debug)]
pub(crate) struct PromptCache {
    entries: HashMap<u64, Entry>,
    pending: VecDeque<Pending>,
    max_entries: usize,
    /// The fewest of the server's tokens it caches (0: any).
    min_tokens: u64,
}

impl PromptCache {
    pub(crate) fn new(max_entries: usize) -> Self {
        Self {
            entries: HashMap::new(),
            pending: VecDeque::new(),
            max_entries: max_entries.max(1),
            min_tokens: 0,
        }
    }

    /// The fewest of the server's tokens a prefix holds for the server to
    /// cache it: a breakpoint that a response's usage sizes below it was
    /// not written.
    pub(crate) fn min_tokens(mut self, tokens: u64) -> Self {
        self.min_tokens = tokens;
        self
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn warm_len(&self, now: Instant) -> usize {
        self.entries
            .values()
            .filter(|e| e.confirmed && e.alive(now))
            .count()
    }

    /// Whether the server is believed to hold `key` now.
    pub(crate) fn is_warm(&self, key: u64, now: Instant) -> bool {
        self.entries
            .get(&key)
            .is_some_and(|e| e.confirmed && e.alive(now))
    }

    /// Whether `key` was sent with a breakpoint, is within its lifetime, and
    /// no response confirmed it yet: its write may still be in flight.
    pub(crate) fn is_unconfirmed(&self, key: u64, now: Instant) -> bool {
        self.entries
            .get(&key)
            .is_some_and(|e| !e.confirmed && e.alive(now))
    }

    /// The size of a warm prefix as the server counted it, if a response
    /// said.
    pub(crate) fn served(&self, key: u64) -> Option<u64> {
        self.entries.get(&key).map(|e| e.served).filter(|s| *s > 0)
    }

    /// Records that a request carrying this breakpoint was sent now. An entry
    /// still alive keeps its confirmation and its lifetime: only a response
    /// that used the cache refreshes it ([`settle`](Self::settle)), since a
    /// request refused with a 429, or one still waiting in line, did not
    /// reach the server's cache. A new or expired one waits for a
    /// confirmation.
    pub(crate) fn sent(&mut self, key: u64, ttl: Duration, now: Instant) {
        if let Some(e) = self.entries.get_mut(&key) {
            if e.alive(now) {
                e.ttl = e.ttl.max(ttl);
            } else {
                e.confirmed = false;
                e.last_seen = now;
                e.ttl = ttl;
            }
            return;
        }
        self.make_room(now);
        self.entries.insert(
            key,
            Entry {
                last_seen: now,
                ttl,
                confirmed: false,
                served: 0,
            },
        );
    }

    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < self.max_entries {
            return;
        }
        self.entries.retain(|_, e| e.alive(now));
        if self.entries.len() < self.max_entries {
            return;
        }
        // Evict the least recently seen eighth (at least one) in one pass, so
        // a full cache does not pay a scan per insert.
        let mut ages: Vec<(Instant, u64)> = self
            .entries
            .iter()
            .map(|(k, e)| (e.last_seen, *k))
            .collect();
        let n = (self.max_entries / 8).max(1).min(ages.len());
        if n < ages.len() {
            ages.select_nth_unstable(n);
        }
        for (_, k) in ages.iter().take(n) {
            self.entries.remove(k);
        }
    }

    pub(crate) fn push_pending(&mut self, p: Pending) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(p);
    }

    /// Takes the newest pending record that matches an estimate.
    pub(crate) fn take_pending(
        &mut self,
        model: u64,
        raw_input_tokens: u64,
        cache_read_tokens: u64,
    ) -> Option<Pending> {
        let idx = self.pending_index(model, raw_input_tokens, cache_read_tokens)?;
        self.pending.remove(idx)
    }

    /// The newest pending record of an estimate, by its model's key, raw
    /// input and cache read.
    fn pending_index(
        &self,
        model: u64,
        raw_input_tokens: u64,
        cache_read_tokens: u64,
    ) -> Option<usize> {
        self.pending.iter().rposition(|p| {
            p.raw_input_tokens == raw_input_tokens
                && p.cache_read_tokens == cache_read_tokens
                && p.model == model
        })
    }

    /// A pending request's read, checked again at `at`: when the prefix it
    /// is charged as reading is neither warm then nor `cached_elsewhere`,
    /// its record changes to read nothing (the read's tokens counted as
    /// uncached, as its usage will be), and this returns true. False when
    /// the read stands, or no record matches.
    pub(crate) fn drop_cold_read(
        &mut self,
        model: u64,
        raw_input_tokens: u64,
        cache_read_tokens: u64,
        at: Instant,
        cached_elsewhere: impl Fn(u64) -> bool,
    ) -> bool {
        let Some(idx) = self.pending_index(model, raw_input_tokens, cache_read_tokens) else {
            return false;
        };
        let Some(read) = self.pending[idx].read else {
            return false;
        };
        if self.is_warm(read, at) || cached_elsewhere(read) {
            return false;
        }
        let p = &mut self.pending[idx];
        if p.written.is_empty() {
            // Reading nothing and writing nothing, its settlement would
            // change nothing: forgotten now (the estimator settles only the
            // estimates that read or write, see `AnthropicEstimator::observe`).
            self.pending.remove(idx);
            return true;
        }
        p.raw_input_tokens = raw_input_tokens.saturating_add(cache_read_tokens);
        p.cache_read_tokens = 0;
        p.read = None;
        true
    }

    /// Applies what the server said about a request's cache use.
    ///
    /// The server caches a request's prompt up to its last breakpoint and
    /// reads the longest cached prefix of it, so `cache_read +
    /// cache_creation` is the size, in its tokens, of the longest prefix
    /// this request wrote (`written` is in the request's order, the last
    /// the longest); a request that wrote nothing read exactly the prefix
    /// it was charged as reading.
    pub(crate) fn settle(
        &mut self,
        p: &Pending,
        cache_read: u64,
        cache_creation: u64,
        now: Instant,
    ) {
        if cache_read == 0 {
            // The server read nothing: the prefix charged as a read is not there.
            if let Some(k) = p.read {
                self.entries.remove(&k);
            }
        }
        if cache_read == 0 && cache_creation == 0 {
            // Nothing was cached (a prefix under the model's minimum, say):
            // forget the breakpoints this request claimed.
            for (k, _, _) in &p.written {
                if self.entries.get(k).is_some_and(|e| !e.confirmed) {
                    self.entries.remove(k);
                }
            }
            return;
        }
        // A read refreshes the server's lifetime of the entry, from when the
        // request was sent.
        if cache_read > 0 {
            if let Some(e) = p.read.and_then(|k| self.entries.get_mut(&k)) {
                if e.last_seen < p.at {
                    e.last_seen = p.at;
                }
            }
        }
        let longest = p.written.last().map(|&(k, _, _)| k);
        if longest.is_none() && cache_creation == 0 {
            if let Some(e) = p.read.and_then(|k| self.entries.get_mut(&k)) {
                e.served = cache_read;
            }
        }
        let served = cache_read.saturating_add(cache_creation);
        let longest_tokens = p.written.iter().map(|w| w.2).max().unwrap_or(0);
        // The breakpoints of this request are in the cache now, but for one
        // that `served` sizes, in proportion, below what the server caches.
        for &(k, ttl, tokens) in &p.written {
            if share(served, tokens, longest_tokens) < self.min_tokens {
                if self.entries.get(&k).is_some_and(|e| !e.confirmed) {
                    self.entries.remove(&k);
                }
                continue;
            }
            let size = if Some(k) == longest { served } else { 0 };
            match self.entries.get_mut(&k) {
                Some(e) => {
                    e.confirmed = true;
                    if size > 0 {
                        e.served = size;
                    }
                    if e.last_seen < p.at {
                        e.last_seen = p.at;
                    }
                }
                None => {
                    self.make_room(now);
                    self.entries.insert(
                        k,
                        Entry {
                            last_seen: p.at,
                            ttl,
                            confirmed: true,
                            served: size,
                        },
                    );
                }
            }
        }
    }
}

/// The server's size of a prefix of `tokens` (as estimated), from the
/// server's size `served` of the longest prefix of the same request
/// (`longest` as estimated): in proportion, rounded down, at most `served`.
pub(crate) fn share(served: u64, tokens: u64, longest: u64) -> u64 {
    if tokens >= longest || longest == 0 {
        return served;
    }
    let share = u128::from(served) * u128::from(tokens) / u128::from(longest);
    u64::try_from(share).unwrap_or(served).min(served)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request that wrote the breakpoints `keys` (5-minute lifetime).
    fn writer(keys: &[u64], raw_input_tokens: u64, at: Instant) -> Pending {
        Pending {
            model: 0,
            raw_input_tokens,
            cache_read_tokens: 0,
            read: None,
            written: keys
                .iter()
                .map(|&k| (k, TTL_5M, raw_input_tokens))
                .collect(),
            at,
        }
    }

    /// A request that wrote nothing and was charged as reading `key`.
    fn reader(key: u64, raw_input_tokens: u64, cache_read_tokens: u64, at: Instant) -> Pending {
        Pending {
            model: 0,
            raw_input_tokens,
            cache_read_tokens,
            read: Some(key),
            written: Vec::new(),
            at,
        }
    }

    /// A shorter breakpoint that the answer's usage sizes, in proportion,
    /// below what the server caches was not written: it stays cold.
    #[test]
    fn a_breakpoint_sized_below_the_minimum_is_not_confirmed() {
        let now = Instant::now();
        let mut c = PromptCache::new(8).min_tokens(1_024);
        c.sent(1, TTL_5M, now);
        c.sent(2, TTL_5M, now);
        let mut p = writer(&[1, 2], 3_400, now);
        // Estimated 1,100 and 3,400 tokens; the server holds 2,700 of the
        // prompt: the shorter is about 873 of its tokens.
        p.written[0].2 = 1_100;
        c.settle(&p, 2_700, 0, now);
        assert!(!c.is_warm(1, now) && !c.is_unconfirmed(1, now));
        assert!(c.is_warm(2, now));
        assert_eq!(c.served(2), Some(2_700));
        assert_eq!(share(2_700, 1_100, 3_400), 873);
    }

    #[test]
    fn unconfirmed_entries_are_cold() {
        let now = Instant::now();
        let mut c = PromptCache::new(8);
        c.sent(1, TTL_5M, now);
        assert!(!c.is_warm(1, now));
        let p = writer(&[1], 10, now);
        c.settle(&p, 0, 100, now);
        assert!(c.is_warm(1, now));
        assert!(!c.is_warm(1, now + TTL_5M));
    }

    #[test]
    fn only_a_read_the_server_confirmed_extends_an_entrys_life() {
        let t0 = Instant::now();
        let mut c = PromptCache::new(8);
        c.sent(1, TTL_5M, t0);
        let write = writer(&[1], 10, t0);
        c.settle(&write, 0, 100, t0);
        // Four minutes on, a request carrying the breakpoint is sent and
        // refused with a 429: no usage, no settlement. The entry still ends
        // five minutes after the write, as the server's does.
        let t4 = t0 + Duration::from_secs(240);
        c.sent(1, TTL_5M, t4);
        assert!(c.is_warm(1, t4));
        assert!(!c.is_warm(1, t0 + TTL_5M));
        // A read the server answered refreshes it from when it was sent.
        let read = reader(1, 5, 100, t4);
        c.settle(&read, 100, 0, t4 + Duration::from_secs(1));
        assert!(c.is_warm(1, t0 + TTL_5M));
        assert!(!c.is_warm(1, t4 + TTL_5M));
    }

    #[test]
    fn the_longest_write_is_sized_by_the_servers_usage() {
        let now = Instant::now();
        let mut c = PromptCache::new(8);
        c.sent(1, TTL_5M, now);
        c.sent(2, TTL_5M, now);
        let writer = writer(&[1, 2], 9_000, now);
        // It read 2,500 tokens cached earlier and wrote 4,000 more: the
        // prefix up to its last breakpoint is 6,500 tokens; the shorter
        // one's size is not known.
        c.settle(&writer, 2_500, 4_000, now);
        assert_eq!(c.served(2), Some(6_500));
        assert_eq!(c.served(1), None);
        // A request that wrote nothing and read prefix 1 sizes it exactly.
        let reader = reader(1, 300, 2_000, now);
        c.settle(&reader, 2_450, 0, now);
        assert_eq!(c.served(1), Some(2_450));
        assert_eq!(c.served(2), Some(6_500));
    }

    #[test]
    fn eviction_bounds_entries() {
        let now = Instant::now();
        let mut c = PromptCache::new(16);
        for k in 0..100u64 {
            c.sent(k, TTL_5M, now + Duration::from_millis(k));
            assert!(c.len() <= 16);
        }
        // The newest survive.
        assert!(c.entries.contains_key(&99));
        assert!(!c.entries.contains_key(&0));
    }
}
