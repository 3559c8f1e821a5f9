//! Tower middleware that keeps a client (or a gateway) of a rate-limited LLM API,
//! Anthropic's Messages API first, at the highest rate its limits allow, with
//! almost no `429 Too Many Requests` and no lost request.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
pub mod error;
pub mod headers;

#[cfg(feature = "budget")]
#[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
pub mod budget;
#[cfg(feature = "concurrency")]
#[cfg_attr(docsrs, doc(cfg(feature = "concurrency")))]
pub mod concurrency;
#[cfg(feature = "emulator")]
#[cfg_attr(docsrs, doc(cfg(feature = "emulator")))]
pub mod emulator;
#[cfg(feature = "budget")]
#[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
pub mod estimate;
#[cfg(all(feature = "retry", feature = "budget", feature = "concurrency"))]
#[cfg_attr(
    docsrs,
    doc(cfg(all(feature = "retry", feature = "budget", feature = "concurrency")))
)]
pub mod preset;
#[cfg(feature = "retry")]
#[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
pub mod retry;

pub use error::{BoxError, Dimension, Error, GiveUpReason};
