//! Online calibration: per model, the median of observed ratios plus a
//! margin sized from their spread, and a fit over the parts of each request
//! (see the `fit` module) with margins per kind of content.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use super::classes::ContentKind;
use super::fit::{PartsFit, Split, FIT};

/// A fixed-size sliding window of `f64` samples that answers quantiles.
///
/// Keeps the last `capacity` finite samples twice: in arrival order (a ring,
/// to know which one leaves) and sorted (to answer a quantile in O(1)).
/// Memory is O(samples kept), grown as samples arrive up to the capacity
/// (an unused window costs nothing); [`push`](Self::push) costs O(capacity)
/// moves in the worst case (two binary searches of integer keys and one
/// shift of the sorted copy, between where the sample leaving was and where
/// the new one goes: none for a repeated figure) and allocates only while
/// the window is not yet full.
///
/// Non-finite samples (NaN, infinities) are ignored.
#[derive(Clone)]
pub(crate) struct SlidingQuantile {
    /// Samples in arrival order; the oldest is at `next` once full.
    ring: Vec<f64>,
    /// The same samples as [`order_key`]s, sorted ascending (the order of
    /// `f64::total_cmp`, compared as integers); the first `len` are live.
    sorted: Vec<i64>,
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
            self.sorted.push(0);
        } else if self.len == cap {
            // Full: the oldest sample leaves and `x` takes its place in the
            // sorted copy, moving only the samples between the two (none
            // when they are equal, as repeated figures often are).
            let Some(old) = self.ring.get(self.next).copied() else {
                return false;
            };
            let (old, key) = (order_key(old), order_key(x));
            if old == key {
                // The same figure again (the same bits): the sorted copy
                // stays as it is.
                if let Some(slot) = self.ring.get_mut(self.next) {
                    *slot = x;
                }
                self.next = (self.next + 1) % cap;
                return true;
            }
            let live = &mut self.sorted[..self.len];
            // The last copy of `old`, and where `x` goes: after the samples
            // at most it, as in a push.
            let at = live.partition_point(|p| *p <= old).wrapping_sub(1);
            if live.get(at) != Some(&old) {
                // Unreachable by construction: ring and sorted hold the same
                // multiset. Recover by rebuilding the sorted copy.
                self.rebuild_sorted();
                return self.push(x);
            }
            let to = live.partition_point(|p| *p <= key);
            let slot = if to > at + 1 {
                live.copy_within(at + 1..to, at);
                to - 1
            } else if to < at {
                live.copy_within(to..at, to + 1);
                to
            } else {
                // Its own place (`to` is `at`, or just after it).
                at
            };
            if let Some(slot) = live.get_mut(slot) {
                *slot = key;
            }
            if let Some(slot) = self.ring.get_mut(self.next) {
                *slot = x;
            }
            self.next = (self.next + 1) % cap;
            return true;
        }
        self.insert(x)
    }

    /// Inserts `x` into a window that has a free slot in both copies.
    fn insert(&mut self, x: f64) -> bool {
        let cap = self.cap;
        // Insert into the sorted copy (after equal elements, which is stable).
        let key = order_key(x);
        let live = &self.sorted[..self.len];
        let pos = live.partition_point(|p| *p <= key);
        let end = self.len;
        self.sorted.copy_within(pos..end, pos + 1);
        if let Some(slot) = self.sorted.get_mut(pos) {
            *slot = key;
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
        for (key, x) in self.sorted[..n].iter_mut().zip(&self.ring[..n]) {
            *key = order_key(*x);
        }
        self.sorted[..n].sort_unstable();
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
        self.sorted.get(idx).map(|key| from_order_key(*key))
    }

    /// The samples in the window, in arrival order (oldest first).
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = f64> + '_ {
        let cap = self.cap;
        let start = if self.len == cap { self.next } else { 0 };
        (0..self.len).filter_map(move |i| self.ring.get((start + i) % cap).copied())
    }
}

