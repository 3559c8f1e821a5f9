//! The workload: a seeded, generated mix of Messages requests, or one read
//! from a JSONL file (one request body a line).

use std::path::Path;

use bytes::Bytes;
use serde_json::{json, Value};

use super::emu;

/// A small, seeded random source (SplitMix64): the same seed gives the same
/// workload on every machine, without a dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi] (inclusive).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        let i = self.range(0, items.len().saturating_sub(1) as u64) as usize;
        &items[i.min(items.len() - 1)]
    }
}

/// One request of the workload.
#[derive(Debug, Clone)]
pub struct Item {
    /// The request body (JSON).
    pub body: Bytes,
}

/// What the workload is, for the report.
#[derive(Debug, Clone)]
pub struct Workload {
    pub items: Vec<Item>,
    /// Where it came from: "generated" or the file name.
    pub source: String,
    pub seed: u64,
    /// Input tokens of the whole workload as the emulator's counter counts
    /// them, shared cache prefixes counted once (what ITPM would be charged if
    /// every prefix were cached after its first use).
    pub uncached_input_tokens: u64,
    /// Input tokens counting every prefix on every request.
    pub total_input_tokens: u64,
    /// Sum of `max_tokens`.
    pub max_tokens_sum: u64,
    pub streaming: usize,
    pub with_cache_prefix: usize,
}

const WORDS: &[&str] = &[
    "the",
    "rate",
    "limit",
    "token",
    "bucket",
    "request",
    "model",
    "answer",
    "input",
    "output",
    "stream",
    "cache",
    "prompt",
    "system",
    "message",
    "client",
    "server",
    "gateway",
    "budget",
    "window",
    "minute",
    "second",
    "retry",
    "after",
    "header",
    "latency",
    "throughput",
    "queue",
    "worker",
    "batch",
    "summary",
    "document",
    "analysis",
    "report",
    "customer",
    "invoice",
    "contract",
    "section",
    "paragraph",
    "sentence",
    "translate",
    "explain",
    "classify",
    "extract",
    "compare",
    "review",
    "code",
    "function",
    "module",
    "error",
    "handler",
    "value",
    "field",
    "record",
    "table",
    "column",
    "index",
    "search",
    "result",
    "context",
    "history",
    "agent",
    "tool",
    "schema",
    "argument",
    "parameter",
    "configuration",
    "deployment",
    "service",
    "cluster",
    "region",
    "account",
    "organisation",
    "workspace",
    "usage",
    "pricing",
    "estimate",
    "measure",
    "observe",
    "metric",
    "signal",
    "pattern",
    "behaviour",
    "policy",
    "decision",
    "internationalisation",
    "asynchronous",
    "concurrency",
    "backpressure",
    "idempotent",
    "a",
    "an",
    "of",
    "to",
    "in",
    "on",
    "for",
    "with",
    "by",
    "from",
    "and",
    "or",
    "but",
    "not",
    "is",
    "are",
    "was",
    "be",
    "this",
    "that",
    "these",
    "those",
    "it",
    "they",
    "we",
    "you",
];

const PUNCT: &[&str] = &[",", ".", ";", ":", "?", "!", "(", ")", "-", "\""];

/// Generates text of about `tokens` tokens as the emulator counts them
/// ([`emu::count_tokens`]: a word of n characters is ceil(n / 4) tokens, each
/// punctuation mark one).
fn text(rng: &mut Rng, tokens: u64) -> String {
    let mut out = String::with_capacity(tokens as usize * 5);
    let mut n = 0u64;
    let mut since_punct = 0;
    while n < tokens {
        if !out.is_empty() {
            out.push(' ');
        }
        let w = *rng.pick(WORDS);
        out.push_str(w);
        n += (w.len() as u64).div_ceil(4);
        since_punct += 1;
        if since_punct > 6 && rng.f64() < 0.18 {
            let p: &str = rng.pick::<&str>(PUNCT);
            out.push_str(p);
            n += 1;
            since_punct = 0;
        }
    }
    out
}

/// Tokens of `s` under the emulator's rule (used to size the workload; the
/// clients never see this count).
pub fn count(s: &str) -> u64 {
    emu::count_tokens(s)
}

/// Tokens each message adds under the emulator's rule (its role framing).
const PER_MESSAGE: u64 = emu::MESSAGE_OVERHEAD;

/// Parameters of the generated workload.
#[derive(Debug, Clone)]
pub struct GenSpec {
    pub seed: u64,
    pub model: String,
    /// Stop adding requests once the uncached input reaches this many tokens
    /// (ignored when `requests` is set).
    pub target_uncached_tokens: u64,
    /// A fixed number of requests instead.
    pub requests: Option<usize>,
    /// The largest input one request may have (kept under the ITPM capacity
    /// so that every request can fit).
    pub max_request_tokens: u64,
}

