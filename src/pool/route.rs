//! Routing: what a request needs, when each upstream could admit it, and
//! cache affinity.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::upstream::UpstreamState;
use crate::budget::ledger::{BucketState, Costs};
use crate::budget::Limits;
use crate::estimate::Estimate;
use crate::retry::RetrySnapshot;
use crate::wire::json::{Malformed, Scanner};
use crate::Dimension;

/// Where the top-level `model` string sits in a body, and the request's
/// cache-affinity key.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scan {
    /// The byte range of the `model` value, quotes included.
    pub(crate) model: Option<(usize, usize)>,
    /// A hash of the prefix a prompt cache would hold (see [`scan`]).
    pub(crate) affinity: Option<u64>,
}

/// Reads the top level of a Messages body once: the span of `model`, and,
/// when the body carries a `cache_control` breakpoint, the affinity key: a
/// hash of `model`, `tools`, `system` and the first message, the part of a
/// prompt that a cached prefix starts with and that stays the same across a
/// conversation's turns.
pub(crate) fn scan(body: &[u8], hasher: &impl BuildHasher) -> Scan {
    scan_inner(body, hasher).unwrap_or_default()
}

fn scan_inner(body: &[u8], hasher: &impl BuildHasher) -> Result<Scan, Malformed> {
    let cached = memchr::memmem::find(body, b"\"cache_control\"").is_some();
    let mut out = Scan::default();
    let mut h = hasher.build_hasher();
    let mut s = Scanner::new(body);
    s.expect(b'{')?;
    if s.empty(b'}')? {
        return Ok(out);
    }
    loop {
        let key = s.key()?;
        s.skip_ws();
        let start = s.position();
        match key {
            b"messages" if cached => {
                s.expect(b'[')?;
                if !s.empty(b']')? {
                    s.skip_ws();
                    let first = s.position();
                    s.skip_value(None)?;
                    h.write(b"messages");
                    h.write(body.get(first..s.position()).ok_or(Malformed)?);
                    while s.next_or_close(b']')? {
                        s.skip_value(None)?;
                    }
                }
            }
            _ => {
                s.skip_value(None)?;
                let value = body.get(start..s.position()).ok_or(Malformed)?;
                if key == b"model" && value.first() == Some(&b'"') {
                    out.model = Some((start, s.position()));
                }
                if cached && matches!(key, b"model" | b"tools" | b"system") {
                    h.write(key);
                    h.write(value);
                }
            }
        }
        if !s.next_or_close(b'}')? {
            break;
        }
    }
    if cached {
        out.affinity = Some(h.finish());
    }
    Ok(out)
}

/// `body` with its `model` value (at `span`) replaced by `model`.
pub(crate) fn with_model(body: &Bytes, span: (usize, usize), model: &str) -> Option<Bytes> {
    let quoted = serde_json::to_string(model).ok()?;
    let (before, after) = (body.get(..span.0)?, body.get(span.1..)?);
    let mut out = Vec::with_capacity(before.len() + quoted.len() + after.len());
    out.extend_from_slice(before);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(after);
    Some(Bytes::from(out))
}

/// The model named by the body's `model` value at `span`, if a plain string.
pub(crate) fn model_at(body: &[u8], span: (usize, usize)) -> Option<String> {
    serde_json::from_slice::<String>(body.get(span.0..span.1)?).ok()
}

/// `estimate` with its expected cache reads charged as uncached input (at
/// the estimate's calibration factor), and no prefix left to read: for an
/// upstream that does not hold the prefix's cache (the estimator's records
/// of warm and pending prefixes are the pool's, not this upstream's).
pub(crate) fn uncached(estimate: &Estimate) -> Estimate {
    let mut e = estimate.clone();
    let read = std::mem::take(&mut e.cache_read_tokens);
    e.cache_read_served = None;
    e.cache_pending.clear();
    let factor = if e.raw_input_tokens > 0 {
        e.input_tokens as f64 / e.raw_input_tokens as f64
    } else {
        1.0
    };
    e.raw_input_tokens = e.raw_input_tokens.saturating_add(read);
    e.input_tokens = e
        .input_tokens
        .saturating_add((read as f64 * factor).ceil() as u64);
    e
}

