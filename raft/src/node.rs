//! One process's part of the cluster: its sled store, its Raft groups, and the tonic server
//! that carries their RPCs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::SnapshotPolicy;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::handle::GroupHandle;
use crate::ids::{ClusterId, GroupId, Incarnation, NodeId};
use crate::storage::{self, Store};
use crate::sync::lock;
use crate::transport::{GroupRegistry, Identity, NetworkFactory, Peers, RaftService};
use crate::types::Raft;

/// Raft timing: configuration, not code (DESIGN.md §3 "Timeouts").
#[derive(Debug, Clone)]
pub struct Timing {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max_ms: u64,
    /// Bound on one proposal, from queueing to applied reply.
    pub propose_timeout_ms: u64,
    /// How long a planned leadership hand-over waits for the at-most-once work in flight on the
    /// group to finish and commit its outcome (new at-most-once work is refused meanwhile).
    pub handover_drain_ms: u64,
}

impl Timing {
    /// Fast failover: heartbeat 100 ms, election 300–600 ms. Benchmarks use this.
    ///
    /// openraft 0.9 lets a follower that heard from a leader stand for election only after the
    /// leader lease (the election timeout maximum) *plus* a randomized election timeout: a leader
    /// that dies is replaced after 0.9–1.2 s here. openraft also bounds every AppendEntries call
    /// and every leadership round by the heartbeat interval, which a loaded 2-core machine
    /// sometimes misses at 100 ms (a missed leadership round is repeated, see
    /// `GroupHandle::confirm_leadership`). Measured with `shop bench --nodes 3 --kill 5`: a 200 ms
    /// heartbeat removed those misses but made failover ~200 ms slower (p50 1.24 s vs 1.01 s)
    /// at the same throughput.
    pub fn production() -> Timing {
        Timing {
            heartbeat_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            propose_timeout_ms: 5_000,
            handover_drain_ms: 5_000,
        }
    }

    /// For tests on a loaded 2-core machine: elections only after ≥ 1 s of silence.
    pub fn relaxed() -> Timing {
        Timing {
            heartbeat_ms: 200,
            election_timeout_min_ms: 1_000,
            election_timeout_max_ms: 2_000,
            propose_timeout_ms: 10_000,
            handover_drain_ms: 5_000,
        }
    }
}

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// Where to listen for Raft RPCs (port 0 picks a free port; see [`RaftNode::addr`]).
    pub listen: SocketAddr,
    /// The sled directory.
    pub data_dir: PathBuf,
    /// The cluster this node belongs to; `None` for a new node of a cluster being created, which
    /// learns it later ([`RaftNode::learn_cluster_id`]).
    pub cluster_id: Option<ClusterId>,
    /// Raft timing.
    pub timing: Timing,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot (for slow followers).
    pub entries_kept_after_snapshot: u64,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// The local address of every connection this node opens to other nodes (`None`: the
    /// system's choice). A node that listens on one of several addresses of its host binds its
    /// outgoing connections to it too, so that peers (and firewall rules) see one address per
    /// node.
    pub source_ip: Option<std::net::IpAddr>,
}

/// Entries after which a group snapshots its state, unless configured otherwise.
pub const DEFAULT_SNAPSHOT_AFTER_ENTRIES: u64 = 10_000;

impl NodeConfig {
    /// A config with production timing and snapshot policy.
    pub fn new(node_id: NodeId, listen: SocketAddr, data_dir: PathBuf, cluster_id: ClusterId) -> Self {
        NodeConfig {
            node_id,
            listen,
            data_dir,
            cluster_id: Some(cluster_id),
            timing: Timing::production(),
            snapshot_after_entries: DEFAULT_SNAPSHOT_AFTER_ENTRIES,
            entries_kept_after_snapshot: 1_000,
            cache_bytes: storage::DEFAULT_CACHE_BYTES,
            source_ip: None,
        }
    }
}

