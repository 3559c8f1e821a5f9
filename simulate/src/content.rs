//! Generated text of the kinds real prompts hold: source code in several
//! languages, English prose, other languages (CJK, Cyrillic, accented Latin),
//! JSON and CSV data, tool results, base64 images. Everything comes from
//! seeded grammars and word lists in this file (plus the Apache License text
//! shipped with the workspace): nothing is downloaded, and the same seed gives
//! the same text.

use base64::Engine as _;

use super::workload::Rng;

/// The kind of content a generated request is made of, for the report's
/// per-kind figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContentKind {
    /// Source code: Rust, Python, TypeScript, Go, SQL.
    Code,
    /// English prose.
    Prose,
    /// Chinese, Japanese, Russian, French, German, Spanish.
    Multilingual,
    /// JSON records and CSV tables.
    Data,
    /// Tool definitions, a tool call and its result.
    Tools,
    /// A base64 image and a question about it.
    Image,
    /// A turn of a conversation that grows turn by turn, its cache
    /// breakpoint on the newest user turn.
    Conversation,
    /// A request read from a `--workload` file.
    Replayed,
}

impl ContentKind {
    /// The generated kinds of a single request's content.
    pub const GENERATED: [ContentKind; 6] = [
        ContentKind::Code,
        ContentKind::Prose,
        ContentKind::Multilingual,
        ContentKind::Data,
        ContentKind::Tools,
        ContentKind::Image,
    ];

    /// Its name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentKind::Code => "code",
            ContentKind::Prose => "prose",
            ContentKind::Multilingual => "multilingual",
            ContentKind::Data => "data",
            ContentKind::Tools => "tools",
            ContentKind::Image => "image",
            ContentKind::Conversation => "conversation",
            ContentKind::Replayed => "replayed",
        }
    }
}

/// Counts tokens as the emulator does (used only to size what is generated).
pub type Count<'a> = &'a dyn Fn(&str) -> u64;

/// Appends pieces from `next` until the text counts about `tokens`.
fn grow(rng: &mut Rng, tokens: u64, count: Count<'_>, next: fn(&mut Rng) -> String) -> String {
    let mut out = String::new();
    let mut n = 0u64;
    while n < tokens {
        let piece = next(rng);
        n += count(&piece).max(1);
        out.push_str(&piece);
    }
    out
}

/// Text of `kind` of about `tokens` tokens (images and tools are blocks,
/// not text: for them, text of a mix of kinds).
pub fn text(rng: &mut Rng, kind: ContentKind, tokens: u64, count: Count<'_>) -> String {
    match kind {
        ContentKind::Code => grow(rng, tokens, count, code_piece),
        ContentKind::Prose => grow(rng, tokens, count, prose_piece),
        ContentKind::Multilingual => grow(rng, tokens, count, multilingual_piece),
        ContentKind::Data => grow(rng, tokens, count, data_piece),
        _ => grow(rng, tokens, count, mixed_piece),
    }
}

fn mixed_piece(rng: &mut Rng) -> String {
    match rng.range(0, 3) {
        0 => code_piece(rng),
        1 => data_piece(rng),
        2 => multilingual_piece(rng),
        _ => prose_piece(rng),
    }
}

const NOUNS: &[&str] = &[
    "request",
    "limit",
    "budget",
    "window",
    "token",
    "answer",
    "customer",
    "invoice",
    "report",
    "server",
    "queue",
    "worker",
    "model",
    "record",
    "table",
    "schema",
    "deadline",
    "payment",
    "contract",
    "policy",
    "sensor",
    "reading",
    "harvest",
    "river",
    "village",
    "engine",
    "library",
    "museum",
    "garden",
    "journey",
    "committee",
    "experiment",
    "hypothesis",
    "algorithm",
    "protocol",
    "ledger",
    "archive",
    "manuscript",
    "satellite",
    "orchestra",
    "glacier",
];
const ADJECTIVES: &[&str] = &[
    "quick",
    "careful",
    "large",
    "small",
    "recent",
    "ancient",
    "reliable",
    "fragile",
    "hidden",
    "obvious",
    "expensive",
    "temporary",
    "distributed",
    "concurrent",
    "northern",
    "quiet",
    "unexpected",
    "well-known",
    "second-hand",
    "long-running",
    "idempotent",
    "asynchronous",
];
const VERBS: &[&str] = &[
    "measures",
    "delays",
    "returns",
    "rejects",
    "explains",
    "describes",
    "replaces",
    "follows",
    "protects",
    "schedules",
    "summarises",
    "translates",
    "compares",
    "records",
    "predicts",
    "overlooks",
    "negotiates",
    "reconciles",
    "illuminates",
    "retries",
];
const CONNECTIVES: &[&str] = &[
    "However,",
    "Meanwhile,",
    "In practice,",
    "As a result,",
    "For example,",
    "Later that year,",
    "Despite this,",
    "On the other hand,",
    "Finally,",
    "In 2019,",
];

