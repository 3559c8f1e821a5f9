//! The waits of one request, across layers: how long it waited in the
//! layers inside the retry layer (the token budget's queue, the concurrency
//! queue), and the deadline that bounds those waits.
//!
//! The retry layer puts a [`WaitLog`] in the extensions of each attempt of
//! the request it receives (a log per attempt, whose waits it adds up; the
//! log's allocation also holds the attempt's dispatch marker, see
//! [`crate::dispatch`]). An inner layer that makes the request wait adds the
//! time to the log when the wait ends, and stops waiting when the request's
//! deadline passes, failing the attempt with [`DeadlineReached`]: the retry
//! layer then gives up with [`GiveUpReason::Deadline`](crate::GiveUpReason::Deadline),
//! counting the inner waits in the `waited` it reports.
//!
//! A layer that finds no log on a request (no retry layer outside it) waits
//! without a deadline. A request that never waits costs nothing; a wait
//! costs one clock read at each end.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Uri, Version};
use tokio::time::{Instant, Sleep};

use crate::dispatch::{Dispatch, Node};

/// The extension a retry layer puts on each attempt of a request: the
/// attempt's [`Log`], and the request's current [`Dispatch`] marker (see
/// [`crate::dispatch`]).
#[derive(Clone, Debug)]
pub(crate) struct WaitLog {
    log: Arc<Log>,
    marker: Option<Dispatch>,
}

/// Shared by the clones of one attempt of a request: the time it waited
/// inside the retry layer's inner layers and the request's deadline, the
/// head the retry layer keeps to send the request again, and in the same
/// allocation the attempt's [`Dispatch`] node, taken by the first budget
/// inside.
#[derive(Debug)]
pub(crate) struct Log {
    /// Nanoseconds waited in inner layers (saturating).
    waited: AtomicU64,
    deadline: Option<Instant>,
    node: Node,
    /// The retry layer's copy of the head (see [`Kept`]).
    head: Mutex<Kept>,
}

/// The head a retry layer keeps to send its request again, in the
/// attempt's log rather than in its own future: so that a layer inside it
/// that holds the attempt waiting (the concurrency queue, the budget's
/// line) can hold the request without its head while its head is equal
/// ([`Parked`]): a waiting request carries one head, not two.
// Inline: boxed, it would cost an allocation per request, and the log's
// allocation holds the slot anyway.
#[allow(clippy::large_enum_variant)]
#[derive(Default)]
enum Kept {
    /// No copy: the body cannot be sent again, or the head went out with
    /// the attempt.
    #[default]
    Empty,
    /// The request's own head, until its first attempt takes it.
    Own(Parts),
    /// The copy of the head as the retry layer sent the attempt (before
    /// the layers inside it), without the extensions it adds to each
    /// attempt.
    Copy {
        copy: HeadCopy,
        /// Whether a [`Parked`] request stands on the copy (its own head
        /// was equal, and dropped): the copy is then cloned, never taken,
        /// until that request is passed on or dropped. One at a
        /// time: a second request of the attempt (a hedging layer's clone)
        /// waits whole.
        parked: bool,
    },
}

/// A copy of a request head, kept compact: its headers in the map's order
/// as bytes in one buffer of the size they take (one allocation, dropped at
/// once: a list of name-value pairs would clone each name and value, which
/// for a header made at run time allocates its shared part, and drop each
/// again), made into a `HeaderMap` again only when the head is needed (a
/// request sent again, or a parked one passed on).
struct HeadCopy {
    method: Method,
    uri: Uri,
    version: Version,
    /// How many headers the buffer holds.
    count: u16,
    /// For each header: its name's length, its value's length times two
    /// plus one if the value is sensitive (each a LEB128 varint: a byte for
    /// a name or a value shorter than 128 and 64 bytes), the name, and the
    /// value.
    headers: Vec<u8>,
    extensions: http::Extensions,
}

/// The bytes a copy's headers take on the stack while they are written
/// (then copied into a buffer of their size): nine headers of 26 bytes
/// each (name, value and their two lengths); more are written again, into
/// a buffer sized first.
const STAGED: usize = 256;

