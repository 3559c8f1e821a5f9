//! Reading the bytes of a `usage` object into a [`Usage`] without
//! `serde_json`: the few integer counters are read where they lie.
//!
//! The reader answers only when it is sure `serde_json` would give the same
//! [`Usage`]: keys and strings of printable ASCII without escapes, counters
//! that are plain integers, no field twice, other values made of such
//! strings, integers, `true`, `false`, `null`, and objects and arrays of
//! them. Anything else (escapes, fractions, exponents, a field given twice,
//! malformed JSON) goes to `serde_json`, so the result is the same for every
//! input.

use super::json::find_quote;
use super::usage::{CacheCreation, Usage};

/// How deeply an ignored value may nest before `serde_json` decides instead.
const MAX_NEST: u32 = 8;

/// The `usage` object in `json` (its bytes exactly, from `{` to `}`), or
/// `None` when it is not one.
pub(crate) fn read_usage(json: &[u8]) -> Option<Usage> {
    fast(json).or_else(|| serde_json::from_slice(json).ok())
}

/// The usage, when every byte is of the plain kinds the reader knows.
///
/// The four counters' keys are told by their bytes where they lie (their
/// first byte or two, then the whole key and its closing quote compared at
/// once): the keys the API sends are not searched for their end nor
/// matched one by one. Any other key is read as a string and matched.
fn fast(b: &[u8]) -> Option<Usage> {
    let mut i = 0;
    let mut counters = [0u64; 4];
    let mut seen = 0u8;
    let mut cache_creation = None;
    eat(b, &mut i, b'{')?;
    if peek(b, &mut i)? == b'}' {
        i += 1;
    } else {
        loop {
            eat(b, &mut i, b'"')?;
            match counter_key(b.get(i..)?) {
                Some((counter, len)) => {
                    i += len;
                    eat(b, &mut i, b':')?;
                    once(&mut seen, 1u8 << counter)?;
                    *counters.get_mut(counter)? = integer(b, &mut i)?;
                }
                None => {
                    let key = string_rest(b, &mut i)?;
                    eat(b, &mut i, b':')?;
                    match key {
                        b"cache_creation" => {
                            once(&mut seen, 16)?;
                            cache_creation = self::cache_creation(b, &mut i)?;
                        }
                        // The counters' keys were told above: one here is
                        // written otherwise (never, as `plain` bytes).
                        key if plain(key) => ignored(b, &mut i, 0)?,
                        _ => return None,
                    }
                }
            }
            if !more(b, &mut i, b'}')? {
                break;
            }
        }
    }
    ws(b, &mut i);
    let [input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens] =
        counters;
    (i == b.len()).then_some(Usage {
        input_tokens,
        cache_creation_input_tokens,
        cache_read_input_tokens,
        cache_creation,
        output_tokens,
    })
}

/// The counter (0 input, 1 output, 2 cache writes, 3 cache reads) whose
/// key, with its closing quote, `rest` begins with, and that length.
#[inline]
fn counter_key(rest: &[u8]) -> Option<(usize, usize)> {
    match rest.first()? {
        b'i' => starts(rest, b"input_tokens\"", 0),
        b'o' => starts(rest, b"output_tokens\"", 1),
        b'c' => match rest.get(6)? {
            b'c' => starts(rest, b"cache_creation_input_tokens\"", 2),
            b'r' => starts(rest, b"cache_read_input_tokens\"", 3),
            _ => None,
        },
        _ => None,
    }
}

/// `Some((counter, N))` if `rest` begins with `key`: a compare of a known
/// length, which the compiler makes in a few wide loads, not a call.
#[inline(always)]
fn starts<const N: usize>(rest: &[u8], key: &[u8; N], counter: usize) -> Option<(usize, usize)> {
    let head: &[u8; N] = rest.get(..N)?.try_into().ok()?;
    (head == key).then_some((counter, N))
}

/// `cache_creation`: `null` or an object of the two counters.
fn cache_creation(b: &[u8], i: &mut usize) -> Option<Option<CacheCreation>> {
    if peek(b, i)? == b'n' {
        literal(b, i, b"null")?;
        return Some(None);
    }
    let mut c = CacheCreation::default();
    let mut seen = 0u8;
    object(b, i, |b, i, key| {
        let (bit, slot) = match key {
            b"ephemeral_5m_input_tokens" => (1, &mut c.ephemeral_5m_input_tokens),
            b"ephemeral_1h_input_tokens" => (2, &mut c.ephemeral_1h_input_tokens),
            key if plain(key) => return ignored(b, i, 0),
            _ => return None,
        };
        once(&mut seen, bit)?;
        *slot = integer(b, i)?;
        Some(())
    })?;
    Some(Some(c))
}

