//! A seeded mixed corpus for fitting and checking the text model (tests only).
//!
//! Every piece comes from text this repository ships (its own sources,
//! scripts, README, licence) or is generated here from word lists: nothing is
//! downloaded.

/// A kind of text in the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Code,
    Prose,
    Cjk,
    OtherLanguage,
    Data,
    Tools,
    Base64,
}

pub(crate) const KINDS: [Kind; 7] = [
    Kind::Code,
    Kind::Prose,
    Kind::Cjk,
    Kind::OtherLanguage,
    Kind::Data,
    Kind::Tools,
    Kind::Base64,
];

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Code => "code",
            Kind::Prose => "prose",
            Kind::Cjk => "CJK",
            Kind::OtherLanguage => "Cyrillic/accented",
            Kind::Data => "JSON/CSV",
            Kind::Tools => "tool definitions",
            Kind::Base64 => "base64",
        }
    }
}

const CODE: &[&str] = &[
    include_str!("../queue.rs"),
    include_str!("../budget/ledger.rs"),
    include_str!("../retry/mod.rs"),
    include_str!("../wire/json.rs"),
    PYTHON,
    TYPESCRIPT,
    SHELL,
    include_str!("../../Cargo.toml"),
    include_str!("../../benches/estimate.rs"),
];

// Code in other languages, written here so that every file of the corpus
// ships in the package.
const PYTHON: &str = r#"
import json, os, time
from dataclasses import dataclass, field

@dataclass
class Bucket:
    capacity: float
    per_second: float
    level: float = field(default=0.0)
    updated: float = field(default_factory=time.monotonic)

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.level = min(self.capacity, self.level + elapsed * self.per_second)
        self.updated = now

    def take(self, cost: float) -> float:
        """Returns 0.0 when admitted, else the seconds to wait."""
        self.refill(time.monotonic())
        if self.level >= cost:
            self.level -= cost
            return 0.0
        return (cost - self.level) / self.per_second

def load(path: str) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        return {k: int(v) for k, v in json.load(f).items() if not k.startswith("_")}

if __name__ == "__main__":
    limits = load(os.environ.get("LIMITS", "limits.json"))
    b = Bucket(capacity=limits["itpm"], per_second=limits["itpm"] / 60)
    print(f"wait {b.take(1200):.3f}s")
"#;

const TYPESCRIPT: &str = r#"
import Anthropic from "@anthropic-ai/sdk";

type Usage = { input_tokens: number; output_tokens: number; cache_read_input_tokens?: number };

export async function run(prompts: string[], maxTokens = 256): Promise<Usage[]> {
  const client = new Anthropic({ baseURL: process.env.ANTHROPIC_BASE_URL, maxRetries: 4 });
  const out: Usage[] = [];
  for (const [i, prompt] of prompts.entries()) {
    const message = await client.messages.create({
      model: "claude-sonnet-4-5",
      max_tokens: maxTokens,
      messages: [{ role: "user", content: `#${i}: ${prompt}` }],
    });
    out.push(message.usage as Usage);
    if (out.length % 10 === 0) console.log(`${out.length}/${prompts.length} done`);
  }
  return out.filter((u) => u.output_tokens > 0);
}
"#;

