//! A node of a multi-node cluster: bootstrap, its groups and shard actors, the public API.
//!
//! **Bootstrap.** A node is started with the cluster's initial members (`--peers`, itself
//! included) or with the address of a member to join. The lowest id among the peers (the
//! *seed*) creates the cluster: it generates the cluster id (random: two clusters created with
//! the same command line, say in two data directories on the same ports, still differ), the
//! other initial members learn it from the seed, and once every peer answers "ready" with that
//! id the seed initializes group 0 (which records the id) and every initial member the shard
//! groups it is the first replica of — idempotently on every start, so the cluster initializes
//! exactly once however the nodes are started or restarted. A node that does not know the id
//! yet refuses every Raft request, so nothing of any cluster reaches its groups before it
//! knows which cluster it is in; a joining node learns the id from the member it joins through.
//! Each node keeps the id in its directory (`fetter-node.json` and its identity record) and
//! every node-to-node call carries it.
//!
//! The arguments a node first started with are kept with the id; a restart with other
//! arguments, under another `--id`, or next to running members of another cluster (a
//! directory of another cluster started with this one's `--peers`) is refused, naming both. A
//! fresh node whose id a reachable peer already lists as a member (it lost its disk) is
//! refused: it must rejoin under a new id.
//!
//! **Groups.** Every node replicates group 0. Each shard lives on the cluster's `replicas`
//! (default 3) members its placement in group 0 names, spread evenly (`reconcile`, `spread`);
//! the other nodes are outside the shard's group, so storage and apply work spread as nodes are
//! added. Every node still has a Raft instance and a shard actor for every shard (`hosting`): an
//! empty instance outside the group routes calls to the shard's replicas, and its actor never
//! leads. A replica that moved away is dropped (log and state) and replaced by an empty instance.
//!
//! **Requests.** Any node answers any request: the control panel submits to the shard's leader
//! (forwarded over the Raft transport, one hop, following hints) and reads linearizably on the
//! local replica (read index from the leader) — or, on a node without a replica, sends the read
//! as a query to one (`view` says where: the leader and voters the replicas report in their
//! answers to pings, then the placement).

mod api;
mod convert;
mod hosting;
mod members;
mod reconcile;
mod spread;
mod view;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fetter_actors::control::ControlPanel;
use fetter_actors::shard_actor::{Params, Router};
use fetter_actors::Registry;
use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{ClusterId, GroupId, NodeId, ShardId};
use fetter_raft::meta::{self, ClusterParams, Member, MetaCommand, ShardPlacement};
use fetter_raft::node::{NodeConfig, RaftNode, Timing};
use fetter_raft::shard::ShardCommand;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::proto;
use crate::proto::fetter_client::FetterClient;

pub use api::Liveness;

/// Replicas per shard (fewer when the cluster has fewer nodes).
pub const REPLICAS: usize = 3;
/// How long a bootstrap call to a peer may take.
const PEER_CALL: Duration = Duration::from_secs(1);
/// Bound on joining a cluster.
const JOIN_WAIT: Duration = Duration::from_secs(120);
/// How often a node checks which members answer.
const PING_EVERY: Duration = Duration::from_millis(500);

/// How to run a cluster node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// This node's id (unique in the cluster for the life of its disk).
    pub id: NodeId,
    /// Where to listen (the one gRPC port: public API, forwarding, Raft).
    pub listen: SocketAddr,
    /// The address other nodes and clients use (default: `listen`).
    pub advertise: Option<String>,
    /// The sled directory.
    pub data_dir: PathBuf,
    /// The initial members, this node included (`None` when joining).
    pub peers: Option<BTreeMap<NodeId, String>>,
    /// A member to ask for admission (instead of `peers`).
    pub join: Option<String>,
    /// Shards (fixed when the cluster is created).
    pub shards: u32,
    /// Raft timing.
    pub timing: Timing,
    /// Finished flows are kept this long: a cluster parameter, seeded by the node that creates
    /// the cluster (`None`: 7 days). A node whose cluster has another retention is refused; `cluster
    /// config set` changes it on every node.
    pub retention: Option<Duration>,
    /// The largest user payload (input, message, output, effect value) accepted: a cluster
    /// parameter like `retention` (`None`: 1 MiB).
    pub max_payload_bytes: Option<u64>,
    /// Replicas of each shard: a cluster parameter fixed at creation (`None`: 3).
    pub replicas: Option<u32>,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// Each group builds a snapshot of its state after this many log entries since the last
    /// one and keeps a quarter of that (at most 1,000) behind it for slow followers; a follower
    /// further behind catches up by snapshot. A node's own storage policy (default 10,000).
    pub snapshot_after_entries: u64,
    /// The local address of the connections this node opens to other nodes (`None`: the
    /// system's choice). With several nodes on one host, each on its own address, this makes
    /// every node's traffic carry its own address (as the chaos harness's network rules need).
    pub source_ip: Option<IpAddr>,
}

