//! Point-in-time views of a pool and its upstreams.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{DrainReason, Shared};
use crate::budget::ledger::Costs;
use crate::budget::BudgetSnapshot;
use crate::concurrency::Snapshot as ConcurrencySnapshot;
use crate::retry::RetrySnapshot;

/// The state of a pool: counters, and each upstream's state. Never holds a
/// key.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolSnapshot {
    /// One entry per upstream, in the order they were added.
    pub upstreams: Vec<UpstreamSnapshot>,
    /// Requests received.
    pub requests: u64,
    /// Attempts sent again to another upstream.
    pub failovers: u64,
    /// Requests that ended in an error or a failed answer after every attempt.
    pub failed: u64,
    /// Requests sent to the upstream that holds their prompt cache.
    pub affinity_routed: u64,
    /// Requests sent elsewhere because another upstream admitted them more
    /// than the affinity threshold sooner.
    pub affinity_overridden: u64,
    /// Requests sent as the fallback model.
    pub fallbacks: u64,
    /// Requests that left an upstream's queue, unsent, for an upstream that
    /// would admit them sooner.
    pub moved: u64,
    /// Cache-affinity keys remembered.
    pub affinity_keys: usize,
}

impl PoolSnapshot {
    /// The entry of the upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamSnapshot> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// The state of one upstream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UpstreamSnapshot {
    /// The upstream's name.
    pub name: String,
    /// Its base URL (never a key).
    pub base_url: String,
    /// Its weight.
    pub weight: u32,
    /// Why and for how much longer it is out of rotation, if it is.
    pub drained: Option<(DrainReason, Duration)>,
    /// Times it was drained.
    pub drains: u64,
    /// Attempts routed to it.
    pub routed: u64,
    /// Attempts it answered (handed to the caller).
    pub succeeded: u64,
    /// Attempts that failed over (or drained) from it.
    pub failovers: u64,
    /// Costs routed to it and not yet admitted by its budget.
    pub pending: Costs,
    /// Costs its budget admitted so far (the pool's estimates: requests,
    /// input tokens, expected output tokens).
    pub admitted: Costs,
    /// 429s received from it (the spend-cap 429 is a drain, counted in
    /// `drains`).
    pub received_429: u64,
    /// 529s received from it.
    pub received_529: u64,
    /// Its budget.
    pub budget: BudgetSnapshot,
    /// Its retry layer (its cooldown).
    pub retry: RetrySnapshot,
    /// Its concurrency layer.
    pub concurrency: ConcurrencySnapshot,
}

pub(crate) fn of(shared: &Shared) -> PoolSnapshot {
    let now = Instant::now();
    let c = &shared.counters;
    let affinity_keys = shared
        .affinity
        .lock()
        .map_or_else(|e| e.into_inner().len(), |a| a.len());
    PoolSnapshot {
        upstreams: shared
            .upstreams
            .iter()
            .map(|u| UpstreamSnapshot {
                name: u.config.name.to_string(),
                base_url: u.config.base.to_string(),
                weight: u.config.weight,
                drained: u
                    .drained_at(now)
                    .map(|d| (d.reason, d.until.saturating_duration_since(now))),
                drains: u.drains.load(Ordering::Relaxed),
                routed: u.routed.load(Ordering::Relaxed),
                succeeded: u.succeeded.load(Ordering::Relaxed),
                failovers: u.failovers.load(Ordering::Relaxed),
                pending: u.pending(),
                admitted: u.admitted(),
                received_429: u.received_429.load(Ordering::Relaxed),
                received_529: u.received_529.load(Ordering::Relaxed),
                budget: u.config.budget.snapshot(),
                retry: u.config.retry.snapshot(),
                concurrency: u.config.concurrency.snapshot(),
            })
            .collect(),
        requests: c.requests.load(Ordering::Relaxed),
        failovers: c.failovers.load(Ordering::Relaxed),
        failed: c.failed.load(Ordering::Relaxed),
        affinity_routed: c.affinity_routed.load(Ordering::Relaxed),
        affinity_overridden: c.affinity_overridden.load(Ordering::Relaxed),
        fallbacks: c.fallbacks.load(Ordering::Relaxed),
        moved: c.moved.load(Ordering::Relaxed),
        affinity_keys,
    }
}
