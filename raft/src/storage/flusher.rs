//! Group commit for the disk: one thread flushes the node's sled `Db` on behalf of every group.
//!
//! Raft log appends of all groups write their entries into sled (in memory) and then hand their
//! completion callback to the flusher. The flusher takes every request that is waiting, calls
//! `Db::flush` once (sled flushes its whole log, so one fsync makes all of them durable) and only
//! then completes the callbacks. Under load one fsync therefore acknowledges many appends of many
//! groups; nothing fsyncs per flow or per entry.

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
    /// Starts the flusher thread for `db`.
    pub(crate) fn start(db: sled::Db) -> std::io::Result<Flusher> {
        let (tx, mut rx) = mpsc::channel::<Waiter>(QUEUE_CAPACITY);
        let fsyncs = Arc::new(AtomicU64::new(0));
        let counter = fsyncs.clone();
        thread::Builder::new().name("sled-flusher".into()).spawn(move || {
            let mut batch = Vec::with_capacity(256);
            while let Some(first) = rx.blocking_recv() {
                batch.push(first);
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                // The one fsync that makes every write issued before these requests durable
                // (skipped by the planted bug `ack-before-flush`: the requests are acknowledged
                // while their writes are still in sled's memory).
                let result = if crate::bugs::planted("ack-before-flush") {
                    Ok(())
                } else {
                    db.flush().map(|_| ()).map_err(|e| e.to_string())
                };
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

    /// How many fsyncs (sled flushes) this node has done.
    pub(crate) fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }
}
