//! Command-line arguments, parsed by hand (no dependency).

use std::path::PathBuf;

use super::strategies::Kind;

pub const USAGE: &str = "\
simulate: run one workload through several client strategies against an
emulator of the Anthropic Messages API's rate limiter, and compare them.

USAGE:
    cargo run --release --example simulate -- [OPTIONS]

OPTIONS:
    --real-time            run on the wall clock (default: tokio's paused clock,
                           virtual time: minutes of traffic in seconds)
    --json                 print one JSON object on stdout instead of the table
    --plot FILE.svg        write tokens admitted per second over time, per strategy
    --timeline             print, per strategy and 10 s window, attempts sent,
                           429s, tokens charged and requests finished (stderr)
    --strategy LIST        strategies to run, comma-separated: a|naive,
                           b|common-recipe, c|tower, d|tower-llm-limits
                           (default: all four; with --target: d)
    --seed N               seed of the workload and the emulator (default 42)
    --requests N           generate N requests (default: as many as make three
                           minutes' worth of the input-token limit)
    --concurrency N        client workers issuing requests (default 32)
    --workload FILE.jsonl  replay these requests (one Messages body a line)
    --model NAME           model of the generated requests (default claude-sonnet-4-5)
    --rpm N --itpm N --otpm N
                           the limits (default: Tier 1 Sonnet 4.x, 50 / 30000 /
                           8000); the emulator enforces them and the crate's
                           stack paces to them. With --target and none given,
                           the crate's stack learns them from the headers
    --output-mode MODE     the emulator's OTPM rule: realtime (default) | reserve
    --fault-529 P --fault-500 P --fault-reset P --fault-stream P
                           the emulator's fault rates per request (default 0):
                           529 overloaded, 500, a reset connection, an
                           `event: error` in the middle of a stream
    --target URL           run against an API-compatible endpoint on the wall
                           clock instead of the emulator (e.g. https://api.anthropic.com)
    --api-key-env NAME     environment variable holding the key for --target
                           (default ANTHROPIC_API_KEY; sent as x-api-key)
    -h, --help             this text
";

#[derive(Debug, Clone)]
pub struct Args {
    pub real_time: bool,
    pub json: bool,
    pub timeline: bool,
    pub plot: Option<PathBuf>,
    pub strategies: Option<Vec<Kind>>,
    pub seed: u64,
    pub requests: Option<usize>,
    pub concurrency: usize,
    pub workload: Option<PathBuf>,
    pub model: String,
    pub rpm: u64,
    pub itpm: u64,
    pub otpm: u64,
    /// Whether any of --rpm, --itpm, --otpm was given (with --target and
    /// none given, the crate's stack learns the limits from the headers).
    pub limits_given: bool,
    pub reserve_mode: bool,
    /// Fault rates of the emulator: 529, 500, reset connection, `event: error`.
    pub fault_529: f64,
    pub fault_500: f64,
    pub fault_reset: f64,
    pub fault_stream: f64,
    pub target: Option<String>,
    pub api_key_env: String,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            real_time: false,
            json: false,
            timeline: false,
            plot: None,
            strategies: None,
            seed: 42,
            requests: None,
            concurrency: 32,
            workload: None,
            model: "claude-sonnet-4-5".to_string(),
            rpm: 50,
            itpm: 30_000,
            otpm: 8_000,
            limits_given: false,
            reserve_mode: false,
            fault_529: 0.0,
            fault_500: 0.0,
            fault_reset: 0.0,
            fault_stream: 0.0,
            target: None,
            api_key_env: "ANTHROPIC_API_KEY".to_string(),
        }
    }
}

fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.replace('_', "")
        .parse()
        .map_err(|_| format!("{flag}: not a number: {v}"))
}

fn rate(flag: &str, v: Option<String>) -> Result<f64, String> {
    let r: f64 = num(flag, v)?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{flag}: a probability from 0 to 1, not {r}"))
    }
}

