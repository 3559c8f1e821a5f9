//! Helpers shared by the request-rewriting layers ([`autocache`](crate::autocache),
//! [`context`](crate::context), [`batch`](crate::batch)): reading a request
//! body whole, and reading the `usage` of a response body as it passes.

#[cfg(feature = "cache")]
use std::pin::Pin;
#[cfg(feature = "cache")]
use std::task::{Context, Poll};

#[cfg(feature = "cache")]
use bytes::Buf;
use bytes::Bytes;
use http_body::Body;
#[cfg(feature = "cache")]
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
#[cfg(feature = "cache")]
use pin_project_lite::pin_project;

#[cfg(feature = "cache")]
use crate::wire::json::UsageScanner;
#[cfg(feature = "cache")]
use crate::wire::{StreamUsage, Usage};
use crate::{BoxError, Error};

/// The largest request body the rewriting layers read whole: the retry
/// layer's replay buffer (16 MiB).
pub(crate) const DEFAULT_BODY_LIMIT: usize = crate::body::DEFAULT_BUFFER_LIMIT;

/// Reads a whole request body, at most `limit` bytes: a larger one, or one
/// that fails, is [`Error::Body`].
pub(crate) async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, Error>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(Error::Body(e)),
    }
}

/// Replaces a request's body bytes and fixes its `content-length`.
pub(crate) fn with_body<B: From<Bytes>>(
    parts: http::request::Parts,
    bytes: Bytes,
) -> http::Request<B> {
    let mut parts = parts;
    if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        parts.headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(bytes.len()),
        );
    }
    http::Request::from_parts(parts, B::from(bytes))
}

#[cfg(feature = "cache")]
pub use usage_body::UsageBody;

#[cfg(feature = "cache")]
mod usage_body {
    use super::*;

    /// How a body's usage is read: decided by its first byte that is not
    /// whitespace (`{` is a JSON message, anything else an event stream).
    #[derive(Debug)]
    enum Reader {
        Undecided,
        Json(UsageScanner),
        Sse(Box<StreamUsage>),
    }

    impl Reader {
        fn push(&mut self, chunk: &[u8]) {
            if let Reader::Undecided = self {
                match chunk.iter().find(|b| !b.is_ascii_whitespace()) {
                    None => return,
                    Some(b'{') => *self = Reader::Json(UsageScanner::new()),
                    Some(_) => *self = Reader::Sse(Box::default()),
                }
            }
            match self {
                Reader::Json(s) => s.push(chunk),
                Reader::Sse(s) => s.push(chunk),
                Reader::Undecided => {}
            }
        }

        fn finish(&mut self) -> Option<Usage> {
            match self {
                Reader::Json(s) => s.usage(),
                Reader::Sse(s) => {
                    s.finish();
                    s.started().then(|| s.usage())
                }
                Reader::Undecided => None,
            }
        }
    }

    /// Called once with the usage a response body reported, when it ended.
    pub(crate) type OnUsage = Box<dyn FnOnce(Usage) + Send + Sync>;

    pin_project! {
        /// A response body passed through unchanged, whose `usage` (JSON or event
        /// stream) is read as it passes and handed to a callback when the body
        /// ends. A body dropped before its end, or without a usage, reports nothing.
        pub struct UsageBody<B> {
            #[pin]
            inner: B,
            reader: Reader,
            on_usage: Option<OnUsage>,
        }
    }

    impl<B> std::fmt::Debug for UsageBody<B> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("UsageBody").finish_non_exhaustive()
        }
    }

    impl<B> UsageBody<B> {
        pub(crate) fn new(inner: B, on_usage: Option<OnUsage>) -> Self {
            UsageBody {
                inner,
                reader: Reader::Undecided,
                on_usage,
            }
        }
    }

    impl<B: Body> Body for UsageBody<B> {
        type Data = B::Data;
        type Error = B::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            let this = self.project();
            let polled = this.inner.poll_frame(cx);
            match &polled {
                Poll::Ready(Some(Ok(frame))) if this.on_usage.is_some() => {
                    if let Some(data) = frame.data_ref() {
                        this.reader.push(data.chunk());
                    }
                }
                Poll::Ready(None) => {
                    if let Some(report) = this.on_usage.take() {
                        if let Some(usage) = this.reader.finish() {
                            report(usage);
                        }
                    }
                }
                _ => {}
            }
            polled
        }

        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            self.inner.size_hint()
        }
    }
}
