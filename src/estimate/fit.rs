//! The calibration of an estimate by its parts: a least-squares fit of what
//! the server charged against the estimate's text split by character-class
//! group and its tool-use overhead, with the media learned from what the
//! fitted text leaves.
//!
//! # Why a fit over parts, not one ratio per kind of request
//!
//! A request is rarely one kind of text: a conversation mixes prose, code
//! and data, a tool call JSON schemas and a tool result, a multilingual
//! message Chinese and Russian. A tokenizer other than the estimator's
//! reference counts each part at its own rate, and an image costs what the
//! server says whatever its share of the request. One ratio per request,
//! labelled by the kind that dominates it, leaves each request's mixture in
//! its error. The fit gives each part its own coefficient, learned from
//! every request that holds some of it:
//!
//! `actual − media ≈ Σ w_g · x_g`
//!
//! where `x_g` is the estimate's tokens of part `g`: each
//! [`Group`](super::classes::Group) of the text model's features, the
//! per-message and per-request framing (held at the text's prior ratio: a
//! constant per message cannot be told from the tool-use overhead, a
//! constant per request, in requests with tools), and the tool-use
//! overhead. It minimises the relative error (each request's row divided by
//! what the server charged, so a large request weighs no more than a small
//! one) over the last `window` requests, regularised toward a prior
//! (ridge): the model's median ratio of requests made of text for the text,
//! the overhead as estimated. The prior weighs as a quarter of a request
//! holding the part at its average share in the requests that hold it: a
//! part the traffic has not shown keeps its prior, a part seen in a few
//! requests moves about as far as they tell. A coefficient outside the
//! calibration's bounds is held at the bound and the others solved again.
//!
//! # Media
//!
//! What the fitted text leaves of a request's count is a sample of its
//! images' and documents' cost, as a ratio to the media formula (width ×
//! height / 750, PDF pages) and per item, whenever it is a tenth of the
//! count or more: images learn from requests where they are a small share
//! of the estimate too. Until five samples, media cost the larger of the
//! formula and the median cost per item seen (the two rules cannot be told
//! apart yet, and the documented formula is the least a server charges);
//! then the rule whose samples scatter less. A request whose media, not
//! yet learned, are 5 % of it or more stays out of the text's solve.
//!
//! # The margin
//!
//! Safety comes from the spread of the fit's own errors, measured out of
//! sample: the leave-one-out error of each request in the window (its
//! residual scaled by `1 / (1 − h)`, `h` its leverage; a request out of the
//! solve, its plain error), as the ratio actual / predicted. A prediction
//! is multiplied by `1 + median + spread_weight × (quantile − median)` of
//! those ratios over its class once the class has `min_samples` requests
//! in the window, else over the whole window. The classes: each kind of
//! content, then requests whose media are a tenth of them or more, then
//! requests with tools (data is predicted more tightly than prose, and an
//! image's miss must not widen every text's margin).
//!
//! # Cost
//!
//! The estimate side is one dot product over [`PARTS`] numbers (the group
//! tokens come from the character-class counts the estimator makes anyway)
//! and no allocation. The settlement side pushes a row (its non-zero parts
//! packed, listed once) and keeps the normal equations of the rows without
//! media as sums, adding the new row and taking away the one it evicts
//! (summed afresh once per window, so that rounding never builds up). It
//! refits after each eighth of the window has changed (after every request
//! while it holds fewer than 16): the kept sums plus the rows with media
//! (their targets change as media are learned), a Cholesky factor of the
//! system of [`FIT`] unknowns; and after each quarter (after every request
//! while it holds fewer than 8), at that refit, the margins: the inverse's
//! entries between the parts some row holds, and one quadratic form per
//! request for its leverage. No allocation once the window is full.

use super::calibrate::{CalibrationConfig, SlidingQuantile};
use super::classes::{ContentKind, GROUPS};

/// Where the per-message and per-request framing is in a [`Split`].
pub(crate) const FRAMING: usize = GROUPS;
/// Where the tool-use overhead is.
pub(crate) const OVERHEAD: usize = GROUPS + 1;
/// The parts the least squares fits: the text's groups, the framing and
/// the overhead.
pub(crate) const FIT: usize = GROUPS + 2;
/// Where the media formula's tokens are.
pub(crate) const MEDIA: usize = FIT;
/// Where the number of images and document pages is.
pub(crate) const ITEMS: usize = FIT + 1;
/// The number of parts.
pub(crate) const PARTS: usize = FIT + 2;

/// How much the prior counts: as this many of the requests in the window
/// that hold a part, at the part's average share in them. Small beside a
/// window of requests, large enough that a part seen in one request does
/// not take all of that request's error.
const RIDGE: f64 = 0.25;

/// The least average share for the prior's weight on a part: a part that
/// is a sliver of every request holding it is otherwise free to take any
/// value.
const MIN_RIDGE_SHARE: f64 = 0.01;

/// The weight that holds a coefficient at a value (the framing at the
/// prior, a coefficient found out of its bounds at the bound) while the
/// others are solved.
const HOLD: f64 = 1e6;