/// Parses the arguments (without the program name).
///
/// # Errors
/// An unknown flag, a missing or malformed value: a message for the user.
/// `Ok(None)` means `--help` was asked for.
pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut a = Args::default();
    while let Some(flag) = it.next() {
        // Accept --flag=value as well as --flag value.
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (flag, None),
        };
        let mut value = || inline.clone().or_else(|| it.next());
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--real-time" => a.real_time = true,
            "--json" => a.json = true,
            "--timeline" => a.timeline = true,
            "--plot" => a.plot = Some(PathBuf::from(value().ok_or("--plot needs a file")?)),
            "--strategy" | "--strategies" => {
                let v = value().ok_or("--strategy needs a value")?;
                let mut kinds = Vec::new();
                for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    kinds.push(Kind::parse(s).ok_or_else(|| format!("unknown strategy: {s}"))?);
                }
                if kinds.is_empty() {
                    return Err("--strategy: none given".into());
                }
                a.strategies = Some(kinds);
            }
            "--seed" => a.seed = num(&flag, value())?,
            "--requests" => {
                let n: usize = num(&flag, value())?;
                if n == 0 {
                    return Err("--requests must be at least 1".into());
                }
                a.requests = Some(n);
            }
            "--concurrency" => {
                a.concurrency = num(&flag, value())?;
                if a.concurrency == 0 {
                    return Err("--concurrency must be at least 1".into());
                }
            }
            "--workload" => {
                a.workload = Some(PathBuf::from(value().ok_or("--workload needs a file")?))
            }
            "--model" => a.model = value().ok_or("--model needs a name")?,
            "--rpm" => {
                a.rpm = num(&flag, value())?;
                a.limits_given = true;
            }
            "--itpm" => {
                a.itpm = num(&flag, value())?;
                a.limits_given = true;
            }
            "--otpm" => {
                a.otpm = num(&flag, value())?;
                a.limits_given = true;
            }
            "--output-mode" => match value().as_deref() {
                Some("realtime") => a.reserve_mode = false,
                Some("reserve") => a.reserve_mode = true,
                other => return Err(format!("--output-mode: realtime or reserve, not {other:?}")),
            },
            "--fault-529" => a.fault_529 = rate(&flag, value())?,
            "--fault-500" => a.fault_500 = rate(&flag, value())?,
            "--fault-reset" => a.fault_reset = rate(&flag, value())?,
            "--fault-stream" => a.fault_stream = rate(&flag, value())?,
            "--target" => a.target = Some(value().ok_or("--target needs a URL")?),
            "--api-key-env" => a.api_key_env = value().ok_or("--api-key-env needs a name")?,
            other => return Err(format!("unknown argument: {other} (try --help)")),
        }
    }
    if a.fault_529 + a.fault_500 + a.fault_reset > 1.0 {
        return Err("the fault rates add up to more than 1".into());
    }
    if a.rpm == 0 || a.itpm == 0 || a.otpm == 0 {
        return Err("--rpm, --itpm and --otpm must be above 0".into());
    }
    Ok(Some(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Option<Args>, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_flags_and_values() {
        let a = p("--json --seed 7 --requests=12 --strategy a,d --itpm 40_000")
            .unwrap()
            .unwrap();
        assert!(a.json);
        assert_eq!(a.seed, 7);
        assert_eq!(a.requests, Some(12));
        assert_eq!(a.strategies, Some(vec![Kind::Naive, Kind::Crate]));
        assert_eq!(a.itpm, 40_000);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(p("--bogus").is_err());
        assert!(p("--seed x").is_err());
        assert!(p("--strategy z").is_err());
        assert!(p("--requests 0").is_err());
        assert!(p("--fault-529 1.5").is_err());
        assert!(p("--fault-529 0.6 --fault-500 0.6").is_err());
        assert!(p("--help").unwrap().is_none());
    }
}
