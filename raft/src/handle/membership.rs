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
    /// Make `node` (already a member) a voter if the group has fewer than `replicas` voters;
    /// otherwise nothing changes. Decided by the leader on the membership it holds, so two
    /// concurrent fills never raise a group beyond `replicas`.
    AddVoter {
        /// The node.
        node: NodeId,
        /// The number of voters the group should have.
        replicas: u32,
    },
    /// Give the voter seat of `from` to `to` (already a member), only while `from` votes and
    /// `to` does not; otherwise nothing changes. A move planned on a stale view of the group
    /// (another change came first) therefore never lowers the number of voters.
    MoveVoter {
        /// The voter that gives its seat up.
        from: NodeId,
        /// The member that takes it.
        to: NodeId,
    },
    /// Stop `node` voting; `replacement` (a member that does not vote), if given, votes in its
    /// place. Refused if no voter would remain. The other voters are those the leader holds
    /// when it carries the change out, whatever changed since the caller looked.
    RetireVoter {
        /// The voter that stops voting.
        node: NodeId,
        /// The member that takes its seat.
        replacement: Option<NodeId>,
    },
}

/// The voters a voter-changing `op` leaves, from the `voters` and `members` (voters and
/// learners) the leader holds; `None`: `op` does not change voters.
fn next_voters(
    op: &MembershipOp,
    voters: &BTreeSet<NodeId>,
    members: &BTreeSet<NodeId>,
) -> Option<BTreeSet<NodeId>> {
    let mut next = voters.clone();
    match op {
        MembershipOp::SetVoters { voters } => next.clone_from(voters),
        MembershipOp::AddVoter { node, replicas } => {
            if voters.len() < *replicas as usize && members.contains(node) {
                next.insert(*node);
            }
        }
        MembershipOp::MoveVoter { from, to } => {
            if voters.contains(from) && !voters.contains(to) && members.contains(to) {
                next.remove(from);
                next.insert(*to);
            }
        }
        MembershipOp::RetireVoter { node, replacement } => {
            if next.remove(node) {
                if let Some(r) = replacement.filter(|r| members.contains(r)) {
                    next.insert(r);
                }
            }
        }
        MembershipOp::AddLearner { .. } | MembershipOp::RemoveNodes { .. } => return None,
    }
    Some(next)
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

    /// The voters and members (voters and learners) of the group's effective membership, as
    /// Raft holds it now (the metrics behind [`GroupHandle::members`] may lag a change).
    async fn effective_members(&self) -> Result<(BTreeSet<NodeId>, BTreeSet<NodeId>), Error> {
        self.inner
            .raft
            .with_raft_state(|state| {
                let membership = state.membership_state.effective().membership();
                let voters = membership.voter_ids().map(NodeId).collect();
                let members = membership.nodes().map(|(id, _)| NodeId(*id)).collect();
                (voters, members)
            })
            .await
            .map_err(|_| Error::ShuttingDown(self.inner.group))
    }

    /// Carries out `op` on this node, which must lead the group. Changes run one at a time
    /// and each is decided on the membership Raft holds when it runs, so concurrent changes
    /// (a node being added while the reconciler moves a seat) compose instead of overwriting
    /// each other.
    /// Returns the voters the group has once the change is committed.
    pub(crate) async fn change_here(&self, op: MembershipOp) -> Result<BTreeSet<NodeId>, Error> {
        let group = self.inner.group;
        let asked = std::time::Instant::now();
        let _one_at_a_time = self.inner.membership_changes.lock().await;
        let locked = asked.elapsed();
        let (voters, members) = self.effective_members().await?;
        tracing::info!(%group, ?op, ?voters, ?members, ?locked, "membership change begins");
        let result = self.change_locked(op.clone(), voters, members).await;
        // Every change says how it ended and how long it (and its wait for the lock) took: a
        // change that does not finish holds every later one of the group behind it.
        match &result {
            Ok(next) => {
                tracing::info!(%group, ?op, voters = ?next, took = ?asked.elapsed(), "membership change done")
            }
            Err(e) => {
                tracing::warn!(%group, ?op, error = %e, took = ?asked.elapsed(), "membership change failed")
            }
        }
        result
    }

    async fn change_locked(
        &self,
        op: MembershipOp,
        voters: BTreeSet<NodeId>,
        members: BTreeSet<NodeId>,
    ) -> Result<BTreeSet<NodeId>, Error> {
        let raft = &self.inner.raft;
        let result = match op {
            MembershipOp::AddLearner { node, addr } => {
                if members.contains(&node) {
                    return Ok(voters);
                }
                raft.add_learner(node.0, BasicNode { addr }, true).await.map(|_| voters)
            }
            MembershipOp::RemoveNodes { nodes } => {
                let present: BTreeSet<u64> =
                    nodes.iter().filter(|n| members.contains(n)).map(|n| n.0).collect();
                if present.is_empty() {
                    return Ok(voters);
                }
                raft.change_membership(openraft::ChangeMembers::RemoveNodes(present), true)
                    .await
                    .map(|_| voters)
            }
            op => {
                let next = next_voters(&op, &voters, &members).unwrap_or_else(|| voters.clone());
                if next == voters {
                    return Ok(voters);
                }
                if next.is_empty() {
                    return Err(Error::Unavailable {
                        group: self.inner.group,
                        reason: format!("{op:?} would leave the group without a voter"),
                    });
                }
                let ids: BTreeSet<u64> = next.iter().map(|n| n.0).collect();
                raft.change_membership(openraft::ChangeMembers::ReplaceAllVoters(ids), true)
                    .await
                    .map(|_| next)
            }
        };
        result.map_err(|e| self.write_error(e))
    }

    /// Carries out `op` through the group's leader (this node or another, following hints),
    /// within the group's proposal budget. Every op is idempotent. Returns the voters the group
    /// has once the change is committed (as its leader holds them).
    pub async fn change_members(&self, op: MembershipOp) -> Result<BTreeSet<NodeId>, Error> {
        let group = self.inner.group;
        let deadline = Instant::now() + self.inner.propose_timeout * 3;
        loop {
            let op = &op;
            let outcome = self
                .via_leader(deadline, |remote| async move {
                    match remote {
                        None => self.change_here(op.clone()).await,
                        Some((_, addr)) => {
                            let payload = crate::codec::encode(op).map_err(|e| Error::Internal {
                                group,
                                reason: format!("cannot encode: {e}"),
                            })?;
                            let bytes = self.call(&addr, RpcKind::ChangeMembers, payload, deadline).await?;
                            crate::codec::decode::<Result<BTreeSet<NodeId>, Error>>(&bytes).map_err(|e| {
                                Error::Internal { group, reason: format!("undecodable reply: {e}") }
                            })?
                        }
                    }
                })
                .await;
            match outcome {
                // A change in progress, a quorum missing for a moment: again, within the budget.
                Err(Error::Unavailable { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> BTreeSet<NodeId> {
        ids.iter().copied().map(NodeId).collect()
    }

    #[test]
    fn a_seat_move_planned_on_a_stale_view_never_lowers_the_voters() {
        // Planned while voters were {1, 2} and 5 a learner; meanwhile 5 became a voter.
        let op = MembershipOp::MoveVoter { from: NodeId(2), to: NodeId(5) };
        assert_eq!(next_voters(&op, &set(&[1, 2, 5]), &set(&[1, 2, 5])), Some(set(&[1, 2, 5])));
        assert_eq!(next_voters(&op, &set(&[1, 2]), &set(&[1, 2, 5])), Some(set(&[1, 5])));
        // `to` no longer a member: nothing changes.
        assert_eq!(next_voters(&op, &set(&[1, 2]), &set(&[1, 2])), Some(set(&[1, 2])));
    }

    #[test]
    fn a_fill_adds_a_voter_only_below_the_replicas() {
        let op = MembershipOp::AddVoter { node: NodeId(5), replicas: 3 };
        assert_eq!(next_voters(&op, &set(&[1, 2]), &set(&[1, 2, 5])), Some(set(&[1, 2, 5])));
        assert_eq!(next_voters(&op, &set(&[1, 2, 3]), &set(&[1, 2, 3, 5])), Some(set(&[1, 2, 3])));
    }

    #[test]
    fn a_retired_voter_keeps_the_others_the_leader_holds() {
        let op = MembershipOp::RetireVoter { node: NodeId(4), replacement: Some(NodeId(5)) };
        // The caller saw {1, 2, 4}; a fill made 3 a voter meanwhile: it stays.
        assert_eq!(next_voters(&op, &set(&[1, 3, 4]), &set(&[1, 2, 3, 4, 5])), Some(set(&[1, 3, 5])));
        let alone = MembershipOp::RetireVoter { node: NodeId(4), replacement: None };
        assert_eq!(next_voters(&alone, &set(&[1, 4]), &set(&[1, 4])), Some(set(&[1])));
        assert_eq!(next_voters(&alone, &set(&[1, 2]), &set(&[1, 2])), Some(set(&[1, 2])));
    }
}
