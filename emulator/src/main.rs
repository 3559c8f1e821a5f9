//! Runs the emulator of the Anthropic Messages API's rate limiter on a port.
//!
//! ```text
//! cargo run --release -p tower-llm-limits-emulator -- \
//!     --port 8080 --rpm 50 --itpm 30000 --otpm 8000 [--fault-529 0.02] [--seed 7]
//! ```
//!
//! Then point a client (or an official SDK, with `base_url`) at the printed
//! address. Other options: `--host ADDR`, `--window SECS` (shorter
//! enforcement window), `--output-mode realtime|reserve`, `--fault-500 P`,
//! `--fault-reset P`, `--fault-slow P`, `--fault-stream P`, `--no-latency`,
//! `--count-tokens-rpm N`, `--tokenizer o200k|words`, `--token-scale X`, `--acceleration FACTOR:MIN_TOKENS`,
//! `--allow-unknown-models`, `--max-cache-breakpoints N|none`,
//! `--header-read-timeout SECS`, `--body-read-timeout SECS`,
//! `--max-connections N` (`--help` for all).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tower_llm_limits_emulator::{
    Acceleration, Emulator, Faults, Latency, Limits, OutputMode, TokenCounter, Tokenizer,
};

/// Serves an emulator of the Anthropic Messages API's rate limiter
/// (`POST /v1/messages`, `POST /v1/messages/count_tokens`).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8080, value_name = "P")]
    port: u16,
    /// Requests per minute, per model class.
    #[arg(long, default_value_t = 50, value_name = "N")]
    rpm: u64,
    /// Input tokens per minute, per model class.
    #[arg(long, default_value_t = 30_000, value_name = "N")]
    itpm: u64,
    /// Output tokens per minute, per model class.
    #[arg(long, default_value_t = 8_000, value_name = "N")]
    otpm: u64,
    /// A shorter enforcement window, in seconds (the API's is a minute).
    #[arg(long, value_name = "SECS")]
    window: Option<u64>,
    /// When output tokens are charged: as they are produced, or `max_tokens` up front.
    #[arg(long, value_enum, default_value_t = Mode::Realtime)]
    output_mode: Mode,
    /// Probability of a 529 `overloaded_error`.
    #[arg(long = "fault-529", default_value_t = 0.0, value_name = "P", value_parser = probability)]
    fault_529: f64,
    /// Probability of a 500 `api_error`.
    #[arg(long = "fault-500", default_value_t = 0.0, value_name = "P", value_parser = probability)]
    fault_500: f64,
    /// Probability of a connection reset before any answer.
    #[arg(long, default_value_t = 0.0, value_name = "P", value_parser = probability)]
    fault_reset: f64,
    /// Probability of a slow answer.
    #[arg(long, default_value_t = 0.0, value_name = "P", value_parser = probability)]
    fault_slow: f64,
    /// Probability of an `error` event in the middle of a stream.
    #[arg(long, default_value_t = 0.0, value_name = "P", value_parser = probability)]
    fault_stream: f64,
    /// Seed of the faults, ids and generated text.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Answer at once (no latency model).
    #[arg(long)]
    no_latency: bool,
    /// How input tokens are counted: `o200k` (OpenAI's o200k_base BPE,
    /// shipped inside the binary) or `words` (ceil(n / 4) per word of n
    /// letters and digits, one per other non-space character).
    #[arg(long, default_value = "o200k", value_name = "NAME", value_parser = tokenizer)]
    tokenizer: Tokenizer,
    /// Multiply every input count by X (a model whose tokenizer counts X
    /// times more, or less, than the one chosen).
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    token_scale: f64,
    /// Requests per minute of `count_tokens`.
    #[arg(long, default_value_t = 100, value_name = "N")]
    count_tokens_rpm: u64,
    /// Refuse a sharp rise of input tokens: FACTOR:MIN_TOKENS.
    #[arg(long, value_name = "FACTOR:MIN_TOKENS", value_parser = acceleration)]
    acceleration: Option<Acceleration>,
    /// Serve models outside the known families (Opus 4, Sonnet 4, Sonnet 3.7,
    /// Haiku 4.5, Haiku 3.5, Haiku 3) under the "other" class, instead of a 400.
    #[arg(long)]
    allow_unknown_models: bool,
    /// The most `cache_control` breakpoints in one request (the API's 4), or
    /// `none` for no limit.
    #[arg(long, default_value = "4", value_name = "N|none", value_parser = breakpoints)]
    max_cache_breakpoints: Breakpoints,
    /// Seconds a client has to send a request's headers (or, idle, its next request).
    #[arg(long, default_value_t = 30.0, value_name = "SECS", value_parser = seconds)]
    header_read_timeout: f64,
    /// Seconds a client has to send a request's body once its headers arrived.
    #[arg(long, default_value_t = 60.0, value_name = "SECS", value_parser = seconds)]
    body_read_timeout: f64,
    /// The most connections open at once; more wait in the listen backlog.
    #[arg(long, default_value_t = 1_024, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
}

