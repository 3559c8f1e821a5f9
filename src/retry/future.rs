//! The response future: buffers the body, waits, makes the attempts.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::backoff::full_jitter;
use super::layer::{AfterSend, GiveUpPolicy};
use super::policy::{self, ErrorVerdict, ERROR_BODY_LIMIT};
use super::snapshot::{Counters, Shared};
use super::RETRY_COUNT;
use crate::body::{self, Buffered, BufferedBody, BufferedBytes, ReplayBody};
use crate::dispatch::Dispatch;
use crate::observe::{RetryCause, RetryEvent};
use crate::wait::{DeadlineReached, Log, WaitLog};
use crate::{BoxError, Error, GiveUpReason, LastResponse};

/// The request body as the attempts see it. Kept small: the future is moved
/// a few times before its first poll, and every byte of it is copied then;
/// and a request waiting in an inner layer holds it.
enum Payload<B> {
    /// Still being read into memory (by [`State::Buffering`], which holds the
    /// reading: the state's size is set by the inner future's anyway).
    Reading,
    /// Kept whole: every attempt replays it.
    Replay(BufferedBody),
    /// Too large to keep: sent once (`None` once sent). Boxed: rare, and large.
    Once(Option<Box<ReplayBody<B>>>),
}

pin_project! {
    #[project = StateProj]
    enum State<F, R, B> {
        // Reading the request body.
        Buffering { buffer: body::Buffer<B> },
        // Deciding whether the next attempt may start, must wait, or is refused.
        Gate,
        // Sleeping in `Ctx::sleep` (cooldown or backoff).
        Waiting,
        // Polling the inner service for readiness before a retry.
        Readying,
        // An attempt is in flight.
        Calling { #[pin] future: F },
        // Reading an error body until `Ctx::sleep` (the read timeout)
        // fires: a 429's, looking for the spend-cap code, or the last
        // response's, for the give-up error. Boxed: rare, and a body with
        // an inner layer's settlement in it is larger than the rest of the
        // state (every request waiting in an inner layer holds it inline).
        Reading {
            body: Pin<Box<R>>,
            then: Then,
            collected: Vec<u8>,
        },
        // The output was returned.
        Done,
    }
}

pin_project! {
    /// The future of [`RetryAfter`](super::RetryAfter): resolves to the first
    /// response that is not retried, or to an error.
    ///
    /// # Cancellation
    ///
    /// Dropping it at any point drops the attempt in flight, the buffered body
    /// and any wait: nothing keeps running in the background. A retry that was
    /// already counted against the budget is not given back.
    ///
    /// # Panics
    ///
    /// Polling it again after it returned `Ready` panics with
    /// "`retry::ResponseFuture` polled after completion", as tower's and
    /// futures-util's futures do.
    pub struct ResponseFuture<S, B, R>
    where
        S: Service<Request<ReplayBody<B>>, Response = Response<R>>,
    {
        #[pin]
        state: State<S::Future, R, B>,
        ctx: Ctx<S, B>,
        // The request's `llm_request` span, entered while polling: kept
        // (boxed) only when a subscriber is interested in it, so that a
        // request waiting in an inner layer does not carry a disabled one.
        span: Option<Box<tracing::Span>>,
    }
}

/// Everything the attempts need that is not pinned.
struct Ctx<S, B> {
    service: S,
    shared: Arc<Shared>,
    payload: Payload<B>,
    /// Attempts made so far.
    attempts: u32,
    /// Whether `service` is ready for a call.
    ready: bool,
    /// What the request went through so far, once it waited or an attempt
    /// failed (`None` until then).
    history: Option<Box<History>>,
    /// The waits of the layers inside this one in the current attempt (those
    /// of the attempts before are in the history's `waited`), the deadline
    /// they obey (the request's, kept only there), and the request head:
    /// before the first attempt the request's own, then the copy that the
    /// next attempt sends (none for a body that cannot be sent again). Kept
    /// there, not here, so that a layer inside that holds the attempt
    /// waiting (the concurrency queue, the budget's line) can hold the
    /// request on the copy while its head is equal
    /// ([`Parked`](crate::wait::Parked)): a waiting request carries one
    /// head.
    log: Arc<Log>,
}

/// What a request that waited in this layer or failed an attempt carries:
/// boxed, since most requests do neither, and every request waiting in an
/// inner layer holds the context inline.
#[derive(Default)]
struct History {
    /// The waits of this layer and of the attempts before the current one.
    waited: Duration,
    wait_started: Option<Instant>,
    /// The one timer: a wait's end, or an error body's read timeout.
    sleep: Option<Pin<Box<Sleep>>>,
    last_status: Option<StatusCode>,
    last_error: Option<BoxError>,
}

/// What an error body is read for.
enum Then {
    /// A 429 without a delay: the spend-cap code fails it; otherwise the
    /// planned retry goes ahead (the server's delay, if any, is noted first).
    /// (The status is the attempt's, in `Ctx::last_status`.)
    Retry {
        planned: Planned,
        server_delay: Option<Duration>,
    },
    /// The layer gave up: the body goes into this error's [`LastResponse`].
    Fail(BoxError),
}

/// A retry decided on, not yet begun.
#[derive(Debug, Clone, Copy)]
struct Planned {
    wake: Instant,
    delay: Duration,
    cause: RetryCause,
}

/// What the gate lets the next attempt do.
enum Gate {
    Go,
    NeedReady,
    Wait(Instant),
}

/// Where a retry's delay comes from.
#[derive(Debug, Clone, Copy)]
enum Delay {
    /// Named by the server (headers): capped by `max_server_delay`.
    Server(Duration),
    /// Named by an inner layer's error (`BudgetExceeded::retry_in`): capped too.
    Local(Duration),
    /// Exponential backoff with full jitter.
    Backoff,
    /// Backoff too, after an attempt that failed once it may have reached the
    /// server (a replay: counted).
    Replay,
}

/// `now + d` without overflow (a far instant instead).
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(crate::headers::MAX_DELAY))
        .unwrap_or(now)
}