/// The share of a request its media must have (as predicted) for its
/// margin to be the media's, not its text's kind.
const MEDIA_CLASS_SHARE: f64 = 0.1;

/// The share of what the server charged a request that what its text
/// leaves must reach for the rest to be a sample of its media's cost: under
/// it, the text's own error would pass for the media's.
const MEDIA_SAMPLE_SHARE: f64 = 0.1;

/// The share of what the server charged a request under which media not
/// yet learned let it still teach the text: their error is then within the
/// text's own.
const MEDIA_UNKNOWN_SHARE: f64 = 0.05;

/// The classes whose errors size the margin apart: each kind of content,
/// then requests with media, then requests with tools.
const CLASSES: usize = ContentKind::ALL.len() + 2;
const MEDIA_CLASS: usize = ContentKind::ALL.len();
const TOOLS_CLASS: usize = ContentKind::ALL.len() + 1;

/// An estimate's tokens split into the parts that calibrate apart.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Split {
    pub(crate) x: [f64; PARTS],
}

impl Split {
    /// The split of an estimate: its text's tokens per group, its framing,
    /// its tool-use overhead, and what the media formula gave its `items`
    /// images and pages.
    pub(crate) fn new(
        groups: [f64; GROUPS],
        framing: f64,
        overhead: u64,
        media: u64,
        items: u64,
    ) -> Self {
        let mut x = [0.0; PARTS];
        if let Some(head) = x.get_mut(..GROUPS) {
            head.copy_from_slice(&groups);
        }
        x[FRAMING] = framing.max(0.0);
        x[OVERHEAD] = overhead as f64;
        x[MEDIA] = media as f64;
        x[ITEMS] = items as f64;
        Split { x }
    }

    /// The text's tokens (its groups and the framing), as estimated.
    pub(crate) fn text(&self) -> f64 {
        self.x.get(..=FRAMING).map_or(0.0, |t| t.iter().sum())
    }

    /// The media formula's tokens.
    pub(crate) fn media(&self) -> f64 {
        self.x[MEDIA]
    }

    /// The tool-use overhead, as estimated.
    pub(crate) fn overhead(&self) -> f64 {
        self.x[OVERHEAD]
    }

    /// The whole estimate: text, overhead and media.
    pub(crate) fn total(&self) -> f64 {
        self.text() + self.overhead() + self.media()
    }

    /// The coefficients of the fitted parts with which the prior predicts
    /// the estimate itself, the text at `ratio`.
    pub(crate) fn prior(ratio: f64) -> [f64; FIT] {
        let mut w = [ratio; FIT];
        w[OVERHEAD] = 1.0;
        w
    }

    /// The fitted parts' prediction with coefficients `w`.
    fn fitted(&self, w: &[f64; FIT]) -> f64 {
        self.x.iter().zip(w.iter()).map(|(x, w)| x * w).sum()
    }
}

/// One request of the window: its fitted parts and its media over what the
/// server charged, and the class whose margin its error sizes. What its
/// fitted parts had to account for (1 less its media's share) is worked out
/// at each refit, from what media are known to cost by then.
#[derive(Debug, Clone, Copy)]
struct Row {
    /// The non-zero fitted parts over what the server charged, packed: the
    /// first `parts` entries, at the parts `index` names.
    value: [f64; FIT],
    /// The part of each entry of `value`, ascending.
    index: [u8; FIT],
    parts: u8,
    /// The media formula's tokens and the items over what the server charged.
    media: (f64, f64),
    class: usize,
}

/// The normal equations of the least squares over a set of rows, as sums
/// that a row is added to and taken from: the lower triangle of `Σ z zᵀ`,
/// `Σ z · target`, and per part the sum of its squared shares and the rows
/// holding it.
#[derive(Debug, Clone, Copy)]
struct Normal {
    m: [[f64; FIT]; FIT],
    v: [f64; FIT],
    held: [(f64, u32); FIT],
}

impl Normal {
    const EMPTY: Normal = Normal {
        m: [[0.0; FIT]; FIT],
        v: [0.0; FIT],
        held: [(0.0, 0); FIT],
    };

    /// Adds `r` with `target`.
    fn add(&mut self, r: &Row, target: f64) {
        self.update::<true>(r, target);
    }

    /// Takes away `r`, added with `target`.
    fn take(&mut self, r: &Row, target: f64) {
        self.update::<false>(r, target);
    }

    /// Adds (`ADD`) or takes away `r`: each product added or subtracted as
    /// it is, so that what is taken away is exactly what was added.
    #[inline]
    fn update<const ADD: bool>(&mut self, r: &Row, target: f64) {
        let (value, index) = r.entries();
        for (a, (&zi, &i)) in value.iter().zip(index).enumerate() {
            let i = usize::from(i);
            let (Some(m), Some(v), Some(held)) =
                (self.m.get_mut(i), self.v.get_mut(i), self.held.get_mut(i))
            else {
                continue;
            };
            if ADD {
                held.0 += zi * zi;
                held.1 += 1;
                *v += zi * target;
            } else {
                held.0 -= zi * zi;
                held.1 = held.1.saturating_sub(1);
                *v -= zi * target;
            }
            // The indices ascend: the lower triangle.
            for (&zj, &j) in value.iter().zip(index).take(a + 1) {
                if let Some(m) = m.get_mut(usize::from(j)) {
                    if ADD {
                        *m += zi * zj;
                    } else {
                        *m -= zi * zj;
                    }
                }
            }
        }
    }
}