/// The bytes of `n` as a varint in [`HeadCopy::headers`] (1 to 10).
fn varint_len(n: usize) -> usize {
    // Bits of `n` (at least one), seven a byte.
    let bits = usize::BITS - (n | 1).leading_zeros();
    (bits as usize).div_ceil(7)
}

/// Writes `n` at `at` in `out` as a varint (seven bits a byte, low ones
/// first, the high bit set on every byte but the last); where it ends, or
/// `None` if `out` is too short.
fn put_varint(out: &mut [u8], mut at: usize, mut n: usize) -> Option<usize> {
    while n >= 0x80 {
        *out.get_mut(at)? = ((n & 0x7f) as u8) | 0x80;
        n >>= 7;
        at += 1;
    }
    *out.get_mut(at)? = n as u8;
    Some(at + 1)
}

/// Appends `n` as [`put_varint`] writes it.
fn push_varint(buf: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        buf.push(((n & 0x7f) as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

/// Writes `bytes` at `at` in `out`; where they end, or `None` if `out` is
/// too short.
fn put_bytes(out: &mut [u8], at: usize, bytes: &[u8]) -> Option<usize> {
    let end = at.checked_add(bytes.len())?;
    out.get_mut(at..end)?.copy_from_slice(bytes);
    Some(end)
}

/// Writes `headers` from the start of `out` as [`HeadCopy::headers`]
/// holds them; the bytes written, or `None` if `out` is too short.
fn put_headers(out: &mut [u8], headers: &HeaderMap) -> Option<usize> {
    let mut at = 0;
    for (name, value) in headers {
        let name = name.as_str().as_bytes();
        at = put_varint(out, at, name.len())?;
        // A value is at most `isize::MAX` bytes: doubled, it fits.
        at = put_varint(
            out,
            at,
            (value.len() << 1) | usize::from(value.is_sensitive()),
        )?;
        at = put_bytes(out, at, name)?;
        at = put_bytes(out, at, value.as_bytes())?;
    }
    Some(at)
}

/// `headers` as [`HeadCopy::headers`] holds them, in a buffer of their
/// size: written once, on the stack, and copied; or, beyond [`STAGED`]
/// bytes, measured and written into a buffer of that size.
fn header_bytes(headers: &HeaderMap) -> Vec<u8> {
    let mut staged = [0u8; STAGED];
    if let Some(written) = put_headers(&mut staged, headers).and_then(|n| staged.get(..n)) {
        return written.to_vec();
    }
    let size = headers
        .iter()
        .map(|(name, value)| {
            let (name, value) = (name.as_str().len(), value.len());
            varint_len(name) + varint_len(value << 1) + name + value
        })
        .sum();
    let mut buf = Vec::with_capacity(size);
    for (name, value) in headers {
        let name = name.as_str().as_bytes();
        push_varint(&mut buf, name.len());
        push_varint(
            &mut buf,
            (value.len() << 1) | usize::from(value.is_sensitive()),
        );
        buf.extend_from_slice(name);
        buf.extend_from_slice(value.as_bytes());
    }
    buf
}

/// The varint at `*at` in `buf`, `*at` moved past it; `None` if the buffer
/// ends inside it or it does not fit a `usize`.
fn get_varint(buf: &[u8], at: &mut usize) -> Option<usize> {
    let mut n = 0usize;
    let mut shift = 0u32;
    loop {
        let byte = *buf.get(*at)?;
        *at += 1;
        n |= usize::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(n);
        }
        shift += 7;
    }
}

/// The headers of a [`HeadCopy`]: each one's name, the range of its value
/// in the buffer, and whether the value is sensitive.
struct Entries<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Entries<'a> {
    type Item = (&'a [u8], std::ops::Range<usize>, bool);

    fn next(&mut self) -> Option<Self::Item> {
        let mut at = self.at;
        let name_len = get_varint(self.buf, &mut at)?;
        let value = get_varint(self.buf, &mut at)?;
        let (value_len, sensitive) = (value >> 1, value & 1 != 0);
        let value_at = at.checked_add(name_len)?;
        let end = value_at.checked_add(value_len)?;
        let name = self.buf.get(at..value_at)?;
        self.buf.get(value_at..end)?;
        self.at = end;
        Some((name, value_at..end, sensitive))
    }
}

impl HeadCopy {
    /// A copy of `head`.
    fn of(head: &Parts) -> Self {
        let buf = header_bytes(&head.headers);
        HeadCopy {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            // A header map holds at most 32,768 headers.
            count: u16::try_from(head.headers.len()).unwrap_or(u16::MAX),
            headers: buf,
            extensions: head.extensions.clone(),
        }
    }

    fn entries(&self) -> Entries<'_> {
        Entries {
            buf: &self.headers,
            at: 0,
        }
    }

    /// The headers again, from the copy's buffer (`buf`, its bytes, which
    /// the values share). `None` only for a header that does not parse
    /// again, which a header made by `http`'s safe constructors always does.
    fn header_map(count: u16, buf: Bytes) -> Option<HeaderMap> {
        let mut map = HeaderMap::with_capacity(usize::from(count));
        let entries = Entries { buf: &buf, at: 0 };
        for (name, value, sensitive) in entries {
            let name = HeaderName::from_bytes(name).ok()?;
            let mut value = HeaderValue::from_maybe_shared(buf.slice(value)).ok()?;
            value.set_sensitive(sensitive);
            map.append(name, value);
        }
        Some(map)
    }

    /// The head again (with the copy's extensions if `extensions`), the
    /// copy left as it is.
    fn to_parts(&self, extensions: bool) -> Option<Parts> {
        let (mut head, ()) = Request::new(()).into_parts();
        head.method = self.method.clone();
        head.uri = self.uri.clone();
        head.version = self.version;
        head.headers = Self::header_map(self.count, Bytes::from(self.headers.clone()))?;
        if extensions {
            head.extensions = self.extensions.clone();
        }
        Some(head)
    }

    /// The head again, made of the copy itself.
    fn into_parts(self) -> Option<Parts> {
        let (mut head, ()) = Request::new(()).into_parts();
        head.headers = Self::header_map(self.count, Bytes::from(self.headers))?;
        head.method = self.method;
        head.uri = self.uri;
        head.version = self.version;
        head.extensions = self.extensions;
        Some(head)
    }

    /// Whether the request's head has the same method, URI, version and
    /// headers, in the same order (extensions are not compared: a parked
    /// request keeps its own). Equal headers in another order are told
    /// apart: that request then waits whole, which is only less compact.
    fn same<B>(&self, request: &Request<B>) -> bool {
        if self.method != request.method()
            || self.version != request.version()
            || self.uri != *request.uri()
            || request.headers().len() != usize::from(self.count)
        {
            return false;
        }
        let mut entries = self.entries();
        request.headers().iter().all(|(name, value)| {
            entries.next().is_some_and(|(n, v, _)| {
                name.as_str().as_bytes() == n && self.headers.get(v) == Some(value.as_bytes())
            })
        }) && entries.next().is_none()
    }
}

impl Kept {
    fn copy(head: &Parts) -> Kept {
        Kept::Copy {
            copy: HeadCopy::of(head),
            parked: false,
        }
    }

    /// Takes the head, or makes it from a copy a parked request stands on.
    fn take(&mut self) -> Option<Parts> {
        match self {
            Kept::Copy { copy, parked: true } => copy.to_parts(true),
            Kept::Empty => None,
            _ => match std::mem::take(self) {
                Kept::Own(head) => Some(head),
                Kept::Copy { copy, .. } => copy.into_parts(),
                Kept::Empty => None,
            },
        }
    }

    /// The parked request that stood on the copy left.
    fn unpark(&mut self) {
        if let Kept::Copy { parked, .. } = self {
            *parked = false;
        }
    }
}

impl fmt::Debug for Kept {
    // Never the headers: they hold the API key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kept::Empty => "Empty",
            Kept::Own(_) | Kept::Copy { parked: false, .. } => "Head",
            Kept::Copy { parked: true, .. } => "Parked",
        })
    }
}

