//! The ledger's rules, one test each, the published limits, and property tests
//! of its accounting.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower_llm_limits::budget::ledger::{
    BucketState, CostDelta, Costs, InMemoryLedger, InvalidWindow, Ledger, LedgerError,
    LedgerFuture, Reservation,
};
use tower_llm_limits::budget::{Limits, ModelClass, OutputMode, Tier};
use tower_llm_limits::headers::LimitStatus;
use tower_llm_limits::Dimension;

const KEY: &str = "sonnet-4";

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn costs(requests: u64, input_tokens: u64, output_tokens: u64) -> Costs {
    Costs {
        requests,
        input_tokens,
        output_tokens,
    }
}

fn input(tokens: u64) -> Costs {
    costs(0, tokens, 0)
}

fn input_delta(tokens: i64) -> CostDelta {
    CostDelta {
        input_tokens: tokens,
        ..CostDelta::default()
    }
}

fn bucket(
    ledger: &InMemoryLedger,
    limits: &Limits,
    dimension: Dimension,
    now: Instant,
) -> BucketState {
    let states = ledger.state_at(KEY, limits, now).expect("key is held");
    match dimension {
        Dimension::Requests => states[0],
        Dimension::InputTokens => states[1],
        Dimension::OutputTokens => states[2],
    }
}

fn available(ledger: &InMemoryLedger, limits: &Limits, dimension: Dimension, now: Instant) -> f64 {
    bucket(ledger, limits, dimension, now).available
}

fn assert_close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() < 1e-6,
        "expected {expected}, got {actual}"
    );
}

/// The instant a `Wait` answered at `now` names, and its dimension.
fn wait_at(now: Instant, reservation: Reservation) -> (Instant, Dimension) {
    match reservation {
        Reservation::Wait {
            retry_in,
            dimension,
        } => (now + retry_in, dimension),
        other => panic!("expected Wait, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Buckets: capacity, refill, start full

#[test]
fn new_bucket_starts_full_and_admits_up_to_its_capacity() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(30_000), now),
        Reservation::Admitted
    );
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now),
        0.0,
    );
    let (at, dimension) = wait_at(now, ledger.reserve_at(KEY, &limits, input(1), now));
    assert_eq!(dimension, Dimension::InputTokens);
    // 30,000 per minute is 500 per second: one token takes 2 ms.
    assert_eq!(at, now + ms(2));
}

#[test]
fn refills_at_the_limit_per_minute() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(30_000), now),
        Reservation::Admitted
    );
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now + secs(1)),
        500.0,
    );
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now + secs(30)),
        15_000.0,
    );
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now + ms(1)),
        0.5,
    );
}

#[test]
fn refill_never_exceeds_capacity() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(10_000), now),
        Reservation::Admitted
    );
    let later = now + secs(3_600);
    let state = bucket(&ledger, &limits, Dimension::InputTokens, later);
    assert_close(state.available, 30_000.0);
    assert_close(state.capacity, 30_000.0);
    // A full bucket admits exactly its capacity, not a minute's worth more.
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(30_000), later),
        Reservation::Admitted
    );
    assert!(matches!(
        ledger.reserve_at(KEY, &limits, input(1), later),
        Reservation::Wait { .. }
    ));
}

#[test]
fn state_is_none_for_a_key_never_used() {
    let ledger = InMemoryLedger::new();
    assert!(ledger
        .state_at(KEY, &Limits::new().rpm(1).itpm(1).otpm(1), Instant::now())
        .is_none());
    assert!(ledger.is_empty());
}

#[test]
fn keys_are_independent() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(1).itpm(1_000).otpm(1_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at("a", &limits, costs(1, 0, 0), now),
        Reservation::Admitted
    );
    assert!(matches!(
        ledger.reserve_at("a", &limits, costs(1, 0, 0), now),
        Reservation::Wait { .. }
    ));
    assert_eq!(
        ledger.reserve_at("b", &limits, costs(1, 0, 0), now),
        Reservation::Admitted
    );
    assert_eq!(ledger.len(), 2);
}

// ---------------------------------------------------------------------------
// Reserve: all or nothing, exact waits, never

#[test]
fn wait_until_is_exact_to_the_nanosecond() {
    let ledger = InMemoryLedger::new();
    // 7 RPM: one request every 8.571428571... s, not a whole number of nanoseconds.
    let limits = Limits::new().rpm(7);
    let now = Instant::now();
    for _ in 0..7 {
        assert_eq!(
            ledger.reserve_at(KEY, &limits, costs(1, 0, 0), now),
            Reservation::Admitted
        );
    }
    let (at, dimension) = wait_at(now, ledger.reserve_at(KEY, &limits, costs(1, 0, 0), now));
    assert_eq!(dimension, Dimension::Requests);
    // 60 s / 7 = 8,571,428,571.43 ns, rounded up.
    assert_eq!(at, now + Duration::from_nanos(8_571_428_572));
    let (again, _) = wait_at(
        at - Duration::from_nanos(1),
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), at - Duration::from_nanos(1)),
    );
    assert_eq!(
        again, at,
        "one nanosecond early is not enough, and asking does not move the answer"
    );
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), at),
        Reservation::Admitted
    );
}

#[test]
fn a_request_waiting_on_input_tokens_holds_no_request_slot() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(2).itpm(10_000).otpm(10_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 9_000, 100), now),
        Reservation::Admitted
    );
    let (_, dimension) = wait_at(
        now,
        ledger.reserve_at(KEY, &limits, costs(1, 5_000, 100), now),
    );
    assert_eq!(dimension, Dimension::InputTokens);
    // Nothing was debited by the refused reservation.
    assert_close(available(&ledger, &limits, Dimension::Requests, now), 1.0);
    assert_close(
        available(&ledger, &limits, Dimension::OutputTokens, now),
        9_900.0,
    );
    // So a small request still gets the last request slot.
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 500, 100), now),
        Reservation::Admitted
    );
}

#[test]
fn wait_until_names_the_dimension_furthest_from_fitting() {
    let ledger = InMemoryLedger::new();
    // RPM 60: one request per second. OTPM 6,000: 100 per second.
    let limits = Limits::new().rpm(60).itpm(60_000).otpm(6_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(60, 0, 6_000), now),
        Reservation::Admitted
    );
    // Needs 1 request (1 s) and 500 output tokens (5 s): output blocks longest.
    let (at, dimension) = wait_at(now, ledger.reserve_at(KEY, &limits, costs(1, 0, 500), now));
    assert_eq!(dimension, Dimension::OutputTokens);
    assert_eq!(at, now + secs(5));
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 500), at),
        Reservation::Admitted
    );
}

