//! Limits per model class, published tier presets, and the output-token rule.

use crate::Dimension;

/// Per-minute limits of one model class. `None` means not configured: the
/// budget then learns the limit from the server's `anthropic-ratelimit-*`
/// headers and does not pace that dimension until it has.
///
/// A configured limit stays in force unless the server reports a lower one
/// (a Workspace limit, a lower tier): the lower of the two applies. A
/// configured limit of zero admits nothing that costs anything in that
/// dimension (the ledger answers [`Reservation::Never`](super::ledger::Reservation::Never)).
///
/// # Examples
///
/// ```
/// use tower_llm_limits::budget::Limits;
///
/// // Pace requests and input tokens; learn the output limit from the server.
/// let limits = Limits::new()
///     .rpm(1_000)
///     .itpm(450_000);
/// assert_eq!(limits.output_tokens_per_minute, None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Uncached input tokens per minute.
    pub input_tokens_per_minute: Option<u64>,
    /// Output tokens per minute.
    pub output_tokens_per_minute: Option<u64>,
}

/// How output tokens are charged, a setting because the API's docs changed:
/// older docs estimated OTPM from `max_tokens` at the start of a request and
/// adjusted it at the end; current docs count only the output tokens
/// actually generated, in real time.
///
/// In both modes the ledger is told a cost at admission and the difference
/// to the truth at settlement; the mode only decides what the admission cost
/// is (the budget layer applies it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputMode {
    /// Only tokens really produced count (the current rule). The budget
    /// reserves an expected output, learned per model, and settles to the truth.
    #[default]
    Realtime,
    /// `max_tokens` is debited at admission and the difference refunded when
    /// the response ends (the older rule).
    Reserve,
}

impl Limits {
    /// No limit configured: every limit is learned from the server's
    /// `anthropic-ratelimit-*` headers. Set the ones you know with
    /// [`rpm`](Limits::rpm), [`itpm`](Limits::itpm) and [`otpm`](Limits::otpm).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::Limits;
    ///
    /// const TIER_1_SONNET: Limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    /// assert_eq!(TIER_1_SONNET.input_tokens_per_minute, Some(30_000));
    /// assert_eq!(Limits::new(), Limits::default());
    /// ```
    pub const fn new() -> Self {
        Limits {
            requests_per_minute: None,
            input_tokens_per_minute: None,
            output_tokens_per_minute: None,
        }
    }

    /// With the requests-per-minute limit (RPM) set.
    pub const fn rpm(mut self, limit: u64) -> Self {
        self.requests_per_minute = Some(limit);
        self
    }

    /// With the input-tokens-per-minute limit (ITPM, uncached input) set.
    pub const fn itpm(mut self, limit: u64) -> Self {
        self.input_tokens_per_minute = Some(limit);
        self
    }

    /// With the output-tokens-per-minute limit (OTPM) set.
    pub const fn otpm(mut self, limit: u64) -> Self {
        self.output_tokens_per_minute = Some(limit);
        self
    }

    /// The smallest value of each dimension in the published tier tables,
    /// over every [`Tier`] and [`ModelClass`]: 50 RPM, 30,000 ITPM and
    /// 8,000 OTPM (Tier 1). The budget learns no limit below these from the
    /// server's headers unless told otherwise (see
    /// `TokenBudgetBuilder::learned_limit_floor`).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::Limits;
    /// assert_eq!(Limits::smallest_published(), Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    /// ```
    pub fn smallest_published() -> Self {
        let all = Tier::ALL
            .iter()
            .flat_map(|tier| ModelClass::ALL.iter().map(move |class| tier.limits(*class)));
        let smallest = |dimension: Dimension| all.clone().filter_map(|l| l.get(dimension)).min();
        Limits {
            requests_per_minute: smallest(Dimension::Requests),
            input_tokens_per_minute: smallest(Dimension::InputTokens),
            output_tokens_per_minute: smallest(Dimension::OutputTokens),
        }
    }

    /// The configured limit of one dimension.
    pub const fn get(&self, dimension: Dimension) -> Option<u64> {
        match dimension {
            Dimension::Requests => self.requests_per_minute,
            Dimension::InputTokens => self.input_tokens_per_minute,
            Dimension::OutputTokens => self.output_tokens_per_minute,
        }
    }
}

/// A model class: the models that share one set of rate limits.
///
/// Pools are shared per family, as Anthropic's rate-limits page says ("a
/// total limit that applies to combined traffic across Opus 4, Opus 4.1, and
/// Opus 4.5"; the Sonnet 4.x limit covers "both Sonnet 4 and Sonnet 4.5"): one
/// Opus 4.x limit for Opus 4, 4.1 and 4.5 (and later 4.x), one Sonnet 4.x
/// limit for Sonnet 4 and 4.5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ModelClass {
    /// Claude Opus 4.x (`claude-opus-4-5-20251101`, `claude-opus-4-1`, `claude-opus-4-20250514`, ...).
    Opus4,
    /// Claude Sonnet 4.x (`claude-sonnet-4-5-20250929`, `claude-sonnet-4-20250514`, ...).
    Sonnet4,
    /// Claude Haiku 4.5 (`claude-haiku-4-5-20251001`).
    Haiku45,
    /// Claude Haiku 3.5 (`claude-3-5-haiku-20241022`): cache reads count toward ITPM.
    Haiku35,
    /// Claude Haiku 3 (`claude-3-haiku-20240307`): cache reads count toward ITPM.
    Haiku3,
    /// Claude Sonnet 3.7 (`claude-3-7-sonnet-20250219`).
    Sonnet37,
    /// Any other model, or a name that is not recognised.
    Other,
}