impl Log {
    /// A log for an attempt of a request with this deadline (if any); its
    /// dispatch node is chained to `parent` (the request's marker, if any).
    pub(crate) fn new(deadline: Option<Instant>, parent: Option<Dispatch>) -> Arc<Log> {
        Self::with(deadline, parent, Kept::Empty)
    }

    /// A log keeping `head` from the start, the request's own until its
    /// first attempt ([`Kept`]): the head is moved once, into the log's
    /// allocation, not into an empty log after.
    // Inlined: the head is moved once, into the log's allocation.
    #[inline]
    pub(crate) fn with_head(
        deadline: Option<Instant>,
        parent: Option<Dispatch>,
        head: Parts,
    ) -> Arc<Log> {
        Self::with(deadline, parent, Kept::Own(head))
    }

    /// A log keeping a copy of `head`, the retry layer's to send the
    /// request again ([`Kept`]).
    pub(crate) fn with_copy(
        deadline: Option<Instant>,
        parent: Option<Dispatch>,
        head: &Parts,
    ) -> Arc<Log> {
        Self::with(deadline, parent, Kept::copy(head))
    }

    #[inline(always)]
    fn with(deadline: Option<Instant>, parent: Option<Dispatch>, kept: Kept) -> Arc<Log> {
        Arc::new(Log {
            waited: AtomicU64::new(0),
            deadline,
            node: Node::new(parent),
            head: Mutex::new(kept),
        })
    }

