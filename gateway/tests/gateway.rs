//! The gateway on loopback in front of two emulators on loopback, driven by
//! a hyper-util client as an SDK would.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower_llm_limits_emulator::{Emulator, Latency, Limits};
use tower_llm_limits_gateway::{https_transport, serve, Config, ConfigError};

const BIG: Limits = Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000_000);

async fn emulator(limits: Limits, latency: Latency) -> (Emulator, SocketAddr) {
    let e = Emulator::builder()
        .limits(limits)
        .latency(latency)
        .seed(9)
        .build()
        .expect("emulator");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = e.clone();
    tokio::spawn(async move {
        let _ = server.serve(listener).await;
    });
    (e, addr)
}

fn quick() -> Latency {
    Latency::none().with_time_to_first_token(Duration::from_millis(2))
}

fn env(name: &str) -> Option<String> {
    match name {
        "KEY_A" => Some("sk-upstream-a".into()),
        "KEY_B" => Some("sk-upstream-b".into()),
        "GW_ALICE" => Some("gw-alice".into()),
        "GW_BOB" => Some("gw-bob".into()),
        _ => None,
    }
}

fn config_text(a: SocketAddr, b: SocketAddr) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
[timeouts]
body_read_secs = 5
shutdown_grace_secs = 10

[[upstreams]]
name = "a"
base_url = "http://{a}"
key_env = "KEY_A"
rpm = 1000
itpm = 1000000
otpm = 1000000

[[upstreams]]
name = "b"
base_url = "http://{b}"
key_env = "KEY_B"
tier = "tier4"

[[callers]]
name = "alice"
key_env = "GW_ALICE"
tier = "tier4"
priority = "interactive"

[[callers]]
name = "bob"
key_env = "GW_BOB"
rpm = 1
itpm = 100000
otpm = 100000
models = ["claude-sonnet-4-5"]
"#
    )
}

/// The gateway over two emulators; returns its address, the emulators and
/// the trigger of its shutdown.
async fn gateway(
    latency: Latency,
) -> (SocketAddr, [Emulator; 2], tokio::sync::oneshot::Sender<()>) {
    let (ea, a) = emulator(BIG, latency).await;
    let (eb, b) = emulator(BIG, latency).await;
    let config = Config::parse(&config_text(a, b), env).expect("config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        let _ = serve(config, listener, https_transport(), shutdown).await;
    });
    (addr, [ea, eb], tx)
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn message(prompt: &str, stream: bool) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 16, "stream": stream,
           "messages": [{"role": "user", "content": prompt}]})
}

async fn post(
    addr: SocketAddr,
    path: &str,
    key: &str,
    body: &Value,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let req = Request::post(format!("http://{addr}{path}"))
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = client().request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, bytes)
}

fn admitted(e: &Emulator) -> u64 {
    e.stats()
        .classes
        .values()
        .map(|c| c.requests_admitted)
        .sum()
}

fn rate_limited(e: &Emulator) -> u64 {
    e.stats().classes.values().map(|c| c.rate_limited).sum()
}

