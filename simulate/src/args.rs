//! Command-line arguments (clap, derive).

use std::ffi::OsString;
use std::path::PathBuf;
use std::str::FromStr;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

use super::emu::{Tokenizer, UnknownTokenizer};
use super::strategies::Kind;

/// Run one workload through several client strategies against an emulator of
/// the Anthropic Messages API's rate limiter, and compare them.
///
/// Time is virtual by default (tokio's paused clock: minutes of traffic in
/// seconds of wall time).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "simulate",
    version,
    args_override_self = true,
    allow_negative_numbers = true
)]
pub struct Args {
    /// Run on the wall clock (default: tokio's paused clock, virtual time:
    /// minutes of traffic in seconds).
    #[arg(long)]
    pub real_time: bool,

    /// Run the layer comparisons instead: background traffic with and
    /// without `BatchLayer`, conversations with and without `AutoCacheLayer`
    /// beside breakpoints placed by hand (`--requests` sets the batch run's
    /// size, 120 by default).
    #[arg(long)]
    pub layers: bool,

    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Write tokens admitted per second over time, per strategy, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// Print, per strategy and 10 s window, attempts sent, 429s, tokens
    /// charged and requests finished (on stderr).
    #[arg(long)]
    pub timeline: bool,

    /// Strategies to run, comma-separated: a|naive, b|common-recipe,
    /// c|tower, d|tower-llm-limits (default: all four; with --target: d).
    #[arg(
        long = "strategy",
        visible_alias = "strategies",
        value_name = "LIST",
        value_delimiter = ',',
        value_parser = strategy
    )]
    pub strategies: Option<Vec<Kind>>,

    /// Seed of the workload and the emulator.
    #[arg(long, value_name = "N", default_value_t = 42, value_parser = number::<u64>)]
    pub seed: u64,

    /// Generate N requests (default: as many as make three minutes' worth of
    /// the input-token limit).
    #[arg(long, value_name = "N", value_parser = at_least_one::<usize>)]
    pub requests: Option<usize>,

    /// Client workers issuing requests.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = at_least_one::<usize>)]
    pub concurrency: usize,

    /// Replay these requests (one Messages body a line; blank lines and lines
    /// starting with `#` are skipped).
    #[arg(long, value_name = "FILE.jsonl")]
    pub workload: Option<PathBuf>,

    /// Model of the generated requests.
    #[arg(long, value_name = "NAME", default_value = "claude-sonnet-4-5")]
    pub model: String,

    /// Requests per minute (default: Tier 1 Sonnet 4.x). The emulator
    /// enforces the limits and the crate's stack paces to them; with
    /// --target and none of --rpm, --itpm, --otpm given, the crate's stack
    /// learns them from the server's headers.
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = at_least_one::<u64>)]
    pub rpm: u64,

    /// Input tokens per minute (default: Tier 1 Sonnet 4.x).
    #[arg(long, value_name = "N", default_value_t = 30_000, value_parser = at_least_one::<u64>)]
    pub itpm: u64,

    /// Output tokens per minute (default: Tier 1 Sonnet 4.x).
    #[arg(long, value_name = "N", default_value_t = 8_000, value_parser = at_least_one::<u64>)]
    pub otpm: u64,

    /// Whether any of --rpm, --itpm, --otpm was given (with --target and none
    /// given, the crate's stack learns the limits from the headers).
    #[arg(skip)]
    pub limits_given: bool,

    /// The emulator's OTPM rule (and the crate's stack's).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = OutputMode::Realtime)]
    pub output_mode: OutputMode,

    /// How the emulator counts input tokens: `o200k` (OpenAI's o200k_base
    /// byte-pair encoding, shipped inside the binary) or `words` (ceil(n / 4)
    /// per word of n letters and digits, one per other non-space character).
    /// The crate's estimator never uses either.
    #[arg(long, value_name = "NAME", default_value = "o200k", value_parser = tokenizer)]
    pub tokenizer: Tokenizer,

    /// Multiply the emulator's token counts by X: a model whose tokenizer
    /// the crate's estimator does not know (e.g. 1.3 counts 30% more).
    #[arg(long, value_name = "X", default_value_t = 1.0, value_parser = token_scale)]
    pub token_scale: f64,

    /// Run N seeds, --seed and the N - 1 after it, each with its own
    /// workload, and print one line per seed and strategy, then the worst.
    #[arg(long, value_name = "N", value_parser = at_least_one::<u64>)]
    pub seeds: Option<u64>,

    /// The emulator's rate of 529 `overloaded_error` answers per request.
    #[arg(long = "fault-529", value_name = "P", default_value_t = 0.0, value_parser = probability)]
    pub fault_529: f64,

    /// The emulator's rate of 500 answers per request.
    #[arg(long = "fault-500", value_name = "P", default_value_t = 0.0, value_parser = probability)]
    pub fault_500: f64,

    /// The emulator's rate of reset connections per request.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = probability)]
    pub fault_reset: f64,

    /// The emulator's rate of an `event: error` in the middle of a stream,
    /// per streamed request.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = probability)]
    pub fault_stream: f64,

    /// Run against an API-compatible endpoint on the wall clock instead of
    /// the emulator (e.g. `https://api.anthropic.com`).
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,

    /// Run N independent stacks of the crate against one emulator instead
    /// of the strategies (comma-separated sizes: `--fleet 4,16`); with
    /// --redis they share one RedisLedger budget, and each size also runs
    /// with a ledger per stack for contrast.
    #[arg(long, value_name = "N,...", value_delimiter = ',', value_parser = at_least_one::<usize>)]
    pub fleet: Option<Vec<usize>>,

    /// The Redis of --fleet's shared budget (`redis://127.0.0.1:6379/`);
    /// runs on the wall clock.
    #[arg(long, value_name = "URL", requires = "fleet")]
    pub redis: Option<String>,

    /// With --redis or --fleet-one-ledger, also run each size sharing the
    /// budget but not the prompt cache (each stack's estimator alone knows
    /// its prefixes), as a baseline in the same run.
    #[arg(long, requires = "fleet")]
    pub fleet_unshared: bool,

    /// With --fleet, also run the stacks sharing one in-memory ledger and
    /// prompt-cache view (a store without a network or a clock of its own:
    /// what a shared budget does at best; runs in virtual time without
    /// --redis).
    #[arg(long, requires = "fleet")]
    pub fleet_one_ledger: bool,

    /// With --fleet, leave out the rows with a ledger per stack.
    #[arg(long, requires = "fleet")]
    pub no_contrast: bool,

    /// Environment variable holding the key for --target (sent as x-api-key).
    #[arg(long, value_name = "NAME", default_value = "ANTHROPIC_API_KEY")]
    pub api_key_env: String,

    /// Compare, over N emulated upstreams each with the limits above, one
    /// upstream alone, a naive round-robin pool and the crate's `Pool`
    /// (a workload sized for the sum of the limits).
    #[arg(long, value_name = "N", value_parser = at_least_one::<usize>, conflicts_with = "target")]
    pub upstreams: Option<usize>,

    /// With --upstreams: the last upstream's rate of 529 answers.
    #[arg(long = "upstream-529", value_name = "P", default_value_t = 0.10, value_parser = probability)]
    pub upstream_529: f64,

    /// With --upstreams: seconds into the run at which the first upstream
    /// reaches its spend cap, in two extra rows (0: no such rows).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0, value_parser = number::<f64>)]
    pub spend_cap_at: f64,
}

