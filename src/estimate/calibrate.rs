//! Online calibration: the median of observed ratios plus a margin sized from
//! their spread, per model and per kind of content.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use super::classes::ContentKind;

/// A fixed-size sliding window of `f64` samples that answers quantiles.
///
/// Keeps the last `capacity` finite samples twice: in arrival order (a ring,
/// to know which one leaves) and sorted (to answer a quantile in O(1)).
/// Memory is O(samples kept), grown as samples arrive up to the capacity
/// (an unused window costs nothing); [`push`](Self::push) costs O(capacity)
/// moves in the worst case (two binary searches and one shift of the sorted
/// copy) and allocates only while the window is not yet full.
///
/// Non-finite samples (NaN, infinities) are ignored.
#[derive(Clone)]
pub(crate) struct SlidingQuantile {
    /// Samples in arrival order; the oldest is at `next` once full.
    ring: Vec<f64>,
    /// The same samples, sorted ascending by `f64::total_cmp`; the first `len` are live.
    sorted: Vec<f64>,
    cap: usize,
    len: usize,
    next: usize,
}

impl SlidingQuantile {
    /// A window of the last `capacity` samples (a capacity of 0 is taken as 1).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            ring: Vec::new(),
            sorted: Vec::new(),
            cap: capacity,
            len: 0,
            next: 0,
        }
    }

    /// The largest number of samples kept.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// The number of samples in the window.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// True when no sample has been pushed.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a sample, evicting the oldest one when the window is full.
    ///
    /// Returns false (and changes nothing) when `x` is not finite.
    pub(crate) fn push(&mut self, x: f64) -> bool {
        if !x.is_finite() {
            return false;
        }
        let cap = self.cap;
        if self.ring.len() < cap {
            // Not full yet: one more slot in each copy.
            self.ring.push(0.0);
            self.sorted.push(0.0);
        } else if self.len == cap {
            // Remove the oldest sample from the sorted copy.
            let Some(old) = self.ring.get(self.next).copied() else {
                return false;
            };
            let live = &mut self.sorted[..self.len];
            // total_cmp is a total order, so an equal element is found.
            if let Ok(pos) = live.binary_search_by(|p| p.total_cmp(&old)) {
                live.copy_within(pos + 1.., pos);
                self.len -= 1;
            } else {
                // Unreachable by construction: ring and sorted hold the same
                // multiset. Recover by rebuilding the sorted copy.
                self.rebuild_sorted();
                return self.push(x);
            }
        }
        // Insert into the sorted copy (after equal elements, which is stable).
        let live = &self.sorted[..self.len];
        let pos = live.partition_point(|p| p.total_cmp(&x).is_le());
        let end = self.len;
        self.sorted.copy_within(pos..end, pos + 1);
        if let Some(slot) = self.sorted.get_mut(pos) {
            *slot = x;
        }
        self.len += 1;
        if let Some(slot) = self.ring.get_mut(self.next) {
            *slot = x;
        }
        self.next = (self.next + 1) % cap;
        true
    }

    fn rebuild_sorted(&mut self) {
        let n = self.len;
        // While full, the live ring is the whole ring.
        self.sorted[..n].copy_from_slice(&self.ring[..n]);
        self.sorted[..n].sort_by(f64::total_cmp);
    }

    /// The `q` quantile of the window (nearest rank: the smallest sample such
    /// that at least `q` of the samples are at most it), or `None` when empty.
    ///
    /// `q` is clamped to `[0, 1]` (NaN is taken as 1, the most conservative).
    /// Nearest rank never interpolates: the answer is always an observed
    /// sample, and with few samples a high quantile is the maximum.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        if self.len == 0 {
            return None;
        }
        let q = if q.is_nan() { 1.0 } else { q.clamp(0.0, 1.0) };
        // rank in 1..=len
        let rank = (q * self.len as f64).ceil() as usize;
        let idx = rank.clamp(1, self.len) - 1;
        self.sorted.get(idx).copied()
    }

    /// The samples in the window, in arrival order (oldest first).
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = f64> + '_ {
        let cap = self.cap;
        let start = if self.len == cap { self.next } else { 0 };
        (0..self.len).filter_map(move |i| self.ring.get((start + i) % cap).copied())
    }
}

impl fmt::Debug for SlidingQuantile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlidingQuantile")
            .field("capacity", &self.capacity())
            .field("len", &self.len)
            .field("min", &self.quantile(0.0))
            .field("median", &self.quantile(0.5))
            .field("max", &self.quantile(1.0))
            .finish()
    }
}

