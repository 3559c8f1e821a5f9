//! An emulator of the Anthropic Messages API's rate limiter, to run a client
//! (or the `tower-llm-limits` layers) against without spending tokens: a
//! library, and a standalone server binary (`tower-llm-limits-emulator
//! --port 8080 --rpm 50 --itpm 30000 --otpm 8000`, `--help` for its options;
//! feature `cli`, on by default).
//!
//! [`Emulator`] serves, for pacing purposes, as the API does:
//!
//! - `POST /v1/messages`, as JSON or, with `"stream": true`, as SSE
//!   (`message_start` with usage, `content_block_start`, `ping`,
//!   `content_block_delta` `text_delta`s, `content_block_stop`,
//!   `message_delta` with cumulative usage, `message_stop`), shaped as the API
//!   answers so the official SDKs parse them;
//! - `POST /v1/messages/count_tokens` -> `{"input_tokens": N}`, with its own
//!   requests-per-minute limiter, separate from the messages limits;
//! - the Message Batches endpoints (`POST /v1/messages/batches`, `GET
//!   /v1/messages/batches[/{id}[/results]]`, `POST
//!   /v1/messages/batches/{id}/cancel`): a batch ends a configurable
//!   processing delay after its creation, its results (JSONL) drawn as the
//!   messages endpoint would answer; a requests-per-minute limit over the
//!   batch endpoints and a cap on requests in the processing queue, never the
//!   messages limits (see [`BatchSettings`]);
//! - validation where it matters for pacing: `model`, `max_tokens` and
//!   `messages` present and well typed, and `max_tokens` at most 128,000 (the
//!   largest output limit of any model), a model of a known family (see
//!   [`EmulatorBuilder::allow_unknown_models`]), at most 4 `cache_control`
//!   breakpoints (see [`EmulatorBuilder::max_cache_breakpoints`]), and at
//!   most 10,000 JSON values plus one per 16 bytes of body (which bounds the
//!   counter's memory), else `400 invalid_request_error`; a body above the
//!   size limit `413 request_too_large`; another path `404 not_found_error`;
//! - [`Emulator::serve`] closes slow and idle connections (header and body
//!   read timeouts) and keeps a bounded number open;
//! - rate limits per model class ([`ModelClass`], the budget's key too): RPM,
//!   ITPM and OTPM token buckets, continuously refilled at the limit per
//!   minute up to their capacity (its own limiter, see
//!   [below](#its-own-limiter)), an optional shorter enforcement window,
//!   both output-token rules ([`OutputMode::Reserve`]: `max_tokens` debited
//!   at admission then settled to the real output; [`OutputMode::Realtime`]:
//!   tokens debited as produced), prompt-cache reads not charged to ITPM
//!   (except for the classes whose published limits count them, see
//!   [`EmulatorBuilder::cache_reads_count`]), an optional [`Acceleration`]
//!   limit;
//! - `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
//!   and `request-id` on every answer of the messages endpoint (token
//!   `remaining` rounded to the nearest thousand, resets in RFC 3339 to the second with
//!   `Z`); a 429 carries an integer `retry-after`, `x-should-retry: true`
//!   and the API's error JSON;
//! - its own token counter ([`TokenCounter`]: a real BPE tokenizer,
//!   `o200k_base`, by default, or the word rule of [`count_text`], times an
//!   optional scale), which is *not* the client's estimator, so client
//!   estimates have real error;
//! - a seeded [`Latency`] model, answer lengths drawn up to `max_tokens`
//!   ([`OutputLength`]), and [`Faults`] at chosen rates (529, 500, reset
//!   connections, slow answers, `event: error` mid-stream) plus the
//!   spend-cap 429 on demand ([`Emulator::set_spend_limit_reached`]);
//! - counters for simulations and plots: [`Emulator::stats`].
//!
//! # When to use it
//!
//! To measure a client's pacing (the workspace's `simulate` binary does),
//! in tests, and as a local stand-in for the API. In process, under tokio's
//! paused clock, a run of many virtual minutes takes seconds: every delay is a
//! `tokio::time::sleep` and all randomness comes from the seed.
//!
//! # Three ways to run it
//!
//! - [`Emulator::service`]: an in-process `tower::Service<http::Request<B>>`
//!   answering `http::Response<EmulatorBody>`; a reset connection is an `Err`
//!   (`std::io::ErrorKind::ConnectionReset`).
//! - [`Emulator::serve`]: HTTP/1.1 over a `TcpListener`; a reset connection
//!   aborts the TCP connection without an answer.
//! - [`Emulator::router`]: an axum `Router` to nest or layer; a reset
//!   connection is an answer whose body fails.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use http_body_util::{BodyExt, Full};
//! use tower::ServiceExt;
//! use tower_llm_limits::budget::Limits;
//! use tower_llm_limits_emulator::{Emulator, Latency};
//! use tower_llm_limits::headers::RateLimitSnapshot;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_llm_limits::BoxError> {
//! let emulator = Emulator::builder()
//!     .limits(Limits::new().rpm(50).itpm(30_000).otpm(8_000))
//!     .latency(Latency::none()) // answers at once; the default model takes ~1 s per 60 tokens
//!     .seed(7)
//!     .build()?;
//!
//! let body = r#"{"model":"claude-sonnet-4-5","max_tokens":100,
//!                "messages":[{"role":"user","content":"Hello, world!"}]}"#;
//! let request = http::Request::post("/v1/messages").body(Full::new(bytes::Bytes::from(body)))?;
//! let response = emulator.service().oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//!
//! let limits = RateLimitSnapshot::from_headers(response.headers());
//! assert_eq!(limits.requests.limit, Some(50));
//! assert_eq!(limits.requests.remaining, Some(49));
//!
//! let json: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
//! assert_eq!(json["usage"]["input_tokens"], 7); // o200k_base: 4 tokens of text, 3 of framing
//! let stats = emulator.stats();
//! assert_eq!(stats.classes["sonnet-4"].requests_admitted, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # What happens to a `POST /v1/messages`
//!
//! 1. Path and method (`404`, `405`), body size (`413`, before anything is
//!    read past the limit), validation (`400`): nothing is charged.
//! 2. The spend cap, if switched on: `429` without `retry-after`.
//! 3. The fault draw: `529` or `500` here, before admission (nothing charged).
//! 4. Token count and prompt-cache lookup; the ITPM charge is the uncached
//!    input plus cache writes (plus cache reads for the classes where they
//!    count).
//! 5. The acceleration limit, if set, then the class's three buckets, all or
//!    nothing: `429` with `retry-after` (seconds until the request would fit,
//!    rounded up), nothing charged.
//! 6. Admitted: one request, the input, and the output reservation
//!    (`max_tokens` in reserve mode, the first token in realtime mode) are
//!    debited. A `connection_reset` fault strikes here.
//! 7. The cache learns the request's prefixes, readable from the moment its
//!    answer begins: its first token, after any slow delay and the time to
//!    first token (a streamed answer's first text delta; a JSON answer comes
//!    later still). A request with the same prefix admitted before that
//!    writes it again, charged in full: "a cache entry only becomes
//!    available after the first response begins".
//! 8. The answer: output produced at the latency model's pace, charged as it
//!    is produced (realtime) or settled at the end (reserve); if the client
//!    drops the answer, what was produced is what is charged.
//!
//! # Driving it in a simulation
//!
//! Run the client and the emulator in one process on a current-thread
//! runtime with the clock paused (`#[tokio::main(flavor = "current_thread",
//! start_paused = true)]`, or `tokio::time::pause()`): tokio then jumps over
//! every sleep, so minutes of traffic take seconds, and the run is the same
//! for the same seed. Give each task a clone of [`Emulator::service`]; read
//! [`Emulator::stats`] at the end (tokens really charged per class, 429s
//! sent, the per-second [`ClassStats::timeline`] for plots) and
//! [`Emulator::minimum_time`] for the limit-bound lower bound of the run's
//! duration. Answer lengths and paces (the latency jitter) depend only on the
//! seed and the request body, so every strategy of a side-by-side run gets
//! the same answers at the same speed, in whatever order it sends them;
//! faults are drawn per request in arrival order. A fresh emulator
//! per strategy starts from full buckets and an empty cache.
//!
//! The headers' reset times are the system clock plus the bucket's time to
//! full, so a client reading them with
//! [`RateLimitSnapshot::from_headers`](tower_llm_limits::headers::RateLimitSnapshot::from_headers)
//! gets the right delay even though the paused clock never moves the system
//! clock. That delay is rounded up to the real clock's next whole second, as
//! the API rounds, so it varies by up to a second from run to run; for a
//! reproducible run give the emulator ([`EmulatorBuilder::wall_clock`]) and
//! the client (`RetryAfterBuilder::wall_clock`) one
//! [`WallClock::following_tokio`](tower_llm_limits::clock::WallClock::following_tokio),
//! and seed the client's own randomness (its retry jitter).
//!
//! # Why its own admission, and not the budget's enforce layer
//!
//! The budget's enforce mode serves a gateway, which must decide before it
//! knows: it estimates the input, reserves an expected output (in realtime
//! mode a learned share of `max_tokens`) and settles when the answer's usage
//! arrives. The emulator is the server: it knows the true input count and the
//! cache outcome at admission and produces the output itself. So it charges
//! the exact input up front and, in realtime mode, debits output token by
//! token as it is produced, which is the API's current rule: "OTPM rate
//! limits are evaluated in real time as output tokens are produced" (a
//! reservation of expected output would refuse requests the API admits). It
//! also does what only a server does: the acceleration limit, faults before
//! and after admission, per-second counters. It shares with the budget only
//! the vocabulary: [`Limits`], [`ModelClass`] keys and [`Tier`] presets.
//!
//! # Its own limiter
//!
//! The emulator does not limit with the budget's ledger: a bug in that
//! ledger would then sit on both sides of every simulation and could never
//! show up in one. Its limiter is a separate reference implementation of the
//! API's rules, written for the server side:
//!
//! - per model class and per limit (RPM, ITPM, OTPM) one token bucket,
//!   "continuously replenished up to your maximum limit, rather than being
//!   reset at fixed intervals", at the limit per minute, starting full;
//! - capacity is the limit, or its share of the enforcement window ("60 RPM
//!   might be enforced as 1 request per second": capacity 1); a request
//!   costing more than a short window's capacity, but no more than the limit
//!   per minute, is admitted on a full bucket and leaves it in debt;
//! - a request is admitted when all three buckets can take its cost, and is
//!   then charged in all three; a refused request is charged nothing, and
//!   its 429 names the limit it waits for longest, with a `retry-after` of
//!   the seconds until it fits, rounded up; a request costing more than a
//!   whole limit per minute never fits and gets `retry-after: 60`;
//! - each bucket is kept as the instant it will be full again, in integer
//!   time units scaled by its limit, so nothing is rounded until a wait or a
//!   header is written (the budget's ledger keeps a level and a refill time
//!   instead).
//!
//! A differential test (`tests/emulator_differential.rs`) drives one seeded
//! sequence of requests, charges, refunds and clock advances through both
//! and checks that they agree on every decision and every wait.
//!
//! # What it deliberately does not do
//!
//! - It does not model content: answers are one-token words, as many as the
//!   drawn output length; tools, thinking and stop sequences are not emulated.
//! - Its token counts come from `o200k_base` (or the word rule), not
//!   Claude's tokenizer; `count_tokens` answers the same count, without cache.
//! - The prompt cache writes entries only at `cache_control` breakpoints, and
//!   reads at a breakpoint or at one of the 19 blocks before it (the API's
//!   look-back of about 20 blocks), where a "block" is a tool, a system
//!   block or a message's content block.
//! - What the API leaves undocumented is a setting with a stated default:
//!   bucket capacity (the limit, or the enforcement window's share), the
//!   acceleration limit's numbers, fault rates. A request larger than a whole
//!   limit gets a 429 with `retry-after: 60`.
//! - No authentication: `x-api-key` is neither required nor logged.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod batch;
mod body;
mod cache;
mod config;
mod limiter;
mod response;
mod rng;
mod server;
mod service;
mod stats;
mod tokens;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tower_llm_limits::clock::WallClock;