/// How the emulator charges output tokens against OTPM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputMode {
    /// Output is charged as it is produced; a request is admitted while the
    /// OTPM bucket is above zero.
    Realtime,
    /// `max_tokens` is reserved at admission and the unused part refunded.
    Reserve,
}

impl OutputMode {
    /// The name the flag and the report use.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputMode::Realtime => "realtime",
            OutputMode::Reserve => "reserve",
        }
    }
}

impl Args {
    /// Parses the process's arguments; on an error or `--help`, prints and
    /// exits (code 2 for a usage error, 0 for `--help`).
    pub fn from_env() -> Args {
        Args::try_from_iter(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the program name first).
    ///
    /// # Errors
    /// An unknown flag, a missing or malformed value, fault rates adding up
    /// to more than 1, or `--help` / `--version` (clap's error kinds say
    /// which).
    pub fn try_from_iter<I, T>(args: I) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut command = Args::command();
        let matches = command.try_get_matches_from_mut(args)?;
        let mut a = Args::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
        a.limits_given = ["rpm", "itpm", "otpm"]
            .iter()
            .any(|id| matches.value_source(id) == Some(ValueSource::CommandLine));
        if a.fault_529 + a.fault_500 + a.fault_reset > 1.0 {
            return Err(command.error(
                ErrorKind::ArgumentConflict,
                "the fault rates --fault-529, --fault-500 and --fault-reset add up to more than 1",
            ));
        }
        Ok(a)
    }

