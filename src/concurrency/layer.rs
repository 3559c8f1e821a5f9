use std::fmt;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::adaptive::{AdaptiveConfig, Controller};
use super::semaphore::{Classifier, Shared};
use super::{Concurrency, Snapshot};
use crate::classify::{Class, Classifier as ErrorClassifier};
use crate::observe::{Hooks, RejectEvent, WaitEvent};

/// Requests that may wait for a slot before new ones are shed, by default.
pub(crate) const DEFAULT_MAX_WAITING: usize = 10_000;
/// How long a waiter waits before it is treated as one lane higher, by default.
pub(crate) const DEFAULT_AGING: Duration = Duration::from_secs(10);
/// The factor a drop signal multiplies the adaptive limit by, by default
/// (Vector's and Netflix's AIMD default).
pub(crate) const DEFAULT_DECREASE: f64 = 0.9;
/// How far above its baseline the time to the response head may rise before it
/// counts as a drop signal, by default (2.0 = twice the baseline).
pub(crate) const DEFAULT_LATENCY_TOLERANCE: f64 = 2.0;

/// Caps the requests in flight through the services it builds, at a fixed
/// number or at a limit it learns (see the [module docs](super)).
///
/// [`fixed`](Self::fixed) and [`adaptive`](Self::adaptive) use the defaults;
/// [`ConcurrencyBuilder`] sets the queue bound, aging and adaptive tuning.
///
/// Every service this layer builds, and every clone of them, shares one cap: the
/// layer holds the shared state in an `Arc`, and cloning the layer is cheap.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::concurrency::ConcurrencyLayer;
///
/// let fixed = ConcurrencyLayer::fixed(8);
/// assert_eq!(fixed.snapshot().limit, 8);
///
/// let adaptive = ConcurrencyLayer::adaptive(2..=64);
/// assert_eq!(adaptive.snapshot().limit, 2); // slow start from the minimum
/// ```
#[derive(Clone)]
pub struct ConcurrencyLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for ConcurrencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLayer")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

impl ConcurrencyLayer {
    /// At most `limit` requests in flight; others wait, first come, first served
    /// within their [`Priority`](super::Priority) lane.
    ///
    /// A `limit` of 0 is raised to 1 (a cap that admits nothing would hang every
    /// request); [`ConcurrencyBuilder::build`] reports it as an error instead.
    pub fn fixed(limit: usize) -> Self {
        ConcurrencyBuilder::fixed(limit.max(1)).build_lenient()
    }

    /// A limit learned between `range.start()` and `range.end()`: slow start from
    /// the minimum, additive increase, multiplicative decrease on drop signals.
    ///
    /// A minimum of 0 is raised to 1 and a maximum below the minimum is raised to
    /// it; [`ConcurrencyBuilder::build`] reports these as errors instead.
    pub fn adaptive(range: RangeInclusive<usize>) -> Self {
        let min = (*range.start()).max(1);
        let max = (*range.end()).max(min);
        ConcurrencyBuilder::adaptive(min..=max).build_lenient()
    }

    /// The current limit, requests in flight and waiting, and the adaptive counters.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }
}

impl<S> Layer<S> for ConcurrencyLayer {
    type Service = Concurrency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Concurrency::from_shared(inner, Arc::clone(&self.shared))
    }
}

/// Builds a [`ConcurrencyLayer`] with a chosen queue bound, aging and adaptive tuning.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_llm_limits::concurrency::ConcurrencyBuilder;
///
/// let layer = ConcurrencyBuilder::adaptive(1..=32)
///     .initial_limit(4)
///     .max_waiting(500)
///     .aging(Duration::from_secs(5))
///     .decrease_factor(0.8)
///     .latency_tolerance(Some(3.0))
///     .build()
///     .expect("valid settings");
/// assert_eq!(layer.snapshot().limit, 4);
/// ```
#[derive(Clone)]
pub struct ConcurrencyBuilder {
    mode: Mode,
    max_waiting: usize,
    aging: Duration,
    initial: Option<usize>,
    increase: usize,
    decrease: f64,
    latency_tolerance: Option<f64>,
    classifier: ErrorClassifier,
    hooks: Hooks,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    Fixed(usize),
    Adaptive { min: usize, max: usize },
}

impl fmt::Debug for ConcurrencyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyBuilder")
            .field("mode", &self.mode)
            .field("max_waiting", &self.max_waiting)
            .field("aging", &self.aging)
            .field("initial", &self.initial)
            .field("increase", &self.increase)
            .field("decrease", &self.decrease)
            .field("latency_tolerance", &self.latency_tolerance)
            .field("classifier", &self.classifier)
            .field("hooks", &self.hooks)
            .finish()
    }
}

