//! Images and PDFs inside base64 strings: dimensions and page counts without
//! decoding more than needed.
//!
//! - Image dimensions come from the file header (PNG `IHDR`, GIF logical
//!   screen, WebP `VP8 `/`VP8L`/`VP8X`, JPEG `SOFn`), decoding only the first
//!   few dozen bytes of base64; a JPEG's segments before its `SOFn` marker are
//!   jumped over without decoding them when the base64 is contiguous.
//! - PDF page counts come from one streaming pass over the decoded bytes
//!   (through a small stack buffer, no allocation) looking for `/Type /Page`
//!   objects (not `/Pages`) and `/Count n` entries.

/// Base64 alphabet value of a byte (standard and URL-safe), or `None`.
#[inline]
fn b64_value(x: u8) -> Option<u8> {
    match x {
        b'A'..=b'Z' => Some(x - b'A'),
        b'a'..=b'z' => Some(x - b'a' + 26),
        b'0'..=b'9' => Some(x - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    }
}

/// A streaming base64 decoder over the raw contents of a JSON string.
///
/// JSON escapes are tolerated: `\/` is a `/`, and `\n`, `\r`, `\t` (line
/// breaks of MIME-style base64) are skipped, as are raw whitespace bytes.
/// Decoding stops at `=` or at the end.
#[derive(Debug, Clone)]
pub(crate) struct B64Reader<'a> {
    src: &'a [u8],
    pos: usize,
    /// True when `src` holds nothing but alphabet characters (and padding):
    /// decoded offset `n` then sits at character `4 * (n / 3)`, so skipping
    /// can jump instead of decoding.
    contiguous: bool,
    buf: [u8; 3],
    buf_len: u8,
    buf_pos: u8,
    done: bool,
}

impl<'a> B64Reader<'a> {
    /// `contiguous` must only be true if `src` has no escapes or whitespace;
    /// when wrongly true, decoding still cannot fail, it only reads the wrong bytes.
    pub(crate) fn new(src: &'a [u8], contiguous: bool) -> Self {
        Self {
            src,
            pos: 0,
            contiguous,
            buf: [0; 3],
            buf_len: 0,
            buf_pos: 0,
            done: false,
        }
    }