pub use self::batch::{BatchSettings, BatchStats, MAX_BATCH_REQUESTS};
pub use self::body::EmulatorBody;
pub use self::cache::{BoundCharge, CacheBound};
pub use self::config::{Acceleration, Faults, Latency, OutputLength};
pub use self::limiter::{Headroom, InvalidWindow, RateLimiter, RequestCost, Verdict};
pub use self::server::RouterService;
pub use self::service::{EmulatorService, ResponseFuture};
pub use self::stats::{ClassStats, CountTokensStats, EmulatorStats, SecondStats};
pub use self::tokens::{
    count_text, InvalidScale, TokenCounter, Tokenizer, UnknownTokenizer, DOCUMENT_PAGE_CHARS,
    DOCUMENT_PAGE_TOKENS, IMAGE_TOKENS, MAX_TOKEN_SCALE, MESSAGE_OVERHEAD,
};
pub use tower_llm_limits::budget::{Limits, ModelClass, OutputMode, Tier};

use self::cache::PromptCache;
use self::stats::StatsInner;

/// The request body size limit of the API: 32 MB.
pub const DEFAULT_BODY_LIMIT: usize = 32 * 1024 * 1024;
/// Default RPM of the `count_tokens` endpoint (Tier 1: 100).
pub const DEFAULT_COUNT_TOKENS_RPM: u64 = 100;
/// Default minimum length of a cacheable prompt prefix (the API's 1,024 tokens for Sonnet and Opus).
pub const DEFAULT_CACHE_MIN_TOKENS: u64 = 1_024;
/// The API's limit on `cache_control` breakpoints in one request: 4.
pub const DEFAULT_MAX_CACHE_BREAKPOINTS: usize = 4;
/// Default time a client has to send a request's headers (or, on an idle
/// keep-alive connection, the next request's) before [`Emulator::serve`]
/// closes the connection: 30 s.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a client has to send a request's whole body once its headers
/// arrived before [`Emulator::serve`] closes the connection: 60 s.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default number of connections [`Emulator::serve`] keeps open at once: 1,024.
/// Past it, new connections wait in the listener's backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_024;

