//! The SSE decoder over arbitrary streams and chunkings.
//!
//! Input: the stream's bytes. The chunking is drawn from the bytes
//! themselves (each chunk's length from the byte where it starts), so every
//! corpus file is a plain stream.
//!
//! Asserts: no panic; the same events whole, byte by byte and in the drawn
//! chunks; a decoder bounded at `max_len` never dispatches data longer than
//! that.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_llm_limits::wire::sse::{SseDecoder, SseEvent};

fn decode<'a>(mut decoder: SseDecoder, chunks: impl Iterator<Item = &'a [u8]>) -> Vec<SseEvent> {
    let mut events = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        while let Some(e) = decoder.next_event() {
            events.push(e);
        }
    }
    decoder.finish();
    while let Some(e) = decoder.next_event() {
        events.push(e);
    }
    events
}

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
    let whole = decode(SseDecoder::new(), std::iter::once(data));
    let bytes = decode(SseDecoder::new(), data.chunks(1));
    assert_eq!(whole, bytes);
    let chunked = decode(SseDecoder::new(), drawn(data));
    assert_eq!(whole, chunked);
    let max_len = 1 + data.first().map_or(0, |&b| b as usize) * 4;
    for event in decode(SseDecoder::new().with_max_len(max_len), drawn(data)) {
        assert!(event.data.len() <= max_len);
    }
    for event in &whole {
        let _ = event.kind();
        let _ = event.to_bytes();
    }
});
