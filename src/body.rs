//! Request bodies that can be sent again.
//!
//! To retry a request, its body must be kept. The retry and budget layers read
//! a body once, up to a limit (16 MiB unless configured with their
//! `buffer_limit` setters):
//!
//! - a body that ends within the limit is kept: cheap to clone
//!   (reference-counted [`Bytes`]) and replayed any number of times,
//!   trailers included;
//! - a larger body (known from its size hint, without reading it) or one of
//!   unknown size that grows past the limit is passed on as the frames
//!   already read followed by the rest of the original body, unchanged. It
//!   can be sent once and is not retryable.
//!
//! Either way no byte is lost, duplicated or reordered.
//!
//! Both come out as a [`ReplayBody`], the body type the retry and budget layers
//! hand to the service they wrap. A layer that buffered a body completely also
//! puts its bytes on the request as a [`BufferedBytes`] extension, so that an
//! inner layer (the budget's token estimator) reads them there instead of
//! reading, or copying, the body again.
//!
//! It does not spill to disk or stream a replay of a body larger than the
//! limit: such a request is sent once and is not retried. Nor does it look
//! inside the bytes (the estimator does).
//!
//! # Examples
//!
//! The retry layer keeps the body and sends it again; the service it wraps
//! gets a [`ReplayBody`] and the [`BufferedBytes`]:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_llm_limits::body::{BufferedBytes, ReplayBody};
//! use tower_llm_limits::retry::RetryAfterLayer;
//! use tower_llm_limits::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = Arc::clone(&seen);
//! // Answers 503 to the first attempt, 200 to the next.
//! let upstream = service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
//!     let log = Arc::clone(&log);
//!     async move {
//!         let kept = req.extensions().get::<BufferedBytes>().map(|b| b.0.clone());
//!         let body = req.into_body().collect().await?.to_bytes();
//!         assert_eq!(kept.as_ref(), Some(&body));
//!         let attempt = {
//!             let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
//!             log.push(body);
//!             log.len()
//!         };
//!         let status = if attempt == 1 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
//!         Ok::<_, BoxError>(Response::builder().status(status).body(Full::new(Bytes::new()))?)
//!     }
//! });
//! let retry = RetryAfterLayer::builder().jitter(|| 0.0).build();
//! let client = ServiceBuilder::new().layer(retry).service(upstream);
//!
//! let body = Full::new(Bytes::from_static(br#"{"model":"claude-sonnet-4-5"}"#));
//! let response = client.oneshot(Request::post("/v1/messages").body(body)?).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
//! assert_eq!(seen.len(), 2);
//! assert_eq!(seen[0], seen[1]); // the same bytes, sent twice
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::BoxError;

/// The default largest body kept for replay: 16 MiB.
pub(crate) const DEFAULT_BUFFER_LIMIT: usize = 16 * 1024 * 1024;

/// Request extension: the complete bytes of the request's body, put there by a
/// layer that buffered it, so inner layers need not read it again.
///
/// The bytes are shared with the body (no copy). A layer that changes the body
/// must remove the extension.
#[derive(Debug, Clone)]
pub struct BufferedBytes(pub Bytes);

pin_project! {
    /// A request body that is either a replay of buffered bytes or the original
    /// body passed through (after the frames already read from it, if any).
    ///
    /// Its data are [`Bytes`] and its error is a [`BoxError`].
    #[derive(Debug)]
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Full {
            data: Option<Bytes>,
            // Boxed: requests rarely have trailers, and every future that
            // holds a request holds this inline.
            trailers: Option<Box<HeaderMap>>,
        },
        Stream {
            // Boxed, and `None` for a body passed through unread (the
            // common case): every future that holds a request holds this
            // inline, and a layer's body may wrap another's.
            prefix: Option<Box<Prefix>>,
            #[pin]
            rest: B,
            done: bool,
        },
    }
}

/// The frames read from a body before it was passed on (never empty), and
/// the length of their data.
#[derive(Debug)]
struct Prefix {
    frames: VecDeque<Frame<Bytes>>,
    len: u64,
}

impl<B> ReplayBody<B> {
    /// A body of these bytes, then these trailers.
    pub fn full(bytes: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self::full_boxed(bytes, trailers.map(Box::new))
    }

    fn full_boxed(bytes: Bytes, trailers: Option<Box<HeaderMap>>) -> Self {
        ReplayBody {
            kind: Kind::Full {
                data: (!bytes.is_empty()).then_some(bytes),
                trailers,
            },
        }
    }

    /// The original body, passed through unchanged.
    pub fn passthrough(body: B) -> Self {
        Self::prefixed(VecDeque::new(), body)
    }