const SHELL: &str = r#"
#!/usr/bin/env bash
set -euo pipefail
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --save '' --appendonly no --daemonize no >/tmp/redis.log 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for i in $(seq 1 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
done
export REDIS_URL="redis://127.0.0.1:$port/"
cargo test --workspace --all-features -- --test-threads 2 | tee /tmp/test.log
grep -E '^test result' /tmp/test.log | awk '{ ok += $4; failed += $6 } END { print ok " passed, " failed " failed" }'
"#;

const PROSE: &[&str] = &[
    include_str!("../../LICENSE-APACHE"),
    include_str!("../../README.md"),
    include_str!("../../CHANGELOG.md"),
];

const ZH: &[&str] = &[
    "我们",
    "今天",
    "请求",
    "服务器",
    "限制",
    "每分钟",
    "令牌",
    "模型",
    "的",
    "是",
    "在",
    "了",
    "和",
    "不",
    "这个",
    "一个",
    "可以",
    "没有",
    "时候",
    "因为",
    "所以",
    "但是",
    "如果",
    "问题",
    "系统",
    "数据",
    "用户",
    "需要",
    "已经",
    "开始",
    "工作",
    "学习",
    "中国",
    "北京",
    "上海",
    "天气",
    "很好",
    "非常",
    "重要",
    "计算",
    "程序",
    "文件",
    "发送",
    "回答",
    "等待",
    "队列",
    "缓存",
    "读取",
    "写入",
];
const JA: &[&str] = &[
    "これは",
    "サーバー",
    "リクエスト",
    "を",
    "送信",
    "します",
    "トークン",
    "の",
    "制限",
    "が",
    "あります",
    "今日",
    "は",
    "天気",
    "が",
    "いい",
    "です",
    "ね",
    "プログラム",
    "データ",
    "キャッシュ",
    "待ち",
    "行列",
    "東京",
    "日本語",
    "で",
    "書いた",
    "文章",
    "と",
    "思います",
];
const KO: &[&str] = &[
    "서버",
    "요청",
    "을",
    "보냅니다",
    "토큰",
    "제한",
    "이",
    "있습니다",
    "오늘",
    "날씨",
    "가",
    "좋네요",
    "한국어",
    "문장",
    "데이터",
    "캐시",
    "대기열",
    "모델",
    "사용자",
    "그리고",
];
const RU: &[&str] = &[
    "сервер",
    "запрос",
    "отправляет",
    "токены",
    "ограничение",
    "в",
    "минуту",
    "и",
    "не",
    "это",
    "модель",
    "пользователь",
    "данные",
    "очередь",
    "кэш",
    "сегодня",
    "хорошая",
    "погода",
    "мы",
    "работаем",
    "над",
    "системой",
    "которая",
    "считает",
    "ответ",
    "ожидание",
    "программа",
];
const EU: &[&str] = &[
    "die",
    "Anfrage",
    "wird",
    "gesendet",
    "über",
    "für",
    "Größe",
    "schön",
    "le",
    "serveur",
    "répond",
    "à",
    "la",
    "requête",
    "très",
    "déjà",
    "été",
    "où",
    "el",
    "servidor",
    "está",
    "límite",
    "años",
    "niño",
    "mañana",
    "ça",
    "fenêtre",
    "Straße",
    "żółw",
    "część",
    "ελληνικά",
    "λόγος",
];
const HI: &[&str] = &[
    "सर्वर",
    "अनुरोध",
    "भेजता",
    "है",
    "और",
    "यह",
    "मॉडल",
    "टोकन",
    "की",
    "सीमा",
    "आज",
    "मौसम",
    "अच्छा",
    "उपयोगकर्ता",
    "डेटा",
    "कतार",
    "में",
];
const AR: &[&str] = &[
    "الخادم",
    "يرسل",
    "الطلب",
    "إلى",
    "النموذج",
    "في",
    "الدقيقة",
    "و",
    "هذا",
    "البيانات",
    "المستخدم",
    "اليوم",
    "الطقس",
    "جميل",
    "שלום",
    "עולם",
    "השרת",
    "שולח",
];
const MARKS: &[&str] = &["—", "…", "→", "“", "”", "•", "✓", "😀", "🚀", "€", "≥"];
const NAMES: &[&str] = &[
    "id",
    "name",
    "email",
    "created_at",
    "status",
    "amount",
    "currency",
    "region",
    "score",
    "user_id",
    "count",
    "label",
    "path",
    "tokens",
    "latency_ms",
];
const VALUES: &[&str] = &[
    "active",
    "pending",
    "EUR",
    "USD",
    "eu-west-1",
    "alice@example.com",
    "Bob Smith",
    "true",
    "null",
    "ok",
    "/v1/messages",
    "claude-sonnet-4-5",
];

/// A seeded generator (PCG-like LCG): the same seed gives the same corpus.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs.get(self.below(xs.len())).copied().unwrap_or("")
    }
}

/// A window of about `len` bytes of one of `texts`, on line starts.
fn window(rng: &mut Rng, texts: &[&str], len: usize) -> String {
    let t = rng.pick(texts);
    let lines: Vec<&str> = t.lines().collect();
    let mut out = String::new();
    let mut i = rng.below(lines.len());
    while out.len() < len {
        out.push_str(lines.get(i % lines.len().max(1)).copied().unwrap_or(""));
        out.push('\n');
        i += 1;
    }
    out
}

fn sentences(rng: &mut Rng, words: &[&str], sep: &str, stop: &str, len: usize) -> String {
    let mut out = String::new();
    let mut n = 0;
    while out.len() < len {
        out.push_str(rng.pick(words));
        n += 1;
        if n % (5 + rng.below(10)) == 0 {
            out.push_str(stop);
            if rng.below(4) == 0 {
                out.push('\n');
            }
        } else {
            out.push_str(sep);
        }
    }
    out
}

