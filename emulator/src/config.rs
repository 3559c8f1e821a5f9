//! The emulator's settings: latency, faults, acceleration limit, output length.

use std::time::Duration;

use super::rng::Rng;

/// The seeded latency model.
///
/// A non-streaming answer arrives after `time_to_first_token + n *
/// per_output_token` (times the request's jitter factor); a streamed one
/// sends its head and `message_start` at once, its first text delta after
/// `time_to_first_token`, then one delta per `tokens_per_delta` tokens, each
/// paced by `per_output_token` per token. The answer begins at the time to
/// first token: from then on, the prompt-cache prefixes it wrote are
/// readable.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_llm_limits_emulator::Latency;
///
/// let fast = Latency::none();
/// assert_eq!(fast.per_output_token, Duration::ZERO);
/// let model = Latency::default().with_jitter(0.0);
/// assert_eq!(model.time_to_first_token, Duration::from_millis(600));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Time from admission to the first output token.
    pub time_to_first_token: Duration,
    /// Time per output token after the first.
    pub per_output_token: Duration,
    /// Relative jitter: each request's times are multiplied by a factor drawn
    /// uniformly in `[1 - jitter, 1 + jitter]` (clamped at zero).
    pub jitter: f64,
    /// Output tokens per `content_block_delta` event (at least 1).
    pub tokens_per_delta: u64,
}

impl Default for Latency {
    /// 600 ms to the first token, 15 ms per token (about 67 tokens per
    /// second), ±25% jitter, 8 tokens per delta.
    fn default() -> Self {
        Latency {
            time_to_first_token: Duration::from_millis(600),
            per_output_token: Duration::from_millis(15),
            jitter: 0.25,
            tokens_per_delta: 8,
        }
    }
}

impl Latency {
    /// No delay at all: answers come back at once (useful in tests).
    pub const fn none() -> Self {
        Latency {
            time_to_first_token: Duration::ZERO,
            per_output_token: Duration::ZERO,
            jitter: 0.0,
            tokens_per_delta: 8,
        }
    }

    /// With the time to first token set.
    pub const fn with_time_to_first_token(mut self, ttft: Duration) -> Self {
        self.time_to_first_token = ttft;
        self
    }

    /// With the time per output token set.
    pub const fn with_per_output_token(mut self, per_token: Duration) -> Self {
        self.per_output_token = per_token;
        self
    }

    /// With the relative jitter set (for example `0.2` for ±20%).
    pub const fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// With the number of output tokens per streamed delta set (at least 1).
    pub const fn with_tokens_per_delta(mut self, tokens: u64) -> Self {
        self.tokens_per_delta = tokens;
        self
    }

    /// Draws the request's jitter factor.
    pub(crate) fn factor(&self, rng: &mut Rng) -> f64 {
        let j = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        (1.0 + j * (2.0 * rng.next_f64() - 1.0)).max(0.0)
    }
}

/// Scales a duration by a non-negative finite factor (saturating).
pub(crate) fn scale(d: Duration, factor: f64) -> Duration {
    let secs = d.as_secs_f64() * factor;
    if secs.is_finite() && secs > 0.0 {
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    } else {
        Duration::ZERO
    }
}

/// Faults injected at chosen rates (probabilities per request, `0.0` to `1.0`).
///
/// For each `POST /v1/messages` that passes validation, one draw picks at most
/// one of `overloaded`, `server_error`, `connection_reset` and `slow` (so their
/// sum should stay at or below 1); a streamed request that is not otherwise
/// faulted then draws `stream_error`.
///
/// - `overloaded`: `529 overloaded_error`, before admission (nothing charged);
/// - `server_error`: `500 api_error`, before admission (nothing charged);
/// - `connection_reset`: the request is admitted and charged (it reached the
///   server), then the connection is dropped without an answer: the in-process
///   service returns an [`std::io::Error`] of kind `ConnectionReset`, and
///   [`Emulator::serve`](super::Emulator::serve) aborts the TCP connection;
/// - `slow`: the answer's head is delayed by `slow_delay` more;
/// - `stream_error`: after a `200`, an `event: error` (`overloaded_error`)
///   arrives in the middle of the stream, which then ends; the tokens
///   produced before it are charged.
///
/// The spend-cap 429 is not a rate but a switch:
/// [`Emulator::set_spend_limit_reached`](super::Emulator::set_spend_limit_reached).
///
/// # Examples
///
/// ```
/// use tower_llm_limits_emulator::Faults;
/// let faults = Faults::none().with_overloaded(0.02).with_stream_error(0.01);
/// assert_eq!(faults.overloaded, 0.02);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Rate of `529 overloaded_error`.
    pub overloaded: f64,
    /// Rate of `500 api_error`.
    pub server_error: f64,
    /// Rate of connections reset after admission.
    pub connection_reset: f64,
    /// Rate of slow responses.
    pub slow: f64,
    /// Extra delay of a slow response.
    pub slow_delay: Duration,
    /// Rate, among streamed requests, of an `event: error` mid-stream.
    pub stream_error: f64,
}

