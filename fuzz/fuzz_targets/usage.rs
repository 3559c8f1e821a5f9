//! The usage readers over arbitrary response bodies: `usage_of`, the event
//! stream reader `StreamUsage` and the JSON `UsageScanner`.
//!
//! Input: the response body's bytes, chunked as drawn from the bytes.
//!
//! Asserts: no panic; the same usage and end whatever the chunking; for a
//! JSON body, the scanner agrees with `usage_of`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_llm_limits::wire::json::UsageScanner;
use tower_llm_limits::wire::{usage_of, StreamUsage};

/// Chunks whose lengths (1 to 64) are drawn from the data.
fn drawn(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        let first = *rest.first()?;
        let n = (1 + (first as usize * 31) % 64).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

fuzz_target!(|data: &[u8]| {
    let usage = usage_of(data);

    let mut whole = StreamUsage::new();
    whole.push(data);
    whole.finish();
    let mut chunked = StreamUsage::new();
    for chunk in drawn(data) {
        chunked.push(chunk);
    }
    chunked.finish();
    assert_eq!(whole.usage(), chunked.usage());
    assert_eq!(whole.end(), chunked.end());
    assert_eq!(whole.started(), chunked.started());

    let mut scanner = UsageScanner::new();
    for chunk in drawn(data) {
        scanner.push(chunk);
    }
    if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        assert_eq!(usage, scanner.usage());
    } else if whole.started() {
        assert_eq!(usage, Some(whole.usage()));
    }
});