impl ConcurrencyBuilder {
    fn with_mode(mode: Mode) -> Self {
        ConcurrencyBuilder {
            mode,
            max_waiting: DEFAULT_MAX_WAITING,
            aging: DEFAULT_AGING,
            initial: None,
            increase: 1,
            decrease: DEFAULT_DECREASE,
            latency_tolerance: Some(DEFAULT_LATENCY_TOLERANCE),
            classifier: ErrorClassifier::new(),
            hooks: Hooks::default(),
        }
    }

    /// A fixed cap of `limit` requests in flight.
    pub fn fixed(limit: usize) -> Self {
        Self::with_mode(Mode::Fixed(limit))
    }

    /// An adaptive cap between `range.start()` and `range.end()`.
    pub fn adaptive(range: RangeInclusive<usize>) -> Self {
        Self::with_mode(Mode::Adaptive {
            min: *range.start(),
            max: *range.end(),
        })
    }

    /// Requests that may wait for a slot; past this, a new request fails at once
    /// with [`Error::Overloaded`](crate::Error::Overloaded). Default
    /// 10,000. 0 means never wait.
    pub fn max_waiting(mut self, max_waiting: usize) -> Self {
        self.max_waiting = max_waiting;
        self
    }

    /// The aging period: a waiter that has waited this long is treated as one lane
    /// higher (two periods: two lanes), so `Background` is never starved. Default
    /// 10 s. `Duration::ZERO` makes the lanes plain FIFO.
    pub fn aging(mut self, period: Duration) -> Self {
        self.aging = period;
        self
    }

    /// Adaptive mode: the limit to start from (default: the minimum).
    pub fn initial_limit(mut self, initial: usize) -> Self {
        self.initial = Some(initial);
        self
    }

    /// Adaptive mode: how much a window of successes adds after slow start
    /// (default 1).
    pub fn additive_increase(mut self, step: usize) -> Self {
        self.increase = step;
        self
    }

    /// Adaptive mode: what a drop signal multiplies the limit by, in `(0, 1)`
    /// (default 0.9, Vector's and Netflix's AIMD default). The limit always
    /// drops by at least one.
    pub fn decrease_factor(mut self, factor: f64) -> Self {
        self.decrease = factor;
        self
    }

    /// Adaptive mode: how many times its baseline the time to the response head
    /// may reach before it counts as a drop signal (`> 1.0`; default
    /// `Some(2.0)`, twice the baseline). `None` turns the latency signal off: use
    /// it when response heads come only after the whole answer (non-streaming
    /// requests), where latency mostly measures the answer's length.
    pub fn latency_tolerance(mut self, tolerance: Option<f64>) -> Self {
        self.latency_tolerance = tolerance;
        self
    }

