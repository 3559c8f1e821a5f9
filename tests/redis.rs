//! RedisLedger against a real redis-server: the same decisions as the
//! in-memory ledger, one budget for several processes, the cross-process
//! claim, and faults (a killed, slow or flushed Redis, deleted keys).
//!
//! Needs `REDIS_URL` (a server on loopback; `.ci/run` starts one, and runs
//! these tests again against Valkey). Without it the tests print a notice
//! and pass, except under `CI=true`, where they fail. The fault tests start
//! their own server (`REDIS_SERVER`, else `redis-server` on `PATH`; the
//! Cluster test also `REDIS_CLI`, else `redis-cli`) on a free loopback port,
//! so that killing it disturbs no other test.
//!
//! Redis reads its own clock (`TIME`), which tokio cannot pause: the few
//! waits here are real and short (at most about a second).
#![cfg(feature = "redis")]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower_llm_limits::budget::ledger::{
    CostDelta, Costs, InMemoryLedger, Ledger, LinePlace, OutputSample, PrefixIntent, Reservation,
    LINE_RECHECK, PREFIX_WRITING_WAIT, WRITER_GRACE,
};
use tower_llm_limits::budget::redis::{FaultPolicy, RedisLedger, RedisLedgerError};
use tower_llm_limits::budget::Limits;
use tower_llm_limits::headers::LimitStatus;
use tower_llm_limits::Dimension;

/// The server under test, or `None` (with a notice) outside CI.
fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "REDIS_URL is not set: with CI=true the Redis tests must run"
            );
            // Straight to stderr: the test harness does not capture it, so
            // the notice shows in a passing run.
            static NOTICE: std::sync::Once = std::sync::Once::new();
            NOTICE.call_once(|| {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "NOTICE tests/redis.rs: REDIS_URL is not set, the Redis ledger tests are skipped \
                     (start a redis-server on loopback and set REDIS_URL=redis://127.0.0.1:PORT/)"
                );
            });
            None
        }
    }
}

/// The server the fault and Cluster tests start: `REDIS_SERVER` (a path to
/// `valkey-server`, say), else `redis-server` on `PATH`.
fn server_binary() -> String {
    std::env::var("REDIS_SERVER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "redis-server".into())
}

/// The command-line client for the Cluster test: `REDIS_CLI`, else
/// `redis-cli` on `PATH`.
fn cli_binary() -> String {
    std::env::var("REDIS_CLI")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "redis-cli".into())
}

