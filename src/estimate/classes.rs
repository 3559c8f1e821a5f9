//! A token model over character classes.
//!
//! A byte-pair tokenizer splits text along character classes: a run of
//! letters is one token or a few, digits go in groups of up to three, a run of
//! blanks or line breaks is one token, punctuation mostly one token per mark,
//! and text in other scripts costs per character at rates that differ by
//! script (CJK near one token per character, Cyrillic a few characters per
//! token). [`Classes`] counts those classes in one pass over the bytes, and
//! [`TextModel`] turns the counts into tokens with one coefficient per class.
//!
//! # How the coefficients were made
//!
//! [`TextModel::FITTED`] was fitted offline by non-negative least squares on
//! relative error, against the `o200k_base` byte-pair tokenizer (the
//! `tiktoken-rs` crate, a dev-dependency only), over a seeded mixed corpus of
//! 3,010 pieces of 60 to 60,000 bytes: source code (Rust, Python,
//! JavaScript, shell, TOML), English prose and Markdown, generated Chinese,
//! Japanese, Korean, Russian, Hindi, Arabic, Hebrew and accented European text, JSON and CSV data, tool
//! definitions, and base64. To re-make them:
//!
//! ```text
//! cargo test --lib --all-features fit_text_model -- --ignored --nocapture
//! ```
//!
//! # Error per kind of text
//!
//! Relative error of the fitted model against `o200k_base` on that corpus
//! of another seed (p50 / p90 of |estimate - actual| / actual, per piece):
//!
//! | kind | p50 | p90 |
//! |---|---|---|
//! | code (Rust, Python, JavaScript, shell, TOML) | 3.2 % | 7.7 % |
//! | English prose and Markdown | 3.0 % | 6.8 % |
//! | Chinese, Japanese, Korean | 2.0 % | 8.4 % |
//! | Russian, Hindi, Arabic, Hebrew, accented European | 2.8 % | 6.0 % |
//! | JSON and CSV data | 0.8 % | 1.6 % |
//! | tool definitions (JSON schemas) | 0.6 % | 2.2 % |
//! | base64 | 0.8 % | 3.9 % |
//!
//! The generated non-English text repeats a small vocabulary, so real text in
//! those languages may be off by more; a model whose tokenizer is not
//! `o200k_base` (every Claude model) is off by its own ratio. Both are what
//! calibration learns.
//!
//! Calibration (per model, by [`Group`] of features, with margins per kind
//! of content) then learns the ratio between this model and the tokenizer
//! of the model really called.

/// Character-class counts of some text. All counts saturate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Classes {
    /// Counts per feature, indexed by [`Feature`].
    pub(crate) n: [u64; FEATURES],
}

/// The features counted, in the order of [`Classes::n`] and the coefficients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Feature {
    /// ASCII letters.
    Letters = 0,
    /// Runs of ASCII letters (words).
    Words,
    /// A lower-case letter followed by an upper-case one (camelCase, base64).
    CaseSwitches,
    /// ASCII digits.
    Digits,
    /// Runs of digits.
    DigitRuns,
    /// Line breaks and tabs.
    Breaks,
    /// Blanks after another blank or a line break (indentation).
    Indent,
    /// ASCII punctuation and symbols.
    Punct,
    /// Runs of punctuation.
    PunctRuns,
    /// Latin-1 supplement, Latin extended, Greek (U+0080-U+03FF).
    Latin,
    /// Cyrillic (U+0400-U+04FF).
    Cyrillic,
    /// Other two-byte scripts: Armenian, Hebrew, Arabic, Syriac... (U+0500-U+07FF).
    OtherTwoByte,
    /// CJK: punctuation, kana, unified ideographs (U+3000-U+9FFF).
    Cjk,
    /// Hangul and Yi (U+A000-U+D7FF).
    Hangul,
    /// Other three-byte characters: Indic scripts, general punctuation, symbols.
    OtherThreeByte,
    /// Four-byte characters: emoji, rare ideographs.
    FourByte,
    /// Runs of non-ASCII letters of two-byte scripts (words of Cyrillic, Greek...).
    NonAsciiWords,
    /// Japanese kana (U+3040-U+30FF), counted apart from ideographs.
    Kana,
}

/// The number of features.
pub(crate) const FEATURES: usize = 18;

/// What the previous character was, for run counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prev {
    None,
    Lower,
    Upper,
    Digit,
    Blank,
    Break,
    Punct,
    TwoByte,
    Other,
}

/// The class of each ASCII byte: 0 other/control, 1 lower, 2 upper, 3 digit,
/// 4 blank, 5 break or tab, 6 punctuation.
const ASCII: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        t[i] = if c.is_ascii_lowercase() {
            1
        } else if c.is_ascii_uppercase() {
            2
        } else if c.is_ascii_digit() {
            3
        } else if c == b' ' {
            4
        } else if c == b'\n' || c == b'\t' || c == b'\r' {
            5
        } else if c.is_ascii_punctuation() {
            6
        } else {
            0
        };
        i += 1;
    }
    t
};

