//! Placement of replicas and leaders: each shard on R of the members, spread evenly; shard
//! leaders spread evenly over live nodes; leaderships handed over before a graceful stop.
//!
//! The reconciler runs on every node and acts only on the leader of group 0. First replicas:
//! it computes the placement each shard should have (R replicas on the members that are not
//! leaving, every member holding as many as any other within one, reached from the recorded
//! placement with the fewest moves: [`spread::plan`]) and records the shards whose placement
//! changes (a node was added, or is being removed). Then it has every shard whose replicas
//! differ from its placement carry it out through the shard's leader ([`converge`]: the new
//! replica joins as a learner and catches up, takes its voter seat in a joint change, the old
//! one leaves). Then leaders: when the numbers of shards led by live nodes differ by more
//! than one, it plans the moves that even them out — each one shard's leadership from the
//! busiest node to the least busy live node that replicates the shard (a leadership transfer, no
//! election timeout) — runs them at once, then looks again. A node that comes back therefore
//! takes back its share within a round or two. A node that crashes keeps its replicas: Raft
//! carries on with the others, and the node catches up when it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fetter_raft::handle::MembershipOp;
use fetter_raft::ids::{NodeId, ShardId};
use fetter_raft::meta;
use tokio::sync::watch;

use super::{spread, Shared};

/// How often the reconciler looks.
const EVERY: Duration = Duration::from_secs(1);
/// Bound on one leadership move.
pub(super) const MOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// This node and every member that answered the last ping, except those being removed (a
/// replica or leadership moved to one would race its removal).
fn live_nodes(shared: &Shared) -> impl Iterator<Item = NodeId> {
    let leaving = shared.meta.read_local(meta::read_leaving).unwrap_or_default();
    std::iter::once(shared.node.id())
        .chain(shared.liveness.alive_members())
        .filter(move |n| !leaving.contains(n))
}

/// The leadership moves that make leaders even, planned together so that they can run at
/// once: (shard index, from, to). Each takes a shard of the node leading the most to the live
/// node leading the fewest that replicates it; no shard moves twice in one plan. Empty while a
/// shard has no leader (an election in progress: look again later).
fn plan_moves(shared: &Shared) -> Vec<(usize, NodeId, NodeId)> {
    // Per live node: how many shards it leads (after the planned moves) and which of them may
    // still move.
    let mut led: BTreeMap<NodeId, (usize, Vec<usize>)> =
        live_nodes(shared).map(|n| (n, (0, Vec::new()))).collect();
    let views = super::view::shard_views(shared);
    for (k, view) in views.iter().enumerate() {
        let Some(leader) = view.leader else { return Vec::new() };
        if let Some((count, movable)) = led.get_mut(&leader) {
            *count += 1;
            movable.push(k);
        }
    }
    let mut moves = Vec::new();
    while let Some((k, from, to)) = one_move(&views, &mut led) {
        moves.push((k, from, to));
    }
    moves
}

/// Takes one move out of `led` (see [`plan_moves`]), if leaders are not yet even.
fn one_move(
    views: &[super::view::ShardView],
    led: &mut BTreeMap<NodeId, (usize, Vec<usize>)>,
) -> Option<(usize, NodeId, NodeId)> {
    let (&busiest, (most, _)) = led.iter().max_by_key(|(_, (count, _))| *count)?;
    let (fewest, least) = led.iter().map(|(n, (count, _))| (*count, *n)).min()?;
    if *most <= fewest + 1 {
        return None;
    }
    // A shard of the busiest node that the least busy node replicates.
    let (count, movable) = led.get_mut(&busiest)?;
    let pos = movable.iter().position(|&k| views[k].voters.contains(&least))?;
    let k = movable.remove(pos);
    *count -= 1;
    if let Some((count, _)) = led.get_mut(&least) {
        *count += 1;
    }
    Some((k, busiest, least))
}

