//! The figures of a run: one row per strategy, printed as a table or as JSON.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use super::run::{Attempt, Outcome};
use super::workload::Workload;

/// The limits a run was measured against: per dimension, the rate per minute
/// and the bucket's capacity (the burst it allows from full).
#[derive(Debug, Clone, Copy)]
pub struct LimitSpec {
    pub requests_per_minute: u64,
    pub input_tokens_per_minute: u64,
    pub output_tokens_per_minute: u64,
    pub requests_capacity: f64,
    pub input_capacity: f64,
    pub output_capacity: f64,
    /// "realtime" or "reserve".
    pub output_mode: &'static str,
}

/// What the server charged during one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Charged {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The output tokens the OTPM term of the bound may count: all of them
    /// when output is reserved at admission; in realtime mode only those
    /// produced before the last second in which a request was admitted (the
    /// emulator admits while the OTPM bucket is above zero and lets answers
    /// in flight overdraw it, so output produced after the last admission
    /// never delayed anything).
    pub output_for_bound: u64,
    /// Where the figures come from: the emulator's own counters, or the
    /// usage the responses reported (a real endpoint).
    pub from_server_stats: bool,
}

impl Charged {
    /// Per dimension (requests, input, output), the seconds of refill needed
    /// for what was charged beyond the bucket's initial capacity (negative
    /// when it fit in the burst); `f64::MIN` for a dimension without a limit.
    fn beyond_burst(&self, l: &LimitSpec) -> [f64; 3] {
        let term = |charged: u64, cap: f64, per_minute: u64| {
            if per_minute == 0 {
                f64::MIN
            } else {
                (charged as f64 - cap) / (per_minute as f64 / 60.0)
            }
        };
        [
            term(self.requests, l.requests_capacity, l.requests_per_minute),
            term(
                self.input_tokens,
                l.input_capacity,
                l.input_tokens_per_minute,
            ),
            term(
                self.output_for_bound,
                l.output_capacity,
                l.output_tokens_per_minute,
            ),
        ]
    }

    /// The limit-bound lower bound on the time to finish: for each dimension,
    /// what was charged beyond the initial capacity divided by the refill
    /// rate; the largest of the three (see `output_for_bound` for OTPM).
    pub fn minimum_seconds(&self, l: &LimitSpec) -> f64 {
        self.beyond_burst(l)
            .into_iter()
            .fold(0.0, |longest, t| longest.max(t))
    }

    /// Which dimension sets the bound.
    pub fn binding(&self, l: &LimitSpec) -> &'static str {
        let [req, inp, out] = self.beyond_burst(l);
        if inp >= req && inp >= out {
            "input tokens"
        } else if out >= req {
            "output tokens"
        } else {
            "requests"
        }
    }
}

/// One strategy's figures.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    pub attempts: usize,
    /// 429 responses received (every attempt counted).
    pub rate_limited: usize,
    /// Attempts beyond the first of each request that was sent at all.
    pub retries: usize,
    /// Other non-200 responses and transport errors received.
    pub other_errors: usize,
    pub seconds: f64,
    /// When the last attempt was sent (the last admission, for a server
    /// that answers at once).
    pub last_sent: f64,
    pub minimum_seconds: f64,
    pub binding: &'static str,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Mean absolute error of the strategy's input-token estimates against
    /// what the server charged; None for strategies that do not estimate.
    pub estimate_mae: Option<f64>,
    /// The same error relative to the mean charge (for the table).
    pub estimate_mape: Option<f64>,
    pub charged: Charged,
    pub failures: BTreeMap<String, usize>,
    pub attempts_log: Vec<Attempt>,
    /// The bound for the whole workload, the same for every strategy: see
    /// [`workload_minimum_seconds`].
    pub workload_minimum_seconds: f64,
    /// The part of the workload's bound that comes after the last
    /// admission: the least answer time of the requests that set it (0
    /// against a remote server).
    pub bound_answer_seconds: f64,
    /// Prompt-cache tokens read in this run.
    pub cache_read_tokens: u64,
    /// Prompt-cache tokens an ideal client reads on this workload (every
    /// cacheable prefix read after its first write).
    pub cache_read_possible: u64,
    /// 429s per model class.
    pub rate_limited_by_class: BTreeMap<String, usize>,
    /// The error of the strategy's input estimates against the emulator's
    /// count, per kind of content (empty for strategies that do not estimate).
    pub estimate_errors: Vec<KindError>,
}