/// The emulator's settings (see [`EmulatorBuilder`]).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) default_limits: Limits,
    pub(crate) class_limits: HashMap<ModelClass, Limits>,
    pub(crate) window: Option<Duration>,
    pub(crate) output_mode: OutputMode,
    pub(crate) latency: Latency,
    pub(crate) faults: Faults,
    pub(crate) acceleration: Option<Acceleration>,
    pub(crate) output_length: OutputLength,
    pub(crate) seed: u64,
    pub(crate) body_limit: usize,
    pub(crate) count_tokens_rpm: Option<u64>,
    pub(crate) cache_min_tokens: u64,
    pub(crate) wall_clock: WallClock,
    pub(crate) cache_reads_count: HashMap<ModelClass, bool>,
    pub(crate) allow_unknown_models: bool,
    pub(crate) max_cache_breakpoints: Option<usize>,
    pub(crate) header_read_timeout: Duration,
    pub(crate) body_read_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) batches: BatchSettings,
    pub(crate) token_counter: TokenCounter,
}

/// Shared run-time state of an emulator and its services.
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// The messages endpoint's limits, per model class.
    pub(crate) limiter: RateLimiter<ModelClass>,
    /// The `count_tokens` endpoint's own requests-per-minute limit.
    pub(crate) count_limiter: RateLimiter<()>,
    /// The Message Batches endpoints' state and limits.
    pub(crate) batches: batch::Batches,
    cache: Mutex<PromptCache>,
    stats: Mutex<StatsInner>,
    seq: AtomicU64,
    spend_limit: AtomicBool,
}