/// The fit of one model: the window of requests, the coefficients, the
/// media's windows and the margins last worked out from them.
#[derive(Debug, Clone)]
pub(crate) struct PartsFit {
    rows: Vec<Row>,
    next: usize,
    cap: usize,
    w: [f64; FIT],
    /// What the server charged for media over what the formula gave.
    media_ratio: SlidingQuantile,
    /// What the server charged per image or document page.
    media_item: SlidingQuantile,
    /// The factor (1 + centre + margin) per class with enough requests.
    class_factor: [Option<f64>; CLASSES],
    /// The same over the whole window.
    factor: f64,
    /// Scratch for the leave-one-out errors: (class, actual / predicted − 1).
    errors: Vec<(usize, f64)>,
    /// Requests added since the last refit.
    since_refit: usize,
    /// Requests added since the margins were last worked out.
    since_margins: usize,
    /// The normal equations of the rows without media (whose target is
    /// always 1), kept as each request comes and goes: a refit adds only
    /// the rows with media, whose targets change as media are learned.
    sums: Normal,
    /// The rows with media in the window.
    media_rows: usize,
    /// Requests added since `sums` was last summed afresh: once per window,
    /// so that rounding in what is added and taken away never builds up.
    since_sum: usize,
}

impl PartsFit {
    /// An empty fit over the last `cap` requests (at least one).
    pub(crate) fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        PartsFit {
            rows: Vec::new(),
            next: 0,
            cap,
            w: Split::prior(1.0),
            media_ratio: SlidingQuantile::new(cap),
            media_item: SlidingQuantile::new(cap),
            class_factor: [None; CLASSES],
            factor: 1.0,
            errors: Vec::new(),
            since_refit: 0,
            since_margins: 0,
            sums: Normal::EMPTY,
            media_rows: 0,
            since_sum: 0,
        }
    }

    /// The requests in the window.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The class whose errors size the margin of a request of `kind`
    /// estimated as `split`, whose media are predicted at `media` of a
    /// whole `whole`.
    fn class(split: &Split, kind: ContentKind, media: f64, whole: f64) -> usize {
        if media > 0.0 && media >= MEDIA_CLASS_SHARE * whole {
            MEDIA_CLASS
        } else if split.overhead() > 0.0 {
            TOOLS_CLASS
        } else {
            kind as usize
        }
    }

    /// What the media of `split` cost: by the formula before any sample;
    /// with fewer than `min_samples`, the larger of the formula and the
    /// cost per item seen (the two rules cannot be told apart yet, and the
    /// documented formula stays the least); then by whichever learned rule
    /// (a ratio to the formula, or tokens per item) scatters less.
    #[inline]
    fn media_cost(&self, formula: f64, items: f64, config: &CalibrationConfig) -> f64 {
        if formula <= 0.0 && items <= 0.0 {
            return 0.0;
        }
        self.learned_media_cost(formula, items, config)
    }

    /// [`media_cost`](Self::media_cost) of a request that has media.
    fn learned_media_cost(&self, formula: f64, items: f64, config: &CalibrationConfig) -> f64 {
        let seen = self.media_item.len().max(self.media_ratio.len());
        let per_item = self.media_item.quantile(0.5).map(|t| items * t.max(0.0));
        let by_ratio = self
            .media_ratio
            .quantile(0.5)
            .map(|r| formula * r.clamp(config.min_factor, config.max_factor));
        if seen == 0 {
            return formula;
        }
        if seen < config.min_samples {
            return match (per_item, by_ratio) {
                (Some(i), _) if items > 0.0 => formula.max(i),
                (_, Some(r)) => r,
                _ => formula,
            };
        }
        match (per_item, by_ratio) {
            (Some(i), Some(r)) if items > 0.0 => {
                if scatter(&self.media_item) < scatter(&self.media_ratio) {
                    i
                } else {
                    r
                }
            }
            (_, Some(r)) => r,
            (Some(i), None) if items > 0.0 => i,
            _ => formula,
        }
    }

    /// The calibrated tokens of a request estimated as `split`, of `kind`,
    /// with the margin; `None` before `min_samples` requests.
    pub(crate) fn predict(
        &self,
        split: &Split,
        kind: ContentKind,
        config: &CalibrationConfig,
    ) -> Option<f64> {
        if self.rows.len() < config.min_samples {
            return None;
        }
        let text = split.fitted(&self.w).max(0.0);
        let media = self.media_cost(split.media(), split.x[ITEMS], config);
        let class = Self::class(split, kind, media, text + media);
        let factor = self
            .class_factor
            .get(class)
            .copied()
            .flatten()
            .unwrap_or(self.factor);
        Some((text + media) * factor)
    }

    /// Adds a request estimated as `split` that the server charged `actual`
    /// tokens for, and refits toward the `prior` coefficients. Returns false
    /// (and changes nothing) when either carries no information (a zero or
    /// non-finite figure).
    #[cfg(test)]
    pub(crate) fn push(
        &mut self,
        split: &Split,
        kind: ContentKind,
        actual: f64,
        prior: &[f64; FIT],
        config: &CalibrationConfig,
    ) -> bool {
        self.push_with(split, kind, actual, || *prior, config)
    }

    /// [`push`](Self::push), with the prior coefficients worked out by
    /// `prior` when a refit is due (not at every request).
    pub(crate) fn push_with(
        &mut self,
        split: &Split,
        kind: ContentKind,
        actual: f64,
        prior: impl FnOnce() -> [f64; FIT],
        config: &CalibrationConfig,
    ) -> bool {
        let total = split.total();
        if !(actual.is_finite() && actual > 0.0 && total.is_finite() && total > 0.0) {
            return false;
        }
        let media = self.media_cost(split.media(), split.x[ITEMS], config);
        let fitted = split.fitted(&self.w).max(0.0);
        // What the text leaves, as the fit predicts it now, is a sample of
        // the media when it is a large enough part of the whole.
        let rest = actual - fitted;
        if media > 0.0 && rest >= MEDIA_SAMPLE_SHARE * actual {
            if split.media() > 0.0 {
                self.media_ratio.push(rest / split.media());
            }
            if split.x[ITEMS] > 0.0 {
                self.media_item.push(rest / split.x[ITEMS]);
            }
        }
        let mut value = [0.0; FIT];
        let mut index = [0u8; FIT];
        let mut parts = 0u8;
        for (i, x) in (0u8..).zip(split.x.iter().take(FIT)) {
            let z = x / actual;
            if z != 0.0 {
                let k = usize::from(parts);
                if let (Some(v), Some(j)) = (value.get_mut(k), index.get_mut(k)) {
                    *v = z;
                    *j = i;
                }
                parts += 1;
            }
        }
        let row = Row {
            value,
            index,
            parts,
            media: (split.media() / actual, split.x[ITEMS] / actual),
            class: Self::class(split, kind, media, fitted + media),
        };
        // The new row is counted, then the one it evicts is taken away
        // where it lies and overwritten (not moved out and in).
        self.count(&row, 1.0);
        if self.rows.len() < self.cap {
            self.rows.push(row);
        } else if let Some(&old) = self.rows.get(self.next) {
            self.count(&old, -1.0);
            if let Some(slot) = self.rows.get_mut(self.next) {
                *slot = row;
            }
        }
        self.since_sum += 1;
        if self.since_sum >= self.cap {
            self.sum_afresh();
        }
        // The next slot, wrapping (`next` is below `cap`: no division).
        self.next = if self.next + 1 >= self.cap {
            0
        } else {
            self.next + 1
        };
        // Refit after each eighth of the window has changed (after every
        // request while it holds fewer than 16): one request moves a fit
        // over many little, and a refit costs a pass over the window.
        self.since_refit += 1;
        self.since_margins += 1;
        if self.since_refit >= (self.rows.len() / 8).max(1) {
            self.since_refit = 0;
            self.refit(&prior(), config);
        }
        true
    }

    /// Whether the media have taught enough for their cost to be used in
    /// place of the formula's.
    fn media_known(&self, config: &CalibrationConfig) -> bool {
        self.media_item.len().max(self.media_ratio.len()) >= config.min_samples
    }

    /// Adds a row of the window to the sums (`sign` 1) or takes it away
    /// (`sign` −1): a row without media to the normal equations, one with
    /// media to their count.
    fn count(&mut self, r: &Row, sign: f64) {
        if r.media == (0.0, 0.0) {
            if sign > 0.0 {
                self.sums.add(r, 1.0);
            } else {
                self.sums.take(r, 1.0);
            }
        } else if sign > 0.0 {
            self.media_rows += 1;
        } else {
            self.media_rows = self.media_rows.saturating_sub(1);
        }
    }

    /// Sums the rows without media afresh.
    fn sum_afresh(&mut self) {
        self.since_sum = 0;
        self.sums = Normal::EMPTY;
        for r in &self.rows {
            if r.media == (0.0, 0.0) {
                self.sums.add(r, 1.0);
            }
        }
    }

    /// What the fitted parts of a row had to account for: 1 less its media's
    /// share at what they are now known to cost; `None` (the row stays out
    /// of the solve) while media not yet `known` are 5 % of it or more.
    fn target(&self, r: &Row, known: bool, config: &CalibrationConfig) -> Option<f64> {
        if r.media == (0.0, 0.0) {
            return Some(1.0);
        }
        let media = self.media_cost(r.media.0, r.media.1, config);
        (media == 0.0 || known || media < MEDIA_UNKNOWN_SHARE).then_some(1.0 - media)
    }

    /// Solves the ridge least squares over the window, then works out the
    /// margins from the leave-one-out errors.
    // Matrix code reads best with indices.
    #[allow(clippy::needless_range_loop)]
    fn refit(&mut self, prior: &[f64; FIT], config: &CalibrationConfig) {
        let known = self.media_known(config);
        // The rows with media join a copy of the kept sums at their targets
        // of now; without them the kept sums are read where they are.
        let mut with_media = None;
        if self.media_rows > 0 {
            let mut normal = self.sums;
            for r in &self.rows {
                if r.media == (0.0, 0.0) {
                    continue;
                }
                if let Some(target) = self.target(r, known, config) {
                    normal.add(r, target);
                }
            }
            with_media = Some(normal);
        }
        let Normal { m, v, held } = with_media.as_ref().unwrap_or(&self.sums);
        // The parts some row in the solve holds, solved together; the
        // others' rows and columns are only their ridge.
        let mut part = [0usize; FIT];
        let mut k = 0;
        for (i, (_, n)) in held.iter().enumerate() {
            if *n > 0 {
                part[k] = i;
                k += 1;
            }
        }
        let part = &part[..k];
        // The diagonal with the ridge, and the right-hand side with the
        // prior (the rest of `m` is read as it is).
        let mut diag = [0.0f64; FIT];
        let mut v = *v;
        for i in 0..FIT {
            let (sum, n) = held[i];
            let share = if n > 0 { sum / f64::from(n) } else { 1.0 };
            // The framing is held at the text's prior ratio: a constant per
            // message, it cannot be told from the tool-use overhead (a
            // constant per request) in requests with tools.
            let ridge = if i == FRAMING {
                HOLD
            } else {
                RIDGE * share.max(MIN_RIDGE_SHARE)
            };
            diag[i] = m[i][i];
            diag[i] += ridge;
            v[i] += ridge * prior[i];
        }
        let mut l = [[0.0f64; FIT]; FIT];
        let (w, factored) = solve_within_bounds(m, &mut diag, &mut v, part, &mut l, config);
        if let Some(w) = w {
            self.w = w;
        }
        if factored {
            self.margins_due(&l, part, known, config);
        }
    }

    /// [`margins`](Self::margins) once a quarter of the window has changed
    /// since they were last worked out (after every request while it holds
    /// fewer than 8): a pass over the window, whose quantiles a few
    /// requests move little, at every other refit of a full window.
    fn margins_due(
        &mut self,
        l: &[[f64; FIT]; FIT],
        part: &[usize],
        known: bool,
        config: &CalibrationConfig,
    ) {
        if self.since_margins >= (self.rows.len() / 4).max(1) {
            self.since_margins = 0;
            self.margins(l, part, known, config);
        }
    }

    /// The factors per class and over the window from each request's
    /// leave-one-out error (its plain error for a request not in the solve).
    // Matrix code reads best with indices.
    #[allow(clippy::needless_range_loop)]
    fn margins(
        &mut self,
        l: &[[f64; FIT]; FIT],
        part: &[usize],
        known: bool,
        config: &CalibrationConfig,
    ) {
        // `M⁻¹` between the parts solved together (the leverage of a row in
        // the solve needs no other entry).
        let reduced = inverse(l, part.len());
        let mut inverse = [[0.0f64; FIT]; FIT];
        for (a, &i) in part.iter().enumerate() {
            for (b, &j) in part.iter().enumerate() {
                inverse[i][j] = reduced[a][b];
            }
        }
        self.errors.clear();
        // The requests per class, counted as their errors are.
        let mut count = [0usize; CLASSES];
        for r in &self.rows {
            let (fitted, h) = fitted_and_leverage(r, &self.w, &inverse);
            // Relative residual (actual − predicted) / actual, then left
            // out: divided by 1 − leverage, `z' M⁻¹ z`.
            let (target, h) = match self.target(r, known, config) {
                Some(t) => (t, h),
                None => (1.0 - self.media_cost(r.media.0, r.media.1, config), 0.0),
            };
            let residual = target - fitted;
            let loo = if h < 1.0 {
                residual / (1.0 - h)
            } else {
                residual
            };
            // As actual / predicted − 1, the factor's own terms.
            if loo < 1.0 {
                let class = r.class.min(CLASSES - 1);
                count[class] += 1;
                self.errors.push((class, loo / (1.0 - loo)));
            }
        }
        self.errors.sort_unstable_by(|a, b| a.1.total_cmp(&b.1));
        // The median and the quantile of each class, and of all, in one
        // pass over the sorted errors (nearest rank).
        let rank = |q: f64, n: usize| ((q * n as f64).ceil() as usize).clamp(1, n.max(1));
        // Ranks only for the classes with enough requests for a factor of
        // their own (a rank of 0 is never reached).
        let min = config.min_samples.max(1);
        let mut ranks = [(0usize, 0usize); CLASSES];
        for (r, &n) in ranks.iter_mut().zip(&count) {
            if n >= min {
                *r = (rank(0.5, n), rank(config.quantile, n));
            }
        }
        let n = self.errors.len();
        let all_ranks = (rank(0.5, n), rank(config.quantile, n));
        let mut seen = [0usize; CLASSES];
        let mut median = [0.0f64; CLASSES];
        let mut high = [0.0f64; CLASSES];
        let (mut all_median, mut all_high) = (0.0, 0.0);
        for (k, &(c, e)) in self.errors.iter().enumerate() {
            if k + 1 == all_ranks.0 {
                all_median = e;
            }
            if k + 1 == all_ranks.1 {
                all_high = e;
            }
            let c = c.min(CLASSES - 1);
            seen[c] += 1;
            if seen[c] == ranks[c].0 {
                median[c] = e;
            }
            if seen[c] == ranks[c].1 {
                high[c] = e;
            }
        }
        let factor = |median: f64, high: f64| {
            let f = 1.0 + median + config.spread_weight * (high - median).max(0.0);
            f.clamp(config.min_factor, config.max_factor)
        };
        self.factor = if n >= min {
            factor(all_median, all_high)
        } else {
            1.0
        };
        for c in 0..CLASSES {
            self.class_factor[c] = (count[c] >= min).then(|| factor(median[c], high[c]));
        }
    }
}