impl NodeOptions {
    /// Options for node `id` listening on `listen` with data in `data_dir`, 12 shards,
    /// production timing, the cluster's parameters (when creating it: 7 days of retention,
    /// 1 MiB payloads).
    pub fn new(id: u64, listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        NodeOptions {
            id: NodeId(id),
            listen,
            advertise: None,
            data_dir: data_dir.into(),
            peers: None,
            join: None,
            shards: 12,
            timing: Timing::production(),
            retention: None,
            max_payload_bytes: None,
            replicas: None,
            cache_bytes: fetter_raft::storage::DEFAULT_CACHE_BYTES,
            snapshot_after_entries: fetter_raft::node::DEFAULT_SNAPSHOT_AFTER_ENTRIES,
            source_ip: None,
        }
    }

    fn advertised(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }
}

/// Why a node refused to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The command line contradicts itself or what is stored.
    #[error("{0}")]
    Config(String),
    /// The directory belongs to another cluster than the running members this node reaches.
    #[error(
        "this directory ({dir}) belongs to cluster {stored} node {node}, but the cluster at {addr} is \
         cluster {running}: start node {node} with its own data directory (or add this machine as a \
         new node: an empty directory, a new --id and --join {addr})"
    )]
    WrongCluster {
        /// The data directory.
        dir: String,
        /// This node's id.
        node: u64,
        /// The cluster the directory belongs to.
        stored: ClusterId,
        /// The member that answered.
        addr: String,
        /// The cluster it belongs to.
        running: String,
    },
    /// A node id that the cluster already knows came back with an empty disk.
    #[error(
        "node id {0} is already a member of the cluster, but this data directory is new: a node \
         that lost its disk must rejoin under a new id (--join with another --id)"
    )]
    IdReused(u64),
    /// The node could not start (directory, identity, listener, Raft).
    #[error(transparent)]
    Node(Box<fetter_raft::node::Error>),
    /// The cluster did not answer as needed (joining).
    #[error("{0}")]
    Cluster(String),
    /// Local I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl From<fetter_raft::node::Error> for StartError {
    fn from(e: fetter_raft::node::Error) -> Self {
        StartError::Node(Box::new(e))
    }
}

/// The arguments a node's directory was first started with, and its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    node_id: u64,
    /// `None` until the node learns it (an initial member before the cluster is created).
    #[serde(default)]
    cluster_id: Option<String>,
    shards: u32,
    /// The initial members (`--peers`), when started that way.
    peers: Option<BTreeMap<u64, String>>,
    /// Joined through `--join`.
    joined: bool,
}

const STORED_FILE: &str = "fetter-node.json";

fn read_stored(dir: &Path) -> Result<Option<Stored>, StartError> {
    let path = dir.join(STORED_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            StartError::Config(format!("{} is not a node record ({e}); was it edited?", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StartError::Io { what: format!("reading {}", path.display()), source }),
    }
}

/// A node's record: where it is kept and what it says apart from the cluster id.
#[derive(Debug, Clone)]
struct Record {
    dir: PathBuf,
    stored: Stored,
}

impl Record {
    /// Writes the record with `cluster_id`.
    fn write(&self, cluster_id: Option<&ClusterId>) -> Result<(), StartError> {
        let stored = Stored { cluster_id: cluster_id.map(|c| c.0.clone()), ..self.stored.clone() };
        write_stored(&self.dir, &stored)
    }
}

/// Records that the node belongs to `cluster_id`: in its identity record (which the transport
/// goes by), then in its `fetter-node.json`. Another id than the one known is refused.
async fn learn_cluster_id(
    node: &RaftNode,
    record: &Record,
    cluster_id: &ClusterId,
) -> Result<(), StartError> {
    if node.cluster_id().as_ref() == Some(cluster_id) {
        return Ok(());
    }
    node.learn_cluster_id(cluster_id).await?;
    record.write(Some(cluster_id))
}

fn write_stored(dir: &Path, stored: &Stored) -> Result<(), StartError> {
    let io = |what: &str| {
        let what = format!("{what} {}", dir.join(STORED_FILE).display());
        move |source| StartError::Io { what, source }
    };
    std::fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
    let tmp = dir.join(format!("{STORED_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(stored).map_err(|e| StartError::Config(e.to_string()))?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io("writing"))?;
        f.write_all(&bytes).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))?;
    }
    std::fs::rename(&tmp, dir.join(STORED_FILE)).map_err(io("renaming"))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing the directory of"))?;
    Ok(())
}