impl<S, B, R> ResponseFuture<S, B, R>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<R>>,
    B: Body + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(service: S, shared: Arc<Shared>, req: Request<B>) -> Self {
        let (head, body) = req.into_parts();
        let limit = shared.config.buffer_limit;
        let needs_clock = shared.budget.is_some() || shared.config.deadline.is_some();
        let now = needs_clock.then(Instant::now);
        if let (Some(budget), Some(now)) = (&shared.budget, now) {
            budget.deposit(now);
        }
        let deadline = match (shared.config.deadline, now) {
            (Some(d), Some(now)) => Some(later(now, d)),
            _ => None,
        };
        let marker = Dispatch::of(&head.extensions);
        let log = Log::with_head(deadline, marker, head);
        shared.config.hooks.request();
        let span = tracing::info_span!(
            "llm_request",
            attempt = tracing::field::Empty,
            model = tracing::field::Empty,
            lane = tracing::field::Empty,
        );
        let span = (!span.is_disabled()).then(|| Box::new(span));
        ResponseFuture {
            state: State::Buffering {
                buffer: body::buffer(body, limit),
            },
            ctx: Ctx {
                service,
                shared,
                payload: Payload::Reading,
                attempts: 0,
                ready: true,
                history: None,
                log,
            },
            span,
        }
    }
}

impl<S, B> Ctx<S, B> {
    /// The request's deadline, if the layer has one.
    fn deadline(&self) -> Option<Instant> {
        self.log.deadline()
    }

    /// Every wait of the request so far: this layer's, and those of the
    /// layers inside it.
    fn waited(&self) -> Duration {
        let before = self.history.as_ref().map_or(Duration::ZERO, |h| h.waited);
        before.saturating_add(self.log.waited())
    }

    /// The request's history, begun if it was not.
    fn history(&mut self) -> &mut History {
        self.history.get_or_insert_with(Box::default)
    }

    /// The status of the last attempt, if it was answered and retried.
    fn last_status(&self) -> Option<StatusCode> {
        self.history.as_ref().and_then(|h| h.last_status)
    }

