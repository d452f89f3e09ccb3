//! Leadership placement: spreading shard leaders evenly over live nodes, and handing them over
//! before a graceful stop.
//!
//! The reconciler runs on every node and acts only on the leader of group 0: when the numbers of
//! shards led by live nodes differ by more than one, it moves one shard's leadership from the
//! busiest node to the least busy live node that replicates the shard (a leadership transfer, no
//! election timeout), then looks again. A node that comes back therefore takes back its share
//! within seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::NodeId;
use tokio::sync::watch;

use super::Shared;

/// How often the reconciler looks.
const EVERY: Duration = Duration::from_secs(1);
/// Bound on one leadership move.
const MOVE_TIMEOUT: Duration = Duration::from_secs(5);

fn voters(group: &GroupHandle) -> Vec<NodeId> {
    let metrics = group.raft().metrics().borrow().clone();
    metrics.membership_config.membership().voter_ids().map(NodeId).collect()
}

/// One move that brings leaders closer to even, if any: (shard index, from, to).
fn next_move(shared: &Shared) -> Option<(usize, NodeId, NodeId)> {
    let me = shared.node.id();
    let mut led: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
    led.insert(me, Vec::new());
    for member in shared.liveness.alive_members() {
        led.insert(member, Vec::new());
    }
    for (k, group) in shared.shards.iter().enumerate() {
        // An election in progress: look again later.
        let leader = group.status().borrow().leader?;
        if let Some(list) = led.get_mut(&leader) {
            list.push(k);
        }
    }
    let (busiest, shards) = led.iter().max_by_key(|(_, s)| s.len())?;
    let least = led.iter().map(|(n, s)| (s.len(), *n)).min()?;
    if shards.len() <= least.0 + 1 {
        return None;
    }
    // A shard of the busiest node that the least busy node replicates.
    for &k in shards {
        if voters(&shared.shards[k]).contains(&least.1) {
            return Some((k, *busiest, least.1));
        }
    }
    None
}

/// Runs until `stop`: on the group-0 leader, evens out shard leaders over live nodes.
pub(crate) async fn balance_leaders(shared: Arc<Shared>, lease: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
        if !shared.meta.status().borrow().is_leader {
            continue;
        }
        let Some((k, from, to)) = next_move(&shared) else { continue };
        tracing::info!(shard = k, from = from.0, to = to.0, "moving shard leadership to even out leaders");
        if let Err(e) = shared.shards[k].move_leadership(to, lease, MOVE_TIMEOUT).await {
            tracing::info!(shard = k, error = %e, "leadership move did not complete");
        }
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
        let candidates = voters(group);
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
