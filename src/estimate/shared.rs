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

    /// The size of the prefix `hash` as the server counted it, in its
    /// tokens, when the response that confirmed it cached said
    /// (`cache_creation_input_tokens + cache_read_input_tokens` of a
    /// request whose longest `cache_control` prefix it is). A request
    /// charged as reading the prefix is then charged its count less this
    /// size, as for a prefix its own process wrote
    /// ([`Estimate::cache_read_served`](super::Estimate::cache_read_served));
    /// without it, the read is charged with a margin: half the prefix is
    /// charged as uncached input (the estimate's `cache_read_tokens` counts
    /// the other half). Answer from memory, as
    /// [`is_cached`](Self::is_cached). The default: `None`.
    fn served(&self, hash: u64) -> Option<u64> {
        let _ = hash;
        None
    }
}

/// The part of a prefix that a request reading it from the fleet's view is
/// charged as reading, when no process told the prefix's size as the server
/// counted it: half its tokens as estimated (rounded down); the other half
/// is charged as uncached input.
///
/// Why a margin, and why this one: a read is subtracted from the request's
/// count (or its estimate) by converting the prefix's estimate at the
/// ratio of the whole prompt's count to its estimate, and a prefix whose
/// content the estimator overrates against the rest of the prompt is then
/// subtracted too large: the server counts the difference as uncached
/// input that was not charged, and the bucket overruns (traced: a prefix
/// estimated at 76 % of its prompt that the server counted as 51 %, 879
/// tokens under-charged, a 429). A process knows the served size of the
/// prefixes its own answers wrote; a fleet shares it
/// ([`SharedPromptCache::served`]), so this applies only where no process
/// told it (a shorter breakpoint of its writer's request, a process of an
/// earlier release). An over-charge costs a wait until the answer's usage
/// refunds it; an under-charge costs a 429. Half covers an estimate of the
/// prefix's share up to twice the server's.
pub(crate) fn unsized_fleet_read(tokens: u64) -> u64 {
    tokens / 2
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
    use crate::estimate::{AnthropicEstimator, TokenEstimator};
    use std::sync::Arc;

    /// A fleet that says every prefix is cached, with `served` as its size
    /// when given.
    #[derive(Debug)]
    struct AllCached {
        served: Option<u64>,
    }

    impl SharedPromptCache for AllCached {
        fn hash_key(&self) -> [u8; 16] {
            [5; 16]
        }

        fn is_cached(&self, _hash: u64) -> bool {
            true
        }

        fn served(&self, _hash: u64) -> Option<u64> {
            self.served
        }
    }

    /// A system prompt of about 3,000 tokens with a breakpoint, and a
    /// short question.
    fn prefixed() -> Vec<u8> {
        let system =
            "Answer as the reference manual of the tower-llm-limits crate would. ".repeat(230);
        serde_json::json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 100,
            "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "What is a ledger?"}],
        })
        .to_string()
        .into_bytes()
    }

    fn estimate(served: Option<u64>) -> crate::estimate::Estimate {
        let estimator = AnthropicEstimator::builder()
            .shared_prompt_cache(Arc::new(AllCached { served }))
            .build();
        let (parts, ()) = http::Request::post("/v1/messages")
            .body(())
            .expect("request")
            .into_parts();
        estimator.estimate(&parts, &prefixed())
    }

    #[test]
    fn a_fleet_read_carries_the_size_the_fleet_told() {
        let sized = estimate(Some(1_800));
        assert!(sized.cache_read_tokens > 2_500, "{sized:?}");
        assert_eq!(sized.cache_read_served, Some(1_800));
    }

    #[test]
    fn an_unsized_fleet_read_counts_half_the_prefix_as_uncached_input() {
        let sized = estimate(Some(1_800));
        let unsized_read = estimate(None);
        assert_eq!(unsized_read.cache_read_served, None);
        assert_eq!(
            unsized_read.cache_read_tokens,
            unsized_fleet_read(sized.cache_read_tokens)
        );
        // The other half is charged as uncached input; the whole prompt
        // is the same.
        assert_eq!(
            unsized_read.raw_input_tokens + unsized_read.cache_read_tokens,
            sized.raw_input_tokens + sized.cache_read_tokens
        );
        assert!(unsized_read.input_tokens > sized.input_tokens + 1_000);
        // The prefixes longer than the one read are pending either way:
        // not the one read itself.
        assert_eq!(unsized_read.cache_pending, sized.cache_pending);
        assert_eq!(unsized_fleet_read(3_001), 1_500);
        assert_eq!(unsized_fleet_read(0), 0);
    }

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
