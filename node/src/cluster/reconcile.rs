//! Leadership placement: spreading shard leaders evenly over live nodes, and handing them over
//! before a graceful stop.
//!
//! The reconciler runs on every node and acts only on the leader of group 0. First replicas: a
//! shard with fewer than [`REPLICAS`] voters gets a live learner as a voter (a lost node was
//! removed, or a seat moved while a node joined); when live nodes vote in numbers of shards
//! that differ by more than one (a node was added to a full cluster), it gives one voter seat of
//! the busiest node to the least busy one (a learner already caught up). Then leaders: when the numbers of shards led by live nodes differ by more
//! than one, it plans the moves that even them out — each one shard's leadership from the
//! busiest node to the least busy live node that replicates the shard (a leadership transfer, no
//! election timeout) — runs them at once, then looks again. A node that comes back therefore
//! takes back its share within a round or two.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fetter_raft::handle::MembershipOp;
use fetter_raft::ids::NodeId;
use fetter_raft::meta;
use tokio::sync::watch;

use super::{Shared, REPLICAS};

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

/// What the reconciler sees of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ShardView {
    /// Its voters.
    voters: BTreeSet<NodeId>,
    /// Its voters and learners.
    members: BTreeSet<NodeId>,
    /// Its leader, if known.
    leader: Option<NodeId>,
}

fn shard_views(shared: &Shared) -> Vec<ShardView> {
    shared
        .shards
        .iter()
        .map(|g| {
            let (voters, nodes) = g.members();
            ShardView { voters, members: nodes.into_keys().collect(), leader: g.status().borrow().leader }
        })
        .collect()
}

/// One change of one shard's voters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeatChange {
    /// The shard has fewer than [`REPLICAS`] voters: `node`, a live learner, gets a seat.
    Fill { shard: usize, node: NodeId },
    /// `from` gives its seat to `to` (a learner), to even out seats.
    Move { shard: usize, from: NodeId, to: NodeId },
}

/// The next change of voters, if any. First a shard with fewer than [`REPLICAS`] voters gets
/// a live learner (the one with the fewest seats): a node lost and removed, or one that joined
/// while a seat moved, leaves such shards behind. Then seats are evened out: when the live
/// nodes vote in numbers of shards that differ by more than one (a node was added to a full
/// cluster), a seat of the busiest goes to the least busy, a learner of that shard (preferably
/// one the busiest does not lead, which would cost a leadership change).
fn next_seat_change(shards: &[ShardView], live: &BTreeSet<NodeId>) -> Option<SeatChange> {
    let mut seats: BTreeMap<NodeId, usize> = live.iter().map(|n| (*n, 0)).collect();
    for shard in shards {
        for v in &shard.voters {
            if let Some(n) = seats.get_mut(v) {
                *n += 1;
            }
        }
    }
    for (k, shard) in shards.iter().enumerate() {
        if shard.voters.len() >= REPLICAS {
            continue;
        }
        let learner = shard
            .members
            .iter()
            .filter(|n| !shard.voters.contains(n))
            .filter_map(|n| seats.get(n).map(|count| (*count, *n)))
            .min();
        if let Some((_, node)) = learner {
            return Some(SeatChange::Fill { shard: k, node });
        }
    }
    let (&busiest, &most) = seats.iter().max_by_key(|(_, count)| **count)?;
    let (fewest, least) = seats.iter().map(|(n, count)| (*count, *n)).min()?;
    if most <= fewest + 1 {
        return None;
    }
    let mut candidates = shards.iter().enumerate().filter(|(_, s)| {
        s.voters.contains(&busiest) && !s.voters.contains(&least) && s.members.contains(&least)
    });
    let first = candidates.clone().next().map(|(k, _)| k);
    let k = candidates.find(|(_, s)| s.leader != Some(busiest)).map(|(k, _)| k).or(first)?;
    Some(SeatChange::Move { shard: k, from: busiest, to: least })
}

