//! [`RedisLedger`]: one budget shared by many processes, in Redis (or Valkey).
//!
//! A service with several replicas on one API key shares one tier's limits;
//! with a ledger per process, N processes pace to N times the limit. A
//! `RedisLedger` keeps the buckets in Redis instead, so every process that
//! points at the same Redis (and prefix) draws from one budget.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tower_llm_limits::budget::redis::{FaultPolicy, RedisLedger};
//! use tower_llm_limits::budget::{Limits, TokenBudgetLayer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let ledger = RedisLedger::builder("redis://127.0.0.1:6379/")
//!     .replicas(4) // falls back to limit / 4 per process while Redis is away
//!     .fault_policy(FaultPolicy::FailOpen)
//!     .connect()
//!     .await?;
//! let layer = TokenBudgetLayer::builder()
//!     .limits(Limits::new().rpm(50).itpm(30_000).otpm(8_000))
//!     .ledger(Arc::new(ledger))
//!     .build();
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! # How it works
//!
//! - **State**: one Redis hash per budget key, `<prefix>:{key}` (the hash tag
//!   puts everything of a key in one Cluster slot), holding per dimension a
//!   level and the instant it was last brought up to date, the limit learned
//!   from the server's headers, and the key's claim (below). Integers only:
//!   levels count 1/60,000,000 of a token (one minute in microseconds), so a
//!   limit of `L` per minute refills exactly `L` units per microsecond and
//!   the arithmetic is exact in Lua's numbers for limits up to 150 million
//!   per minute. Time is Redis's `TIME`, read inside the script: the
//!   processes' clocks never matter.
//! - **Scripts**: one Lua script applies a batch of operations to one key
//!   atomically (settlements, syncs, then at most one reservation, all or
//!   nothing over the three dimensions), another reads a key for snapshots.
//!   They are loaded when the ledger connects and run through redis-rs's
//!   `Script` (`EVALSHA`, loading the script again after `SCRIPT FLUSH` or a
//!   restart) over a `ConnectionManager` that reconnects by itself, or over
//!   redis-rs's cluster client for a Redis Cluster
//!   ([`RedisLedgerBuilder::cluster`]).
//! - **Round trips**: a reservation is one call, and checks the budget's
//!   input headroom itself ([`Ledger::reserve_with_headroom`]). Settlements
//!   and syncs are buffered for
//!   [`write_delay`](RedisLedgerBuilder::write_delay) (2 ms) and sent
//!   together, or carried by the key's next reservation, which applies them
//!   first. A response's header sync is taken at the response head but
//!   costs no call of its own: it rides on the key's next call, a
//!   reservation of this process or at the latest the batch that carries
//!   the response's settlement. So a request admitted at its first ask
//!   costs at most 2 calls however long its body streams, often fewer
//!   under load, and the server's `remaining` reaches the shared bucket
//!   with the process's next call, not when the body ends. (Held until the
//!   body ended, a sync lowered the bucket to a `remaining` seconds old and
//!   threw away the refill since: on the crate's 4-process simulation that
//!   cost about 0.04 of the workload minimum.) [`RedisLedger::stats`]
//!   counts the calls.
//! - **Semantics**: the same as
//!   [`InMemoryLedger`] (the same
//!   decisions and waits, within a microsecond, for the same operations at
//!   the same instants: a property test checks it), including learned
//!   limits, the thousands rounding of the server's `remaining`, and a sync
//!   that only ever lowers a bucket. Learned limits are shared by the fleet.
//! - **Prompt cache** (opt-in,
//!   [`share_prompt_cache`](RedisLedgerBuilder::share_prompt_cache)): the
//!   processes share the server's prompt cache, so they share what they know
//!   of it. Their estimators hash prefixes with one secret kept in Redis,
//!   and a prefix a response confirmed cached is marked under the budget
//!   key's hash tag, in the call that carries that response's settlement;
//!   each call on the key brings back the markers set since the process's
//!   last one. A request of another process is then charged only for what
//!   follows that prefix, from its estimate on if it arrives later, or from
//!   its next ask if it is waiting. No call is added for it. The prefixes a
//!   request writes are marked as being written by the call that admits it
//!   (`<prefix>:{key}:pw`), until its answer begins or it ends; a request of
//!   another process that would go now while one of its prefixes is being
//!   written is held by its own reservation's call, and waits for that
//!   write as for one of its own process
//!   ([`Ledger::reserve_in_line_with_prefixes`]). The prefixes a queued
//!   request will write are marked too (`<prefix>:{key}:pq`): by a refused
//!   head's own reservation call, or, for a request that joined its line
//!   behind others, by one buffered call within the write delay
//!   ([`Ledger::prefixes_queued`]); a request of another process whose
//!   longer write extends one of them holds for it the same way, so that
//!   nested prefixes are written shortest first. A writer whose shorter
//!   prefixes have no marker yet at its first ask waits the
//!   [`writer_grace`](RedisLedgerBuilder::writer_grace) (100 ms; its
//!   writes marked as queued meanwhile, by the same call), time for a
//!   shorter request that arrived with it in another process to mark its
//!   own ([`PrefixIntent::shorter`](super::ledger::PrefixIntent::shorter)).
//! - **Expiry**: a key expires [`idle_ttl`](RedisLedgerBuilder::idle_ttl)
//!   (10 minutes) after its buckets would be full again. A key deleted under
//!   the ledger starts again with full buckets.
//!
//! # Large requests across processes: the fleet's line
//!
//! Inside one process, the budget's FIFO queue per key lets only its head
//! ask the ledger, so a large request is not overtaken there. Across
//! processes, small requests from other processes could take every bit of
//! refill before a large request's wait is over. The rule
//! ([`Ledger::reserve_in_line`], the budget's every reservation on this
//! ledger): **the oldest waiting head of the fleet goes first.** Each
//! process's refused head leaves a ticket in the key's hash: its process
//! (the budget's owner id), its costs, its date (Redis's `TIME` less how
//! long it has waited in its process, so the line is in order of arrival;
//! among heads that arrived together, the first refused goes first) and an
//! expiry (its wait plus [`claim_grace`](RedisLedgerBuilder::claim_grace),
//! 1 s by default). A reservation from another process, of a request that
//! arrived after the oldest ticket, is admitted only if it fits beside that
//! ticket's costs, or if it fits and its refill time, added to what passing
//! requests already delayed the ticket, stays within 2 s (the budget's own
//! head-of-line bound, [`LINE_DELAY_BOUND`](super::ledger::LINE_DELAY_BOUND));
//! otherwise it waits to fit after the ticket, and asks again at the
//! latest [`LINE_RECHECK`](super::ledger::LINE_RECHECK) (20 ms) after the
//! ticket's due: nothing wakes it when that ticket's head goes, and that
//! head leaves its headroom in the bucket. The oldest head's own
//! process is not held by its ticket (its local queue already is), a head's
//! admission removes its ticket, and a process that went away loses its
//! ticket when it expires. So a large request waits for the refill and at
//! most 2 s of others' traffic, and the fleet's heads go in order of
//! arrival, not one process after another. It costs no call: the line is
//! read and written by the reservation's own script call.
//!
//! A caller that reserves outside the line ([`Ledger::reserve`] or
//! [`Ledger::reserve_with_headroom`] directly, not through a budget) is
//! under the earlier rule, the claim: the first process refused on a key
//! records its costs until its wait plus the grace, and another process's
//! reservation is admitted only if it fits beside them.
//!
//! # Faults
//!
//! Every call has a timeout, 50 ms by default. When Redis fails or times
//! out, [`FaultPolicy::FailOpen`] (the default) answers from a local
//! in-memory ledger with every limit divided by
//! [`replicas`](RedisLedgerBuilder::replicas) (so a fleet of that size stays
//! under the limit without Redis; it costs the throughput that an unequal
//! load across replicas leaves unused, and the local ledger starts full), and
//! logs once; [`FaultPolicy::FailClosed`] fails the reservation with
//! [`RedisLedgerError`]. For [`retry_interval`](RedisLedgerBuilder::retry_interval)
//! (1 s) after a failure Redis is not asked, then the next call tries it
//! again: when Redis is back the ledger uses it again, without a restart.
//! Buffered writes that failed go to the fallback (fail open) or wait for
//! the next call (fail closed, at most 1,024 per key). A call that timed
//! out may still have been applied by Redis: a reservation then stays
//! debited there although the fallback answered (the safe side: the shared
//! budget counts it, and the request is sent once).

