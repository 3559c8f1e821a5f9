//! Enforce mode for servers whose error type is fixed (axum's `Router`):
//! [`EnforceLayer`], and the public pieces a gateway needs to answer in the
//! API's words ([`error_response`], [`forward_response`]).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::callers::CallerRefusal;
use super::config::KeyExtractor;
use super::count::HttpResponse;
use super::enforce::request_id;
use super::future::ResponseFuture;
use super::layer::TokenBudgetLayer;
use super::ledger::LedgerError;
use super::snapshot::BudgetSnapshot;
use super::usage::ResponseBody;
use super::{LimitsConfig, TokenBudget};
use crate::body::ReplayBody;
use crate::classify::{Class, Classifier};
use crate::headers::X_SHOULD_RETRY;
use crate::wire::error::{insert_retry_after, rate_limit_message, ErrorBody, ErrorKind};
use crate::{BoxError, Error};

/// A token budget in enforce mode whose service keeps the inner service's
/// error type: every refusal of its own is answered as a response in the
/// API's error shape, the way tower-http's layers answer theirs, so that
/// axum's `Router::layer(..)` takes it with no `HandleErrorLayer`.
///
/// | the budget's decision | answer |
/// |---|---|
/// | over the caller's budget now | 429 `rate_limit_error`, `retry-after` (whole seconds, rounded up) and `x-should-retry: true`, the caller's `anthropic-ratelimit-*` headers |
/// | can never fit the caller's limits | 429 `rate_limit_error`, `x-should-retry: false` |
/// | no key, an unknown key | 401 `authentication_error` |
/// | duplicate or conflicting keys, a `model` longer than any model's, a body that cannot be read | 400 `invalid_request_error` |
/// | a body over a size limit set outside (`http_body_util::Limited`, tower-http's `RequestBodyLimitLayer`) | 413 `request_too_large` |
/// | too many budget keys held | 529 `overloaded_error` |
/// | the ledger failed | 500 `api_error` |
///
/// Admitted answers carry the caller's `anthropic-ratelimit-*` headers (the
/// inner service's own are removed), as with [`TokenBudgetLayer::enforce`],
/// and are settled from their `usage`. The inner service's errors are
/// returned as they are (its error type must be a `std::error::Error`, as
/// axum's `Infallible` is); every other error becomes an answer through
/// [`error_response`].
///
/// # Examples
///
/// ```
/// use axum::{routing::post, Router};
/// use tower_llm_limits::budget::{Callers, EnforceLayer, Limits};
///
/// let callers = Callers::new().caller("team-a", "gw-key-of-team-a");
/// let enforce = EnforceLayer::new(Limits::new().rpm(20).itpm(10_000), callers);
/// let app: Router = Router::new()
///     .route("/v1/messages", post(|| async { "{}" }))
///     .layer(enforce.clone());
/// # let _ = (app, enforce.snapshot());
/// ```
#[derive(Clone, Debug)]
pub struct EnforceLayer {
    budget: TokenBudgetLayer,
}

impl EnforceLayer {
    /// Enforces `limits` per caller, callers told apart by `callers` (see
    /// [`TokenBudgetLayer::enforce`]).
    pub fn new(limits: impl Into<LimitsConfig>, callers: impl Into<KeyExtractor>) -> Self {
        Self::from_budget(TokenBudgetLayer::enforce(limits, callers))
    }

    /// Answers the refusals of `budget`, a layer built with
    /// [`TokenBudgetBuilder::enforce`](super::TokenBudgetBuilder::enforce)
    /// and any other setting. A budget in client mode works too: its errors
    /// ([`Error::BudgetExceeded`], a [`CallerRefusal`]) are answered as above.
    pub fn from_budget(budget: TokenBudgetLayer) -> Self {
        EnforceLayer { budget }
    }

    /// The token budget (shared with every service this layer builds).
    pub fn budget(&self) -> &TokenBudgetLayer {
        &self.budget
    }

