//! The crate's error type.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

/// The longest `model` name a request may carry, in bytes.
pub(crate) const MAX_MODEL_LEN: usize = 256;

/// An error from a boxed service: the type tower middleware passes between layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One of the three per-minute limits the API enforces for a model class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// Requests per minute (RPM).
    Requests,
    /// Uncached input tokens per minute (ITPM).
    InputTokens,
    /// Output tokens per minute (OTPM).
    OutputTokens,
}

impl Dimension {
    /// All three dimensions, in the order the ledger checks them.
    pub const ALL: [Dimension; 3] = [
        Dimension::Requests,
        Dimension::InputTokens,
        Dimension::OutputTokens,
    ];

    /// The name the API uses in its `anthropic-ratelimit-*` headers:
    /// `requests`, `input-tokens` or `output-tokens`.
    pub fn header_name(self) -> &'static str {
        match self {
            Dimension::Requests => "requests",
            Dimension::InputTokens => "input-tokens",
            Dimension::OutputTokens => "output-tokens",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dimension::Requests => "requests per minute",
            Dimension::InputTokens => "input tokens per minute",
            Dimension::OutputTokens => "output tokens per minute",
        })
    }
}

/// Why the retry layer stopped retrying a request that could still have failed
/// transiently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GiveUpReason {
    /// The configured maximum number of retries was reached.
    MaxRetries,
    /// The next attempt would have started after the request's deadline.
    Deadline,
    /// The retry budget shared by the layer's clones had no retry left.
    Budget,
    /// The attempt failed after it may have reached the server (a connection
    /// reset mid-request, say), and the layer was built with
    /// [`AfterSend::Fail`](crate::retry::AfterSend::Fail): sending it again
    /// could make the server do the work twice.
    Sent,
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GiveUpReason::MaxRetries => "maximum retries reached",
            GiveUpReason::Deadline => "deadline reached",
            GiveUpReason::Budget => "retry budget exhausted",
            GiveUpReason::Sent => "not replayed: the request may have reached the server",
        })
    }
}

/// The last response of a request the retry layer gave up on, kept in its
/// error ([`Error::RetriesExhausted`], [`Error::RetryAfterTooLong`]) as the
/// official SDKs keep it in theirs: the status, every header (the
/// `request-id` to quote to support, the `anthropic-ratelimit-*` state),
/// and the body, up to [`LastResponse::BODY_LIMIT`] bytes.
///
/// The body is read within the retry layer's
/// [`error_body_timeout`](crate::retry::RetryAfterBuilder::error_body_timeout);
/// [`body_complete`](Self::body_complete) tells whether it was read to its
/// end. Its `Debug` shows the status, the `request-id`, the header names
/// (not their values) and the body's length: no value that could be a
/// credential or a cookie is printed.
#[derive(Clone)]
pub struct LastResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    complete: bool,
}

impl LastResponse {
    /// The most body bytes kept: 64 KiB (an API error body is well under
    /// 1 KiB). A longer body is cut there and not marked complete.
    pub const BODY_LIMIT: usize = 64 * 1024;

    /// A response head, with its body to come.
    #[cfg_attr(not(feature = "retry"), allow(dead_code))]
    pub(crate) fn new(status: StatusCode, headers: HeaderMap) -> Self {
        LastResponse {
            status,
            headers,
            body: Bytes::new(),
            complete: false,
        }
    }

    /// Sets the body read (cut at [`BODY_LIMIT`](Self::BODY_LIMIT)).
    #[cfg_attr(not(feature = "retry"), allow(dead_code))]
    pub(crate) fn set_body(&mut self, body: &[u8], ended: bool) {
        let kept = body.len().min(Self::BODY_LIMIT);
        self.body = Bytes::copy_from_slice(&body[..kept]);
        self.complete = ended && kept == body.len();
    }

    /// The response's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response's headers, all of them.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The `request-id` header, the id Anthropic's support asks for.
    pub fn request_id(&self) -> Option<&str> {
        self.headers.get("request-id").and_then(|v| v.to_str().ok())
    }

    /// The body as read: at most [`BODY_LIMIT`](Self::BODY_LIMIT) bytes.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Whether [`body`](Self::body) is the whole body (it ended within the
    /// read timeout and the limit).
    pub fn body_complete(&self) -> bool {
        self.complete
    }
}

impl fmt::Debug for LastResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Names<'a>(&'a HeaderMap);
        impl fmt::Debug for Names<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(self.0.keys()).finish()
            }
        }
        f.debug_struct("LastResponse")
            .field("status", &self.status)
            .field("request_id", &self.request_id())
            .field("headers", &Names(&self.headers))
            .field("body_len", &self.body.len())
            .field("body_complete", &self.complete)
            .finish()
    }
}

