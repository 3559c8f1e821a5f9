//! Token estimation for Messages requests (in progress).