    /// Whether the emulator (and the crate's stack) reserve `max_tokens` at
    /// admission.
    pub fn reserve_mode(&self) -> bool {
        self.output_mode == OutputMode::Reserve
    }
}

/// A number; `_` may separate digits (`30_000`).
fn number<T>(s: &str) -> Result<T, String>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    s.replace('_', "")
        .parse()
        .map_err(|e| format!("not a number: {e}"))
}

/// A number of at least 1.
fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: FromStr + PartialOrd + From<u8>,
    T::Err: std::fmt::Display,
{
    let n: T = number(s)?;
    if n >= T::from(1) {
        Ok(n)
    } else {
        Err("must be at least 1".to_string())
    }
}

/// A strategy by name or letter (spaces around it ignored).
fn strategy(s: &str) -> Result<Kind, String> {
    Kind::from_str(s.trim(), true).map_err(|_| {
        "a strategy is naive, common-recipe, tower or tower-llm-limits (or a, b, c, d)".to_string()
    })
}

/// A tokenizer by name.
fn tokenizer(s: &str) -> Result<Tokenizer, String> {
    s.parse().map_err(|e: UnknownTokenizer| e.to_string())
}

/// A token scale: above 0, at most 100.
fn token_scale(s: &str) -> Result<f64, String> {
    let x: f64 = number(s)?;
    if x.is_finite() && x > 0.0 && x <= 100.0 {
        Ok(x)
    } else {
        Err(format!("a scale above 0 and at most 100, not {x}"))
    }
}

