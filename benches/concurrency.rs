//! ConcurrencyLayer against tower's `ConcurrencyLimit` and tokio's `Semaphore`.
//!
//! Run: `cargo bench --bench concurrency -- --warm-up-time 1 --measurement-time 3`
//!
//! - `fixed_overhead/*`: one request at a time through a trivially ready inner
//!   service (response body read to its end): no limit, tower's
//!   `ConcurrencyLimit`, and `ConcurrencyLayer::fixed`.
//! - `contended/*`: 32 tasks share a cap of 4 on a current-thread runtime.
//! - `queue_10k/*`: 10,000 queued waiters drained one admission at a time, ours
//!   against tokio's `Semaphore` (which tower uses).
//! - `cancel_100k/*`: 100,000 queued waiters cancelled (dropped) oldest-first
//!   and newest-first, ours against tokio's `Semaphore`; each order must
//!   stay within 2x of the oldest-first time (removal is O(1), not a search).
//! - Before the timings, `fixed_overhead`'s three services are measured in
//!   interleaved rounds (robust to the machine's load changing between
//!   them): the median of each round's ratio of `ConcurrencyLayer::fixed`
//!   to tower's `ConcurrencyLimit` is the figure to compare.
//! - Then a one-shot measurement prints the memory per waiter
//!   (counting global allocator) and the wakeups per admission (counting
//!   wakers) for a queue of 10,000.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_llm_limits::concurrency::ConcurrencyBuilder;

// ---------------------------------------------------------------------------
// A global allocator that counts live bytes.

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---------------------------------------------------------------------------

type Req = Request<()>;
type Resp = Response<Full<Bytes>>;