impl Shared {
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn lock_stats(&self) -> MutexGuard<'_, StatsInner> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn lock_cache(&self) -> MutexGuard<'_, PromptCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn limits_for(&self, class: ModelClass) -> Limits {
        self.config
            .class_limits
            .get(&class)
            .copied()
            .unwrap_or(self.config.default_limits)
    }

    pub(crate) fn cache_reads_count(&self, class: ModelClass) -> bool {
        self.config
            .cache_reads_count
            .get(&class)
            .copied()
            .unwrap_or_else(|| class.cache_reads_count_toward_itpm())
    }

    pub(crate) fn spend_limit_reached(&self) -> bool {
        self.spend_limit.load(Ordering::Relaxed)
    }
}

/// The emulator: cheap to clone, every clone (and every service, router and
/// server made from it) shares one state: buckets, prompt cache, counters.
///
/// Build one with [`Emulator::builder`] (or [`Emulator::new`] for one set of
/// limits and the defaults). See the [module docs](self) for an example.
#[derive(Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// A builder with the defaults: no limits (every class unlimited),
    /// 60 s enforcement window, [`OutputMode::Realtime`], the default
    /// [`Latency`], no faults, no acceleration limit, seed 0, 32 MB body
    /// limit, 100 RPM for `count_tokens`, 1,024-token minimum cacheable
    /// prefix, cache reads charged to ITPM for the classes whose published
    /// limits count them ([`ModelClass::cache_reads_count_toward_itpm`]:
    /// Haiku 3.5 and Haiku 3), known model families only, at most
    /// [`DEFAULT_MAX_CACHE_BREAKPOINTS`] cache breakpoints, and for
    /// [`serve`](Self::serve) the [`DEFAULT_HEADER_READ_TIMEOUT`],
    /// [`DEFAULT_BODY_READ_TIMEOUT`] and [`DEFAULT_MAX_CONNECTIONS`].
    pub fn builder() -> EmulatorBuilder {
        EmulatorBuilder {
            config: Config {
                default_limits: Limits::new(),
                class_limits: HashMap::new(),
                window: None,
                output_mode: OutputMode::Realtime,
                latency: Latency::default(),
                faults: Faults::none(),
                acceleration: None,
                output_length: OutputLength::default(),
                seed: 0,
                body_limit: DEFAULT_BODY_LIMIT,
                count_tokens_rpm: Some(DEFAULT_COUNT_TOKENS_RPM),
                cache_min_tokens: DEFAULT_CACHE_MIN_TOKENS,
                wall_clock: WallClock::system(),
                cache_reads_count: HashMap::new(),
                allow_unknown_models: false,
                max_cache_breakpoints: Some(DEFAULT_MAX_CACHE_BREAKPOINTS),
                header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
                body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                batches: BatchSettings::default(),
                token_counter: TokenCounter::default(),
            },
        }
    }

    /// An emulator with `limits` for every model class and the other defaults
    /// of [`Emulator::builder`].
    pub fn new(limits: Limits) -> Self {
        let config = Emulator::builder().limits(limits).config;
        config.token_counter.warm();
        Emulator::from_parts(config, RateLimiter::per_minute(), RateLimiter::per_minute())
    }

    fn from_parts(
        config: Config,
        limiter: RateLimiter<ModelClass>,
        count_limiter: RateLimiter<()>,
    ) -> Self {
        let now = Instant::now();
        Emulator {
            shared: Arc::new(Shared {
                cache: Mutex::new(PromptCache::new(config.cache_min_tokens)),
                stats: Mutex::new(StatsInner::new(now)),
                config,
                limiter,
                count_limiter,
                batches: batch::Batches::new(),
                seq: AtomicU64::new(0),
                spend_limit: AtomicBool::new(false),
            }),
        }
    }

    /// The in-process `tower::Service` (see [`EmulatorService`]).
    pub fn service(&self) -> EmulatorService {
        EmulatorService {
            shared: self.shared.clone(),
        }
    }

    /// What the Message Batches endpoints did so far.
    pub fn batch_stats(&self) -> BatchStats {
        self.shared.batches.stats()
    }

    /// A snapshot of the counters: per model class, tokens really charged,
    /// requests admitted, 429s sent, faults injected, and a per-second timeline.
    pub fn stats(&self) -> EmulatorStats {
        self.shared.lock_stats().snapshot(Instant::now())
    }

    /// The least time in which this emulator's limits could have admitted
    /// what it charged so far: the longest [`ClassStats::minimum_time`] over
    /// the model classes (they have separate limits and run side by side).
    pub fn minimum_time(&self) -> Duration {
        let window = self.shared.config.window.unwrap_or(Duration::from_secs(60));
        self.stats()
            .classes
            .iter()
            .map(|(class, s)| {
                let limits = ModelClass::ALL
                    .into_iter()
                    .find(|c| c.as_str() == class)
                    .map_or(self.shared.config.default_limits, |c| {
                        self.shared.limits_for(c)
                    });
                s.minimum_time(&limits, window)
            })
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// The output tokens this emulator's answer to `body` will have (drawn
    /// from its seed and the body only, as every answer is, so it is the
    /// same for every client that sends the body): lets a simulation work
    /// out a bound that does not depend on any client.
    ///
    /// # Errors
    ///
    /// The `invalid_request_error` message, when the body is not a valid
    /// Messages request.
    pub fn answer_tokens(&self, body: &[u8]) -> Result<u64, String> {
        self.answer_pace(body).map(|(tokens, _)| tokens)
    }

    /// The output tokens of this emulator's answer to `body` and its pace:
    /// the factor its latency model's times are multiplied by (drawn, like
    /// the length, from the seed and the body only). The answer takes
    /// `(time_to_first_token + tokens * per_output_token) * factor`.
    ///
    /// # Errors
    ///
    /// The `invalid_request_error` message, when the body is not a valid
    /// Messages request.
    pub fn answer_pace(&self, body: &[u8]) -> Result<(u64, f64), String> {
        let config = &self.shared.config;
        let parsed =
            tokens::parse_request(body, tokens::Endpoint::Messages, &config.token_counter)?;
        let mut rng = rng::Rng::new(rng::mix(config.seed, parsed.content_hash));
        let max_tokens = parsed.max_tokens.unwrap_or(1).max(1);
        let tokens = config.output_length.draw(&mut rng, max_tokens);
        let factor = config
            .latency
            .factor(&mut service::pace_rng(config.seed, parsed.content_hash));
        Ok((tokens, factor))
    }

    /// Switches the spend-cap 429 on or off: while on, every
    /// `POST /v1/messages` is answered `429 rate_limit_error` with
    /// `details.error_code = "enforced_spend_limit_reached"` and no
    /// `retry-after` (retrying fails until access resumes).
    pub fn set_spend_limit_reached(&self, reached: bool) {
        self.shared.spend_limit.store(reached, Ordering::Relaxed);
    }

    /// The model class (the limits' key) of a model name: [`ModelClass::of`].
    /// The class's [`ModelClass::as_str`] keys [`EmulatorStats::classes`].
    pub fn class_of(&self, model: &str) -> ModelClass {
        ModelClass::of(model)
    }

    /// The limits in force for a model class.
    pub fn limits_for(&self, class: ModelClass) -> Limits {
        self.shared.limits_for(class)
    }
}

