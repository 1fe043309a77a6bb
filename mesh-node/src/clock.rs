//! The node's clock: tokio's, so a test under a paused clock (`start_paused = true`) runs the call
//! path in simulated time (deadlines, back-off, ejections). Outside tests it is the monotonic
//! clock.

use std::time::{Duration, Instant};

/// Now.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Time since `earlier`.
pub(crate) fn since(earlier: Instant) -> Duration {
    now().saturating_duration_since(earlier)
}