/// `x` as an integer that orders as `f64::total_cmp` orders the floats (its
/// own transform of the bits): a binary search of the sorted copy compares
/// integers.
fn order_key(x: f64) -> i64 {
    let bits = x.to_bits() as i64;
    bits ^ ((((bits >> 63) as u64) >> 1) as i64)
}

/// The float whose [`order_key`] is `key` (the transform is its own inverse:
/// it keeps the sign bit).
fn from_order_key(key: i64) -> f64 {
    f64::from_bits((key ^ ((((key >> 63) as u64) >> 1) as i64)) as u64)
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
    /// Samples kept: the larger of its window of whole-request ratios and
    /// the window of requests its fit over parts holds.
    pub samples: usize,
}

struct ModelWindow {
    /// Ratios of whole requests made (almost) only of text: the model's
    /// factor, and the prior of the fit's text coefficients.
    window: SlidingQuantile,
    /// The fit over the parts of requests, created at the first request
    /// that gives one.
    fit: Option<Box<PartsFit>>,
    /// Logical time of the last observation, for least-recently-observed eviction.
    last: u64,
}

impl ModelWindow {
    fn new(window: usize, tick: u64) -> Self {
        Self {
            window: SlidingQuantile::new(window),
            fit: None,
            last: tick,
        }
    }

    /// The larger of its window of ratios and its fit's window of requests.
    fn samples(&self) -> usize {
        self.window
            .len()
            .max(self.fit.as_deref().map_or(0, PartsFit::len))
    }
}

