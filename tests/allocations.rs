//! Allocations per request through the preset, against the bare service in
//! the same process (a counting global allocator, so this test has a binary
//! of its own): the layers add at most 8.
//!
//! Not with the `metrics` feature: its counters allocate their labels.
#![cfg(all(
    feature = "retry",
    feature = "budget",
    feature = "concurrency",
    not(feature = "metrics")
))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use tower::util::BoxCloneService;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_llm_limits::budget::Limits;
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::wire::ratelimit::{insert_rate_limit_headers, LimitState};
use tower_llm_limits::BoxError;

/// Counts allocations (and reallocations).
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const REQUEST: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Summarise the attached report in three bullet points."}]}"#;
const ANSWER: &str = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"- Revenue rose 12%."}],"stop_reason":"end_turn","usage":{"input_tokens":42,"output_tokens":19}}"#;
/// Limits far above what the test sends, reported by the answers too.
const HUGE: u64 = 1_000_000_000_000;

type Boxed =
    BoxCloneService<Request<Full<Bytes>>, Response<UnsyncBoxBody<Bytes, BoxError>>, BoxError>;
type Answer = Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// The upstream: the same answer, with the 12 rate-limit headers, to every request.
fn upstream<B>(
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future = Answer>
       + Clone
       + Send
       + 'static {
    let state = Some(LimitState {
        limit: HUGE,
        remaining: HUGE - 1,
        reset_in: Duration::from_millis(10),
    });
    let mut headers = HeaderMap::new();
    insert_rate_limit_headers(&mut headers, &[state; 3], SystemTime::now());
    let headers = Arc::new(headers);
    service_fn(move |_req: Request<B>| {
        let mut resp = Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
        *resp.headers_mut() = (*headers).clone();
        ready(Ok(resp))
    })
}

fn boxed_body<B>(resp: Response<B>) -> Response<UnsyncBoxBody<Bytes, BoxError>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    resp.map(|b| b.map_err(Into::into).boxed_unsync())
}

/// The request of `benches/preset.rs`. Header values made at run time
/// (`HeaderValue::from_str`) would cost one allocation more each when the
/// retry layer first copies the request's head (the bytes are then shared),
/// as they do under tower's `Retry`; values read by hyper from a connection
/// are shared already.
fn request() -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::from_static(REQUEST.as_bytes())));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("http://127.0.0.1/v1/messages");
    let h = req.headers_mut();
    h.insert(
        "anthropic-version",
        http::HeaderValue::from_static("2023-06-01"),
    );
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    req
}

/// Allocations per request through `svc`, after a warm-up.
async fn per_request(mut svc: Boxed) -> f64 {
    const N: usize = 500;
    let one = async |svc: &mut Boxed| {
        let resp = svc.ready().await.unwrap().call(request()).await.unwrap();
        resp.into_body().collect().await.unwrap();
    };
    for _ in 0..N {
        one(&mut svc).await;
    }
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for _ in 0..N {
        one(&mut svc).await;
    }
    (ALLOCATIONS.load(Ordering::SeqCst) - before) as f64 / N as f64
}

/// The preset (retry, budget, concurrency) allocates at most 8 times per
/// request beyond the bare service (11 before its budget kept the ledger in
/// its key entries, the attempts' wait logs held the dispatch marker and
/// model names were shared).
#[tokio::test(flavor = "current_thread")]
async fn the_preset_adds_at_most_8_allocations_per_request() {
    let bare = BoxCloneService::new(
        ServiceBuilder::new()
            .map_response(boxed_body)
            .map_err(BoxError::from)
            .service(upstream()),
    );
    let preset = BoxCloneService::new(
        ServiceBuilder::new()
            .map_response(boxed_body)
            .layer(LimitsLayer::anthropic(
                Limits::new().rpm(HUGE).itpm(HUGE).otpm(HUGE),
            ))
            .service(upstream()),
    );
    let bare = per_request(bare).await;
    let preset = per_request(preset).await;
    eprintln!("allocations per request: bare {bare}, preset {preset}");
    assert!(
        preset - bare <= 8.0,
        "the preset adds {} allocations per request (bare {bare})",
        preset - bare
    );
}