/// Settings of a [`Calibration`]. Every field has a documented default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibrationConfig {
    /// Samples kept per model (the sliding window). Default 64. 0 is taken as 1.
    pub window: usize,
    /// The quantile of the window that measures the spread of the ratios
    /// above their median. Default 0.9 (p90).
    pub quantile: f64,
    /// How much of the spread is added to the median as a margin: the
    /// factor is `median * (1 + spread_weight * (q / median - 1))` where `q`
    /// is the [`quantile`](Self::quantile) of the window. Default 0.5: half
    /// the distance from the median to the p90. 0 gives the median, 1 the
    /// quantile itself. Values outside `[0, 1]` are clamped.
    pub spread_weight: f64,
    /// Samples needed before the learned factor is used; until then the
    /// factor is `neutral`. Default 5.
    pub min_samples: usize,
    /// The factor before enough samples. Default 1.0.
    pub neutral: f64,
    /// The smallest factor ever returned. Default 0.25: calibration learns
    /// in both directions, so an estimator that over-counts (a tokenizer
    /// that needs fewer tokens than it assumes) is brought down to the truth
    /// instead of holding room it never uses. Safety comes from the margin
    /// (see [`spread_weight`](Self::spread_weight)) and the budget's headroom,
    /// not from a floor. Set it to 1.0 to never scale an estimate below the
    /// raw one.
    pub min_factor: f64,
    /// The largest factor ever returned. Default 4.0.
    pub max_factor: f64,
    /// The most models tracked at once; past it the model observed least
    /// recently is forgotten (model names come from request bodies, so they
    /// must not grow memory without bound). Default 256.
    pub max_models: usize,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self {
            window: 64,
            quantile: 0.9,
            spread_weight: 0.5,
            min_samples: 5,
            neutral: 1.0,
            min_factor: 0.25,
            max_factor: 4.0,
            max_models: 256,
        }
    }
}

impl CalibrationConfig {
    /// Makes the settings consistent: finite bounds with `min <= max`, a
    /// quantile in `[0, 1]`, a neutral factor within the bounds, and at
    /// least one sample, window slot and model.
    fn normalized(mut self) -> Self {
        if !self.min_factor.is_finite() || self.min_factor < 0.0 {
            self.min_factor = 0.0;
        }
        if !self.max_factor.is_finite() {
            self.max_factor = f64::MAX;
        }
        if self.max_factor < self.min_factor {
            std::mem::swap(&mut self.max_factor, &mut self.min_factor);
        }
        self.quantile = if self.quantile.is_nan() {
            1.0
        } else {
            self.quantile.clamp(0.0, 1.0)
        };
        self.spread_weight = if self.spread_weight.is_nan() {
            1.0
        } else {
            self.spread_weight.clamp(0.0, 1.0)
        };
        if !self.neutral.is_finite() {
            self.neutral = 1.0;
        }
        self.neutral = self.neutral.clamp(self.min_factor, self.max_factor);
        self.window = self.window.max(1);
        self.min_samples = self.min_samples.max(1);
        self.max_models = self.max_models.max(1);
        self
    }
}

/// What a [`Calibration`] has learned about one model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelCalibration {
    /// The model name as observed.
    pub model: String,
    /// The factor [`Calibration::factor`] returns for it now.
    pub factor: f64,
    /// Samples in its window.
    pub samples: usize,
}

struct ModelWindow {
    window: SlidingQuantile,
    /// Windows per kind of content, created at a kind's first sample.
    kinds: Vec<(ContentKind, SlidingQuantile)>,
    /// The windows of the parts that calibrate apart from text, created at
    /// their first sample.
    parts: Option<Box<PartWindows>>,
    /// Logical time of the last observation, for least-recently-observed eviction.
    last: u64,
}

/// What the server charged for the parts of a prompt that are not text.
struct PartWindows {
    /// Media: what the server charged over what the media formula gave.
    media_ratio: SlidingQuantile,
    /// Media: what the server charged per image or document page.
    media_item: SlidingQuantile,
    /// Requests with tools: their text as estimated against what the server
    /// charged for them beyond their media.
    tools: ToolsFit,
}

/// The cost of requests with tools as `a × text + b`, fitted by least
/// squares over the last `cap` of them: `b` is the tool-use overhead the
/// server adds (a constant per request, which no ratio can learn), `a` the
/// ratio of their text (tool definitions are JSON, with a ratio of their own).
struct ToolsFit {
    pairs: VecDeque<(f64, f64)>,
    cap: usize,
}