/// A prefix no other test (or earlier run) uses.
fn unique_prefix(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "tll-test-{name}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn costs(requests: u64, input_tokens: u64, output_tokens: u64) -> Costs {
    Costs {
        requests,
        input_tokens,
        output_tokens,
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind loopback");
    listener.local_addr().expect("local addr").port()
}

/// A redis-server of the test's own, stopped (by its pid) when dropped.
struct OwnServer {
    port: u16,
    child: Option<Child>,
}

impl OwnServer {
    async fn start() -> Self {
        let mut server = OwnServer {
            port: free_port(),
            child: None,
        };
        server.restart().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn restart(&mut self) {
        let child = Command::new(server_binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        self.child = Some(child);
        for _ in 0..200 {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).expect("url");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

// ---------------------------------------------------------------------------
// Differential: the same operations give the same answers as InMemoryLedger.

#[derive(Debug, Clone)]
enum Op {
    Reserve(Costs),
    /// A reservation that must leave this many input tokens free.
    ReserveKeeping(Costs, u64),
    Settle(CostDelta),
    Sync(Dimension, LimitStatus),
    /// A sync whose `remaining` is `offset` tokens from the in-memory
    /// ledger's level (rounded to the thousand if `rounded`): where the
    /// rounding tolerance decides.
    SyncNear(Dimension, i64, bool),
}

fn dimension() -> impl Strategy<Value = Dimension> {
    prop_oneof![
        Just(Dimension::Requests),
        Just(Dimension::InputTokens),
        Just(Dimension::OutputTokens)
    ]
}

fn op(limit: u64) -> impl Strategy<Value = Op> {
    let amount = 0..=limit + limit / 4;
    prop_oneof![
        4 => (0..=2u64, amount.clone(), amount.clone())
            .prop_map(|(r, i, o)| Op::Reserve(costs(r, i, o))),
        2 => (0..=2u64, amount.clone(), amount.clone(), 0..=limit / 10)
            .prop_map(|(r, i, o, h)| Op::ReserveKeeping(costs(r, i, o), h)),
        2 => (-3..=3i64, -(limit as i64)..=limit as i64, -(limit as i64)..=limit as i64)
            .prop_map(|(r, i, o)| Op::Settle(CostDelta { requests: r, input_tokens: i, output_tokens: o })),
        1 => (
            dimension(),
            prop::option::of(prop_oneof![Just(0u64), 1..=2 * limit]),
            prop::option::of(prop_oneof![(0..=limit / 1_000).prop_map(|k| k * 1_000), 0..=limit]),
            prop::option::of((0..=60_000u64).prop_map(Duration::from_millis)),
        )
            .prop_map(|(d, limit, remaining, reset_in)| Op::Sync(d, LimitStatus { limit, remaining, reset_in })),
        2 => (dimension(), -1_500..=1_500i64, any::<bool>()).prop_map(|(d, o, r)| Op::SyncNear(d, o, r)),
    ]
}

fn case() -> impl Strategy<Value = (Limits, bool, Vec<Op>)> {
    (1_000u64..=200_000).prop_flat_map(|limit| {
        (
            (
                prop::option::of(1..=20u64),
                prop::option::of(limit / 2..=limit),
                prop::option::of(limit / 4..=limit),
            )
                .prop_map(|(r, i, o)| Limits {
                    requests_per_minute: r,
                    input_tokens_per_minute: i,
                    output_tokens_per_minute: o,
                }),
            any::<bool>(),
            prop::collection::vec(op(limit), 1..24),
        )
    })
}

fn same_answer(redis: Reservation, memory: Reservation) -> bool {
    match (redis, memory) {
        (
            Reservation::Wait {
                retry_in: a,
                dimension: da,
            },
            Reservation::Wait {
                retry_in: b,
                dimension: db,
            },
        ) => {
            // Redis rounds the wait up to the microsecond, the in-memory
            // ledger to the nanosecond.
            da == db && a >= b && a - b < Duration::from_micros(1)
        }
        (a, b) => a == b,
    }
}

async fn differential(url: &str, limits: Limits, short_window: bool, ops: Vec<Op>) {
    let window = if short_window {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(60)
    };
    let redis = RedisLedger::builder(url)
        .prefix(unique_prefix("diff"))
        .window(window)
        .timeout(Duration::from_secs(2))
        .fault_policy(FaultPolicy::FailClosed)
        .connect()
        .await
        .expect("connect");
    let memory = InMemoryLedger::with_window(window).expect("window");
    let origin = Instant::now();
    let mut first: Option<Duration> = None;
    let mut at = |redis_time: Duration| {
        let first = *first.get_or_insert(redis_time);
        origin + redis_time.saturating_sub(first)
    };
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Reserve(c) => {
                let (answer, time) = redis.reserve_timed("k", &limits, c).await.expect("reserve");
                let expected = memory.reserve_at("k", &limits, c, at(time.expect("redis time")));
                assert!(
                    same_answer(answer, expected),
                    "step {step}: reserve {c:?}: redis {answer:?}, in memory {expected:?}"
                );
            }
            Op::ReserveKeeping(c, h) => {
                // In memory: the budget's way without the operation,
                // `costs + headroom`, the headroom given back once admitted.
                let headroom = costs(0, h, 0);
                let (answer, time) = redis
                    .reserve_with_headroom_timed("k", &limits, c, headroom)
                    .await
                    .expect("reserve");
                let now = at(time.expect("redis time"));
                let with = costs(c.requests, c.input_tokens + h, c.output_tokens);
                let with = if c.input_tokens == 0 { c } else { with };
                let expected = memory.reserve_at("k", &limits, with, now);
                if expected == Reservation::Admitted && c.input_tokens > 0 {
                    memory.settle_at("k", &limits, CostDelta::refund(headroom), now);
                }
                assert!(
                    same_answer(answer, expected),
                    "step {step}: reserve {c:?} keeping {h}: redis {answer:?}, in memory {expected:?}"
                );
            }
            Op::Settle(delta) => {
                redis.settle("k", &limits, delta).await.expect("settle");
                if let Some(time) = redis.flush().await.expect("flush") {
                    memory.settle_at("k", &limits, delta, at(time));
                } else {
                    assert!(delta.is_zero(), "step {step}: a settlement was not sent");
                }
            }
            Op::SyncNear(d, offset, rounded) => {
                let Some(state) = memory.state_at("k", &limits, Instant::now()) else {
                    continue;
                };
                let level = state[d as usize].available;
                if !level.is_finite() {
                    continue;
                }
                let near = (level as i64 + offset).max(0) as u64;
                let remaining = if rounded {
                    (near + 500) / 1_000 * 1_000
                } else {
                    near
                };
                let status = LimitStatus {
                    limit: None,
                    remaining: Some(remaining),
                    reset_in: None,
                };
                redis.sync("k", &limits, d, status).await.expect("sync");
                let time = redis.flush().await.expect("flush").expect("sync sent");
                memory.sync_at("k", &limits, d, status, at(time));
            }
            Op::Sync(d, status) => {
                redis.sync("k", &limits, d, status).await.expect("sync");
                let time = redis.flush().await.expect("flush").expect("sync sent");
                memory.sync_at("k", &limits, d, status, at(time));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn same_decisions_and_waits_as_the_in_memory_ledger((limits, short, ops) in case()) {
        let Some(url) = redis_url() else { return Ok(()) };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(differential(&url, limits, short, ops));
    }
}

// ---------------------------------------------------------------------------
// One budget for the fleet.

#[tokio::test]
async fn processes_share_one_budget_and_learned_limits() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("fleet");
    let a = RedisLedger::builder(&url)
        .prefix(&prefix)
        .connect()
        .await
        .expect("a");
    let b = RedisLedger::builder(&url)
        .prefix(&prefix)
        .connect()
        .await
        .expect("b");
    let limits = Limits::new().rpm(2);
    let one = costs(1, 0, 0);
    assert_eq!(
        a.reserve("k", &limits, one).await.expect("a1"),
        Reservation::Admitted
    );
    assert_eq!(
        b.reserve("k", &limits, one).await.expect("b1"),
        Reservation::Admitted
    );
    let third = a.reserve("k", &limits, one).await.expect("a2");
    assert!(
        matches!(third, Reservation::Wait { dimension: Dimension::Requests, retry_in } if retry_in > Duration::from_secs(29)),
        "two processes share 2 RPM: {third:?}"
    );

    // A limit learned by one process paces the other.
    let unknown = Limits::new();
    let status = LimitStatus {
        limit: Some(10_000),
        remaining: Some(1_000),
        reset_in: None,
    };
    a.sync("learned", &unknown, Dimension::InputTokens, status)
        .await
        .expect("sync");
    a.flush().await.expect("flush");
    let big = costs(0, 5_000, 0);
    let answer = b.reserve("learned", &unknown, big).await.expect("b");
    assert!(
        matches!(
            answer,
            Reservation::Wait {
                dimension: Dimension::InputTokens,
                ..
            }
        ),
        "the learned limit and the server's remaining are shared: {answer:?}"
    );
    let state = b
        .state("learned", &unknown)
        .await
        .expect("state")
        .expect("known");
    assert_eq!(state[1].limit, Some(10_000));
    assert!(state[1].learned);
    assert!(state[1].available < 1_100.0, "{:?}", state[1]);
}

/// An answer's output told to one process's ledger reaches the others with
/// their next call on the key (a process that joins later gets the key's
/// recent samples at its first), never comes back to the process that told
/// it, and costs no call of its own: it rides on the settlement's batch.
#[tokio::test]
async fn processes_share_the_outputs_their_answers_reported() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("outputs");
    let connect = || async {
        RedisLedger::builder(&url)
            .prefix(&prefix)
            .connect()
            .await
            .expect("connect")
    };
    let (a, b) = (connect().await, connect().await);
    let limits = Limits::new().rpm(1_000).otpm(100_000);
    let sample = |output_tokens| OutputSample {
        output_tokens,
        max_tokens: 4_096,
    };
    let learned = |ledger: &RedisLedger, after| {
        let mut into = Vec::new();
        let next = ledger.outputs_learned("k", after, &mut into);
        (into, next)
    };
    for ledger in [&a, &b] {
        let answer = ledger.reserve("k", &limits, costs(1, 0, 4_096)).await;
        assert_eq!(answer.expect("reserve"), Reservation::Admitted);
    }
    for output in [100, 120, 140] {
        a.output_learned("k", sample(output));
    }
    let delta = CostDelta {
        output_tokens: -3_996,
        ..CostDelta::default()
    };
    a.settle("k", &limits, delta).await.expect("settle");
    a.flush().await.expect("flush");
    assert_eq!(a.stats().calls, 2, "one reservation, one batch");
    assert_eq!(learned(&a, 0).0, vec![], "its own samples stay out");
    assert_eq!(learned(&b, 0).0, vec![], "not before b's next call");

    let answer = b.reserve("k", &limits, costs(1, 0, 100)).await;
    assert_eq!(answer.expect("reserve"), Reservation::Admitted);
    let (seen, next) = learned(&b, 0);
    assert_eq!(seen, vec![sample(100), sample(120), sample(140)]);
    assert_eq!(learned(&b, next).0, vec![], "read once");

    // A process that joins later gets them at its first call.
    let c = connect().await;
    let answer = c.reserve("k", &limits, costs(1, 0, 100)).await;
    assert_eq!(answer.expect("reserve"), Reservation::Admitted);
    assert_eq!(learned(&c, 0).0.len(), 3);

    // And b's answers reach a.
    b.output_learned("k", sample(90));
    b.settle("k", &limits, delta).await.expect("settle");
    b.flush().await.expect("flush");
    let answer = a.reserve("k", &limits, costs(1, 0, 100)).await;
    assert_eq!(answer.expect("reserve"), Reservation::Admitted);
    assert_eq!(learned(&a, 0).0, vec![sample(90)]);
}

#[tokio::test]
async fn a_response_costs_at_most_two_calls() {
    let Some(url) = redis_url() else { return };
    let ledger = RedisLedger::builder(&url)
        .prefix(unique_prefix("calls"))
        .connect()
        .await
        .expect("connect");
    let limits = Limits::new().rpm(1_000).itpm(1_000_000).otpm(100_000);
    for _ in 0..10 {
        let c = costs(1, 1_000, 500);
        assert_eq!(
            ledger.reserve("k", &limits, c).await.expect("reserve"),
            Reservation::Admitted
        );
        // What the layer does with a response: three syncs, then a settlement.
        for d in Dimension::ALL {
            let status = LimitStatus {
                limit: None,
                remaining: Some(900_000),
                reset_in: None,
            };
            ledger.sync("k", &limits, d, status).await.expect("sync");
        }
        let delta = CostDelta {
            input_tokens: 20,
            output_tokens: -300,
            ..CostDelta::default()
        };
        ledger.settle("k", &limits, delta).await.expect("settle");
        ledger.flush().await.expect("flush");
    }
    let stats = ledger.stats();
    assert_eq!(stats.reserves, 10);
    assert_eq!(
        stats.calls, 20,
        "one reservation and one batch of writes per request"
    );
}

/// A response whose head carries the rate-limit headers and whose body
/// (the usage) ends `body_after` later, as a streamed answer does.
fn slow_body_upstream(body_after: Duration) -> SlowUpstream {
    tower::util::BoxCloneService::new(tower::service_fn(move |_req| async move {
        let body = r#"{"type":"message","usage":{"input_tokens":12,"output_tokens":30}}"#;
        let frames: SlowFrames = Box::pin(futures_util::stream::once(async move {
            tokio::time::sleep(body_after).await;
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(body)))
        }));
        let response = http::Response::builder()
            .header("content-type", "application/json")
            .header("anthropic-ratelimit-requests-limit", "1000")
            .header("anthropic-ratelimit-requests-remaining", "900")
            .header("anthropic-ratelimit-input-tokens-limit", "1000000")
            .header("anthropic-ratelimit-input-tokens-remaining", "500000")
            .header("anthropic-ratelimit-output-tokens-limit", "100000")
            .header("anthropic-ratelimit-output-tokens-remaining", "99000")
            .body(http_body_util::StreamBody::new(frames))
            .expect("response");
        Ok::<_, std::convert::Infallible>(response)
    }))
}

type SlowUpstream = tower::util::BoxCloneService<
    http::Request<tower_llm_limits::body::ReplayBody<http_body_util::Full<bytes::Bytes>>>,
    http::Response<http_body_util::StreamBody<SlowFrames>>,
    std::convert::Infallible,
>;

type SlowFrames = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
            > + Send,
    >,
>;

/// Through the budget layer (with the preset's input headroom), a request
/// admitted at its first ask costs at most two Redis calls: the
/// reservation (which checks the headroom itself), and one batch with the
/// header sync and the usage settlement, although the body ends long after
/// the head. The sync is applied: the ledger follows the server's
/// `remaining`.
#[tokio::test]
async fn a_request_through_the_budget_costs_at_most_two_calls_with_its_sync() {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};
    use tower_llm_limits::budget::TokenBudgetLayer;
    let Some(url) = redis_url() else { return };
    let ledger = RedisLedger::builder(&url)
        .prefix(unique_prefix("layer-calls"))
        .connect()
        .await
        .expect("connect");
    let limits = Limits::new().rpm(1_000).itpm(1_000_000).otpm(100_000);
    let layer = TokenBudgetLayer::builder()
        .limits(limits)
        .input_headroom(0.02)
        .ledger(Arc::new(ledger.clone()))
        .build();
    // The body ends 30 ms after the head: far past the 2 ms write delay.
    let svc = layer.layer(slow_body_upstream(Duration::from_millis(30)));
    const REQUESTS: u64 = 8;
    for i in 0..REQUESTS {
        let response = svc.clone().oneshot(message(None)).await.expect("sent");
        assert_eq!(response.status(), 200, "request {i}");
        let _ = response.into_body().collect().await.expect("body");
        // The batch's own delay (2 ms), so it goes before the next request
        // could carry it.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ledger.flush().await.expect("flush");
    let stats = ledger.stats();
    assert_eq!(stats.reserves, REQUESTS, "{stats:?}");
    assert_eq!(stats.failures, 0, "{stats:?}");
    assert!(
        stats.calls <= 2 * REQUESTS,
        "at most 2 calls per request, header sync included: {stats:?}"
    );
    // The budget's key is the model class.
    let state = ledger
        .state("haiku-4-5", &limits)
        .await
        .expect("state")
        .expect("the key is known");
    assert!(
        state[1].available < 600_000.0,
        "the input bucket follows the server's remaining: {:?}",
        state[1]
    );
}

/// A response's header sync does not wait for its body's end, nor cost a
/// call of its own: the key's next call carries it, here a reservation
/// made while the first answer still streams, and the shared bucket
/// follows the server's `remaining` from then on. (Held until the body
/// ended, the server's view came late: seconds of refill later, lowering
/// the bucket to an old `remaining` threw that refill away.)
#[tokio::test]
async fn a_header_sync_rides_on_the_next_call_before_the_body_ends() {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};
    use tower_llm_limits::budget::TokenBudgetLayer;
    let Some(url) = redis_url() else { return };
    let ledger = RedisLedger::builder(&url)
        .prefix(unique_prefix("sync-rides"))
        .connect()
        .await
        .expect("connect");
    let limits = Limits::new().rpm(1_000).itpm(1_000_000).otpm(100_000);
    let layer = TokenBudgetLayer::builder()
        .limits(limits)
        .ledger(Arc::new(ledger.clone()))
        .build();
    let svc = layer.layer(slow_body_upstream(Duration::from_millis(600)));
    let first = svc.clone().oneshot(message(None)).await.expect("sent");
    // Past the write delay: nothing was flushed for the head's sync.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ledger.stats().calls, 1, "{:?}", ledger.stats());
    let second = svc.clone().oneshot(message(None)).await.expect("sent");
    assert_eq!(
        ledger.stats().calls,
        2,
        "the sync rode on the reservation: {:?}",
        ledger.stats()
    );
    let state = ledger
        .state("haiku-4-5", &limits)
        .await
        .expect("state")
        .expect("the key is known");
    assert!(
        state[1].available < 600_000.0,
        "the server's remaining (500,000) is in the bucket while the first body streams: {:?}",
        state[1]
    );
    let _ = first.into_body().collect().await.expect("body");
    let _ = second.into_body().collect().await.expect("body");
    ledger.flush().await.expect("flush");
    let stats = ledger.stats();
    assert_eq!(stats.failures, 0, "{stats:?}");
    // Two reservations, one state read, and the settlements' batch(es).
    assert!(stats.calls <= 5, "{stats:?}");
}

// ---------------------------------------------------------------------------
// The fleet's prompt cache.

/// A request whose system prompt (about 3,000 tokens) ends at a
/// `cache_control` breakpoint, then a short question; without `prefix`, the
/// question alone.
fn cached_prompt_message(
    prefix: bool,
    question: &str,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let system = "Answer as the reference manual of the tower-llm-limits crate would. ".repeat(230);
    let body = match prefix {
        true => serde_json::json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 100,
            "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": question}],
        }),
        false => serde_json::json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": question}],
        }),
    };
    http::Request::post("/v1/messages")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .expect("request")
}