impl Default for Faults {
    /// No fault; a slow response (if enabled) is 30 s slower.
    fn default() -> Self {
        Faults::none()
    }
}

impl Faults {
    /// No fault.
    pub const fn none() -> Self {
        Faults {
            overloaded: 0.0,
            server_error: 0.0,
            connection_reset: 0.0,
            slow: 0.0,
            slow_delay: Duration::from_secs(30),
            stream_error: 0.0,
        }
    }

    /// With the rate of 529 `overloaded_error` set.
    pub const fn with_overloaded(mut self, rate: f64) -> Self {
        self.overloaded = rate;
        self
    }

    /// With the rate of 500 `api_error` set.
    pub const fn with_server_error(mut self, rate: f64) -> Self {
        self.server_error = rate;
        self
    }

    /// With the rate of reset connections set.
    pub const fn with_connection_reset(mut self, rate: f64) -> Self {
        self.connection_reset = rate;
        self
    }

    /// With the rate of slow responses, and their extra delay, set.
    pub const fn with_slow(mut self, rate: f64, delay: Duration) -> Self {
        self.slow = rate;
        self.slow_delay = delay;
        self
    }

    /// With the rate of mid-stream `event: error` set.
    pub const fn with_stream_error(mut self, rate: f64) -> Self {
        self.stream_error = rate;
        self
    }

    /// Draws the fault of one request.
    pub(crate) fn draw(&self, rng: &mut Rng, stream: bool) -> Option<Fault> {
        let u = rng.next_f64();
        let stream_u = rng.next_f64();
        let mut edge = 0.0;
        for (rate, fault) in [
            (self.overloaded, Fault::Overloaded),
            (self.server_error, Fault::ServerError),
            (self.connection_reset, Fault::ConnectionReset),
            (self.slow, Fault::Slow),
        ] {
            if rate.is_finite() && rate > 0.0 {
                edge += rate;
                if u < edge {
                    return Some(fault);
                }
            }
        }
        if stream && self.stream_error.is_finite() && stream_u < self.stream_error {
            return Some(Fault::StreamError);
        }
        None
    }
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Overloaded,
    ServerError,
    ConnectionReset,
    Slow,
    StreamError,
}

/// The acceleration limit: a sharp jump in a model class's usage gets a 429
/// even under the per-minute limits ("if your organization has a sharp
/// increase in usage"; the API publishes no numbers, so these are settings).
///
/// A request is refused when the tokens admitted in the last `window`
/// (input charged plus output produced, this request's input and reserved
/// output included) would exceed both `min_tokens` and `factor` times the
/// average tokens per `window` over the `baseline` before it. Off unless set
/// with [`EmulatorBuilder::acceleration`](super::EmulatorBuilder::acceleration).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_llm_limits_emulator::Acceleration;
/// let acc = Acceleration::new(3.0, 5_000);
/// assert_eq!(acc.window, Duration::from_secs(10));
/// assert_eq!(acc.baseline, Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Acceleration {
    /// The recent window (whole seconds; at least 1 s).
    pub window: Duration,
    /// The baseline before it (whole seconds; at least 1 s).
    pub baseline: Duration,
    /// Allowed growth over the baseline's average per window.
    pub factor: f64,
    /// Usage in the window that is always allowed (a start from nothing is not a jump).
    pub min_tokens: u64,
}

impl Acceleration {
    /// Refuse more than `factor` times the previous minute's average per
    /// 10 s, once more than `min_tokens` were admitted in the last 10 s.
    pub const fn new(factor: f64, min_tokens: u64) -> Self {
        Acceleration {
            window: Duration::from_secs(10),
            baseline: Duration::from_secs(60),
            factor,
            min_tokens,
        }
    }

