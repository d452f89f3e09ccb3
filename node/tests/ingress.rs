//! Idempotent ingress end to end: three in-process cluster nodes (real sled, openraft and
//! tonic), a `fetter::Client` that talks to a node which does not lead the flow's shard (routing
//! off, so every mutation is forwarded to the leader), and a test hook that makes that node lose
//! the answer to a mutation it applied. The client retries; the retry must change nothing and
//! answer what the first attempt would have answered. Last, a client given only that node, with
//! routing on, sends its calls straight to the leader.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use common::free_ports;
use fetter::cluster::{ClusterNode, NodeOptions};
use fetter::hooks;
use fetter::prelude::*;
use fetter::Client;
use fetter_raft::ids::NodeId;
use fetter_raft::node::Timing;
use serde::{Deserialize, Serialize};

/// Bound on every wait of these tests.
const WAIT: Duration = Duration::from_secs(60);

/// The message the shipper waits for.
#[derive(Serialize, Deserialize)]
struct Go {
    n: u32,
}

impl Message for Go {
    const NAME: &'static str = "Go";
}

/// The outside world's record of shipments (the ledger of the examples, in memory).
#[derive(Clone, Default)]
struct Ledger(Arc<AtomicU32>);

impl Ledger {
    fn shipments(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Ships at most once, then waits for `Go`.
struct Shipper {
    ledger: Ledger,
}

impl Flow for Shipper {
    const TYPE: &'static str = "shipper";
    type Input = u32;
    type Output = u32;

    async fn run(&self, ctx: &Ctx, base: u32) -> Result<u32, FlowError> {
        let ledger = self.ledger.clone();
        ctx.effect("ship", move || {
            let ledger = ledger.clone();
            async move { Ok::<u32, FlowError>(ledger.0.fetch_add(1, Ordering::SeqCst) + 1) }
        })
        .at_most_once()
        .await?;
        let go: Go = ctx.message().await?;
        Ok(base + go.n)
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<ClusterNode>,
    ledger: Ledger,
    /// A client of one node that does not lead shard 0 (the only shard).
    client: Client,
}

impl Cluster {
    async fn start() -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let ledger = Ledger::default();
        let ports = free_ports(3)?;
        let peers: BTreeMap<NodeId, String> =
            ports.iter().enumerate().map(|(i, p)| (NodeId(i as u64 + 1), format!("127.0.0.1:{p}"))).collect();
        let starts = ports.iter().enumerate().map(|(i, port)| {
            let mut options = NodeOptions::new(
                i as u64 + 1,
                ([127, 0, 0, 1], *port).into(),
                dir.path().join(format!("n{i}")),
            );
            options.peers = Some(peers.clone());
            options.shards = 1;
            options.timing = Timing::relaxed();
            let registry = Registry::new().register(Shipper { ledger: ledger.clone() });
            async move { ClusterNode::start(options, registry?).await.map_err(anyhow::Error::from) }
        });
        let nodes = futures::future::try_join_all(starts).await?;
        for node in &nodes {
            ensure!(node.wait_initialized(WAIT).await, "node {} never saw the cluster", node.addr());
        }
        let all = Client::connect(peers.values().cloned())?;
        let deadline = tokio::time::Instant::now() + WAIT;
        let leader = loop {
            let status = all.cluster_status().await?;
            if let Some(leader) = status.shards.first().and_then(|s| s.leader) {
                break leader;
            }
            ensure!(tokio::time::Instant::now() < deadline, "shard 0 has no leader: {status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let follower = peers
            .iter()
            .find(|(id, _)| id.0 != leader)
            .map(|(_, addr)| addr.clone())
            .ok_or_else(|| anyhow!("no follower"))?;
        // Without routing: every call goes to the follower, which forwards it (what these tests
        // are about); the routing test below uses a client of its own.
        let client = Client::connect([follower])?.with_timeout(WAIT).without_routing();
        Ok(Cluster { _dir: dir, nodes, ledger, client })
    }

    /// Polls the flow until `done` holds for it (bounded by [`WAIT`]).
    async fn wait_for(
        &self,
        instance: &str,
        what: &str,
        done: impl Fn(&fetter::proto::Flow) -> bool,
    ) -> Result<fetter::proto::Flow> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let flow = self.client.get("shipper", instance).await?;
            if done(&flow) {
                return Ok(flow);
            }
            ensure!(tokio::time::Instant::now() < deadline, "{what}: flow is {flow:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts `instance` and waits until it shipped and waits for `Go`.
    async fn shipped_and_waiting(&self, instance: &str, shipments: u32) -> Result<fetter::proto::Flow> {
        self.client.start::<Shipper>(instance, &1).await?;
        self.wait_for(instance, "shipped and suspended", |f| f.status == "suspended").await?;
        ensure!(self.ledger.shipments() == shipments, "{} shipments", self.ledger.shipments());
        self.client.get("shipper", instance).await.map_err(Into::into)
    }

    async fn stop(self) {
        for node in self.nodes {
            node.shutdown().await;
        }
    }
}

/// Issue 9 item 6, test 1: the leader applies a forwarded `Restart{clear_effects}` and its
/// answer is lost; the client's retry (same request id) changes nothing, and the ledger shows
/// the one shipment of the restarted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_restart_with_clear_effects_ships_once() -> Result<()> {
    let cluster = Cluster::start().await?;
    let before = cluster.shipped_and_waiting("s-restart", 1).await?;
    let flow = FlowId::new("shipper", "s-restart");
    let lost = hooks::lose_next_answer("restart", flow);
    let client = cluster.client.clone();
    let restart = tokio::spawn(async move { client.restart("shipper", "s-restart", None, true, None).await });
    tokio::time::timeout(WAIT, lost.applied.notified()).await.context("the restart was never applied")?;
    // The restarted run ships again and waits; only then does the client hear anything.
    let after = cluster
        .wait_for("s-restart", "the restarted run is waiting", |f| {
            f.status == "suspended" && f.effects.iter().any(|e| e.id == "ship" && e.state == "completed")
        })
        .await?;
    ensure!(cluster.ledger.shipments() == 2, "the restart shipped once: {}", cluster.ledger.shipments());
    lost.release.notify_one();
    let answer = restart.await??;
    let now = cluster.client.get("shipper", "s-restart").await?;
    ensure!(now.epoch == after.epoch, "the retry changed the flow: epoch {} -> {}", after.epoch, now.epoch);
    ensure!(
        answer.epoch == Some(before.epoch + 1),
        "the answer names the restart's epoch ({} + 1): {answer:?}",
        before.epoch
    );
    cluster.wait_for("s-restart", "waiting again", |f| f.status == "suspended").await?;
    ensure!(cluster.ledger.shipments() == 2, "shipments after the retry: {}", cluster.ledger.shipments());
    cluster.stop().await;
    Ok(())
}

/// Issue 9 item 6, test 2: a message sent without an idempotency key through the Rust client,
/// whose answer is lost once, is in the flow's event log exactly once after the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_message_without_a_key_is_stored_once() -> Result<()> {
    let cluster = Cluster::start().await?;
    cluster.shipped_and_waiting("s-send", 1).await?;
    let lost = hooks::lose_next_answer("send_message", FlowId::new("shipper", "s-send"));
    lost.release.notify_one();
    let seq = cluster.client.send("shipper", "s-send", &Go { n: 2 }, None).await?;
    let done = cluster.wait_for("s-send", "succeeded", |f| f.status == "succeeded").await?;
    let messages: Vec<_> = done.events.iter().filter(|e| e.kind == "message").collect();
    ensure!(messages.len() == 1, "the message is stored once: {messages:?}");
    ensure!(messages[0].seq == seq, "the answer names the stored message");
    ensure!(done.output_json.as_deref() == Some("3"));
    cluster.stop().await;
    Ok(())
}

/// Issue 9 item 6, test 3: a cancel whose answer is lost is retried with the same request id
/// and answers the first outcome (success), not "already finished".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_cancel_answers_success() -> Result<()> {
    let cluster = Cluster::start().await?;
    cluster.shipped_and_waiting("s-cancel", 1).await?;
    let lost = hooks::lose_next_answer("cancel", FlowId::new("shipper", "s-cancel"));
    lost.release.notify_one();
    let answer = cluster.client.cancel("shipper", "s-cancel", None).await;
    ensure!(answer.is_ok(), "the retried cancel answers the first outcome: {answer:?}");
    let now = cluster.client.get("shipper", "s-cancel").await?;
    ensure!(now.status == "cancelled");
    ensure!(answer.is_ok_and(|a| a.epoch == Some(now.epoch)), "the answer names the cancel's epoch");
    cluster.stop().await;
    Ok(())
}

/// Proposals and reads the nodes forwarded to the leader of shard 0 (group 1).
fn forwarded(cluster: &Cluster) -> u64 {
    cluster
        .nodes
        .iter()
        .filter_map(|n| n.raft().group(fetter_raft::ids::GroupId(1)))
        .map(|g| g.forwarded())
        .sum()
}

/// Issue 11 item 5: a client given only a follower learns the shard's leader from
/// `ClusterStatus` and sends every call about a flow straight to it: no node forwards anything.
/// The same calls through a client without routing are forwarded (the counter counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_a_follower_sends_flow_calls_straight_to_the_leader() -> Result<()> {
    let cluster = Cluster::start().await?;
    let routed = Client::connect(cluster.client.addrs())?.with_timeout(WAIT);
    ensure!(!routed.knows_leaders(), "a new client knows no leader yet");
    // The first call goes through the follower and starts learning the map.
    routed.start::<Shipper>("r-first", &1).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !routed.knows_leaders() {
        ensure!(tokio::time::Instant::now() < deadline, "the client never learned the shard's leader");
        routed.get("shipper", "r-first").await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = forwarded(&cluster);
    for i in 0..10 {
        let instance = format!("r-{i}");
        routed.start::<Shipper>(&instance, &1).await?;
        routed.get("shipper", &instance).await?;
        routed.send("shipper", &instance, &Go { n: i }, None).await?;
    }
    let routed_forwards = forwarded(&cluster) - before;
    ensure!(routed_forwards == 0, "{routed_forwards} calls of the routed client were forwarded");
    let before = forwarded(&cluster);
    for i in 0..10 {
        cluster.client.get("shipper", &format!("r-{i}")).await?;
    }
    let plain_forwards = forwarded(&cluster) - before;
    ensure!(plain_forwards >= 10, "reads through the follower were forwarded {plain_forwards} times, not 10");
    cluster.stop().await;
    Ok(())
}