/// How many bytes at the start of `b` are ASCII lower-case letters: eight
/// at a time (a test of each byte's seven low bits against `a` and `z`, and
/// of its high bit), the last few one by one.
#[inline(always)]
fn lower_prefix(b: &[u8]) -> usize {
    const LOW: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut n = 0;
    while let Some(chunk) = b.get(n..n + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let w = u64::from_le_bytes(bytes);
        let low = w & LOW;
        // Each lane's high bit: at least `a`, above `z`; no carry leaves a
        // lane (at most 0x7f + 0x1f).
        let from_a = low.wrapping_add(0x1f1f_1f1f_1f1f_1f1f);
        let past_z = low.wrapping_add(0x0505_0505_0505_0505);
        let lower = from_a & !past_z & !w & HIGH;
        if lower != HIGH {
            return n + ((!lower & HIGH).trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    let tail = b.get(n..).unwrap_or(&[]);
    n + tail
        .iter()
        .position(|x| !x.is_ascii_lowercase())
        .unwrap_or(tail.len())
}

/// A counter that keeps the previous character's class across calls.
#[derive(Debug, Clone, Copy)]
struct Counter {
    c: Classes,
    prev: Prev,
}

impl Counter {
    fn new() -> Self {
        Self {
            c: Classes::default(),
            prev: Prev::None,
        }
    }

    #[inline(always)]
    fn bump(&mut self, f: Feature) {
        let slot = &mut self.c.n[f as usize];
        *slot = slot.saturating_add(1);
    }

    #[inline(always)]
    fn ascii(&mut self, x: u8) {
        let class = ASCII.get(usize::from(x)).copied().unwrap_or(0);
        let prev = self.prev;
        self.prev = match class {
            1 | 2 => {
                self.bump(Feature::Letters);
                let upper = class == 2;
                match prev {
                    Prev::Lower if upper => self.bump(Feature::CaseSwitches),
                    Prev::Lower | Prev::Upper => {}
                    _ => self.bump(Feature::Words),
                }
                if upper {
                    Prev::Upper
                } else {
                    Prev::Lower
                }
            }
            3 => {
                self.bump(Feature::Digits);
                if prev != Prev::Digit {
                    self.bump(Feature::DigitRuns);
                }
                Prev::Digit
            }
            4 => {
                if matches!(prev, Prev::Blank | Prev::Break) {
                    self.bump(Feature::Indent);
                }
                Prev::Blank
            }
            5 => {
                self.bump(Feature::Breaks);
                Prev::Break
            }
            6 => {
                self.bump(Feature::Punct);
                if prev != Prev::Punct {
                    self.bump(Feature::PunctRuns);
                }
                Prev::Punct
            }
            _ => Prev::Other,
        };
    }

    /// A non-ASCII code point.
    fn wide(&mut self, cp: u32) {
        let f = match cp {
            0x80..=0x3ff => Feature::Latin,
            0x400..=0x4ff => Feature::Cyrillic,
            0x500..=0x7ff => Feature::OtherTwoByte,
            0x3040..=0x30ff => Feature::Kana,
            0x3000..=0x9fff => Feature::Cjk,
            0xa000..=0xd7ff => Feature::Hangul,
            0x800..=0xffff => Feature::OtherThreeByte,
            _ => Feature::FourByte,
        };
        self.bump(f);
        let two = cp < 0x800;
        if two && self.prev != Prev::TwoByte {
            self.bump(Feature::NonAsciiWords);
        }
        self.prev = if two { Prev::TwoByte } else { Prev::Other };
    }

    /// A UTF-8 lead byte (continuation bytes are skipped by the callers).
    #[inline(always)]
    fn lead(&mut self, b: &[u8], i: usize, x: u8) -> usize {
        let (len, init) = match x {
            0xc0..=0xdf => (2, u32::from(x & 0x1f)),
            0xe0..=0xef => (3, u32::from(x & 0x0f)),
            0xf0..=0xf7 => (4, u32::from(x & 0x07)),
            // A stray continuation byte: part of a character already counted.
            _ => return i + 1,
        };
        let mut cp = init;
        for k in 1..len {
            cp = (cp << 6) | u32::from(b.get(i + k).copied().unwrap_or(0x80) & 0x3f);
        }
        self.wide(cp);
        i + len
    }

    /// The rest of a run of lower-case letters from `b[i]` (the common
    /// case, counted without the state machine), and the words of
    /// lower-case letters that follow it each after one blank (prose's
    /// " word word"), counted as [`blank_word`](Self::blank_word) counts
    /// each, in registers and without the dispatch per character; returns
    /// where it stopped.
    #[inline(always)]
    fn lower_run(&mut self, b: &[u8], i: usize) -> usize {
        let rest = b.get(i..).unwrap_or(&[]);
        let n = lower_prefix(rest);
        if n == 0 {
            return i;
        }
        self.prev = Prev::Lower;
        let mut letters = n as u64;
        let mut words = 0u64;
        let mut j = i + n;
        // After a letter, a blank then a lower-case letter starts a word.
        while let (Some(b' '), Some(y)) = (b.get(j), b.get(j + 1)) {
            if !y.is_ascii_lowercase() {
                break;
            }
            let m = lower_prefix(b.get(j + 1..).unwrap_or(&[]));
            words += 1;
            letters += m as u64;
            j += 1 + m;
        }
        // Both are at most the input's length: adding them at once
        // saturates as adding them one by one does.
        let slot = &mut self.c.n[Feature::Letters as usize];
        *slot = slot.saturating_add(letters);
        let slot = &mut self.c.n[Feature::Words as usize];
        *slot = slot.saturating_add(words);
        j
    }

    /// A blank then a lower-case letter at `b[i]` after a character that is
    /// not a blank or a break (the common " word" of prose): the blank adds
    /// nothing, the letter starts a word. Returns where the word's run of
    /// lower-case letters stopped, or `None` when the pattern does not hold.
    #[inline(always)]
    fn blank_word(&mut self, b: &[u8], i: usize) -> Option<usize> {
        let (&x, &y) = (b.get(i)?, b.get(i + 1)?);
        if x != b' ' || !y.is_ascii_lowercase() || matches!(self.prev, Prev::Blank | Prev::Break) {
            return None;
        }
        self.bump(Feature::Words);
        Some(self.lower_run(b, i + 1))
    }

    /// Text as written (no escapes).
    fn raw(&mut self, b: &[u8]) {
        let mut i = 0;
        while let Some(&x) = b.get(i) {
            if let Some(next) = self.blank_word(b, i) {
                i = next;
            } else if x < 0x80 {
                self.ascii(x);
                i += 1;
                if matches!(self.prev, Prev::Lower | Prev::Upper) {
                    i = self.lower_run(b, i);
                }
            } else {
                i = self.lead(b, i, x);
            }
        }
    }

    /// The contents of a JSON string (between the quotes), escapes decoded.
    fn string(&mut self, b: &[u8]) {
        let mut i = 0;
        while let Some(&x) = b.get(i) {
            if let Some(next) = self.blank_word(b, i) {
                i = next;
            } else if x == b'\\' {
                i = self.escape(b, i);
            } else if x < 0x80 {
                self.ascii(x);
                i += 1;
                if matches!(self.prev, Prev::Lower | Prev::Upper) {
                    i = self.lower_run(b, i);
                }
            } else {
                i = self.lead(b, i, x);
            }
        }
    }

    /// An escape at `b[i]` (a backslash); returns the index after it. A
    /// two-byte escape (a line break, a quote) in line, `\\u` apart.
    #[inline(always)]
    fn escape(&mut self, b: &[u8], i: usize) -> usize {
        match b.get(i + 1) {
            Some(b'n') => self.ascii(b'\n'),
            Some(b't') => self.ascii(b'\t'),
            Some(b'r') => self.ascii(b'\r'),
            Some(b'u') => return self.unicode_escape(b, i),
            Some(&x) => self.ascii(x),
            None => self.ascii(b'\\'),
        }
        i + 2
    }

    /// A `\\u` escape at `b[i]`; returns the index after it (and after the
    /// second of a surrogate pair).
    #[inline(never)]
    fn unicode_escape(&mut self, b: &[u8], i: usize) -> usize {
        let cp = b
            .get(i + 2..i + 6)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok());
        match cp {
            Some(cp) if cp < 0x80 => self.ascii(cp as u8),
            Some(cp) => {
                // A surrogate pair is one four-byte character.
                let pair = (0xd800..0xdc00).contains(&cp)
                    && b.get(i + 6..i + 8) == Some(b"\\u".as_slice());
                self.wide(if pair { 0x10000 } else { cp });
                return if pair { i + 12 } else { i + 6 };
            }
            None => self.ascii(b'u'),
        }
        i + 6
    }

    /// The strings (keys too) inside the JSON value `b`, each as text.
    fn strings_in(&mut self, b: &[u8]) {
        let mut i = 0;
        while let Some(off) = memchr::memchr(b'"', b.get(i..).unwrap_or(&[])) {
            let start = i + off + 1;
            let mut j = start;
            // Find the closing quote, stepping over escapes; an unclosed
            // string runs to the end.
            let mut end = b.len();
            while let Some(k) = memchr::memchr2(b'"', b'\\', b.get(j..).unwrap_or(&[])) {
                j += k;
                if b.get(j) == Some(&b'"') {
                    end = j;
                    break;
                }
                j += 2;
            }
            self.string(b.get(start..end).unwrap_or(&[]));
            // Strings are separate pieces of text.
            self.prev = Prev::None;
            i = end + 1;
        }
    }
}

impl Classes {
    /// True when nothing was counted.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        // One OR over the counts (no branch per count).
        self.n.iter().fold(0, |acc, &n| acc | n) == 0
    }

    /// Adds `other`'s counts (saturating).
    pub(crate) fn add(&mut self, other: &Classes) {
        for (a, b) in self.n.iter_mut().zip(other.n.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// Counts text as written (no escapes): a JSON value tokenized as its text.
    pub(crate) fn raw(b: &[u8]) -> Classes {
        let mut c = Counter::new();
        c.raw(b);
        c.c
    }

    /// Counts the contents of one JSON string (escapes decoded).
    pub(crate) fn string(b: &[u8]) -> Classes {
        let mut c = Counter::new();
        c.string(b);
        c.c
    }

    /// Counts the JSON string whose contents begin at `b[start]` (just
    /// after its opening quote) as [`string`](Self::string) counts them,
    /// finding its closing quote in the same pass: the counts and the
    /// closing quote's index. `None` where the string is not closed, holds a
    /// `\u` escape without four hex digits, or a multi-byte character cut
    /// by a quote or a backslash: input a JSON scanner would refuse or read
    /// apart, which the caller scans first and counts after, as before.
    pub(crate) fn string_at(b: &[u8], start: usize) -> Option<(Classes, usize)> {
        let mut c = Counter::new();
        let mut i = start;
        loop {
            let x = *b.get(i)?;
            if x == b'"' {
                return Some((c.c, i));
            }
            if let Some(next) = c.blank_word(b, i) {
                i = next;
            } else if x == b'\\' {
                if *b.get(i + 1)? == b'u' {
                    // What the scanner checks of each `\u` escape, the
                    // second of a surrogate pair the count reads too.
                    let hex = |at: usize| {
                        b.get(at..at + 4)
                            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
                    };
                    if !hex(i + 2) || (b.get(i + 6..i + 8) == Some(b"\\u") && !hex(i + 8)) {
                        return None;
                    }
                }
                i = c.escape(b, i);
            } else if x < 0x80 {
                c.ascii(x);
                i += 1;
                if matches!(c.prev, Prev::Lower | Prev::Upper) {
                    i = c.lower_run(b, i);
                }
            } else {
                let len = match x {
                    0xc0..=0xdf => 2,
                    0xe0..=0xef => 3,
                    0xf0..=0xf7 => 4,
                    _ => 1,
                };
                if b.get(i + 1..i + len)?
                    .iter()
                    .any(|&y| y == b'"' || y == b'\\')
                {
                    return None;
                }
                i = c.lead(b, i, x);
            }
        }
    }

    /// Counts every string (keys too) of the JSON value `b`.
    pub(crate) fn strings_in(b: &[u8]) -> Classes {
        let mut c = Counter::new();
        c.strings_in(b);
        c.c
    }

    /// The count of one feature.
    pub(crate) fn get(&self, f: Feature) -> u64 {
        self.n.get(f as usize).copied().unwrap_or(0)
    }

    /// All characters counted (blanks that start a run are not counted).
    pub(crate) fn chars(&self) -> u64 {
        use Feature::*;
        [
            Letters,
            Digits,
            Breaks,
            Indent,
            Punct,
            Latin,
            Cyrillic,
            OtherTwoByte,
            Cjk,
            Hangul,
            OtherThreeByte,
            FourByte,
            Kana,
        ]
        .iter()
        .fold(0u64, |a, f| a.saturating_add(self.get(*f)))
    }

    /// The kind of content these counts look like most.
    pub(crate) fn kind(&self) -> ContentKind {
        use Feature::*;
        let n = &self.n;
        let f = |x: Feature| n[x as usize] as f64;
        let chars = self.chars().max(1) as f64;
        // Each share as a sum of its counts in the order listed, over all
        // characters. Text without characters of other scripts (most) has
        // none of either script share: no division for them.
        let wide = NON_ASCII.iter().fold(0, |acc, &x| acc | n[x as usize]);
        if wide != 0 {
            if (f(Cjk) + f(Hangul) + f(Kana)) / chars > 0.15 {
                return ContentKind::Cjk;
            }
            let other = f(Latin) + f(Cyrillic) + f(OtherTwoByte) + f(OtherThreeByte) + f(FourByte);
            if other / chars > 0.15 {
                return ContentKind::OtherScript;
            }
        }
        let letters = n[Letters as usize].max(1) as f64;
        if f(CaseSwitches) / letters > 0.08 && (f(Breaks) + f(Indent)) / chars < 0.01 {
            return ContentKind::Encoded;
        }
        if (f(Digits) + f(Punct)) / chars > 0.3 {
            return ContentKind::Data;
        }
        if (f(Punct) + f(Indent) + f(Breaks)) / chars > 0.12 {
            return ContentKind::Code;
        }
        ContentKind::Prose
    }
}

/// The features of characters outside ASCII.
const NON_ASCII: [Feature; 8] = [
    Feature::Latin,
    Feature::Cyrillic,
    Feature::OtherTwoByte,
    Feature::Cjk,
    Feature::Hangul,
    Feature::OtherThreeByte,
    Feature::FourByte,
    Feature::Kana,
];

/// A kind of content the character classes tell apart; calibration sizes a
/// separate margin for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum ContentKind {
    /// Natural language in Latin letters.
    Prose,
    /// Source code and markup.
    Code,
    /// Numbers and punctuation: JSON, CSV, tables.
    Data,
    /// Long letter runs without breaks: base64, hashes.
    Encoded,
    /// Chinese, Japanese, Korean.
    Cjk,
    /// Other non-ASCII scripts (Cyrillic, Greek, accented Latin, Arabic...).
    OtherScript,
}

impl ContentKind {
    /// Every kind, in the order of their discriminants.
    pub(crate) const ALL: [ContentKind; 6] = [
        ContentKind::Prose,
        ContentKind::Code,
        ContentKind::Data,
        ContentKind::Encoded,
        ContentKind::Cjk,
        ContentKind::OtherScript,
    ];
}

/// Tokens per feature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TextModel {
    pub(crate) coef: [f64; FEATURES],
}

impl TextModel {
    /// Fitted against `o200k_base` (see the module docs for how).
    pub(crate) const FITTED: TextModel = TextModel {
        coef: [
            0.0563, 0.7883, 1.867, 0.1203, 1.2743, 0.9405, 0.0515, 0.0335, 0.6544, 0.0461, 0.2321,
            0.2938, 0.5706, 0.6578, 0.3853, 3.9346, 0.0421, 0.6938,
        ],
    };

    /// The tokens of text with these counts.
    pub(crate) fn tokens(&self, c: &Classes) -> f64 {
        self.coef
            .iter()
            .zip(c.n.iter())
            .map(|(k, n)| k * *n as f64)
            .sum()
    }

    /// The tokens of each feature of text with these counts, worked out
    /// once for both the whole ([`Terms::sum`], the same to the bit as
    /// [`tokens`](Self::tokens)) and its split by [`Group`]
    /// ([`Terms::groups`], whose sum is the whole).
    #[inline]
    pub(crate) fn terms(&self, c: &Classes) -> Terms {
        let mut t = [0.0; FEATURES];
        for ((out, k), n) in t.iter_mut().zip(self.coef.iter()).zip(c.n.iter()) {
            *out = k * count_f64(*n);
        }
        Terms(t)
    }
}

/// A count as a float: counts of text fit in 63 bits, where the conversion
/// is one instruction (the same value as `n as f64`).
#[inline(always)]
fn count_f64(n: u64) -> f64 {
    match i64::try_from(n) {
        Ok(i) => i as f64,
        Err(_) => n as f64,
    }
}

/// The text model's tokens per feature of some counts (see
/// [`TextModel::terms`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Terms([f64; FEATURES]);

impl Terms {
    /// The tokens of the text: [`TextModel::tokens`] of its counts.
    #[inline]
    pub(crate) fn sum(&self) -> f64 {
        self.0.iter().sum()
    }

    /// The tokens by [`Group`], each group's features added in their order.
    #[inline]
    pub(crate) fn groups(&self) -> [f64; GROUPS] {
        let mut out = [0.0; GROUPS];
        for (t, g) in self.0.iter().zip(GROUP_OF.iter()) {
            if let Some(slot) = out.get_mut(*g as usize) {
                *slot += *t;
            }
        }
        out
    }
}

/// Groups of [`Feature`]s whose tokens calibration learns apart: the parts
/// of a text a tokenizer other than the model's reference may count at
/// different rates (a tokenizer with more CJK merges, or fewer for code
/// symbols), so that a request mixing them gets each part's own ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Group {
    /// ASCII letters and words (with case switches).
    Words = 0,
    /// Digits and their runs.
    Digits,
    /// Line breaks, tabs and indentation.
    Space,
    /// ASCII punctuation and symbols.
    Punct,
    /// Latin-1 supplement, Latin extended and Greek.
    Latin,
    /// Cyrillic and the other two-byte scripts, with their words.
    TwoByte,
    /// CJK ideographs, punctuation and kana.
    Cjk,
    /// Hangul and Yi.
    Hangul,
    /// Other three-byte and four-byte characters (Indic scripts, emoji).
    Other,
}

