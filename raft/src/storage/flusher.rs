//! Group commit for the disk: one thread makes writes durable on behalf of every group.
//!
//! Writers (Raft log appends of all groups, votes, truncations; checkpoints of the state) write
//! first and then hand their completion to a flusher. The flusher takes every request that is
//! waiting, runs its sync once (the `fdatasync`s of the write-ahead log's dirty segments for the
//! log; sled's flush and the fsync of its files for a checkpoint of the state) and only then
//! completes the requests. Under load one sync therefore acknowledges many appends of many
//! groups; nothing syncs per flow or per entry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use tokio::sync::{mpsc, oneshot};

use crate::types::TypeConfig;

/// Bound on queued flush requests; a full queue makes appenders wait (back-pressure).
const QUEUE_CAPACITY: usize = 16_384;

/// What a flush request completes.
pub(crate) enum Waiter {
    /// An openraft log append.
    Log(openraft::storage::LogFlushed<TypeConfig>),
    /// Anything else that must be durable before it returns (votes, truncation, snapshots).
    Notify(oneshot::Sender<Result<(), String>>),
}

/// Handle to the node's flusher thread. Cloneable; the thread stops when every handle is gone.
#[derive(Clone)]
pub(crate) struct Flusher {
    tx: mpsc::Sender<Waiter>,
    fsyncs: Arc<AtomicU64>,
}

impl Flusher {
    /// Starts a flusher thread named `name` whose one sync per round is `sync`: it must make
    /// durable every write issued before it is called.
    pub(crate) fn start(
        name: &str,
        mut sync: impl FnMut() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<Flusher> {
        let (tx, mut rx) = mpsc::channel::<Waiter>(QUEUE_CAPACITY);
        let fsyncs = Arc::new(AtomicU64::new(0));
        let counter = fsyncs.clone();
        thread::Builder::new().name(name.into()).spawn(move || {
            let mut batch = Vec::with_capacity(256);
            while let Some(first) = rx.blocking_recv() {
                batch.push(first);
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                // Every request in the batch was queued after its writes: this one sync covers them.
                let result = sync();
                counter.fetch_add(1, Ordering::Relaxed);
                for waiter in batch.drain(..) {
                    match waiter {
                        Waiter::Log(cb) => {
                            cb.log_io_completed(result.clone().map_err(|e| std::io::Error::other(e.clone())))
                        }
                        Waiter::Notify(tx) => {
                            let _ = tx.send(result.clone());
                        }
                    }
                }
            }
        })?;
        Ok(Flusher { tx, fsyncs })
    }

    /// Completes `cb` after the next flush. The entries it covers must already be written.
    pub(crate) async fn flush_log(
        &self,
        cb: openraft::storage::LogFlushed<TypeConfig>,
    ) -> Result<(), String> {
        self.tx.send(Waiter::Log(cb)).await.map_err(|_| "flusher stopped".to_string())
    }

    /// Waits until everything written before this call is durable.
    pub(crate) async fn flush(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Waiter::Notify(tx)).await.map_err(|_| "flusher stopped".to_string())?;
        rx.await.map_err(|_| "flusher stopped".to_string())?
    }

    /// How many sync rounds this flusher has done.
    pub(crate) fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }
}