    /// The next base64 sextet, skipping JSON escapes and whitespace.
    #[inline]
    fn sextet(&mut self) -> Option<u8> {
        loop {
            let x = *self.src.get(self.pos)?;
            self.pos += 1;
            if let Some(v) = b64_value(x) {
                return Some(v);
            }
            match x {
                b'=' => {
                    self.done = true;
                    return None;
                }
                b'\\' => {
                    let e = *self.src.get(self.pos)?;
                    self.pos += 1;
                    match e {
                        b'/' => return Some(63),
                        b'u' => self.pos += 4,
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }

    /// Decodes the next group of up to three bytes into the buffer.
    fn refill(&mut self) -> bool {
        if self.done {
            return false;
        }
        let mut acc: u32 = 0;
        let mut n = 0u8;
        while n < 4 {
            match self.sextet() {
                Some(v) => {
                    acc = (acc << 6) | u32::from(v);
                    n += 1;
                }
                None => {
                    self.done = true;
                    break;
                }
            }
        }
        let bytes = match n {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => 0,
        };
        if bytes == 0 {
            return false;
        }
        acc <<= 6 * u32::from(4 - n);
        self.buf = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        self.buf_len = bytes;
        self.buf_pos = 0;
        true
    }

    /// The next decoded byte.
    #[inline]
    pub(crate) fn next_byte(&mut self) -> Option<u8> {
        if self.buf_pos >= self.buf_len && !self.refill() {
            return None;
        }
        let x = self.buf.get(usize::from(self.buf_pos)).copied();
        self.buf_pos += 1;
        x
    }

    /// Fills `out` with decoded bytes; returns how many (0 at the end).
    ///
    /// Whole groups of four alphabet characters are decoded straight into
    /// `out`; anything else (padding, escapes, a partial group) goes through
    /// the byte-at-a-time path.
    pub(crate) fn read(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        // Drain a partly used group first.
        while self.buf_pos < self.buf_len {
            let Some(slot) = out.get_mut(n) else {
                return n;
            };
            *slot = self
                .buf
                .get(usize::from(self.buf_pos))
                .copied()
                .unwrap_or(0);
            self.buf_pos += 1;
            n += 1;
        }
        if !self.done {
            while let (Some(dst), Some(src)) =
                (out.get_mut(n..n + 3), self.src.get(self.pos..self.pos + 4))
            {
                let (Some(a), Some(b), Some(c), Some(d)) = (
                    src.first().copied().and_then(b64_value),
                    src.get(1).copied().and_then(b64_value),
                    src.get(2).copied().and_then(b64_value),
                    src.get(3).copied().and_then(b64_value),
                ) else {
                    break;
                };
                let v = u32::from(a) << 18 | u32::from(b) << 12 | u32::from(c) << 6 | u32::from(d);
                dst.copy_from_slice(&[(v >> 16) as u8, (v >> 8) as u8, v as u8]);
                self.pos += 4;
                n += 3;
            }
        }
        while let Some(slot) = out.get_mut(n) {
            match self.next_byte() {
                Some(x) => *slot = x,
                None => break,
            }
            n += 1;
        }
        n
    }

    /// Skips `n` decoded bytes; returns false if the data ended first.
    pub(crate) fn skip(&mut self, mut n: usize) -> bool {
        while n > 0 && self.buf_pos < self.buf_len {
            self.buf_pos += 1;
            n -= 1;
        }
        if self.contiguous && n >= 3 {
            let groups = n / 3;
            let jump = groups.saturating_mul(4);
            if self.src.len().saturating_sub(self.pos) < jump {
                self.pos = self.src.len();
                self.done = true;
                return false;
            }
            self.pos += jump;
            n -= groups * 3;
        }
        for _ in 0..n {
            if self.next_byte().is_none() {
                return false;
            }
        }
        true
    }

    fn u16_be(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.next_byte()?, self.next_byte()?]))
    }
}

/// An image format recognized from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ImageFormat {
    Png,
    Jpeg,
    Gif,
    WebP,
}

fn u16_le(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 2)?;
    Some(u32::from(u16::from_le_bytes([*s.first()?, *s.get(1)?])))
}

fn u24_le(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 3)?;
    Some(u32::from(*s.first()?) | u32::from(*s.get(1)?) << 8 | u32::from(*s.get(2)?) << 16)
}

fn u32_be(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    let arr: [u8; 4] = s.try_into().ok()?;
    Some(u32::from_be_bytes(arr))
}

fn u32_le(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    let arr: [u8; 4] = s.try_into().ok()?;
    Some(u32::from_le_bytes(arr))
}

/// Reads an image's format, width and height from base64 data, or `None`
/// when the data is not a PNG, JPEG, GIF or WebP with a readable header.
pub(crate) fn image_dimensions(src: &[u8], contiguous: bool) -> Option<(ImageFormat, u32, u32)> {
    let mut r = B64Reader::new(src, contiguous);
    let mut head = [0u8; 32];
    let n = r.read(&mut head);
    let head = head.get(..n)?;
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        if head.get(12..16)? != b"IHDR" {
            return None;
        }
        return Some((ImageFormat::Png, u32_be(head, 16)?, u32_be(head, 20)?));
    }
    if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        return Some((ImageFormat::Gif, u16_le(head, 6)?, u16_le(head, 8)?));
    }
    if head.starts_with(b"RIFF") && head.get(8..12)? == b"WEBP" {
        return match head.get(12..16)? {
            b"VP8 " => {
                // Frame tag (3 bytes) then start code 9d 01 2a, then 14-bit sizes.
                if head.get(23..26)? != [0x9d, 0x01, 0x2a] {
                    return None;
                }
                Some((
                    ImageFormat::WebP,
                    u16_le(head, 26)? & 0x3fff,
                    u16_le(head, 28)? & 0x3fff,
                ))
            }
            b"VP8L" => {
                if *head.get(20)? != 0x2f {
                    return None;
                }
                let v = u32_le(head, 21)?;
                Some((
                    ImageFormat::WebP,
                    (v & 0x3fff) + 1,
                    ((v >> 14) & 0x3fff) + 1,
                ))
            }
            b"VP8X" => Some((
                ImageFormat::WebP,
                u24_le(head, 24)? + 1,
                u24_le(head, 27)? + 1,
            )),
            _ => None,
        };
    }
    if head.starts_with(&[0xff, 0xd8]) {
        let mut r = B64Reader::new(src, contiguous);
        r.skip(2);
        let (w, h) = jpeg_sof(&mut r)?;
        return Some((ImageFormat::Jpeg, w, h));
    }
    None
}