/// The number of groups.
pub(crate) const GROUPS: usize = 9;

/// The group of each feature, in the order of [`Feature`].
const GROUP_OF: [Group; FEATURES] = [
    Group::Words,   // Letters
    Group::Words,   // Words
    Group::Words,   // CaseSwitches
    Group::Digits,  // Digits
    Group::Digits,  // DigitRuns
    Group::Space,   // Breaks
    Group::Space,   // Indent
    Group::Punct,   // Punct
    Group::Punct,   // PunctRuns
    Group::Latin,   // Latin
    Group::TwoByte, // Cyrillic
    Group::TwoByte, // OtherTwoByte
    Group::Cjk,     // Cjk
    Group::Hangul,  // Hangul
    Group::Other,   // OtherThreeByte
    Group::Other,   // FourByte
    Group::TwoByte, // NonAsciiWords
    Group::Cjk,     // Kana
];

#[cfg(test)]
mod tests {
    use super::super::corpus::{piece, size, Kind, Rng, KINDS};
    use super::*;

    #[test]
    fn counts_classes() {
        let c = Classes::raw("fooBar  12345\n\tx.,! é жж 中文 😀".as_bytes());
        assert_eq!(c.get(Feature::Letters), 7);
        assert_eq!(c.get(Feature::Words), 2);
        assert_eq!(c.get(Feature::CaseSwitches), 1);
        assert_eq!(c.get(Feature::Digits), 5);
        assert_eq!(c.get(Feature::DigitRuns), 1);
        assert_eq!(c.get(Feature::Breaks), 2);
        assert_eq!(c.get(Feature::Indent), 1);
        assert_eq!(c.get(Feature::Punct), 3);
        assert_eq!(c.get(Feature::PunctRuns), 1);
        assert_eq!(c.get(Feature::Latin), 1);
        assert_eq!(c.get(Feature::Cyrillic), 2);
        assert_eq!(c.get(Feature::NonAsciiWords), 2);
        assert_eq!(c.get(Feature::Cjk), 2);
        assert_eq!(c.get(Feature::FourByte), 1);
    }

