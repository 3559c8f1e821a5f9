//! `simulate --layers`: the proof of `BatchLayer` and `AutoCacheLayer` as a
//! user runs it. Every background request completes, the interactive ones
//! wait less with batches and no 429 is received; a conversation workload
//! without breakpoints is charged fewer input tokens with `AutoCacheLayer`.

use std::process::Command;

/// The cells of the table row that starts with `| {name} |`.
fn row(out: &str, name: &str) -> Vec<String> {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no row {name} in:\n{out}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_owned())
        .collect()
}

fn number(cell: &str) -> f64 {
    let digits: String = cell
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {cell}"))
}

#[test]
fn layers_tables_show_what_each_layer_buys() {
    let out = Command::new(env!("CARGO_BIN_EXE_simulate"))
        .args(["--layers"])
        .env_remove("ANTHROPIC_API_KEY")
        .output()
        .expect("the simulate binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8_lossy(&out.stdout).into_owned();

    let plain = row(&out, "preset only");
    let batched = row(&out, "preset + `BatchLayer`");
    // Every request completes in both runs ("ok / total").
    for r in [&plain, &batched] {
        for cell in [&r[1], &r[2]] {
            let (ok, total) = cell.split_once(" / ").expect("ok / total");
            assert_eq!(ok, total, "{r:?}");
        }
        assert_eq!(r[5], "0", "no 429: {r:?}");
    }
    assert!(number(&batched[6]) >= 1.0, "batches sent: {batched:?}");
    assert!(
        number(&batched[4]) < number(&plain[4]),
        "interactive p99: {plain:?} {batched:?}"
    );
    assert!(
        number(&batched[8]) < number(&plain[8]),
        "cost: {plain:?} {batched:?}"
    );

    let none = row(&out, "preset only, no breakpoints");
    let auto = row(&out, "`AutoCacheLayer` + preset");
    let by_hand = row(&out, "preset, breakpoints placed by hand");
    assert_eq!(none[2], "0");
    assert!(number(&auto[2]) > 0.0, "cache reads: {auto:?}");
    assert!(
        number(&auto[1]) < number(&none[1]),
        "ITPM charged: {none:?} {auto:?}"
    );
    assert!(
        number(&auto[5]) < number(&none[5]),
        "time: {none:?} {auto:?}"
    );
    assert!(number(&by_hand[2]) > 0.0);
}