/// Walks JPEG markers after SOI up to the first `SOFn` and reads its size.
fn jpeg_sof(r: &mut B64Reader<'_>) -> Option<(u32, u32)> {
    // A real JPEG has a handful of segments before its frame header.
    for _ in 0..512 {
        // Find the marker: 0xff, then any fill 0xff bytes, then the code.
        let mut x = r.next_byte()?;
        if x != 0xff {
            return None;
        }
        while x == 0xff {
            x = r.next_byte()?;
        }
        let marker = x;
        match marker {
            // Standalone markers carry no length.
            0x01 | 0xd0..=0xd8 => continue,
            // End of image or start of scan before any frame header.
            0xd9 | 0xda => return None,
            _ => {}
        }
        let len = r.u16_be()?;
        if len < 2 {
            return None;
        }
        let is_sof = (0xc0..=0xcf).contains(&marker) && !matches!(marker, 0xc4 | 0xc8 | 0xcc);
        if is_sof {
            let _precision = r.next_byte()?;
            let h = r.u16_be()?;
            let w = r.u16_be()?;
            return Some((u32::from(w), u32::from(h)));
        }
        if !r.skip(usize::from(len) - 2) {
            return None;
        }
    }
    None
}

/// What a pass over a PDF found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PdfScan {
    /// `/Type /Page` objects (not `/Pages`).
    pub(crate) page_objects: u64,
    /// The largest `/Count n` (the page tree root's count is the page total).
    pub(crate) max_count: u64,
    /// Decoded bytes.
    pub(crate) bytes: u64,
    /// Whether the data starts like a PDF (`%PDF-`).
    pub(crate) is_pdf: bool,
}

const TYPE: &[u8] = b"/Type";
const PAGE: &[u8] = b"/Page";
const COUNT: &[u8] = b"/Count";

#[inline]
fn pdf_ws(x: u8) -> bool {
    matches!(x, 0 | 9 | 10 | 12 | 13 | 32)
}

/// Streaming matcher for `/Type` ws* `/Page` <not a name char> and `/Count` ws* digits.
#[derive(Debug, Default)]
struct PdfMatcher {
    /// Bytes of `/Type` matched; 5 = matched, now in whitespace; 6.. = `/Page` progress + 6.
    ty: u8,
    /// Bytes of `/Count` matched; 6 = in whitespace; 7 = in digits.
    count: u8,
    value: u64,
    out: PdfScan,
}

impl PdfMatcher {
    #[inline]
    fn feed(&mut self, x: u8) {
        self.feed_type(x);
        self.feed_count(x);
    }

