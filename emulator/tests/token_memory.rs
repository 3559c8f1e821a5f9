//! The token counter's memory is bounded by a small multiple of the body's
//! size, whatever the body holds: a counting global allocator (this test
//! binary's own) records the peak of live heap bytes while one body is
//! counted.
//!
//! The bound checked is [`K`] times the body size. Before the value budget,
//! a 4 MiB `[0,0,...]` body took about 18 times its size (a 32-byte tree
//! node for each 2-byte value, and the array's growth).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tower_llm_limits_emulator::TokenCounter;

/// Live heap bytes, and their peak since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// counters are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(live, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grown = new_size - layout.size();
                let live = LIVE.fetch_add(grown, Ordering::SeqCst) + grown;
                // A moving realloc holds both blocks for a moment.
                PEAK.fetch_max(live + layout.size(), Ordering::SeqCst);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The bound: peak heap while counting, at most `K` times the body size.
const K: usize = 4;
const MIB: usize = 1024 * 1024;

/// One test at a time: the counters are global.
static SERIAL: Mutex<()> = Mutex::new(());

/// Peak live heap bytes, above what was live before, while counting `body`.
fn peak_while_counting(body: &[u8]) -> (usize, Result<u64, String>) {
    peak_while_counting_with(TokenCounter::words(), body)
}

/// The same with another counter (its tables loaded before, so not counted).
fn peak_while_counting_with(counter: TokenCounter, body: &[u8]) -> (usize, Result<u64, String>) {
    let _ =
        counter.count_request(br#"{"model":"m","messages":[{"role":"user","content":"warm"}]}"#);
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let result = counter.count_request(body);
    (PEAK.load(Ordering::SeqCst) - before, result)
}

/// `[0,0,...,0]` of about `len` bytes.
fn zeros(len: usize) -> String {
    let mut s = String::with_capacity(len + 2);
    s.push('[');
    while s.len() + 2 < len {
        s.push_str("0,");
    }
    s.push_str("0]");
    s
}

fn check(name: &str, body: &[u8]) -> Result<u64, String> {
    let (peak, result) = peak_while_counting(body);
    let ratio = peak as f64 / body.len() as f64;
    eprintln!(
        "{name}: body {} bytes, peak {peak} bytes ({ratio:.2} x), {result:?}",
        body.len()
    );
    assert!(
        peak <= K * body.len(),
        "{name}: counting took {peak} bytes at peak, {ratio:.1} times the body, over {K} times"
    );
    result
}

#[test]
fn a_body_of_zeros_stays_within_k_times_its_size() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let body = zeros(4 * MIB);
    let result = check("[0,0,...]", body.as_bytes());
    assert!(result.is_err(), "a list is not a request");
}

#[test]
fn zeros_inside_a_request_stay_within_k_times_the_body() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[{{"role":"assistant","content":[{{"type":"tool_use","id":"t","name":"f","input":{{"x":{}}}}}]}}]}}"#,
        zeros(4 * MIB)
    );
    let result = check("tool input [0,0,...]", body.as_bytes());
    let message = result.expect_err("refused by the value budget");
    assert!(message.contains("JSON values"), "{message}");
}

#[test]
fn a_large_text_prompt_is_counted_within_k_times_its_size() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let text = "word, ".repeat(4 * MIB / 6);
    let body = serde_json::json!({"model":"claude-sonnet-4-5","max_tokens":5,
        "messages":[{"role":"user","content":[{"type":"text","text":text}]}]});
    let body = serde_json::to_vec(&body).expect("serialize");
    let tokens = check("text", &body).expect("a valid request");
    // "word" (1) and "," (1) per repetition, plus the message's framing.
    assert_eq!(tokens, 2 * (4 * MIB / 6) as u64 + 3);
}

#[test]
fn many_small_values_within_the_budget_are_counted_within_k_times() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A tool input of short strings, each with more than 16 bytes of body:
    // under the budget, so read into a tree and counted.
    let items: Vec<String> = (0..200_000).map(|i| format!("item-{i:011}")).collect();
    let body = serde_json::json!({"model":"claude-sonnet-4-5","max_tokens":5,
        "messages":[{"role":"assistant","content":[
            {"type":"tool_use","id":"t","name":"f","input":{"items":items}}]}]});
    let body = serde_json::to_vec(&body).expect("serialize");
    let tokens = check("strings", &body).expect("within the budget");
    assert!(tokens > 200_000, "{tokens}");
}

/// The default tokenizer, `o200k_base`, encodes a long text in pieces of
/// 64 KiB: its memory stays within the same bound as the word rule's.
#[test]
fn a_large_text_prompt_under_o200k_stays_within_k_times_its_size() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(MIB / 2 / 45);
    let body = serde_json::json!({"model":"claude-sonnet-4-5","max_tokens":5,
        "messages":[{"role":"user","content":[{"type":"text","text":text}]}]});
    let body = serde_json::to_vec(&body).expect("serialize");
    let (peak, result) = peak_while_counting_with(TokenCounter::default(), &body);
    let tokens = result.expect("a valid request");
    assert!(
        peak <= K * body.len(),
        "o200k: {peak} bytes at peak for a body of {}",
        body.len()
    );
    // Ten tokens per sentence (its nine words with their spaces, and the
    // period), plus the message's framing, give or take the piece edges.
    let sentences = (MIB / 2 / 45) as u64;
    assert!(tokens.abs_diff(10 * sentences + 3) <= 20, "{tokens}");
}
