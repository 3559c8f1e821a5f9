//! Retry honouring retry-after (in progress).