/// The placement each shard should have: `replicas` replicas on the members that are not
/// leaving, spread evenly, reached from the recorded placement with the fewest moves
/// ([`spread::plan`]). Members count whether they answer pings or not: a replica moves when its
/// node is added or removed, not when it crashes (Raft carries on with the other replicas, and
/// a node that restarts catches up instead of being copied again). `None` before group 0
/// records the cluster.
pub(super) fn target_placement(
    info: &meta::ClusterInfo,
    leaving: &BTreeSet<NodeId>,
) -> BTreeMap<ShardId, Vec<NodeId>> {
    let nodes: BTreeSet<NodeId> =
        info.members.iter().map(|m| m.node).filter(|n| !leaving.contains(n)).collect();
    let current: BTreeMap<ShardId, Vec<NodeId>> = (0..info.params.shard_count)
        .map(|k| {
            let shard = ShardId(k);
            (shard, info.placement.get(&shard).map(|p| p.replicas.clone()).unwrap_or_default())
        })
        .collect();
    let moves = spread::plan(&current, &nodes, info.params.replicas as usize);
    let after = spread::apply(&current, &moves);
    current
        .iter()
        .map(|(shard, was)| {
            let mut now = after.get(shard).cloned().unwrap_or_default();
            // Replicas on nodes that left or are leaving go, also when no other node can take
            // them (fewer members than replicas) — unless none would remain.
            if now.iter().any(|n| nodes.contains(n)) {
                now.retain(|n| nodes.contains(n));
            }
            // Keep the recorded order (its first replica is the preferred leader), new ones last.
            let mut replicas: Vec<NodeId> = was.iter().copied().filter(|n| now.contains(n)).collect();
            replicas.extend(now.iter().copied().filter(|n| !was.contains(n)));
            (*shard, replicas)
        })
        .collect()
}

/// Records the shards' target placements that differ from the recorded ones. Returns whether
/// any changed.
async fn update_placement(shared: &Shared) -> bool {
    let Ok(Some(info)) = shared.meta.read_local(meta::read_cluster) else { return false };
    let leaving = shared.meta.read_local(meta::read_leaving).unwrap_or_default();
    let mut changed = false;
    for (shard, replicas) in target_placement(&info, &leaving) {
        let recorded = info.placement.get(&shard).map(|p| p.replicas.clone()).unwrap_or_default();
        if replicas == recorded || replicas.is_empty() {
            continue;
        }
        tracing::info!(shard = shard.0, from = ?recorded, to = ?replicas, "new placement of a shard's replicas");
        let voters: BTreeSet<NodeId> = replicas.iter().copied().collect();
        match super::members::record_placement_ordered(shared, shard, replicas).await {
            Ok(()) => changed = true,
            Err(e) => tracing::info!(shard = shard.0, ?voters, error = %e, "placement not recorded"),
        }
    }
    changed
}

/// Carries the recorded placement of `shard` out, through its leader: the new replicas join as
/// learners and catch up, the leader moves to a replica of the placement if it is not one, the
/// voters become the placement's replicas (a joint change), and every other member leaves. Each
/// step is decided by the shard's leader on the membership it holds and is idempotent, so a
/// convergence cut short is finished by the next one. Returns the voters.
pub(crate) async fn converge(
    shared: &Shared,
    shard: ShardId,
    lease: Duration,
) -> Result<BTreeSet<NodeId>, String> {
    let group = shared.shards.at(shard.0 as usize).ok_or("no such shard")?;
    let info =
        shared.meta.read_local(meta::read_cluster).map_err(|e| e.to_string())?.ok_or("no cluster yet")?;
    let desired: BTreeSet<NodeId> =
        info.placement.get(&shard).map(|p| p.replicas.iter().copied().collect()).unwrap_or_default();
    if desired.is_empty() {
        return Err(format!("shard {} has no placement", shard.0));
    }
    let addrs: BTreeMap<NodeId, String> = info.members.iter().map(|m| (m.node, m.addr.clone())).collect();
    for node in &desired {
        let addr = addrs.get(node).ok_or_else(|| format!("node {} is not a member", node.0))?;
        group
            .change_members(MembershipOp::AddLearner { node: *node, addr: addr.clone() })
            .await
            .map_err(|e| e.to_string())?;
    }
    let view = super::view::shard_views(shared).into_iter().nth(shard.0 as usize).unwrap_or_default();
    if let Some(leader) = view.leader.filter(|l| !desired.contains(l)) {
        // The leader leaves: first every new replica votes beside the old ones, then the
        // leadership moves to one of them (a leader removing itself would leave the group
        // without one for an election timeout).
        let both: BTreeSet<NodeId> = view.voters.union(&desired).copied().collect();
        group.change_members(MembershipOp::SetVoters { voters: both }).await.map_err(|e| e.to_string())?;
        let to = desired.iter().next().copied().ok_or("empty placement")?;
        group.move_leadership(to, lease, MOVE_TIMEOUT).await.map_err(|e| {
            format!("moving the leadership of shard {} from node {} to node {}: {e}", shard.0, leader.0, to.0)
        })?;
    }
    let voters = group
        .change_members(MembershipOp::SetVoters { voters: desired.clone() })
        .await
        .map_err(|e| e.to_string())?;
    let others: BTreeSet<NodeId> = addrs.keys().copied().filter(|n| !desired.contains(n)).collect();
    if !others.is_empty() {
        group.change_members(MembershipOp::RemoveNodes { nodes: others }).await.map_err(|e| e.to_string())?;
    }
    Ok(voters)
}

