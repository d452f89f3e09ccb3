//! Durable storage of a node: its write-ahead log (the Raft log of every group it hosts) and one
//! sled `Db` holding every group's applied state.
//!
//! Layout of a data directory: `wal/` (segments of [`wal`]: entries, votes, committed ids and
//! purge points of all groups, interleaved) and `state/` (sled). In sled, per group `g{N}`:
//! `g{N}/meta` (state generation, latest snapshot) and `g{N}/sm/{generation}` (applied state);
//! the tree `node` holds the node's identity.
//!
//! Failure model. An append is acknowledged to openraft only after the `fdatasync` that covers
//! it (one per group-commit round, shared by all groups), and votes and truncations are synced
//! before they return: what Raft was told is durable survives a power cut. The applied state is
//! written by `apply` without any flush (sled writes it out on its own every half second) and is
//! made durable only at *checkpoints* (`Store::checkpoint`: sled's flush, then an fsync of every
//! file and directory of `state/`): before a snapshot is kept, after one is installed, and for
//! the identity. openraft purges the log only up to a snapshot, that is up to a checkpoint, so
//! after any crash the log still holds every entry the durable state lacks, and openraft
//! re-applies them from the state's `last_applied`.
//!
//! No `sled::Batch` or transaction is used: sled 0.34 seals and writes its I/O buffer (through
//! its thread pool) for every batch and switches every later operation of the process to a global
//! read-write lock. Atomicity of an applied batch comes from ordering instead: sled recovers a
//! prefix of its writes in log order, and a batch is written as one redo record before its rows
//! (see `sm`).

// openraft dictates `StorageError` (large) as the error of every storage method; helpers share it.
#![allow(clippy::result_large_err)]

mod flusher;
mod sm;
mod tree;
pub mod wal;
mod wal_log;

use std::path::{Path, PathBuf};

pub use self::sm::{
    GroupKind, MalformedSnapshot, SnapshotBuilder, StartGate, StateDigest, StateMachineStore, StateReader,
};
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
    /// The checkpoint thread could not be started.
    #[error("cannot start the checkpoint thread: {0}")]
    Thread(#[from] std::io::Error),
    /// A group's storage could not be opened.
    #[error("cannot open group storage: {0}")]
    Group(#[from] StorageError),
    /// The write-ahead log could not be opened (unreadable, or corrupt before its tail).
    #[error("{0}")]
    Wal(#[from] wal::WalError),
    /// The directory was written by a fetter that kept its Raft log in sled.
    #[error(
        "data directory {path} has the old layout (Raft log and state together in sled, files \
         `conf` and `db` at its top); this fetter keeps the log in `wal/` and the state in \
         `state/`. Start the node from an empty directory (as a replacement, it gets its \
         replicas from the other members), or run the older fetter on it"
    )]
    OldLayout {
        /// The directory.
        path: String,
    },
}

/// sled's page cache per node unless configured otherwise.
pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// A node's storage: its write-ahead log, its sled state and the checkpoint thread. Cheap to
/// clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    wal: wal::Wal,
    checkpoints: flusher::Flusher,
}

