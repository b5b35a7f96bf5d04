//! Cold: a future polled out of line.
//!
//! rustc lets LLVM inline the poll of an awaited future into its parent's,
//! so a session's whole async call tree (login, every slow-path message,
//! the goodbye) became one poll function with a stack frame of 4.5 KiB,
//! touched page by page (a stack probe) on every wakeup, its hot path
//! spread among the code of rare ones. A future wrapped in [`Cold`] is
//! polled by a function of its own: its state still lives inside the
//! parent's (no allocation), but its code and stack frame are paid for
//! only when it runs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// See the module docs.
    pub struct Cold<F> {
        #[pin]
        future: F,
    }
}

/// `future`, polled out of line.
pub fn cold<F: Future>(future: F) -> Cold<F> {
    Cold { future }
}

impl<F: Future> Future for Cold<F> {
    type Output = F::Output;

    #[inline(never)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().future.poll(cx)
    }
}