    /// The error of the last attempt, if it failed and was retried.
    fn last_error(&self) -> Option<&BoxError> {
        self.history.as_ref().and_then(|h| h.last_error.as_ref())
    }

    fn take_last_error(&mut self) -> Option<BoxError> {
        self.history.as_mut().and_then(|h| h.last_error.take())
    }

    /// Notes how the last attempt failed.
    fn set_last(&mut self, status: Option<StatusCode>, error: Option<BoxError>) {
        let history = self.history();
        history.last_status = status;
        history.last_error = error;
    }

    fn give_up(&mut self, reason: GiveUpReason) -> BoxError {
        self.shared.counters.give_up(reason);
        self.shared.config.hooks.give_up(reason);
        let waited = self.waited();
        tracing::debug!(
            attempts = self.attempts,
            last_status = self.last_status().map(|s| s.as_u16()),
            waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            %reason,
            "giving up on request"
        );
        Box::new(Error::RetriesExhausted {
            attempts: self.attempts,
            waited,
            last_status: self.last_status(),
            reason,
            source: self.take_last_error(),
            response: None,
        })
    }

    fn too_long(&mut self, delay: Duration, status: StatusCode) -> BoxError {
        Counters::bump(&self.shared.counters.too_long);
        tracing::debug!(
            attempts = self.attempts,
            status = status.as_u16(),
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "server delay above the cap; returning at once"
        );
        Box::new(Error::RetryAfterTooLong {
            delay,
            status,
            attempts: self.attempts,
            response: None,
        })
    }

    /// Whether the next attempt may start now. Reads the clock only when a
    /// cooldown was ever set or a deadline is configured.
    fn gate(&mut self) -> Result<Gate, BoxError> {
        let mut now = None;
        if let Some((until, _)) = self.shared.cooldown.get() {
            let t = *now.get_or_insert_with(Instant::now);
            if until > t {
                // Never longer than `max_server_delay`: the cooldown is clamped to it.
                if self.deadline().is_some_and(|d| until > d) {
                    return Err(self.give_up(GiveUpReason::Deadline));
                }
                return Ok(Gate::Wait(until));
            }
        }
        if let Some(deadline) = self.deadline() {
            if now.unwrap_or_else(Instant::now) > deadline {
                return Err(self.give_up(GiveUpReason::Deadline));
            }
        }
        Ok(if self.ready {
            Gate::Go
        } else {
            Gate::NeedReady
        })
    }

    /// Starts sleeping until `until`.
    fn start_wait(&mut self, until: Instant) {
        self.history().wait_started = Some(Instant::now());
        self.arm_timer(until);
    }

