//! The Raft log of one group: a sled tree keyed by big-endian log index, plus the group's vote,
//! committed id and last purged id in the group's meta tree.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, StorageIOError, Vote};

use super::flusher::Flusher;
use crate::codec;
use crate::types::{Entry, LogId, StorageError, TypeConfig};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

fn any(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

fn msg(e: String) -> AnyError {
    AnyError::error(e)
}

/// The log storage of one group. Cheap to clone (the reader handed to replication is a clone).
#[derive(Clone)]
pub struct LogStore {
    pub(super) log: sled::Tree,
    pub(super) meta: sled::Tree,
    pub(super) flusher: Flusher,
}

impl LogStore {
    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let read_err = |e: AnyError| StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, e);
        match self.meta.get(key).map_err(|e| read_err(any(e)))? {
            None => Ok(None),
            Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(|e| read_err(any(e)))?)),
        }
    }

    fn write_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        let write_err = |e: AnyError| StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, e);
        let bytes = codec::encode(value).map_err(|e| write_err(any(e)))?;
        self.meta.insert(key, bytes).map_err(|e| write_err(any(e)))?;
        Ok(())
    }

    /// Removes every entry at or below `index`, from the front.
    fn remove_upto(&self, index: u64) -> Result<(), StorageError> {
        for key in self.log.range(..=index_key(index)).keys() {
            let key = key.map_err(|e| StorageIOError::write_logs(any(e)))?;
            self.log.remove(key).map_err(|e| StorageIOError::write_logs(any(e)))?;
        }
        Ok(())
    }

    /// Finishes a purge that a crash interrupted.
    pub(super) fn finish_purge(&self) -> Result<(), StorageError> {
        match self.read_meta::<LogId>(KEY_PURGED)? {
            Some(purged) => self.remove_upto(purged.index),
            None => Ok(()),
        }
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        match self.log.last().map_err(|e| StorageIOError::read_logs(any(e)))? {
            None => Ok(None),
            Some((_, bytes)) => {
                let entry: Entry = codec::decode(&bytes).map_err(|e| StorageIOError::read_logs(any(e)))?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => Bound::Included(index_key(i)),
            Bound::Excluded(&i) => Bound::Excluded(index_key(i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Bound::Included(index_key(i)),
            Bound::Excluded(&i) => Bound::Excluded(index_key(i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        for item in self.log.range::<[u8; 8], _>((start, end)) {
            let (_, bytes) = item.map_err(|e| StorageIOError::read_logs(any(e)))?;
            entries.push(codec::decode(&bytes).map_err(|e| StorageIOError::read_logs(any(e)))?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(KEY_PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.write_meta(KEY_VOTE, vote)?;
        // Durable before returning: a vote forgotten by a crash could elect two leaders.
        self.flusher.flush().await.map_err(|e| StorageIOError::write_vote(msg(e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.read_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed: the committed id only saves work at restart; losing it is safe.
        self.write_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Plain inserts in index order: a crash part-way leaves a prefix, never a hole (sled
        // recovers a prefix of its writes), and the callback below has not fired for any of them.
        // No `sled::Batch`: sled seals and writes its I/O buffer for every batch.
        for entry in entries {
            let bytes =
                codec::encode(&entry).map_err(|e| StorageIOError::write_log_entry(entry.log_id, any(e)))?;
            self.log
                .insert(index_key(entry.log_id.index), bytes)
                .map_err(|e| StorageIOError::write_logs(any(e)))?;
        }
        // The entries are readable now; openraft learns they are durable only when the flusher's
        // next `Db::flush` (shared with every other group of this node) has returned.
        self.flusher.flush_log(callback).await.map_err(|e| StorageIOError::write_logs(msg(e)))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // From the end backwards: a crash part-way leaves a shorter log, never a hole.
        let keys: Vec<_> = self
            .log
            .range(index_key(log_id.index)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        for key in keys.into_iter().rev() {
            self.log.remove(key).map_err(|e| StorageIOError::write_logs(any(e)))?;
        }
        // Durable before returning: a truncated suffix must not come back after a crash while a
        // new leader's entries are appended in its place.
        self.flusher.flush().await.map_err(|e| StorageIOError::write_logs(msg(e)))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first, then remove from the front: no hole at any moment, and
        // entries a crash leaves below the purge point are removed at the next open.
        self.write_meta(KEY_PURGED, &log_id)?;
        self.remove_upto(log_id.index)?;
        // One line per snapshot's purge; the message names the tree and the index (tests read it).
        tracing::info!("purged {} up to index {}", String::from_utf8_lossy(&self.log.name()), log_id.index);
        Ok(())
    }
}
