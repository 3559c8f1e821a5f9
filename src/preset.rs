//! The recommended stack in one call (in progress).