/// Generates the seeded workload: mixed sizes (most small, some medium, a few
/// large), a third of the requests behind one of three long shared system
/// prompts marked with `cache_control`, half of them streamed, and
/// `max_tokens` drawn from 64 to 1024 (so that, with the emulator's
/// answer lengths of 10% to 100% of `max_tokens`, the output stays under the
/// default limits' OTPM : ITPM ratio and input tokens stay the binding limit).
pub fn generate(spec: &GenSpec) -> Workload {
    let mut rng = Rng::new(spec.seed);
    let mut prefixes = Prefixes::draw(&mut rng);
    let mut items = Vec::new();
    let mut uncached = 0u64;
    let mut total = 0u64;
    let mut max_tokens_sum = 0u64;
    let mut streaming = 0;
    let mut with_prefix = 0;
    loop {
        match spec.requests {
            Some(n) if items.len() >= n => break,
            None if uncached >= spec.target_uncached_tokens => break,
            _ => {}
        }
        let drawn = draw_request(&mut rng, spec, &mut prefixes);
        streaming += usize::from(drawn.stream);
        with_prefix += usize::from(drawn.with_prefix);
        let bytes = match serde_json::to_vec(&Value::Object(drawn.body)) {
            Ok(b) => Bytes::from(b),
            Err(_) => continue,
        };
        total += drawn.tokens;
        uncached += drawn.uncached;
        max_tokens_sum += drawn.max_tokens;
        items.push(Item { body: bytes });
    }
    Workload {
        items,
        source: "generated".into(),
        seed: spec.seed,
        uncached_input_tokens: uncached,
        total_input_tokens: total,
        max_tokens_sum,
        streaming,
        with_cache_prefix: with_prefix,
    }
}

/// Three shared system prompts, long enough to be cacheable (>= 1024
/// tokens), and whether each was sent already (its first use writes the
/// cache; later ones read it).
struct Prefixes {
    texts: Vec<String>,
    tokens: Vec<u64>,
    seen: [bool; 3],
}

impl Prefixes {
    fn draw(rng: &mut Rng) -> Prefixes {
        let texts: Vec<String> = (0..3)
            .map(|_| {
                let n = rng.range(1_500, 3_000);
                text(rng, n)
            })
            .collect();
        let tokens = texts.iter().map(|p| count(p)).collect();
        Prefixes {
            texts,
            tokens,
            seen: [false; 3],
        }
    }
}

/// One generated request and what it adds to the workload's totals.
struct Drawn {
    body: serde_json::Map<String, Value>,
    /// Input tokens, every prefix counted.
    tokens: u64,
    /// Input tokens, a shared prefix counted on its first use only.
    uncached: u64,
    max_tokens: u64,
    stream: bool,
    with_prefix: bool,
}

/// Draws one request: its size class, a shared prefix (a third of them) or
/// a short system prompt (half of the rest), `max_tokens`, one to three
/// user turns, streamed or not.
fn draw_request(rng: &mut Rng, spec: &GenSpec, prefixes: &mut Prefixes) -> Drawn {
    let size_class = rng.f64();
    let user_tokens = if size_class < 0.55 {
        rng.range(40, 400)
    } else if size_class < 0.90 {
        rng.range(400, 2_000)
    } else {
        rng.range(2_000, 6_000)
    };
    let use_prefix = rng.f64() < 0.33;
    let stream = rng.f64() < 0.5;
    let max_tokens = *rng.pick(&[64u64, 128, 256, 256, 512, 1024]);
    let turns = rng.range(1, 3);

    let mut body = serde_json::Map::new();
    body.insert("model".into(), json!(spec.model));
    body.insert("max_tokens".into(), json!(max_tokens));
    let (mut tokens, mut uncached) = (0u64, 0u64);
    if use_prefix {
        let p = rng.range(0, 2) as usize;
        body.insert(
            "system".into(),
            json!([{
                "type": "text",
                "text": prefixes.texts[p],
                "cache_control": {"type": "ephemeral"}
            }]),
        );
        tokens += prefixes.tokens[p];
        if !prefixes.seen[p] {
            uncached += prefixes.tokens[p];
            prefixes.seen[p] = true;
        }
    } else if rng.f64() < 0.5 {
        let t = rng.range(10, 60);
        let system = text(rng, t);
        let t = count(&system);
        body.insert("system".into(), json!(system));
        tokens += t;
        uncached += t;
    }
    let budget = spec.max_request_tokens.saturating_sub(tokens).max(20);
    let (messages, msg_tokens) = draw_turns(rng, user_tokens.min(budget), turns);
    tokens += msg_tokens;
    uncached += msg_tokens;
    body.insert("messages".into(), Value::Array(messages));
    if stream {
        body.insert("stream".into(), json!(true));
    }
    Drawn {
        body,
        tokens,
        uncached,
        max_tokens,
        stream,
        with_prefix: use_prefix,
    }
}

