//! What a gateway's callers cost in memory: bytes per idle caller key (a
//! counting global allocator, so this test has a binary of its own), and the
//! eviction of idle keys on later admissions.
#![cfg(feature = "budget")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_llm_limits::budget::{Callers, Limits, TokenBudgetLayer};

/// Counts the bytes allocated and not yet freed.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const KEYS: usize = 5_000;

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("http://gw.test/v1/messages")
        .header("x-api-key", key)
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"Hi"}]}"#,
        )))
        .unwrap()
}

/// One request from each of 5,000 fresh keys: each key's state (the
/// budget's and the ledger's) stays small, and all of it is freed once the
/// keys have been idle past the eviction time and more requests arrive.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn idle_caller_keys_are_small_and_evicted() {
    let upstream = service_fn(|_req: Request<_>| async {
        let body = r#"{"type":"message","usage":{"input_tokens":10,"output_tokens":20}}"#;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    });
    let layer = TokenBudgetLayer::enforce(
        Limits::new().rpm(50).itpm(30_000).otpm(8_000),
        Callers::any_key_unauthenticated(),
    );
    let mut svc = layer.layer(upstream);
    // Warm up (first-use allocations of the runtime, the estimator).
    for i in 0..10 {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(request(&format!("warm-{i}")))
            .await
            .unwrap();
        r.into_body().collect().await.unwrap();
    }
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..KEYS {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(request(&format!("sk-fresh-{i}")))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.into_body().collect().await.unwrap();
    }
    let per_key = (LIVE.load(Ordering::Relaxed) - before) / KEYS as isize;
    eprintln!("bytes per idle caller key: {per_key}");
    assert!(
        per_key <= 256,
        "{per_key} bytes per idle key (237 measured; 652, 1,107 and 4,202 before)"
    );
    assert_eq!(layer.snapshot().keys.len(), KEYS + 10);

    // Idle past the eviction time: the next admissions sweep them out.
    tokio::time::sleep(Duration::from_secs(11 * 60)).await;
    for i in 0..20 {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(request(&format!("sk-later-{i}")))
            .await
            .unwrap();
        r.into_body().collect().await.unwrap();
    }
    let kept = layer.snapshot().keys.len();
    assert!(kept <= 20, "{kept} keys kept after they went idle");
    let left = LIVE.load(Ordering::Relaxed) - before;
    eprintln!("bytes left after eviction: {left}");
    assert!(left < 200 * 1024, "{left} bytes left after eviction");
}

/// Calls the service once with `key`'s request and reads the answer.
async fn call<S, B>(svc: &mut S, key: &str)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let r = svc.ready().await.unwrap().call(request(key)).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();
}

/// Admission latencies of `n` requests from known keys, sorted (wall clock).
async fn latencies<S, B>(svc: &mut S, n: usize, keys: usize) -> Vec<Duration>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("sk-caller-{}", (i * 7_919) % keys);
        let t = std::time::Instant::now();
        call(svc, &key).await;
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn summary(sorted: &[Duration]) -> String {
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    format!(
        "median {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

/// A report, not a check of speed (run it in release with `--ignored
/// --nocapture`): 100,000 callers in enforce mode, their memory, the time to
/// create a key, a snapshot and a sweep over all of them, and admission
/// latencies while snapshots run in a loop on another thread against the
/// same without. The memory is asserted (it does not depend on the machine).
#[tokio::test(flavor = "current_thread", start_paused = true)]
#[ignore = "a report: cargo test --release --test gateway_memory -- --ignored --nocapture"]
async fn report_100k_callers() {
    const CALLERS: usize = 100_000;
    let upstream = service_fn(|_req: Request<_>| async {
        let body = r#"{"type":"message","usage":{"input_tokens":10,"output_tokens":20}}"#;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    });
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(50).itpm(30_000).otpm(8_000))
        .enforce(Callers::any_key_unauthenticated())
        .max_keys(2 * CALLERS)
        .build();
    let mut svc = layer.layer(upstream);
    for i in 0..10 {
        call(&mut svc, &format!("warm-{i}")).await;
    }
    let before = LIVE.load(Ordering::Relaxed);
    let names: Vec<String> = (0..CALLERS).map(|i| format!("sk-caller-{i}")).collect();
    let names_bytes = LIVE.load(Ordering::Relaxed) - before;
    let t = std::time::Instant::now();
    for name in &names {
        call(&mut svc, name).await;
    }
    let per_new_key = t.elapsed() / CALLERS as u32;
    let per_key = (LIVE.load(Ordering::Relaxed) - before - names_bytes) / CALLERS as isize;
    let t = std::time::Instant::now();
    for name in names.iter().take(CALLERS / 10) {
        call(&mut svc, name).await;
    }
    let per_known_key = t.elapsed() / (CALLERS / 10) as u32;
    eprintln!("{CALLERS} callers: {per_key} B per idle caller (budget and ledger)");
    eprintln!(
        "request from a new caller: {per_new_key:?}; from a known one: {per_known_key:?} \
         (key creation: the difference)"
    );
    assert!(per_key <= 256, "{per_key} bytes per idle caller");

    let t = std::time::Instant::now();
    let snapshot = layer.snapshot();
    eprintln!(
        "snapshot() of {} keys: {:?}",
        snapshot.keys.len(),
        t.elapsed()
    );
    drop(snapshot);
    let t = std::time::Instant::now();
    let dropped = layer.forget_idle(Duration::from_secs(3_600));
    eprintln!("forget_idle() over all keys (none idle): {:?}", t.elapsed());
    assert_eq!(dropped, 0);

    let quiet = latencies(&mut svc, 50_000, CALLERS).await;
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let snapshots = std::thread::spawn({
        let (layer, taken) = (layer.clone(), std::sync::Arc::clone(&taken));
        move || {
            for _ in 0..5 {
                assert_eq!(layer.snapshot().keys.len(), CALLERS + 10);
                taken.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    // Admissions go on for as long as the snapshots run.
    let mut busy = Vec::new();
    while taken.load(Ordering::Relaxed) < 5 {
        busy.extend(latencies(&mut svc, 5_000, CALLERS).await);
    }
    snapshots.join().unwrap();
    busy.sort();
    let taken = taken.load(Ordering::Relaxed);
    eprintln!("admission, no snapshot running: {}", summary(&quiet));
    eprintln!(
        "admission while {taken} snapshots ran back to back ({} requests): {}",
        busy.len(),
        summary(&busy)
    );
}
