//! A background task owned by an actor's state: dropping the state (the actor stopped,
//! was killed, or panicked) aborts it, so no timer, delivery or feed of a dead actor lives on.

use std::future::Future;

use tokio::task::JoinHandle;

/// A spawned task that is aborted when this value is dropped.
#[derive(Debug)]
pub(crate) struct Task(JoinHandle<()>);

impl Task {
    /// Spawns `future` on the current runtime.
    pub(crate) fn spawn(future: impl Future<Output = ()> + Send + 'static) -> Self {
        Task(tokio::spawn(future))
    }

    /// Whether the task has ended.
    pub(crate) fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}
