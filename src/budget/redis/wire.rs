//! Encoding operations as script arguments, decoding the scripts' replies.

use std::time::Duration;

use tokio::time::Instant;

use redis::ScriptInvocation;

use super::error::RedisLedgerError;
use super::prompt::Markers;
use crate::budget::ledger::{BucketState, CostDelta, Costs, LinePlace, OutputSample, Reservation};
use crate::budget::Limits;
use crate::headers::LimitStatus;
use crate::Dimension;

/// Units of a level per token in the scripts: one minute in microseconds.
pub(super) const UNITS_PER_TOKEN: f64 = 60_000_000.0;

/// A buffered write: applied by the next batch for its key.
#[derive(Debug, Clone)]
pub(super) enum Op {
    /// Prompt-cache prefixes a response confirmed cached (their marker
    /// names), for `for_us` from the batch's Redis time, each with its size
    /// as the server counted it (`sizes`, beside `names`; 0: not known).
    Cached {
        names: Vec<u64>,
        sizes: Vec<u64>,
        for_us: u64,
    },
    /// Prefixes this ledger no longer writes (their marker names): the
    /// answer began, or the request ended without one.
    Written {
        names: Vec<u64>,
    },
    /// Prefixes a queued request of this ledger will write (the longest
    /// `tokens`), marked for `for_us` ([`Ledger::prefixes_queued`](crate::budget::ledger::Ledger::prefixes_queued)).
    Queued {
        names: Vec<u64>,
        tokens: u64,
        for_us: u64,
    },
    /// Prefixes no longer queued here (the request left the line).
    Dequeued {
        names: Vec<u64>,
    },
    /// An answer's output, for the fleet's learned output
    /// ([`Ledger::output_learned`](crate::budget::ledger::Ledger::output_learned)).
    Output(OutputSample),
    Settle {
        limits: Limits,
        delta: CostDelta,
    },
    Sync {
        limits: Limits,
        dimension: Dimension,
        status: LimitStatus,
        /// When the answer's headers were read: the server's remaining is
        /// as of then, and its bucket has refilled since (the op rides on
        /// the key's next call, which may come seconds later); the script
        /// counts that refill, less [`SYNC_AGE_KEPT`].
        at: Instant,
    },
}

impl Op {
    /// Whether it waits for the key's next call rather than costing one:
    /// a prompt-cache marker, or a header sync (a response's settlement,
    /// or the key's next reservation in this process, carries it).
    pub(super) fn rides(&self) -> bool {
        matches!(self, Op::Cached { .. } | Op::Sync { .. } | Op::Output(_))
    }
}

/// What a batch answered.
#[derive(Debug, Clone)]
pub(super) struct Applied {
    /// Redis `TIME` at which the batch ran, in microseconds since the epoch.
    pub now_us: u64,
    /// The reservation's answer, if the batch ended with one.
    pub reservation: Option<Reservation>,
    /// The prompt-cache markers recorded since the version asked after (when
    /// the ledger shares the prompt cache).
    pub markers: Option<Markers>,
    /// A wait answered because another ledger writes this pending prefix
    /// (its marker name).
    pub writing: Option<u64>,
    /// That writer is a request still queued in another ledger's line
    /// (not yet admitted).
    pub writing_queued: bool,
    /// The key's output samples told by other ledgers after the position
    /// asked after.
    pub outputs: Outputs,
}

/// The output samples a batch returned: the key's newest position, and the
/// samples of other ledgers after the position asked after, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Outputs {
    pub position: u64,
    pub samples: Vec<OutputSample>,
}

/// A reservation's prefixes, as marker names ([`PrefixIntent`](crate::budget::ledger::PrefixIntent)).
#[derive(Debug, Clone, Default)]
pub(super) struct Names {
    /// Marked as being written if admitted, for `for_us`.
    pub writes: Vec<u64>,
    /// Not admitted while another ledger writes one of them.
    pub pending: Vec<u64>,
    pub for_us: u64,
    /// How long a held head keeps its ticket (the budget's cache hold).
    pub hold_us: u64,
    /// The tokens of the longest write.
    pub tokens: u64,
    /// How long the writes are marked as queued if answered a wait (0: not).
    pub queued_us: u64,
    /// The writes of this ledger's other queued requests on the key: their
    /// markers are renewed if the reservation is answered a wait.
    pub renew: Vec<u64>,
    /// The writer grace, in microseconds, at the request's first ask (0:
    /// none).
    pub grace_us: u64,
    /// Its pending prefixes shorter than its longest write: it is given the
    /// grace while one of them has no marker.
    pub shorter: Vec<u64>,
}