impl Row {
    /// Its non-zero parts' values and indices.
    fn entries(&self) -> (&[f64], &[u8]) {
        let n = usize::from(self.parts);
        (
            self.value.get(..n).unwrap_or(&self.value),
            self.index.get(..n).unwrap_or(&self.index),
        )
    }
}

/// A row's fitted parts' prediction with coefficients `w` (over what the
/// server charged), and its leverage `zᵀ M⁻¹ z` from the entries of `M⁻¹`
/// between its parts (symmetric: the diagonal once, each pair below it
/// twice), in one pass over its parts.
// Matrix code reads best with indices.
#[allow(clippy::needless_range_loop)]
fn fitted_and_leverage(r: &Row, w: &[f64; FIT], inverse: &[[f64; FIT]; FIT]) -> (f64, f64) {
    let n = usize::from(r.parts).min(FIT);
    let (value, index) = (&r.value[..n], &r.index[..n]);
    let (mut fitted, mut h) = (0.0, 0.0);
    for a in 0..n {
        let i = usize::from(index[a]);
        let zi = value[a];
        fitted += zi * w[i];
        let row = &inverse[i];
        let mut below = 0.0;
        for b in 0..a {
            below += row[usize::from(index[b])] * value[b];
        }
        h += zi * (row[i] * zi + 2.0 * below);
    }
    (fitted, h)
}