#[test]
fn a_cost_above_the_limit_is_never_admitted_and_debits_nothing() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 30_001, 100), now),
        Reservation::Never {
            dimension: Dimension::InputTokens,
            cost: 30_001,
            capacity: 30_000
        }
    );
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 100, 9_000), now),
        Reservation::Never {
            dimension: Dimension::OutputTokens,
            cost: 9_000,
            capacity: 8_000
        }
    );
    assert_close(available(&ledger, &limits, Dimension::Requests, now), 50.0);
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now),
        30_000.0,
    );
    // Never even when the bucket is empty, rather than a wait.
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(30_000), now),
        Reservation::Admitted
    );
    assert!(matches!(
        ledger.reserve_at(KEY, &limits, input(40_000), now),
        Reservation::Never { .. }
    ));
}

#[test]
fn a_dimension_without_any_limit_is_not_limited() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(10);
    let now = Instant::now();
    for _ in 0..10 {
        assert_eq!(
            ledger.reserve_at(KEY, &limits, costs(1, u64::MAX, u64::MAX), now),
            Reservation::Admitted
        );
    }
    let state = bucket(&ledger, &limits, Dimension::InputTokens, now);
    assert_eq!(state.limit, None);
    assert!(!state.learned);
    assert!(state.available.is_infinite());
    assert!(matches!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), now),
        Reservation::Wait {
            dimension: Dimension::Requests,
            ..
        }
    ));
}

#[test]
fn a_zero_cost_does_not_wait_on_a_dimension_in_debt() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 8_000), now),
        Reservation::Admitted
    );
    ledger.settle_at(
        KEY,
        &limits,
        CostDelta {
            output_tokens: 2_000,
            ..CostDelta::default()
        },
        now,
    );
    assert_close(
        available(&ledger, &limits, Dimension::OutputTokens, now),
        -2_000.0,
    );
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 100, 0), now),
        Reservation::Admitted
    );
}

// ---------------------------------------------------------------------------
// Enforcement window

#[test]
fn a_short_window_scales_the_capacity_not_the_rate() {
    let ledger = InMemoryLedger::with_window(secs(1)).expect("valid window");
    assert_eq!(ledger.window(), secs(1));
    let limits = Limits::new().rpm(60).itpm(60_000).otpm(6_000);
    let now = Instant::now();
    let state = bucket_after_first(&ledger, &limits, now);
    assert_close(state.capacity, 1.0);
    let (at, dimension) = wait_at(now, ledger.reserve_at(KEY, &limits, costs(1, 0, 0), now));
    assert_eq!((at, dimension), (now + secs(1), Dimension::Requests));
    // Ten idle seconds still refill only one second's worth.
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), now + secs(10)),
        Reservation::Admitted
    );
    assert!(matches!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), now + secs(10)),
        Reservation::Wait { .. }
    ));
}

fn bucket_after_first(ledger: &InMemoryLedger, limits: &Limits, now: Instant) -> BucketState {
    assert_eq!(
        ledger.reserve_at(KEY, limits, costs(1, 0, 0), now),
        Reservation::Admitted
    );
    bucket(ledger, limits, Dimension::Requests, now)
}

#[test]
fn a_short_window_admits_a_cost_above_its_share_only_from_a_full_bucket() {
    // 30,000 ITPM enforced per second: capacity 500, refill 500 per second.
    let ledger = InMemoryLedger::with_window(secs(1)).expect("valid window");
    let limits = Limits::new().itpm(30_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(100), now),
        Reservation::Admitted
    );
    // 5,000 is above the window's 500 but within the minute's 30,000: it waits
    // for the bucket to be full again (100 tokens: 200 ms), then is admitted.
    let (at, _) = wait_at(now, ledger.reserve_at(KEY, &limits, input(5_000), now));
    assert_eq!(at, now + ms(200));
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(5_000), at),
        Reservation::Admitted
    );
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, at),
        -4_500.0,
    );
    // The debt is repaid before anything else fits: 4,600 tokens at 500/s.
    let (next, _) = wait_at(at, ledger.reserve_at(KEY, &limits, input(100), at));
    assert_eq!(next, at + ms(9_200));
}

#[test]
fn the_window_must_be_positive_and_at_most_a_minute() {
    assert_eq!(
        InMemoryLedger::with_window(Duration::ZERO).map(|_| ()),
        Err::<(), _>(invalid(Duration::ZERO))
    );
    let err = InMemoryLedger::with_window(secs(61))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.window(), secs(61));
    assert!(err.to_string().contains("at most 60 s"));
    assert!(InMemoryLedger::with_window(secs(60)).is_ok());
    assert!(InMemoryLedger::with_window(Duration::from_nanos(1)).is_ok());
    assert_eq!(InMemoryLedger::new().window(), secs(60));
}

fn invalid(window: Duration) -> InvalidWindow {
    InMemoryLedger::with_window(window).map(|_| ()).unwrap_err()
}

// ---------------------------------------------------------------------------
// Settle

#[test]
fn a_refund_is_available_at_once() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 20_000, 4_000), now),
        Reservation::Admitted
    );
    ledger.settle_at(
        KEY,
        &limits,
        CostDelta::between(costs(1, 20_000, 4_000), costs(1, 20_000, 300)),
        now,
    );
    assert_close(
        available(&ledger, &limits, Dimension::OutputTokens, now),
        7_700.0,
    );
    ledger.settle_at(KEY, &limits, CostDelta::refund(costs(1, 20_000, 300)), now);
    assert_close(available(&ledger, &limits, Dimension::Requests, now), 50.0);
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now),
        30_000.0,
    );
    assert_close(
        available(&ledger, &limits, Dimension::OutputTokens, now),
        8_000.0,
    );
}

#[test]
fn a_refund_never_fills_above_capacity() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(10_000), now),
        Reservation::Admitted
    );
    // The bucket refilled meanwhile; a late refund of the whole cost stops at capacity.
    let later = now + secs(15);
    ledger.settle_at(KEY, &limits, input_delta(-10_000), later);
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, later),
        30_000.0,
    );
    ledger.settle_at(KEY, &limits, input_delta(i64::MIN), later);
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, later),
        30_000.0,
    );
}