/// The server's answers to the sequence below: the first request writes
/// the prefix, the second has none, the third reads it.
fn caching_upstream() -> Upstream {
    let calls = Arc::new(AtomicU64::new(0));
    tower::util::BoxCloneService::new(tower::service_fn(move |_req| {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let (write, read) = match call {
                0 => (3_000, 0),
                1 => (0, 0),
                _ => (0, 3_000),
            };
            let body = format!(
                r#"{{"type":"message","usage":{{"input_tokens":12,"cache_creation_input_tokens":{write},"cache_read_input_tokens":{read},"output_tokens":30}}}}"#
            );
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from(body),
            )))
        }
    }))
}

/// Two processes with the budget's default estimator: the input tokens
/// reserved by three requests sent in turn, each after the previous one's
/// settlement reached Redis: process A's with the prefix, then process B's
/// without it (B's first call on the key), then B's with it.
async fn reserved_by_two_processes(url: &str, share: bool) -> Vec<u64> {
    use http_body_util::BodyExt;
    use std::sync::Mutex;
    use tower::{Layer, ServiceExt};
    use tower_llm_limits::budget::TokenBudgetLayer;
    let prefix = unique_prefix("prompt-cache");
    let limits = Limits::new().rpm(1_000).itpm(1_000_000).otpm(100_000);
    let reserved = Arc::new(Mutex::new(Vec::new()));
    let upstream = caching_upstream();
    let mut processes = Vec::new();
    for _ in 0..2 {
        let ledger = RedisLedger::builder(url)
            .prefix(&prefix)
            .share_prompt_cache(share)
            .connect()
            .await
            .expect("connect");
        let seen = Arc::clone(&reserved);
        let layer = TokenBudgetLayer::builder()
            .limits(limits)
            .ledger(Arc::new(ledger.clone()))
            .on_settle(move |e| seen.lock().expect("lock").push(e.reserved_input_tokens))
            .build();
        processes.push((ledger, layer.layer(upstream.clone())));
    }
    let sequence = [
        (0, true, "What is a ledger?"),
        (1, false, "What is a claim?"),
        (1, true, "What is a window?"),
    ];
    for (process, prefix, question) in sequence {
        let (ledger, svc) = &processes[process];
        let response = svc
            .clone()
            .oneshot(cached_prompt_message(prefix, question))
            .await
            .expect("sent");
        assert_eq!(response.status(), 200);
        let _ = response.into_body().collect().await.expect("body");
        ledger.flush().await.expect("flush");
    }
    let reserved = reserved.lock().expect("lock").clone();
    assert_eq!(reserved.len(), sequence.len());
    // The markers ride on the calls a request makes anyway: a reservation
    // and one batch (its settlement) each.
    let calls: u64 = processes.iter().map(|(l, _)| l.stats().calls).sum();
    assert_eq!(calls, 2 * sequence.len() as u64, "{calls} calls");
    reserved
}

