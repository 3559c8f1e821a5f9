//! The run-time state every clone of one budget shares: the ledger, the
//! estimator, and per budget key a FIFO queue of waiting requests and what the
//! budget learned (output ratio, calibration, fallback estimates).
//!
//! # The wait queue
//!
//! Waiters are served in order of arrival, per key. Only the head of a queue
//! asks the ledger; it sleeps until the instant the ledger named, and is woken
//! early when a settlement, refund or sync frees capacity. When the head is
//! admitted (or gives up, or is dropped) it wakes the next one, so wakeups are
//! about as many as admissions (no thundering herd) and a large request at the
//! head is not overtaken by small ones behind it (no starvation). A request
//! that finds its key's queue empty asks the ledger at once, without queueing.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::request::Parts;
use tokio::time::{Instant, Sleep};

use super::config::{
    BudgetMode, KeyExtractor, LimitsConfig, DEFAULT_MAX_TOKENS, OUTPUT_RATIO_MIN_SAMPLES,
    OUTPUT_RATIO_WINDOW,
};
use super::ledger::{CostDelta, Costs, Ledger, LimitSync, Reservation};
use super::limits::{Limits, ModelClass, OutputMode};
use super::snapshot::{BudgetSnapshot, DimensionSnapshot, KeySnapshot};
use crate::estimate::calibrate::SlidingQuantile;
use crate::estimate::{Estimate, TokenEstimator};
use crate::headers::{LimitStatus, RateLimitSnapshot};
use crate::Dimension;

/// The settings fixed when the layer is built.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) limits: LimitsConfig,
    pub(crate) output_mode: OutputMode,
    pub(crate) mode: BudgetMode,
    pub(crate) enforce: bool,
    pub(crate) buffer_limit: usize,
    pub(crate) key_extractor: Option<KeyExtractor>,
    pub(crate) output_quantile: f64,
    pub(crate) output_ratio_prior: f64,
}

/// Counters of the decisions taken, for snapshots.
#[derive(Debug, Default)]
struct Counters {
    admitted: AtomicU64,
    waited: AtomicU64,
    rejected: AtomicU64,
    too_large: AtomicU64,
    settled: AtomicU64,
    refunded_429: AtomicU64,
    wakeups: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One waiting request in a key's queue.
#[derive(Debug)]
struct Waiter {
    id: u64,
    waker: Option<Waker>,
}

/// What the budget keeps per key.
#[derive(Debug)]
struct KeyState {
    limits: Limits,
    last_used: Instant,
    queue: VecDeque<Waiter>,
    output_ratio: SlidingQuantile,
    ratio_samples: u64,
    estimates: u64,
    fallback_estimates: u64,
    calibration: Option<f64>,
}

impl KeyState {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            last_used: Instant::now(),
            queue: VecDeque::new(),
            output_ratio: SlidingQuantile::new(OUTPUT_RATIO_WINDOW),
            ratio_samples: 0,
            estimates: 0,
            fallback_estimates: 0,
            calibration: None,
        }
    }

    fn expected_ratio(&self, q: f64, prior: f64) -> f64 {
        if (self.ratio_samples as usize) < OUTPUT_RATIO_MIN_SAMPLES {
            return prior;
        }
        self.output_ratio
            .quantile(q)
            .filter(|r| r.is_finite())
            .map_or(prior, |r| r.clamp(0.0, 1.0))
    }

    /// Wakes the head of the queue, if it waits for a wakeup.
    fn wake_head(&mut self, counters: &Counters) {
        if let Some(waker) = self.queue.front_mut().and_then(|w| w.waker.take()) {
            bump(&counters.wakeups);
            waker.wake();
        }
    }
}

/// The state shared by every clone of one budget.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) estimator: Arc<dyn TokenEstimator>,
    keys: Mutex<HashMap<Arc<str>, KeyState>>,
    next_ticket: AtomicU64,
    counters: Counters,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