/// Whether `addr` has the `host:port` shape of a node address.
pub(crate) fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok())
}

/// A new cluster's id: random, so that no two clusters share one, however alike their
/// command lines.
fn new_cluster_id() -> ClusterId {
    ClusterId(format!("fc-{}", uuid::Uuid::new_v4().simple()))
}

/// The initial placement: shard `k`'s replicas are `min(replicas, n)` members starting at the
/// `k`-th (in id order), the first of them its preferred leader — so replicas and leaders
/// spread evenly.
pub fn initial_placement(
    members: &[NodeId],
    shards: u32,
    replicas: u32,
) -> BTreeMap<ShardId, ShardPlacement> {
    let n = members.len().max(1);
    (0..shards)
        .map(|k| {
            let replicas: Vec<NodeId> =
                (0..(replicas as usize).min(members.len())).map(|i| members[(k as usize + i) % n]).collect();
            let preferred_leader = replicas.first().copied().unwrap_or(NodeId(0));
            (ShardId(k), ShardPlacement { replicas, preferred_leader })
        })
        .collect()
}

/// What the node's public API needs, shared with it.
pub(crate) struct Shared {
    pub(crate) node: Arc<RaftNode>,
    pub(crate) registry: Registry,
    pub(crate) panel: ControlPanel,
    pub(crate) meta: GroupHandle,
    pub(crate) shards: Arc<hosting::Shards>,
    /// The cluster's parameters as group 0 last said (followed by [`follow_params`]).
    pub(crate) params: Params,
    pub(crate) liveness: Liveness,
    /// The followers' leader lease (the election timeout maximum), for leadership moves.
    pub(crate) lease: Duration,
}

impl Shared {
    /// What group 0 records of the cluster, read linearizably (`None` before initialization).
    pub(crate) async fn cluster_info(&self) -> Result<Option<meta::ClusterInfo>, tonic::Status> {
        self.meta
            .read(meta::read_cluster)
            .await
            .map_err(api::journal_status)?
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }

    /// [`Shared::cluster_info`] of an initialized cluster; `UNAVAILABLE` before.
    pub(crate) async fn initialized_cluster(&self) -> Result<meta::ClusterInfo, tonic::Status> {
        self.cluster_info()
            .await?
            .ok_or_else(|| tonic::Status::unavailable("the cluster is not initialized yet"))
    }
}

/// A running cluster node.
pub struct ClusterNode {
    shared: Arc<Shared>,
    lease: Duration,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// How this node reaches a peer's API: connecting and each call bounded by [`PEER_CALL`].
/// `source` is the local address of the connection (the node's `--source-ip`).
fn peer_endpoint(addr: &str, source: Option<IpAddr>) -> Result<tonic::transport::Endpoint, String> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(PEER_CALL)
        .timeout(PEER_CALL)
        .local_address(source))
}

async fn node_info(addr: &str, source: Option<IpAddr>) -> Result<proto::NodeInfoResponse, String> {
    let endpoint = peer_endpoint(addr, source)?;
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        node_info_over(channel).await
    };
    tokio::time::timeout(PEER_CALL * 2, call).await.map_err(|_| format!("{addr}: no answer"))?
}

/// A channel to `addr` that connects on first use and reconnects after a failure (for calls
/// repeated every few hundred milliseconds, such as liveness pings).
fn lazy_channel(addr: &str, source: Option<IpAddr>) -> Result<tonic::transport::Channel, String> {
    Ok(peer_endpoint(addr, source)?.connect_lazy())
}

