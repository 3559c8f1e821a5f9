//! The layer and its builder.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::backoff::{FastRng, Jitter};
use super::budget::{BudgetState, RetryBudget};
use super::cooldown::Cooldown;
use super::service::RetryAfter;
use super::snapshot::{Config, Counters, RetrySnapshot, Shared};
use crate::body::DEFAULT_BUFFER_LIMIT;
use crate::classify::{Class, Classifier};
use crate::clock::WallClock;
use crate::observe::{RetryEvent, RetryHooks};

/// The default of [`RetryAfterBuilder::error_body_timeout`]: 10 s. An error
/// body is a few hundred bytes sent with its head; ten seconds is far more
/// than a healthy server needs and short enough that a stalled one does not
/// hold a slot for long.
pub(crate) const DEFAULT_ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the caller gets when the retry layer gives up on a request whose
/// last attempt got a response (a 429, a 529, a 5xx): retries ran out, the
/// deadline or the retry budget stopped them, or the server named a delay
/// above [`max_server_delay`](RetryAfterBuilder::max_server_delay).
///
/// An attempt that failed without a response always gives an error
/// ([`Error::RetriesExhausted`](crate::Error::RetriesExhausted) with the
/// inner error as its source): there is no response to return.
///
/// # Which to choose
///
/// A client that acts on failures wants [`GiveUpPolicy::Error`] (the
/// default): a typed error, as the official SDKs raise, that still carries
/// what the server said. A gateway that forwards its upstream's answers
/// wants [`GiveUpPolicy::LastResponse`]: its callers get the API's own 429
/// or 529, headers and body unchanged, as tower's `Retry` returns the last
/// response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GiveUpPolicy {
    /// Fail with [`Error::RetriesExhausted`](crate::Error::RetriesExhausted)
    /// (or [`Error::RetryAfterTooLong`](crate::Error::RetryAfterTooLong))
    /// carrying the last response's status, headers, `request-id` and body
    /// (up to [`LastResponse::BODY_LIMIT`](crate::LastResponse::BODY_LIMIT)
    /// bytes, read within
    /// [`error_body_timeout`](RetryAfterBuilder::error_body_timeout)) in
    /// [`Error::last_response`](crate::Error::last_response). The default.
    #[default]
    Error,
    /// Return the last response as it came: status, headers and body
    /// untouched (its body not read). The give-up is still counted in
    /// [`RetrySnapshot::give_ups`](super::RetrySnapshot::give_ups).
    ///
    /// One exception: a 429 without a delay whose body says the monthly
    /// spend limit was reached is read to know it, and fails with
    /// [`Error::SpendLimitReached`](crate::Error::SpendLimitReached) when
    /// the layer would have retried it.
    LastResponse,
}

/// What the retry layer does with an attempt that failed, without a
/// response, after it may have reached the server.
///
/// # Why a choice
///
/// After a connection reset mid-request the server may already have done the
/// work (and charged for it): sending the request again may run it twice.
/// Anthropic's API has no idempotency key to make a replay safe, and the
/// official SDKs retry such failures anyway. Whether a duplicate or a lost
/// answer is worse depends on the caller: a chat reply can be regenerated, a
/// tool call with side effects should not run twice.
///
/// # What counts as sent
///
/// An attempt is *sent* once the inner service's `call` was made and its
/// future polled, and that future then failed without a response head,
/// unless the error shows that the request could not have left this
/// process:
///
/// - a local refusal by this crate's inner layers
///   ([`Error::BudgetExceeded`](crate::Error::BudgetExceeded),
///   [`Error::Overloaded`](crate::Error::Overloaded));
/// - a connection that was never established
///   ([`classify::never_connected`](crate::classify::never_connected):
///   `ConnectionRefused` or `AddrNotAvailable` in the error's chain).
///
/// A reset, a broken pipe, an unexpected end of file, a timeout, or an error
/// of a type this crate does not know counts as sent. A response, even a
/// retryable status, is the server's own answer and is not concerned: a 429
/// or a 529 says the work was not done, and `x-should-retry` decides the rest.
///
/// Replays are counted in
/// [`RetrySnapshot::replays_after_send`](super::RetrySnapshot::replays_after_send).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AfterSend {
    /// Retry it, as the official SDKs do (the default).
    #[default]
    Retry,
    /// Do not retry it: the request fails with
    /// [`Error::RetriesExhausted`](crate::Error::RetriesExhausted), reason
    /// [`GiveUpReason::Sent`](crate::GiveUpReason::Sent), and the inner
    /// error as its source. Failures known to be before sending are still
    /// retried.
    Fail,
}

