//! The embedded emulator: one fresh instance per strategy, same seed.
//!
//! Every use of the emulator in this crate goes through this module: the
//! rest of the crate names only what it re-exports.

use tower::util::BoxCloneService;
use tower::ServiceExt;
use tower_llm_limits::clock::WallClock;
pub use tower_llm_limits_emulator::Emulator;
use tower_llm_limits_emulator::{Faults, Limits, OutputMode};

use super::args::Args;
use super::report::{Charged, LimitSpec};
use super::run::{box_response, Body, Transport};

/// The limits the run is measured against, as the emulator enforces them
/// (its default 60 s window: each bucket's capacity is one minute's limit).
pub fn limit_spec(a: &Args) -> LimitSpec {
    LimitSpec {
        requests_per_minute: a.rpm,
        input_tokens_per_minute: a.itpm,
        output_tokens_per_minute: a.otpm,
        requests_capacity: a.rpm as f64,
        input_capacity: a.itpm as f64,
        output_capacity: a.otpm as f64,
        output_mode: a.output_mode.as_str(),
    }
}

/// The limits as the crate's types say them.
pub fn limits(a: &Args) -> Limits {
    Limits::new().rpm(a.rpm).itpm(a.itpm).otpm(a.otpm)
}

/// A fresh emulator (seeded with the run's seed, default latency model, the
/// fault rates asked for, none by default) and the in-process transport to it.
///
/// # Errors
/// Settings the emulator refuses.
pub fn transport(a: &Args, clock: WallClock) -> Result<(Transport, Emulator), String> {
    let emulator = Emulator::builder()
        .limits(limits(a))
        .output_mode(if a.reserve_mode() {
            OutputMode::Reserve
        } else {
            OutputMode::Realtime
        })
        .faults(
            Faults::none()
                .with_overloaded(a.fault_529)
                .with_server_error(a.fault_500)
                .with_connection_reset(a.fault_reset)
                .with_stream_error(a.fault_stream),
        )
        .seed(a.seed)
        .wall_clock(clock)
        .build()
        .map_err(|e| format!("emulator: {e}"))?;
    let svc = ServiceExt::<http::Request<Body>>::map_response(emulator.service(), box_response);
    Ok((BoxCloneService::new(svc), emulator))
}

/// What the emulator charged, summed over model classes.
pub fn charged(emulator: &Emulator, reserve_mode: bool) -> Charged {
    let stats = emulator.stats();
    let mut c = Charged {
        from_server_stats: true,
        ..Charged::default()
    };
    for class in stats.classes.values() {
        c.requests += class.requests_admitted;
        c.input_tokens += class.input_tokens;
        c.output_tokens += class.output_tokens;
        c.output_for_bound += if reserve_mode {
            class.output_tokens
        } else {
            let last_admission = class
                .timeline
                .iter()
                .rposition(|s| s.requests > 0)
                .unwrap_or(0);
            class
                .timeline
                .iter()
                .take(last_admission)
                .map(|s| s.output_tokens)
                .sum()
        };
    }
    c
}

/// Tokens of `s` under the emulator's counting rule (a word of n characters
/// is ceil(n / 4) tokens, each punctuation mark one): used to size the
/// workload; the clients never see this count.
pub fn count_tokens(s: &str) -> u64 {
    tower_llm_limits_emulator::count_text(s)
}

/// Tokens each message adds under the emulator's rule (its role framing).
pub const MESSAGE_OVERHEAD: u64 = tower_llm_limits_emulator::MESSAGE_OVERHEAD;

/// A fresh emulator with the run's limits and seed, the default latency
/// model and batch endpoints, no faults (for `--layers`).
///
/// # Errors
/// Settings the emulator refuses.
pub fn plain(a: &Args, clock: WallClock) -> Result<Emulator, String> {
    Emulator::builder()
        .limits(limits(a))
        .seed(a.seed)
        .wall_clock(clock)
        .build()
        .map_err(|e| format!("emulator: {e}"))
}
