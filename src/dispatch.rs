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
//!
//! Under a retry layer, each attempt carries a fresh [`WaitLog`] with a
//! marker node inside its allocation: the first budget the attempt reaches
//! claims that node instead of allocating one, and the current marker is
//! kept in the log's extension (no extension of its own). Without a retry
//! layer outside it, a budget puts its marker in an extension of its own.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use crate::wait::{Log, WaitLog};

/// Set while a layer of this crate is inside its inner service's `call`.
const PASSING: u8 = 1;
/// Set once the request was handed to a service that is not a layer of
/// this crate.
const SENT: u8 = 2;

/// A marker shared by the clones of one request (extensions are cloned with
/// the request head), telling whether the request reached the transport: the
/// node inside an attempt's wait log, or a node of its own where the request
/// has no retry layer outside (or the log's node was taken).
#[derive(Clone, Debug)]
pub(crate) enum Dispatch {
    /// The node inside an attempt's wait log.
    InLog(Arc<Log>),
    /// A node of its own (the size of the node: no wait log's parts).
    Own(Arc<Node>),
}

/// The state of one marker.
#[derive(Debug, Default)]
pub(crate) struct Node {
    state: AtomicU8,
    /// The marker of an outer budget, told when this request is sent.
    parent: Option<Dispatch>,
    /// Whether a budget took this node as its marker (a node inside a wait
    /// log serves one budget at most).
    claimed: AtomicBool,
}

impl Node {
    /// A node not yet claimed, chained to `parent`.
    pub(crate) fn new(parent: Option<Dispatch>) -> Self {
        Node {
            state: AtomicU8::new(0),
            parent,
            claimed: AtomicBool::new(false),
        }
    }
}

impl Dispatch {
    /// A fresh marker for a request, chained to the one an outer budget put
    /// on it (if any), which is told of the sending too.
    pub(crate) fn new(parent: Option<Dispatch>) -> Self {
        Dispatch::Own(Arc::new(Node::new(parent)))
    }

    fn node(&self) -> &Node {
        match self {
            Dispatch::InLog(log) => log.node(),
            Dispatch::Own(node) => node,
        }
    }

    /// The marker on a request, if a budget put one there.
    #[cfg_attr(not(any(feature = "retry", feature = "concurrency")), allow(dead_code))]
    pub(crate) fn of(extensions: &http::Extensions) -> Option<Dispatch> {
        current(extensions).cloned()
    }

    /// A budget's fresh marker for the request it passes on, chained to the
    /// marker already on it: the node inside the attempt's wait log if no
    /// budget claimed it yet (no allocation), else a node of its own; kept
    /// in the wait log's extension if there is one, else in an extension of
    /// its own.
    pub(crate) fn mark(extensions: &mut http::Extensions) -> Dispatch {
        if let Some(log) = extensions.get_mut::<WaitLog>() {
            let marker = match log.claim_node() {
                Some(log) => Dispatch::InLog(log),
                None => Dispatch::new(log.marker().cloned()),
            };
            log.set_marker(marker.clone());
            return marker;
        }
        let marker = Dispatch::new(extensions.get::<Dispatch>().cloned());
        extensions.insert(marker.clone());
        marker
    }

    /// A layer of this crate received the request: the call in progress
    /// did not reach the transport.
    pub(crate) fn received(extensions: &http::Extensions) {
        if let Some(d) = current(extensions) {
            d.node().state.fetch_and(!PASSING, Ordering::AcqRel);
        }
    }

    /// [`received`](Self::received), returning the request's marker (as
    /// [`of`](Self::of) would: one lookup for both).
    #[cfg_attr(not(feature = "concurrency"), allow(dead_code))]
    pub(crate) fn receive(extensions: &http::Extensions) -> Option<Dispatch> {
        let d = current(extensions)?;
        d.node().state.fetch_and(!PASSING, Ordering::AcqRel);
        Some(d.clone())
    }

