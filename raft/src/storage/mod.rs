//! Durable storage of a node: one sled `Db` holding every Raft group it hosts.
//!
//! Per group `g{N}`: `g{N}/log` (entries by big-endian index), `g{N}/meta` (vote, committed,
//! last purged, state generation, latest snapshot) and `g{N}/sm/{generation}` (applied state).
//! One flusher thread per node makes writes durable for all groups at once (`flusher`).
//!
//! No `sled::Batch` or transaction is used: sled 0.34 seals and writes its I/O buffer (through
//! its thread pool) for every batch and switches every later operation of the process to a global
//! read-write lock; with one batch per append and per apply that was most of the CPU of a node.
//! Atomicity comes from ordering instead: sled recovers a prefix of its writes in log order, so
//! the log is written and truncated without holes, and an applied batch is written as one redo
//! record before its rows (see `sm`).

// openraft dictates `StorageError` (large) as the error of every storage method; helpers share it.
#![allow(clippy::result_large_err)]

mod flusher;
mod log;
mod sm;
mod tree;
pub mod wal;
mod wal_log;

use std::path::Path;

pub use self::log::LogStore;
pub use self::sm::{GroupKind, SnapshotBuilder, StateDigest, StateMachineStore, StateReader};
pub use self::wal_log::WalLog;
use crate::ids::GroupId;
use crate::types::StorageError;

/// Why a node's store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sled refused to open or read the directory.
    #[error("cannot open store at {path}: {source}")]
    Open {
        /// The directory.
        path: String,
        /// sled's error.
        source: sled::Error,
    },
    /// sled failed afterwards.
    #[error("store failed: {0}")]
    Sled(#[from] sled::Error),
    /// The flusher thread could not be started.
    #[error("cannot start the flusher thread: {0}")]
    Thread(#[from] std::io::Error),
    /// A group's storage could not be opened.
    #[error("cannot open group storage: {0}")]
    Group(#[from] StorageError),
}

/// sled's page cache per node unless configured otherwise.
pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// A node's sled database and its flusher. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    flusher: flusher::Flusher,
}

impl Store {
    /// Opens (or creates) the store in `dir` with sled's default page cache of this crate
    /// ([`DEFAULT_CACHE_BYTES`]).
    pub fn open(dir: &Path) -> Result<Store, Error> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `dir` with a page cache of `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store, Error> {
        let mut config = sled::Config::new().path(dir).cache_capacity(cache_bytes);
        if crate::bugs::planted("ack-before-flush") {
            // The planted bug's other half: no periodic flush either, so writes reach the disk
            // only when sled's write buffer fills.
            config = config.flush_every_ms(None);
        }
        let db = config.open().map_err(|source| Error::Open { path: dir.display().to_string(), source })?;
        let flushed = db.clone();
        let flusher = flusher::Flusher::start("sled-flusher", move || {
            // Skipped by the planted bug `ack-before-flush`: the requests are acknowledged while
            // their writes are still in sled's memory.
            if crate::bugs::planted("ack-before-flush") {
                return Ok(());
            }
            flushed.flush().map(|_| ()).map_err(|e| e.to_string())
        })?;
        Ok(Store { db, flusher })
    }

    /// The log and state machine storage of `group`, created empty if new.
    pub fn group(&self, group: GroupId) -> Result<(LogStore, StateMachineStore), Error> {
        let meta = self.db.open_tree(format!("g{}/meta", group.0))?;
        let log = LogStore {
            log: self.db.open_tree(format!("g{}/log", group.0))?,
            meta: meta.clone(),
            flusher: self.flusher.clone(),
        };
        log.finish_purge()?;
        let sm = StateMachineStore::open(self.db.clone(), meta, group, self.flusher.clone())?;
        Ok((log, sm))
    }

    /// The underlying database (node identity rows live in their own tree).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// How many fsyncs this node's flusher has done.
    pub fn fsyncs(&self) -> u64 {
        self.flusher.fsyncs()
    }
}