/// Carries out `change` through the shard's leader, which decides it again on the membership
/// it holds (a change planned on a stale view never lowers the number of voters), and records
/// the voters that result as the shard's placement.
async fn change_seat(shared: &Shared, change: SeatChange) {
    let (k, op) = match change {
        SeatChange::Fill { shard, node } => {
            tracing::info!(shard, node = node.0, "adding a replica to a shard with too few");
            (shard, MembershipOp::AddVoter { node, replicas: REPLICAS as u32 })
        }
        SeatChange::Move { shard, from, to } => {
            tracing::info!(shard, from = from.0, to = to.0, "moving a replica to even out replicas");
            (shard, MembershipOp::MoveVoter { from, to })
        }
    };
    match shared.shards[k].change_members(op).await {
        Ok(voters) => {
            let shard = fetter_raft::ids::ShardId(k as u32);
            if let Err(e) = super::members::record_placement(shared, shard, &voters).await {
                tracing::info!(shard = k, error = %e, "placement not recorded");
            }
        }
        Err(e) => tracing::info!(shard = k, error = %e, "replica change did not complete"),
    }
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
        let live: BTreeSet<NodeId> = live_nodes(&shared).collect();
        if let Some(change) = next_seat_change(&shard_views(&shared), &live) {
            change_seat(&shared, change).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[u64]) -> BTreeSet<NodeId> {
        list.iter().copied().map(NodeId).collect()
    }

    fn shard(voters: &[u64], learners: &[u64], leader: u64) -> ShardView {
        let voters = ids(voters);
        let members = voters.union(&ids(learners)).copied().collect();
        ShardView { voters, members, leader: Some(NodeId(leader)) }
    }

    /// Carries `change` out as the shard's leader would (`MembershipOp::{AddVoter, MoveVoter}`).
    fn apply(shards: &mut [ShardView], change: SeatChange) {
        match change {
            SeatChange::Fill { shard, node } => {
                let s = &mut shards[shard];
                if s.voters.len() < REPLICAS && s.members.contains(&node) {
                    s.voters.insert(node);
                }
            }
            SeatChange::Move { shard, from, to } => {
                let s = &mut shards[shard];
                if s.voters.contains(&from) && !s.voters.contains(&to) && s.members.contains(&to) {
                    s.voters.remove(&from);
                    s.voters.insert(to);
                }
            }
        }
    }

    fn seats(shards: &[ShardView]) -> BTreeMap<NodeId, usize> {
        let mut seats = BTreeMap::new();
        for s in shards {
            for v in &s.voters {
                *seats.entry(*v).or_default() += 1;
            }
        }
        seats
    }

    /// Chaos seed 245960196731812: node 4 of {1, 2, 4} was lost and removed (every shard kept
    /// voters 1 and 2), node 5 was joining (a learner of the first shards so far). The
    /// reconciler moved seats of 1 and 2 to node 5, and the join, finding node 5 voting there
    /// already, added nothing: two shards kept two replicas with three live members.
    #[test]
    fn a_shard_left_with_too_few_voters_is_filled_before_any_seat_moves() {
        let live = ids(&[1, 2, 5]);
        let mut shards: Vec<ShardView> =
            (0..6).map(|k| if k < 3 { shard(&[1, 2], &[5], 1) } else { shard(&[1, 2], &[], 2) }).collect();
        assert_eq!(
            next_seat_change(&shards, &live),
            Some(SeatChange::Fill { shard: 0, node: NodeId(5) }),
            "a seat for node 5 where a shard has two voters, nothing taken from 1 or 2"
        );
        // The join goes on (node 5 a learner of every shard, a voter where seats are missing),
        // interleaved with the reconciler; no step ever lowers a shard's voters.
        for k in 0..6 {
            if let Some(change) = next_seat_change(&shards, &live) {
                let before: Vec<usize> = shards.iter().map(|s| s.voters.len()).collect();
                apply(&mut shards, change);
                assert!(shards.iter().zip(&before).all(|(s, b)| s.voters.len() >= *b), "{change:?}");
            }
            shards[k].members.insert(NodeId(5));
            apply(&mut shards, SeatChange::Fill { shard: k, node: NodeId(5) });
        }
        while let Some(change) = next_seat_change(&shards, &live) {
            apply(&mut shards, change);
        }
        assert!(shards.iter().all(|s| s.voters.len() == 3), "{shards:?}");
    }

    #[test]
    fn a_fill_takes_the_live_learner_with_the_fewest_seats_and_never_a_dead_one() {
        let live = ids(&[1, 2, 4, 5]);
        // Node 3 is dead (not live); 4 votes in one shard, 5 in none.
        let shards = vec![shard(&[1, 2], &[3, 4, 5], 1), shard(&[1, 2, 4], &[3, 5], 2)];
        assert_eq!(next_seat_change(&shards, &live), Some(SeatChange::Fill { shard: 0, node: NodeId(5) }));
        let only_dead = vec![shard(&[1, 2], &[3], 1)];
        assert_eq!(next_seat_change(&only_dead, &ids(&[1, 2])), None);
    }

    #[test]
    fn seats_are_evened_out_once_every_shard_is_full_and_the_busiest_keeps_its_leaderships() {
        // Four nodes, node 4 just added as a learner everywhere: it gets seats until even.
        let live = ids(&[1, 2, 3, 4]);
        let mut shards: Vec<ShardView> = (0..8).map(|k| shard(&[1, 2, 3], &[4], 1 + k % 3)).collect();
        let first = next_seat_change(&shards, &live);
        let Some(SeatChange::Move { shard: k, from, to }) = first else { panic!("{first:?}") };
        assert_eq!(to, NodeId(4));
        assert_ne!(shards[k].leader, Some(from), "a shard its busiest node does not lead moves first");
        while let Some(change) = next_seat_change(&shards, &live) {
            apply(&mut shards, change);
        }
        let seats = seats(&shards);
        let (min, max) = (seats.values().min().copied(), seats.values().max().copied());
        assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{seats:?}");
        assert!(shards.iter().all(|s| s.voters.len() == 3));
    }
}