#[tokio::test]
async fn json_and_streams_go_through_both_upstreams() {
    let (addr, [ea, eb], _stop) = gateway(quick()).await;
    let mut upstreams = Vec::new();
    for i in 0..6 {
        let (status, headers, body) = post(
            addr,
            "/v1/messages",
            "gw-alice",
            &message(&format!("hi {i}"), i % 2 == 1),
        )
        .await;
        assert_eq!(status, 200, "{body:?}");
        if i % 2 == 1 {
            assert!(headers["content-type"]
                .to_str()
                .unwrap_or_default()
                .starts_with("text/event-stream"));
            assert!(body.starts_with(b"event: message_start"));
        }
        assert!(tower_llm_limits::wire::usage_of(&body).is_some());
        upstreams.push(
            headers["x-llm-limits-upstream"]
                .to_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert!(upstreams.contains(&"a".to_string()) && upstreams.contains(&"b".to_string()));
    assert_eq!(admitted(&ea) + admitted(&eb), 6);
}

#[tokio::test]
async fn callers_are_told_the_truth() {
    let (addr, [ea, eb], _stop) = gateway(quick()).await;
    // bob may send one request a minute: the second is the gateway's own 429.
    let (status, _, _) = post(addr, "/v1/messages", "gw-bob", &message("one", false)).await;
    assert_eq!(status, 200);
    let (status, headers, body) =
        post(addr, "/v1/messages", "gw-bob", &message("two", false)).await;
    assert_eq!(status, 429);
    let retry_after: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let json: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["error"]["type"], "rate_limit_error");
    assert_eq!(
        admitted(&ea) + admitted(&eb),
        1,
        "the 429 never reached an upstream"
    );
    // A model outside bob's allow-list.
    let mut haiku = message("three", false);
    haiku["model"] = json!("claude-haiku-4-5");
    let (status, _, body) = post(addr, "/v1/messages", "gw-bob", &haiku).await;
    assert_eq!(status, 403);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).expect("json")["error"]["type"],
        "permission_error"
    );
    // Unknown and missing keys.
    let (status, _, _) = post(addr, "/v1/messages", "gw-nobody", &message("x", false)).await;
    assert_eq!(status, 401);
    let (status, _, _) = post(addr, "/v1/messages", "", &message("x", false)).await;
    assert_eq!(status, 401);
    // count_tokens goes through, outside the budgets.
    let (status, _, body) = post(
        addr,
        "/v1/messages/count_tokens",
        "gw-bob",
        &message("count me", false),
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    assert!(
        serde_json::from_slice::<Value>(&body).expect("json")["input_tokens"]
            .as_u64()
            .is_some()
    );
}

#[tokio::test]
async fn health_and_metrics() {
    let (addr, _, _stop) = gateway(quick()).await;
    post(addr, "/v1/messages", "gw-alice", &message("hi", false)).await;
    post(addr, "/v1/messages", "gw-nobody", &message("hi", false)).await;
    let get = |path: &str| {
        let uri = format!("http://{addr}{path}");
        async move {
            let req = Request::get(uri)
                .body(Full::new(Bytes::new()))
                .expect("request");
            let resp = client().request(req).await.expect("response");
            let status = resp.status();
            (
                status,
                String::from_utf8_lossy(
                    &resp.into_body().collect().await.expect("body").to_bytes(),
                )
                .to_string(),
            )
        }
    };
    let (status, health) = get("/health").await;
    assert_eq!(status, 200);
    assert!(health.contains("\"in_rotation\":true"), "{health}");
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "llm_gateway_requests_total{caller=\"alice\",status=\"200\"} 1",
        "llm_gateway_requests_total{caller=\"\",status=\"401\"} 1",
        "llm_gateway_failovers_total 0",
        "llm_gateway_upstream_received_429_total{upstream=\"a\"} 0",
        "llm_gateway_upstream_admitted_total{upstream=\"a\",dimension=\"requests\"}",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert!(!metrics.contains("sk-upstream") && !metrics.contains("gw-alice"));
}

