//! The gateway's configuration, read from a TOML file.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! body_limit = 33554432          # bytes, optional (default 32 MiB)
//!
//! [timeouts]                     # optional
//! header_read_secs = 30          # a request's head must arrive within this
//! body_read_secs = 30            # a request body must arrive within this
//! shutdown_grace_secs = 30       # in-flight answers may finish within this
//!
//! [[upstreams]]
//! name = "team-a"
//! base_url = "https://api.anthropic.com"
//! key_env = "ANTHROPIC_KEY_TEAM_A"   # the key is read from this variable
//! tier = "tier2"                     # or rpm / itpm / otpm
//! weight = 1                         # optional
//! models = { "claude-sonnet-4-5" = "claude-sonnet-4-5-20250929" }  # optional
//!
//! [[callers]]
//! name = "alice"
//! key_env = "GATEWAY_KEY_ALICE"      # the key alice sends as x-api-key
//! rpm = 50
//! itpm = 30000
//! otpm = 8000
//! priority = "interactive"           # interactive | normal | background
//! models = ["claude-sonnet-4-5"]     # optional allow-list
//! ```
//!
//! Bad configuration fails at start with a [`ConfigError`] naming the field.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use tower_llm_limits::budget::{Limits, LimitsConfig, Tier};
use tower_llm_limits::concurrency::Priority;

/// A configuration that cannot be used: the field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field, as a path (`upstreams[1].key_env`); empty for the file.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "configuration: {}", self.message)
        } else {
            write!(f, "configuration: {}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    body_limit: Option<usize>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    callers: Vec<RawCaller>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    header_read_secs: Option<u64>,
    body_read_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    tier: Option<String>,
    rpm: Option<u64>,
    itpm: Option<u64>,
    otpm: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    base_url: String,
    key_env: String,
    #[serde(flatten)]
    limits: RawLimits,
    weight: Option<u32>,
    #[serde(default)]
    models: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    name: String,
    key_env: String,
    #[serde(flatten)]
    limits: RawLimits,
    priority: Option<String>,
    models: Option<Vec<String>>,
}

/// The gateway's settings, validated, with keys read from the environment.
#[derive(Clone)]
pub struct Config {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// The largest request body read.
    pub body_limit: usize,
    /// The time a request's head (request line and headers) has to arrive,
    /// counted from the moment the connection waits for it: a client that
    /// sends part of a head, or keeps an idle connection open, is cut off
    /// after it.
    pub header_read_timeout: Duration,
    /// The time a request body has to arrive.
    pub body_read_timeout: Duration,
    /// The time in-flight answers have to finish at shutdown.
    pub shutdown_grace: Duration,
    /// The upstreams, in order.
    pub upstreams: Vec<UpstreamConfig>,
    /// The callers the gateway accepts.
    pub callers: Vec<CallerConfig>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("upstreams", &self.upstreams)
            .field("callers", &self.callers)
            .finish_non_exhaustive()
    }
}

/// One upstream (its key is never printed).
#[derive(Clone)]
pub struct UpstreamConfig {
    /// Its name.
    pub name: String,
    /// Its base URL.
    pub base_url: String,
    /// Its key.
    pub key: String,
    /// Its limits.
    pub limits: LimitsConfig,
    /// Its weight.
    pub weight: u32,
    /// Its model-name map.
    pub models: HashMap<String, String>,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// One caller (its key is never printed).
#[derive(Clone)]
pub struct CallerConfig {
    /// Its name.
    pub name: String,
    /// The key it sends.
    pub key: String,
    /// Its own budget.
    pub limits: LimitsConfig,
    /// Its priority lane upstream.
    pub priority: Priority,
    /// The models it may use; `None` for all.
    pub models: Option<Vec<String>>,
}

impl fmt::Debug for CallerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerConfig")
            .field("name", &self.name)
            .field("key", &"<redacted>")
            .field("priority", &self.priority)
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads a configuration from TOML text; keys come from `env` (the
    /// process environment in [`Config::load`]).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first field that is wrong.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|s| format!("at byte {}", s.start))
                .unwrap_or_default();
            ConfigError::new(field, e.message().to_string())
        })?;
        let listen = raw.listen.parse().map_err(|_| {
            ConfigError::new(
                "listen",
                format!("{:?} is not an address and port", raw.listen),
            )
        })?;
        if raw.upstreams.is_empty() {
            return Err(ConfigError::new(
                "upstreams",
                "at least one upstream is needed",
            ));
        }
        if raw.callers.is_empty() {
            return Err(ConfigError::new("callers", "at least one caller is needed"));
        }
        let upstreams = raw
            .upstreams
            .into_iter()
            .enumerate()
            .map(|(i, u)| upstream(i, u, &env))
            .collect::<Result<Vec<_>, _>>()?;
        let callers = raw
            .callers
            .into_iter()
            .enumerate()
            .map(|(i, c)| caller(i, c, &env))
            .collect::<Result<Vec<_>, _>>()?;
        unique(
            upstreams.iter().map(|u| u.name.as_str()),
            "upstreams",
            "name",
        )?;
        unique(callers.iter().map(|c| c.name.as_str()), "callers", "name")?;
        unique(callers.iter().map(|c| c.key.as_str()), "callers", "key_env")?;
        let timeouts = raw.timeouts;
        let header_read_secs = seconds("header_read_secs", timeouts.header_read_secs)?;
        let body_read_secs = seconds("body_read_secs", timeouts.body_read_secs)?;
        Ok(Config {
            listen,
            body_limit: raw.body_limit.unwrap_or(32 * 1024 * 1024),
            header_read_timeout: Duration::from_secs(header_read_secs),
            body_read_timeout: Duration::from_secs(body_read_secs),
            shutdown_grace: Duration::from_secs(timeouts.shutdown_grace_secs.unwrap_or(30)),
            upstreams,
            callers,
        })
    }

    /// Reads the configuration file at `path`, keys from the environment.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or a [`ConfigError`].
    pub fn load(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {path}: {e}")))?;
        Config::parse(&text, |name| std::env::var(name).ok())
    }
}

