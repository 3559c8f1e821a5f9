//! `--layers`: the proof of the batch and prompt-cache layers, each against a
//! fresh emulator with the same seed, in virtual time.
//!
//! - **Batch.** A mixed workload, 30 % of it background work
//!   (`Priority::Background`), arriving over a minute, through the crate's
//!   preset with and without `BatchLayer` in front: the interactive
//!   requests' p50 / p99 and the 429s received, when the last background
//!   request completed, and what the run cost (background requests sent
//!   through the Message Batches API cost half).
//! - **Cache.** Conversations whose requests carry no `cache_control`
//!   breakpoint, each turn resending the one before, through the preset
//!   alone, through `AutoCacheLayer` + the preset, and beside them a client
//!   that places its breakpoints by hand (end of the system prompt and last
//!   user turn): input tokens charged to ITPM, read from the cache, and the
//!   time to finish.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_llm_limits::autocache::AutoCacheLayer;
use tower_llm_limits::batch::BatchLayer;
use tower_llm_limits::clock::WallClock;
use tower_llm_limits::concurrency::Priority;
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::retry::RetryAfterLayer;
use tower_llm_limits::wire::{usage_of, Usage};
use tower_llm_limits::BoxError;

use super::args::Args;
use super::emu::{self, Emulator};
use super::workload::Rng;

/// List prices per million tokens (Claude Sonnet 4.5: $3 input, $15 output;
/// cache writes 1.25x input for 5 minutes, reads 0.1x); batches cost half.
const INPUT_PRICE: f64 = 3.0;
const OUTPUT_PRICE: f64 = 15.0;

/// How one request ended.
#[derive(Debug, Clone, Copy)]
struct Done {
    background: bool,
    ok: bool,
    batched: bool,
    latency: Duration,
    finished: Duration,
    usage: Usage,
}

/// Sends `request` through `client` at `at` after `start`; reads the whole answer.
async fn send<S, RB>(
    mut client: S,
    request: Request<Full<Bytes>>,
    start: Instant,
    at: Duration,
) -> Done
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Body,
{
    tokio::time::sleep_until(start + at).await;
    let background = request.extensions().get::<Priority>() == Some(&Priority::Background);
    let sent = Instant::now();
    let mut done = Done {
        background,
        ok: false,
        batched: false,
        latency: Duration::ZERO,
        finished: Duration::ZERO,
        usage: Usage::default(),
    };
    let answer = match ServiceExt::<Request<Full<Bytes>>>::ready(&mut client).await {
        Ok(ready) => ready.call(request).await.ok(),
        Err(_) => None,
    };
    if let Some(response) = answer {
        let status = response.status();
        done.batched = response.headers().get("x-batched").is_some();
        if let Ok(body) = response.into_body().collect().await {
            done.ok = status.is_success();
            done.usage = usage_of(&body.to_bytes()).unwrap_or_default();
        }
    }
    done.latency = sent.elapsed();
    done.finished = start.elapsed();
    done
}

fn percentile(mut v: Vec<Duration>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1].as_secs_f64()
}

fn cost(usage: &Usage, factor: f64) -> f64 {
    let input = usage.input_tokens as f64
        + usage.cache_creation_input_tokens as f64 * 1.25
        + usage.cache_read_input_tokens as f64 * 0.1;
    factor * (input * INPUT_PRICE + usage.output_tokens as f64 * OUTPUT_PRICE) / 1e6
}

fn preset(args: &Args, clock: WallClock) -> LimitsLayer {
    let retry = RetryAfterLayer::builder().wall_clock(clock).build();
    LimitsLayer::anthropic(emu::limits(args)).with_retry(retry)
}

/// The mixed workload: `n` requests over a minute, 30 % background.
fn mixed(args: &Args, n: usize) -> Vec<(Request<Full<Bytes>>, Duration)> {
    let mut rng = Rng::new(args.seed);
    (0..n)
        .map(|i| {
            let background = rng.f64() < 0.3;
            let words = rng.range(150, 700) as usize;
            let text = format!(
                "{i}: {}",
                "check the ledger entries against the invoices ".repeat(words / 7)
            );
            let body = json!({"model": args.model, "max_tokens": rng.range(100, 400),
                "messages": [{"role": "user", "content": text}]});
            let mut request = Request::post("/v1/messages")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap_or_default();
            let lane = if background {
                Priority::Background
            } else {
                Priority::Interactive
            };
            request.extensions_mut().insert(lane);
            let at = Duration::from_millis(60_000 * i as u64 / n as u64);
            (request, at)
        })
        .collect()
}

async fn run_batch(args: &Args, with_batch: bool) -> Result<String, String> {
    let clock = WallClock::following_tokio(std::time::SystemTime::UNIX_EPOCH);
    let emulator = emu::plain(args, clock)?;
    let start = Instant::now();
    let stack = preset(args, clock).layer(emulator.service());
    let mut tasks = Vec::new();
    let requests = mixed(args, args.requests.unwrap_or(120));
    if with_batch {
        let batch = BatchLayer::builder(emulator.service())
            .max_wait(Duration::from_secs(10))
            .build();
        let client = ServiceBuilder::new()
            .map_response(|r: Response<_>| {
                let mut r = r;
                if matches!(r.body(), http_body_util::Either::Right(_)) {
                    r.headers_mut()
                        .insert("x-batched", http::HeaderValue::from_static("1"));
                }
                r
            })
            .layer(batch)
            .service(stack);
        for (request, at) in requests {
            tasks.push(tokio::spawn(send(client.clone(), request, start, at)));
        }
    } else {
        for (request, at) in requests {
            tasks.push(tokio::spawn(send(stack.clone(), request, start, at)));
        }
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.map_err(|e| e.to_string())?);
    }
    Ok(batch_row(&emulator, with_batch, &done))
}

