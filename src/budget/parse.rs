//! Limits from text: [`Tier`] and [`Limits`] parse from strings
//! ([`FromStr`]) and deserialize with serde (from a config file), and
//! [`LimitsConfig::from_env`] reads them from the environment.
//!
//! | input | accepted forms |
//! |---|---|
//! | [`Tier`] | `1` to `4`, `tier1`, `tier-2`, `tier_3`, `Tier 4`, `start`, `build`, `scale` (any case); in serde also the integers 1 to 4 |
//! | [`Limits`] | `rpm=50,itpm=30000,otpm=8000`: any of the three, in any order, separated by commas, `_` allowed between digits (`30_000`); the long names `requests_per_minute`, `input_tokens_per_minute`, `output_tokens_per_minute` too; in serde also a map of those keys (`{ rpm = 50, itpm = 30_000 }`) |
//! | [`ModelClass`] | its name (`opus-4`, `sonnet-4`, `haiku-4-5`, `haiku-3-5`, `haiku-3`, `sonnet-3-7`, `other`) or a model name of that class (`claude-sonnet-4-5`) |
//! | [`LimitsConfig`] (serde only) | a map with any of `tier` (a [`Tier`]), `default` (a [`Limits`]) and `classes` (a map from [`ModelClass`] to [`Limits`]); unknown keys refused |

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

use super::config::LimitsConfig;
use super::limits::{Limits, ModelClass, Tier};

/// The environment variable naming a published tier (see [`Tier`]'s forms).
pub const ENV_TIER: &str = "ANTHROPIC_TIER";
/// The environment variable giving explicit limits for every model class
/// (see [`Limits`]' forms: `rpm=50,itpm=30000,otpm=8000`).
pub const ENV_LIMITS: &str = "ANTHROPIC_LIMITS";

/// Why a tier, limits, a model class or the environment could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not one of the tier forms (`1` to `4`, `tier1`, `start`, `build`, `scale`).
    Tier {
        /// The text that was given.
        value: String,
    },
    /// Not a list of limits such as `rpm=50,itpm=30000,otpm=8000`.
    Limits {
        /// The text that was given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Neither a model class's name nor a model name of a known class.
    ModelClass {
        /// The text that was given.
        value: String,
    },
    /// An environment variable is set to something that is not Unicode.
    NotUnicode {
        /// The variable's name.
        var: &'static str,
    },
    /// Both `ANTHROPIC_TIER` and `ANTHROPIC_LIMITS` are set: which one applies
    /// would be a guess.
    Conflict,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Tier { value } => write!(
                f,
                "invalid tier {value:?}: expected 1 to 4, tier1 to tier4, start, build or scale"
            ),
            ConfigError::Limits { value, reason } => write!(
                f,
                "invalid limits {value:?}: {reason} (expected e.g. rpm=50,itpm=30000,otpm=8000)"
            ),
            ConfigError::ModelClass { value } => write!(
                f,
                "unknown model class {value:?}: expected opus-4, sonnet-4, haiku-4-5, haiku-3-5, haiku-3, sonnet-3-7, other, or a model name"
            ),
            ConfigError::NotUnicode { var } => write!(f, "{var} is not valid Unicode"),
            ConfigError::Conflict => write!(
                f,
                "both {ENV_TIER} and {ENV_LIMITS} are set: set one of them"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

impl FromStr for Tier {
    type Err = ConfigError;

    /// Parses `1` to `4`, `tier1` (also `tier-1`, `tier_1`, `tier 1`),
    /// `start`, `build` or `scale`, in any case, surrounding spaces ignored.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::Tier;
    ///
    /// assert_eq!("2".parse::<Tier>()?, Tier::Tier2);
    /// assert_eq!("Tier-3".parse::<Tier>()?, Tier::Tier3);
    /// assert_eq!("build".parse::<Tier>()?, Tier::Build);
    /// assert!("5".parse::<Tier>().is_err());
    /// # Ok::<(), tower_llm_limits::budget::ConfigError>(())
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let number = lower
            .strip_prefix("tier")
            .map(|rest| rest.trim_start_matches(['-', '_', ' ']))
            .unwrap_or(&lower);
        let tier = match number {
            "1" => Tier::Tier1,
            "2" => Tier::Tier2,
            "3" => Tier::Tier3,
            "4" => Tier::Tier4,
            "start" if number == lower => Tier::Start,
            "build" if number == lower => Tier::Build,
            "scale" if number == lower => Tier::Scale,
            _ => {
                return Err(ConfigError::Tier {
                    value: s.to_owned(),
                })
            }
        };
        Ok(tier)
    }
}

impl FromStr for Limits {
    type Err = ConfigError;

    /// Parses `rpm=50,itpm=30000,otpm=8000`: any of the three (or their long
    /// names `requests_per_minute`, ...), in any order, `_` allowed between
    /// digits. A limit
    /// left out is learned from the server's headers, as with [`Limits::new`].
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::Limits;
    ///
    /// let limits: Limits = "rpm=50, itpm=30_000".parse()?;
    /// assert_eq!(limits, Limits::new().rpm(50).itpm(30_000));
    /// assert!("rpm=fifty".parse::<Limits>().is_err());
    /// # Ok::<(), tower_llm_limits::budget::ConfigError>(())
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ConfigError::Limits {
            value: s.to_owned(),
            reason,
        };
        let mut limits = Limits::new();
        let mut any = false;
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((name, value)) = item.split_once('=') else {
                return Err(invalid(format!("{item:?} is not name=value")));
            };
            let name = name.trim();
            let slot = limit_slot(&mut limits, name)
                .ok_or_else(|| invalid(format!("unknown limit {name:?}")))?;
            if slot.is_some() {
                return Err(invalid(format!("{name} is given twice")));
            }
            *slot = Some(parse_count(value.trim()).map_err(invalid)?);
            any = true;
        }
        if !any {
            return Err(invalid("no limit given".to_owned()));
        }
        Ok(limits)
    }
}