/// A read timeout in seconds: 30 by default, never zero (every request
/// would be cut off).
fn seconds(field: &str, value: Option<u64>) -> Result<u64, ConfigError> {
    match value {
        None => Ok(30),
        Some(0) => Err(ConfigError::new(
            format!("timeouts.{field}"),
            "must be above zero",
        )),
        Some(s) => Ok(s),
    }
}

fn unique<'a>(
    names: impl Iterator<Item = &'a str>,
    list: &str,
    field: &str,
) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for (i, n) in names.enumerate() {
        if !seen.insert(n) {
            return Err(ConfigError::new(
                format!("{list}[{i}].{field}"),
                "the same as an earlier entry's",
            ));
        }
    }
    Ok(())
}

fn key(
    field: String,
    var: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    match env(var) {
        Some(k) if !k.trim().is_empty() => Ok(k.trim().to_string()),
        _ => Err(ConfigError::new(
            field,
            format!("the environment variable {var} is not set"),
        )),
    }
}

/// A tier's limits for every model class, or one set of limits.
fn limits(field: &str, raw: &RawLimits) -> Result<LimitsConfig, ConfigError> {
    if let Some(tier) = &raw.tier {
        if raw.rpm.is_some() || raw.itpm.is_some() || raw.otpm.is_some() {
            return Err(ConfigError::new(
                format!("{field}.tier"),
                "give a tier or rpm/itpm/otpm, not both",
            ));
        }
        let tier = match tier.to_ascii_lowercase().as_str() {
            "tier1" | "1" => Tier::Tier1,
            "tier2" | "2" => Tier::Tier2,
            "tier3" | "3" => Tier::Tier3,
            "tier4" | "4" => Tier::Tier4,
            "start" => Tier::Start,
            "build" => Tier::Build,
            "scale" => Tier::Scale,
            other => {
                return Err(ConfigError::new(
                    format!("{field}.tier"),
                    format!("{other:?} is not tier1..tier4, start, build or scale"),
                ))
            }
        };
        return Ok(LimitsConfig::learned().with_tier(tier));
    }
    match (raw.rpm, raw.itpm, raw.otpm) {
        (Some(r), Some(i), Some(o)) if r > 0 && i > 0 && o > 0 => {
            Ok(LimitsConfig::from(Limits::new().rpm(r).itpm(i).otpm(o)))
        }
        _ => Err(ConfigError::new(
            field.to_string(),
            "needs a tier, or rpm, itpm and otpm above zero",
        )),
    }
}

fn upstream(
    i: usize,
    u: RawUpstream,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<UpstreamConfig, ConfigError> {
    let field = format!("upstreams[{i}]");
    let key = key(format!("{field}.key_env"), &u.key_env, env)?;
    let limits = limits(&field, &u.limits)?;
    tower_llm_limits::pool::Upstream::new(&u.name, &u.base_url, Limits::new())
        .map_err(|e| ConfigError::new(format!("{field}.base_url"), e.to_string()))?;
    Ok(UpstreamConfig {
        name: u.name,
        base_url: u.base_url,
        key,
        limits,
        weight: u.weight.unwrap_or(1),
        models: u.models,
    })
}

fn caller(
    i: usize,
    c: RawCaller,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<CallerConfig, ConfigError> {
    let field = format!("callers[{i}]");
    let key = key(format!("{field}.key_env"), &c.key_env, env)?;
    let limits = limits(&field, &c.limits)?;
    let priority = match c.priority.as_deref() {
        None | Some("normal") => Priority::Normal,
        Some("interactive") => Priority::Interactive,
        Some("background") => Priority::Background,
        Some(other) => {
            return Err(ConfigError::new(
                format!("{field}.priority"),
                format!("{other:?} is not interactive, normal or background"),
            ))
        }
    };
    Ok(CallerConfig {
        name: c.name,
        key,
        limits,
        priority,
        models: c.models,
    })
}
