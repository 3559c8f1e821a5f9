//! `EnforceLayer` on an axum `Router`: `Router::layer(..)` takes it as it is
//! (no `HandleErrorLayer`), and every refusal is an answer in the API's error
//! shape: 429 with the exact `retry-after` and the caller's rate-limit
//! headers, 400, 413, 401. The inner service's own errors come out unchanged.

use std::io;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request as AxumRequest;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;
use tower::{service_fn, ServiceExt};
use tower_llm_limits::budget::{
    error_response, forward_response, Callers, EnforceLayer, Limits, TokenBudgetLayer,
};
use tower_llm_limits::{Dimension, Error};

const ANSWER: &str = r#"{"type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":12,"output_tokens":3}}"#;

fn callers() -> Callers {
    Callers::new()
        .caller("team-a", "gw-key-a")
        .caller("team-b", "gw-key-b")
}

/// The gateway: a route answering like the API, each caller's budget enforced.
fn app(limits: Limits) -> (Router, EnforceLayer) {
    let enforce = EnforceLayer::new(limits, callers());
    let router = Router::new()
        .route(
            "/v1/messages",
            post(|| async { ([("content-type", "application/json")], ANSWER) }),
        )
        .layer(enforce.clone());
    (router, enforce)
}

fn message(model: &str, key: Option<&str>) -> Request<Body> {
    let body = format!(
        r#"{{"model":"{model}","max_tokens":16,"messages":[{{"role":"user","content":"Say hi"}}]}}"#
    );
    let mut request = Request::post("/v1/messages").header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    request.body(Body::from(body)).unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> (Response<()>, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (Response::from_parts(parts, ()), json)
}

fn header<'a>(response: &'a Response<()>, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

fn error_type(json: &Value) -> Option<&str> {
    json.pointer("/error/type").and_then(Value::as_str)
}

#[tokio::test(start_paused = true)]
async fn over_budget_is_a_429_with_the_exact_retry_after_and_the_callers_headers() {
    // One request per minute: the second must wait exactly 60 s.
    let (app, enforce) = app(Limits::new().rpm(1).itpm(100_000).otpm(100_000));

    let (ok, json) = send(&app, message("claude-sonnet-4-5", Some("gw-key-a"))).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(json["usage"]["output_tokens"], 3);
    assert_eq!(header(&ok, "anthropic-ratelimit-requests-limit"), Some("1"));
    assert_eq!(
        header(&ok, "anthropic-ratelimit-requests-remaining"),
        Some("0")
    );

    let (refused, json) = send(&app, message("claude-sonnet-4-5", Some("gw-key-a"))).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_type(&json), Some("rate_limit_error"));
    assert_eq!(header(&refused, "retry-after"), Some("60"));
    assert_eq!(header(&refused, "x-should-retry"), Some("true"));
    assert_eq!(
        header(&refused, "anthropic-ratelimit-requests-remaining"),
        Some("0")
    );
    let id = header(&refused, "request-id").unwrap();
    assert_eq!(json["request_id"].as_str(), Some(id));
    assert!(json
        .pointer("/error/message")
        .and_then(Value::as_str)
        .is_some_and(|m| m.contains("of 1 requests per minute")));

    // Another caller has its own budget.
    let (other, _) = send(&app, message("claude-sonnet-4-5", Some("gw-key-b"))).await;
    assert_eq!(other.status(), StatusCode::OK);

    // 30 s later the wait is 30 s; after it, the caller is admitted again.
    tokio::time::advance(Duration::from_secs(30)).await;
    let (refused, _) = send(&app, message("claude-sonnet-4-5", Some("gw-key-a"))).await;
    assert_eq!(header(&refused, "retry-after"), Some("30"));
    tokio::time::advance(Duration::from_secs(30)).await;
    let (ok, _) = send(&app, message("claude-sonnet-4-5", Some("gw-key-a"))).await;
    assert_eq!(ok.status(), StatusCode::OK);

    let keys = enforce.snapshot().keys;
    assert!(keys.iter().any(|k| k.key.contains("team-a")), "{keys:?}");
    assert!(keys.iter().all(|k| !k.key.contains("gw-key")), "{keys:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_that_can_never_fit_is_a_429_not_to_be_retried() {
    let (app, _) = app(Limits::new().rpm(10).itpm(5));
    let (refused, json) = send(&app, message("claude-sonnet-4-5", Some("gw-key-a"))).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_type(&json), Some("rate_limit_error"));
    assert_eq!(header(&refused, "x-should-retry"), Some("false"));
    assert_eq!(header(&refused, "retry-after"), None);
}

#[tokio::test(start_paused = true)]
async fn unknown_missing_and_ambiguous_callers_are_refused_before_any_budget() {
    let (app, enforce) = app(Limits::new().rpm(10));
    for key in [None, Some("gw-key-z")] {
        let (refused, json) = send(&app, message("claude-sonnet-4-5", key)).await;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(error_type(&json), Some("authentication_error"));
    }
    let mut two_keys = message("claude-sonnet-4-5", Some("gw-key-a"));
    two_keys
        .headers_mut()
        .insert("authorization", "Bearer gw-key-b".parse().unwrap());
    let (refused, json) = send(&app, two_keys).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_type(&json), Some("invalid_request_error"));
    assert!(enforce.snapshot().keys.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_invalid_request_is_a_400_and_an_oversized_body_a_413() {
    let (app, enforce) = app(Limits::new().rpm(10));
    let (refused, json) = send(&app, message(&"m".repeat(300), Some("gw-key-a"))).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_type(&json), Some("invalid_request_error"));

    // A body limit set outside the layer: the budget reads past it.
    let limited = app.layer(axum::middleware::map_request(|req: AxumRequest| async {
        req.map(|body| Body::new(Limited::new(body, 64)))
    }));
    let (refused, json) = send(&limited, message("claude-sonnet-4-5", Some("gw-key-a"))).await;
    assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_type(&json), Some("request_too_large"));
    assert!(header(&refused, "request-id").is_some());
    assert!(enforce.snapshot().keys.is_empty(), "nothing was charged");
}

