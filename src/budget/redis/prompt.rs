//! The fleet's prompt-cache view kept by a [`RedisLedger`](super::RedisLedger)
//! ([`RedisLedgerBuilder::share_prompt_cache`](super::RedisLedgerBuilder::share_prompt_cache)).
//!
//! - **One name per prefix**: the estimators of the fleet key their prefix
//!   hashes with one random 128-bit secret, stored once in Redis
//!   (`<prefix>:prompt-key`, set by the first process that connects, read by
//!   the others, never expired).
//! - **Markers**: when a response confirms its `cache_control` prefixes as
//!   cached, its process records them under the budget key's hash tag
//!   (`<prefix>:{key}:pc`, prefix name to the Redis time it stays cached
//!   until, 5 minutes on, and `s<name>` to its size as the server counted
//!   it when the response said; `<prefix>:{key}:pv`, a log of the names
//!   by version, at most 4,096), in the call that carries the response's
//!   settlement.
//! - **The mirror**: every call of the apply script on a key also returns
//!   the markers recorded since the last version this process saw (at most
//!   64 a call), which the process keeps in memory. The estimator asks that
//!   memory: a request finds what the fleet knew at the process's last call,
//!   and no call is added.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::Waker;

use tokio::time::Instant;

use super::lock;
use crate::estimate::SharedPromptCache;

/// Markers kept in memory; past it, the expired go, then the ones that end
/// soonest.
const MAX_MIRRORED: usize = 16_384;

/// How long a confirmed prefix is believed cached: the server's default
/// lifetime, 5 minutes (a prefix asked for an hour is believed for less
/// than it lives: charged in full sooner, never less).
pub(super) const CACHED_FOR_US: u64 = 5 * 60 * 1_000_000;

/// The marker name of a prefix hash: 52 bits, exact in the scripts' numbers.
pub(super) fn name(hash: u64) -> u64 {
    hash >> 12
}

/// How long a prefix is believed being written after its writer's
/// admission, unless its writer says sooner that its answer began or that
/// it ended: longer than a writer waits for a connection and for its
/// answer to begin, so that a marker outlives its write only when its
/// process went away (a request holding for it goes at its own bound, the
/// budget's cache hold).
pub(super) const WRITING_FOR_US: u64 = 60 * 1_000_000;

/// How often a process that holds requests for another process's writer
/// asks Redis for the fleet's markers, while that writer is admitted (its
/// answer begins soon, and the held requests go then).
pub(super) const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The longest a process waits between two such asks while every writer
/// it holds requests for is still queued in its process's line: the wait
/// doubles from [`WATCH_EVERY`] after each ask that finds them all still
/// queued. A held request needs the write to have begun, which comes
/// after the writer's admission and its answer's first byte; learning of
/// the admission later costs it at most this, less that answer's time.
pub(super) const WATCH_QUEUED_EVERY: std::time::Duration = std::time::Duration::from_millis(800);

/// [`WATCH_EVERY`] in microseconds.
const WATCH_US: u64 = 100_000;

/// One prefix's marker, as a script call returned it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Marker {
    pub name: u64,
    /// The Redis time (microseconds since the epoch) it is cached until;
    /// 0: not known cached.
    pub cached_until: u64,
    /// The Redis time its marker of being written by another process
    /// expires; 0: no other process writes it.
    pub writing_until: u64,
    /// That writer is a request still queued in its process's line.
    pub queued: bool,
    /// The prefix's size as the server counted it, in tokens, when the
    /// process that confirmed it said; 0: not known.
    pub served: u64,
}

/// Markers returned by one script call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Markers {
    /// The newest version the reply covers.
    pub version: u64,
    /// The markers changed after the version asked after.
    pub cached: Vec<Marker>,
}

/// Another process's write of a prefix, as this process saw it.
#[derive(Debug)]
struct Writer {
    /// The Redis time its marker expires.
    until: u64,
    /// The budget key it was seen on.
    key: Arc<str>,
    /// Whether a reservation of this process was held for it.
    held: bool,
    /// Whether the writer is a request still queued in its process's
    /// line (its marker lives while it waits there and asks again).
    queued: bool,
}

