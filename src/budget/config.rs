//! The budget's configuration: limits per model class, modes, and how callers
//! are told apart.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::request::Parts;

use super::limits::{Limits, ModelClass, Tier};
use crate::mix::{fnv1a, FNV_OFFSET};

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

/// Names the caller a request is charged to (enforce mode's budgets per caller).
///
/// Returns `None` for a request with no caller: those share one budget.
/// The name is used as a ledger key and may appear in snapshots and tracing
/// events, so it must not be a secret: hash secrets (the default does).
#[derive(Clone)]
pub struct KeyExtractor(Arc<ExtractFn>);

type ExtractFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

impl KeyExtractor {
    /// A key extractor from a function of the request head.
    pub fn new<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self(Arc::new(f))
    }

    /// The default for enforce mode: a hash of the `x-api-key` header (never
    /// the key itself, which is neither logged nor echoed). Requests without
    /// the header share one budget.
    ///
    /// The hash (64-bit FNV-1a, printed in hex) is stable across processes, so
    /// a shared ledger sees the same key everywhere; it is an identifier, not a
    /// protection of the key against someone who can read the ledger.
    pub fn api_key_hash() -> Self {
        Self::new(|parts: &Parts| {
            parts
                .headers
                .get("x-api-key")
                .map(|v| format!("key-{:016x}", fnv1a(FNV_OFFSET, v.as_bytes())))
        })
    }

    pub(crate) fn key(&self, parts: &Parts) -> Option<String> {
        (self.0)(parts)
    }
}

impl fmt::Debug for KeyExtractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyExtractor(..)")
    }
}

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
    fn api_key_hash_hides_the_key() {
        let req = http::Request::builder()
            .header("x-api-key", "sk-ant-secret")
            .body(())
            .map(|r| r.into_parts().0);
        let parts = match req {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let key = KeyExtractor::api_key_hash().key(&parts);
        let key = key.unwrap_or_default();
        assert!(key.starts_with("key-"));
        assert!(!key.contains("secret"));
        assert_eq!(Some(key), KeyExtractor::api_key_hash().key(&parts));
        let (anon, _) = http::Request::new(()).into_parts();
        assert_eq!(KeyExtractor::api_key_hash().key(&anon), None);
    }
}