/// Marks a field seen; `None` when it already was (`serde_json` refuses a
/// duplicate field).
#[inline]
fn once(seen: &mut u8, bit: u8) -> Option<()> {
    if *seen & bit != 0 {
        return None;
    }
    *seen |= bit;
    Some(())
}

#[inline]
fn ws(b: &[u8], i: &mut usize) {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(*i) {
        *i += 1;
    }
}

/// The next byte after whitespace, not consumed.
#[inline]
fn peek(b: &[u8], i: &mut usize) -> Option<u8> {
    ws(b, i);
    b.get(*i).copied()
}

/// Consumes `x` after whitespace (looked at first where it is: the API
/// writes its JSON without blanks).
#[inline]
fn eat(b: &[u8], i: &mut usize, x: u8) -> Option<()> {
    if b.get(*i) == Some(&x) {
        *i += 1;
        return Some(());
    }
    (peek(b, i)? == x).then(|| *i += 1)
}

/// After a member or element: `true` after a `,`, `false` after `close`.
#[inline]
fn more(b: &[u8], i: &mut usize, close: u8) -> Option<bool> {
    let x = peek(b, i)?;
    *i += 1;
    match x {
        b',' => Some(true),
        x if x == close => Some(false),
        _ => None,
    }
}

/// A string's bytes up to the next quote, not checked (a known key is
/// matched whole; anything else goes through [`plain`]).
#[inline]
fn raw_string<'a>(b: &'a [u8], i: &mut usize) -> Option<&'a [u8]> {
    eat(b, i, b'"')?;
    string_rest(b, i)
}

/// [`raw_string`] after its opening quote.
#[inline]
fn string_rest<'a>(b: &'a [u8], i: &mut usize) -> Option<&'a [u8]> {
    let rest = b.get(*i..)?;
    let end = find_quote(rest)?;
    *i += end + 1;
    rest.get(..end)
}

/// Whether a string's bytes are printable ASCII without escapes (then its
/// closing quote was really its end).
fn plain(raw: &[u8]) -> bool {
    raw.iter().all(|&x| (0x20..0x80).contains(&x) && x != b'\\')
}

