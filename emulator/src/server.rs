//! Serving the emulator: over TCP (hyper) and as an axum `Router`.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body as AxumBody;
use http::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;

use super::body::EmulatorBody;
use super::service::EmulatorService;
use super::Emulator;

impl Emulator {
    /// Serves HTTP/1.1 on `listener` until the returned future is dropped (or
    /// accepting fails fatally). Each connection runs in its own task.
    ///
    /// A `connection_reset` fault closes the connection without an answer.
    ///
    /// # Slow and idle clients
    ///
    /// A connection that has not sent a request's headers within the header
    /// read timeout (and an idle keep-alive connection, for its next
    /// request), or a request's body within the body read timeout, is closed.
    /// At most `max_connections` are open at once: past it, new connections
    /// wait in the listener's backlog until one closes. See
    /// [`EmulatorBuilder::header_read_timeout`](crate::EmulatorBuilder::header_read_timeout),
    /// [`body_read_timeout`](crate::EmulatorBuilder::body_read_timeout) and
    /// [`max_connections`](crate::EmulatorBuilder::max_connections).
    ///
    /// # Cancellation
    ///
    /// Dropping the future stops accepting; connections already accepted run
    /// to their end in their own tasks.
    ///
    /// # Errors
    ///
    /// Never returns `Ok` in practice; it returns the listener's error only when the
    /// listener itself is unusable (transient accept errors, such as too many
    /// open files, are logged and retried after a short pause).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// use tower_llm_limits::budget::Limits;
    /// use tower_llm_limits_emulator::Emulator;
    ///
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// println!("listening on http://{}", listener.local_addr()?);
    /// Emulator::new(Limits::new().rpm(50).itpm(30_000).otpm(8_000)).serve(listener).await
    /// # }
    /// ```
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        let config = &self.shared.config;
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout);
        loop {
            // The semaphore is never closed: an error cannot happen, and would end the loop.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return Ok(());
            };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "emulator: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let service = self.service();
            let http = http.clone();
            tokio::spawn(async move {
                let hyper_service = hyper::service::service_fn(move |request| {
                    let mut service = service.clone();
                    service.call(request)
                });
                let connection = http.serve_connection(TokioIo::new(stream), hyper_service);
                if let Err(e) = connection.await {
                    tracing::debug!(%peer, error = %e, "emulator: connection closed with an error");
                }
                drop(slot);
            });
        }
    }

    /// An axum `Router` serving the emulator at `/v1/messages`,
    /// `/v1/messages/count_tokens` and the Message Batches endpoints under
    /// `/v1/messages/batches` (any other path: `404 not_found_error`),
    /// to nest in an app or to serve with `axum::serve`.
    ///
    /// axum services cannot fail, so a `connection_reset` fault is an answer
    /// whose body fails when read (hyper then aborts the connection); use
    /// [`Emulator::serve`] for a reset before any answer.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower::ServiceExt;
    /// use tower_llm_limits::budget::Limits;
    /// use tower_llm_limits_emulator::Emulator;
    ///
    /// let app = Emulator::new(Limits::new().rpm(50).itpm(30_000).otpm(8_000)).router();
    /// let request = http::Request::get("/v1/models").body(axum::body::Body::empty()).unwrap();
    /// let response = app.oneshot(request).await.unwrap();
    /// assert_eq!(response.status(), 404);
    /// # }
    /// ```
    pub fn router(&self) -> axum::Router {
        axum::Router::new().fallback_service(RouterService {
            inner: self.service(),
        })
    }
}

fn is_fatal(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), InvalidInput | Unsupported | PermissionDenied)
}

/// [`EmulatorService`] adapted to axum (`Error = Infallible`): made by
/// [`Emulator::router`]. A failure becomes an answer whose body fails.
#[derive(Clone)]
pub struct RouterService {
    inner: EmulatorService,
}

impl fmt::Debug for RouterService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterService").finish_non_exhaustive()
    }
}

impl Service<Request<AxumBody>> for RouterService {
    type Response = Response<AxumBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<AxumBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<AxumBody>) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            Ok(match future.await {
                Ok(response) => response.map(AxumBody::new),
                Err(e) => Response::new(AxumBody::new(EmulatorBody::failed(e))),
            })
        })
    }
}
