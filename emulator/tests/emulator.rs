//! The emulator of the Messages API's rate limiter, checked against the API's
//! documented behaviour: answer shapes, validation, limits, output modes,
//! prompt cache, faults, determinism, and one run over TCP.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::time::Instant;
use tower::ServiceExt;
use tower_llm_limits::budget::{Limits, ModelClass, OutputMode, Tier};
use tower_llm_limits::headers::RateLimitSnapshot;
use tower_llm_limits_emulator::{
    count_text, Acceleration, Emulator, EmulatorBody, EmulatorBuilder, Faults, Latency,
    OutputLength, TokenCounter, Tokenizer,
};

const SONNET: &str = "claude-sonnet-4-5-20250929";

/// No latency, high limits, and the word rule (whose counts the tests
/// below work out by hand; the default tokenizer has its own tests).
fn quiet() -> EmulatorBuilder {
    Emulator::builder()
        .latency(Latency::none())
        .token_counter(TokenCounter::words())
        .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000_000))
        .seed(42)
}

fn ask(text: &str, max_tokens: u64) -> Value {
    json!({"model": SONNET, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": text}]})
}

fn request(path: &str, body: &Value) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("x-api-key", "sk-test")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap()
}

async fn send(emulator: &Emulator, path: &str, body: &Value) -> Response<EmulatorBody> {
    emulator
        .service()
        .oneshot(request(path, body))
        .await
        .expect("the emulator answers")
}

async fn json_of(response: Response<EmulatorBody>) -> Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).expect("a JSON body")
}

/// Parses a whole SSE body into (event name, data) pairs.
fn parse_sse(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str::<Value>(d).expect("data is JSON"));
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (event.expect("event line"), data.expect("data line"))
        })
        .collect()
}

async fn sse_of(response: Response<EmulatorBody>) -> Vec<(String, Value)> {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    parse_sse(std::str::from_utf8(&bytes).unwrap())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

fn count(body: &Value) -> u64 {
    TokenCounter::words()
        .count_request(&serde_json::to_vec(body).unwrap())
        .unwrap()
}

fn assert_error(json: &Value, kind: &str, request_id: Option<&str>) {
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], kind);
    assert!(json["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    match request_id {
        Some(id) => assert_eq!(json["request_id"], id),
        None => assert!(json.get("request_id").is_none()),
    }
}

fn assert_request_id(headers: &HeaderMap) -> String {
    let id = header(headers, "request-id").to_string();
    assert!(id.starts_with("req_") && id.len() > 20, "{id}");
    id
}

/// Every `usage` count is a non-negative integer.
fn usage_u64(usage: &Value, field: &str) -> u64 {
    usage[field]
        .as_u64()
        .unwrap_or_else(|| panic!("usage.{field} in {usage}"))
}

// ---------------------------------------------------------------- shapes

#[tokio::test(start_paused = true)]
async fn json_message_has_the_api_shape() {
    let emulator = quiet().build().unwrap();
    let body = ask("Hello, world! How are you today?", 50);
    let response = send(&emulator, "/v1/messages", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(response.headers(), "content-type"),
        "application/json"
    );
    assert_request_id(response.headers());
    let m = json_of(response).await;

    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], SONNET);
    assert_eq!(m["stop_sequence"], Value::Null);
    let content = m["content"].as_array().unwrap();
    assert_eq!(content.len(), 1);
    assert_eq!(content[0]["type"], "text");
    let text = content[0]["text"].as_str().unwrap();

    let usage = &m["usage"];
    assert_eq!(usage_u64(usage, "input_tokens"), count(&body));
    assert_eq!(usage_u64(usage, "cache_creation_input_tokens"), 0);
    assert_eq!(usage_u64(usage, "cache_read_input_tokens"), 0);
    assert_eq!(usage["cache_creation"]["ephemeral_5m_input_tokens"], 0);
    assert_eq!(usage["cache_creation"]["ephemeral_1h_input_tokens"], 0);
    assert_eq!(usage["service_tier"], "standard");
    let output = usage_u64(usage, "output_tokens");
    // The answer's text is exactly as long as the usage says, under the emulator's counter.
    assert_eq!(count_text(text), output);
    assert!((1..=50).contains(&output));
    let stop = m["stop_reason"].as_str().unwrap();
    assert_eq!(
        stop,
        if output == 50 {
            "max_tokens"
        } else {
            "end_turn"
        }
    );
}

#[tokio::test(start_paused = true)]
async fn stream_has_the_api_events_in_order() {
    let emulator = quiet()
        .output_length(OutputLength::new(1.0, 1.0))
        .latency(Latency::none().with_tokens_per_delta(8))
        .build()
        .unwrap();
    let mut body = ask("Tell me a story.", 20);
    body["stream"] = json!(true);
    let response = send(&emulator, "/v1/messages", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(response.headers(), "content-type"),
        "text/event-stream; charset=utf-8"
    );
    assert_request_id(response.headers());
    assert!(!RateLimitSnapshot::from_headers(response.headers()).is_empty());
    let events = sse_of(response).await;

    // The event name always equals the data's type.
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
    }
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );

    let start = &events[0].1["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["type"], "message");
    assert_eq!(start["role"], "assistant");
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["model"], SONNET);
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(start["stop_sequence"], Value::Null);
    assert_eq!(usage_u64(&start["usage"], "input_tokens"), count(&body));
    assert_eq!(usage_u64(&start["usage"], "output_tokens"), 1);
    assert_eq!(usage_u64(&start["usage"], "cache_read_input_tokens"), 0);

    assert_eq!(events[1].1["index"], 0);
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );

    let mut text = String::new();
    for (_, delta) in &events[3..6] {
        assert_eq!(delta["index"], 0);
        assert_eq!(delta["delta"]["type"], "text_delta");
        text.push_str(delta["delta"]["text"].as_str().unwrap());
    }
    assert_eq!(count_text(&text), 20);
    assert_eq!(events[6].1["index"], 0);

    let delta = &events[7].1;
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["delta"]["stop_sequence"], Value::Null);
    // Cumulative usage.
    assert_eq!(usage_u64(&delta["usage"], "output_tokens"), 20);
    assert_eq!(usage_u64(&delta["usage"], "input_tokens"), count(&body));
    assert_eq!(events[8].1, json!({"type": "message_stop"}));
}

