//! Cap on requests in flight, fixed or adaptive (in progress).