/// Applies [`RetryAfter`] to a service: honours `retry-after`, backs off with
/// jitter, replays bodies, and keeps one shared cooldown.
///
/// The layer owns the shared state (cooldown, retry budget, counters): every
/// service it builds, and every clone of those, shares it. Build one layer per
/// API key (or per limit you want to share); cloning the layer keeps sharing.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_llm_limits::retry::RetryAfterLayer;
///
/// // The defaults: 4 retries, 0.5 s doubling to 8 s, a 60 s cap on
/// // server delays, a 16 MiB replay buffer, tower's default budget.
/// let interactive = RetryAfterLayer::anthropic();
///
/// // A batch job that would rather wait out a long ITPM delay.
/// let batch = RetryAfterLayer::builder()
///     .max_retries(8)
///     .max_server_delay(Duration::from_secs(15 * 60))
///     .deadline(Duration::from_secs(60 * 60))
///     .build();
/// # let _ = (interactive, batch);
/// ```
#[derive(Debug, Clone)]
pub struct RetryAfterLayer {
    shared: Arc<Shared>,
}

impl RetryAfterLayer {
    /// The defaults for Anthropic's Messages API: 4 retries, full-jitter backoff
    /// from 0.5 s doubling to 8 s, server delays waited up to 60 s (longer ones
    /// are returned at once as [`Error::RetryAfterTooLong`](crate::Error::RetryAfterTooLong)),
    /// no deadline, bodies buffered up to 16 MiB, and the
    /// default [`RetryBudget`].
    pub fn anthropic() -> Self {
        Self::builder().build()
    }

    /// A builder starting from the [`anthropic`](Self::anthropic) defaults.
    pub fn builder() -> RetryAfterBuilder {
        RetryAfterBuilder::default()
    }

    /// Counters and the state of the shared cooldown and budget.
    pub fn snapshot(&self) -> RetrySnapshot {
        self.shared.snapshot()
    }

    /// Ends the shared cooldown now: requests that start from now on are sent
    /// without waiting (until the next 429 or 529 that names a delay).
    ///
    /// Requests already waiting out the cooldown keep waiting the delay they
    /// were given, at most [`max_server_delay`](RetryAfterBuilder::max_server_delay):
    /// the cooldown never runs longer than that cap.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::retry::RetryAfterLayer;
    ///
    /// let layer = RetryAfterLayer::anthropic();
    /// layer.reset_cooldown();
    /// assert_eq!(layer.snapshot().cooldown_remaining, None);
    /// ```
    pub fn reset_cooldown(&self) {
        self.shared.cooldown.reset();
    }
}

impl Default for RetryAfterLayer {
    fn default() -> Self {
        Self::anthropic()
    }
}

impl<S> Layer<S> for RetryAfterLayer {
    type Service = RetryAfter<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryAfter::from_shared(inner, self.shared.clone())
    }
}

/// Configures a [`RetryAfterLayer`]. Start from [`RetryAfterLayer::builder`].
#[derive(Clone)]
pub struct RetryAfterBuilder {
    max_retries: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_server_delay: Duration,
    deadline: Option<Duration>,
    buffer_limit: usize,
    error_body_timeout: Duration,
    after_send: AfterSend,
    budget: Option<RetryBudget>,
    jitter: Option<Arc<dyn Jitter>>,
    classifier: Classifier,
    wall_clock: WallClock,
    give_up: GiveUpPolicy,
    hooks: RetryHooks,
}

impl std::fmt::Debug for RetryAfterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryAfterBuilder")
            .field("max_retries", &self.max_retries)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_server_delay", &self.max_server_delay)
            .field("deadline", &self.deadline)
            .field("buffer_limit", &self.buffer_limit)
            .field("error_body_timeout", &self.error_body_timeout)
            .field("after_send", &self.after_send)
            .field("budget", &self.budget)
            .field("custom_jitter", &self.jitter.is_some())
            .field("classifier", &self.classifier)
            .field("wall_clock", &self.wall_clock)
            .field("give_up", &self.give_up)
            .field("hooks", &self.hooks)
            .finish()
    }
}