    /// Sets the one timer (a wait's end, or an error body's read timeout).
    fn arm_timer(&mut self, until: Instant) {
        let history = self.history();
        match history.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().reset(until),
            None => history.sleep = Some(Box::pin(tokio::time::sleep_until(until))),
        }
    }

    /// Starts the read timeout of an error body.
    fn start_reading(&mut self) {
        let timeout = self.shared.config.error_body_timeout;
        self.arm_timer(later(Instant::now(), timeout));
    }

    /// `Reading` with the body not ready: whether its read timeout expired.
    fn poll_read_timeout(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.history.as_mut().and_then(|h| h.sleep.as_mut()) {
            Some(sleep) => {
                ready!(sleep.as_mut().poll(cx));
                Counters::bump(&self.shared.counters.error_body_timeouts);
                tracing::debug!(
                    status = self.last_status().map(|s| s.as_u16()),
                    "error body not read within the timeout; decided without it"
                );
                Poll::Ready(())
            }
            None => Poll::Pending,
        }
    }

    /// Sets the shared cooldown from a 429/529 that names a delay, clamped to
    /// `max_server_delay`: a longer delay is the answer of the request that
    /// received it (`RetryAfterTooLong`), while the others wait at most the
    /// cap and then ask the server again.
    fn note_server_delay(&self, status: StatusCode, delay: Option<Duration>) {
        if let Some(d) = delay.filter(|_| policy::sets_cooldown(status)) {
            let d = d.min(self.shared.config.max_server_delay);
            self.shared
                .cooldown
                .extend(later(Instant::now(), d), status);
        }
    }

    /// Decides whether the failed attempt is retried, and when. The retry
    /// budget is drawn from here; the retry is counted when it is
    /// [`begun`](Self::begin_retry).
    fn plan_retry(&mut self, delay: Delay) -> Result<Planned, BoxError> {
        let config = &self.shared.config;
        if self.attempts > config.max_retries {
            return Err(self.give_up(GiveUpReason::MaxRetries));
        }
        let cap = config.max_server_delay;
        let d = match delay {
            Delay::Server(d) if d > cap => {
                let status = self.last_status().unwrap_or(StatusCode::TOO_MANY_REQUESTS);
                return Err(self.too_long(d, status));
            }
            Delay::Local(d) if d > cap => {
                // The inner layer's own error says when; hand it back as is.
                let err = self.take_last_error();
                return Err(err.unwrap_or_else(|| self.give_up(GiveUpReason::MaxRetries)));
            }
            Delay::Server(d) | Delay::Local(d) => d,
            Delay::Backoff | Delay::Replay => full_jitter(
                config.initial_backoff,
                config.max_backoff,
                self.attempts.saturating_sub(1),
                config.jitter.sample(),
            ),
        };
        let now = Instant::now();
        let wake = later(now, d);
        if self.deadline().is_some_and(|deadline| wake > deadline) {
            return Err(self.give_up(GiveUpReason::Deadline));
        }
        if let Some(budget) = &self.shared.budget {
            if !budget.withdraw(now) {
                return Err(self.give_up(GiveUpReason::Budget));
            }
        }
        Ok(Planned {
            wake,
            delay: d,
            cause: match delay {
                Delay::Server(_) => RetryCause::ServerDelay,
                Delay::Local(_) => RetryCause::InnerDelay,
                Delay::Backoff => RetryCause::Backoff,
                Delay::Replay => RetryCause::Replay,
            },
        })
    }

    /// A planned retry goes ahead: counted, logged, told to `on_retry`.
    fn begin_retry(&mut self, planned: &Planned) {
        Counters::bump(&self.shared.counters.retries);
        let cause = planned.cause;
        if cause == RetryCause::Replay {
            Counters::bump(&self.shared.counters.replays_after_send);
        }
        tracing::info!(
            attempt = self.attempts + 1,
            status = self.last_status().map(|s| s.as_u16()),
            error = self.last_error().map(tracing::field::display),
            delay_ms = u64::try_from(planned.delay.as_millis()).unwrap_or(u64::MAX),
            cause = match cause {
                RetryCause::ServerDelay => "server delay",
                RetryCause::InnerDelay => "inner layer delay",
                RetryCause::Replay => {
                    "backoff, replaying a request that may have reached the server"
                }
                _ => "backoff",
            },
            "retrying request"
        );
        self.shared.config.hooks.retry(&RetryEvent {
            attempt: self.attempts + 1,
            status: self.last_status(),
            error: self.last_error().map(|e| &**e),
            delay: planned.delay,
            cause,
        });
    }

    /// The request of the next attempt: the head kept in the log (the
    /// request's own for the first), its copy kept in the attempt's log for
    /// the attempt after, if the body can be sent again.
    // Inlined into `call_next`: the request is made where the inner
    // service's call takes it, not copied out of here and into the call.
    #[inline(always)]
    fn next_request(&mut self) -> Result<Attempt<B>, BoxError> {
        let not_replayable = || -> BoxError {
            Box::new(Error::NotReplayable {
                status: None,
                source: None,
            })
        };
        let body = match &mut self.payload {
            Payload::Replay(kept) => kept.replay(),
            Payload::Once(slot) => *slot.take().ok_or_else(not_replayable)?,
            Payload::Reading => return Err(not_replayable()),
        };
        let replay = matches!(self.payload, Payload::Replay(_));
        // One head, changed where it lies (not moved through a tuple).
        let first = self.attempts == 0;
        let mut head = if first {
            // The request's own head goes; its copy stays, for the next.
            Log::swap_head(&mut self.log, replay)
        } else {
            Log::take_head(&mut self.log)
        }
        .ok_or_else(not_replayable)?;
        let marker = Dispatch::of(&head.extensions);
        if !first {
            head.headers
                .insert(RETRY_COUNT, HeaderValue::from(self.attempts));
            // A fresh log (and dispatch node) for each attempt; the waits of
            // the attempts before are kept.
            let waited = self.log.waited();
            let history = self.history();
            history.waited = history.waited.saturating_add(waited);
            let deadline = self.log.deadline();
            self.log = if replay {
                Log::with_copy(deadline, marker.clone(), &head)
            } else {
                Log::new(deadline, marker.clone())
            };
        }
        // The copy was made before this attempt's extensions go on: it
        // holds no log (which holds it), and stays cheap.
        if let Payload::Replay(kept) = &self.payload {
            head.extensions.insert(BufferedBytes(kept.bytes().clone()));
        }
        head.extensions
            .insert(WaitLog::new(Arc::clone(&self.log), marker.clone()));
        self.attempts += 1;
        crate::observe::record_span("attempt", self.attempts);
        Ok((Request::from_parts(head, body), marker))
    }

    /// Makes the next attempt: its request, handed to the inner service
    /// (ready, as the gate found it); the inner future, or why the request
    /// could not be made (a body that cannot be sent again).
    // Inlined: the request is made in the call's argument (see
    // `next_request`), the future returned into `State::Calling`.
    #[inline(always)]
    fn call_next(&mut self) -> Result<S::Future, BoxError>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        let (req, marker) = self.next_request()?;
        self.ready = false;
        Dispatch::passing(marker.as_ref());
        let future = self.service.call(req);
        Dispatch::passed(marker.as_ref());
        Ok(future)
    }

    fn replayable(&self) -> bool {
        matches!(self.payload, Payload::Replay(_))
    }
}