    fn prefixed(frames: VecDeque<Frame<Bytes>>, rest: B) -> Self {
        let prefix = (!frames.is_empty()).then(|| {
            let len = frames
                .iter()
                .filter_map(Frame::data_ref)
                .map(|d| d.len() as u64)
                .sum();
            Box::new(Prefix { frames, len })
        });
        ReplayBody {
            kind: Kind::Stream {
                prefix,
                rest,
                done: false,
            },
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            KindProj::Stream { prefix, rest, done } => {
                if let Some(p) = prefix.as_mut() {
                    let frame = p.frames.pop_front();
                    if let Some(d) = frame.as_ref().and_then(Frame::data_ref) {
                        p.len = p.len.saturating_sub(d.len() as u64);
                    }
                    if p.frames.is_empty() {
                        *prefix = None;
                    }
                    if let Some(frame) = frame {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                if *done {
                    return Poll::Ready(None);
                }
                match rest.poll_frame(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(None) => {
                        *done = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(
                        frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                    ))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Stream { prefix, rest, done } => {
                prefix.is_none() && (*done || rest.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { prefix, rest, done } => {
                let prefix_len = prefix.as_ref().map_or(0, |p| p.len);
                if *done {
                    return SizeHint::with_exact(prefix_len);
                }
                let hint = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower().saturating_add(prefix_len));
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper.saturating_add(prefix_len));
                }
                out
            }
        }
    }
}

/// A body read completely: its bytes and trailers, replayable any number of times.
#[derive(Debug, Clone, Default)]
pub(crate) struct BufferedBody {
    bytes: Bytes,
    /// Boxed: rare, and a `HeaderMap` is large (a response future holds this inline).
    trailers: Option<Box<HeaderMap>>,
}

impl BufferedBody {
    /// The body's bytes.
    pub(crate) fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The body's trailers, if it had any.
    #[cfg(test)]
    pub(crate) fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_deref()
    }

    /// A new body yielding the same bytes and trailers. The bytes are shared, not copied.
    pub(crate) fn replay<B>(&self) -> ReplayBody<B> {
        ReplayBody::full_boxed(self.bytes.clone(), self.trailers.clone())
    }
}

/// What [`buffer`] made of a body.
#[derive(Debug)]
pub(crate) enum Buffered<B> {
    /// The whole body, within the limit.
    Complete(BufferedBody),
    /// The body is larger than the limit: the frames already read followed by
    /// the rest of the original, as one body that can be sent once.
    TooLarge(ReplayBody<B>),
}

/// Reads `body` into memory if it fits in `limit` bytes: a [`Buffer`] future.
///
/// A body whose size hint says it is larger is not read at all. A body of
/// unknown size is read until it ends or passes the limit; in the second case
/// what was read is kept in front of the rest (see [`Buffered::TooLarge`]).
/// A body of a single data frame is kept without a copy; several frames are
/// joined once, at the end.
///
/// `Pin<Box<B>>` is `Unpin` and a body too, for bodies that are not `Unpin`.
///
/// # Errors
///
/// The body's own error, if reading it failed; the request cannot be sent then.
/// A body that yields more bytes than its exact size hint announced is
/// malformed (hyper refuses to send it too): an error, rather than reading it
/// without bound.
///
/// # Cancellation
///
/// Dropping the future drops the body and what was read of it.
pub(crate) fn buffer<B>(body: B, limit: usize) -> Buffer<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    let hint = body.size_hint();
    Buffer {
        body: Some(body),
        limit: limit as u64,
        exact: hint.exact().unwrap_or(u64::MAX),
        total: 0,
        data: Chunks::Empty,
        trailers: None,
    }
}

/// The data frames read so far: none, one (kept without a copy), or several.
#[derive(Debug)]
enum Chunks {
    Empty,
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Chunks {
    fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::replace(self, Chunks::Empty) {
            Chunks::Empty => Chunks::One(chunk),
            Chunks::One(first) => Chunks::Many(vec![first, chunk]),
            Chunks::Many(mut all) => {
                all.push(chunk);
                Chunks::Many(all)
            }
        };
    }

    /// The chunks as one [`Bytes`]: a copy only if there were several.
    fn join(self, total: u64) -> Bytes {
        match self {
            Chunks::Empty => Bytes::new(),
            Chunks::One(bytes) => bytes,
            Chunks::Many(all) => {
                let mut joined = BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
                for chunk in &all {
                    joined.extend_from_slice(chunk);
                }
                joined.freeze()
            }
        }
    }