/// Settings of an [`Emulator`]: made by [`Emulator::builder`].
#[derive(Debug, Clone)]
pub struct EmulatorBuilder {
    config: Config,
}

impl EmulatorBuilder {
    /// The Message Batches endpoints' processing delay and limits (see
    /// [`BatchSettings`]; by default 60 s, 50 requests per minute, 100,000
    /// requests in the processing queue). Batch traffic never draws on the
    /// Messages limits.
    pub fn batches(mut self, settings: BatchSettings) -> Self {
        self.config.batches = settings;
        self
    }

    /// Limits for every model class without limits of its own (set by
    /// [`class_limits`](Self::class_limits) or [`tier`](Self::tier)).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.default_limits = limits;
        self
    }

    /// Limits for one model class (replacing what an earlier call or
    /// [`tier`](Self::tier) set for it).
    pub fn class_limits(mut self, class: ModelClass, limits: Limits) -> Self {
        self.config.class_limits.insert(class, limits);
        self
    }

    /// The published limits of a tier for every model class
    /// ([`Tier::limits`]), replacing earlier per-class limits; later
    /// [`class_limits`](Self::class_limits) calls override single classes.
    pub fn tier(mut self, tier: Tier) -> Self {
        for class in ModelClass::ALL {
            self.config.class_limits.insert(class, tier.limits(class));
        }
        self
    }

    /// Enforces every limit over a shorter window (a 60 RPM limit with a 1 s
    /// window admits 1 request per second): the buckets' capacity is the
    /// window's share of the limit. Checked by [`build`](Self::build).
    pub fn enforcement_window(mut self, window: Duration) -> Self {
        self.config.window = Some(window);
        self
    }

    /// How output tokens are charged to OTPM (default [`OutputMode::Realtime`]).
    pub fn output_mode(mut self, mode: OutputMode) -> Self {
        self.config.output_mode = mode;
        self
    }

    /// The latency model (default [`Latency::default`]).
    pub fn latency(mut self, latency: Latency) -> Self {
        self.config.latency = latency;
        self
    }

    /// Fault rates (default none).
    pub fn faults(mut self, faults: Faults) -> Self {
        self.config.faults = faults;
        self
    }

    /// Turns the acceleration limit on.
    pub fn acceleration(mut self, acceleration: Acceleration) -> Self {
        self.config.acceleration = Some(acceleration);
        self
    }

    /// How answer lengths are drawn (default [`OutputLength::default`]).
    pub fn output_length(mut self, output_length: OutputLength) -> Self {
        self.config.output_length = output_length;
        self
    }

    /// The wall clock of the answers' absolute instants (the
    /// `anthropic-ratelimit-*-reset` headers, the spend-cap message's date);
    /// default: the system clock.
    ///
    /// Under tokio's paused clock the system clock stands still, so a reset
    /// is then the real time plus the bucket's time to full, and a client
    /// reading it against the system clock gets that delay plus the real
    /// clock's rounding to the next whole second (up to a second, different
    /// each run). For a reproducible simulation, give the emulator and the
    /// client (`RetryAfterBuilder::wall_clock` in `tower-llm-limits`) the same
    /// [`WallClock::following_tokio`].
    pub fn wall_clock(mut self, clock: WallClock) -> Self {
        self.config.wall_clock = clock;
        self
    }

    /// The seed of every random draw (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = seed;
        self
    }

    /// The request body size limit (default [`DEFAULT_BODY_LIMIT`], 32 MB);
    /// larger bodies get `413 request_too_large`.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// The `count_tokens` endpoint's requests per minute (`None`: unlimited;
    /// default [`DEFAULT_COUNT_TOKENS_RPM`]).
    pub fn count_tokens_rpm(mut self, rpm: Option<u64>) -> Self {
        self.config.count_tokens_rpm = rpm;
        self
    }

    /// The minimum prompt prefix, in tokens, that the cache stores (default
    /// [`DEFAULT_CACHE_MIN_TOKENS`]; `0` caches any prefix).
    pub fn cache_min_tokens(mut self, tokens: u64) -> Self {
        self.config.cache_min_tokens = tokens;
        self
    }

    /// Whether a model class's cache reads count toward ITPM (default:
    /// [`ModelClass::cache_reads_count_toward_itpm`]: Haiku 3.5 and Haiku 3,
    /// whose published limits count `cache_read_input_tokens` toward ITPM).
    pub fn cache_reads_count(mut self, class: ModelClass, counts: bool) -> Self {
        self.config.cache_reads_count.insert(class, counts);
        self
    }

    /// Whether a `model` outside the known model families (the classes of
    /// [`ModelClass::of`] other than [`ModelClass::Other`]) is served, under
    /// the limits of [`ModelClass::Other`]. Default `false`: such a request
    /// gets `400 invalid_request_error`, as the API refuses a model it does
    /// not serve.
    pub fn allow_unknown_models(mut self, allow: bool) -> Self {
        self.config.allow_unknown_models = allow;
        self
    }

    /// The most `cache_control` breakpoints one request may carry (tools,
    /// system and message blocks); more get `400 invalid_request_error`.
    /// Default `Some(`[`DEFAULT_MAX_CACHE_BREAKPOINTS`]`)`, the API's 4;
    /// `None`: no limit.
    pub fn max_cache_breakpoints(mut self, max: Option<usize>) -> Self {
        self.config.max_cache_breakpoints = max;
        self
    }

    /// How long [`Emulator::serve`] waits for a request's headers, and on an
    /// idle keep-alive connection for the next request, before it closes the
    /// connection (default [`DEFAULT_HEADER_READ_TIMEOUT`]). Clamped to at
    /// least 1 ms.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.config.header_read_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long a request's body may take to arrive once its headers did,
    /// before the emulator drops the request and closes the connection
    /// without an answer (default [`DEFAULT_BODY_READ_TIMEOUT`]). Applies to
    /// [`Emulator::serve`], the router and the in-process service alike.
    /// Clamped to at least 1 ms.
    pub fn body_read_timeout(mut self, timeout: Duration) -> Self {
        self.config.body_read_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The most connections [`Emulator::serve`] keeps open at once (default
    /// [`DEFAULT_MAX_CONNECTIONS`]); past it, it stops accepting until one
    /// closes, and new connections wait in the listener's backlog. Clamped to
    /// at least 1.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.config.max_connections = max.max(1);
        self
    }

    /// How input tokens are counted (default [`TokenCounter::default`]:
    /// `o200k_base`, scale 1).
    pub fn token_counter(mut self, counter: TokenCounter) -> Self {
        self.config.token_counter = counter;
        self
    }

    /// Builds the emulator. Its clock (for the stats timeline) starts now.
    /// The token counter's tables are loaded here (for `o200k_base`, once per
    /// process), not on the first request.
    ///
    /// # Errors
    ///
    /// [`InvalidWindow`] if the enforcement window is zero or above 60 s.
    pub fn build(self) -> Result<Emulator, InvalidWindow> {
        self.config.token_counter.warm();
        let (limiter, count_limiter) = match self.config.window {
            Some(w) => (RateLimiter::with_window(w)?, RateLimiter::with_window(w)?),
            None => (RateLimiter::per_minute(), RateLimiter::per_minute()),
        };
        Ok(Emulator::from_parts(self.config, limiter, count_limiter))
    }
}