/// The request of an attempt, and the dispatch marker in its wait log.
type Attempt<B> = (Request<ReplayBody<B>>, Option<Dispatch>);

/// What the future does next: the outcome of one state's work. An attempt
/// is made where it is called ([`Ctx::call_next`]), straight into
/// [`State::Calling`]: neither its request (288 bytes in the preset) nor
/// the inner future is moved through a step.
enum Step<R> {
    /// Decide whether the next attempt may start.
    Gate,
    /// Sleep until this instant, then go to the gate.
    Wait(Instant),
    /// Poll the inner service for readiness, then go to the gate.
    Ready,
    /// Make the next attempt (the gate let it go).
    Call,
    /// Read an error body, then do what `Then` says.
    Read(R, Then),
    /// The attempt failed and may be retried after this delay.
    Retry(Delay),
    /// A retry was planned: wait for it, then go to the gate.
    Planned(Planned),
    /// Resolve to this.
    Return(Result<Response<R>, BoxError>),
}

impl<S, B> Ctx<S, B> {
    fn on_response<R>(&mut self, response: Response<R>) -> Step<R> {
        let status = response.status();
        let Some(verdict) = policy::judge_response(status, response.headers(), || {
            self.shared.config.wall_clock.now()
        }) else {
            return Step::Return(Ok(response));
        };
        if !verdict.retry {
            return Step::Return(Ok(response));
        }
        if !self.replayable() {
            Counters::bump(&self.shared.counters.not_replayable);
            if !verdict.check_spend_cap {
                self.note_server_delay(status, verdict.server_delay);
            }
            tracing::debug!(
                status = status.as_u16(),
                "response asks for a retry but the body was not kept; returned as is"
            );
            return Step::Return(Ok(response));
        }
        self.set_last(Some(status), None);
        let server_delay = verdict.server_delay;
        if !verdict.check_spend_cap {
            self.note_server_delay(status, server_delay);
        }
        // Planned before any body is read, so that a give-up can still
        // return the response untouched.
        match self.plan_retry(server_delay.map_or(Delay::Backoff, Delay::Server)) {
            Ok(planned) if verdict.check_spend_cap => Step::Read(
                response.into_body(),
                Then::Retry {
                    planned,
                    server_delay,
                },
            ),
            Ok(planned) => Step::Planned(planned),
            Err(err) => self.gave_up_on(response, err),
        }
    }

