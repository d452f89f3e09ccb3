//! Adding and removing nodes of a running cluster (`AddNode`, `RemoveNode`, `--join`).
//!
//! Every node replicates every group: as one of its (at most [`REPLICAS`]) voters, or as a
//! learner that receives the log, knows the leader and serves linearizable reads. Adding a node
//! records it in group 0 (with the incarnation it reports: a node id that comes back with
//! another disk is refused), makes it a learner of every group and a voter of the groups that
//! have fewer than [`REPLICAS`] voters. Removing a node replaces it, in every group it votes
//! in, by a learner (caught up already), drops it from every group, updates the placement and
//! forgets it in group 0 (its id can never come back with another disk).

use std::collections::BTreeSet;

use fetter_raft::handle::{GroupHandle, MembershipOp};
use fetter_raft::ids::{Incarnation, NodeId, ShardId};
use fetter_raft::meta::{Member, MetaCommand, MetaRejection, ShardPlacement};
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

/// Records `voters` of `shard` as its desired placement in group 0.
pub(crate) async fn record_placement(
    shared: &Shared,
    shard: ShardId,
    voters: &BTreeSet<NodeId>,
) -> Result<(), Status> {
    let replicas: Vec<NodeId> = voters.iter().copied().collect();
    let Some(preferred_leader) = replicas.first().copied() else { return Ok(()) };
    let placement = ShardPlacement { replicas, preferred_leader };
    submit_meta(shared, MetaCommand::SetPlacement { shard, placement }).await
}

fn groups(shared: &Shared) -> impl Iterator<Item = (Option<ShardId>, &GroupHandle)> {
    std::iter::once((None, &shared.meta))
        .chain(shared.shards.iter().enumerate().map(|(k, g)| (Some(ShardId(k as u32)), g)))
}

/// Adds the node `id` that listens on `addr` (it must be running, in this cluster).
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
    for (shard, group) in groups(shared) {
        group
            .change_members(MembershipOp::AddLearner { node: id, addr: addr.to_string() })
            .await
            .map_err(journal_status)?;
        let (voters, _) = group.members();
        if voters.len() < REPLICAS && !voters.contains(&id) {
            // Decided again by the group's leader: the reconciler may have filled the seat.
            let voters = group
                .change_members(MembershipOp::AddVoter { node: id, replicas: REPLICAS as u32 })
                .await
                .map_err(journal_status)?;
            if let Some(shard) = shard {
                record_placement(shared, shard, &voters).await?;
            }
        }
    }
    tracing::info!(node = id.0, addr, "node added");
    Ok(())
}

/// Removes node `id` (alive or dead) and moves its replicas to the other nodes.
pub(crate) async fn remove_node(shared: &Shared, id: NodeId) -> Result<(), Status> {
    let info = shared.initialized_cluster().await?;
    if info.member(id).is_none() {
        return Err(Status::not_found(format!("node {} is not a member of this cluster", id.0)));
    }
    if info.members.len() <= 1 {
        return Err(Status::failed_precondition("the last node of a cluster cannot be removed"));
    }
    // First the node is marked as leaving, so that the reconciler (on group 0's leader, maybe
    // another node) gives it no seat or leadership while its replicas move away.
    submit_meta(shared, MetaCommand::Leave(id)).await?;
    // The groups are independent: each one's change runs at once (a dozen sequential
    // reconfigurations took longer than a client's attempt).
    let changes = groups(shared).map(|(shard, group)| async move {
        let (voters, nodes) = group.members();
        if voters.contains(&id) {
            // A learner takes its place (live ones first).
            let mut spare: Vec<NodeId> =
                nodes.keys().copied().filter(|n| *n != id && !voters.contains(n)).collect();
            spare.sort_by_key(|n| !shared.liveness.is_alive(*n));
            let replacement = spare.first().copied();
            if voters.len() == 1 && replacement.is_none() {
                return Err(Status::failed_precondition(format!(
                    "node {id} is the only replica of {}",
                    group.group()
                )));
            }
            if group.status().borrow().leader == Some(id) && shared.liveness.is_alive(id) {
                // A live leader hands over first: removing it would cost an election timeout.
                let to =
                    voters.iter().copied().filter(|v| *v != id).min_by_key(|v| !shared.liveness.is_alive(*v));
                if let Some(to) = to {
                    if let Err(e) = group.move_leadership(to, shared.lease, MOVE_TIMEOUT).await {
                        tracing::info!(group = %group.group(), error = %e, "no handover before the removal");
                    }
                }
            }
            // Decided by the group's leader on the voters it holds then (a seat may have moved).
            let next = group
                .change_members(MembershipOp::RetireVoter { node: id, replacement })
                .await
                .map_err(journal_status)?;
            if let Some(shard) = shard {
                record_placement(shared, shard, &next).await?;
            }
        }
        group
            .change_members(MembershipOp::RemoveNodes { nodes: BTreeSet::from([id]) })
            .await
            .map(|_| ())
            .map_err(journal_status)
    });
    futures::future::try_join_all(changes).await?;
    submit_meta(shared, MetaCommand::RemoveMember(id)).await?;
    tracing::info!(node = id.0, "node removed");
    Ok(())
}