/// Why a node could not start or a group could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] storage::Error),
    /// The data directory's identity record cannot be read.
    #[error("data directory {dir} holds an unreadable node identity ({reason})")]
    UnreadableIdentity {
        /// The directory.
        dir: String,
        /// Why.
        reason: String,
    },
    /// The data directory belongs to another node.
    #[error("data directory {dir} is node {stored}'s, but this node was started as --id {given}")]
    WrongNode {
        /// The directory.
        dir: String,
        /// The node id it holds.
        stored: u64,
        /// The node id this node was started as.
        given: u64,
    },
    /// The data directory belongs to another cluster.
    #[error("data directory {dir} belongs to cluster {stored} node {node}, not to cluster {given}")]
    WrongCluster {
        /// The directory.
        dir: String,
        /// The node id.
        node: u64,
        /// The cluster id it holds.
        stored: ClusterId,
        /// The cluster id it was given.
        given: ClusterId,
    },
    /// The identity record could not be made durable.
    #[error("cannot make the node identity durable: {reason}")]
    Checkpoint {
        /// Why.
        reason: String,
    },
    /// The node's identity record could not be encoded.
    #[error("cannot encode the node identity: {0}")]
    Codec(#[from] crate::codec::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// openraft refused the configuration or failed to start a group.
    #[error("cannot start Raft for group {group}: {reason}")]
    Raft {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredIdentity {
    node_id: NodeId,
    cluster_id: ClusterId,
    incarnation: Incarnation,
}

/// A node: store, groups and server. Dropping it does not stop it; call [`RaftNode::shutdown`].
pub struct RaftNode {
    config: NodeConfig,
    identity: Identity,
    addr: SocketAddr,
    store: Store,
    groups: GroupRegistry,
    handles: Mutex<HashMap<GroupId, GroupHandle>>,
    peers: Peers,
    raft_config: Arc<openraft::Config>,
    server_stop: Mutex<Option<oneshot::Sender<()>>>,
    server: Mutex<Option<JoinHandle<()>>>,
    /// Serializes learning the cluster id (its row is written before it is used).
    learning: tokio::sync::Mutex<()>,
}

impl RaftNode {
    /// Opens the store, checks the directory's identity and starts serving Raft RPCs.
    pub async fn start(config: NodeConfig) -> Result<Arc<RaftNode>, Error> {
        RaftNode::start_with(config, None).await
    }

    /// [`RaftNode::start`], serving `extra` gRPC services on the same port (one port per node
    /// for everything: the public API, forwarding, Raft).
    pub async fn start_with(
        config: NodeConfig,
        extra: Option<tonic::service::Routes>,
    ) -> Result<Arc<RaftNode>, Error> {
        let store = Store::open_with_cache(&config.data_dir, config.cache_bytes)?;
        let identity = load_identity(&store, &config).await?;
        let raft_config = openraft::Config {
            cluster_name: identity.cluster_id().map_or_else(|| "fetter".to_string(), |c| c.0.clone()),
            heartbeat_interval: config.timing.heartbeat_ms,
            election_timeout_min: config.timing.election_timeout_min_ms,
            election_timeout_max: config.timing.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_after_entries),
            max_in_snapshot_log_to_keep: config.entries_kept_after_snapshot,
            // Purge in batches, but never wait for more entries than a snapshot interval.
            purge_batch_size: config.snapshot_after_entries.clamp(1, 256),
            max_payload_entries: 64,
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Raft { group: GroupId::META, reason: e.to_string() })?;

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Listen { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| Error::Listen { addr: config.listen, source })?;
        let groups = GroupRegistry::default();
        groups.set_lease(Duration::from_millis(config.timing.election_timeout_max_ms));
        let service = RaftService::new(identity.clone(), groups.clone()).into_server();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let node_id = config.node_id;
        let server = tokio::spawn(async move {
            let routes = match extra {
                Some(routes) => routes.add_service(service),
                None => tonic::service::Routes::new(service),
            };
            let result = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(node_id = node_id.0, error = %e, "raft transport server failed");
            }
        });
        tracing::info!(node_id = node_id.0, %addr, incarnation = %identity.incarnation, "raft node started");
        Ok(Arc::new(RaftNode {
            peers: Peers::new(identity.clone()).with_source_ip(config.source_ip),
            identity,
            addr,
            store,
            groups,
            handles: Mutex::new(HashMap::new()),
            raft_config: Arc::new(raft_config),
            server_stop: Mutex::new(Some(stop_tx)),
            server: Mutex::new(Some(server)),
            learning: tokio::sync::Mutex::new(()),
            config,
        }))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.config.node_id
    }

    /// The address the Raft service listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Who this node is on the wire.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The cluster this node belongs to (`None` until it learns it).
    pub fn cluster_id(&self) -> Option<ClusterId> {
        self.identity.cluster_id().cloned()
    }

    /// Records that this node belongs to `cluster_id`, durably before any request carries it or
    /// is accepted with it. Learning the id already known does nothing; another one is refused.
    pub async fn learn_cluster_id(&self, cluster_id: &ClusterId) -> Result<(), Error> {
        let _one_at_a_time = self.learning.lock().await;
        let dir = self.config.data_dir.display().to_string();
        match self.identity.cluster_id() {
            Some(known) if known == cluster_id => return Ok(()),
            Some(known) => {
                return Err(Error::WrongCluster {
                    dir,
                    node: self.id().0,
                    stored: known.clone(),
                    given: cluster_id.clone(),
                })
            }
            None => {}
        }
        let stored = StoredIdentity {
            node_id: self.id(),
            cluster_id: cluster_id.clone(),
            incarnation: self.identity.incarnation,
        };
        write_identity(&self.store, &stored).await?;
        self.identity.learn(cluster_id.clone());
        tracing::info!(node_id = self.id().0, cluster = %cluster_id, "cluster id learned");
        Ok(())
    }

    /// Records the incarnation of every member as group 0 lists them: the transport refuses a
    /// request from one of these ids that carries another incarnation.
    pub fn set_member_incarnations(&self, members: HashMap<NodeId, Incarnation>) {
        self.groups.set_incarnations(members);
    }

    /// The node's store (fsync counter, identity rows).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The node's shared peer connections.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Opens `group` on this node (creating its storage if new) and starts its Raft instance.
    /// Opening a group twice returns the same handle.
    pub async fn open_group(&self, group: GroupId) -> Result<GroupHandle, Error> {
        if let Some(h) = self.group(group) {
            return Ok(h);
        }
        let (log, sm) = self.store.group(group)?;
        let probe = log.clone();
        let reader = sm.reader();
        let actions = sm.actions();
        let network = NetworkFactory::new(self.peers.clone(), group);
        let starting = sm.starting();
        let raft = Raft::new(self.config.node_id.0, self.raft_config.clone(), network, log, sm)
            .await
            .map_err(|e| Error::Raft { group, reason: e.to_string() })?;
        starting.started();
        self.groups.insert(group, raft.clone(), probe);
        let handle = GroupHandle::start(
            group,
            raft,
            reader,
            actions,
            self.peers.clone(),
            Duration::from_millis(self.config.timing.propose_timeout_ms),
            Duration::from_millis(self.config.timing.handover_drain_ms),
        );
        let mut handles = lock(&self.handles);
        let handle = handles.entry(group).or_insert(handle).clone();
        self.groups.insert_handle(group, handle.clone());
        Ok(handle)
    }

    /// Stops `group` on this node and deletes its log and state: the node no longer hosts it
    /// (its replica has moved to another node). Calls for it are refused from then on, as for
    /// any group the node does not host; opening it again starts from an empty log.
    pub async fn drop_group(&self, group: GroupId) -> Result<(), Error> {
        let handle = lock(&self.handles).remove(&group);
        self.groups.remove(group);
        if let Some(h) = handle {
            if let Err(e) = h.raft().shutdown().await {
                tracing::warn!(group = %group, error = %e, "raft shutdown failed before dropping the group");
            }
        }
        self.store.drop_group(group).await?;
        Ok(())
    }

    /// The handle of an open group.
    pub fn group(&self, group: GroupId) -> Option<GroupHandle> {
        lock(&self.handles).get(&group).cloned()
    }

    /// Every open group.
    pub fn groups(&self) -> Vec<GroupHandle> {
        lock(&self.handles).values().cloned().collect()
    }

    /// Stops every group and the server, and flushes the store.
    pub async fn shutdown(&self) {
        let handles: Vec<GroupHandle> = lock(&self.handles).drain().map(|(_, h)| h).collect();
        for h in handles {
            self.groups.remove(h.group());
            if let Err(e) = h.raft().shutdown().await {
                tracing::warn!(group = %h.group(), error = %e, "raft shutdown failed");
            }
        }
        if let Some(stop) = lock(&self.server_stop).take() {
            let _ = stop.send(());
        }
        // The server stops taking calls at once and lets those in flight finish, for a while: a
        // call that cannot finish (its proposal needs a majority this node no longer reaches, a
        // client waits for a flow) must not keep the process from exiting.
        let server = lock(&self.server).take();
        if let Some(mut server) = server {
            if tokio::time::timeout(SERVER_DRAIN, &mut server).await.is_err() {
                tracing::warn!(
                    drain = ?SERVER_DRAIN,
                    "calls in flight did not finish in time after the stop; dropping them"
                );
                server.abort();
                let _ = server.await;
            }
        }
        if let Err(e) = self.store.checkpoint().await {
            tracing::warn!(error = %e, "final checkpoint failed");
        }
    }
}

