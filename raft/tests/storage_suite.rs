//! openraft's own storage conformance suite, run against the production layout: the group's log
//! on the node's write-ahead log (with a neighbouring group writing into the same segments) and
//! its state machine in the node's sled store.

use fetter_raft::ids::GroupId;
use fetter_raft::storage::{StateMachineStore, Store, WalLog};
use fetter_raft::types::{StorageError, TypeConfig};
use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};
use openraft::Vote;

/// Keeps the temp dir and the neighbouring group alive for the duration of one suite test.
struct Guard {
    _dir: tempfile::TempDir,
    _neighbour: (WalLog, StateMachineStore),
    _store: Store,
}

struct Builder;

impl StoreBuilder<TypeConfig, WalLog, StateMachineStore, Guard> for Builder {
    async fn build(&self) -> Result<(Guard, WalLog, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open store");
        // A live neighbour: group 0 with a vote of its own in the same log.
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
