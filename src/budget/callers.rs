//! Who a gateway's caller is: authentication by configured caller keys, and
//! the refusals of callers that are unknown or ambiguous.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use http::request::Parts;
use http::{header, HeaderValue, Response, StatusCode};

use crate::wire::error::{ErrorBody, ErrorKind};

/// The callers a gateway in enforce mode admits, each told apart by the API
/// key it sends (`x-api-key: <key>` or `authorization: Bearer <key>`, as the
/// official SDKs send them).
///
/// - [`Callers::new`] + [`Callers::caller`] (the secure choice): a set of
///   named caller keys. A request is charged to the caller whose key it
///   sends; a request with no key or an unknown key is refused with 401
///   (`authentication_error`) before any budget is touched. Keys are compared
///   in constant time (as 128-bit SipHash digests under a random per-process
///   key), and a budget is keyed by the caller's *name*, never by its key.
///   The number of budgets is bounded by the number of callers (times the
///   model classes they use).
/// - [`Callers::any_key_unauthenticated`]: for a trusted network only. Any
///   key is accepted and is its own budget, keyed by a SipHash-1-3 hash under
///   a random per-process key (so a hash means nothing outside the process
///   and is never logged). A caller that rotates its key gets a new budget
///   each time: this does not limit an untrusted caller.
///
/// With either, a request that sends two `x-api-key` headers, two
/// `authorization` headers, or an `x-api-key` and a bearer token that
/// differ is refused with 400 (`invalid_request_error`): the caller is
/// ambiguous.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::budget::{Callers, Limits, TokenBudgetLayer};
///
/// let callers = Callers::new()
///     .caller("team-a", "gw-key-of-team-a")
///     .caller("team-b", "gw-key-of-team-b");
/// let layer = TokenBudgetLayer::enforce(Limits::new().rpm(20), callers);
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct Callers {
    inner: Arc<Inner>,
}

#[derive(Clone)]
enum Inner {
    Keys {
        hashers: [RandomState; 2],
        keys: Vec<([u64; 2], Arc<str>)>,
    },
    AnyKey {
        hasher: RandomState,
    },
}

impl Callers {
    /// No caller yet: every request is refused with 401 until callers are
    /// added with [`caller`](Self::caller).
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner::Keys {
                hashers: [RandomState::new(), RandomState::new()],
                keys: Vec::new(),
            }),
        }
    }

    /// Adds a caller: requests sending `key` are charged to the budget
    /// named `name` (which appears in snapshots and may appear in logs: it
    /// must not be a secret). Two keys may share a name (and so a budget).
    /// Has no effect on [`any_key_unauthenticated`](Self::any_key_unauthenticated).
    pub fn caller(mut self, name: impl Into<String>, key: impl AsRef<[u8]>) -> Self {
        if let Inner::Keys { hashers, keys } = Arc::make_mut(&mut self.inner) {
            let digest = digest(hashers, key.as_ref());
            keys.push((digest, Arc::from(name.into())));
        }
        self
    }

    /// Any key is a caller of its own (trusted networks only: a caller that
    /// changes its key gets a fresh budget). A request with no key is still
    /// refused with 401.
    pub fn any_key_unauthenticated() -> Self {
        Self {
            inner: Arc::new(Inner::AnyKey {
                hasher: RandomState::new(),
            }),
        }
    }

    /// The budget a request is charged to, or why it is refused.
    pub(crate) fn identify(&self, parts: &Parts) -> Result<String, CallerRefusal> {
        let key = presented_key(parts)?;
        match &*self.inner {
            Inner::Keys { hashers, keys } => {
                let presented = digest(hashers, key);
                let mut found: Option<&Arc<str>> = None;
                // Every configured key is compared, in constant time each.
                for (digest, name) in keys {
                    if ct_eq(digest, &presented) {
                        found = Some(name);
                    }
                }
                found
                    .map(|name| format!("caller-{name}"))
                    .ok_or(CallerRefusal::UnknownKey)
            }
            Inner::AnyKey { hasher } => Ok(format!("{HASHED_PREFIX}{:016x}", hasher.hash_one(key))),
        }
    }
}

impl Default for Callers {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Callers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.inner {
            Inner::Keys { keys, .. } => f
                .debug_struct("Callers")
                .field("callers", &keys.len())
                .finish_non_exhaustive(),
            Inner::AnyKey { .. } => f.write_str("Callers::any_key_unauthenticated()"),
        }
    }
}

/// A budget key as it may appear in a log: a caller named by a hash of its
/// key (`key-…/class`, from [`Callers::any_key_unauthenticated`]) is shown
/// by its model class only, so no hash of a key is ever logged.
pub(crate) fn logged_key(key: &str) -> &str {
    match key.strip_prefix(HASHED_PREFIX) {
        Some(rest) => rest.rsplit_once('/').map_or("", |(_, class)| class),
        None => key,
    }
}

/// The prefix of the budget names [`Callers::any_key_unauthenticated`] gives.
const HASHED_PREFIX: &str = "key-";

/// A 128-bit keyed digest of a key: two SipHash-1-3 hashes under two random keys.
fn digest(hashers: &[RandomState; 2], key: &[u8]) -> [u64; 2] {
    [hashers[0].hash_one(key), hashers[1].hash_one(key)]
}

/// Equality of two digests in constant time (no early exit).
fn ct_eq(a: &[u64; 2], b: &[u64; 2]) -> bool {
    let diff = (a[0] ^ b[0]) | (a[1] ^ b[1]);
    std::hint::black_box(diff) == 0
}

