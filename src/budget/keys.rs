//! The budget's map of keys, split into shards that each have their own
//! lock, so that no admission waits for work over all keys: a request locks
//! one shard for a lookup; a sweep of idle keys, [`KeyMap::retain`] and
//! [`KeyMap::entries`] (snapshots) lock one shard at a time, each for a
//! sixteenth of the keys.
//!
//! Each entry holds its own key name ([`Keyed`]), so a shard is a table of
//! pointers (8 bytes a slot) and the name is stored once. A key is hashed
//! once per lookup (keyed SipHash): the hash picks the shard and finds the
//! entry in it.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hashbrown::HashTable;
use tokio::time::Instant;

/// How many shards the map has.
const SHARDS: usize = 16;

/// The number of keys in one shard at which it is first swept for idle keys
/// (then twice its size after each sweep).
const FIRST_SWEEP_LEN: usize = 64;

/// An entry of a [`KeyMap`]: state that knows its key's name.
pub(super) trait Keyed {
    /// The key's name.
    fn key(&self) -> &str;
}

/// A map from key names to shared state, sharded. See the module docs.
pub(super) struct KeyMap<T> {
    shards: Box<[Mutex<Shard<T>>]>,
    hasher: RandomState,
    /// Keys held in all shards (a slot is taken before a key is inserted, so
    /// the map never holds more than its most keys).
    len: AtomicUsize,
    /// When every shard was last swept.
    swept_at: Mutex<Instant>,
}

struct Shard<T> {
    map: HashTable<Arc<T>>,
    /// The size of this shard that calls for its next sweep.
    next_len: usize,
}

impl<T> std::fmt::Debug for KeyMap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMap")
            .field("len", &self.len.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<T: Keyed> KeyMap<T> {
    /// An empty map.
    pub(super) fn new() -> Self {
        KeyMap {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashTable::new(),
                        next_len: FIRST_SWEEP_LEN,
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            len: AtomicUsize::new(0),
            swept_at: Mutex::new(Instant::now()),
        }
    }

    /// Keys held.
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The key's state, if the map holds it (never creates it).
    #[cfg_attr(not(feature = "pool"), allow(dead_code))]
    pub(super) fn get(&self, key: &str) -> Option<Arc<T>> {
        self.get_hashed(key, self.hasher.hash_one(key))
    }

    /// [`get`](Self::get) with the key's hash already computed.
    fn get_hashed(&self, key: &str, hash: u64) -> Option<Arc<T>> {
        let shard = self.shard(hash);
        shard.map.find(hash, |e| e.key() == key).map(Arc::clone)
    }

    /// The shard of a key's hash: bits that a shard's table uses neither
    /// for the slot (low bits) nor for the tag (the top seven).
    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard<T>> {
        let i = ((hash >> 32) as usize) % SHARDS;
        lock(&self.shards[i])
    }

    /// The hash a key is found by (keyed SipHash, its keys drawn at random
    /// when the map is made): a caller that looks up one of a few fixed
    /// keys again and again computes it once and passes it to
    /// [`get_or_insert_hashed`](Self::get_or_insert_hashed).
    pub(super) fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The key's state, created with `make` (given the key) if new (its
    /// shard is then swept of the entries `keep` refuses when it doubled
    /// since its last sweep, and every shard, one at a time, once per
    /// `sweep_period`). `None` if the key is new and the map holds
    /// `max_keys` keys even after a sweep.
    pub(super) fn get_or_insert(
        &self,
        key: &str,
        max_keys: usize,
        sweep_period: Duration,
        make: impl FnOnce(&str) -> T,
        keep: impl Fn(&T) -> bool,
    ) -> Option<Arc<T>> {
        let hash = self.hasher.hash_one(key);
        self.get_or_insert_hashed(key, hash, max_keys, sweep_period, make, keep)
    }

    /// [`get_or_insert`](Self::get_or_insert) with the key's hash already
    /// computed ([`hash`](Self::hash) of `key`).
    pub(super) fn get_or_insert_hashed(
        &self,
        key: &str,
        hash: u64,
        max_keys: usize,
        sweep_period: Duration,
        make: impl FnOnce(&str) -> T,
        keep: impl Fn(&T) -> bool,
    ) -> Option<Arc<T>> {
        debug_assert_eq!(hash, self.hasher.hash_one(key));
        if let Some(found) = self.get_hashed(key, hash) {
            return Some(found);
        }
        if !self.take_slot(max_keys) {
            self.retain(&keep);
            if !self.take_slot(max_keys) {
                // Another request may have created it meanwhile.
                return self.get_hashed(key, hash);
            }
        }
        let entry = {
            let mut shard = self.shard(hash);
            if let Some(found) = shard.map.find(hash, |e| e.key() == key) {
                // Created meanwhile: give the slot back.
                self.len.fetch_sub(1, Ordering::Relaxed);
                return Some(Arc::clone(found));
            }
            let entry = Arc::new(make(key));
            shard
                .map
                .insert_unique(hash, Arc::clone(&entry), |e| self.hasher.hash_one(e.key()));
            if shard.map.len() >= shard.next_len {
                self.sweep_shard(&mut shard, &keep);
            }
            entry
        };
        let due = {
            let now = Instant::now();
            let mut at = lock(&self.swept_at);
            let due = now.saturating_duration_since(*at) >= sweep_period;
            if due {
                *at = now;
            }
            due
        };
        if due {
            self.retain(&keep);
        }
        Some(entry)
    }

    /// Takes a slot for a new key if fewer than `max_keys` are held.
    fn take_slot(&self, max_keys: usize) -> bool {
        self.len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max_keys).then_some(n + 1)
            })
            .is_ok()
    }

    /// Drops the entries of one shard that nothing else holds and `keep`
    /// refuses; returns how many.
    fn sweep_shard(&self, shard: &mut Shard<T>, keep: &impl Fn(&T) -> bool) -> usize {
        let before = shard.map.len();
        // An entry held elsewhere (a request in flight) stays, or a second
        // state could start for its key.
        shard.map.retain(|e| Arc::strong_count(e) > 1 || keep(e));
        let dropped = before - shard.map.len();
        self.len.fetch_sub(dropped, Ordering::Relaxed);
        // A shard that shrank to a quarter gives its memory back.
        if shard.map.capacity() > 4 * shard.map.len().max(16) {
            shard.map.shrink_to_fit(|e| self.hasher.hash_one(e.key()));
        }
        shard.next_len = shard.map.len().saturating_mul(2).max(FIRST_SWEEP_LEN);
        dropped
    }

    /// Drops, one shard at a time, the entries nothing else holds and `keep`
    /// refuses; returns how many.
    pub(super) fn retain(&self, keep: impl Fn(&T) -> bool) -> usize {
        self.shards
            .iter()
            .map(|s| self.sweep_shard(&mut lock(s), &keep))
            .sum()
    }

    /// Every entry, copied one shard at a time (the state itself is shared,
    /// not copied).
    pub(super) fn entries(&self) -> Vec<Arc<T>> {
        let mut out = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            let shard = lock(shard);
            out.extend(shard.map.iter().map(Arc::clone));
        }
        out
    }
}

fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    // Every critical section leaves the map consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3_600);

    /// A test entry: a key and a number.
    #[derive(Debug)]
    struct E(String, u32);

    impl Keyed for E {
        fn key(&self) -> &str {
            &self.0
        }
    }

    fn e(v: u32) -> impl FnOnce(&str) -> E {
        move |k| E(k.to_string(), v)
    }

    #[tokio::test(start_paused = true)]
    async fn finds_creates_and_caps_keys() {
        let map = KeyMap::<E>::new();
        let a = map.get_or_insert("a", 2, LONG, e(1), |_| true).unwrap();
        assert_eq!((a.key(), a.1), ("a", 1));
        // Found again, not made again.
        let v = map.get_or_insert("a", 2, LONG, e(9), |_| true).unwrap();
        assert_eq!(v.1, 1);
        assert!(Arc::ptr_eq(&a, &v));
        drop((a, v));
        assert!(map.get_or_insert("b", 2, LONG, e(2), |_| true).is_some());
        // Full, nothing idle: refused, an existing key still found.
        assert!(map.get_or_insert("c", 2, LONG, e(3), |_| true).is_none());
        assert!(map.get_or_insert("a", 2, LONG, e(9), |_| true).is_some());
        assert_eq!(map.len(), 2);
        assert_eq!(map.get("b").map(|v| v.1), Some(2));
        assert!(map.get("c").is_none());
        // Full, "b" idle (the map's own reference only): swept, "c" fits.
        let c = map.get_or_insert("c", 2, LONG, e(3), |v| v.1 != 2).unwrap();
        assert_eq!(c.1, 3);
        assert_eq!(map.len(), 2);
        let mut names: Vec<String> = map.entries().iter().map(|v| v.0.clone()).collect();
        names.sort();
        assert_eq!(names, ["a", "c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_held_elsewhere_is_never_dropped() {
        let map = KeyMap::<E>::new();
        let held = map.get_or_insert("a", 10, LONG, e(1), |_| true).unwrap();
        map.get_or_insert("b", 10, LONG, e(2), |_| true).unwrap();
        assert_eq!(map.retain(|_| false), 1);
        assert_eq!(map.len(), 1);
        assert!(Arc::ptr_eq(&map.entries()[0], &held));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_are_swept_by_size_and_by_time() {
        let map = KeyMap::<E>::new();
        // 0 marks an idle entry.
        for i in 0..2_000 {
            map.get_or_insert(&format!("idle-{i}"), usize::MAX, LONG, e(0), |v| v.1 != 0);
        }
        // Each shard swept when it doubled: far fewer than 2,000 are left.
        assert!(map.len() <= SHARDS * FIRST_SWEEP_LEN, "{}", map.len());
        tokio::time::advance(LONG).await;
        map.get_or_insert("live", usize::MAX, LONG, e(1), |v| v.1 != 0);
        assert_eq!(map.len(), 1, "the sweep by time went over every shard");
    }
}