fn batch_row(emulator: &Emulator, with_batch: bool, done: &[Done]) -> String {
    let interactive: Vec<Duration> = done
        .iter()
        .filter(|d| !d.background && d.ok)
        .map(|d| d.latency)
        .collect();
    let background: Vec<&Done> = done.iter().filter(|d| d.background).collect();
    let bg_ok = background.iter().filter(|d| d.ok).count();
    let bg_last = background
        .iter()
        .map(|d| d.finished)
        .max()
        .unwrap_or_default();
    let spent: f64 = done
        .iter()
        .map(|d| cost(&d.usage, if d.batched { 0.5 } else { 1.0 }))
        .sum();
    let stats = emulator.stats().total();
    let batches = emulator.batch_stats();
    format!(
        "| {} | {} / {} | {} / {} | {:.1} s | {:.1} s | {} | {} | {:.1} s | ${:.4} |",
        if with_batch {
            "preset + `BatchLayer`"
        } else {
            "preset only"
        },
        interactive.len(),
        done.len() - background.len(),
        bg_ok,
        background.len(),
        percentile(interactive.clone(), 0.5),
        percentile(interactive, 0.99),
        stats.rate_limited + batches.rate_limited,
        batches.created,
        bg_last.as_secs_f64(),
        spent,
    )
}

/// Turn `turn` of conversation `c`: a long system prompt, the history, a new question.
fn turn_body(args: &Args, c: usize, turn: usize, by_hand: bool) -> Value {
    let system = format!(
        "Conversation {c}. {}",
        "You review pull requests for a payments service. ".repeat(120)
    );
    let mut messages = Vec::new();
    for t in 0..=turn {
        let text = format!(
            "Question {t}: {}",
            "does this change keep the ledger balanced? ".repeat(40)
        );
        messages.push(json!({"role": "user", "content": text}));
        if t < turn {
            messages.push(
                json!({"role": "assistant", "content": format!("Answer {t}: yes, see the tests.")}),
            );
        }
    }
    let mut body =
        json!({"model": args.model, "max_tokens": 200, "system": system, "messages": messages});
    if by_hand {
        body["system"] =
            json!([{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]);
        if let Some(last) = body["messages"].as_array_mut().and_then(|m| m.last_mut()) {
            let text = last["content"].clone();
            last["content"] =
                json!([{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]);
        }
    }
    body
}

/// Runs `conversations` conversations of `turns` turns side by side, each
/// turn after the last one's answer; returns when the last one ends.
async fn conversations<S, RB>(client: S, args: &Args, by_hand: bool) -> Result<Duration, String>
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send,
    RB: Body + Send,
    RB::Data: Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..8 {
        let client = client.clone();
        let bodies: Vec<Value> = (0..8).map(|t| turn_body(args, c, t, by_hand)).collect();
        tasks.push(tokio::spawn(async move {
            for body in bodies {
                let request = Request::post("/v1/messages")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap_or_default();
                let _ = send(client.clone(), request, Instant::now(), Duration::ZERO).await;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())?;
    }
    Ok(start.elapsed())
}

async fn run_cache(args: &Args, variant: usize) -> Result<String, String> {
    let clock = WallClock::following_tokio(std::time::SystemTime::UNIX_EPOCH);
    let emulator = emu::plain(args, clock)?;
    let stack = preset(args, clock).layer(emulator.service());
    let (name, time) = match variant {
        0 => (
            "preset only, no breakpoints",
            conversations(stack, args, false).await?,
        ),
        1 => {
            let client = ServiceBuilder::new()
                .layer(AutoCacheLayer::new())
                .service(stack);
            (
                "`AutoCacheLayer` + preset",
                conversations(client, args, false).await?,
            )
        }
        _ => (
            "preset, breakpoints placed by hand",
            conversations(stack, args, true).await?,
        ),
    };
    let stats = emulator.stats().total();
    Ok(format!(
        "| {name} | {} | {} | {} | {} | {:.1} s |",
        stats.input_tokens,
        stats.cache_read_input_tokens,
        stats.cache_creation_input_tokens,
        stats.rate_limited,
        time.as_secs_f64()
    ))
}

/// Runs both comparisons and returns the two tables.
pub async fn run(args: &Args) -> Result<String, String> {
    let mut out = String::new();
    out.push_str("Batch: 30 % background traffic over one minute\n\n");
    out.push_str("| client | interactive ok | background ok | interactive p50 | interactive p99 | 429s | batches | last background done | cost |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for with_batch in [false, true] {
        out.push_str(&run_batch(args, with_batch).await?);
        out.push('\n');
    }
    out.push_str("\n(cost at Sonnet 4.5 list prices, $3 / $15 per million input / output tokens, cache writes 1.25x, reads 0.1x; Message Batches at 50 %)\n");
    out.push_str("\nCache: 8 conversations x 8 turns, no breakpoints in the requests\n\n");
    out.push_str(
        "| client | input tokens charged (ITPM) | cache reads | cache writes | 429s | time |\n",
    );
    out.push_str("|---|---|---|---|---|---|\n");
    for variant in 0..3 {
        out.push_str(&run_cache(args, variant).await?);
        out.push('\n');
    }
    Ok(out)
}
