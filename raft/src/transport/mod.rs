//! The Raft transport: one tonic service per node carries the Raft RPCs of every group.
//!
//! Each request names its group, the cluster id and the sender's node id and incarnation; the
//! openraft message travels as codec bytes. A node refuses, with an error reply and never a
//! panic, bytes it cannot decode, a group it does not host and a foreign cluster id.
//! Connections are lazy and shared by all groups talking to the same peer, and so are calls: the
//! requests of all groups waiting for the same peer leave together in one `CallBatch` (a few
//! batches in flight per peer), which divides the per-RPC cost of HTTP/2, syscalls and wake-ups
//! by the number of busy groups. A peer that cannot be reached is reported to openraft as
//! `Unreachable` so that it backs off.

mod client;
mod server;

/// Generated protobuf and tonic code.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("fetter.raft.v1");
}

pub use client::{CallError, NetworkFactory, Peers};
pub use server::{GroupRegistry, RaftService};

use crate::ids::{ClusterId, Incarnation, NodeId};

/// Largest message the transport accepts or sends (snapshot chunks are far smaller).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Bound on the requests of one `CallBatch`.
pub const MAX_BATCH_REQUESTS: usize = 64;

/// Who is talking: carried in every request.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The cluster this node belongs to.
    pub cluster_id: ClusterId,
    /// This node.
    pub node_id: NodeId,
    /// This life of this node's disk.
    pub incarnation: Incarnation,
}
