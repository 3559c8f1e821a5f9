//! The emulator's rate limiter against the client's ledger: one seeded
//! sequence of requests, output charges, settlements and clock advances,
//! driven through both, must get the same answers.
//!
//! The two are written apart (the limiter keeps the instant each bucket is
//! full again, in nanoseconds scaled by the limit; the ledger keeps a level
//! and its last refill, in 1/60,000,000,000 of a token), so agreement is
//! evidence that both implement the rules, not that they share a bug.
//!
//! What must agree, exactly:
//!
//! - every decision: admitted, waits, or never fits;
//! - the limit named: the one waited for longest (the first of requests,
//!   input, output on a tie), or the first that can never fit;
//! - the wait, to the nanosecond: both keep exact integer state and both
//!   round a wait up to the nanosecond, so the stated tolerance is zero.
//!
//! What differs by design, and is checked as such:
//!
//! - `remaining`: the ledger reports what is available as an `f64`, negative
//!   in debt; the limiter reports what the headers say, whole tokens rounded
//!   down and never below zero. Checked: the limiter's value is the ledger's
//!   rounded down and clamped at zero (within 1e-6 of a token for the
//!   ledger's conversion to `f64`).
//! - the reset: the ledger reports no time to full; it is derived from its
//!   level (`(capacity - available) / rate`, in `f64`) and must equal the
//!   limiter's `reset_in` within a microsecond.
//! - a bucket without a limit: the ledger reports `limit: None` and infinite
//!   `available`; the limiter reports no bucket.
//!
//! The ledger is reached through [`ClientLedger`] only, so that a change of
//! the ledger's API (an asynchronous trait, a clock of its own) is one
//! adapter to update.

use std::time::Duration;

use tokio::time::Instant;
use tower_llm_limits::budget::ledger::{
    BucketState, CostDelta, Costs, InMemoryLedger, Reservation,
};
use tower_llm_limits::budget::{Limits, OutputMode};
use tower_llm_limits::Dimension;
use tower_llm_limits_emulator::{Headroom, RateLimiter, RequestCost, Verdict};

/// The key of the one model class the sequence runs on.
const KEY: &str = "sonnet-4";

// ---------------------------------------------------------------- the client side

/// The client's ledger as the test uses it: the only place its API appears.
///
/// After the ledger's trait becomes asynchronous (or poll-based, with its own
/// clock), these three methods are what changes: await the futures (on a
/// paused tokio clock advanced to `now`), the rest of the test stays.
struct ClientLedger {
    ledger: InMemoryLedger,
}

impl ClientLedger {
    fn new(window: Option<Duration>) -> Self {
        let ledger = match window {
            Some(w) => InMemoryLedger::with_window(w).expect("a valid window"),
            None => InMemoryLedger::new(),
        };
        ClientLedger { ledger }
    }

    /// Reserves `cost` in all three dimensions, or nothing.
    fn reserve(&self, limits: &Limits, cost: RequestCost, now: Instant) -> Answer {
        let costs = Costs {
            requests: cost.requests,
            input_tokens: cost.input_tokens,
            output_tokens: cost.output_tokens,
        };
        match self.ledger.reserve_at(KEY, limits, costs, now) {
            Reservation::Admitted => Answer::Admitted,
            Reservation::Wait {
                retry_in,
                dimension,
            } => Answer::Wait {
                dimension,
                wait: retry_in,
            },
            Reservation::Never { dimension, .. } => Answer::Never { dimension },
        }
    }

    /// Charges (`tokens > 0`) or refunds (`tokens < 0`) output tokens.
    fn settle_output(&self, limits: &Limits, tokens: i64, now: Instant) {
        let delta = CostDelta {
            output_tokens: tokens,
            ..CostDelta::default()
        };
        self.ledger.settle_at(KEY, limits, delta, now);
    }

    /// The three buckets, in the order requests, input, output.
    fn state(&self, limits: &Limits, now: Instant) -> Option<[BucketState; 3]> {
        self.ledger.state_at(KEY, limits, now)
    }
}

// ---------------------------------------------------------------- the server side