mod config;
mod error;
mod prompt;
mod wire;

use std::collections::HashMap;
use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Script, ScriptInvocation};
use tokio::time::Instant;

pub use config::{FaultPolicy, RedisLedgerBuilder};
pub use error::RedisLedgerError;

use super::ledger::{
    BucketState, CostDelta, Costs, InMemoryLedger, Ledger, LedgerError, LedgerFuture, LinePlace,
    OutputLog, OutputSample, PrefixIntent, Reservation, ServedSize,
};
use super::Limits;
use crate::estimate::SharedPromptCache;
use crate::headers::LimitStatus;
use crate::Dimension;
use prompt::PromptMirror;
use wire::{Applied, Op};

/// At most this many buffered writes per key go in one call.
const MAX_BATCH: usize = 64;

/// At most this many writes wait per key while Redis is away (fail closed).
const MAX_PENDING: usize = 1_024;

/// A [`Ledger`] kept in Redis, shared by every process that uses the same
/// Redis and key prefix. See the [module docs](self) for the model, the
/// cross-process rule for large requests and the fault handling.
///
/// Cheap to clone: clones share the connection, the buffers and the
/// fallback.
#[derive(Clone)]
pub struct RedisLedger {
    inner: Arc<Inner>,
}

/// One server through a reconnecting manager, or a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    /// Loads a script (on every primary of a cluster), so that the first
    /// call does not pay for it.
    async fn load(&self, script: &Script) -> redis::RedisResult<String> {
        match self {
            Conn::Single(c) => script.prepare_invoke().load_async(&mut c.clone()).await,
            Conn::Cluster(c) => script.prepare_invoke().load_async(&mut c.clone()).await,
        }
    }

    async fn invoke(&self, inv: &ScriptInvocation<'_>) -> redis::RedisResult<Vec<i64>> {
        match self {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
        }
    }

    /// The fleet's prompt-cache key, stored at `name`: set to `mine` by the
    /// first process, read by the others.
    async fn fleet_key(&self, name: &str, mine: &[u8; 16]) -> Result<[u8; 16], RedisLedgerError> {
        let script = Script::new(
            "redis.call('SET', KEYS[1], ARGV[1], 'NX') return redis.call('GET', KEYS[1])",
        );
        let mut inv = script.key(name);
        inv.arg(prompt::key_to_hex(mine));
        let stored: String = match self {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await?,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await?,
        };
        prompt::key_from_hex(&stored).ok_or(RedisLedgerError::InvalidConfig(
            "the stored prompt-cache key is not 32 hex digits",
        ))
    }
}

struct Inner {
    conn: Conn,
    apply: Script,
    read: Script,
    settings: RedisLedgerBuilder,
    owner: String,
    fallback: InMemoryLedger,
    health: Mutex<Health>,
    pending: Mutex<HashMap<Arc<str>, Vec<Op>>>,
    stats: Counters,
    /// The fleet's prompt-cache view, if shared.
    prompt: Option<Arc<PromptMirror>>,
    /// The budget keys a task asks for markers on, while requests hold
    /// for another process's writer there.
    watching: Mutex<HashSet<Arc<str>>>,
    /// The other processes' output samples, as the calls brought them back.
    outputs: Mutex<OutputMirror>,
}