fn sentence(rng: &mut Rng) -> String {
    let mut s = String::new();
    if rng.f64() < 0.3 {
        s.push_str(rng.pick::<&str>(CONNECTIVES));
        s.push(' ');
        s.push_str("the");
    } else {
        s.push_str("The");
    }
    s.push_str(&format!(
        " {} {} {} the {} {} of {} {}",
        rng.pick(ADJECTIVES),
        rng.pick(NOUNS),
        rng.pick(VERBS),
        rng.pick(ADJECTIVES),
        rng.pick(NOUNS),
        rng.range(2, 9_999),
        rng.pick(NOUNS)
    ));
    if rng.f64() < 0.4 {
        s.push_str(&format!(
            ", which {} every {} ({}% of the time)",
            rng.pick(VERBS),
            rng.pick(NOUNS),
            rng.range(1, 99)
        ));
    }
    s.push_str(if rng.f64() < 0.1 { "? " } else { ". " });
    s
}

/// The Apache License text shipped with the workspace: real English prose.
const LICENSE: &str = include_str!("../../LICENSE-APACHE");

fn prose_piece(rng: &mut Rng) -> String {
    if rng.f64() < 0.25 {
        let paragraphs: Vec<&str> = LICENSE.split("\n\n").filter(|p| p.len() > 80).collect();
        if !paragraphs.is_empty() {
            return format!("{}\n\n", rng.pick(&paragraphs).trim());
        }
    }
    let n = rng.range(3, 7);
    let mut p: String = (0..n).map(|_| sentence(rng)).collect();
    p.push_str("\n\n");
    p
}

const ZH: &[&str] = &[
    "我们",
    "今天",
    "请求",
    "服务器",
    "限制",
    "令牌",
    "模型",
    "回答",
    "时间",
    "分钟",
    "数据",
    "用户",
    "系统",
    "问题",
    "因为",
    "所以",
    "但是",
    "已经",
    "需要",
    "可以",
    "计算",
    "缓存",
    "历史",
    "文化",
    "城市",
    "发展",
    "经济",
    "研究",
    "方法",
    "结果",
    "重要",
    "中国",
    "世界",
];
const JA: &[&str] = &[
    "東京",
    "の",
    "は",
    "が",
    "を",
    "に",
    "リクエスト",
    "サーバー",
    "制限",
    "トークン",
    "です",
    "ます",
    "しました",
    "ありません",
    "処理",
    "時間",
    "キャッシュ",
    "モデル",
    "回答",
    "日本語",
];
const RU: &[&str] = &[
    "запрос",
    "сервер",
    "ограничение",
    "токен",
    "минута",
    "ответ",
    "модель",
    "данные",
    "пользователь",
    "система",
    "время",
    "быстро",
    "медленно",
    "сегодня",
    "потому",
    "что",
];
const FR: &[&str] = &[
    "la",
    "requête",
    "dépasse",
    "limite",
    "débit",
    "réponse",
    "été",
    "très",
    "déjà",
    "façon",
    "modèle",
    "données",
    "château",
    "élève",
    "où",
    "après",
    "générée",
    "fenêtre",
];
const DE: &[&str] = &[
    "die",
    "Anfrage",
    "überschreitet",
    "Grenze",
    "Größe",
    "Straße",
    "Antwort",
    "schön",
    "Geschwindigkeitsbegrenzung",
    "Zwischenspeicher",
    "für",
    "während",
    "Übersetzung",
];
const ES: &[&str] = &[
    "la",
    "solicitud",
    "límite",
    "respuesta",
    "año",
    "niño",
    "también",
    "más",
    "según",
    "caché",
    "modelo",
    "después",
    "información",
    "mañana",
];

