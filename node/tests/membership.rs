//! Membership across restarts, with in-process cluster nodes (real sled, openraft and tonic).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use common::free_ports;
use fetter::cluster::{ClusterNode, NodeOptions};
use fetter::prelude::Registry;
use fetter::Client;
use fetter_raft::ids::{GroupId, NodeId};
use fetter_raft::node::Timing;

const WAIT: Duration = Duration::from_secs(60);

const SHARDS: u32 = 4;

/// Whether any running node's replica of any shard lists `id` as a member.
fn listed(nodes: &[Option<ClusterNode>], id: NodeId) -> bool {
    nodes
        .iter()
        .flatten()
        .flat_map(|n| (0..SHARDS).filter_map(|s| n.raft().group(GroupId(s + 1))))
        .any(|g| g.members().1.contains_key(&id))
}

/// A node removed from the cluster must not come back as a member of a shard when an initial
/// member restarts (its start re-runs the bootstrap with the initial peers of its arguments).
/// Found by the 5-node long chaos run (seed 2): dead learners re-added this way took 13–20 s of
/// each group's membership changes and a lost node's removal stalled behind them. With 4 nodes
/// and 3 replicas, node 4 starts with replicas of 3 of the 4 shards; its removal moves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_does_not_come_back_when_an_initial_member_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ports = free_ports(4)?;
    let peers: BTreeMap<NodeId, String> =
        ports.iter().enumerate().map(|(i, p)| (NodeId(i as u64 + 1), format!("127.0.0.1:{p}"))).collect();
    let options = |i: usize| {
        let mut o = NodeOptions::new(
            i as u64 + 1,
            ([127, 0, 0, 1], ports[i]).into(),
            dir.path().join(format!("n{i}")),
        );
        o.peers = Some(peers.clone());
        o.shards = SHARDS;
        o.timing = Timing::relaxed();
        o
    };
    let mut nodes: Vec<Option<ClusterNode>> = Vec::new();
    for i in 0..4 {
        nodes.push(Some(ClusterNode::start(options(i), Registry::new()).await?));
    }
    for node in nodes.iter().flatten() {
        ensure!(node.wait_initialized(WAIT).await, "node {} never saw the cluster", node.addr());
    }
    // Node 4 holds replicas of shards 1-3 (the initial placement), and every shard has a leader.
    let client = Client::connect(peers.values().take(3).cloned())?.with_timeout(WAIT);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let led = client.cluster_status().await?.shards.iter().all(|s| s.leader.is_some());
        if led && listed(&nodes, NodeId(4)) {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "node 4 never became a replica of a shard");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Node 4 is lost and removed.
    if let Some(n4) = nodes[3].take() {
        n4.shutdown().await;
    }
    client.remove_node(4).await?;
    ensure!(!listed(&nodes, NodeId(4)), "node 4 is still a member after its removal");
    // Every shard has its three replicas again, on the remaining nodes.
    for s in 0..SHARDS {
        let on_1 = nodes[0].as_ref().and_then(|n| n.raft().group(GroupId(s + 1)));
        let voters = on_1.map(|g| g.members().0).unwrap_or_default();
        ensure!(
            voters == [1, 2, 3].map(NodeId).into_iter().collect(),
            "shard {s} has voters {voters:?} after node 4's removal"
        );
    }
    // Node 1 (the initial leader of shard 0) restarts.
    if let Some(n1) = nodes[0].take() {
        n1.shutdown().await;
    }
    // The stopped node's background tasks let go of its sled directory shortly after shutdown.
    let deadline = tokio::time::Instant::now() + WAIT;
    nodes[0] = loop {
        match ClusterNode::start(options(0), Registry::new()).await {
            Ok(n) => break Some(n),
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(n1) = &nodes[0] {
        ensure!(n1.wait_initialized(WAIT).await, "node 1 did not come back");
    }
    // Its bootstrap runs again at once; give it ten seconds to (wrongly) add node 4 back.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < until {
        ensure!(!listed(&nodes, NodeId(4)), "the removed node 4 came back as a member of a shard");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in nodes.into_iter().flatten() {
        node.shutdown().await;
    }
    Ok(())
}
