//! `BatchLayer` against the emulator's Message Batches endpoints, on tokio's
//! paused clock: background requests go out as batches and resolve as
//! `/v1/messages` answers; the batch limits are paced; dropped futures are
//! handled; a restarted process can collect a batch by its id.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_llm_limits::batch::{BatchHook, BatchLayer, BatchResult};
use tower_llm_limits::concurrency::Priority;
use tower_llm_limits::{BatchEnd, BoxError, Error};
use tower_llm_limits_emulator::{BatchSettings, Emulator, Latency, Limits};

fn emulator(settings: BatchSettings) -> Emulator {
    Emulator::builder()
        // One Messages request a minute: a batch drawing on it would show.
        .limits(Limits::new().rpm(1).itpm(1_000).otpm(1_000))
        .latency(Latency::none())
        .batches(settings)
        .seed(3)
        .build()
        .expect("emulator")
}

fn request(i: usize, priority: Priority, stream: bool) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":40,"stream":{stream},"messages":[{{"role":"user","content":"summarise document {i}"}}]}}"#
    );
    let mut request = Request::post("/v1/messages")
        .header("x-api-key", "k")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    request.extensions_mut().insert(priority);
    request
}

async fn body_json(
    response: http::Response<impl http_body::Body<Error = impl Into<BoxError>>>,
) -> serde_json::Value {
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(Into::into)
        .expect("body")
        .to_bytes();
    serde_json::from_slice(&bytes).expect("json")
}

#[tokio::test(start_paused = true)]
async fn background_requests_go_out_as_one_batch_and_resolve_as_messages() {
    let emu = emulator(BatchSettings::default());
    let layer = BatchLayer::builder(emu.service())
        .max_requests(100)
        .max_wait(Duration::from_secs(5))
        .build();
    let service = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(emu.service());
    let calls = (0..30).map(|i| {
        service
            .clone()
            .oneshot(request(i, Priority::Background, false))
    });
    let interactive = service
        .clone()
        .oneshot(request(99, Priority::Interactive, false));
    let (answers, interactive) = tokio::join!(futures_util::future::join_all(calls), interactive);
    assert_eq!(interactive.expect("interactive").status(), StatusCode::OK);
    for answer in answers {
        let answer = answer.expect("batched answer");
        assert_eq!(answer.status(), StatusCode::OK);
        let message = body_json(answer).await;
        assert_eq!(message["type"], "message");
        assert!(message["usage"]["input_tokens"].as_u64().unwrap_or(0) > 0);
    }
    let batches = emu.batch_stats();
    assert_eq!(
        (batches.created, batches.requests, batches.succeeded),
        (1, 30, 30)
    );
    assert_eq!(batches.rate_limited, 0);
    // Only the interactive request reached the Messages endpoint.
    assert_eq!(emu.stats().total().requests_admitted, 1);
    let snapshot = layer.snapshot();
    assert_eq!(
        (snapshot.batches, snapshot.delivered, snapshot.queued),
        (1, 30, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn streamed_and_opted_out_background_requests_pass_through() {
    let emu = emulator(BatchSettings::default());
    let layer = BatchLayer::new(emu.service());
    let mut service = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(emu.service());
    let answer = ServiceExt::<Request<Full<Bytes>>>::ready(&mut service)
        .await
        .expect("ready")
        .call(request(1, Priority::Background, true))
        .await
        .expect("streamed");
    assert_eq!(answer.status(), StatusCode::OK);
    let mut opted_out = request(2, Priority::Background, false);
    opted_out
        .extensions_mut()
        .insert(tower_llm_limits::batch::NoBatch);
    // The Messages limit (1 RPM) makes the second direct request wait or 429:
    // either way it went to /v1/messages, not to a batch.
    let ready = ServiceExt::<Request<Full<Bytes>>>::ready(&mut service).await;
    let _ = ready.expect("ready").call(opted_out).await;
    assert_eq!(emu.batch_stats().created, 0);
    assert_eq!(layer.snapshot().collected, 0);
}

#[tokio::test(start_paused = true)]
async fn errored_and_expired_results_map_to_the_synchronous_errors() {
    let emu = emulator(BatchSettings {
        processing_delay: Duration::from_secs(120),
        expiry: Duration::from_secs(60),
        ..BatchSettings::default()
    });
    let layer = BatchLayer::builder(emu.service())
        .max_wait(Duration::from_secs(1))
        .build();
    let service = tower::ServiceBuilder::new()
        .layer(layer)
        .service(emu.service());
    let result = service
        .oneshot(request(1, Priority::Background, false))
        .await;
    let err = result.expect_err("expired");
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::Batch {
                end: BatchEnd::Expired,
                batch_id: Some(_),
                ..
            })
        ),
        "{err}"
    );

    let emu = emulator(BatchSettings::default());
    let layer = BatchLayer::builder(emu.service())
        .max_wait(Duration::from_secs(1))
        .build();
    let service = tower::ServiceBuilder::new()
        .layer(layer)
        .service(emu.service());
    // No max_tokens: /v1/messages answers 400 invalid_request_error.
    let mut bad = Request::post("/v1/messages")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .expect("request");
    bad.extensions_mut()
        .insert(tower_llm_limits::batch::Batchable);
    let answer = service.oneshot(bad).await.expect("answer");
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    let error = body_json(answer).await;
    assert_eq!(error["error"]["type"], "invalid_request_error");
}

