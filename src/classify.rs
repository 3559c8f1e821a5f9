//! Inner errors recognised by their type, never by their text.
//!
//! An inner service fails without a response for many reasons: the request
//! timed out, the connection was refused or reset, or something this crate
//! cannot know about. The retry layer retries the transient ones and the
//! adaptive concurrency layer takes a timeout as a sign of overload. Both ask
//! a [`Classifier`], which walks the error's [`source`](Error::source) chain,
//! outermost first, and names the first error it recognises:
//!
//! - [`Class::Timeout`]: tower's `timeout::error::Elapsed`, tokio's
//!   `time::error::Elapsed`, or a [`std::io::Error`] of kind
//!   [`TimedOut`](io::ErrorKind::TimedOut);
//! - [`Class::Connection`]: a [`std::io::Error`] of a kind that means the
//!   connection failed or broke (refused, reset, aborted, not connected, address
//!   not available, broken pipe, unexpected end of file). hyper-util's client
//!   wraps the `io::Error` of a failed connect in its own error
//!   (`Error::is_connect()`), so it is found in the chain without naming
//!   hyper-util's type.
//! - With the `reqwest` feature, a `reqwest::Error` by its own answers:
//!   `is_timeout()` is a [`Class::Timeout`] (reqwest's timeout error is of a
//!   private type), `is_connect()` a [`Class::Connection`].
//!
//! An error of no type it knows is [`Class::Unknown`]. Where a type cannot be
//! known to this crate (a transport of one's own, an error that carries a
//! timeout in a field), a user-supplied hook decides: it is asked first, for
//! each error of the chain, and the first answer wins.
//!
//! # Why not by the message
//!
//! A message is for people: "request timeout" may be the text of a 400 the
//! server sent back, and a timeout may say "deadline has elapsed". Matching
//! words mistakes the first for a timeout and misses errors whose text
//! changes between versions.
//!
//! # Examples
//!
//! ```
//! use std::io;
//! use tower_llm_limits::classify::{Class, Classifier};
//!
//! let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
//! assert_eq!(Classifier::new().classify(&refused), Class::Connection);
//!
//! // Text is not a type: not a timeout.
//! let text = io::Error::other("upstream timeout");
//! assert_eq!(Classifier::new().classify(&text), Class::Unknown);
//!
//! // A hook of one's own decides first.
//! let hook = Classifier::with_hook(|e| (e.to_string() == "upstream timeout").then_some(Class::Timeout));
//! assert_eq!(hook.classify(&text), Class::Timeout);
//! ```

use std::error::Error;
use std::fmt;
use std::io;
use std::sync::Arc;

/// What an inner error is, as far as retrying and overload go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Class {
    /// The request timed out.
    Timeout,
    /// The connection failed or broke before a response came.
    Connection,
    /// Known not to be transient (only a hook says so): not retried.
    Permanent,
    /// Of no type the classifier knows.
    Unknown,
}