/// How long until `upstream` could admit `estimate`: the longest of its
/// cooldown and, per dimension, the time its bucket needs to refill what
/// the requests already routed to it and not yet admitted, plus this one,
/// need beyond what it holds now.
pub(crate) fn wait(upstream: &UpstreamState, estimate: &Estimate) -> Duration {
    wait_beyond(upstream, estimate, upstream.pending())
}

/// How long until `upstream` has admitted what is pending there, `own`
/// (a request already routed there) excepted, and then `estimate`: for a
/// request waiting there, about when its turn comes (at most).
pub(crate) fn wait_excluding(
    upstream: &UpstreamState,
    estimate: &Estimate,
    own: Costs,
) -> Duration {
    let pending = upstream.pending();
    let rest = Costs {
        requests: pending.requests.saturating_sub(own.requests),
        input_tokens: pending.input_tokens.saturating_sub(own.input_tokens),
        output_tokens: pending.output_tokens.saturating_sub(own.output_tokens),
    };
    wait_beyond(upstream, estimate, rest)
}

fn wait_beyond(upstream: &UpstreamState, estimate: &Estimate, pending: Costs) -> Duration {
    let preview = upstream.config.budget.preview(estimate);
    let ledger = upstream.config.budget.ledger();
    let state = match ledger.state(&preview.key, &preview.limits).into_ready() {
        Ok(Ok(state)) => state,
        // A ledger behind a round trip (or failing): route on the cooldown
        // and the pending costs alone.
        Ok(Err(_)) | Err(_) => None,
    };
    let budget = budget_wait(&preview.limits, state, preview.costs, pending);
    let cooldown = cooldown(&upstream.config.retry.snapshot());
    budget.max(cooldown)
}

fn cooldown(retry: &RetrySnapshot) -> Duration {
    retry.cooldown_remaining.unwrap_or_default()
}

/// The refill time each dimension needs for `pending + costs` beyond what
/// it holds (a key the ledger does not hold yet is a full bucket).
fn budget_wait(
    limits: &Limits,
    state: Option<[BucketState; 3]>,
    costs: Costs,
    pending: Costs,
) -> Duration {
    let dims = [
        (
            limits.get(Dimension::Requests),
            costs.requests,
            pending.requests,
        ),
        (
            limits.get(Dimension::InputTokens),
            costs.input_tokens,
            pending.input_tokens,
        ),
        (
            limits.get(Dimension::OutputTokens),
            costs.output_tokens,
            pending.output_tokens,
        ),
    ];
    let mut longest = 0.0f64;
    for (i, (configured, cost, pending)) in dims.into_iter().enumerate() {
        let bucket = state.map(|s| s[i]);
        let Some(limit) = bucket.and_then(|b| b.limit).or(configured) else {
            continue;
        };
        if limit == 0 {
            continue;
        }
        let available = bucket.map_or(limit as f64, |b| b.available);
        let need = (pending as f64 + cost as f64) - available;
        if need > 0.0 {
            longest = longest.max(need / (limit as f64 / 60.0));
        }
    }
    Duration::try_from_secs_f64(longest).unwrap_or(Duration::MAX)
}

/// The upstream each cache-affinity key was last sent to, and when.
#[derive(Debug, Default)]
pub(crate) struct Affinity {
    map: HashMap<u64, (usize, Instant)>,
}

/// How long a cached prefix lives without use (the API's default cache
/// lifetime), and so how long affinity is remembered.
pub(crate) const AFFINITY_TTL: Duration = Duration::from_secs(5 * 60);
/// The most affinity keys remembered; past it, expired ones are dropped,
/// then all of them.
const AFFINITY_MAX: usize = 65_536;

impl Affinity {
    pub(crate) fn get(&self, key: u64, now: Instant) -> Option<usize> {
        self.map
            .get(&key)
            .filter(|(_, at)| now.saturating_duration_since(*at) < AFFINITY_TTL)
            .map(|(i, _)| *i)
    }