    fn kept(&self) -> MutexGuard<'_, Kept> {
        // A panic while the lock was held left a whole value: use it.
        self.head.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `head`, the retry layer's copy to send the request again
    /// (without a lock while the log is not shared yet: the attempt's
    /// request is made after).
    #[cfg(test)]
    pub(crate) fn keep_head(log: &mut Arc<Log>, head: Parts) {
        match Arc::get_mut(log) {
            Some(log) => {
                *log.head.get_mut().unwrap_or_else(PoisonError::into_inner) = Kept::copy(&head);
            }
            None => {
                let mut kept = log.kept();
                match &mut *kept {
                    // A request parked on the copy stands on the new one.
                    Kept::Copy { copy, .. } => *copy = HeadCopy::of(&head),
                    _ => *kept = Kept::copy(&head),
                }
            }
        }
    }

    /// Takes the kept head, leaving a copy of it if `copy` (one operation:
    /// the first attempt's).
    // Inlined into the retry layer's attempt (one call a request); the
    // head is still moved out of the log and into the request there.
    #[inline(always)]
    pub(crate) fn swap_head(log: &mut Arc<Log>, copy: bool) -> Option<Parts> {
        let swapped = |kept: &mut Kept| match kept {
            Kept::Own(head) if copy => {
                let copied = Kept::copy(head);
                let Kept::Own(head) = std::mem::replace(kept, copied) else {
                    return None;
                };
                Some(head)
            }
            _ => kept.take(),
        };
        match Arc::get_mut(log) {
            Some(log) => swapped(log.head.get_mut().unwrap_or_else(PoisonError::into_inner)),
            None => swapped(&mut log.kept()),
        }
    }

    /// Takes the kept head, if there is one (`None` if the body cannot be
    /// sent again, or a layer inside still holds the attempt); without a
    /// lock if no attempt's request holds the log any more.
    pub(crate) fn take_head(log: &mut Arc<Log>) -> Option<Parts> {
        match Arc::get_mut(log) {
            Some(log) => log
                .head
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
            None => log.kept().take(),
        }
    }

    /// The dispatch node inside this log.
    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    /// The deadline of the request.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Adds a finished wait.
    pub(crate) fn add(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Saturating: a log of centuries is not a case to wrap on.
        let _ = self
            .waited
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_add(nanos))
            });
    }

    /// The time waited in inner layers so far.
    pub(crate) fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited.load(Ordering::Relaxed))
    }
}

/// A request that a layer inside a retry layer holds while it waits (the
/// concurrency queue), without its head: the retry layer's copy of the
/// head in the attempt's [`Log`] was the same, and stands for it until the
/// request is passed on ([`unpark`](Self::unpark), which makes the head
/// again from the copy) or dropped. A waiting request so carries one head,
/// and the layer that holds it keeps its body and extensions only.
pub(crate) struct Parked<B> {
    body: B,
    /// The request's own extensions (the copy has none of the attempt's).
    extensions: http::Extensions,
    on: StandingOn,
}