/// `--max-cache-breakpoints`: a number, or no limit.
#[derive(Debug, Clone, Copy)]
struct Breakpoints(Option<usize>);

fn breakpoints(v: &str) -> Result<Breakpoints, String> {
    if v == "none" {
        return Ok(Breakpoints(None));
    }
    v.parse()
        .map(|n| Breakpoints(Some(n)))
        .map_err(|_| format!("{v}: expected a number of breakpoints or `none`"))
}

fn seconds(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!("{v}: expected seconds, above 0 and at most 86400")),
    }
}

/// `--output-mode`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// Output tokens are charged as they are produced.
    Realtime,
    /// `max_tokens` is charged at admission, refunded at the end.
    Reserve,
}

fn tokenizer(v: &str) -> Result<Tokenizer, String> {
    v.parse()
        .map_err(|e: tower_llm_limits_emulator::UnknownTokenizer| e.to_string())
}

fn probability(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{v}: expected a probability between 0 and 1")),
    }
}

fn acceleration(v: &str) -> Result<Acceleration, String> {
    let (factor, min) = v
        .split_once(':')
        .ok_or_else(|| format!("{v}: expected FACTOR:MIN_TOKENS"))?;
    let factor: f64 = factor.parse().map_err(|e| format!("{v}: {e}"))?;
    let min: u64 = min.parse().map_err(|e| format!("{v}: {e}"))?;
    Ok(Acceleration::new(factor, min))
}

impl Args {
    fn limits(&self) -> Limits {
        Limits::new().rpm(self.rpm).itpm(self.itpm).otpm(self.otpm)
    }

    fn faults(&self) -> Faults {
        let mut faults = Faults::none();
        faults.overloaded = self.fault_529;
        faults.server_error = self.fault_500;
        faults.connection_reset = self.fault_reset;
        faults.slow = self.fault_slow;
        faults.stream_error = self.fault_stream;
        faults
    }

    fn emulator(&self) -> Result<Emulator, String> {
        let counter = TokenCounter::new(self.tokenizer)
            .with_scale(self.token_scale)
            .map_err(|e| format!("--token-scale: {e}"))?;
        let mut builder = Emulator::builder()
            .token_counter(counter)
            .limits(self.limits())
            .output_mode(match self.output_mode {
                Mode::Realtime => OutputMode::Realtime,
                Mode::Reserve => OutputMode::Reserve,
            })
            .faults(self.faults())
            .latency(if self.no_latency {
                Latency::none()
            } else {
                Latency::default()
            })
            .seed(self.seed)
            .count_tokens_rpm(Some(self.count_tokens_rpm))
            .allow_unknown_models(self.allow_unknown_models)
            .max_cache_breakpoints(self.max_cache_breakpoints.0)
            .header_read_timeout(Duration::from_secs_f64(self.header_read_timeout))
            .body_read_timeout(Duration::from_secs_f64(self.body_read_timeout))
            .max_connections(usize::try_from(self.max_connections).unwrap_or(usize::MAX));
        if let Some(window) = self.window {
            builder = builder.enforcement_window(Duration::from_secs(window));
        }
        if let Some(acceleration) = self.acceleration {
            builder = builder.acceleration(acceleration);
        }
        builder.build().map_err(|e| e.to_string())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let args = Args::parse();
    let emulator = match args.emulator() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };

    let addr: SocketAddr = match format!("{}:{}", args.host, args.port).parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad address {}:{}: {e}", args.host, args.port);
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    println!("emulator listening on http://{local}");
    println!(
        "limits: {} RPM, {} ITPM, {} OTPM per model class; tokens counted by {} x {}; \
POST /v1/messages, POST /v1/messages/count_tokens",
        args.rpm, args.itpm, args.otpm, args.tokenizer, args.token_scale,
    );

    let result = tokio::select! {
        r = emulator.serve(listener) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    let total = emulator.stats().total();
    eprintln!(
        "served {} requests ({} rate limited); charged {} input and {} output tokens",
        total.requests_admitted, total.rate_limited, total.input_tokens, total.output_tokens
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server failed: {e}");
            ExitCode::FAILURE
        }
    }
}
