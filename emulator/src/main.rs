//! Runs the emulator of the Anthropic Messages API's rate limiter on a port.
//!
//! ```text
//! cargo run --release --features emulator --example emulator -- \
//!     --port 8080 --rpm 50 --itpm 30000 --otpm 8000 [--fault-529 0.02] [--seed 7]
//! ```
//!
//! Then point a client (or an official SDK, with `base_url`) at the printed
//! address. Other options: `--host ADDR`, `--window SECS` (shorter
//! enforcement window), `--output-mode realtime|reserve`, `--fault-500 P`,
//! `--fault-reset P`, `--fault-slow P`, `--fault-stream P`, `--no-latency`,
//! `--count-tokens-rpm N`, `--acceleration FACTOR:MIN_TOKENS`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tower_llm_limits::budget::limits::{Limits, OutputMode};
use tower_llm_limits::emulator::{Acceleration, Emulator, Faults, Latency};

const USAGE: &str = "usage: emulator [--host ADDR] [--port P] [--rpm N] [--itpm N] [--otpm N] \
[--window SECS] [--output-mode realtime|reserve] [--fault-529 P] [--fault-500 P] [--fault-reset P] \
[--fault-slow P] [--fault-stream P] [--seed S] [--no-latency] [--count-tokens-rpm N] \
[--acceleration FACTOR:MIN_TOKENS]";

struct Args {
    host: String,
    port: u16,
    limits: Limits,
    window: Option<Duration>,
    output_mode: OutputMode,
    faults: Faults,
    seed: u64,
    latency: Latency,
    count_tokens_rpm: u64,
    acceleration: Option<Acceleration>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        host: "127.0.0.1".into(),
        port: 8080,
        limits: Limits::new(50, 30_000, 8_000),
        window: None,
        output_mode: OutputMode::Realtime,
        faults: Faults::none(),
        seed: 0,
        latency: Latency::default(),
        count_tokens_rpm: 100,
        acceleration: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        if flag == "--no-latency" {
            args.latency = Latency::none();
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        let rate = |v: &str| match v.parse::<f64>() {
            Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
            _ => Err(format!(
                "{flag} {v}: expected a probability between 0 and 1"
            )),
        };
        match flag.as_str() {
            "--host" => args.host = value,
            "--port" => args.port = value.parse().map_err(|e| format!("--port {value}: {e}"))?,
            "--rpm" => args.limits.requests_per_minute = Some(num(&value)?),
            "--itpm" => args.limits.input_tokens_per_minute = Some(num(&value)?),
            "--otpm" => args.limits.output_tokens_per_minute = Some(num(&value)?),
            "--window" => args.window = Some(Duration::from_secs(num(&value)?)),
            "--output-mode" => {
                args.output_mode = match value.as_str() {
                    "realtime" => OutputMode::Realtime,
                    "reserve" => OutputMode::Reserve,
                    _ => {
                        return Err(format!(
                            "--output-mode {value}: expected realtime or reserve"
                        ))
                    }
                }
            }
            "--fault-529" => args.faults.overloaded = rate(&value)?,
            "--fault-500" => args.faults.server_error = rate(&value)?,
            "--fault-reset" => args.faults.connection_reset = rate(&value)?,
            "--fault-slow" => args.faults.slow = rate(&value)?,
            "--fault-stream" => args.faults.stream_error = rate(&value)?,
            "--seed" => args.seed = num(&value)?,
            "--count-tokens-rpm" => args.count_tokens_rpm = num(&value)?,
            "--acceleration" => {
                let (factor, min) = value
                    .split_once(':')
                    .ok_or_else(|| format!("--acceleration {value}: expected FACTOR:MIN_TOKENS"))?;
                let factor: f64 = factor
                    .parse()
                    .map_err(|e| format!("--acceleration {value}: {e}"))?;
                args.acceleration = Some(Acceleration::new(factor, num(min)?));
            }
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    Ok(args)
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

    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };

    let mut builder = Emulator::builder()
        .limits(args.limits)
        .output_mode(args.output_mode)
        .faults(args.faults)
        .latency(args.latency)
        .seed(args.seed)
        .count_tokens_rpm(Some(args.count_tokens_rpm));
    if let Some(window) = args.window {
        builder = builder.enforcement_window(window);
    }
    if let Some(acceleration) = args.acceleration {
        builder = builder.acceleration(acceleration);
    }
    let emulator = match builder.build() {
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
        "limits: {} RPM, {} ITPM, {} OTPM per model class; POST /v1/messages, POST /v1/messages/count_tokens",
        show(args.limits.requests_per_minute),
        show(args.limits.input_tokens_per_minute),
        show(args.limits.output_tokens_per_minute),
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

fn show(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".into(), |l| l.to_string())
}