/// A probability, from 0 to 1.
fn probability(s: &str) -> Result<f64, String> {
    let p: f64 = number(s)?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("a probability from 0 to 1, not {p}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Args, clap::Error> {
        Args::try_from_iter(std::iter::once("simulate").chain(s.split_whitespace()))
    }

    fn ok(s: &str) -> Args {
        p(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn kind_of_error(s: &str) -> ErrorKind {
        match p(s) {
            Ok(a) => panic!("{s} parsed: {a:?}"),
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn the_defaults() {
        let a = ok("");
        assert!(!a.real_time && !a.json && !a.timeline && !a.limits_given);
        assert_eq!((&a.plot, &a.workload, &a.target), (&None, &None, &None));
        assert_eq!((&a.strategies, a.requests), (&None, None));
        assert_eq!((a.seed, a.concurrency), (42, 32));
        assert_eq!(a.model, "claude-sonnet-4-5");
        assert_eq!((a.rpm, a.itpm, a.otpm), (50, 30_000, 8_000));
        assert_eq!(a.output_mode, OutputMode::Realtime);
        assert!(!a.reserve_mode());
        let faults = [a.fault_529, a.fault_500, a.fault_reset, a.fault_stream];
        assert_eq!(faults, [0.0; 4]);
        assert_eq!(a.api_key_env, "ANTHROPIC_API_KEY");
        assert_eq!(
            (a.tokenizer, a.token_scale, a.seeds),
            (Tokenizer::O200kBase, 1.0, None)
        );
    }

    #[test]
    fn every_flag_and_its_value() {
        let a = ok(
            "--real-time --json --timeline --plot out.svg --strategy a,d --seed 7 \
             --requests 12 --concurrency 4 --workload w.jsonl --model claude-haiku-4-5 \
             --rpm 1_000 --itpm 40_000 --otpm 9000 --output-mode reserve \
             --fault-529 0.02 --fault-500 0.01 --fault-reset 0.005 --fault-stream 0.5 \
             --target https://example.test/prefix --api-key-env MY_KEY \
             --tokenizer words --token-scale 1.3 --seeds 10",
        );
        assert_eq!(
            (a.tokenizer, a.token_scale, a.seeds),
            (Tokenizer::Words, 1.3, Some(10))
        );
        assert!(a.real_time && a.json && a.timeline);
        assert_eq!(a.plot, Some(PathBuf::from("out.svg")));
        assert_eq!(a.strategies, Some(vec![Kind::Naive, Kind::Crate]));
        assert_eq!((a.seed, a.requests, a.concurrency), (7, Some(12), 4));
        assert_eq!(a.workload, Some(PathBuf::from("w.jsonl")));
        assert_eq!(a.model, "claude-haiku-4-5");
        assert_eq!((a.rpm, a.itpm, a.otpm), (1_000, 40_000, 9_000));
        assert!(a.limits_given);
        assert!(a.reserve_mode());
        let faults = [a.fault_529, a.fault_500, a.fault_reset, a.fault_stream];
        assert_eq!(faults, [0.02, 0.01, 0.005, 0.5]);
        assert_eq!(a.target.as_deref(), Some("https://example.test/prefix"));
        assert_eq!(a.api_key_env, "MY_KEY");
    }

    #[test]
    fn values_after_an_equals_sign_and_later_flags_win() {
        let a = ok("--seed=9 --requests=3 --strategies=b --seed 10");
        assert_eq!((a.seed, a.requests), (10, Some(3)));
        assert_eq!(a.strategies, Some(vec![Kind::CommonRecipe]));
    }

    #[test]
    fn each_limit_alone_counts_as_given() {
        for flag in ["--rpm 60", "--itpm 30000", "--otpm 8000"] {
            assert!(ok(flag).limits_given, "{flag}");
        }
    }

    #[test]
    fn strategies_by_name_letter_or_alias() {
        let a = ok("--strategy naive,b,common,tower,c,d,crate,Tower-LLM-Limits");
        use Kind::*;
        let want = [
            Naive,
            CommonRecipe,
            CommonRecipe,
            Tower,
            Tower,
            Crate,
            Crate,
            Crate,
        ];
        assert_eq!(a.strategies, Some(want.to_vec()));
    }

    #[test]
    fn strategies_with_spaces_and_repeated() {
        let a = Args::try_from_iter(["simulate", "--strategy", " a, d "]).expect("parses");
        assert_eq!(a.strategies, Some(vec![Kind::Naive, Kind::Crate]));
        // A repeated --strategy adds to the list.
        let a = ok("--strategy a --strategy c,d");
        assert_eq!(
            a.strategies,
            Some(vec![Kind::Naive, Kind::Tower, Kind::Crate])
        );
    }

    #[test]
    fn rejects_bad_input_as_usage_errors() {
        assert_eq!(kind_of_error("--bogus"), ErrorKind::UnknownArgument);
        assert_eq!(kind_of_error("stray"), ErrorKind::UnknownArgument);
        assert_eq!(kind_of_error("--seed"), ErrorKind::InvalidValue);
        for bad in [
            "--seed x",
            "--seed -1",
            "--strategy z",
            "--strategy a,,d",
            "--requests 0",
            "--concurrency 0",
            "--rpm 0",
            "--itpm 0",
            "--otpm 0",
            "--fault-529 1.5",
            "--fault-stream -0.1",
            "--fault-500 x",
            "--output-mode fast",
            "--tokenizer gpt2",
            "--token-scale 0",
            "--token-scale -1",
            "--token-scale 101",
            "--seeds 0",
        ] {
            let kind = kind_of_error(bad);
            assert!(
                matches!(kind, ErrorKind::ValueValidation | ErrorKind::InvalidValue),
                "{bad}: {kind:?}"
            );
        }
        assert_eq!(
            kind_of_error("--fault-529 0.6 --fault-500 0.6"),
            ErrorKind::ArgumentConflict
        );
        // A usage error exits with code 2.
        assert_eq!(p("--bogus").map(|_| ()).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn errors_name_the_flag_and_the_reason() {
        let msg = |s: &str| p(s).map(|_| ()).unwrap_err().to_string();
        assert!(msg("--requests 0").contains("must be at least 1"));
        assert!(msg("--fault-529 1.5").contains("a probability from 0 to 1, not 1.5"));
        assert!(msg("--seed x").contains("--seed"));
        assert!(msg("--fault-stream -0.1").contains("not -0.1"));
        assert!(msg("--fault-529 0.6 --fault-500 0.6").contains("add up to more than 1"));
    }

    #[test]
    fn help_lists_every_flag() {
        let e = p("--help").map(|_| ()).unwrap_err();
        assert_eq!((e.kind(), e.exit_code()), (ErrorKind::DisplayHelp, 0));
        let help = e.to_string();
        for flag in [
            "--real-time",
            "--json",
            "--plot",
            "--timeline",
            "--strategy",
            "--seed",
            "--requests",
            "--concurrency",
            "--workload",
            "--model",
            "--rpm",
            "--itpm",
            "--otpm",
            "--output-mode",
            "--fault-529",
            "--fault-500",
            "--fault-reset",
            "--fault-stream",
            "--target",
            "--api-key-env",
            "--tokenizer",
            "--token-scale",
            "--seeds",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
    }

    #[test]
    fn the_command_is_well_formed() {
        Args::command().debug_assert();
    }
}