/// The field of `limits` a name (short or long, any case) stands for.
fn limit_slot<'a>(limits: &'a mut Limits, name: &str) -> Option<&'a mut Option<u64>> {
    let name = name.to_ascii_lowercase();
    match name.as_str() {
        "rpm" | "requests_per_minute" => Some(&mut limits.requests_per_minute),
        "itpm" | "input_tokens_per_minute" => Some(&mut limits.input_tokens_per_minute),
        "otpm" | "output_tokens_per_minute" => Some(&mut limits.output_tokens_per_minute),
        _ => None,
    }
}

/// A count of decimal digits, `_` allowed between them.
fn parse_count(value: &str) -> Result<u64, String> {
    let digits: String = value.chars().filter(|c| *c != '_').collect();
    let well_formed = !value.starts_with('_')
        && !value.ends_with('_')
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit());
    if !well_formed {
        return Err(format!("{value:?} is not a whole number"));
    }
    digits.parse().map_err(|_| format!("{value} is too large"))
}

impl<'de> Deserialize<'de> for Tier {
    /// From a string in any `FromStr` form (`"tier1"`, `"2"`, `"scale"`) or an
    /// integer from 1 to 4.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TierVisitor;
        impl Visitor<'_> for TierVisitor {
            type Value = Tier;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a tier: 1 to 4, \"tier1\" to \"tier4\", \"start\", \"build\" or \"scale\"",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Tier, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Tier, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Tier, E> {
                v.to_string().parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(TierVisitor)
    }
}

/// The map form of [`Limits`]: its fields by short or long name, nothing else.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsMap {
    #[serde(default, alias = "requests_per_minute")]
    rpm: Option<u64>,
    #[serde(default, alias = "input_tokens_per_minute")]
    itpm: Option<u64>,
    #[serde(default, alias = "output_tokens_per_minute")]
    otpm: Option<u64>,
}

