//! Membership changes of a group, carried out by its leader wherever it is asked.

use std::collections::{BTreeMap, BTreeSet};

use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Error, GroupHandle};
use crate::ids::NodeId;
use crate::transport::proto::RpcKind;

/// A change to a group's members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipOp {
    /// Add `node` as a learner (it receives the log but does not vote) and wait until it has
    /// caught up. A member already is one: nothing changes.
    AddLearner {
        /// The node.
        node: NodeId,
        /// Its address.
        addr: String,
    },
    /// Make exactly `voters` the voting members; other members stay (as learners).
    SetVoters {
        /// The voters.
        voters: BTreeSet<NodeId>,
    },
    /// Remove `nodes` from the group altogether (they must not be voters).
    RemoveNodes {
        /// The nodes.
        nodes: BTreeSet<NodeId>,
    },
}

impl GroupHandle {
    /// The group's voters and learners, as this replica knows them.
    pub fn members(&self) -> (BTreeSet<NodeId>, BTreeMap<NodeId, String>) {
        let metrics = self.inner.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters = membership.voter_ids().map(NodeId).collect();
        let nodes = membership.nodes().map(|(id, n)| (NodeId(*id), n.addr.clone())).collect();
        (voters, nodes)
    }

    /// Carries out `op` on this node, which must lead the group.
    pub(crate) async fn change_here(&self, op: MembershipOp) -> Result<(), Error> {
        let raft = &self.inner.raft;
        let result = match op {
            MembershipOp::AddLearner { node, addr } => {
                if self.members().1.contains_key(&node) {
                    return Ok(());
                }
                raft.add_learner(node.0, BasicNode { addr }, true).await.map(|_| ())
            }
            MembershipOp::SetVoters { voters } => {
                if self.members().0 == voters {
                    return Ok(());
                }
                let ids: BTreeSet<u64> = voters.iter().map(|n| n.0).collect();
                raft.change_membership(openraft::ChangeMembers::ReplaceAllVoters(ids), true).await.map(|_| ())
            }
            MembershipOp::RemoveNodes { nodes } => {
                let present: BTreeSet<u64> =
                    nodes.iter().filter(|n| self.members().1.contains_key(n)).map(|n| n.0).collect();
                if present.is_empty() {
                    return Ok(());
                }
                raft.change_membership(openraft::ChangeMembers::RemoveNodes(present), true).await.map(|_| ())
            }
        };
        result.map_err(|e| self.write_error(e))
    }

    /// Carries out `op` through the group's leader (this node or another, following hints),
    /// within the group's proposal budget. Every op is idempotent.
    pub async fn change_members(&self, op: MembershipOp) -> Result<(), Error> {
        let group = self.inner.group;
        let deadline = Instant::now() + self.inner.propose_timeout * 3;
        loop {
            let status = self.status().borrow().clone();
            let outcome = if status.is_leader {
                self.change_here(op.clone()).await
            } else if let Some(addr) = status.leader.and_then(|l| self.addr_of(l)) {
                let payload = crate::codec::encode(&op)
                    .map_err(|e| Error::Internal { group, reason: format!("cannot encode: {e}") })?;
                match self.call(&addr, RpcKind::ChangeMembers, payload, deadline).await {
                    Ok(bytes) => crate::codec::decode::<Result<(), Error>>(&bytes)
                        .map_err(|e| Error::Internal { group, reason: format!("undecodable reply: {e}") })?,
                    Err(e) => Err(e),
                }
            } else {
                Err(Error::NotLeader { group, leader: None, leader_addr: None })
            };
            match outcome {
                Err(Error::NotLeader { .. }) | Err(Error::Unavailable { .. })
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }
}
