//! The openraft type configuration shared by every group, and the group-level command batch.
//!
//! One type config serves group 0 and all shard groups so that one transport and one log format
//! carry them all; a group applies only the commands of its kind and answers `WrongGroup` to the
//! others.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::meta::{MetaCommand, MetaReply};
use crate::shard::{ShardCommand, ShardReply};

/// A command for some group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// For group 0.
    Meta(MetaCommand),
    /// For a shard group.
    Shard(ShardCommand),
}

/// The reply to one [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// From group 0.
    Meta(MetaReply),
    /// From a shard group.
    Shard(ShardReply),
    /// The command was sent to a group of the other kind; nothing changed.
    WrongGroup,
}

/// The payload of one Raft log entry: the commands packed by group commit, with the proposer's
/// wall-clock time. `apply` uses `now_ms` (made monotonic) as the only notion of time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Wall-clock time at the proposer (ms since the Unix epoch).
    pub now_ms: u64,
    /// The commands, applied in order; each gets its own reply.
    pub commands: Vec<Command>,
}

/// The replies to a [`Request`], one per command, in order (empty for blank and membership
/// entries).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Response {
    /// One reply per command.
    pub replies: Vec<Reply>,
}

openraft::declare_raft_types!(
    /// fetter's openraft type configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft instance of one group.
pub type Raft = openraft::Raft<TypeConfig>;
/// openraft's storage error for our node id type.
pub type StorageError = openraft::StorageError<u64>;
/// A log id of our type config.
pub type LogId = openraft::LogId<u64>;
/// A log entry of our type config.
pub type Entry = openraft::Entry<TypeConfig>;