/// The view the estimators of a process read; see the module docs.
pub(super) struct PromptMirror {
    key: [u8; 16],
    /// Prefixes the fleet confirmed cached: name to the Redis time it is
    /// believed cached until, and its size as the server counted it (0:
    /// not known).
    cached: Mutex<HashMap<u64, (u64, u64)>>,
    /// The last version seen per budget key.
    seen: Mutex<HashMap<Arc<str>, u64>>,
    /// The last Redis time seen, and the local instant it was seen at.
    clock: Mutex<Option<(u64, Instant)>>,
    /// The names this process told the fleet (its own estimator knows
    /// them), newest last, at most [`MAX_MIRRORED`].
    own: Mutex<std::collections::VecDeque<u64>>,
    /// Prefixes other processes write: name to the Redis time the marker
    /// expires, the budget key it was seen on, and whether a reservation
    /// of this process was held for it.
    writing: Mutex<HashMap<u64, Writer>>,
    /// Requests holding for those writers, by name.
    watchers: Mutex<HashMap<u64, Vec<Waker>>>,
    /// Prefixes this process's admitted requests write: name to the
    /// budget key and how many write it.
    mine: Mutex<HashMap<u64, (Arc<str>, u32)>>,
    /// This process's queued requests whose writes are marked as queued.
    queued: Mutex<Queued>,
    /// Per budget key, the Redis time this process's head of the line asks
    /// again (its last refused ask's wait ends): a request that joins the
    /// line behind it is marked as queued at least until then.
    head_asks: Mutex<HashMap<Arc<str>, u64>>,
}

/// This process's queued requests with marked writes: by request, its
/// budget key and names; and how many of them will write each name.
#[derive(Debug, Default)]
struct Queued {
    requests: HashMap<u64, (Arc<str>, Vec<u64>)>,
    names: HashMap<u64, u32>,
}

impl Queued {
    /// Forgets a request; returns its key and the names no other request
    /// of this process will write.
    fn remove(&mut self, request: u64) -> Option<(Arc<str>, Vec<u64>)> {
        let (key, names) = self.requests.remove(&request)?;
        let mut done = Vec::new();
        for name in names {
            if let Some(n) = self.names.get_mut(&name) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.names.remove(&name);
                    done.push(name);
                }
            }
        }
        Some((key, done))
    }
}

impl fmt::Debug for PromptMirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is a secret: never printed.
        f.debug_struct("PromptMirror")
            .field("cached", &lock(&self.cached).len())
            .finish_non_exhaustive()
    }
}

impl PromptMirror {
    pub(super) fn new(key: [u8; 16]) -> Self {
        PromptMirror {
            key,
            cached: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            clock: Mutex::new(None),
            own: Mutex::new(std::collections::VecDeque::new()),
            writing: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            mine: Mutex::new(HashMap::new()),
            queued: Mutex::new(Queued::default()),
            head_asks: Mutex::new(HashMap::new()),
        }
    }

    /// This process's head of the line on `key` was answered a wait that
    /// ends at Redis time `until_us`.
    pub(super) fn head_waits(&self, key: &str, until_us: u64) {
        let mut asks = lock(&self.head_asks);
        if asks.len() >= MAX_MIRRORED {
            asks.clear();
        }
        match asks.get_mut(key) {
            Some(at) => *at = until_us,
            None => {
                asks.insert(Arc::from(key), until_us);
            }
        }
    }

    /// How long from now (Redis time) until this process's head on `key`
    /// asks again, if it waits.
    pub(super) fn head_asks_in(&self, key: &str) -> Option<u64> {
        let now = self.redis_now()?;
        let at = lock(&self.head_asks).get(key).copied()?;
        (at > now).then(|| at - now)
    }