    /// The state of the budget (see [`TokenBudgetLayer::snapshot`]).
    pub fn snapshot(&self) -> BudgetSnapshot {
        self.budget.snapshot()
    }
}

impl<S> Layer<S> for EnforceLayer {
    type Service = Enforce<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Enforce {
            budget: self.budget.layer(KeepError { inner }),
        }
    }
}

/// The service of an [`EnforceLayer`]: a [`TokenBudget`] whose error type is
/// the inner service's.
#[derive(Debug)]
pub struct Enforce<S> {
    budget: TokenBudget<KeepError<S>>,
}

impl<S: Clone> Clone for Enforce<S> {
    fn clone(&self) -> Self {
        Enforce {
            budget: self.budget.clone(),
        }
    }
}

impl<S> Enforce<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.budget.get_ref().inner
    }

    /// The state of the budget this service shares with its clones.
    pub fn snapshot(&self) -> BudgetSnapshot {
        self.budget.snapshot()
    }
}

impl<S, B, ResB> Service<Request<B>> for Enforce<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: StdError + Send + Sync + 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResB: Body,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = EnforceFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The budget's own readiness is the inner service's.
        self.budget.get_mut().inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        EnforceFuture {
            inner: self.budget.call(request),
        }
    }
}

pin_project! {
    /// The response future of [`Enforce`]: the budget's, with its errors
    /// answered (see [`EnforceLayer`]). Cancellation is the budget's: a
    /// dropped request gives back its place and its reservation.
    pub struct EnforceFuture<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
        S::Response: HttpResponse,
        S::Error: StdError,
        S::Error: Send,
        S::Error: Sync,
        S::Error: 'static,
    {
        #[pin]
        inner: ResponseFuture<KeepError<S>, B>,
    }
}

impl<S, B> fmt::Debug for EnforceFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Response: HttpResponse,
    S::Error: StdError + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnforceFuture")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, B, ResB> Future for EnforceFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>>,
    S::Error: StdError + Send + Sync + 'static,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
    ResB: Body,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match ready!(self.project().inner.poll(cx)) {
            Ok(response) => Poll::Ready(Ok(response)),
            Err(e) => match e.downcast::<Kept<S::Error>>() {
                Ok(kept) => Poll::Ready(Err(kept.0)),
                Err(e) => Poll::Ready(Ok(error_response(&*e).map(ResponseBody::full))),
            },
        }
    }
}

/// The inner service of the budget inside [`Enforce`]: the user's service,
/// its errors boxed as [`Kept`] so that they come out unchanged.
#[derive(Clone, Debug)]
pub(crate) struct KeepError<S> {
    inner: S,
}

impl<S, R> Service<R> for KeepError<S>
where
    S: Service<R>,
    S::Error: StdError + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = KeepErrorFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| Box::new(Kept(e)) as BoxError)
    }

    fn call(&mut self, request: R) -> Self::Future {
        KeepErrorFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// The future of [`KeepError`].
    #[derive(Debug)]
    pub(crate) struct KeepErrorFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, T, E> Future for KeepErrorFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: StdError + Send + Sync + 'static,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(self.project().inner.poll(cx));
        Poll::Ready(result.map_err(|e| Box::new(Kept(e)) as BoxError))
    }
}

/// An inner service's error on its way through the budget: its source is
/// the error itself, so that the budget still sees a refused connection.
struct Kept<E>(E);

impl<E> fmt::Debug for Kept<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kept(..)")
    }
}

impl<E> fmt::Display for Kept<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("inner service failed")
    }
}

impl<E: StdError + 'static> StdError for Kept<E> {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