fn data(rng: &mut Rng, len: usize) -> String {
    let mut out = String::new();
    if rng.below(2) == 0 {
        out.push_str("id,name,amount,region,created_at\n");
        while out.len() < len {
            let row = format!(
                "{},{},{}.{:02},{},2026-{:02}-{:02}T{:02}:{:02}:00Z\n",
                rng.next() % 100_000,
                rng.pick(VALUES),
                rng.next() % 10_000,
                rng.next() % 100,
                rng.pick(VALUES),
                1 + rng.next() % 12,
                1 + rng.next() % 28,
                rng.next() % 24,
                rng.next() % 60
            );
            out.push_str(&row);
        }
    } else {
        out.push('[');
        while out.len() < len {
            let mut rec = serde_json::Map::new();
            for _ in 0..(3 + rng.below(5)) {
                let v = match rng.below(3) {
                    0 => serde_json::json!(rng.next() % 1_000_000),
                    1 => serde_json::json!(rng.pick(VALUES)),
                    _ => serde_json::json!((rng.next() % 100_000) as f64 / 100.0),
                };
                rec.insert(rng.pick(NAMES).to_owned(), v);
            }
            out.push_str(&serde_json::Value::Object(rec).to_string());
            out.push_str(",\n");
        }
        out.push_str("{}]");
    }
    out
}

fn tools(rng: &mut Rng, len: usize) -> String {
    let mut out = String::new();
    while out.len() < len {
        let mut props = serde_json::Map::new();
        for _ in 0..(1 + rng.below(5)) {
            let ty = ["string", "integer", "number", "boolean"][rng.below(4)];
            let n = 40 + rng.below(80);
            props.insert(
                rng.pick(NAMES).to_owned(),
                serde_json::json!({
                    "type": ty,
                    "description": sentences(rng, PROSE_WORDS, " ", ".", n),
                }),
            );
        }
        let n = 80 + rng.below(200);
        let tool = serde_json::json!({
            "name": format!("get_{}_{}", rng.pick(NAMES), rng.below(100)),
            "description": sentences(rng, PROSE_WORDS, " ", ".", n),
            "input_schema": {"type": "object", "properties": props},
        });
        let pretty = rng.below(2) == 0;
        let s = if pretty {
            serde_json::to_string_pretty(&tool).unwrap_or_default()
        } else {
            tool.to_string()
        };
        out.push_str(&s);
        out.push('\n');
    }
    out
}

const PROSE_WORDS: &[&str] = &[
    "the",
    "request",
    "returns",
    "a",
    "list",
    "of",
    "records",
    "for",
    "given",
    "user",
    "and",
    "region",
    "when",
    "limit",
    "is",
    "reached",
    "server",
    "waits",
    "before",
    "sending",
    "next",
    "value",
    "must",
    "be",
    "positive",
    "optional",
    "identifier",
    "account",
];

fn base64(rng: &mut Rng, len: usize) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let i = rng.below(64);
        out.push(A.get(i).copied().unwrap_or(b'A') as char);
    }
    out.push_str("==");
    out
}

/// One piece of `kind` of about `len` bytes.
pub(crate) fn piece(rng: &mut Rng, kind: Kind, len: usize) -> String {
    match kind {
        Kind::Code => window(rng, CODE, len),
        Kind::Prose => match rng.below(4) {
            0 => sentences(rng, PROSE_WORDS, " ", ". ", len),
            1 => {
                let mut words: Vec<&str> = PROSE_WORDS.to_vec();
                words.extend_from_slice(MARKS);
                sentences(rng, &words, " ", ". ", len)
            }
            _ => window(rng, PROSE, len),
        },
        Kind::Cjk => match rng.below(3) {
            0 => sentences(rng, ZH, "", "。", len),
            1 => sentences(rng, JA, "", "。", len),
            _ => sentences(rng, KO, " ", ". ", len),
        },
        Kind::OtherLanguage => match rng.below(5) {
            0 | 1 => sentences(rng, RU, " ", ". ", len),
            2 => sentences(rng, EU, " ", ". ", len),
            3 => sentences(rng, HI, " ", "। ", len),
            _ => sentences(rng, AR, " ", ". ", len),
        },
        Kind::Data => data(rng, len),
        Kind::Tools => tools(rng, len),
        Kind::Base64 => base64(rng, len),
    }
}

/// A size between 60 and 60,000 bytes, uniform in log scale.
pub(crate) fn size(rng: &mut Rng) -> usize {
    let x = (rng.next() % 10_000) as f64 / 10_000.0;
    (60.0 * 1000f64.powf(x)) as usize
}
