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
    assert_eq!(
        (&v["tokenizer"], v["token_scale"].as_f64()),
        (&"o200k".into(), Some(1.0))
    );
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
            "workload_minimum_seconds",
        ] {
            assert!(r[key].is_f64(), "{key}");
        }
        for key in ["cache_read_tokens", "cache_read_tokens_possible"] {
            assert!(r[key].is_u64(), "{key}");
        }
        assert!(r["rate_limited_by_class"].is_object());
        assert!(r["bound_by"].is_string() && r["failures"].is_object());
        assert_eq!(r["charged"]["source"], "emulator");
        assert_eq!(r["requests"], 12);
    }
    assert!(rows[0]["estimate_mae"].is_null());
    assert!(rows[1]["estimate_mae"].is_f64());
    // No request of the crate's stack failed: its share of the workload
    // minimum is a number; its estimates are split by kind of content.
    assert!(rows[1]["share_of_workload_minimum"].is_f64());
    assert_eq!(rows[0]["estimate_error_by_kind"], serde_json::json!([]));
    let by_kind = rows[1]["estimate_error_by_kind"]
        .as_array()
        .expect("by kind");
    let all = by_kind
        .iter()
        .find(|k| k["kind"] == "all")
        .expect("an \"all\" line");
    assert_eq!(all["requests"], 12);
    for key in ["mean_abs", "p50_abs", "p90_abs", "bias"] {
        assert!(all[key].is_f64(), "{key}");
    }
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

fn json_run(args: &[&str]) -> Value {
    let out = simulate(args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

/// `--token-scale` multiplies what the emulator charges for the same
/// workload (the same seed gives the same bodies whatever the scale).
#[test]
fn a_token_scale_charges_more_for_the_same_workload() {
    let run = |scale: &str| {
        let v = json_run(&[
            "--json",
            "--strategy",
            "d",
            "--requests",
            "10",
            "--tokenizer",
            "words",
            "--token-scale",
            scale,
        ]);
        assert_eq!(v["tokenizer"], "words");
        let d = &v["strategies"][0];
        assert_eq!(d["failed"], 0);
        (
            v["workload"]["input_tokens"]
                .as_u64()
                .expect("workload tokens"),
            d["charged"]["input_tokens"].as_u64().expect("charged"),
        )
    };
    let (w1, c1) = run("1");
    let (w13, c13) = run("1.3");
    // The workload is sized with the unscaled tokenizer: the same bodies.
    assert_eq!(w1, w13);
    let ratio = c13 as f64 / c1 as f64;
    assert!((1.25..=1.35).contains(&ratio), "{c13} / {c1} = {ratio}");
}

/// `--seeds N` runs N seeds and prints one line per seed and strategy, then
/// the worst figures.
#[test]
fn seeds_print_one_line_each_then_the_worst() {
    let out = simulate(&[
        "--seeds",
        "2",
        "--seed",
        "7",
        "--strategy",
        "d",
        "--requests",
        "6",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("seed ")).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("seed    7  tower-llm-limits"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("seed    8  tower-llm-limits"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tower-llm-limits: over 2 seeds, lowest share of the workload minimum"),
        "{stdout}"
    );
    let v = json_run(&[
        "--json",
        "--seeds",
        "2",
        "--strategy",
        "d",
        "--requests",
        "4",
    ]);
    let seeds: Vec<u64> = v
        .as_array()
        .expect("one report per seed")
        .iter()
        .filter_map(|r| r["workload"]["seed"].as_u64())
        .collect();
    assert_eq!(seeds, [42, 43]);
}

/// Against the standalone emulator over loopback, with no limits given,
/// the crate's stack learns the limits from the headers; the report counts
/// 429s per model class.
#[test]
fn a_target_with_learned_limits_reports_429s_per_model_class() {
    use tower_llm_limits_emulator::{Emulator, Latency, Limits};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let emulator = Emulator::builder()
                .limits(Limits::new().rpm(1_000).itpm(2_000_000).otpm(400_000))
                .latency(Latency::none())
                .build()
                .expect("emulator");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind loopback");
            tx.send(listener.local_addr().expect("address"))
                .expect("send");
            let _ = emulator.serve(listener).await;
        });
    });
    let addr = rx.recv().expect("the emulator listens");
    let url = format!("http://{addr}");
    let out = Command::new(env!("CARGO_BIN_EXE_simulate"))
        .args(["--target", &url, "--requests", "6", "--json"])
        .env("ANTHROPIC_API_KEY", "sk-test")
        .output()
        .expect("the simulate binary runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["target"], url);
    assert_eq!(v["clock"], "wall");
    // The limits measured against are the ones the headers said.
    assert_eq!(v["limits"]["requests_per_minute"], 1_000);
    assert_eq!(v["limits"]["input_tokens_per_minute"], 2_000_000);
    let d = &v["strategies"][0];
    assert_eq!(
        (d["name"].as_str(), d["failed"].as_u64()),
        (Some("tower-llm-limits"), Some(0))
    );
    assert_eq!(d["charged"]["source"], "responses");
    let by_class = d["rate_limited_by_class"].as_object().expect("by class");
    let total: u64 = by_class.values().filter_map(Value::as_u64).sum();
    assert_eq!(total, d["rate_limited"].as_u64().expect("429s"));
}