    /// A request of this process on `key` will write `names` from its
    /// queue: remembered until it is admitted or leaves the line. Returns
    /// whether it is new here.
    pub(super) fn queue(&self, key: &str, request: u64, names: &[u64]) -> bool {
        let mut q = lock(&self.queued);
        if q.requests.contains_key(&request) {
            return false;
        }
        if q.requests.len() >= MAX_MIRRORED {
            *q = Queued::default();
        }
        for &name in names {
            *q.names.entry(name).or_insert(0) += 1;
        }
        q.requests.insert(request, (Arc::from(key), names.to_vec()));
        true
    }

    /// The names the queued requests of this process on `key` other than
    /// `request` will write (a few: one process's line).
    pub(super) fn queued_on(&self, key: &str, request: u64) -> Vec<u64> {
        let q = lock(&self.queued);
        let mut names: Vec<u64> = q
            .requests
            .iter()
            .filter(|(r, (k, _))| **r != request && &**k == key)
            .flat_map(|(_, (_, names))| names.iter().copied())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// A queued request was admitted (its reservation cleared its
    /// markers in Redis) or left the line: the key and the names no other
    /// request of this process will write, to clear in Redis.
    pub(super) fn dequeue(&self, request: u64) -> Option<(Arc<str>, Vec<u64>)> {
        lock(&self.queued).remove(request)
    }

    /// Requests of this process on `key` were admitted writing `names`.
    pub(super) fn writes_admitted(&self, key: &str, names: &[u64]) {
        let mut mine = lock(&self.mine);
        if mine.len() >= MAX_MIRRORED {
            mine.clear();
        }
        for &name in names {
            let e = mine.entry(name).or_insert_with(|| (Arc::from(key), 0));
            e.1 = e.1.saturating_add(1);
        }
    }

    /// This process no longer writes `names` (one request each): the
    /// budget key to clear their markers on, and the names that have no
    /// writer left here.
    pub(super) fn writes_ended(&self, names: &[u64]) -> Option<(Arc<str>, Vec<u64>)> {
        let mut mine = lock(&self.mine);
        let mut key = None;
        let mut done = Vec::new();
        for name in names {
            let Some(e) = mine.get_mut(name) else {
                continue;
            };
            e.1 = e.1.saturating_sub(1);
            key.get_or_insert_with(|| Arc::clone(&e.0));
            if e.1 == 0 {
                mine.remove(name);
                done.push(*name);
            }
        }
        Some((key?, done)).filter(|(_, d)| !d.is_empty())
    }

    /// A reservation was held because another process writes `name`,
    /// seen on `key` at Redis time `now_us`; `queued`: that writer is a
    /// request still queued there, whose marker (and its expiry) the same
    /// reply carried (taken in by [`absorb`](Self::absorb) first): it is
    /// believed exactly as long as that marker lives.
    pub(super) fn writing_seen(&self, key: &str, name: u64, now_us: u64, queued: bool) {
        *lock(&self.clock) = Some((now_us, Instant::now()));
        let mut writing = lock(&self.writing);
        if queued {
            // Without its marker in the reply (more than a reply's markers
            // changed at once), believed for the watch's next look only.
            let e = writing.entry(name).or_insert_with(|| Writer {
                until: now_us.saturating_add(WATCH_US),
                key: Arc::from(key),
                held: true,
                queued: true,
            });
            e.held = true;
            return;
        }
        let until = now_us.saturating_add(WRITING_FOR_US);
        let e = writing.entry(name).or_insert_with(|| Writer {
            until,
            key: Arc::from(key),
            held: true,
            queued: false,
        });
        e.until = e.until.max(until);
        e.held = true;
        e.queued = false;
    }

    /// Whether the writer of the prefix `hash` that this process holds
    /// requests for is a request still queued in another process (its
    /// marker alive), not yet admitted.
    pub(super) fn is_queued(&self, hash: u64) -> bool {
        let Some(now) = self.redis_now() else {
            return false;
        };
        lock(&self.writing)
            .get(&name(hash))
            .is_some_and(|w| w.queued && w.until > now)
    }

    /// Whether another process writes the prefix `hash` and a reservation
    /// of this process was held for it (a request that would wait for
    /// capacity anyway does not hold: it asks again after its wait); if
    /// so, `waker` is woken when that changes, and the budget key to watch
    /// it on is returned.
    pub(super) fn watch(&self, hash: u64, waker: &Waker) -> Option<Arc<str>> {
        let name = name(hash);
        let now = self.redis_now()?;
        let key = {
            let writing = lock(&self.writing);
            let w = writing.get(&name)?;
            if w.until <= now || !w.held {
                return None;
            }
            Arc::clone(&w.key)
        };
        let mut watchers = lock(&self.watchers);
        let list = watchers.entry(name).or_default();
        if !list.iter().any(|w| w.will_wake(waker)) {
            list.push(waker.clone());
        }
        Some(key)
    }

    /// Whether requests hold for a writer seen on `key`.
    pub(super) fn watched_on(&self, key: &str) -> bool {
        let watchers = lock(&self.watchers);
        let writing = lock(&self.writing);
        watchers
            .keys()
            .any(|name| writing.get(name).is_some_and(|w| &*w.key == key))
    }

    /// How long the watch of `key` waits before its next ask, after a
    /// wait of `last`: [`WATCH_EVERY`] while a writer requests hold for
    /// there has been admitted (or none is known queued), else twice
    /// `last`, at most [`WATCH_QUEUED_EVERY`].
    pub(super) fn next_watch(&self, key: &str, last: std::time::Duration) -> std::time::Duration {
        let watchers = lock(&self.watchers);
        let writing = lock(&self.writing);
        let mut held = watchers
            .keys()
            .filter_map(|name| writing.get(name))
            .filter(|w| &*w.key == key)
            .peekable();
        if held.peek().is_none() || held.any(|w| !w.queued) {
            return WATCH_EVERY;
        }
        last.saturating_mul(2)
            .clamp(WATCH_EVERY, WATCH_QUEUED_EVERY)
    }

    /// Wakes the requests holding for writers that are over (their marker
    /// cleared or expired), or all of them (`all`: Redis cannot tell).
    pub(super) fn wake_ended(&self, all: bool) {
        let now = self.redis_now();
        let mut wake = Vec::new();
        {
            let mut watchers = lock(&self.watchers);
            let mut writing = lock(&self.writing);
            writing.retain(|_, w| now.is_some_and(|n| n < w.until));
            watchers.retain(|name, list| {
                let over = all || !writing.contains_key(name);
                if over {
                    wake.append(list);
                }
                !over
            });
            if all {
                writing.clear();
            }
        }
        wake.into_iter().for_each(Waker::wake);
    }

    /// Remembers names this process tells the fleet: they are its own
    /// requests' prefixes, which its estimator and cache-aware admission
    /// already know.
    pub(super) fn told(&self, names: &[u64]) {
        let mut own = lock(&self.own);
        for &name in names {
            if !own.contains(&name) {
                if own.len() >= MAX_MIRRORED {
                    own.pop_front();
                }
                own.push_back(name);
            }
        }
    }

    /// The version to ask markers after, for a budget key.
    pub(super) fn since(&self, key: &str) -> u64 {
        lock(&self.seen).get(key).copied().unwrap_or(0)
    }

    /// Takes in what a call on `key` returned at Redis time `now_us`.
    pub(super) fn absorb(&self, key: &str, now_us: u64, markers: &Markers) {
        *lock(&self.clock) = Some((now_us, Instant::now()));
        {
            let mut seen = lock(&self.seen);
            match seen.get_mut(key) {
                Some(v) => *v = markers.version,
                None => {
                    seen.insert(Arc::from(key), markers.version);
                }
            }
        }
        if markers.cached.is_empty() {
            return;
        }
        {
            let mut writing = lock(&self.writing);
            let mut changed = false;
            for m in &markers.cached {
                if m.writing_until > now_us {
                    let e = writing.entry(m.name).or_insert_with(|| Writer {
                        until: m.writing_until,
                        key: Arc::from(key),
                        held: false,
                        queued: m.queued,
                    });
                    e.until = m.writing_until;
                    e.queued = m.queued;
                } else {
                    changed |= writing.remove(&m.name).is_some();
                }
            }
            if writing.len() > MAX_MIRRORED {
                writing.retain(|_, w| w.until > now_us);
            }
            drop(writing);
            if changed {
                self.wake_ended(false);
            }
        }
        let mut cached = lock(&self.cached);
        for m in markers.cached.iter().filter(|m| m.cached_until > 0) {
            let e = cached.entry(m.name).or_insert((m.cached_until, m.served));
            e.0 = e.0.max(m.cached_until);
            // A prefix's size is the same whoever wrote it.
            if m.served > 0 {
                e.1 = m.served;
            }
        }
        if cached.len() > MAX_MIRRORED {
            cached.retain(|_, (until, _)| *until > now_us);
            if cached.len() > MAX_MIRRORED {
                let mut ends: Vec<u64> = cached.values().map(|(until, _)| *until).collect();
                let cut = cached.len() - MAX_MIRRORED;
                ends.select_nth_unstable(cut);
                let limit = ends[cut];
                cached.retain(|_, (until, _)| *until > limit);
            }
        }
    }

    /// Redis's time now, as last seen plus the time elapsed here since.
    fn redis_now(&self) -> Option<u64> {
        let (at_us, at) = (*lock(&self.clock))?;
        let elapsed = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
        Some(at_us.saturating_add(elapsed))
    }
}

impl SharedPromptCache for PromptMirror {
    fn hash_key(&self) -> [u8; 16] {
        self.key
    }

