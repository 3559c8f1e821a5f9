//! The workload: a seeded, generated mix of Messages requests, or one read
//! from a JSONL file (one request body a line).

use std::path::Path;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::content::{self, ContentKind};
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
    /// What it is made of, for the per-kind figures.
    pub kind: ContentKind,
}

/// What the workload is, for the report.
#[derive(Debug, Clone)]
pub struct Workload {
    pub items: Vec<Item>,
    /// Where it came from: "generated" or the file name.
    pub source: String,
    pub seed: u64,
    /// Input tokens of the whole workload as the emulator's tokenizer
    /// counts them (unscaled), every cacheable prefix read from the cache
    /// after its first write (what ITPM would be charged at best).
    pub uncached_input_tokens: u64,
    /// Input tokens counting every prefix on every request.
    pub total_input_tokens: u64,
    /// Sum of `max_tokens`.
    pub max_tokens_sum: u64,
    pub streaming: usize,
    pub with_cache_prefix: usize,
}

/// Parameters of the generated workload.
#[derive(Debug, Clone)]
pub struct GenSpec {
    pub seed: u64,
    pub model: String,
    /// Stop adding requests once the input charged at best (every cacheable
    /// prefix read after its first write) reaches this many tokens (ignored
    /// when `requests` is set).
    pub target_uncached_tokens: u64,
    /// A fixed number of requests instead.
    pub requests: Option<usize>,
    /// The largest input one request may have (kept under the ITPM capacity
    /// so that every request can fit).
    pub max_request_tokens: u64,
    /// The emulator's tokenizer, unscaled: what sizes the text (the same seed
    /// gives the same bodies whatever the token scale).
    pub tokenizer: emu::Tokenizer,
}

/// The smallest and largest request, in tokens, the generator aims at.
pub const REQUEST_TOKENS: (u64, u64) = (200, 20_000);