/// A parked request's claim on its log's copy of the head
/// (its `parked` flag, while it lives).
struct StandingOn(Option<Arc<Log>>);

impl Drop for StandingOn {
    /// The claim ends: the copy may be taken again.
    fn drop(&mut self) {
        if let Some(log) = self.0.take() {
            log.kept().unpark();
        }
    }
}

impl<B> fmt::Debug for Parked<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parked").finish_non_exhaustive()
    }
}

impl<B> Parked<B> {
    /// Parks `request`, this attempt's (whose log is `log`), if the retry
    /// layer's copy of the head is the same as its head (no layer in
    /// between changed it) and no other request stands on it; gives it
    /// back whole otherwise.
    // The `Err` is no error, and no copy: the request itself, handed back
    // to wait whole.
    #[allow(clippy::result_large_err)]
    pub(crate) fn park(request: Request<B>, log: &Arc<Log>) -> Result<Self, Request<B>> {
        {
            let mut kept = log.kept();
            match &mut *kept {
                Kept::Copy {
                    copy,
                    parked: parked @ false,
                } if copy.same(&request) => *parked = true,
                _ => return Err(request),
            }
        }
        // Its method, URI and headers are dropped outside the lock.
        let (parts, body) = request.into_parts();
        Ok(Parked {
            body,
            extensions: parts.extensions,
            on: StandingOn(Some(Arc::clone(log))),
        })
    }

    /// `f` of the head it stands on (made from the retry layer's copy,
    /// without its extensions); `None` if the copy is gone, which a parked
    /// request prevents.
    pub(crate) fn with_head<R>(&self, f: impl FnOnce(&Parts) -> R) -> Option<R> {
        let log = self.on.0.as_ref()?;
        let head = match &*log.kept() {
            Kept::Copy { copy, parked: true } => copy.to_parts(false)?,
            _ => return None,
        };
        Some(f(&head))
    }

    /// The request's extensions.
    pub(crate) fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    /// The same, to change them (a budget's dispatch marker).
    pub(crate) fn extensions_mut(&mut self) -> &mut http::Extensions {
        &mut self.extensions
    }

    /// The request again, its head a copy of the retry layer's (with the
    /// request's own extensions), to pass it on. `None` only if the copy
    /// is gone, which a parked request prevents: the copy it stands on is
    /// cloned, never taken, while it does.
    pub(crate) fn unpark(mut self) -> Option<Request<B>> {
        let log = self.on.0.take()?;
        let mut head = {
            let mut kept = log.kept();
            let Kept::Copy { copy, parked: true } = &*kept else {
                return None;
            };
            let head = copy.to_parts(false);
            kept.unpark();
            head?
        };
        head.extensions = self.extensions;
        Some(Request::from_parts(head, self.body))
    }
}

impl WaitLog {
    /// The extension for an attempt: its log, and the request's marker.
    pub(crate) fn new(log: Arc<Log>, marker: Option<Dispatch>) -> Self {
        WaitLog { log, marker }
    }

    /// The request's current dispatch marker, if one is kept here.
    pub(crate) fn marker(&self) -> Option<&Dispatch> {
        self.marker.as_ref()
    }

    /// Keeps `marker` as the request's current dispatch marker.
    pub(crate) fn set_marker(&mut self, marker: Dispatch) {
        self.marker = Some(marker);
    }

    /// The log holding the node, if no budget took the node yet (it is
    /// then taken).
    pub(crate) fn claim_node(&self) -> Option<Arc<Log>> {
        self.log.node.claim().then(|| Arc::clone(&self.log))
    }

    /// The time waited in inner layers so far.
    #[cfg(test)]
    pub(crate) fn waited(&self) -> Duration {
        self.log.waited()
    }
}

