//! The retrying service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::ResponseFuture;
use super::snapshot::{Counters, RetrySnapshot, Shared};
use crate::body::ReplayBody;
use crate::BoxError;

/// Retries requests that failed transiently, honouring the server's delays.
///
/// Built by [`RetryAfterLayer`](super::RetryAfterLayer); see the [module docs](super) for the rules.
/// Its inner service receives `Request<ReplayBody<B>>`; attempts after the
/// first carry the [`RETRY_COUNT`](super::RETRY_COUNT) header, and attempts
/// whose body was buffered carry the
/// [`BufferedBytes`](crate::body::BufferedBytes) extension.
///
/// Clones share the layer's cooldown, budget and counters.
///
/// # Bounds
///
/// The request body `B` must be `Unpin + Send + 'static` (hyper's `Incoming`,
/// `http_body_util::Full`, axum's `Body` all are; wrap any other in
/// `Pin<Box<B>>`, itself a body). The response body must be a body, so that
/// the error body of a 429 can be read for the spend-cap code.
#[derive(Debug, Clone)]
pub struct RetryAfter<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> RetryAfter<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        RetryAfter { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Counters and the state of the shared cooldown and budget (the same as
    /// the layer's).
    pub fn snapshot(&self) -> RetrySnapshot {
        self.shared.snapshot()
    }

    /// Ends the shared cooldown now, as
    /// [`RetryAfterLayer::reset_cooldown`](super::RetryAfterLayer::reset_cooldown) does.
    pub fn reset_cooldown(&self) {
        self.shared.cooldown.reset();
    }
}

impl<S, B, R> Service<Request<B>> for RetryAfter<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    R: http_body::Body,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    /// Starts the request. The returned future buffers the body, waits out the
    /// shared cooldown, then makes attempts with the service that was ready.
    ///
    /// # Cancellation
    ///
    /// Dropping the future stops everything: no task is spawned.
    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The ready service goes into the future; a fresh clone stays (tower's pattern).
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        Counters::bump(&self.shared.counters.requests);
        crate::dispatch::Dispatch::received(req.extensions());
        ResponseFuture::new(service, self.shared.clone(), req)
    }
}
