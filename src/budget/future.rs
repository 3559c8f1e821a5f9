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
use super::count::{Counting, HeadRef, HttpResponse};
use super::enforce;
use super::prefix::{self, PrefixState, PrefixWait};
use super::state::{Admission, Charge, Refusal, Shared};
use super::usage::{ResponseBody, Tracker};
use crate::body::{Buffered, ReplayBody};
use crate::dispatch::Dispatch;
use crate::estimate::{Estimate, MAX_MODEL_LEN};
use crate::headers::{content_length, RateLimitSnapshot};
use crate::observe::{LayerKind, WaitEvent};
use crate::wait::{DeadlineReached, Parked, Wait};
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
    /// A request whose body an outer layer already read is estimated and
    /// asks the budget in [`call`](tower_service::Service::call) itself:
    /// admitted at once, it is handed to the inner service there, and the
    /// future only holds the inner service's future and the charge. Only a
    /// request that must wait (for the budget, or for the inner service to
    /// be ready again) keeps its admission state, in one allocation; its
    /// request is parked there on a retry layer's copy of its head (body
    /// and extensions only), or, with no such copy, boxed whole (one
    /// allocation more).
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
        // Reading the body (boxed: an outer retry layer reads it in the
        // preset, and this state, the largest, would set the size of the
        // future that every request waiting in an inner queue holds).
        Buffering {
            reading: Box<Reading<S, B>>,
        },
        // Waiting for the budget, then for the inner service: boxed, so
        // that only a request that waits pays for carrying its request,
        // charge and admission state (the future stays the size of the
        // state it calls in, which an outer retry layer holds inline).
        Admitting {
            pending: Box<Pending<S, F, B, RB, Waiting<B>>>,
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
        // Refused by the budget when it asked in `call` (boxed: rare).
        Rejected {
            rejected: Option<Box<(Option<Box<Charge>>, Refusal)>>,
        },
        Done,
    }
}

/// A request whose body the budget reads itself, before estimating it.
struct Reading<S, B> {
    fut: BufferFuture<B>,
    parts: Option<Parts>,
    caller: Option<String>,
    svc: Option<S>,
    count_svc: Option<S>,
}

/// An estimated request on its way through the budget: waiting to be
/// admitted, then (admitted, its charge held) for the inner service to be
/// ready. `Q` carries the request: whole while it is asked about in
/// `call` (or once read), then, boxed with the rest if it must wait, as a
/// [`Waiting`] request.
struct Pending<S, F, B, RB, Q> {
    charge: Stage,
    admission: Admission,
    request: Option<Q>,
    svc: Option<S>,
    /// Whether `svc` is ready for a call without asking it again: the
    /// service `call` got, polled ready by its caller, until the request
    /// waits.
    ready: bool,
    /// The wait for the budget, as the request's deadline bounds it: taken
    /// from the request's extensions when it first waits (a request
    /// admitted at once never looks).
    wait: Option<Wait>,
    /// Cache-aware admission (see `prefix.rs`).
    prefix: PrefixWait,
    /// The `count_tokens` mode (see `count.rs`).
    count: Counting<S, F, B, RB>,
}

/// Where a waiting request's charge stands: one of the two at a time, so
/// that a request in the budget's line does not carry room for both.
enum Stage {
    /// Asking the budget.
    Asking(Box<Charge>),
    /// Admitted: held until the request is handed on (refunded if it is
    /// dropped before).
    Admitted(Held),
    /// Taken: handed on, or refused.
    Taken,
}

impl Stage {
    fn take(&mut self) -> Stage {
        std::mem::replace(self, Stage::Taken)
    }
}

/// A request waiting in the budget's hands (for its turn in line, or for
/// the inner service once admitted), boxed with its admission state. Under
/// a retry layer whose copy of its head is the same, it is parked on that
/// copy (its body and extensions only: one head per waiting request); else
/// (no retry layer outside, or a head a layer in between changed) it waits
/// whole, boxed.
enum Waiting<B> {
    Parked(Parked<ReplayBody<B>>),
    Whole(Box<Request<ReplayBody<B>>>),
}