fn inner() -> impl Service<Req, Response = Resp, Error = Infallible, Future: Send> + Clone + Send {
    service_fn(|_req: Req| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

async fn one<S, B>(svc: &mut S)
where
    S: Service<Req, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(Request::new(()))
        .await
        .expect("ok");
    black_box(resp.into_body().collect().await.expect("body"));
}

fn fixed_overhead(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("fixed_overhead");
    g.bench_function("no_limit", |b| {
        b.iter_custom(|iters| {
            let mut svc = inner();
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    one(&mut svc).await;
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("tower_concurrency_limit", |b| {
        b.iter_custom(|iters| {
            let mut svc = tower::limit::ConcurrencyLimit::new(inner(), 64);
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    one(&mut svc).await;
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("concurrency_layer_fixed", |b| {
        b.iter_custom(|iters| {
            let layer = ConcurrencyBuilder::fixed(64).build().expect("valid");
            let mut svc = layer.layer(inner());
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    one(&mut svc).await;
                }
                t.elapsed()
            })
        })
    });
    g.finish();
}

/// `tasks` tasks each sending `per_task` requests through clones of `svc`; the
/// inner service yields once so that requests overlap.
async fn contend<S, B>(svc: S, tasks: usize, per_task: u64)
where
    S: Service<Req, Response = Response<B>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
    B: http_body::Body + Send,
    B::Error: std::fmt::Debug,
    B::Data: Send,
{
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let mut s = svc.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                one(&mut s).await;
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
}

fn yielding() -> impl Service<Req, Response = Resp, Error = Infallible, Future: Send> + Clone + Send
{
    service_fn(|_req: Req| async {
        tokio::task::yield_now().await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

fn contended(c: &mut Criterion) {
    let rt = runtime();
    const TASKS: usize = 32;
    let mut g = c.benchmark_group("contended");
    g.bench_function("tower_concurrency_limit", |b| {
        b.iter_custom(|iters| {
            let svc = tower::limit::ConcurrencyLimit::new(yielding(), 4);
            let per = iters.div_ceil(TASKS as u64);
            rt.block_on(async {
                let t = Instant::now();
                contend(svc, TASKS, per).await;
                t.elapsed() * iters as u32 / (per * TASKS as u64) as u32
            })
        })
    });
    g.bench_function("concurrency_layer_fixed", |b| {
        b.iter_custom(|iters| {
            let layer = ConcurrencyBuilder::fixed(4).build().expect("valid");
            let svc = layer.layer(yielding());
            let per = iters.div_ceil(TASKS as u64);
            rt.block_on(async {
                let t = Instant::now();
                contend(svc, TASKS, per).await;
                t.elapsed() * iters as u32 / (per * TASKS as u64) as u32
            })
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------
// A queue of 10,000 waiters.

const WAITERS: usize = 10_000;

/// A waker that counts its wakes and puts its waiter on a ready list.
struct Tracked {
    index: usize,
    wakes: Arc<AtomicUsize>,
    ready: Arc<Mutex<VecDeque<usize>>>,
}

impl Wake for Tracked {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
        self.ready.lock().expect("lock").push_back(self.index);
    }
}

struct QueueRun {
    bytes_per_waiter: f64,
    wakes: usize,
    admissions: usize,
    elapsed: Duration,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T>>>;

/// Queue `WAITERS` futures behind one held slot, poll each once, then release
/// one slot at a time, polling only the futures that were woken.
fn drain_queue<T>(
    mut make: impl FnMut() -> BoxFut<T>,
    release_first: impl FnOnce(),
    mut on_admitted: impl FnMut(T),
) -> QueueRun {
    let wakes = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(Mutex::new(VecDeque::new()));
    let before = LIVE.load(Ordering::SeqCst);
    let mut futs: Vec<Option<BoxFut<T>>> = Vec::with_capacity(WAITERS);
    let mut wakers = Vec::with_capacity(WAITERS);
    for index in 0..WAITERS {
        let mut f = make();
        let waker = Waker::from(Arc::new(Tracked {
            index,
            wakes: Arc::clone(&wakes),
            ready: Arc::clone(&ready),
        }));
        assert!(f
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        futs.push(Some(f));
        wakers.push(waker);
    }
    let after = LIVE.load(Ordering::SeqCst);
    let bytes_per_waiter = after.saturating_sub(before) as f64 / WAITERS as f64;
    let t = Instant::now();
    release_first();
    let mut admissions = 0;
    loop {
        let next = ready.lock().expect("lock").pop_front();
        let Some(i) = next else { break };
        let Some(f) = futs[i].as_mut() else { continue };
        if let Poll::Ready(out) = f.as_mut().poll(&mut Context::from_waker(&wakers[i])) {
            futs[i] = None;
            admissions += 1;
            // Releases the slot at once: the next waiter is woken.
            on_admitted(out);
        }
    }
    QueueRun {
        bytes_per_waiter,
        wakes: wakes.load(Ordering::SeqCst),
        admissions,
        elapsed: t.elapsed(),
    }
}

fn ours_queue() -> QueueRun {
    let rt = runtime();
    let _guard = rt.enter();
    let layer = ConcurrencyBuilder::fixed(1)
        .max_waiting(WAITERS)
        .build()
        .expect("valid");
    let mut svc = layer.layer(inner());
    let held = rt.block_on(async {
        svc.ready()
            .await
            .expect("ready")
            .call(Request::new(()))
            .await
            .expect("ok")
    });
    let mut held = Some(held);
    let run = drain_queue(
        || {
            let fut = svc.call(Request::new(()));
            Box::pin(fut)
        },
        || drop(held.take()),
        drop,
    );
    assert_eq!(layer.snapshot().in_flight, 0);
    run
}

fn tokio_queue() -> QueueRun {
    let sem = Arc::new(tokio::sync::Semaphore::new(1));
    let held = Arc::clone(&sem).try_acquire_owned().expect("free");
    let mut held = Some(held);
    drain_queue(
        || {
            let s = Arc::clone(&sem);
            Box::pin(async move { s.acquire_owned().await })
        },
        || drop(held.take()),
        drop,
    )
}

fn queue_figures() {
    let ours = ours_queue();
    let theirs = tokio_queue();
    println!(
        "queue of {WAITERS} waiters (ConcurrencyLayer): {:.0} bytes per waiter ({:.2} of 1 KB), \
         {} wakeups for {} admissions ({:.3} per admission), drained in {:?}",
        ours.bytes_per_waiter,
        ours.bytes_per_waiter / 1024.0,
        ours.wakes,
        ours.admissions,
        ours.wakes as f64 / ours.admissions as f64,
        ours.elapsed,
    );
    println!(
        "queue of {WAITERS} waiters (tokio Semaphore, for scale): {:.0} bytes per waiter, \
         {:.3} wakeups per admission, drained in {:?}",
        theirs.bytes_per_waiter,
        theirs.wakes as f64 / theirs.admissions as f64,
        theirs.elapsed,
    );
    assert_eq!(ours.admissions, WAITERS);
    assert!(ours.bytes_per_waiter < 1024.0);
}

fn queue_10k(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_10k");
    g.sample_size(10);
    g.bench_function("tokio_semaphore", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| tokio_queue().elapsed).sum())
    });
    g.bench_function("concurrency_layer_fixed", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| ours_queue().elapsed).sum())
    });
    g.finish();
}

// ---------------------------------------------------------------------------
// Cancelling 100,000 waiters.

const CANCELLED: usize = 100_000;

#[derive(Clone, Copy)]
enum Order {
    OldestFirst,
    NewestFirst,
}

/// Queues `CANCELLED` futures (each polled once), then times dropping them
/// all in `order`.
fn cancel_all<T>(mut make: impl FnMut() -> BoxFut<T>, order: Order) -> Duration {
    let waker = Waker::noop();
    let mut futs: Vec<BoxFut<T>> = Vec::with_capacity(CANCELLED);
    for _ in 0..CANCELLED {
        let mut f = make();
        assert!(f
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_pending());
        futs.push(f);
    }
    let t = Instant::now();
    match order {
        Order::OldestFirst => futs.into_iter().for_each(drop),
        Order::NewestFirst => futs.into_iter().rev().for_each(drop),
    }
    t.elapsed()
}

fn ours_cancel(order: Order) -> Duration {
    let rt = runtime();
    let _guard = rt.enter();
    let layer = ConcurrencyBuilder::fixed(1)
        .max_waiting(CANCELLED)
        .build()
        .expect("valid");
    let mut svc = layer.layer(inner());
    let held = rt.block_on(async {
        svc.ready()
            .await
            .expect("ready")
            .call(Request::new(()))
            .await
            .expect("ok")
    });
    let elapsed = cancel_all(|| Box::pin(svc.call(Request::new(()))), order);
    assert_eq!(layer.snapshot().waiting.total(), 0);
    drop(held);
    elapsed
}

fn tokio_cancel(order: Order) -> Duration {
    let sem = Arc::new(tokio::sync::Semaphore::new(1));
    let _held = Arc::clone(&sem).try_acquire_owned().expect("free");
    cancel_all(
        || {
            let s = Arc::clone(&sem);
            Box::pin(async move { s.acquire_owned().await })
        },
        order,
    )
}

fn cancel_100k(c: &mut Criterion) {
    let mut g = c.benchmark_group("cancel_100k");
    g.sample_size(10);
    for (name, order) in [
        ("oldest_first", Order::OldestFirst),
        ("newest_first", Order::NewestFirst),
    ] {
        g.bench_function(format!("tokio_semaphore_{name}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| tokio_cancel(order)).sum())
        });
        g.bench_function(format!("concurrency_layer_{name}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| ours_cancel(order)).sum())
        });
    }
    g.finish();
}

criterion_group!(benches, fixed_overhead, contended, queue_10k, cancel_100k);

/// `CONCURRENCY_PROFILE=<no_limit|tower|fixed>[:<requests>]`: only that
/// service of `fixed_overhead`, for a fixed number of requests (default
/// 200,000) after a warm-up, then exit; for an instruction-counting
/// profiler (`valgrind --tool=callgrind`), whose counts do not depend on the
/// machine's load.
fn profile(spec: &str) {
    let (name, n) = match spec.split_once(':') {
        Some((name, n)) => (
            name,
            n.parse().expect("CONCURRENCY_PROFILE=<service>:<requests>"),
        ),
        None => (spec, 200_000u64),
    };
    async fn run<S, B>(mut svc: S, n: u64) -> Duration
    where
        S: Service<Req, Response = Response<B>>,
        S::Error: std::fmt::Debug,
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        for _ in 0..1_000 {
            one(&mut svc).await;
        }
        let t = Instant::now();
        for _ in 0..n {
            one(&mut svc).await;
        }
        t.elapsed()
    }
    let rt = runtime();
    let took = match name {
        "no_limit" => rt.block_on(run(inner(), n)),
        "tower" => rt.block_on(run(tower::limit::ConcurrencyLimit::new(inner(), 64), n)),
        "fixed" => {
            let layer = ConcurrencyBuilder::fixed(64).build().expect("valid");
            rt.block_on(run(layer.layer(inner()), n))
        }
        other => panic!("CONCURRENCY_PROFILE: unknown service {other:?}"),
    };
    println!(
        "{name}: {n} requests, {:.0} ns each",
        took.as_nanos() as f64 / n as f64
    );
}

/// `fixed_overhead`'s three services measured in interleaved rounds: each
/// round times a batch of requests through each of them, one after the
/// other, so that a change in the machine's load between rounds moves all
/// three alike; the figure is the median over the rounds of each round's
/// ratio, with its quartiles.
fn interleaved_ratios() {
    // Short batches (well under a scheduler's time slice), many rounds: a
    // round that the loaded machine preempted is an outlier the median
    // drops.
    const ROUNDS: usize = 301;
    const BATCH: u64 = 2_000;
    async fn batch<S, B>(svc: &mut S) -> f64
    where
        S: Service<Req, Response = Response<B>>,
        S::Error: std::fmt::Debug,
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let t = Instant::now();
        for _ in 0..BATCH {
            one(svc).await;
        }
        t.elapsed().as_nanos() as f64 / BATCH as f64
    }
    let rt = runtime();
    let mut bare = inner();
    let mut tower = tower::limit::ConcurrencyLimit::new(inner(), 64);
    let mut ours = ConcurrencyBuilder::fixed(64)
        .build()
        .expect("valid")
        .layer(inner());
    let mut rows: Vec<(f64, f64, f64)> = Vec::with_capacity(ROUNDS);
    rt.block_on(async {
        // Warm-up round, not counted.
        batch(&mut bare).await;
        batch(&mut tower).await;
        batch(&mut ours).await;
        for _ in 0..ROUNDS {
            let b = batch(&mut bare).await;
            let t = batch(&mut tower).await;
            let o = batch(&mut ours).await;
            rows.push((b, t, o));
        }
    });
    // The quartiles and the median.
    let median = |mut v: Vec<f64>| -> (f64, f64, f64) {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 4], v[v.len() / 2], v[v.len() * 3 / 4])
    };
    let (_, b, _) = median(rows.iter().map(|r| r.0).collect());
    let (_, t, _) = median(rows.iter().map(|r| r.1).collect());
    let (_, o, _) = median(rows.iter().map(|r| r.2).collect());
    let (lo, mid, hi) = median(rows.iter().map(|r| r.2 / r.1).collect());
    println!(
        "fixed_overhead, {ROUNDS} interleaved rounds of {BATCH} requests (medians): no limit {b:.0} ns, \
         tower ConcurrencyLimit {t:.0} ns, ConcurrencyLayer::fixed {o:.0} ns; \
         fixed / tower per round: median {mid:.2}x (quartiles {lo:.2}x and {hi:.2}x; target <= 1.3x)"
    );
}

fn main() {
    if let Ok(spec) = std::env::var("CONCURRENCY_PROFILE") {
        profile(&spec);
        return;
    }
    interleaved_ratios();
    queue_figures();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