/// The fleet's output samples seen by this process: per key, the samples
/// for the budgets ([`Ledger::outputs_learned`]) and the position in Redis
/// to ask after.
#[derive(Debug, Default)]
struct OutputMirror {
    log: OutputLog,
    seen: HashMap<Arc<str>, u64>,
}

impl OutputMirror {
    fn since(&self, key: &str) -> u64 {
        self.seen.get(key).copied().unwrap_or(0)
    }

    fn absorb(&mut self, key: &str, outputs: wire::Outputs) {
        match self.seen.get_mut(key) {
            Some(seen) => *seen = outputs.position,
            None => {
                self.seen.insert(Arc::from(key), outputs.position);
            }
        }
        if !outputs.samples.is_empty() {
            self.log.push(key, outputs.samples);
        }
    }
}

#[derive(Debug, Default)]
struct Health {
    /// Redis is not asked before this instant (after a failure).
    retry_at: Option<Instant>,
    /// Whether the last call failed (for logging the change once).
    down: bool,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    reserves: AtomicU64,
    batches: AtomicU64,
    watch_calls: AtomicU64,
    fallback_answers: AtomicU64,
    failures: AtomicU64,
}

/// Counts of a [`RedisLedger`]'s work since it was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RedisLedgerStats {
    /// Script calls made, failed ones included (round trips; a script
    /// loaded again after `SCRIPT FLUSH` costs two more, not counted).
    pub calls: u64,
    /// Reservations asked (each one call, which also carries the key's
    /// buffered writes).
    pub reserves: u64,
    /// Calls that sent buffered settlements and syncs alone (no
    /// reservation).
    pub write_batches: u64,
    /// Calls that asked for the fleet's prompt-cache markers while a
    /// request held for another process's writer of its prefix (every
    /// 100 ms while one does; buffered writes go with them, and such a call
    /// is counted here, not among `write_batches`).
    pub watch_calls: u64,
    /// Reservations, settlements and syncs answered by the local fallback.
    pub fallback_answers: u64,
    /// Calls that failed or timed out.
    pub failures: u64,
}

impl fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: never printed.
        f.debug_struct("RedisLedger")
            .field("prefix", &self.inner.settings.prefix)
            .field("policy", &self.inner.settings.policy)
            .field("replicas", &self.inner.settings.replicas)
            .finish_non_exhaustive()
    }
}

impl RedisLedger {
    /// The settings for a ledger at `url` (`redis://host:port/db`,
    /// `rediss://` for TLS where redis-rs is built with it).
    pub fn builder(url: &str) -> RedisLedgerBuilder {
        RedisLedgerBuilder::new(url)
    }

    /// Connects with the default settings.
    ///
    /// # Errors
    ///
    /// [`RedisLedgerError`] if the URL is invalid or Redis cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, RedisLedgerError> {
        Self::builder(url).connect().await
    }

    /// Counts of the work done so far.
    pub fn stats(&self) -> RedisLedgerStats {
        let c = &self.inner.stats;
        RedisLedgerStats {
            calls: c.calls.load(Ordering::Relaxed),
            reserves: c.reserves.load(Ordering::Relaxed),
            write_batches: c.batches.load(Ordering::Relaxed),
            watch_calls: c.watch_calls.load(Ordering::Relaxed),
            fallback_answers: c.fallback_answers.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
        }
    }

    /// The Redis key that holds a budget key's buckets.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}:{{{}}}", self.inner.settings.prefix, key)
    }

    /// [`Ledger::reserve`], also returning the Redis time the decision was
    /// taken at (since the Unix epoch; `None` when the fallback answered).
    ///
    /// # Errors
    ///
    /// With [`FaultPolicy::FailClosed`], a [`LedgerError`] whose source is a
    /// [`RedisLedgerError`].
    pub async fn reserve_timed(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
    ) -> Result<(Reservation, Option<Duration>), LedgerError> {
        let ask = Ask {
            limits: *limits,
            costs,
            headroom: None,
            line: None,
            names: None,
        };
        self.inner.reserve(Arc::from(key), ask).await
    }

    /// [`Ledger::reserve_with_headroom`], also returning the Redis time the
    /// decision was taken at (`None` when the fallback answered).
    ///
    /// # Errors
    ///
    /// As [`reserve_timed`](Self::reserve_timed).
    pub async fn reserve_with_headroom_timed(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
    ) -> Result<(Reservation, Option<Duration>), LedgerError> {
        let ask = Ask {
            limits: *limits,
            costs,
            headroom: Some(headroom),
            line: None,
            names: None,
        };
        self.inner.reserve(Arc::from(key), ask).await
    }

    /// Sends every buffered settlement and sync now. Returns the Redis time
    /// (since the Unix epoch) of the last batch sent, `None` if nothing was
    /// buffered or the fallback took it.
    ///
    /// # Errors
    ///
    /// With [`FaultPolicy::FailClosed`], the first failure (the writes stay
    /// buffered).
    pub async fn flush(&self) -> Result<Option<Duration>, LedgerError> {
        let keys: Vec<Arc<str>> = lock(&self.inner.pending).keys().cloned().collect();
        let mut last = None;
        for key in keys {
            if let Some(at) = self.inner.flush_key(&key).await? {
                last = Some(at);
            }
        }
        Ok(last)
    }
}