#[test]
fn an_over_charge_leaves_a_debt_that_delays_later_requests() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(25_000), now),
        Reservation::Admitted
    );
    // The estimate was 10,000 tokens short.
    ledger.settle_at(KEY, &limits, input_delta(10_000), now);
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now),
        -5_000.0,
    );
    // 1,000 more tokens need 6,000 of refill: 12 s at 500/s.
    let (at, dimension) = wait_at(now, ledger.reserve_at(KEY, &limits, input(1_000), now));
    assert_eq!((at, dimension), (now + secs(12), Dimension::InputTokens));
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(1_000), at),
        Reservation::Admitted
    );
}

#[test]
fn settling_a_key_never_used_is_ignored() {
    let ledger = InMemoryLedger::new();
    ledger.settle_at(
        KEY,
        &Limits::new().rpm(1).itpm(1).otpm(1),
        input_delta(-5),
        Instant::now(),
    );
    assert!(ledger.is_empty());
}

#[test]
fn cost_delta_helpers_saturate() {
    assert_eq!(
        CostDelta::refund(costs(1, u64::MAX, 0)),
        CostDelta {
            requests: -1,
            input_tokens: i64::MIN + 1,
            output_tokens: 0
        }
    );
    let delta = CostDelta::between(costs(0, u64::MAX, 0), costs(0, 0, u64::MAX));
    assert_eq!(
        (delta.input_tokens, delta.output_tokens),
        (i64::MIN, i64::MAX)
    );
    assert!(CostDelta::default().is_zero());
    assert_eq!(
        Costs {
            requests: 1,
            input_tokens: 3,
            output_tokens: 4
        }
        .get(Dimension::Requests),
        1
    );
}

// ---------------------------------------------------------------------------
// Sync

/// Three statuses as one response reports them.
fn statuses() -> [LimitStatus; 3] {
    [
        LimitStatus {
            limit: Some(50),
            remaining: Some(20),
            reset_in: None,
        },
        LimitStatus::default(),
        LimitStatus {
            limit: Some(8_000),
            remaining: None,
            reset_in: Some(secs(30)),
        },
    ]
}

#[test]
fn sync_all_does_what_one_sync_per_dimension_does() {
    let limits = Limits::new().itpm(30_000);
    let now = Instant::now();
    let one_by_one = InMemoryLedger::new();
    for (dimension, status) in Dimension::ALL.into_iter().zip(statuses()) {
        if !status.is_empty() {
            one_by_one.sync_at(KEY, &limits, dimension, status, now);
        }
    }
    let at_once = InMemoryLedger::new();
    at_once.sync_all_at(KEY, &limits, statuses(), now);
    let later = now + secs(3);
    let a = one_by_one.state_at(KEY, &limits, later).expect("key held");
    let b = at_once.state_at(KEY, &limits, later).expect("key held");
    assert_eq!(a, b);
    // Requests lowered to 20 (plus 3 s of refill at 50/min), input untouched
    // (full), output learned and implied by the reset time: 4,000 + 400.
    assert_close(b[0].available, 22.5);
    assert_close(b[1].available, 30_000.0);
    assert_close(b[2].available, 4_400.0);
    assert!(b[0].learned && b[2].learned && !b[1].learned);
}

#[test]
fn sync_all_of_empty_statuses_creates_no_key() {
    let ledger = InMemoryLedger::new();
    let now = Instant::now();
    ledger.sync_all_at(KEY, &Limits::new(), [LimitStatus::default(); 3], now);
    assert!(ledger.is_empty());
}

/// A ledger that implements only the required methods, each a round trip,
/// so `sync_all` is the trait's default.
#[derive(Debug)]
struct Remote {
    inner: Arc<InMemoryLedger>,
    fail: Option<Dimension>,
}

impl Ledger for Remote {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.inner.reserve(key, limits, costs)
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.inner.settle(key, limits, delta)
    }

    fn sync(
        &self,
        key: &str,
        limits: &Limits,
        dimension: Dimension,
        sync: LimitStatus,
    ) -> LedgerFuture<()> {
        let (inner, key, limits) = (Arc::clone(&self.inner), key.to_owned(), *limits);
        let fail = self.fail == Some(dimension);
        LedgerFuture::new(async move {
            tokio::task::yield_now().await;
            if fail {
                return Err(LedgerError::new(format!("{dimension} refused")));
            }
            inner.sync(&key, &limits, dimension, sync).await
        })
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        self.inner.state(key, limits)
    }
}

#[tokio::test(start_paused = true)]
async fn the_default_sync_all_syncs_each_dimension_and_reports_the_first_error() {
    let limits = Limits::new().itpm(30_000);
    let inner = Arc::new(InMemoryLedger::new());
    let remote = Remote {
        inner: Arc::clone(&inner),
        fail: None,
    };
    let op = remote.sync_all(KEY, &limits, statuses());
    // A round trip: not answered at once.
    let op = op.into_ready().expect_err("the default waits on each sync");
    op.await.expect("every sync succeeded");
    let reference = InMemoryLedger::new();
    let now = Instant::now();
    reference.sync_all_at(KEY, &limits, statuses(), now);
    assert_eq!(
        inner.state_at(KEY, &limits, now),
        reference.state_at(KEY, &limits, now)
    );

    // One dimension fails: the others are still synced, the error reported.
    let inner = Arc::new(InMemoryLedger::new());
    let remote = Remote {
        inner: Arc::clone(&inner),
        fail: Some(Dimension::Requests),
    };
    let err = remote
        .sync_all(KEY, &limits, statuses())
        .await
        .expect_err("the requests sync failed");
    let source = std::error::Error::source(&err).map(ToString::to_string);
    assert_eq!(source.as_deref(), Some("requests per minute refused"));
    let state = inner
        .state_at(KEY, &limits, Instant::now())
        .expect("key held");
    assert_eq!(state[0].limit, None, "the failed dimension was not synced");
    assert_eq!(state[2].limit, Some(8_000), "the others were");
}

#[test]
fn sync_learns_the_limit_when_none_is_configured() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new();
    let now = Instant::now();
    // Before: not limited.
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(1_000_000), now),
        Reservation::Admitted
    );
    let sync = LimitStatus {
        limit: Some(30_000),
        remaining: Some(10_000),
        reset_in: Some(secs(40)),
    };
    ledger.sync_at(KEY, &limits, Dimension::InputTokens, sync, now);
    let state = bucket(&ledger, &limits, Dimension::InputTokens, now);
    assert_eq!(state.limit, Some(30_000));
    assert!(state.learned);
    assert_close(state.available, 10_000.0);
    assert_close(state.capacity, 30_000.0);
    // From then on it paces.
    let (at, _) = wait_at(now, ledger.reserve_at(KEY, &limits, input(20_000), now));
    assert_eq!(at, now + secs(20));
}

