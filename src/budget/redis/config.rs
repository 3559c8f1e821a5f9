//! Building a [`RedisLedger`](super::RedisLedger): its settings.

use std::time::Duration;

use super::error::RedisLedgerError;

/// What a [`RedisLedger`](super::RedisLedger) does when Redis fails or does
/// not answer within the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultPolicy {
    /// Answer from a local in-memory ledger whose limits are the configured
    /// (or learned) limits divided by the number of
    /// [`replicas`](RedisLedgerBuilder::replicas), so that the fleet stays
    /// under the limit while Redis is away; the first failure is logged
    /// (`warn`), and so is the recovery (`info`). The default.
    #[default]
    FailOpen,
    /// Fail the reservation with a [`RedisLedgerError`] (the request is not
    /// sent); buffered settlements are kept and applied once Redis answers.
    FailClosed,
}

/// The settings of a [`RedisLedger`](super::RedisLedger); see
/// [`RedisLedger::builder`](super::RedisLedger::builder).
#[derive(Clone)]
pub struct RedisLedgerBuilder {
    pub(super) url: String,
    /// The nodes of a Redis Cluster (empty: one server at `url`).
    pub(super) cluster: Vec<String>,
    pub(super) prefix: String,
    pub(super) timeout: Duration,
    pub(super) policy: FaultPolicy,
    pub(super) replicas: u32,
    pub(super) window: Duration,
    pub(super) idle: Duration,
    pub(super) write_delay: Duration,
    pub(super) retry_interval: Duration,
    pub(super) claim_grace: Duration,
    pub(super) writer_grace: Duration,
    pub(super) share_prompt: bool,
}

impl std::fmt::Debug for RedisLedgerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never printed.
        f.debug_struct("RedisLedgerBuilder")
            .field("prefix", &self.prefix)
            .field("cluster_nodes", &self.cluster.len())
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("replicas", &self.replicas)
            .field("window", &self.window)
            .field("idle", &self.idle)
            .field("write_delay", &self.write_delay)
            .field("retry_interval", &self.retry_interval)
            .field("claim_grace", &self.claim_grace)
            .field("writer_grace", &self.writer_grace)
            .field("share_prompt_cache", &self.share_prompt)
            .finish_non_exhaustive()
    }
}

impl RedisLedgerBuilder {
    pub(super) fn new(url: &str) -> Self {
        RedisLedgerBuilder {
            url: url.to_owned(),
            cluster: Vec::new(),
            prefix: "tll".to_owned(),
            timeout: Duration::from_millis(50),
            policy: FaultPolicy::FailOpen,
            replicas: 1,
            window: Duration::from_secs(60),
            idle: Duration::from_secs(600),
            write_delay: Duration::from_millis(2),
            retry_interval: Duration::from_secs(1),
            claim_grace: Duration::from_secs(1),
            writer_grace: crate::budget::ledger::WRITER_GRACE,
            share_prompt: false,
        }
    }