/// `NodeInfo` over an open (or lazy) channel, bounded by [`PEER_CALL`].
async fn node_info_over(channel: tonic::transport::Channel) -> Result<proto::NodeInfoResponse, String> {
    let mut client = FetterClient::new(channel);
    match tokio::time::timeout(PEER_CALL, client.node_info(proto::NodeInfoRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err("no answer".to_string()),
    }
}

impl ClusterNode {
    /// Starts the node: checks its arguments against its directory and its peers, starts Raft
    /// and the API, and (on the lowest initial member) initializes the cluster once every peer
    /// is ready.
    pub async fn start(options: NodeOptions, registry: Registry) -> Result<ClusterNode, StartError> {
        if options.snapshot_after_entries == 0 {
            return Err(StartError::Config("--snapshot-after-entries must be at least 1".into()));
        }
        let stored = read_stored(&options.data_dir)?;
        if options.peers.is_some() && options.join.is_some() {
            return Err(StartError::Config("give either --peers or --join, not both".into()));
        }
        if let Some(s) = stored.as_ref().filter(|s| s.node_id != options.id.0) {
            return Err(StartError::Config(format!(
                "this directory ({}) is node {}'s, started as --id {}",
                options.data_dir.display(),
                s.node_id,
                options.id.0
            )));
        }
        let (cluster_id, shards) = match (&stored, &options.peers, &options.join) {
            (_, None, None) => return Err(StartError::Config("give --peers or --join".into())),
            (Some(s), Some(peers), _) => {
                let given: BTreeMap<u64, String> = peers.iter().map(|(k, v)| (k.0, v.clone())).collect();
                if s.peers.as_ref() != Some(&given) || s.shards != options.shards {
                    return Err(StartError::Config(format!(
                        "this node was created with --peers {} and --shards {}; it was now started with \
                         --peers {} and --shards {}: restart it with its original arguments",
                        s.peers.as_ref().map(peers_arg).unwrap_or_else(|| "(none: it joined)".into()),
                        s.shards,
                        peers_arg(&given),
                        options.shards
                    )));
                }
                let known = s.cluster_id.clone().map(ClusterId);
                if let Some(known) = &known {
                    let others = peers.iter().filter(|(id, _)| **id != options.id).map(|(_, a)| a.as_str());
                    check_running_cluster(&options, known, others).await?;
                }
                (known, s.shards)
            }
            (Some(s), None, Some(join)) => {
                let known = s.cluster_id.clone().map(ClusterId);
                if let Some(known) = &known {
                    check_running_cluster(&options, known, [join.as_str()]).await?;
                }
                (known, s.shards)
            }
            (None, Some(peers), _) => {
                if !peers.contains_key(&options.id) {
                    return Err(StartError::Config(format!(
                        "--peers must include this node (id {})",
                        options.id.0
                    )));
                }
                check_fresh_against_peers(&options, peers).await?;
                // The seed generates the id when it creates the cluster; the others learn it then.
                (None, options.shards)
            }
            (None, None, Some(join)) => {
                let info = node_info(join, options.source_ip)
                    .await
                    .map_err(|e| StartError::Cluster(format!("cannot reach {join} to join: {e}")))?;
                if !info.initialized || info.cluster_id.is_empty() {
                    return Err(StartError::Cluster(format!("{join} is not part of an initialized cluster")));
                }
                if info.members.iter().any(|m| m.id == options.id.0) {
                    return Err(StartError::IdReused(options.id.0));
                }
                (Some(ClusterId(info.cluster_id)), info.shard_count)
            }
        };

        let mut config =
            NodeConfig::new(options.id, options.listen, options.data_dir.clone(), ClusterId(String::new()));
        config.cluster_id = cluster_id;
        config.timing = options.timing.clone();
        config.cache_bytes = options.cache_bytes;
        config.snapshot_after_entries = options.snapshot_after_entries;
        config.source_ip = options.source_ip;
        config.entries_kept_after_snapshot = (options.snapshot_after_entries / 4).min(1_000);
        let late = api::Late::default();
        let service = api::Api::new(late.clone()).into_server();
        let node = RaftNode::start_with(config, Some(tonic::service::Routes::new(service))).await?;
        let record = Record {
            dir: options.data_dir.clone(),
            stored: stored.clone().unwrap_or_else(|| Stored {
                node_id: options.id.0,
                cluster_id: None,
                shards,
                peers: options.peers.as_ref().map(|p| p.iter().map(|(k, v)| (k.0, v.clone())).collect()),
                joined: options.join.is_some(),
            }),
        };
        // A new directory gets its record now; an old one gets the cluster id if the identity
        // record learned it but the node stopped before this file did.
        let known = node.cluster_id();
        if stored.map(|s| s.cluster_id) != Some(known.as_ref().map(|c| c.0.clone())) {
            record.write(known.as_ref())?;
        }

        let meta = node.open_group(GroupId::META).await?;
        // The cluster's parameters: group 0's when this directory knows the cluster (a node's
        // flags may repeat them, never contradict them), else the flags seed them.
        let seed = ClusterParams {
            shard_count: shards,
            retention_ms: options
                .retention
                .map_or(ClusterParams::default().retention_ms, |r| r.as_millis() as u64),
            max_payload_bytes: options
                .max_payload_bytes
                .unwrap_or(ClusterParams::default().max_payload_bytes),
            replicas: options.replicas.unwrap_or(ClusterParams::default().replicas),
        };
        let mut current = seed.clone();
        if let Some(info) = meta.read_local(meta::read_cluster).ok().flatten() {
            // Group 0 holds only what came from its own cluster (the transport refuses every
            // other), so its record of the id agrees with the identity's, or teaches it.
            learn_cluster_id(&node, &record, &info.cluster_id).await?;
            node.set_member_incarnations(info.members.iter().map(|m| (m.node, m.incarnation)).collect());
            if let Err(contradiction) = check_params(&options, &info.params) {
                node.shutdown().await;
                return Err(StartError::Config(contradiction));
            }
            current = info.params;
        }
        let params = Params::of(&current);
        let mut groups = Vec::new();
        for s in 0..shards {
            groups.push(node.open_group(GroupId::of_shard(ShardId(s))).await?);
        }
        let hosted = Arc::new(hosting::Shards::new(groups));
        let router: Arc<dyn Router> = hosted.clone();
        let actor_config = Arc::new(hosting::ActorConfig {
            registry: registry.clone(),
            election_timeout: Duration::from_millis(options.timing.election_timeout_max_ms),
            params: params.clone(),
        });
        hosted.start_actors(&actor_config).await.map_err(StartError::Cluster)?;
        let liveness = Liveness::default();
        let shared = Arc::new(Shared {
            node: node.clone(),
            registry,
            panel: ControlPanel::new(router, shards),
            meta: meta.clone(),
            shards: hosted,
            params,
            liveness: liveness.clone(),
            lease: Duration::from_millis(options.timing.election_timeout_max_ms),
        });
        late.set(shared.clone(), shards);
        view::set_routes(&shared);

        let (stop, stop_rx) = watch::channel(false);
        let lease = Duration::from_millis(options.timing.election_timeout_max_ms);
        let mut tasks = vec![
            tokio::spawn(api::ping_members(shared.clone(), stop_rx.clone(), PING_EVERY)),
            tokio::spawn(reconcile::balance_leaders(shared.clone(), lease, stop_rx.clone())),
            tokio::spawn(follow_params(shared.clone(), stop_rx.clone())),
            tokio::spawn(hosting::janitor(shared.clone(), actor_config, stop_rx.clone())),
        ];
        if let Some(peers) = &options.peers {
            let init = Init { record, params: seed, peers: peers.clone() };
            tasks.push(tokio::spawn(initialize_cluster(shared.clone(), init, stop_rx.clone())));
        }
        let node = ClusterNode { shared, lease, stop, tasks };
        if let Some(join) = &options.join {
            let listed = node.shared.meta.read_local(meta::read_cluster).ok().flatten();
            let member = listed.as_ref().and_then(|i| i.member(options.id)).map(|m| m.incarnation);
            if member != Some(node.shared.node.identity().incarnation) {
                if let Err(e) = ask_to_join(join, options.id, &options.advertised()).await {
                    node.shutdown().await;
                    return Err(e);
                }
            }
        }
        tracing::info!(node = options.id.0, addr = %options.advertised(), "cluster node started");
        Ok(node)
    }

    /// The address the node serves on.
    pub fn addr(&self) -> SocketAddr {
        self.shared.node.addr()
    }

    /// The underlying Raft node.
    pub fn raft(&self) -> &RaftNode {
        &self.shared.node
    }

    /// Waits until group 0 lists the cluster (initialized) or `timeout` passes.
    pub async fn wait_initialized(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.shared.meta.read_local(meta::read_cluster).ok().flatten().is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Stops gracefully: hands the leadership of every group this node leads to another live
    /// node (so their flows move on without waiting for an election timeout), then stops.
    pub async fn shutdown_gracefully(self) {
        // Peers' pings fail from now on: none moves a leadership here while this node leaves.
        self.shared.liveness.set_stopping();
        let _ = self.stop.send(true);
        let moved = reconcile::hand_over_all(&self.shared, self.lease).await;
        tracing::info!(groups = moved, "leadership handed over");
        self.shutdown().await;
    }

    /// Stops actors, background tasks, Raft and the server.
    pub async fn shutdown(self) {
        self.shared.liveness.set_stopping();
        let _ = self.stop.send(true);
        self.shared.shards.stop_actors();
        for task in self.tasks {
            task.abort();
        }
        self.shared.node.shutdown().await;
    }
}

/// How often a node reads group 0's parameters again.
const PARAMS_EVERY: Duration = Duration::from_millis(250);

/// Follows the cluster's parameters: every node reads them from its replica of group 0 (voter
/// or learner), so a `cluster config set` reaches every shard actor and the API here.
async fn follow_params(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PARAMS_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if let Ok(Some(info)) = shared.meta.read_local(meta::read_cluster) {
            if shared.params.follow(&info.params) {
                tracing::info!(
                    retention_ms = info.params.retention_ms,
                    max_payload_bytes = info.params.max_payload_bytes,
                    "cluster parameters changed"
                );
            }
        }
    }
}

/// Whether the parameters given on the command line agree with the cluster's (`Err` says how
/// they do not).
fn check_params(options: &NodeOptions, cluster: &ClusterParams) -> Result<(), String> {
    if let Some(retention) = options.retention {
        let given = retention.as_millis() as u64;
        if given != cluster.retention_ms {
            return Err(format!(
                "--retention-secs {} contradicts the cluster's retention of {} s: cluster parameters \
                 are the cluster's (see `cluster config get`; `cluster config set retention-secs <s>` \
                 changes them on every node); start without the flag",
                given / 1000,
                cluster.retention_ms / 1000
            ));
        }
    }
    if let Some(given) = options.replicas {
        if given != cluster.replicas {
            return Err(format!(
                "--replicas {given} contradicts the cluster's {} replicas per shard, fixed when it \
                 was created; start without the flag",
                cluster.replicas
            ));
        }
    }
    if let Some(given) = options.max_payload_bytes {
        if given != cluster.max_payload_bytes {
            return Err(format!(
                "--max-payload-bytes {given} contradicts the cluster's limit of {} bytes: cluster \
                 parameters are the cluster's (see `cluster config get`; `cluster config set \
                 max-payload-bytes <n>` changes them on every node); start without the flag",
                cluster.max_payload_bytes
            ));
        }
    }
    Ok(())
}

/// Asks the cluster `join` belongs to to add this node (retrying while it is unavailable).
async fn ask_to_join(join: &str, id: NodeId, addr: &str) -> Result<(), StartError> {
    let deadline = tokio::time::Instant::now() + JOIN_WAIT;
    loop {
        let attempt = async {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{join}"))
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
                .connect_timeout(PEER_CALL);
            let channel = endpoint.connect().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            FetterClient::new(channel)
                .add_node(proto::AddNodeRequest { id: id.0, addr: addr.to_string() })
                .await
        };
        match attempt.await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Err(StartError::IdReused(id.0)),
            Err(s) => {
                return Err(StartError::Cluster(format!("{join} refused to add node {id}: {}", s.message())))
            }
        }
    }
}

