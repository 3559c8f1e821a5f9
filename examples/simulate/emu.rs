//! TEMP stub for compile checks.
use std::sync::Arc;
use super::args::Args;
use super::report::{Charged, LimitSpec};
use super::run::{Client, Meter, Transport, Body, box_response};
use http::{Request, Response};
use http_body_util::Full;
use bytes::Bytes;
use tower::util::BoxCloneService;

pub struct Stats;
pub struct Estimates;
impl Estimates { pub fn mean_absolute_error(&self) -> Option<(f64, f64)> { None } }
pub fn limit_spec(a: &Args) -> LimitSpec {
    LimitSpec { requests_per_minute: a.rpm, input_tokens_per_minute: a.itpm, output_tokens_per_minute: a.otpm,
        requests_capacity: a.rpm as f64, input_capacity: a.itpm as f64, output_capacity: a.otpm as f64, output_mode: "realtime" }
}
pub fn transport(_a: &Args) -> (Transport, Arc<Stats>) {
    let svc = tower::service_fn(|_r: Request<Body>| async move {
        Ok::<_, tower_llm_limits::BoxError>(box_response(Response::new(Full::new(Bytes::from_static(b"{\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}")))))
    });
    (BoxCloneService::new(svc), Arc::new(Stats))
}
pub fn charged(_s: &Arc<Stats>) -> Charged { Charged::default() }
pub fn crate_stack(meter: Meter, a: &Args) -> (Client, Estimates) { (super::strategies::naive(meter, a.seed), Estimates) }