fn push_limits(inv: &mut ScriptInvocation<'_>, limits: &Limits) {
    for d in Dimension::ALL {
        inv.arg(limits.get(d).unwrap_or(0));
    }
}

fn dim_number(d: Dimension) -> u8 {
    match d {
        Dimension::Requests => 1,
        Dimension::InputTokens => 2,
        Dimension::OutputTokens => 3,
    }
}

fn dim_of(n: i64) -> Result<Dimension, RedisLedgerError> {
    match n {
        1 => Ok(Dimension::Requests),
        2 => Ok(Dimension::InputTokens),
        3 => Ok(Dimension::OutputTokens),
        _ => Err(RedisLedgerError::Reply(format!("dimension {n}"))),
    }
}

fn as_i64_or_absent(v: Option<u64>) -> i64 {
    v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// How much of a sync's age is not counted as the server's refill: the
/// server read its bucket before the answer's headers came back (the
/// answer's time in flight), so a sync sent at once counts nothing, and a
/// late one counts the refill since its headers were read less this.
pub(super) const SYNC_AGE_KEPT: Duration = Duration::from_millis(100);

/// Appends one buffered write (`now`: when the batch is sent, for a
/// sync's age).
pub(super) fn push_op(inv: &mut ScriptInvocation<'_>, op: &Op, now: Instant) {
    match op {
        Op::Cached {
            names,
            sizes,
            for_us,
        } => {
            inv.arg("C").arg(*for_us).arg(names.len());
            for (i, name) in names.iter().enumerate() {
                inv.arg(*name).arg(sizes.get(i).copied().unwrap_or(0));
            }
        }
        Op::Written { names } => {
            inv.arg("W").arg(names.len());
            for name in names {
                inv.arg(*name);
            }
        }
        Op::Queued {
            names,
            tokens,
            for_us,
        } => {
            inv.arg("U").arg(*for_us).arg(*tokens).arg(names.len());
            for name in names {
                inv.arg(*name);
            }
        }
        Op::Dequeued { names } => {
            inv.arg("D").arg(names.len());
            for name in names {
                inv.arg(*name);
            }
        }
        Op::Output(sample) => {
            inv.arg("O")
                .arg(sample.output_tokens)
                .arg(sample.max_tokens);
        }
        Op::Settle { limits, delta } => {
            inv.arg("S");
            push_limits(inv, limits);
            for d in Dimension::ALL {
                inv.arg(delta.get(d));
            }
        }
        Op::Sync {
            limits,
            dimension,
            status,
            at,
        } => {
            inv.arg("Y");
            push_limits(inv, limits);
            inv.arg(dim_number(*dimension));
            inv.arg(as_i64_or_absent(status.limit));
            inv.arg(as_i64_or_absent(status.remaining));
            let reset = status
                .reset_in
                .map(|r| u64::try_from(r.as_micros()).unwrap_or(u64::MAX));
            inv.arg(as_i64_or_absent(reset));
            let age = now
                .saturating_duration_since(*at)
                .saturating_sub(SYNC_AGE_KEPT)
                .as_micros();
            inv.arg(u64::try_from(age).unwrap_or(u64::MAX));
        }
    }
}

/// Appends a reservation's prefixes (just before it).
pub(super) fn push_names(inv: &mut ScriptInvocation<'_>, names: &Names) {
    inv.arg("P")
        .arg(names.for_us)
        .arg(names.hold_us)
        .arg(names.tokens)
        .arg(names.queued_us)
        .arg(names.writes.len());
    for name in &names.writes {
        inv.arg(*name);
    }
    inv.arg(names.pending.len());
    for name in &names.pending {
        inv.arg(*name);
    }
    inv.arg(names.renew.len());
    for name in &names.renew {
        inv.arg(*name);
    }
    inv.arg(names.grace_us).arg(names.shorter.len());
    for name in &names.shorter {
        inv.arg(*name);
    }
}

/// Appends the reservation (the batch's last operation), with the
/// headroom that must stay free after it, if any.
pub(super) fn push_reserve(
    inv: &mut ScriptInvocation<'_>,
    limits: &Limits,
    costs: Costs,
    headroom: Option<Costs>,
    line: Option<LinePlace>,
) {
    if let Some(place) = line {
        // Q: in the fleet's line (`Ledger::reserve_in_line`).
        inv.arg("Q");
        push_limits(inv, limits);
        let headroom = headroom.unwrap_or_default();
        for d in Dimension::ALL {
            inv.arg(costs.get(d));
        }
        for d in Dimension::ALL {
            inv.arg(headroom.get(d));
        }
        inv.arg(format!("{:016x}", place.owner));
        inv.arg(u8::from(place.head));
        inv.arg(place.request);
        inv.arg(u64::try_from(place.waited.as_micros()).unwrap_or(u64::MAX));
        return;
    }
    inv.arg(if headroom.is_some() { "H" } else { "R" });
    push_limits(inv, limits);
    for d in Dimension::ALL {
        inv.arg(costs.get(d));
    }
    if let Some(headroom) = headroom {
        for d in Dimension::ALL {
            inv.arg(headroom.get(d));
        }
    }
}

fn non_negative(v: i64) -> Result<u64, RedisLedgerError> {
    u64::try_from(v).map_err(|_| RedisLedgerError::Reply(format!("negative value {v}")))
}

/// Decodes the apply script's `{now, kind, a, b, c}`, then the output
/// samples `{position, m, output1, max_tokens1, ...}`, then, when the
/// prompt cache is shared, `{version, n, name1, cached1, writing1, size1,
/// ...}`.
pub(super) fn parse_applied(reply: &[i64]) -> Result<Applied, RedisLedgerError> {
    let (head, tail) = reply.split_at(reply.len().min(7));
    let [now, kind, a, b, c, position, m] = head else {
        return Err(RedisLedgerError::Reply(format!(
            "{} values instead of at least 7",
            reply.len()
        )));
    };
    let m = usize::try_from(*m)
        .ok()
        .filter(|m| m.saturating_mul(2) <= tail.len())
        .ok_or_else(|| RedisLedgerError::Reply(format!("{m} output samples")))?;
    let (samples, tail) = tail.split_at(m * 2);
    let mut outputs = Outputs {
        position: non_negative(*position)?,
        samples: Vec::with_capacity(m),
    };
    for s in samples.chunks_exact(2) {
        outputs.samples.push(OutputSample {
            output_tokens: non_negative(s[0])?,
            max_tokens: non_negative(s[1])?,
        });
    }
    let markers = match tail {
        [] => None,
        [version, n, rest @ ..]
            if usize::try_from(*n).ok() == Some(rest.len() / 4) && rest.len() % 4 == 0 =>
        {
            let mut cached = Vec::with_capacity(rest.len() / 4);
            for m in rest.chunks_exact(4) {
                // A negative expiry: the writer is a queued request.
                cached.push(super::prompt::Marker {
                    name: non_negative(m[0])?,
                    cached_until: non_negative(m[1])?,
                    writing_until: m[2].unsigned_abs(),
                    queued: m[2] < 0,
                    served: non_negative(m[3])?,
                });
            }
            Some(Markers {
                version: non_negative(*version)?,
                cached,
            })
        }
        _ => {
            return Err(RedisLedgerError::Reply(format!(
                "{} values after the answer",
                tail.len()
            )))
        }
    };
    // A negative name: the writer is a queued request.
    let writing = (*kind == 2 && *c != 0).then(|| c.unsigned_abs());
    let writing_queued = *kind == 2 && *c < 0;
    let reservation = match kind {
        0 => None,
        1 => Some(Reservation::Admitted),
        2 => Some(Reservation::Wait {
            retry_in: Duration::from_micros(non_negative(*a)?),
            dimension: dim_of(*b)?,
        }),
        3 => Some(Reservation::Never {
            dimension: dim_of(*a)?,
            cost: non_negative(*b)?,
            capacity: non_negative(*c)?,
        }),
        other => return Err(RedisLedgerError::Reply(format!("answer kind {other}"))),
    };
    Ok(Applied {
        now_us: non_negative(*now)?,
        reservation,
        markers,
        writing,
        writing_queued,
        outputs,
    })
}

/// Decodes the read script's reply.
pub(super) fn parse_state(reply: &[i64]) -> Result<Option<[BucketState; 3]>, RedisLedgerError> {
    match reply {
        [_, 0] => Ok(None),
        [_, 1, rest @ ..] if rest.len() == 12 => {
            let bucket = |i: usize| {
                let (limit, learned, level, cap) = (
                    rest[4 * i],
                    rest[4 * i + 1],
                    rest[4 * i + 2],
                    rest[4 * i + 3],
                );
                if limit < 0 {
                    BucketState {
                        limit: None,
                        learned: false,
                        available: f64::INFINITY,
                        capacity: f64::INFINITY,
                    }
                } else {
                    BucketState {
                        limit: u64::try_from(limit).ok(),
                        learned: learned == 1,
                        available: level as f64 / UNITS_PER_TOKEN,
                        capacity: cap as f64 / UNITS_PER_TOKEN,
                    }
                }
            };
            Ok(Some([bucket(0), bucket(1), bucket(2)]))
        }
        _ => Err(RedisLedgerError::Reply(format!(
            "state of {} values",
            reply.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_decode_and_garbage_is_a_typed_error() {
        let wait = parse_applied(&[5, 2, 1_500, 2, 0, 0, 0]).unwrap();
        assert_eq!(wait.now_us, 5);
        assert_eq!(
            wait.reservation,
            Some(Reservation::Wait {
                retry_in: Duration::from_micros(1_500),
                dimension: Dimension::InputTokens
            })
        );
        let never = parse_applied(&[5, 3, 3, 9_000, 8_000, 0, 0]).unwrap();
        assert_eq!(
            never.reservation,
            Some(Reservation::Never {
                dimension: Dimension::OutputTokens,
                cost: 9_000,
                capacity: 8_000
            })
        );
        assert!(parse_applied(&[5, 1, 0, 0]).is_err());
        let marked =
            parse_applied(&[5, 1, 0, 0, 0, 0, 0, 9, 2, 11, 700, 0, 1_816, 12, 0, 900, 0]).unwrap();
        let marker = |name, cached_until, writing_until, served| super::super::prompt::Marker {
            name,
            cached_until,
            writing_until,
            queued: false,
            served,
        };
        assert_eq!(
            marked.markers,
            Some(Markers {
                version: 9,
                cached: vec![marker(11, 700, 0, 1_816), marker(12, 0, 900, 0)]
            })
        );
        assert_eq!(marked.writing, None);
        let held = parse_applied(&[5, 2, 1_000, 2, 77, 0, 0, 9, 0]).unwrap();
        assert_eq!(held.writing, Some(77));
        assert_eq!(
            parse_applied(&[5, 1, 0, 0, 0, 0, 0, 9, 0]).unwrap().markers,
            Some(Markers::default()).map(|m| Markers { version: 9, ..m })
        );
        assert!(parse_applied(&[5, 1, 0, 0, 0, 0, 0, 9, 2, 11, 700, 0, 0]).is_err());
        assert!(parse_applied(&[5, 1, 0, 0, 0, 0, 0, 9, 1, 11, 700, 0]).is_err());
        assert!(parse_applied(&[5, 1, 0, 0, 0, 0, 0, 9]).is_err());
        assert!(parse_applied(&[5, 1, 0, 0, 0, 0, 0, 9, 1, 11, -1, 0, 0]).is_err());
        assert!(parse_applied(&[5, 1, 0, 0, 0, 0, 0, 9, 1, 11, 700, 0, -1]).is_err());
        // A queued writer: its name (and its marker's expiry) negative.
        let queued = parse_applied(&[5, 2, 1_000, 2, -4, 0, 0, 9, 1, 4, 0, -900, 0]).unwrap();
        assert_eq!(queued.writing, Some(4));
        assert!(queued.writing_queued);
        assert!(!held.writing_queued);
        assert_eq!(
            queued.markers.map(|m| m.cached),
            Some(vec![super::super::prompt::Marker {
                name: 4,
                cached_until: 0,
                writing_until: 900,
                queued: true,
                served: 0,
            }])
        );
        assert!(parse_applied(&[5, 7, 0, 0, 0, 0, 0]).is_err());
        let learned = parse_applied(&[5, 1, 0, 0, 0, 40, 2, 300, 4_096, 120, 512]).unwrap();
        let sample = |output_tokens, max_tokens| OutputSample {
            output_tokens,
            max_tokens,
        };
        assert_eq!(
            learned.outputs,
            Outputs {
                position: 40,
                samples: vec![sample(300, 4_096), sample(120, 512)]
            }
        );
        assert_eq!(learned.markers, None);
        assert!(parse_applied(&[5, 1, 0, 0, 0, 40, 2, 300, 4_096]).is_err());
        assert!(parse_applied(&[5, 1, 0, 0, 0, 40, 1, -300, 4_096]).is_err());
        assert!(parse_applied(&[5, 1, 0, 0, 0]).is_err());
        assert!(parse_applied(&[5, 2, 10, 4, 0, 0, 0]).is_err());
        assert!(parse_applied(&[5, 2, -1, 1, 0, 0, 0]).is_err());
        assert_eq!(parse_state(&[5, 0]).unwrap(), None);
        assert!(parse_state(&[5, 1, 3]).is_err());
    }
}
