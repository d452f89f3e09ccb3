//! Shared by the runtime's test binaries: a real single node (one openraft group on sled in a
//! temp dir, tonic on loopback) and fake services that count their calls.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use fetter_actors::activation;
use fetter_actors::Message;
use fetter_actors::{FlowError, Registry};
use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{ClusterId, FlowId, GroupId, NodeId, ShardId};
use fetter_raft::node::{NodeConfig, RaftNode, Timing};
use fetter_raft::shard::{self, ShardCommand};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};

/// The message the test flows wait for.
#[derive(Serialize, Deserialize)]
pub struct Go {
    pub n: u32,
}

impl Message for Go {
    const NAME: &'static str = "Go";
}

pub const WAIT: Duration = Duration::from_secs(30);

pub struct Node {
    pub dir: tempfile::TempDir,
    pub node: Arc<RaftNode>,
    pub group: GroupHandle,
}

async fn boot(dir: &std::path::Path, listen: std::net::SocketAddr) -> Result<(Arc<RaftNode>, GroupHandle)> {
    let mut config = NodeConfig::new(NodeId(1), listen, dir.join("n1"), ClusterId("t".into()));
    config.timing = Timing::relaxed();
    // The stopped node's background tasks release sled's directory lock shortly after shutdown.
    let deadline = tokio::time::Instant::now() + WAIT;
    let node = loop {
        match RaftNode::start(config.clone()).await {
            Ok(node) => break node,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    let group = node.open_group(GroupId::of_shard(ShardId(0))).await?;
    Ok((node, group))
}

async fn lead(node: &RaftNode, group: &GroupHandle) -> Result<()> {
    group.initialize(BTreeMap::from([(NodeId(1), node.addr().to_string())])).await?;
    let mut status = group.status();
    tokio::time::timeout(WAIT, status.wait_for(|s| s.is_leader)).await??;
    Ok(())
}

pub async fn single_node() -> Result<Node> {
    let dir = tempfile::tempdir()?;
    let (node, group) = boot(dir.path(), "127.0.0.1:0".parse()?).await?;
    lead(&node, &group).await?;
    group
        .propose_shard(ShardCommand::Configure { shard_id: ShardId(0), shard_count: 1 })
        .await?
        .map_err(|r| anyhow!("configure: {r}"))?;
    Ok(Node { dir, node, group })
}

/// One node hosting `shards` shard groups (all led here), each configured.
pub struct Shards {
    pub dir: tempfile::TempDir,
    pub node: Arc<RaftNode>,
    pub groups: Vec<GroupHandle>,
}

pub async fn node_with_shards(shards: u32) -> Result<Shards> {
    let dir = tempfile::tempdir()?;
    let (node, first) = boot(dir.path(), "127.0.0.1:0".parse()?).await?;
    let mut groups = vec![first];
    for s in 1..shards {
        groups.push(node.open_group(GroupId::of_shard(ShardId(s))).await?);
    }
    for (s, group) in groups.iter().enumerate() {
        lead(&node, group).await?;
        group
            .propose_shard(ShardCommand::Configure { shard_id: ShardId(s as u32), shard_count: shards })
            .await?
            .map_err(|r| anyhow!("configure: {r}"))?;
    }
    Ok(Shards { dir, node, groups })
}

/// A flow id of `flow_type` whose instance hashes to `shard` among `shards`.
pub fn flow_on(flow_type: &str, shard: u32, shards: u32, name: &str) -> FlowId {
    (0..)
        .map(|i| FlowId::new(flow_type, format!("{name}-{i}")))
        .find(|f| fetter_raft::placement::shard_of(f, shards) == ShardId(shard))
        .expect("some id hashes to every shard")
}

impl Node {
    /// Stops the node and starts it again from its directory, on the same address.
    pub async fn restart(self) -> Result<Node> {
        let addr = self.node.addr();
        self.node.shutdown().await;
        drop(self.group);
        drop(self.node);
        let (node, group) = boot(self.dir.path(), addr).await?;
        lead(&node, &group).await?;
        Ok(Node { dir: self.dir, node, group })
    }
}

pub async fn start(group: &GroupHandle, flow: &FlowId, input: &str) -> Result<()> {
    let cmd = ShardCommand::Start { flow: flow.clone(), input: input.as_bytes().to_vec(), parent: None };
    group.propose_shard(cmd).await?.map_err(|r| anyhow!("start: {r}"))?;
    Ok(())
}

pub async fn status(group: &GroupHandle, flow: &FlowId) -> Result<shard::FlowRecord> {
    group.read(|kv| shard::get_flow(kv, flow)).await??.ok_or_else(|| anyhow!("flow {flow} missing"))
}

/// Counts calls of a fake external service, and can hold a call until released ("in flight").
#[derive(Clone, Default)]
pub struct Service {
    pub calls: Arc<AtomicU32>,
    pub hold: Option<Arc<Semaphore>>,
    pub started: Option<mpsc::UnboundedSender<()>>,
}

impl Service {
    pub fn holding() -> (Service, mpsc::UnboundedReceiver<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Service { calls: Arc::default(), hold: Some(Arc::new(Semaphore::new(0))), started: Some(tx) }, rx)
    }

    pub async fn call(&self) -> Result<u32, FlowError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(tx) = &self.started {
            let _ = tx.send(());
        }
        if let Some(hold) = &self.hold {
            let _permit = hold.acquire().await.map_err(|e| FlowError::new("closed", e.to_string()))?;
        }
        Ok(n)
    }

    /// Lets `n` held calls proceed.
    pub fn release(&self, n: usize) {
        if let Some(hold) = &self.hold {
            hold.add_permits(n);
        }
    }

    pub fn count(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Runs an activation in a task, waits until `started` reports the held work began, then kills
/// the task: the crash happens while that work is in flight.
pub async fn crash_during(
    group: &GroupHandle,
    registry: &Registry,
    flow: &FlowId,
    started: &mut mpsc::UnboundedReceiver<()>,
) -> Result<()> {
    let task = tokio::spawn({
        let (group, registry, flow) = (group.clone(), registry.clone(), flow.clone());
        async move { activation::activate(&group, &registry, &flow).await }
    });
    tokio::time::timeout(WAIT, started.recv()).await?.ok_or_else(|| anyhow!("work never started"))?;
    task.abort();
    let _ = task.await;
    Ok(())
}