impl Row {
    pub fn share_of_minimum(&self) -> f64 {
        if self.seconds <= 0.0 {
            0.0
        } else {
            self.minimum_seconds / self.seconds
        }
    }

    /// The workload's bound over the time taken: 1.0 is the best any client
    /// could do. None when a request failed (the bound is for the whole
    /// workload) or the workload fits in the first burst.
    pub fn share_of_workload_minimum(&self) -> Option<f64> {
        (self.failed == 0 && self.seconds > 0.0 && self.workload_minimum_seconds > 0.0)
            .then(|| self.workload_minimum_seconds / self.seconds)
    }

    /// Cache tokens read over those an ideal client reads (None when the
    /// workload has nothing to read).
    pub fn cache_hit_rate(&self) -> Option<f64> {
        (self.cache_read_possible > 0)
            .then(|| self.cache_read_tokens as f64 / self.cache_read_possible as f64)
    }
}

/// One request of the workload as its bound sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BoundRequest {
    /// Input tokens charged to ITPM when every cacheable prefix of the
    /// workload is read from the cache after its first write.
    pub input: u64,
    /// The output tokens its answer carries (charged at admission when
    /// output is reserved).
    pub output: u64,
    /// The time the server takes to answer it, in seconds (its latency
    /// model at the pace it gives this request; 0 when unknown).
    pub answer: f64,
}

/// The bound for a whole workload and its two parts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WorkloadBound {
    /// The least time any client takes to finish the workload, in seconds
    /// (0 when the workload fits in the first burst).
    pub seconds: f64,
    /// The earliest the last of the requests that set the bound can be
    /// admitted.
    pub admissions: f64,
    /// The least answer time among those requests.
    pub answer: f64,
}

/// The limit-bound lower bound of a whole workload, whatever the client
/// and whatever the order it sends in.
///
/// For a set of requests, the limits let the last of them be admitted no
/// sooner than, for each dimension, what the set is charged beyond the
/// bucket's initial capacity over the refill rate (requests; input tokens,
/// each request charged as if every cacheable prefix were read after its
/// first write; output tokens when `reserve_output`, since in realtime mode
/// answers in flight may overdraw that bucket, so no client-independent
/// bound comes from it); and that request's answer then takes at least the
/// least answer time of the set. So for every answer time `a`, the requests
/// whose answers take at least `a` give a bound: their admission bound plus
/// `a`. This is the largest of those bounds, over every `a` the workload
/// has. With `a` the quickest answer of all it is the whole workload's
/// admission bound plus that answer; a larger `a` counts that a request
/// whose answer is long cannot go last without finishing later, so a client
/// that knew every answer's length in advance could at best send the short
/// answers last. A request charged read prices in a set that leaves out
/// its prefix's writer is charged less than it could be, which only lowers
/// the bound. A workload that fits in the first burst has no bound: 0.
pub fn workload_minimum(
    l: &LimitSpec,
    requests: &[BoundRequest],
    reserve_output: bool,
) -> WorkloadBound {
    // The admission bound of `requests` requests charged `input` input
    // tokens and `output` output tokens.
    let admission_bound = |requests: u64, input: u64, output: u64| {
        let output = if reserve_output { output } else { 0 };
        Charged {
            requests,
            input_tokens: input,
            output_tokens: output,
            output_for_bound: output,
            from_server_stats: false,
        }
        .minimum_seconds(l)
    };
    let all_input = requests.iter().map(|r| r.input).sum();
    let all_output = requests.iter().map(|r| r.output).sum();
    if requests.is_empty() || admission_bound(requests.len() as u64, all_input, all_output) <= 0.0 {
        return WorkloadBound::default();
    }
    let mut by_answer: Vec<BoundRequest> = requests.to_vec();
    by_answer.sort_by(|a, b| b.answer.max(0.0).total_cmp(&a.answer.max(0.0)));
    let mut best = WorkloadBound::default();
    // The running totals of the requests whose answers take at least the
    // current one's.
    let (mut count, mut input, mut output) = (0u64, 0u64, 0u64);
    for (i, r) in by_answer.iter().enumerate() {
        count += 1;
        input = input.saturating_add(r.input);
        output = output.saturating_add(r.output);
        // The set of every request whose answer takes at least this one's:
        // only at the last of equal answer times.
        let a = r.answer.max(0.0);
        if by_answer
            .get(i + 1)
            .is_some_and(|next| next.answer.max(0.0) >= a)
        {
            continue;
        }
        let admissions = admission_bound(count, input, output);
        if admissions + a > best.seconds {
            best = WorkloadBound {
                seconds: admissions + a,
                admissions,
                answer: a,
            };
        }
    }
    best
}