impl RedisLedgerBuilder {
    /// Connects to Redis and builds the ledger.
    ///
    /// # Errors
    ///
    /// [`RedisLedgerError::InvalidConfig`] for a refused setting,
    /// [`RedisLedgerError::Redis`] or [`RedisLedgerError::Timeout`] when
    /// Redis cannot be reached now.
    pub async fn connect(self) -> Result<RedisLedger, RedisLedgerError> {
        self.validate()?;
        let wait = self.timeout.max(Duration::from_secs(2));
        let (apply, read) = (
            Script::new(include_str!("apply.lua")),
            Script::new(include_str!("read.lua")),
        );
        let conn = tokio::time::timeout(wait, async {
            let conn = self.open().await?;
            conn.load(&apply).await?;
            conn.load(&read).await?;
            let prompt = match self.share_prompt {
                true => {
                    let name = format!("{}:prompt-key", self.prefix);
                    let key = conn.fleet_key(&name, &prompt::random_key()).await?;
                    Some(Arc::new(PromptMirror::new(key)))
                }
                false => None,
            };
            Ok::<_, RedisLedgerError>((conn, prompt))
        })
        .await
        .map_err(|_| RedisLedgerError::Timeout(wait))??;
        let (conn, prompt) = conn;
        let fallback = InMemoryLedger::with_window(self.window)
            .map_err(|_| RedisLedgerError::InvalidConfig("window"))?;
        Ok(RedisLedger {
            inner: Arc::new(Inner {
                conn,
                apply,
                read,
                owner: owner_id(),
                fallback,
                settings: self,
                health: Mutex::new(Health::default()),
                pending: Mutex::new(HashMap::new()),
                stats: Counters::default(),
                prompt,
                watching: Mutex::new(HashSet::new()),
                outputs: Mutex::new(OutputMirror::default()),
            }),
        })
    }
}

impl RedisLedgerBuilder {
    async fn open(&self) -> Result<Conn, RedisLedgerError> {
        let connect_timeout = self.timeout.max(Duration::from_millis(200));
        if !self.cluster.is_empty() {
            let client = redis::cluster::ClusterClient::builder(self.cluster.clone())
                .connection_timeout(connect_timeout)
                .response_timeout(self.timeout)
                .retries(1)
                .build()?;
            return Ok(Conn::Cluster(client.get_async_connection().await?));
        }
        let client = redis::Client::open(self.url.as_str())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(connect_timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1)
            .set_max_delay(1_000);
        Ok(Conn::Single(
            ConnectionManager::new_with_config(client, config).await?,
        ))
    }
}