    fn is_cached(&self, hash: u64) -> bool {
        let name = name(hash);
        let Some((until, _)) = lock(&self.cached).get(&name).copied() else {
            return false;
        };
        if lock(&self.own).contains(&name) {
            return false;
        }
        self.redis_now().is_some_and(|now| now < until)
    }

    fn not_cached(&self, hash: u64) {
        lock(&self.cached).remove(&name(hash));
    }

    /// The size the marker of `hash` carried, while the mirror keeps it.
    fn served(&self, hash: u64) -> Option<u64> {
        let (_, served) = lock(&self.cached).get(&name(hash)).copied()?;
        (served > 0).then_some(served)
    }
}

/// A random 128-bit secret (from the standard library's per-process random
/// hash keys).
pub(super) fn random_key() -> [u8; 16] {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let a = std::collections::hash_map::RandomState::new().hash_one(nanos);
    let b = std::collections::hash_map::RandomState::new().hash_one(!nanos);
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&a.to_le_bytes());
    key[8..].copy_from_slice(&b.to_le_bytes());
    key
}

/// The hex form the key is stored in, and back.
pub(super) fn key_to_hex(key: &[u8; 16]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn key_from_hex(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
fn cached_marker(name: u64, until: u64) -> Marker {
    Marker {
        name,
        cached_until: until,
        writing_until: 0,
        queued: false,
        served: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::cached_marker as cached;
    use super::*;

    #[test]
    fn the_key_round_trips_and_bad_text_is_refused() {
        let key = random_key();
        assert_eq!(key_from_hex(&key_to_hex(&key)), Some(key));
        assert_ne!(random_key(), random_key());
        assert_eq!(key_from_hex("abc"), None);
        assert_eq!(key_from_hex(&"zz".repeat(16)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn markers_count_until_they_end_and_a_miss_forgets() {
        let mirror = PromptMirror::new([1; 16]);
        let hash = 0xdead_beef_0000_1234_u64;
        assert!(!mirror.is_cached(hash), "nothing seen yet");
        let markers = Markers {
            version: 3,
            cached: vec![cached(name(hash), 1_000_000 + CACHED_FOR_US)],
        };
        mirror.absorb("sonnet", 1_000_000, &markers);
        assert_eq!(mirror.since("sonnet"), 3);
        assert_eq!(mirror.since("opus"), 0);
        assert!(mirror.is_cached(hash));
        assert!(!mirror.is_cached(hash ^ (1 << 20)));
        tokio::time::advance(std::time::Duration::from_micros(CACHED_FOR_US)).await;
        assert!(!mirror.is_cached(hash), "past its lifetime");
        mirror.absorb("sonnet", 2_000_000, &markers);
        assert!(mirror.is_cached(hash));
        mirror.not_cached(hash);
        assert!(!mirror.is_cached(hash));
        // A prefix this process told the fleet is its own estimator's.
        let own = hash ^ (1 << 40);
        mirror.absorb(
            "sonnet",
            2_000_000,
            &Markers {
                version: 4,
                cached: vec![cached(name(own), 3_000_000 + CACHED_FOR_US)],
            },
        );
        assert!(mirror.is_cached(own));
        mirror.told(&[name(own)]);
        assert!(!mirror.is_cached(own));
    }

    #[tokio::test(start_paused = true)]
    async fn a_markers_size_is_kept_until_the_marker_goes() {
        let mirror = PromptMirror::new([1; 16]);
        let hash = 0x0bad_cafe_0000_5678_u64;
        let until = 1_000_000 + CACHED_FOR_US;
        let sized = Marker {
            served: 1_816,
            ..cached(name(hash), until)
        };
        mirror.absorb(
            "sonnet",
            1_000_000,
            &Markers {
                version: 1,
                cached: vec![sized],
            },
        );
        assert!(mirror.is_cached(hash));
        assert_eq!(mirror.served(hash), Some(1_816));
        // Marked again without a size (a process of an earlier release):
        // the size told stands.
        let unsized_marker = cached(name(hash), until + 1);
        let markers = Markers {
            version: 2,
            cached: vec![unsized_marker],
        };
        mirror.absorb("sonnet", 1_000_001, &markers);
        assert_eq!(mirror.served(hash), Some(1_816));
        assert_eq!(mirror.served(hash ^ (1 << 30)), None);
        mirror.not_cached(hash);
        assert_eq!(mirror.served(hash), None);
    }

    /// While the writer its requests hold for stays queued, a process asks
    /// Redis less and less often (100, 200, 400, then every 800 ms); once
    /// that writer is admitted, every 100 ms again, its answer near.
    #[tokio::test(start_paused = true)]
    async fn the_watch_backs_off_while_the_writer_held_for_stays_queued() {
        let mirror = PromptMirror::new([1; 16]);
        let hash = 0x1234_5678_9abc_def0_u64;
        let queued = Marker {
            name: name(hash),
            cached_until: 0,
            writing_until: 7_000_000,
            queued: true,
            served: 0,
        };
        let markers = |version, marker| Markers {
            version,
            cached: vec![marker],
        };
        mirror.absorb("k", 1_000_000, &markers(1, queued));
        let ms = std::time::Duration::from_millis;
        assert_eq!(
            mirror.next_watch("k", WATCH_EVERY),
            WATCH_EVERY,
            "nothing held for yet"
        );
        mirror.writing_seen("k", name(hash), 1_000_000, true);
        assert_eq!(mirror.watch(hash, Waker::noop()).as_deref(), Some("k"));
        let mut every = WATCH_EVERY;
        let waits: Vec<_> = (0..5)
            .map(|_| {
                every = mirror.next_watch("k", every);
                every
            })
            .collect();
        assert_eq!(waits, [200, 400, 800, 800, 800].map(ms));
        assert_eq!(mirror.next_watch("other", ms(800)), WATCH_EVERY);
        let admitted = Marker {
            queued: false,
            writing_until: 1_100_000 + WRITING_FOR_US,
            ..queued
        };
        mirror.absorb("k", 1_100_000, &markers(2, admitted));
        assert_eq!(mirror.next_watch("k", ms(800)), WATCH_EVERY, "admitted");
    }

    #[test]
    fn the_mirror_stays_bounded() {
        let mirror = PromptMirror::new([1; 16]);
        let cached = (0..MAX_MIRRORED as u64 + 100)
            .map(|n| super::cached_marker(n, 10 + n))
            .collect();
        mirror.absorb("k", 0, &Markers { version: 1, cached });
        let n = lock(&mirror.cached).len();
        assert!(n <= MAX_MIRRORED, "{n}");
        assert!(lock(&mirror.cached).contains_key(&(MAX_MIRRORED as u64 + 99)));
    }
}
