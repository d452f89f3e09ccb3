//! The Raft log of one group on the node's write-ahead log ([`super::wal`]): openraft's
//! `RaftLogStorage` over it. Passes openraft's storage suite (`raft/tests/storage_suite.rs`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, OptionalSend, StorageIOError, Vote};

use super::wal::{Wal, WalError};
use crate::codec;
use crate::ids::GroupId;
use crate::types::{Entry, LogId, StorageError, TypeConfig};

fn any(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

fn wal(e: WalError) -> AnyError {
    AnyError::new(&e)
}

/// The log of one group. Cheap to clone (the reader handed to replication is a clone).
#[derive(Clone)]
pub struct WalLog {
    wal: Wal,
    group: u64,
}

impl WalLog {
    /// `group`'s log in `wal`.
    pub fn new(wal: Wal, group: GroupId) -> WalLog {
        WalLog { wal, group: u64::from(group.0) }
    }

    /// Whether this replica must grant no vote: the group was dropped on this node once (its
    /// earlier replica here forgot what it had acknowledged) and its log is empty again (no
    /// entry, nothing purged). See `transport::server`.
    pub fn withholds_votes(&self) -> bool {
        self.wal.forgot(self.group)
    }
}

impl RaftLogReader<TypeConfig> for WalLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        let raw = self.wal.read(self.group, from, to).map_err(|e| StorageIOError::read_logs(wal(e)))?;
        raw.iter()
            .map(|bytes| codec::decode(bytes).map_err(|e| StorageIOError::read_logs(any(e)).into()))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for WalLog {
    type LogReader = WalLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let (last_purged_log_id, last_log_id) = self.wal.log_state(self.group);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        // Durable before returning: a vote forgotten by a crash could elect two leaders.
        self.wal.save_vote(self.group, vote).await.map_err(|e| StorageIOError::write_vote(wal(e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        Ok(self.wal.vote(self.group))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: the committed id only saves work at restart; losing it is safe.
        self.wal.save_committed(self.group, committed).map_err(|e| StorageIOError::write_logs(wal(e)))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.wal.committed(self.group))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes =
                codec::encode(&entry).map_err(|e| StorageIOError::write_log_entry(entry.log_id, any(e)))?;
            encoded.push((entry.log_id, bytes));
        }
        // Readable on return; the callback fires after the syncer's fdatasync covers them.
        self.wal
            .append(self.group, encoded, callback)
            .await
            .map_err(|e| StorageIOError::write_logs(wal(e)))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Durable before returning: a truncated suffix must not come back after a crash while a
        // new leader's entries are appended in its place.
        self.wal.truncate(self.group, log_id.index).await.map_err(|e| StorageIOError::write_logs(wal(e)))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.wal.purge(self.group, log_id).await.map_err(|e| StorageIOError::write_logs(wal(e)))?;
        // One line per snapshot's purge; the message names the group and the index (tests read it).
        tracing::info!("purged g{}/log up to index {}", self.group, log_id.index);
        Ok(())
    }
}
