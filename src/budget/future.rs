//! The response future of [`TokenBudget`](super::TokenBudget).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::callers::CallerRefusal;
use super::count::{Counting, HttpResponse};
use super::enforce;
use super::prefix::{self, PrefixState, PrefixWait};
use super::state::{Admission, Charge, Refusal, Shared};
use super::usage::{ResponseBody, Tracker};
use crate::body::{Buffered, ReplayBody};
use crate::dispatch::Dispatch;
use crate::estimate::{Estimate, MAX_MODEL_LEN};
use crate::headers::{content_length, is_rate_limit_header, RateLimitSnapshot};
use crate::observe::{LayerKind, WaitEvent};
use crate::wait::{DeadlineReached, Wait};
use crate::wire::sse::is_event_stream;
use crate::{BoxError, Error};

/// The buffering of a request body: a named future, held inline.
pub(crate) type BufferFuture<B> = crate::body::Buffer<B>;

pin_project! {
    /// The future of a request going through the budget: it reads the body
    /// (unless an outer layer already did), estimates, waits for the budget
    /// (or fails at once), then calls the inner service and wraps its
    /// response for settlement.
    ///
    /// # Cancellation
    ///
    /// Dropped while waiting for the budget: the request gives back its place
    /// in line and nothing stays reserved (it was never sent); a reservation
    /// the ledger was still answering is refunded if it was admitted (the
    /// ledger operation is finished on the current tokio runtime). Dropped
    /// after the request was handed to the inner service: the charge is
    /// refunded in full if no byte of it left yet (it was still waiting in
    /// an inner layer of this crate: the concurrency queue, a retry wait),
    /// and kept otherwise, since the request may have reached the server.
    /// The same holds for an error of the inner service: refunded when the
    /// request never reached the transport (shed by the concurrency layer,
    /// refused by an inner budget) or the connection was refused
    /// (`io::ErrorKind::ConnectionRefused` anywhere in the error's sources),
    /// kept for any other error.
    ///
    /// # Errors
    ///
    /// [`Error::BudgetExceeded`] and [`Error::RequestTooLarge`] (unless the
    /// layer enforces, which answers 429 instead), [`Error::ModelTooLong`]
    /// (enforce mode answers 400 instead), [`Error::Body`], the inner
    /// service's own error, and a [`LedgerError`](super::ledger::LedgerError)
    /// when the ledger failed to answer a reservation: the request was not
    /// sent, nothing was debited for it, and its place in line went to the
    /// next waiter.
    ///
    /// # Panics
    ///
    /// Polling it again after it returned `Ready` panics, as most futures do:
    /// "`budget::ResponseFuture` polled after completion".
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
        S::Response: HttpResponse,
    {
        shared: Arc<Shared>,
        #[pin]
        state: State<S, S::Future, B, <S::Response as HttpResponse>::Body>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F, B, RB> {
        Buffering {
            fut: BufferFuture<B>,
            parts: Option<Parts>,
            caller: Option<String>,
            svc: Option<S>,
            count_svc: Option<S>,
        },
        Admitting {
            charge: Option<Charge>,
            admission: Admission,
            request: Option<Request<ReplayBody<B>>>,
            svc: Option<S>,
            // The wait for the budget, as the request's deadline bounds it.
            wait: Wait,
            // Cache-aware admission (see `prefix.rs`).
            prefix: PrefixWait,
            // The `count_tokens` mode (see `count.rs`).
            count: Counting<S, F, B, RB>,
        },
        Readying {
            held: Held,
            request: Option<Request<ReplayBody<B>>>,
            svc: Option<S>,
        },
        Calling {
            #[pin]
            fut: F,
            held: Held,
        },
        Failed {
            error: Option<BoxError>,
        },
        Refused {
            refusal: Option<CallerRefusal>,
        },
        Done,
    }
}

impl<S, F, B, RB> State<S, F, B, RB> {
    /// An estimated request, to be admitted by the budget.
    fn admitting(
        charge: Charge,
        request: Request<ReplayBody<B>>,
        svc: S,
        count: Counting<S, F, B, RB>,
    ) -> Self {
        State::Admitting {
            count,
            charge: Some(charge),
            admission: Admission::default(),
            wait: Wait::of(request.extensions()),
            prefix: PrefixWait::default(),
            request: Some(request),
            svc: Some(svc),
        }
    }
}

/// The charge of an admitted request until its answer: dropped with the
/// charge still inside (the caller gave up, or the inner service failed),
/// it refunds the charge in full if the request never reached the
/// transport (see [`Dispatch`]).
struct Held {
    shared: Arc<Shared>,
    charge: Option<Charge>,
    marker: Dispatch,
}

impl Held {
    /// Whether the request may have reached the server.
    fn sent(&self) -> bool {
        self.marker.sent()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(charge) = self.charge.take() {
            if self.marker.sent() {
                tracing::debug!(
                    key = super::callers::logged_key(charge.key()),
                    "budget: request dropped after it was sent; charge kept"
                );
                self.shared.lost(&charge);
            } else {
                self.shared.refund_unsent(&charge);
            }
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Response: HttpResponse,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Buffering { .. } => "buffering",
            State::Admitting { .. } => "admitting",
            State::Readying { .. } => "readying",
            State::Calling { .. } => "calling",
            State::Failed { .. } => "failed",
            State::Refused { .. } => "refused",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Response: HttpResponse,
{
    /// A request whose body must be read first (`count_svc`: a clone of the
    /// inner service for the `count_tokens` mode, if on).
    pub(crate) fn buffering(
        shared: Arc<Shared>,
        fut: BufferFuture<B>,
        parts: Parts,
        caller: Option<String>,
        svc: S,
        count_svc: Option<S>,
    ) -> Self {
        Self {
            shared,
            state: State::Buffering {
                fut,
                parts: Some(parts),
                caller,
                svc: Some(svc),
                count_svc,
            },
        }
    }

    /// A request refused before it was charged (see [`fail`]).
    pub(crate) fn failed(shared: Arc<Shared>, error: BoxError) -> Self {
        Self {
            shared,
            state: State::Failed { error: Some(error) },
        }
    }

    /// A request refused before any budget was touched (its caller is
    /// unknown or ambiguous).
    pub(crate) fn refused(shared: Arc<Shared>, refusal: CallerRefusal) -> Self {
        Self {
            shared,
            state: State::Refused {
                refusal: Some(refusal),
            },
        }
    }

    /// A request already estimated (`count`: the inner service clone and
    /// the body for the `count_tokens` mode, if on).
    pub(crate) fn admitting(
        shared: Arc<Shared>,
        charge: Charge,
        request: Request<ReplayBody<B>>,
        svc: S,
        count: (Option<S>, Option<Bytes>),
    ) -> Self {
        Self {
            shared,
            state: State::admitting(charge, request, svc, Counting::new(count.0, count.1)),
        }
    }
}

/// A future polled after it returned `Ready` (the only way to reach a state
/// whose parts were taken).
#[track_caller]
fn polled_after_completion() -> ! {
    panic!("`budget::ResponseFuture` polled after completion")
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
    ResB: Body,
{
    type Output = Result<Response<ResponseBody<ResB>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let shared: &Arc<Shared> = this.shared;
            match this.state.as_mut().project() {
                StateProj::Buffering {
                    fut,
                    parts,
                    caller,
                    svc,
                    count_svc,
                } => {
                    let buffered = ready!(Pin::new(fut).poll(cx));
                    let (Some(parts), Some(svc)) = (parts.take(), svc.take()) else {
                        polled_after_completion();
                    };
                    match estimated(shared, buffered, parts, caller.as_deref()) {
                        Ok((request, charge, body)) => {
                            let count = Counting::new(count_svc.take(), body);
                            this.state
                                .set(State::admitting(charge, request, svc, count))
                        }
                        Err(NotCharged::Error(e)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(fail(shared, e));
                        }
                        Err(NotCharged::Refused(refusal)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(caller_refused(shared, refusal));
                        }
                    }
                }
                StateProj::Failed { error } => {
                    let Some(e) = error.take() else {
                        polled_after_completion();
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(fail(shared, e));
                }
                StateProj::Admitting {
                    charge,
                    admission,
                    request,
                    svc,
                    wait,
                    prefix,
                    count,
                } => {
                    let Some(ch) = charge.as_mut() else {
                        polled_after_completion();
                    };
                    let counter = shared.counter.as_ref();
                    count.poll(counter, &*shared.estimator, ch, cx);
                    super::count::recheck_read(shared, ch, admission);
                    super::fleet::read_cached(shared, ch, admission);
                    let polled = match poll_prefix(shared, ch, prefix, cx) {
                        Poll::Ready(()) => {
                            let writing = prefix::refresh(shared, ch, cx);
                            let counting_first =
                                ch.input_capped && ch.counted.is_none() && count.in_flight();
                            if counting_first || hold_in_line(shared, prefix, writing, cx) {
                                Poll::Pending
                            } else {
                                shared.poll_admit(ch, admission, cx)
                            }
                        }
                        Poll::Pending => Poll::Pending,
                    };
                    let admitted = match polled {
                        Poll::Ready(admitted) => {
                            waited(shared, wait);
                            admitted
                        }
                        Poll::Pending => {
                            if count.start(counter, ch, request.as_ref()) {
                                // Polled next, while the request waits.
                                continue;
                            }
                            if admission.waits_at_head() {
                                count.retry_when_free(counter, ch, cx);
                            }
                            if let PrefixWait::Candidate(slot) = prefix {
                                // It would wait anyway: out of line, it waits
                                // for the writer's response head instead.
                                *admission = Admission::default();
                                *prefix = PrefixWait::Holding(Arc::clone(slot), None);
                                continue;
                            }
                            let reached = ready!(wait_deadline(shared, wait, cx));
                            // Not sent: dropping the admission gives back
                            // the place in line; nothing was debited.
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Box::new(reached)));
                        }
                    };
                    match admitted {
                        Ok(()) => {
                            ch.writing = shared.writers.start(&ch.estimate.cache_writes);
                            let mut request = request.take();
                            let marker = mark(request.as_mut());
                            let next = State::Readying {
                                held: Held {
                                    shared: Arc::clone(shared),
                                    charge: charge.take(),
                                    marker,
                                },
                                request,
                                svc: svc.take(),
                            };
                            this.state.set(next);
                        }
                        Err(refusal) => {
                            let charge = charge.take();
                            this.state.set(State::Done);
                            return Poll::Ready(refuse(shared, charge, refusal));
                        }
                    }
                }
                StateProj::Readying { held, request, svc } => {
                    match ready!(poll_send(held, request, svc, cx)) {
                        Ok((fut, held)) => this.state.set(State::Calling { fut, held }),
                        Err(e) => {
                            // Not sent: dropping `held` gives the reservation back.
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                StateProj::Calling { fut, held } => {
                    let result = ready!(fut.poll(cx));
                    let sent = held.sent();
                    let charge = held.charge.take();
                    this.state.set(State::Done);
                    let Some(charge) = charge else {
                        polled_after_completion();
                    };
                    return Poll::Ready(finished(shared, charge, sent, result));
                }
                StateProj::Refused { refusal } => {
                    let Some(refusal) = refusal.take() else {
                        polled_after_completion();
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(caller_refused(shared, refusal));
                }
                StateProj::Done => polled_after_completion(),
            }
        }
    }
}

/// Whether a request waiting in line holds before asking, keeping its
/// place: a longer prefix of it is being written (`writing`, from
/// `prefix::refresh`, which also wakes it when that write begins), and the
/// budget's cache hold bounds the hold (once per request).
fn hold_in_line(
    shared: &Shared,
    state: &mut PrefixWait,
    writing: bool,
    cx: &mut Context<'_>,
) -> bool {
    if writing && matches!(state, PrefixWait::Done) {
        if let Some(bound) = cache_hold_bound(shared) {
            *state = PrefixWait::InLine(bound);
        }
    }
    let PrefixWait::InLine(bound) = state else {
        return false;
    };
    if !writing {
        // The write began (and was read) or failed.
        *state = PrefixWait::Done;
        return false;
    }
    if bound.as_mut().poll(cx).is_ready() {
        *state = PrefixWait::HeldToBound;
        return false;
    }
    true
}

/// The timer bounding a hold for a prefix being written: the budget's cache
/// hold (none when it is zero).
fn cache_hold_bound(shared: &Shared) -> Option<Pin<Box<tokio::time::Sleep>>> {
    let hold = shared.settings.cache_hold;
    (!hold.is_zero()).then(|| Box::pin(tokio::time::sleep(hold)))
}

/// Cache-aware admission before asking the budget (see `prefix.rs`):
/// `Pending` while the request holds for a writer's response head.
fn poll_prefix(
    shared: &Shared,
    charge: &mut Charge,
    state: &mut PrefixWait,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let (slot, holding) = match state {
        PrefixWait::Done
        | PrefixWait::InLine(_)
        | PrefixWait::HeldToBound
        | PrefixWait::Candidate(_) => return Poll::Ready(()),
        PrefixWait::Unchecked if !prefix::applies(charge) => {
            *state = PrefixWait::Done;
            return Poll::Ready(());
        }
        PrefixWait::Unchecked => (prefix::Slot::default(), false),
        PrefixWait::Holding(slot, _) => (Arc::clone(slot), true),
    };
    match shared
        .writers
        .poll(&charge.estimate.cache_pending, cx, &slot)
    {
        // Only a request that held for the write reads it here; one that
        // arrives after the writer's head is left to the estimator, which
        // counts a prefix as a read once a response confirmed the write (a
        // head alone does not say the server cached it).
        PrefixState::Readable(read) if holding => {
            prefix::read_prefix(charge, read);
            *state = PrefixWait::Done;
        }
        PrefixState::Readable(_) => *state = PrefixWait::Done,
        PrefixState::Unwritten => *state = PrefixWait::Done,
        PrefixState::Writing if holding => {
            let PrefixWait::Holding(_, Some(bound)) = state else {
                return Poll::Pending;
            };
            if bound.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Held as long as a request that could go may: it goes now,
            // charged in full (a read still counts if the write begins
            // while it waits in line: `prefix::refresh`).
            *state = PrefixWait::HeldToBound;
        }
        PrefixState::Writing => match cache_hold_bound(shared) {
            // It may fit now, but sent now it pays the prefix again: it
            // holds for the write, at most the budget's cache hold.
            Some(mut bound) => {
                if bound.as_mut().poll(cx).is_ready() {
                    *state = PrefixWait::Done;
                } else {
                    *state = PrefixWait::Holding(slot, Some(bound));
                    return Poll::Pending;
                }
            }
            None => *state = PrefixWait::Candidate(slot),
        },
    }
    Poll::Ready(())
}

/// A request stopped waiting for the budget: the wait goes into its
/// [`WaitLog`](crate::wait::WaitLog) and to `on_wait`.
fn waited(shared: &Shared, wait: &mut Wait) {
    if let Some(started) = wait.started() {
        wait.finish();
        shared.settings.hooks.wait(WaitEvent {
            layer: LayerKind::Budget,
            waited: started.elapsed(),
            deadline_reached: false,
        });
    }
}

/// The budget said `Pending`: whether the request's deadline passed.
fn wait_deadline(shared: &Shared, wait: &mut Wait, cx: &mut Context<'_>) -> Poll<DeadlineReached> {
    let started = wait.started();
    let reached = ready!(wait.poll_deadline(cx));
    let waited = started.map(|s| s.elapsed()).unwrap_or_default();
    tracing::debug!(
        waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
        "budget: the request's deadline passed while it waited; not sent"
    );
    shared.settings.hooks.deadline(LayerKind::Budget, waited);
    Poll::Ready(reached)
}

/// Puts a fresh [`Dispatch`] marker on the request about to be passed on
/// (chained to an outer budget's), and returns it.
fn mark<B>(request: Option<&mut Request<B>>) -> Dispatch {
    let Some(request) = request else {
        return Dispatch::new(None);
    };
    Dispatch::mark(request.extensions_mut())
}

/// A caller refused before any budget was touched: its 401 or 400 in the
/// API's error shape in enforce mode, the refusal as an error otherwise.
fn caller_refused<ResB>(
    shared: &Shared,
    refusal: CallerRefusal,
) -> Result<Response<ResponseBody<ResB>>, BoxError> {
    if shared.settings.enforce {
        Ok(refusal.into_response().map(ResponseBody::full))
    } else {
        Err(Box::new(refusal))
    }
}

/// The inner service's answer: a response wrapped for settlement, or its
/// error. On an error the charge is refunded in full when the request never
/// reached the transport (`sent` false: shed, cancelled or refused by an
/// inner layer) or the connection was refused (no byte of it left); it is
/// kept otherwise, since the request may have reached the server.
fn finished<ResB: Body, E: Into<BoxError>>(
    shared: &Arc<Shared>,
    charge: Charge,
    sent: bool,
    result: Result<Response<ResB>, E>,
) -> Result<Response<ResponseBody<ResB>>, BoxError> {
    match result {
        Ok(response) => Ok(respond(shared, charge, response)),
        Err(e) => {
            let e = e.into();
            if !sent || connection_refused(&*e) {
                shared.refund_unsent(&charge);
            } else {
                tracing::debug!(
                    key = super::callers::logged_key(charge.key()),
                    "budget: inner service failed; charge kept"
                );
                shared.lost(&charge);
            }
            Err(e)
        }
    }
}

/// Whether an error (or one of its sources, or an error an `io::Error`
/// wraps) is an I/O `ConnectionRefused`: the connection was never made, so
/// no byte of the request left.
fn connection_refused(err: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(err), |e| e.source()).any(|e| {
        let Some(io) = e.downcast_ref::<std::io::Error>() else {
            return false;
        };
        // `io::Error::source` skips the error it wraps: look at it too.
        io.kind() == std::io::ErrorKind::ConnectionRefused
            || io.get_ref().is_some_and(|inner| connection_refused(inner))
    })
}

/// Hands an admitted request to the inner service once it is ready again
/// (normally at once: `poll_ready` said so before `call`; asked again because
/// the wait for the budget may have been long).
fn poll_send<S, B>(
    held: &mut Held,
    request: &mut Option<Request<ReplayBody<B>>>,
    svc: &mut Option<S>,
    cx: &mut Context<'_>,
) -> Poll<Result<(S::Future, Held), BoxError>>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Error: Into<BoxError>,
{
    let Some(service) = svc.as_mut() else {
        polled_after_completion();
    };
    if let Err(e) = ready!(service.poll_ready(cx)) {
        return Poll::Ready(Err(e.into()));
    }
    let (Some(request), Some(mut service), Some(charge)) =
        (request.take(), svc.take(), held.charge.take())
    else {
        polled_after_completion();
    };
    let marker = held.marker.clone();
    let future = Dispatch::pass(Some(&marker), || service.call(request));
    let held = Held {
        shared: Arc::clone(&held.shared),
        charge: Some(charge),
        marker,
    };
    Poll::Ready(Ok((future, held)))
}

/// A read request rebuilt around its body, its charge, and its bytes when
/// the `count_tokens` mode may count it.
type Estimated<B> = (Request<ReplayBody<B>>, Charge, Option<Bytes>);

/// The request rebuilt around its read body, and its charge from the estimate.
fn estimated<B>(
    shared: &Shared,
    buffered: Result<Buffered<B>, BoxError>,
    parts: Parts,
    caller: Option<&str>,
) -> Result<Estimated<B>, NotCharged>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let (request, estimate, bytes) = match buffered {
        Err(e) => return Err(NotCharged::Error(Box::new(Error::Body(e)))),
        Ok(Buffered::Complete(body)) => {
            let estimate = shared.estimator.estimate(&parts, body.bytes());
            let bytes = shared.counter.as_ref().map(|_| body.bytes().clone());
            (Request::from_parts(parts, body.replay()), estimate, bytes)
        }
        Ok(Buffered::TooLarge(body)) => {
            let len = content_length(&parts.headers).or(body.size_hint().exact());
            let estimate = shared.estimator.estimate_unbuffered(&parts, len);
            (Request::from_parts(parts, body), estimate, None)
        }
    };
    check_model(&estimate).map_err(NotCharged::Error)?;
    let charge = shared
        .charge(caller, estimate)
        .map_err(NotCharged::Refused)?;
    Ok((request, charge, bytes))
}

/// Refuses a request whose `model` is longer than any model name, before it
/// is charged (so that no state is kept for it). A valid one names the
/// request's tracing span.
pub(crate) fn check_model(estimate: &Estimate) -> Result<(), BoxError> {
    match estimate.model.as_deref() {
        Some(m) if m.len() <= MAX_MODEL_LEN => {
            crate::observe::record_span("model", m);
            Ok(())
        }
        Some(m) if m.len() > MAX_MODEL_LEN => {
            tracing::debug!(
                len = m.len(),
                "budget: model name too long; request refused"
            );
            Err(Box::new(Error::ModelTooLong { len: m.len() }))
        }
        _ => Ok(()),
    }
}

/// The answer to a request that failed before it was charged: its error, or
/// in enforce mode a 400 `invalid_request_error` for an invalid request.
fn fail<ResB>(shared: &Shared, e: BoxError) -> Result<Response<ResponseBody<ResB>>, BoxError> {
    match e.downcast_ref::<Error>() {
        Some(invalid @ Error::ModelTooLong { .. }) if shared.settings.enforce => {
            Ok(enforce::invalid_request(&format!("model: {invalid}")))
        }
        _ => Err(e),
    }
}

/// Why a buffered request was not charged.
enum NotCharged {
    /// Its body could not be read.
    Error(BoxError),
    /// Its key is new and the budget holds its most keys.
    Refused(CallerRefusal),
}

/// The answer to a request not admitted: the ledger's error; or the
/// decision, as an error, or as a 429 in enforce mode.
fn refuse<ResB>(
    shared: &Shared,
    charge: Option<Charge>,
    refusal: Refusal,
) -> Result<Response<ResponseBody<ResB>>, BoxError> {
    let denied = match refusal {
        Refusal::Ledger(e) => return Err(Box::new(e)),
        Refusal::Denied(denied) => denied,
    };
    let error = Error::from(denied);
    shared.settings.hooks.reject(LayerKind::Budget, &error);
    match charge {
        Some(charge) if shared.settings.enforce => Ok(enforce::reject(shared, &charge, denied)),
        _ => Err(Box::new(error)),
    }
}

/// Whether the server turned the request away without doing the work, and so
/// charged nothing: 429 (a limit), 529 (`overloaded_error`) and 503. The
/// API's documentation leaves open whether an overloaded answer draws down a
/// bucket; the emulator charges nothing for it, and keeping the charge would waste a
/// whole request's tokens per 529 (measured against the crate's emulator of
/// the API with 2% 529s and 1% 500s, keeping it cost 12% of the throughput). Other 5xx keep the charge:
/// the work may have been done.
fn refused(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 503 | 529)
}

/// Handles the response head: refund and sync on a refusal (429, 529, 503), sync from the headers
/// otherwise (client mode), write the caller's headers (enforce mode), and
/// wrap the body for settlement.
fn respond<ResB: Body>(
    shared: &Arc<Shared>,
    mut charge: Charge,
    response: Response<ResB>,
) -> Response<ResponseBody<ResB>> {
    let status = response.status();
    let sse = is_event_stream(response.headers()).unwrap_or(charge.estimate.stream);
    if !status.is_success() {
        // Nothing written: requests waiting for it go, charged in full.
        charge.writing = None;
    }
    let was_refused = refused(status);
    if was_refused {
        // The server charged nothing for a refused request.
        shared.refund(&charge);
    }
    let (mut parts, body) = response.into_parts();
    let mut held_sync = None;
    if shared.settings.enforce {
        enforce::insert_headers(shared, &charge, &mut parts.headers);
    } else if parts.headers.keys().any(is_rate_limit_header) {
        let snapshot = RateLimitSnapshot::from_headers(&parts.headers);
        // A body to settle: the sync may go with its settlement.
        held_sync = shared.sync(&charge, &snapshot, !was_refused);
    }
    if was_refused {
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            status = status.as_u16(),
            "budget: request refused; reservation refunded"
        );
        return Response::from_parts(parts, ResponseBody::plain(body));
    }
    let mut tracker = Tracker::new(Arc::clone(shared), charge, sse, !status.is_success());
    tracker.hold_sync(held_sync);
    if body.is_end_stream() {
        // An empty body may never be polled: settle now.
        tracker.conclude_empty();
        return Response::from_parts(parts, ResponseBody::plain(body));
    }
    Response::from_parts(parts, ResponseBody::observed(body, tracker))
}