/// Generates the seeded workload, a mix of real kinds of content
/// ([`ContentKind`]): single requests of code, prose, other languages
/// (CJK among them), JSON/CSV data, tool calls with tool definitions, or a
/// base64 image, from 200 to 20k tokens (most under 1k); a third of them
/// behind one of three long shared system prompts marked with
/// `cache_control`; and conversations that grow turn by turn, each turn
/// resending the history with its `cache_control` breakpoint moved to the
/// newest user turn. Half are streamed; `max_tokens` is drawn from 256 to
/// 4096, far above most answers (the simulation's emulator caps them at 300
/// tokens), as clients set it: output stays under the default limits' OTPM
/// : ITPM ratio, input tokens stay the binding limit, and the older OTPM
/// rule, which reserves `max_tokens` at admission, holds real room.
pub fn generate(spec: &GenSpec) -> Workload {
    let mut rng = Rng::new(spec.seed);
    let tokenizer = spec.tokenizer;
    let count = move |s: &str| tokenizer.count(s);
    let mut g = Generator {
        spec,
        count: &count,
        prompts: SharedPrompts::draw(&mut rng, &count),
        conversations: Vec::new(),
    };
    let mut bound = emu::cache_bound(spec.tokenizer);
    let mut w = Workload {
        items: Vec::new(),
        source: "generated".into(),
        seed: spec.seed,
        uncached_input_tokens: 0,
        total_input_tokens: 0,
        max_tokens_sum: 0,
        streaming: 0,
        with_cache_prefix: 0,
    };
    loop {
        match spec.requests {
            Some(n) if w.items.len() >= n => break,
            None if w.uncached_input_tokens >= spec.target_uncached_tokens => break,
            _ => {}
        }
        let (kind, mut body) = g.draw(&mut rng);
        let stream = rng.f64() < 0.5;
        let max_tokens = *rng.pick(&[256u64, 512, 1024, 1024, 2048, 4096]);
        body.insert("model".into(), json!(spec.model));
        body.insert("max_tokens".into(), json!(max_tokens));
        if stream {
            body.insert("stream".into(), json!(true));
        }
        let Ok(bytes) = serde_json::to_vec(&Value::Object(body)) else {
            continue;
        };
        let Ok(charge) = bound.charge(&bytes) else {
            continue;
        };
        w.total_input_tokens += charge.total;
        w.uncached_input_tokens += charge.charged();
        w.max_tokens_sum += max_tokens;
        w.streaming += usize::from(stream);
        w.with_cache_prefix += usize::from(contains(&bytes, b"\"cache_control\""));
        w.items.push(Item {
            body: Bytes::from(bytes),
            kind,
        });
    }
    w
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Three long system prompts (a style guide with code, a tool manual, a
/// multilingual glossary), each cacheable (>= 1024 tokens).
struct SharedPrompts {
    texts: Vec<String>,
    tokens: Vec<u64>,
}

impl SharedPrompts {
    fn draw(rng: &mut Rng, count: content::Count<'_>) -> SharedPrompts {
        let kinds = [
            ContentKind::Code,
            ContentKind::Prose,
            ContentKind::Multilingual,
        ];
        let texts: Vec<String> = kinds
            .iter()
            .map(|&kind| {
                let n = rng.range(1_500, 4_000);
                let lead = content::text(rng, ContentKind::Prose, n / 3, count);
                format!("{lead}\n{}", content::text(rng, kind, n - n / 3, count))
            })
            .collect();
        let tokens = texts.iter().map(|t| count(t)).collect();
        SharedPrompts { texts, tokens }
    }
}

/// A conversation in progress: its history, and the turns it has left.
struct Conversation {
    history: Vec<Value>,
    tokens: u64,
    turns_left: u64,
}

struct Generator<'a> {
    spec: &'a GenSpec,
    count: content::Count<'a>,
    prompts: SharedPrompts,
    conversations: Vec<Conversation>,
}

impl Generator<'_> {
    /// The next request's kind and body (without model, max_tokens, stream).
    fn draw(&mut self, rng: &mut Rng) -> (ContentKind, Map<String, Value>) {
        if !self.conversations.is_empty() && rng.f64() < 0.3 {
            let i = rng.range(0, self.conversations.len() as u64 - 1) as usize;
            return (ContentKind::Conversation, self.next_turn(rng, i));
        }
        if self.conversations.len() < 3 && rng.f64() < 0.1 {
            self.conversations.push(Conversation {
                history: Vec::new(),
                tokens: 0,
                turns_left: rng.range(3, 8),
            });
            let i = self.conversations.len() - 1;
            return (ContentKind::Conversation, self.next_turn(rng, i));
        }
        self.single(rng)
    }

    /// A request size in tokens: most small, some medium, a few large.
    fn size(&self, rng: &mut Rng) -> u64 {
        let class = rng.f64();
        let n = if class < 0.6 {
            rng.range(REQUEST_TOKENS.0, 1_000)
        } else if class < 0.9 {
            rng.range(1_000, 4_000)
        } else {
            rng.range(4_000, REQUEST_TOKENS.1)
        };
        n.min(self.spec.max_request_tokens)
    }

    /// A single request of one kind, behind a shared system prompt for a third.
    fn single(&mut self, rng: &mut Rng) -> (ContentKind, Map<String, Value>) {
        let weights = [22u64, 20, 14, 16, 16, 12];
        let mut pick = rng.range(0, weights.iter().sum::<u64>() - 1);
        let mut kind = ContentKind::Prose;
        for (k, w) in ContentKind::GENERATED.iter().zip(weights) {
            if pick < w {
                kind = *k;
                break;
            }
            pick -= w;
        }
        let mut size = self.size(rng);
        let mut body = Map::new();
        if rng.f64() < 0.33 {
            let p = rng.range(0, 2) as usize;
            body.insert(
                "system".into(),
                json!([{"type": "text", "text": self.prompts.texts[p],
                        "cache_control": {"type": "ephemeral"}}]),
            );
            size = size
                .saturating_sub(self.prompts.tokens[p])
                .max(REQUEST_TOKENS.0 / 2);
        }
        let messages = match kind {
            ContentKind::Tools => self.tool_call(rng, size, &mut body),
            ContentKind::Image => self.image(rng, size),
            _ => {
                let question = content::text(rng, ContentKind::Prose, 30, self.count);
                let text = content::text(rng, kind, size.saturating_sub(40), self.count);
                vec![json!({"role": "user", "content": [
                    {"type": "text", "text": text},
                    {"type": "text", "text": question}]})]
            }
        };
        body.insert("messages".into(), Value::Array(messages));
        (kind, body)
    }

    /// Tool definitions, a question, the model's tool call, its result.
    fn tool_call(&self, rng: &mut Rng, size: u64, body: &mut Map<String, Value>) -> Vec<Value> {
        let tools: Vec<Value> = (0..rng.range(3, 8))
            .map(|_| content::tool_definition(rng))
            .collect();
        let name = tools[0]["name"].clone();
        body.insert("tools".into(), Value::Array(tools));
        let question = content::text(rng, ContentKind::Prose, 60, self.count);
        let result_kind = if rng.f64() < 0.6 {
            ContentKind::Data
        } else {
            ContentKind::Code
        };
        let result = content::text(rng, result_kind, size.saturating_sub(600), self.count);
        let id = format!("toolu_{:016x}", rng.next_u64());
        vec![
            json!({"role": "user", "content": question}),
            json!({"role": "assistant", "content": [
                {"type": "text", "text": "Let me look that up."},
                {"type": "tool_use", "id": id, "name": name,
                 "input": {"query": content::text(rng, ContentKind::Prose, 20, self.count),
                           "limit": rng.range(1, 100)}}]}),
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": id, "content": result}]}),
        ]
    }

    /// An image (its size drawn from common photo and screenshot sizes) and
    /// a question, with some context text for the larger requests.
    fn image(&self, rng: &mut Rng, size: u64) -> Vec<Value> {
        let sizes = [
            (1920u32, 1080u32),
            (1280, 720),
            (800, 600),
            (3024, 4032),
            (512, 512),
            (1568, 1568),
        ];
        let (w, h) = *rng.pick(&sizes);
        let question = content::text(rng, ContentKind::Prose, 40, self.count);
        let mut blocks = vec![json!({"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": content::png_base64(rng, w, h)}})];
        if size > 2_000 {
            let kind = *rng.pick(&[ContentKind::Prose, ContentKind::Data, ContentKind::Code]);
            let context = content::text(rng, kind, size - 1_700, self.count);
            blocks.push(json!({"type": "text", "text": context}));
        }
        blocks.push(json!({"type": "text", "text": question}));
        vec![json!({"role": "user", "content": blocks})]
    }

    /// The next turn of conversation `i`: its history plus a new user turn
    /// carrying the cache breakpoint (moved off the previous one); the
    /// answer that follows joins the history for the next turn.
    fn next_turn(&mut self, rng: &mut Rng, i: usize) -> Map<String, Value> {
        let count = self.count;
        let max = self.spec.max_request_tokens.min(REQUEST_TOKENS.1);
        let kind = *rng.pick(&[
            ContentKind::Prose,
            ContentKind::Code,
            ContentKind::Multilingual,
            ContentKind::Data,
        ]);
        let want = rng.range(REQUEST_TOKENS.0, 1_500);
        let c = &mut self.conversations[i];
        let n = want.min(max.saturating_sub(c.tokens + 700)).max(50);
        let user = content::text(rng, kind, n, count);
        for m in &mut c.history {
            if let Some(blocks) = m.get_mut("content").and_then(Value::as_array_mut) {
                for b in blocks {
                    if let Some(o) = b.as_object_mut() {
                        o.remove("cache_control");
                    }
                }
            }
        }
        c.tokens += count(&user) + 3;
        c.history.push(json!({"role": "user", "content": [
            {"type": "text", "text": user, "cache_control": {"type": "ephemeral"}}]}));
        let mut body = Map::new();
        body.insert("messages".into(), Value::Array(c.history.clone()));
        let answer_tokens = rng.range(100, 600);
        let answer = content::text(rng, kind, answer_tokens, count);
        c.tokens += count(&answer) + 3;
        c.history.push(json!({"role": "assistant", "content": [
            {"type": "text", "text": answer}]}));
        c.turns_left = c.turns_left.saturating_sub(1);
        if c.turns_left == 0 || c.tokens + 1_000 > max {
            self.conversations.swap_remove(i);
        }
        body
    }
}