impl ToolsFit {
    fn new(cap: usize) -> Self {
        Self {
            pairs: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn push(&mut self, text: f64, actual: f64) -> bool {
        if !text.is_finite() || !actual.is_finite() || text <= 0.0 {
            return false;
        }
        if self.pairs.len() >= self.cap {
            self.pairs.pop_front();
        }
        self.pairs.push_back((text, actual.max(0.0)));
        true
    }

    /// `(a, b, margin)` once `min_samples` are kept: the fit, with `a` within
    /// `[min, max]` and `b` never negative (a fit through the origin when
    /// the texts are too alike in size to tell an intercept, or the
    /// intercept comes out negative), and the margin, a fraction of the
    /// prediction: `spread_weight` times the `quantile` of the relative
    /// residuals above their median.
    fn fit(&self, config: &CalibrationConfig) -> Option<(f64, f64, f64)> {
        let n = self.pairs.len();
        if n < config.min_samples {
            return None;
        }
        let nf = n as f64;
        let (sx, sy) = self
            .pairs
            .iter()
            .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
        let (mx, my) = (sx / nf, sy / nf);
        let (sxx, sxy) = self.pairs.iter().fold((0.0, 0.0), |(sxx, sxy), (x, y)| {
            (sxx + (x - mx) * (x - mx), sxy + (x - mx) * (y - my))
        });
        // The sizes must scatter by 10 % or more to tell an intercept.
        let mut fit = if sxx > 0.01 * mx * mx * nf {
            let a = sxy / sxx;
            Some((a, my - a * mx)).filter(|(a, b)| *a > 0.0 && *b >= 0.0)
        } else {
            None
        };
        if fit.is_none() {
            let (xx, xy) = self
                .pairs
                .iter()
                .fold((0.0, 0.0), |(xx, xy), (x, y)| (xx + x * x, xy + x * y));
            fit = (xx > 0.0).then(|| (xy / xx, 0.0));
        }
        let (a, b) = fit?;
        let a = a.clamp(config.min_factor, config.max_factor);
        let mut residuals: Vec<f64> = self
            .pairs
            .iter()
            .filter(|(_, y)| *y > 0.0)
            .map(|(x, y)| (y - (a * x + b)) / y)
            .collect();
        residuals.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let i = ((q * residuals.len() as f64).ceil() as usize).saturating_sub(1);
            residuals.get(i).copied()
        };
        let margin = match (at(0.5), at(config.quantile)) {
            (Some(m), Some(q)) => config.spread_weight * (q - m).max(0.0),
            _ => 0.0,
        };
        Some((a, b, margin))
    }
}

impl ModelWindow {
    fn new(window: usize, tick: u64) -> Self {
        Self {
            window: SlidingQuantile::new(window),
            kinds: Vec::new(),
            parts: None,
            last: tick,
        }
    }

    fn push_kind(&mut self, kind: ContentKind, ratio: f64, window: usize) {
        match self.kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, w)) => {
                w.push(ratio);
            }
            None => {
                let mut w = SlidingQuantile::new(window);
                w.push(ratio);
                self.kinds.push((kind, w));
            }
        }
    }

    fn kind(&self, kind: ContentKind) -> Option<&SlidingQuantile> {
        self.kinds.iter().find(|(k, _)| *k == kind).map(|(_, w)| w)
    }

    fn parts_mut(&mut self, window: usize) -> &mut PartWindows {
        self.parts.get_or_insert_with(|| {
            Box::new(PartWindows {
                media_ratio: SlidingQuantile::new(window),
                media_item: SlidingQuantile::new(window),
                tools: ToolsFit::new(window),
            })
        })
    }
}

/// The parts of an estimate that are not text, which calibrate apart from
/// it: their errors are not the tokenizer's. A server may charge an image a
/// fixed amount where the documented formula (width × height / 750) gives
/// less, or add no tool-use system prompt where the estimator adds one; as
/// one ratio over the whole prompt such errors would scale with the text
/// and widen every text estimate's margin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NonText {
    /// Tokens the media formula gave the images and documents.
    pub(crate) media: u64,
    /// Images and document pages.
    pub(crate) items: u64,
    /// The tool-use overhead the estimate added (once per request with tools).
    pub(crate) overhead: u64,
}

impl NonText {
    /// The text's share of a request of `total` tokens (as estimated):
    /// what the media and the tool-use overhead leave.
    pub(crate) fn text_of(&self, total: u64) -> u64 {
        total.saturating_sub(self.media.saturating_add(self.overhead))
    }

    fn is_empty(&self) -> bool {
        self.media == 0 && self.overhead == 0
    }
}

/// The hasher of [`Inner::models`]: FxHash's multiply and rotate over eight
/// bytes at a time, a tenth of SipHash's instructions on a model name (the
/// map is looked up by name once per estimate and twice per settlement).
/// The map holds at most `max_models` names, so names chosen to collide
/// cost a lookup at most that many comparisons.
#[derive(Debug, Default, Clone, Copy)]
struct NameHasher(u64);

impl NameHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
}

impl Hasher for NameHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            self.add(u64::from_le_bytes(a));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut a = [0u8; 8];
            if let Some(head) = a.get_mut(..rest.len()) {
                head.copy_from_slice(rest);
            }
            self.add(u64::from_le_bytes(a));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn finish(&self) -> u64 {
        // The multiply mixes into the high bits; the table indexes by the low.
        self.0.rotate_left(26)
    }
}

struct Inner {
    models: HashMap<String, ModelWindow, BuildHasherDefault<NameHasher>>,
    tick: u64,
}

