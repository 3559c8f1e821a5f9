use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::adaptive::{Outcome, Signal};
use super::semaphore::{Permit, Waiter};
use crate::dispatch::Dispatch;
use crate::observe::{Hooks, LayerKind, WaitEvent};
use crate::wait::{DeadlineReached, Parked, Wait};
use crate::{BoxError, Error};

pin_project! {
    /// The response future of [`Concurrency`](super::Concurrency): waits for a
    /// slot (if the request had to queue), calls the inner service, and wraps the
    /// response body so that the slot is held until the body ends.
    ///
    /// # Cancellation
    ///
    /// Dropping it while waiting gives back its place in line (or the slot a
    /// release had just handed to it, which goes to the next waiter); dropping it
    /// while the inner call runs frees the slot. Nothing is leaked either way.
    ///
    /// # Errors
    ///
    /// [`Error::Overloaded`](crate::Error::Overloaded) (boxed) if the wait queue
    /// was full when the request was called; otherwise the inner service's error,
    /// boxed as it is.
    ///
    /// # Panics
    ///
    /// Polling it again after it returned `Ready` panics with
    /// "`concurrency::ResponseFuture` polled after completion", as tower's
    /// and futures-util's futures do.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Waiting {
            waiter: Waiter,
            // Boxed: only queued requests pay for carrying the service and the
            // request, and the future stays small on the fast path.
            call: Option<Call<S, B>>,
        },
        Called {
            #[pin]
            future: S::Future,
            permit: Option<Permit>,
            started: Option<Instant>,
        },
        Shed {
            waiting: usize,
        },
        Done,
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(future: S::Future, permit: Permit) -> Self {
        // Only a latency tolerance reads the start time: else skip the clock.
        let started = permit.is_timed().then(Instant::now);
        ResponseFuture {
            state: State::Called {
                future,
                permit: Some(permit),
                started,
            },
        }
    }

    pub(crate) fn waiting(waiter: Waiter, service: S, request: Request<B>) -> Self {
        let wait = Wait::of(request.extensions());
        // Under a retry layer whose copy of the head is the same, the
        // request waits without its head: a waiting request carries one.
        let request = match wait.log() {
            Some(log) => Parked::park(request, log),
            None => Err(request),
        };
        let call = match request {
            Ok(parked) => Call::Parked(Box::new(Queued::new(service, parked, wait))),
            Err(request) => Call::Whole(Box::new(Queued::new(service, request, wait))),
        };
        ResponseFuture {
            state: State::Waiting {
                waiter,
                call: Some(call),
            },
        }
    }

    pub(crate) fn shed(waiting: usize) -> Self {
        ResponseFuture {
            state: State::Shed { waiting },
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } => "waiting",
            State::Called { .. } => "called",
            State::Shed { .. } => "shed",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B, R> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    R: Body,
{
    type Output = Result<Response<ConcurrencyBody<R>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Waiting { waiter, call } => {
                    let permit = match waiter.poll_acquire(cx) {
                        Poll::Ready(permit) => permit,
                        Poll::Pending => {
                            let Some(queued) = call.as_mut() else {
                                return Poll::Pending;
                            };
                            let reached = ready!(queued.poll_deadline(waiter.hooks(), cx));
                            // Not sent: dropping the waiter gives back the
                            // place in line (or the slot just handed to it).
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Box::new(reached)));
                        }
                    };
                    // Not sent if it fails: the slot goes back with the permit.
                    let hooks = waiter.hooks();
                    let future = match call.take().map(|call| call.dispatch(hooks)) {
                        Some(Ok(future)) => future,
                        Some(Err(e)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                        None => {
                            // Unreachable: taken only here, right before leaving this state.
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Error::Overloaded { waiting: 0 }.into()));
                        }
                    };
                    let started = permit.is_timed().then(Instant::now);
                    this.state.set(State::Called {
                        future,
                        permit: Some(permit),
                        started,
                    });
                }
                StateProj::Called {
                    future,
                    permit,
                    started,
                } => {
                    let result = ready!(future.poll(cx));
                    let permit = permit.take();
                    let started = *started;
                    this.state.set(State::Done);
                    return Poll::Ready(match result {
                        Ok(response) => Ok(on_response(response, permit, started)),
                        Err(err) => {
                            let err: BoxError = err.into();
                            if let Some(p) = permit.as_ref().filter(|p| p.is_adaptive()) {
                                let outcome = if p.is_timeout(&*err) {
                                    Outcome::Dropped(Signal::Timeout)
                                } else {
                                    Outcome::Neutral
                                };
                                p.observe(outcome);
                            }
                            // `permit` drops here: the slot is free.
                            Err(err)
                        }
                    });
                }
                StateProj::Shed { waiting } => {
                    let waiting = *waiting;
                    this.state.set(State::Done);
                    return Poll::Ready(Err(Error::Overloaded { waiting }.into()));
                }
                StateProj::Done => panic!("`concurrency::ResponseFuture` polled after completion"),
            }
        }
    }
}