fn multilingual_piece(rng: &mut Rng) -> String {
    let n = rng.range(8, 20) as usize;
    match rng.range(0, 5) {
        0 => {
            let mut s: String = (0..n).map(|_| *rng.pick(ZH)).collect();
            s.push_str(if rng.f64() < 0.5 { "，" } else { "。\n" });
            s
        }
        1 => {
            let mut s: String = (0..n).map(|_| *rng.pick(JA)).collect();
            s.push_str("。\n");
            s
        }
        2 => words_sentence(rng, RU, n),
        3 => words_sentence(rng, FR, n),
        4 => words_sentence(rng, DE, n),
        _ => words_sentence(rng, ES, n),
    }
}

fn words_sentence(rng: &mut Rng, words: &[&str], n: usize) -> String {
    let mut s = (0..n)
        .map(|_| *rng.pick(words))
        .collect::<Vec<_>>()
        .join(" ");
    s.push_str(". ");
    s
}

fn ident(rng: &mut Rng) -> String {
    let a = rng.pick(NOUNS).replace('-', "_");
    let b = rng.pick(ADJECTIVES).replace('-', "_");
    if rng.f64() < 0.5 {
        format!("{b}_{a}")
    } else {
        a
    }
}

fn camel(s: &str) -> String {
    s.split('_')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c).collect::<String>(),
                None => String::new(),
            }
        })
        .collect()
}

fn code_piece(rng: &mut Rng) -> String {
    let (f, a, b, c) = (ident(rng), ident(rng), ident(rng), ident(rng));
    let n = rng.range(0, 4096);
    match rng.range(0, 4) {
        0 => format!(
            "/// {}\npub fn {f}({a}: &[u64], {b}: Option<usize>) -> Result<Vec<u64>, Error> {{\n    \
             let {c} = {b}.unwrap_or({n});\n    if {a}.len() > {c} {{\n        \
             return Err(Error::TooLarge {{ len: {a}.len(), max: {c} }});\n    }}\n    \
             Ok({a}.iter().map(|x| x.saturating_mul({n}) >> 3).collect())\n}}\n\n",
            sentence(rng).trim()
        ),
        1 => format!(
            "def {f}({a}, {b}={n}):\n    \"\"\"{}\"\"\"\n    {c} = [x * {b} for x in {a} if x % 7 != 0]\n    \
             if not {c}:\n        raise ValueError(f\"{f}: empty {a} ({{len({a})}})\")\n    \
             return {{\"{a}\": {c}, \"total\": sum({c})}}\n\n",
            sentence(rng).trim()
        ),
        2 => format!(
            "export async function {}({}: {}[], {}?: number): Promise<Map<string, number>> {{\n  \
             // {}\n  const {} = new Map<string, number>();\n  for (const item of {}) {{\n    \
             {}.set(item.id, (item.count ?? 0) + ({} ?? {n}));\n  }}\n  return {};\n}}\n\n",
            camel(&f),
            camel(&a),
            camel(&b),
            camel(&c),
            sentence(rng).trim(),
            camel(&c),
            camel(&a),
            camel(&c),
            camel(&c),
            camel(&c)
        ),
        3 => format!(
            "func {}(ctx context.Context, {} []string) (int, error) {{\n\tif len({}) == 0 {{\n\t\t\
             return 0, fmt.Errorf(\"{f}: no {a}\")\n\t}}\n\t{} := {n}\n\tfor i := range {} {{\n\t\t\
             {} += len({}[i])\n\t}}\n\treturn {}, nil\n}}\n\n",
            camel(&f),
            camel(&a),
            camel(&a),
            camel(&c),
            camel(&a),
            camel(&c),
            camel(&a),
            camel(&c)
        ),
        _ => format!(
            "SELECT {a}.id, {a}.name, COUNT({b}.id) AS {c}_count, SUM({b}.amount) AS total\n\
             FROM {a}\nLEFT JOIN {b} ON {b}.{a}_id = {a}.id\nWHERE {a}.created_at >= '2025-0{}-1{}'\n\
             GROUP BY {a}.id, {a}.name\nHAVING COUNT({b}.id) > {}\nORDER BY total DESC\nLIMIT {n};\n\n",
            rng.range(1, 9),
            rng.range(0, 9),
            rng.range(1, 50)
        ),
    }
}