/// `M⁻¹` from the Cholesky factor `L` of `M`, both `k × k` (the top-left
/// corner of the arrays): `L⁻¹` (lower triangular), then `M⁻¹ = L⁻ᵀ L⁻¹`,
/// each entry a sum over the rows below both.
#[allow(clippy::needless_range_loop)]
fn inverse(l: &[[f64; FIT]; FIT], k: usize) -> [[f64; FIT]; FIT] {
    let k = k.min(FIT);
    let mut li = [[0.0f64; FIT]; FIT];
    for j in 0..k {
        li[j][j] = 1.0 / l[j][j];
        for i in j + 1..k {
            let mut s = 0.0;
            for t in j..i {
                s -= l[i][t] * li[t][j];
            }
            li[i][j] = s / l[i][i];
        }
    }
    let mut out = [[0.0f64; FIT]; FIT];
    for i in 0..k {
        for j in 0..=i {
            let mut s = 0.0;
            for t in i..k {
                s += li[t][i] * li[t][j];
            }
            out[i][j] = s;
            out[j][i] = s;
        }
    }
    out
}

/// The coefficients of the system `m` (its lower triangle below the
/// diagonal `diag`) with right-hand side `v`, each within its bounds: a
/// coefficient out of them is held at the bound (its diagonal and `v`
/// weighed toward it) and the others solved again, twice at most. Returns
/// the coefficients to keep (`None`: keep the old ones), and whether `l`
/// holds the Cholesky factor of the system last solved (see [`solve`]),
/// which sizes the margins.
fn solve_within_bounds(
    m: &[[f64; FIT]; FIT],
    diag: &mut [f64; FIT],
    v: &mut [f64; FIT],
    part: &[usize],
    l: &mut [[f64; FIT]; FIT],
    config: &CalibrationConfig,
) -> (Option<[f64; FIT]>, bool) {
    let mut kept = None;
    for _ in 0..2 {
        let Some(w) = solve(m, diag, v, part, l) else {
            return (kept, false);
        };
        if w.iter().any(|x| !x.is_finite()) {
            return (kept, false);
        }
        let bounded = clamp(w, config);
        if bounded == w {
            return (Some(w), true);
        }
        for (i, (&b, &w)) in bounded.iter().zip(&w).enumerate() {
            if b != w {
                diag[i] += HOLD;
                v[i] += HOLD * b;
            }
        }
        kept = Some(bounded);
    }
    let factored = solve(m, diag, v, part, l).is_some();
    (kept, factored)
}