fn peers_arg(peers: &BTreeMap<u64, String>) -> String {
    peers.iter().map(|(id, addr)| format!("{id}={addr}")).collect::<Vec<_>>().join(",")
}

/// A fresh node asks the peers it can reach whether the cluster already exists. A new initial
/// member never finds it initialized (the seed creates it only once every initial member knows
/// its id): a peer that lists this node id as a member means the id is being reused with an
/// empty disk, any other initialized peer (or one with another shard count) means `--peers`
/// contradicts the cluster's.
async fn check_fresh_against_peers(
    options: &NodeOptions,
    peers: &BTreeMap<NodeId, String>,
) -> Result<(), StartError> {
    for (id, addr) in peers.iter().filter(|(id, _)| **id != options.id) {
        let Ok(info) = node_info(addr, options.source_ip).await else { continue };
        if info.initialized && info.members.iter().any(|m| m.id == options.id.0) {
            return Err(StartError::IdReused(options.id.0));
        }
        if info.initialized || info.shard_count != options.shards {
            let members: Vec<String> = info.members.iter().map(|m| format!("{}={}", m.id, m.addr)).collect();
            return Err(StartError::Config(format!(
                "peer {} at {addr} belongs to another cluster ({}, {} shards, members {}): --peers {} and \
                 --shards {} contradict it",
                id.0,
                if info.cluster_id.is_empty() { "not created yet" } else { info.cluster_id.as_str() },
                info.shard_count,
                if members.is_empty() { "not listed yet".to_string() } else { members.join(",") },
                peers_arg(&peers.iter().map(|(k, v)| (k.0, v.clone())).collect()),
                options.shards
            )));
        }
    }
    Ok(())
}