/// A queued request, boxed: whole, or parked without its head under a
/// retry layer whose copy of it stands for it (see [`Parked`]).
enum Call<S, B> {
    Whole(Box<Queued<S, Request<B>>>),
    Parked(Box<Queued<S, Parked<B>>>),
}

impl<S, B> Call<S, B>
where
    S: Service<Request<B>>,
{
    fn poll_deadline(
        &mut self,
        hooks: Option<&Hooks>,
        cx: &mut Context<'_>,
    ) -> Poll<DeadlineReached> {
        match self {
            Call::Whole(queued) => queued.poll_deadline(hooks, cx),
            Call::Parked(queued) => queued.poll_deadline(hooks, cx),
        }
    }

    /// The request got its slot: it is passed on (its head made again
    /// from the retry layer's copy if it was parked).
    fn dispatch(self, hooks: Option<&Hooks>) -> Result<S::Future, BoxError> {
        match self {
            Call::Whole(queued) => {
                let (request, mut queued) = (*queued).split();
                Ok(queued.dispatch(request, hooks))
            }
            Call::Parked(queued) => {
                let (parked, mut queued) = (*queued).split();
                match parked.unpark() {
                    Some(request) => Ok(queued.dispatch(request, hooks)),
                    None => Err(Box::new(Error::NotReplayable {
                        status: None,
                        source: None,
                    })),
                }
            }
        }
    }
}

/// A queued request (`R`: whole or [`Parked`]): what it needs once it gets
/// a slot, and its wait.
struct Queued<S, R> {
    service: S,
    request: R,
    wait: Wait,
}

impl<S, R> Queued<S, R> {
    fn new(service: S, request: R, wait: Wait) -> Self {
        Queued {
            service,
            request,
            wait,
        }
    }

    /// The request, and the rest.
    fn split(self) -> (R, Queued<S, ()>) {
        let Queued {
            service,
            request,
            wait,
        } = self;
        (request, Queued::new(service, (), wait))
    }

    /// The request got its slot: its wait ends, and `request` (this one's)
    /// is passed on.
    fn dispatch<B>(&mut self, request: Request<B>, hooks: Option<&Hooks>) -> S::Future
    where
        S: Service<Request<B>>,
    {
        waited(&mut self.wait, hooks);
        let marker = Dispatch::of(request.extensions());
        Dispatch::passing(marker.as_ref());
        let future = self.service.call(request);
        Dispatch::passed(marker.as_ref());
        future
    }

    /// The queue said `Pending`: whether the request's deadline passed.
    fn poll_deadline(
        &mut self,
        hooks: Option<&Hooks>,
        cx: &mut Context<'_>,
    ) -> Poll<DeadlineReached> {
        let started = self.wait.started();
        let reached = ready!(self.wait.poll_deadline(cx));
        let waited = started.map(|s| s.elapsed()).unwrap_or_default();
        tracing::debug!(
            waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            "concurrency: the request's deadline passed while it queued; not sent"
        );
        if let Some(hooks) = hooks {
            hooks.deadline(LayerKind::Concurrency, waited);
        }
        Poll::Ready(reached)
    }
}