/// Solves `M w = v` (`M` given by its lower triangle below the diagonal
/// `diag`) where only the parts listed in `part` (ascending) are coupled:
/// every other part's row and column of `M` is its diagonal alone, so it
/// solves alone. Returns the solution, and leaves in `l` the Cholesky
/// factor of `M` between the listed parts (their `k × k` corner, in the
/// order of `part`; the system is copied there and factored in place, not
/// returned: a refit solves up to three times); `None` when that is not
/// positive definite.
#[allow(clippy::needless_range_loop)]
fn solve(
    m: &[[f64; FIT]; FIT],
    diag: &[f64; FIT],
    v: &[f64; FIT],
    part: &[usize],
    l: &mut [[f64; FIT]; FIT],
) -> Option<[f64; FIT]> {
    let k = part.len().min(FIT);
    let mut sub_v = [0.0f64; FIT];
    for a in 0..k {
        sub_v[a] = v[part[a]];
        for b in 0..a {
            l[a][b] = m[part[a]][part[b]];
        }
        l[a][a] = diag[part[a]];
    }
    cholesky_in_place(l, k)?;
    let x = back_substitute(l, &forward_substitute(l, &sub_v, k), k);
    let mut w = [0.0f64; FIT];
    for i in 0..FIT {
        w[i] = v[i] / diag[i];
    }
    for a in 0..k {
        w[part[a]] = x[a];
    }
    Some(w)
}

