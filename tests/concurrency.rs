//! ConcurrencyLayer: every rule, on tokio's paused clock.
#![cfg(feature = "concurrency")]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::time::{sleep, Instant, Sleep};
use tower::{Layer, Service, ServiceExt};
use tower_llm_limits::classify::Class;
use tower_llm_limits::concurrency::{
    Concurrency, ConcurrencyBody, ConcurrencyBuilder, ConcurrencyLayer, ConfigError, Priority,
};
use tower_llm_limits::{BoxError, Error};

// ---------------------------------------------------------------------------
// A scripted upstream: each call gets a plan (status, time to head, body).

#[derive(Clone, Copy, Debug)]
struct Plan {
    status: u16,
    head: Duration,
    chunks: u32,
    every: Duration,
    fail: Option<io::ErrorKind>,
    body_error: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            status: 200,
            head: Duration::from_millis(100),
            chunks: 0,
            every: Duration::ZERO,
            fail: None,
            body_error: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Id(u64);

type PlanFn = dyn Fn(u64, usize) -> Plan + Send + Sync;

struct UpState {
    plan: Box<PlanFn>,
    calls: Mutex<Vec<(u64, Instant)>>,
    called: Mutex<HashMap<u64, Option<tokio::sync::oneshot::Sender<()>>>>,
    live: AtomicUsize,
    max_live: AtomicUsize,
}

#[derive(Clone)]
struct Upstream(Arc<UpState>);

impl Upstream {
    fn new(plan: impl Fn(u64, usize) -> Plan + Send + Sync + 'static) -> Self {
        Upstream(Arc::new(UpState {
            plan: Box::new(plan),
            calls: Mutex::new(Vec::new()),
            called: Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
            max_live: AtomicUsize::new(0),
        }))
    }
    fn constant(plan: Plan) -> Self {
        Self::new(move |_, _| plan)
    }
    /// A receiver that fires when request `id` reaches the upstream.
    fn notify_on_call(&self, id: u64) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.called.lock().unwrap().insert(id, Some(tx));
        rx
    }
    fn was_called(&self, id: u64) -> bool {
        matches!(self.0.called.lock().unwrap().get(&id), Some(None))
    }
    fn calls(&self) -> Vec<u64> {
        self.0.calls.lock().unwrap().iter().map(|c| c.0).collect()
    }
    fn call_times(&self) -> Vec<(u64, Instant)> {
        self.0.calls.lock().unwrap().clone()
    }
    fn live(&self) -> usize {
        self.0.live.load(Ordering::SeqCst)
    }
    fn max_live(&self) -> usize {
        self.0.max_live.load(Ordering::SeqCst)
    }
}

/// Counts a request as busy at the upstream until its body ends or is dropped.
struct Live(Arc<UpState>);
impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

struct SlowBody {
    left: u32,
    every: Duration,
    error: bool,
    sleep: Option<Pin<Box<Sleep>>>,
    live: Option<Live>,
}

impl Body for SlowBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.left == 0 {
            self.live = None;
            return Poll::Ready(None);
        }
        let every = self.every;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.sleep = None;
        if self.error {
            self.left = 0;
            self.live = None;
            return Poll::Ready(Some(Err(io::Error::other("stream broke"))));
        }
        self.left -= 1;
        if self.left == 0 {
            self.live = None;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"data: {}\n\n")))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

type UpFuture = Pin<Box<dyn Future<Output = Result<Response<SlowBody>, io::Error>> + Send>>;

impl Service<Request<()>> for Upstream {
    type Response = Response<SlowBody>;
    type Error = io::Error;
    type Future = UpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> UpFuture {
        let id = req.extensions().get::<Id>().map_or(u64::MAX, |i| i.0);
        let st = Arc::clone(&self.0);
        let n = st.live.fetch_add(1, Ordering::SeqCst) + 1;
        st.max_live.fetch_max(n, Ordering::SeqCst);
        st.calls.lock().unwrap().push((id, Instant::now()));
        if let Some(tx) = st.called.lock().unwrap().insert(id, None).flatten() {
            let _ = tx.send(());
        }
        let plan = (st.plan)(id, n);
        let live = Live(st);
        Box::pin(async move {
            sleep(plan.head).await;
            if let Some(kind) = plan.fail {
                drop(live);
                return Err(io::Error::new(kind, "upstream failed"));
            }
            let body = SlowBody {
                left: plan.chunks,
                every: plan.every,
                error: plan.body_error,
                sleep: None,
                live: (plan.chunks > 0).then_some(live),
            };
            Ok(Response::builder()
                .status(plan.status)
                .body(body)
                .expect("valid response"))
        })
    }
}