#[tokio::test(start_paused = true)]
async fn the_inner_services_error_comes_out_unchanged() {
    let failing = service_fn(|_req: Request<_>| async {
        Err::<Response<Full<Bytes>>, _>(io::Error::new(io::ErrorKind::PermissionDenied, "nope"))
    });
    let service = tower::Layer::layer(
        &EnforceLayer::new(Limits::new().rpm(10), callers()),
        failing,
    );
    let request = Request::post("/v1/messages")
        .header("x-api-key", "gw-key-a")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[]}"#,
        )))
        .unwrap();
    let err: io::Error = service.oneshot(request).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    assert_eq!(err.to_string(), "nope");
}

#[tokio::test(start_paused = true)]
async fn a_budget_in_client_mode_is_answered_too() {
    // Reject mode, no callers: its `BudgetExceeded` error becomes a 429.
    let budget = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1))
        .mode(tower_llm_limits::budget::BudgetMode::Reject)
        .build();
    let app = Router::new()
        .route("/v1/messages", post(|| async { ANSWER }))
        .layer(EnforceLayer::from_budget(budget));
    assert_eq!(
        send(&app, message("claude-sonnet-4-5", None))
            .await
            .0
            .status(),
        200
    );
    let (refused, json) = send(&app, message("claude-sonnet-4-5", None)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_type(&json), Some("rate_limit_error"));
    assert_eq!(header(&refused, "retry-after"), Some("60"));
}

#[test]
fn errors_map_to_the_apis_answers() {
    let cases: [(Box<dyn std::error::Error + Send + Sync>, u16, &str); 7] = [
        (
            Box::new(Error::ContextTooLarge {
                tokens: 250_000,
                cap: 100_000,
            }),
            400,
            "invalid_request_error",
        ),
        (
            Box::new(Error::BudgetExceeded {
                retry_in: Duration::from_millis(2_001),
                dimension: Dimension::InputTokens,
            }),
            429,
            "rate_limit_error",
        ),
        (
            Box::new(Error::Overloaded { waiting: 3 }),
            529,
            "overloaded_error",
        ),
        (Box::new(Error::SpendLimitReached), 429, "rate_limit_error"),
        (
            Box::new(io::Error::new(io::ErrorKind::ConnectionRefused, "refused")),
            502,
            "api_error",
        ),
        (
            Box::new(io::Error::new(io::ErrorKind::TimedOut, "slow")),
            504,
            "api_error",
        ),
        (
            Box::new(io::Error::other("secret-host:1234 failed")),
            500,
            "api_error",
        ),
    ];
    for (err, status, kind) in cases {
        let response = error_response(&*err);
        assert_eq!(response.status().as_u16(), status, "{err}");
        let json: Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(error_type(&json), Some(kind), "{err}");
        assert!(!String::from_utf8_lossy(response.body()).contains("secret-host"));
        assert!(response.headers().contains_key("request-id"));
    }
    let spend = error_response(&Error::SpendLimitReached);
    assert_eq!(spend.headers()["x-should-retry"], "false");
    let json: Value = serde_json::from_slice(spend.body()).unwrap();
    assert_eq!(
        json.pointer("/error/details/error_code")
            .and_then(Value::as_str),
        Some("enforced_spend_limit_reached")
    );
    let wait = error_response(&Error::BudgetExceeded {
        retry_in: Duration::from_millis(2_001),
        dimension: Dimension::InputTokens,
    });
    assert_eq!(wait.headers()["retry-after"], "3");
}

#[test]
fn forwarded_answers_keep_what_clients_read_and_drop_the_rest() {
    let upstream = Response::builder()
        .status(529)
        .header("content-type", "application/json")
        .header("request-id", "req_1")
        .header("retry-after-ms", "1500")
        .header("x-should-retry", "true")
        .header("anthropic-ratelimit-input-tokens-limit", "2000000")
        .header("transfer-encoding", "chunked")
        .header("set-cookie", "upstream=1")
        .body(())
        .unwrap();
    let answer = forward_response(upstream);
    assert_eq!(answer.status().as_u16(), 529);
    let mut names: Vec<&str> = answer.headers().keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "content-type",
            "request-id",
            "retry-after-ms",
            "x-should-retry"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_inner_connection_refused_comes_out_unchanged_and_is_refunded() {
    let refusing = service_fn(|_req: Request<_>| async {
        Err::<Response<Full<Bytes>>, _>(io::Error::from(io::ErrorKind::ConnectionRefused))
    });
    let enforce = EnforceLayer::new(Limits::new().rpm(10), callers());
    let service = tower::Layer::layer(&enforce, refusing);
    let request = Request::post("/v1/messages")
        .header("x-api-key", "gw-key-a")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[]}"#,
        )))
        .unwrap();
    let err: io::Error = service.oneshot(request).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    // The budget still saw the refused connection through the kept error:
    // nothing left, so the caller's request is given back.
    let snapshot = enforce.snapshot();
    assert_eq!(snapshot.admitted, 1);
    assert_eq!(snapshot.refunded_unsent, 1);
}