/// How widely a window's samples scatter around their median (p90 − p10
/// over the median); infinite when it cannot tell.
fn scatter(w: &SlidingQuantile) -> f64 {
    match (w.quantile(0.1), w.quantile(0.5), w.quantile(0.9)) {
        (Some(lo), Some(m), Some(hi)) if m > 0.0 => (hi - lo) / m,
        _ => f64::INFINITY,
    }
}

/// The coefficients within their bounds: the text's and the framing's
/// ratios within the calibration's factors, the overhead's never negative.
fn clamp(mut w: [f64; FIT], config: &CalibrationConfig) -> [f64; FIT] {
    for (i, x) in w.iter_mut().enumerate() {
        *x = match i {
            OVERHEAD => x.clamp(0.0, config.max_factor),
            _ => x.clamp(config.min_factor, config.max_factor),
        };
    }
    w
}

/// The lower Cholesky factor of the symmetric `k × k` matrix (the top-left
/// corner of `m`) whose lower triangle is `m`; `None` when it is not positive definite (it always is with a
/// ridge, unless the figures overflowed).
#[cfg(test)]
fn cholesky(m: &[[f64; FIT]; FIT], k: usize) -> Option<[[f64; FIT]; FIT]> {
    let mut l = *m;
    cholesky_in_place(&mut l, k)?;
    Some(l)
}

/// [`cholesky`] of the matrix whose lower triangle is the lower triangle
/// of `l`'s `k × k` corner, written over it (each entry is read before it
/// is written; the rest, which nothing reads, is left as it was).
// Matrix code reads best with indices.
#[allow(clippy::needless_range_loop)]
fn cholesky_in_place(l: &mut [[f64; FIT]; FIT], k: usize) -> Option<()> {
    let n = k.min(FIT);
    for j in 0..n {
        let mut d = l[j][j];
        for t in 0..j {
            d -= l[j][t] * l[j][t];
        }
        if !(d.is_finite() && d > 0.0) {
            return None;
        }
        let d = d.sqrt();
        l[j][j] = d;
        for i in j + 1..n {
            let mut s = l[i][j];
            for t in 0..j {
                s -= l[i][t] * l[j][t];
            }
            l[i][j] = s / d;
        }
    }
    Some(())
}

/// `L⁻¹ v` for a lower-triangular `k × k` `L`.
#[allow(clippy::needless_range_loop)]
fn forward_substitute(l: &[[f64; FIT]; FIT], v: &[f64; FIT], k: usize) -> [f64; FIT] {
    let mut y = [0.0f64; FIT];
    for i in 0..k.min(FIT) {
        let mut s = v[i];
        for k in 0..i {
            s -= l[i][k] * y[k];
        }
        y[i] = s / l[i][i];
    }
    y
}