#[tokio::test(start_paused = true)]
async fn batch_limits_are_paced_so_no_submission_draws_a_429() {
    let settings = BatchSettings {
        processing_delay: Duration::from_secs(30),
        requests_per_minute: Some(3),
        queue_cap: 4,
        ..BatchSettings::default()
    };
    for paced in [true, false] {
        let emu = emulator(settings);
        let rpm = paced.then_some(3);
        let layer = BatchLayer::builder(emu.service())
            .max_requests(2)
            .max_wait(Duration::from_secs(1))
            .poll(Duration::from_secs(30), Duration::from_secs(60))
            .requests_per_minute(rpm)
            .queue_cap(if paced { 4 } else { 1_000 })
            .build();
        let service = tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service(emu.service());
        let calls = (0..10).map(|i| {
            service
                .clone()
                .oneshot(request(i, Priority::Background, false))
        });
        let answers = futures_util::future::join_all(calls).await;
        let ok = answers
            .iter()
            .filter(|a| a.as_ref().is_ok_and(|r| r.status() == StatusCode::OK))
            .count();
        let stats = emu.batch_stats();
        if paced {
            assert_eq!(ok, 10);
            assert_eq!(stats.rate_limited, 0, "{stats:?}");
            assert_eq!(layer.snapshot().retried, 0);
            assert_eq!(stats.created, 5);
        } else {
            // Without the ledger the same traffic draws 429s (then retried).
            assert!(stats.rate_limited > 0, "{stats:?}");
            assert!(layer.snapshot().retried > 0);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_future_dropped_before_submission_is_removed_and_one_dropped_after_is_ignored() {
    let emu = emulator(BatchSettings::default());
    let layer = BatchLayer::builder(emu.service())
        .max_wait(Duration::from_secs(10))
        .poll(Duration::from_secs(5), Duration::from_secs(5))
        .build();
    let service = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(emu.service());
    let spawn = |i| {
        tokio::spawn(
            service
                .clone()
                .oneshot(request(i, Priority::Background, false)),
        )
    };
    let (a, b, c) = (spawn(1), spawn(2), spawn(3));
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.abort(); // before the batch goes (10 s)
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(emu.batch_stats().requests, 2);
    c.abort(); // after submission: its result is discarded
    let a = a.await.expect("task").expect("answer");
    assert_eq!(a.status(), StatusCode::OK);
    let snapshot = layer.snapshot();
    assert_eq!(snapshot.dropped_unsent, 1);
    assert_eq!((snapshot.delivered, snapshot.discarded), (1, 1));
    assert_eq!(emu.batch_stats().succeeded, 2);
}

/// What a hook was told about one batch: its id, its custom ids, whether it ended.
type Told = (String, Vec<String>, bool);

#[derive(Default, Clone)]
struct Recorder(Arc<Mutex<Vec<Told>>>);

impl BatchHook for Recorder {
    fn submitted(&self, batch_id: &str, custom_ids: &[String]) {
        self.0
            .lock()
            .expect("lock")
            .push((batch_id.to_owned(), custom_ids.to_vec(), false));
    }
    fn ended(&self, batch_id: &str) {
        for entry in self.0.lock().expect("lock").iter_mut() {
            if entry.0 == batch_id {
                entry.2 = true;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_restarted_process_collects_a_batch_by_the_id_its_hook_kept() {
    let emu = emulator(BatchSettings::default());
    let recorder = Recorder::default();
    let layer = BatchLayer::builder(emu.service())
        .max_wait(Duration::from_secs(1))
        .hook(recorder.clone())
        .build();
    let service = tower::ServiceBuilder::new()
        .layer(layer)
        .service(emu.service());
    // The process "stops" after submission: every waiting future is dropped.
    let task = tokio::spawn(service.oneshot(request(7, Priority::Background, false)));
    tokio::time::sleep(Duration::from_secs(5)).await;
    task.abort();
    let (batch_id, custom_ids, ended) = recorder.0.lock().expect("lock")[0].clone();
    assert!(!ended);

    // A new layer (a new process) collects it by id.
    let restarted = BatchLayer::new(emu.service());
    let results = restarted
        .collect::<Full<Bytes>, _>("", HeaderMap::new(), &batch_id)
        .await
        .expect("results");
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].0, custom_ids[0]);
    assert!(matches!(results[0].1, BatchResult::Succeeded(_)));
}
