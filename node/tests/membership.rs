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

/// Whether any running node's replica of shard 0 (group 1) lists `id` as a member.
fn listed(nodes: &[Option<ClusterNode>], id: NodeId) -> bool {
    nodes.iter().flatten().filter_map(|n| n.raft().group(GroupId(1))).any(|g| g.members().1.contains_key(&id))
}

/// A node removed from the cluster must not come back as a learner of a shard when an initial
/// member restarts (its start re-runs the bootstrap with the initial peers of its arguments).
/// Found by the 5-node long chaos run (seed 2): dead learners re-added this way took 13–20 s of
/// each group's membership changes and a lost node's removal stalled behind them.
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
        o.shards = 1;
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
    // Shard 0: three voters and node 4 as a learner.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !listed(&nodes, NodeId(4)) {
        ensure!(tokio::time::Instant::now() < deadline, "node 4 never became a learner of shard 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Node 4 is lost and removed.
    if let Some(n4) = nodes[3].take() {
        n4.shutdown().await;
    }
    let client = Client::connect(peers.values().take(3).cloned())?.with_timeout(WAIT);
    client.remove_node(4).await?;
    ensure!(!listed(&nodes, NodeId(4)), "node 4 is still a member after its removal");
    // Node 1 (the initial leader of shard 0) restarts.
    if let Some(n1) = nodes[0].take() {
        n1.shutdown().await;
    }
    nodes[0] = Some(ClusterNode::start(options(0), Registry::new()).await?);
    if let Some(n1) = &nodes[0] {
        ensure!(n1.wait_initialized(WAIT).await, "node 1 did not come back");
    }
    // Its bootstrap runs again at once; give it ten seconds to (wrongly) add node 4 back.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < until {
        ensure!(!listed(&nodes, NodeId(4)), "the removed node 4 came back as a member of shard 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in nodes.into_iter().flatten() {
        node.shutdown().await;
    }
    Ok(())
}