    fn feed_type(&mut self, x: u8) {
        let s = self.ty as usize;
        if s < TYPE.len() {
            if TYPE.get(s) == Some(&x) {
                self.ty += 1;
            } else {
                self.ty = u8::from(x == b'/');
            }
        } else if s == TYPE.len() {
            // Whitespace between /Type and its value, then '/' starts /Page.
            if pdf_ws(x) {
                return;
            }
            self.ty = if x == b'/' { 7 } else { 0 };
        } else if s < 6 + PAGE.len() {
            // ty = 6 + k where k bytes of "/Page" are matched (k >= 1).
            if PAGE.get(s - 6) == Some(&x) {
                self.ty += 1;
            } else {
                self.ty = u8::from(x == b'/');
            }
        } else {
            // "/Type /Page" matched: the name must end here.
            if !x.is_ascii_alphanumeric() {
                self.out.page_objects += 1;
            }
            self.ty = u8::from(x == b'/');
        }
    }

    fn feed_count(&mut self, x: u8) {
        let s = self.count as usize;
        if s < COUNT.len() {
            if COUNT.get(s) == Some(&x) {
                self.count += 1;
            } else {
                self.count = u8::from(x == b'/');
            }
        } else if s == COUNT.len() {
            if pdf_ws(x) {
                return;
            }
            if x.is_ascii_digit() {
                self.count = 7;
                self.value = u64::from(x - b'0');
            } else {
                self.count = u8::from(x == b'/');
            }
        } else if x.is_ascii_digit() {
            self.value = self
                .value
                .saturating_mul(10)
                .saturating_add(u64::from(x - b'0'));
        } else {
            self.out.max_count = self.out.max_count.max(self.value);
            self.count = u8::from(x == b'/');
        }
    }

    fn finish(mut self) -> PdfScan {
        // Input ending right after a match.
        if self.ty as usize == 6 + PAGE.len() {
            self.out.page_objects += 1;
        }
        if self.count == 7 {
            self.out.max_count = self.out.max_count.max(self.value);
        }
        self.out
    }
}

/// Decodes base64 PDF data in one pass through a stack buffer, counting page
/// objects, reading at most `limit` decoded bytes.
pub(crate) fn pdf_scan(src: &[u8], contiguous: bool, limit: u64) -> PdfScan {
    let mut r = B64Reader::new(src, contiguous);
    let mut m = PdfMatcher::default();
    let mut buf = [0u8; 4096];
    let mut total: u64 = 0;
    let mut first = true;
    while total < limit {
        let n = r.read(&mut buf);
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or(&[]);
        if first {
            m.out.is_pdf = chunk.starts_with(b"%PDF-");
            first = false;
        }
        let mut j = 0;
        while let Some(&x) = chunk.get(j) {
            if m.ty == 0 && m.count == 0 {
                // Both matchers wait for a '/': jump to the next one.
                match chunk
                    .get(j..)
                    .and_then(|rest| rest.iter().position(|&y| y == b'/'))
                {
                    Some(k) => j += k,
                    None => break,
                }
            } else {
                m.feed(x);
                j += 1;
                continue;
            }
            if let Some(&slash) = chunk.get(j) {
                m.feed(slash);
            }
            j += 1;
        }
        total += n as u64;
    }
    let mut out = m.finish();
    out.bytes = total;
    out
}