    /// Talks to a Redis Cluster through redis-rs's cluster client instead of
    /// one server: `nodes` are some of its nodes' URLs (the URL given to
    /// [`RedisLedger::builder`](super::RedisLedger::builder) is added to
    /// them). A budget key's buckets live in one hash, so every call
    /// touches one slot.
    pub fn cluster<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cluster = std::iter::once(self.url.clone())
            .chain(nodes.into_iter().map(Into::into))
            .collect();
        self
    }

    /// The prefix of every Redis key (default `tll`): a budget key `k` is
    /// stored in the hash `<prefix>:{k}`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest wait for one Redis call (default 50 ms); past it the
    /// [`FaultPolicy`] applies.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to do when Redis fails (default [`FaultPolicy::FailOpen`]).
    pub fn fault_policy(mut self, policy: FaultPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many processes share the budget (default 1): with
    /// [`FaultPolicy::FailOpen`] each falls back to `limit / replicas`.
    pub fn replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas;
        self
    }

    /// The enforcement window (default 60 s, at most 60 s), as
    /// [`InMemoryLedger::with_window`](crate::budget::ledger::InMemoryLedger::with_window).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// How long a key stays in Redis after its buckets are full again
    /// (default 10 minutes), with the limits it learned from the headers.
    pub fn idle_ttl(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// How long settlements and syncs are buffered before they are sent
    /// (default 2 ms): the writes of one response go in one call, and a
    /// reservation on the same key carries any buffered writes with it.
    pub fn write_delay(mut self, delay: Duration) -> Self {
        self.write_delay = delay;
        self
    }

    /// After a failure, how long Redis is not asked (default 1 s): the
    /// fallback or the error answers at once meanwhile; then the next call
    /// tries Redis again, so the ledger recovers without a restart.
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// How long past its announced wait a process's ticket in the fleet's
    /// line (or its claim, outside the line) is kept for it when it does not
    /// ask again (default 1 s; see the cross-process rule in
    /// [`RedisLedger`](super::RedisLedger)).
    pub fn claim_grace(mut self, grace: Duration) -> Self {
        self.claim_grace = grace;
        self
    }

    /// With the prompt cache shared, how long a request that would write a
    /// prefix waits at its first ask while a shorter prefix of it has no
    /// marker in Redis yet (default 100 ms,
    /// [`WRITER_GRACE`](crate::budget::ledger::WRITER_GRACE); zero: never):
    /// time for a shorter request that arrived at the same moment in
    /// another process to get its marker into Redis, so that nested
    /// prefixes are written shortest first
    /// ([`PrefixIntent::shorter`](crate::budget::ledger::PrefixIntent::shorter)).
    /// Its own writes are marked as queued meanwhile. Make it longer than
    /// the write delay plus a round trip to Redis plus how late a
    /// process's task may run on a loaded machine. It costs only such a
    /// writer, only at its first ask: that latency, and one call more.
    pub fn writer_grace(mut self, grace: Duration) -> Self {
        self.writer_grace = grace;
        self
    }

    /// Shares the server's prompt cache among the processes (default
    /// `false`): the processes' estimators name a prompt prefix alike, and
    /// a prefix one process saw a response confirm as cached is charged as
    /// a read by the others (instead of as input they will not be charged),
    /// from their next call on the same budget key. The markers ride on the
    /// ledger's own calls: no call is added. A budget built with this
    /// ledger and its default estimator uses it by itself; an estimator of
    /// your own takes it through
    /// [`AnthropicEstimatorBuilder::shared_prompt_cache`](crate::estimate::AnthropicEstimatorBuilder::shared_prompt_cache)
    /// with [`Ledger::prompt_cache`](crate::budget::ledger::Ledger::prompt_cache).
    /// Stored in Redis: one key with the fleet's random hashing secret
    /// (`<prefix>:prompt-key`, kept), and per budget key at most 4,096
    /// prefix markers (two keys beside the buckets, under the same hash tag,
    /// expiring with the markers).
    pub fn share_prompt_cache(mut self, share: bool) -> Self {
        self.share_prompt = share;
        self
    }

    pub(super) fn validate(&self) -> Result<(), RedisLedgerError> {
        if self.window.is_zero() || self.window > Duration::from_secs(60) {
            return Err(RedisLedgerError::InvalidConfig(
                "the window must be longer than zero and at most 60 s",
            ));
        }
        if self.window.subsec_nanos() % 1_000 != 0 {
            return Err(RedisLedgerError::InvalidConfig(
                "the window must be a whole number of microseconds",
            ));
        }
        if self.replicas == 0 {
            return Err(RedisLedgerError::InvalidConfig(
                "replicas must be at least 1",
            ));
        }
        if self.timeout.is_zero() {
            return Err(RedisLedgerError::InvalidConfig(
                "the timeout must be longer than zero",
            ));
        }
        Ok(())
    }
}