impl ModelClass {
    /// Every class, in declaration order.
    pub const ALL: [ModelClass; 7] = [
        ModelClass::Opus4,
        ModelClass::Sonnet4,
        ModelClass::Haiku45,
        ModelClass::Haiku35,
        ModelClass::Haiku3,
        ModelClass::Sonnet37,
        ModelClass::Other,
    ];

    /// The class of a model, from its name as sent in the request's `model`
    /// field.
    ///
    /// Recognises the API's names in both orders (`claude-sonnet-4-5-...`,
    /// `claude-3-5-haiku-...`), with or without a date, `-latest` or `-0`
    /// suffix, and the cloud providers' forms
    /// (`anthropic.claude-3-7-sonnet-20250219-v1:0`, `claude-sonnet-4-5@20250929`),
    /// case-insensitively. Anything else is [`ModelClass::Other`].
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_llm_limits::budget::ModelClass;
    /// assert_eq!(ModelClass::of("claude-opus-4-1-20250805"), ModelClass::Opus4);
    /// assert_eq!(ModelClass::of("claude-3-5-haiku-latest"), ModelClass::Haiku35);
    /// assert_eq!(ModelClass::of("claude-2.1"), ModelClass::Other);
    /// ```
    pub fn of(model: &str) -> Self {
        // Split on separators without allocating: `-`, `.`, `@`, `:`, `_`, `/`
        // (any byte but an ASCII letter or digit: every byte of a non-ASCII
        // character is one, as the character itself is).
        let mut tokens = model
            .as_bytes()
            .split(|b| !b.is_ascii_alphanumeric())
            .filter(|t| !t.is_empty());
        // Small numbers (one or two digits) seen before the family name, and
        // after it; dates (eight digits) and other words end a version.
        let mut before: [Option<u8>; 2] = [None, None];
        let mut family = None;
        for token in tokens.by_ref() {
            if let Some(n) = small_number(token) {
                // Keep the last two small numbers before the family name.
                before = match before {
                    [None, _] => [Some(n), None],
                    [Some(first), None] => [Some(first), Some(n)],
                    [Some(_), Some(second)] => [Some(second), Some(n)],
                };
                continue;
            }
            let word = Family::of(token);
            if word.is_some() {
                family = word;
                break;
            }
            before = [None, None];
        }
        let Some(family) = family else {
            return ModelClass::Other;
        };
        let mut after: [Option<u8>; 2] = [None, None];
        for token in tokens {
            match (small_number(token), after) {
                (Some(n), [None, _]) => after[0] = Some(n),
                (Some(n), [Some(_), None]) => after[1] = Some(n),
                _ => break,
            }
        }
        let (major, minor) = match after {
            [Some(major), minor] => (major, minor),
            [None, _] => match before {
                [Some(major), minor] => (major, minor),
                [None, _] => return ModelClass::Other,
            },
        };
        match (family, major, minor) {
            (Family::Opus, 4, _) => ModelClass::Opus4,
            (Family::Sonnet, 4, _) => ModelClass::Sonnet4,
            (Family::Haiku, 4, Some(5)) => ModelClass::Haiku45,
            (Family::Haiku, 3, Some(5)) => ModelClass::Haiku35,
            (Family::Haiku, 3, None) => ModelClass::Haiku3,
            (Family::Sonnet, 3, Some(7)) => ModelClass::Sonnet37,
            _ => ModelClass::Other,
        }
    }

    /// Whether `cache_read_input_tokens` count toward this class's ITPM limit:
    /// true for the models the rate-limits page marks with † (Haiku 3.5, and
    /// Haiku 3 in the older copy); for the others only uncached input and
    /// cache writes count.
    pub const fn cache_reads_count_toward_itpm(self) -> bool {
        matches!(self, ModelClass::Haiku35 | ModelClass::Haiku3)
    }

    /// A short stable name for the class, usable as a budget key:
    /// `opus-4`, `sonnet-4`, `haiku-4-5`, `haiku-3-5`, `haiku-3`, `sonnet-3-7`
    /// or `other`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ModelClass::Opus4 => "opus-4",
            ModelClass::Sonnet4 => "sonnet-4",
            ModelClass::Haiku45 => "haiku-4-5",
            ModelClass::Haiku35 => "haiku-3-5",
            ModelClass::Haiku3 => "haiku-3",
            ModelClass::Sonnet37 => "sonnet-3-7",
            ModelClass::Other => "other",
        }
    }
}

