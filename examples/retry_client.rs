//! A hyper-util client wrapped by `RetryAfterLayer`, against a local throttling
//! server started in this process (127.0.0.1, a free port).
//!
//! The server accepts one request per second and answers the others 429 with
//! `retry-after-ms`, as Anthropic's API does when a limit is exhausted. Four
//! requests are sent at once; every attempt and every outcome is printed.
//!
//! Run: `cargo run --example retry_client`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_limits::body::ReplayBody;
use tower_llm_limits::retry::{RetryAfterLayer, RETRY_COUNT};
use tower_llm_limits::BoxError;

/// One request per second; the others get 429 with the time left.
async fn throttling_server() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let next_free = Arc::new(Mutex::new(Instant::now()));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let next_free = next_free.clone();
            tokio::spawn(async move {
                let handler = service_fn(move |req: Request<Incoming>| {
                    let next_free = next_free.clone();
                    async move {
                        let name = req.headers().get("x-request-name").cloned();
                        let _ = req.into_body().collect().await;
                        let now = Instant::now();
                        let wait = {
                            let mut next = next_free.lock().unwrap_or_else(|e| e.into_inner());
                            if *next <= now {
                                *next = now + Duration::from_secs(1);
                                None
                            } else {
                                Some(*next - now)
                            }
                        };
                        let response = match wait {
                            None => Response::new(Full::new(Bytes::from_static(
                                br#"{"type":"message","content":[{"type":"text","text":"hello"}]}"#,
                            ))),
                            Some(wait) => Response::builder()
                                .status(StatusCode::TOO_MANY_REQUESTS)
                                .header("retry-after-ms", wait.as_millis().to_string())
                                .header("retry-after", (wait.as_secs() + 1).to_string())
                                .header("x-should-retry", "true")
                                .body(Full::new(Bytes::from_static(
                                    br#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of requests has exceeded your per-minute rate limit"}}"#,
                                )))
                                .unwrap_or_default(),
                        };
                        let mut response = response;
                        if let Some(name) = name {
                            response.headers_mut().insert("x-request-name", name);
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A header's value as text, `?` when it is absent or not text.
fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
}

/// Prints an attempt as it leaves the retry layer (its retry count included).
fn print_attempt(started: Instant, req: &Request<ReplayBody<Full<Bytes>>>) {
    let retries = req
        .headers()
        .get(RETRY_COUNT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    println!(
        "{:>6.3}s  {}: attempt {} (retries so far: {retries})",
        started.elapsed().as_secs_f64(),
        header(req.headers(), "x-request-name"),
        retries + 1
    );
}

/// Prints an attempt's answer, with its `retry-after-ms` if any.
fn print_answer(started: Instant, resp: &Response<Incoming>) {
    let delay = resp
        .headers()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .map(|ms| format!(", retry-after-ms: {ms}"))
        .unwrap_or_default();
    println!(
        "{:>6.3}s  {}: <- {}{delay}",
        started.elapsed().as_secs_f64(),
        header(resp.headers(), "x-request-name"),
        resp.status()
    );
}

/// One named Messages request to the server at `addr`.
fn request(addr: SocketAddr, name: &str) -> Result<Request<Full<Bytes>>, http::Error> {
    Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v1/messages"))
        .header("content-type", "application/json")
        .header("x-request-name", name)
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#,
        )))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let addr = throttling_server().await?;
    println!("throttling server on http://{addr} (1 request/s)");
    let started = Instant::now();

    let layer = RetryAfterLayer::anthropic();
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        // Between the retry layer and the client: sees every attempt.
        .map_request(move |req: Request<ReplayBody<Full<Bytes>>>| {
            print_attempt(started, &req);
            req
        })
        .map_response(move |resp: Response<Incoming>| {
            print_answer(started, &resp);
            resp
        })
        .service(client);

    let requests = ["first", "second", "third", "fourth"].map(|name| {
        let service = service.clone();
        async move {
            let response = service.oneshot(request(addr, name)?).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((name, status, body))
        }
    });
    for outcome in futures_util::future::join_all(requests).await {
        match outcome {
            Ok((name, status, body)) => println!(
                "outcome  {name}: {status} {}",
                String::from_utf8_lossy(&body)
            ),
            Err(err) => println!("outcome  error: {err}"),
        }
    }
    println!(
        "done in {:.3}s; {:?}",
        started.elapsed().as_secs_f64(),
        layer.snapshot()
    );
    Ok(())
}