/// The one API key a request sends, as `x-api-key` or as a bearer token.
fn presented_key(parts: &Parts) -> Result<&[u8], CallerRefusal> {
    let api_key = single(parts, "x-api-key")?.map(HeaderValue::as_bytes);
    let bearer = match single(parts, header::AUTHORIZATION.as_str())? {
        None => None,
        Some(v) => Some(bearer_token(v.as_bytes()).ok_or(CallerRefusal::MissingKey)?),
    };
    let key = match (api_key, bearer) {
        (Some(a), Some(b)) if a != b => return Err(CallerRefusal::Ambiguous),
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => return Err(CallerRefusal::MissingKey),
    };
    if key.is_empty() {
        return Err(CallerRefusal::MissingKey);
    }
    Ok(key)
}

/// The header's one value: `None` if absent, a refusal if sent twice.
fn single<'a>(parts: &'a Parts, name: &str) -> Result<Option<&'a HeaderValue>, CallerRefusal> {
    let mut values = parts.headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(CallerRefusal::Ambiguous);
    }
    Ok(first)
}

/// The token of `Bearer <token>` (the scheme is case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Why a gateway refused a request before charging any budget (in client
/// mode: the error of such a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallerRefusal {
    /// No API key (or an `authorization` header that is not `Bearer <key>`):
    /// 401 `authentication_error`.
    MissingKey,
    /// A key that is no configured caller's: 401 `authentication_error`.
    UnknownKey,
    /// Two `x-api-key` or two `authorization` headers, or an `x-api-key` and
    /// a bearer token that differ: 400 `invalid_request_error`.
    Ambiguous,
    /// A new budget key (caller and model class) while the budget already
    /// holds its most keys (`TokenBudgetBuilder::max_keys`), none of them
    /// idle: 529 `overloaded_error`.
    TooManyKeys,
}

impl CallerRefusal {
    /// The status of the answer: 401, 400 for [`CallerRefusal::Ambiguous`],
    /// 529 for [`CallerRefusal::TooManyKeys`].
    pub fn status(self) -> StatusCode {
        self.kind().status()
    }

    pub(crate) fn kind(self) -> ErrorKind {
        match self {
            CallerRefusal::MissingKey | CallerRefusal::UnknownKey => ErrorKind::Authentication,
            CallerRefusal::Ambiguous => ErrorKind::InvalidRequest,
            CallerRefusal::TooManyKeys => ErrorKind::Overloaded,
        }
    }

    /// The answer in the API's error shape (`{"type":"error","error":{…}}`).
    pub fn into_response(self) -> Response<bytes::Bytes> {
        ErrorBody::new(self.kind(), &self.to_string()).into_response()
    }
}

impl fmt::Display for CallerRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallerRefusal::MissingKey => {
                "x-api-key header is required (or authorization: Bearer <key>)"
            }
            CallerRefusal::UnknownKey => "invalid x-api-key",
            CallerRefusal::Ambiguous => {
                "exactly one API key is allowed: duplicate or conflicting x-api-key / authorization headers"
            }
            CallerRefusal::TooManyKeys => "the gateway is serving its most callers; try again later",
        })
    }
}

impl std::error::Error for CallerRefusal {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        match b.body(()) {
            Ok(r) => r.into_parts().0,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn configured_keys_authenticate_by_name() {
        let callers = Callers::new().caller("a", "key-a").caller("b", "key-b");
        let id = |h: &[(&str, &str)]| callers.identify(&parts(h));
        assert_eq!(id(&[("x-api-key", "key-a")]), Ok("caller-a".into()));
        assert_eq!(
            id(&[("authorization", "Bearer key-b")]),
            Ok("caller-b".into())
        );
        assert_eq!(
            id(&[("x-api-key", "key-c")]),
            Err(CallerRefusal::UnknownKey)
        );
        assert_eq!(id(&[]), Err(CallerRefusal::MissingKey));
        assert_eq!(
            id(&[("authorization", "Basic a2V5LWE=")]),
            Err(CallerRefusal::MissingKey)
        );
        assert_eq!(
            id(&[("x-api-key", "key-a"), ("x-api-key", "key-b")]),
            Err(CallerRefusal::Ambiguous)
        );
        assert_eq!(
            id(&[("x-api-key", "key-a"), ("authorization", "Bearer key-b")]),
            Err(CallerRefusal::Ambiguous)
        );
        assert_eq!(
            id(&[("x-api-key", "key-a"), ("authorization", "bearer key-a")]),
            Ok("caller-a".into())
        );
    }

    #[test]
    fn any_key_hash_is_keyed_and_hides_the_key() {
        let a = Callers::any_key_unauthenticated();
        let b = Callers::any_key_unauthenticated();
        let p = parts(&[("x-api-key", "sk-ant-secret")]);
        let (ka, kb) = (a.identify(&p), b.identify(&p));
        assert_eq!(ka, a.identify(&p));
        let ka = ka.unwrap_or_default();
        assert!(ka.starts_with("key-") && !ka.contains("secret"));
        // Another random key hashes the same secret to another name.
        assert_ne!(Ok(ka), kb);
        assert_eq!(a.identify(&parts(&[])), Err(CallerRefusal::MissingKey));
    }

    #[test]
    fn logged_keys_hide_hashes() {
        assert_eq!(logged_key("key-0123456789abcdef/sonnet"), "sonnet");
        assert_eq!(logged_key("caller-a/sonnet"), "caller-a/sonnet");
        assert_eq!(logged_key("sonnet"), "sonnet");
    }

    #[test]
    fn refusals_use_the_api_error_shape() {
        let r = CallerRefusal::UnknownKey.into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let body = String::from_utf8_lossy(r.body());
        assert!(body.contains("\"authentication_error\""), "{body}");
        assert_eq!(CallerRefusal::Ambiguous.status(), StatusCode::BAD_REQUEST);
    }
}