/// A wait in an inner layer: started at the first `Pending`, recorded in the
/// request's [`WaitLog`] when it ends (or is dropped), cut at the request's
/// deadline.
#[derive(Default)]
pub(crate) struct Wait {
    log: Option<Arc<Log>>,
    started: Option<Instant>,
    /// The deadline's timer, armed at the first `Pending` (boxed: only
    /// requests that wait under a deadline pay for it).
    timer: Option<Pin<Box<Sleep>>>,
}

impl fmt::Debug for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wait")
            .field("log", &self.log)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Wait {
    /// A wait for the request with these extensions.
    pub(crate) fn of(extensions: &http::Extensions) -> Self {
        Wait {
            log: extensions.get::<WaitLog>().map(|w| Arc::clone(&w.log)),
            started: None,
            timer: None,
        }
    }

    /// Called when the awaited thing said `Pending`: starts the wait's clock
    /// and deadline timer (once), and tells whether the deadline passed
    /// (`Ready`: stop waiting; the wait is recorded).
    pub(crate) fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<DeadlineReached> {
        if self.started.is_none() {
            self.started = Some(Instant::now());
            if let Some(deadline) = self.log.as_ref().and_then(|log| log.deadline) {
                self.timer = Some(Box::pin(tokio::time::sleep_until(deadline)));
            }
        }
        let reached = match self.timer.as_mut() {
            Some(timer) => timer.as_mut().poll(cx).is_ready(),
            None => false,
        };
        if reached {
            self.finish();
            return Poll::Ready(DeadlineReached);
        }
        Poll::Pending
    }

    /// The wait is over: records it (once).
    pub(crate) fn finish(&mut self) {
        if let (Some(log), Some(started)) = (&self.log, self.started.take()) {
            log.add(started.elapsed());
        }
        self.timer = None;
    }

    /// When the request started waiting, if it did (a `Pending` was seen).
    pub(crate) fn started(&self) -> Option<Instant> {
        self.started
    }

    /// The log of the request's attempt, if a retry layer put one there
    /// (to [park](Parked::park) the request on it).
    pub(crate) fn log(&self) -> Option<&Arc<Log>> {
        self.log.as_ref()
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The request's deadline passed while it waited in a layer inside the retry
/// layer (the token budget or the concurrency queue). The request was not
/// sent; the retry layer gives up with
/// [`GiveUpReason::Deadline`](crate::GiveUpReason::Deadline) and keeps this
/// error as the source of its [`Error::RetriesExhausted`](crate::Error::RetriesExhausted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeadlineReached;

impl fmt::Display for DeadlineReached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request's deadline passed while it waited to be sent")
    }
}