/// The share of a request's estimate its text must have for the request's
/// whole ratio to be a sample of the model's text ratio (the prior of the
/// fit, and [`Calibration::factor`]): an image the server charges four
/// times the formula's figure moves a request's ratio by less than its
/// text's own error when it is under 5 % of it.
const TEXT_ONLY_SHARE: f64 = 0.95;

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
            // The last few bytes as a little-endian word padded with zeros
            // (byte by byte: no call to copy fewer than eight).
            let word = rest
                .iter()
                .rev()
                .fold(0u64, |word, &b| (word << 8) | u64::from(b));
            self.add(word);
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
/// room for its misses. The estimator calibrates by the parts of each
/// request rather than by one ratio: a ridge least-squares fit, over the
/// last `window` requests, of what the server charged against the
/// estimate's tokens per character-class group (ASCII words, digits,
/// whitespace, punctuation, each non-ASCII script group), its framing and
/// its tool-use overhead, leaning toward the model's ratio above; images
/// and documents learned from what the fitted text leaves (as a ratio to
/// the media formula or as tokens per item, whichever scatters less); and
/// a margin from the spread of the fit's leave-one-out errors, per kind of
/// content (prose, code, data, base64, CJK, other scripts), with requests
/// holding media or tools apart. A request that mixes kinds gets each
/// part's own ratio (see the `fit` module's docs).
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
/// It does not weigh samples by age inside the window (every one of the
/// last `window` observations counts the same; the fit weighs each request
/// by its relative error, so a large request counts no more than a small
/// one), and it does not persist anything: a new process starts neutral.
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

    /// The median of a window with enough samples.
    fn center_of(&self, w: &SlidingQuantile) -> Option<f64> {
        if w.len() < self.config.min_samples {
            return None;
        }
        w.quantile(0.5)
    }

    /// The coefficients the fit of `m` leans toward: the model's text ratio
    /// (the median of its window once it has enough samples, else neutral)
    /// for the text, the media formula and the overhead as estimated.
    fn prior(&self, window: &SlidingQuantile) -> [f64; FIT] {
        let ratio = self
            .center_of(window)
            .unwrap_or(self.config.neutral)
            .clamp(self.config.min_factor, self.config.max_factor);
        Split::prior(ratio)
    }

    /// The calibrated tokens of a prompt estimated as `split`, whose text is
    /// mostly of `kind`: the fit over its parts with its margin (the kind's
    /// own once the fit has seen enough of that kind), once the fit has
    /// `min_samples` requests; before, the text times the model's factor
    /// plus the media and the overhead as estimated.
    pub(crate) fn predict(&self, model: &str, kind: ContentKind, split: &Split) -> f64 {
        let inner = self.lock();
        let Some(m) = inner.models.get(model) else {
            return self.config.neutral * split.text() + split.media() + split.overhead();
        };
        if let Some(p) = m
            .fit
            .as_deref()
            .and_then(|f| f.predict(split, kind, &self.config))
        {
            return p;
        }
        self.factor_of(&m.window) * split.text() + split.media() + split.overhead()
    }

    /// Records that a prompt estimated as `split` (`estimated` tokens in
    /// all, as the estimate said), whose text is mostly of `kind`, really
    /// cost `actual`: one request of the fit over parts (see
    /// [`fit`](super::fit)), and, when its text is 95 % of it or more, a
    /// sample `actual / estimated` of the model's ratio. Returns false (nothing
    /// learned) for an empty estimate, a count of 0, or a model name longer
    /// than [`MAX_MODEL_LEN`](super::MAX_MODEL_LEN) bytes.
    pub(crate) fn observe_parts(
        &self,
        model: &str,
        kind: ContentKind,
        split: &Split,
        estimated: u64,
        actual: u64,
    ) -> bool {
        let total = split.total();
        if !(total > 0.0 && total.is_finite()) || actual == 0 {
            return false;
        }
        let actual = actual as f64;
        self.with_model(model, |m, window| {
            if split.text() >= TEXT_ONLY_SHARE * total && estimated > 0 {
                m.window.push(actual / estimated as f64);
            }
            // The prior is worked out only for a refit.
            let ModelWindow {
                window: ratios,
                fit,
                ..
            } = m;
            fit.get_or_insert_with(|| Box::new(PartsFit::new(window)))
                .push_with(split, kind, actual, || self.prior(ratios), &self.config)
        })
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
        // A model seen before: one lookup.
        if let Some(m) = inner.models.get_mut(model) {
            m.last = tick;
            return Some(f(m, self.config.window));
        }
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

    /// The number of samples kept for `model`: the larger of its window of
    /// ratios and its fit's window of requests.
    pub fn samples(&self, model: &str) -> usize {
        self.lock()
            .models
            .get(model)
            .map_or(0, ModelWindow::samples)
    }

    /// Records that a request estimated at `estimated` really cost `actual`.
    ///
    /// An `estimated` of 0 carries no ratio and is ignored (returns false).
    pub fn observe(&self, model: &str, estimated: u64, actual: u64) -> bool {
        if estimated == 0 {
            return false;
        }
        self.observe_ratio(model, actual as f64 / estimated as f64)
    }

    /// Records one ratio for `model`. Non-finite ratios, and model names
    /// longer than [`MAX_MODEL_LEN`](super::MAX_MODEL_LEN) bytes, are
    /// ignored (returns false).
    fn observe_ratio(&self, model: &str, ratio: f64) -> bool {
        if !ratio.is_finite() {
            return false;
        }
        self.with_model(model, |m, _| m.window.push(ratio))
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
                samples: m.samples(),
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name's last bytes hash as one word padded with zeros, read little
    /// endian, as its whole words are.
    #[test]
    fn a_name_hashes_its_last_bytes_as_a_padded_word() {
        let name = b"claude-sonnet-4-5";
        let mut h = NameHasher::default();
        h.write(name);
        let mut words = NameHasher::default();
        for chunk in name.chunks(8) {
            let mut a = [0u8; 8];
            a[..chunk.len()].copy_from_slice(chunk);
            words.add(u64::from_le_bytes(a));
        }
        assert_eq!(h.finish(), words.finish());
    }

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

    /// The sorted copy is the window sorted after every push, with many
    /// repeated figures (and both zeros, which `total_cmp` tells apart).
    #[test]
    fn sorted_copy_is_the_window_sorted_with_repeats() {
        let figures = [-0.0, 0.0, 1.0, 1.0, 2.5, 3.0, 3.0, 7.0];
        let mut s: u64 = 0x9e37_79b9;
        for cap in [1, 2, 5, 16, 64] {
            let mut w = SlidingQuantile::new(cap);
            let mut all = Vec::new();
            for _ in 0..400 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let x = figures[((s >> 33) % figures.len() as u64) as usize];
                assert!(w.push(x));
                all.push(x);
                let start = all.len().saturating_sub(cap);
                let mut naive = all[start..].to_vec();
                naive.sort_by(f64::total_cmp);
                let kept: Vec<u64> = w.sorted[..w.len]
                    .iter()
                    .map(|k| from_order_key(*k).to_bits())
                    .collect();
                let want: Vec<u64> = naive.iter().map(|x| x.to_bits()).collect();
                assert_eq!(kept, want, "capacity {cap}");
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

    use super::super::classes::{Group, GROUPS};

    /// A split of `words` tokens of ASCII words, `cjk` of CJK, 10 of
    /// framing, and the media and overhead given.
    fn split(words: f64, cjk: f64, overhead: u64, media: u64, items: u64) -> Split {
        let mut g = [0.0; GROUPS];
        g[Group::Words as usize] = words;
        g[Group::Cjk as usize] = cjk;
        Split::new(g, 10.0, overhead, media, items)
    }

    /// One settled request of the fit, estimated at its split's total.
    fn learn(
        cal: &Calibration,
        model: &str,
        kind: ContentKind,
        split: &Split,
        actual: u64,
    ) -> bool {
        cal.observe_parts(model, kind, split, split.total().ceil() as u64, actual)
    }

    fn near(got: f64, want: f64, tolerance: f64) -> bool {
        (got - want).abs() <= tolerance * want
    }

    /// A tokenizer that counts English words at 0.8 of the estimate and
    /// Chinese at 1.3: a request that mixes them is predicted with each
    /// part's own ratio, which no single ratio per request can do.
    #[test]
    fn a_request_mixing_kinds_gets_each_parts_ratio() {
        let cal = Calibration::default();
        for i in 0..40u64 {
            let (w, c) = if i % 2 == 0 {
                (500.0 + 100.0 * (i % 7) as f64, 0.0)
            } else {
                (0.0, 400.0 + 150.0 * (i % 5) as f64)
            };
            let actual = (0.8 * (w + 10.0) + 1.3 * c).round() as u64;
            let kind = if c > 0.0 {
                ContentKind::Cjk
            } else {
                ContentKind::Prose
            };
            assert!(learn(&cal, "m", kind, &split(w, c, 0, 0, 0), actual));
        }
        let mixed = split(1_000.0, 1_000.0, 0, 0, 0);
        let want = 0.8 * 1_010.0 + 1.3 * 1_000.0;
        for kind in [ContentKind::Prose, ContentKind::Cjk] {
            let got = cal.predict("m", kind, &mixed);
            assert!(near(got, want, 0.03), "{kind:?}: {got} vs {want}");
        }
    }

    /// The server charges 1,600 tokens an image whatever its size, where the
    /// formula says 350 to 1,600: images learn their cost per item from
    /// requests where they are a small part, and the text's ratio carries
    /// none of their error.
    #[test]
    fn images_learn_per_item_from_requests_mostly_text() {
        let cal = Calibration::default();
        for i in 0..30u64 {
            let w = 1_500.0 + 200.0 * (i % 5) as f64;
            if i % 3 == 2 {
                let formula = [350, 640, 1_229][(i % 9 / 3) as usize];
                let actual = (0.8 * (w + 10.0)).round() as u64 + 1_600;
                learn(
                    &cal,
                    "m",
                    ContentKind::Prose,
                    &split(w, 0.0, 0, formula, 1),
                    actual,
                );
            } else {
                let actual = (0.8 * (w + 10.0)).round() as u64;
                learn(
                    &cal,
                    "m",
                    ContentKind::Prose,
                    &split(w, 0.0, 0, 0, 0),
                    actual,
                );
            }
        }
        let small = cal.predict("m", ContentKind::Prose, &split(200.0, 0.0, 0, 350, 1));
        assert!(near(small, 0.8 * 210.0 + 1_600.0, 0.05), "{small}");
        let text = cal.predict("m", ContentKind::Prose, &split(2_000.0, 0.0, 0, 0, 0));
        assert!(near(text, 0.8 * 2_010.0, 0.02), "{text}");

        // A server that follows the formula: the ratio wins.
        let cal = Calibration::default();
        for i in 0..30u64 {
            let formula = [350, 640, 1_229, 1_600][(i % 4) as usize];
            let actual = (0.8 * 210.0) as u64 + formula;
            learn(
                &cal,
                "m",
                ContentKind::Prose,
                &split(200.0, 0.0, 0, formula, 1),
                actual,
            );
            learn(
                &cal,
                "m",
                ContentKind::Prose,
                &split(1_000.0, 0.0, 0, 0, 0),
                808,
            );
        }
        let small = cal.predict("m", ContentKind::Prose, &split(200.0, 0.0, 0, 640, 1));
        assert!(near(small, 0.8 * 210.0 + 640.0, 0.05), "{small}");
    }

    /// The estimator adds 530 tokens of tool-use system prompt; a server
    /// that adds none, or 346, is learned from requests with tools alone.
    #[test]
    fn tools_learn_the_servers_overhead() {
        for server_overhead in [0.0, 346.0] {
            let cal = Calibration::default();
            for i in 0..20u64 {
                let w = 500.0 + 300.0 * (i % 7) as f64;
                let actual = (0.75 * (w + 10.0) + server_overhead) as u64;
                assert!(learn(
                    &cal,
                    "m",
                    ContentKind::Code,
                    &split(w, 0.0, 530, 0, 0),
                    actual
                ));
            }
            for w in [400.0, 1_000.0, 5_000.0] {
                let want = 0.75 * (w + 10.0) + server_overhead;
                let got = cal.predict("m", ContentKind::Code, &split(w, 0.0, 530, 0, 0));
                assert!(
                    near(got, want, 0.05),
                    "{server_overhead} {w}: {got} vs {want}"
                );
            }
        }
    }

    /// The margin comes from the spread of the fit's errors, per kind:
    /// text whose count scatters is charged above its centre, text that is
    /// counted exactly at its centre.
    #[test]
    fn the_margin_follows_each_kinds_spread() {
        let cal = Calibration::default();
        for i in 0..60u64 {
            let w = 800.0 + 50.0 * (i % 5) as f64;
            let exact = (0.8 * (w + 10.0)).round() as u64;
            learn(&cal, "m", ContentKind::Data, &split(w, 0.0, 0, 0, 0), exact);
            // Prose counted 0.8 on average, ±10 %.
            let noisy = (0.8 * (w + 10.0) * [0.9, 1.0, 1.1][(i % 3) as usize]).round() as u64;
            learn(
                &cal,
                "m",
                ContentKind::Prose,
                &split(w, 0.0, 0, 0, 0),
                noisy,
            );
        }
        let centre = 0.8 * 1_010.0;
        let data = cal.predict("m", ContentKind::Data, &split(1_000.0, 0.0, 0, 0, 0));
        let prose = cal.predict("m", ContentKind::Prose, &split(1_000.0, 0.0, 0, 0, 0));
        assert!(near(data, centre, 0.01), "{data}");
        assert!(prose > centre * 1.02 && prose < centre * 1.1, "{prose}");
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