#[test]
fn a_configured_limit_stays_unless_the_server_reports_a_lower_one() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(50_000).otpm(8_000);
    let now = Instant::now();
    let higher = LimitStatus {
        limit: Some(80_000),
        ..LimitStatus::default()
    };
    ledger.sync_at(KEY, &limits, Dimension::InputTokens, higher, now);
    let state = bucket(&ledger, &limits, Dimension::InputTokens, now);
    assert_eq!((state.limit, state.learned), (Some(50_000), false));
    let lower = LimitStatus {
        limit: Some(30_000),
        ..LimitStatus::default()
    };
    ledger.sync_at(KEY, &limits, Dimension::InputTokens, lower, now);
    let state = bucket(&ledger, &limits, Dimension::InputTokens, now);
    assert_eq!((state.limit, state.learned), (Some(30_000), true));
    // The bucket shrank with the limit.
    assert_close(state.available, 30_000.0);
    assert!(matches!(
        ledger.reserve_at(KEY, &limits, input(40_000), now),
        Reservation::Never {
            capacity: 30_000,
            ..
        }
    ));
}

#[test]
fn sync_ignores_a_zero_limit() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new();
    let now = Instant::now();
    let zero = LimitStatus {
        limit: Some(0),
        remaining: Some(0),
        reset_in: None,
    };
    ledger.sync_at(KEY, &limits, Dimension::Requests, zero, now);
    assert_eq!(
        bucket(&ledger, &limits, Dimension::Requests, now).limit,
        None
    );
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), now),
        Reservation::Admitted
    );
}

#[test]
fn the_server_wins_when_it_says_less_is_left() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 1_000, 0), now),
        Reservation::Admitted
    );
    let sync = |remaining| LimitStatus {
        limit: Some(50),
        remaining: Some(remaining),
        reset_in: None,
    };
    ledger.sync_at(KEY, &limits, Dimension::Requests, sync(20), now);
    assert_close(available(&ledger, &limits, Dimension::Requests, now), 20.0);
    // More left on the server than in the ledger: the ledger keeps its own, lower, view.
    ledger.sync_at(KEY, &limits, Dimension::Requests, sync(45), now);
    assert_close(available(&ledger, &limits, Dimension::Requests, now), 20.0);
}

#[test]
fn sync_does_not_take_the_rounding_of_token_counts_for_a_change() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    let sync = |remaining| LimitStatus {
        limit: Some(30_000),
        remaining: Some(remaining),
        reset_in: None,
    };
    // Ledger 10,400; the server says "10,000" (nearest thousand: truly 9,500..10,499).
    assert_eq!(
        ledger.reserve_at(KEY, &limits, input(19_600), now),
        Reservation::Admitted
    );
    ledger.sync_at(KEY, &limits, Dimension::InputTokens, sync(10_000), now);
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now),
        10_400.0,
    );
    // Exactly at the edge (10,500 is not below 10,500): still not a change.
    ledger.settle_at(KEY, &limits, input_delta(-100), now);
    ledger.sync_at(KEY, &limits, Dimension::InputTokens, sync(10_000), now);
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now),
        10_500.0,
    );
    // Ledger 10,600: more than rounding can explain, so the server wins.
    ledger.settle_at(KEY, &limits, input_delta(-100), now);
    ledger.sync_at(KEY, &limits, Dimension::InputTokens, sync(10_000), now);
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now),
        10_000.0,
    );
    // A token count that is not a multiple of 1,000 is exact.
    ledger.sync_at(KEY, &limits, Dimension::InputTokens, sync(9_999), now);
    assert_close(
        available(&ledger, &limits, Dimension::InputTokens, now),
        9_999.0,
    );
}

#[test]
fn request_counts_are_exact_even_in_thousands() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(2_000).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(600, 0, 0), now),
        Reservation::Admitted
    );
    let sync = LimitStatus {
        limit: Some(2_000),
        remaining: Some(1_000),
        reset_in: None,
    };
    ledger.sync_at(KEY, &limits, Dimension::Requests, sync, now);
    assert_close(
        available(&ledger, &limits, Dimension::Requests, now),
        1_000.0,
    );
}

#[test]
fn sync_uses_the_reset_time_when_remaining_is_absent() {
    let ledger = InMemoryLedger::new();
    // 60,000 per minute: 1,000 per second.
    let limits = Limits::new().otpm(60_000);
    let now = Instant::now();
    let reset = |reset_in| LimitStatus {
        limit: None,
        remaining: None,
        reset_in: Some(reset_in),
    };
    // Full again in 0.5 s: 59,500 left, within the header's one-second precision.
    ledger.sync_at(KEY, &limits, Dimension::OutputTokens, reset(ms(500)), now);
    assert_close(
        available(&ledger, &limits, Dimension::OutputTokens, now),
        60_000.0,
    );
    // Full again in 30 s: 30,000 left.
    ledger.sync_at(KEY, &limits, Dimension::OutputTokens, reset(secs(30)), now);
    assert_close(
        available(&ledger, &limits, Dimension::OutputTokens, now),
        30_000.0,
    );
    // Longer than a whole refill: nothing left, not less than nothing.
    ledger.sync_at(KEY, &limits, Dimension::OutputTokens, reset(secs(600)), now);
    assert_close(
        available(&ledger, &limits, Dimension::OutputTokens, now),
        0.0,
    );
}

#[test]
fn sync_prefers_remaining_over_reset() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().otpm(60_000);
    let now = Instant::now();
    let sync = LimitStatus {
        limit: None,
        remaining: Some(50_001),
        reset_in: Some(secs(59)),
    };
    ledger.sync_at(KEY, &limits, Dimension::OutputTokens, sync, now);
    assert_close(
        available(&ledger, &limits, Dimension::OutputTokens, now),
        50_001.0,
    );
}

// ---------------------------------------------------------------------------
// Clock, overflow, memory, concurrency

#[test]
fn a_clock_that_steps_back_refills_nothing() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(60);
    let start = Instant::now() + secs(100);
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(60, 0, 0), start),
        Reservation::Admitted
    );
    let earlier = start - secs(5);
    let (at, _) = wait_at(
        earlier,
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), earlier),
    );
    // Counted from the latest instant the bucket has seen, so the wait is exact.
    assert_eq!(at, start + secs(1));
    assert!(matches!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), start + ms(999)),
        Reservation::Wait { .. }
    ));
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), at),
        Reservation::Admitted
    );
}