/// The answer, in the API's error shape and with a `request-id`, that a
/// gateway gives for an error of this crate's layers or of its upstream:
///
/// | error (first found along the source chain) | answer |
/// |---|---|
/// | [`Error::BudgetExceeded`] | 429 `rate_limit_error`, `retry-after` and `x-should-retry: true` |
/// | [`Error::RetryAfterTooLong`] | 429 `rate_limit_error` (529 `overloaded_error` if that was the status), `retry-after` the server's delay |
/// | [`Error::RequestTooLarge`] | 429 `rate_limit_error`, `x-should-retry: false` |
/// | [`Error::SpendLimitReached`] | 429 `rate_limit_error` with `error_code: enforced_spend_limit_reached`, `x-should-retry: false` |
/// | [`Error::ModelTooLong`], [`Error::Body`] | 400 `invalid_request_error` |
/// | [`Error::ContextTooLarge`] | 400 `invalid_request_error`, `x-should-retry: false` |
/// | [`Error::Batch`] | 502 `api_error` |
/// | `http_body_util::LengthLimitError` | 413 `request_too_large` |
/// | [`Error::Overloaded`] | 529 `overloaded_error` |
/// | [`Error::RetriesExhausted`] | the last status's kind (429, 529), else 502 `api_error` |
/// | a [`CallerRefusal`] | its 401, 400 or 529 |
/// | a timeout ([`classify`](crate::classify)) | 504 `api_error` |
/// | a connection error, [`Error::NotReplayable`] | 502 `api_error` |
/// | a [`LedgerError`], anything else | 500 `api_error`, with a message that does not repeat the error's (it may name internal hosts) |
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_llm_limits::{budget::error_response, Dimension, Error};
///
/// let err = Error::BudgetExceeded { retry_in: Duration::from_millis(1_200), dimension: Dimension::Requests };
/// let response = error_response(&err);
/// assert_eq!(response.status(), 429);
/// assert_eq!(response.headers()["retry-after"], "2");
/// ```
pub fn error_response(err: &(dyn StdError + 'static)) -> Response<Bytes> {
    let id = request_id();
    let chain = || sources(err);
    if let Some(e) = chain().find_map(|e| e.downcast_ref::<Error>()) {
        if let Some(response) = crate_error_response(e, &id) {
            return response;
        }
    }
    if let Some(refusal) = chain().find_map(|e| e.downcast_ref::<CallerRefusal>()) {
        return ErrorBody::new(refusal.kind(), &refusal.to_string())
            .with_request_id(&id)
            .into_response();
    }
    let too_long = |e: &(dyn StdError + 'static)| e.is::<http_body_util::LengthLimitError>();
    if chain().any(too_long) {
        return ErrorBody::new(ErrorKind::RequestTooLarge, "request body too large")
            .with_request_id(&id)
            .into_response();
    }
    if let Some(e) = chain().find(|e| e.is::<Error>()) {
        // The body of a request could not be read.
        return ErrorBody::new(ErrorKind::InvalidRequest, &e.to_string())
            .with_request_id(&id)
            .into_response();
    }
    let (status, message) = match Classifier::new().classify(err) {
        _ if chain().any(|e| e.is::<LedgerError>()) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "rate limiter unavailable",
        ),
        Class::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
        Class::Connection => (StatusCode::BAD_GATEWAY, "upstream connection failed"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    };
    tracing::debug!(error = %err, status = status.as_u16(), "answering an error");
    ErrorBody::new(ErrorKind::Api, message)
        .with_request_id(&id)
        .into_response_with(status)
}

/// An error and its sources, outermost first.
fn sources<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> + 'a {
    std::iter::successors(Some(err), |e| (*e).source())
}

/// The answer to one of this crate's errors, or `None` for [`Error::Body`]
/// (answered after a size limit is looked for in its sources).
fn crate_error_response(e: &Error, id: &str) -> Option<Response<Bytes>> {
    let message = e.to_string();
    let answer = |kind: ErrorKind| ErrorBody::new(kind, &message).with_request_id(id);
    let response = match e {
        Error::BudgetExceeded {
            retry_in,
            dimension,
        } => {
            let message = rate_limit_message(None, *dimension, None);
            let mut response = ErrorBody::new(ErrorKind::RateLimit, &message)
                .with_request_id(id)
                .into_response();
            insert_retry_after(response.headers_mut(), *retry_in);
            response
        }
        Error::RetryAfterTooLong { delay, status, .. } => {
            let kind = status_kind(*status).unwrap_or(ErrorKind::RateLimit);
            let mut response = answer(kind).into_response();
            insert_retry_after(response.headers_mut(), *delay);
            response
        }
        Error::RequestTooLarge { .. } => no_retry(answer(ErrorKind::RateLimit).into_response()),
        Error::SpendLimitReached => no_retry(
            answer(ErrorKind::RateLimit)
                .with_error_code("enforced_spend_limit_reached")
                .into_response(),
        ),
        Error::ModelTooLong { .. } => answer(ErrorKind::InvalidRequest).into_response(),
        Error::Overloaded { .. } => answer(ErrorKind::Overloaded).into_response(),
        Error::RetriesExhausted { last_status, .. } => match last_status.and_then(status_kind) {
            Some(kind) => answer(kind).into_response(),
            None => answer(ErrorKind::Api).into_response_with(StatusCode::BAD_GATEWAY),
        },
        Error::NotReplayable { .. } => {
            answer(ErrorKind::Api).into_response_with(StatusCode::BAD_GATEWAY)
        }
        Error::ContextTooLarge { .. } => {
            no_retry(answer(ErrorKind::InvalidRequest).into_response())
        }
        Error::Batch { .. } => answer(ErrorKind::Api).into_response_with(StatusCode::BAD_GATEWAY),
        Error::Body(_) => return None,
        // A variant added later is an internal error until it is mapped.
        #[allow(unreachable_patterns)]
        _ => answer(ErrorKind::Api).into_response(),
    };
    Some(response)
}

/// The error kind of a status the API refuses with for pacing: 429, 529.
fn status_kind(status: StatusCode) -> Option<ErrorKind> {
    match status.as_u16() {
        429 => Some(ErrorKind::RateLimit),
        529 => Some(ErrorKind::Overloaded),
        _ => None,
    }
}

/// Tells the caller that trying again cannot help.
fn no_retry(mut response: Response<Bytes>) -> Response<Bytes> {
    response
        .headers_mut()
        .insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    response
}

/// The upstream's headers a gateway passes on to its caller: what an API
/// client reads (`content-type`, `request-id`, `retry-after`,
/// `retry-after-ms`, `x-should-retry`). The upstream's
/// `anthropic-ratelimit-*` headers (the organization's limits) are not among
/// them, nor are hop-by-hop headers.
pub const FORWARDED_HEADERS: [HeaderName; 5] = [
    http::header::CONTENT_TYPE,
    crate::wire::error::REQUEST_ID,
    http::header::RETRY_AFTER,
    HeaderName::from_static("retry-after-ms"),
    X_SHOULD_RETRY,
];

/// Copies the [`FORWARDED_HEADERS`] present in `from` into `to`, replacing
/// what `to` had for them.
pub fn copy_forwarded_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for name in FORWARDED_HEADERS {
        let mut values = from.get_all(&name).iter();
        if let Some(first) = values.next() {
            to.insert(name.clone(), first.clone());
            for value in values {
                to.append(name.clone(), value.clone());
            }
        }
    }
}

/// An upstream's answer as a gateway returns it to its caller: the same
/// status and body (streamed as it comes), and only the
/// [`FORWARDED_HEADERS`].
///
/// # Examples
///
/// ```
/// use tower_llm_limits::budget::forward_response;
///
/// let upstream = http::Response::builder()
///     .status(429)
///     .header("retry-after", "3")
///     .header("anthropic-ratelimit-requests-limit", "4000")
///     .header("connection", "keep-alive")
///     .body("{}")
///     .unwrap();
/// let answer = forward_response(upstream);
/// assert_eq!(answer.status(), 429);
/// assert_eq!(answer.headers()["retry-after"], "3");
/// assert_eq!(answer.headers().len(), 1);
/// ```
pub fn forward_response<B>(upstream: Response<B>) -> Response<B> {
    let (parts, body) = upstream.into_parts();
    let mut answer = Response::new(body);
    *answer.status_mut() = parts.status;
    copy_forwarded_headers(&parts.headers, answer.headers_mut());
    answer
}