    pub(crate) fn set(&mut self, key: u64, upstream: usize, now: Instant) {
        if self.map.len() >= AFFINITY_MAX && !self.map.contains_key(&key) {
            self.map
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < AFFINITY_TTL);
            if self.map.len() >= AFFINITY_MAX {
                self.map.clear();
            }
        }
        self.map.insert(key, (upstream, now));
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// The load that breaks ties between upstreams that would admit as soon:
/// requests routed and not yet admitted, per unit of weight.
pub(crate) fn load(upstream: &UpstreamState) -> f64 {
    let waiting = upstream.pending_requests.load(Ordering::Acquire) as f64;
    let routed = upstream.routed.load(Ordering::Relaxed) as f64;
    // Pending first; the share of all routed requests spreads a quiet pool.
    (waiting * 1e6 + routed) / f64::from(upstream.config.weight)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::CachePrefix;
    use std::collections::hash_map::RandomState;

    #[test]
    fn scan_finds_the_model_and_keys_affinity_on_the_stable_prefix() {
        let h = RandomState::new();
        let a = br#"{"model":"claude-sonnet-4-5","max_tokens":10,"system":[{"type":"text","text":"S","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"one"}]}"#;
        let b = br#"{"model":"claude-sonnet-4-5","max_tokens":99,"system":[{"type":"text","text":"S","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"one"},{"role":"assistant","content":"x"}]}"#;
        let c = br#"{"model":"claude-sonnet-4-5","max_tokens":10,"system":[{"type":"text","text":"T","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"one"}]}"#;
        let (sa, sb, sc) = (scan(a, &h), scan(b, &h), scan(c, &h));
        assert_eq!(sa.model, Some((9, 28)));
        assert_eq!(model_at(a, (9, 28)).as_deref(), Some("claude-sonnet-4-5"));
        assert!(sa.affinity.is_some());
        assert_eq!(sa.affinity, sb.affinity, "a later turn keeps its affinity");
        assert_ne!(
            sa.affinity, sc.affinity,
            "another system prompt is another prefix"
        );
        let plain = br#"{"model":"m","messages":[]}"#;
        assert_eq!(scan(plain, &h).affinity, None);
        assert_eq!(scan(b"not json", &h).model, None);
    }

    #[test]
    fn the_model_is_rewritten_in_place() {
        let body = Bytes::from_static(br#"{"model":"a","max_tokens":1}"#);
        let span = scan(&body, &RandomState::new()).model.unwrap_or_default();
        let out = with_model(&body, span, "b\"c").unwrap_or_default();
        assert_eq!(&out[..], br#"{"model":"b\"c","max_tokens":1}"#);
    }

    #[test]
    fn cache_reads_become_input_at_the_calibration_factor() {
        let e = Estimate {
            input_tokens: 150,
            raw_input_tokens: 100,
            cache_read_tokens: 1_000,
            cache_read_served: Some(900),
            cache_pending: vec![CachePrefix {
                hash: 1,
                tokens: 2_000,
            }],
            ..Estimate::default()
        };
        let u = uncached(&e);
        assert_eq!(u.cache_read_served, None, "no read left to size");
        assert!(u.cache_pending.is_empty(), "no prefix to read here");
        assert_eq!(
            (u.input_tokens, u.raw_input_tokens, u.cache_read_tokens),
            (1_650, 1_100, 0)
        );
        assert_eq!(uncached(&u), u, "nothing left to move");
    }

    #[test]
    fn budget_wait_counts_pending_costs_and_refill() {
        let limits = Limits::new().rpm(60).itpm(6_000).otpm(600);
        let costs = Costs {
            requests: 1,
            input_tokens: 1_000,
            output_tokens: 10,
        };
        // An unknown key is a full bucket: admitted now.
        assert_eq!(
            budget_wait(&limits, None, costs, Costs::default()),
            Duration::ZERO
        );
        // 5,500 pending input tokens + 1,000 is 500 beyond 6,000: 5 s at 100/s.
        let pending = Costs {
            requests: 0,
            input_tokens: 5_500,
            output_tokens: 0,
        };
        assert_eq!(
            budget_wait(&limits, None, costs, pending),
            Duration::from_secs(5)
        );
    }
}
