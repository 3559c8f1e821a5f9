//! Emulator of the Messages API rate limiter (in progress).