/// What one request reserved, and what settlement needs to correct it.
#[derive(Debug)]
pub(crate) struct Charge {
    pub(crate) key: Arc<str>,
    pub(crate) limits: Limits,
    pub(crate) cache_reads_count: bool,
    pub(crate) costs: Costs,
    pub(crate) estimate: Estimate,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Denied {
    Exceeded {
        retry_in: Duration,
        dimension: Dimension,
    },
    TooLarge {
        dimension: Dimension,
        cost: u64,
        limit: u64,
    },
}

impl From<Denied> for crate::Error {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Exceeded {
                retry_in,
                dimension,
            } => crate::Error::BudgetExceeded {
                retry_in,
                dimension,
            },
            Denied::TooLarge {
                dimension,
                cost,
                limit,
            } => crate::Error::RequestTooLarge {
                dimension,
                cost,
                limit,
            },
        }
    }
}

/// A place in a key's queue; dropping it gives the place back.
#[derive(Debug)]
struct Ticket {
    shared: Arc<Shared>,
    key: Arc<str>,
    id: u64,
    queued: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.queued {
            return;
        }
        let mut keys = self.shared.lock();
        if let Some(ks) = keys.get_mut(&*self.key) {
            if let Some(pos) = ks.queue.iter().position(|w| w.id == self.id) {
                ks.queue.remove(pos);
                tracing::debug!(key = %self.key, "budget: waiter cancelled, place given back");
                if pos == 0 {
                    ks.wake_head(&self.shared.counters);
                }
            }
        }
    }
}

/// The admission progress of one request (lives in its response future).
#[derive(Debug, Default)]
pub(crate) struct Admission {
    ticket: Option<Ticket>,
    sleep: Option<Pin<Box<Sleep>>>,
    started: Option<Instant>,
}

enum Step {
    Admitted,
    Denied(Denied),
    Queued,
    Sleep(Instant),
}

