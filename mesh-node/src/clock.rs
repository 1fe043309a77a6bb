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

/// `fut`, bounded by `deadline`: `None` if the deadline passes first. The timer is made only if
/// `fut` does not finish on its first poll: most reads and writes of a call find their bytes (or
/// room for them) there already, and a timer made and dropped for each costs more than the read.
pub(crate) async fn by<F: std::future::Future>(
    deadline: tokio::time::Instant,
    fut: F,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => tokio::time::timeout_at(deadline, fut).await.ok(),
    }
}

/// `fut`, bounded to `limit` from now: as [`by`], and the clock is read only if a timer is made.
pub(crate) async fn within<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => tokio::time::timeout(limit, fut).await.ok(),
    }
}