/// How [`Pending`] reaches the request it carries.
trait Carry<B> {
    /// `f` of the request's head (the `count_tokens` mode reads it);
    /// `None` if a parked request lost the head it stood on.
    fn with_head<R>(&self, f: impl FnOnce(HeadRef<'_>) -> R) -> Option<R>;
    fn extensions(&self) -> &http::Extensions;
    fn extensions_mut(&mut self) -> &mut http::Extensions;
    /// The request to hand on (`None` only if a parked request lost the
    /// head it stood on, which its log prevents).
    fn into_request(self) -> Option<Request<ReplayBody<B>>>;
}

impl<B> Carry<B> for Request<ReplayBody<B>> {
    fn with_head<R>(&self, f: impl FnOnce(HeadRef<'_>) -> R) -> Option<R> {
        Some(f(HeadRef::of(self)))
    }

    fn extensions(&self) -> &http::Extensions {
        Request::extensions(self)
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        Request::extensions_mut(self)
    }

    fn into_request(self) -> Option<Request<ReplayBody<B>>> {
        Some(self)
    }
}

impl<B> Carry<B> for Waiting<B> {
    fn with_head<R>(&self, f: impl FnOnce(HeadRef<'_>) -> R) -> Option<R> {
        match self {
            Waiting::Whole(request) => Some(f(HeadRef::of(request))),
            Waiting::Parked(parked) => parked.with_head(|head| f(HeadRef::of_parts(head))),
        }
    }

    fn extensions(&self) -> &http::Extensions {
        match self {
            Waiting::Whole(request) => request.extensions(),
            Waiting::Parked(parked) => parked.extensions(),
        }
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        match self {
            Waiting::Whole(request) => request.extensions_mut(),
            Waiting::Parked(parked) => parked.extensions_mut(),
        }
    }

    fn into_request(self) -> Option<Request<ReplayBody<B>>> {
        match self {
            Waiting::Whole(request) => Some(*request),
            Waiting::Parked(parked) => parked.unpark(),
        }
    }
}

impl<B> Waiting<B> {
    /// `request`, which must wait: parked on the retry layer's copy of its
    /// head if `wait` has the attempt's log and the head is the same, else
    /// whole.
    fn of(request: Request<ReplayBody<B>>, wait: Option<&Wait>) -> Self {
        let parked = match wait.and_then(Wait::log) {
            Some(log) => Parked::park(request, log),
            None => Err(request),
        };
        match parked {
            Ok(parked) => Waiting::Parked(parked),
            Err(request) => Waiting::Whole(Box::new(request)),
        }
    }
}

impl<S, F, B, RB> Pending<S, F, B, RB, Request<ReplayBody<B>>> {
    /// An estimated request, to be admitted by the budget.
    fn new(
        charge: Box<Charge>,
        request: Request<ReplayBody<B>>,
        svc: S,
        ready: bool,
        count: Counting<S, F, B, RB>,
    ) -> Self {
        Pending {
            count,
            charge: Stage::Asking(charge),
            admission: Admission::default(),
            wait: None,
            prefix: PrefixWait::default(),
            request: Some(request),
            svc: Some(svc),
            ready,
        }
    }

    /// It must wait: boxed, with its request parked or whole (see
    /// [`Waiting`]).
    fn into_waiting(mut self) -> Box<Pending<S, F, B, RB, Waiting<B>>> {
        let wait = self.wait.take();
        let request = self
            .request
            .take()
            .map(|request| Waiting::of(request, wait.as_ref()));
        Box::new(Pending {
            charge: self.charge.take(),
            admission: std::mem::take(&mut self.admission),
            request,
            svc: self.svc.take(),
            ready: self.ready,
            wait,
            prefix: std::mem::take(&mut self.prefix),
            count: std::mem::replace(&mut self.count, Counting::new(None, None)),
        })
    }
}

/// Why an estimated request was not handed on.
enum NotAdmitted {
    /// The budget refused it (with its charge, for an enforce-mode answer;
    /// boxed: rare, and polled through every state that waits).
    Refused(Box<(Option<Box<Charge>>, Refusal)>),
    /// Its deadline passed while it waited, or the inner service failed to
    /// get ready: not sent, nothing debited.
    Error(BoxError),
}

/// The charge of an admitted request until its answer: dropped with the
/// charge still inside (the caller gave up, or the inner service failed),
/// it refunds the charge in full if the request never reached the
/// transport (see [`Dispatch`]).
struct Held {
    shared: Arc<Shared>,
    charge: Option<Box<Charge>>,
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
            State::Admitting { pending } if matches!(pending.charge, Stage::Admitted(_)) => {
                "readying"
            }
            State::Admitting { .. } => "admitting",
            State::Calling { .. } => "calling",
            State::Failed { .. } => "failed",
            State::Refused { .. } | State::Rejected { .. } => "refused",
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
                reading: Box::new(Reading {
                    fut,
                    parts: Some(parts),
                    caller,
                    svc: Some(svc),
                    count_svc,
                }),
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
}

impl<S, B, ResB> ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
{
    /// A request already estimated (`count`: the inner service clone and
    /// the body for the `count_tokens` mode, if on), from the budget's
    /// `call`: it asks the budget now, and is handed to `svc` (polled ready
    /// by the caller of `call`) at once if admitted; it waits in the future
    /// otherwise.
    // Inlined (as are `after`, `poll_pending` and `send`, on the path of a
    // request admitted at once): the charge, the request and the inner
    // future are then moved between the callers' frames without a copy at
    // each call (callgrind: 184 fewer instructions per request through the
    // preset, 66 of them `memcpy`).
    #[inline(always)]
    pub(crate) fn admitting(
        shared: Arc<Shared>,
        charge: Box<Charge>,
        request: Request<ReplayBody<B>>,
        svc: S,
        count: (Option<S>, Option<Bytes>),
    ) -> Self {
        let count = Counting::new(count.0, count.1);
        let pending = Pending::new(charge, request, svc, true, count);
        // Not yet polled: anything that waits is polled again, with the
        // task's waker, when the future first is.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let state = State::after(&shared, pending, &mut cx);
        Self { shared, state }
    }
}

impl<S, B, ResB> State<S, S::Future, B, ResB>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
{
    /// The state of an estimated request after asking the budget (and the
    /// inner service) once: calling, waiting (boxed), or refused.
    // Inlined: see `admitting`.
    #[inline(always)]
    fn after(
        shared: &Arc<Shared>,
        mut pending: Pending<S, S::Future, B, ResB, Request<ReplayBody<B>>>,
        cx: &mut Context<'_>,
    ) -> Self {
        match poll_pending(shared, &mut pending, cx) {
            Poll::Ready(Ok((fut, held))) => State::Calling { fut, held },
            Poll::Ready(Err(NotAdmitted::Refused(rejected))) => {
                // Not sent: dropping the admission gives back the place in line.
                drop(pending);
                State::Rejected {
                    rejected: Some(rejected),
                }
            }
            Poll::Ready(Err(NotAdmitted::Error(e))) => State::Failed { error: Some(e) },
            Poll::Pending => State::Admitting {
                pending: pending.into_waiting(),
            },
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
                StateProj::Buffering { reading } => {
                    let Reading {
                        fut,
                        parts,
                        caller,
                        svc,
                        count_svc,
                    } = &mut **reading;
                    let buffered = ready!(Pin::new(fut).poll(cx));
                    let (Some(parts), Some(svc)) = (parts.take(), svc.take()) else {
                        polled_after_completion();
                    };
                    match estimated(shared, buffered, parts, caller.as_deref()) {
                        Ok((request, charge, body)) => {
                            let count = Counting::new(count_svc.take(), body);
                            // Asked again before the call: the body took time.
                            let pending = Pending::new(charge, request, svc, false, count);
                            let next = State::after(shared, pending, cx);
                            this.state.set(next);
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
                StateProj::Admitting { pending } => {
                    let polled = ready!(poll_pending(shared, pending, cx));
                    match polled {
                        Ok((fut, held)) => this.state.set(State::Calling { fut, held }),
                        Err(NotAdmitted::Refused(rejected)) => {
                            this.state.set(State::Done);
                            let (charge, refusal) = *rejected;
                            return Poll::Ready(refuse(shared, charge, refusal));
                        }
                        Err(NotAdmitted::Error(e)) => {
                            // Not sent: dropping the admission gives back
                            // the place in line, and dropping `held` the
                            // reservation; nothing was debited.
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                StateProj::Calling { fut, held } => {
                    if held.charge.is_none() {
                        // Taken when the inner future returned.
                        polled_after_completion();
                    }
                    let result = ready!(fut.poll(cx));
                    // The charge goes from `held` straight to where it
                    // ends (the response's settlement), and the answer
                    // straight out, not through a copy per step: the state
                    // stays (its charge taken, the inner future done) until
                    // this future is dropped.
                    return Poll::Ready(finished(shared, held, result));
                }
                StateProj::Refused { refusal } => {
                    let Some(refusal) = refusal.take() else {
                        polled_after_completion();
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(caller_refused(shared, refusal));
                }
                StateProj::Rejected { rejected } => {
                    let Some(rejected) = rejected.take() else {
                        polled_after_completion();
                    };
                    let (charge, refusal) = *rejected;
                    this.state.set(State::Done);
                    return Poll::Ready(refuse(shared, charge, refusal));
                }
                StateProj::Done => polled_after_completion(),
            }
        }
    }
}

/// Takes an estimated request through the budget, then hands it to the
/// inner service: `Ready` with the inner service's future and the charge
/// it holds, or with why it was not sent.
// Inlined: see `ResponseFuture::admitting`.
#[inline(always)]
fn poll_pending<S, B, ResB, Q>(
    shared: &Arc<Shared>,
    p: &mut Pending<S, S::Future, B, ResB, Q>,
    cx: &mut Context<'_>,
) -> Poll<Result<(S::Future, Held), NotAdmitted>>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
    Q: Carry<B>,
{
    if !matches!(p.charge, Stage::Admitted(_)) {
        ready!(poll_admission(shared, p, cx))?;
        let Stage::Asking(mut charge) = p.charge.take() else {
            polled_after_completion();
        };
        charge.writing = shared
            .writers
            .start(&charge.estimate.cache_writes)
            .map(Box::new);
        let marker = mark(p.request.as_mut().map(Carry::extensions_mut));
        let held = Held {
            shared: Arc::clone(shared),
            charge: Some(charge),
            marker,
        };
        if p.ready {
            // Never made to wait: sent at once, the charge not parked.
            return Poll::Ready(match send(p, &held.marker) {
                Ok(future) => Ok((future, held)),
                Err(e) => Err(NotAdmitted::Error(e)),
            });
        }
        p.charge = Stage::Admitted(held);
    }
    poll_send(p, cx).map_err(NotAdmitted::Error)
}

/// Waits until the budget admits the request (or refuses it, or its
/// deadline passes).
fn poll_admission<S, B, ResB, Q>(
    shared: &Arc<Shared>,
    p: &mut Pending<S, S::Future, B, ResB, Q>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), NotAdmitted>>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>>,
    ResB: Body,
    Q: Carry<B>,
{
    loop {
        let Stage::Asking(ch) = &mut p.charge else {
            polled_after_completion();
        };
        let counter = shared.counter.as_ref();
        p.count.poll(counter, &*shared.estimator, ch, cx);
        super::count::recheck_read(shared, ch, &p.admission);
        super::fleet::read_cached(shared, ch, &p.admission);
        let polled = match poll_prefix(shared, ch, &mut p.prefix, cx) {
            Poll::Ready(()) => {
                let writing = prefix::refresh(shared, ch, cx);
                let counting_first = ch.input_capped && ch.counted.is_none() && p.count.in_flight();
                if counting_first {
                    Poll::Pending
                } else if hold_in_line(shared, ch, &mut p.prefix, writing, cx) {
                    // Asking nothing while it holds: its queued marker is
                    // renewed before it lapses.
                    shared.renew_queued(ch, &mut p.admission, cx);
                    Poll::Pending
                } else {
                    let polled = shared.poll_admit(ch, &mut p.admission, cx);
                    if polled.is_pending() && p.admission.waits_behind() {
                        // Behind its process's head, which may hold asking
                        // nothing: its queued marker is renewed too.
                        shared.renew_queued(ch, &mut p.admission, cx);
                    }
                    polled
                }
            }
            Poll::Pending => Poll::Pending,
        };
        match polled {
            Poll::Ready(admitted) => {
                if let Some(wait) = p.wait.as_mut() {
                    waited(shared, wait);
                }
                return Poll::Ready(admitted.map_err(|refusal| {
                    let charge = match p.charge.take() {
                        Stage::Asking(charge) => Some(charge),
                        _ => None,
                    };
                    NotAdmitted::Refused(Box::new((charge, refusal)))
                }));
            }
            Poll::Pending => {
                // It waits: the inner service is asked again before the call.
                p.ready = false;
                // Only the `count_tokens` mode reads the head, for a request
                // not counted yet and with no count in flight (a parked
                // request's head is made again from the retry layer's copy).
                let may_count = counter.is_some() && ch.counted.is_none() && !p.count.in_flight();
                let (request, count) = (&p.request, &mut p.count);
                let started = request.as_ref().filter(|_| may_count).and_then(|request| {
                    request.with_head(|head| count.start(counter, ch, Some(head)))
                });
                if started == Some(true) {
                    // Polled next, while the request waits.
                    continue;
                }
                if p.admission.waits_at_head() {
                    p.count.retry_when_free(counter, ch, cx);
                }
                if let PrefixWait::Candidate(slot) = &p.prefix {
                    // It would wait anyway: out of line, it waits for the
                    // writer's response head instead.
                    p.admission = Admission::default();
                    p.prefix = PrefixWait::Holding(Arc::clone(slot), None);
                    continue;
                }
                // Under a retry layer, the request waits on its copy of the
                // head once boxed (see `Waiting`).
                let request = p.request.as_ref();
                let wait = p.wait.get_or_insert_with(|| match request {
                    Some(request) => Wait::of(request.extensions()),
                    None => Wait::default(),
                });
                let reached = ready!(wait_deadline(shared, wait, cx));
                return Poll::Ready(Err(NotAdmitted::Error(Box::new(reached))));
            }
        }
    }
}

/// Whether a request waiting in line holds before asking, keeping its
/// place: a longer prefix of it is being written (`writing`, its tokens,
/// from `prefix::refresh`, which also wakes it when that write begins), and
/// the hold is bounded (`prefix::hold_bound`; once per request).
fn hold_in_line(
    shared: &Shared,
    charge: &Charge,
    state: &mut PrefixWait,
    writing: Option<u64>,
    cx: &mut Context<'_>,
) -> bool {
    if let (Some(tokens), PrefixWait::Done) = (writing, &state) {
        if let Some(bound) = cache_hold_bound(shared, charge, tokens) {
            *state = PrefixWait::InLine(bound, false);
        }
    }
    if let PrefixWait::InLine(_, seen @ false) = state {
        // Remembered for when the bound fires: a writer queued elsewhere
        // is admitted about then (`prefix::hold_on`).
        *seen = writing.is_some() && prefix::writer_queued(shared, charge);
    }
    let (PrefixWait::InLine(bound, _)
    | PrefixWait::InLineQueued(bound)
    | PrefixWait::InLineAdmitted(bound)) = state
    else {
        return false;
    };
    if writing.is_none() {
        // The write began (and was read) or failed. A hold that went on
        // past a bound for a writer admitted meanwhile is not followed by
        // another: holds chained from one turn to the next, each behind
        // its process's line, would wait for each other.
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            "budget: the hold ends: the write held for began, or its marker went"
        );
        *state = match state {
            PrefixWait::InLineAdmitted(_) => PrefixWait::HeldToBound,
            _ => PrefixWait::Done,
        };
        return false;
    }
    if bound.as_mut().poll(cx).is_ready() {
        // Past the bound, on while its writer is still queued elsewhere.
        if prefix::hold_on(shared, charge, state, writing, cx) {
            return true;
        }
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            "budget: held to its bound; it goes charged in full"
        );
        *state = PrefixWait::HeldToBound;
        return false;
    }
    true
}

/// The timer bounding a hold for a prefix of `tokens` being written: the
/// budget's cache hold, longer for a prefix whose refill takes longer
/// (`prefix::hold_bound`); none when the cache hold is zero.
fn cache_hold_bound(
    shared: &Shared,
    charge: &Charge,
    tokens: u64,
) -> Option<Pin<Box<tokio::time::Sleep>>> {
    let itpm = charge.limits.input_tokens_per_minute;
    let hold = prefix::hold_bound(shared.settings.cache_hold, itpm, tokens);
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
        | PrefixWait::InLine(..)
        | PrefixWait::InLineQueued(_)
        | PrefixWait::InLineAdmitted(_)
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
        PrefixState::Writing(_) if holding => {
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
        PrefixState::Writing(tokens) => match cache_hold_bound(shared, charge, tokens) {
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
fn mark(extensions: Option<&mut http::Extensions>) -> Dispatch {
    let Some(extensions) = extensions else {
        return Dispatch::new(None);
    };
    Dispatch::mark(extensions)
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
/// kept otherwise, since the request may have reached the server. The
/// charge is taken from `held` (left empty, so that dropping it does
/// nothing more).
fn finished<ResB: Body, E: Into<BoxError>>(
    shared: &Arc<Shared>,
    held: &mut Held,
    result: Result<Response<ResB>, E>,
) -> Result<Response<ResponseBody<ResB>>, BoxError> {
    let sent = held.sent();
    let e = match result {
        Ok(response) => return Ok(respond(shared, &mut held.charge, response)),
        Err(e) => e.into(),
    };
    let Some(charge) = held.charge.take() else {
        polled_after_completion();
    };
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

/// Hands an admitted request to the inner service once it is ready: at
/// once if it was never made to wait (`poll_ready` said so before `call`),
/// else once `poll_ready` says so again (the wait may have been long).
fn poll_send<S, B, F, RB, Q>(
    p: &mut Pending<S, F, B, RB, Q>,
    cx: &mut Context<'_>,
) -> Poll<Result<(S::Future, Held), BoxError>>
where
    S: Service<Request<ReplayBody<B>>, Future = F>,
    S::Error: Into<BoxError>,
    Q: Carry<B>,
{
    if !p.ready {
        let Some(service) = p.svc.as_mut() else {
            polled_after_completion();
        };
        if let Err(e) = ready!(service.poll_ready(cx)) {
            // Not sent: dropping `held` gives the reservation back.
            return Poll::Ready(Err(e.into()));
        }
        p.ready = true;
    }
    let Stage::Admitted(held) = p.charge.take() else {
        polled_after_completion();
    };
    Poll::Ready(send(p, &held.marker).map(|future| (future, held)))
}

/// Hands an admitted request, whose charge holds `marker`, to the inner
/// service (ready for it). An error only if a request parked on a retry
/// layer's copy of its head lost it, which its log prevents: not sent, and
/// its charge is refunded.
// Inlined: see `ResponseFuture::admitting`.
#[inline(always)]
fn send<S, B, F, RB, Q>(
    p: &mut Pending<S, F, B, RB, Q>,
    marker: &Dispatch,
) -> Result<S::Future, BoxError>
where
    S: Service<Request<ReplayBody<B>>, Future = F>,
    Q: Carry<B>,
{
    let Some(mut service) = p.svc.take() else {
        polled_after_completion();
    };
    // Taken out of its slot straight into the call (a request is a few
    // hundred bytes, copied at each step).
    match p.request.take().map(Carry::into_request) {
        Some(Some(request)) => {
            Dispatch::passing(Some(marker));
            let future = service.call(request);
            Dispatch::passed(Some(marker));
            Ok(future)
        }
        Some(None) => Err(Box::new(Error::NotReplayable {
            status: None,
            source: None,
        })),
        None => polled_after_completion(),
    }
}

/// A read request rebuilt around its body, its charge, and its bytes when
/// the `count_tokens` mode may count it.
type Estimated<B> = (Request<ReplayBody<B>>, Box<Charge>, Option<Bytes>);

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
    charge: Option<Box<Charge>>,
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
/// wrap the body for settlement. `charge` is the one in `slot`, taken from
/// it only where it goes: into the body's tracker, or dropped once settled.
fn respond<ResB: Body>(
    shared: &Arc<Shared>,
    slot: &mut Option<Box<Charge>>,
    mut response: Response<ResB>,
) -> Response<ResponseBody<ResB>> {
    let Some(charge) = slot.as_mut() else {
        polled_after_completion();
    };
    let status = response.status();
    let sse = is_event_stream(response.headers()).unwrap_or(charge.estimate.stream);
    if !status.is_success() {
        // Nothing written: requests waiting for it go, charged in full.
        charge.writing = None;
    }
    let was_refused = refused(status);
    if was_refused {
        // The server charged nothing for a refused request.
        shared.refund(charge);
    }
    let mut held_sync = None;
    if shared.settings.enforce {
        enforce::insert_headers(shared, charge, response.headers_mut());
    } else if let Some(statuses) =
        RateLimitSnapshot::budget_statuses(response.headers(), shared.resets_synced())
    {
        // A body to settle: the sync may go with its settlement.
        held_sync = shared.sync(charge, statuses, !was_refused);
    }
    if was_refused {
        tracing::debug!(
            key = super::callers::logged_key(charge.key()),
            status = status.as_u16(),
            "budget: request refused; reservation refunded"
        );
        *slot = None;
        return response.map(ResponseBody::plain);
    }
    if response.body().is_end_stream() {
        let Some(charge) = slot.take() else {
            polled_after_completion();
        };
        let mut tracker = Tracker::new(Arc::clone(shared), charge, sse, !status.is_success());
        tracker.hold_sync(held_sync);
        // An empty body may never be polled: settle now.
        tracker.conclude_empty();
        return response.map(ResponseBody::plain);
    }
    let (parts, body) = response.into_parts();
    let error_status = !status.is_success();
    let body = ResponseBody::settling(body, shared, slot, sse, error_status, held_sync);
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use std::convert::Infallible;

    /// The service under the budget in the preset, over a transport whose
    /// future is small.
    type Under = crate::concurrency::Concurrency<
        tower::util::ServiceFn<
            fn(
                Request<ReplayBody<ReplayBody<Full<Bytes>>>>,
            ) -> std::future::Pending<Result<Response<Full<Bytes>>, Infallible>>,
        >,
    >;

    /// An outer retry layer holds this future inline, and every request
    /// waiting in the concurrency queue holds that: a guard against it
    /// growing unnoticed. It was 992 bytes while it held the request, the
    /// charge and the admission inline (set by the state that asks the
    /// budget, 984 bytes); that state is boxed now (only for requests that
    /// wait), and so is the state that reads a body (424 bytes while it was
    /// inline; the preset's budget never reads one: its retry layer does):
    /// the future is the size of the state that calls (the inner future
    /// and the charge; 400 bytes since the dispatch marker names which
    /// kind of node it holds, so that a budget's own marker does not
    /// carry a retry layer's wait log; 352 with the prefixes a request
    /// writes boxed in its charge; 80 with the charge itself boxed, from
    /// the estimate on).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn future_stays_small() {
        let size = std::mem::size_of::<ResponseFuture<Under, ReplayBody<Full<Bytes>>>>();
        assert!(size <= 80, "budget::ResponseFuture is {size} bytes");
        // 336 bytes, then 344 with the prefix a fleet's request held for
        // (`Charge::fleet_held`), 352 with the marker's kind, 304 with the
        // prefixes it writes boxed (`Charge::writing`), and 32 with the
        // charge boxed (one allocation per request, and one fewer for the
        // retry layer's copy of the head: `wait::HeadCopy`).
        let calling = std::mem::size_of::<Held>();
        assert!(calling <= 32, "Held is {calling} bytes");
    }

    /// Every request waiting in the budget's line holds its admission
    /// state (boxed): it had room for both the charge that asks and the
    /// charge held once admitted (about 330 bytes more), one of them now
    /// (968 bytes, 904 with the prefixes a charge writes boxed and the
    /// concurrency service's callbacks in its shared state, 696 with its
    /// request parked on a retry layer's copy of its head, or boxed, 424
    /// with the charge boxed, 432 with a queued marker's renewal boxed).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_waiting_requests_state_stays_small() {
        type Fut = <Under as Service<Request<ReplayBody<ReplayBody<Full<Bytes>>>>>>::Future;
        type Body = crate::concurrency::ConcurrencyBody<Full<Bytes>>;
        type Q = Waiting<ReplayBody<Full<Bytes>>>;
        let size = std::mem::size_of::<Pending<Under, Fut, ReplayBody<Full<Bytes>>, Body, Q>>();
        assert!(size <= 432, "Pending is {size} bytes");
    }
}