impl Shared {
    pub(crate) fn new(
        settings: Settings,
        ledger: Arc<dyn Ledger>,
        estimator: Arc<dyn TokenEstimator>,
    ) -> Self {
        Self {
            settings,
            ledger,
            estimator,
            keys: Mutex::new(HashMap::new()),
            next_ticket: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, KeyState>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The caller a request is charged to, from its head.
    pub(crate) fn caller(&self, parts: &Parts) -> Option<String> {
        self.settings
            .key_extractor
            .as_ref()
            .and_then(|k| k.key(parts))
    }

    /// Turns an estimate into the costs to reserve under the request's key.
    pub(crate) fn charge(&self, caller: Option<&str>, estimate: Estimate) -> Charge {
        let class = ModelClass::of(estimate.model.as_deref().unwrap_or(""));
        let limits = self.settings.limits.limits_for(class);
        let cache_reads_count = class.cache_reads_count_toward_itpm();
        let name = class.as_str();
        let lookup: std::borrow::Cow<'_, str> = match caller {
            None => std::borrow::Cow::Borrowed(name),
            Some(caller) => std::borrow::Cow::Owned(format!("{caller}/{name}")),
        };
        let mut keys = self.lock();
        let key = match keys.get_key_value(&*lookup) {
            Some((existing, _)) => Arc::clone(existing),
            None => Arc::from(&*lookup),
        };
        let ks = keys
            .entry(Arc::clone(&key))
            .or_insert_with(|| KeyState::new(limits));
        ks.estimates += 1;
        if estimate.fallback {
            ks.fallback_estimates += 1;
        }
        if estimate.raw_input_tokens > 0 {
            ks.calibration = Some(estimate.input_tokens as f64 / estimate.raw_input_tokens as f64);
        }
        let max_tokens = estimate.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        let output_tokens = match self.settings.output_mode {
            OutputMode::Reserve => max_tokens,
            OutputMode::Realtime => {
                let ratio = ks.expected_ratio(
                    self.settings.output_quantile,
                    self.settings.output_ratio_prior,
                );
                let expected = max_tokens as f64 * ratio;
                // Round up, but not for floating-point noise (4000 × 0.025).
                let nearest = expected.round();
                let expected = if (expected - nearest).abs() < 1e-6 {
                    nearest as u64
                } else {
                    expected.ceil() as u64
                };
                // At least one token, so that an output bucket in debt (a
                // response longer than expected) holds new requests back.
                expected.max(1).min(max_tokens.max(1))
            }
        };
        drop(keys);
        let input_tokens = if cache_reads_count {
            estimate
                .input_tokens
                .saturating_add(estimate.cache_read_tokens)
        } else {
            estimate.input_tokens
        };
        Charge {
            key,
            limits,
            cache_reads_count,
            costs: Costs {
                requests: 1,
                input_tokens,
                output_tokens,
            },
            estimate,
        }
    }

    /// Polls a request's admission.
    ///
    /// # Cancellation
    ///
    /// Dropping `adm` while pending gives back the place in line (and wakes
    /// the next waiter if it was the head); nothing was debited.
    pub(crate) fn poll_admit(
        self: &Arc<Self>,
        charge: &mut Charge,
        adm: &mut Admission,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Denied>> {
        loop {
            let now = Instant::now();
            match self.step(charge, adm, now, cx.waker()) {
                Step::Admitted => {
                    bump(&self.counters.admitted);
                    if let Some(started) = adm.started {
                        tracing::debug!(
                            key = %charge.key,
                            waited_ms = now.saturating_duration_since(started).as_millis() as u64,
                            input_tokens = charge.costs.input_tokens,
                            output_tokens = charge.costs.output_tokens,
                            "budget: admitted after waiting"
                        );
                    }
                    return Poll::Ready(Ok(()));
                }
                Step::Denied(d) => {
                    match d {
                        Denied::Exceeded {
                            retry_in,
                            dimension,
                        } => {
                            bump(&self.counters.rejected);
                            tracing::debug!(key = %charge.key, %dimension, retry_in_ms = retry_in.as_millis() as u64, "budget: rejected");
                        }
                        Denied::TooLarge {
                            dimension,
                            cost,
                            limit,
                        } => {
                            bump(&self.counters.too_large);
                            tracing::debug!(key = %charge.key, %dimension, cost, limit, "budget: request can never fit");
                        }
                    }
                    return Poll::Ready(Err(d));
                }
                Step::Queued => return Poll::Pending,
                Step::Sleep(at) => {
                    // A ledger must name an instant after now; guard against a
                    // spin if one does not.
                    let at = at.max(now + Duration::from_millis(1));
                    match adm.sleep.as_mut() {
                        Some(sleep) => {
                            if sleep.deadline() != at {
                                sleep.as_mut().reset(at);
                            }
                        }
                        None => adm.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    let ready = adm
                        .sleep
                        .as_mut()
                        .is_some_and(|s| s.as_mut().poll(cx).is_ready());
                    if !ready {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// Puts a new waiter at the back of the key's line; the ticket takes the
    /// place back when dropped.
    fn join_queue(self: &Arc<Self>, ks: &mut KeyState, key: &Arc<str>, waker: &Waker) -> Ticket {
        let id = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        ks.queue.push_back(Waiter {
            id,
            waker: Some(waker.clone()),
        });
        Ticket {
            shared: Arc::clone(self),
            key: Arc::clone(key),
            id,
            queued: true,
        }
    }

    fn step(
        self: &Arc<Self>,
        charge: &mut Charge,
        adm: &mut Admission,
        now: Instant,
        waker: &Waker,
    ) -> Step {
        let mut keys = self.lock();
        let ks = keys
            .entry(Arc::clone(&charge.key))
            .or_insert_with(|| KeyState::new(charge.limits));
        ks.last_used = now;
        let at_head = match &adm.ticket {
            None => self.settings.mode == BudgetMode::Reject || ks.queue.is_empty(),
            Some(t) => ks.queue.front().map(|w| w.id) == Some(t.id),
        };
        if !at_head {
            match &adm.ticket {
                None => {
                    adm.ticket = Some(self.join_queue(ks, &charge.key, waker));
                    if adm.started.is_none() {
                        adm.started = Some(now);
                        bump(&self.counters.waited);
                    }
                }
                Some(t) => {
                    if let Some(w) = ks.queue.iter_mut().find(|w| w.id == t.id) {
                        set_waker(&mut w.waker, waker);
                    }
                }
            }
            return Step::Queued;
        }
        loop {
            match self
                .ledger
                .reserve(&charge.key, &charge.limits, charge.costs, now)
            {
                Reservation::Admitted => {
                    if let Some(t) = adm.ticket.as_mut() {
                        ks.queue.pop_front();
                        t.queued = false;
                        ks.wake_head(&self.counters);
                    }
                    return Step::Admitted;
                }
                Reservation::WaitUntil { at, dimension } => {
                    if self.settings.mode == BudgetMode::Reject {
                        return Step::Denied(Denied::Exceeded {
                            retry_in: at.saturating_duration_since(now),
                            dimension,
                        });
                    }
                    match &adm.ticket {
                        None => adm.ticket = Some(self.join_queue(ks, &charge.key, waker)),
                        Some(_) => {
                            if let Some(w) = ks.queue.front_mut() {
                                set_waker(&mut w.waker, waker);
                            }
                        }
                    }
                    if adm.started.is_none() {
                        adm.started = Some(now);
                        bump(&self.counters.waited);
                        tracing::debug!(
                            key = %charge.key,
                            %dimension,
                            wait_ms = at.saturating_duration_since(now).as_millis() as u64,
                            "budget: waiting for capacity"
                        );
                    }
                    return Step::Sleep(at);
                }
                Reservation::Never {
                    dimension,
                    cost,
                    capacity,
                } => {
                    if dimension == Dimension::OutputTokens
                        && self.settings.output_mode == OutputMode::Realtime
                        && charge.costs.output_tokens > capacity
                    {
                        // In realtime mode the output reservation is only an
                        // expectation: cap it to what can ever fit and ask again.
                        charge.costs.output_tokens = capacity;
                        continue;
                    }
                    if let Some(t) = adm.ticket.as_mut() {
                        if let Some(pos) = ks.queue.iter().position(|w| w.id == t.id) {
                            ks.queue.remove(pos);
                        }
                        t.queued = false;
                        ks.wake_head(&self.counters);
                    }
                    return Step::Denied(Denied::TooLarge {
                        dimension,
                        cost,
                        limit: capacity,
                    });
                }
            }
        }
    }

    /// Applies a correction to a request's charge; wakes the key's head when
    /// capacity was freed, and learns the output ratio if given.
    pub(crate) fn correct(&self, charge: &Charge, delta: CostDelta, output_ratio: Option<f64>) {
        let now = Instant::now();
        if delta != CostDelta::default() {
            self.ledger.settle(&charge.key, &charge.limits, delta, now);
        }
        let freed = delta.requests < 0 || delta.input_tokens < 0 || delta.output_tokens < 0;
        if freed || output_ratio.is_some() {
            let mut keys = self.lock();
            if let Some(ks) = keys.get_mut(&*charge.key) {
                if let Some(r) = output_ratio.filter(|r| r.is_finite()) {
                    ks.output_ratio.push(r.clamp(0.0, 1.0));
                    ks.ratio_samples += 1;
                }
                if freed {
                    ks.wake_head(&self.counters);
                }
            }
        }
        bump(&self.counters.settled);
    }

    /// Refunds everything a request reserved: the server answered 429 and
    /// charged nothing.
    pub(crate) fn refund(&self, charge: &Charge) {
        bump(&self.counters.refunded_429);
        self.correct(charge, negate(charge.costs), None);
    }

    /// Refunds everything a request reserved: it was admitted but never sent
    /// (the inner service failed before taking it).
    pub(crate) fn refund_unsent(&self, charge: &Charge) {
        tracing::debug!(key = %charge.key, "budget: admitted request not sent; refunded");
        self.correct(charge, negate(charge.costs), None);
    }

    /// Aligns the key's buckets with a response's `anthropic-ratelimit-*` headers.
    ///
    /// The combined `anthropic-ratelimit-tokens-*` header is the most
    /// restrictive limit in force, not a fourth bucket: it is used for input
    /// tokens only when the response has no `input-tokens` headers.
    pub(crate) fn sync(&self, charge: &Charge, snap: &RateLimitSnapshot) {
        let now = Instant::now();
        let mut synced = false;
        for dimension in Dimension::ALL {
            let mut status = *snap.dimension(dimension);
            if dimension == Dimension::InputTokens && status == LimitStatus::default() {
                status = snap.tokens;
            }
            if status == LimitStatus::default() {
                continue;
            }
            self.ledger.sync(
                &charge.key,
                &charge.limits,
                dimension,
                LimitSync {
                    limit: status.limit,
                    remaining: status.remaining,
                    reset_in: status.reset_in,
                },
                now,
            );
            synced = true;
        }
        if synced {
            let mut keys = self.lock();
            if let Some(ks) = keys.get_mut(&*charge.key) {
                ks.wake_head(&self.counters);
            }
        }
    }

    /// Forgets the keys not used for `idle` and with no request waiting (what
    /// was learned for them: output ratio, counters). Returns how many.
    pub(crate) fn forget_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut keys = self.lock();
        let before = keys.len();
        keys.retain(|_, ks| {
            !ks.queue.is_empty() || now.saturating_duration_since(ks.last_used) < idle
        });
        before - keys.len()
    }

    /// A snapshot of every key this budget has seen.
    pub(crate) fn snapshot(&self) -> BudgetSnapshot {
        let now = Instant::now();
        let q = self.settings.output_quantile;
        let prior = self.settings.output_ratio_prior;
        #[allow(clippy::type_complexity)]
        let keys: Vec<(Arc<str>, Limits, usize, Option<f64>, u64, u64, f64)> = self
            .lock()
            .iter()
            .map(|(k, ks)| {
                (
                    Arc::clone(k),
                    ks.limits,
                    ks.queue.len(),
                    ks.calibration,
                    ks.fallback_estimates,
                    ks.estimates,
                    ks.expected_ratio(q, prior),
                )
            })
            .collect();
        let mut out: Vec<KeySnapshot> = keys
            .into_iter()
            .map(
                |(key, limits, waiting, calibration, fallback, estimates, ratio)| {
                    let states = self.ledger.state(&key, &limits, now);
                    let dimensions = Dimension::ALL.map(|d| {
                        let st = states.as_ref().and_then(|s| s.get(dim_index(d)).copied());
                        DimensionSnapshot {
                            dimension: d,
                            limit: st.and_then(|s| s.limit),
                            learned: st.is_some_and(|s| s.learned),
                            remaining: st.map(|s| s.available),
                            capacity: st.map(|s| s.capacity),
                        }
                    });
                    KeySnapshot {
                        key: key.to_string(),
                        dimensions,
                        waiting,
                        calibration_factor: calibration,
                        fallback_estimates: fallback,
                        estimates,
                        expected_output_ratio: ratio,
                    }
                },
            )
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        let c = &self.counters;
        BudgetSnapshot {
            keys: out,
            admitted: c.admitted.load(Ordering::Relaxed),
            waited: c.waited.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            too_large: c.too_large.load(Ordering::Relaxed),
            settled: c.settled.load(Ordering::Relaxed),
            refunded_429: c.refunded_429.load(Ordering::Relaxed),
            wakeups: c.wakeups.load(Ordering::Relaxed),
        }
    }
}

fn set_waker(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

pub(crate) fn dim_index(d: Dimension) -> usize {
    match d {
        Dimension::Requests => 0,
        Dimension::InputTokens => 1,
        Dimension::OutputTokens => 2,
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The correction that refunds `costs` entirely.
pub(crate) fn negate(costs: Costs) -> CostDelta {
    CostDelta {
        requests: -to_i64(costs.requests),
        input_tokens: -to_i64(costs.input_tokens),
        output_tokens: -to_i64(costs.output_tokens),
    }
}

/// `actual - reserved`, per dimension.
pub(crate) fn difference(actual: u64, reserved: u64) -> i64 {
    to_i64(actual).saturating_sub(to_i64(reserved))
}