/// With `share_prompt_cache`, a prefix that process A's response confirmed
/// cached is charged as a read by process B, from B's next call on the key
/// on; without it, B charges the whole prompt again (the input the server
/// will not count holds back B's other requests until settlement).
#[tokio::test]
async fn a_prefix_another_process_cached_is_charged_as_a_read() {
    let Some(url) = redis_url() else { return };
    let shared = reserved_by_two_processes(&url, true).await;
    let alone = reserved_by_two_processes(&url, false).await;
    // The whole prompt, about 3,000 tokens, the first time, in either case.
    assert!(shared[0] > 2_000, "{shared:?}");
    assert!(alone[0] > 2_000, "{alone:?}");
    // B's request without the prefix was B's first call on the key: its
    // answer brought A's marker.
    assert!(
        shared[2] * 10 < shared[0],
        "charged as a read with the shared cache: {shared:?}"
    );
    assert!(
        alone[2] * 10 > alone[0] * 9,
        "charged in full by a process of its own: {alone:?}"
    );
}

// ---------------------------------------------------------------------------
// Large requests across processes: the claim.

#[tokio::test]
async fn a_large_request_is_not_starved_by_other_processes() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("claim");
    let connect = || {
        RedisLedger::builder(&url)
            .prefix(&prefix)
            .claim_grace(Duration::from_millis(500))
            .connect()
    };
    let large = connect().await.expect("large");
    let small = connect().await.expect("small");
    // 600,000 ITPM refills 10 tokens per millisecond.
    let limits = Limits::new().itpm(600_000);
    assert_eq!(
        small
            .reserve("k", &limits, costs(0, 600_000, 0))
            .await
            .expect("drain"),
        Reservation::Admitted
    );

    // The large request (3,000 tokens, about 300 ms of refill) is refused
    // and claims the key.
    let big = costs(0, 3_000, 0);
    // Counted from before the question: Redis's "now" is later, so the
    // refill cannot pass the large request's cost before `deadline`.
    let asked = tokio::time::Instant::now();
    let Reservation::Wait { retry_in, .. } = large.reserve("k", &limits, big).await.expect("large")
    else {
        panic!("the bucket is empty");
    };
    assert!(retry_in > Duration::from_millis(100), "{retry_in:?}");

    // Meanwhile the other process keeps asking for 50 tokens every 5 ms:
    // without the claim it would take the refill as it comes.
    let deadline = asked + retry_in;
    let mut admitted_small = 0;
    while tokio::time::Instant::now() < deadline {
        if small
            .reserve("k", &limits, costs(0, 50, 0))
            .await
            .expect("small")
            == Reservation::Admitted
        {
            admitted_small += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        admitted_small, 0,
        "the claim holds the refill for the large request"
    );
    let mut admitted = false;
    for _ in 0..5 {
        match large.reserve("k", &limits, big).await.expect("large again") {
            Reservation::Admitted => {
                admitted = true;
                break;
            }
            Reservation::Wait { retry_in, .. } => {
                assert!(
                    retry_in < Duration::from_millis(250),
                    "the refill was held: {retry_in:?}"
                );
                tokio::time::sleep(retry_in).await;
            }
            never => panic!("{never:?}"),
        }
    }
    assert!(
        admitted,
        "the large request is admitted once its wait is over"
    );
    // Its admission clears the claim: the small requests go on.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        small
            .reserve("k", &limits, costs(0, 50, 0))
            .await
            .expect("small"),
        Reservation::Admitted
    );
}

/// The fleet's line (`Ledger::reserve_in_line`) in Redis: another
/// process's requests pass a waiting head only beside its costs or within
/// the head-of-line bound (2 s of refill in all), its own process's are not
/// held, and its admission ends its ticket (the in-memory ledger's rule,
/// tested there on a paused clock).
#[tokio::test]
async fn the_fleets_line_holds_the_refill_for_the_oldest_head() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("line");
    let connect = || RedisLedger::builder(&url).prefix(&prefix).connect();
    let one = connect().await.expect("one");
    let two = connect().await.expect("two");
    let place = |owner, request, head| LinePlace {
        owner,
        head,
        request,
        waited: Duration::ZERO,
    };
    let none = Costs::default();
    // 6,000,000 ITPM: 100 tokens per millisecond; 2 s is 200,000 tokens.
    let limits = Limits::new().itpm(6_000_000);
    let ask = |ledger: &RedisLedger, tokens, place| {
        let fut = ledger
            .reserve_in_line("k", &limits, costs(0, tokens, 0), none, place)
            .expect("a redis ledger keeps the line");
        async move { fut.await.expect("reserve") }
    };
    // Process one leaves about 250,000 tokens; its head needs 400,000
    // (about 1.5 s).
    assert_eq!(
        ask(&one, 5_750_000, place(1, 1, true)).await,
        Reservation::Admitted
    );
    let asked = Instant::now();
    let Reservation::Wait { retry_in, .. } = ask(&one, 400_000, place(1, 2, true)).await else {
        panic!("the head waits");
    };
    assert!(retry_in > Duration::from_millis(1_000), "{retry_in:?}");
    // Process two's 250,000 would fit alone, but would delay it 2.5 s. It
    // would fit after the head in about 4 s, but asks again 20 ms after the
    // head's due: nothing wakes it when the head goes.
    let head_due = retry_in;
    let Reservation::Wait { retry_in, .. } = ask(&two, 250_000, place(2, 10, true)).await else {
        panic!("held for the head");
    };
    assert!(
        retry_in <= head_due + LINE_RECHECK && retry_in + Duration::from_millis(200) >= head_due,
        "{retry_in:?} against the head's {head_due:?}"
    );
    // Two of 90,000 delay it 0.9 s each: within the bound; a third is not.
    assert_eq!(
        ask(&two, 90_000, place(2, 11, false)).await,
        Reservation::Admitted
    );
    assert_eq!(
        ask(&two, 90_000, place(2, 12, false)).await,
        Reservation::Admitted
    );
    assert!(matches!(
        ask(&two, 30_000, place(2, 13, false)).await,
        Reservation::Wait { .. }
    ));
    // Its own process's requests are not held by its ticket.
    assert_eq!(
        ask(&one, 10_000, place(1, 3, false)).await,
        Reservation::Admitted
    );
    // The head is admitted once the refill covers it.
    let mut admitted = false;
    for _ in 0..20 {
        match ask(&one, 400_000, place(1, 2, true)).await {
            Reservation::Admitted => {
                admitted = true;
                break;
            }
            Reservation::Wait { retry_in, .. } => tokio::time::sleep(retry_in).await,
            never => panic!("{never:?}"),
        }
    }
    assert!(admitted, "the head is admitted");
    assert!(asked.elapsed() < Duration::from_secs(10));
    // Its ticket is gone: process two's head goes when it fits alone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        ask(&two, 10_000, place(2, 10, true)).await,
        Reservation::Admitted
    );
}

/// A waker that counts its wakes.
#[derive(Default)]
struct Count(AtomicU64);

