//! Identities used across the journal: nodes, groups, shards, flows, epochs.
//!
//! Every identity is a newtype so that a signature says what it takes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node of the cluster. Stable for the life of the node's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// A Raft group hosted by the cluster. Group 0 is the metadata group; group `k + 1` is shard `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u32);

impl GroupId {
    /// The metadata group (members, cluster parameters, placement).
    pub const META: GroupId = GroupId(0);

    /// The group that replicates `shard`.
    pub fn of_shard(shard: ShardId) -> GroupId {
        GroupId(shard.0 + 1)
    }

    /// The shard this group replicates, or `None` for the metadata group.
    pub fn shard(self) -> Option<ShardId> {
        self.0.checked_sub(1).map(ShardId)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.shard() {
            None => write!(f, "g0(meta)"),
            Some(s) => write!(f, "g{}({})", self.0, s),
        }
    }
}

/// A shard: `xxh3_64(type, instance) mod shard_count` (see [`crate::placement`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// The identity of one flow instance: its registered type name and the caller-chosen instance id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FlowId {
    /// The flow type (`Flow::TYPE`), e.g. `"order"`.
    pub flow_type: String,
    /// The instance id chosen by the caller, e.g. `"o-1"`.
    pub instance: String,
}

impl FlowId {
    /// A flow id from its type and instance.
    pub fn new(flow_type: impl Into<String>, instance: impl Into<String>) -> Self {
        FlowId { flow_type: flow_type.into(), instance: instance.into() }
    }
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.flow_type, self.instance)
    }
}

/// The activation epoch of a flow. Every command of an activation carries it; a stale one is
/// rejected (DESIGN.md §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// The cluster's identity, generated once at initialization and carried by every RPC.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub String);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One life of a node's disk: generated when a data directory is first created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Incarnation(pub u64);

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
