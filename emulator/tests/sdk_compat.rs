//! The emulator's answers parse with the official SDKs: Python (`anthropic`) and TypeScript
//! (`@anthropic-ai/sdk`), at the versions `.ci/run` pins.
//!
//! Each test starts one seeded emulator per scenario on `127.0.0.1:0` (real
//! clock, near-zero latency) and runs its SDK's check script once for all of
//! them (importing an SDK takes up to a second):
//! `python3 emulator/tests/sdk/check_python.py <scenario> http://127.0.0.1:<port> ...`
//! or `node emulator/tests/sdk/check_ts.mjs ...`. The scripts drive the SDK through
//! JSON and streamed messages, `count_tokens`, the per-minute 429, the 529,
//! the mid-stream `event: error` and the spend-cap 429, one line per check.
//! The test then reads the emulators' counters to confirm the SDK's requests
//! reached them and were answered as the scenario says.
//!
//! Without the interpreter or the SDK package, a test prints a notice and
//! passes, unless the environment variable `CI` is set: then it fails, since
//! `.ci/run` installs both SDKs.

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use tower_llm_limits::budget::Limits;
use tower_llm_limits_emulator::{ClassStats, Emulator, EmulatorBuilder, Faults, Latency};

/// The scripts' exit code when the SDK cannot be imported.
const EXIT_NO_SDK: i32 = 3;
/// A bound on one script run: a hung SDK call fails the test instead of CI.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// One SDK's check script and how to get it.
struct Sdk {
    name: &'static str,
    program: &'static str,
    script: &'static str,
    /// What `.ci/run` does to install the SDK.
    install: &'static str,
}

const PYTHON: Sdk = Sdk {
    name: "Python SDK",
    program: "python3",
    script: concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/check_python.py"),
    install: "python3 -m pip install \"anthropic==2.10.0\"",
};

const TYPESCRIPT: Sdk = Sdk {
    name: "TypeScript SDK",
    program: "node",
    script: concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/check_ts.mjs"),
    install: "npm install --prefix emulator/tests/sdk --no-save --no-package-lock \
              \"@anthropic-ai/sdk@1.14.0\"",
};

/// Answers at once, but streams in several deltas with a few real
/// microseconds between them, so chunks do arrive apart.
fn builder() -> EmulatorBuilder {
    Emulator::builder()
        .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000_000))
        .latency(
            Latency::none()
                .with_per_output_token(Duration::from_micros(200))
                .with_tokens_per_delta(4),
        )
        .seed(11)
}

/// The SDK is not there: a notice, or a failure under CI.
fn sdk_missing(sdk: &Sdk, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!(
            "sdk_compat, {}: {why}. CI is set, so .ci/run should have installed it \
             ({}); check its install line",
            sdk.name, sdk.install
        );
    }
    // Straight to stderr, past the test harness's capture, so that a plain
    // `cargo test` shows that this check did not run.
    let _ = writeln!(
        std::io::stderr(),
        "NOTICE sdk_compat, {}: skipped, {why}. To run this check: {}",
        sdk.name,
        sdk.install
    );
}

fn show(output: &Output) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Serves `emulator` on loopback until the task is aborted; returns its base URL.
async fn serve(emulator: &Emulator) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let server = emulator.clone();
    let task = tokio::spawn(async move { server.serve(listener).await });
    (format!("http://{addr}"), task)
}