#[tokio::test]
async fn claude_code_like_bursts_all_succeed() {
    // Eight agents, each a loop of five turns with tool calls and results,
    // all at once.
    let (addr, [ea, eb], _stop) = gateway(quick()).await;
    let mut agents = Vec::new();
    for agent in 0..8 {
        agents.push(tokio::spawn(async move {
            let mut messages = vec![json!({"role": "user", "content": format!("agent {agent}: fix the bug")})];
            for turn in 0..5 {
                let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
                    "stream": turn % 2 == 0,
                    "tools": [{"name": "read_file", "description": "Read a file",
                               "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}],
                    "messages": messages});
                let (status, _, _) = post(addr, "/v1/messages", "gw-alice", &body).await;
                assert_eq!(status, 200);
                let id = format!("toolu_{agent}_{turn}");
                messages.push(json!({"role": "assistant", "content": [
                    {"type": "tool_use", "id": id, "name": "read_file", "input": {"path": "src/lib.rs"}}]}));
                messages.push(json!({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": id, "content": "fn main() {}"}]}));
            }
        }));
    }
    for a in agents {
        a.await.expect("agent");
    }
    assert_eq!(admitted(&ea) + admitted(&eb), 40);
    assert_eq!(rate_limited(&ea) + rate_limited(&eb), 0);
}

#[tokio::test]
async fn shutdown_finishes_a_stream_in_flight_and_refuses_new_work() {
    let slow = Latency::none()
        .with_time_to_first_token(Duration::from_millis(50))
        .with_per_output_token(Duration::from_millis(20))
        .with_tokens_per_delta(1);
    let (addr, _, stop) = gateway(slow).await;
    let mut long = message("a long answer", true);
    long["max_tokens"] = json!(30);
    let req = Request::post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", "gw-alice")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(long.to_string())))
        .expect("request");
    let resp = client().request(req).await.expect("head");
    assert_eq!(resp.status(), 200);
    let _ = stop.send(());
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("the stream finishes")
        .to_bytes();
    assert!(body.windows(12).any(|w| w == b"message_stop"), "{body:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "no new connections after shutdown");
}

#[test]
fn bad_configuration_names_the_field() {
    let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let good = config_text(addr, addr);
    let check = |text: &str, env: &dyn Fn(&str) -> Option<String>, field: &str| {
        let err: ConfigError = Config::parse(text, env).expect_err("refused");
        assert!(err.to_string().contains(field), "{field}: {err}");
    };
    let no_env = |_: &str| None;
    check(&good, &no_env, "upstreams[0].key_env");
    check(
        &good.replace("\"interactive\"", "\"urgent\""),
        &env,
        "callers[0].priority",
    );
    check(
        &good.replace(
            "tier = \"tier4\"\n\n[[callers]]",
            "tier = \"tier9\"\n\n[[callers]]",
        ),
        &env,
        "upstreams[1].tier",
    );
    check(&good.replace("127.0.0.1:0", "nowhere"), &env, "listen");
    check(
        &good.replace(
            "base_url = \"http://127.0.0.1:1\"\nkey_env = \"KEY_B\"",
            "base_url = \"ftp://x\"\nkey_env = \"KEY_B\"",
        ),
        &env,
        "upstreams[1].base_url",
    );
    check(
        &good.replace("name = \"bob\"", "name = \"alice\""),
        &env,
        "callers[1].name",
    );
    check(&format!("{good}\nunknown_setting = 1\n"), &env, "unknown");
    let ok = Config::parse(&good, env).expect("the good one");
    assert!(
        !format!("{ok:?}").contains("sk-upstream"),
        "keys never printed"
    );
}

/// The official Python SDK (`anthropic`, the version `.ci/run` installs)
/// through the gateway to the two emulators: JSON, a stream, and an unknown
/// key. Without the SDK the test prints a notice and passes, unless `CI` is
/// set (`.ci/run` installs it).
#[tokio::test]
async fn the_python_sdk_goes_through_the_gateway() {
    let (addr, [ea, eb], _stop) = gateway(quick()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/gateway_python.py");
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .arg(format!("http://{addr}"))
        .arg("gw-alice")
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return skip(&format!("python3 cannot run: {e}")),
        Err(_) => panic!("the SDK script hung"),
    };
    if output.status.code() == Some(3) {
        return skip(
            "the anthropic package is not installed (python3 -m pip install \"anthropic==2.10.0\")",
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for check in ["json ok", "stream ok", "auth ok"] {
        assert!(stdout.contains(check), "{check}: {stdout}");
    }
    assert_eq!(admitted(&ea) + admitted(&eb), 2);
}

#[tokio::test]
async fn the_typescript_sdk_goes_through_the_gateway() {
    let (addr, [ea, eb], _stop) = gateway(quick()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/gateway_ts.mjs");
    // Where `.ci/run` installs the SDK (for the emulator's own check).
    let sdk_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../emulator/tests/sdk");
    let run = tokio::process::Command::new("node")
        .arg(script)
        .arg(format!("http://{addr}"))
        .arg("gw-alice")
        .arg(sdk_dir)
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return skip(&format!("node cannot run: {e}")),
        Err(_) => panic!("the SDK script hung"),
    };
    if output.status.code() == Some(3) {
        return skip(
            "@anthropic-ai/sdk is not installed (npm install --prefix emulator/tests/sdk \
             --no-save --no-package-lock \"@anthropic-ai/sdk@1.14.0\")",
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for check in ["json ok", "stream ok", "auth ok"] {
        assert!(stdout.contains(check), "{check}: {stdout}");
    }
    assert_eq!(admitted(&ea) + admitted(&eb), 2);
}

fn skip(why: &str) {
    assert!(std::env::var_os("CI").is_none(), "CI is set and {why}");
    eprintln!("skipped: {why}");
}

#[tokio::test]
async fn a_body_too_large_or_too_slow_is_refused() {
    let (ea, a) = emulator(BIG, quick()).await;
    let text = config_text(a, a)
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\nbody_limit = 2000",
        )
        .replace("body_read_secs = 5", "body_read_secs = 1");
    let config = Config::parse(&text, env).expect("config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(
        config,
        listener,
        https_transport(),
        std::future::pending(),
    ));
    let (status, _, _) = post(
        addr,
        "/v1/messages",
        "gw-alice",
        &message(&"x".repeat(5_000), false),
    )
    .await;
    assert_eq!(status, 413);
    // A body that never finishes arriving.
    use tokio::io::AsyncWriteExt;
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: gw-alice\r\ncontent-length: 100\r\n\r\n{";
    slow.write_all(head.as_bytes()).await.expect("write");
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut slow, &mut answer),
    )
    .await
    .expect("answered within the timeout")
    .expect("read");
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    assert_eq!(admitted(&ea), 0);
}

/// The gateway's `/metrics` text.
async fn metrics_text(addr: SocketAddr) -> String {
    let req = Request::get(format!("http://{addr}/metrics"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = client().request(req).await.expect("response");
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn a_client_that_sends_half_a_request_line_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ea, a) = emulator(BIG, quick()).await;
    let text = config_text(a, a).replace(
        "body_read_secs = 5",
        "header_read_secs = 1\nbody_read_secs = 5",
    );
    let config = Config::parse(&text, env).expect("config");
    assert_eq!(config.header_read_timeout, Duration::from_secs(1));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(
        config,
        listener,
        https_transport(),
        std::future::pending(),
    ));
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"POST /v1/mess").await.expect("write");
    assert!(
        metrics_text(addr)
            .await
            .contains("llm_gateway_connections_open 2"),
        "the slow connection and this one are open"
    );
    let started = tokio::time::Instant::now();
    let mut answer = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut answer))
        .await
        .expect("the gateway closed the connection within the timeout");
    // Closed without an answer (an end of stream, or a reset).
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    // The slow client holds nothing: only the metrics request's own
    // connection is open.
    let text = metrics_text(addr).await;
    assert!(text.contains("llm_gateway_connections_open 1"), "{text}");
    // Someone who sends a whole request is served as before.
    let (status, _, _) = post(addr, "/v1/messages", "gw-alice", &message("hi", false)).await;
    assert_eq!(status, 200);
    assert_eq!(admitted(&ea), 1);
}

#[test]
fn a_read_timeout_of_zero_is_refused() {
    let text = config_text(
        "127.0.0.1:1".parse().expect("addr"),
        "127.0.0.1:2".parse().expect("addr"),
    );
    for field in ["header_read_secs", "body_read_secs"] {
        let bad = text.replace("body_read_secs = 5", &format!("{field} = 0"));
        let e = Config::parse(&bad, env).expect_err("a zero timeout");
        assert_eq!(e.field, format!("timeouts.{field}"));
    }
}

#[test]
fn the_example_configuration_parses() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.example.toml"))
            .expect("example file");
    let config =
        Config::parse(&text, |name| Some(format!("value-of-{name}"))).expect("example config");
    assert_eq!((config.upstreams.len(), config.callers.len()), (2, 2));
    assert_eq!(config.body_read_timeout, Duration::from_secs(30));
    assert_eq!(config.header_read_timeout, Duration::from_secs(30));
}