#[test]
fn huge_limits_costs_and_charges_do_not_overflow() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(u64::MAX).itpm(u64::MAX).otpm(u64::MAX);
    let now = Instant::now();
    let all = costs(u64::MAX, u64::MAX, u64::MAX);
    assert_eq!(
        ledger.reserve_at(KEY, &limits, all, now),
        Reservation::Admitted
    );
    let (at, _) = wait_at(now, ledger.reserve_at(KEY, &limits, all, now));
    assert_eq!(at, now + secs(60));
    for _ in 0..1_000 {
        ledger.settle_at(
            KEY,
            &limits,
            CostDelta {
                requests: i64::MAX,
                input_tokens: i64::MAX,
                output_tokens: i64::MAX,
            },
            now,
        );
    }
    let (at, _) = wait_at(now, ledger.reserve_at(KEY, &limits, costs(1, 1, 1), now));
    assert!(at > now);
    // A tiny limit with an enormous debt: the wait is decades, not a panic.
    let small = Limits::new().rpm(1).itpm(1).otpm(1);
    assert_eq!(
        ledger.reserve_at("small", &small, costs(1, 1, 1), now),
        Reservation::Admitted
    );
    for _ in 0..1_000 {
        ledger.settle_at("small", &small, input_delta(i64::MAX), now);
    }
    let (at, dimension) = wait_at(now, ledger.reserve_at("small", &small, costs(1, 1, 1), now));
    assert_eq!(dimension, Dimension::InputTokens);
    assert!(at >= now + secs(365 * 86_400));
    assert!(ledger
        .state_at("small", &small, now + secs(1_000_000_000))
        .is_some_and(|s| s[1].available < 0.0));
    // The instant far in the future still works as an instant.
    assert!(ledger.state_at("small", &small, at).is_some());
}

#[test]
fn remove_forgets_a_key() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(1).itpm(1_000).otpm(1_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), now),
        Reservation::Admitted
    );
    assert!(ledger.remove(KEY));
    assert!(!ledger.remove(KEY));
    assert!(ledger.is_empty());
    assert_eq!(
        ledger.reserve_at(KEY, &limits, costs(1, 0, 0), now),
        Reservation::Admitted
    );
}

#[test]
fn evict_idle_drops_only_idle_keys_with_full_buckets() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(60).itpm(60_000).otpm(60_000);
    let now = Instant::now();
    assert_eq!(
        ledger.reserve_at("idle", &limits, costs(1, 100, 0), now),
        Reservation::Admitted
    );
    assert_eq!(
        ledger.reserve_at("in-debt", &limits, costs(1, 100, 0), now),
        Reservation::Admitted
    );
    ledger.settle_at("in-debt", &limits, input_delta(600_000), now);
    assert_eq!(
        ledger.reserve_at("busy", &limits, costs(1, 100, 0), now + secs(100)),
        Reservation::Admitted
    );
    // "busy" was used 20 s ago; "in-debt" still owes ~9 minutes of refill.
    let dropped = ledger.evict_idle(now + secs(120), secs(60));
    assert_eq!(dropped, 1);
    assert!(ledger.state_at("idle", &limits, now).is_none());
    assert!(ledger.state_at("in-debt", &limits, now).is_some());
    assert!(ledger.state_at("busy", &limits, now).is_some());
    assert_eq!(ledger.evict_idle(now + secs(3_600), secs(60)), 2);
    assert!(ledger.is_empty());
}

#[test]
fn debug_does_not_print_keys() {
    let ledger = InMemoryLedger::new();
    let now = Instant::now();
    let _ = ledger.reserve_at("sk-ant-secret", &Limits::new(), costs(1, 0, 0), now);
    let debug = format!("{ledger:?}");
    assert!(!debug.contains("sk-ant"), "{debug}");
    assert!(debug.contains("keys: 1"), "{debug}");
}

#[test]
fn concurrent_reservations_admit_exactly_the_capacity() {
    let ledger = Arc::new(InMemoryLedger::new());
    let limits = Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000_000);
    let now = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let ledger = Arc::clone(&ledger);
            std::thread::spawn(move || {
                let mut admitted = 0u64;
                for i in 0..500 {
                    // Half the threads share a key with a second one, to exercise
                    // key creation racing with use.
                    let key = if (t + i) % 2 == 0 { "a" } else { "b" };
                    if ledger.reserve_at(key, &limits, costs(1, 10, 10), now)
                        == Reservation::Admitted
                    {
                        admitted += 1;
                    }
                }
                admitted
            })
        })
        .collect();
    let total: u64 = threads
        .into_iter()
        .map(|t| t.join().expect("no panic"))
        .sum();
    assert_eq!(total, 2_000, "two keys of 1,000 requests each");
    assert_eq!(ledger.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_woken_at_the_instant_given_is_admitted() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let request = costs(1, 12_345, 777);
    let mut admitted = 0;
    let start = Instant::now();
    while admitted < 10 {
        match ledger.reserve_at(KEY, &limits, request, Instant::now()) {
            Reservation::Admitted => admitted += 1,
            Reservation::Wait { retry_in, .. } => tokio::time::sleep(retry_in).await,
            never => panic!("unexpected {never:?}"),
        }
    }
    // 10 x 12,345 input tokens from a full bucket of 30,000 at 500/s: the last
    // admission needs 93,450 tokens of refill, 186.9 s (tokio's timer rounds
    // each wake-up up to the millisecond).
    let elapsed = start.elapsed();
    assert!(elapsed >= ms(186_900), "{elapsed:?}");
    assert!(elapsed < ms(186_900 + 10), "{elapsed:?}");
    tokio::time::advance(secs(1)).await;
}

// ---------------------------------------------------------------------------
// Limits, model classes, tiers

#[test]
fn limits_constructors() {
    let limits = Limits::new().rpm(1).itpm(2).otpm(3);
    assert_eq!(
        (
            limits.get(Dimension::Requests),
            limits.get(Dimension::InputTokens),
            limits.get(Dimension::OutputTokens)
        ),
        (Some(1), Some(2), Some(3))
    );
    assert_eq!(Limits::new(), Limits::default());
    let built = Limits::new().rpm(1).itpm(2).otpm(3);
    assert_eq!(built, limits);
    assert_eq!(OutputMode::default(), OutputMode::Realtime);
}

