//! The embedded emulator: one fresh instance per strategy, same seed.
//!
//! Every use of the emulator in this crate goes through this module: the
//! rest of the crate names only what it re-exports.

use std::time::Duration;

use tower::util::BoxCloneService;
use tower::ServiceExt;
use tower_llm_limits::clock::WallClock;
pub use tower_llm_limits_emulator::{
    CacheBound, Emulator, TokenCounter, Tokenizer, UnknownTokenizer,
};
use tower_llm_limits_emulator::{
    Faults, Latency, Limits, OutputLength, OutputMode, DEFAULT_CACHE_MIN_TOKENS,
};

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

/// The longest answer the emulator writes, whatever `max_tokens` says.
pub const ANSWER_CAP: u64 = 300;

/// How long the emulator's answers are: 10% to 100% of `max_tokens`, at most
/// [`ANSWER_CAP`] tokens: clients ask for far more than answers take, which
/// is what the older OTPM rule (`--output-mode reserve`) makes them pay
/// for until the end of each answer.
pub fn output_length() -> OutputLength {
    OutputLength::default().with_cap(ANSWER_CAP)
}

/// The limits as the crate's types say them.
pub fn limits(a: &Args) -> Limits {
    Limits::new().rpm(a.rpm).itpm(a.itpm).otpm(a.otpm)
}

/// A fresh emulator (seeded with the run's seed, default latency model,
/// answers of [`output_length`], the fault rates asked for, none by default) and the in-process transport to it.
///
/// # Errors
/// Settings the emulator refuses.
pub fn transport(a: &Args, clock: WallClock) -> Result<(Transport, Emulator), String> {
    let emulator = Emulator::builder()
        .limits(limits(a))
        .token_counter(counter(a)?)
        .output_length(output_length())
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

/// The emulator's token counter: `--tokenizer` times `--token-scale`.
///
/// # Errors
/// A scale the emulator refuses.
pub fn counter(a: &Args) -> Result<TokenCounter, String> {
    TokenCounter::new(a.tokenizer)
        .with_scale(a.token_scale)
        .map_err(|e| format!("--token-scale: {e}"))
}

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
        .token_counter(counter(a)?)
        .build()
        .map_err(|e| format!("emulator: {e}"))
}

/// The workload's cache bound, counted with `tokenizer` unscaled, for the
/// emulator's default minimum cacheable prefix.
pub fn cache_bound(tokenizer: Tokenizer) -> CacheBound {
    CacheBound::new(TokenCounter::new(tokenizer), DEFAULT_CACHE_MIN_TOKENS)
}

/// The workload's cache bound as the run's emulator counts (scale included).
///
/// # Errors
/// A scale the emulator refuses.
pub fn scaled_cache_bound(a: &Args) -> Result<CacheBound, String> {
    Ok(CacheBound::new(counter(a)?, DEFAULT_CACHE_MIN_TOKENS))
}

/// The least time the run's emulator takes to answer any of `bodies`: for
/// each, its default latency model at the pace it gives that body (see
/// [`answers`]), the shortest of them. Every client waits at least this long for its last
/// answer.
///
/// # Errors
/// A scale the emulator refuses.
pub fn quickest_answer<'a>(
    a: &Args,
    bodies: impl Iterator<Item = &'a [u8]>,
) -> Result<Duration, String> {
    let quickest = answers(a, bodies)?
        .into_iter()
        .filter_map(|answer| answer.map(|(_, seconds)| seconds))
        .fold(f64::INFINITY, f64::min);
    Ok(if quickest.is_finite() {
        Duration::from_secs_f64(quickest)
    } else {
        Duration::ZERO
    })
}

/// What the run's emulator answers each of `bodies` with: its output tokens
/// and the time it takes, in seconds (time to first token plus the answer's
/// tokens, at the pace the emulator gives that body), both drawn from the
/// seed and the body only, the same for every client in any order. None for
/// a body it refuses.
///
/// # Errors
/// A scale the emulator refuses.
pub fn answers<'a>(
    a: &Args,
    bodies: impl Iterator<Item = &'a [u8]>,
) -> Result<Vec<Option<(u64, f64)>>, String> {
    let emulator = Emulator::builder()
        .seed(a.seed)
        .token_counter(counter(a)?)
        .output_length(output_length())
        .build()
        .map_err(|e| format!("emulator: {e}"))?;
    let latency = Latency::default();
    let per_token = latency.per_output_token.as_secs_f64();
    let first = latency.time_to_first_token.as_secs_f64();
    Ok(bodies
        .map(|b| {
            emulator
                .answer_pace(b)
                .ok()
                .map(|(n, factor)| (n, (first + n as f64 * per_token) * factor))
        })
        .collect())
}

/// What the emulator read from and wrote to its prompt cache: (read, written).
pub fn cache_tokens(emulator: &Emulator) -> (u64, u64) {
    let stats = emulator.stats();
    stats.classes.values().fold((0, 0), |(r, w), c| {
        (
            r + c.cache_read_input_tokens,
            w + c.cache_creation_input_tokens,
        )
    })
}