impl std::task::Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Process A's request is admitted writing a prefix; process B's request
/// that reads it and would go now is held (nothing debited) until A's
/// answer begins, and B's process learns when it does (the task that asks
/// for markers wakes the held request); a request that waits for capacity
/// anyway is answered its wait, not held.
#[tokio::test]
async fn a_prefix_another_process_writes_holds_a_request_that_would_go() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("writing");
    let connect = || {
        RedisLedger::builder(&url)
            .prefix(&prefix)
            .share_prompt_cache(true)
            .connect()
    };
    let a = connect().await.expect("a");
    let b = connect().await.expect("b");
    let limits = Limits::new().itpm(30_000);
    let none = Costs::default();
    let place = |owner, request| LinePlace {
        owner,
        head: true,
        request,
        waited: Duration::ZERO,
    };
    let hold = Duration::from_secs(5);
    let prefix_hash = 0x5eed_0000_0000_1000_u64;
    let other_hash = 0x5eed_0000_0000_2000_u64;
    let ask = |ledger: &RedisLedger, tokens, place, writes: Vec<u64>, pending: Vec<u64>| {
        let fut = ledger
            .reserve_in_line_with_prefixes(
                "k",
                &limits,
                costs(0, tokens, 0),
                none,
                place,
                PrefixIntent::new(&writes, &pending, hold),
            )
            .expect("a redis ledger keeps the line");
        async move { fut.await.expect("reserve") }
    };
    // A writes the prefix.
    assert_eq!(
        ask(&a, 5_000, place(1, 1), vec![prefix_hash], vec![prefix_hash]).await,
        Reservation::Admitted
    );
    let count = Arc::new(Count::default());
    let waker = std::task::Waker::from(Arc::clone(&count));
    assert!(!b.prefix_writing(prefix_hash, &waker), "not seen yet");
    // B's request would go now: held, nothing debited.
    let held = ask(
        &b,
        10_000,
        place(2, 1),
        vec![],
        vec![other_hash, prefix_hash],
    )
    .await;
    assert_eq!(
        held,
        Reservation::Wait {
            retry_in: PREFIX_WRITING_WAIT,
            dimension: Dimension::InputTokens
        }
    );
    let state = b.state("k", &limits).await.expect("state").expect("known");
    assert!(
        state[1].available > 24_000.0,
        "only A's 5,000 debited: {:?}",
        state[1]
    );
    assert!(
        b.prefix_writing(prefix_hash, &waker),
        "B holds for A's writer"
    );
    assert!(!b.prefix_writing(other_hash, &waker));
    assert!(!a.prefix_writing(prefix_hash, &waker), "its own write");
    // A request that waits for capacity anyway is not held for it.
    let waits = ask(&b, 29_000, place(3, 1), vec![], vec![prefix_hash]).await;
    let Reservation::Wait { retry_in, .. } = waits else {
        panic!("{waits:?}");
    };
    assert!(retry_in > Duration::from_secs(1), "{retry_in:?}");
    // A's answer begins: B's held request is woken, and goes.
    a.prefixes_written(&[prefix_hash]);
    a.flush().await.expect("flush");
    let woken = Instant::now();
    while count.0.load(Ordering::SeqCst) == 0 {
        assert!(woken.elapsed() < Duration::from_secs(2), "never woken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!b.prefix_writing(prefix_hash, &waker));
    assert_eq!(
        ask(&b, 10_000, place(2, 1), vec![], vec![prefix_hash]).await,
        Reservation::Admitted
    );
    assert!(b.stats().watch_calls >= 1, "{:?}", b.stats());
}

/// Process B's request that will write a prefix is queued (its budget
/// published the marker as it joined its line): process A's request whose
/// own longer prefix extends it, and that would go now, is held (nothing
/// debited) until B's request is admitted and its answer begins; the hold
/// then stands for B's writer. A request that writes the same prefix
/// itself, or whose longest write is not longer than the queued one's, is
/// not held. A queued request that leaves its line (cancelled) clears its
/// marker, and the marker of a process that went away expires.
#[tokio::test]
async fn a_shorter_prefix_queued_in_another_process_holds_a_longer_write() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("queued");
    let connect = || {
        RedisLedger::builder(&url)
            .prefix(&prefix)
            .share_prompt_cache(true)
            .connect()
    };
    let a = connect().await.expect("a");
    let b = connect().await.expect("b");
    let limits = Limits::new().itpm(30_000);
    let none = Costs::default();
    let place = |owner, request| LinePlace {
        owner,
        head: true,
        request,
        waited: Duration::ZERO,
    };
    let hold = Duration::from_secs(5);
    let (turn1, turn2) = (0x9e11_0000_0000_1000_u64, 0x9e11_0000_0000_2000_u64);
    let ask = |ledger: &RedisLedger, place, writes: Vec<u64>, pending: Vec<u64>, tokens| {
        let fut = ledger
            .reserve_in_line_with_prefixes(
                "k",
                &limits,
                costs(0, 2_000, 0),
                none,
                place,
                PrefixIntent::new(&writes, &pending, hold).queued(tokens, Duration::from_secs(3)),
            )
            .expect("a redis ledger keeps the line");
        async move { fut.await.expect("reserve") }
    };
    let held = Reservation::Wait {
        retry_in: PREFIX_WRITING_WAIT,
        dimension: Dimension::InputTokens,
    };
    // B's turn 1 (1,200 tokens) joins its line behind others.
    b.prefixes_queued("k", 7, &[turn1], 1_200, Duration::from_secs(3));
    b.flush().await.expect("flush");
    // A's turn 2 (3,300 tokens, reading turn 1's prefix) would go: held.
    assert_eq!(
        ask(&a, place(1, 1), vec![turn2], vec![turn2, turn1], 3_300).await,
        held
    );
    let count = Arc::new(Count::default());
    let waker = std::task::Waker::from(Arc::clone(&count));
    assert!(
        a.prefix_writing(turn1, &waker),
        "A holds for B's queued turn"
    );
    let state = a.state("k", &limits).await.expect("state").expect("known");
    assert!(
        state[1].available > 29_000.0,
        "nothing debited: {:?}",
        state[1]
    );
    // Not held: a request that writes turn 1's prefix itself, or one whose
    // longest write is not longer than the queued one's.
    assert_eq!(
        ask(&a, place(2, 1), vec![turn1], vec![turn1], 3_300).await,
        Reservation::Admitted
    );
    assert_eq!(
        ask(&a, place(3, 1), vec![], vec![turn1], 1_200).await,
        Reservation::Admitted
    );
    // (The first of them wrote turn 1's prefix: its answer begins.)
    a.prefixes_written(&[turn1]);
    a.flush().await.expect("flush");
    // B's turn 1 is admitted: its marker becomes a writer's, A holds on.
    assert_eq!(
        ask(&b, place(4, 7), vec![turn1], vec![turn1], 1_200).await,
        Reservation::Admitted
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(a.prefix_writing(turn1, &waker), "B's writer now");
    // Its answer begins: A's held request is woken, and goes.
    b.prefixes_written(&[turn1]);
    b.flush().await.expect("flush");
    let woken = Instant::now();
    while count.0.load(Ordering::SeqCst) == 0 {
        assert!(woken.elapsed() < Duration::from_secs(2), "never woken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!a.prefix_writing(turn1, &waker));
    assert_eq!(
        ask(&a, place(1, 1), vec![turn2], vec![turn2], 3_300).await,
        Reservation::Admitted
    );

    // A queued request that leaves its line clears its marker.
    let (turn1b, turn2b) = (turn1 + (1 << 20), turn2 + (1 << 20));
    b.prefixes_queued("k", 8, &[turn1b], 1_200, Duration::from_secs(3));
    b.prefixes_dequeued("k", 8);
    b.flush().await.expect("flush");
    assert_eq!(
        ask(&a, place(5, 1), vec![turn2b], vec![turn2b, turn1b], 3_300).await,
        Reservation::Admitted
    );

    // The marker of a process that went away expires.
    let (turn1c, turn2c) = (turn1 + (2 << 20), turn2 + (2 << 20));
    let gone = connect().await.expect("gone");
    gone.prefixes_queued("k", 9, &[turn1c], 1_200, Duration::from_millis(300));
    gone.flush().await.expect("flush");
    drop(gone);
    assert_eq!(
        ask(&a, place(6, 1), vec![turn2c], vec![turn2c, turn1c], 3_300).await,
        held
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        ask(&a, place(7, 1), vec![turn2c], vec![turn2c, turn1c], 3_300).await,
        Reservation::Admitted
    );
}

/// The writer grace, in the script: at its first ask, a writer that would
/// go while a shorter prefix of its prompt has no marker is answered a wait
/// of the grace (nothing debited, in the same call: its writes marked as
/// queued, so a still longer writer holds for it, and its costs kept in
/// the fleet's line); a shorter writer arriving meanwhile in another
/// process is not held by it and goes; asked again, the longer one holds
/// for that writer. A writer whose shorter prefixes are all marked (being
/// written, queued, or cached), a later ask, and a ledger whose grace is
/// zero, go at once.
#[tokio::test]
async fn a_writer_waits_the_grace_while_a_shorter_prefix_has_no_marker() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("grace");
    let connect = |grace: Duration| {
        RedisLedger::builder(&url)
            .prefix(&prefix)
            .share_prompt_cache(true)
            .writer_grace(grace)
            .connect()
    };
    let a = connect(WRITER_GRACE).await.expect("a");
    let b = connect(WRITER_GRACE).await.expect("b");
    assert_eq!(a.writer_grace(), WRITER_GRACE);
    let limits = Limits::new().itpm(30_000);
    let none = Costs::default();
    let hold = Duration::from_secs(5);
    let (system, turn1, turn2, turn3) = (
        0x9e13_0000_0000_0800_u64,
        0x9e13_0000_0000_1000_u64,
        0x9e13_0000_0000_2000_u64,
        0x9e13_0000_0000_3000_u64,
    );
    let ask = |ledger: &RedisLedger,
               owner,
               writes: Vec<u64>,
               pending: Vec<u64>,
               shorter: Vec<u64>,
               tokens| {
        let place = LinePlace {
            owner,
            head: true,
            request: owner,
            waited: Duration::ZERO,
        };
        let fut = ledger
            .reserve_in_line_with_prefixes(
                "k",
                &limits,
                costs(0, 2_000, 0),
                none,
                place,
                PrefixIntent::new(&writes, &pending, hold)
                    .queued(tokens, Duration::from_secs(3))
                    .first_ask(&shorter),
            )
            .expect("a redis ledger keeps the line");
        async move { fut.await.expect("reserve") }
    };
    let graced = Reservation::Wait {
        retry_in: WRITER_GRACE,
        dimension: Dimension::InputTokens,
    };
    let held = Reservation::Wait {
        retry_in: PREFIX_WRITING_WAIT,
        dimension: Dimension::InputTokens,
    };
    // A's turn 2 (3,300 tokens) at its first ask: turn 1's prefix and the
    // system prompt's have no marker. One call.
    let calls = a.stats().calls;
    let turn2_pending = vec![turn2, turn1, system];
    assert_eq!(
        ask(
            &a,
            1,
            vec![turn2],
            turn2_pending.clone(),
            vec![turn1, system],
            3_300
        )
        .await,
        graced
    );
    assert_eq!(a.stats().calls, calls + 1, "the grace rides on the ask");
    let state = a.state("k", &limits).await.expect("state").expect("known");
    assert!(
        state[1].available > 29_000.0,
        "nothing debited: {:?}",
        state[1]
    );
    // Meanwhile B's turn 3 (longer) is held for A's turn 2, queued.
    assert_eq!(
        ask(&b, 2, vec![turn3], vec![turn3, turn2, turn1], vec![], 4_400).await,
        held
    );
    // B's turn 1 (shorter: not held by the longer turn 2) goes at once.
    assert_eq!(
        ask(&b, 3, vec![turn1], vec![turn1, system], vec![system], 1_200).await,
        graced,
        "the system prompt's prefix has no marker: its own grace"
    );
    assert_eq!(
        ask(&b, 3, vec![turn1], vec![turn1, system], vec![], 1_200).await,
        Reservation::Admitted
    );
    // A's turn 2 asks again after its grace: held for turn 1's writer.
    assert_eq!(
        ask(&a, 1, vec![turn2], turn2_pending.clone(), vec![], 3_300).await,
        held
    );
    // Turn 1's answer begins; the system prompt's prefix is cached.
    b.prefixes_written(&[turn1]);
    b.prefixes_cached("k", &[turn1, system]);
    b.flush().await.expect("flush");
    // A writer whose shorter prefixes are all marked goes at its first ask.
    let turn2b = turn2 + (1 << 20);
    assert_eq!(
        ask(
            &a,
            4,
            vec![turn2b],
            vec![turn2b, turn1, system],
            vec![turn1, system],
            3_300
        )
        .await,
        Reservation::Admitted
    );
    // A ledger without a grace: at once, even with unmarked prefixes.
    let c = connect(Duration::ZERO).await.expect("c");
    assert_eq!(c.writer_grace(), Duration::ZERO);
    let (turn2c, turn1c) = (turn2 + (2 << 20), turn1 + (2 << 20));
    assert_eq!(
        ask(
            &c,
            5,
            vec![turn2c],
            vec![turn2c, turn1c],
            vec![turn1c],
            3_300
        )
        .await,
        Reservation::Admitted
    );
}

/// A refused head's writes are marked as queued by its own reservation (no
/// call added), and its admission clears them.
#[tokio::test]
async fn a_refused_heads_writes_are_marked_queued_by_its_reservation() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("queued-head");
    let connect = || {
        RedisLedger::builder(&url)
            .prefix(&prefix)
            .share_prompt_cache(true)
            .connect()
    };
    let a = connect().await.expect("a");
    let b = connect().await.expect("b");
    let limits = Limits::new().itpm(60_000);
    let none = Costs::default();
    let hold = Duration::from_secs(5);
    let (turn1, turn2) = (0x9e12_0000_0000_1000_u64, 0x9e12_0000_0000_2000_u64);
    let ask = |ledger: &RedisLedger, owner, tokens, writes: Vec<u64>, pending: Vec<u64>, depth| {
        let place = LinePlace {
            owner,
            head: true,
            request: 1,
            waited: Duration::ZERO,
        };
        let fut = ledger
            .reserve_in_line_with_prefixes(
                "k",
                &limits,
                costs(0, tokens, 0),
                none,
                place,
                PrefixIntent::new(&writes, &pending, hold).queued(depth, Duration::from_secs(3)),
            )
            .expect("a redis ledger keeps the line");
        async move { fut.await.expect("reserve") }
    };
    // B's head does not fit (61,000 tokens): refused, its write queued.
    let refused = ask(&b, 2, 61_000, vec![turn1], vec![turn1], 1_200).await;
    assert!(matches!(refused, Reservation::Never { .. }), "{refused:?}");
    let waits = ask(&b, 2, 59_000, vec![], vec![], 0).await;
    assert_eq!(waits, Reservation::Admitted);
    let refused = ask(&b, 2, 50_000, vec![turn1], vec![turn1], 1_200).await;
    assert!(matches!(refused, Reservation::Wait { .. }), "{refused:?}");
    let calls = b.stats().calls;
    // A's longer write that would go (it fits beside nothing, so it is
    // small): held for B's queued head.
    let held = ask(&a, 1, 500, vec![turn2], vec![turn2, turn1], 3_300).await;
    assert_eq!(
        held,
        Reservation::Wait {
            retry_in: PREFIX_WRITING_WAIT,
            dimension: Dimension::InputTokens
        }
    );
    assert_eq!(b.stats().calls, calls, "no call of B's added");
}

// ---------------------------------------------------------------------------
// Faults.

#[tokio::test]
async fn a_flushed_script_is_loaded_again_and_deleted_keys_start_full() {
    let Some(url) = redis_url() else { return };
    let ledger = RedisLedger::builder(&url)
        .prefix(unique_prefix("flush"))
        .connect()
        .await
        .expect("connect");
    let limits = Limits::new().rpm(1);
    let one = costs(1, 0, 0);
    assert_eq!(
        ledger.reserve("k", &limits, one).await.expect("first"),
        Reservation::Admitted
    );
    let mut raw = raw_connection(&url).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .expect("SCRIPT FLUSH");
    let answer = ledger
        .reserve("k", &limits, one)
        .await
        .expect("after SCRIPT FLUSH");
    assert!(
        matches!(answer, Reservation::Wait { .. }),
        "the state survived: {answer:?}"
    );
    assert_eq!(ledger.stats().failures, 0);

    let _: () = redis::cmd("DEL")
        .arg(ledger.redis_key("k"))
        .query_async(&mut raw)
        .await
        .expect("DEL");
    assert_eq!(
        ledger.reserve("k", &limits, one).await.expect("after DEL"),
        Reservation::Admitted,
        "a deleted key starts again with full buckets"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(ledger.redis_key("k"))
        .query_async(&mut raw)
        .await
        .expect("PTTL");
    assert!(
        ttl > 600_000 && ttl <= 660_001,
        "expires 10 min after full again: {ttl} ms"
    );
}

#[tokio::test]
async fn killed_redis_fails_open_to_a_share_and_recovers_without_restart() {
    if redis_url().is_none() {
        return;
    }
    let mut server = OwnServer::start().await;
    let ledger = RedisLedger::builder(&server.url())
        .replicas(2)
        .retry_interval(Duration::from_millis(100))
        .connect()
        .await
        .expect("connect");
    let limits = Limits::new().rpm(6);
    let one = costs(1, 0, 0);
    let (first, time) = ledger.reserve_timed("k", &limits, one).await.expect("up");
    assert_eq!(first, Reservation::Admitted);
    assert!(time.is_some(), "answered by Redis");

    server.kill();
    // Fail open: 6 RPM over 2 replicas is 3 per process; nothing fails.
    let started = std::time::Instant::now();
    let mut admitted = 0;
    for _ in 0..5 {
        let (answer, time) = ledger
            .reserve_timed("k", &limits, one)
            .await
            .expect("fails open");
        assert!(time.is_none(), "answered by the fallback");
        if answer == Reservation::Admitted {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3, "the fallback holds limit / replicas");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "fast while Redis is away"
    );
    let stats = ledger.stats();
    assert!(
        stats.failures >= 1 && stats.fallback_answers == 5,
        "{stats:?}"
    );

    server.restart().await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut back = false;
    for _ in 0..50 {
        if let (_, Some(_)) = ledger
            .reserve_timed("k", &limits, one)
            .await
            .expect("recovering")
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the ledger uses Redis again without a restart");
}

#[tokio::test]
async fn killed_redis_fails_closed_fast_with_a_typed_error() {
    if redis_url().is_none() {
        return;
    }
    let mut server = OwnServer::start().await;
    let ledger = RedisLedger::builder(&server.url())
        .fault_policy(FaultPolicy::FailClosed)
        .connect()
        .await
        .expect("connect");
    let limits = Limits::new().rpm(60);
    assert_eq!(
        ledger
            .reserve("k", &limits, costs(1, 0, 0))
            .await
            .expect("up"),
        Reservation::Admitted
    );
    // A settlement buffered while Redis is away is kept for later.
    ledger
        .settle(
            "k",
            &limits,
            CostDelta {
                requests: -1,
                ..CostDelta::default()
            },
        )
        .await
        .expect("buffered");
    server.kill();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let error = ledger
            .reserve("k", &limits, costs(1, 0, 0))
            .await
            .expect_err("fails closed");
        assert!(started.elapsed() < Duration::from_millis(500));
        let source = std::error::Error::source(&error).expect("source");
        let typed = source
            .downcast_ref::<RedisLedgerError>()
            .expect("a RedisLedgerError");
        assert!(
            matches!(
                typed,
                RedisLedgerError::Redis(_)
                    | RedisLedgerError::Timeout(_)
                    | RedisLedgerError::Unavailable { .. }
            ),
            "{typed:?}"
        );
    }
}

/// A loopback proxy to Redis that holds every chunk for `delay` (settable).
async fn slow_proxy(upstream: SocketAddr, delay: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, Arc::clone(&delay)));
            tokio::spawn(pipe(sr, cw, Arc::clone(&delay)));
        }
    });
    addr
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let ms = delay.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_slow_redis_times_out_to_the_policy() {
    let Some(url) = redis_url() else { return };
    let upstream: SocketAddr = {
        let info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(url.as_str()).expect("url");
        match info.addr {
            redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}")
                .parse()
                .expect("host:port on loopback"),
            other => panic!("REDIS_URL must be TCP on loopback: {other:?}"),
        }
    };
    let delay = Arc::new(AtomicU64::new(0));
    let proxy = slow_proxy(upstream, Arc::clone(&delay)).await;
    let url = format!("redis://{proxy}/");
    let prefix = unique_prefix("slow");
    let open = RedisLedger::builder(&url)
        .prefix(&prefix)
        .replicas(2)
        .connect()
        .await
        .expect("open");
    let closed = RedisLedger::builder(&url)
        .prefix(&prefix)
        .fault_policy(FaultPolicy::FailClosed)
        .connect()
        .await
        .expect("closed");
    let limits = Limits::new().rpm(100);
    let one = costs(1, 0, 0);
    assert!(open
        .reserve_timed("k", &limits, one)
        .await
        .expect("fast")
        .1
        .is_some());

    delay.store(300, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let (answer, time) = open
        .reserve_timed("k", &limits, one)
        .await
        .expect("fails open");
    assert_eq!(
        (answer, time),
        (Reservation::Admitted, None),
        "answered by the fallback"
    );
    let error = closed
        .reserve("k", &limits, one)
        .await
        .expect_err("fails closed");
    let typed =
        std::error::Error::source(&error).and_then(|e| e.downcast_ref::<RedisLedgerError>());
    assert!(
        matches!(typed, Some(RedisLedgerError::Timeout(t)) if *t == Duration::from_millis(50)),
        "{typed:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(550),
        "two 50 ms timeouts, not two 300 ms delays"
    );
}

