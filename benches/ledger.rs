//! The ledger's uncontended path: `reserve` + `settle` on one key, beside a
//! bare `Mutex<u64>` lock-and-add measured in the same run as the baseline.
//! `reserve_settle`, `reserve_settle_with_clock` and `reserve_settle_10k_keys`
//! pass the instant (`reserve_at`, `settle_at`); `reserve_settle_trait` goes
//! through the `Ledger` trait, as the layer calls it: the answers are ready at
//! once and the ledger reads tokio's clock in each operation.
//!
//! Run: `cargo bench --bench ledger -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Mutex;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tokio::time::Instant;
use tower_llm_limits::budget::ledger::{CostDelta, Costs, InMemoryLedger, Ledger, Reservation};
use tower_llm_limits::budget::{ModelClass, Tier};

/// What one request costs in the benchmarks.
const COSTS: Costs = Costs {
    requests: 1,
    input_tokens: 1_200,
    output_tokens: 800,
};

fn uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("ledger");

    // Baseline: the least a shared counter costs.
    let counter = Mutex::new(0u64);
    group.bench_function("baseline_mutex_u64_lock_add", |b| {
        b.iter(|| {
            let mut n = counter.lock().unwrap_or_else(|e| e.into_inner());
            *n = n.wrapping_add(black_box(1));
        })
    });

    let limits = Tier::Tier4.limits(ModelClass::Sonnet4);
    let costs = COSTS;
    // One settlement per reservation. It gives everything back (as for a
    // 429) so the bucket never runs dry however many iterations run; the
    // arithmetic is the same for any delta.
    let delta = CostDelta::refund(costs);

    // reserve + settle with the instant taken once (the ledger's own cost).
    let ledger = InMemoryLedger::new();
    let mut now = Instant::now();
    let step = Duration::from_nanos(1);
    group.bench_function("reserve_settle", |b| {
        b.iter(|| {
            now += step;
            let admitted = ledger.reserve_at(black_box("sonnet-4"), &limits, black_box(costs), now);
            ledger.settle_at("sonnet-4", &limits, black_box(delta), now);
            admitted
        })
    });

    // The same with `Instant::now()` read once per pair.
    let ledger = InMemoryLedger::new();
    group.bench_function("reserve_settle_with_clock", |b| {
        b.iter(|| {
            let now = Instant::now();
            let admitted = ledger.reserve_at(black_box("sonnet-4"), &limits, black_box(costs), now);
            ledger.settle_at("sonnet-4", &limits, black_box(delta), now);
            admitted
        })
    });

    // Through the trait, as the layer calls it: each operation reads the clock.
    let ledger = InMemoryLedger::new();
    group.bench_function("reserve_settle_trait", |b| {
        b.iter(|| {
            let admitted = ledger
                .reserve(black_box("sonnet-4"), &limits, black_box(costs))
                .into_ready()
                .map_or(None, Result::ok);
            let settled = ledger.settle("sonnet-4", &limits, black_box(delta));
            black_box(settled.into_ready().is_ok());
            admitted == Some(Reservation::Admitted)
        })
    });

    // Reserve alone, against a ledger holding 10,000 keys (a gateway).
    let ledger = InMemoryLedger::new();
    let start = Instant::now();
    let keys: Vec<String> = (0..10_000).map(|i| format!("caller-{i:05}")).collect();
    for key in &keys {
        let _ = ledger.reserve_at(key, &limits, costs, start);
    }
    let mut i = 0usize;
    let mut now = start;
    group.bench_function("reserve_settle_10k_keys", |b| {
        b.iter(|| {
            i = (i + 7_919) % keys.len();
            now += step;
            let key = keys.get(i).map_or("caller-00000", String::as_str);
            let admitted = ledger.reserve_at(key, &limits, black_box(costs), now);
            ledger.settle_at(key, &limits, black_box(delta), now);
            admitted
        })
    });

    group.finish();
}

criterion_group!(benches, uncontended);
criterion_main!(benches);
