//! The emulator's response body: complete bytes, or a paced script of SSE events.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{sleep, Sleep};

use super::service::Admission;
use tower_llm_limits::BoxError;

/// One step of a streamed answer.
#[derive(Debug)]
pub(crate) enum Step {
    /// Wait (tokio's clock) before the next step.
    Wait(Duration),
    /// Send these bytes.
    Emit(Bytes),
    /// Account for output tokens produced.
    Produce(u64),
    /// Close the accounting: nothing more will be produced.
    Finish,
}

struct Script {
    steps: VecDeque<Step>,
    sleep: Option<Pin<Box<Sleep>>>,
    admission: Option<Admission>,
}

enum Inner {
    Full(Option<Bytes>),
    Script(Box<Script>),
    Failed(Option<BoxError>),
}

/// The body of the emulator's answers: `Data = Bytes`, `Error = BoxError`.
///
/// A JSON answer is one frame. A streamed (SSE) answer is produced as it is
/// read: each text delta after its share of the latency model's time (slept
/// on tokio's clock, so a paused clock drives it), and in the `realtime`
/// output mode its tokens are charged to OTPM when produced.
///
/// # Cancellation
///
/// Dropping a streamed body before its end stops the answer: the tokens
/// produced so far are the ones charged (the unused part of a `max_tokens`
/// reservation is given back).
pub struct EmulatorBody {
    inner: Inner,
}

impl fmt::Debug for EmulatorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            Inner::Full(Some(b)) => format!("Full({} bytes)", b.len()),
            Inner::Full(None) => "Full(done)".to_string(),
            Inner::Script(s) => format!("Stream({} steps left)", s.steps.len()),
            Inner::Failed(_) => "Failed".to_string(),
        };
        f.debug_struct("EmulatorBody").field("kind", &kind).finish()
    }
}

impl EmulatorBody {
    /// A body of these bytes.
    pub(crate) fn full(bytes: Bytes) -> Self {
        EmulatorBody {
            inner: Inner::Full(Some(bytes)),
        }
    }

    /// A body that fails when read (a connection dropped).
    pub(crate) fn failed(error: BoxError) -> Self {
        EmulatorBody {
            inner: Inner::Failed(Some(error)),
        }
    }

    /// A paced body that plays `steps`, owning the request's admission.
    pub(crate) fn script(steps: VecDeque<Step>, admission: Admission) -> Self {
        EmulatorBody {
            inner: Inner::Script(Box::new(Script {
                steps,
                sleep: None,
                admission: Some(admission),
            })),
        }
    }
}

impl Body for EmulatorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Failed(err) => Poll::Ready(err.take().map(Err)),
            Inner::Script(script) => loop {
                if let Some(s) = script.sleep.as_mut() {
                    if s.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    script.sleep = None;
                }
                match script.steps.pop_front() {
                    Some(Step::Wait(d)) => {
                        if !d.is_zero() {
                            script.sleep = Some(Box::pin(sleep(d)));
                        }
                    }
                    Some(Step::Emit(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                    Some(Step::Produce(n)) => {
                        if let Some(a) = script.admission.as_mut() {
                            a.produce(n);
                        }
                    }
                    Some(Step::Finish) => {
                        if let Some(mut a) = script.admission.take() {
                            a.finish();
                        }
                    }
                    None => {
                        if let Some(mut a) = script.admission.take() {
                            a.finish();
                        }
                        return Poll::Ready(None);
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Failed(e) => e.is_none(),
            Inner::Script(s) => s.steps.is_empty() && s.admission.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