    /// The layer gave up on a request whose last attempt got `response`:
    /// the response as it came, or the error with the response in it once
    /// its body is read (by the [`GiveUpPolicy`]).
    fn gave_up_on<R>(&mut self, response: Response<R>, mut err: BoxError) -> Step<R> {
        if self.shared.config.give_up == GiveUpPolicy::LastResponse {
            return Step::Return(Ok(response));
        }
        let (parts, body) = response.into_parts();
        match err.downcast_mut::<Error>() {
            Some(
                Error::RetriesExhausted { response, .. }
                | Error::RetryAfterTooLong { response, .. },
            ) => {
                *response = Some(Box::new(LastResponse::new(parts.status, parts.headers)));
                Step::Read(body, Then::Fail(err))
            }
            _ => Step::Return(Err(err)),
        }
    }

    fn on_error<R>(&mut self, err: BoxError) -> Step<R> {
        if err.is::<DeadlineReached>() {
            // An inner layer stopped waiting at the request's deadline.
            self.set_last(None, Some(err));
            return Step::Return(Err(self.give_up(GiveUpReason::Deadline)));
        }
        let verdict = policy::judge_error(&err, &self.shared.config.classifier);
        if verdict == ErrorVerdict::Fatal {
            return Step::Return(Err(err));
        }
        if !self.replayable() {
            Counters::bump(&self.shared.counters.not_replayable);
            return Step::Return(Err(Box::new(Error::NotReplayable {
                status: None,
                source: Some(err),
            })));
        }
        let sent = verdict == ErrorVerdict::Backoff && policy::may_have_been_sent(&err);
        self.set_last(None, Some(err));
        if sent && self.shared.config.after_send == AfterSend::Fail {
            return Step::Return(Err(self.give_up(GiveUpReason::Sent)));
        }
        Step::Retry(match verdict {
            ErrorVerdict::After(d) => Delay::Local(d),
            _ if sent => Delay::Replay,
            _ => Delay::Backoff,
        })
    }
}

impl<S, B, R> Ctx<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// `Buffering`: reads the request body, once.
    fn poll_buffer(&mut self, buffer: &mut body::Buffer<B>, cx: &mut Context<'_>) -> Poll<Step<R>> {
        self.payload = match ready!(Pin::new(buffer).poll(cx)) {
            Ok(Buffered::Complete(kept)) => Payload::Replay(kept),
            Ok(Buffered::TooLarge(body)) => Payload::Once(Some(Box::new(body))),
            Err(e) => return Poll::Ready(Step::Return(Err(Box::new(Error::Body(e))))),
        };
        Poll::Ready(Step::Gate)
    }

    /// `Gate`: waits, readies the service, starts an attempt, or gives up.
    fn pass_gate(&mut self) -> Step<R> {
        match self.gate() {
            Err(e) => Step::Return(Err(e)),
            Ok(Gate::Wait(until)) => Step::Wait(until),
            Ok(Gate::NeedReady) => Step::Ready,
            Ok(Gate::Go) => Step::Call,
        }
    }

    /// `Waiting`: sleeps, and counts the time waited.
    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<Step<R>> {
        if let Some(history) = self.history.as_mut() {
            if let Some(sleep) = history.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
            }
            if let Some(started) = history.wait_started.take() {
                history.waited += started.elapsed();
            }
        }
        Poll::Ready(Step::Gate)
    }

    /// `Readying`: waits for the inner service to accept a retry.
    fn poll_service(&mut self, cx: &mut Context<'_>) -> Poll<Step<R>> {
        if let Err(e) = ready!(self.service.poll_ready(cx)) {
            return Poll::Ready(Step::Return(Err(e.into())));
        }
        self.ready = true;
        Poll::Ready(Step::Gate)
    }

    /// `Reading` is over: the spend-cap 429 fails; any other is retried as
    /// planned, or its body goes into the give-up error.
    fn after_error_body(&mut self, finished: bool, body: &[u8], then: Then) -> Step<R> {
        if finished && policy::is_spend_limit_body(body) {
            Counters::bump(&self.shared.counters.spend_limit);
            tracing::warn!("spend limit reached (enforced_spend_limit_reached); not retried");
            return Step::Return(Err(Box::new(Error::SpendLimitReached)));
        }
        match then {
            Then::Retry {
                mut planned,
                server_delay,
            } => {
                let status = self.last_status().unwrap_or(StatusCode::TOO_MANY_REQUESTS);
                self.note_server_delay(status, server_delay);
                // The delay counts from the end of the read.
                planned.wake = later(Instant::now(), planned.delay);
                if self.deadline().is_some_and(|d| planned.wake > d) {
                    return Step::Return(Err(self.give_up(GiveUpReason::Deadline)));
                }
                Step::Planned(planned)
            }
            Then::Fail(mut err) => {
                if let Some(
                    Error::RetriesExhausted {
                        response: Some(last),
                        ..
                    }
                    | Error::RetryAfterTooLong {
                        response: Some(last),
                        ..
                    },
                ) = err.downcast_mut::<Error>()
                {
                    last.set_body(body, finished);
                }
                Step::Return(Err(err))
            }
        }
    }
}