/// A process-unique, non-numeric id for the claim.
fn owner_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("p{}-{:016x}", std::process::id(), h.finish())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// redis-rs's own response timeout is our timeout.
fn typed(e: redis::RedisError, timeout: Duration) -> RedisLedgerError {
    if e.is_timeout() {
        RedisLedgerError::Timeout(timeout)
    } else {
        RedisLedgerError::Redis(e)
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// `a + b` in every dimension, saturating.
fn add(a: Costs, b: Costs) -> Costs {
    Costs {
        requests: a.requests.saturating_add(b.requests),
        input_tokens: a.input_tokens.saturating_add(b.input_tokens),
        output_tokens: a.output_tokens.saturating_add(b.output_tokens),
    }
}

/// Limits divided by the number of replicas (at least 1 each).
fn share(limits: &Limits, replicas: u32) -> Limits {
    let part = |l: Option<u64>| l.map(|l| (l / u64::from(replicas)).max(1));
    Limits {
        requests_per_minute: part(limits.requests_per_minute),
        input_tokens_per_minute: part(limits.input_tokens_per_minute),
        output_tokens_per_minute: part(limits.output_tokens_per_minute),
    }
}

impl Inner {
    fn hash_key(&self, key: &str) -> String {
        format!("{}:{{{}}}", self.settings.prefix, key)
    }

    /// Whether Redis may be asked now; otherwise how long until it may.
    fn usable(&self) -> Result<(), Duration> {
        let health = lock(&self.health);
        match health.retry_at {
            Some(at) => {
                let now = Instant::now();
                if now >= at {
                    Ok(())
                } else {
                    Err(at - now)
                }
            }
            None => Ok(()),
        }
    }

    fn on_success(&self) {
        let mut health = lock(&self.health);
        if health.down {
            tracing::info!("redis ledger: redis answers again; the shared budget is back");
        }
        *health = Health::default();
    }

    fn on_failure(&self, error: &RedisLedgerError) {
        bump(&self.stats.failures);
        let mut health = lock(&self.health);
        if !health.down {
            match self.settings.policy {
                FaultPolicy::FailOpen => tracing::warn!(
                    %error,
                    replicas = self.settings.replicas,
                    "redis ledger: redis failed; failing open to a local budget of limit / replicas"
                ),
                FaultPolicy::FailClosed => tracing::warn!(
                    %error,
                    "redis ledger: redis failed; failing closed"
                ),
            }
        }
        health.down = true;
        health.retry_at = Some(Instant::now() + self.settings.retry_interval);
    }

    /// One call of the apply script: `ops`, then the reservation if any.
    async fn call_apply(
        &self,
        key: &str,
        ops: &[Op],
        reserve: Option<&Ask>,
    ) -> Result<Applied, RedisLedgerError> {
        let s = &self.settings;
        let hash_key = self.hash_key(key);
        let mut inv = self.apply.key(&hash_key);
        inv.key(format!("{hash_key}:o"));
        if self.prompt.is_some() {
            inv.key(format!("{hash_key}:pc"))
                .key(format!("{hash_key}:pv"))
                .key(format!("{hash_key}:pw"))
                .key(format!("{hash_key}:pq"));
        }
        inv.arg(s.window.as_micros().min(u128::from(u64::MAX)) as u64)
            .arg(s.idle.as_millis().min(u128::from(u64::MAX)) as u64)
            .arg(&self.owner)
            .arg(s.claim_grace.as_micros().min(u128::from(u64::MAX)) as u64);
        match &self.prompt {
            Some(p) => inv.arg(p.since(key)),
            None => inv.arg(-1),
        };
        inv.arg(lock(&self.outputs).since(key));
        let sent = Instant::now();
        for op in ops {
            wire::push_op(&mut inv, op, sent);
        }
        if let Some(ask) = &reserve {
            if let (Some(names), Some(_), Some(_)) = (&ask.names, &ask.line, &self.prompt) {
                wire::push_names(&mut inv, names);
            }
            wire::push_reserve(&mut inv, &ask.limits, ask.costs, ask.headroom, ask.line);
        }
        bump(&self.stats.calls);
        let reply: Vec<i64> = tokio::time::timeout(s.timeout, self.conn.invoke(&inv))
            .await
            .map_err(|_| RedisLedgerError::Timeout(s.timeout))?
            .map_err(|e| typed(e, s.timeout))?;
        let mut applied = wire::parse_applied(&reply)?;
        lock(&self.outputs).absorb(key, std::mem::take(&mut applied.outputs));
        if let Some(p) = &self.prompt {
            if let Some(m) = &applied.markers {
                p.absorb(key, applied.now_us, m);
            }
            if let Some(name) = applied.writing {
                p.writing_seen(key, name, applied.now_us, applied.writing_queued);
            }
            if let (Some(Reservation::Wait { retry_in, .. }), Some(line)) =
                (applied.reservation, reserve.and_then(|a| a.line))
            {
                if line.head {
                    let wait = u64::try_from(retry_in.as_micros()).unwrap_or(u64::MAX);
                    p.head_waits(key, applied.now_us.saturating_add(wait));
                }
            }
            let writes = reserve.and_then(|a| Some((a.names.as_ref()?, a.line?.request)));
            match (applied.reservation, writes) {
                (Some(Reservation::Admitted), Some((names, request))) => {
                    // Its queued markers, if any, became a writer's.
                    let _ = p.dequeue(request);
                    if !names.writes.is_empty() {
                        p.writes_admitted(key, &names.writes);
                    }
                }
                (Some(Reservation::Wait { .. }), Some((names, request)))
                    if names.queued_us > 0 && !names.writes.is_empty() =>
                {
                    // Marked as queued by the script.
                    p.queue(key, request, &names.writes);
                }
                _ => {}
            }
        }
        Ok(applied)
    }

    /// Asks Redis unless it failed recently; records the outcome.
    async fn guarded_apply(
        &self,
        key: &str,
        ops: &[Op],
        reserve: Option<&Ask>,
    ) -> Result<Applied, RedisLedgerError> {
        if let Err(retry_in) = self.usable() {
            return Err(RedisLedgerError::Unavailable { retry_in });
        }
        match self.call_apply(key, ops, reserve).await {
            Ok(applied) => {
                self.on_success();
                Ok(applied)
            }
            Err(e) => {
                self.on_failure(&e);
                Err(e)
            }
        }
    }

    fn take_pending(&self, key: &str) -> Vec<Op> {
        lock(&self.pending).remove(key).unwrap_or_default()
    }

    /// Puts writes that could not be sent back in front (fail closed),
    /// keeping at most [`MAX_PENDING`] per key.
    fn restore_pending(&self, key: &Arc<str>, mut ops: Vec<Op>) {
        let mut pending = lock(&self.pending);
        let queue = pending.entry(Arc::clone(key)).or_default();
        ops.append(queue);
        if ops.len() > MAX_PENDING {
            let dropped = ops.len() - MAX_PENDING;
            ops.drain(..dropped);
            tracing::warn!(
                dropped,
                "redis ledger: too many writes waiting for redis; oldest dropped"
            );
        }
        *queue = ops;
    }

    async fn reserve(
        self: &Arc<Self>,
        key: Arc<str>,
        ask: Ask,
    ) -> Result<(Reservation, Option<Duration>), LedgerError> {
        bump(&self.stats.reserves);
        let ops = self.take_pending(&key);
        let answer = self.guarded_apply(&key, &ops, Some(&ask)).await;
        let Ask {
            limits,
            costs,
            headroom,
            ..
        } = ask;
        let error = match answer {
            Ok(Applied {
                now_us,
                reservation: Some(r),
                ..
            }) => return Ok((r, Some(Duration::from_micros(now_us)))),
            Ok(Applied {
                reservation: None, ..
            }) => RedisLedgerError::Reply("no reservation in the answer".into()),
            Err(e) => e,
        };
        match self.settings.policy {
            FaultPolicy::FailClosed => {
                self.restore_pending(&key, ops);
                Err(LedgerError::new(error))
            }
            FaultPolicy::FailOpen => {
                self.apply_locally(&key, &ops);
                bump(&self.stats.fallback_answers);
                let local = share(&limits, self.settings.replicas);
                let now = Instant::now();
                let Some(headroom) = headroom else {
                    let answer = self.fallback.reserve_at(&key, &local, costs, now);
                    return Ok((answer, None));
                };
                let answer = self
                    .fallback
                    .reserve_at(&key, &local, add(costs, headroom), now);
                if answer == Reservation::Admitted {
                    let back = CostDelta::refund(headroom);
                    self.fallback.settle_at(&key, &local, back, now);
                }
                Ok((answer, None))
            }
        }
    }

    /// Applies writes to the local fallback, with limits (and the server's
    /// limits and remaining) divided by the number of replicas.
    fn apply_locally(&self, key: &str, ops: &[Op]) {
        let replicas = self.settings.replicas;
        let now = Instant::now();
        for op in ops {
            bump(&self.stats.fallback_answers);
            match op {
                // Nothing to share without Redis.
                Op::Cached { .. }
                | Op::Written { .. }
                | Op::Queued { .. }
                | Op::Dequeued { .. }
                | Op::Output(_) => {}
                Op::Settle { limits, delta } => {
                    self.fallback
                        .settle_at(key, &share(limits, replicas), *delta, now);
                }
                Op::Sync {
                    limits,
                    dimension,
                    status,
                    ..
                } => {
                    let part = |v: Option<u64>| v.map(|v| v / u64::from(replicas));
                    let status = LimitStatus {
                        limit: part(status.limit).filter(|l| *l > 0),
                        remaining: part(status.remaining),
                        reset_in: status.reset_in,
                    };
                    let local = share(limits, replicas);
                    self.fallback.sync_at(key, &local, *dimension, status, now);
                }
            }
        }
    }

    /// Asks Redis for `key`'s markers while requests of this process hold
    /// for another process's writer there (one task per key), and wakes
    /// them when the write is over: every [`prompt::WATCH_EVERY`] once a
    /// writer held for is admitted, less often (backing off to
    /// [`prompt::WATCH_QUEUED_EVERY`]) while they all stay queued in their
    /// processes' lines.
    fn watch_key(self: &Arc<Self>, key: Arc<str>) {
        if !lock(&self.watching).insert(Arc::clone(&key)) {
            return;
        }
        let inner = Arc::clone(self);
        let watched = Arc::clone(&key);
        let run = async move {
            let key = watched;
            let Some(mirror) = inner.prompt.clone() else {
                return;
            };
            let mut every = prompt::WATCH_EVERY;
            loop {
                tokio::time::sleep(every).await;
                if !mirror.watched_on(&key) {
                    break;
                }
                let ops = inner.take_pending(&key);
                if !ops.is_empty() {
                    bump(&inner.stats.batches);
                }
                bump(&inner.stats.watch_calls);
                if let Err(e) = inner.guarded_apply(&key, &ops, None).await {
                    tracing::debug!(error = %e, "redis ledger: no markers; the held requests go");
                    match inner.settings.policy {
                        FaultPolicy::FailOpen => inner.apply_locally(&key, &ops),
                        FaultPolicy::FailClosed => inner.restore_pending(&key, ops),
                    }
                    mirror.wake_ended(true);
                    break;
                }
                mirror.wake_ended(false);
                every = mirror.next_watch(&key, every);
            }
            lock(&inner.watching).remove(&key);
            // A request may have begun holding since the last look.
            if mirror.watched_on(&key) {
                inner.watch_key(key);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(run);
            }
            Err(_) => {
                lock(&self.watching).remove(&key);
                if let Some(mirror) = &self.prompt {
                    mirror.wake_ended(true);
                }
            }
        }
    }

    /// Sends one key's buffered writes; returns the Redis time of the batch.
    async fn flush_key(self: &Arc<Self>, key: &Arc<str>) -> Result<Option<Duration>, LedgerError> {
        let ops = self.take_pending(key);
        if ops.is_empty() {
            return Ok(None);
        }
        bump(&self.stats.batches);
        match self.guarded_apply(key, &ops, None).await {
            Ok(applied) => Ok(Some(Duration::from_micros(applied.now_us))),
            Err(e) => match self.settings.policy {
                FaultPolicy::FailOpen => {
                    self.apply_locally(key, &ops);
                    Ok(None)
                }
                FaultPolicy::FailClosed => {
                    self.restore_pending(key, ops);
                    Err(LedgerError::new(e))
                }
            },
        }
    }

    /// Buffers writes (together: they go in one batch); the first write of
    /// a batch that is not a prompt-cache marker schedules its flush (a
    /// marker alone waits for the key's next call: it never costs one).
    fn enqueue(self: &Arc<Self>, key: &str, ops: impl IntoIterator<Item = Op>) {
        let (key, schedule, full) = {
            let mut pending = lock(&self.pending);
            let key: Arc<str> = match pending.get_key_value(key) {
                Some((k, _)) => Arc::clone(k),
                None => Arc::from(key),
            };
            let queue = pending.entry(Arc::clone(&key)).or_default();
            let before = queue.len();
            let scheduled = queue.iter().any(|op| !op.rides());
            queue.extend(ops);
            if queue.len() == before {
                return;
            }
            let due = !scheduled && queue.iter().any(|op| !op.rides());
            (key, due, queue.len() >= MAX_BATCH)
        };
        if !schedule && !full {
            return;
        }
        let delay = if full {
            Duration::ZERO
        } else {
            self.settings.write_delay
        };
        let inner = Arc::clone(self);
        let run = async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Err(e) = inner.flush_key(&key).await {
                tracing::debug!(error = %e, "redis ledger: buffered writes kept for the next call");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(run);
            }
            Err(_) => tracing::warn!(
                "redis ledger: no tokio runtime to send a write; it rides on the key's next reservation"
            ),
        }
    }

    async fn state(
        &self,
        key: &str,
        limits: Limits,
    ) -> Result<Option<[BucketState; 3]>, LedgerError> {
        let read = async {
            if let Err(retry_in) = self.usable() {
                return Err(RedisLedgerError::Unavailable { retry_in });
            }
            let mut inv = self.read.key(self.hash_key(key));
            inv.arg(self.settings.window.as_micros().min(u128::from(u64::MAX)) as u64);
            for d in Dimension::ALL {
                inv.arg(limits.get(d).unwrap_or(0));
            }
            bump(&self.stats.calls);
            let reply: Vec<i64> =
                tokio::time::timeout(self.settings.timeout, self.conn.invoke(&inv))
                    .await
                    .map_err(|_| RedisLedgerError::Timeout(self.settings.timeout))?
                    .map_err(|e| typed(e, self.settings.timeout))?;
            wire::parse_state(&reply)
        };
        match read.await {
            Ok(state) => Ok(state),
            Err(e) => match self.settings.policy {
                FaultPolicy::FailClosed => Err(LedgerError::new(e)),
                FaultPolicy::FailOpen => {
                    let local = share(&limits, self.settings.replicas);
                    Ok(self.fallback.state_at(key, &local, Instant::now()))
                }
            },
        }
    }
}

/// A reservation to ask: the costs to debit, and the headroom that must
/// stay free after them.
#[derive(Debug, Clone)]
struct Ask {
    limits: Limits,
    costs: Costs,
    headroom: Option<Costs>,
    /// In the fleet's line ([`Ledger::reserve_in_line`]).
    line: Option<LinePlace>,
    /// Its prefixes ([`Ledger::reserve_in_line_with_prefixes`]).
    names: Option<wire::Names>,
}

/// A response's non-empty statuses as sync operations, in dimension order.
fn sync_ops(limits: &Limits, statuses: [LimitStatus; 3]) -> impl Iterator<Item = Op> {
    let limits = *limits;
    let at = Instant::now();
    Dimension::ALL
        .into_iter()
        .zip(statuses)
        .filter(|(_, status)| !status.is_empty())
        .map(move |(dimension, status)| Op::Sync {
            limits,
            dimension,
            status,
            at,
        })
}

impl RedisLedger {
    fn ask(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Option<Costs>,
        line: Option<LinePlace>,
        names: Option<wire::Names>,
    ) -> LedgerFuture<Reservation> {
        let inner = Arc::clone(&self.inner);
        let key = Arc::from(key);
        let ask = Ask {
            limits: *limits,
            costs,
            headroom,
            line,
            names,
        };
        LedgerFuture::new(async move { Ok(inner.reserve(key, ask).await?.0) })
    }
}

/// Reservations and snapshots take a round trip ([`LedgerFuture::new`]);
/// settlements and syncs are buffered and answer at once. A reservation
/// carries the key's buffered writes: drive its future to the end (the
/// budget layer does, even for a request dropped meanwhile), or those
/// writes may be lost with it.
impl Ledger for RedisLedger {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.ask(key, limits, costs, None, None, None)
    }

    /// The headroom is checked by the reservation's own script call.
    fn reserve_with_headroom(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
    ) -> Option<LedgerFuture<Reservation>> {
        Some(self.ask(key, limits, costs, Some(headroom), None, None))
    }

    /// The fleet's line is kept in the key's hash, by the reservation's own
    /// script call (see the module docs).
    fn reserve_in_line(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
    ) -> Option<LedgerFuture<Reservation>> {
        Some(self.ask(key, limits, costs, Some(headroom), Some(place), None))
    }

    /// With a shared prompt cache, the prefixes go in the reservation's
    /// own script call: a pending prefix another process writes holds the
    /// request ([`PREFIX_WRITING_WAIT`](super::ledger::PREFIX_WRITING_WAIT)), and an admitted request's writes
    /// are marked (for 60 s at most, cleared when its answer begins or it
    /// ends). No call is added.
    fn reserve_in_line_with_prefixes(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
        prefixes: PrefixIntent<'_>,
    ) -> Option<LedgerFuture<Reservation>> {
        // The process's other queued requests on the key wait at least
        // as long as this one if it is refused: their markers are renewed
        // with it.
        let renew = match &self.inner.prompt {
            Some(mirror) => mirror.queued_on(key, place.request),
            None => Vec::new(),
        };
        let names = (self.inner.prompt.is_some() && !(prefixes.is_empty() && renew.is_empty()))
            .then(|| wire::Names {
                writes: prefixes.writes.iter().map(|&h| prompt::name(h)).collect(),
                pending: prefixes.pending.iter().map(|&h| prompt::name(h)).collect(),
                for_us: prompt::WRITING_FOR_US,
                hold_us: u64::try_from(prefixes.hold.as_micros()).unwrap_or(u64::MAX),
                tokens: prefixes.tokens,
                queued_us: u64::try_from(prefixes.queued_for.as_micros()).unwrap_or(u64::MAX),
                renew,
                grace_us: match prefixes.shorter.is_empty() {
                    true => 0,
                    false => u64::try_from(self.inner.settings.writer_grace.as_micros())
                        .unwrap_or(u64::MAX),
                },
                shorter: prefixes.shorter.iter().map(|&h| prompt::name(h)).collect(),
            });
        Some(self.ask(key, limits, costs, Some(headroom), Some(place), names))
    }

    /// With the prompt cache shared, its
    /// [`writer_grace`](RedisLedgerBuilder::writer_grace) (100 ms by
    /// default); zero without.
    fn writer_grace(&self) -> Duration {
        match self.inner.prompt {
            Some(_) => self.inner.settings.writer_grace,
            None => Duration::ZERO,
        }
    }

    /// From the markers the key's calls brought back; while a request
    /// holds for one, the process asks Redis for the markers every 100 ms
    /// (a call with no operation), so that it goes when the write begins.
    fn prefix_writing(&self, hash: u64, waker: &Waker) -> bool {
        let Some(mirror) = self.inner.prompt.as_ref() else {
            return false;
        };
        match mirror.watch(hash, waker) {
            Some(key) => {
                self.inner.watch_key(key);
                true
            }
            None => false,
        }
    }

    /// From the markers the key's calls brought back (a queued request's
    /// marker, renewed at each of its refused asks, comes back with its
    /// expiry).
    fn prefix_queued(&self, hash: u64) -> bool {
        self.inner
            .prompt
            .as_ref()
            .is_some_and(|mirror| mirror.is_queued(hash))
    }

    /// Buffered and sent within the write delay (2 ms), with whatever else
    /// is buffered for the key (the response's settlement, for a JSON
    /// answer): the other processes' requests holding for these prefixes
    /// learn it at their next call.
    fn prefixes_written(&self, hashes: &[u64]) {
        let Some(mirror) = self.inner.prompt.as_ref() else {
            return;
        };
        let names: Vec<u64> = hashes.iter().map(|&h| prompt::name(h)).collect();
        if let Some((key, names)) = mirror.writes_ended(&names) {
            self.inner.enqueue(&key, [Op::Written { names }]);
        }
    }

    /// `false`: a response's sync is taken at its head, and rides on the
    /// key's next call (see the module docs), which costs no call either.
    fn sync_with_settlement(&self) -> bool {
        false
    }

    fn settle_and_sync(
        &self,
        key: &str,
        limits: &Limits,
        delta: CostDelta,
        statuses: [LimitStatus; 3],
    ) -> LedgerFuture<()> {
        let limits = *limits;
        let syncs = sync_ops(&limits, statuses);
        let settle = (!delta.is_zero()).then_some(Op::Settle { limits, delta });
        self.inner.enqueue(key, syncs.chain(settle));
        LedgerFuture::ready(Ok(()))
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        if !delta.is_zero() {
            let limits = *limits;
            self.inner.enqueue(key, [Op::Settle { limits, delta }]);
        }
        LedgerFuture::ready(Ok(()))
    }

    fn sync_all(&self, key: &str, limits: &Limits, statuses: [LimitStatus; 3]) -> LedgerFuture<()> {
        self.inner.enqueue(key, sync_ops(limits, statuses));
        LedgerFuture::ready(Ok(()))
    }

    fn sync(
        &self,
        key: &str,
        limits: &Limits,
        dimension: Dimension,
        status: LimitStatus,
    ) -> LedgerFuture<()> {
        let op = Op::Sync {
            limits: *limits,
            dimension,
            status,
            at: Instant::now(),
        };
        self.inner.enqueue(key, [op]);
        LedgerFuture::ready(Ok(()))
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        let inner = Arc::clone(&self.inner);
        let (key, limits) = (key.to_owned(), *limits);
        LedgerFuture::new(async move { inner.state(&key, limits).await })
    }

    /// With [`share_prompt_cache`](RedisLedgerBuilder::share_prompt_cache):
    /// the fleet's prompt-cache view (see the module docs).
    fn prompt_cache(&self) -> Option<Arc<dyn SharedPromptCache>> {
        let p = self.inner.prompt.as_ref()?;
        Some(Arc::clone(p) as Arc<dyn SharedPromptCache>)
    }

    /// Buffered and sent within the write delay (2 ms), in one call with
    /// whatever else is buffered for the key (the markers of every request
    /// that joined a line meanwhile), or with the key's next reservation if
    /// that comes first: a request that waits in line costs at most this
    /// one call more, and a request admitted at its first ask none.
    fn prefixes_queued(
        &self,
        key: &str,
        request: u64,
        writes: &[u64],
        tokens: u64,
        queued_for: Duration,
    ) {
        let Some(mirror) = self.inner.prompt.as_ref() else {
            return;
        };
        if writes.is_empty() || queued_for.is_zero() {
            return;
        }
        let names: Vec<u64> = writes.iter().map(|&h| prompt::name(h)).collect();
        // A request already mirrored renews its marker (a held request, or
        // one behind a held head, asks nothing meanwhile): sent again,
        // counted once.
        mirror.queue(key, request, &names);
        // Until its process's head asks again at least (each of the head's
        // refused asks renews it), plus the grace.
        let for_us = u64::try_from(queued_for.as_micros()).unwrap_or(u64::MAX);
        let grace = u64::try_from(self.inner.settings.claim_grace.as_micros()).unwrap_or(u64::MAX);
        let head = mirror
            .head_asks_in(key)
            .map_or(0, |wait| wait.saturating_add(grace));
        let op = Op::Queued {
            names,
            tokens,
            for_us: for_us.max(head),
        };
        self.inner.enqueue(key, [op]);
    }

    /// Buffered as [`prefixes_queued`](Ledger::prefixes_queued) is.
    fn prefixes_dequeued(&self, key: &str, request: u64) {
        let Some(mirror) = self.inner.prompt.as_ref() else {
            return;
        };
        let _ = key;
        if let Some((key, names)) = mirror.dequeue(request) {
            if !names.is_empty() {
                self.inner.enqueue(&key, [Op::Dequeued { names }]);
            }
        }
    }

    /// Buffered: sent with the key's next call (the response's settlement,
    /// which follows, or a reservation), never alone. Kept in the key's
    /// last 256 samples (`<prefix>:{key}:o`), which expire with the key.
    fn output_learned(&self, key: &str, sample: OutputSample) {
        self.inner.enqueue(key, [Op::Output(sample)]);
    }

    /// From memory: the samples every call on `key` brought back (the
    /// fleet's last 256 at this process's first call on the key).
    fn outputs_learned(&self, key: &str, after: u64, into: &mut Vec<OutputSample>) -> u64 {
        lock(&self.inner.outputs).log.read(key, after, into)
    }

    /// Buffered: sent with the key's next call (the response's settlement,
    /// which follows, or a reservation), never alone.
    fn prefixes_cached(&self, key: &str, hashes: &[u64]) {
        self.prefixes_cached_sized(key, hashes, None);
    }

    /// Buffered as [`prefixes_cached`](Ledger::prefixes_cached) is; the
    /// size rides with the name in the same operation and is kept beside
    /// its marker (`s<name>` in `<prefix>:{key}:pc`), and every process's
    /// next call on the key brings it back with the marker.
    fn prefixes_cached_sized(&self, key: &str, hashes: &[u64], served: Option<ServedSize>) {
        let Some(mirror) = self.inner.prompt.as_ref() else {
            return;
        };
        if hashes.is_empty() {
            return;
        }
        let names: Vec<u64> = hashes.iter().map(|&h| prompt::name(h)).collect();
        let sizes = hashes
            .iter()
            .map(|&h| served.filter(|s| s.hash == h).map_or(0, |s| s.tokens))
            .collect();
        mirror.told(&names);
        let op = Op::Cached {
            names,
            sizes,
            for_us: prompt::CACHED_FOR_US,
        };
        self.inner.enqueue(key, [op]);
    }
}
