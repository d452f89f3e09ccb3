//! A node of a multi-node cluster: bootstrap, its groups and shard actors, the public API.
//!
//! **Bootstrap.** A node is started with the cluster's initial members (`--peers`, itself
//! included) or with the address of a member to join. With `--peers` the cluster id is derived
//! from the member list and the shard count (as etcd derives its cluster id from the initial
//! cluster), so every initial member computes the same one and a node started with a
//! contradicting list belongs to another cluster: its RPCs are refused and it is refused itself
//! when it finds a peer of the real cluster. The lowest id among the peers initializes group 0
//! and every shard group — once every peer answers "ready" — and does so idempotently on every
//! start, so the cluster initializes exactly once however the nodes are started or restarted.
//! The arguments a node first started with are kept next to its data (`fetter-node.json`); a
//! restart with other arguments is refused with the difference. A fresh node whose id a
//! reachable peer already lists as a member (it lost its disk) is refused: it must rejoin under
//! a new id.
//!
//! **Groups.** Every node opens group 0 and every shard group; a group whose membership does not
//! include the node stays idle. A shard group has at most three voters (its placement) and every
//! other member replicates it as a learner: the initial members beyond three from the bootstrap
//! on, a node added later from its `AddNode`. So every member replicates every shard.
//! A shard actor runs on every node for every shard and acts only while its node leads.
//!
//! **Requests.** Any node answers any request: the control panel submits to the shard's leader
//! (forwarded over the Raft transport, one hop, following hints) and reads linearizably on the
//! local replica (read index from the leader).

mod api;
mod convert;
mod members;
mod reconcile;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fetter_actors::control::ControlPanel;
use fetter_actors::shard_actor::{Router, ShardActor, ShardArgs, ShardHandle};
use fetter_actors::Registry;
use fetter_raft::handle::{GroupHandle, MembershipOp};
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
    /// Finished flows are kept this long.
    pub retention: Duration,
    /// The largest user payload (input, message, output, effect value) accepted.
    pub max_payload_bytes: u64,
    /// sled's page cache.
    pub cache_bytes: u64,
}