/// A decision, in terms both sides can be compared in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Admitted,
    Wait {
        dimension: Dimension,
        wait: Duration,
    },
    Never {
        dimension: Dimension,
    },
}

fn server_answer(verdict: Verdict) -> Answer {
    match verdict {
        Verdict::Admitted => Answer::Admitted,
        Verdict::Wait { dimension, wait } => Answer::Wait { dimension, wait },
        Verdict::Never { dimension } => Answer::Never { dimension },
    }
}

// ---------------------------------------------------------------- the sequence

/// SplitMix64, for the sequence's draws.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// An admitted request whose output is still being produced.
struct InFlight {
    /// Output charged so far (the reservation, then what was produced beyond it).
    charged: u64,
    produced: u64,
    /// The answer's real length.
    length: u64,
}

/// How many times each kind of decision was seen, to show the sequence
/// exercised them all.
#[derive(Debug, Default)]
struct Seen {
    admitted: u64,
    waits: u64,
    nevers: u64,
    exact_boundary: u64,
    debts: u64,
    /// Waits on which more than one limit was short (the aligned runs make
    /// such waits tie, and the first limit must be named).
    several_short: u64,
}

/// One run: a model class's limits, an output mode and an enforcement window.
struct Run {
    limits: Limits,
    /// Input and `max_tokens` per request in proportion to the limits (see
    /// [`aligned`]), so that several limits tie on the longest wait.
    aligned: Option<(u64, u64)>,
    mode: OutputMode,
    window: Option<Duration>,
    server: RateLimiter<&'static str>,
    client: ClientLedger,
    now: Instant,
    in_flight: Vec<InFlight>,
    seen: Seen,
}

impl Run {
    fn new(
        limits: Limits,
        aligned: Option<(u64, u64)>,
        mode: OutputMode,
        window: Option<Duration>,
    ) -> Self {
        let server = match window {
            Some(w) => RateLimiter::with_window(w).expect("a valid window"),
            None => RateLimiter::per_minute(),
        };
        Run {
            limits,
            aligned,
            mode,
            window,
            server,
            client: ClientLedger::new(window),
            // Both sides start from the same instant, after the limiter's clock started.
            now: Instant::now(),
            in_flight: Vec::new(),
            seen: Seen::default(),
        }
    }

    fn context(&self, step: usize) -> String {
        format!(
            "step {step}, limits {:?}, aligned {:?}, {:?}, window {:?}",
            self.limits, self.aligned, self.mode, self.window
        )
    }

    /// One request of drawn costs: both sides must answer alike. Returns the
    /// answer.
    fn request(&mut self, draw: &mut Draw, step: usize) -> Answer {
        let input_limit = self.limits.input_tokens_per_minute.unwrap_or(100_000);
        let output_limit = self.limits.output_tokens_per_minute.unwrap_or(10_000);
        let (input, max_tokens) = match self.aligned {
            Some(costs) if draw.chance(90) => costs,
            // Now and then a request above a whole limit.
            _ => (
                draw.between(0, input_limit + input_limit / 20),
                draw.between(1, output_limit + output_limit / 50),
            ),
        };
        let reserved = match self.mode {
            OutputMode::Reserve => max_tokens,
            OutputMode::Realtime => 1,
        };
        let cost = RequestCost {
            requests: 1,
            input_tokens: input,
            output_tokens: reserved,
        };
        let server = server_answer(self.server.admit(KEY, &self.limits, cost, self.now));
        let client = self.client.reserve(&self.limits, cost, self.now);
        assert_eq!(server, client, "{}, cost {cost:?}", self.context(step));
        match server {
            Answer::Admitted => {
                self.seen.admitted += 1;
                self.in_flight.push(InFlight {
                    charged: reserved,
                    produced: 0,
                    length: draw.between(1, max_tokens),
                });
            }
            Answer::Wait { wait, .. } => {
                self.seen.waits += 1;
                if self.several_short(cost, wait) {
                    self.seen.several_short += 1;
                }
            }
            Answer::Never { .. } => self.seen.nevers += 1,
        }
        server
    }