impl Store {
    /// Opens (or creates) the store in `dir` with sled's default page cache of this crate
    /// ([`DEFAULT_CACHE_BYTES`]).
    pub fn open(dir: &Path) -> Result<Store, Error> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `dir` with a page cache of `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store, Error> {
        if dir.join("conf").exists() && dir.join("db").exists() {
            return Err(Error::OldLayout { path: dir.display().to_string() });
        }
        let state_dir = dir.join("state");
        let db = sled::Config::new()
            .path(&state_dir)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|source| Error::Open { path: state_dir.display().to_string(), source })?;
        let (wal, recovery) = wal::Wal::open(&dir.join("wal"))?;
        drop_leftover_state(&db, &wal.groups())?;
        tracing::info!(
            dir = %dir.display(),
            segments = recovery.segments,
            records = recovery.records,
            torn_tail_bytes = recovery.truncated_bytes,
            "write-ahead log opened"
        );
        // The entries naming `state/` and `wal/` (created just now, on a new directory) are
        // durable before anything in them is acknowledged.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::Wal(wal::WalError::Io { path: dir.display().to_string(), source }))?;
        let flushed = db.clone();
        let checkpoints = flusher::Flusher::start("checkpoint", move || {
            flushed.flush().map_err(|e| e.to_string())?;
            // sled's flush writes its buffers out (with `sync_file_range`, which neither flushes
            // the disk's cache nor the files' metadata, and leaves blob files alone): fsync all.
            fsync_tree(&state_dir)
        })?;
        Ok(Store { db, wal, checkpoints })
    }

    /// The log and state machine storage of `group`, created empty if new.
    pub fn group(&self, group: GroupId) -> Result<(WalLog, StateMachineStore), Error> {
        let meta = self.db.open_tree(format!("g{}/meta", group.0))?;
        let sm = StateMachineStore::open(self.db.clone(), meta, group, self.checkpoints.clone())?;
        Ok((WalLog::new(self.wal.clone(), group), sm))
    }

    /// Deletes everything of `group` on this node (it no longer hosts it): first its log, durably
    /// (from then on the group is gone, whatever happens next), then its state. A crash between
    /// the two leaves state of a group the log does not know, which the next open deletes.
    pub async fn drop_group(&self, group: GroupId) -> Result<(), Error> {
        self.wal.drop_group(u64::from(group.0)).await?;
        drop_state(&self.db, group.0)?;
        self.checkpoint().await.map_err(|e| Error::Wal(wal::WalError::Sync(e)))?;
        tracing::info!(group = %group, "group storage dropped");
        Ok(())
    }

    /// Makes every write to the state issued before this call durable (see the module comment).
    pub async fn checkpoint(&self) -> Result<(), String> {
        self.checkpoints.flush().await
    }

    /// The underlying database (node identity rows live in their own tree).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// How many `fdatasync` rounds the write-ahead log has done (each acknowledges every append
    /// of every group waiting for it).
    pub fn fsyncs(&self) -> u64 {
        self.wal.syncs()
    }

    /// How many checkpoints of the state have been made.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.fsyncs()
    }
}

/// The group a sled tree of group state belongs to (`g{N}/...`), if it is one.
fn tree_group(name: &[u8]) -> Option<u32> {
    let rest = name.strip_prefix(b"g")?;
    let end = rest.iter().position(|b| *b == b'/')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Drops every tree of `group`'s state.
fn drop_state(db: &sled::Db, group: u32) -> Result<(), Error> {
    for name in db.tree_names() {
        if tree_group(&name) == Some(group) {
            db.drop_tree(&name)?;
        }
    }
    Ok(())
}

/// Drops the state of groups the log knows nothing of: what a crash in the middle of
/// [`Store::drop_group`] left (or empty trees of a group opened and never written). A group that
/// has applied anything has a vote in the log, which every new segment carries forward.
fn drop_leftover_state(db: &sled::Db, logged: &[u64]) -> Result<(), Error> {
    for name in db.tree_names() {
        let Some(group) = tree_group(&name) else { continue };
        if !logged.contains(&u64::from(group)) {
            tracing::info!(group, tree = %String::from_utf8_lossy(&name), "dropping state of a group the log does not hold");
            db.drop_tree(&name)?;
        }
    }
    Ok(())
}

/// fsyncs every file under `dir`, then every directory (so new files' entries are durable too).
fn fsync_tree(dir: &Path) -> Result<(), String> {
    let mut dirs: Vec<PathBuf> = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        let entries = std::fs::read_dir(&dirs[i]).map_err(|e| format!("{}: {e}", dirs[i].display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", dirs[i].display()))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|e| format!("{}: {e}", path.display()))?;
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() {
                match std::fs::File::open(&path) {
                    Ok(file) => file.sync_all().map_err(|e| format!("fsync {}: {e}", path.display()))?,
                    // sled removed it meanwhile (an old snapshot file): nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("{}: {e}", path.display())),
                }
            }
        }
        i += 1;
    }
    for d in dirs.iter().rev() {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("fsync {}: {e}", d.display()))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A directory written by a fetter that kept the Raft log in sled is refused with a message
    /// naming it, and left as it was.
    #[test]
    fn a_directory_of_the_old_layout_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = sled::open(dir.path()).expect("old-layout sled");
            db.open_tree("g1/log")
                .expect("tree")
                .insert(1u64.to_be_bytes(), b"entry".to_vec())
                .expect("insert");
            db.flush().expect("flush");
        }
        let before: Vec<_> =
            std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        match Store::open(dir.path()) {
            Err(e @ Error::OldLayout { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&dir.path().display().to_string()), "{text}");
                assert!(text.contains("old layout"), "{text}");
            }
            Err(e) => panic!("expected the old layout to be named, got {e}"),
            Ok(_) => panic!("an old-layout directory was opened"),
        }
        let after: Vec<_> =
            std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(before, after, "nothing was created in the refused directory");
    }

    /// Opens the store in `dir` again once the closed one's checkpoint thread has released sled's
    /// directory lock (shortly after the store is dropped).
    pub(crate) async fn reopen(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir) {
                Ok(store) => return store,
                Err(e)
                    if std::time::Instant::now() < deadline
                        && e.to_string().contains("could not acquire lock") =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("store did not reopen: {e}"),
            }
        }
    }

    /// A dropped group's log and state are gone, also after a reopen; state that a crash left
    /// behind the log's drop record is deleted at the next open.
    #[tokio::test]
    async fn a_dropped_group_leaves_nothing_and_leftover_state_goes_at_open() {
        use openraft::{CommittedLeaderId, LogId, Vote};
        let dir = tempfile::tempdir().expect("temp dir");
        let names = |db: &sled::Db| -> Vec<String> {
            db.tree_names().iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect()
        };
        {
            let store = Store::open(dir.path()).expect("open");
            for g in [1u32, 2, 3] {
                let (_, sm) = store.group(GroupId(g)).expect("group");
                drop(sm);
                store.wal.save_vote(u64::from(g), &Vote::new(1, 1)).await.expect("vote");
                store.db().open_tree(format!("g{g}/sm/0")).expect("tree").insert("row", "v").expect("insert");
            }
            let id = LogId::new(CommittedLeaderId::new(1, 1), 1);
            store.wal.save_committed(2, Some(id)).expect("committed");
            store.drop_group(GroupId(2)).await.expect("drop g2");
            assert!(!names(store.db()).iter().any(|n| n.starts_with("g2/")), "{:?}", names(store.db()));
            assert!(names(store.db()).iter().any(|n| n == "g1/sm/0"));
            // A crash after the log's drop record, before the state went (done by hand here).
            store.wal.drop_group(3).await.expect("drop g3's log only");
            store.checkpoint().await.expect("checkpoint");
        }
        let store = reopen(dir.path()).await;
        let left = names(store.db());
        assert!(!left.iter().any(|n| n.starts_with("g2/") || n.starts_with("g3/")), "{left:?}");
        assert_eq!(
            store.db().open_tree("g1/sm/0").expect("tree").get("row").expect("get").as_deref(),
            Some(&b"v"[..])
        );
        assert_eq!(store.wal.groups(), vec![1]);
    }

    /// A new directory gets `wal/` and `state/`; checkpoints are counted apart from the log's syncs.
    #[tokio::test]
    async fn a_new_directory_gets_the_wal_and_state_layout() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        store.db().insert("k", "v").expect("insert");
        store.checkpoint().await.expect("checkpoint");
        assert_eq!(store.checkpoints(), 1);
        assert!(dir.path().join("wal").is_dir());
        assert!(dir.path().join("state").join("conf").exists());
    }
}
