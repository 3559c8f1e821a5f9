//! Request bodies that can be sent again.
//!
//! To retry a request, its body must be kept. [`buffer`] reads a body once, up
//! to a limit ([`DEFAULT_BUFFER_LIMIT`], 16 MiB, unless configured):
//!
//! - a body that ends within the limit becomes a [`BufferedBody`]: cheap to
//!   clone (reference-counted [`Bytes`]) and replayed any number of times with
//!   [`BufferedBody::replay`], trailers included;
//! - a larger body (known from its size hint, without reading it) or one of
//!   unknown size that grows past the limit comes back as
//!   [`Buffered::TooLarge`]: the frames already read, followed by the rest of
//!   the original body, unchanged. It can be sent once and is not retryable.
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
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower_llm_limits::body::{buffer, Buffered};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_llm_limits::BoxError> {
//! let body = Full::new(Bytes::from_static(b"{\"model\":\"claude-sonnet-4-5\"}"));
//! match buffer(body, 1024).await? {
//!     Buffered::Complete(buffered) => {
//!         // Each replay yields the same bytes.
//!         let first = buffered.replay::<Full<Bytes>>().collect().await?.to_bytes();
//!         let second = buffered.replay::<Full<Bytes>>().collect().await?.to_bytes();
//!         assert_eq!(first, second);
//!     }
//!     Buffered::TooLarge(_) => unreachable!("29 bytes fit in 1 KiB"),
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

use crate::BoxError;

/// The default largest body kept for replay: 16 MiB.
pub const DEFAULT_BUFFER_LIMIT: usize = 16 * 1024 * 1024;

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
            trailers: Option<HeaderMap>,
        },
        Stream {
            prefix: VecDeque<Frame<Bytes>>,
            prefix_len: u64,
            #[pin]
            rest: B,
            done: bool,
        },
    }
}

impl<B> ReplayBody<B> {
    /// A body of these bytes, then these trailers.
    pub fn full(bytes: Bytes, trailers: Option<HeaderMap>) -> Self {
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

    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new(), None)
    }

    fn prefixed(prefix: VecDeque<Frame<Bytes>>, rest: B) -> Self {
        let prefix_len = prefix
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.len() as u64)
            .sum();
        ReplayBody {
            kind: Kind::Stream {
                prefix,
                prefix_len,
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
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            KindProj::Stream {
                prefix,
                prefix_len,
                rest,
                done,
            } => {
                if let Some(frame) = prefix.pop_front() {
                    if let Some(d) = frame.data_ref() {
                        *prefix_len = prefix_len.saturating_sub(d.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(frame)));
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
            Kind::Stream {
                prefix, rest, done, ..
            } => prefix.is_empty() && (*done || rest.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream {
                prefix_len,
                rest,
                done,
                ..
            } => {
                if *done {
                    return SizeHint::with_exact(*prefix_len);
                }
                let hint = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower().saturating_add(*prefix_len));
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper.saturating_add(*prefix_len));
                }
                out
            }
        }
    }
}

/// A body read completely: its bytes and trailers, replayable any number of times.
#[derive(Debug, Clone, Default)]
pub struct BufferedBody {
    bytes: Bytes,
    trailers: Option<HeaderMap>,
}

impl BufferedBody {
    /// A buffered body of these bytes and trailers.
    pub fn new(bytes: Bytes, trailers: Option<HeaderMap>) -> Self {
        BufferedBody { bytes, trailers }
    }

    /// The body's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The body's trailers, if it had any.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// A new body yielding the same bytes and trailers. The bytes are shared, not copied.
    pub fn replay<B>(&self) -> ReplayBody<B> {
        ReplayBody::full(self.bytes.clone(), self.trailers.clone())
    }
}

/// What [`buffer`] made of a body.
#[derive(Debug)]
pub enum Buffered<B> {
    /// The whole body, within the limit.
    Complete(BufferedBody),
    /// The body is larger than the limit: the frames already read followed by
    /// the rest of the original, as one body that can be sent once.
    TooLarge(ReplayBody<B>),
}

impl<B> Buffered<B> {
    /// Whether the body was kept whole.
    pub fn is_complete(&self) -> bool {
        matches!(self, Buffered::Complete(_))
    }
}

/// Reads `body` into memory if it fits in `limit` bytes.
///
/// A body whose size hint says it is larger is not read at all. A body of
/// unknown size is read until it ends or passes the limit; in the second case
/// what was read is kept in front of the rest (see [`Buffered::TooLarge`]).
/// A body of a single data frame is kept without a copy.
///
/// `Pin<Box<B>>` is `Unpin` and a body too, for bodies that are not `Unpin`.
///
/// # Errors
///
/// The body's own error, if reading it failed; the request cannot be sent then.
///
/// # Cancellation
///
/// Dropping the future drops the body and what was read of it.
pub async fn buffer<B>(mut body: B, limit: usize) -> Result<Buffered<B>, BoxError>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    let limit = limit as u64;
    if body.size_hint().lower() > limit {
        return Ok(Buffered::TooLarge(ReplayBody::passthrough(body)));
    }
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut total: u64 = 0;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame
            .map_err(Into::into)?
            .map_data(|mut d| d.copy_to_bytes(d.remaining()));
        if let Some(d) = frame.data_ref() {
            total = total.saturating_add(d.len() as u64);
        }
        frames.push_back(frame);
        if total > limit {
            return Ok(Buffered::TooLarge(ReplayBody::prefixed(frames, body)));
        }
    }
    let mut trailers: Option<HeaderMap> = None;
    let mut chunks: Vec<Bytes> = Vec::with_capacity(frames.len());
    for frame in frames {
        match frame.into_data() {
            Ok(data) => {
                if !data.is_empty() {
                    chunks.push(data);
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    match trailers.as_mut() {
                        Some(all) => all.extend(t),
                        None => trailers = Some(t),
                    }
                }
            }
        }
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
            for chunk in &chunks {
                all.extend_from_slice(chunk);
            }
            all.freeze()
        }
    };
    Ok(Buffered::Complete(BufferedBody { bytes, trailers }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use http_body_util::{Full, StreamBody};
    use std::convert::Infallible;

    type Frames = Vec<Result<Frame<Bytes>, Infallible>>;

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
                assert!(matches!(&b.kind, Kind::Stream { prefix, .. } if prefix.is_empty()));
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

    #[test]
    fn empty_and_full_bodies_report_end_and_size() {
        let e = ReplayBody::<Full<Bytes>>::empty();
        assert!(e.is_end_stream());
        assert_eq!(e.size_hint().exact(), Some(0));
        let f = ReplayBody::<Full<Bytes>>::full(Bytes::from_static(b"hi"), None);
        assert!(!f.is_end_stream());
        assert_eq!(f.size_hint().exact(), Some(2));
    }
}
