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
        per_key < 1_500,
        "{per_key} bytes per idle key (4,202 before)"
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