const NAMES: &[&str] = &[
    "Ada Lovelace",
    "Grace Hopper",
    "李雷",
    "Zoë Müller",
    "José Álvarez",
    "Ngozi Okafor",
    "Priya Raman",
    "Олег Иванов",
    "Kenji Sato",
    "Fatima Zahra",
];

fn data_piece(rng: &mut Rng) -> String {
    if rng.f64() < 0.5 {
        let name = *rng.pick(NAMES);
        let record = serde_json::json!({
            "id": rng.range(10_000, 99_999_999),
            "name": name,
            "email": format!("{}{}@example.com", ident(rng), rng.range(1, 999)),
            "amount": rng.range(1, 1_000_000) as f64 / 100.0,
            "currency": *rng.pick(&["EUR", "USD", "JPY", "GBP"]),
            "created_at": format!("2025-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                rng.range(1, 12), rng.range(1, 28), rng.range(0, 23), rng.range(0, 59), rng.range(0, 59)),
            "tags": [ident(rng), ident(rng)],
            "active": rng.f64() < 0.8,
        });
        format!("{record},\n")
    } else {
        format!(
            "{},{},{:.2},{},2025-{:02}-{:02},{}\n",
            rng.range(1, 999_999),
            rng.pick(NAMES),
            rng.range(1, 10_000_000) as f64 / 1000.0,
            ident(rng),
            rng.range(1, 12),
            rng.range(1, 28),
            rng.range(0, 1) == 1
        )
    }
}

/// A tool definition (name, description, JSON schema).
pub fn tool_definition(rng: &mut Rng) -> serde_json::Value {
    let name = ident(rng);
    let props: serde_json::Map<String, serde_json::Value> = (0..rng.range(2, 6))
        .map(|_| {
            let p = ident(rng);
            let t = *rng.pick(&["string", "integer", "number", "boolean"]);
            (
                p,
                serde_json::json!({"type": t, "description": sentence(rng).trim()}),
            )
        })
        .collect();
    let required: Vec<String> = props.keys().take(2).cloned().collect();
    serde_json::json!({
        "name": name,
        "description": format!("{}{}", sentence(rng), sentence(rng)).trim(),
        "input_schema": {"type": "object", "properties": props, "required": required},
    })
}

/// A PNG image of `width` x `height`, as base64: a real PNG signature and
/// header (so a client can read its size), and seeded bytes for its data.
pub fn png_base64(rng: &mut Rng, width: u32, height: u32) -> String {
    let mut png: Vec<u8> = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    // Compressed image data is close to random: about a tenth of a byte per pixel.
    let len = ((u64::from(width) * u64::from(height)) / 10).clamp(2_000, 120_000);
    let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
    chunk(&mut png, b"IDAT", &data);
    chunk(&mut png, b"IEND", &[]);
    base64::engine::general_purpose::STANDARD.encode(png)
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(data);
    png.extend_from_slice(&crc32(&crc_input).to_be_bytes());
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> u64 {
        s.chars().count() as u64 / 4
    }

    #[test]
    fn each_kind_is_what_it_says() {
        let mut rng = Rng::new(1);
        let code = text(&mut rng, ContentKind::Code, 400, &chars);
        assert!(code.contains('{') && code.contains('('), "{code}");
        let cjk = text(&mut rng, ContentKind::Multilingual, 400, &chars);
        assert!(!cjk.is_ascii(), "{cjk}");
        let data = text(&mut rng, ContentKind::Data, 400, &chars);
        assert!(data.contains("\"id\":") || data.contains(','), "{data}");
        let prose = text(&mut rng, ContentKind::Prose, 400, &chars);
        assert!(chars(&prose) >= 400 && chars(&prose) < 900, "{prose}");
    }

    #[test]
    fn the_png_header_says_its_size_and_its_crc_is_right() {
        let mut rng = Rng::new(2);
        let b64 = png_base64(&mut rng, 1200, 800);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        assert_eq!(&png[1..4], b"PNG");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(
            u32::from_be_bytes([png[16], png[17], png[18], png[19]]),
            1200
        );
        assert_eq!(
            u32::from_be_bytes([png[20], png[21], png[22], png[23]]),
            800
        );
        // The CRC of "IEND" with no data, as every PNG ends.
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }
}