#[tokio::test(start_paused = true)]
async fn stream_deltas_are_paced_by_the_latency_model() {
    let emulator = quiet()
        .output_length(OutputLength::new(1.0, 1.0))
        .latency(
            Latency::none()
                .with_time_to_first_token(Duration::from_secs(1))
                .with_per_output_token(Duration::from_millis(100))
                .with_tokens_per_delta(1),
        )
        .build()
        .unwrap();
    let mut body = ask("Hi", 5);
    body["stream"] = json!(true);
    let start = Instant::now();
    let response = send(&emulator, "/v1/messages", &body).await;
    assert_eq!(start.elapsed(), Duration::ZERO, "the head comes at once");
    let mut body = response.into_body();
    let mut delta_times = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        if std::str::from_utf8(&data)
            .unwrap()
            .starts_with("event: content_block_delta")
        {
            delta_times.push(start.elapsed());
        }
    }
    let ms: Vec<u128> = delta_times.iter().map(Duration::as_millis).collect();
    assert_eq!(ms, [1_100, 1_200, 1_300, 1_400, 1_500]);
}

#[tokio::test(start_paused = true)]
async fn json_answer_waits_for_the_whole_generation() {
    let emulator = quiet()
        .output_length(OutputLength::new(1.0, 1.0))
        .latency(
            Latency::none()
                .with_time_to_first_token(Duration::from_millis(500))
                .with_per_output_token(Duration::from_millis(20)),
        )
        .build()
        .unwrap();
    let start = Instant::now();
    let response = send(&emulator, "/v1/messages", &ask("Hi", 100)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_millis(500 + 100 * 20));
}

#[tokio::test(start_paused = true)]
async fn no_latency_means_no_timer_at_all() {
    // Off a millisecond boundary a zero sleep is still pending at its first
    // poll (its deadline rounds up to the timer's next tick), so an answer
    // ready at its first poll, with every frame of its body ready at once,
    // proves nothing slept: JSON, and an SSE stream of 64 tokens in 8 deltas.
    use tokio_test::{assert_ready, assert_ready_ok, task};
    use tower::Service;
    let emulator = quiet()
        .output_length(OutputLength::new(1.0, 1.0))
        .build()
        .unwrap();
    // Half way into a millisecond: a zero sleep's deadline rounds up to the
    // next tick of the timer, so it cannot be ready at once.
    tokio::time::advance(Duration::from_micros(500)).await;
    for stream in [false, true] {
        let mut body = ask("Hi", 64);
        body["stream"] = json!(stream);
        let mut service = emulator.service();
        let mut call = task::spawn(service.call(request("/v1/messages", &body)));
        let response = assert_ready_ok!(call.poll());
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut frames = 0;
        loop {
            let mut frame = task::spawn(body.frame());
            match assert_ready!(frame.poll(), "stream {stream}: frame {frames} waited") {
                Some(frame) => {
                    frame.unwrap();
                    frames += 1;
                }
                None => break,
            }
        }
        assert!(frames >= if stream { 8 } else { 1 }, "{frames} frames");
    }
}

#[tokio::test(start_paused = true)]
async fn count_tokens_answers_the_emulator_count_with_its_own_limiter() {
    let emulator = quiet()
        .limits(Limits::new().rpm(1).itpm(1_000_000).otpm(1_000_000))
        .count_tokens_rpm(Some(2))
        .build()
        .unwrap();
    let body = json!({"model": SONNET, "system": "You are terse.",
                      "messages": [{"role": "user", "content": "Count me, please!"}]});
    for _ in 0..2 {
        let response = send(&emulator, "/v1/messages/count_tokens", &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_request_id(response.headers());
        assert_eq!(
            json_of(response).await,
            json!({"input_tokens": count(&body)})
        );
    }
    let limited = send(&emulator, "/v1/messages/count_tokens", &body).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(limited.headers(), "retry-after"), "30");
    assert_eq!(
        header(limited.headers(), "anthropic-ratelimit-requests-limit"),
        "2"
    );

    // Messages have their own limits: the count_tokens 429 takes nothing from them...
    let ok = send(&emulator, "/v1/messages", &ask("Hi", 5)).await;
    assert_eq!(ok.status(), StatusCode::OK);
    let limited = send(&emulator, "/v1/messages", &ask("Hi", 5)).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    // ...and exhausting messages takes nothing from count_tokens.
    tokio::time::advance(Duration::from_secs(30)).await;
    let counted = send(&emulator, "/v1/messages/count_tokens", &body).await;
    assert_eq!(counted.status(), StatusCode::OK);
    let stats = emulator.stats();
    assert_eq!(stats.count_tokens.requests_admitted, 3);
    assert_eq!(stats.count_tokens.rate_limited, 1);
    assert_eq!(stats.classes["sonnet-4"].requests_admitted, 1);
}

// ---------------------------------------------------------------- validation

