//! Leadership placement: spreading shard leaders evenly over live nodes, and handing them over
//! before a graceful stop.
//!
//! The reconciler runs on every node and acts only on the leader of group 0. First replicas:
//! when live nodes vote in numbers of shards that differ by more than one (a node was added to a
//! full cluster), it gives one voter seat of the busiest node to the least busy one (a learner
//! already caught up). Then leaders: when the numbers of shards led by live nodes differ by more
//! than one, it plans the moves that even them out — each one shard's leadership from the
//! busiest node to the least busy live node that replicates the shard (a leadership transfer, no
//! election timeout) — runs them at once, then looks again. A node that comes back therefore
//! takes back its share within a round or two.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fetter_raft::handle::MembershipOp;
use fetter_raft::ids::NodeId;
use fetter_raft::meta;
use tokio::sync::watch;

use super::Shared;

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
    for (k, group) in shared.shards.iter().enumerate() {
        let Some(leader) = group.status().borrow().leader else { return Vec::new() };
        if let Some((count, movable)) = led.get_mut(&leader) {
            *count += 1;
            movable.push(k);
        }
    }
    let mut moves = Vec::new();
    while let Some((k, from, to)) = one_move(shared, &mut led) {
        moves.push((k, from, to));
    }
    moves
}

/// Takes one move out of `led` (see [`plan_moves`]), if leaders are not yet even.
fn one_move(
    shared: &Shared,
    led: &mut BTreeMap<NodeId, (usize, Vec<usize>)>,
) -> Option<(usize, NodeId, NodeId)> {
    let (&busiest, (most, _)) = led.iter().max_by_key(|(_, (count, _))| *count)?;
    let (fewest, least) = led.iter().map(|(n, (count, _))| (*count, *n)).min()?;
    if *most <= fewest + 1 {
        return None;
    }
    // A shard of the busiest node that the least busy node replicates.
    let (count, movable) = led.get_mut(&busiest)?;
    let pos = movable.iter().position(|&k| shared.shards[k].members().0.contains(&least))?;
    let k = movable.remove(pos);
    *count -= 1;
    if let Some((count, _)) = led.get_mut(&least) {
        *count += 1;
    }
    Some((k, busiest, least))
}

/// One voter seat to move so that the live nodes vote in numbers of shards that differ by at
/// most one (a node added to a full cluster gets seats): (shard index, from, to).
fn next_seat_move(shared: &Shared) -> Option<(usize, NodeId, NodeId)> {
    let mut seats: BTreeMap<NodeId, Vec<usize>> = live_nodes(shared).map(|n| (n, Vec::new())).collect();
    for (k, group) in shared.shards.iter().enumerate() {
        for v in group.members().0 {
            if let Some(list) = seats.get_mut(&v) {
                list.push(k);
            }
        }
    }
    let (busiest, shards) = seats.iter().max_by_key(|(_, s)| s.len())?;
    let least = seats.iter().map(|(n, s)| (s.len(), *n)).min()?;
    if shards.len() <= least.0 + 1 {
        return None;
    }
    // A shard where the least busy node is a caught-up learner; not one the busiest leads.
    let candidates = shards.iter().copied().filter(|&k| {
        let (voters, nodes) = shared.shards[k].members();
        !voters.contains(&least.1) && nodes.contains_key(&least.1)
    });
    let mut best = None;
    for k in candidates {
        let led_by_busiest = shared.shards[k].status().borrow().leader == Some(*busiest);
        if !led_by_busiest {
            return Some((k, *busiest, least.1));
        }
        best.get_or_insert((k, *busiest, least.1));
    }
    best
}

/// Runs until `stop`: on the group-0 leader, evens out voter seats and then shard leaders over
/// live nodes.
pub(crate) async fn balance_leaders(shared: Arc<Shared>, lease: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
        if !shared.meta.status().borrow().is_leader {
            continue;
        }
        if let Some((k, from, to)) = next_seat_move(&shared) {
            tracing::info!(shard = k, from = from.0, to = to.0, "moving a replica to even out replicas");
            let (mut voters, _) = shared.shards[k].members();
            voters.remove(&from);
            voters.insert(to);
            let changed =
                shared.shards[k].change_members(MembershipOp::SetVoters { voters: voters.clone() }).await;
            match changed {
                Ok(()) => {
                    let shard = fetter_raft::ids::ShardId(k as u32);
                    if let Err(e) = super::members::record_placement(&shared, shard, &voters).await {
                        tracing::info!(shard = k, error = %e, "placement not recorded");
                    }
                }
                Err(e) => tracing::info!(shard = k, error = %e, "replica move did not complete"),
            }
            continue;
        }
        let moves = plan_moves(&shared).into_iter().map(|(k, from, to)| {
            let group = &shared.shards[k];
            async move {
                tracing::info!(
                    shard = k,
                    from = from.0,
                    to = to.0,
                    "moving shard leadership to even out leaders"
                );
                if let Err(e) = group.move_leadership(to, lease, MOVE_TIMEOUT).await {
                    tracing::info!(shard = k, error = %e, "leadership move did not complete");
                }
            }
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
    for group in &shared.shards {
        if let Some(l) = group.status().borrow().leader {
            if let Some(n) = led.get_mut(&l) {
                *n += 1;
            }
        }
    }
    let mut moves = Vec::new();
    for group in shared.shards.iter().chain(std::iter::once(&shared.meta)) {
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
