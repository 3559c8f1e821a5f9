//! The Message Batches endpoints: create, retrieve, list, results (JSONL),
//! cancel; their own limits (requests per minute, processing queue), and
//! the Messages limits left alone. On tokio's paused clock.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_llm_limits_emulator::{BatchSettings, Emulator, Latency, Limits};

fn emulator(settings: BatchSettings) -> Emulator {
    Emulator::builder()
        .limits(Limits::new().rpm(1).itpm(1_000).otpm(1_000))
        .latency(Latency::none())
        .batches(settings)
        .build()
        .expect("emulator")
}

async fn call(
    emu: &Emulator,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Bytes) {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(body))
        .expect("request");
    let response = emu.service().oneshot(request).await.expect("answer");
    let status = response.status();
    (
        status,
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes(),
    )
}

fn create_body(n: usize) -> Value {
    let requests: Vec<Value> = (0..n)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "params": {
            "model": "claude-sonnet-4-5", "max_tokens": 20,
            "messages": [{"role": "user", "content": format!("hello {i}")}]}})
        })
        .collect();
    json!({ "requests": requests })
}

fn json(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).expect("json")
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_created_listed_processed_and_its_results_read() {
    let emu = emulator(BatchSettings::default());
    let (status, body) = call(
        &emu,
        Method::POST,
        "/v1/messages/batches",
        Some(create_body(3)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let batch = json(&body);
    let id = batch["id"].as_str().expect("id").to_owned();
    assert_eq!(batch["processing_status"], "in_progress");
    assert_eq!(batch["request_counts"]["processing"], 3);
    assert!(batch["results_url"].is_null());
    let (status, _) = call(
        &emu,
        Method::GET,
        &format!("/v1/messages/batches/{id}/results"),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "no results before the batch ended"
    );

    let (_, list) = call(&emu, Method::GET, "/v1/messages/batches", None).await;
    assert_eq!(json(&list)["data"][0]["id"], id.as_str());

    tokio::time::sleep(Duration::from_secs(61)).await;
    let (_, body) = call(
        &emu,
        Method::GET,
        &format!("/v1/messages/batches/{id}"),
        None,
    )
    .await;
    let batch = json(&body);
    assert_eq!(batch["processing_status"], "ended");
    assert_eq!(batch["request_counts"]["succeeded"], 3);
    let url = batch["results_url"]
        .as_str()
        .expect("results url")
        .to_owned();
    let (status, results) = call(&emu, Method::GET, &url, None).await;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<Value> = results
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("line"))
        .collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        assert_eq!(line["result"]["type"], "succeeded");
        assert!(
            line["result"]["message"]["usage"]["input_tokens"]
                .as_u64()
                .unwrap_or(0)
                > 0
        );
    }
    // Batch traffic drew nothing on the Messages limits.
    assert_eq!(emu.stats().total().requests_admitted, 0);
    assert_eq!(emu.batch_stats().succeeded, 3);
}

#[tokio::test(start_paused = true)]
async fn a_canceled_batch_ends_with_canceled_results() {
    let emu = emulator(BatchSettings::default());
    let (_, body) = call(
        &emu,
        Method::POST,
        "/v1/messages/batches",
        Some(create_body(2)),
    )
    .await;
    let id = json(&body)["id"].as_str().expect("id").to_owned();
    let (status, body) = call(
        &emu,
        Method::POST,
        &format!("/v1/messages/batches/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["processing_status"], "canceling");
    let (_, body) = call(
        &emu,
        Method::GET,
        &format!("/v1/messages/batches/{id}"),
        None,
    )
    .await;
    let batch = json(&body);
    assert_eq!(batch["processing_status"], "ended");
    assert_eq!(batch["request_counts"]["canceled"], 2);
    let (_, results) = call(
        &emu,
        Method::GET,
        &format!("/v1/messages/batches/{id}/results"),
        None,
    )
    .await;
    assert!(String::from_utf8_lossy(&results).contains(r#""type":"canceled""#));
}

#[tokio::test(start_paused = true)]
async fn bad_batches_and_unknown_ids_are_refused() {
    let emu = emulator(BatchSettings::default());
    let mut duplicate = create_body(2);
    duplicate["requests"][1]["custom_id"] = json!("c0");
    let (status, _) = call(&emu, Method::POST, "/v1/messages/batches", Some(duplicate)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call(
        &emu,
        Method::POST,
        "/v1/messages/batches",
        Some(create_body(0)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call(
        &emu,
        Method::GET,
        "/v1/messages/batches/msgbatch_nope",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(emu.batch_stats().created, 0);
}

#[tokio::test(start_paused = true)]
async fn the_batch_limits_answer_429_with_retry_after() {
    let emu = emulator(BatchSettings {
        requests_per_minute: Some(2),
        queue_cap: 5,
        ..BatchSettings::default()
    });
    let (status, _) = call(
        &emu,
        Method::POST,
        "/v1/messages/batches",
        Some(create_body(4)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // 4 + 2 requests would pass the processing-queue cap of 5.
    let (status, _) = call(
        &emu,
        Method::POST,
        "/v1/messages/batches",
        Some(create_body(2)),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Third call within the minute: over the batch RPM.
    let request = Request::get("/v1/messages/batches")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = emu.service().oneshot(request).await.expect("answer");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(emu.batch_stats().rate_limited, 2);
}
