//! Whether a request reached the inner transport: the budget's way to know
//! what to refund, whatever the order of the layers.
//!
//! The token budget puts a [`Dispatch`] marker in the extensions of the
//! request it passes on. Every layer of this crate (the budget, the retry
//! layer, the concurrency layer) does two things with the marker it finds on
//! a request:
//!
//! - in `call`, [`received`](Dispatch::received): "this request came to a
//!   layer of this crate, not to the transport";
//! - around each call of its own inner service,
//!   [`pass`](Dispatch::pass): the marker notes that it is passing the
//!   request on, and after the inner `call` returns, if no layer of this
//!   crate said `received` in between, the inner service is the transport
//!   (or a foreign layer in front of it) and the request counts as *sent*.
//!
//! A layer that holds a request (the concurrency queue, the retry layer's
//! waits) calls its inner service only when it stops holding it, so a request
//! cancelled or shed while held was never sent. A foreign layer that defers
//! the call (tower's `Buffer`) makes the request count as sent at once: the
//! budget then keeps the charge, which is the safe side.
//!
//! Once sent, a request stays sent: a retry of it by an inner retry layer
//! does not make the first attempt unsent.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Set while a layer of this crate is inside its inner service's `call`.
const PASSING: u8 = 1;
/// Set once the request was handed to a service that is not a layer of
/// this crate.
const SENT: u8 = 2;

/// A marker shared by the clones of one request (extensions are cloned with
/// the request head), telling whether the request reached the transport.
#[derive(Clone, Debug, Default)]
pub(crate) struct Dispatch(Arc<Node>);

#[derive(Debug, Default)]
struct Node {
    state: AtomicU8,
    /// The marker of an outer budget, told when this request is sent.
    parent: Option<Dispatch>,
}

impl Dispatch {
    /// A fresh marker for a request, chained to the one an outer budget put
    /// on it (if any), which is told of the sending too.
    pub(crate) fn new(parent: Option<Dispatch>) -> Self {
        Dispatch(Arc::new(Node {
            state: AtomicU8::new(0),
            parent,
        }))
    }

    /// The marker on a request, if a budget put one there.
    pub(crate) fn of(extensions: &http::Extensions) -> Option<Dispatch> {
        extensions.get::<Dispatch>().cloned()
    }

    /// A layer of this crate received the request: the call in progress
    /// did not reach the transport.
    pub(crate) fn received(extensions: &http::Extensions) {
        if let Some(d) = extensions.get::<Dispatch>() {
            d.0.state.fetch_and(!PASSING, Ordering::AcqRel);
        }
    }

    /// Calls `call` (the inner service's `call`), noting the request as sent
    /// if no layer of this crate received it during the call.
    pub(crate) fn pass<R>(marker: Option<&Dispatch>, call: impl FnOnce() -> R) -> R {
        let Some(d) = marker else {
            return call();
        };
        d.0.state.fetch_or(PASSING, Ordering::AcqRel);
        let out = call();
        let before = d.0.state.fetch_and(!PASSING, Ordering::AcqRel);
        if before & PASSING != 0 {
            d.mark_sent();
        }
        out
    }

    fn mark_sent(&self) {
        let mut node = Some(self);
        while let Some(d) = node {
            d.0.state.fetch_or(SENT, Ordering::AcqRel);
            node = d.0.parent.as_ref();
        }
    }

    /// Whether the request (any attempt of it) reached the transport.
    pub(crate) fn sent(&self) -> bool {
        self.0.state.load(Ordering::Acquire) & SENT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_to_a_foreign_service_is_a_send() {
        let d = Dispatch::new(None);
        Dispatch::pass(Some(&d), || ());
        assert!(d.sent());
    }

    #[test]
    fn a_pass_to_a_layer_of_the_crate_is_not() {
        let d = Dispatch::new(None);
        let mut ext = http::Extensions::new();
        ext.insert(d.clone());
        Dispatch::pass(Some(&d), || Dispatch::received(&ext));
        assert!(!d.sent());
        // That layer passes it on later, to the transport.
        Dispatch::pass(Dispatch::of(&ext).as_ref(), || ());
        assert!(d.sent());
        // Sent stays sent.
        Dispatch::pass(Some(&d), || Dispatch::received(&ext));
        assert!(d.sent());
    }

    #[test]
    fn a_send_reaches_the_outer_marker() {
        let outer = Dispatch::new(None);
        let inner = Dispatch::new(Some(outer.clone()));
        Dispatch::pass(Some(&inner), || ());
        assert!(inner.sent() && outer.sent());
    }
}
