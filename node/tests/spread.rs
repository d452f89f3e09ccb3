//! Shards on R nodes (issue 11, item 7), with in-process cluster nodes (real sled, openraft and
//! tonic): each shard lives on the cluster's `replicas` nodes only, a node added to the cluster
//! gets its share of the replicas and a node removed gives its replicas up — online, while flows
//! run, with nothing lost — and a node that holds no replica of a shard still answers every call
//! for it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use common::free_ports;
use fetter::cluster::{ClusterNode, NodeOptions};
use fetter::prelude::*;
use fetter::Client;
use fetter_raft::ids::{GroupId, NodeId};
use fetter_raft::node::Timing;
use serde::{Deserialize, Serialize};

/// Bound on every wait of this test.
const WAIT: Duration = Duration::from_secs(90);
const SHARDS: u32 = 6;
const FLOWS: u32 = 60;

/// The message a waiter waits for.
#[derive(Serialize, Deserialize)]
struct Go {
    n: u32,
}

impl Message for Go {
    const NAME: &'static str = "Go";
}

/// Waits for `Go` and adds its number to its input.
struct Waiter;

impl Flow for Waiter {
    const TYPE: &'static str = "waiter";
    type Input = u32;
    type Output = u32;

    async fn run(&self, ctx: &Ctx, base: u32) -> Result<u32, FlowError> {
        let go: Go = ctx.message().await?;
        Ok(base + go.n)
    }
}

fn options(id: u64, port: u16, dir: &std::path::Path) -> NodeOptions {
    let mut o = NodeOptions::new(id, ([127, 0, 0, 1], port).into(), dir.join(format!("n{id}")));
    o.shards = SHARDS;
    o.timing = Timing::relaxed();
    o
}

async fn start(options: NodeOptions) -> Result<ClusterNode> {
    Ok(ClusterNode::start(options, Registry::new().register(Waiter)?).await?)
}

/// For every running node, the shards it holds a replica of (it is a member of their group).
fn hosted(nodes: &BTreeMap<u64, ClusterNode>) -> BTreeMap<u64, BTreeSet<u32>> {
    nodes
        .iter()
        .map(|(id, n)| {
            let shards = (0..SHARDS)
                .filter(|s| n.raft().group(GroupId(s + 1)).is_some_and(|g| g.is_replica()))
                .collect();
            (*id, shards)
        })
        .collect()
}