/// Whether the byte at `i` (if any) may follow a number or a literal.
#[inline]
fn ends_token(b: &[u8], i: usize) -> bool {
    b.get(i)
        .is_none_or(|x| matches!(x, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
}

/// A non-negative integer as JSON writes it (no sign, fraction, exponent or
/// leading zero) that fits a `u64`.
#[inline]
fn integer(b: &[u8], i: &mut usize) -> Option<u64> {
    ws(b, i);
    let start = *i;
    // A local index: the digits are walked without storing it each time.
    let mut at = start;
    let mut v: u64 = 0;
    while let Some(&d) = b.get(at) {
        let digit = d.wrapping_sub(b'0');
        if digit > 9 {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(digit))?;
        at += 1;
    }
    *i = at;
    let len = at - start;
    let leading_zero = len > 1 && b.get(start) == Some(&b'0');
    (len > 0 && !leading_zero && ends_token(b, at)).then_some(v)
}

/// `word` exactly, then a byte that ends it.
fn literal(b: &[u8], i: &mut usize, word: &[u8]) -> Option<()> {
    ws(b, i);
    let rest = b.get(*i..)?;
    if !rest.starts_with(word) || !ends_token(b, *i + word.len()) {
        return None;
    }
    *i += word.len();
    Some(())
}

/// An object, each member read by `member` from its key's bytes (checked
/// by `member`) and the index just after the key's `:`.
fn object(
    b: &[u8],
    i: &mut usize,
    mut member: impl FnMut(&[u8], &mut usize, &[u8]) -> Option<()>,
) -> Option<()> {
    eat(b, i, b'{')?;
    if peek(b, i)? == b'}' {
        *i += 1;
        return Some(());
    }
    loop {
        let key = raw_string(b, i)?;
        eat(b, i, b':')?;
        member(b, i, key)?;
        if !more(b, i, b'}')? {
            return Some(());
        }
    }
}

/// A value of a field [`Usage`] does not model, skipped when it is of the
/// plain kinds.
fn ignored(b: &[u8], i: &mut usize, depth: u32) -> Option<()> {
    if depth > MAX_NEST {
        return None;
    }
    match peek(b, i)? {
        b'"' => raw_string(b, i).filter(|raw| plain(raw)).map(drop),
        b'{' => object(b, i, |b, i, key| {
            plain(key).then_some(())?;
            ignored(b, i, depth + 1)
        }),
        b'[' => {
            *i += 1;
            if peek(b, i)? == b']' {
                *i += 1;
                return Some(());
            }
            loop {
                ignored(b, i, depth + 1)?;
                if !more(b, i, b']')? {
                    return Some(());
                }
            }
        }
        b't' => literal(b, i, b"true"),
        b'f' => literal(b, i, b"false"),
        b'n' => literal(b, i, b"null"),
        _ => integer(b, i).map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input gives what `serde_json` gives, whether the fast reader
    /// answers or hands over.
    #[test]
    fn agrees_with_serde() {
        let cases: &[&str] = &[
            r#"{"input_tokens":42,"cache_creation_input_tokens":0,"cache_read_input_tokens":7,"output_tokens":19}"#,
            r#"{ "input_tokens" : 1 , "output_tokens" : 2 }"#,
            "{\n\t\"input_tokens\":1\r\n}",
            r#"{}"#,
            r#"{"input_tokens":3,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":5},"output_tokens":4,"service_tier":"standard"}"#,
            r#"{"cache_creation":null,"output_tokens":4}"#,
            r#"{"cache_creation":{},"output_tokens":4}"#,
            r#"{"server_tool_use":{"web_search_requests":2,"list":[1,true,false,null,"x",{},[]]},"output_tokens":4}"#,
            // Handed over to serde_json: escapes, fractions, exponents, signs,
            // leading zeros, duplicates, nulls in counters, huge numbers,
            // bytes beyond ASCII, control characters, malformed JSON.
            r#"{"input\u005ftokens":5,"output_tokens":4}"#,
            r#"{"service_tier":"st\"and","output_tokens":4}"#,
            r#"{"input_tokens\":1,"output_tokens":4}"#,
            r#"{"a\"b":1,"output_tokens":4}"#,
            r#"{"x":{"k\"":1},"output_tokens":4}"#,
            r#"{"input_tokens":1.0}"#,
            r#"{"input_tokens":1e3}"#,
            r#"{"input_tokens":-1}"#,
            r#"{"input_tokens":012}"#,
            r#"{"input_tokens":1,"input_tokens":2}"#,
            r#"{"other":1,"other":2,"output_tokens":3}"#,
            r#"{"cache_creation":null,"cache_creation":null}"#,
            r#"{"input_tokens":null}"#,
            r#"{"input_tokens":"5"}"#,
            r#"{"input_tokens":18446744073709551615}"#,
            r#"{"input_tokens":18446744073709551616}"#,
            r#"{"other":tru}"#,
            r#"{"other":nullx}"#,
            r#"{"other":-2.5e-3,"output_tokens":1}"#,
            r#"{"input_tokens":1} x"#,
            r#"{"input_tokens":1,}"#,
            r#"{"input_tokens" 1}"#,
            r#"{"input_tokens":1"#,
            r#"{"cache_creation":{"ephemeral_5m_input_tokens":1,"ephemeral_5m_input_tokens":1}}"#,
            r#"{"cache_creation":[]}"#,
            r#"{"t":"é","output_tokens":4}"#,
            r#"{"é":1,"output_tokens":4}"#,
            "{\"t\":\"a\tb\",\"output_tokens\":4}",
            r#"[1]"#,
            r#"{"a":[[[[[[[[[[[[1]]]]]]]]]]]],"output_tokens":4}"#,
            // Keys that begin as a counter's and are not one, or are cut
            // short, and counters given twice through the two readings.
            r#"{"input_tokensx":1,"output_tokens_":2,"i":3,"o":4,"c":5}"#,
            r#"{"cache_c":1,"cache_r":2,"cache_x":3,"cache_creation_input":4}"#,
            r#"{"cache_creation_input_tokens":1,"cache_read_input_tokens":2,"cache_creation":{}}"#,
            r#"{"input_tokens":1,"inp\u0075t_tokens":2}"#,
            r#"{"cache_read_input_tokens":1, "cache_read_input_tokens" :2}"#,
            r#"{"input_tokens""#,
            r#"{"input_tokens"#,
            r#"{"cache_"#,
            r#"{ "output_tokens":1 , "input_tokens": 2 ,"x":{"input_tokens":"y"}}"#,
        ];
        for case in cases {
            let want = serde_json::from_str::<Usage>(case).ok();
            assert_eq!(read_usage(case.as_bytes()), want, "{case}");
        }
    }

    /// The shapes the API sends are read without `serde_json`; escapes are not.
    #[test]
    fn reads_the_common_shapes_itself() {
        let body = br#"{"input_tokens":3,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":0},"cache_read_input_tokens":1,"output_tokens":4,"service_tier":"standard","server_tool_use":{"web_search_requests":0}}"#;
        let usage = fast(body);
        assert!(usage.is_some());
        assert_eq!(usage, serde_json::from_slice::<Usage>(body).ok());
        assert!(fast(br#"{"input\u005ftokens":5}"#).is_none());
    }
}