    /// Before the inner service's `call`: the request is passing. With
    /// [`passed`](Self::passed) right after the call, it is noted as sent
    /// if no layer of this crate received it during the call. Two calls
    /// rather than one taking a closure: the request is then handed to
    /// `call` directly, not moved into a closure first (a copy of a few
    /// hundred bytes).
    pub(crate) fn passing(marker: Option<&Dispatch>) {
        if let Some(d) = marker {
            d.node().state.fetch_or(PASSING, Ordering::AcqRel);
        }
    }

    /// After the inner service's `call` (see [`passing`](Self::passing)).
    pub(crate) fn passed(marker: Option<&Dispatch>) {
        if let Some(d) = marker {
            let before = d.node().state.fetch_and(!PASSING, Ordering::AcqRel);
            if before & PASSING != 0 {
                d.mark_sent();
            }
        }
    }

    /// [`passing`](Self::passing), `call`, [`passed`](Self::passed).
    #[cfg(test)]
    pub(crate) fn pass<R>(marker: Option<&Dispatch>, call: impl FnOnce() -> R) -> R {
        Dispatch::passing(marker);
        let out = call();
        Dispatch::passed(marker);
        out
    }

    fn mark_sent(&self) {
        let mut node = Some(self);
        while let Some(d) = node {
            d.node().state.fetch_or(SENT, Ordering::AcqRel);
            node = d.node().parent.as_ref();
        }
    }

    /// Whether the request (any attempt of it) reached the transport.
    pub(crate) fn sent(&self) -> bool {
        self.node().state.load(Ordering::Acquire) & SENT != 0
    }
}

/// The marker on a request: the one kept in its wait log (the innermost
/// budget under a retry layer), else the one in an extension of its own.
fn current(extensions: &http::Extensions) -> Option<&Dispatch> {
    extensions
        .get::<WaitLog>()
        .and_then(WaitLog::marker)
        .or_else(|| extensions.get::<Dispatch>())
}

impl Node {
    /// Takes this node as a budget's marker; false if a budget already did.
    pub(crate) fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
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

    /// Under a retry layer, the first budget takes the node inside the
    /// attempt's wait log (no allocation of its own); a budget inside it gets
    /// a node of its own, kept in the log's extension as the request's
    /// marker; a send reaches every marker up the chain.
    #[test]
    fn a_budget_under_a_retry_layer_takes_the_node_in_the_attempts_log() {
        let outer = Dispatch::new(None);
        let mut ext = http::Extensions::new();
        ext.insert(outer.clone());
        let log = Log::new(None, Dispatch::of(&ext));
        let marker = Dispatch::of(&ext);
        ext.insert(WaitLog::new(Arc::clone(&log), marker));
        let first = Dispatch::mark(&mut ext);
        assert!(
            matches!(&first, Dispatch::InLog(l) if Arc::ptr_eq(l, &log)),
            "the node in the log is taken"
        );
        let second = Dispatch::mark(&mut ext);
        let Dispatch::Own(own) = &second else {
            panic!("a node serves one budget");
        };
        let current = Dispatch::of(&ext);
        assert!(matches!(current, Some(Dispatch::Own(c)) if Arc::ptr_eq(&c, own)));
        // A layer of the crate receives it: not sent.
        Dispatch::pass(Some(&second), || Dispatch::received(&ext));
        assert!(!second.sent() && !first.sent() && !outer.sent());
        // The transport: sent, for every budget.
        Dispatch::pass(Dispatch::of(&ext).as_ref(), || ());
        assert!(second.sent() && first.sent() && outer.sent());
    }

    #[test]
    fn a_send_reaches_the_outer_marker() {
        let outer = Dispatch::new(None);
        let inner = Dispatch::new(Some(outer.clone()));
        Dispatch::pass(Some(&inner), || ());
        assert!(inner.sent() && outer.sent());
    }
}
