//! Where replicas should be: each shard on R distinct live nodes, every node holding as many
//! replicas as any other (within one), reached from the current placement with the fewest moves.
//!
//! A pure function of the current placement and the live nodes, so every node that computes it
//! from the same group-0 state gets the same plan, and tests need no cluster. The plan is a list
//! of moves; carrying one out (a learner on the new node catches up, takes the voter seat, the
//! old replica leaves) is the reconciler's job (issue 11, item 7: not wired yet).

use std::collections::{BTreeMap, BTreeSet};

use fetter_raft::ids::{NodeId, ShardId};

/// One replica of `shard` to place on `to`, instead of the one on `from` (`None`: the shard has
/// fewer replicas than it should, nothing leaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ReplicaMove {
    pub(crate) shard: ShardId,
    pub(crate) from: Option<NodeId>,
    pub(crate) to: NodeId,
}

/// The moves that take `current` (each shard's replicas) to a placement where every shard has
/// `min(replicas, nodes)` replicas, all on distinct nodes of `nodes`, and the nodes' replica
/// counts differ by at most one. Replicas on nodes outside `nodes` (lost, leaving) move first;
/// then missing ones are added on the least loaded nodes; then replicas move from the most loaded
/// node to the least loaded one until the counts are even. Each move is needed: no shard's
/// replica moves twice and nothing moves once the placement is even.
pub(crate) fn plan(
    current: &BTreeMap<ShardId, Vec<NodeId>>,
    nodes: &BTreeSet<NodeId>,
    replicas: usize,
) -> Vec<ReplicaMove> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let want = replicas.min(nodes.len());
    // The placement as the plan goes, and each live node's replica count.
    let mut place: BTreeMap<ShardId, BTreeSet<NodeId>> = BTreeMap::new();
    let mut load: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    let mut gone: BTreeMap<ShardId, Vec<NodeId>> = BTreeMap::new();
    for (shard, on) in current {
        let kept = place.entry(*shard).or_default();
        for n in on {
            if nodes.contains(n) && kept.len() < want && kept.insert(*n) {
                *load.entry(*n).or_default() += 1;
            } else if !kept.contains(n) {
                gone.entry(*shard).or_default().push(*n);
            }
        }
    }
    let mut moves = Vec::new();
    // 1 and 2: every shard gets its replicas back to `want`, each on the least loaded node that
    // does not hold one yet (a replica that had to leave is the `from` of the first of them).
    for (shard, kept) in place.iter_mut() {
        let mut leaving = gone.remove(shard).unwrap_or_default().into_iter();
        while kept.len() < want {
            let Some(to) = least_loaded(&load, |n| !kept.contains(n)) else { break };
            kept.insert(to);
            *load.entry(to).or_default() += 1;
            moves.push(ReplicaMove { shard: *shard, from: leaving.next(), to });
        }
        // Replicas beyond `want` (or on lost nodes, with nothing missing) only leave: not moves
        // to anywhere, the reconciler drops them.
    }
    // 3: even the counts, most loaded to least loaded.
    let mut moved: BTreeSet<ShardId> = moves.iter().map(|m| m.shard).collect();
    while let Some(((most, high), (fewest, low))) = extremes(&load) {
        if high <= low + 1 {
            break;
        }
        // A shard on the busiest node that is not on the least busy one, preferring shards not
        // moved yet in this plan.
        let candidates = |fresh: bool| {
            place
                .iter()
                .filter(|(s, on)| {
                    on.contains(&most) && !on.contains(&fewest) && (!fresh || !moved.contains(s))
                })
                .map(|(s, _)| *s)
                .next()
        };
        let Some(shard) = candidates(true).or_else(|| candidates(false)) else { break };
        if let Some(on) = place.get_mut(&shard) {
            on.remove(&most);
            on.insert(fewest);
        }
        *load.entry(most).or_default() -= 1;
        *load.entry(fewest).or_default() += 1;
        moved.insert(shard);
        moves.push(ReplicaMove { shard, from: Some(most), to: fewest });
    }
    moves
}

/// The most loaded node (lowest id on ties) and the least loaded one (lowest id on ties), with
/// their counts.
fn extremes(load: &BTreeMap<NodeId, usize>) -> Option<((NodeId, usize), (NodeId, usize))> {
    let most = load.iter().max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))?;
    let fewest = load.iter().min_by_key(|(n, c)| (**c, **n))?;
    Some(((*most.0, *most.1), (*fewest.0, *fewest.1)))
}

/// The node with the fewest replicas among those `allowed` (lowest id on ties).
fn least_loaded(load: &BTreeMap<NodeId, usize>, allowed: impl Fn(&NodeId) -> bool) -> Option<NodeId> {
    load.iter().filter(|(n, _)| allowed(n)).min_by_key(|(n, c)| (**c, **n)).map(|(n, _)| *n)
}