/// The shards whose replicas (as reported) differ from their recorded placement.
fn unsettled(shared: &Shared) -> Vec<ShardId> {
    let Ok(Some(info)) = shared.meta.read_local(meta::read_cluster) else { return Vec::new() };
    super::view::shard_views(shared)
        .into_iter()
        .enumerate()
        .filter_map(|(k, v)| {
            let shard = ShardId(k as u32);
            let desired: BTreeSet<NodeId> =
                info.placement.get(&shard).map(|p| p.replicas.iter().copied().collect()).unwrap_or_default();
            // A shard nobody reports (its replicas down) cannot be changed now.
            let known = !v.members.is_empty();
            (known && !desired.is_empty() && v.members != desired).then_some(shard)
        })
        .collect()
}

/// Runs until `stop`: on the group-0 leader, keeps the placement spread over the members, has
/// the shards carry it out, and evens out shard leaders over live nodes.
pub(crate) async fn balance_leaders(shared: Arc<Shared>, lease: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
        if !shared.meta.status().borrow().is_leader {
            continue;
        }
        update_placement(&shared).await;
        let moving = unsettled(&shared);
        if !moving.is_empty() {
            let shared = &shared;
            let converging = moving.into_iter().map(|shard| async move {
                tracing::info!(shard = shard.0, "moving replicas to the shard's placement");
                if let Err(e) = converge(shared, shard, lease).await {
                    tracing::info!(shard = shard.0, error = %e, "replica move did not complete");
                }
            });
            futures::future::join_all(converging).await;
            continue;
        }
        let moves = plan_moves(&shared).into_iter().filter_map(|(k, from, to)| {
            let group = shared.shards.at(k)?;
            Some(async move {
                tracing::info!(
                    shard = k,
                    from = from.0,
                    to = to.0,
                    "moving shard leadership to even out leaders"
                );
                if let Err(e) = group.move_leadership(to, lease, MOVE_TIMEOUT).await {
                    tracing::info!(shard = k, error = %e, "leadership move did not complete");
                }
            })
        });
        futures::future::join_all(moves).await;
    }
}