/// A queued request got its slot: the wait goes into its log and to `on_wait`.
fn waited(wait: &mut Wait, hooks: Option<&Hooks>) {
    let started = wait.started();
    wait.finish();
    if let (Some(hooks), Some(started)) = (hooks, started) {
        hooks.wait(WaitEvent {
            layer: LayerKind::Concurrency,
            waited: started.elapsed(),
            deadline_reached: false,
        });
    }
}

fn on_response<R: Body>(
    response: Response<R>,
    permit: Option<Permit>,
    started: Option<Instant>,
) -> Response<ConcurrencyBody<R>> {
    if let Some(p) = permit.as_ref().filter(|p| p.is_adaptive()) {
        let outcome = match response.status().as_u16() {
            code @ (429 | 503 | 529) => Outcome::Dropped(Signal::Status(code)),
            _ => Outcome::Success {
                head_latency: started
                    .map(|t| Instant::now().saturating_duration_since(t))
                    .unwrap_or_default(),
            },
        };
        p.observe(outcome);
    }
    response.map(|body| ConcurrencyBody::new(body, permit))
}

pin_project! {
    /// A response body that holds its request's concurrency slot until the body
    /// ends: its last frame, an error, or being dropped.
    ///
    /// Frames, trailers, errors, [`size_hint`](Body::size_hint) and
    /// [`is_end_stream`](Body::is_end_stream) pass through unchanged.
    ///
    /// # Cancellation
    ///
    /// Dropping the body mid-stream frees the slot.
    pub struct ConcurrencyBody<B> {
        #[pin]
        inner: B,
        permit: Option<Permit>,
    }
}

impl<B: Body> ConcurrencyBody<B> {
    fn new(inner: B, permit: Option<Permit>) -> Self {
        // An empty body (or one already at its end) holds nothing.
        let permit = if inner.is_end_stream() { None } else { permit };
        ConcurrencyBody { inner, permit }
    }
}

impl<B> ConcurrencyBody<B> {
    /// Whether this body still holds a slot.
    pub fn holds_slot(&self) -> bool {
        self.permit.is_some()
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The wrapped body, consuming the wrapper (which frees the slot).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> fmt::Debug for ConcurrencyBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyBody")
            .field("holds_slot", &self.permit.is_some())
            .finish()
    }
}

impl<B: Body> Body for ConcurrencyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(_)) if !this.inner.is_end_stream() => {}
            // The end, or an error: the upstream is done with this request.
            _ => drop(this.permit.take()),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use std::convert::Infallible;

    type Transport = tower::util::ServiceFn<
        fn(Request<Body>) -> std::future::Pending<Result<Response<Full<Bytes>>, Infallible>>,
    >;
    /// The body the preset's concurrency layer holds.
    type Body = crate::body::ReplayBody<crate::body::ReplayBody<Full<Bytes>>>;

    /// Every request waiting for a slot holds its entry: a guard against it
    /// growing unnoticed. With this transport (a function pointer, 8
    /// bytes) it was 336 bytes while it held the request whole (under a
    /// retry layer whose copy of the head was lent) and the layer's
    /// callbacks; 120 parked on the copy, the callbacks in the layer's
    /// shared state.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_parked_requests_entry_stays_small() {
        let parked = std::mem::size_of::<Queued<Transport, Parked<Body>>>();
        assert!(parked <= 120, "a parked request's entry is {parked} bytes");
        let whole = std::mem::size_of::<Queued<Transport, Request<Body>>>();
        assert!(whole <= 328, "a whole request's entry is {whole} bytes");
        // The future that holds either stays as small as it was.
        let future = std::mem::size_of::<ResponseFuture<Transport, Body>>();
        assert!(
            future <= 48,
            "concurrency::ResponseFuture is {future} bytes"
        );
    }
}