/// Waits until every shard has exactly three replicas, all of them voters, on the running
/// nodes, and the nodes hold within one as many replicas as each other.
async fn settled(nodes: &BTreeMap<u64, ClusterNode>, what: &str) -> Result<BTreeMap<u64, BTreeSet<u32>>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let hosted = hosted(nodes);
        let per_shard = |s: u32| hosted.values().filter(|h| h.contains(&s)).count();
        let voters_ok = (0..SHARDS).all(|s| {
            nodes.values().filter_map(|n| n.raft().group(GroupId(s + 1))).filter(|g| g.is_replica()).all(
                |g| {
                    let (voters, members) = g.members();
                    voters.len() == 3 && members.len() == 3
                },
            )
        });
        let counts: Vec<usize> = hosted.values().map(BTreeSet::len).collect();
        let even = counts.iter().max().zip(counts.iter().min()).is_some_and(|(max, min)| max - min <= 1);
        if (0..SHARDS).all(|s| per_shard(s) == 3) && voters_ok && even {
            return Ok(hosted);
        }
        ensure!(tokio::time::Instant::now() < deadline, "{what}: replicas never settled: {hosted:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_status(client: &Client, instance: &str, status: &str) -> Result<fetter::proto::Flow> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let flow = client.get("waiter", instance).await?;
        if flow.status == status {
            return Ok(flow);
        }
        ensure!(tokio::time::Instant::now() < deadline, "{instance} never {status}: {flow:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_spread_to_an_added_node_and_off_a_removed_one_while_flows_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ports = free_ports(4)?;
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let peers: BTreeMap<NodeId, String> = (0..3).map(|i| (NodeId(i as u64 + 1), addr(i))).collect();
    let mut nodes = BTreeMap::new();
    for (i, port) in ports.iter().take(3).enumerate() {
        let mut o = options(i as u64 + 1, *port, dir.path());
        o.peers = Some(peers.clone());
        nodes.insert(i as u64 + 1, start(o).await?);
    }
    for node in nodes.values() {
        ensure!(node.wait_initialized(WAIT).await, "node {} never saw the cluster", node.addr());
    }
    let client = Client::connect(peers.values().cloned())?.with_timeout(WAIT);
    for i in 0..FLOWS {
        client.start::<Waiter>(&format!("w-{i}"), &i).await?;
    }
    let before = settled(&nodes, "three nodes").await?;
    ensure!(before.values().all(|h| h.len() == SHARDS as usize), "3 nodes, 3 replicas: all everywhere");

    // Node 4 joins; its share of the replicas moves to it while half of the flows get their
    // message (through a client of node 4, which holds no replica of any shard yet).
    let mut o = options(4, ports[3], dir.path());
    o.join = Some(addr(0));
    nodes.insert(4, start(o).await?);
    let via_4 = Client::connect([addr(3)])?.with_timeout(WAIT).without_routing();
    for i in (0..FLOWS).step_by(2) {
        via_4.send("waiter", &format!("w-{i}"), &Go { n: 1000 }, Some(format!("go-{i}"))).await?;
    }
    let after_add = settled(&nodes, "node 4 added").await?;
    let on_4 = after_add[&4].len();
    ensure!((4..=5).contains(&on_4), "node 4 holds {on_4} of 18 replicas: {after_add:?}");

    // Node 2 is removed (its replicas move to the others) while the other half get theirs.
    let sends = {
        let via_4 = via_4.clone();
        tokio::spawn(async move {
            for i in (1..FLOWS).step_by(2) {
                via_4.send("waiter", &format!("w-{i}"), &Go { n: 1000 }, Some(format!("go-{i}"))).await?;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    client.remove_node(2).await?;
    sends.await??;
    if let Some(n2) = nodes.remove(&2) {
        n2.shutdown().await;
    }
    let after_remove = settled(&nodes, "node 2 removed").await?;
    ensure!(after_remove.values().all(|h| h.len() == SHARDS as usize), "3 nodes left: all everywhere");

    // Nothing was lost: every flow finished with its message, read through every node (each
    // holding every shard again, but node 4 answered for shards it did not hold all along).
    for (id, addr) in [(1, addr(0)), (3, addr(2)), (4, addr(3))] {
        let c = Client::connect([addr])?.with_timeout(WAIT).without_routing();
        for i in 0..FLOWS {
            let flow = wait_status(&c, &format!("w-{i}"), "succeeded").await?;
            let output: u32 = serde_json::from_str(flow.output_json.as_deref().unwrap_or("null"))
                .map_err(|e| anyhow!("node {id}: {e}"))?;
            ensure!(output == i + 1000, "node {id}: w-{i} returned {output}");
        }
        let listed = c.list_flows(Some("waiter"), None, 1000, None).await?.flows.len();
        ensure!(listed == FLOWS as usize, "node {id} lists {listed} flows");
    }
    for node in nodes.into_values() {
        node.shutdown().await;
    }
    Ok(())
}

/// With more nodes than replicas, each node holds only its share of the shards, and a node
/// outside a shard's group still starts, reads and lists its flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_hold_three_replicas_of_each_shard_and_each_answers_for_all() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ports = free_ports(5)?;
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let peers: BTreeMap<NodeId, String> = (0..5).map(|i| (NodeId(i as u64 + 1), addrs[i].clone())).collect();
    let mut nodes = BTreeMap::new();
    for (i, port) in ports.iter().enumerate() {
        let mut o = options(i as u64 + 1, *port, dir.path());
        o.peers = Some(peers.clone());
        nodes.insert(i as u64 + 1, start(o).await?);
    }
    for node in nodes.values() {
        ensure!(node.wait_initialized(WAIT).await, "node {} never saw the cluster", node.addr());
    }
    let hosted = settled(&nodes, "five nodes").await?;
    ensure!(
        hosted.values().all(|h| (3..=4).contains(&h.len())),
        "18 replicas over 5 nodes: 3 or 4 each: {hosted:?}"
    );
    for (k, addr) in addrs.iter().enumerate() {
        let c = Client::connect([addr.clone()])?.with_timeout(WAIT).without_routing();
        for i in 0..10 {
            let instance = format!("n{k}-{i}");
            c.start::<Waiter>(&instance, &i).await?;
            c.send("waiter", &instance, &Go { n: 7 }, Some(format!("go-{instance}"))).await?;
            let flow = wait_status(&c, &instance, "succeeded").await?;
            ensure!(
                flow.output_json.as_deref() == Some((i + 7).to_string().as_str()),
                "{instance} via node {}: {flow:?}",
                k + 1
            );
        }
    }
    let status = Client::connect([addrs[4].clone()])?.cluster_status().await?;
    ensure!(
        status.shards.iter().all(|s| s.leader.is_some() && s.replicas.len() == 3),
        "node 5's status knows every shard's leader and replicas: {status:?}"
    );
    for node in nodes.into_values() {
        node.shutdown().await;
    }
    Ok(())
}
