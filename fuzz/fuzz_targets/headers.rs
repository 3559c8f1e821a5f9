//! The rate-limit header parser over arbitrary header maps.
//!
//! Input: lines `name: value` (split at `\n`, then at the first `:`; one
//! leading space of the value is dropped). A line whose name or value is not
//! a valid header is skipped, as `http` would refuse it before the parser.
//! Names may repeat.
//!
//! Asserts: no panic; a `retry-after` read is at most the parser's bound
//! (366 days); the same map read twice gives the same snapshot.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tower_llm_limits::headers::RateLimitSnapshot;

/// The parser's bound on any delay or reset: one year (366 days).
const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);

/// Each header whose value goes through one of the parser's readers:
/// delta-seconds or HTTP-date, milliseconds, RFC 3339, Go durations.
const READERS: [&str; 4] = [
    "retry-after",
    "retry-after-ms",
    "anthropic-ratelimit-tokens-reset",
    "x-ratelimit-reset-requests",
];

fn header_map(data: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let value = value.get(1..).unwrap_or_default();
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    map
}

fuzz_target!(|data: &[u8]| {
    let map = header_map(data);
    let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let snapshot = RateLimitSnapshot::from_headers_at(&map, now);
    if let Some(delay) = snapshot.retry_after {
        assert!(delay <= MAX_DELAY, "retry-after {delay:?} above the bound");
    }
    assert_eq!(snapshot, RateLimitSnapshot::from_headers_at(&map, now));
    let _ = snapshot.exhausted_reset();
    // Every value through every reader, one header at a time.
    for value in map.values() {
        for name in READERS {
            let mut one = HeaderMap::new();
            one.insert(HeaderName::from_static(name), value.clone());
            let s = RateLimitSnapshot::from_headers_at(&one, now);
            if let Some(delay) = s.retry_after {
                assert!(delay <= MAX_DELAY, "{name}: {delay:?} above the bound");
            }
            if let Some(reset) = s.tokens.reset_in.or(s.requests.reset_in) {
                assert!(
                    reset <= MAX_DELAY,
                    "{name}: reset {reset:?} above the bound"
                );
            }
        }
    }
});
