//! A tower service over [`reqwest::Client`], so that the
//! layers of this crate (the [preset](crate::preset) for one) go over the
//! HTTP client most Rust programs already have.
//!
//! [`ReqwestService`] takes an `http::Request<B>` (any [`http_body::Body`]),
//! sends it with the client, and answers with an `http::Response` whose body
//! is reqwest's [`Body`](::reqwest::Body), an [`http_body::Body`] streamed as
//! it arrives (an SSE answer is settled event by event, never buffered).
//!
//! Its error is [`reqwest::Error`] itself, which the
//! [`classify`](crate::classify) rules recognise: `is_timeout()` is a
//! [`Class::Timeout`](crate::classify::Class::Timeout) (retried; since the
//! request may have reached the server, the retry layer counts it as a
//! replay), `is_connect()` a
//! [`Class::Connection`](crate::classify::Class::Connection) that
//! [`never_connected`](crate::classify::never_connected) (a refused
//! connection: retried as never sent, and the budget refunds it in full).
//!
//! # TLS
//!
//! The `reqwest` feature depends on reqwest with its default features off:
//! no TLS backend is chosen for you. Choose one in your own dependency on
//! reqwest (its default features bring rustls); cargo unifies the two.
//!
//! # Examples
//!
//! ```no_run
//! use bytes::Bytes;
//! use http::Request;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_llm_limits::budget::Tier;
//! use tower_llm_limits::preset::LimitsLayer;
//! use tower_llm_limits::reqwest::ReqwestService;
//!
//! # async fn run() -> Result<(), tower_llm_limits::BoxError> {
//! let client = reqwest::Client::new();
//! let stack = ServiceBuilder::new()
//!     .layer(LimitsLayer::anthropic(Tier::Tier1))
//!     .service(ReqwestService::new(client));
//! let request = Request::post("https://api.anthropic.com/v1/messages")
//!     .header("x-api-key", std::env::var("ANTHROPIC_API_KEY")?)
//!     .header("anthropic-version", "2023-06-01")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(
//!         br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}"#,
//!     )))?;
//! let response = stack.oneshot(request).await?;
//! let body = response.into_body().collect().await?.to_bytes();
//! # let _ = body;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use sync_wrapper::SyncWrapper;
use tower_service::Service;

use crate::BoxError;

/// A tower `Service<http::Request<B>>` over a [`reqwest::Client`].
/// Cheap to clone (the client is an `Arc` inside); clones share its
/// connection pool. See the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct ReqwestService {
    client: ::reqwest::Client,
}

impl ReqwestService {
    /// Sends requests with `client` (its timeouts, proxies, TLS and pool).
    pub fn new(client: ::reqwest::Client) -> Self {
        ReqwestService { client }
    }

    /// The client.
    pub fn client(&self) -> &::reqwest::Client {
        &self.client
    }
}

impl From<::reqwest::Client> for ReqwestService {
    fn from(client: ::reqwest::Client) -> Self {
        Self::new(client)
    }
}

/// The future `reqwest::Client` answers with (unnamed by reqwest itself).
type Pending = <::reqwest::Client as Service<::reqwest::Request>>::Future;

impl<B> Service<http::Request<B>> for ReqwestService
where
    B: Body + Send + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<::reqwest::Body>;
    type Error = ::reqwest::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<::reqwest::Request>::poll_ready(&mut self.client, cx)
    }

    /// Converts the request (method, URL, version, headers, extensions;
    /// the body streamed, its size announced when known) and sends it.
    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let request = request.map(|body| ::reqwest::Body::wrap(SyncBody::new(body)));
        let state = match ::reqwest::Request::try_from(request) {
            Ok(request) => State::Sending {
                fut: self.client.call(request),
            },
            Err(e) => State::Invalid { error: Some(e) },
        };
        ResponseFuture { state }
    }
}

pin_project! {
    /// The response future of [`ReqwestService`].
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sending { #[pin] fut: Pending },
        Invalid { error: Option<::reqwest::Error> },
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Sending { .. } => "sending",
            State::Invalid { .. } => "invalid",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<::reqwest::Body>, ::reqwest::Error>;

    /// # Panics
    ///
    /// Polled again after it returned an error for an invalid request
    /// (a URI reqwest cannot parse): "`reqwest::ResponseFuture` polled after
    /// completion".
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending { fut } => {
                let response = ready!(fut.poll(cx))?;
                Poll::Ready(Ok(http::Response::from(response)))
            }
            StateProj::Invalid { error } => match error.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => panic!("`reqwest::ResponseFuture` polled after completion"),
            },
        }
    }
}

pin_project! {
    /// A request body made `Sync` for reqwest (which asks for it) without
    /// asking it of the caller's body: it is only ever reached through
    /// `Pin<&mut Self>`. Its size hint and end are read once, at the start,
    /// so that reqwest still sends a `content-length` when the size is known.
    struct SyncBody<B> {
        #[pin]
        inner: SyncWrapper<B>,
        hint: SizeHint,
        ended: bool,
    }
}

impl<B: Body> SyncBody<B> {
    fn new(body: B) -> Self {
        SyncBody {
            hint: body.size_hint(),
            ended: body.is_end_stream(),
            inner: SyncWrapper::new(body),
        }
    }
}

impl<B> Body for SyncBody<B>
where
    B: Body,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.get_pin_mut().poll_frame(cx));
        match frame {
            None => {
                *this.ended = true;
                *this.hint = SizeHint::with_exact(0);
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Some(Ok(frame)) => {
                let frame = frame.map_data(Into::into);
                if let Some(data) = frame.data_ref() {
                    shrink(this.hint, data.len() as u64);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// The size hint of what is left once `read` more bytes passed.
fn shrink(hint: &mut SizeHint, read: u64) {
    let lower = hint.lower().saturating_sub(read);
    let upper = hint.upper().map(|u| u.saturating_sub(read));
    let mut left = SizeHint::new();
    left.set_lower(lower);
    if let Some(upper) = upper {
        left.set_upper(upper.max(lower));
    }
    *hint = left;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn the_sync_body_keeps_the_size_and_the_bytes() {
        let body = SyncBody::new(Full::new(Bytes::from_static(b"hello")));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let mut body = std::pin::pin!(body);
        let frame = body.frame().await.and_then(Result::ok);
        assert_eq!(
            frame.and_then(|f| f.into_data().ok()).as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_request_reqwest_cannot_take_fails_with_its_error() {
        // The dev-dependency's reqwest has rustls without a provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut service = ReqwestService::default();
        // A relative URI has no scheme or host: reqwest refuses to build it.
        let request = http::Request::post("/v1/messages")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let err = service.call(request).await.err();
        assert!(err.is_some_and(|e| e.is_builder()));
    }
}