impl Default for RetryAfterBuilder {
    fn default() -> Self {
        RetryAfterBuilder {
            max_retries: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            max_server_delay: Duration::from_secs(60),
            deadline: None,
            buffer_limit: DEFAULT_BUFFER_LIMIT,
            error_body_timeout: DEFAULT_ERROR_BODY_TIMEOUT,
            after_send: AfterSend::Retry,
            budget: Some(RetryBudget::default()),
            jitter: None,
            classifier: Classifier::new(),
            wall_clock: WallClock::system(),
            give_up: GiveUpPolicy::Error,
            hooks: RetryHooks::default(),
        }
    }
}

impl RetryAfterBuilder {
    /// Retries after the first attempt (default 4, so 5 attempts at most).
    /// 0 turns retrying off but keeps the cooldown and the typed errors.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Bound of the first backoff delay (default 0.5 s); it doubles on each
    /// retry up to [`max_backoff`](Self::max_backoff). The delay waited is a
    /// uniform draw below that bound (full jitter).
    pub fn initial_backoff(mut self, d: Duration) -> Self {
        self.initial_backoff = d;
        self
    }

    /// Largest backoff bound (default 8 s).
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// Longest delay named by the server that is waited out (default 60 s).
    /// A longer one is not waited, and never replaced by a short backoff: the
    /// request that received it fails at once with
    /// [`Error::RetryAfterTooLong`](crate::Error::RetryAfterTooLong), carrying the
    /// delay, so the caller decides. Raise it for batch jobs.
    ///
    /// It also caps the shared cooldown: a 429 or 529 naming a longer delay
    /// pauses the layer's other requests for this long only, after which
    /// they ask the server again (one long `retry-after` cannot stop the
    /// client for a day).
    pub fn max_server_delay(mut self, d: Duration) -> Self {
        self.max_server_delay = d;
        self
    }