    /// The chunks as frames, in order.
    fn into_frames(self) -> VecDeque<Frame<Bytes>> {
        match self {
            Chunks::Empty => VecDeque::new(),
            Chunks::One(bytes) => VecDeque::from([Frame::data(bytes)]),
            Chunks::Many(all) => all.into_iter().map(Frame::data).collect(),
        }
    }
}

/// The future of [`buffer`]: reads a request body into memory, up to a limit.
///
/// Resolves to [`Buffered::Complete`] for a body that ended within the limit,
/// or [`Buffered::TooLarge`] (the frames read so far, then the rest of the
/// body) for one that is larger. It is `Unpin`, and a named type, so that a
/// response future holds it inline, without a box.
///
/// # Errors
///
/// See [`buffer`].
///
/// # Cancellation
///
/// Dropping it drops the body and what was read of it.
///
/// # Panics
///
/// Polling it again after it returned `Ready` panics with
/// "`body::Buffer` polled after completion", as futures-util's futures do.
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub(crate) struct Buffer<B> {
    /// The body being read; `None` once the future returned.
    body: Option<B>,
    limit: u64,
    /// The exact size the body announced (the most it may yield), or
    /// `u64::MAX` if it did not announce one.
    exact: u64,
    /// Data bytes read so far.
    total: u64,
    data: Chunks,
    trailers: Option<Box<HeaderMap>>,
}

impl<B> Buffer<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// Reads frames until the body ends (`Ok(true)`) or passes the limit
    /// (`Ok(false)`).
    fn poll_read(
        body: &mut B,
        this: &mut Self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<bool, BoxError>> {
        while !body.is_end_stream() {
            let Some(frame) = ready!(Pin::new(&mut *body).poll_frame(cx)) else {
                break;
            };
            match frame.map_err(Into::into)?.into_data() {
                Ok(mut data) => {
                    let len = data.remaining();
                    this.total = this.total.saturating_add(len as u64);
                    if this.total > this.exact {
                        return Poll::Ready(Err(
                            "request body longer than its exact size hint".into()
                        ));
                    }
                    if len > 0 {
                        this.data.push(data.copy_to_bytes(len));
                    }
                    if this.total > this.limit {
                        return Poll::Ready(Ok(false));
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        match this.trailers.as_mut() {
                            Some(all) => all.extend(t),
                            None => this.trailers = Some(Box::new(t)),
                        }
                    }
                }
            }
        }
        Poll::Ready(Ok(true))
    }

    /// What was read, then `body`: a body that can be sent once.
    fn too_large(&mut self, body: B) -> Buffered<B> {
        let mut frames = std::mem::replace(&mut self.data, Chunks::Empty).into_frames();
        if let Some(t) = self.trailers.take() {
            frames.push_back(Frame::trailers(*t));
        }
        Buffered::TooLarge(ReplayBody::prefixed(frames, body))
    }
}

impl<B> Future for Buffer<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<Buffered<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(mut body) = this.body.take() else {
            panic!("`body::Buffer` polled after completion");
        };
        let nothing_read = this.total == 0 && this.trailers.is_none();
        if nothing_read && body.size_hint().lower() > this.limit {
            return Poll::Ready(Ok(Buffered::TooLarge(ReplayBody::passthrough(body))));
        }
        let read = Self::poll_read(&mut body, this, cx);
        let Poll::Ready(read) = read else {
            this.body = Some(body);
            return Poll::Pending;
        };
        Poll::Ready(match read {
            Err(e) => Err(e),
            Ok(false) => Ok(this.too_large(body)),
            Ok(true) => {
                let data = std::mem::replace(&mut this.data, Chunks::Empty);
                Ok(Buffered::Complete(BufferedBody {
                    bytes: data.join(this.total),
                    trailers: this.trailers.take(),
                }))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::convert::Infallible;

    type Frames = Vec<Result<Frame<Bytes>, Infallible>>;

    /// Every request a layer holds (the concurrency queue's, the budget's
    /// while it waits) holds its body inline, and the preset's transport
    /// gets one replay body inside another: a guard against them growing
    /// (80 and 128 bytes while the frames read before a body was passed on
    /// were held inline).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn replay_bodies_stay_small() {
        let one = std::mem::size_of::<ReplayBody<Full<Bytes>>>();
        let two = std::mem::size_of::<ReplayBody<ReplayBody<Full<Bytes>>>>();
        assert!(one <= 48 && two <= 64, "ReplayBody: {one} and {two} bytes");
    }

    fn frames(chunks: usize, size: usize, trailers: bool) -> Frames {
        let mut out: Frames = (0..chunks)
            .map(|i| {
                let byte = u8::try_from(i % 251).unwrap_or(0);
                Ok(Frame::data(Bytes::from(vec![byte; size])))
            })
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert(
                "x-checksum",
                "abc".parse().unwrap_or(http::HeaderValue::from_static("")),
            );
            out.push(Ok(Frame::trailers(t)));
        }
        out
    }

    fn expected(f: &Frames) -> (Vec<u8>, Option<HeaderMap>) {
        let mut data = Vec::new();
        let mut trailers = None;
        for frame in f.iter().flatten() {
            if let Some(d) = frame.data_ref() {
                data.extend_from_slice(d);
            }
            if let Some(t) = frame.trailers_ref() {
                trailers = Some(t.clone());
            }
        }
        (data, trailers)
    }

    async fn drain<B>(body: B) -> (Vec<u8>, Option<HeaderMap>)
    where
        B: Body<Data = Bytes, Error = BoxError>,
    {
        let collected = body.collect().await.map_err(|e| e.to_string());
        let collected = collected.unwrap_or_else(|e| panic!("body failed: {e}"));
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn many_frames_on_both_sides_of_the_limit() {
        for trailers in [false, true] {
            for chunks in [0usize, 1, 2, 7, 64] {
                let total = chunks * 100;
                for limit in [0usize, 1, total.saturating_sub(1), total, total + 1, 10_000] {
                    let f = frames(chunks, 100, trailers);
                    let want = expected(&f);
                    let body = StreamBody::new(stream::iter(f));
                    let got = buffer(body, limit).await;
                    let got = got.unwrap_or_else(|e| panic!("{e}"));
                    match got {
                        Buffered::Complete(b) => {
                            assert!(total <= limit, "kept {total} bytes above limit {limit}");
                            assert_eq!(b.bytes().as_ref(), want.0.as_slice());
                            assert_eq!(b.trailers().cloned(), want.1);
                            // Replayed twice, identical both times.
                            assert_eq!(drain(b.replay::<Full<Bytes>>()).await, want);
                            assert_eq!(drain(b.replay::<Full<Bytes>>()).await, want);
                        }
                        Buffered::TooLarge(body) => {
                            assert!(total > limit, "{total} fits {limit} but was not kept");
                            assert_eq!(drain(body).await, want);
                        }
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn a_body_known_too_large_is_not_read() {
        let body = Full::new(Bytes::from(vec![7u8; 2048]));
        match buffer(body, 1024).await {
            Ok(Buffered::TooLarge(b)) => {
                assert_eq!(b.size_hint().exact(), Some(2048));
                assert!(matches!(&b.kind, Kind::Stream { prefix, .. } if prefix.is_none()));
                assert_eq!(drain(b).await.0, vec![7u8; 2048]);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn single_frame_is_kept_without_copy() {
        let bytes = Bytes::from(vec![1u8; 4096]);
        let ptr = bytes.as_ptr();
        match buffer(Full::new(bytes), 8192).await {
            Ok(Buffered::Complete(b)) => {
                assert_eq!(b.bytes().as_ptr(), ptr);
                assert_eq!(b.replay::<Full<Bytes>>().size_hint().exact(), Some(4096));
            }
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn body_error_is_returned() {
        let items: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Err(std::io::Error::other("client went away")),
        ];
        let err = buffer(StreamBody::new(stream::iter(items)), 1024).await;
        assert_eq!(
            err.err().map(|e| e.to_string()).as_deref(),
            Some("client went away")
        );
    }

    #[tokio::test]
    async fn too_large_body_reports_size_and_end() {
        let f = frames(3, 10, false);
        let body = StreamBody::new(stream::iter(f));
        let Ok(Buffered::TooLarge(b)) = buffer(body, 15).await else {
            panic!("expected TooLarge");
        };
        // Two frames (20 bytes) were read ahead; the stream's rest is unknown.
        assert_eq!(b.size_hint().lower(), 20);
        assert!(!b.is_end_stream());
        assert_eq!(drain(b).await.0.len(), 30);
    }

    #[tokio::test]
    async fn a_body_longer_than_its_exact_hint_is_an_error() {
        // Announces 3 bytes exactly, yields 6.
        struct Liar(Option<Bytes>);
        impl Body for Liar {
            type Data = Bytes;
            type Error = Infallible;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
                Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
            }
            fn size_hint(&self) -> SizeHint {
                SizeHint::with_exact(3)
            }
        }
        let err = buffer(Liar(Some(Bytes::from_static(b"abcdef"))), 1024).await;
        assert_eq!(
            err.err().map(|e| e.to_string()).as_deref(),
            Some("request body longer than its exact size hint")
        );
    }

    #[test]
    #[should_panic(expected = "`body::Buffer` polled after completion")]
    fn polling_a_finished_buffer_panics() {
        let mut fut = tokio_test::task::spawn(buffer(Full::new(Bytes::from_static(b"x")), 8));
        assert!(fut.poll().is_ready());
        let _ = fut.poll();
    }

    #[test]
    fn empty_and_full_bodies_report_end_and_size() {
        let e = ReplayBody::<Full<Bytes>>::full(Bytes::new(), None);
        assert!(e.is_end_stream());
        assert_eq!(e.size_hint().exact(), Some(0));
        let f = ReplayBody::<Full<Bytes>>::full(Bytes::from_static(b"hi"), None);
        assert!(!f.is_end_stream());
        assert_eq!(f.size_hint().exact(), Some(2));
    }
}
