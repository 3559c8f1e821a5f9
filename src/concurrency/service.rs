use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::ResponseFuture;
use super::semaphore::{Shared, Ticket};
use super::{Priority, Snapshot};
use crate::dispatch::Dispatch;
use crate::observe::LayerKind;
use crate::{BoxError, Error};

/// Caps the requests in flight to the inner service; built by
/// [`ConcurrencyLayer`](super::ConcurrencyLayer).
///
/// `poll_ready` only asks the inner service; the wait for a slot happens in the
/// [`ResponseFuture`], where the request's [`Priority`] is known. The service
/// itself never holds a slot, so a service that is only kept around (or a
/// clone) holds nothing. See the [module docs](super) for why.
pub struct Concurrency<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Concurrency<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Concurrency { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming the wrapper.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The current limit, requests in flight and waiting, and the adaptive
    /// counters, shared with every clone and with the layer.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }
}

/// Written by hand as tower's `ConcurrencyLimit` is: a clone shares the cap and
/// starts without any slot (this service never holds one).
impl<S: Clone> Clone for Concurrency<S> {
    fn clone(&self) -> Self {
        Concurrency {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Concurrency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Concurrency")
            .field("inner", &self.inner)
            .field("snapshot", &self.shared.snapshot())
            .finish()
    }
}

impl<S, B, R> Service<Request<B>> for Concurrency<S>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    R: http_body::Body,
{
    type Response = Response<super::ConcurrencyBody<R>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    /// Admit the request at once if a slot is free and nobody waits; else take
    /// its place in line now (so the order is the order of `call`) and wait in
    /// the returned future, or shed it if the queue is full.
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let priority = req
            .extensions()
            .get::<Priority>()
            .copied()
            .unwrap_or_default();
        let marker = Dispatch::receive(req.extensions());
        crate::observe::record_span("lane", priority.as_str());
        match self.shared.enqueue(priority) {
            Ticket::Admitted(permit) => {
                // Marked passing around the call (nothing to mark with no
                // budget outside); the request goes to it directly.
                Dispatch::passing(marker.as_ref());
                let future = self.inner.call(req);
                Dispatch::passed(marker.as_ref());
                ResponseFuture::called(future, permit)
            }
            Ticket::Queued(waiter) => {
                // The ready service goes with the request; this one starts over.
                let fresh = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, fresh);
                ResponseFuture::waiting(waiter, ready, req)
            }
            Ticket::Shed { waiting } => {
                if let Some(hooks) = self.shared.hooks() {
                    hooks.reject(LayerKind::Concurrency, &Error::Overloaded { waiting });
                }
                ResponseFuture::shed(waiting)
            }
        }
    }
}
