//! Uses the published crate as a user does, with its default features.
use tower_llm_limits::budget::{Limits, Tier};
use tower_llm_limits::preset::LimitsLayer;

fn main() {
    let tier: Tier = "tier1".parse().expect("a tier");
    let limits: Limits = "rpm=50,itpm=30000,otpm=8000".parse().expect("limits");
    let layer = LimitsLayer::anthropic(tier).with_budget(
        tower_llm_limits::budget::TokenBudgetLayer::anthropic(limits),
    );
    assert!(layer.budget().snapshot().keys.is_empty());
}
