//! openraft's own storage conformance suite, run against the production layout: the group under
//! test shares its sled `Db` (and flusher) with another live group that holds state of its own.

use fetter_raft::ids::GroupId;
use fetter_raft::storage::wal::Wal;
use fetter_raft::storage::{LogStore, StateMachineStore, Store, WalLog};
use fetter_raft::types::{StorageError, TypeConfig};
use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};
use openraft::Vote;

/// Keeps the temp dir and the neighbouring group alive for the duration of one suite test.
struct Guard {
    _dir: tempfile::TempDir,
    _neighbour: (LogStore, StateMachineStore),
    _store: Store,
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, Guard> for Builder {
    async fn build(&self) -> Result<(Guard, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open store");
        // A live neighbour: group 0 with a vote of its own in the same Db.
        let (mut n_log, n_sm) = store.group(GroupId(0)).expect("neighbour group");
        n_log.save_vote(&Vote::new(7, 9)).await?;
        let (log, sm) = store.group(GroupId(5)).expect("group under test");
        Ok((Guard { _dir: dir, _neighbour: (n_log, n_sm), _store: store }, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage conformance suite");
}

/// The same suite against the group's log on the node's write-ahead log (with a neighbouring
/// group writing into the same segments), beside the sled state machine.
struct WalGuard {
    _dir: tempfile::TempDir,
    _neighbour: WalLog,
    _store: Store,
}

struct WalBuilder;

impl StoreBuilder<TypeConfig, WalLog, StateMachineStore, WalGuard> for WalBuilder {
    async fn build(&self) -> Result<(WalGuard, WalLog, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("state")).expect("open store");
        // Small segments, so the suite's logs roll over and purge whole segments.
        let (wal, _) = Wal::open_with(&dir.path().join("wal"), 4096).expect("open wal");
        let mut neighbour = WalLog::new(wal.clone(), GroupId(0));
        neighbour.save_vote(&Vote::new(7, 9)).await?;
        let (_, sm) = store.group(GroupId(5)).expect("group under test");
        let log = WalLog::new(wal, GroupId(5));
        Ok((WalGuard { _dir: dir, _neighbour: neighbour, _store: store }, log, sm))
    }
}

#[test]
fn openraft_storage_suite_on_the_write_ahead_log() {
    Suite::test_all(WalBuilder).expect("openraft storage conformance suite (write-ahead log)");
}
