//! [`Engine`]: one node in-process, hosting every shard of a cluster of its own.
//!
//! Each shard is a single-voter Raft group on the node's sled directory; a [`ShardActor`] runs
//! on each. Restarting an engine on the same directory resumes every flow where its journal
//! says it is.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fetter_actors::control::ControlPanel;
use fetter_actors::shard_actor::{Params, Router, ShardActor, ShardArgs, ShardHandle, ShardStats};
use fetter_actors::Registry;
use fetter_raft::handle::{self, GroupHandle};
use fetter_raft::ids::FlowId;
use fetter_raft::ids::{ClusterId, GroupId, NodeId, ShardId};
use fetter_raft::node::{self, NodeConfig, RaftNode, Timing};
use fetter_raft::shard::{Action, FlowStatus, Rejection, ShardCommand};

/// How to run an embedded engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The sled directory (created if missing; reused on restart).
    pub data_dir: PathBuf,
    /// Shards (fixed when the directory is first used).
    pub shards: u32,
    /// Where the node listens for Raft RPCs (port 0: any free port).
    pub listen: SocketAddr,
    /// Raft timing.
    pub timing: Timing,
    /// Finished flows are kept this long.
    pub retention: Duration,
    /// sled's page cache.
    pub cache_bytes: u64,
}

impl EngineConfig {
    /// 12 shards, loopback on a free port, production timing, 7 days of retention.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            shards: 12,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            timing: Timing::production(),
            retention: Duration::from_secs(7 * 24 * 3600),
            cache_bytes: fetter_raft::storage::DEFAULT_CACHE_BYTES,
        }
    }
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node could not start (directory, identity, listener).
    #[error(transparent)]
    Node(#[from] node::Error),
    /// A shard group did not become ready.
    #[error(transparent)]
    Journal(#[from] handle::Error),
    /// A shard refused its configuration (e.g. another shard count than the directory's).
    #[error("shard {shard} refused its configuration: {rejection}")]
    Configure {
        /// The shard.
        shard: ShardId,
        /// Why.
        rejection: Rejection,
    },
    /// A shard group did not elect this node within the bound.
    #[error("shard {0} did not become ready within {1:?}")]
    NotReady(ShardId, Duration),
    /// A shard actor could not be spawned.
    #[error("cannot spawn the actor of shard {0}: {1}")]
    Spawn(ShardId, String),
}

/// An embedded single-node engine.
pub struct Engine {
    node: Arc<RaftNode>,
    groups: Vec<GroupHandle>,
    actors: Vec<(ShardHandle, ShardStats)>,
    panel: ControlPanel,
}

const READY_WAIT: Duration = Duration::from_secs(30);
/// Bound on queued finished-flow notifications per subscriber.
const FINISHED_CAPACITY: usize = 65_536;

impl Engine {
    /// Opens (or creates) the engine in `config.data_dir` and starts running `registry`'s flows.
    pub async fn start(config: EngineConfig, registry: Registry) -> Result<Engine, Error> {
        let mut node_config =
            NodeConfig::new(NodeId(1), config.listen, config.data_dir.clone(), ClusterId("embedded".into()));
        node_config.timing = config.timing.clone();
        node_config.cache_bytes = config.cache_bytes;
        let node = RaftNode::start(node_config).await?;
        let members = BTreeMap::from([(NodeId(1), node.addr().to_string())]);
        let mut groups = Vec::new();
        for s in 0..config.shards {
            let shard = ShardId(s);
            let group = node.open_group(GroupId::of_shard(shard)).await?;
            group.initialize(members.clone()).await?;
            let mut status = group.status();
            tokio::time::timeout(READY_WAIT, status.wait_for(|st| st.is_leader))
                .await
                .map_err(|_| Error::NotReady(shard, READY_WAIT))?
                .map_err(|_| Error::NotReady(shard, READY_WAIT))?;
            group
                .propose_shard(ShardCommand::Configure { shard_id: shard, shard_count: config.shards })
                .await?
                .map_err(|rejection| Error::Configure { shard, rejection })?;
            groups.push(group);
        }
        let routes: HashMap<ShardId, GroupHandle> =
            groups.iter().enumerate().map(|(s, g)| (ShardId(s as u32), g.clone())).collect();
        let router: Arc<dyn Router> = Arc::new(routes);
        let election_timeout = Duration::from_millis(config.timing.election_timeout_max_ms);
        // One node is its own cluster: its configuration is the cluster's parameters.
        let params = Params::new(config.retention, Default::default());
        let mut actors = Vec::new();
        for (s, group) in groups.iter().enumerate() {
            let shard = ShardId(s as u32);
            let mut args =
                ShardArgs::new(shard, group.clone(), router.clone(), registry.clone(), election_timeout);
            args.params = params.clone();
            let spawned = ShardActor::start(args).await.map_err(|e| Error::Spawn(shard, e.to_string()))?;
            actors.push(spawned);
        }
        Ok(Engine { node, groups, actors, panel: ControlPanel::new(router, config.shards) })
    }

    /// The control panel: start, read, list and repair flows.
    pub fn panel(&self) -> &ControlPanel {
        &self.panel
    }

    /// Flows as they finish (any shard), from now on: a bounded channel fed by every shard's
    /// applied actions. A receiver that falls behind misses notifications (`Lagged`); read the
    /// flows' status then.
    pub fn finished(&self) -> tokio::sync::broadcast::Receiver<(FlowId, FlowStatus)> {
        let (tx, rx) = tokio::sync::broadcast::channel(FINISHED_CAPACITY);
        for group in &self.groups {
            let mut actions = group.subscribe_actions();
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    match actions.recv().await {
                        Ok(batch) => {
                            for action in batch.iter() {
                                if let Action::Finished { flow, status } = action {
                                    if tx.send((flow.clone(), status.clone())).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "finished-flow notifications lagged");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
        }
        rx
    }

    /// Flow activations alive now, over all shards (waiting flows have none).
    pub fn live_flows(&self) -> usize {
        self.actors.iter().map(|(_, stats)| stats.live_flows()).sum()
    }

    /// Timers held in memory by the shard actors (due within their horizon, or being fired);
    /// later timers cost only disk.
    pub fn timers_in_memory(&self) -> usize {
        self.actors.iter().map(|(_, stats)| stats.timers_in_memory()).sum()
    }

    /// The node's store (fsync counter, disk).
    pub fn node(&self) -> &RaftNode {
        &self.node
    }

    /// The shard groups (for tests and tools).
    pub fn groups(&self) -> &[GroupHandle] {
        &self.groups
    }

    /// Stops the actors and the node; every flow resumes when an engine opens the directory again.
    pub async fn shutdown(self) {
        for (actor, _) in &self.actors {
            actor.stop();
        }
        self.node.shutdown().await;
    }
}