impl std::fmt::Display for ModelClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Opus,
    Sonnet,
    Haiku,
}

impl Family {
    fn of(token: &[u8]) -> Option<Self> {
        if token.eq_ignore_ascii_case(b"opus") {
            Some(Family::Opus)
        } else if token.eq_ignore_ascii_case(b"sonnet") {
            Some(Family::Sonnet)
        } else if token.eq_ignore_ascii_case(b"haiku") {
            Some(Family::Haiku)
        } else {
            None
        }
    }
}

/// A version number: one or two ASCII digits.
fn small_number(token: &[u8]) -> Option<u8> {
    match *token {
        [d] if d.is_ascii_digit() => Some(d - b'0'),
        [t, d] if t.is_ascii_digit() && d.is_ascii_digit() => Some((t - b'0') * 10 + (d - b'0')),
        _ => None,
    }
}

/// The published standard tiers of the Messages API, from both tier tables
/// of Anthropic's rate-limits page
/// (<https://platform.claude.com/docs/en/api/rate-limits>): the older Tier
/// 1-4 table and the newer Start / Build / Scale one, as of this release.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::budget::{Limits, ModelClass, Tier};
/// assert_eq!(Tier::Tier4.limits(ModelClass::Haiku45), Limits::new().rpm(4_000).itpm(4_000_000).otpm(800_000));
/// assert_eq!(Tier::Start.limits(ModelClass::Haiku35), Limits::new().rpm(1_000).itpm(100_000).otpm(20_000));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Tier {
    /// Tier 1 (older table; $5 cumulative credit purchase).
    Tier1,
    /// Tier 2 (older table; $40).
    Tier2,
    /// Tier 3 (older table; $200).
    Tier3,
    /// Tier 4 (older table; $400).
    Tier4,
    /// Start (newer table; $500 monthly spend cap).
    Start,
    /// Build (newer table; $1,000 monthly spend cap).
    Build,
    /// Scale (newer table; $200,000 monthly spend cap).
    Scale,
}

impl Tier {
    /// Every tier, the older table first.
    pub const ALL: [Tier; 7] = [
        Tier::Tier1,
        Tier::Tier2,
        Tier::Tier3,
        Tier::Tier4,
        Tier::Start,
        Tier::Build,
        Tier::Scale,
    ];

    /// The published standard limits of a model class in this tier.
    ///
    /// The tables have rows for Sonnet 4.x, Opus 4.x, Haiku 4.5 and Haiku 3.5
    /// only. Any other class ([`ModelClass::Sonnet37`], [`ModelClass::Haiku3`],
    /// [`ModelClass::Other`]) gets the table's most common row: the one shared
    /// by Sonnet 4.x and Opus 4.x in the Tier 1-4 table, and the one shared by
    /// Opus 4.x, Sonnet 4.x and Haiku 4.5 in the Start / Build / Scale table.
    /// Where that guess is wrong, the limits learned from the server's
    /// headers correct it downwards (the lower of configured and reported
    /// applies); configure the class explicitly to be sure.
    pub const fn limits(self, class: ModelClass) -> Limits {
        let haiku35 = matches!(class, ModelClass::Haiku35);
        let haiku45 = matches!(class, ModelClass::Haiku45);
        match self {
            Tier::Tier1 if haiku35 || haiku45 => Limits::new().rpm(50).itpm(50_000).otpm(10_000),
            Tier::Tier1 => Limits::new().rpm(50).itpm(30_000).otpm(8_000),
            Tier::Tier2 if haiku35 => Limits::new().rpm(1_000).itpm(100_000).otpm(20_000),
            Tier::Tier2 => Limits::new().rpm(1_000).itpm(450_000).otpm(90_000),
            Tier::Tier3 if haiku35 => Limits::new().rpm(2_000).itpm(200_000).otpm(40_000),
            Tier::Tier3 if haiku45 => Limits::new().rpm(2_000).itpm(1_000_000).otpm(200_000),
            Tier::Tier3 => Limits::new().rpm(2_000).itpm(800_000).otpm(160_000),
            Tier::Tier4 if haiku35 => Limits::new().rpm(4_000).itpm(400_000).otpm(80_000),
            Tier::Tier4 if haiku45 => Limits::new().rpm(4_000).itpm(4_000_000).otpm(800_000),
            Tier::Tier4 => Limits::new().rpm(4_000).itpm(2_000_000).otpm(400_000),
            Tier::Start if haiku35 => Limits::new().rpm(1_000).itpm(100_000).otpm(20_000),
            Tier::Start => Limits::new().rpm(1_000).itpm(2_000_000).otpm(400_000),
            Tier::Build if haiku35 => Limits::new().rpm(2_000).itpm(200_000).otpm(40_000),
            Tier::Build => Limits::new().rpm(5_000).itpm(5_000_000).otpm(1_000_000),
            Tier::Scale if haiku35 => Limits::new().rpm(4_000).itpm(400_000).otpm(80_000),
            Tier::Scale => Limits::new().rpm(10_000).itpm(10_000_000).otpm(2_000_000),
        }
    }
}
