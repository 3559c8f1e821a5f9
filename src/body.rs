//! Replayable request bodies (in progress).