    /// The plain sums the estimator used before its terms were worked out
    /// once: the whole, the groups, and the kind from shares of all.
    fn plain(c: &Classes) -> (f64, [f64; GROUPS], ContentKind) {
        let m = &TextModel::FITTED;
        let tokens: f64 = m
            .coef
            .iter()
            .zip(c.n.iter())
            .map(|(k, n)| k * *n as f64)
            .sum();
        let mut groups = [0.0; GROUPS];
        for ((k, n), g) in m.coef.iter().zip(c.n.iter()).zip(GROUP_OF.iter()) {
            groups[*g as usize] += k * *n as f64;
        }
        use Feature::*;
        let chars = c.chars().max(1) as f64;
        let share = |fs: &[Feature]| fs.iter().map(|f| c.get(*f) as f64).sum::<f64>() / chars;
        let letters = c.get(Letters).max(1) as f64;
        let kind = if share(&[Cjk, Hangul, Kana]) > 0.15 {
            ContentKind::Cjk
        } else if share(&[Latin, Cyrillic, OtherTwoByte, OtherThreeByte, FourByte]) > 0.15 {
            ContentKind::OtherScript
        } else if c.get(CaseSwitches) as f64 / letters > 0.08 && share(&[Breaks, Indent]) < 0.01 {
            ContentKind::Encoded
        } else if share(&[Digits, Punct]) > 0.3 {
            ContentKind::Data
        } else if share(&[Punct, Indent, Breaks]) > 0.12 {
            ContentKind::Code
        } else {
            ContentKind::Prose
        };
        (tokens, groups, kind)
    }

