//! The typed errors of the Redis ledger.

use std::fmt;
use std::time::Duration;

/// Why a [`RedisLedger`](super::RedisLedger) operation or its construction
/// failed. With [`FaultPolicy::FailClosed`](super::FaultPolicy::FailClosed)
/// a failed reservation fails the request with a
/// [`LedgerError`](crate::budget::ledger::LedgerError) whose
/// [`source`](std::error::Error::source) is this error (downcast it).
#[derive(Debug)]
#[non_exhaustive]
pub enum RedisLedgerError {
    /// Redis did not answer within the configured timeout.
    Timeout(Duration),
    /// Redis failed recently and is not asked again before the retry
    /// interval has passed (fail fast).
    Unavailable {
        /// How long until Redis is asked again.
        retry_in: Duration,
    },
    /// The connection or the command failed.
    Redis(redis::RedisError),
    /// A script answered something this version does not understand (a
    /// key written by another program, or a different version's script).
    Reply(String),
    /// A setting was refused when building the ledger.
    InvalidConfig(&'static str),
}

impl fmt::Display for RedisLedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisLedgerError::Timeout(after) => {
                write!(f, "redis ledger: no answer within {after:?}")
            }
            RedisLedgerError::Unavailable { retry_in } => write!(
                f,
                "redis ledger: redis failed recently, asked again in {retry_in:?}"
            ),
            RedisLedgerError::Redis(e) => write!(f, "redis ledger: {e}"),
            RedisLedgerError::Reply(what) => write!(f, "redis ledger: unexpected reply: {what}"),
            RedisLedgerError::InvalidConfig(what) => {
                write!(f, "redis ledger: invalid setting: {what}")
            }
        }
    }
}

impl std::error::Error for RedisLedgerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RedisLedgerError::Redis(e) => Some(e),
            _ => None,
        }
    }
}

impl From<redis::RedisError> for RedisLedgerError {
    fn from(e: redis::RedisError) -> Self {
        RedisLedgerError::Redis(e)
    }
}