/// Per-model factors learned from `actual / estimated` ratios.
///
/// Thread-safe (a `std::sync::Mutex` held for a few hundred nanoseconds; a
/// poisoned lock is recovered, never a panic). Share it behind an `Arc`.
///
/// [`factor`](Self::factor) is `neutral` (1.0) until a model has
/// `min_samples` (5) observations, then the median `m` of its last `window`
/// (64) ratios plus a margin sized from their spread: `m * (1 +
/// spread_weight * (q / m - 1))` with `q` the `quantile` (p90) of the window
/// and `spread_weight` 0.5, clamped to `[min_factor, max_factor]` (`[0.25,
/// 4.0]`).
///
/// An estimator that guesses tokens from characters is off by a factor that
/// depends on the model's tokenizer and on the traffic (code, prose, other
/// languages). [`Calibration`] learns that factor from what the server really
/// charged, in both directions: for each settled response it records `actual
/// / estimated` in a per-model sliding window. The median follows the ratio
/// up or down; the margin grows with how much the ratios scatter, so a
/// consistent estimator is charged almost exactly and a noisy one keeps
/// room for its misses. The estimator also keeps a window per kind of content
/// it can tell apart (prose, code, data, base64, CJK, other scripts), used
/// once that kind has `min_samples` of its own, and learns the parts of a
/// prompt that are not text apart from it: images and documents (as a ratio
/// to the media formula or as tokens per item, whichever the server's counts
/// scatter less around) and the tool-use overhead (in tokens). Their errors
/// are not the tokenizer's, and as one ratio with the text they would widen
/// every text estimate's margin.
///
/// The same pieces serve any "learn a conservative ratio per model" need, for
/// example the budget's expected `output_tokens / max_tokens`.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::estimate::{Calibration, CalibrationConfig};
///
/// let cal = Calibration::new(CalibrationConfig::default());
/// // Not enough samples yet: the factor is neutral.
/// assert_eq!(cal.factor("claude-sonnet-4-5"), 1.0);
/// for _ in 0..10 {
///     // The server charged 30% more than estimated.
///     cal.observe("claude-sonnet-4-5", 1000, 1300);
/// }
/// assert!((cal.factor("claude-sonnet-4-5") - 1.3).abs() < 1e-9);
/// ```
///
/// # What it does not do
///
/// It does not weigh samples by size or age inside the window (every one of
/// the last `window` observations counts the same), and it does not persist
/// anything: a new process starts neutral.
pub struct Calibration {
    config: CalibrationConfig,
    inner: Mutex<Inner>,
}

impl Default for Calibration {
    fn default() -> Self {
        Self::new(CalibrationConfig::default())
    }
}

impl fmt::Debug for Calibration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Calibration")
            .field("config", &self.config)
            .field("models", &self.snapshot())
            .finish()
    }
}

impl Calibration {
    /// A calibration with these settings (made consistent: see [`CalibrationConfig`]).
    pub fn new(config: CalibrationConfig) -> Self {
        Self {
            config: config.normalized(),
            inner: Mutex::new(Inner {
                models: HashMap::default(),
                tick: 0,
            }),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &CalibrationConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn factor_of(&self, w: &SlidingQuantile) -> f64 {
        if w.len() < self.config.min_samples {
            return self.config.neutral;
        }
        let (Some(median), Some(q)) = (w.quantile(0.5), w.quantile(self.config.quantile)) else {
            return self.config.neutral;
        };
        // The margin is never negative: a quantile below the median (asked
        // for with `quantile` < 0.5) gives the median.
        let f = median + self.config.spread_weight * (q - median).max(0.0);
        f.clamp(self.config.min_factor, self.config.max_factor)
    }

    /// The factor for `model` and a kind of content: the kind's own when it
    /// has enough samples, else the model's.
    #[cfg(test)]
    pub(crate) fn factor_for(&self, model: &str, kind: ContentKind) -> f64 {
        let inner = self.lock();
        match inner.models.get(model) {
            Some(m) => self.factor_of(self.text_window(m, kind)),
            None => self.config.neutral,
        }
    }

    /// The window that calibrates text of `kind`: the kind's own once it has
    /// `min_samples`, else the model's.
    fn text_window<'a>(&self, m: &'a ModelWindow, kind: ContentKind) -> &'a SlidingQuantile {
        match m.kind(kind) {
            Some(w) if w.len() >= self.config.min_samples => w,
            _ => &m.window,
        }
    }

    /// The median of a window with enough samples.
    fn center_of(&self, w: &SlidingQuantile) -> Option<f64> {
        if w.len() < self.config.min_samples {
            return None;
        }
        w.quantile(0.5)
    }

    /// The median of a window with enough samples plus the margin from its
    /// spread (as the factor's), not clamped: for windows of tokens.
    fn value_of(&self, w: &SlidingQuantile) -> Option<f64> {
        let median = self.center_of(w)?;
        let q = w.quantile(self.config.quantile)?;
        Some(median + self.config.spread_weight * (q - median).max(0.0))
    }

    /// How widely a window's samples scatter around their median (p90 − p10
    /// over the median); infinite when it cannot tell.
    fn scatter(w: &SlidingQuantile) -> f64 {
        match (w.quantile(0.1), w.quantile(0.5), w.quantile(0.9)) {
            (Some(lo), Some(m), Some(hi)) if m > 0.0 => (hi - lo) / m,
            _ => f64::INFINITY,
        }
    }