/// The error of the input estimates for one kind of content: over its
/// requests, `(estimate - count) / count`, where the count is the server's
/// for the whole prompt (the usage its answer reported: input, cache writes
/// and reads; for a request that got no answer from the emulator, the
/// emulator's count).
#[derive(Debug, Clone, Serialize)]
pub struct KindError {
    /// The kind of content, "all", or "all after 20 settled" (the requests
    /// estimated once 20 had settled: the calibrated estimates).
    pub kind: String,
    pub requests: usize,
    /// Mean of |error|.
    pub mean_abs: f64,
    /// Median of |error|.
    pub p50_abs: f64,
    /// 90th percentile of |error|.
    pub p90_abs: f64,
    /// Mean of the signed error: above 0, estimates run high.
    pub bias: f64,
}

/// Requests settled before the "after 20 settled" line counts a request.
pub const SETTLED_BEFORE_CALIBRATED: usize = 20;

/// Per kind (sorted by name), then over all, then over all after
/// [`SETTLED_BEFORE_CALIBRATED`] settled: the error figures. `samples`
/// holds (kind, requests settled before the estimate, relative error).
pub fn kind_errors(samples: &[(&'static str, usize, f64)]) -> Vec<KindError> {
    let mut by_kind: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for &(kind, _, e) in samples {
        by_kind.entry(kind).or_default().push(e);
    }
    let mut out: Vec<KindError> = by_kind
        .into_iter()
        .map(|(k, v)| error_figures(k, &v))
        .collect();
    if !samples.is_empty() {
        let all: Vec<f64> = samples.iter().map(|s| s.2).collect();
        out.push(error_figures("all", &all));
        let late: Vec<f64> = samples
            .iter()
            .filter(|s| s.1 >= SETTLED_BEFORE_CALIBRATED)
            .map(|s| s.2)
            .collect();
        if !late.is_empty() {
            out.push(error_figures("all after 20 settled", &late));
        }
    }
    out
}

fn error_figures(kind: &str, errors: &[f64]) -> KindError {
    let n = errors.len().max(1) as f64;
    let mut abs: Vec<f64> = errors.iter().map(|e| e.abs()).collect();
    abs.sort_by(f64::total_cmp);
    let rank = |q: f64| {
        let i = ((q * abs.len() as f64).ceil() as usize).clamp(1, abs.len().max(1)) - 1;
        abs.get(i).copied().unwrap_or(0.0)
    };
    KindError {
        kind: kind.to_string(),
        requests: errors.len(),
        mean_abs: abs.iter().sum::<f64>() / n,
        p50_abs: rank(0.5),
        p90_abs: rank(0.9),
        bias: errors.iter().sum::<f64>() / n,
    }
}

/// The estimate-error table of the rows that estimate.
pub fn estimate_table(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.estimate_errors.is_empty()) {
        out.push_str(&format!(
            "input estimates of {} against the server's count, (estimate - count) / count:\n",
            r.name
        ));
        out.push_str(&format!(
            "  {:<22} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            "kind", "requests", "mean", "p50", "p90", "bias"
        ));
        for k in &r.estimate_errors {
            out.push_str(&format!(
                "  {:<22} {:>8} {:>7.1}% {:>7.1}% {:>7.1}% {:>+7.1}%\n",
                k.kind,
                k.requests,
                k.mean_abs * 100.0,
                k.p50_abs * 100.0,
                k.p90_abs * 100.0,
                k.bias * 100.0
            ));
        }
    }
    out
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Builds a row from what the workers and the meter saw.
#[allow(clippy::too_many_arguments)]
pub fn row(
    name: &str,
    outcomes: &[Outcome],
    attempts: Vec<Attempt>,
    charged: Charged,
    limits: &LimitSpec,
    estimate_errors: Option<(f64, f64)>,
) -> Row {
    let ok = outcomes.iter().filter(|o| o.ok).count();
    let failed = outcomes.len() - ok;
    let seconds = outcomes
        .iter()
        .map(|o| o.finished.as_secs_f64())
        .fold(0.0, f64::max);
    let mut lat: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.ok)
        .map(|o| o.latency)
        .collect();
    lat.sort();
    let sent: HashSet<Option<usize>> = attempts.iter().map(|a| a.request).collect();
    let rate_limited = attempts.iter().filter(|a| a.status == Some(429)).count();
    let other_errors = attempts
        .iter()
        .filter(|a| a.status != Some(200) && a.status != Some(429))
        .count();
    let mut failures = BTreeMap::new();
    for o in outcomes {
        if let Some(e) = &o.error {
            *failures.entry(e.clone()).or_insert(0) += 1;
        }
    }
    let minimum_seconds = charged.minimum_seconds(limits);
    Row {
        name: name.to_string(),
        requests: outcomes.len(),
        ok,
        failed,
        attempts: attempts.len(),
        rate_limited,
        retries: attempts.len().saturating_sub(sent.len()),
        other_errors,
        seconds,
        last_sent: attempts
            .iter()
            .map(|a| a.sent.as_secs_f64())
            .fold(0.0, f64::max),
        minimum_seconds,
        binding: charged.binding(limits),
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        estimate_mae: estimate_errors.map(|e| e.0),
        estimate_mape: estimate_errors.map(|e| e.1),
        charged,
        failures,
        attempts_log: attempts,
        workload_minimum_seconds: 0.0,
        bound_answer_seconds: 0.0,
        cache_read_tokens: 0,
        cache_read_possible: 0,
        rate_limited_by_class: BTreeMap::new(),
        estimate_errors: Vec::new(),
    }
}

fn secs(s: f64) -> String {
    if s >= 100.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// The table, as printed by default.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "strategy",
        "ok / failed",
        "429s",
        "retries",
        "time",
        "minimum",
        "share of min",
        "share of wl min",
        "cache hits",
        "p50",
        "p99",
        "estimate MAE",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        cells.push(vec![
            r.name.clone(),
            format!("{} / {}", r.ok, r.failed),
            r.rate_limited.to_string(),
            r.retries.to_string(),
            secs(r.seconds),
            secs(r.minimum_seconds),
            if r.minimum_seconds > 0.0 {
                format!("{:.3}", r.share_of_minimum())
            } else {
                "n/a".to_string()
            },
            r.share_of_workload_minimum()
                .map_or("n/a".to_string(), |s| format!("{s:.3}")),
            r.cache_hit_rate()
                .map_or("n/a".to_string(), |h| format!("{:.0}%", h * 100.0)),
            format!("{:.1} s", r.p50_ms / 1000.0),
            format!("{:.1} s", r.p99_ms / 1000.0),
            match (r.estimate_mae, r.estimate_mape) {
                (Some(m), Some(p)) => format!("{m:.0} tok ({:.1}%)", p * 100.0),
                (Some(m), None) => format!("{m:.0} tok"),
                _ => "n/a".to_string(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, r) in cells.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if c == 0 {
                    format!("{s:<w$}", w = widths[c])
                } else {
                    format!("{s:>w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

/// Notes under the table: what bound each row and why requests failed.
pub fn notes(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!(
            "{}: last request sent at {:.1} s; charged {} requests, {} input tokens, {} output tokens ({}); bound by {}",
            r.name,
            r.last_sent,
            r.charged.requests,
            r.charged.input_tokens,
            r.charged.output_tokens,
            if r.charged.from_server_stats {
                "emulator's counters"
            } else {
                "usage in responses"
            },
            r.binding
        ));
        if r.workload_minimum_seconds > 0.0 {
            // The two parts of the workload's bound beside this run's: when
            // the limits let the last admission happen at the earliest, and
            // the answer time after it.
            out.push_str(&format!(
                "; workload bound: last admission at {:.2} s + answer {:.2} s, this run: {:.2} s + {:.2} s",
                r.workload_minimum_seconds - r.bound_answer_seconds,
                r.bound_answer_seconds,
                r.last_sent,
                (r.seconds - r.last_sent).max(0.0),
            ));
        }
        if r.other_errors > 0 {
            out.push_str(&format!("; {} other errors (5xx, resets)", r.other_errors));
        }
        if r.rate_limited > 0 {
            let c: Vec<String> = r
                .rate_limited_by_class
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            out.push_str(&format!("; 429s by model class: {}", c.join(", ")));
        }
        if r.cache_read_possible > 0 {
            out.push_str(&format!(
                "; cache reads {} of {} possible tokens",
                r.cache_read_tokens, r.cache_read_possible
            ));
        }
        if !r.failures.is_empty() {
            let f: Vec<String> = r.failures.iter().map(|(k, v)| format!("{v} {k}")).collect();
            out.push_str(&format!("; failed: {}", f.join(", ")));
        }
        out.push('\n');
    }
    out
}

/// The `--json` report: the limits, the workload, and one entry per strategy.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub limits: LimitsReport,
    pub workload: WorkloadReport<'a>,
    /// "virtual" (tokio's paused clock) or "wall".
    pub clock: &'static str,
    /// The endpoint's URL, or "emulator".
    pub target: &'a str,
    /// The emulator's tokenizer ("o200k" or "words") and the scale on its counts.
    pub tokenizer: &'static str,
    pub token_scale: f64,
    pub wall_seconds: f64,
    pub strategies: Vec<RowReport<'a>>,
}

/// The limits a run was measured against, as the report writes them.
#[derive(Debug, Serialize)]
pub struct LimitsReport {
    pub requests_per_minute: u64,
    pub input_tokens_per_minute: u64,
    pub output_tokens_per_minute: u64,
    pub capacity: Capacity,
    pub output_mode: &'static str,
}

/// Each bucket's capacity (the burst it allows from full).
#[derive(Debug, Serialize)]
pub struct Capacity {
    pub requests: f64,
    pub input_tokens: f64,
    pub output_tokens: f64,
}

impl From<&LimitSpec> for LimitsReport {
    fn from(l: &LimitSpec) -> Self {
        LimitsReport {
            requests_per_minute: l.requests_per_minute,
            input_tokens_per_minute: l.input_tokens_per_minute,
            output_tokens_per_minute: l.output_tokens_per_minute,
            capacity: Capacity {
                requests: l.requests_capacity,
                input_tokens: l.input_capacity,
                output_tokens: l.output_capacity,
            },
            output_mode: l.output_mode,
        }
    }
}

/// What the workload was.
#[derive(Debug, Serialize)]
pub struct WorkloadReport<'a> {
    /// "generated" or the file replayed.
    pub source: &'a str,
    pub seed: u64,
    pub requests: usize,
    pub model: &'a str,
    pub streaming: usize,
    pub with_cache_prefix: usize,
    pub input_tokens: u64,
    pub uncached_input_tokens: u64,
    pub max_tokens_sum: u64,
    /// Client workers.
    pub concurrency: usize,
}

impl<'a> WorkloadReport<'a> {
    pub fn new(w: &'a Workload, model: &'a str, concurrency: usize) -> Self {
        WorkloadReport {
            source: &w.source,
            seed: w.seed,
            requests: w.items.len(),
            model,
            streaming: w.streaming,
            with_cache_prefix: w.with_cache_prefix,
            input_tokens: w.total_input_tokens,
            uncached_input_tokens: w.uncached_input_tokens,
            max_tokens_sum: w.max_tokens_sum,
            concurrency,
        }
    }
}

/// One strategy's figures, as the report writes them.
#[derive(Debug, Serialize)]
pub struct RowReport<'a> {
    pub name: &'a str,
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    pub rate_limited: usize,
    pub retries: usize,
    pub seconds: f64,
    pub share_of_minimum: f64,
    /// The workload's bound (the best any client could do) over the time
    /// (null when a request failed, or the workload fits in the first burst).
    pub share_of_workload_minimum: Option<f64>,
    pub workload_minimum_seconds: f64,
    /// Cache tokens read over those an ideal client reads (null: nothing to read).
    pub cache_hit_rate: Option<f64>,
    pub cache_read_tokens: u64,
    pub cache_read_tokens_possible: u64,
    pub rate_limited_by_class: &'a BTreeMap<String, usize>,
    /// Per kind of content (empty for strategies that do not estimate).
    pub estimate_error_by_kind: &'a [KindError],
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub estimate_mae: Option<f64>,
    pub attempts: usize,
    pub other_errors: usize,
    pub minimum_seconds: f64,
    pub last_sent_seconds: f64,
    pub bound_by: &'static str,
    pub charged: ChargedReport,
    pub failures: &'a BTreeMap<String, usize>,
}

/// What the server charged one strategy, and where the figures come from.
#[derive(Debug, Serialize)]
pub struct ChargedReport {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// "emulator" (its counters) or "responses" (the usage they reported).
    pub source: &'static str,
}

impl<'a> From<&'a Row> for RowReport<'a> {
    fn from(r: &'a Row) -> Self {
        RowReport {
            name: &r.name,
            requests: r.requests,
            ok: r.ok,
            failed: r.failed,
            rate_limited: r.rate_limited,
            retries: r.retries,
            seconds: r.seconds,
            share_of_minimum: r.share_of_minimum(),
            share_of_workload_minimum: r.share_of_workload_minimum(),
            workload_minimum_seconds: r.workload_minimum_seconds,
            cache_hit_rate: r.cache_hit_rate(),
            cache_read_tokens: r.cache_read_tokens,
            cache_read_tokens_possible: r.cache_read_possible,
            rate_limited_by_class: &r.rate_limited_by_class,
            estimate_error_by_kind: &r.estimate_errors,
            p50_ms: r.p50_ms,
            p99_ms: r.p99_ms,
            estimate_mae: r.estimate_mae,
            attempts: r.attempts,
            other_errors: r.other_errors,
            minimum_seconds: r.minimum_seconds,
            last_sent_seconds: r.last_sent,
            bound_by: r.binding,
            charged: ChargedReport {
                requests: r.charged.requests,
                input_tokens: r.charged.input_tokens,
                output_tokens: r.charged.output_tokens,
                source: if r.charged.from_server_stats {
                    "emulator"
                } else {
                    "responses"
                },
            },
            failures: &r.failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LimitSpec {
        LimitSpec {
            requests_per_minute: 60,
            input_tokens_per_minute: 6_000,
            output_tokens_per_minute: 600,
            requests_capacity: 60.0,
            input_capacity: 6_000.0,
            output_capacity: 600.0,
            output_mode: "realtime",
        }
    }

    #[test]
    fn minimum_is_the_slowest_dimension_past_its_burst() {
        let c = Charged {
            requests: 90,         // (90 - 60) / 1 per s = 30 s
            input_tokens: 18_000, // (18000 - 6000) / 100 per s = 120 s
            output_tokens: 1_200,
            output_for_bound: 1_200, // (1200 - 600) / 10 per s = 60 s
            from_server_stats: true,
        };
        assert!((c.minimum_seconds(&spec()) - 120.0).abs() < 1e-9);
        assert_eq!(c.binding(&spec()), "input tokens");
        let within_burst = Charged {
            requests: 10,
            input_tokens: 100,
            ..Charged::default()
        };
        assert_eq!(within_burst.minimum_seconds(&spec()), 0.0);
    }

    /// `n` requests of `input` tokens each, answering in `answer` seconds.
    fn alike(n: usize, input: u64, output: u64, answer: f64) -> Vec<BoundRequest> {
        vec![
            BoundRequest {
                input,
                output,
                answer,
            };
            n
        ]
    }

    #[test]
    fn the_workload_minimum_leaves_out_realtime_output() {
        // 12,000 ideal input tokens: (12000 - 6000) / 100 per s = 60 s.
        let w = alike(10, 1_200, 180, 0.0);
        assert!((workload_minimum(&spec(), &w, false).seconds - 60.0).abs() < 1e-9);
        // Reserved output of 1,800: (1800 - 600) / 10 per s = 120 s binds.
        assert!((workload_minimum(&spec(), &w, true).seconds - 120.0).abs() < 1e-9);
        // The answer comes after the last admission; a workload that fits
        // in the burst has no bound.
        let tail = workload_minimum(&spec(), &alike(10, 1_200, 0, 1.5), false);
        assert!((tail.seconds - 61.5).abs() < 1e-9);
        assert!((tail.admissions - 60.0).abs() < 1e-9 && (tail.answer - 1.5).abs() < 1e-9);
        let small = workload_minimum(&spec(), &alike(10, 10, 0, 1.5), false);
        assert_eq!(small, WorkloadBound::default());
        assert_eq!(
            workload_minimum(&spec(), &[], false),
            WorkloadBound::default()
        );
    }

    #[test]
    fn a_long_answer_cannot_go_last_for_free() {
        // Ten requests of 1,200 tokens answering in 5 s, one of 100 tokens
        // answering in 1 s. All admitted at (12,100 - 6,000) / 100 = 61 s at
        // the earliest; the ten long answers are admitted at 60 s at the
        // earliest and take 5 s more: 65 s, later than 61 s + 1 s.
        let mut w = alike(10, 1_200, 0, 5.0);
        w.push(BoundRequest {
            input: 100,
            output: 0,
            answer: 1.0,
        });
        let b = workload_minimum(&spec(), &w, false);
        assert!((b.seconds - 65.0).abs() < 1e-9, "{b:?}");
        assert!((b.admissions - 60.0).abs() < 1e-9 && (b.answer - 5.0).abs() < 1e-9);
        // A large quick request: sending it last is the best order, and the
        // bound is the whole workload's admissions plus its answer.
        w[10].input = 3_000;
        let b = workload_minimum(&spec(), &w, false);
        assert!((b.seconds - 91.0).abs() < 1e-9, "{b:?}");
    }

    /// A request of the test workloads: (input tokens, answer duration).
    type Job = (f64, f64);

    /// The earliest finish of the best schedule of `jobs` (input tokens,
    /// answer duration) against one token bucket of `capacity` refilled at
    /// `rate` per second, found by trying every order: each request is
    /// admitted as soon as the bucket holds its tokens (never sooner than
    /// the one before: a later admission never helps an earlier one), and
    /// the run ends when the last answer is over.
    fn best_schedule(jobs: &[Job], capacity: f64, rate: f64) -> f64 {
        fn permute(rest: &mut Vec<Job>, order: &mut Vec<Job>, f: &mut dyn FnMut(&[Job])) {
            if rest.is_empty() {
                f(order);
                return;
            }
            for i in 0..rest.len() {
                let job = rest.remove(i);
                order.push(job);
                permute(rest, order, f);
                order.pop();
                rest.insert(i, job);
            }
        }
        let mut best = f64::INFINITY;
        permute(&mut jobs.to_vec(), &mut Vec::new(), &mut |order| {
            let (mut charged, mut at, mut end) = (0.0f64, 0.0f64, 0.0f64);
            for &(tokens, duration) in order {
                charged += tokens;
                // The bucket holds `capacity + rate * t - charged before`.
                at = at.max((charged - capacity) / rate);
                end = end.max(at + duration);
            }
            best = best.min(end);
        });
        best
    }

    #[test]
    fn the_workload_minimum_never_exceeds_a_perfect_schedule() {
        let l = spec(); // 6,000 input tokens of capacity, 100 per second
        let mut seed = 7u64;
        let mut draw = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..200 {
            let n = 1 + draw(6) as usize;
            let jobs: Vec<Job> = (0..n)
                .map(|_| ((500 + draw(4_000)) as f64, (1 + draw(80)) as f64 / 10.0))
                .collect();
            let requests: Vec<BoundRequest> = jobs
                .iter()
                .map(|&(input, answer)| BoundRequest {
                    input: input as u64,
                    output: 0,
                    answer,
                })
                .collect();
            let bound = workload_minimum(&l, &requests, false).seconds;
            let best = best_schedule(
                &jobs,
                l.input_capacity,
                l.input_tokens_per_minute as f64 / 60.0,
            );
            assert!(
                bound <= best + 1e-9,
                "bound {bound} above the best schedule {best} for {jobs:?}"
            );
        }
        // Tight when the quickest answer can go last: 2 x 5,000 tokens, the
        // second admitted at 40 s, its 1 s answer ends at 41 s.
        let jobs = [(5_000.0, 9.0), (5_000.0, 1.0)];
        let best = best_schedule(&jobs, 6_000.0, 100.0);
        let requests = [(5_000, 9.0), (5_000, 1.0)].map(|(input, answer)| BoundRequest {
            input,
            output: 0,
            answer,
        });
        let bound = workload_minimum(&l, &requests, false).seconds;
        assert!((best - 41.0).abs() < 1e-9 && (bound - 41.0).abs() < 1e-9);
    }

    #[test]
    fn estimate_errors_per_kind_and_after_calibration() {
        let samples = [
            ("code", 0, 0.5),
            ("code", 25, -0.1),
            ("prose", 30, 0.2),
            ("prose", 40, 0.0),
        ];
        let e = kind_errors(&samples);
        let kinds: Vec<&str> = e.iter().map(|k| k.kind.as_str()).collect();
        assert_eq!(kinds, ["code", "prose", "all", "all after 20 settled"]);
        assert_eq!(e[0].requests, 2);
        assert!((e[0].mean_abs - 0.3).abs() < 1e-9 && (e[0].bias - 0.2).abs() < 1e-9);
        assert!((e[0].p50_abs - 0.1).abs() < 1e-9 && (e[0].p90_abs - 0.5).abs() < 1e-9);
        assert_eq!(e[3].requests, 3);
        assert!((e[3].p90_abs - 0.2).abs() < 1e-9);
        assert!(kind_errors(&[]).is_empty());
    }

    #[test]
    fn percentiles_by_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