#[test]
fn model_names_map_to_their_shared_class() {
    let cases = [
        ("claude-opus-4-5-20251101", ModelClass::Opus4),
        ("claude-opus-4-5", ModelClass::Opus4),
        ("claude-opus-4-1-20250805", ModelClass::Opus4),
        ("claude-opus-4-20250514", ModelClass::Opus4),
        ("claude-opus-4-0", ModelClass::Opus4),
        ("claude-sonnet-4-5-20250929", ModelClass::Sonnet4),
        ("claude-sonnet-4-5", ModelClass::Sonnet4),
        ("claude-sonnet-4-20250514", ModelClass::Sonnet4),
        ("claude-sonnet-4-0", ModelClass::Sonnet4),
        ("claude-haiku-4-5-20251001", ModelClass::Haiku45),
        ("claude-haiku-4-5", ModelClass::Haiku45),
        ("claude-3-5-haiku-20241022", ModelClass::Haiku35),
        ("claude-3-5-haiku-latest", ModelClass::Haiku35),
        ("claude-3-haiku-20240307", ModelClass::Haiku3),
        ("claude-3-7-sonnet-20250219", ModelClass::Sonnet37),
        ("claude-3-7-sonnet-latest", ModelClass::Sonnet37),
        // Cloud providers' spellings.
        (
            "anthropic.claude-3-7-sonnet-20250219-v1:0",
            ModelClass::Sonnet37,
        ),
        (
            "us.anthropic.claude-sonnet-4-20250514-v1:0",
            ModelClass::Sonnet4,
        ),
        ("claude-sonnet-4-5@20250929", ModelClass::Sonnet4),
        ("claude-3-5-haiku@20241022", ModelClass::Haiku35),
        ("CLAUDE-OPUS-4-1", ModelClass::Opus4),
        // A non-ASCII character separates words, as `-` does.
        (
            "claude\u{2010}sonnet\u{2010}4\u{2010}5",
            ModelClass::Sonnet4,
        ),
        ("claudé-opus-4-1", ModelClass::Opus4),
        ("claude-opus-٤-1", ModelClass::Other),
        // Not one of the classes.
        ("claude-3-opus-20240229", ModelClass::Other),
        ("claude-3-5-sonnet-20241022", ModelClass::Other),
        ("claude-2.1", ModelClass::Other),
        ("claude-haiku-4-6", ModelClass::Other),
        ("claude-opus-5", ModelClass::Other),
        ("gpt-4o", ModelClass::Other),
        ("haiku", ModelClass::Other),
        ("", ModelClass::Other),
    ];
    for (name, class) in cases {
        assert_eq!(ModelClass::of(name), class, "{name}");
    }
}

#[test]
fn only_the_dagger_models_count_cache_reads_toward_itpm() {
    for class in ModelClass::ALL {
        let expected = matches!(class, ModelClass::Haiku35 | ModelClass::Haiku3);
        assert_eq!(class.cache_reads_count_toward_itpm(), expected, "{class}");
    }
}

#[test]
fn model_class_names_are_distinct() {
    let mut names: Vec<_> = ModelClass::ALL.iter().map(|c| c.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), ModelClass::ALL.len());
    assert_eq!(ModelClass::Haiku45.to_string(), "haiku-4-5");
}

#[test]
fn tier_1_to_4_presets_match_the_published_table() {
    use ModelClass::*;
    use Tier::*;
    let table = [
        (
            Sonnet4,
            [
                (50, 30_000, 8_000),
                (1_000, 450_000, 90_000),
                (2_000, 800_000, 160_000),
                (4_000, 2_000_000, 400_000),
            ],
        ),
        (
            Opus4,
            [
                (50, 30_000, 8_000),
                (1_000, 450_000, 90_000),
                (2_000, 800_000, 160_000),
                (4_000, 2_000_000, 400_000),
            ],
        ),
        (
            Haiku45,
            [
                (50, 50_000, 10_000),
                (1_000, 450_000, 90_000),
                (2_000, 1_000_000, 200_000),
                (4_000, 4_000_000, 800_000),
            ],
        ),
        (
            Haiku35,
            [
                (50, 50_000, 10_000),
                (1_000, 100_000, 20_000),
                (2_000, 200_000, 40_000),
                (4_000, 400_000, 80_000),
            ],
        ),
    ];
    for (class, row) in table {
        for (tier, (rpm, itpm, otpm)) in [Tier1, Tier2, Tier3, Tier4].into_iter().zip(row) {
            assert_eq!(
                tier.limits(class),
                Limits::new().rpm(rpm).itpm(itpm).otpm(otpm),
                "{tier:?} {class}"
            );
        }
    }
}

#[test]
fn start_build_scale_presets_match_the_published_table() {
    use ModelClass::*;
    use Tier::*;
    let shared = [
        (1_000, 2_000_000, 400_000),
        (5_000, 5_000_000, 1_000_000),
        (10_000, 10_000_000, 2_000_000),
    ];
    let table = [
        (Opus4, shared),
        (Sonnet4, shared),
        (Haiku45, shared),
        (
            Haiku35,
            [
                (1_000, 100_000, 20_000),
                (2_000, 200_000, 40_000),
                (4_000, 400_000, 80_000),
            ],
        ),
    ];
    for (class, row) in table {
        for (tier, (rpm, itpm, otpm)) in [Start, Build, Scale].into_iter().zip(row) {
            assert_eq!(
                tier.limits(class),
                Limits::new().rpm(rpm).itpm(itpm).otpm(otpm),
                "{tier:?} {class}"
            );
        }
    }
}

#[test]
fn classes_without_a_row_get_the_most_common_row() {
    for tier in Tier::ALL {
        let common = tier.limits(ModelClass::Sonnet4);
        assert_eq!(tier.limits(ModelClass::Opus4), common, "{tier:?}");
        for class in [ModelClass::Sonnet37, ModelClass::Haiku3, ModelClass::Other] {
            assert_eq!(tier.limits(class), common, "{tier:?} {class}");
        }
    }
    assert_eq!(
        Tier::Tier2.limits(ModelClass::of("claude-3-5-haiku-20241022")),
        Limits::new().rpm(1_000).itpm(100_000).otpm(20_000)
    );
}