/// A user-supplied decision for errors of types this crate cannot know:
/// `Some(class)` decides, `None` leaves the error to the built-in rules.
pub type Hook = dyn Fn(&(dyn Error + 'static)) -> Option<Class> + Send + Sync + 'static;

/// Classifies inner errors by type along their source chain, after an
/// optional [`Hook`]. Cheap to clone (the hook is shared).
#[derive(Clone, Default)]
pub struct Classifier {
    hook: Option<Arc<Hook>>,
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl Classifier {
    /// The built-in rules alone.
    pub fn new() -> Self {
        Classifier { hook: None }
    }

    /// The built-in rules after `hook`, which is asked first for each error of
    /// the chain.
    pub fn with_hook<F>(hook: F) -> Self
    where
        F: Fn(&(dyn Error + 'static)) -> Option<Class> + Send + Sync + 'static,
    {
        Classifier {
            hook: Some(Arc::new(hook)),
        }
    }

    /// The class of `err`: the hook's answer for the first error of the chain
    /// it answers for, else the first error of the chain of a known type,
    /// else [`Class::Unknown`].
    pub fn classify(&self, err: &(dyn Error + 'static)) -> Class {
        if let Some(hook) = &self.hook {
            if let Some(class) = chain(err).find_map(|e| hook(e)) {
                return class;
            }
        }
        chain(err).find_map(by_type).unwrap_or(Class::Unknown)
    }

    /// Whether `err` is a [`Class::Timeout`].
    pub fn is_timeout(&self, err: &(dyn Error + 'static)) -> bool {
        self.classify(err) == Class::Timeout
    }
}

/// Whether `err` shows that a connection was never established, so the
/// request cannot have reached the server: an [`io::Error`] of kind
/// [`ConnectionRefused`](io::ErrorKind::ConnectionRefused) or
/// [`AddrNotAvailable`](io::ErrorKind::AddrNotAvailable) anywhere in its
/// source chain (hyper-util's client keeps the `io::Error` of a failed
/// connect in its chain); with the `reqwest` feature, also a
/// `reqwest::Error` whose `is_connect()` is true (TCP, TLS or proxy
/// connection failed: no byte of the request was written).
///
/// Every other error, a connection reset, a broken pipe, an unexpected end
/// of file, a timeout, or an error of unknown type, may have come after the
/// request was written, and is `false`: the server may have done the work.
/// The retry layer uses this to count replays, and to refuse them under
/// [`AfterSend::Fail`](crate::retry::AfterSend::Fail).
///
/// # Examples
///
/// ```
/// use std::io;
/// use tower_llm_limits::classify::never_connected;
///
/// assert!(never_connected(&io::Error::from(io::ErrorKind::ConnectionRefused)));
/// assert!(!never_connected(&io::Error::from(io::ErrorKind::ConnectionReset)));
/// assert!(!never_connected(&io::Error::other("connection closed")));
/// ```
pub fn never_connected(err: &(dyn Error + 'static)) -> bool {
    chain(err).any(|e| {
        // reqwest says so itself: the connection (TCP, TLS, proxy) failed.
        #[cfg(feature = "reqwest")]
        if e.downcast_ref::<::reqwest::Error>()
            .is_some_and(::reqwest::Error::is_connect)
        {
            return true;
        }
        let Some(io) = e.downcast_ref::<io::Error>() else {
            return false;
        };
        match io.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::AddrNotAvailable => true,
            // `io::Error`'s `source()` skips the error it wraps: look inside.
            _ => io.get_ref().is_some_and(|inner| {
                let inner: &(dyn Error + 'static) = inner;
                never_connected(inner)
            }),
        }
    })
}

/// `err`, then its sources, outermost first.
fn chain<'a>(err: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |e: &&'a (dyn Error + 'static)| (*e).source())
}

/// The class of one error, from its type alone.
fn by_type(err: &(dyn Error + 'static)) -> Option<Class> {
    if err.is::<tower::timeout::error::Elapsed>() || err.is::<tokio::time::error::Elapsed>() {
        return Some(Class::Timeout);
    }
    // reqwest's own timeout error is a private type: ask reqwest.
    #[cfg(feature = "reqwest")]
    if let Some(e) = err.downcast_ref::<::reqwest::Error>() {
        if e.is_timeout() {
            return Some(Class::Timeout);
        }
        if e.is_connect() {
            return Some(Class::Connection);
        }
    }
    let io = err.downcast_ref::<io::Error>()?;
    match io.kind() {
        io::ErrorKind::TimedOut => Some(Class::Timeout),
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::NotConnected
        | io::ErrorKind::AddrNotAvailable
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => Some(Class::Connection),
        // Another kind says nothing; the error it wraps may. (`io::Error`'s
        // `source()` skips the wrapped error itself and returns its source.)
        _ => io.get_ref().and_then(|inner| {
            let inner: &(dyn Error + 'static) = inner;
            chain(inner).find_map(by_type)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that wraps another, as hyper's and tower's do.
    #[derive(Debug)]
    struct Wrap(&'static str, Box<dyn Error + Send + Sync>);

    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.1)
        }
    }

    fn wrapped(inner: impl Error + Send + Sync + 'static) -> Wrap {
        Wrap(
            "client error",
            Box::new(Wrap("send failed", Box::new(inner))),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn each_timeout_type_is_recognised_through_a_chain() {
        let tokio_elapsed = tokio::time::timeout(
            std::time::Duration::from_millis(1),
            std::future::pending::<()>(),
        )
        .await;
        let Err(tokio_elapsed) = tokio_elapsed else {
            panic!("pending never ends");
        };
        let c = Classifier::new();
        assert_eq!(c.classify(&wrapped(tokio_elapsed)), Class::Timeout);
        let tower_elapsed = tower::timeout::error::Elapsed::new();
        assert_eq!(c.classify(&wrapped(tower_elapsed)), Class::Timeout);
        let io = io::Error::new(io::ErrorKind::TimedOut, "read");
        assert_eq!(c.classify(&wrapped(io)), Class::Timeout);
        // Boxed, as a layer above tower's Timeout sees it.
        let boxed: crate::BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert!(c.is_timeout(&*boxed));
    }

    #[test]
    fn each_connection_kind_is_recognised_through_a_chain() {
        let c = Classifier::new();
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::NotConnected,
            io::ErrorKind::AddrNotAvailable,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
        ] {
            let err = wrapped(io::Error::new(kind, "x"));
            assert_eq!(c.classify(&err), Class::Connection, "{kind:?}");
        }
        // An io error of another kind with a known source is classified by the source.
        let outer = io::Error::other(wrapped(io::Error::from(io::ErrorKind::ConnectionReset)));
        assert_eq!(c.classify(&outer), Class::Connection);
        let outer = io::Error::other(tower::timeout::error::Elapsed::new());
        assert_eq!(c.classify(&outer), Class::Timeout);
    }

    #[test]
    fn only_a_connection_never_made_is_known_unsent() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::AddrNotAvailable,
        ] {
            assert!(never_connected(&wrapped(io::Error::from(kind))), "{kind:?}");
            let outer = io::Error::other(wrapped(io::Error::from(kind)));
            assert!(never_connected(&outer), "{kind:?} inside io::Error");
        }
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::TimedOut,
        ] {
            assert!(
                !never_connected(&wrapped(io::Error::from(kind))),
                "{kind:?}"
            );
        }
        let text: crate::BoxError = "connection refused".into();
        assert!(!never_connected(&*text));
    }

    #[test]
    fn a_message_saying_timeout_is_not_a_timeout() {
        let c = Classifier::new();
        for text in ["timeout", "request timed out", "deadline has elapsed"] {
            assert_eq!(c.classify(&wrapped(io::Error::other(text))), Class::Unknown);
            let boxed: crate::BoxError = text.into();
            assert_eq!(c.classify(&*boxed), Class::Unknown, "{text}");
        }
        let other = io::Error::new(io::ErrorKind::PermissionDenied, "timeout");
        assert_eq!(c.classify(&other), Class::Unknown);
    }

    #[test]
    fn the_hook_decides_first() {
        let c = Classifier::with_hook(|e| {
            let io = e.downcast_ref::<io::Error>()?;
            (io.kind() == io::ErrorKind::ConnectionRefused).then_some(Class::Permanent)
        });
        let refused = wrapped(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(c.classify(&refused), Class::Permanent);
        // Where the hook says nothing, the built-in rules decide.
        let reset = wrapped(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(c.classify(&reset), Class::Connection);
        let text: crate::BoxError = "custom timeout".into();
        let c = Classifier::with_hook(|e| {
            (e.to_string() == "custom timeout").then_some(Class::Timeout)
        });
        assert!(c.is_timeout(&*text));
    }
}