    #[test]
    fn terms_and_kind_are_the_plain_sums_to_the_bit() {
        let mut rng = Rng(11);
        let mut kinds = std::collections::HashSet::new();
        for case in 0..20_000 {
            let c = if case % 2 == 0 {
                // Text of every kind of the corpus.
                let k = KINDS[rng.below(KINDS.len())];
                let len = 1 + rng.below(3000);
                Classes::raw(piece(&mut rng, k, len).as_bytes())
            } else {
                // Any counts, many of them zero, some huge.
                let mut c = Classes::default();
                for n in c.n.iter_mut() {
                    *n = match rng.below(6) {
                        0..=2 => 0,
                        3 => rng.below(10) as u64,
                        4 => rng.next(),
                        _ => u64::MAX - rng.below(3) as u64,
                    };
                }
                c
            };
            let (tokens, groups, kind) = plain(&c);
            let terms = TextModel::FITTED.terms(&c);
            assert_eq!(terms.sum().to_bits(), tokens.to_bits(), "{c:?}");
            assert_eq!(TextModel::FITTED.tokens(&c).to_bits(), tokens.to_bits());
            assert_eq!(terms.groups().map(f64::to_bits), groups.map(f64::to_bits));
            assert_eq!(c.kind(), kind, "{c:?}");
            kinds.insert(kind);
        }
        // Every kind was met.
        assert_eq!(kinds.len(), ContentKind::ALL.len());
    }

