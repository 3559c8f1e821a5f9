//! Which limits reported by the server are learned.
//!
//! A response's `anthropic-ratelimit-*-limit` header teaches the budget a
//! limit it was not given, or lowers one it was given. A single garbled or
//! hostile header must not be able to throttle the client (a limit of 1) or
//! to swing the budget back and forth, so a reported limit is learned only
//! if it is plausible:
//!
//! - **never below a floor** per dimension, by default the smallest value
//!   of the published tier tables ([`Limits::smallest_published`]: 50 RPM,
//!   30,000 ITPM, 8,000 OTPM); a lower report is ignored;
//! - **never from one response that disagrees with the last ones**: the
//!   first plausible report is learned at once (there is nothing to
//!   disagree with), and a different value replaces it only once that many
//!   responses in a row reported it
//!   (`DEFAULT_LEARN_CONFIRMATIONS` by
//!   default); a report equal to the learned limit resets the count.
//!
//! `remaining` and `reset` are not filtered here: they are synced against the
//! limit in force.

use super::limits::Limits;
use crate::Dimension;

/// The state of one dimension of one key: the limit learned so far and a
/// different value seen in the latest responses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LimitLearner {
    /// The limit learned, if any.
    adopted: Option<u64>,
    /// A value other than `adopted` and how many responses in a row said it.
    candidate: Option<(u64, u32)>,
}

/// The rules of [`LimitLearner::observe`], fixed when the layer is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LearnRules {
    /// The lowest limit believed, per dimension (`None`: no floor).
    pub(crate) floor: Limits,
    /// Responses in a row needed to replace a learned limit (at least 1).
    pub(crate) confirmations: u32,
}

impl LimitLearner {
    /// The limit learned so far, if any.
    pub(crate) fn adopted(&self) -> Option<u64> {
        self.adopted
    }

    /// Takes one reported limit; returns the limit to tell the ledger now
    /// (the learned one, which the report may have replaced), or `None` to
    /// tell it nothing (the report was not believed, and nothing is learned).
    pub(crate) fn observe(
        &mut self,
        dimension: Dimension,
        reported: u64,
        rules: &LearnRules,
    ) -> Option<u64> {
        let floor = rules.floor.get(dimension).unwrap_or(0).max(1);
        if reported < floor {
            tracing::debug!(%dimension, reported, floor, "budget: reported limit below the floor; ignored");
            return self.adopted;
        }
        match self.adopted {
            Some(adopted) if adopted == reported => {
                self.candidate = None;
            }
            None => self.adopted = Some(reported),
            Some(adopted) => {
                let seen = match self.candidate {
                    Some((value, n)) if value == reported => n.saturating_add(1),
                    _ => 1,
                };
                if seen >= rules.confirmations.max(1) {
                    tracing::debug!(%dimension, from = adopted, to = reported, "budget: learned limit changed");
                    self.adopted = Some(reported);
                    self.candidate = None;
                } else {
                    self.candidate = Some((reported, seen));
                }
            }
        }
        self.adopted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: LearnRules = LearnRules {
        floor: Limits::new().rpm(50).itpm(30_000).otpm(8_000),
        confirmations: 3,
    };

    #[test]
    fn below_the_floor_is_never_learned() {
        let mut l = LimitLearner::default();
        for reported in [0, 1, 49] {
            assert_eq!(l.observe(Dimension::Requests, reported, &RULES), None);
        }
        assert_eq!(l.observe(Dimension::InputTokens, 29_999, &RULES), None);
        assert_eq!(l.observe(Dimension::Requests, 50, &RULES), Some(50));
        // A low report after a learned limit changes nothing either.
        assert_eq!(l.observe(Dimension::Requests, 1, &RULES), Some(50));
        assert_eq!(
            l,
            LimitLearner {
                adopted: Some(50),
                candidate: None
            }
        );
    }

    #[test]
    fn a_change_needs_confirmations_in_a_row() {
        let mut l = LimitLearner::default();
        let d = Dimension::OutputTokens;
        assert_eq!(l.observe(d, 80_000, &RULES), Some(80_000));
        assert_eq!(l.observe(d, 9_000, &RULES), Some(80_000));
        assert_eq!(l.observe(d, 9_000, &RULES), Some(80_000));
        // Interrupted: the count starts again.
        assert_eq!(l.observe(d, 80_000, &RULES), Some(80_000));
        assert_eq!(l.observe(d, 9_000, &RULES), Some(80_000));
        assert_eq!(l.observe(d, 10_000, &RULES), Some(80_000));
        for _ in 0..2 {
            assert_eq!(l.observe(d, 9_000, &RULES), Some(80_000));
        }
        assert_eq!(l.observe(d, 9_000, &RULES), Some(9_000));
        let once = LearnRules {
            confirmations: 1,
            ..RULES
        };
        assert_eq!(l.observe(d, 8_000, &once), Some(8_000));
    }
}
