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

/// The first poll of `fut`, made at once: its output if it is ready without waiting.
pub(crate) async fn poll_once<F: std::future::Future>(
    mut fut: std::pin::Pin<&mut F>,
) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await
}

/// `fut`, bounded by the deadline `deadline` gives: `None` if it passes first. The timer (and
/// the deadline) is made only if `fut` does not finish on its first poll: most reads and writes
/// of a call find their bytes (or room for them) there already, and a timer made and dropped for
/// each costs more than the read.
pub(crate) async fn bounded<F: std::future::Future>(
    deadline: impl FnOnce() -> tokio::time::Instant,
    fut: F,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    match poll_once(fut.as_mut()).await {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => tokio::time::timeout_at(deadline(), fut).await.ok(),
    }
}