    /// Adaptive mode: decides, before the built-in rules, what an inner error
    /// is: `Some(`[`Class::Timeout`]`)` makes it a drop signal, any other
    /// `Some` does not, and `None` leaves it to the built-in rules, which know
    /// tower's and tokio's `Elapsed` and an `io::Error` of kind `TimedOut`
    /// anywhere in the source chain (see [`classify`](crate::classify)).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::classify::Class;
    /// use tower_llm_limits::concurrency::ConcurrencyBuilder;
    ///
    /// let layer = ConcurrencyBuilder::adaptive(1..=64)
    ///     .error_classifier(|e| (e.to_string() == "upstream deadline").then_some(Class::Timeout))
    ///     .build()
    ///     .expect("valid settings");
    /// # let _ = layer;
    /// ```
    pub fn error_classifier<F>(mut self, hook: F) -> Self
    where
        F: Fn(&(dyn std::error::Error + 'static)) -> Option<Class> + Send + Sync + 'static,
    {
        self.classifier = ErrorClassifier::with_hook(hook);
        self
    }

    /// Check the settings and build the layer.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] names the first setting that cannot work: a limit or
    /// minimum of 0, a maximum below the minimum, an initial limit outside the
    /// bounds, an additive step of 0, a decrease factor outside `(0, 1)`, or a
    /// latency tolerance not above 1.
    pub fn build(self) -> Result<ConcurrencyLayer, ConfigError> {
        match self.mode {
            Mode::Fixed(0) => return Err(ConfigError::ZeroLimit),
            Mode::Fixed(_) => {}
            Mode::Adaptive { min, max } => {
                if min == 0 {
                    return Err(ConfigError::ZeroLimit);
                }
                if max < min {
                    return Err(ConfigError::EmptyRange { min, max });
                }
                if let Some(initial) = self.initial {
                    if !(min..=max).contains(&initial) {
                        return Err(ConfigError::InitialOutOfRange { initial, min, max });
                    }
                }
                if self.increase == 0 {
                    return Err(ConfigError::ZeroIncrease);
                }
                if !(self.decrease > 0.0 && self.decrease < 1.0) {
                    return Err(ConfigError::DecreaseFactor(self.decrease));
                }
                if let Some(t) = self.latency_tolerance {
                    if !(t > 1.0 && t.is_finite()) {
                        return Err(ConfigError::LatencyTolerance(t));
                    }
                }
            }
        }
        Ok(self.build_lenient())
    }

    fn build_lenient(self) -> ConcurrencyLayer {
        let (limit, controller) = match self.mode {
            Mode::Fixed(limit) => (limit.max(1), None),
            Mode::Adaptive { min, max } => {
                let min = min.max(1);
                let max = max.max(min);
                let cfg = AdaptiveConfig {
                    min,
                    max,
                    initial: self.initial.unwrap_or(min).clamp(min, max),
                    increase: self.increase.max(1),
                    decrease: self.decrease,
                    latency_tolerance: self.latency_tolerance,
                };
                (min, Some(Controller::new(cfg)))
            }
        };
        let errors = self.classifier;
        let classifier: Classifier = Arc::new(move |err| errors.is_timeout(err));
        let observed = cfg!(feature = "metrics")
            || self.hooks.on_wait.is_some()
            || self.hooks.on_reject.is_some();
        ConcurrencyLayer {
            shared: Arc::new(Shared::new(
                limit,
                self.max_waiting,
                self.aging,
                controller,
                classifier,
                observed.then_some(self.hooks),
            )),
        }
    }
}

/// Callbacks (see [`observe`](crate::observe)). Each runs inside the
/// request's `poll`, on the task that polls it: keep it quick.
impl ConcurrencyBuilder {
    /// Called when a request that had to queue for a slot gets one, or
    /// stops at its deadline ([`WaitEvent`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::concurrency::ConcurrencyBuilder;
    ///
    /// let layer = ConcurrencyBuilder::fixed(8)
    ///     .max_waiting(100)
    ///     .on_wait(|event| eprintln!("queued {:?}", event.waited))
    ///     .on_reject(|event| eprintln!("shed: {}", event.error))
    ///     .build()
    ///     .expect("valid settings");
    /// # let _ = layer;
    /// ```
    pub fn on_wait<F>(mut self, f: F) -> Self
    where
        F: Fn(&WaitEvent) + Send + Sync + 'static,
    {
        self.hooks.on_wait = Some(Arc::new(f));
        self
    }

    /// Called when a request is shed because the wait queue is full
    /// ([`RejectEvent`] with [`Error::Overloaded`](crate::Error::Overloaded)).
    pub fn on_reject<F>(mut self, f: F) -> Self
    where
        F: for<'a> Fn(&RejectEvent<'a>) + Send + Sync + 'static,
    {
        self.hooks.on_reject = Some(Arc::new(f));
        self
    }
}

/// A [`ConcurrencyBuilder`] setting that cannot work.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A fixed limit or an adaptive minimum of 0 would admit nothing.
    ZeroLimit,
    /// The adaptive maximum is below the minimum.
    EmptyRange {
        /// The minimum given.
        min: usize,
        /// The maximum given.
        max: usize,
    },
    /// The initial limit is outside `min..=max`.
    InitialOutOfRange {
        /// The initial limit given.
        initial: usize,
        /// The minimum.
        min: usize,
        /// The maximum.
        max: usize,
    },
    /// An additive increase of 0 would never grow the limit after slow start.
    ZeroIncrease,
    /// The decrease factor is not in `(0, 1)`.
    DecreaseFactor(f64),
    /// The latency tolerance is not a finite number above 1.
    LatencyTolerance(f64),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::ZeroLimit => f.write_str("a concurrency limit of 0 admits nothing"),
            ConfigError::EmptyRange { min, max } => {
                write!(f, "adaptive maximum {max} is below the minimum {min}")
            }
            ConfigError::InitialOutOfRange { initial, min, max } => {
                write!(f, "initial limit {initial} is outside {min}..={max}")
            }
            ConfigError::ZeroIncrease => f.write_str("an additive increase of 0 never grows"),
            ConfigError::DecreaseFactor(x) => {
                write!(f, "decrease factor {x} is not between 0 and 1")
            }
            ConfigError::LatencyTolerance(x) => {
                write!(f, "latency tolerance {x} is not a finite number above 1")
            }
        }
    }
}

impl std::error::Error for ConfigError {}