#[tokio::test(start_paused = true)]
async fn invalid_requests_get_400_invalid_request_error() {
    let emulator = quiet().build().unwrap();
    let cases = [
        json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
        json!({"model": 7, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
        json!({"model": SONNET, "messages": [{"role": "user", "content": "x"}]}),
        json!({"model": SONNET, "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]}),
        json!({"model": SONNET, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
        json!({"model": SONNET, "max_tokens": 5}),
        json!({"model": SONNET, "max_tokens": 5, "messages": "x"}),
        json!({"model": SONNET, "max_tokens": 5, "messages": []}),
        json!({"model": SONNET, "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}),
        json!({"model": SONNET, "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}),
        json!({"model": SONNET, "max_tokens": 5, "stream": "yes", "messages": [{"role": "user", "content": "x"}]}),
        json!(["not", "an", "object"]),
    ];
    for body in cases {
        let response = send(&emulator, "/v1/messages", &body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let id = assert_request_id(response.headers());
        assert_error(&json_of(response).await, "invalid_request_error", Some(&id));
    }
    // Not JSON at all.
    let raw = Request::post("/v1/messages")
        .body(Full::new(Bytes::from_static(b"{nope")))
        .unwrap();
    let response = emulator.service().oneshot(raw).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let id = assert_request_id(response.headers());
    assert_error(&json_of(response).await, "invalid_request_error", Some(&id));

    let missing = send(
        &emulator,
        "/v1/messages",
        &json!({"model": SONNET, "messages": []}),
    )
    .await;
    let message = json_of(missing).await["error"]["message"].clone();
    assert_eq!(message, "max_tokens: Field required");

    let stats = emulator.stats();
    assert_eq!(stats.invalid_requests, 14);
    assert!(stats.classes.is_empty(), "nothing was charged");
}

#[tokio::test(start_paused = true)]
async fn oversized_body_gets_413_request_too_large() {
    let emulator = quiet().body_limit(1_000).build().unwrap();
    let body = ask(&"word ".repeat(400), 5);
    let response = send(&emulator, "/v1/messages", &body).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let json = json_of(response).await;
    assert_error(&json, "request_too_large", None);
    assert_eq!(
        json["error"]["message"],
        "Request exceeds the maximum allowed number of bytes."
    );
    // Just under the limit is fine.
    let fits = ask(&"word ".repeat(150), 5);
    assert!(serde_json::to_vec(&fits).unwrap().len() < 1_000);
    assert_eq!(
        send(&emulator, "/v1/messages", &fits).await.status(),
        StatusCode::OK
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_path_gets_404_and_other_methods_405() {
    let emulator = quiet().build().unwrap();
    let response = send(&emulator, "/v1/complete", &ask("x", 5)).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let id = assert_request_id(response.headers());
    assert_error(&json_of(response).await, "not_found_error", Some(&id));

    let get = Request::get("/v1/messages")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = emulator.service().oneshot(get).await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let id = assert_request_id(response.headers());
    assert_error(&json_of(response).await, "invalid_request_error", Some(&id));
}

// ---------------------------------------------------------------- rate limits

#[tokio::test(start_paused = true)]
async fn rpm_429_has_the_api_shape_and_headers() {
    let emulator = quiet()
        .limits(Limits::new().rpm(2).itpm(1_000_000).otpm(1_000_000))
        .build()
        .unwrap();
    for remaining in [1, 0] {
        let ok = send(&emulator, "/v1/messages", &ask("Hi", 5)).await;
        assert_eq!(ok.status(), StatusCode::OK);
        let snap = RateLimitSnapshot::from_headers(ok.headers());
        assert_eq!(snap.requests.limit, Some(2));
        assert_eq!(snap.requests.remaining, Some(remaining));
        assert_eq!(snap.retry_after, None);
        assert!(ok.headers().get("x-should-retry").is_none());
    }
    let limited = send(&emulator, "/v1/messages", &ask("Hi", 5)).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let headers = limited.headers().clone();
    // An integer number of seconds: one request refills in 30 s at 2 RPM.
    assert_eq!(header(&headers, "retry-after"), "30");
    assert_eq!(header(&headers, "x-should-retry"), "true");
    let id = assert_request_id(&headers);
    let snap = RateLimitSnapshot::from_headers(&headers);
    assert_eq!(snap.retry_after, Some(Duration::from_secs(30)));
    assert_eq!(snap.should_retry, Some(true));
    assert_eq!(snap.requests.limit, Some(2));
    assert_eq!(snap.requests.remaining, Some(0));
    let reset = snap.requests.reset_in.unwrap();
    assert!(
        reset > Duration::from_secs(59) && reset <= Duration::from_secs(61),
        "{reset:?}"
    );
    assert_eq!(snap.input_tokens.limit, Some(1_000_000));
    assert_eq!(snap.output_tokens.limit, Some(1_000_000));
    // The combined header is input + output.
    assert_eq!(snap.tokens.limit, Some(2_000_000));
    for kind in ["requests", "tokens", "input-tokens", "output-tokens"] {
        let reset = header(&headers, &format!("anthropic-ratelimit-{kind}-reset"));
        // RFC 3339 to the second with a Z: 2026-11-28T07:15:00Z
        assert_eq!(reset.len(), 20, "{reset}");
        assert!(
            reset.ends_with('Z') && reset.as_bytes()[10] == b'T',
            "{reset}"
        );
    }
    let json = json_of(limited).await;
    assert_error(&json, "rate_limit_error", Some(&id));
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("of 2 requests per minute"), "{message}");

    // After the announced delay the request is admitted.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(
        send(&emulator, "/v1/messages", &ask("Hi", 5))
            .await
            .status(),
        StatusCode::OK
    );
    let stats = emulator.stats();
    assert_eq!(stats.classes["sonnet-4"].requests_admitted, 3);
    assert_eq!(stats.classes["sonnet-4"].rate_limited, 1);
}

#[tokio::test(start_paused = true)]
async fn itpm_is_charged_true_counts_and_remaining_is_rounded_to_thousands() {
    let emulator = quiet()
        .limits(Limits::new().rpm(1_000).itpm(6_000).otpm(1_000_000))
        .build()
        .unwrap();
    let body = ask(&"abcd ".repeat(2_500), 1);
    let tokens = count(&body);
    assert_eq!(tokens, 2_503);
    let first = send(&emulator, "/v1/messages", &body).await;
    assert_eq!(first.status(), StatusCode::OK);
    let snap = RateLimitSnapshot::from_headers(first.headers());
    // 6,000 - 2,503 = 3,497, rounded to 3,000.
    assert_eq!(snap.input_tokens.remaining, Some(3_000));
    assert_eq!(
        send(&emulator, "/v1/messages", &body).await.status(),
        StatusCode::OK
    );
    let third = send(&emulator, "/v1/messages", &body).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    // 994 left, 2,503 needed: 1,509 more at 100 per second is 15.09 s, announced as 16.
    assert_eq!(header(third.headers(), "retry-after"), "16");
    let snap = RateLimitSnapshot::from_headers(third.headers());
    // 994 rounded to the nearest thousand.
    assert_eq!(snap.input_tokens.remaining, Some(1_000));
    let message = json_of(third).await["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("of 6,000 input tokens per minute"),
        "{message}"
    );
    tokio::time::advance(Duration::from_secs(16)).await;
    assert_eq!(
        send(&emulator, "/v1/messages", &body).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        emulator.stats().classes["sonnet-4"].input_tokens,
        3 * tokens
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_above_the_whole_limit_gets_429_with_a_minute() {
    let emulator = quiet()
        .limits(Limits::new().rpm(1_000).itpm(1_000).otpm(1_000_000))
        .build()
        .unwrap();
    let response = send(&emulator, "/v1/messages", &ask(&"abcd ".repeat(1_200), 1)).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(response.headers(), "retry-after"), "60");
}

#[tokio::test(start_paused = true)]
async fn limits_are_per_model_class() {
    let emulator = quiet()
        .limits(Limits::new().rpm(3).itpm(1_000_000).otpm(1_000_000))
        .class_limits(
            ModelClass::Haiku45,
            Limits::new().rpm(1).itpm(1_000_000).otpm(1_000_000),
        )
        .build()
        .unwrap();
    assert_eq!(
        emulator.class_of("claude-haiku-4-5-20251001"),
        ModelClass::Haiku45
    );
    assert_eq!(
        emulator.limits_for(ModelClass::Haiku45).requests_per_minute,
        Some(1)
    );
    let haiku = |text: &str| {
        json!({"model": "claude-haiku-4-5", "max_tokens": 5,
                                    "messages": [{"role": "user", "content": text}]})
    };
    assert_eq!(
        send(&emulator, "/v1/messages", &haiku("a")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&emulator, "/v1/messages", &haiku("b")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Sonnet 4 and Sonnet 4.5 share one pool of 3, untouched by Haiku.
    for model in [
        "claude-sonnet-4-5",
        "claude-sonnet-4-20250514",
        "claude-sonnet-4-5",
    ] {
        let body = json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
        assert_eq!(
            send(&emulator, "/v1/messages", &body).await.status(),
            StatusCode::OK
        );
    }
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "y"}]});
    let limited = send(&emulator, "/v1/messages", &body).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(limited.headers(), "anthropic-ratelimit-requests-limit"),
        "3"
    );
    let stats = emulator.stats();
    assert_eq!(stats.classes["haiku-4-5"].requests_admitted, 1);
    assert_eq!(stats.classes["haiku-4-5"].rate_limited, 1);
    assert_eq!(stats.classes["sonnet-4"].requests_admitted, 3);
    assert_eq!(stats.classes["sonnet-4"].rate_limited, 1);
    assert_eq!(stats.total().requests_admitted, 4);
}

#[tokio::test(start_paused = true)]
async fn tier_preset_sets_every_class() {
    let emulator = quiet()
        .tier(Tier::Tier1)
        .class_limits(
            ModelClass::Opus4,
            Limits::new().rpm(7).itpm(70_000).otpm(7_000),
        )
        .build()
        .unwrap();
    assert_eq!(
        emulator.limits_for(ModelClass::Sonnet4),
        Limits::new().rpm(50).itpm(30_000).otpm(8_000)
    );
    assert_eq!(
        emulator.limits_for(ModelClass::Haiku45),
        Limits::new().rpm(50).itpm(50_000).otpm(10_000)
    );
    assert_eq!(
        emulator.limits_for(ModelClass::Opus4),
        Limits::new().rpm(7).itpm(70_000).otpm(7_000)
    );
    let body = json!({"model": "claude-3-5-haiku-latest", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "x"}]});
    let response = send(&emulator, "/v1/messages", &body).await;
    let snap = RateLimitSnapshot::from_headers(response.headers());
    assert_eq!(snap.input_tokens.limit, Some(50_000));
    assert_eq!(snap.output_tokens.limit, Some(10_000));
    assert_eq!(snap.tokens.limit, Some(60_000));
}

#[tokio::test(start_paused = true)]
async fn shorter_enforcement_window_spreads_the_minute() {
    let emulator = quiet()
        .limits(Limits::new().rpm(60).itpm(1_000_000).otpm(1_000_000))
        .enforcement_window(Duration::from_secs(1))
        .build()
        .unwrap();
    assert_eq!(
        send(&emulator, "/v1/messages", &ask("a", 5)).await.status(),
        StatusCode::OK
    );
    let limited = send(&emulator, "/v1/messages", &ask("b", 5)).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(limited.headers(), "retry-after"), "1");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        send(&emulator, "/v1/messages", &ask("b", 5)).await.status(),
        StatusCode::OK
    );
    assert!(Emulator::builder()
        .enforcement_window(Duration::ZERO)
        .build()
        .is_err());
}

// ---------------------------------------------------------------- output modes

async fn second_admitted_while_first_streams(mode: OutputMode) -> (StatusCode, StatusCode) {
    let emulator = quiet()
        .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000))
        .output_mode(mode)
        .output_length(OutputLength::new(0.1, 0.1))
        .build()
        .unwrap();
    let mut body = ask("first", 800);
    body["stream"] = json!(true);
    let first = send(&emulator, "/v1/messages", &body).await;
    assert_eq!(first.status(), StatusCode::OK);
    let during = send(&emulator, "/v1/messages", &ask("second", 800))
        .await
        .status();
    // The first answer produces 80 tokens, and ends.
    let events = sse_of(first).await;
    assert_eq!(
        usage_u64(&events[events.len() - 2].1["usage"], "output_tokens"),
        80
    );
    let after = send(&emulator, "/v1/messages", &ask("third", 800))
        .await
        .status();
    (during, after)
}

#[tokio::test(start_paused = true)]
async fn reserve_mode_debits_max_tokens_then_settles() {
    let (during, after) = second_admitted_while_first_streams(OutputMode::Reserve).await;
    // 800 reserved of 1,000: a second max_tokens of 800 does not fit...
    assert_eq!(during, StatusCode::TOO_MANY_REQUESTS);
    // ...until the first settles to its 80 real tokens.
    assert_eq!(after, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn realtime_mode_ignores_max_tokens() {
    let (during, after) = second_admitted_while_first_streams(OutputMode::Realtime).await;
    assert_eq!(during, StatusCode::OK);
    assert_eq!(after, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn realtime_mode_charges_tokens_as_they_stream() {
    let emulator = quiet()
        .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(100_000))
        .output_mode(OutputMode::Realtime)
        .output_length(OutputLength::new(1.0, 1.0))
        .latency(Latency::none().with_tokens_per_delta(100))
        .build()
        .unwrap();
    let mut body = ask("long", 2_000);
    body["stream"] = json!(true);
    let response = send(&emulator, "/v1/messages", &body).await;
    let mut stream = response.into_body();
    // The opening events, then ten deltas of 100 tokens.
    for _ in 0..11 {
        stream.frame().await.unwrap().unwrap();
    }
    assert_eq!(emulator.stats().classes["sonnet-4"].output_tokens, 1_000);
    let probe = send(&emulator, "/v1/messages", &ask("probe", 1)).await;
    let snap = RateLimitSnapshot::from_headers(probe.headers());
    // 100,000 - 1,000 streamed - 1 probe = 98,999, rounded.
    assert_eq!(snap.output_tokens.remaining, Some(99_000));
    // Dropping the stream mid-way charges what was produced, nothing more.
    drop(stream);
    assert_eq!(emulator.stats().classes["sonnet-4"].output_tokens, 1_001);
    let probe = send(&emulator, "/v1/messages", &ask("probe 2", 1)).await;
    let snap = RateLimitSnapshot::from_headers(probe.headers());
    assert_eq!(snap.output_tokens.remaining, Some(99_000));
}

#[tokio::test(start_paused = true)]
async fn reserve_mode_refunds_a_dropped_stream() {
    let emulator = quiet()
        .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(10_000))
        .output_mode(OutputMode::Reserve)
        .output_length(OutputLength::new(1.0, 1.0))
        .latency(Latency::none().with_tokens_per_delta(100))
        .build()
        .unwrap();
    let mut body = ask("long", 5_000);
    body["stream"] = json!(true);
    let response = send(&emulator, "/v1/messages", &body).await;
    // 5,000 reserved.
    let snap = RateLimitSnapshot::from_headers(response.headers());
    assert_eq!(snap.output_tokens.remaining, Some(5_000));
    let mut stream = response.into_body();
    for _ in 0..3 {
        stream.frame().await.unwrap().unwrap();
    }
    drop(stream); // 200 tokens produced
    let probe = send(&emulator, "/v1/messages", &ask("probe", 1)).await;
    let snap = RateLimitSnapshot::from_headers(probe.headers());
    // 10,000 - 200 - 1 reserved by the probe = 9,799, rounded.
    assert_eq!(snap.output_tokens.remaining, Some(10_000));
    assert_eq!(emulator.stats().classes["sonnet-4"].output_tokens, 201);
}

// ---------------------------------------------------------------- prompt cache

fn cached(system: &str, question: &str, ttl: Option<&str>, model: &str) -> Value {
    let mut cache_control = json!({"type": "ephemeral"});
    if let Some(ttl) = ttl {
        cache_control["ttl"] = json!(ttl);
    }
    json!({"model": model, "max_tokens": 5,
           "system": [{"type": "text", "text": system, "cache_control": cache_control}],
           "messages": [{"role": "user", "content": question}]})
}

/// Requests with one prefix, admitted while the first one's answer has not
/// begun, write it again, charged in full; once it has begun, they read it.
#[tokio::test(start_paused = true)]
async fn a_prefix_is_readable_once_the_writers_answer_begins() {
    let emulator = quiet()
        .latency(Latency::none().with_time_to_first_token(Duration::from_secs(2)))
        .build()
        .unwrap();
    let system = "abcd ".repeat(2_000); // 2,000 tokens
    let writer = {
        let emulator = emulator.clone();
        let body = cached(&system, "What now?", None, SONNET);
        tokio::spawn(async move { usage_of(&emulator, &body).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Sent while the first answer has not begun: a second write.
    let early = usage_of(&emulator, &cached(&system, "And then?", None, SONNET)).await;
    assert_eq!(early.1, 2_000, "{early:?}");
    assert_eq!(writer.await.unwrap().1, 2_000);
    // Now both answers have begun: a read.
    let late = usage_of(&emulator, &cached(&system, "And then?", None, SONNET)).await;
    assert_eq!((late.1, late.2), (0, 2_000));
    let s = &emulator.stats().classes["sonnet-4"];
    assert_eq!(s.cache_creation_input_tokens, 4_000);
}

/// The default counter is o200k_base; `--token-scale` multiplies counts; the
/// emulator answers `count_tokens` and charges with the same counter.
#[tokio::test(start_paused = true)]
async fn the_default_tokenizer_is_o200k_and_a_scale_multiplies() {
    let body = json!({"model": SONNET, "max_tokens": 5,
        "messages": [{"role": "user", "content": "fn main() { println!(\"héllo, 世界\"); }"}]});
    let bytes = serde_json::to_vec(&body).unwrap();
    let bpe = TokenCounter::default().count_request(&bytes).unwrap();
    let words = TokenCounter::words().count_request(&bytes).unwrap();
    assert_eq!(TokenCounter::default().tokenizer(), Tokenizer::O200kBase);
    assert_ne!(bpe, words);
    let emulator = Emulator::builder()
        .latency(Latency::none())
        .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000_000))
        .build()
        .unwrap();
    assert_eq!(usage_of(&emulator, &body).await.0, bpe);
    let scaled = TokenCounter::default().with_scale(1.3).unwrap();
    let emulator = Emulator::builder()
        .latency(Latency::none())
        .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000_000))
        .token_counter(scaled)
        .build()
        .unwrap();
    let want = (bpe as f64 * 1.3).round() as u64;
    assert_eq!(usage_of(&emulator, &body).await.0, want);
    let counted = json_of(send(&emulator, "/v1/messages/count_tokens", &body).await).await;
    assert_eq!(counted["input_tokens"], want);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 101.0] {
        assert!(TokenCounter::default().with_scale(bad).is_err(), "{bad}");
    }
    assert!("gpt2".parse::<Tokenizer>().is_err());
}

/// `answer_tokens` says the output the emulator's answer to a body will have.
#[tokio::test(start_paused = true)]
async fn answer_tokens_match_the_answer() {
    let emulator = quiet().seed(9).build().unwrap();
    for (i, max_tokens) in [16u64, 300, 1_024].into_iter().enumerate() {
        let body = ask(&format!("question {i}"), max_tokens);
        let want = emulator
            .answer_tokens(&serde_json::to_vec(&body).unwrap())
            .unwrap();
        let json = json_of(send(&emulator, "/v1/messages", &body).await).await;
        assert_eq!(usage_u64(&json["usage"], "output_tokens"), want);
    }
    assert!(emulator.answer_tokens(b"{}").is_err());
}

async fn usage_of(emulator: &Emulator, body: &Value) -> (u64, u64, u64) {
    let response = send(emulator, "/v1/messages", body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let usage = json_of(response).await["usage"].clone();
    (
        usage_u64(&usage, "input_tokens"),
        usage_u64(&usage, "cache_creation_input_tokens"),
        usage_u64(&usage, "cache_read_input_tokens"),
    )
}

#[tokio::test(start_paused = true)]
async fn cache_write_then_read_and_reads_are_not_charged() {
    let emulator = quiet().build().unwrap();
    let system = "abcd ".repeat(2_000); // 2,000 tokens
    let first = cached(&system, "What now?", None, SONNET);
    let question = count_text("What now?") + 3;
    assert_eq!(usage_of(&emulator, &first).await, (question, 2_000, 0));
    // Same prefix, another question: a read.
    let second = cached(&system, "And then?", None, SONNET);
    let question2 = count_text("And then?") + 3;
    assert_eq!(usage_of(&emulator, &second).await, (question2, 0, 2_000));
    let stats = emulator.stats();
    let s = &stats.classes["sonnet-4"];
    assert_eq!(s.cache_creation_input_tokens, 2_000);
    assert_eq!(s.cache_read_input_tokens, 2_000);
    // ITPM charged the write and the uncached input, not the read.
    assert_eq!(s.input_tokens, 2_000 + question + question2);

    // A read refreshes the 5-minute TTL; five idle minutes later it is gone.
    tokio::time::advance(Duration::from_secs(299)).await;
    assert_eq!(usage_of(&emulator, &second).await, (question2, 0, 2_000));
    tokio::time::advance(Duration::from_secs(301)).await;
    assert_eq!(usage_of(&emulator, &second).await, (question2, 2_000, 0));
}

#[tokio::test(start_paused = true)]
async fn one_hour_ttl_and_model_scoped_cache() {
    let emulator = quiet().build().unwrap();
    let system = "abcd ".repeat(1_500);
    let body = cached(&system, "Q", Some("1h"), SONNET);
    let response = send(&emulator, "/v1/messages", &body).await;
    let usage = json_of(response).await["usage"].clone();
    assert_eq!(usage["cache_creation"]["ephemeral_1h_input_tokens"], 1_500);
    assert_eq!(usage["cache_creation"]["ephemeral_5m_input_tokens"], 0);
    tokio::time::advance(Duration::from_secs(30 * 60)).await;
    assert_eq!(usage_of(&emulator, &body).await.2, 1_500);
    // Another model does not share the cache.
    let opus = cached(&system, "Q", Some("1h"), "claude-opus-4-1");
    assert_eq!(usage_of(&emulator, &opus).await.1, 1_500);
    // A prefix below the minimum cacheable length is not cached.
    let short = cached("short system", "Q", None, SONNET);
    let (input, written, read) = usage_of(&emulator, &short).await;
    assert_eq!((written, read), (0, 0));
    assert_eq!(input, count(&short));
}

#[tokio::test(start_paused = true)]
async fn dagger_classes_charge_cache_reads_to_itpm() {
    let emulator = quiet().build().unwrap();
    let system = "abcd ".repeat(2_000);
    let body = cached(&system, "Q", None, "claude-3-5-haiku-20241022");
    usage_of(&emulator, &body).await;
    let (input, _, read) = usage_of(&emulator, &body).await;
    assert_eq!(read, 2_000);
    let stats = emulator.stats();
    let s = &stats.classes["haiku-3-5"];
    // Write (2,000) + read (2,000) + twice the question.
    assert_eq!(s.input_tokens, 4_000 + 2 * input);
}

// ---------------------------------------------------------------- faults

#[tokio::test(start_paused = true)]
async fn overloaded_fault_is_a_529_and_charges_nothing() {
    let emulator = quiet()
        .faults(Faults::none().with_overloaded(1.0))
        .build()
        .unwrap();
    let response = send(&emulator, "/v1/messages", &ask("Hi", 5)).await;
    assert_eq!(response.status().as_u16(), 529);
    let id = assert_request_id(response.headers());
    let json = json_of(response).await;
    assert_error(&json, "overloaded_error", Some(&id));
    assert_eq!(json["error"]["message"], "Overloaded");
    let s = emulator.stats().classes["sonnet-4"].clone();
    assert_eq!(
        (s.overloaded, s.requests_admitted, s.input_tokens),
        (1, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn server_error_fault_is_a_500_api_error() {
    let emulator = quiet()
        .faults(Faults::none().with_server_error(1.0))
        .build()
        .unwrap();
    let response = send(&emulator, "/v1/messages", &ask("Hi", 5)).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let id = assert_request_id(response.headers());
    let json = json_of(response).await;
    assert_error(&json, "api_error", Some(&id));
    assert_eq!(json["error"]["message"], "Internal server error");
    assert_eq!(emulator.stats().classes["sonnet-4"].server_errors, 1);
}

#[tokio::test(start_paused = true)]
async fn connection_reset_fault_fails_the_call_after_charging_the_input() {
    let emulator = quiet()
        .faults(Faults::none().with_connection_reset(1.0))
        .build()
        .unwrap();
    let body = ask("Hi there", 5);
    let err = emulator
        .service()
        .oneshot(request("/v1/messages", &body))
        .await
        .expect_err("the connection is reset");
    let io = err.downcast_ref::<std::io::Error>().expect("an io::Error");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
    let s = emulator.stats().classes["sonnet-4"].clone();
    // It reached the server: the request and its input are charged, no output.
    assert_eq!(s.connection_resets, 1);
    assert_eq!(s.requests_admitted, 1);
    assert_eq!(s.input_tokens, count(&body));
    assert_eq!(s.output_tokens, 0);

    // Through the router, the answer's body fails instead.
    let router_response = emulator
        .router()
        .oneshot(
            Request::post("/v1/messages")
                .body(axum::body::Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(router_response.into_body().collect().await.is_err());
}

#[tokio::test(start_paused = true)]
async fn slow_fault_delays_the_answer() {
    let emulator = quiet()
        .faults(Faults::none().with_slow(1.0, Duration::from_secs(45)))
        .build()
        .unwrap();
    let start = Instant::now();
    let response = send(&emulator, "/v1/messages", &ask("Hi", 5)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(45));
    let mut body = ask("Hi", 5);
    body["stream"] = json!(true);
    let start = Instant::now();
    let response = send(&emulator, "/v1/messages", &body).await;
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(45),
        "the stream's head too"
    );
    assert_eq!(sse_of(response).await.last().unwrap().0, "message_stop");
    assert_eq!(emulator.stats().classes["sonnet-4"].slow_responses, 2);
}

#[tokio::test(start_paused = true)]
async fn stream_error_fault_sends_event_error_after_a_200() {
    let emulator = quiet()
        .faults(Faults::none().with_stream_error(1.0))
        .output_length(OutputLength::new(1.0, 1.0))
        .latency(Latency::none().with_tokens_per_delta(10))
        .build()
        .unwrap();
    let mut body = ask("Hi", 100);
    body["stream"] = json!(true);
    let response = send(&emulator, "/v1/messages", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let events = sse_of(response).await;
    let (last_name, last) = events.last().unwrap();
    assert_eq!(last_name, "error");
    assert_eq!(
        *last,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );
    assert_eq!(events[0].0, "message_start");
    assert!(events
        .iter()
        .all(|(n, _)| n != "message_stop" && n != "message_delta"));
    let deltas = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .count() as u64;
    assert!((1..10).contains(&deltas), "{deltas}");
    let s = emulator.stats().classes["sonnet-4"].clone();
    assert_eq!(s.stream_errors, 1);
    // Only the tokens sent before the error are charged.
    assert_eq!(s.output_tokens, deltas * 10);
    // Non-streamed requests are not hit by this fault.
    assert_eq!(
        send(&emulator, "/v1/messages", &ask("Hi", 5))
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test(start_paused = true)]
async fn spend_cap_429_has_details_and_no_retry_after() {
    let emulator = quiet().build().unwrap();
    emulator.set_spend_limit_reached(true);
    let response = send(&emulator, "/v1/messages", &ask("Hi", 5)).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().get("retry-after").is_none());
    assert!(response.headers().get("x-should-retry").is_none());
    let id = assert_request_id(response.headers());
    let json = json_of(response).await;
    assert_error(&json, "rate_limit_error", Some(&id));
    assert_eq!(
        json["error"]["details"]["error_code"],
        "enforced_spend_limit_reached"
    );
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("You will regain access on"));
    emulator.set_spend_limit_reached(false);
    assert_eq!(
        send(&emulator, "/v1/messages", &ask("Hi", 5))
            .await
            .status(),
        StatusCode::OK
    );
    let s = emulator.stats().classes["sonnet-4"].clone();
    assert_eq!(
        (s.spend_limited, s.rate_limited, s.requests_admitted),
        (1, 0, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn fault_rates_are_drawn_at_the_configured_rate() {
    let emulator = quiet()
        .faults(Faults::none().with_overloaded(0.2).with_server_error(0.1))
        .build()
        .unwrap();
    let mut statuses = [0u32; 3];
    for i in 0..1_000 {
        match send(&emulator, "/v1/messages", &ask(&format!("q{i}"), 1))
            .await
            .status()
            .as_u16()
        {
            200 => statuses[0] += 1,
            529 => statuses[1] += 1,
            500 => statuses[2] += 1,
            other => panic!("status {other}"),
        }
    }
    assert!((150..250).contains(&statuses[1]), "{statuses:?}");
    assert!((60..140).contains(&statuses[2]), "{statuses:?}");
}

#[tokio::test(start_paused = true)]
async fn acceleration_limit_refuses_a_sharp_jump_under_the_limit() {
    let emulator = quiet()
        .limits(Limits::new().rpm(10_000).itpm(10_000_000).otpm(10_000_000))
        .acceleration(Acceleration::new(2.0, 1_500))
        .build()
        .unwrap();
    let small = ask(&"abcd ".repeat(97), 1); // 100 tokens of input, 1 of output
                                             // Ramping up from nothing to ~1,000 tokens per 10 s stays under the
                                             // 1,500 always allowed; then a steady 101 tokens per second.
    for _ in 0..75 {
        assert_eq!(
            send(&emulator, "/v1/messages", &small).await.status(),
            StatusCode::OK
        );
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    // The last 10 s hold ~1,000 tokens against a baseline of ~1,000 per 10 s:
    // a jump of 1,500 more is above 2x.
    let big = ask(&"abcd ".repeat(1_500), 1);
    let response = send(&emulator, "/v1/messages", &big).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(response.headers(), "retry-after"), "10");
    let id = assert_request_id(response.headers());
    assert_error(&json_of(response).await, "rate_limit_error", Some(&id));
    let s = emulator.stats().classes["sonnet-4"].clone();
    assert_eq!((s.acceleration_limited, s.rate_limited), (1, 1));
    // A moderate one passes.
    let medium = ask(&"abcd ".repeat(500), 1);
    assert_eq!(
        send(&emulator, "/v1/messages", &medium).await.status(),
        StatusCode::OK
    );
}

// ---------------------------------------------------------------- determinism and stats

async fn transcript(seed: u64) -> Vec<String> {
    let emulator = Emulator::builder()
        .limits(Limits::new().rpm(5).itpm(1_000_000).otpm(1_000_000))
        .seed(seed)
        .faults(Faults::none().with_overloaded(0.2).with_stream_error(0.3))
        .build()
        .unwrap();
    let mut out = Vec::new();
    for i in 0..12 {
        let mut body = ask(&format!("question number {i}"), 64);
        body["stream"] = json!(i % 2 == 0);
        let start = Instant::now();
        let response = send(&emulator, "/v1/messages", &body).await;
        let status = response.status();
        let id = header(response.headers(), "request-id").to_string();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        out.push(format!(
            "{status} {id} {:?} {}",
            start.elapsed(),
            String::from_utf8_lossy(&bytes)
        ));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn same_seed_same_run_other_seed_other_run() {
    let a = transcript(11).await;
    let b = transcript(11).await;
    assert_eq!(a, b);
    let c = transcript(12).await;
    assert_ne!(a, c);
    // The run had all kinds of answers.
    let joined = a.join("\n");
    assert!(joined.contains("429 Too Many Requests"));
    assert!(joined.contains("200 OK"));
}

#[tokio::test(start_paused = true)]
async fn same_request_gets_the_same_answer_length() {
    let emulator = quiet().build().unwrap();
    let body = ask("Repeat after me", 500);
    let first = json_of(send(&emulator, "/v1/messages", &body).await).await;
    let again = json_of(send(&emulator, "/v1/messages", &body).await).await;
    assert_eq!(
        first["usage"]["output_tokens"],
        again["usage"]["output_tokens"]
    );
    assert_eq!(first["content"], again["content"]);
    assert_ne!(first["id"], again["id"]);
}

#[tokio::test(start_paused = true)]
async fn stats_timeline_counts_per_second() {
    let emulator = quiet()
        .limits(Limits::new().rpm(2).itpm(1_000_000).otpm(1_000_000))
        .output_length(OutputLength::new(1.0, 1.0))
        .build()
        .unwrap();
    let body = ask("Hi", 7);
    let input = count(&body);
    send(&emulator, "/v1/messages", &body).await;
    tokio::time::advance(Duration::from_millis(2_500)).await;
    send(&emulator, "/v1/messages", &body).await;
    send(&emulator, "/v1/messages", &body).await; // 429
    let stats = emulator.stats();
    let s = &stats.classes["sonnet-4"];
    assert_eq!(s.timeline.len(), 3);
    assert_eq!(s.timeline[0].requests, 1);
    assert_eq!(s.timeline[0].input_tokens, input);
    assert_eq!(s.timeline[0].output_tokens, 7);
    assert_eq!(s.timeline[1].requests, 0);
    assert_eq!(s.timeline[2].requests, 1);
    assert_eq!(s.timeline[2].rate_limited, 1);
    assert_eq!(s.output_tokens, 14);
    assert_eq!(s.input_tokens, 2 * input);
    assert_eq!(stats.elapsed, Duration::from_millis(2_500));
}

// ---------------------------------------------------------------- over TCP

#[tokio::test]
async fn serves_over_tcp_with_hyper() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let emulator = Emulator::builder()
        .limits(Limits::new().rpm(50).itpm(30_000).otpm(8_000))
        .latency(Latency::none())
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = emulator.clone();
    let task = tokio::spawn(async move { server.serve(listener).await });

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let post = |body: &Value| {
        Request::post(format!("http://{addr}/v1/messages"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
            .unwrap()
    };

    let response = client
        .request(post(&ask("Hello over TCP", 16)))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let snap = RateLimitSnapshot::from_headers(response.headers());
    assert_eq!(snap.requests.limit, Some(50));
    assert_eq!(snap.requests.remaining, Some(49));
    assert_eq!(snap.input_tokens.remaining, Some(30_000));
    assert_request_id(response.headers());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["type"], "message");

    let mut streamed = ask("Stream over TCP", 16);
    streamed["stream"] = json!(true);
    let response = client.request(post(&streamed)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let events = parse_sse(std::str::from_utf8(&bytes).unwrap());
    assert_eq!(events.first().unwrap().0, "message_start");
    assert_eq!(events.last().unwrap().0, "message_stop");

    let missing = client
        .request(post(&json!({"model": SONNET, "messages": []})))
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);

    assert_eq!(emulator.stats().classes["sonnet-4"].requests_admitted, 2);
    task.abort();
}

#[tokio::test]
async fn connection_reset_over_tcp_aborts_the_connection() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let emulator = Emulator::builder()
        .latency(Latency::none())
        .faults(Faults::none().with_connection_reset(1.0))
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = emulator.clone();
    let task = tokio::spawn(async move { server.serve(listener).await });
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::post(format!("http://{addr}/v1/messages"))
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&ask("Hi", 5)).unwrap(),
        )))
        .unwrap();
    let err = client.request(request).await.expect_err("no answer");
    assert!(
        err.is_connect() || std::error::Error::source(&err).is_some(),
        "{err:?}"
    );
    assert_eq!(emulator.stats().classes["sonnet-4"].connection_resets, 1);
    task.abort();
}

// ---------------------------------------------------------------- cancellation and properties

#[tokio::test(start_paused = true)]
async fn dropping_a_json_request_mid_generation_charges_what_was_produced() {
    let emulator = quiet()
        .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(10_000))
        .output_mode(OutputMode::Reserve)
        .output_length(OutputLength::new(1.0, 1.0))
        .latency(
            Latency::none()
                .with_per_output_token(Duration::from_millis(10))
                .with_tokens_per_delta(10),
        )
        .build()
        .unwrap();
    // 1,000 tokens take 10 s; the client gives up after 2.505 s (250 produced).
    let cut = tokio::time::timeout(
        Duration::from_millis(2_505),
        send(&emulator, "/v1/messages", &ask("long", 1_000)),
    )
    .await;
    assert!(cut.is_err(), "the answer was not complete yet");
    let s = emulator.stats().classes["sonnet-4"].clone();
    assert_eq!((s.requests_admitted, s.output_tokens), (1, 250));
    let probe = send(&emulator, "/v1/messages", &ask("probe", 1)).await;
    let snap = RateLimitSnapshot::from_headers(probe.headers());
    // The 1,000 reserved were settled to the 250 produced, which the 2.5 s of
    // refill (at 166 per second) covers: the bucket is full again. Had the
    // unused 750 stayed charged it would hold about 9,400, shown as 9,000.
    assert_eq!(snap.output_tokens.remaining, Some(10_000));
    assert_eq!(emulator.stats().classes["sonnet-4"].output_tokens, 251);
}

proptest::proptest! {
    #[test]
    fn counting_adds_up_over_whitespace(a in "\\PC{0,40}", b in "\\PC{0,40}") {
        let joined = format!("{a} {b}");
        proptest::prop_assert_eq!(count_text(&joined), count_text(&a) + count_text(&b));
        proptest::prop_assert!(count_text(&a) <= a.chars().count() as u64);
    }

    #[test]
    fn any_body_gets_an_answer_or_a_400(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        let emulator = quiet().build().unwrap();
        let status = runtime.block_on(async {
            let request = Request::post("/v1/messages").body(Full::new(Bytes::from(body))).unwrap();
            emulator.service().oneshot(request).await.unwrap().status()
        });
        proptest::prop_assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST);
    }

    #[test]
    fn any_valid_request_counts_like_count_tokens(text in "\\PC{0,200}", max in 1u64..50) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        let emulator = quiet().build().unwrap();
        let body = ask(&text, max);
        let usage = runtime.block_on(async {
            json_of(send(&emulator, "/v1/messages", &body).await).await["usage"].clone()
        });
        proptest::prop_assert_eq!(usage["input_tokens"].as_u64(), Some(count(&body)));
        let out = usage["output_tokens"].as_u64().unwrap();
        proptest::prop_assert!((1..=max).contains(&out));
    }
}

/// A hostile `max_tokens` (far above any model's output limit, up to
/// `u64::MAX`) is a 400, in both output modes and with the acceleration limit
/// on: no overflow, no attempt to produce that many tokens.
#[tokio::test(start_paused = true)]
async fn absurd_max_tokens_is_a_400() {
    for mode in [OutputMode::Reserve, OutputMode::Realtime] {
        let emulator = quiet()
            .output_mode(mode)
            .acceleration(Acceleration::new(2.0, 1_500))
            .build()
            .unwrap();
        for max_tokens in [u64::MAX, 1_000_000] {
            for stream in [false, true] {
                let mut body = ask("Hi", max_tokens);
                body["stream"] = json!(stream);
                let response = send(&emulator, "/v1/messages", &body).await;
                assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{mode:?}");
                let v = json_of(response).await;
                assert_eq!(v["error"]["type"], "invalid_request_error");
                let message = v["error"]["message"].as_str().unwrap_or_default();
                assert!(message.starts_with("max_tokens: "), "{message}");
            }
        }
        // The largest allowed value is served.
        let emulator = quiet().output_mode(mode).build().unwrap();
        let response = send(&emulator, "/v1/messages", &ask("Hi", 128_000)).await;
        assert_eq!(response.status(), StatusCode::OK, "{mode:?}");
    }
}

/// With a wall clock that follows the paused clock, reset instants are that
/// clock plus the bucket's time to full, rounded up to the second: the same
/// headers every run, and a client reading them on the same clock gets the
/// same delay every run.
#[tokio::test(start_paused = true)]
async fn resets_follow_the_given_wall_clock() {
    use std::time::UNIX_EPOCH;
    use tower_llm_limits::clock::WallClock;

    // 2027-01-15T08:00:00Z.
    let start = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let clock = WallClock::following_tokio(start);
    let emulator = quiet()
        .limits(Limits::new().rpm(2).itpm(1_000_000).otpm(1_000_000))
        .wall_clock(clock)
        .build()
        .unwrap();
    tokio::time::advance(Duration::from_millis(250)).await;
    let first = send(&emulator, "/v1/messages", &ask("Hi", 5)).await;
    // One of 2 requests used at 08:00:00.250: full again 30 s later, rounded up.
    assert_eq!(
        header(first.headers(), "anthropic-ratelimit-requests-reset"),
        "2027-01-15T08:00:31Z"
    );
    // Nothing used: full now, rounded up to the next second.
    assert_eq!(
        header(first.headers(), "anthropic-ratelimit-output-tokens-reset"),
        "2027-01-15T08:00:01Z"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    let second = send(&emulator, "/v1/messages", &ask("Hi", 5)).await;
    // Two used, the first refilling since 00.250: full at 01:00.250.
    assert_eq!(
        header(second.headers(), "anthropic-ratelimit-requests-reset"),
        "2027-01-15T08:01:01Z"
    );
    let snap = RateLimitSnapshot::from_headers_at(second.headers(), clock.now());
    assert_eq!(snap.requests.remaining, Some(0));
    // 08:01:01 - 08:00:10.250.
    assert_eq!(snap.requests.reset_in, Some(Duration::from_millis(50_750)));
}