    /// With the recent window and the baseline set.
    pub const fn with_windows(mut self, window: Duration, baseline: Duration) -> Self {
        self.window = window;
        self.baseline = baseline;
        self
    }
}

/// How long answers are: a fraction of `max_tokens` drawn uniformly in
/// `[min_fraction, max_fraction]`, optionally capped, at least 1 token and
/// at most `max_tokens`.
///
/// The draw is seeded by the emulator's seed and the request's body, so the
/// same request gets the same answer length every time it is sent (a retry,
/// or another strategy in a side-by-side simulation).
///
/// # Examples
///
/// ```
/// use tower_llm_limits_emulator::OutputLength;
/// let always_full = OutputLength::new(1.0, 1.0);
/// assert_eq!(always_full.cap, None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputLength {
    /// Smallest fraction of `max_tokens`.
    pub min_fraction: f64,
    /// Largest fraction of `max_tokens`.
    pub max_fraction: f64,
    /// A cap on the answer length, whatever `max_tokens` says.
    pub cap: Option<u64>,
}

impl Default for OutputLength {
    /// Between 10% and 100% of `max_tokens`, no cap.
    fn default() -> Self {
        OutputLength::new(0.1, 1.0)
    }
}

impl OutputLength {
    /// Between `min_fraction` and `max_fraction` of `max_tokens`.
    pub const fn new(min_fraction: f64, max_fraction: f64) -> Self {
        OutputLength {
            min_fraction,
            max_fraction,
            cap: None,
        }
    }

    /// With a cap on the answer length.
    pub const fn with_cap(mut self, cap: u64) -> Self {
        self.cap = Some(cap);
        self
    }

    /// Draws an answer length for `max_tokens`.
    pub(crate) fn draw(&self, rng: &mut Rng, max_tokens: u64) -> u64 {
        let clean = |f: f64| {
            if f.is_finite() {
                f.clamp(0.0, 1.0)
            } else {
                1.0
            }
        };
        let lo = clean(self.min_fraction);
        let hi = clean(self.max_fraction).max(lo);
        let fraction = lo + (hi - lo) * rng.next_f64();
        let n = (fraction * max_tokens as f64).round() as u64;
        let n = match self.cap {
            Some(cap) => n.min(cap),
            None => n,
        };
        n.clamp(1, max_tokens.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_rates_are_respected() {
        let faults = Faults::none()
            .with_overloaded(0.1)
            .with_server_error(0.1)
            .with_stream_error(0.5);
        let mut rng = Rng::new(3);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            match faults.draw(&mut rng, true) {
                Some(Fault::Overloaded) => counts[0] += 1,
                Some(Fault::ServerError) => counts[1] += 1,
                Some(Fault::StreamError) => counts[2] += 1,
                None => counts[3] += 1,
                Some(other) => panic!("unexpected {other:?}"),
            }
        }
        assert!((900..1100).contains(&counts[0]), "{counts:?}");
        assert!((900..1100).contains(&counts[1]), "{counts:?}");
        // half of the remaining 80%
        assert!((3700..4300).contains(&counts[2]), "{counts:?}");
        assert_eq!(Faults::none().draw(&mut rng, true), None);
    }

    #[test]
    fn output_length_bounds() {
        let mut rng = Rng::new(9);
        for _ in 0..1000 {
            let n = OutputLength::default().draw(&mut rng, 100);
            assert!((10..=100).contains(&n));
            assert_eq!(OutputLength::new(0.0, 0.0).draw(&mut rng, 100), 1);
            assert_eq!(
                OutputLength::new(1.0, 1.0).with_cap(7).draw(&mut rng, 100),
                7
            );
            assert_eq!(OutputLength::new(f64::NAN, 2.0).draw(&mut rng, 5), 5);
        }
    }

    #[test]
    fn jitter_factor_range() {
        let mut rng = Rng::new(1);
        let l = Latency::default().with_jitter(0.5);
        for _ in 0..1000 {
            let f = l.factor(&mut rng);
            assert!((0.5..=1.5).contains(&f));
        }
        assert_eq!(Latency::none().factor(&mut rng), 1.0);
        assert_eq!(scale(Duration::from_secs(2), 0.5), Duration::from_secs(1));
        assert_eq!(scale(Duration::from_secs(2), f64::NAN), Duration::ZERO);
    }
}
