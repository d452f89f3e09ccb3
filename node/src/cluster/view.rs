//! What a node knows of shards it holds no replica of.
//!
//! With more nodes than replicas a node is outside most shards' groups: its own Raft instance of
//! such a shard is empty and knows no leader. Every member reports the shards it holds a
//! replica of (leader, term, voters) in its answer to the liveness pings
//! ([`proto::NodeInfoResponse::hosted`]); a node merges those reports with its own replicas.
//! The merged view routes calls (a shard's leader first, then its placement), answers
//! `ClusterStatus`, and lets the reconciler even out leaders it cannot see locally.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};

use fetter_raft::handle::Routes;
use fetter_raft::ids::{NodeId, ShardId};
use fetter_raft::meta;

use super::Shared;
use crate::proto;

/// One shard as seen from this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ShardView {
    /// Its leader, if known.
    pub(crate) leader: Option<NodeId>,
    /// Its voters, if known (empty otherwise).
    pub(crate) voters: BTreeSet<NodeId>,
    /// Its voters and learners, if known (empty otherwise).
    pub(crate) members: BTreeSet<NodeId>,
}

/// The shards this node holds a replica of, for its answers to pings.
pub(crate) fn hosted(shared: &Shared) -> Vec<proto::HostedShard> {
    shared
        .shards
        .all()
        .iter()
        .enumerate()
        .filter(|(_, g)| g.is_replica())
        .map(|(k, g)| {
            let status = g.status().borrow().clone();
            let (voters, members) = g.members();
            proto::HostedShard {
                shard: k as u32,
                leader: status.leader.map(|n| n.0),
                term: status.term,
                voters: voters.into_iter().map(|n| n.0).collect(),
                members: members.into_keys().map(|n| n.0).collect(),
            }
        })
        .collect()
}

/// Every shard as this node sees it: its own replica's view where it holds one, else the view
/// of the live member reporting the highest term (one that names a leader wins a tie).
pub(crate) fn shard_views(shared: &Shared) -> Vec<ShardView> {
    let reports = shared.liveness.hosted_reports();
    shared
        .shards
        .all()
        .iter()
        .enumerate()
        .map(|(k, g)| {
            if g.is_replica() {
                let (voters, members) = g.members();
                return ShardView {
                    leader: g.status().borrow().leader,
                    voters,
                    members: members.into_keys().collect(),
                };
            }
            let best = reports
                .iter()
                .flat_map(|(_, hosted)| hosted.iter().filter(|h| h.shard == k as u32))
                .max_by_key(|h| (h.term, h.leader.is_some()));
            best.map(|h| ShardView {
                leader: h.leader.map(NodeId),
                voters: h.voters.iter().copied().map(NodeId).collect(),
                members: h.members.iter().copied().map(NodeId).collect(),
            })
            .unwrap_or_default()
        })
        .collect()
}

/// The addresses of the cluster's members, from group 0 as this node has applied it.
fn member_addrs(shared: &Shared) -> BTreeMap<NodeId, String> {
    shared
        .meta
        .read_local(meta::read_cluster)
        .ok()
        .flatten()
        .map(|info| info.members.into_iter().map(|m| (m.node, m.addr)).collect())
        .unwrap_or_default()
}

/// Where calls for `shard` go from a node without a replica: its leader if known, else its
/// voters as reported, else its placement in group 0.
fn routes_of(shared: &Shared, shard: ShardId) -> Vec<(NodeId, String)> {
    let addrs = member_addrs(shared);
    let view = shard_views(shared).into_iter().nth(shard.0 as usize).unwrap_or_default();
    let mut nodes: Vec<NodeId> = view.leader.into_iter().collect();
    if nodes.is_empty() {
        nodes.extend(view.voters.iter().copied());
    }
    if nodes.is_empty() {
        if let Ok(Some(info)) = shared.meta.read_local(meta::read_cluster) {
            if let Some(place) = info.placement.get(&shard) {
                nodes.extend(place.replicas.iter().copied());
            }
        }
    }
    nodes.into_iter().filter_map(|n| addrs.get(&n).map(|a| (n, a.clone()))).collect()
}

/// Gives every shard group of this node its routes ([`fetter_raft::handle::GroupHandle::set_routes`]).
pub(crate) fn set_routes(shared: &Arc<Shared>) {
    for (k, group) in shared.shards.all().iter().enumerate() {
        set_routes_of(shared, k, group);
    }
}

/// Gives `group`, this node's instance of shard `k`, its routes.
pub(crate) fn set_routes_of(shared: &Arc<Shared>, k: usize, group: &fetter_raft::handle::GroupHandle) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let shard = ShardId(k as u32);
    let routes: Routes = Arc::new(move || weak.upgrade().map(|s| routes_of(&s, shard)).unwrap_or_default());
    group.set_routes(routes);
}
