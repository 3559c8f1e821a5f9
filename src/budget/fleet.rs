//! What a budget shares with the other processes of a fleet about the
//! server's prompt cache, through a ledger that keeps a shared view
//! ([`Ledger::prompt_cache`](super::ledger::Ledger::prompt_cache), for
//! example a `RedisLedger` with `share_prompt_cache`).
//!
//! - **Telling**: a response's `cache_control` prefixes are readable once
//!   its answer has begun (a stream's first output; a JSON answer's body),
//!   and confirmed cached when its usage reports a cache write or read: the
//!   budget tells the ledger at both moments
//!   ([`Ledger::prefixes_cached`](super::ledger::Ledger::prefixes_cached)).
//! - **Reading**: a request that waits for the budget was estimated when it
//!   arrived, maybe before another process made its prefix warm. Each time
//!   it is about to ask the ledger again, the budget looks its prefixes up
//!   in the shared view (from memory, no call); the longest one the fleet
//!   says is cached is charged as a read from then on, as cache-aware
//!   admission charges a prefix written in this process.
//!
//! Without a shared view none of this runs.

use super::state::{Admission, Charge, Shared};

/// Charges a waiting request as reading the longest of its prefixes the
/// fleet says is cached, if that is longer than what it already reads. Not
/// while a reservation is in flight (its costs are the ones asked), nor for
/// a class whose cache reads count toward its input limit.
pub(crate) fn read_cached(shared: &Shared, charge: &mut Charge, adm: &Admission) {
    let Some(cache) = shared.prompt_cache.as_ref() else {
        return;
    };
    if charge.cache_reads_count || adm.is_asking() {
        return;
    }
    let e = &charge.estimate;
    let reads = e.cache_read_tokens.max(charge.prefix_read);
    let longest = e
        .cache_writes
        .iter()
        .chain(&e.cache_pending)
        .filter(|p| p.tokens > reads && cache.is_cached(p.hash))
        .max_by_key(|p| p.tokens)
        .copied();
    if let Some(p) = longest {
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            tokens = p.tokens,
            "budget: a prefix the fleet has cached; charged as a read"
        );
        // Its size as the server counted it is not shared: a counted
        // request's read is converted from the estimate (see `count.rs`).
        // Read through cache-aware admission's one charging rule, which
        // starts from the estimate, not from a shorter read's charge.
        super::prefix::read_prefix(
            charge,
            super::prefix::Readable {
                hash: p.hash,
                tokens: p.tokens,
                served: None,
            },
        );
        charge.prefix_from_fleet = true;
    }
}

/// Tells the ledger the prefixes a response wrote: `confirmed` by its
/// usage, or readable because its answer began.
pub(crate) fn tell_cached(shared: &Shared, charge: &Charge) {
    if shared.prompt_cache.is_none() || charge.estimate.cache_writes.is_empty() {
        return;
    }
    let hashes: Vec<u64> = charge
        .estimate
        .cache_writes
        .iter()
        .map(|w| w.hash)
        .collect();
    shared.ledger.prefixes_cached(charge.key(), &hashes);
}