/// How long a stopping node's server lets the calls in flight finish before it drops them.
pub const SERVER_DRAIN: Duration = Duration::from_secs(2);

/// The cluster id stored while a node does not know it yet (an identity record's encoding has
/// no optional field, and directories written before it was random hold a non-empty one).
const UNKNOWN_CLUSTER: &str = "";

/// Writes the identity record and waits until it is durable.
async fn write_identity(store: &Store, identity: &StoredIdentity) -> Result<(), Error> {
    let tree = store.db().open_tree("node").map_err(storage::Error::from)?;
    tree.insert("identity", crate::codec::encode(identity)?).map_err(storage::Error::from)?;
    store.checkpoint().await.map_err(|reason| Error::Checkpoint { reason })?;
    Ok(())
}

/// Reads the directory's identity, or writes a new one (with a fresh incarnation) for a new
/// directory. A directory of another node or cluster is refused; a directory that does not know
/// its cluster yet takes the one given, if any.
async fn load_identity(store: &Store, config: &NodeConfig) -> Result<Identity, Error> {
    let tree = store.db().open_tree("node").map_err(storage::Error::from)?;
    let dir = config.data_dir.display().to_string();
    let stored = tree.get("identity").map_err(storage::Error::from)?;
    let identity = match stored {
        Some(bytes) => {
            let mut stored: StoredIdentity = crate::codec::decode(&bytes)
                .map_err(|e| Error::UnreadableIdentity { dir: dir.clone(), reason: e.to_string() })?;
            if stored.node_id != config.node_id {
                return Err(Error::WrongNode { dir, stored: stored.node_id.0, given: config.node_id.0 });
            }
            match &config.cluster_id {
                Some(given) if stored.cluster_id.0 == UNKNOWN_CLUSTER => {
                    stored.cluster_id = given.clone();
                    write_identity(store, &stored).await?;
                }
                Some(given) if *given != stored.cluster_id => {
                    return Err(Error::WrongCluster {
                        dir,
                        node: stored.node_id.0,
                        stored: stored.cluster_id,
                        given: given.clone(),
                    });
                }
                _ => {}
            }
            stored
        }
        None => {
            let stored = StoredIdentity {
                node_id: config.node_id,
                cluster_id: config.cluster_id.clone().unwrap_or_else(|| ClusterId(UNKNOWN_CLUSTER.into())),
                incarnation: Incarnation(rand::random()),
            };
            // Durable before the node says anything to anyone under this identity.
            write_identity(store, &stored).await?;
            stored
        }
    };
    let cluster_id = Some(identity.cluster_id).filter(|c| c.0 != UNKNOWN_CLUSTER);
    Ok(Identity::new(identity.node_id, identity.incarnation, cluster_id))
}