/// The errors this crate's layers produce.
///
/// Boxed as [`BoxError`] where a layer meets others; use
/// `err.downcast_ref::<tower_llm_limits::Error>()` to act on one.
///
/// Every layer's service returns [`tower::BoxError`](https://docs.rs/tower/latest/tower/type.BoxError.html)
/// (`Box<dyn std::error::Error + Send + Sync>`), as tower's own middleware does, so
/// that layers compose with each other and with tower's. Errors made by this crate
/// are an [`Error`] inside that box: downcast to act on them. The inner
/// service's own errors are not wrapped: they pass through boxed as they are,
/// as tower's `Timeout` passes them.
///
/// ```
/// use tower_llm_limits::Error;
///
/// fn what_to_do(err: &(dyn std::error::Error + Send + Sync + 'static)) -> String {
///     match err.downcast_ref::<Error>() {
///         Some(Error::BudgetExceeded { retry_in, .. }) => format!("come back in {retry_in:?}"),
///         Some(other) => format!("give up: {other}"),
///         None => format!("transport error: {err}"),
///     }
/// }
/// # let e: Box<dyn std::error::Error + Send + Sync> = Box::new(Error::Overloaded { waiting: 3 });
/// # assert!(what_to_do(&*e).starts_with("give up"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The request failed transiently on every attempt the retry layer was allowed.
    RetriesExhausted {
        /// Attempts made, the first included.
        attempts: u32,
        /// Total time the request spent waiting: the retry layer's cooldowns
        /// and backoff, and the waits of the layers inside it (the token
        /// budget's queue, the concurrency queue).
        waited: Duration,
        /// Status of the last response, if the last attempt got one.
        last_status: Option<StatusCode>,
        /// Which bound stopped the retries.
        reason: GiveUpReason,
        /// The last inner error, if the last attempt failed without a response.
        source: Option<BoxError>,
        /// The last response (status, headers, `request-id`, the start of
        /// its body), if the last attempt got one. See [`LastResponse`].
        response: Option<Box<LastResponse>>,
    },
    /// The server asked for a delay longer than the configured cap, so the retry
    /// layer returned at once instead of waiting. The caller decides.
    RetryAfterTooLong {
        /// The delay the server asked for.
        delay: Duration,
        /// The status that carried it (usually 429).
        status: StatusCode,
        /// Attempts made so far, the first included.
        attempts: u32,
        /// The response that named the delay (status, headers,
        /// `request-id`, the start of its body). See [`LastResponse`].
        response: Option<Box<LastResponse>>,
    },
    /// The organisation's monthly spend limit was reached (a 429 whose error
    /// body says `enforced_spend_limit_reached`). Retrying cannot succeed until
    /// the limit is raised or the month turns, so this is never retried.
    SpendLimitReached,
    /// A request needed a retry but its body could not be kept for a replay
    /// (larger than the buffer limit, or a stream of unknown size that grew past it).
    NotReplayable {
        /// Status of the response that asked for the retry, if any.
        status: Option<StatusCode>,
        /// The inner error that asked for the retry, if there was no response.
        source: Option<BoxError>,
    },
    /// The token budget cannot admit the request now (reject mode, or a gateway
    /// enforcing a caller's budget). It could be admitted after `retry_in`.
    BudgetExceeded {
        /// How long until the budget could admit the request.
        retry_in: Duration,
        /// The limit that blocked it.
        dimension: Dimension,
    },
    /// The request can never fit the limit: its cost is above the whole capacity
    /// of one dimension. It was not sent.
    RequestTooLarge {
        /// The limit it can never fit.
        dimension: Dimension,
        /// What the request would cost.
        cost: u64,
        /// The whole capacity of that limit.
        limit: u64,
    },
    /// The request's `model` is longer than 256 bytes (no model name is). It
    /// was not sent, and nothing was charged for it; a gateway in
    /// enforce mode answers it with a 400 `invalid_request_error`.
    ModelTooLong {
        /// The length of the name, in bytes.
        len: usize,
    },
    /// The concurrency layer's wait queue is full: the request was shed at
    /// once, without being sent. Local back-pressure: the retry layer returns
    /// it as is (no retry, nothing charged to its retry budget) and the token
    /// budget refunds the request's reservation in full.
    Overloaded {
        /// Requests already waiting when this one was shed.
        waiting: usize,
    },
    /// A request body could not be read.
    Body(BoxError),
    /// The request resends more input tokens than the context guard's cap
    /// allows (after its trim callback, if any): it was not sent. Never
    /// retried: the same request would be refused again.
    ContextTooLarge {
        /// The request's estimated input tokens (cached and uncached).
        tokens: u64,
        /// The configured cap.
        cap: u64,
    },
    /// A request sent through the Message Batches API ended without a message.
    Batch {
        /// The batch it went out in, if it was submitted.
        batch_id: Option<String>,
        /// How it ended.
        end: BatchEnd,
        /// What the server or the transport said.
        detail: String,
    },
}

