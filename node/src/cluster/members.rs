//! Adding and removing nodes of a running cluster (`AddNode`, `RemoveNode`, `--join`).
//!
//! Every node replicates group 0 (one of its at most [`REPLICAS`] voters, or a learner); each
//! shard lives on the members its placement names (the cluster's `replicas` of them). Adding a
//! node records it in group 0 (with the incarnation it reports: a node id that comes back with
//! another disk is refused) and makes it a replica of group 0; the reconciler then moves its
//! share of the shards' replicas to it. Removing a node marks it as leaving, moves each of its
//! shard replicas to another member (recorded placement, carried out by the shard's leader),
//! replaces it in group 0 and forgets it there (its id can never come back with another disk).

use std::collections::BTreeSet;

use fetter_raft::handle::MembershipOp;
use fetter_raft::ids::{Incarnation, NodeId, ShardId};
use fetter_raft::meta::{self, Member, MetaCommand, MetaRejection, ShardPlacement};
use tonic::Status;

use super::api::journal_status;
use super::reconcile::MOVE_TIMEOUT;
use super::{node_info, Shared, REPLICAS};

fn meta_status(r: MetaRejection) -> Status {
    match r {
        e @ MetaRejection::NodeIdReused { .. } => Status::already_exists(e.to_string()),
        e => Status::failed_precondition(e.to_string()),
    }
}

/// Commits `command` in group 0 (through its leader); its refusal as a gRPC status.
pub(crate) async fn submit_meta(shared: &Shared, command: MetaCommand) -> Result<(), Status> {
    shared.meta.submit_meta(command).await.map_err(journal_status)?.map_err(meta_status)?;
    Ok(())
}

/// Records `replicas` of `shard` (the first its preferred leader) as its placement in group 0.
pub(crate) async fn record_placement_ordered(
    shared: &Shared,
    shard: ShardId,
    replicas: Vec<NodeId>,
) -> Result<(), Status> {
    let Some(preferred_leader) = replicas.first().copied() else { return Ok(()) };
    let placement = ShardPlacement { replicas, preferred_leader };
    submit_meta(shared, MetaCommand::SetPlacement { shard, placement }).await
}

/// Adds the node `id` that listens on `addr` (it must be running, in this cluster): it is
/// recorded in group 0 and replicates group 0 (a voter while group 0 has fewer than three);
/// the reconciler then gives it its share of the shards' replicas.
pub(crate) async fn add_node(
    shared: &Shared,
    cluster_id: &str,
    id: NodeId,
    addr: &str,
) -> Result<(), Status> {
    if id.0 == 0 {
        return Err(Status::invalid_argument("node ids start at 1"));
    }
    let info = node_info(addr, shared.node.peers().source_ip())
        .await
        .map_err(|e| Status::failed_precondition(format!("cannot reach node {} at {addr}: {e}", id.0)))?;
    if info.node_id != id.0 {
        return Err(Status::invalid_argument(format!(
            "the node at {addr} is node {}, not node {}",
            info.node_id, id.0
        )));
    }
    if info.cluster_id != cluster_id {
        return Err(Status::invalid_argument(format!(
            "the node at {addr} belongs to cluster {}, not {cluster_id}: start it with --join",
            info.cluster_id
        )));
    }
    let member = Member { node: id, addr: addr.to_string(), incarnation: Incarnation(info.incarnation) };
    submit_meta(shared, MetaCommand::AddMember(member)).await?;
    let meta = &shared.meta;
    meta.change_members(MembershipOp::AddLearner { node: id, addr: addr.to_string() })
        .await
        .map_err(journal_status)?;
    let (voters, _) = meta.members();
    if voters.len() < REPLICAS && !voters.contains(&id) {
        // Decided again by the group's leader on the voters it holds.
        meta.change_members(MembershipOp::AddVoter { node: id, replicas: REPLICAS as u32 })
            .await
            .map_err(journal_status)?;
    }
    tracing::info!(node = id.0, addr, "node added");
    Ok(())
}

/// Removes node `id` (alive or dead): its replicas move to the other members (each shard's
/// new placement recorded and carried out before this returns), it leaves group 0, and group 0
/// forgets it.
pub(crate) async fn remove_node(shared: &Shared, id: NodeId) -> Result<(), Status> {
    let info = shared.initialized_cluster().await?;
    if info.member(id).is_none() {
        return Err(Status::not_found(format!("node {} is not a member of this cluster", id.0)));
    }
    if info.members.len() <= 1 {
        return Err(Status::failed_precondition("the last node of a cluster cannot be removed"));
    }
    // First the node is marked as leaving, so that the reconciler (on group 0's leader, maybe
    // another node) gives it no replica or leadership while its replicas move away.
    submit_meta(shared, MetaCommand::Leave(id)).await?;
    let info = shared.initialized_cluster().await?;
    let leaving = shared.meta.read(meta::read_leaving).await.map_err(journal_status)?.unwrap_or_default();
    let target = super::reconcile::target_placement(&info, &leaving);
    // The shards are independent: each one's move runs at once (a dozen sequential
    // reconfigurations took longer than a client's attempt).
    let info = &info;
    let moves = target.into_iter().map(|(shard, replicas)| async move {
        let recorded = info.placement.get(&shard).map(|p| p.replicas.clone()).unwrap_or_default();
        if !recorded.contains(&id)
            && !super::view::shard_views(shared)[shard.0 as usize].members.contains(&id)
        {
            return Ok(());
        }
        if replicas.contains(&id) {
            return Err(Status::failed_precondition(format!(
                "node {} holds shard {}'s only replica and no other member can take it",
                id.0, shard.0
            )));
        }
        if replicas != recorded {
            record_placement_ordered(shared, shard, replicas).await?;
        }
        super::reconcile::converge(shared, shard, shared.lease).await.map(|_| ()).map_err(|e| {
            Status::unavailable(format!("moving shard {}'s replica off node {}: {e}", shard.0, id.0))
        })
    });
    futures::future::try_join_all(moves).await?;
    // Group 0: a learner takes the node's seat (live ones first), then the node leaves.
    let meta_group = &shared.meta;
    let (voters, nodes) = meta_group.members();
    if voters.contains(&id) {
        let mut spare: Vec<NodeId> =
            nodes.keys().copied().filter(|n| *n != id && !voters.contains(n)).collect();
        spare.sort_by_key(|n| !shared.liveness.is_alive(*n));
        let replacement = spare.first().copied();
        if meta_group.status().borrow().leader == Some(id) && shared.liveness.is_alive(id) {
            // A live leader hands over first: removing it would cost an election timeout.
            let to =
                voters.iter().copied().filter(|v| *v != id).min_by_key(|v| !shared.liveness.is_alive(*v));
            if let Some(to) = to {
                if let Err(e) = meta_group.move_leadership(to, shared.lease, MOVE_TIMEOUT).await {
                    tracing::info!(error = %e, "no handover of group 0 before the removal");
                }
            }
        }
        meta_group
            .change_members(MembershipOp::RetireVoter { node: id, replacement })
            .await
            .map_err(journal_status)?;
    }
    meta_group
        .change_members(MembershipOp::RemoveNodes { nodes: BTreeSet::from([id]) })
        .await
        .map_err(journal_status)?;
    submit_meta(shared, MetaCommand::RemoveMember(id)).await?;
    tracing::info!(node = id.0, "node removed");
    Ok(())
}
