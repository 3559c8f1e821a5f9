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
        .map(|p| p.tokens)
        .max();
    if let Some(tokens) = longest {
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            tokens,
            "budget: a prefix the fleet has cached; charged as a read"
        );
        read(charge, tokens);
    }
}

/// Charges `charge` as reading a prefix of `tokens` (as estimated): a
/// counted request, its count less the prefix in the count's units; else
/// what follows the prefix at the estimate's calibration. Asked again with
/// a longer prefix, it starts from the estimate, not from the charge the
/// shorter one left.
fn read(charge: &mut Charge, tokens: u64) {
    charge.prefix_read = charge.prefix_read.max(tokens);
    if let Some(counted) = charge.counted {
        super::count::apply(charge, counted);
        return;
    }
    let e = &charge.estimate;
    let extra = tokens.saturating_sub(e.cache_read_tokens);
    if e.raw_input_tokens == 0 || extra == 0 {
        return;
    }
    let factor = e.input_tokens as f64 / e.raw_input_tokens as f64;
    let uncached = e.raw_input_tokens.saturating_sub(extra);
    let input = (uncached as f64 * factor).ceil() as u64;
    charge.costs.input_tokens = input.min(charge.costs.input_tokens);
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
