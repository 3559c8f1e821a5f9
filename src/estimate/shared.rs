//! A prompt-cache view shared by the processes of a fleet.
//!
//! Each [`AnthropicEstimator`](super::AnthropicEstimator) remembers the
//! prefixes its own requests made warm. Processes that share one API key
//! also share the server's prompt cache, so a prefix written by one process
//! is read by the next request of another: charged as a whole prompt, that
//! request reserves input the server will never count. A
//! [`SharedPromptCache`] gives the estimator the fleet's view: the same
//! prefix hashes in every process (a key common to the fleet) and the
//! prefixes another process saw confirmed as cached.

use std::collections::hash_map::{DefaultHasher, RandomState};
use std::fmt;
use std::hash::{BuildHasher, Hasher};

/// What the processes of a fleet know together about the server's prompt
/// cache. The estimator asks it once per candidate prefix of a request
/// that carries `cache_control`, holding its own prompt-cache lock: answer
/// quickly, from memory, never from the network.
///
/// `RedisLedger::prompt_cache` (feature `redis`) is the implementation that
/// ships: its markers ride on the ledger's own script calls.
pub trait SharedPromptCache: Send + Sync + fmt::Debug + 'static {
    /// The secret the estimator keys its prefix hashes with: the same in
    /// every process of the fleet, so that they name a prefix alike, and
    /// unknown to callers, so that they cannot forge a collision. (The
    /// hashes are SipHash-1-3 as the standard library computes them: the
    /// processes must run builds of the same Rust release to agree; if they
    /// do not, they only stop sharing.)
    fn hash_key(&self) -> [u8; 16];

    /// Whether another process saw a response confirm the prefix `hash` as
    /// cached by the server, within the prefix's lifetime. (A prefix this
    /// process's own responses confirmed is for its estimator to know, and
    /// may be answered `false`.)
    fn is_cached(&self, hash: u64) -> bool;

    /// The server read nothing for a request charged as reading `hash`:
    /// forget it here (the default does nothing).
    fn not_cached(&self, hash: u64) {
        let _ = hash;
    }
}

/// How an estimator keys its prefix hashes: a random key of its own, or the
/// fleet's.
#[derive(Clone)]
pub(crate) enum PrefixKey {
    /// Per process (the default).
    Own(RandomState),
    /// Common to the fleet.
    Fleet([u8; 16]),
}

impl PrefixKey {
    /// A hasher that has taken in the key.
    pub(crate) fn hasher(&self) -> DefaultHasher {
        match self {
            PrefixKey::Own(state) => state.build_hasher(),
            PrefixKey::Fleet(key) => {
                let mut h = DefaultHasher::new();
                h.write(key);
                h
            }
        }
    }
}

impl fmt::Debug for PrefixKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key itself is never printed.
        f.write_str(match self {
            PrefixKey::Own(_) => "PrefixKey::Own",
            PrefixKey::Fleet(_) => "PrefixKey::Fleet",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(key: &PrefixKey, bytes: &[u8]) -> u64 {
        let mut h = key.hasher();
        h.write(bytes);
        h.finish()
    }

    #[test]
    fn a_fleet_key_names_a_prefix_alike_and_own_keys_do_not() {
        let a = PrefixKey::Fleet([7; 16]);
        let b = PrefixKey::Fleet([7; 16]);
        assert_eq!(hash(&a, b"system prompt"), hash(&b, b"system prompt"));
        assert_ne!(
            hash(&a, b"system prompt"),
            hash(&PrefixKey::Fleet([8; 16]), b"system prompt")
        );
        let own = PrefixKey::Own(RandomState::new());
        let other = PrefixKey::Own(RandomState::new());
        assert_ne!(hash(&own, b"system prompt"), hash(&other, b"system prompt"));
        assert_eq!(format!("{a:?}"), "PrefixKey::Fleet");
    }
}
