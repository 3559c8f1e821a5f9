//! What a budget shares with the other processes of a fleet about the
//! server's prompt cache, through a ledger that keeps a shared view
//! ([`Ledger::prompt_cache`](super::ledger::Ledger::prompt_cache), for
//! example a `RedisLedger` with `share_prompt_cache`).
//!
//! - **Telling**: a response's `cache_control` prefixes are readable once
//!   its answer has begun (a stream's first output; a JSON answer's body),
//!   and confirmed cached when its usage reports a cache write or read: the
//!   budget tells the ledger at both moments, with the size the server
//!   counted for the longest prefix
//!   ([`Ledger::prefixes_cached_sized`](super::ledger::Ledger::prefixes_cached_sized)).
//! - **Reading**: a request that waits for the budget was estimated when it
//!   arrived, maybe before another process made its prefix warm. Each time
//!   it is about to ask the ledger again, the budget looks its prefixes up
//!   in the shared view (from memory, no call); the longest one the fleet
//!   says is cached is charged as a read from then on, as cache-aware
//!   admission charges a prefix written in this process: by the size a
//!   process told for it, else with a margin.
//!
//! Without a shared view none of this runs.

use super::ledger::ServedSize;
use super::state::{Admission, Charge, Shared};

/// Charges a waiting request as reading the longest of its prefixes the
/// fleet says is cached, if that is longer than what it already reads, at
/// the size the server counted for it when a process told it (else with
/// the margin of `estimate::unsized_fleet_read`).
/// Not while a reservation is in flight (its costs are the ones asked), nor
/// for a class whose cache reads count toward its input limit.
pub(crate) fn read_cached(shared: &Shared, charge: &mut Charge, adm: &Admission) {
    let Some(cache) = shared.prompt_cache.as_ref() else {
        return;
    };
    if charge.cache_reads_count || adm.is_asking() {
        return;
    }
    if charge.prefix_from_fleet && charge.prefix_served.is_none() {
        // Read before the fleet knew its size: sized now if it does.
        if let Some(served) = cache.served(charge.prefix_hash) {
            charge.prefix_served = Some(served);
            super::prefix::charge_read(charge);
        }
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
        let served = cache.served(p.hash);
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            tokens = p.tokens,
            served,
            "budget: a prefix the fleet has cached; charged as a read"
        );
        // Read through cache-aware admission's one charging rule, which
        // starts from the estimate, not from a shorter read's charge.
        super::prefix::read_fleet_prefix(
            charge,
            super::prefix::Readable {
                hash: p.hash,
                tokens: p.tokens,
                served,
            },
        );
    }
}

/// Tells the ledger the prefixes a response wrote: `confirmed` by its
/// usage, or readable because its answer began; with the size the server
/// counted for the longest of them (`served`: the usage's cache creation
/// plus cache read, the prompt up to its last breakpoint), which the fleet
/// charges its reads of that prefix by.
pub(crate) fn tell_cached(shared: &Shared, charge: &Charge, served: u64) {
    if shared.prompt_cache.is_none() || charge.estimate.cache_writes.is_empty() {
        return;
    }
    let writes = &charge.estimate.cache_writes;
    let hashes: Vec<u64> = writes.iter().map(|w| w.hash).collect();
    let longest = writes
        .iter()
        .max_by_key(|w| w.tokens)
        .filter(|_| served > 0)
        .map(|w| ServedSize::new(w.hash, served));
    shared
        .ledger
        .prefixes_cached_sized(charge.key(), &hashes, longest);
}