/// Tokens for an image of `w` x `h` pixels, by the documented formula
/// `w * h / 750` after the documented downscale: the long edge to at most
/// `max_edge` pixels, and the area to at most `max_tokens * 750` pixels.
pub(crate) fn image_tokens(w: u32, h: u32, max_edge: u32, max_tokens: u64) -> u64 {
    if w == 0 || h == 0 {
        return max_tokens;
    }
    let (wf, hf) = (f64::from(w), f64::from(h));
    let long = wf.max(hf);
    let scale = if max_edge > 0 && long > f64::from(max_edge) {
        f64::from(max_edge) / long
    } else {
        1.0
    };
    let tokens = ((wf * scale) * (hf * scale) / 750.0).ceil();
    (tokens as u64).clamp(1, max_tokens.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[((v >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn decodes_and_skips() {
        let data: Vec<u8> = (0..=255u8).collect();
        let s = b64(&data);
        let mut r = B64Reader::new(s.as_bytes(), true);
        let mut out = vec![0u8; 300];
        assert_eq!(r.read(&mut out), 256);
        assert_eq!(&out[..256], &data[..]);
        for contiguous in [true, false] {
            let mut r = B64Reader::new(s.as_bytes(), contiguous);
            assert_eq!(r.next_byte(), Some(0));
            assert!(r.skip(100));
            assert_eq!(r.next_byte(), Some(101));
            assert!(r.skip(7));
            assert_eq!(r.next_byte(), Some(109));
            assert!(!r.skip(1000));
        }
    }

    #[test]
    fn decodes_through_json_escapes() {
        let s = b64(b"\xff\xff\xff hello");
        let escaped = s.replace('/', "\\/");
        let with_breaks = format!("{}\\n{}", &escaped[..4], &escaped[4..]);
        let mut r = B64Reader::new(with_breaks.as_bytes(), false);
        let mut out = [0u8; 16];
        let n = r.read(&mut out);
        assert_eq!(&out[..n], b"\xff\xff\xff hello");
    }

    #[test]
    fn pdf_counts_page_objects_not_pages() {
        let pdf = b"%PDF-1.4\n1 0 obj << /Type /Pages /Kids [2 0 R 3 0 R] /Count 2 >>\n\
            2 0 obj << /Type /Page /Parent 1 0 R >>\n3 0 obj <</Type/Page/Parent 1 0 R>>\n\
            4 0 obj << /Type /Catalog >>";
        let s = b64(pdf);
        let scan = pdf_scan(s.as_bytes(), true, u64::MAX);
        assert!(scan.is_pdf);
        assert_eq!(scan.page_objects, 2);
        assert_eq!(scan.max_count, 2);
        assert_eq!(scan.bytes, pdf.len() as u64);
    }

    #[test]
    fn pdf_matches_across_chunk_boundaries() {
        // Page objects placed so that some straddle the 4096-byte read chunks.
        let mut pdf = b"%PDF-1.4\n".to_vec();
        let mut expected = 0;
        while pdf.len() < 40_000 {
            pdf.extend_from_slice(b"xx /Type /Page /Parent 1 0 R /Type /Pages ");
            expected += 1;
            pdf.extend(std::iter::repeat_n(b'.', pdf.len() % 37));
        }
        let s = b64(&pdf);
        let scan = pdf_scan(s.as_bytes(), true, u64::MAX);
        assert_eq!(scan.page_objects, expected);
        // Same through the escaped, byte-at-a-time decoder.
        let escaped = s.replace('/', "\\/");
        assert_eq!(
            pdf_scan(escaped.as_bytes(), false, u64::MAX).page_objects,
            expected
        );
        // A scan limit bounds the work.
        assert!(pdf_scan(s.as_bytes(), true, 8192).bytes <= 8192 + 4096);
    }

    #[test]
    fn pdf_match_at_end_counts() {
        let s = b64(b"%PDF-1.7 /Type   /Page");
        assert_eq!(pdf_scan(s.as_bytes(), true, u64::MAX).page_objects, 1);
        let s = b64(b"%PDF-1.7 /Count 12");
        assert_eq!(pdf_scan(s.as_bytes(), true, u64::MAX).max_count, 12);
    }

    #[test]
    fn image_tokens_follow_the_documented_rule() {
        assert_eq!(image_tokens(1000, 1000, 1568, 1600), 1334);
        assert_eq!(image_tokens(1092, 1092, 1568, 1600), 1590);
        assert_eq!(image_tokens(200, 200, 1568, 1600), 54);
        // 4000x1000: long edge scaled to 1568 -> 1568x392 -> 820 tokens.
        assert_eq!(image_tokens(4000, 1000, 1568, 1600), 820);
        assert_eq!(image_tokens(3000, 3000, 1568, 1600), 1600);
        assert_eq!(image_tokens(0, 10, 1568, 1600), 1600);
    }
}
