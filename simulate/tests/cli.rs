//! The `simulate` binary as a user runs it: exit codes, errors, `--help`,
//! the `--json` report and the table for the default seed.

use std::process::{Command, Output};

use serde_json::Value;

fn simulate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_simulate"))
        .args(args)
        .env_remove("ANTHROPIC_API_KEY")
        .output()
        .expect("the simulate binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn an_unknown_flag_is_a_usage_error_with_exit_code_2() {
    let out = simulate(&["--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert!(err.contains("unexpected argument '--bogus'"), "{err}");
    assert!(err.contains("Usage: simulate"), "{err}");
}

#[test]
fn bad_values_are_usage_errors_with_exit_code_2() {
    for (args, says) in [
        (&["--seed", "x"][..], "--seed"),
        (&["--requests", "0"][..], "must be at least 1"),
        (
            &["--strategy", "z"][..],
            "a strategy is naive, common-recipe",
        ),
        (&["--output-mode", "fast"][..], "realtime, reserve"),
        (&["--fault-529", "1.5"][..], "a probability from 0 to 1"),
        (
            &["--fault-529", "0.6", "--fault-500", "0.6"][..],
            "add up to more than 1",
        ),
    ] {
        let out = simulate(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn help_goes_to_stdout_with_exit_code_0() {
    let out = simulate(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(help.contains("Usage: simulate [OPTIONS]"), "{help}");
    assert!(help.contains("--fault-529 <P>"), "{help}");
}

#[test]
fn a_run_time_error_exits_1() {
    let out = simulate(&["--target", "https://example.test", "--requests", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("--target needs an API key in the environment variable ANTHROPIC_API_KEY"),
        "{err}"
    );
}

#[test]
fn the_json_report_parses_and_has_every_field() {
    let out = simulate(&["--json", "--strategy", "a,d", "--requests", "12"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(v["clock"], "virtual");
    assert_eq!(v["target"], "emulator");
    assert!(v["wall_seconds"].as_f64().is_some());
    assert_eq!(v["limits"]["requests_per_minute"], 50);
    assert_eq!(v["limits"]["input_tokens_per_minute"], 30_000);
    assert_eq!(v["limits"]["output_tokens_per_minute"], 8_000);
    assert_eq!(v["limits"]["capacity"]["input_tokens"], 30_000.0);
    assert_eq!(v["limits"]["output_mode"], "realtime");
    let w = &v["workload"];
    assert_eq!(
        (w["requests"].as_u64(), w["seed"].as_u64()),
        (Some(12), Some(42))
    );
    assert_eq!(
        (&w["source"], &w["model"]),
        (&"generated".into(), &"claude-sonnet-4-5".into())
    );
    assert_eq!(w["concurrency"], 32);
    for key in [
        "streaming",
        "with_cache_prefix",
        "input_tokens",
        "uncached_input_tokens",
        "max_tokens_sum",
    ] {
        assert!(w[key].is_u64(), "workload.{key}");
    }
    let rows = v["strategies"].as_array().expect("strategies");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["naive", "tower-llm-limits"]);
    for r in rows {
        for key in [
            "requests",
            "ok",
            "failed",
            "rate_limited",
            "retries",
            "attempts",
            "other_errors",
        ] {
            assert!(r[key].is_u64(), "{key}");
        }
        for key in [
            "seconds",
            "share_of_minimum",
            "p50_ms",
            "p99_ms",
            "minimum_seconds",
            "last_sent_seconds",
        ] {
            assert!(r[key].is_f64(), "{key}");
        }
        assert!(r["bound_by"].is_string() && r["failures"].is_object());
        assert_eq!(r["charged"]["source"], "emulator");
        assert_eq!(r["requests"], 12);
    }
    assert!(rows[0]["estimate_mae"].is_null());
    assert!(rows[1]["estimate_mae"].is_f64());
    // No progress or table on stdout, no bar on stderr when it is not a terminal.
    assert!(!text(&out.stderr).contains('['), "{}", text(&out.stderr));
}

/// The table of the default run (seed 42), as the example printed it before
/// it became this crate. A change to the emulator, the workload or a
/// strategy may move these figures: then explain the difference and update
/// `tests/seed42.txt` from `cargo run --release -p simulate`.
#[test]
fn the_default_run_prints_the_table_of_seed_42() {
    let out = simulate(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let printed: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("(virtual clock;"))
        .collect();
    let expected: Vec<&str> = include_str!("seed42.txt").lines().collect();
    assert_eq!(printed, expected, "\n{stdout}");
}