/// Before a graceful stop: hands every group this node leads to another live voter (the one
/// leading the fewest shards), concurrently. Returns how many were handed over.
pub(crate) async fn hand_over_all(shared: &Shared, lease: Duration) -> usize {
    let me = shared.node.id();
    let mut led: BTreeMap<NodeId, usize> =
        shared.liveness.alive_members().into_iter().map(|n| (n, 0)).collect();
    let groups = shared.shards.all();
    for group in &groups {
        if let Some(l) = group.status().borrow().leader {
            if let Some(n) = led.get_mut(&l) {
                *n += 1;
            }
        }
    }
    let mut moves = Vec::new();
    for group in groups.iter().chain(std::iter::once(&shared.meta)) {
        if !group.status().borrow().is_leader {
            continue;
        }
        let (candidates, _) = group.members();
        let target =
            candidates.iter().filter(|v| **v != me && led.contains_key(v)).min_by_key(|v| led[v]).copied();
        if let Some(to) = target {
            if let Some(n) = led.get_mut(&to) {
                *n += 1;
            }
            moves.push(async move {
                match group.transfer_leadership(to, lease, MOVE_TIMEOUT).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(group = %group.group(), error = %e, "could not hand leadership over");
                        false
                    }
                }
            });
        }
    }
    futures::future::join_all(moves).await.into_iter().filter(|ok| *ok).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fetter_raft::ids::{ClusterId, Incarnation};
    use fetter_raft::meta::{ClusterInfo, ClusterParams, Member, ShardPlacement};

    fn info(members: &[u64], placement: &[&[u64]], replicas: u32) -> ClusterInfo {
        ClusterInfo {
            cluster_id: ClusterId("c".into()),
            params: ClusterParams {
                shard_count: placement.len() as u32,
                replicas,
                ..ClusterParams::default()
            },
            members: members
                .iter()
                .map(|n| Member { node: NodeId(*n), addr: format!("a{n}"), incarnation: Incarnation(1) })
                .collect(),
            placement: placement
                .iter()
                .enumerate()
                .map(|(k, on)| {
                    let replicas: Vec<NodeId> = on.iter().copied().map(NodeId).collect();
                    (ShardId(k as u32), ShardPlacement { preferred_leader: replicas[0], replicas })
                })
                .collect(),
        }
    }

    #[test]
    fn a_new_member_gets_its_share_and_the_preferred_leaders_stay_first() {
        let placement: Vec<&[u64]> = vec![&[1, 2, 3]; 6];
        let target = target_placement(&info(&[1, 2, 3, 4], &placement, 3), &BTreeSet::new());
        let on_4 = target.values().filter(|r| r.contains(&NodeId(4))).count();
        assert!((4..=5).contains(&on_4), "node 4 holds {on_4} of 18 replicas: {target:?}");
        assert!(target.values().all(|r| r.len() == 3), "{target:?}");
        for r in target.values() {
            if r[0] != NodeId(4) {
                assert!([1, 2, 3].contains(&r[0].0));
            }
        }
    }

    #[test]
    fn a_removed_member_of_three_leaves_two_replicas_and_the_only_replica_stays() {
        let placement: Vec<&[u64]> = vec![&[1, 2, 3], &[3]];
        let leaving = BTreeSet::from([NodeId(3)]);
        let target = target_placement(&info(&[1, 2, 3], &placement, 3), &leaving);
        assert_eq!(target[&ShardId(0)], vec![NodeId(1), NodeId(2)]);
        // A shard whose only replica is on the leaving node keeps it (nothing could copy it):
        // plan() moves it to a node that has none first, so it is never the only one here.
        assert!(!target[&ShardId(1)].is_empty());
    }

    #[test]
    fn a_leaving_member_loses_every_replica_and_a_crashed_one_keeps_them() {
        let placement: Vec<&[u64]> = vec![&[1, 2, 3], &[2, 3, 4], &[3, 4, 1], &[4, 1, 2]];
        let leaving = BTreeSet::from([NodeId(4)]);
        let target = target_placement(&info(&[1, 2, 3, 4], &placement, 3), &leaving);
        assert!(target.values().all(|r| !r.contains(&NodeId(4)) && r.len() == 3), "{target:?}");
        // Liveness plays no part: the same members give the same placement.
        let unchanged = target_placement(&info(&[1, 2, 3, 4], &placement, 3), &BTreeSet::new());
        assert_eq!(
            unchanged.values().cloned().collect::<Vec<_>>(),
            placement.iter().map(|p| p.iter().copied().map(NodeId).collect::<Vec<_>>()).collect::<Vec<_>>()
        );
    }
}