impl std::error::Error for DeadlineReached {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_is_recorded_and_cut_at_the_deadline() {
        let log = WaitLog::new(
            Log::new(Some(Instant::now() + Duration::from_secs(2)), None),
            None,
        );
        let mut ext = http::Extensions::new();
        ext.insert(log.clone());
        let mut wait = Wait::of(&ext);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(wait.poll_deadline(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(wait.poll_deadline(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(wait.poll_deadline(&mut cx), Poll::Ready(DeadlineReached));
        assert_eq!(log.waited(), Duration::from_secs(2));
        // Recorded once.
        drop(wait);
        assert_eq!(log.waited(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_log_a_wait_has_no_deadline() {
        let mut wait = Wait::of(&http::Extensions::new());
        assert_eq!(wait.started(), None);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(wait.poll_deadline(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(wait.poll_deadline(&mut cx).is_pending());
        assert!(wait.started().is_some());
    }

    /// Every request waiting in an inner layer under a retry layer holds
    /// its attempt's log: a guard against it growing unnoticed (280 bytes
    /// when the copy could be lent, 288 with the flag of a request parked
    /// on it, 280 with the copy compact, set by the request's own head
    /// kept until its first attempt).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_log_stays_small() {
        let size = std::mem::size_of::<Log>();
        assert!(size <= 280, "Log is {size} bytes");
        // The copy the log keeps after the first attempt: its headers are
        // one buffer (24 bytes, and a count), where a header map takes 96.
        let copy = std::mem::size_of::<HeadCopy>();
        assert!(copy <= 152, "HeadCopy is {copy} bytes");
    }

    fn keep(log: &WaitLog, head: Parts) {
        Log::keep_head(&mut Arc::clone(&log.log), head);
    }

    fn take(log: &WaitLog) -> Option<Parts> {
        Log::take_head(&mut Arc::clone(&log.log))
    }

    fn head(name: &'static str) -> Request<()> {
        let mut request = Request::post("/v1/messages")
            .header("x-request-name", name)
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        request.extensions_mut().insert(7u32);
        request
    }

    /// A layer that holds the attempt parks it on an equal copy: the
    /// request keeps its body and extensions, and is made again from the
    /// copy (with its own extensions) when it is passed on; the copy stays.
    #[test]
    fn a_parked_request_is_made_again_from_the_copy() {
        let log = WaitLog::new(Log::new(None, None), None);
        let (copy, ()) = head("a").into_parts();
        keep(&log, copy);
        let mut attempt = head("a").map(|()| "body");
        attempt.extensions_mut().insert(log.clone());
        attempt.extensions_mut().insert(9u32);
        let parked = Parked::park(attempt, &log.log).unwrap_or_else(|_| panic!("parked"));
        let request = parked.unpark().unwrap_or_else(|| panic!("unparked"));
        assert_eq!(request.headers()["x-request-name"], "a");
        assert_eq!(request.uri(), "/v1/messages");
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(*request.body(), "body");
        assert_eq!(request.extensions().get::<u32>(), Some(&9));
        assert!(request.extensions().get::<WaitLog>().is_some());
        let copy = take(&log).unwrap_or_else(|| panic!("the copy stays"));
        assert_eq!(copy.extensions.get::<u32>(), Some(&7));
    }

    /// While a request stands on the copy, the retry layer gets a clone of
    /// it (a hedging layer's next attempt), and no second request parks on
    /// it; dropped, the parked request leaves the copy.
    #[test]
    fn the_copy_a_request_stands_on_is_cloned_not_taken() {
        let log = WaitLog::new(Log::new(None, None), None);
        keep(&log, head("a").into_parts().0);
        let parked = Parked::park(head("a"), &log.log).unwrap_or_else(|_| panic!("parked"));
        let clone = take(&log).unwrap_or_else(|| panic!("cloned"));
        assert_eq!(clone.headers["x-request-name"], "a");
        assert!(
            Parked::park(head("a"), &log.log).is_err(),
            "one request parks at a time"
        );
        drop(parked);
        let copy = take(&log).unwrap_or_else(|| panic!("left"));
        assert_eq!(copy.headers["x-request-name"], "a");
        assert!(take(&log).is_none(), "taken, once nobody stands on it");
    }

    /// The compact copy gives back the head it was made of: every value of
    /// a header named twice in its order, a value marked sensitive still
    /// so, the URI, method and version, and the head's own extensions.
    #[test]
    fn the_copy_makes_the_same_head_again() {
        let mut secret = http::HeaderValue::from_static("sk-ant-secret");
        secret.set_sensitive(true);
        let (mut own, ()) = Request::put("https://api.example.com/v1/messages?beta=true")
            .version(http::Version::HTTP_2)
            .header("anthropic-beta", "one")
            .header("x-api-key", secret)
            .header("anthropic-beta", "two")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"))
            .into_parts();
        own.extensions.insert(7u32);
        let mut log = Log::with_head(None, None, own.clone());
        let first = Log::swap_head(&mut log, true).unwrap_or_else(|| panic!("the head"));
        assert_eq!(first.headers, own.headers);
        let again = Log::take_head(&mut log).unwrap_or_else(|| panic!("the copy"));
        assert_eq!(again.method, own.method);
        assert_eq!(again.uri, own.uri);
        assert_eq!(again.version, own.version);
        assert_eq!(again.headers, own.headers);
        let betas: Vec<_> = again.headers.get_all("anthropic-beta").iter().collect();
        assert_eq!(betas, ["one", "two"]);
        assert!(again.headers["x-api-key"].is_sensitive());
        assert_eq!(again.extensions.get::<u32>(), Some(&7));
        assert!(Log::take_head(&mut log).is_none(), "taken once");
    }

    /// Headers made at run time, a value of bytes above ASCII, an empty
    /// value, a long one, and a head without headers come back the same from the
    /// copy's buffer, and a request with them parks on it.
    #[test]
    fn the_copy_keeps_any_header_bytes() {
        let mut head = Request::post("/v1/messages")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"))
            .into_parts()
            .0;
        let name = HeaderName::from_bytes(b"X-Made-At-Run-Time").unwrap_or_else(|e| panic!("{e}"));
        let value = HeaderValue::from_bytes(b"caf\xc3\xa9 \xff").unwrap_or_else(|e| panic!("{e}"));
        head.headers.append(name.clone(), value.clone());
        head.headers.append(
            http::header::ACCEPT,
            HeaderValue::from_bytes(b"").unwrap_or_else(|e| panic!("{e}")),
        );
        // Written on the stack, then into a buffer of their size.
        let short = HeadCopy::of(&head);
        assert_eq!(short.headers.capacity(), short.headers.len());
        let again = short.to_parts(false).unwrap_or_else(|| panic!("the head"));
        assert_eq!(again.headers, head.headers);
        // Lengths of two and three varint bytes, one sensitive, more than
        // the stack holds: measured first.
        let long = HeaderValue::from_str(&"v".repeat(1000)).unwrap_or_else(|e| panic!("{e}"));
        head.headers.append(name.clone(), long);
        let mut longer =
            HeaderValue::from_str(&"w".repeat(20_000)).unwrap_or_else(|e| panic!("{e}"));
        longer.set_sensitive(true);
        head.headers.append(http::header::COOKIE, longer);
        let copy = HeadCopy::of(&head);
        assert_eq!(
            copy.headers.capacity(),
            copy.headers.len(),
            "the copy takes the room of its bytes"
        );
        let again = copy.to_parts(true).unwrap_or_else(|| panic!("the head"));
        assert_eq!(again.headers, head.headers);
        assert_eq!(again.headers[&name].as_bytes(), value.as_bytes());
        assert!(again.headers[http::header::COOKIE].is_sensitive());
        assert!(!again.headers[&name].is_sensitive());
        assert!(copy.same(&Request::from_parts(head, ())));
        let bare = Request::get("/").body(()).unwrap_or_else(|e| panic!("{e}"));
        let copy = HeadCopy::of(&bare.into_parts().0);
        let again = copy.into_parts().unwrap_or_else(|| panic!("the head"));
        assert!(again.headers.is_empty());
        assert_eq!(again.method, http::Method::GET);
    }

    /// A request whose headers are the copy's in another order is not
    /// parked (told apart, it waits whole, nothing lost), and one with a
    /// header more or less neither.
    #[test]
    fn headers_in_another_order_or_number_are_not_parked() {
        let log = WaitLog::new(Log::new(None, None), None);
        let two = |first: (&'static str, &'static str), second: (&'static str, &'static str)| {
            Request::post("/v1/messages")
                .header(first.0, first.1)
                .header(second.0, second.1)
                .body(())
                .unwrap_or_else(|e| panic!("{e}"))
        };
        keep(&log, two(("a", "1"), ("b", "2")).into_parts().0);
        let swapped = two(("b", "2"), ("a", "1"));
        assert!(Parked::park(swapped, &log.log).is_err());
        let mut more = two(("a", "1"), ("b", "2"));
        more.headers_mut()
            .append("b", http::HeaderValue::from_static("3"));
        assert!(Parked::park(more, &log.log).is_err());
        let parked = Parked::park(two(("a", "1"), ("b", "2")), &log.log);
        assert!(parked.is_ok(), "the same head parks");
    }

    /// A head that a layer in between changed is not parked: the request
    /// is given back whole, and the copy stays.
    #[test]
    fn a_changed_head_is_not_parked() {
        let log = WaitLog::new(Log::new(None, None), None);
        keep(&log, head("a").into_parts().0);
        let whole = Parked::park(head("b"), &log.log)
            .err()
            .unwrap_or_else(|| panic!("not parked"));
        assert_eq!(whole.headers()["x-request-name"], "b");
        let kept = take(&log).unwrap_or_else(|| panic!("kept"));
        assert_eq!(kept.headers["x-request-name"], "a");
    }
}
