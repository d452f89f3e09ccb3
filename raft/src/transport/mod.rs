//! The Raft transport: one tonic service per node carries the Raft RPCs of every group.
//!
//! Each request names its group, the cluster id and the sender's node id and incarnation; the
//! openraft message travels as codec bytes. A node refuses, with an error reply and never a
//! panic, bytes it cannot decode, a group it does not host, a foreign cluster id (any cluster id
//! while it does not know its own yet) and a member id whose incarnation is not the one group 0
//! lists — all before anything reaches openraft, which panics on some messages that contradict
//! its log (a follower whose log goes backwards).
//! Connections are lazy and shared by all groups talking to the same peer, and so are calls: the
//! requests of all groups waiting for the same peer leave together in one `CallBatch` (a few
//! batches in flight per peer), which divides the per-RPC cost of HTTP/2, syscalls and wake-ups
//! by the number of busy groups. Batches are bounded by count and bytes, and a large request
//! goes in a call of its own: one answer comes back for a whole batch, so a large request in it
//! would delay (or, past the message limit, fail) every heartbeat it shares the call with. An
//! AppendEntries carries at most `MAX_APPEND_BYTES` of entries; openraft is told to send fewer
//! (`PayloadTooLarge`) rather than handed a request it would retry forever. A peer that cannot
//! be reached is reported to openraft as `Unreachable` so that it backs off.

mod client;
mod server;

/// Generated protobuf and tonic code.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("fetter.raft.v1");
}

pub use client::{CallError, NetworkFactory, Peers};
pub use server::{GroupRegistry, RaftService};

use std::sync::{Arc, OnceLock};

use crate::ids::{ClusterId, Incarnation, NodeId};

/// Largest message the transport accepts or sends (snapshot chunks are far smaller).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Bound on the requests of one `CallBatch`.
pub const MAX_BATCH_REQUESTS: usize = 64;

/// Bound on the payload bytes of one `CallBatch`: the batch is answered as one message, so a
/// large request would hold back the heartbeats of every other group in it.
pub const MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// A request whose payload is larger than this goes in a call of its own, never in a batch.
pub const SOLO_REQUEST_BYTES: usize = 512 * 1024;

/// Bound on the encoded entries of one AppendEntries: more than one entry goes only if they fit
/// together (a single entry always goes; the group handle bounds entries). openraft waits one
/// heartbeat interval for the answer, so a request must be small enough to be sent and written
/// in that time, and a lagging follower catches up by many bounded requests.
pub const MAX_APPEND_BYTES: usize = 1024 * 1024;

/// Who is talking: carried in every request.
///
/// The cluster id is learned at most once in a node's life: a node created as an initial member
/// does not know it until the member that creates the cluster generates it, and until then it
/// refuses every Raft request (nothing of any cluster reaches its groups). Clones share what was
/// learned.
#[derive(Debug, Clone)]
pub struct Identity {
    cluster_id: Arc<OnceLock<ClusterId>>,
    /// This node.
    pub node_id: NodeId,
    /// This life of this node's disk.
    pub incarnation: Incarnation,
}

impl Identity {
    /// The identity of node `node_id` in its life `incarnation`, of cluster `cluster_id` if known.
    pub fn new(node_id: NodeId, incarnation: Incarnation, cluster_id: Option<ClusterId>) -> Self {
        let cell = OnceLock::new();
        if let Some(id) = cluster_id {
            let _ = cell.set(id);
        }
        Identity { cluster_id: Arc::new(cell), node_id, incarnation }
    }

    /// The cluster this node belongs to (`None` until it learns it).
    pub fn cluster_id(&self) -> Option<&ClusterId> {
        self.cluster_id.get()
    }

    /// What requests carry as the sender's cluster: empty while it is not known, which no
    /// receiver accepts.
    pub(crate) fn wire_cluster_id(&self) -> String {
        self.cluster_id().map(|c| c.0.clone()).unwrap_or_default()
    }

    /// Records the cluster id (the caller checked that none is known yet).
    pub(crate) fn learn(&self, cluster_id: ClusterId) {
        let _ = self.cluster_id.set(cluster_id);
    }
}