/// Reads an error body into `collected`: `true` once it ended, `false` if it
/// failed or passed [`ERROR_BODY_LIMIT`].
fn poll_error_body<R: Body>(
    mut body: Pin<&mut R>,
    collected: &mut Vec<u8>,
    cx: &mut Context<'_>,
) -> Poll<bool> {
    loop {
        match ready!(body.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Ok(mut data) = frame.into_data() {
                    while data.has_remaining() {
                        let chunk = data.chunk();
                        let n = chunk.len();
                        collected.extend_from_slice(chunk);
                        data.advance(n);
                    }
                    if collected.len() > ERROR_BODY_LIMIT {
                        return Poll::Ready(false);
                    }
                }
            }
            Some(Err(_)) => return Poll::Ready(false),
            None => return Poll::Ready(true),
        }
    }
}

impl<S, B, R> ResponseFuture<S, B, R>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<R>>,
{
    /// Begins a planned retry: waits for it, or goes to the gate at once.
    fn retry(state: Pin<&mut State<S::Future, R, B>>, ctx: &mut Ctx<S, B>, planned: &Planned) {
        ctx.begin_retry(planned);
        let mut state = state;
        if planned.wake > Instant::now() {
            ctx.start_wait(planned.wake);
            state.set(State::Waiting);
        } else {
            state.set(State::Gate);
        }
    }

    /// Moves to the state `step` names; `Some` with the output when it is the end.
    fn advance(
        mut state: Pin<&mut State<S::Future, R, B>>,
        ctx: &mut Ctx<S, B>,
        step: Step<R>,
    ) -> Option<Result<Response<R>, BoxError>> {
        match step {
            Step::Gate => state.set(State::Gate),
            Step::Wait(until) => {
                ctx.start_wait(until);
                state.set(State::Waiting);
            }
            Step::Ready => state.set(State::Readying),
            Step::Call => match ctx.call_next() {
                Ok(future) => state.set(State::Calling { future }),
                Err(e) => {
                    state.set(State::Done);
                    return Some(Err(e));
                }
            },
            Step::Read(body, then) => {
                ctx.start_reading();
                state.set(State::Reading {
                    body: Box::pin(body),
                    then,
                    collected: Vec::new(),
                });
            }
            Step::Retry(delay) => match ctx.plan_retry(delay) {
                Ok(planned) => Self::retry(state, ctx, &planned),
                Err(e) => {
                    state.set(State::Done);
                    return Some(Err(e));
                }
            },
            Step::Planned(planned) => Self::retry(state, ctx, &planned),
            Step::Return(out) => {
                state.set(State::Done);
                return Some(out);
            }
        }
        None
    }
}