impl<'de> Deserialize<'de> for Limits {
    /// From a map (`{"rpm": 50, "itpm": 30000}`, long names too, unknown
    /// keys refused) or a string in the [`FromStr`] form.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LimitsVisitor;
        impl<'de> Visitor<'de> for LimitsVisitor {
            type Value = Limits;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("limits: a map of rpm, itpm, otpm, or a string \"rpm=50,itpm=30000\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Limits, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Limits, A::Error> {
                let m = LimitsMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Limits {
                    requests_per_minute: m.rpm,
                    input_tokens_per_minute: m.itpm,
                    output_tokens_per_minute: m.otpm,
                })
            }
        }
        deserializer.deserialize_any(LimitsVisitor)
    }
}

impl FromStr for ModelClass {
    type Err = ConfigError;

    /// Parses a class's name ([`ModelClass::as_str`], any case) or a model
    /// name of a known class ([`ModelClass::of`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::ModelClass;
    ///
    /// assert_eq!("sonnet-4".parse::<ModelClass>()?, ModelClass::Sonnet4);
    /// assert_eq!("claude-haiku-4-5".parse::<ModelClass>()?, ModelClass::Haiku45);
    /// assert!("gpt-4o".parse::<ModelClass>().is_err());
    /// # Ok::<(), tower_llm_limits::budget::ConfigError>(())
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        if let Some(class) = ModelClass::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(name))
        {
            return Ok(class);
        }
        match ModelClass::of(name) {
            ModelClass::Other => Err(ConfigError::ModelClass {
                value: s.to_owned(),
            }),
            class => Ok(class),
        }
    }
}

impl<'de> Deserialize<'de> for ModelClass {
    /// From a string in the `FromStr` form.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        name.parse().map_err(de::Error::custom)
    }
}

/// The serde form of [`LimitsConfig`].
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigMap {
    #[serde(default)]
    tier: Option<Tier>,
    #[serde(default)]
    default: Option<Limits>,
    #[serde(default)]
    classes: std::collections::HashMap<ModelClass, Limits>,
}

impl<'de> Deserialize<'de> for LimitsConfig {
    /// From a map with any of `tier`, `default` and `classes` (see the
    /// module's table): for example, in TOML,
    /// `tier = "tier2"` and `classes = { "haiku-4-5" = { rpm = 100 } }`.
    /// An empty map is [`LimitsConfig::learned`].
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = ConfigMap::deserialize(deserializer)?;
        let mut config = LimitsConfig::learned();
        if let Some(tier) = map.tier {
            config = config.with_tier(tier);
        }
        if let Some(default) = map.default {
            config = config.with_default(default);
        }
        for (class, limits) in map.classes {
            config = config.with_class(class, limits);
        }
        Ok(config)
    }
}

