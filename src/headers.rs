//! Parsing of pacing headers (in progress).
