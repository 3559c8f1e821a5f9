//! The budget's configuration: limits per model class, modes, and how callers
//! are told apart.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::request::Parts;

use super::callers::{CallerRefusal, Callers};
use super::limits::{Limits, ModelClass, Tier};

/// Which limits apply to each model class.
///
/// A [`Tier`] or a [`Limits`] converts into one (`From`): the tier's limits,
/// or the same limits for every class. A class's limits are looked up in this order: limits set for that class
/// ([`LimitsConfig::with_class`]), then the [`Tier`] preset, then the default
/// limits. A limit left `None` is learned from the `anthropic-ratelimit-*`
/// headers of the first responses, and is not paced until then.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::budget::{LimitsConfig, Limits, ModelClass, Tier};
///
/// // Nothing configured: every limit is learned from the server's headers.
/// let learned = LimitsConfig::learned();
///
/// // A published tier, with one class overridden.
/// let custom = Limits::new().rpm(100).itpm(60_000).otpm(16_000);
/// let config = LimitsConfig::from(Tier::Tier1).with_class(ModelClass::of("claude-haiku-4-5"), custom);
/// assert_eq!(config.limits_for(ModelClass::of("claude-haiku-4-5")), custom);
/// # let _ = learned;
/// ```
#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    per_class: HashMap<ModelClass, Limits>,
    tier: Option<Tier>,
    default: Limits,
}

impl LimitsConfig {
    /// No limit configured: all are learned from the server's headers.
    pub fn learned() -> Self {
        Self::default()
    }

    /// Sets the limits of one model class, overriding the tier and the default.
    pub fn with_class(mut self, class: ModelClass, limits: Limits) -> Self {
        self.per_class.insert(class, limits);
        self
    }

    /// The published tier whose limits apply, if one was given.
    pub(crate) fn tier(&self) -> Option<Tier> {
        self.tier
    }

    /// Uses a published tier's limits for every class without its own.
    pub fn with_tier(mut self, tier: Tier) -> Self {
        self.tier = Some(tier);
        self
    }

    /// Sets the limits used for classes with neither their own limits nor a
    /// tier: with no tier, the same limits for every model class (each class
    /// still has its own buckets).
    pub fn with_default(mut self, limits: Limits) -> Self {
        self.default = limits;
        self
    }

    /// The limits that apply to `class`.
    pub fn limits_for(&self, class: ModelClass) -> Limits {
        if let Some(limits) = self.per_class.get(&class) {
            return *limits;
        }
        match self.tier {
            Some(tier) => tier.limits(class),
            None => self.default,
        }
    }
}

impl From<Tier> for LimitsConfig {
    fn from(tier: Tier) -> Self {
        Self::learned().with_tier(tier)
    }
}

impl From<Limits> for LimitsConfig {
    fn from(limits: Limits) -> Self {
        Self::learned().with_default(limits)
    }
}

/// What the budget does with a request it cannot admit now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BudgetMode {
    /// Wait, in order of arrival, until the budget can admit it (the default).
    #[default]
    Wait,
    /// Fail at once with [`Error::BudgetExceeded`](crate::Error::BudgetExceeded),
    /// which says how long the wait would have been. Enforce mode answers a
    /// 429 response instead.
    Reject,
}

/// Names the caller a request is charged to (enforce mode's budgets per
/// caller): a function of the request head, supplied by the user or made
/// from [`Callers`] (the secure default: authenticated caller keys).
///
/// In enforce mode a request the extractor gives no name (`None`) or refuses
/// ([`KeyExtractor::authenticating`]) is answered with 401 or 400 in the
/// API's error shape, before any budget is touched. In client mode a request
/// with no name is charged to the shared budget of its model class.
///
/// The name is used as a ledger key and appears in snapshots, so it must not
/// be a secret, nor a hash a secret can be guessed from: [`Callers`] names a
/// caller by its configured name, or by a hash under a random per-process key.
#[derive(Clone)]
pub struct KeyExtractor(Arc<ExtractFn>);

type ExtractFn = dyn Fn(&Parts) -> Result<Option<String>, CallerRefusal> + Send + Sync;

impl KeyExtractor {
    /// A key extractor from a function of the request head (`None`: no
    /// caller, refused with 401 in enforce mode).
    pub fn new<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self(Arc::new(move |parts: &Parts| Ok(f(parts))))
    }

    /// A key extractor that may refuse a request, with the refusal's status
    /// (401 or 400), in either mode.
    pub fn authenticating<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Result<String, CallerRefusal> + Send + Sync + 'static,
    {
        Self(Arc::new(move |parts: &Parts| f(parts).map(Some)))
    }

    pub(crate) fn key(&self, parts: &Parts) -> Result<Option<String>, CallerRefusal> {
        (self.0)(parts)
    }
}

impl From<Callers> for KeyExtractor {
    fn from(callers: Callers) -> Self {
        Self::authenticating(move |parts: &Parts| callers.identify(parts))
    }
}

impl fmt::Debug for KeyExtractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyExtractor(..)")
    }
}

/// How long a budget key may stay unused before it is forgotten (the default
/// of `TokenBudgetBuilder::idle_key_eviction`).
pub(crate) const DEFAULT_IDLE_KEY_EVICTION: std::time::Duration =
    std::time::Duration::from_secs(10 * 60);

/// The most keys a budget holds (the default of
/// `TokenBudgetBuilder::max_keys`).
pub(crate) const DEFAULT_MAX_KEYS: usize = 100_000;

/// The share of the input-token limit kept free in the bucket by
/// `TokenBudgetLayer::anthropic` (the builder's default is none).
pub(crate) const ANTHROPIC_INPUT_HEADROOM: f64 = 0.02;

/// How long [`TokenBudgetLayer::anthropic`](super::TokenBudgetLayer::anthropic)
/// lets a request that could go now hold for the prompt-cache prefix a
/// request in flight is writing: about the time a streamed answer takes to
/// begin, when the server makes the entry readable.
pub(crate) const ANTHROPIC_CACHE_HOLD: std::time::Duration = std::time::Duration::from_secs(5);

/// The `max_tokens` assumed for a request that does not say.
pub(crate) const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The expected-output ratio used in realtime mode until enough responses
/// were seen.
pub(crate) const OUTPUT_RATIO_PRIOR: f64 = 1.0;

/// Responses needed (per budget key) before the learned output ratio replaces
/// the prior.
pub(crate) const OUTPUT_RATIO_MIN_SAMPLES: usize = 20;

/// Responses in a row that must report the same new limit before it
/// replaces a limit learned earlier (the default of
/// `TokenBudgetBuilder::learned_limit_confirmations`): one odd response
/// cannot move the budget.
pub(crate) const DEFAULT_LEARN_CONFIRMATIONS: u32 = 3;

/// The number of recent responses the learned output ratio is taken from.
pub(crate) const OUTPUT_RATIO_WINDOW: usize = 200;

/// The quantile of `output_tokens / max_tokens` reserved as expected output.
pub(crate) const DEFAULT_OUTPUT_QUANTILE: f64 = 0.9;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_become_an_authenticating_extractor() {
        let extractor = KeyExtractor::from(Callers::new().caller("a", "sk-a"));
        let (anon, _) = http::Request::new(()).into_parts();
        assert_eq!(extractor.key(&anon), Err(CallerRefusal::MissingKey));
        let req = http::Request::builder()
            .header("x-api-key", "sk-a")
            .body(())
            .map(|r| r.into_parts().0);
        let parts = match req {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(extractor.key(&parts), Ok(Some("caller-a".into())));
    }
}
