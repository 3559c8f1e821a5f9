//! The budget's map of keys, split into shards that each have their own
//! lock, so that no admission waits for work over all keys: a request locks
//! one shard for a lookup; a sweep of idle keys, [`KeyMap::retain`] and
//! [`KeyMap::entries`] (snapshots) lock one shard at a time, each for a
//! sixteenth of the keys.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How many shards the map has.
const SHARDS: usize = 16;

/// The number of keys in one shard at which it is first swept for idle keys
/// (then twice its size after each sweep).
const FIRST_SWEEP_LEN: usize = 64;

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
    map: HashMap<Arc<str>, Arc<T>>,
    /// The size of this shard that calls for its next sweep.
    next_len: usize,
}

impl<T> std::fmt::Debug for KeyMap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMap")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl<T> KeyMap<T> {
    /// An empty map.
    pub(super) fn new() -> Self {
        KeyMap {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
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
        self.shard(key).map.get(key).cloned()
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard<T>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        lock(&self.shards[i])
    }

    /// The key's name and state, created with `make` if new (its shard is
    /// then swept of the entries `keep` refuses when it doubled since its
    /// last sweep, and every shard, one at a time, once per
    /// `sweep_period`). `None` if the key is new and the map holds
    /// `max_keys` keys even after a sweep.
    pub(super) fn get_or_insert(
        &self,
        key: &str,
        max_keys: usize,
        sweep_period: Duration,
        make: impl FnOnce() -> T,
        keep: impl Fn(&T) -> bool,
    ) -> Option<(Arc<str>, Arc<T>)> {
        {
            let shard = self.shard(key);
            if let Some((k, v)) = shard.map.get_key_value(key) {
                return Some((Arc::clone(k), Arc::clone(v)));
            }
        }
        if !self.take_slot(max_keys) {
            self.retain(&keep);
            if !self.take_slot(max_keys) {
                // Another request may have created it meanwhile.
                let shard = self.shard(key);
                return shard
                    .map
                    .get_key_value(key)
                    .map(|(k, v)| (Arc::clone(k), Arc::clone(v)));
            }
        }
        let entry = {
            let mut shard = self.shard(key);
            if let Some((k, v)) = shard.map.get_key_value(key) {
                // Created meanwhile: give the slot back.
                self.len.fetch_sub(1, Ordering::Relaxed);
                return Some((Arc::clone(k), Arc::clone(v)));
            }
            let (k, v): (Arc<str>, Arc<T>) = (Arc::from(key), Arc::new(make()));
            shard.map.insert(Arc::clone(&k), Arc::clone(&v));
            if shard.map.len() >= shard.next_len {
                self.sweep_shard(&mut shard, &keep);
            }
            (k, v)
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
        shard.map.retain(|_, v| Arc::strong_count(v) > 1 || keep(v));
        let dropped = before - shard.map.len();
        self.len.fetch_sub(dropped, Ordering::Relaxed);
        // A shard that shrank to a quarter gives its memory back.
        if shard.map.capacity() > 4 * shard.map.len().max(16) {
            shard.map.shrink_to_fit();
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
    pub(super) fn entries(&self) -> Vec<(Arc<str>, Arc<T>)> {
        let mut out = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            let shard = lock(shard);
            out.extend(
                shard
                    .map
                    .iter()
                    .map(|(k, v)| (Arc::clone(k), Arc::clone(v))),
            );
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

    #[tokio::test(start_paused = true)]
    async fn finds_creates_and_caps_keys() {
        let map = KeyMap::<u32>::new();
        let (k, v) = map.get_or_insert("a", 2, LONG, || 1, |_| true).unwrap();
        assert_eq!((&*k, *v), ("a", 1));
        // Found again, not made again.
        let (_, v) = map.get_or_insert("a", 2, LONG, || 9, |_| true).unwrap();
        assert_eq!(*v, 1);
        drop(v);
        assert!(map.get_or_insert("b", 2, LONG, || 2, |_| true).is_some());
        // Full, nothing idle: refused, an existing key still found.
        assert!(map.get_or_insert("c", 2, LONG, || 3, |_| true).is_none());
        assert!(map.get_or_insert("a", 2, LONG, || 9, |_| true).is_some());
        assert_eq!(map.len(), 2);
        // Full, "b" idle (the map's own reference only): swept, "c" fits.
        let (_, c) = map.get_or_insert("c", 2, LONG, || 3, |v| *v != 2).unwrap();
        assert_eq!(*c, 3);
        assert_eq!(map.len(), 2);
        let mut names: Vec<String> = map.entries().iter().map(|(k, _)| k.to_string()).collect();
        names.sort();
        assert_eq!(names, ["a", "c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_held_elsewhere_is_never_dropped() {
        let map = KeyMap::<u32>::new();
        let held = map.get_or_insert("a", 10, LONG, || 1, |_| true).unwrap();
        map.get_or_insert("b", 10, LONG, || 2, |_| true).unwrap();
        assert_eq!(map.retain(|_| false), 1);
        assert_eq!(map.len(), 1);
        assert_eq!(map.entries()[0].0, held.0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_are_swept_by_size_and_by_time() {
        let map = KeyMap::<u32>::new();
        // 0 marks an idle entry.
        for i in 0..2_000 {
            map.get_or_insert(&format!("idle-{i}"), usize::MAX, LONG, || 0, |v| *v != 0);
        }
        // Each shard swept when it doubled: far fewer than 2,000 are left.
        assert!(map.len() <= SHARDS * FIRST_SWEEP_LEN, "{}", map.len());
        tokio::time::advance(LONG).await;
        map.get_or_insert("live", usize::MAX, LONG, || 1, |v| *v != 0);
        assert_eq!(map.len(), 1, "the sweep by time went over every shard");
    }
}