impl LimitsConfig {
    /// The limits named by the environment:
    ///
    /// - `ANTHROPIC_TIER` set: that published tier's limits (`1` to `4`,
    ///   `tier2`, `start`, `build`, `scale`; see [`Tier`]'s `FromStr`);
    /// - `ANTHROPIC_LIMITS` set: those limits for every model class
    ///   (`rpm=50,itpm=30000,otpm=8000`; a limit left out is learned);
    /// - neither (or only empty values): every limit is learned from the
    ///   server's `anthropic-ratelimit-*` headers ([`LimitsConfig::learned`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when a value does not parse, is not Unicode, or both
    /// variables are set.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|var| match std::env::var(var) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::NotUnicode { var }),
        })
    }

    /// As [`from_env`](Self::from_env), with the variables looked up by
    /// `lookup` (a config map, a test's values) instead of the process
    /// environment.
    ///
    /// # Errors
    ///
    /// As [`from_env`](Self::from_env), and whatever `lookup` returns.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::{LimitsConfig, ModelClass, Tier};
    ///
    /// let config = LimitsConfig::from_lookup(|var| {
    ///     Ok((var == "ANTHROPIC_TIER").then(|| "tier2".to_owned()))
    /// })?;
    /// assert_eq!(config.limits_for(ModelClass::Sonnet4), Tier::Tier2.limits(ModelClass::Sonnet4));
    /// # Ok::<(), tower_llm_limits::budget::ConfigError>(())
    /// ```
    pub fn from_lookup<F>(mut lookup: F) -> Result<Self, ConfigError>
    where
        F: FnMut(&'static str) -> Result<Option<String>, ConfigError>,
    {
        let mut set = |var| -> Result<Option<String>, ConfigError> {
            Ok(lookup(var)?.filter(|v| !v.trim().is_empty()))
        };
        match (set(ENV_TIER)?, set(ENV_LIMITS)?) {
            (Some(_), Some(_)) => Err(ConfigError::Conflict),
            (Some(tier), None) => Ok(LimitsConfig::from(tier.parse::<Tier>()?)),
            (None, Some(limits)) => Ok(LimitsConfig::from(limits.parse::<Limits>()?)),
            (None, None) => Ok(LimitsConfig::learned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::ModelClass;

    #[test]
    fn every_tier_parses_from_its_forms() {
        for (text, tier) in [
            ("1", Tier::Tier1),
            (" tier2 ", Tier::Tier2),
            ("Tier-3", Tier::Tier3),
            ("TIER_4", Tier::Tier4),
            ("tier 1", Tier::Tier1),
            ("start", Tier::Start),
            ("Build", Tier::Build),
            ("SCALE", Tier::Scale),
        ] {
            assert_eq!(text.parse::<Tier>(), Ok(tier), "{text}");
        }
        for bad in [
            "",
            "0",
            "5",
            "tier",
            "tierstart",
            "tier-scale",
            "1.0",
            "premium",
        ] {
            let err = bad.parse::<Tier>().err();
            assert_eq!(
                err,
                Some(ConfigError::Tier {
                    value: bad.to_owned()
                }),
                "{bad}"
            );
        }
    }

    #[test]
    fn limits_parse_and_refuse_with_a_reason() {
        assert_eq!(
            "otpm=8_000, RPM=50,input_tokens_per_minute=30000".parse::<Limits>(),
            Ok(Limits::new().rpm(50).itpm(30_000).otpm(8_000))
        );
        assert_eq!("rpm=0".parse::<Limits>(), Ok(Limits::new().rpm(0)));
        for (bad, reason) in [
            ("", "no limit given"),
            ("rpm", "not name=value"),
            ("tpm=5", "unknown limit"),
            ("rpm=5,rpm=6", "given twice"),
            ("rpm=-5", "not a whole number"),
            ("rpm=_5", "not a whole number"),
            ("rpm=", "not a whole number"),
            ("rpm=99999999999999999999", "too large"),
        ] {
            match bad.parse::<Limits>() {
                Err(ConfigError::Limits { value, reason: r }) => {
                    assert_eq!(value, bad);
                    assert!(r.contains(reason), "{bad}: {r}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn tier_and_limits_deserialize_from_json() {
        let tiers: Vec<Tier> = serde_json::from_str(r#"["tier1", 2, "scale"]"#).unwrap();
        assert_eq!(tiers, [Tier::Tier1, Tier::Tier2, Tier::Scale]);
        assert!(serde_json::from_str::<Tier>("7").is_err());
        assert!(serde_json::from_str::<Tier>("-1").is_err());

        let map: Limits =
            serde_json::from_str(r#"{"rpm": 50, "input_tokens_per_minute": 30000}"#).unwrap();
        assert_eq!(map, Limits::new().rpm(50).itpm(30_000));
        let text: Limits = serde_json::from_str(r#""otpm=8000""#).unwrap();
        assert_eq!(text, Limits::new().otpm(8_000));
        let unknown = serde_json::from_str::<Limits>(r#"{"rpm": 5, "tpm": 1}"#);
        assert!(unknown.is_err_and(|e| e.to_string().contains("tpm")));
        assert!(serde_json::from_str::<Limits>(r#"{"rpm": -5}"#).is_err());
    }

    #[test]
    fn model_classes_parse_by_name_or_model() {
        for class in ModelClass::ALL {
            assert_eq!(class.as_str().parse::<ModelClass>(), Ok(class));
        }
        assert_eq!(
            "Claude-Opus-4-1".parse::<ModelClass>(),
            Ok(ModelClass::Opus4)
        );
        assert_eq!(
            "llama".parse::<ModelClass>(),
            Err(ConfigError::ModelClass {
                value: "llama".to_owned()
            })
        );
    }

    #[test]
    fn a_limits_config_deserializes_from_a_file() {
        let json = r#"{
            "tier": "tier2",
            "classes": {"haiku-4-5": {"rpm": 100}, "claude-opus-4-1": "itpm=5"}
        }"#;
        let config: LimitsConfig = serde_json::from_str(json).unwrap();
        let sonnet = ModelClass::Sonnet4;
        assert_eq!(config.limits_for(sonnet), Tier::Tier2.limits(sonnet));
        assert_eq!(
            config.limits_for(ModelClass::Haiku45),
            Limits::new().rpm(100)
        );
        assert_eq!(config.limits_for(ModelClass::Opus4), Limits::new().itpm(5));

        let default: LimitsConfig = serde_json::from_str(r#"{"default": {"rpm": 7}}"#).unwrap();
        assert_eq!(default.limits_for(sonnet), Limits::new().rpm(7));
        let empty: LimitsConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.limits_for(sonnet), Limits::new());
        for bad in [
            r#"{"tiers": "1"}"#,
            r#"{"classes": {"llama": {"rpm": 1}}}"#,
            r#"{"tier": "gold"}"#,
        ] {
            assert!(serde_json::from_str::<LimitsConfig>(bad).is_err(), "{bad}");
        }
    }

    fn lookup<'a>(
        vars: &'a [(&'static str, &'a str)],
    ) -> impl FnMut(&'static str) -> Result<Option<String>, ConfigError> + 'a {
        move |var| {
            Ok(vars
                .iter()
                .find(|(name, _)| *name == var)
                .map(|(_, value)| (*value).to_owned()))
        }
    }

    #[test]
    fn the_environment_names_a_tier_or_limits_or_nothing() {
        let sonnet = ModelClass::Sonnet4;
        let tier = LimitsConfig::from_lookup(lookup(&[(ENV_TIER, "3")])).unwrap();
        assert_eq!(tier.limits_for(sonnet), Tier::Tier3.limits(sonnet));
        let explicit = LimitsConfig::from_lookup(lookup(&[(ENV_LIMITS, "rpm=7,otpm=9")])).unwrap();
        assert_eq!(explicit.limits_for(sonnet), Limits::new().rpm(7).otpm(9));
        assert_eq!(
            explicit.limits_for(ModelClass::Haiku3),
            Limits::new().rpm(7).otpm(9)
        );
        let none = LimitsConfig::from_lookup(lookup(&[(ENV_TIER, " ")])).unwrap();
        assert_eq!(none.limits_for(sonnet), Limits::new());

        let both = LimitsConfig::from_lookup(lookup(&[(ENV_TIER, "1"), (ENV_LIMITS, "rpm=1")]));
        assert_eq!(both.err(), Some(ConfigError::Conflict));
        let bad = LimitsConfig::from_lookup(lookup(&[(ENV_TIER, "gold")]));
        assert!(matches!(bad, Err(ConfigError::Tier { value }) if value == "gold"));
        let failing = LimitsConfig::from_lookup(|var| Err(ConfigError::NotUnicode { var }));
        assert_eq!(
            failing.err(),
            Some(ConfigError::NotUnicode { var: ENV_TIER })
        );
    }
}
