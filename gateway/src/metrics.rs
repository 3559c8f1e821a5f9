//! `GET /metrics`: Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use super::App;

/// Answers served, per caller and status.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    served: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Metrics {
    pub(crate) fn served(&self, caller: &str, status: StatusCode) {
        let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
        *served
            .entry((caller.to_string(), status.as_u16()))
            .or_default() += 1;
    }
}

/// One open connection, counted in the gauge while it lives.
pub(crate) struct Open(Arc<AtomicU64>);

impl Open {
    pub(crate) fn new(gauge: &Arc<AtomicU64>) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Open(Arc::clone(gauge))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads one figure of an upstream's snapshot.
type Reading = fn(&tower_llm_limits::pool::UpstreamSnapshot) -> u64;

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(crate) async fn render(State(app): State<Arc<App>>) -> Response {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP llm_gateway_requests_total Answers served, per caller and status (429: over the caller's budget).");
    let _ = writeln!(out, "# TYPE llm_gateway_requests_total counter");
    {
        let served = app
            .metrics
            .served
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for ((caller, status), n) in served.iter() {
            let _ = writeln!(
                out,
                "llm_gateway_requests_total{{caller=\"{}\",status=\"{status}\"}} {n}",
                label(caller)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP llm_gateway_connections_open Client connections open now."
    );
    let _ = writeln!(out, "# TYPE llm_gateway_connections_open gauge");
    let _ = writeln!(
        out,
        "llm_gateway_connections_open {}",
        app.connections.load(Ordering::Relaxed)
    );
    let snap = app.pool.snapshot();
    let _ = writeln!(out, "# TYPE llm_gateway_failovers_total counter");
    let _ = writeln!(out, "llm_gateway_failovers_total {}", snap.failovers);
    let per_upstream: [(&str, &str, Reading); 7] = [
        ("llm_gateway_upstream_attempts_total", "counter", |u| {
            u.routed
        }),
        ("llm_gateway_upstream_received_429_total", "counter", |u| {
            u.received_429
        }),
        ("llm_gateway_upstream_received_529_total", "counter", |u| {
            u.received_529
        }),
        ("llm_gateway_upstream_failovers_total", "counter", |u| {
            u.failovers
        }),
        ("llm_gateway_upstream_queue_waits_total", "counter", |u| {
            u.budget.waited
        }),
        ("llm_gateway_upstream_drains_total", "counter", |u| u.drains),
        ("llm_gateway_upstream_drained", "gauge", |u| {
            u64::from(u.drained.is_some())
        }),
    ];
    for (name, kind, get) in per_upstream {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for u in &snap.upstreams {
            let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {}", label(&u.name), get(u));
        }
    }
    let _ = writeln!(out, "# HELP llm_gateway_upstream_admitted_total Admitted by each upstream's budget, per dimension (tokens as estimated at admission).");
    let _ = writeln!(out, "# TYPE llm_gateway_upstream_admitted_total counter");
    for u in &snap.upstreams {
        let a = u.admitted;
        for (dim, v) in [
            ("requests", a.requests),
            ("input_tokens", a.input_tokens),
            ("output_tokens", a.output_tokens),
        ] {
            let _ = writeln!(
                out,
                "llm_gateway_upstream_admitted_total{{upstream=\"{}\",dimension=\"{dim}\"}} {v}",
                label(&u.name)
            );
        }
    }
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out,
    )
        .into_response()
}