// ---------------------------------------------------------------------------
// Property tests

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// One minute in nanoseconds: units of a level per token (the ledger's own scale).
    const UNITS: i128 = 60_000_000_000;

    #[derive(Debug, Clone)]
    enum Op {
        /// Reserve these costs; on Wait, probe one nanosecond early and
        /// then at the instant given (a waiter woken on time).
        Reserve {
            requests: u64,
            input: u64,
            output: u64,
            wait: bool,
        },
        /// Settle the `pick`-th outstanding reservation with real usage given
        /// as a percentage of what was reserved (0..=150: refunds and charges).
        Settle { pick: usize, percent: [u64; 3] },
        /// Let time pass.
        Advance { nanos: u64 },
        /// One operation arrives with an instant earlier than the clock.
        StepBack {
            nanos: u64,
            requests: u64,
            input: u64,
            output: u64,
            wait: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..4, 0u64..40_000, 0u64..10_000, any::<bool>())
                .prop_map(|(requests, input, output, wait)| Op::Reserve { requests, input, output, wait }),
            2 => (any::<usize>(), [0u64..=150, 0u64..=150, 0u64..=150])
                .prop_map(|(pick, percent)| Op::Settle { pick, percent }),
            2 => (0u64..20_000_000_000).prop_map(|nanos| Op::Advance { nanos }),
            1 => (1u64..5_000_000_000, 0u64..3, 0u64..20_000, 0u64..5_000, any::<bool>())
                .prop_map(|(nanos, requests, input, output, wait)| Op::StepBack { nanos, requests, input, output, wait }),
        ]
    }

    fn limits() -> impl Strategy<Value = Limits> {
        (1u64..120, 1u64..60_000, 1u64..15_000)
            .prop_map(|(r, i, o)| Limits::new().rpm(r).itpm(i).otpm(o))
    }

    /// One admission or settlement, as seen from outside.
    #[derive(Debug, Clone, Copy)]
    struct Event {
        /// The instant passed to the ledger.
        at: Instant,
        /// The latest instant passed so far (the clock never goes back for the ledger).
        latest: Instant,
        admitted: [u64; 3],
        refunded: [u64; 3],
    }

    fn nanos_between(from: Instant, to: Instant) -> i128 {
        i128::try_from(to.saturating_duration_since(from).as_nanos()).unwrap_or(i128::MAX)
    }

    /// What the first property test saw: the admissions and settlements, in
    /// order, and the reservations not settled yet.
    struct Model {
        limits: Limits,
        /// The latest instant passed to the ledger so far.
        latest: Instant,
        outstanding: Vec<Costs>,
        events: Vec<Event>,
    }

    impl Model {
        /// Reserves `c` at `now`, checks the answer, and on `Wait` (if `wait`)
        /// checks that it is exact and returns the instant it was admitted at.
        fn reserve(
            &mut self,
            ledger: &InMemoryLedger,
            c: Costs,
            now: Instant,
            wait: bool,
        ) -> Result<Option<Instant>, TestCaseError> {
            let limits = self.limits;
            self.latest = self.latest.max(now);
            match ledger.reserve_at(KEY, &limits, c, now) {
                Reservation::Admitted => {
                    self.admitted(c, now);
                    Ok(None)
                }
                Reservation::Wait {
                    retry_in,
                    dimension,
                } => {
                    let at = now + retry_in;
                    prop_assert!(at > now);
                    let cost = c.get(dimension);
                    let limit = limits.get(dimension).unwrap_or(0);
                    prop_assert!(cost > 0 && cost <= limit);
                    if !wait {
                        return Ok(None);
                    }
                    let before = at - Duration::from_nanos(1);
                    let early = ledger.reserve_at(KEY, &limits, c, before);
                    prop_assert_eq!(
                        early,
                        Reservation::Wait {
                            retry_in: Duration::from_nanos(1),
                            dimension
                        },
                        "one nanosecond early"
                    );
                    self.latest = self.latest.max(at);
                    let on_time = ledger.reserve_at(KEY, &limits, c, at);
                    prop_assert_eq!(on_time, Reservation::Admitted, "woken at the instant given");
                    self.admitted(c, at);
                    Ok(Some(at))
                }
                Reservation::Never {
                    dimension,
                    cost,
                    capacity,
                } => {
                    prop_assert_eq!(Some(capacity), limits.get(dimension));
                    prop_assert!(cost > capacity);
                    prop_assert_eq!(cost, c.get(dimension));
                    Ok(None)
                }
            }
        }

        fn admitted(&mut self, c: Costs, at: Instant) {
            self.outstanding.push(c);
            self.events.push(Event {
                at,
                latest: self.latest,
                admitted: [c.requests, c.input_tokens, c.output_tokens],
                refunded: [0; 3],
            });
        }

        /// Settles the `pick`-th outstanding reservation at `percent` of what it
        /// reserved, per dimension.
        fn settle(
            &mut self,
            ledger: &InMemoryLedger,
            pick: usize,
            percent: [u64; 3],
            clock: Instant,
        ) {
            if self.outstanding.is_empty() {
                return;
            }
            let reserved = self.outstanding.swap_remove(pick % self.outstanding.len());
            let actual = costs(
                reserved.requests * percent[0] / 100,
                reserved.input_tokens * percent[1] / 100,
                reserved.output_tokens * percent[2] / 100,
            );
            let delta = CostDelta::between(reserved, actual);
            self.latest = self.latest.max(clock);
            ledger.settle_at(KEY, &self.limits, delta, clock);
            let refunded = Dimension::ALL.map(|d| u64::try_from(-delta.get(d).min(0)).unwrap_or(0));
            self.events.push(Event {
                at: clock,
                latest: self.latest,
                admitted: [0; 3],
                refunded,
            });
        }

        /// The window bound, for every pair of admissions, per dimension.
        fn check_window_bound(&self, window_secs: u64) -> Result<(), TestCaseError> {
            let (limits, events) = (self.limits, &self.events);
            let window_nanos = i128::from(window_secs) * 1_000_000_000;
            for (d, dimension) in Dimension::ALL.into_iter().enumerate() {
                let limit = i128::from(limits.get(dimension).unwrap_or(0));
                let capacity = limit * window_nanos;
                for i in 0..events.len() {
                    if events[i].admitted[d] == 0 {
                        continue;
                    }
                    let mut admitted = 0i128;
                    let mut refunded = 0i128;
                    for j in i..events.len() {
                        admitted += i128::from(events[j].admitted[d]) * UNITS;
                        refunded += i128::from(events[j].refunded[d]) * UNITS;
                        if events[j].admitted[d] == 0 {
                            continue;
                        }
                        let refill = limit * nanos_between(events[i].at, events[j].latest);
                        let oversize =
                            (i128::from(events[j].admitted[d]) * UNITS - capacity).max(0);
                        prop_assert!(
                            admitted <= capacity + refill + refunded + oversize,
                            "{dimension}: admitted {} > capacity {} + refill {} + refunds {} + oversize {} between events {i} and {j}",
                            admitted, capacity, refill, refunded, oversize
                        );
                    }
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// For any sequence of reservations, settlements and clock steps:
        /// - between any two admissions i <= j, what was admitted is at most
        ///   the capacity + the refill over [t_i, t_j] + what settlements
        ///   refunded meanwhile (+ what a cost above a short window's share
        ///   takes beyond it);
        /// - a Wait is exact: one nanosecond earlier is refused, the
        ///   instant itself is admitted;
        /// - once everything is settled and refunded and time has passed,
        ///   every bucket is exactly full again: nothing was lost or counted twice.
        #[test]
        fn admissions_stay_within_capacity_refill_and_refunds(
            limits in limits(),
            window_secs in prop_oneof![Just(60u64), 1u64..60],
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let ledger = InMemoryLedger::with_window(secs(window_secs)).expect("valid window");
            let start = Instant::now() + secs(10);
            let mut clock = start;
            let mut model = Model { limits, latest: start, outstanding: Vec::new(), events: Vec::new() };

            for op in ops {
                match op {
                    Op::Reserve { requests, input, output, wait } => {
                        let c = costs(requests, input, output);
                        if let Some(at) = model.reserve(&ledger, c, clock, wait)? {
                            clock = clock.max(at);
                        }
                    }
                    Op::StepBack { nanos, requests, input, output, wait } => {
                        let now = clock.checked_sub(Duration::from_nanos(nanos)).unwrap_or(clock);
                        if let Some(at) = model.reserve(&ledger, costs(requests, input, output), now, wait)? {
                            clock = clock.max(at);
                        }
                    }
                    Op::Settle { pick, percent } => {
                        model.settle(&ledger, pick, percent, clock);
                    }
                    Op::Advance { nanos } => clock += Duration::from_nanos(nanos),
                }
                // A bucket never holds more than its capacity.
                if let Some(states) = ledger.state_at(KEY, &limits, model.latest.max(clock)) {
                    for state in states {
                        prop_assert!(state.available <= state.capacity + 1e-6, "{:?}", state);
                    }
                }
            }

            model.check_window_bound(window_secs)?;

            // Nothing lost: refund everything outstanding, wait out any debt,
            // and every bucket is exactly full again.
            for reserved in model.outstanding.drain(..) {
                ledger.settle_at(KEY, &limits, CostDelta::refund(reserved), clock);
            }
            let end = model.latest.max(clock) + secs(3_600);
            if let Some(states) = ledger.state_at(KEY, &limits, end) {
                for state in states {
                    prop_assert!((state.available - state.capacity).abs() < 1e-6, "{:?}", state);
                }
            }
        }

        /// With the clock still, the ledger is an exact account: per dimension,
        /// capacity - available = admitted - refunded + charged, where each
        /// settlement refunds at most what its reservation took.
        #[test]
        fn with_the_clock_still_every_cost_is_counted_once(
            limits in limits(),
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let ledger = InMemoryLedger::new();
            let now = Instant::now();
            let mut outstanding: Vec<Costs> = Vec::new();
            let mut net = [0i128; 3];
            for op in ops {
                match op {
                    Op::Reserve { requests, input, output, .. } | Op::StepBack { requests, input, output, .. } => {
                        let c = costs(requests, input, output);
                        if ledger.reserve_at(KEY, &limits, c, now) == Reservation::Admitted {
                            for (d, dimension) in Dimension::ALL.into_iter().enumerate() {
                                net[d] += i128::from(c.get(dimension));
                            }
                            outstanding.push(c);
                        }
                    }
                    Op::Settle { pick, percent } => {
                        if outstanding.is_empty() { continue; }
                        let reserved = outstanding.swap_remove(pick % outstanding.len());
                        let actual = costs(
                            reserved.requests * percent[0] / 100,
                            reserved.input_tokens * percent[1] / 100,
                            reserved.output_tokens * percent[2] / 100,
                        );
                        let delta = CostDelta::between(reserved, actual);
                        ledger.settle_at(KEY, &limits, delta, now);
                        for (d, dimension) in Dimension::ALL.into_iter().enumerate() {
                            net[d] += i128::from(delta.get(dimension));
                        }
                    }
                    Op::Advance { .. } => {}
                }
            }
            if let Some(states) = ledger.state_at(KEY, &limits, now) {
                for (d, state) in states.iter().enumerate() {
                    let used = state.capacity - state.available;
                    prop_assert!((used - net[d] as f64).abs() < 1e-6, "dimension {}: used {} net {}", d, used, net[d]);
                }
            }
        }
    }
}

/// Through the trait the in-memory ledger answers at once (no round trip)
/// and reads tokio's clock: the caller passes no instant.
#[tokio::test(start_paused = true)]
async fn the_trait_answers_at_once_on_tokios_clock() {
    let ledger = InMemoryLedger::new();
    let limits = Limits::new().rpm(60).itpm(100_000).otpm(20_000);
    let reserve = |ledger: &InMemoryLedger| {
        ledger
            .reserve(KEY, &limits, costs(1, 0, 0))
            .into_ready()
            .expect("answered at once")
            .expect("never fails")
    };
    for _ in 0..60 {
        assert_eq!(reserve(&ledger), Reservation::Admitted);
    }
    assert_eq!(
        reserve(&ledger),
        Reservation::Wait {
            retry_in: secs(1),
            dimension: Dimension::Requests
        }
    );
    tokio::time::advance(ms(999)).await;
    assert_eq!(
        reserve(&ledger),
        Reservation::Wait {
            retry_in: ms(1),
            dimension: Dimension::Requests
        }
    );
    tokio::time::advance(ms(1)).await;
    assert_eq!(
        ledger.reserve(KEY, &limits, costs(1, 0, 0)).await.unwrap(),
        Reservation::Admitted
    );
    ledger
        .settle(KEY, &limits, CostDelta::refund(costs(1, 0, 0)))
        .await
        .unwrap();
    let states = ledger.state(KEY, &limits).await.unwrap().expect("held");
    assert_close(states[0].available, 1.0);
}