/// Reads a workload from a JSONL file: one Messages request body a line
/// (blank lines and lines starting with `#` are skipped).
///
/// # Errors
/// A line that is not a JSON object with `model`, `max_tokens` and `messages`
/// is an error naming the line.
pub fn from_jsonl(path: &Path, seed: u64, tokenizer: emu::Tokenizer) -> Result<Workload, String> {
    let mut bound = emu::cache_bound(tokenizer);
    let mut uncached = 0u64;
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
        let charge = bound
            .charge(line.as_bytes())
            .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        total += charge.total;
        uncached += charge.charged();
        max_tokens_sum += max_tokens;
        items.push(Item {
            body: Bytes::copy_from_slice(line.as_bytes()),
            kind: ContentKind::Replayed,
        });
    }
    if items.is_empty() {
        return Err(format!("{}: no requests", path.display()));
    }
    Ok(Workload {
        items,
        source: path.display().to_string(),
        seed,
        uncached_input_tokens: uncached,
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
            tokenizer: emu::Tokenizer::Words,
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

    /// The generated mix: every kind of content, sizes from 200 to 20k
    /// tokens under the emulator's default tokenizer, conversations whose
    /// turns resend the history, shared system prompts with cache_control.
    #[test]
    fn a_mix_of_kinds_and_sizes_with_growing_conversations() {
        let spec = GenSpec {
            tokenizer: emu::Tokenizer::O200kBase,
            ..spec(42, Some(60))
        };
        let w = generate(&spec);
        let counter = emu::TokenCounter::default();
        let mut kinds = std::collections::BTreeSet::new();
        let mut conversation_texts: Vec<String> = Vec::new();
        let mut resent = 0;
        for item in &w.items {
            kinds.insert(item.kind);
            let n = counter.count_request(&item.body).expect("a valid body");
            assert!((150..=21_000).contains(&n), "{:?}: {n} tokens", item.kind);
            if item.kind == ContentKind::Conversation {
                let v: Value = serde_json::from_slice(&item.body).expect("JSON");
                let first = v["messages"][0]["content"][0]["text"]
                    .as_str()
                    .unwrap_or("");
                resent += usize::from(conversation_texts.iter().any(|t| t == first));
                conversation_texts.push(first.to_string());
            }
        }
        for kind in ContentKind::GENERATED {
            assert!(kinds.contains(&kind), "{kind:?} missing");
        }
        assert!(resent > 0, "no conversation went past its first turn");
        assert!(w.with_cache_prefix > 0 && w.uncached_input_tokens < w.total_input_tokens);
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
        let w = from_jsonl(&path, 5, emu::Tokenizer::Words).expect("two requests");
        assert_eq!((w.items.len(), w.streaming, w.max_tokens_sum), (2, 2, 128));
        std::fs::write(&path, format!("{good}\n{{\"model\":\"m\"}}\n")).expect("write");
        let e = from_jsonl(&path, 5, emu::Tokenizer::Words)
            .map(|_| ())
            .unwrap_err();
        assert!(e.ends_with(":2: no \"max_tokens\""), "{e}");
        let _ = std::fs::remove_file(&path);
    }
}