    /// An overall deadline per request, counted from `call`, that bounds
    /// the whole request: no attempt starts after it, a wait of this layer
    /// that would end after it is not begun, and the waits of this crate's
    /// layers inside this one (the token budget's queue, the concurrency
    /// queue) stop when it passes. The request then fails with
    /// [`Error::RetriesExhausted`](crate::Error::RetriesExhausted) and
    /// [`GiveUpReason::Deadline`](crate::GiveUpReason::Deadline).
    ///
    /// It does not cut an attempt in flight once sent (an answer being
    /// generated): use `tower::timeout` inside for that.
    /// If the shared cooldown would hold even the first attempt past the
    /// deadline, the request fails without any attempt (`attempts: 0`).
    ///
    /// This is the one whole-request deadline of the stack: the preset
    /// ([`LimitsLayer`](crate::preset::LimitsLayer)) has none by default; give
    /// it one with `with_retry(RetryAfterLayer::builder().deadline(..).build())`.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Largest request body kept for replays. Default 16 MiB (16 × 1024 × 1024
    /// bytes).
    /// A larger body passes through unchanged and its request is never retried.
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self
    }

    /// How long the error body of a 429 without `retry-after` may take to
    /// arrive (default 10 s).
    ///
    /// The layer reads that body to tell the spend-cap 429 (not retried)
    /// from a rate-limit 429 (retried). A body that has not ended by then is
    /// dropped, which frees whatever it held (a concurrency slot, a
    /// connection), and the response is judged as if the body said nothing:
    /// a rate-limit 429, retried after backoff. Counted in
    /// [`RetrySnapshot::error_body_timeouts`].
    pub fn error_body_timeout(mut self, timeout: Duration) -> Self {
        self.error_body_timeout = timeout;
        self
    }

    /// Whether an attempt that failed after it may have reached the server is
    /// sent again (default [`AfterSend::Retry`], as the official SDKs do).
    /// See [`AfterSend`] for what counts as sent.
    pub fn after_send(mut self, policy: AfterSend) -> Self {
        self.after_send = policy;
        self
    }

    /// The retry budget shared by all services of the layer (default
    /// [`RetryBudget::default`]).
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// No retry budget: only `max_retries` and the deadline bound retries.
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// The random source of backoff jitter. Default: a small, fast,
    /// lock-free splitmix64 generator seeded from the standard library's
    /// per-process random keys (not cryptographic: it only spreads retries).
    pub fn jitter(mut self, jitter: impl Jitter) -> Self {
        self.jitter = Some(Arc::new(jitter));
        self
    }

    /// Decides, before the built-in rules, what an inner error (no response)
    /// is: `Some(`[`Class::Permanent`]`)` returns it to the caller at once;
    /// any other class is retried after backoff; `None` leaves it to the
    /// built-in rules (see [`classify`](crate::classify)).
    ///
    /// Without a hook every inner error that is not one of this crate's own
    /// verdicts is retried, whether recognised as a timeout or a connection
    /// error or of a type unknown here, as Anthropic's SDKs retry any
    /// connection-level failure: the request never got a response.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::classify::Class;
    /// use tower_llm_limits::retry::RetryAfterLayer;
    ///
    /// #[derive(Debug)]
    /// struct InvalidUri;
    /// impl std::fmt::Display for InvalidUri {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         f.write_str("invalid uri")
    ///     }
    /// }
    /// impl std::error::Error for InvalidUri {}
    ///
    /// let layer = RetryAfterLayer::builder()
    ///     .error_classifier(|e| e.is::<InvalidUri>().then_some(Class::Permanent))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn error_classifier<F>(mut self, hook: F) -> Self
    where
        F: Fn(&(dyn std::error::Error + 'static)) -> Option<Class> + Send + Sync + 'static,
    {
        self.classifier = Classifier::with_hook(hook);
        self
    }

    /// The wall clock that the server's reset instants
    /// (`anthropic-ratelimit-*-reset`) and HTTP-date `retry-after`s are read
    /// against (default: the system clock). A simulation under tokio's paused
    /// clock gives its emulated server and this layer the same
    /// [`WallClock::following_tokio`], so that delays read from headers do
    /// not depend on the real clock.
    pub fn wall_clock(mut self, clock: WallClock) -> Self {
        self.wall_clock = clock;
        self
    }

    /// What the caller gets when the layer gives up on a request whose last
    /// attempt got a response (default [`GiveUpPolicy::Error`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::retry::{GiveUpPolicy, RetryAfterLayer};
    ///
    /// // A gateway: its callers get the API's own last answer.
    /// let layer = RetryAfterLayer::builder()
    ///     .give_up(GiveUpPolicy::LastResponse)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn give_up(mut self, policy: GiveUpPolicy) -> Self {
        self.give_up = policy;
        self
    }

    /// Called each time a failed attempt is about to be retried, with the
    /// attempt's number, the failure and the delay before the retry
    /// ([`RetryEvent`](crate::observe::RetryEvent)). It runs inside the
    /// request's `poll`: keep it quick. See [`observe`](crate::observe).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    /// use tower_llm_limits::retry::RetryAfterLayer;
    ///
    /// let retries = Arc::new(AtomicU64::new(0));
    /// let seen = retries.clone();
    /// let layer = RetryAfterLayer::builder()
    ///     .on_retry(move |event| {
    ///         seen.fetch_add(1, Ordering::Relaxed);
    ///         let _ = (event.attempt, event.status, event.delay, event.cause);
    ///     })
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_retry<F>(mut self, f: F) -> Self
    where
        F: for<'a> Fn(&RetryEvent<'a>) + Send + Sync + 'static,
    {
        self.hooks.on_retry = Some(Arc::new(f));
        self
    }

    /// Builds the layer and its shared state (a fresh cooldown and budget).
    pub fn build(self) -> RetryAfterLayer {
        let jitter = self
            .jitter
            .unwrap_or_else(|| Arc::new(FastRng::new()) as Arc<dyn Jitter>);
        RetryAfterLayer {
            shared: Arc::new(Shared {
                config: Config {
                    max_retries: self.max_retries,
                    initial_backoff: self.initial_backoff,
                    max_backoff: self.max_backoff,
                    max_server_delay: self.max_server_delay,
                    deadline: self.deadline,
                    buffer_limit: self.buffer_limit,
                    error_body_timeout: self.error_body_timeout,
                    after_send: self.after_send,
                    jitter,
                    classifier: self.classifier,
                    wall_clock: self.wall_clock,
                    give_up: self.give_up,
                    hooks: self.hooks,
                },
                cooldown: Cooldown::new(),
                budget: self.budget.map(BudgetState::new),
                counters: Counters::default(),
            }),
        }
    }
}
