//! A cluster of real nodes in this process: real sled in temp dirs, real openraft, real tonic on
//! loopback ports. Nodes can be stopped and restarted from their directories.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{ClusterId, FlowId, GroupId, NodeId, ShardId};
use fetter_raft::node::{NodeConfig, RaftNode, Timing};
use fetter_raft::placement::shard_of;
use fetter_raft::shard::{ShardCommand, ShardOutcome, ShardReply};

/// Upper bound on any wait in these tests; a wait that runs out fails with its description.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// Polls `check` until it returns `Some`, or fails after [`WAIT`] naming `what`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) struct Cluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) cluster_id: ClusterId,
    pub(crate) addrs: BTreeMap<u64, SocketAddr>,
    pub(crate) nodes: BTreeMap<u64, Option<Arc<RaftNode>>>,
    pub(crate) groups: Vec<GroupId>,
    pub(crate) snapshot_after_entries: u64,
}

impl Cluster {
    /// Starts `n` nodes hosting `shard_count` shard groups, initialized from node 1 with every
    /// node a voter, and configures each shard.
    pub(crate) async fn start(n: u64, shard_count: u32, snapshot_after_entries: u64) -> Result<Cluster> {
        let mut c = Cluster {
            dir: tempfile::tempdir()?,
            cluster_id: ClusterId("test-cluster".into()),
            addrs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            groups: std::iter::once(GroupId::META)
                .chain((0..shard_count).map(|s| GroupId::of_shard(ShardId(s))))
                .collect(),
            snapshot_after_entries,
        };
        for id in 1..=n {
            let node = c.boot(id, "127.0.0.1:0".parse()?).await?;
            c.addrs.insert(id, node.addr());
            c.nodes.insert(id, Some(node));
        }
        let members: BTreeMap<NodeId, String> =
            c.addrs.iter().map(|(id, a)| (NodeId(*id), a.to_string())).collect();
        for g in c.groups.clone() {
            c.handle(1, g)?.initialize(members.clone()).await?;
        }
        for s in 0..shard_count {
            let g = GroupId::of_shard(ShardId(s));
            let reply = c.propose(g, ShardCommand::Configure { shard_id: ShardId(s), shard_count }).await?;
            reply.map_err(|r| anyhow!("configure {g}: {r}"))?;
        }
        Ok(c)
    }

    async fn boot(&self, id: u64, listen: SocketAddr) -> Result<Arc<RaftNode>> {
        let mut config = NodeConfig::new(
            NodeId(id),
            listen,
            self.dir.path().join(format!("n{id}")),
            self.cluster_id.clone(),
        );
        config.timing = Timing::relaxed();
        config.snapshot_after_entries = self.snapshot_after_entries;
        config.entries_kept_after_snapshot = 0;
        let node = RaftNode::start(config).await?;
        for g in &self.groups {
            node.open_group(*g).await?;
        }
        Ok(node)
    }

    pub(crate) fn node(&self, id: u64) -> Result<Arc<RaftNode>> {
        self.nodes.get(&id).cloned().flatten().ok_or_else(|| anyhow!("node {id} is not running"))
    }

    pub(crate) fn handle(&self, id: u64, group: GroupId) -> Result<GroupHandle> {
        self.node(id)?.group(group).ok_or_else(|| anyhow!("node {id} has no group {group}"))
    }

    pub(crate) fn running(&self) -> Vec<u64> {
        self.nodes.iter().filter(|(_, n)| n.is_some()).map(|(id, _)| *id).collect()
    }

    /// Boots a new node `id` hosting the same groups; it belongs to no group's membership yet.
    pub(crate) async fn add_node(&mut self, id: u64) -> Result<Arc<RaftNode>> {
        let node = self.boot(id, "127.0.0.1:0".parse()?).await?;
        self.addrs.insert(id, node.addr());
        self.nodes.insert(id, Some(node.clone()));
        Ok(node)
    }

    /// Stops node `id` (its directory stays).
    pub(crate) async fn stop(&mut self, id: u64) -> Result<()> {
        let node =
            self.nodes.get_mut(&id).and_then(Option::take).ok_or_else(|| anyhow!("node {id} not running"))?;
        node.shutdown().await;
        Ok(())
    }

    /// Restarts node `id` from its directory on its old port.
    pub(crate) async fn restart(&mut self, id: u64) -> Result<()> {
        let addr = *self.addrs.get(&id).context("unknown node")?;
        // The stopped node's background tasks drop their handles on its sled directory shortly
        // after shutdown; sled's directory lock is free only then.
        let mut last_err = None;
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            match self.boot(id, addr).await {
                Ok(node) => {
                    self.nodes.insert(id, Some(node));
                    return Ok(());
                }
                Err(e) if format!("{e:#}").contains("could not acquire lock") => {
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("restart of node {id} timed out")))
    }

    /// The leader of `group`: it says it leads, and every running node that knows a leader
    /// names it (nodes outside the group's membership know none).
    pub(crate) async fn leader(&self, group: GroupId) -> Result<u64> {
        eventually(&format!("an agreed leader of {group}"), || async {
            let mut seen = BTreeSet::new();
            for id in self.running() {
                if let Some(l) = self.handle(id, group).ok()?.status().borrow().leader {
                    seen.insert(l.0);
                }
            }
            let leader = *seen.iter().next()?;
            let leads = self.handle(leader, group).ok()?.status().borrow().is_leader;
            (seen.len() == 1 && leads).then_some(leader)
        })
        .await
    }

    /// Proposes through the current leader, following leadership changes.
    pub(crate) async fn propose(&self, group: GroupId, cmd: ShardCommand) -> Result<ShardReply> {
        let leader = self.leader(group).await?;
        Ok(self.handle(leader, group)?.propose_shard(cmd).await?)
    }

    /// Waits until every running node has applied every entry in the leader's log.
    pub(crate) async fn converge(&self, group: GroupId) -> Result<()> {
        let leader = self.leader(group).await?;
        let target = self.handle(leader, group)?.raft().metrics().borrow().last_log_index;
        eventually(&format!("all replicas of {group} applied up to {target:?}"), || async {
            for id in self.running() {
                let m = self.handle(id, group).ok()?.raft().metrics().borrow().clone();
                if m.last_applied.map(|l| l.index) < target {
                    return None;
                }
            }
            Some(())
        })
        .await
    }

    /// Every row of `group`'s applied state on node `id`.
    pub(crate) fn state(&self, id: u64, group: GroupId) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let rows = self.handle(id, group)?.read_local(|kv| kv.scan(b"", None, usize::MAX))?;
        // The storage layer's own rows (last_applied, membership) start with 0 and legitimately
        // differ in nothing but timing; compare the state machine's rows.
        Ok(rows.into_iter().filter(|(k, _)| k.first() != Some(&0)).collect())
    }

    pub(crate) async fn shutdown(mut self) {
        for id in self.running() {
            let _ = self.stop(id).await;
        }
    }
}

/// A flow whose id hashes to `shard` among `shard_count` shards.
pub(crate) fn flow_on(shard: u32, shard_count: u32, name: &str) -> FlowId {
    (0..)
        .map(|i| FlowId::new("test", format!("{name}-{i}")))
        .find(|f| shard_of(f, shard_count) == ShardId(shard))
        .expect("some id hashes to every shard")
}

pub(crate) fn expect_ok(reply: ShardReply) -> Result<ShardOutcome> {
    reply.map_err(|r| anyhow!("rejected: {r}"))
}
