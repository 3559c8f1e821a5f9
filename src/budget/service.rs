//! The [`TokenBudget`] service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::future::{check_model, ResponseFuture};
use super::snapshot::BudgetSnapshot;
use super::state::Shared;
use super::usage::ResponseBody;
use crate::body::{self, BufferedBytes, ReplayBody};
use crate::estimate::Estimated;
use crate::BoxError;

/// Paces requests to the limits of a token budget; built by
/// [`TokenBudgetLayer`](super::TokenBudgetLayer).
///
/// Every clone (and every service built by the same layer) shares one budget.
#[derive(Debug)]
pub struct TokenBudget<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for TokenBudget<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> TokenBudget<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the budget service, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The state of the budget this service shares with its clones.
    pub fn snapshot(&self) -> BudgetSnapshot {
        self.shared.snapshot()
    }
}

impl<S, B, ResB> Service<Request<B>> for TokenBudget<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResB: Body,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    /// Forwards the inner service's readiness: the budget cannot decide
    /// before it sees the request, so it decides in `call` (a request whose
    /// body an outer layer read: admitted at once, it is handed to the inner
    /// service there) or in the response future (a request that must wait,
    /// or whose body it reads first).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The service that was polled ready goes into the future; this one
        // keeps a clone (tower's documented pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        let (mut parts, body) = request.into_parts();
        crate::dispatch::Dispatch::received(&parts.extensions);
        let caller = match shared.caller(&parts) {
            Ok(caller) => caller,
            Err(refusal) => return ResponseFuture::refused(shared, refusal),
        };
        // An outer layer that holds the whole body put its bytes here:
        // estimate from them (or take the estimate it made with this
        // budget's own estimator) and pass the body through unread.
        let count_svc = shared.counter.as_ref().map(|_| self.inner.clone());
        let buffered = parts.extensions.get::<BufferedBytes>().map(|b| b.0.clone());
        let pre = parts.extensions.remove::<Estimated>();
        let estimate = buffered.as_ref().map(|b| match pre {
            Some(pre) if pre.made_by(&shared.estimator) => pre.into_estimate(),
            _ => shared.estimator.estimate(&parts, b),
        });
        match estimate {
            Some(estimate) => {
                if let Err(e) = check_model(&estimate) {
                    return ResponseFuture::failed(shared, e);
                }
                let charge = match shared.charge(caller.as_deref(), estimate) {
                    Ok(charge) => charge,
                    Err(refusal) => return ResponseFuture::refused(shared, refusal),
                };
                let request = Request::from_parts(parts, ReplayBody::passthrough(body));
                let count = (count_svc, buffered.filter(|_| shared.counter.is_some()));
                ResponseFuture::admitting(shared, charge, request, inner, count)
            }
            None => {
                let limit = shared.settings.buffer_limit;
                let fut = body::buffer(body, limit);
                ResponseFuture::buffering(shared, fut, parts, caller, inner, count_svc)
            }
        }
    }
}