    /// What the media of `parts` cost: by the formula until the server's
    /// counts have taught enough, then by whichever of the two learned rules
    /// (a ratio to the formula, or tokens per item) scatters less.
    /// `conservative` adds each window's margin; else its median.
    fn media_cost(&self, m: &ModelWindow, parts: NonText, conservative: bool) -> f64 {
        let formula = parts.media as f64;
        let Some(w) = m.parts.as_deref() else {
            return formula;
        };
        let pick = |w: &SlidingQuantile| {
            if conservative {
                self.value_of(w)
            } else {
                self.center_of(w)
            }
        };
        let by_ratio = pick(&w.media_ratio).map(|r| {
            let r = r.clamp(self.config.min_factor, self.config.max_factor);
            (formula * r, Self::scatter(&w.media_ratio))
        });
        let by_item = (parts.items > 0)
            .then(|| pick(&w.media_item))
            .flatten()
            .map(|t| {
                (
                    parts.items as f64 * t.max(0.0),
                    Self::scatter(&w.media_item),
                )
            });
        match (by_ratio, by_item) {
            (Some((r, sr)), Some((i, si))) => {
                if si < sr {
                    i
                } else {
                    r
                }
            }
            (Some((r, _)), None) => r,
            (None, Some((i, _))) => i,
            (None, None) => formula,
        }
    }

    /// The calibrated tokens of a prompt whose estimate is `text` tokens of
    /// text of kind `kind` plus `parts`: its media as learned, plus, with
    /// tools, the fit of requests with tools once it has enough samples,
    /// else the text times its factor (its kind's once that has enough
    /// samples, else the model's) plus the overhead as estimated.
    pub(crate) fn predict(&self, model: &str, kind: ContentKind, text: u64, parts: NonText) -> f64 {
        let inner = self.lock();
        let Some(m) = inner.models.get(model) else {
            return self.config.neutral * text as f64 + (parts.media + parts.overhead) as f64;
        };
        let media = self.media_cost(m, parts, true);
        if parts.overhead > 0 {
            if let Some((a, b, margin)) = m.parts.as_deref().and_then(|w| w.tools.fit(&self.config))
            {
                return (a * text as f64 + b) * (1.0 + margin) + media;
            }
        }
        let f = self.factor_of(self.text_window(m, kind));
        text as f64 * f + media + parts.overhead as f64
    }

    /// Records a prompt whose estimate was `text` tokens of text of kind
    /// `kind` plus `parts`, and which really cost `actual`, as one sample of
    /// the part that dominates its estimate; the other parts are taken at
    /// their current medians (or as estimated, before enough samples):
    ///
    /// - media a quarter of the estimate or more: what the text and the
    ///   overhead leave is a sample of the media, as a ratio to the formula
    ///   and per item;
    /// - media of 5 % or more while the media have too few samples of their
    ///   own: nothing (their error would pass for the rest's);
    /// - else, with tools: what the media leave is a sample of the fit of
    ///   requests with tools (`a × text + b`);
    /// - else a sample of the text's ratio, into its kind's window and the
    ///   model's, as [`observe`](Self::observe).
    pub(crate) fn observe_parts(
        &self,
        model: &str,
        kind: ContentKind,
        text: u64,
        parts: NonText,
        actual: u64,
    ) -> bool {
        if parts.is_empty() {
            return self.observe_kind(model, kind, text, actual);
        }
        let (text_center, media, overhead, media_known) = {
            let inner = self.lock();
            match inner.models.get(model) {
                None => (
                    self.config.neutral,
                    parts.media as f64,
                    parts.overhead as f64,
                    false,
                ),
                Some(m) => {
                    let fit = (parts.overhead > 0)
                        .then(|| m.parts.as_deref().and_then(|w| w.tools.fit(&self.config)))
                        .flatten();
                    let center = self
                        .center_of(self.text_window(m, kind))
                        .unwrap_or(self.config.neutral);
                    let media_known = m
                        .parts
                        .as_deref()
                        .is_some_and(|w| w.media_ratio.len() >= self.config.min_samples);
                    let media = self.media_cost(m, parts, false);
                    match fit {
                        // With tools, the fit stands for the text and the overhead.
                        Some((a, b, _)) => (a, media, b, media_known),
                        None => (center, media, parts.overhead as f64, media_known),
                    }
                }
            }
        };
        let actual = actual as f64;
        let whole = text
            .saturating_add(parts.media)
            .saturating_add(parts.overhead);
        if parts.media > 0 && parts.media.saturating_mul(4) >= whole {
            let rest = (actual - text as f64 * text_center - overhead).max(0.0);
            return self.observe_part(model, |w| {
                let ratio = w.media_ratio.push(rest / parts.media as f64);
                if parts.items > 0 {
                    w.media_item.push(rest / parts.items as f64);
                }
                ratio
            });
        }
        // Media of 5 % or more, before the server's counts have taught what
        // media cost: the rest would carry their error (an image the server
        // charges 1,600 tokens where the formula gives 640 is 25 % of a
        // 3,800-token request), so nothing is learned from it.
        if parts.media > 0 && !media_known && parts.media.saturating_mul(20) >= whole {
            return false;
        }
        if parts.overhead > 0 {
            let rest = (actual - media).max(0.0);
            return self.observe_part(model, |w| w.tools.push(text as f64, rest));
        }
        if text == 0 {
            return false;
        }
        let rest = (actual - media).max(0.0);
        self.observe_ratio(model, Some(kind), rest / text as f64)
    }