/// `turns` user turns with assistant answers between them, about
/// `user_tokens` in all, and their tokens (the role framing included).
fn draw_turns(rng: &mut Rng, user_tokens: u64, turns: u64) -> (Vec<Value>, u64) {
    let mut messages = Vec::new();
    let per_turn = (user_tokens / (2 * turns - 1)).max(5);
    let mut msg_tokens = 0;
    for t in 0..turns {
        let user = text(rng, per_turn);
        msg_tokens += count(&user) + PER_MESSAGE;
        messages.push(json!({"role": "user", "content": user}));
        if t + 1 < turns {
            let answer = text(rng, per_turn);
            msg_tokens += count(&answer) + PER_MESSAGE;
            messages.push(json!({
                "role": "assistant",
                "content": [{"type": "text", "text": answer}]
            }));
        }
    }
    (messages, msg_tokens)
}

/// Reads a workload from a JSONL file: one Messages request body a line
/// (blank lines and lines starting with `#` are skipped).
///
/// # Errors
/// A line that is not a JSON object with `model`, `max_tokens` and `messages`
/// is an error naming the line.
pub fn from_jsonl(path: &Path, seed: u64) -> Result<Workload, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut items = Vec::new();
    let mut total = 0u64;
    let mut max_tokens_sum = 0u64;
    let mut streaming = 0;
    let mut with_prefix = 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not JSON: {e}", path.display(), i + 1))?;
        if v.get("model").and_then(Value::as_str).is_none() {
            return Err(format!("{}:{}: no \"model\"", path.display(), i + 1));
        }
        let max_tokens = v
            .get("max_tokens")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("{}:{}: no \"max_tokens\"", path.display(), i + 1))?;
        if !v.get("messages").is_some_and(Value::is_array) {
            return Err(format!(
                "{}:{}: no \"messages\" array",
                path.display(),
                i + 1
            ));
        }
        let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        if line.contains("\"cache_control\"") {
            with_prefix += 1;
        }
        if stream {
            streaming += 1;
        }
        total += count(line);
        max_tokens_sum += max_tokens;
        items.push(Item {
            body: Bytes::copy_from_slice(line.as_bytes()),
        });
    }
    if items.is_empty() {
        return Err(format!("{}: no requests", path.display()));
    }
    Ok(Workload {
        items,
        source: path.display().to_string(),
        seed,
        uncached_input_tokens: total,
        total_input_tokens: total,
        max_tokens_sum,
        streaming,
        with_cache_prefix: with_prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seed: u64, requests: Option<usize>) -> GenSpec {
        GenSpec {
            seed,
            model: "claude-sonnet-4-5".into(),
            target_uncached_tokens: 90_000,
            requests,
            max_request_tokens: 27_000,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let (a, b) = (generate(&spec(42, None)), generate(&spec(42, None)));
        let bodies = |w: &Workload| w.items.iter().map(|i| i.body.clone()).collect::<Vec<_>>();
        assert_eq!(bodies(&a), bodies(&b));
        assert_ne!(bodies(&a), bodies(&generate(&spec(43, None))));
        // Enough requests for the target, the shared prefixes counted once.
        assert!(a.uncached_input_tokens >= 90_000);
        assert!(a.uncached_input_tokens < a.total_input_tokens);
        assert!(a.streaming > 0 && a.with_cache_prefix > 0);
    }

    #[test]
    fn a_fixed_number_of_requests_each_a_messages_body() {
        let w = generate(&spec(7, Some(25)));
        assert_eq!(w.items.len(), 25);
        let mut max_tokens = 0;
        for item in &w.items {
            let v: Value = serde_json::from_slice(&item.body).expect("JSON");
            assert_eq!(v["model"], "claude-sonnet-4-5");
            assert!(v["messages"].as_array().is_some_and(|m| !m.is_empty()));
            max_tokens += v["max_tokens"].as_u64().expect("max_tokens");
        }
        assert_eq!(max_tokens, w.max_tokens_sum);
    }

    #[test]
    fn a_jsonl_file_skips_blanks_and_comments_and_names_a_bad_line() {
        let path = std::env::temp_dir().join(format!("simulate-{}.jsonl", std::process::id()));
        let good = r#"{"model":"m","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        std::fs::write(&path, format!("# comment\n\n{good}\n{good}\n")).expect("write");
        let w = from_jsonl(&path, 5).expect("two requests");
        assert_eq!((w.items.len(), w.streaming, w.max_tokens_sum), (2, 2, 128));
        std::fs::write(&path, format!("{good}\n{{\"model\":\"m\"}}\n")).expect("write");
        let e = from_jsonl(&path, 5).map(|_| ()).unwrap_err();
        assert!(e.ends_with(":2: no \"max_tokens\""), "{e}");
        let _ = std::fs::remove_file(&path);
    }
}