type Svc = Concurrency<Upstream>;
type Fut = <Svc as Service<Request<()>>>::Future;

fn req(id: u64, priority: Option<Priority>) -> Request<()> {
    let mut r = Request::new(());
    r.extensions_mut().insert(Id(id));
    if let Some(p) = priority {
        r.extensions_mut().insert(p);
    }
    r
}

async fn send(svc: &mut Svc, id: u64, priority: Option<Priority>) -> Fut {
    svc.ready().await.expect("ready");
    svc.call(req(id, priority))
}

async fn finish(fut: Fut) -> Result<Response<Bytes>, BoxError> {
    let resp = fut.await?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, bytes))
}

/// Let spawned tasks run without moving the clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn streaming(chunks: u32, every_ms: u64) -> Plan {
    Plan {
        chunks,
        every: Duration::from_millis(every_ms),
        ..Plan::default()
    }
}

// ---------------------------------------------------------------------------
// Fixed mode

#[tokio::test(start_paused = true)]
async fn fixed_limit_caps_in_flight_across_clones() {
    let up = Upstream::constant(streaming(2, 500));
    let layer = ConcurrencyLayer::fixed(3);
    let svc = layer.layer(up.clone());
    let mut tasks = Vec::new();
    for id in 0..10 {
        let mut clone = svc.clone();
        tasks.push(tokio::spawn(async move {
            let fut = send(&mut clone, id, None).await;
            finish(fut).await.map(|r| r.status())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(up.max_live(), 3);
    assert_eq!(up.calls().len(), 10);
    let s = layer.snapshot();
    assert_eq!((s.in_flight, s.waiting.total(), s.limit), (0, 0, 3));
}

#[tokio::test(start_paused = true)]
async fn waiters_are_admitted_first_come_first_served() {
    let up = Upstream::constant(Plan::default());
    let mut svc = ConcurrencyLayer::fixed(1).layer(up.clone());
    let mut tasks = Vec::new();
    for id in 0..8 {
        let fut = send(&mut svc, id, None).await;
        tasks.push(tokio::spawn(finish(fut)));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(up.calls(), (0..8).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn full_queue_sheds_at_once_with_overloaded() {
    let up = Upstream::constant(Plan::default());
    let layer = ConcurrencyBuilder::fixed(1).max_waiting(2).build().unwrap();
    let mut svc = layer.layer(up.clone());
    let first = send(&mut svc, 0, None).await;
    let a = send(&mut svc, 1, None).await;
    let b = send(&mut svc, 2, None).await;
    let shed = send(&mut svc, 3, None).await;
    let started = Instant::now();
    let err = shed.await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO, "shed at once");
    match err.downcast_ref::<Error>() {
        Some(Error::Overloaded { waiting }) => assert_eq!(*waiting, 2),
        other => panic!("expected Overloaded, got {other:?}"),
    }
    for f in [first, a, b] {
        finish(f).await.unwrap();
    }
    assert_eq!(
        up.calls(),
        vec![0, 1, 2],
        "the shed request never reached upstream"
    );
}

#[tokio::test(start_paused = true)]
async fn slot_is_held_until_a_streaming_body_ends() {
    // Head after 100 ms, then one event per second for 5 seconds.
    let up = Upstream::constant(streaming(5, 1000));
    let layer = ConcurrencyLayer::fixed(1);
    let mut svc = layer.layer(up.clone());
    let resp = send(&mut svc, 0, None).await.await.unwrap();
    assert_eq!(
        layer.snapshot().in_flight,
        1,
        "head arrived, body still open"
    );
    let second = tokio::spawn(finish(send(&mut svc, 1, None).await));
    sleep(Duration::from_secs(3)).await;
    assert_eq!(up.calls(), vec![0], "second waits while the stream runs");
    assert_eq!(layer.snapshot().waiting.normal, 1);

    let t0 = Instant::now();
    let mut body = resp.into_body();
    assert!(body.holds_slot());
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        frame.unwrap();
        frames += 1;
    }
    assert_eq!(frames, 5);
    assert!(!body.holds_slot(), "end of stream frees the slot");
    assert!(t0.elapsed() >= Duration::from_secs(4));
    second.await.unwrap().unwrap();
    assert_eq!(up.calls(), vec![0, 1]);
    let times = up.call_times();
    assert!(times[1].1 - times[0].1 >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_body_mid_stream_frees_the_slot() {
    let up = Upstream::constant(streaming(10, 1000));
    let layer = ConcurrencyLayer::fixed(1);
    let mut svc = layer.layer(up.clone());
    let resp = send(&mut svc, 0, None).await.await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    let next = send(&mut svc, 1, None).await;
    drop(body);
    assert_eq!(
        layer.snapshot().in_flight,
        1,
        "handed straight to the waiter"
    );
    finish(next).await.unwrap();
    assert_eq!(layer.snapshot().in_flight, 0);
    assert_eq!(up.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_body_error_frees_the_slot_and_passes_through() {
    let up = Upstream::constant(Plan {
        body_error: true,
        ..streaming(3, 200)
    });
    let layer = ConcurrencyLayer::fixed(1);
    let mut svc = layer.layer(up);
    let resp = send(&mut svc, 0, None).await.await.unwrap();
    let mut body: ConcurrencyBody<SlowBody> = resp.into_body();
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "stream broke");
    assert!(!body.holds_slot());
    assert_eq!(layer.snapshot().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_unchanged_and_free_the_slot() {
    let up = Upstream::constant(Plan {
        fail: Some(io::ErrorKind::ConnectionReset),
        ..Plan::default()
    });
    let layer = ConcurrencyLayer::fixed(1);
    let mut svc = layer.layer(up);
    let err = send(&mut svc, 0, None).await.await.unwrap_err();
    let io = err
        .downcast_ref::<io::Error>()
        .expect("the inner error itself");
    assert_eq!(io.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(layer.snapshot().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_waiting_future_gives_back_its_place() {
    let up = Upstream::constant(Plan::default());
    let layer = ConcurrencyLayer::fixed(1);
    let mut svc = layer.layer(up.clone());
    let a = send(&mut svc, 0, None).await;
    let b = send(&mut svc, 1, None).await;
    let c = send(&mut svc, 2, None).await;
    assert_eq!(layer.snapshot().waiting.total(), 2);
    drop(b);
    assert_eq!(layer.snapshot().waiting.total(), 1);
    finish(a).await.unwrap();
    finish(c).await.unwrap();
    assert_eq!(up.calls(), vec![0, 2]);
    let s = layer.snapshot();
    assert_eq!((s.in_flight, s.waiting.total()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_slot_handed_to_a_waiter_that_is_then_dropped_goes_to_the_next() {
    let up = Upstream::constant(Plan::default());
    let layer = ConcurrencyLayer::fixed(1);
    let mut svc = layer.layer(up.clone());
    let a = send(&mut svc, 0, None).await;
    let b = send(&mut svc, 1, None).await;
    let c = send(&mut svc, 2, None).await;
    // A ends: the slot is handed to B, which has not been polled yet.
    finish(a).await.unwrap();
    let s = layer.snapshot();
    assert_eq!((s.in_flight, s.waiting.total()), (1, 1));
    drop(b);
    let s = layer.snapshot();
    assert_eq!((s.in_flight, s.waiting.total()), (1, 0), "passed on to C");
    tokio::time::timeout(Duration::from_secs(5), finish(c))
        .await
        .expect("C is admitted")
        .unwrap();
    assert_eq!(up.calls(), vec![0, 2]);
    assert_eq!(layer.snapshot().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_an_in_flight_future_frees_its_slot() {
    let up = Upstream::new(|id, _| Plan {
        head: Duration::from_secs(if id == 0 { 60 } else { 1 }),
        ..Plan::default()
    });
    let layer = ConcurrencyLayer::fixed(1);
    let mut svc = layer.layer(up.clone());
    let mut slow = send(&mut svc, 0, None).await;
    assert!(futures_poll(&mut slow).is_pending());
    let next = send(&mut svc, 1, None).await;
    drop(slow);
    let t0 = Instant::now();
    finish(next).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert_eq!(up.live(), 0);
}

fn futures_poll(fut: &mut Fut) -> Poll<()> {
    let waker = std::task::Waker::from(Arc::new(NoWake));
    let mut cx = Context::from_waker(&waker);
    Pin::new(fut).poll(&mut cx).map(|_| ())
}

struct NoWake;
impl std::task::Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

#[tokio::test(start_paused = true)]
async fn poll_ready_takes_no_slot_and_clones_start_without_one() {
    let up = Upstream::constant(Plan::default());
    let layer = ConcurrencyLayer::fixed(1);
    let svc = layer.layer(up);
    // Five clones made ready and kept around: none of them holds a slot.
    let mut kept = Vec::new();
    for _ in 0..5 {
        let mut c = svc.clone();
        c.ready().await.unwrap();
        kept.push(c);
    }
    assert_eq!(layer.snapshot().in_flight, 0);
    // So a sixth is admitted at once.
    let mut other = svc.clone();
    let fut = send(&mut other, 1, None).await;
    assert_eq!(layer.snapshot().in_flight, 1);
    assert_eq!(layer.snapshot().waiting.total(), 0);
    finish(fut).await.unwrap();
    // A ready clone that is called later still works.
    let fut = kept[0].call(req(2, None));
    finish(fut).await.unwrap();
}

// ---------------------------------------------------------------------------
// Priority lanes

#[tokio::test(start_paused = true)]
async fn free_slots_go_to_the_highest_lane_first() {
    let up = Upstream::constant(Plan::default());
    let layer = ConcurrencyLayer::fixed(1);
    let mut svc = layer.layer(up.clone());
    let mut futs = vec![send(&mut svc, 0, None).await];
    futs.push(send(&mut svc, 1, Some(Priority::Background)).await);
    futs.push(send(&mut svc, 2, None).await);
    futs.push(send(&mut svc, 3, Some(Priority::Interactive)).await);
    futs.push(send(&mut svc, 4, Some(Priority::Background)).await);
    futs.push(send(&mut svc, 5, Some(Priority::Interactive)).await);
    let s = layer.snapshot();
    assert_eq!(
        (
            s.waiting.interactive,
            s.waiting.normal,
            s.waiting.background
        ),
        (2, 1, 2)
    );
    let tasks: Vec<_> = futs.into_iter().map(|f| tokio::spawn(finish(f))).collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(up.calls(), vec![0, 3, 5, 2, 1, 4]);
}

#[tokio::test(start_paused = true)]
async fn aging_lets_background_through_a_steady_interactive_stream() {
    // One slot, each request 1 s; Interactive requests keep the queue busy for
    // two minutes. Aging 10 s: the Background waiter ranks as Interactive after
    // 20 s and, having waited longest, goes next.
    let up = Upstream::constant(Plan {
        head: Duration::from_secs(1),
        ..Plan::default()
    });
    let layer = ConcurrencyBuilder::fixed(1)
        .aging(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = layer.layer(up.clone());
    let mut s0 = svc.clone();
    let first = send(&mut s0, 0, Some(Priority::Interactive)).await;
    let bg = send(&mut s0, 1_000_000, Some(Priority::Background)).await;
    let t0 = Instant::now();
    let bg = tokio::spawn(finish(bg));
    let feeder = {
        let layer = layer.clone();
        let svc = svc.clone();
        tokio::spawn(async move {
            let mut id = 1;
            let mut running = Vec::new();
            while t0.elapsed() < Duration::from_secs(120) {
                while layer.snapshot().waiting.interactive < 3 {
                    let mut c = svc.clone();
                    let f = send(&mut c, id, Some(Priority::Interactive)).await;
                    running.push(tokio::spawn(finish(f)));
                    id += 1;
                }
                sleep(Duration::from_millis(100)).await;
            }
            for r in running {
                r.await.unwrap().unwrap();
            }
        })
    };
    finish(first).await.unwrap();
    bg.await.unwrap().unwrap();
    let admitted = up
        .call_times()
        .into_iter()
        .find(|(id, _)| *id == 1_000_000)
        .map(|(_, at)| at - t0)
        .unwrap();
    assert!(
        admitted >= Duration::from_secs(20) && admitted <= Duration::from_secs(22),
        "background admitted after {admitted:?}"
    );
    feeder.await.unwrap();
    // Interactive requests kept coming long after it.
    assert!(up.calls().len() > 100);
}

// ---------------------------------------------------------------------------
// Adaptive mode

/// `workers` clients looping requests as fast as they are admitted, until `stop`.
fn load(svc: &Svc, workers: u64, stop: Duration) -> Vec<tokio::task::JoinHandle<()>> {
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    (0..workers)
        .map(|_| {
            let mut c = svc.clone();
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                while t0.elapsed() < stop {
                    let id = next.fetch_add(1, Ordering::SeqCst);
                    let f = send(&mut c, id, None).await;
                    let _ = finish(f).await;
                }
            })
        })
        .collect()
}

async fn join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_429s_is_one_cut() {
    let up = Upstream::constant(Plan {
        status: 429,
        ..Plan::default()
    });
    let layer = ConcurrencyBuilder::adaptive(1..=20)
        .initial_limit(10)
        .build()
        .unwrap();
    let mut svc = layer.layer(up);
    let mut futs = Vec::new();
    for id in 0..10 {
        futs.push(send(&mut svc, id, None).await);
    }
    assert_eq!(layer.snapshot().in_flight, 10);
    for f in futs {
        let r = finish(f).await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "passed through");
    }
    let s = layer.snapshot();
    assert_eq!((s.cuts, s.limit), (1, 9));
}

async fn one_cut_from(plan: Plan, builder: ConcurrencyBuilder) -> (usize, u64) {
    let up = Upstream::constant(plan);
    let layer = builder.initial_limit(10).build().unwrap();
    let mut svc = layer.layer(up);
    let _ = finish(send(&mut svc, 0, None).await).await;
    let s = layer.snapshot();
    (s.limit, s.cuts)
}

#[tokio::test(start_paused = true)]
async fn status_503_529_and_timeouts_cut_other_errors_do_not() {
    let b = || ConcurrencyBuilder::adaptive(1..=20);
    for status in [429, 503, 529] {
        let plan = Plan {
            status,
            ..Plan::default()
        };
        assert_eq!(one_cut_from(plan, b()).await, (9, 1), "status {status}");
    }
    for status in [200, 400, 500] {
        let plan = Plan {
            status,
            ..Plan::default()
        };
        assert_eq!(one_cut_from(plan, b()).await.1, 0, "status {status}");
    }
    let timeout = Plan {
        fail: Some(io::ErrorKind::TimedOut),
        ..Plan::default()
    };
    assert_eq!(one_cut_from(timeout, b()).await, (9, 1));
    let reset = Plan {
        fail: Some(io::ErrorKind::ConnectionReset),
        ..Plan::default()
    };
    assert_eq!(one_cut_from(reset, b()).await, (10, 0));
    // A classifier of one's own.
    let custom =
        b().error_classifier(|e| (e.to_string() == "upstream failed").then_some(Class::Timeout));
    assert_eq!(one_cut_from(reset, custom).await, (9, 1));
}

#[tokio::test(start_paused = true)]
async fn rising_time_to_head_cuts_but_long_bodies_do_not() {
    // Streams of very different lengths with a steady 100 ms head: no cut.
    let slow_heads = Arc::new(AtomicU64::new(0));
    let s = Arc::clone(&slow_heads);
    let up = Upstream::new(move |id, _| Plan {
        head: Duration::from_millis(if s.load(Ordering::SeqCst) == 1 {
            600
        } else {
            100
        }),
        chunks: 1 + (id % 7) as u32 * 5,
        every: Duration::from_millis(300),
        ..Plan::default()
    });
    let layer = ConcurrencyBuilder::adaptive(1..=16).build().unwrap();
    let svc = layer.layer(up);
    let tasks = load(&svc, 16, Duration::from_secs(300));
    sleep(Duration::from_secs(120)).await;
    let s = layer.snapshot();
    assert_eq!(s.cuts, 0, "total latency varies 0.4..10 s, heads do not");
    assert_eq!(s.limit, 16);
    slow_heads.store(1, Ordering::SeqCst);
    sleep(Duration::from_secs(5)).await;
    let s = layer.snapshot();
    assert!(s.cuts >= 1, "heads six times slower must cut");
    assert!(s.limit < 16);
    join(tasks).await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_limit_stays_within_its_bounds() {
    let up = Upstream::constant(Plan {
        status: 529,
        ..Plan::default()
    });
    let layer = ConcurrencyBuilder::adaptive(4..=8)
        .initial_limit(8)
        .build()
        .unwrap();
    let svc = layer.layer(up);
    let tasks = load(&svc, 20, Duration::from_secs(60));
    join(tasks).await;
    assert_eq!(layer.snapshot().limit, 4, "cut to the minimum, not below");

    let up = Upstream::constant(Plan::default());
    let layer = ConcurrencyLayer::adaptive(4..=8);
    let svc = layer.layer(up.clone());
    let tasks = load(&svc, 20, Duration::from_secs(60));
    join(tasks).await;
    assert_eq!(layer.snapshot().limit, 8, "grown to the maximum, not above");
    assert_eq!(up.max_live(), 8);
}

#[tokio::test(start_paused = true)]
async fn a_cut_below_in_flight_revokes_nothing() {
    // Ten long streams in flight; a 529 cuts the limit to 9.
    let up = Upstream::new(|id, _| {
        if id == 100 {
            Plan {
                status: 529,
                ..Plan::default()
            }
        } else {
            Plan {
                head: Duration::from_millis(10),
                ..streaming(1, 10_000)
            }
        }
    });
    let layer = ConcurrencyBuilder::adaptive(1..=20)
        .initial_limit(11)
        .build()
        .unwrap();
    let mut svc = layer.layer(up.clone());
    let mut streams = Vec::new();
    for id in 0..10 {
        streams.push(send(&mut svc, id, None).await.await.unwrap());
    }
    finish(send(&mut svc, 100, None).await).await.unwrap();
    let s = layer.snapshot();
    assert_eq!(
        (s.limit, s.in_flight),
        (9, 10),
        "cut, and all ten keep going"
    );
    let waiting = tokio::spawn(finish(send(&mut svc, 200, None).await));
    settle().await;
    // One stream ends: in flight 9, still not below 9.
    streams.pop();
    settle().await;
    assert_eq!(layer.snapshot().waiting.total(), 1);
    // A second ends: in flight 8 < 9, the waiter goes in.
    streams.pop();
    settle().await;
    assert_eq!(layer.snapshot().waiting.total(), 0);
    assert_eq!(layer.snapshot().in_flight, 9);
    drop(streams);
    waiting.await.unwrap().unwrap();
    assert_eq!(layer.snapshot().in_flight, 0);
}

/// Drive an adaptive layer against an upstream whose true capacity is `c`
/// (above it, time to head grows and it answers 529; heads jitter 150..250 ms),
/// with three times more clients than it takes. After `settle`, sample the limit
/// once a second for `observe`; return the range and the mean.
async fn settled_range(c: usize, settle: Duration, observe: Duration) -> (usize, usize, usize) {
    let up = Upstream::new(move |id, n| {
        let head = Duration::from_millis(150 + (id * 7919) % 100);
        if n > c {
            Plan {
                status: 529,
                head: head * (1 + (n - c) as u32),
                ..Plan::default()
            }
        } else {
            Plan {
                head,
                ..streaming(3, 200)
            }
        }
    });
    let layer = ConcurrencyLayer::adaptive(1..=500);
    let svc = layer.layer(up.clone());
    let tasks = load(&svc, 3 * c as u64, settle + observe);
    sleep(settle).await;
    let (mut lo, mut hi, mut sum, mut samples) = (usize::MAX, 0, 0, 0);
    while samples < observe.as_secs() as usize {
        sleep(Duration::from_secs(1)).await;
        let l = layer.snapshot().limit;
        lo = lo.min(l);
        hi = hi.max(l);
        sum += l;
        samples += 1;
    }
    let s = layer.snapshot();
    eprintln!(
        "capacity {c}: settled range {lo}..={hi}, mean {}, cuts {}, increases {}",
        sum / samples,
        s.cuts,
        s.increases
    );
    join(tasks).await;
    (lo, hi, sum / samples)
}

#[tokio::test(start_paused = true)]
async fn limit_settles_near_the_true_capacity_and_stays() {
    for (c, settle, observe) in [(20, 300, 1200), (8, 120, 600), (50, 300, 600)] {
        let (lo, hi, mean) =
            settled_range(c, Duration::from_secs(settle), Duration::from_secs(observe)).await;
        assert!(
            lo * 10 >= c * 8 && hi * 10 <= c * 12,
            "capacity {c}: limit ranged {lo}..={hi} (mean {mean}) after settling"
        );
    }
}

// ---------------------------------------------------------------------------
// Cancel safety

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// When a request of the cancellation test is dropped: never (modes 0-2, it
/// completes), after `jitter`, `short` after it was called, or `5 × short`
/// into its body.
async fn cancel_when(
    mode: u64,
    jitter: Duration,
    short: Duration,
    called: tokio::sync::oneshot::Receiver<()>,
    head: Arc<tokio::sync::Notify>,
) {
    match mode {
        0..=2 => std::future::pending::<()>().await,
        3 => sleep(jitter).await,
        4 => {
            let _ = called.await;
            sleep(short).await;
        }
        _ => {
            head.notified().await;
            sleep(short * 5).await;
        }
    }
}

/// After every request of the cancellation test completed or was dropped: no
/// slot, waiter or upstream call is left, the limit always held, no request
/// was admitted twice, and drops happened in every phase (`dropped`: while
/// waiting, called before its head, mid-body).
fn assert_nothing_leaked(
    layer: &ConcurrencyLayer,
    up: &Upstream,
    completed: &[u64],
    dropped: [usize; 3],
    n: usize,
    limit: usize,
) {
    let s = layer.snapshot();
    assert_eq!((s.in_flight, s.waiting.total()), (0, 0));
    assert_eq!(up.live(), 0);
    assert!(up.max_live() <= limit);
    let mut times: HashMap<u64, usize> = HashMap::new();
    for id in up.calls() {
        *times.entry(id).or_default() += 1;
    }
    assert!(times.values().all(|&n| n == 1), "no request admitted twice");
    assert!(completed.iter().all(|id| times.get(id) == Some(&1)));
    eprintln!("completed {} dropped {dropped:?}", completed.len());
    assert_eq!(completed.len() + dropped.iter().sum::<usize>(), n);
    assert!(
        dropped.iter().all(|&n| n > 100),
        "drops while waiting / in flight / mid-body: {dropped:?}"
    );
    assert!(completed.len() >= n * 4 / 10, "{}", completed.len());
}

#[tokio::test(start_paused = true)]
async fn thousands_of_random_cancellations_leak_nothing() {
    const N: u64 = 4000;
    const LIMIT: usize = 8;
    let up = Upstream::new(|id, _| Plan {
        head: Duration::from_millis(50 + (id * 37) % 300),
        ..streaming(2 + (id % 4) as u32, 150)
    });
    let layer = ConcurrencyBuilder::fixed(LIMIT)
        .max_waiting(N as usize)
        .build()
        .unwrap();
    let svc = layer.layer(up.clone());
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    // Where each dropped request really was: waiting, called (before its head), mid-body.
    let dropped_at = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let completed = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for id in 0..N {
        let priority = match rng.below(3) {
            0 => Priority::Interactive,
            1 => Priority::Normal,
            _ => Priority::Background,
        };
        // Half complete; the other half is dropped at a random time, or a random
        // moment after being called, or a random moment into the body.
        let mode = rng.below(6);
        let jitter = Duration::from_millis(rng.below(3000));
        let short = Duration::from_millis(rng.below(40));
        let start = Duration::from_millis(rng.below(10_000));
        let mut c = svc.clone();
        let completed = Arc::clone(&completed);
        let dropped_at = Arc::clone(&dropped_at);
        let up = up.clone();
        let called = up.notify_on_call(id);
        tasks.push(tokio::spawn(async move {
            sleep(start).await;
            let head = Arc::new(tokio::sync::Notify::new());
            let got_head = Arc::new(AtomicUsize::new(0));
            let (h, g) = (Arc::clone(&head), Arc::clone(&got_head));
            let work = async move {
                let resp = send(&mut c, id, Some(priority)).await.await?;
                g.store(1, Ordering::SeqCst);
                h.notify_one();
                let mut body = resp.into_body();
                while let Some(f) = body.frame().await {
                    f?;
                }
                Ok::<_, BoxError>(())
            };
            let trigger = cancel_when(mode, jitter, short, called, head);
            tokio::select! {
                r = work => {
                    r.unwrap_or_else(|e| panic!("request {id} failed: {e}"));
                    completed.lock().unwrap().push(id);
                }
                _ = trigger => {
                    let phase = if got_head.load(Ordering::SeqCst) == 1 {
                        2
                    } else if up.was_called(id) {
                        1
                    } else {
                        0
                    };
                    dropped_at[phase].fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let completed = completed.lock().unwrap();
    let dropped = dropped_at.each_ref().map(|a| a.load(Ordering::SeqCst));
    assert_nothing_leaked(&layer, &up, &completed, dropped, N as usize, LIMIT);
}

// ---------------------------------------------------------------------------
// Observability and configuration

#[tokio::test(start_paused = true)]
async fn tokio_and_tower_timeouts_are_drop_signals_but_timeout_messages_are_not() {
    async fn cuts(err: fn() -> BoxError) -> u64 {
        let svc = tower::service_fn(move |_: Request<()>| async move {
            Err::<Response<http_body_util::Empty<Bytes>>, BoxError>(err())
        });
        let layer = ConcurrencyBuilder::adaptive(1..=20)
            .initial_limit(10)
            .build()
            .unwrap();
        let mut svc = layer.layer(svc);
        let _ = svc.ready().await.unwrap().call(Request::new(())).await;
        layer.snapshot().cuts
    }
    assert_eq!(
        cuts(|| Box::new(tower::timeout::error::Elapsed::new())).await,
        1
    );
    assert_eq!(
        cuts(|| Box::new(io::Error::new(io::ErrorKind::TimedOut, "read"))).await,
        1
    );
    assert_eq!(
        cuts(|| Box::new(io::Error::other(tower::timeout::error::Elapsed::new()))).await,
        1
    );
    assert_eq!(
        cuts(|| "upstream timeout: deadline has elapsed".into()).await,
        0
    );
    assert_eq!(
        cuts(|| Box::new(io::Error::from(io::ErrorKind::ConnectionRefused))).await,
        0
    );
}

#[tokio::test]
#[should_panic(expected = "`concurrency::ResponseFuture` polled after completion")]
async fn polling_a_finished_response_future_panics() {
    let up = Upstream::constant(Plan {
        head: Duration::ZERO,
        ..Plan::default()
    });
    let mut svc = ConcurrencyLayer::fixed(1).layer(up);
    let fut = send(&mut svc, 0, None).await;
    let mut fut = tokio_test::task::spawn(fut);
    while fut.poll().is_pending() {
        tokio::task::yield_now().await;
    }
    let _ = fut.poll();
}

#[test]
fn futures_and_bodies_are_send_for_multi_threaded_clients() {
    fn send<T: Send + Sync>() {}
    fn send_only<T: Send>() {}
    send::<ConcurrencyLayer>();
    send::<Svc>();
    send_only::<Fut>();
    send_only::<ConcurrencyBody<SlowBody>>();
}

#[test]
fn bad_settings_are_typed_errors() {
    assert_eq!(
        ConcurrencyBuilder::fixed(0).build().unwrap_err(),
        ConfigError::ZeroLimit
    );
    assert_eq!(
        ConcurrencyBuilder::adaptive(RangeInclusive::new(8, 4))
            .build()
            .unwrap_err(),
        ConfigError::EmptyRange { min: 8, max: 4 }
    );
    assert_eq!(
        ConcurrencyBuilder::adaptive(2..=4)
            .initial_limit(9)
            .build()
            .unwrap_err(),
        ConfigError::InitialOutOfRange {
            initial: 9,
            min: 2,
            max: 4
        }
    );
    assert!(matches!(
        ConcurrencyBuilder::adaptive(1..=4)
            .decrease_factor(1.0)
            .build(),
        Err(ConfigError::DecreaseFactor(_))
    ));
    assert!(matches!(
        ConcurrencyBuilder::adaptive(1..=4)
            .latency_tolerance(Some(0.5))
            .build(),
        Err(ConfigError::LatencyTolerance(_))
    ));
    assert_eq!(
        ConcurrencyBuilder::adaptive(1..=4)
            .additive_increase(0)
            .build()
            .unwrap_err(),
        ConfigError::ZeroIncrease
    );
    // The shortcuts raise what cannot work instead.
    assert_eq!(ConcurrencyLayer::fixed(0).snapshot().limit, 1);
    assert_eq!(
        ConcurrencyLayer::adaptive(RangeInclusive::new(0, 0))
            .snapshot()
            .limit,
        1
    );
}