    /// Pushes into `model`'s part windows (a model seen for the first time
    /// is added, as in [`observe_ratio`](Self::observe_ratio)).
    fn observe_part(&self, model: &str, push: impl FnOnce(&mut PartWindows) -> bool) -> bool {
        self.with_model(model, |m, window| push(m.parts_mut(window)))
            .unwrap_or(false)
    }

    /// Runs `f` on `model`'s windows (and the window size), marked used
    /// now; a model seen for the first time is added. `None` for a model
    /// name longer than [`MAX_MODEL_LEN`](super::MAX_MODEL_LEN) bytes.
    fn with_model<R>(
        &self,
        model: &str,
        f: impl FnOnce(&mut ModelWindow, usize) -> R,
    ) -> Option<R> {
        if model.len() > super::MAX_MODEL_LEN {
            return None;
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.tick = inner.tick.wrapping_add(1);
        let tick = inner.tick;
        self.model_entry(inner, model, tick)
            .map(|m| f(m, self.config.window))
    }

    /// The factor to multiply the next raw estimate for `model` by.
    pub fn factor(&self, model: &str) -> f64 {
        let inner = self.lock();
        match inner.models.get(model) {
            Some(m) => self.factor_of(&m.window),
            None => self.config.neutral,
        }
    }

    /// The number of samples kept for `model`.
    pub fn samples(&self, model: &str) -> usize {
        self.lock().models.get(model).map_or(0, |m| m.window.len())
    }

    /// Records that a request estimated at `estimated` really cost `actual`.
    ///
    /// An `estimated` of 0 carries no ratio and is ignored (returns false).
    pub fn observe(&self, model: &str, estimated: u64, actual: u64) -> bool {
        if estimated == 0 {
            return false;
        }
        self.observe_ratio(model, None, actual as f64 / estimated as f64)
    }

    /// [`observe`](Self::observe), also into the window of a kind of content.
    pub(crate) fn observe_kind(
        &self,
        model: &str,
        kind: ContentKind,
        estimated: u64,
        actual: u64,
    ) -> bool {
        if estimated == 0 {
            return false;
        }
        self.observe_ratio(model, Some(kind), actual as f64 / estimated as f64)
    }

    /// Records one ratio for `model` (and `kind`). Non-finite ratios, and
    /// model names longer than [`MAX_MODEL_LEN`](super::MAX_MODEL_LEN) bytes,
    /// are ignored (returns false).
    fn observe_ratio(&self, model: &str, kind: Option<ContentKind>, ratio: f64) -> bool {
        if !ratio.is_finite() {
            return false;
        }
        self.with_model(model, |m, window| {
            if let Some(kind) = kind {
                m.push_kind(kind, ratio, window);
            }
            m.window.push(ratio)
        })
        .unwrap_or(false)
    }

    /// `model`'s windows, marked used at `tick`; a model seen for the first
    /// time is added, forgetting the least recently observed one when
    /// [`max_models`](CalibrationConfig::max_models) are tracked.
    fn model_entry<'a>(
        &self,
        inner: &'a mut Inner,
        model: &str,
        tick: u64,
    ) -> Option<&'a mut ModelWindow> {
        if !inner.models.contains_key(model) {
            if inner.models.len() >= self.config.max_models {
                let oldest = inner
                    .models
                    .iter()
                    .min_by_key(|(_, m)| m.last)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    inner.models.remove(&k);
                }
            }
            inner
                .models
                .insert(model.to_owned(), ModelWindow::new(self.config.window, tick));
        }
        let m = inner.models.get_mut(model)?;
        m.last = tick;
        Some(m)
    }

    /// What has been learned, per model, sorted by model name.
    pub fn snapshot(&self) -> Vec<ModelCalibration> {
        let inner = self.lock();
        let mut out: Vec<ModelCalibration> = inner
            .models
            .iter()
            .map(|(k, m)| ModelCalibration {
                model: k.clone(),
                factor: self.factor_of(&m.window),
                samples: m.window.len(),
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_evicts_oldest_and_keeps_sorted() {
        let mut w = SlidingQuantile::new(3);
        assert_eq!(w.quantile(0.5), None);
        for x in [5.0, 1.0, 3.0] {
            assert!(w.push(x));
        }
        assert_eq!(w.quantile(0.0), Some(1.0));
        assert_eq!(w.quantile(1.0), Some(5.0));
        // 5.0 leaves.
        w.push(2.0);
        assert_eq!(w.iter().collect::<Vec<_>>(), vec![1.0, 3.0, 2.0]);
        assert_eq!(w.quantile(1.0), Some(3.0));
        assert_eq!(w.quantile(0.5), Some(2.0));
    }

    #[test]
    fn window_ignores_non_finite() {
        let mut w = SlidingQuantile::new(2);
        assert!(!w.push(f64::NAN));
        assert!(!w.push(f64::INFINITY));
        assert!(w.is_empty());
    }

    #[test]
    fn window_duplicates_evict_correctly() {
        let mut w = SlidingQuantile::new(2);
        for _ in 0..10 {
            w.push(1.0);
        }
        w.push(2.0);
        w.push(2.0);
        assert_eq!(w.quantile(0.0), Some(2.0));
    }

    #[test]
    fn window_matches_naive_quantile() {
        // Deterministic pseudo-random sequence.
        let mut s: u64 = 0x1234_5678;
        let mut w = SlidingQuantile::new(17);
        let mut all = Vec::new();
        for _ in 0..500 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = ((s >> 33) % 1000) as f64 / 10.0;
            w.push(x);
            all.push(x);
            let start = all.len().saturating_sub(17);
            let mut naive = all[start..].to_vec();
            naive.sort_by(f64::total_cmp);
            for q in [0.0, 0.1, 0.5, 0.9, 1.0] {
                let rank = ((q * naive.len() as f64).ceil() as usize).clamp(1, naive.len());
                assert_eq!(w.quantile(q), Some(naive[rank - 1]));
            }
        }
    }

    #[test]
    fn zero_capacity_is_one() {
        let mut w = SlidingQuantile::new(0);
        w.push(1.0);
        w.push(2.0);
        assert_eq!(w.len(), 1);
        assert_eq!(w.quantile(0.5), Some(2.0));
    }

    #[test]
    fn calibration_neutral_until_min_samples() {
        let cal = Calibration::default();
        for i in 0..4 {
            cal.observe("m", 100, 200);
            assert_eq!(cal.factor("m"), 1.0, "after {} samples", i + 1);
        }
        cal.observe("m", 100, 200);
        assert_eq!(cal.factor("m"), 2.0);
        assert_eq!(cal.factor("other"), 1.0);
        assert_eq!(cal.samples("m"), 5);
    }

    #[test]
    fn calibration_clamps() {
        let cal = Calibration::default();
        for _ in 0..10 {
            cal.observe("big", 1, 100);
            cal.observe("small", 100, 1);
        }
        assert_eq!(cal.factor("big"), 4.0);
        // Below the raw estimate too, down to the floor.
        assert_eq!(cal.factor("small"), 0.25);
        let loose = Calibration::new(CalibrationConfig {
            min_factor: 0.5,
            ..CalibrationConfig::default()
        });
        for _ in 0..10 {
            loose.observe("small", 100, 1);
        }
        assert_eq!(loose.factor("small"), 0.5);
    }

    #[test]
    fn calibration_adds_a_margin_from_the_spread() {
        let cal = Calibration::default();
        // 90 samples at 1.0 and 10 at 1.5 in a window of 64: the last 64 hold
        // 54 ones and 10 of 1.5: median 1.0, p90 (rank 58) 1.5, so the factor
        // is 1.0 + 0.5 * 0.5.
        for _ in 0..90 {
            cal.observe("m", 100, 100);
        }
        for _ in 0..10 {
            cal.observe("m", 100, 150);
        }
        assert_eq!(cal.factor("m"), 1.25);
        // Weight 1 and a floor of 1 keep the quantile itself.
        let p90 = Calibration::new(CalibrationConfig {
            spread_weight: 1.0,
            min_factor: 1.0,
            ..CalibrationConfig::default()
        });
        for _ in 0..54 {
            p90.observe("m", 100, 100);
        }
        for _ in 0..10 {
            p90.observe("m", 100, 150);
        }
        assert_eq!(p90.factor("m"), 1.5);
    }

    #[test]
    fn calibration_learns_below_one() {
        let cal = Calibration::default();
        for _ in 0..10 {
            cal.observe("m", 1000, 800);
        }
        assert!((cal.factor("m") - 0.8).abs() < 1e-9, "{}", cal.factor("m"));
    }

    #[test]
    fn media_learn_apart_from_text() {
        let cal = Calibration::default();
        let image = |formula: u64| NonText {
            media: formula,
            items: 1,
            overhead: 0,
        };
        // A request whose image is a sixth of it, before any request made
        // mostly of media: nothing is learned (the image's error would pass
        // for the text's).
        for _ in 0..10 {
            assert!(!cal.observe_parts("m", ContentKind::Prose, 3_200, image(640), 2_560 + 1_600));
        }
        assert_eq!(cal.samples("m"), 0);
        // The text counts 0.8 of its estimate; images of every size cost
        // the server 1,600 tokens, where the formula says 350 to 1,600.
        for i in 0..20u64 {
            cal.observe_kind("m", ContentKind::Prose, 1_000, 800);
            let formula = [350, 640, 1_229, 1_600][(i % 4) as usize];
            assert!(cal.observe_parts("m", ContentKind::Prose, 200, image(formula), 160 + 1_600));
        }
        // The text's factor carries none of the images' error.
        assert!((cal.factor("m") - 0.8).abs() < 1e-9, "{}", cal.factor("m"));
        // Tokens per image scatter less than the ratio: 1,600 an image.
        let small = cal.predict("m", ContentKind::Prose, 200, image(640));
        assert!((small - (160.0 + 1_600.0)).abs() < 1.0, "{small}");
        // Once media cost is known, a request with a little media teaches
        // the text, its media taken at what they are known to cost.
        let before = cal.samples("m");
        assert!(cal.observe_parts("m", ContentKind::Prose, 3_200, image(640), 2_560 + 1_600));
        assert_eq!(cal.samples("m"), before + 1);
        assert!((cal.factor("m") - 0.8).abs() < 1e-9, "{}", cal.factor("m"));

        // A server that follows the formula: the ratio wins.
        let cal = Calibration::default();
        for i in 0..20u64 {
            cal.observe_kind("m", ContentKind::Prose, 1_000, 800);
            let formula = [350, 640, 1_229, 1_600][(i % 4) as usize];
            cal.observe_parts("m", ContentKind::Prose, 200, image(formula), 160 + formula);
        }
        let small = cal.predict("m", ContentKind::Prose, 200, image(640));
        assert!((small - (160.0 + 640.0)).abs() < 1.0, "{small}");
    }

    #[test]
    fn tools_learn_the_servers_overhead() {
        let tools = NonText {
            media: 0,
            items: 0,
            overhead: 530,
        };
        for server_overhead in [0.0, 346.0] {
            let cal = Calibration::default();
            for i in 0..20u64 {
                let text = 500 + 300 * (i % 7);
                let actual = (0.75 * text as f64 + server_overhead) as u64;
                assert!(cal.observe_parts("m", ContentKind::Code, text, tools, actual));
            }
            for text in [400u64, 1_000, 5_000] {
                let want = 0.75 * text as f64 + server_overhead;
                let got = cal.predict("m", ContentKind::Code, text, tools);
                // At most the rounding of the samples above the truth, never
                // the estimator's 530.
                assert!(
                    got >= want - 1.0 && got <= want * 1.01 + 1.0,
                    "{text}: {got} vs {want}"
                );
            }
            // Requests with tools do not move the text's factor.
            assert_eq!(cal.factor("m"), 1.0);
        }
    }

    #[test]
    fn calibration_per_kind_of_content() {
        let cal = Calibration::default();
        for _ in 0..10 {
            cal.observe_kind("m", ContentKind::Code, 100, 80);
            cal.observe_kind("m", ContentKind::Cjk, 100, 130);
        }
        assert!((cal.factor_for("m", ContentKind::Code) - 0.8).abs() < 1e-9);
        assert!((cal.factor_for("m", ContentKind::Cjk) - 1.3).abs() < 1e-9);
        // A kind without samples of its own gets the model's factor.
        let model = cal.factor("m");
        assert_eq!(cal.factor_for("m", ContentKind::Prose), model);
        assert!(model > 0.8 && model < 1.3, "{model}");
    }

    #[test]
    fn calibration_ignores_zero_estimate() {
        let cal = Calibration::default();
        assert!(!cal.observe("m", 0, 10));
        assert_eq!(cal.samples("m"), 0);
    }

    #[test]
    fn calibration_bounds_models() {
        let cal = Calibration::new(CalibrationConfig {
            max_models: 2,
            ..CalibrationConfig::default()
        });
        cal.observe("a", 1, 1);
        cal.observe("b", 1, 1);
        cal.observe("a", 1, 1);
        cal.observe("c", 1, 1);
        let names: Vec<String> = cal.snapshot().into_iter().map(|m| m.model).collect();
        assert_eq!(names, vec!["a".to_owned(), "c".to_owned()]);
    }

    #[test]
    fn calibration_survives_poison() {
        let cal = std::sync::Arc::new(Calibration::default());
        let c2 = cal.clone();
        let _ = std::thread::spawn(move || {
            let _g = c2.inner.lock();
            panic!("poison");
        })
        .join();
        cal.observe("m", 1, 1);
        assert_eq!(cal.samples("m"), 1);
    }

    #[test]
    fn config_is_normalized() {
        let cal = Calibration::new(CalibrationConfig {
            min_factor: 3.0,
            max_factor: 1.0,
            quantile: 7.0,
            spread_weight: -1.0,
            neutral: 10.0,
            window: 0,
            min_samples: 0,
            max_models: 0,
        });
        let c = cal.config();
        assert_eq!((c.min_factor, c.max_factor), (1.0, 3.0));
        assert_eq!(c.quantile, 1.0);
        assert_eq!(c.spread_weight, 0.0);
        assert_eq!(c.neutral, 3.0);
        assert_eq!((c.window, c.min_samples, c.max_models), (1, 1, 1));
    }
}
