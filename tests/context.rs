//! `ContextGuardLayer` on a growing agent loop: every turn resends the whole
//! history plus a new tool result. With a cap and a trim callback that drops
//! the oldest tool exchanges, no request above the cap is sent, the tokens
//! saved are reported, and a request the callback cannot shorten enough is
//! refused before it is sent.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::{Service, ServiceExt};
use tower_llm_limits::context::{ContextGuardLayer, ConversationId};
use tower_llm_limits::estimate::{AnthropicEstimator, TokenEstimator};
use tower_llm_limits::{BoxError, Error};

const CAP: u64 = 6_000;

/// The agent loop's request at `turn`: a task, then one tool call and its
/// (long) result per turn.
fn agent_request(turn: usize) -> Value {
    let mut messages = vec![json!({"role": "user", "content": "Audit the repository."})];
    for t in 0..turn {
        messages.push(json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": format!("t{t}"), "name": "read_file", "input": {"path": format!("src/{t}.rs")}}
        ]}));
        messages.push(json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": format!("t{t}"), "content": format!("fn f{t}() {{}} // {}", "line of code ".repeat(300))}
        ]}));
    }
    json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": messages})
}

fn post(body: &Value) -> Request<Full<Bytes>> {
    let mut request = Request::post("/v1/messages")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    request
        .extensions_mut()
        .insert(ConversationId("agent-1".into()));
    request
}

/// Drops the oldest tool exchange (an assistant call and its result) after the task.
fn drop_oldest_exchange(request: &mut Value) {
    if let Some(messages) = request.get_mut("messages").and_then(Value::as_array_mut) {
        if messages.len() > 3 {
            messages.drain(1..3);
        }
    }
}

/// An upstream that records the estimated size of what it receives.
fn recording_upstream(
    sent: Arc<Mutex<Vec<u64>>>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future: Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |request: Request<Full<Bytes>>| {
        let sent = sent.clone();
        async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let estimate = AnthropicEstimator::new().estimate(&parts, &bytes);
            sent.lock()
                .expect("lock")
                .push(estimate.input_tokens + estimate.cache_read_tokens);
            let answer = r#"{"type":"message","usage":{"input_tokens":1,"output_tokens":1}}"#;
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
                answer.as_bytes(),
            ))))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_growing_agent_loop_is_capped_and_trimmed() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let guard = ContextGuardLayer::builder()
        .cap(CAP)
        .trim(|request, over| {
            // Drop as many old exchanges as the excess needs (each is ~1k tokens).
            let exchanges = over.tokens.saturating_sub(over.cap) / 900 + 1;
            for _ in 0..exchanges {
                drop_oldest_exchange(request);
            }
        })
        .build();
    let client = tower::ServiceBuilder::new()
        .layer(guard.clone())
        .service(recording_upstream(sent.clone()));
    for turn in 0..15 {
        client
            .clone()
            .oneshot(post(&agent_request(turn)))
            .await
            .expect("sent");
    }
    let sent = sent.lock().expect("lock").clone();
    assert_eq!(sent.len(), 15);
    assert!(sent.iter().all(|t| *t <= CAP), "{sent:?}");
    let stats = guard.conversation("agent-1").expect("reported");
    assert_eq!(stats.turns, 15);
    assert!(stats.trimmed > 0 && stats.tokens_saved > 0, "{stats:?}");
    assert!(stats.max_tokens <= CAP);
    assert_eq!(stats.total_tokens, sent.iter().sum::<u64>());
    assert_eq!(guard.snapshot().tokens_saved, stats.tokens_saved);
    // Untrimmed, the last turn alone would resend far more than the cap.
    let untrimmed = AnthropicEstimator::new().estimate(
        &post(&agent_request(14)).into_parts().0,
        agent_request(14).to_string().as_bytes(),
    );
    assert!(untrimmed.input_tokens > 2 * CAP);
}

#[tokio::test(start_paused = true)]
async fn a_request_the_callback_cannot_shorten_is_refused_unsent() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let guard = ContextGuardLayer::builder()
        .cap(CAP)
        .trim(|_, _| {})
        .build();
    let client = tower::ServiceBuilder::new()
        .layer(guard.clone())
        .service(recording_upstream(sent.clone()));
    let err = client
        .oneshot(post(&agent_request(12)))
        .await
        .expect_err("refused");
    match err.downcast_ref::<Error>() {
        Some(Error::ContextTooLarge { tokens, cap }) => {
            assert_eq!(*cap, CAP);
            assert!(*tokens > CAP);
        }
        other => panic!("unexpected: {other:?}"),
    }
    assert!(sent.lock().expect("lock").is_empty(), "nothing sent");
    assert_eq!(guard.snapshot().refused, 1);
}

#[tokio::test(start_paused = true)]
async fn without_an_id_a_conversation_is_named_by_its_first_messages_and_its_growth_reported() {
    let guard = ContextGuardLayer::new();
    let client = tower::ServiceBuilder::new()
        .layer(guard.clone())
        .service(recording_upstream(Arc::default()));
    for turn in 0..5 {
        let request = Request::post("/v1/messages")
            .body(Full::new(Bytes::from(agent_request(turn).to_string())))
            .expect("request");
        client.clone().oneshot(request).await.expect("sent");
    }
    let snapshot = guard.snapshot();
    assert_eq!(snapshot.conversations.len(), 1, "{snapshot:?}");
    let (name, stats) = &snapshot.conversations[0];
    assert!(name.starts_with("hash-"));
    assert_eq!(stats.turns, 5);
    assert!(
        stats.last_growth > 500,
        "each turn adds a tool exchange: {stats:?}"
    );
    assert!(stats.last_tokens > stats.first_tokens);
}