/// `current` with `moves` carried out (what the placement becomes).
pub(crate) fn apply(
    current: &BTreeMap<ShardId, Vec<NodeId>>,
    moves: &[ReplicaMove],
) -> BTreeMap<ShardId, BTreeSet<NodeId>> {
    let mut place: BTreeMap<ShardId, BTreeSet<NodeId>> =
        current.iter().map(|(s, on)| (*s, on.iter().copied().collect())).collect();
    for m in moves {
        let on = place.entry(m.shard).or_default();
        if let Some(from) = m.from {
            on.remove(&from);
        }
        on.insert(m.to);
    }
    place
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: impl IntoIterator<Item = u64>) -> BTreeSet<NodeId> {
        ids.into_iter().map(NodeId).collect()
    }

    /// Shard k on nodes k, k+1, k+2 (mod n), ids from 1: the initial placement's shape.
    fn round_robin(shards: u32, n: u64) -> BTreeMap<ShardId, Vec<NodeId>> {
        (0..shards)
            .map(|k| (ShardId(k), (0..3).map(|i| NodeId((u64::from(k) + i) % n + 1)).collect()))
            .collect()
    }

    /// Checks the result of `plan`: every shard has `want` distinct live replicas, counts are even,
    /// and replicas that were on live nodes and did not need to move stayed.
    fn check(
        current: &BTreeMap<ShardId, Vec<NodeId>>,
        live: &BTreeSet<NodeId>,
        want: usize,
    ) -> (Vec<ReplicaMove>, BTreeMap<NodeId, usize>) {
        let moves = plan(current, live, want);
        let after = apply(current, &moves);
        let mut load: BTreeMap<NodeId, usize> = live.iter().map(|n| (*n, 0)).collect();
        for (shard, on) in &after {
            let on_live: Vec<_> = on.iter().filter(|n| live.contains(n)).collect();
            assert_eq!(on_live.len(), want.min(live.len()), "shard {shard:?}: {on:?}");
            for n in on_live {
                *load.entry(*n).or_default() += 1;
            }
        }
        let (lo, hi) = (load.values().min().copied(), load.values().max().copied());
        assert!(hi <= lo.map(|l| l + 1), "uneven: {load:?}");
        assert_eq!(
            plan(&after.iter().map(|(s, on)| (*s, on.iter().copied().collect())).collect(), live, want),
            vec![],
            "an even placement needs no move"
        );
        (moves, load)
    }

    #[test]
    fn an_even_placement_needs_no_move() {
        let current = round_robin(12, 3);
        assert_eq!(plan(&current, &nodes(1..=3), 3), vec![]);
        assert_eq!(plan(&round_robin(12, 6), &nodes(1..=6), 3), vec![]);
    }

    /// Three nodes added to three: each new node takes its share (12 × 3 / 6 = 6 replicas) and
    /// only that many replicas move; likewise from six to nine.
    #[test]
    fn added_nodes_take_their_share_with_the_fewest_moves() {
        let (moves, load) = check(&round_robin(12, 3), &nodes(1..=6), 3);
        assert_eq!(moves.len(), 18, "{moves:?}");
        assert!(load.values().all(|c| *c == 6), "{load:?}");
        assert!(moves.iter().all(|m| m.from.is_some_and(|f| f.0 <= 3) && m.to.0 > 3));
        let six = apply(&round_robin(12, 3), &moves);
        let six: BTreeMap<ShardId, Vec<NodeId>> =
            six.into_iter().map(|(s, on)| (s, on.into_iter().collect())).collect();
        let (moves, load) = check(&six, &nodes(1..=9), 3);
        assert_eq!(moves.len(), 12, "{moves:?}");
        assert!(load.values().all(|c| *c == 4), "{load:?}");
    }

    /// A lost node's replicas go to the others (one each where possible), nothing else moves.
    #[test]
    fn a_lost_nodes_replicas_move_and_only_they() {
        let current = round_robin(12, 6);
        let live = nodes([1, 2, 3, 5, 6]);
        let (moves, load) = check(&current, &live, 3);
        assert_eq!(moves.len(), 6, "node 4 held 6 replicas: {moves:?}");
        assert!(moves.iter().all(|m| m.from == Some(NodeId(4))), "{moves:?}");
        assert!(load.values().all(|c| *c == 7 || *c == 8), "{load:?}");
    }

    /// Fewer live nodes than R: every shard on all of them. A shard below R gets its seats back
    /// once nodes return.
    #[test]
    fn fewer_nodes_than_replicas_and_back() {
        let current = round_robin(4, 3);
        let (moves, _) = check(&current, &nodes([1, 2]), 3);
        assert!(moves.is_empty(), "nothing to move to: {moves:?}");
        let two: BTreeMap<ShardId, Vec<NodeId>> =
            (0..4).map(|k| (ShardId(k), vec![NodeId(1), NodeId(2)])).collect();
        let (moves, load) = check(&two, &nodes(1..=3), 3);
        assert_eq!(moves.len(), 4);
        assert!(moves.iter().all(|m| m.from.is_none() && m.to == NodeId(3)));
        assert!(load.values().all(|c| *c == 4));
    }

    /// The same inputs give the same plan (every node computes it).
    #[test]
    fn the_plan_is_deterministic() {
        let current = round_robin(24, 4);
        let live = nodes([1, 2, 4, 7, 8, 9]);
        assert_eq!(plan(&current, &live, 3), plan(&current, &live, 3));
        check(&current, &live, 3);
    }
}