/// How a request sent through the Message Batches API ended without a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchEnd {
    /// The batch was canceled before this request was processed.
    Canceled,
    /// The batch did not finish within the API's 24 hours.
    Expired,
    /// The batch could not be submitted or its results could not be read.
    Failed,
}

impl Error {
    /// The last response of a request the retry layer gave up on
    /// ([`Error::RetriesExhausted`] or [`Error::RetryAfterTooLong`]), if the
    /// last attempt got one.
    pub fn last_response(&self) -> Option<&LastResponse> {
        match self {
            Error::RetriesExhausted { response, .. }
            | Error::RetryAfterTooLong { response, .. } => response.as_deref(),
            _ => None,
        }
    }

    /// How long the caller should wait before trying again, where the error says.
    pub fn retry_in(&self) -> Option<Duration> {
        match self {
            Error::RetryAfterTooLong { delay, .. } => Some(*delay),
            Error::BudgetExceeded { retry_in, .. } => Some(*retry_in),
            _ => None,
        }
    }

    /// Whether trying the same request again later could succeed.
    ///
    /// False for [`Error::SpendLimitReached`], [`Error::RequestTooLarge`],
    /// [`Error::ModelTooLong`] and [`Error::ContextTooLarge`].
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            Error::SpendLimitReached
                | Error::RequestTooLarge { .. }
                | Error::ModelTooLong { .. }
                | Error::ContextTooLarge { .. }
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::RetriesExhausted {
                attempts,
                waited,
                last_status,
                reason,
                ..
            } => {
                write!(f, "request failed after {attempts} attempts ({reason}")?;
                if let Some(status) = last_status {
                    write!(f, ", last status {status}")?;
                }
                write!(f, ", waited {waited:?}")?;
                if let Some(id) = self.last_response().and_then(LastResponse::request_id) {
                    write!(f, ", request-id {id}")?;
                }
                f.write_str(")")
            }
            Error::RetryAfterTooLong { delay, status, .. } => write!(
                f,
                "server asked to retry after {delay:?} ({status}), above the configured cap"
            ),
            Error::SpendLimitReached => {
                f.write_str("the organisation's spend limit was reached; not retried")
            }
            Error::NotReplayable { status, .. } => match status {
                Some(status) => write!(
                    f,
                    "response {status} asked for a retry but the request body could not be kept"
                ),
                None => f.write_str("request failed and its body could not be kept for a retry"),
            },
            Error::BudgetExceeded {
                retry_in,
                dimension,
            } => write!(f, "{dimension} budget exceeded; retry in {retry_in:?}"),
            Error::RequestTooLarge {
                dimension,
                cost,
                limit,
            } => write!(
                f,
                "request costs {cost} against a limit of {limit} {dimension}: it can never fit"
            ),
            Error::ModelTooLong { len } => write!(
                f,
                "model name of {len} bytes, above the {MAX_MODEL_LEN} accepted; request not sent"
            ),
            Error::Overloaded { waiting } => {
                write!(
                    f,
                    "concurrency queue full ({waiting} waiting); request shed"
                )
            }
            Error::Body(_) => f.write_str("failed to read the request body"),
            Error::ContextTooLarge { tokens, cap } => write!(
                f,
                "request resends {tokens} input tokens, above the context cap of {cap}; not sent"
            ),
            Error::Batch {
                batch_id,
                end,
                detail,
            } => {
                let how = match end {
                    BatchEnd::Canceled => "was canceled",
                    BatchEnd::Expired => "expired",
                    BatchEnd::Failed => "failed",
                };
                match batch_id {
                    Some(id) => write!(f, "batched request {how} (batch {id}): {detail}"),
                    None => write!(f, "batched request {how} before submission: {detail}"),
                }
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::RetriesExhausted {
                source: Some(e), ..
            }
            | Error::NotReplayable {
                source: Some(e), ..
            }
            | Error::Body(e) => Some(&**e as &(dyn std::error::Error + 'static)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stays_small() {
        assert!(
            std::mem::size_of::<Error>() <= 64,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn boxes_and_downcasts() {
        let e: BoxError = Box::new(Error::BudgetExceeded {
            retry_in: Duration::from_secs(3),
            dimension: Dimension::InputTokens,
        });
        let back = e.downcast_ref::<Error>().map(Error::retry_in);
        assert_eq!(back, Some(Some(Duration::from_secs(3))));
        assert_eq!(
            e.to_string(),
            "input tokens per minute budget exceeded; retry in 3s"
        );
    }

    #[test]
    fn source_chains_to_inner() {
        let inner: BoxError = "connection reset".into();
        let e = Error::RetriesExhausted {
            attempts: 3,
            waited: Duration::from_millis(1500),
            last_status: None,
            reason: GiveUpReason::MaxRetries,
            source: Some(inner),
            response: None,
        };
        let src = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(src.as_deref(), Some("connection reset"));
        assert!(e.is_transient());
        assert!(!Error::SpendLimitReached.is_transient());
    }
}