#[tokio::test]
async fn a_sync_allows_for_the_thousands_rounding_and_only_lowers() {
    let Some(url) = redis_url() else { return };
    let ledger = RedisLedger::builder(&url)
        .prefix(unique_prefix("round"))
        .connect()
        .await
        .expect("connect");
    // 6,000 ITPM refills 0.1 token per millisecond: the drift below is tiny.
    let limits = Limits::new().itpm(6_000);
    let status = |remaining| LimitStatus {
        limit: None,
        remaining: Some(remaining),
        reset_in: None,
    };
    let input = |ledger: &RedisLedger| {
        let ledger = ledger.clone();
        async move {
            ledger
                .state("k", &limits)
                .await
                .expect("state")
                .expect("known")[1]
                .available
        }
    };
    assert_eq!(
        ledger
            .reserve("k", &limits, costs(0, 1_600, 0))
            .await
            .expect("reserve"),
        Reservation::Admitted
    );
    // 4,400 left; the server's "4,000" means below 4,500: consistent, kept.
    ledger
        .sync("k", &limits, Dimension::InputTokens, status(4_000))
        .await
        .expect("sync");
    ledger.flush().await.expect("flush");
    assert!(input(&ledger).await > 4_399.0);
    assert_eq!(
        ledger
            .reserve("k", &limits, costs(0, 200, 0))
            .await
            .expect("reserve"),
        Reservation::Admitted
    );
    // 4,200 + refill; "3,000" is more than 500 below: the server wins.
    ledger
        .sync("k", &limits, Dimension::InputTokens, status(3_000))
        .await
        .expect("sync");
    ledger.flush().await.expect("flush");
    let level = input(&ledger).await;
    assert!(
        (3_000.0..3_010.0).contains(&level),
        "lowered to the server's remaining: {level}"
    );
    // A server that says more is left never raises the bucket.
    ledger
        .sync("k", &limits, Dimension::InputTokens, status(5_999))
        .await
        .expect("sync");
    ledger.flush().await.expect("flush");
    assert!(input(&ledger).await < 3_020.0);
}

