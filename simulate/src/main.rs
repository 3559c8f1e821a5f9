//! The crate's main job (`cargo run --release -p simulate`): one workload
//! through several client strategies against an emulator of the Anthropic
//! Messages API's rate limiter, side by side. `--help` lists the options.

use std::process::ExitCode;

fn main() -> ExitCode {
    simulate::run(simulate::Args::from_env())
}