impl<S, B, R> Future for ResponseFuture<S, B, R>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
    R: Body,
{
    type Output = Result<Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let ctx = this.ctx;
        let _entered = this.span.as_deref().map(tracing::Span::enter);
        loop {
            let step = match this.state.as_mut().project() {
                StateProj::Buffering { buffer } => ready!(ctx.poll_buffer(buffer, cx)),
                StateProj::Gate => ctx.pass_gate(),
                StateProj::Waiting => ready!(ctx.poll_wait(cx)),
                StateProj::Readying => ready!(ctx.poll_service(cx)),
                StateProj::Calling { future } => {
                    let polled = future.poll(cx);
                    // The common case, an answer below 400 (one no policy
                    // retries): returned as it came, without going through
                    // `Step` (each pass copies it), nor through a local
                    // (a copy of the whole response, whose body holds the
                    // inner layers' settlement).
                    if let Poll::Ready(Ok(response)) = &polled {
                        if response.status().as_u16() < 400 {
                            this.state.set(State::Done);
                            return polled.map_err(Into::into);
                        }
                    }
                    match ready!(polled) {
                        Ok(response) => ctx.on_response(response),
                        Err(e) => ctx.on_error(e.into()),
                    }
                }
                StateProj::Reading {
                    body,
                    then,
                    collected,
                } => {
                    // A body that stalls past the timeout is decided on as
                    // if it said nothing (and dropped, freeing what it holds).
                    let finished = match poll_error_body(body.as_mut(), collected, cx) {
                        Poll::Ready(finished) => finished,
                        Poll::Pending => {
                            ready!(ctx.poll_read_timeout(cx));
                            false
                        }
                    };
                    // Taken once: the state changes right after.
                    let then = std::mem::replace(then, Then::Fail(Box::new(DeadlineReached)));
                    ctx.after_error_body(finished, collected, then)
                }
                StateProj::Done => panic!("`retry::ResponseFuture` polled after completion"),
            };
            if let Some(out) = Self::advance(this.state.as_mut(), ctx, step) {
                return Poll::Ready(out);
            }
        }
    }
}

impl<S, B, R> fmt::Debug for ResponseFuture<S, B, R>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<R>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.ctx.attempts)
            .field("waited", &self.ctx.waited())
            .field("last_status", &self.ctx.last_status())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use std::convert::Infallible;

    type Fut = ResponseFuture<
        tower::util::ServiceFn<
            fn(
                Request<ReplayBody<Full<Bytes>>>,
            ) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>,
        >,
        Full<Bytes>,
        Full<Bytes>,
    >;

    /// The future is moved (copied) a few times before its first poll: a
    /// guard against it growing unnoticed (it was 672 bytes before the payload
    /// was slimmed down, 560 with a reader of its own for exact-size bodies,
    /// 584 with the crate's one `body::Buffer`, which the budget shares,
    /// 624 with the request's tracing span (40 bytes, no allocation) and its
    /// wait log (8), 544 once the body's reading moved into the state that
    /// reads it and the deadline was kept in the wait log only, 496 with
    /// what a request that waits or fails carries in its boxed history, 464
    /// with the span boxed, kept only when a subscriber wants it, and 240
    /// with the request head kept in the attempt's wait log, where a layer
    /// that holds the attempt can park the request on it). Every request waiting in an
    /// inner layer holds the context inline: it must not grow either (304
    /// bytes with the head, 80 without).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn future_stays_small() {
        let size = std::mem::size_of::<Fut>();
        assert!(size <= 240, "ResponseFuture is {size} bytes");
        let payload = std::mem::size_of::<Payload<Full<Bytes>>>();
        assert!(payload <= 48, "Payload is {payload} bytes");
        let ctx = std::mem::size_of::<Ctx<(), Full<Bytes>>>();
        assert!(ctx <= 80, "Ctx is {ctx} bytes");
    }
}