/// A header sync rides on the key's next call, which may come much later:
/// the server's remaining is as of when the headers were read, and the
/// server's bucket has refilled since. The shared bucket is lowered to the
/// remaining plus that refill (less 100 ms, the answer's time in flight),
/// not to the bare remaining (which would keep the fleet below the limit
/// for the rest of the window). A sync sent at once counts no refill: the
/// differential test above holds it to the in-memory ledger's decisions.
#[tokio::test]
async fn a_late_sync_counts_the_refill_since_its_headers_were_read() {
    let Some(url) = redis_url() else { return };
    let ledger = RedisLedger::builder(&url)
        .prefix(unique_prefix("late-sync"))
        .connect()
        .await
        .expect("connect");
    // 60,000 ITPM refills one token per millisecond.
    let limits = Limits::new().itpm(60_000);
    assert_eq!(
        ledger
            .reserve("k", &limits, costs(0, 50_000, 0))
            .await
            .expect("reserve"),
        Reservation::Admitted
    );
    // The server says nothing is left; the sync waits in this process.
    ledger
        .sync(
            "k",
            &limits,
            Dimension::InputTokens,
            LimitStatus {
                limit: None,
                remaining: Some(0),
                reset_in: None,
            },
        )
        .await
        .expect("sync");
    let read = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ledger.flush().await.expect("flush");
    let level = ledger
        .state("k", &limits)
        .await
        .expect("state")
        .expect("known")[1]
        .available;
    let since = read.elapsed().as_secs_f64() * 1_000.0;
    // One token per millisecond since the headers were read, less the
    // 100 ms kept for the answer's time in flight.
    assert!(
        level >= 190.0 && level <= since - 100.0 + 5.0,
        "lowered to the remaining plus {since:.0} - 100 ms of refill: {level}"
    );
}