/// Runs `sdk`'s script once on `(scenario, emulator)` pairs and asserts every
/// scenario passed. `false` when the SDK is missing outside CI.
async fn run(sdk: &Sdk, scenarios: &[(&str, &Emulator)]) -> bool {
    let mut command = tokio::process::Command::new(sdk.program);
    command.arg(sdk.script);
    let mut servers = Vec::new();
    for (scenario, emulator) in scenarios {
        let (url, task) = serve(emulator).await;
        command.arg(scenario).arg(url);
        servers.push(task);
    }
    // Loopback only: no proxy may take the SDK's requests elsewhere.
    command
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    for var in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        command.env_remove(var).env_remove(var.to_ascii_lowercase());
    }
    let started = Instant::now();
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, command.output()).await;
    for task in servers {
        task.abort();
    }
    let output = match output {
        Err(_) => panic!(
            "sdk_compat, {}: the script ran over {SCRIPT_TIMEOUT:?}",
            sdk.name
        ),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            sdk_missing(sdk, &format!("{} is not on the PATH", sdk.program));
            return false;
        }
        Ok(Err(e)) => panic!("sdk_compat, {}: cannot run {}: {e}", sdk.name, sdk.program),
        Ok(Ok(output)) => output,
    };
    if output.status.code() == Some(EXIT_NO_SDK) {
        let stderr = String::from_utf8_lossy(&output.stderr);
        sdk_missing(sdk, &format!("the package is missing ({})", stderr.trim()));
        return false;
    }
    assert!(
        output.status.success(),
        "sdk_compat, {}: a check failed ({}):\n{}",
        sdk.name,
        output.status,
        show(&output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    for (scenario, _) in scenarios {
        assert!(
            stdout.contains(&format!("checks of scenario {scenario} passed")),
            "sdk_compat, {}: scenario {scenario} did not report success:\n{}",
            sdk.name,
            show(&output)
        );
    }
    // Shown with `--nocapture`: one line per check.
    println!(
        "{stdout}(the {} script took {:?})",
        sdk.name,
        started.elapsed()
    );
    true
}

fn sonnet(emulator: &Emulator) -> ClassStats {
    emulator
        .stats()
        .classes
        .get("sonnet-4")
        .cloned()
        .unwrap_or_default()
}

/// Every scenario of `sdk`'s script, each against its own emulator, then the
/// emulators' counters.
async fn check_sdk(sdk: &Sdk) {
    let ok = builder().build().unwrap();
    let rate_limited = builder()
        .limits(Limits::new().rpm(1).itpm(1_000_000).otpm(1_000_000))
        .build()
        .unwrap();
    let overloaded = builder()
        .faults(Faults::none().with_overloaded(1.0))
        .build()
        .unwrap();
    let stream_error = builder()
        .faults(Faults::none().with_stream_error(1.0))
        .build()
        .unwrap();
    let spend_cap = builder().build().unwrap();
    spend_cap.set_spend_limit_reached(true);

    let ran = run(
        sdk,
        &[
            ("ok", &ok),
            ("rate_limited", &rate_limited),
            ("overloaded", &overloaded),
            ("stream_error", &stream_error),
            ("spend_cap", &spend_cap),
        ],
    )
    .await;
    if !ran {
        return;
    }

    // 3 JSON (one with the raw response), 2 helper streams, 1 raw stream;
    // the 400 and the 404 are not admitted.
    let s = sonnet(&ok);
    assert_eq!((s.requests_admitted, s.rate_limited), (6, 0), "ok: {s:?}");
    assert_eq!(ok.stats().count_tokens.requests_admitted, 1);

    let s = sonnet(&rate_limited);
    assert_eq!(
        (s.requests_admitted, s.rate_limited),
        (1, 2),
        "rate_limited: {s:?}"
    );

    let s = sonnet(&overloaded);
    assert_eq!(
        (s.requests_admitted, s.overloaded),
        (0, 2),
        "overloaded: {s:?}"
    );

    // 2 streams cut by the error event, 1 JSON answer untouched.
    let s = sonnet(&stream_error);
    assert_eq!(
        (s.requests_admitted, s.stream_errors),
        (3, 2),
        "stream_error: {s:?}"
    );

    let s = sonnet(&spend_cap);
    assert_eq!(
        (s.requests_admitted, s.spend_limited),
        (0, 1),
        "spend_cap: {s:?}"
    );
}

#[tokio::test]
async fn python_sdk_parses_the_emulator() {
    check_sdk(&PYTHON).await;
}

#[tokio::test]
async fn typescript_sdk_parses_the_emulator() {
    check_sdk(&TYPESCRIPT).await;
}