/// A node whose directory belongs to cluster `known` asks the members it can reach (`addrs`)
/// which cluster they are in: one that answers with another id means this directory is
/// another cluster's (its `--peers` and ports may well be the same), and the node is refused
/// before it says anything to anyone. Unreachable members say nothing either way.
async fn check_running_cluster<'a>(
    options: &NodeOptions,
    known: &ClusterId,
    addrs: impl IntoIterator<Item = &'a str>,
) -> Result<(), StartError> {
    for addr in addrs {
        let Ok(info) = node_info(addr, options.source_ip).await else { continue };
        if !info.cluster_id.is_empty() && info.cluster_id != known.0 {
            return Err(StartError::WrongCluster {
                dir: options.data_dir.display().to_string(),
                node: options.id.0,
                stored: known.clone(),
                addr: addr.to_string(),
                running: info.cluster_id,
            });
        }
    }
    Ok(())
}

/// What an initial member needs to create the cluster.
struct Init {
    record: Record,
    params: ClusterParams,
    peers: BTreeMap<NodeId, String>,
}

/// Creates the cluster, idempotently, retrying until done: the seed (the lowest initial member)
/// generates the cluster id unless it has one, every other initial member learns it from the
/// seed, the seed creates group 0 (once every peer is ready with that id) and records the
/// cluster in it; then every initial member creates the shard groups it is the first replica
/// of, and configures them.
async fn initialize_cluster(shared: Arc<Shared>, init: Init, mut stop: watch::Receiver<bool>) {
    let me = shared.node.id();
    loop {
        let step = async {
            let cluster_id = cluster_id_of_new_cluster(&shared, &init).await?;
            if init.peers.keys().next() == Some(&me) {
                initialize_meta(&shared, &cluster_id, &init.params, &init.peers).await?;
            }
            initialize_own_shards(&shared, &init.params, &init.peers).await?;
            Ok::<_, String>(cluster_id)
        };
        match step.await {
            Ok(cluster_id) => {
                tracing::info!(cluster = %cluster_id, node = me.0, "cluster initialized");
                return;
            }
            Err(e) => tracing::info!(node = me.0, reason = e, "cluster not initialized yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The id of the cluster an initial member is creating: the one it knows; else, on the seed, a
/// new one; else the seed's, once the seed has one and has not created the cluster yet (a
/// created cluster that this node does not know the id of was not created with this node: it
/// is another cluster, or this node id lost its disk).
async fn cluster_id_of_new_cluster(shared: &Shared, init: &Init) -> Result<ClusterId, String> {
    if let Some(known) = shared.node.cluster_id() {
        return Ok(known);
    }
    let me = shared.node.id();
    let Some((seed, seed_addr)) = init.peers.iter().next() else {
        return Err("no initial members".into());
    };
    let cluster_id = if *seed == me {
        new_cluster_id()
    } else {
        let info = node_info(seed_addr, shared.node.peers().source_ip())
            .await
            .map_err(|e| format!("waiting for node {} at {seed_addr} to create the cluster: {e}", seed.0))?;
        if info.node_id != seed.0 {
            return Err(format!("the node at {seed_addr} is node {}, not node {}", info.node_id, seed.0));
        }
        if info.cluster_id.is_empty() {
            return Err(format!("node {} has not created the cluster yet", seed.0));
        }
        if info.initialized {
            // Retried (and logged) like any other step; the node stays out of that cluster.
            return Err(format!(
                "node {} at {seed_addr} is in cluster {}, created without this node (a node of another \
                 cluster there, or this node id lost its disk: rejoin under a new id with --join)",
                seed.0, info.cluster_id
            ));
        }
        ClusterId(info.cluster_id)
    };
    learn_cluster_id(&shared.node, &init.record, &cluster_id).await.map_err(|e| e.to_string())?;
    Ok(cluster_id)
}

/// Every peer's incarnation, once every peer answers that it is ready in this cluster.
async fn ready_members(
    shared: &Shared,
    cluster_id: &ClusterId,
    peers: &BTreeMap<NodeId, String>,
) -> Result<Vec<Member>, String> {
    let me = shared.node.id();
    let mut members = Vec::new();
    for (id, addr) in peers {
        let incarnation = if *id == me {
            shared.node.identity().incarnation
        } else {
            let info = node_info(addr, shared.node.peers().source_ip())
                .await
                .map_err(|e| format!("peer {} not reachable: {e}", id.0))?;
            if info.node_id != id.0 {
                return Err(format!("the node at {addr} is node {}, not node {}", info.node_id, id.0));
            }
            if info.cluster_id.is_empty() {
                return Err(format!("peer {} at {addr} has not learned the cluster id yet", id.0));
            }
            if info.cluster_id != cluster_id.0 || !info.ready {
                return Err(format!(
                    "peer {} at {addr} is in cluster {}, not {cluster_id}",
                    id.0, info.cluster_id
                ));
            }
            fetter_raft::ids::Incarnation(info.incarnation)
        };
        members.push(Member { node: *id, addr: addr.clone(), incarnation });
    }
    Ok(members)
}

async fn initialize_meta(
    shared: &Shared,
    cluster_id: &ClusterId,
    params: &ClusterParams,
    peers: &BTreeMap<NodeId, String>,
) -> Result<(), String> {
    if shared.meta.read_local(meta::read_cluster).map_err(|e| e.to_string())?.is_some() {
        return Ok(());
    }
    let members = ready_members(shared, cluster_id, peers).await?;
    shared.meta.initialize(peers.clone()).await.map_err(|e| e.to_string())?;
    if shared.cluster_info().await.map_err(|e| e.message().to_string())?.is_some() {
        return Ok(());
    }
    let ids: Vec<NodeId> = peers.keys().copied().collect();
    let init = MetaCommand::Initialize {
        cluster_id: cluster_id.clone(),
        params: params.clone(),
        members,
        placement: initial_placement(&ids, params.shard_count, params.replicas),
    };
    shared.meta.submit_meta(init).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    Ok(())
}

/// Creates and configures the shard groups whose first initial replica is this node, once
/// group 0 records the cluster.
async fn initialize_own_shards(
    shared: &Shared,
    params: &ClusterParams,
    peers: &BTreeMap<NodeId, String>,
) -> Result<(), String> {
    let me = shared.node.id();
    let Some(info) = shared.cluster_info().await.map_err(|e| e.message().to_string())? else {
        return Err("group 0 does not list the cluster yet".into());
    };
    let ids: Vec<NodeId> = peers.keys().copied().collect();
    for (shard, place) in initial_placement(&ids, params.shard_count, info.params.replicas) {
        if place.preferred_leader != me {
            continue;
        }
        let group = shared.shards.at(shard.0 as usize).ok_or("no such shard")?;
        let voters: BTreeMap<NodeId, String> =
            place.replicas.iter().filter_map(|id| peers.get(id).map(|a| (*id, a.clone()))).collect();
        group.initialize(voters.clone()).await.map_err(|e| e.to_string())?;
        let configure = ShardCommand::Configure { shard_id: shard, shard_count: params.shard_count };
        group.submit_shard(configure).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        // The other initial members hold no replica of it: nodes outside a shard's placement
        // are outside its group (they route to it), so a cluster of more nodes than replicas
        // spreads the shards' storage and apply work.
    }
    Ok(())
}