// ---------------------------------------------------------------------------
// Through the budget layer.

type Upstream = tower::util::BoxCloneService<
    http::Request<tower_llm_limits::body::ReplayBody<http_body_util::Full<bytes::Bytes>>>,
    http::Response<http_body_util::Full<bytes::Bytes>>,
    std::convert::Infallible,
>;

fn upstream() -> Upstream {
    tower::util::BoxCloneService::new(tower::service_fn(|_req| async {
        let body = r#"{"type":"message","usage":{"input_tokens":12,"output_tokens":30}}"#;
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
            bytes::Bytes::from(body),
        )))
    }))
}

fn message(key: Option<&str>) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut b = http::Request::post("/v1/messages");
    if let Some(key) = key {
        b = b.header("x-api-key", key);
    }
    b.body(http_body_util::Full::new(bytes::Bytes::from(
        r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"Hi"}]}"#,
    )))
    .expect("request")
}

#[tokio::test]
async fn gateway_replicas_share_each_callers_budget() {
    use tower::{Layer, ServiceExt};
    use tower_llm_limits::budget::{Callers, TokenBudgetLayer};
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("gateway");
    let limits = Limits::new().rpm(1).itpm(30_000).otpm(8_000);
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let ledger = RedisLedger::builder(&url)
            .prefix(&prefix)
            .connect()
            .await
            .expect("connect");
        let layer = TokenBudgetLayer::builder()
            .limits(limits)
            .enforce(Callers::new().caller("caller-1", "sk-gw-caller-1"))
            .ledger(Arc::new(ledger))
            .build();
        replicas.push(layer.layer(upstream()));
    }
    let first = replicas[0]
        .clone()
        .oneshot(message(Some("sk-gw-caller-1")))
        .await
        .expect("first");
    assert_eq!(first.status(), 200);
    let second = replicas[1]
        .clone()
        .oneshot(message(Some("sk-gw-caller-1")))
        .await
        .expect("second");
    assert_eq!(
        second.status(),
        429,
        "the other replica sees the caller's spent budget"
    );
}

#[tokio::test]
async fn fail_open_loses_no_request_when_redis_dies_mid_run() {
    use tower::{Layer, ServiceExt};
    use tower_llm_limits::budget::TokenBudgetLayer;
    if redis_url().is_none() {
        return;
    }
    let mut server = OwnServer::start().await;
    let ledger = RedisLedger::builder(&server.url())
        .replicas(2)
        .retry_interval(Duration::from_millis(50))
        .connect()
        .await
        .expect("connect");
    let stats = ledger.clone();
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(10_000).itpm(1_000_000).otpm(100_000))
        .ledger(Arc::new(ledger))
        .build();
    let svc = layer.layer(upstream());
    let send = |i: usize| {
        let svc = svc.clone();
        async move {
            let response = svc.oneshot(message(None)).await.expect("no request lost");
            assert_eq!(response.status(), 200, "request {i}");
        }
    };
    for i in 0..10 {
        send(i).await;
    }
    server.kill();
    for i in 10..20 {
        send(i).await;
    }
    let away = stats.stats();
    assert!(
        away.fallback_answers >= 10,
        "the fallback answered while Redis was away: {away:?}"
    );
    server.restart().await;
    // Requests keep flowing while the connection comes back; then Redis
    // answers again.
    let mut back = false;
    for i in 20..220 {
        send(i).await;
        let now = stats.stats();
        if now.calls - now.failures > away.calls - away.failures {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        back,
        "Redis answers again after its restart: {:?}",
        stats.stats()
    );
}

#[tokio::test]
async fn bad_settings_are_typed_errors_before_any_connection() {
    let url = "redis://127.0.0.1:1/";
    for (builder, what) in [
        (RedisLedger::builder(url).replicas(0), "replicas"),
        (RedisLedger::builder(url).window(Duration::ZERO), "window"),
        (
            RedisLedger::builder(url).window(Duration::from_secs(61)),
            "window",
        ),
        (
            RedisLedger::builder(url).window(Duration::from_nanos(1_500)),
            "microseconds",
        ),
        (RedisLedger::builder(url).timeout(Duration::ZERO), "timeout"),
    ] {
        match builder.connect().await {
            Err(RedisLedgerError::InvalidConfig(reason)) => {
                assert!(reason.contains(what), "{reason}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    let error = RedisLedger::connect("not a url")
        .await
        .expect_err("refused");
    assert!(matches!(error, RedisLedgerError::Redis(_)), "{error:?}");
    // The builder's Debug never shows the URL (it may hold a password).
    let shown = format!("{:?}", RedisLedger::builder("redis://:secret@127.0.0.1/"));
    assert!(!shown.contains("secret"), "{shown}");
}

// ---------------------------------------------------------------------------
// Redis Cluster.

/// The cluster's servers, stopped, and their directories (`nodes.conf`)
/// removed, when dropped.
struct Cluster {
    servers: Vec<OwnServer>,
    dirs: Vec<std::path::PathBuf>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.kill();
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Three primaries of a Redis Cluster of the test's own, on loopback.
async fn start_cluster() -> (Cluster, Vec<String>) {
    let mut cluster = Cluster {
        servers: Vec::new(),
        dirs: Vec::new(),
    };
    for _ in 0..3 {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tll-cluster-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        cluster.dirs.push(dir.clone());
        let child = Command::new(server_binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--cluster-enabled", "yes", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        cluster.servers.push(OwnServer {
            port,
            child: Some(child),
        });
    }
    for s in &cluster.servers {
        for _ in 0..200 {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, s.port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let nodes: Vec<String> = cluster
        .servers
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let status = Command::new(cli_binary())
        .args(["--cluster", "create"])
        .args(&nodes)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("redis-cli on PATH");
    assert!(status.success(), "redis-cli --cluster create");
    let urls: Vec<String> = cluster.servers.iter().map(OwnServer::url).collect();
    for _ in 0..300 {
        let mut conn = raw_connection(&urls[0]).await;
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .expect("CLUSTER INFO");
        if info.contains("cluster_state:ok") {
            return (cluster, urls);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the cluster did not come up");
}

#[tokio::test]
async fn a_cluster_shares_one_budget_across_slots() {
    if redis_url().is_none() {
        return;
    }
    let (_cluster, urls) = start_cluster().await;
    let connect = || {
        RedisLedger::builder(&urls[0])
            .cluster(urls[1..].to_vec())
            .timeout(Duration::from_millis(500))
            .fault_policy(FaultPolicy::FailClosed)
            .share_prompt_cache(true)
            .connect()
    };
    let a = connect().await.expect("a");
    let b = connect().await.expect("b");
    let (a_cache, b_cache) = (
        a.prompt_cache().expect("shared"),
        b.prompt_cache().expect("shared"),
    );
    assert_eq!(a_cache.hash_key(), b_cache.hash_key(), "one fleet key");
    let limits = Limits::new().rpm(2);
    let one = costs(1, 0, 0);
    // Keys in different slots, each shared by both processes, with their
    // prompt-cache markers beside them (one slot per call).
    for (i, key) in ["sonnet", "opus", "haiku", "caller-7/sonnet-4"]
        .into_iter()
        .enumerate()
    {
        let prefix = 0x5eed_0000_0000_0000_u64 + ((i as u64) << 20);
        assert_eq!(
            a.reserve(key, &limits, one).await.expect("a"),
            Reservation::Admitted
        );
        assert_eq!(
            b.reserve(key, &limits, one).await.expect("b"),
            Reservation::Admitted
        );
        let third = a.reserve(key, &limits, one).await.expect("third");
        assert!(
            matches!(third, Reservation::Wait { .. }),
            "{key}: {third:?}"
        );
        b.prefixes_cached(key, &[prefix]);
        b.settle(
            key,
            &limits,
            CostDelta {
                requests: -1,
                ..CostDelta::default()
            },
        )
        .await
        .expect("refund");
        b.flush().await.expect("flush");
        assert!(
            !a_cache.is_cached(prefix),
            "{key}: not before a's next call"
        );
        assert_eq!(
            a.reserve(key, &limits, one)
                .await
                .expect("after the refund"),
            Reservation::Admitted
        );
        assert!(a_cache.is_cached(prefix), "{key}: b's marker reached a");
    }
}
