//! The standalone server: its flags, its usage errors, and a real answer on
//! loopback (`--port 0`).
#![cfg(feature = "cli")]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const BIN: &str = env!("CARGO_BIN_EXE_tower-llm-limits-emulator");

/// The server process, killed when dropped. Its stdout stays open while it
/// runs (a closed pipe would fail its next line of output).
struct Server {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server with `args` on a free loopback port; returns it and
/// the address it printed.
fn start(args: &[&str]) -> (Server, String) {
    let mut child = Command::new(BIN)
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the emulator starts");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut server = Server { child, stdout };
    let mut first = String::new();
    server
        .stdout
        .read_line(&mut first)
        .expect("the address line");
    let url = first
        .trim()
        .strip_prefix("emulator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {first:?}"))
        .to_string();
    (server, url)
}

async fn post(url: &str) -> (StatusCode, http::HeaderMap) {
    post_model(url, "claude-sonnet-4-5").await
}

async fn post_model(url: &str, model: &str) -> (StatusCode, http::HeaderMap) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = format!(
        r#"{{"model":"{model}","max_tokens":8,"messages":[{{"role":"user","content":"Hi"}}]}}"#
    );
    let req = Request::post(format!("{url}/v1/messages"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = client.request(req).await.expect("the server answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    let _ = resp.into_body().collect().await;
    (status, headers)
}

#[tokio::test]
async fn serves_with_the_limits_given_on_the_command_line() {
    let (_server, url) = start(&["--rpm", "1", "--itpm", "20000", "--no-latency"]);
    let (status, headers) = post(&url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["anthropic-ratelimit-requests-limit"], "1");
    assert_eq!(headers["anthropic-ratelimit-input-tokens-limit"], "20000");
    assert_eq!(headers["anthropic-ratelimit-output-tokens-limit"], "8000");
    let (status, headers) = post(&url).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "60");
}

#[tokio::test]
async fn unknown_models_are_served_only_with_the_flag() {
    let (_strict, url) = start(&["--no-latency"]);
    assert_eq!(
        post_model(&url, "claude-2.1").await.0,
        StatusCode::BAD_REQUEST
    );
    let (_lenient, url) = start(&["--no-latency", "--allow-unknown-models"]);
    assert_eq!(post_model(&url, "claude-2.1").await.0, StatusCode::OK);
}

#[test]
fn bad_flags_are_usage_errors() {
    for args in [
        &["--fault-529", "2"][..],
        &["--acceleration", "3"],
        &["--output-mode", "later"],
        &["--rpm", "-1"],
        &["--no-such-flag"],
        &["--max-cache-breakpoints", "many"],
        &["--header-read-timeout", "0"],
        &["--body-read-timeout", "-1"],
        &["--max-connections", "0"],
    ] {
        let out = Command::new(BIN).args(args).output().expect("runs");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}

#[test]
fn help_lists_every_flag() {
    let out = Command::new(BIN).arg("--help").output().expect("runs");
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--host",
        "--port",
        "--rpm",
        "--itpm",
        "--otpm",
        "--window",
        "--output-mode",
        "--fault-529",
        "--fault-500",
        "--fault-reset",
        "--fault-slow",
        "--fault-stream",
        "--seed",
        "--no-latency",
        "--count-tokens-rpm",
        "--acceleration",
        "--allow-unknown-models",
        "--max-cache-breakpoints",
        "--header-read-timeout",
        "--body-read-timeout",
        "--max-connections",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}