/// `L⁻ᵀ y` for a lower-triangular `k × k` `L`.
#[allow(clippy::needless_range_loop)]
fn back_substitute(l: &[[f64; FIT]; FIT], y: &[f64; FIT], k: usize) -> [f64; FIT] {
    let n = k.min(FIT);
    let mut x = [0.0f64; FIT];
    for i in (0..n).rev() {
        let mut s = y[i];
        for t in i + 1..n {
            s -= l[t][i] * x[t];
        }
        x[i] = s / l[i][i];
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classes index arrays by a kind's discriminant.
    #[test]
    fn kinds_are_listed_in_discriminant_order() {
        for (i, k) in ContentKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        assert!(MEDIA_CLASS >= ContentKind::ALL.len() && TOOLS_CLASS < CLASSES);
    }

    /// The inverse from the Cholesky factor is the inverse: `M · M⁻¹ = I`
    /// for a dense symmetric positive definite `M`.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn inverse_inverts() {
        let mut m = [[0.0f64; FIT]; FIT];
        for i in 0..FIT {
            for j in 0..FIT {
                m[i][j] = 1.0 / (1.0 + i as f64 + j as f64);
            }
            m[i][i] += 1.0;
        }
        let Some(l) = cholesky(&m, FIT) else {
            panic!("positive definite");
        };
        let inv = inverse(&l, FIT);
        for i in 0..FIT {
            for j in 0..FIT {
                let p: f64 = (0..FIT).map(|k| m[i][k] * inv[k][j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((p - want).abs() < 1e-9, "({i}, {j}): {p}");
            }
        }
    }

    /// Solving only the parts some row holds gives the solution and the
    /// inverse of the whole system, when the others' rows and columns are
    /// their diagonal alone.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn solving_the_coupled_parts_alone_solves_the_whole_system() {
        let part = [0, 3, FRAMING, OVERHEAD];
        let mut m = [[0.0f64; FIT]; FIT];
        let mut v = [0.0f64; FIT];
        for i in 0..FIT {
            m[i][i] = 0.25 + i as f64;
            v[i] = 1.0 + 0.1 * i as f64;
        }
        for &i in &part {
            for &j in &part {
                if j < i {
                    m[i][j] = 1.0 / (2.0 + i as f64 + j as f64);
                }
            }
            m[i][i] += 1.0;
        }
        // The whole system, symmetric, by Cholesky over all the parts.
        let Some(l) = cholesky(&m, FIT) else {
            panic!("positive definite");
        };
        let whole = back_substitute(&l, &forward_substitute(&l, &v, FIT), FIT);
        let whole_inverse = inverse(&l, FIT);
        let mut l_part = [[0.0f64; FIT]; FIT];
        let diag: [f64; FIT] = std::array::from_fn(|i| m[i][i]);
        let Some(w) = solve(&m, &diag, &v, &part, &mut l_part) else {
            panic!("positive definite");
        };
        for i in 0..FIT {
            assert!(
                (w[i] - whole[i]).abs() < 1e-12,
                "w[{i}]: {} vs {}",
                w[i],
                whole[i]
            );
        }
        let reduced = inverse(&l_part, part.len());
        for (a, &i) in part.iter().enumerate() {
            for (b, &j) in part.iter().enumerate() {
                let (x, y) = (reduced[a][b], whole_inverse[i][j]);
                assert!((x - y).abs() < 1e-12, "({i}, {j}): {x} vs {y}");
            }
        }
    }

    /// A small deterministic generator for the tests below.
    fn next(state: &mut u64) -> f64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The sums kept as requests come and go are those of the rows without
    /// media in the window, and the count of rows with media is theirs,
    /// after the window has turned over many times.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn kept_sums_are_the_window_s_sums() {
        let config = CalibrationConfig::default();
        let prior = Split::prior(1.0);
        let mut fit = PartsFit::new(16);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..500 {
            let mut groups = [0.0; GROUPS];
            for _ in 0..3 {
                let g = (next(&mut state) * GROUPS as f64) as usize % GROUPS;
                groups[g] += (next(&mut state) * 2_000.0).floor();
            }
            let tools = next(&mut state) < 0.3;
            let media = next(&mut state) < 0.2;
            let split = Split::new(
                groups,
                4.0 + (step % 7) as f64,
                if tools { 350 } else { 0 },
                if media { 1_200 } else { 0 },
                u64::from(media),
            );
            let actual = (split.total() * (0.8 + 0.4 * next(&mut state))).round();
            assert!(fit.push(&split, ContentKind::Prose, actual, &prior, &config));
            let mut fresh = Normal::EMPTY;
            let mut media_rows = 0;
            for r in &fit.rows {
                if r.media == (0.0, 0.0) {
                    fresh.add(r, 1.0);
                } else {
                    media_rows += 1;
                }
            }
            assert_eq!(fit.media_rows, media_rows, "step {step}");
            for i in 0..FIT {
                assert_eq!(fit.sums.held[i].1, fresh.held[i].1, "step {step}");
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
                assert!(close(fit.sums.held[i].0, fresh.held[i].0), "step {step}");
                assert!(close(fit.sums.v[i], fresh.v[i]), "step {step}");
                for j in 0..=i {
                    assert!(close(fit.sums.m[i][j], fresh.m[i][j]), "step {step}");
                }
            }
        }
    }

    /// The margin follows the window: requests that the fit predicts less
    /// closely (as often over as under) widen it once they are a quarter of
    /// the window, at the next refit (at most an eighth later).
    #[test]
    fn the_margin_follows_the_window_within_a_quarter_and_an_eighth_of_it() {
        let config = CalibrationConfig::default();
        let prior = Split::prior(1.0);
        let mut fit = PartsFit::new(config.window);
        let split = |step: usize| {
            let mut groups = [0.0; GROUPS];
            groups[0] = 1_000.0 + 100.0 * (step % 5) as f64;
            Split::new(groups, 10.0, 0, 0, 0)
        };
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for step in 0..200 {
            let s = split(step);
            let actual = (s.total() * (1.0 + 0.002 * next(&mut state))).round();
            assert!(fit.push(&s, ContentKind::Prose, actual, &prior, &config));
        }
        let prose = ContentKind::Prose as usize;
        let calm = fit.class_factor[prose].expect("a factor for prose");
        for step in 0..config.window / 4 + config.window / 8 {
            let s = split(step);
            let actual = (s.total() * (0.7 + 0.6 * next(&mut state))).round();
            assert!(fit.push(&s, ContentKind::Prose, actual, &prior, &config));
        }
        let noisy = fit.class_factor[prose].expect("a factor for prose");
        assert!(noisy > calm + 0.02, "{calm} -> {noisy}");
    }
}