impl NodeOptions {
    /// Options for node `id` listening on `listen` with data in `data_dir`, 12 shards,
    /// production timing, 7 days of retention, 1 MiB payloads.
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
            retention: Duration::from_secs(7 * 24 * 3600),
            max_payload_bytes: ClusterParams::default().max_payload_bytes,
            cache_bytes: fetter_raft::storage::DEFAULT_CACHE_BYTES,
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

/// The arguments a node's directory was first started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    node_id: u64,
    cluster_id: String,
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

/// The cluster id of a cluster created with `peers` and `shards`: the same on every initial
/// member, different for any other member list or shard count.
pub fn derive_cluster_id(peers: &BTreeMap<NodeId, String>, shards: u32) -> ClusterId {
    let mut text = format!("fetter/v1/shards={shards}");
    for (id, addr) in peers {
        text.push_str(&format!("/{}={addr}", id.0));
    }
    ClusterId(format!("fc-{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes())))
}

/// The initial placement: shard `k`'s replicas are `min(3, n)` members starting at the `k`-th
/// (in id order), the first of them its preferred leader — so leaders spread evenly.
pub fn initial_placement(members: &[NodeId], shards: u32) -> BTreeMap<ShardId, ShardPlacement> {
    let n = members.len().max(1);
    (0..shards)
        .map(|k| {
            let replicas: Vec<NodeId> =
                (0..REPLICAS.min(members.len())).map(|i| members[(k as usize + i) % n]).collect();
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
    pub(crate) shards: Vec<GroupHandle>,
    pub(crate) max_payload_bytes: u64,
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
}

/// A running cluster node.
pub struct ClusterNode {
    shared: Arc<Shared>,
    lease: Duration,
    actors: Vec<ShardHandle>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// How this node reaches a peer's API: connecting and each call bounded by [`PEER_CALL`].
fn peer_endpoint(addr: &str) -> Result<tonic::transport::Endpoint, String> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(PEER_CALL)
        .timeout(PEER_CALL))
}

async fn node_info(addr: &str) -> Result<proto::NodeInfoResponse, String> {
    let endpoint = peer_endpoint(addr)?;
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        node_info_over(channel).await
    };
    tokio::time::timeout(PEER_CALL * 2, call).await.map_err(|_| format!("{addr}: no answer"))?
}

/// A channel to `addr` that connects on first use and reconnects after a failure (for calls
/// repeated every few hundred milliseconds, such as liveness pings).
fn lazy_channel(addr: &str) -> Result<tonic::transport::Channel, String> {
    Ok(peer_endpoint(addr)?.connect_lazy())
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
        let stored = read_stored(&options.data_dir)?;
        let (cluster_id, shards, fresh) = match (&stored, &options.peers, &options.join) {
            (_, Some(_), Some(_)) => {
                return Err(StartError::Config("give either --peers or --join, not both".into()))
            }
            (_, None, None) => return Err(StartError::Config("give --peers or --join".into())),
            (Some(s), Some(peers), None) => {
                let given: BTreeMap<u64, String> = peers.iter().map(|(k, v)| (k.0, v.clone())).collect();
                if s.node_id != options.id.0 {
                    return Err(StartError::Config(format!(
                        "{} belongs to node {}, not node {}",
                        options.data_dir.display(),
                        s.node_id,
                        options.id.0
                    )));
                }
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
                (ClusterId(s.cluster_id.clone()), s.shards, false)
            }
            (Some(s), None, Some(_)) => {
                if s.node_id != options.id.0 {
                    return Err(StartError::Config(format!(
                        "{} belongs to node {}, not node {}",
                        options.data_dir.display(),
                        s.node_id,
                        options.id.0
                    )));
                }
                (ClusterId(s.cluster_id.clone()), s.shards, false)
            }
            (None, Some(peers), None) => {
                if !peers.contains_key(&options.id) {
                    return Err(StartError::Config(format!(
                        "--peers must include this node (id {})",
                        options.id.0
                    )));
                }
                let cluster_id = derive_cluster_id(peers, options.shards);
                check_fresh_against_peers(&options, peers, &cluster_id).await?;
                (cluster_id, options.shards, true)
            }
            (None, None, Some(join)) => {
                let info = node_info(join)
                    .await
                    .map_err(|e| StartError::Cluster(format!("cannot reach {join} to join: {e}")))?;
                if !info.initialized {
                    return Err(StartError::Cluster(format!("{join} is not part of an initialized cluster")));
                }
                if info.members.iter().any(|m| m.id == options.id.0) {
                    return Err(StartError::IdReused(options.id.0));
                }
                (ClusterId(info.cluster_id), info.shard_count, true)
            }
        };

        let mut config =
            NodeConfig::new(options.id, options.listen, options.data_dir.clone(), cluster_id.clone());
        config.timing = options.timing.clone();
        config.cache_bytes = options.cache_bytes;
        let late = api::Late::default();
        let service = api::Api::new(late.clone()).into_server();
        let node = RaftNode::start_with(config, Some(tonic::service::Routes::new(service))).await?;
        if fresh {
            let peers = options.peers.as_ref().map(|p| p.iter().map(|(k, v)| (k.0, v.clone())).collect());
            let joined = options.join.is_some();
            let stored =
                Stored { node_id: options.id.0, cluster_id: cluster_id.0.clone(), shards, peers, joined };
            write_stored(&options.data_dir, &stored)?;
        }

        let meta = node.open_group(GroupId::META).await?;
        let mut groups = Vec::new();
        for s in 0..shards {
            groups.push(node.open_group(GroupId::of_shard(ShardId(s))).await?);
        }
        let routes: HashMap<ShardId, GroupHandle> =
            groups.iter().enumerate().map(|(s, g)| (ShardId(s as u32), g.clone())).collect();
        let router: Arc<dyn Router> = Arc::new(routes);
        let election_timeout = Duration::from_millis(options.timing.election_timeout_max_ms);
        let mut actors = Vec::new();
        for (s, group) in groups.iter().enumerate() {
            let shard = ShardId(s as u32);
            let mut args =
                ShardArgs::new(shard, group.clone(), router.clone(), registry.clone(), election_timeout);
            args.retention = options.retention;
            let (actor, _) = ShardActor::start(args)
                .await
                .map_err(|e| StartError::Cluster(format!("cannot spawn the actor of shard {shard}: {e}")))?;
            actors.push(actor);
        }
        let liveness = Liveness::default();
        let shared = Arc::new(Shared {
            node: node.clone(),
            registry,
            panel: ControlPanel::new(router, shards),
            meta: meta.clone(),
            shards: groups,
            max_payload_bytes: options.max_payload_bytes,
            liveness: liveness.clone(),
            lease: Duration::from_millis(options.timing.election_timeout_max_ms),
        });
        late.set(shared.clone(), cluster_id.clone(), shards);

        let (stop, stop_rx) = watch::channel(false);
        let lease = Duration::from_millis(options.timing.election_timeout_max_ms);
        let mut tasks = vec![
            tokio::spawn(api::ping_members(
                shared.clone(),
                cluster_id.0.clone(),
                stop_rx.clone(),
                PING_EVERY,
            )),
            tokio::spawn(reconcile::balance_leaders(shared.clone(), lease, stop_rx.clone())),
        ];
        if let Some(peers) = &options.peers {
            {
                let params = ClusterParams {
                    shard_count: shards,
                    retention_ms: options.retention.as_millis() as u64,
                    max_payload_bytes: options.max_payload_bytes,
                };
                tasks.push(tokio::spawn(initialize_cluster(
                    shared.clone(),
                    cluster_id,
                    params,
                    peers.clone(),
                    stop_rx.clone(),
                )));
            }
        }
        let node = ClusterNode { shared, lease, actors, stop, tasks };
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
        for actor in &self.actors {
            actor.stop();
        }
        for task in self.tasks {
            task.abort();
        }
        self.shared.node.shutdown().await;
    }
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

/// A fresh node asks the peers it can reach whether the cluster already exists: a peer of
/// another cluster means `--peers` contradicts the cluster's; a peer that lists this node id
/// as a member means the id is being reused with an empty disk.
async fn check_fresh_against_peers(
    options: &NodeOptions,
    peers: &BTreeMap<NodeId, String>,
    cluster_id: &ClusterId,
) -> Result<(), StartError> {
    for (id, addr) in peers.iter().filter(|(id, _)| **id != options.id) {
        let Ok(info) = node_info(addr).await else { continue };
        if info.cluster_id != cluster_id.0 {
            let members: Vec<String> = info.members.iter().map(|m| format!("{}={}", m.id, m.addr)).collect();
            return Err(StartError::Config(format!(
                "peer {} at {addr} belongs to another cluster ({}, members {}): --peers {} and --shards {} \
                 contradict it",
                id.0,
                info.cluster_id,
                members.join(","),
                peers_arg(&peers.iter().map(|(k, v)| (k.0, v.clone())).collect()),
                options.shards
            )));
        }
        if info.initialized && info.members.iter().any(|m| m.id == options.id.0) {
            return Err(StartError::IdReused(options.id.0));
        }
    }
    Ok(())
}

/// Creates the cluster, idempotently, retrying until done: the lowest initial member creates
/// group 0 (once every peer is ready) and records the cluster in it; then every initial member
/// creates the shard groups it is the first replica of, and configures them.
async fn initialize_cluster(
    shared: Arc<Shared>,
    cluster_id: ClusterId,
    params: ClusterParams,
    peers: BTreeMap<NodeId, String>,
    mut stop: watch::Receiver<bool>,
) {
    let seed = peers.keys().next() == Some(&shared.node.id());
    loop {
        let step = async {
            if seed {
                initialize_meta(&shared, &cluster_id, &params, &peers).await?;
            }
            initialize_own_shards(&shared, &params, &peers).await
        };
        match step.await {
            Ok(()) => {
                tracing::info!(cluster = %cluster_id, node = shared.node.id().0, "cluster initialized");
                return;
            }
            Err(e) => tracing::info!(cluster = %cluster_id, reason = e, "cluster not initialized yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
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
            let info = node_info(addr).await.map_err(|e| format!("peer {} not reachable: {e}", id.0))?;
            if info.cluster_id != cluster_id.0 || !info.ready {
                return Err(format!("peer {} at {addr} is not ready", id.0));
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
        placement: initial_placement(&ids, params.shard_count),
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
    if shared.cluster_info().await.map_err(|e| e.message().to_string())?.is_none() {
        return Err("group 0 does not list the cluster yet".into());
    }
    let ids: Vec<NodeId> = peers.keys().copied().collect();
    for (shard, place) in initial_placement(&ids, params.shard_count) {
        if place.preferred_leader != me {
            continue;
        }
        let group = &shared.shards[shard.0 as usize];
        let voters: BTreeMap<NodeId, String> =
            place.replicas.iter().filter_map(|id| peers.get(id).map(|a| (*id, a.clone()))).collect();
        group.initialize(voters.clone()).await.map_err(|e| e.to_string())?;
        let configure = ShardCommand::Configure { shard_id: shard, shard_count: params.shard_count };
        group.submit_shard(configure).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        // Every other initial member replicates the group as a learner (as a node added later
        // does), so it knows the leader and can take a voter's place.
        for (id, addr) in peers.iter().filter(|(id, _)| !voters.contains_key(id)) {
            let op = MembershipOp::AddLearner { node: *id, addr: addr.clone() };
            group.change_members(op).await.map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