    /// Whether more than one limit is short of `cost` (each would make it
    /// wait on its own).
    fn several_short(&self, cost: RequestCost, wait: Duration) -> bool {
        let Some(headroom) = self.server.headroom(&KEY, self.now) else {
            return false;
        };
        let alone = [
            (cost.requests, headroom[0]),
            (cost.input_tokens, headroom[1]),
            (cost.output_tokens, headroom[2]),
        ];
        let waiting = alone
            .iter()
            .filter(|(c, h)| h.is_some_and(|h| *c > 0 && h.remaining < *c))
            .count();
        waiting > 1 && wait > Duration::ZERO
    }

    /// Some output of one answer in flight: charged as produced (realtime),
    /// or settled to the truth when the answer ends (both modes).
    fn produce(&mut self, draw: &mut Draw) {
        if self.in_flight.is_empty() {
            return;
        }
        let i = usize::try_from(draw.next() % self.in_flight.len() as u64).unwrap_or(0);
        let answer = &mut self.in_flight[i];
        let chunk = draw.between(1, 400).min(answer.length - answer.produced);
        answer.produced += chunk;
        let mut change: i64 = 0;
        if self.mode == OutputMode::Realtime && answer.produced > answer.charged {
            change = (answer.produced - answer.charged) as i64;
            answer.charged = answer.produced;
        }
        // The answer ends at its length, or is dropped by the client early.
        let ends = answer.produced == answer.length || draw.chance(3);
        if ends {
            change += answer.produced as i64 - answer.charged as i64;
            answer.charged = answer.produced;
            self.in_flight.swap_remove(i);
        }
        self.apply_output(change);
    }

    fn apply_output(&mut self, change: i64) {
        let tokens = change.unsigned_abs();
        if change > 0 {
            self.server
                .charge(&KEY, Dimension::OutputTokens, tokens, self.now);
        } else if change < 0 {
            self.server
                .refund(&KEY, Dimension::OutputTokens, tokens, self.now);
        }
        if change != 0 {
            self.client.settle_output(&self.limits, change, self.now);
        }
    }

    /// Both sides report the same buckets, with the differences by design
    /// (see the module docs).
    fn compare_headroom(&mut self, step: usize) {
        let server = self.server.headroom(&KEY, self.now);
        let client = self.client.state(&self.limits, self.now);
        let (Some(server), Some(client)) = (server, client) else {
            assert_eq!(server.is_some(), client.is_some(), "{}", self.context(step));
            return;
        };
        for (dimension, (s, c)) in Dimension::ALL
            .into_iter()
            .zip(server.into_iter().zip(client))
        {
            let context = format!("{}, {dimension:?}", self.context(step));
            if s.is_some() && c.available < 0.0 {
                self.seen.debts += 1;
            }
            compare_bucket(s, &c, &context);
        }
    }
}

fn compare_bucket(server: Option<Headroom>, client: &BucketState, context: &str) {
    let Some(server) = server else {
        assert_eq!(client.limit, None, "{context}");
        assert!(client.available.is_infinite(), "{context}");
        return;
    };
    assert_eq!(client.limit, Some(server.limit), "{context}");
    // Whole tokens rounded down, never below zero.
    let available = client.available.max(0.0);
    let remaining = server.remaining as f64;
    assert!(
        remaining <= available + 1e-6 && available < remaining + 1.0 + 1e-6,
        "{context}: limiter {server:?}, ledger {client:?}"
    );
    // Time to full, from the ledger's level.
    if server.limit > 0 {
        let missing = client.capacity - client.available;
        let to_full = (missing * 60.0 / server.limit as f64).max(0.0);
        let reset = server.reset_in.as_secs_f64();
        assert!(
            (reset - to_full).abs() < 1e-6,
            "{context}: limiter reset {reset} s, ledger {to_full} s"
        );
    }
}

