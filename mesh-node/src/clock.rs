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
///
/// A future of its own, not an `async fn`: that held `fut` twice (as its argument and pinned),
/// and every read and write of a call is bounded.
pub(crate) fn bounded<F: std::future::Future, D: FnOnce() -> tokio::time::Instant>(
    deadline: D,
    fut: F,
) -> Bounded<F, D> {
    Bounded {
        fut,
        deadline: Some(deadline),
        timer: None,
    }
}

pin_project_lite::pin_project! {
    /// See [`bounded`].
    pub(crate) struct Bounded<F, D> {
        #[pin]
        fut: F,
        // Taken when the timer is made.
        deadline: Option<D>,
        // Polled outside tokio's task budget, as `tokio::time::Timeout` polls its timer once the
        // future has spent the budget: a future that spends it on every poll without finishing
        // would otherwise keep its deadline from ever firing.
        #[pin]
        timer: Option<tokio::task::Unconstrained<tokio::time::Sleep>>,
    }
}

impl<F: std::future::Future, D: FnOnce() -> tokio::time::Instant> std::future::Future
    for Bounded<F, D>
{
    type Output = Option<F::Output>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let mut this = self.project();
        if let std::task::Poll::Ready(out) = this.fut.poll(cx) {
            return std::task::Poll::Ready(Some(out));
        }
        if let Some(deadline) = this.deadline.take() {
            this.timer
                .set(Some(tokio::task::unconstrained(tokio::time::sleep_until(
                    deadline(),
                ))));
        }
        match this.timer.as_pin_mut() {
            Some(timer) => timer.poll(cx).map(|()| None),
            None => std::task::Poll::Pending,
        }
    }
}