    #[test]
    fn json_strings_decode_escapes() {
        let s = Classes::string(br#"a\nb\"\u00e9\u4e2d\ud83d\ude00"#);
        assert_eq!(s.get(Feature::Letters), 2);
        assert_eq!(s.get(Feature::Breaks), 1);
        assert_eq!(s.get(Feature::Punct), 1);
        assert_eq!(s.get(Feature::Latin), 1);
        assert_eq!(s.get(Feature::Cjk), 1);
        assert_eq!(s.get(Feature::FourByte), 1);
        // Only strings count inside a value, keys included; not the syntax.
        let v = Classes::strings_in(br#"{"ab": [1, "c\"d", true]}"#);
        assert_eq!(v.get(Feature::Letters), 4);
        assert_eq!(v.get(Feature::Punct), 1);
        assert_eq!(v.get(Feature::Digits), 0);
    }

    #[test]
    fn tells_kinds_apart() {
        let mut rng = Rng(7);
        let kind = |rng: &mut Rng, k: Kind| Classes::raw(piece(rng, k, 4000).as_bytes()).kind();
        assert_eq!(kind(&mut rng, Kind::Cjk), ContentKind::Cjk);
        assert_eq!(
            kind(&mut rng, Kind::OtherLanguage),
            ContentKind::OtherScript
        );
        assert_eq!(kind(&mut rng, Kind::Base64), ContentKind::Encoded);
        assert_eq!(kind(&mut rng, Kind::Data), ContentKind::Data);
    }

    fn reference() -> tiktoken_rs::CoreBPE {
        match tiktoken_rs::o200k_base() {
            Ok(b) => b,
            Err(e) => panic!("o200k_base: {e}"),
        }
    }

    /// `(kind, features, reference tokens)` of a seeded corpus.
    fn samples(seed: u64, per_kind: usize) -> Vec<(Kind, Classes, f64)> {
        let bpe = reference();
        let mut rng = Rng(seed);
        let mut out = Vec::new();
        for kind in KINDS {
            for _ in 0..per_kind {
                let len = size(&mut rng);
                let text = piece(&mut rng, kind, len);
                let actual = bpe.encode_ordinary(&text).len() as f64;
                out.push((kind, Classes::raw(text.as_bytes()), actual.max(1.0)));
            }
        }
        out
    }

    fn quantile(xs: &mut [f64], q: f64) -> f64 {
        xs.sort_by(f64::total_cmp);
        let i = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len().max(1)) - 1;
        xs.get(i).copied().unwrap_or(f64::NAN)
    }

    /// Per kind: (p50, p90) of |model - reference| / reference.
    fn errors(model: &TextModel, s: &[(Kind, Classes, f64)]) -> Vec<(Kind, f64, f64)> {
        KINDS
            .iter()
            .map(|&k| {
                let mut e: Vec<f64> = s
                    .iter()
                    .filter(|(kk, _, _)| *kk == k)
                    .map(|(_, c, y)| (model.tokens(c) - y).abs() / y)
                    .collect();
                (k, quantile(&mut e, 0.5), quantile(&mut e, 0.9))
            })
            .collect()
    }

    /// The fitted model stays within the error the module docs state, per kind
    /// of text, on a corpus of another seed than the one it was fitted on.
    #[test]
    fn fitted_model_error_per_kind() {
        let s = samples(2024, 40);
        for (k, p50, p90) in errors(&TextModel::FITTED, &s) {
            assert!(p90 <= 0.15, "{}: p50 {p50:.3} p90 {p90:.3}", k.name());
        }
    }

    /// Fits [`TextModel::FITTED`]: non-negative least squares on relative
    /// error by coordinate descent. Prints the coefficients and the error
    /// table of the module docs.
    #[test]
    #[ignore = "offline fitting tool: cargo test --lib --all-features fit_text_model -- --ignored --nocapture"]
    // Matrix code reads best with indices.
    #[allow(clippy::needless_range_loop)]
    fn fit_text_model() {
        let s = samples(1, 430);
        let mut a = [[0f64; FEATURES]; FEATURES];
        let mut b = [0f64; FEATURES];
        for (_, c, y) in &s {
            let w = 1.0 / (y * y);
            for i in 0..FEATURES {
                let xi = c.n[i] as f64;
                b[i] += w * xi * y;
                for j in 0..FEATURES {
                    a[i][j] += w * xi * c.n[j] as f64;
                }
            }
        }
        let mut coef = [0f64; FEATURES];
        for _ in 0..20_000 {
            for j in 0..FEATURES {
                if a[j][j] <= 0.0 {
                    continue;
                }
                let rest: f64 = (0..FEATURES)
                    .filter(|&k| k != j)
                    .map(|k| a[j][k] * coef[k])
                    .sum();
                coef[j] = ((b[j] - rest) / a[j][j]).max(0.0);
            }
        }
        let model = TextModel { coef };
        println!(
            "coef: {:?}",
            coef.map(|c| (c * 10_000.0).round() / 10_000.0)
        );
        for (k, p50, p90) in errors(&model, &samples(2024, 40)) {
            println!(
                "//! | {} | {:.1} % | {:.1} % |",
                k.name(),
                p50 * 100.0,
                p90 * 100.0
            );
        }
    }

    /// The run of lower-case letters read eight bytes at a time ends where
    /// a byte-by-byte read ends it, for every byte at every position.
    #[test]
    fn a_lower_case_run_ends_at_the_first_other_byte() {
        for other in 0..=255u8 {
            for len in 0..20 {
                for at in 0..=len {
                    let mut b: Vec<u8> = (0..len).map(|k| b'a' + (k % 26) as u8).collect();
                    if at < len {
                        b[at] = other;
                    }
                    let expected = b
                        .iter()
                        .position(|x| !x.is_ascii_lowercase())
                        .unwrap_or(len);
                    assert_eq!(lower_prefix(&b), expected, "{other} at {at} of {len}");
                }
            }
        }
    }

    /// The counts of text as the state machine gives them one character
    /// at a time, without the fast paths (runs of lower-case letters,
    /// " word" after a word): `escapes` decodes JSON escapes as a string's
    /// contents, else the text is counted as written.
    fn by_character(b: &[u8], escapes: bool) -> Classes {
        let mut c = Counter::new();
        let mut i = 0;
        while let Some(&x) = b.get(i) {
            if escapes && x == b'\\' {
                i = c.escape(b, i);
            } else if x < 0x80 {
                c.ascii(x);
                i += 1;
            } else {
                i = c.lead(b, i, x);
            }
        }
        c.c
    }

    /// Text counted with the fast paths counts as the state machine counts
    /// it one character at a time: prose, words after capitals, digits and
    /// punctuation, blanks and breaks, escapes and wide characters, at every
    /// length, and the corpus's text of every kind.
    #[test]
    fn fast_paths_count_as_the_state_machine() {
        let pieces: &[&str] = &[
            "word",
            " word",
            " the",
            " a",
            "  indented",
            " ",
            "\n",
            "\t",
            "\n  x",
            "Capital",
            " Word",
            "camelCase",
            " x",
            "42",
            " 7",
            ".",
            ", ",
            "!?",
            "\\\"",
            " caf\u{e9}",
            " \u{43f}\u{440}\u{438}",
            "\u{4e2d}",
            " \u{1f600} ",
            "\\u00e9",
            "lowercasewordlongerthaneight",
            " and",
            " then",
        ];
        let mut rng = Rng(3);
        for _ in 0..30_000 {
            let mut text = String::new();
            for _ in 0..rng.below(14) {
                text.push_str(pieces[rng.below(pieces.len())]);
            }
            let b = text.as_bytes();
            assert_eq!(Classes::string(b), by_character(b, true), "{text:?}");
            assert_eq!(Classes::raw(b), by_character(b, false), "{text:?}");
        }
        for kind in KINDS {
            for _ in 0..20 {
                let len = 1 + rng.below(4000);
                let text = piece(&mut rng, kind, len);
                let b = text.as_bytes();
                assert_eq!(Classes::raw(b), by_character(b, false), "{}", kind.name());
            }
        }
    }

    /// A string counted in the pass that finds its end counts as the
    /// scanner's span counted apart, and ends where the scanner ends it;
    /// strings the scanner refuses or reads apart are left to it.
    #[test]
    fn a_string_counted_as_it_is_scanned_counts_as_its_span() {
        use crate::wire::json::Scanner;
        let pieces: &[&[u8]] = &[
            b"hello",
            b" world",
            b" the",
            b"Camel",
            b"caseSwitch",
            b"123",
            b"4.5",
            b" ",
            b"  ",
            b"\t",
            b"!?",
            b"--",
            b"\\n",
            b"\\t",
            b"\\r",
            b"\\\"",
            b"\\\\",
            b"\\/",
            b"\\u00e9",
            b"\\u0041",
            b"\\u4e2d",
            b"\\ud83d\\ude00",
            b"\\ud83d\\u12",
            b"\\uzz00",
            b"\\u+123",
            b"\\u",
            b"\\",
            b"\xc3\xa9",
            b"\xe4\xb8\xad",
            b"\xf0\x9f\x98\x80",
            b"\xc3",
            b"\xe4\xb8",
            b"\x80",
            b"\xff",
            b"\"",
        ];
        let mut rng = Rng(7);
        let mut counted = 0;
        for _ in 0..50_000 {
            let mut body = b"\"".to_vec();
            for _ in 0..rng.below(10) {
                body.extend_from_slice(pieces[rng.below(pieces.len())]);
            }
            if rng.below(5) != 0 {
                body.extend_from_slice(b"\", 1");
            }
            let mut sc = Scanner::new(&body);
            let apart = sc
                .string(false)
                .map(|(span, _)| (Classes::string(&body[span.start..span.end]), span.end));
            if let Some(one_pass) = Classes::string_at(&body, 1) {
                assert_eq!(apart, Ok(one_pass), "{:?}", String::from_utf8_lossy(&body));
                counted += 1;
            }
        }
        // Most of them in one pass.
        assert!(counted > 20_000, "{counted}");
        // Plain text, escapes and characters of every width: one pass.
        let text = "\"Caf\u{e9} \u{4e2d}\u{6587} \u{1f600} tab\\there, a \\\"quote\\\" \\u00e9\\ud83d\\ude00.\"";
        let (c, end) = Classes::string_at(text.as_bytes(), 1).expect("one pass");
        assert_eq!(end, text.len() - 1);
        assert_eq!(c, Classes::string(&text.as_bytes()[1..end]));
    }
}