/// Drives `steps` steps of a seeded sequence through both sides.
fn drive(
    seed: u64,
    (limits, aligned): (Limits, Option<(u64, u64)>),
    mode: OutputMode,
    window: Option<Duration>,
) -> Seen {
    let mut draw = Draw(seed);
    let mut run = Run::new(limits, aligned, mode, window);
    let mut last_wait: Option<Duration> = None;
    for step in 0..3_000 {
        match draw.next() % 10 {
            // Advance the clock: not at all, a little, up to seconds, or
            // exactly to the wait just announced (the boundary: both must
            // admit there if nothing was charged meanwhile).
            0 => {}
            1 => run.now += Duration::from_nanos(draw.between(1, 1_000)),
            2 | 3 => run.now += Duration::from_millis(draw.between(1, 3_000)),
            4 => {
                if let Some(wait) = last_wait.take() {
                    run.now += wait;
                    run.seen.exact_boundary += 1;
                }
            }
            5 | 6 => run.produce(&mut draw),
            _ => {}
        }
        let answer = run.request(&mut draw, step);
        last_wait = match answer {
            Answer::Wait { wait, .. } => Some(wait),
            _ => None,
        };
        run.compare_headroom(step);
    }
    run.seen
}

/// Drawn limits: each dimension limited, sometimes with a limit that does
/// not divide a minute evenly, sometimes not limited at all; one run in four
/// [`aligned`].
fn limits(draw: &mut Draw) -> (Limits, Option<(u64, u64)>) {
    if draw.chance(25) {
        return aligned(draw);
    }
    let mut limit = |lo: u64, hi: u64| (!draw.chance(10)).then(|| draw.between(lo, hi));
    let limits = Limits {
        requests_per_minute: limit(1, 120),
        input_tokens_per_minute: limit(1_000, 60_000),
        output_tokens_per_minute: limit(100, 16_000),
    };
    (limits, None)
}

/// Limits in proportion (`k` input and `m` output tokens per request), and
/// requests costing `k` input tokens and `m` as `max_tokens`: every bucket
/// then drains and refills in step, the waits tie, and the first limit in
/// the order requests, input, output must be named.
fn aligned(draw: &mut Draw) -> (Limits, Option<(u64, u64)>) {
    let rpm = draw.between(1, 60);
    let k = draw.between(100, 1_000);
    let m = draw.between(10, 200);
    (
        Limits::new().rpm(rpm).itpm(rpm * k).otpm(rpm * m),
        Some((k, m)),
    )
}

#[test]
fn the_limiter_and_the_ledger_agree_on_every_decision_and_wait() {
    let windows = [
        None,
        Some(Duration::from_secs(1)),
        Some(Duration::from_millis(7_300)),
    ];
    let mut total = Seen::default();
    for seed in 0..8u64 {
        let mut draw = Draw(seed.wrapping_mul(0x5851_F42D_4C95_7F2D));
        for mode in [OutputMode::Reserve, OutputMode::Realtime] {
            for window in windows {
                let limits = limits(&mut draw);
                let seen = drive(draw.next(), limits, mode, window);
                total.admitted += seen.admitted;
                total.waits += seen.waits;
                total.nevers += seen.nevers;
                total.exact_boundary += seen.exact_boundary;
                total.debts += seen.debts;
                total.several_short += seen.several_short;
            }
        }
    }
    // The sequences exercised every kind of answer, the boundary, and debts.
    assert!(total.admitted > 10_000, "{total:?}");
    assert!(total.waits > 10_000, "{total:?}");
    assert!(total.nevers > 100, "{total:?}");
    assert!(total.exact_boundary > 1_000, "{total:?}");
    assert!(total.debts > 100, "{total:?}");
    assert!(total.several_short > 1_000, "{total:?}");
}

#[test]
fn the_ledger_adapter_sees_the_documented_example() {
    // The adapter itself, on the ledger's documented example: 20,000 input
    // tokens of 30,000, then a second request waits 20 s on input.
    let client = ClientLedger::new(None);
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let now = Instant::now();
    let cost = RequestCost {
        requests: 1,
        input_tokens: 20_000,
        output_tokens: 1_000,
    };
    assert_eq!(client.reserve(&limits, cost, now), Answer::Admitted);
    assert_eq!(
        client.reserve(&limits, cost, now),
        Answer::Wait {
            dimension: Dimension::InputTokens,
            wait: Duration::from_secs(20)
        }
    );
    client.settle_output(&limits, -1_000, now);
    let output = client.state(&limits, now).unwrap()[2];
    assert_eq!(output.available, 8_000.0);
}
