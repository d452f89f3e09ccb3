//! The typed Rust client of the public gRPC API (`node/proto/fetter.proto`).
//!
//! [`Client`] holds lazily connected channels to a list of nodes and fails over between them: a
//! call that fails because the node is unreachable (or answers `UNAVAILABLE`) is retried on the
//! next node, with a small backoff, until the call's time budget ([`Client::with_timeout`]) runs
//! out. Any other error is returned at once as a [`ClientError`].
//!
//! Retrying is safe for the whole flow API: `StartFlow` is idempotent, and every other mutation
//! carries a request id (a fresh UUID v4 per call, the same on each of its retries). The cluster
//! stores the first reply under it, so a retry of a call whose answer was lost (a node that
//! failed after applying it, a broken connection) changes nothing and answers that first reply —
//! a retried cancel answers success, not "already finished", and a retried
//! `restart --clear-effects` does not run the flow's effects a second time. A message sent
//! without an idempotency key is keyed by its request id, so a retry never appends it twice.
//!
//! **Straight to the leader.** Any node answers any call (it forwards a flow's proposals and
//! reads to its shard's leader), but a hop costs a round trip. The client therefore learns the
//! cluster's shard count, every shard's leader and the members' addresses from `ClusterStatus`
//! (placement is a pure function of the flow id: [`fetter_raft::placement::shard_of`]) and sends
//! each call about one flow to its shard's leader first. The map is refreshed in the background
//! when it is older than [`ROUTES_MAX_AGE`], when an answer names another leader, and when the
//! leader it named could not be reached (such an address is then left alone for a while: a
//! member's address may not be reachable from where the client runs). A wrong or stale map costs
//! nothing but the hop: the call goes on through the given nodes as before.
//! [`Client::without_routing`] turns it off.
//!
//! ```ignore
//! let client = fetter::Client::connect(["127.0.0.1:7001", "127.0.0.1:7002"])?;
//! client.start::<Greeter>("ada", &"Ada".to_string()).await?;
//! let greeting = client.await_result::<Greeter>("ada", Duration::from_secs(30)).await??;
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fetter_actors::{Flow, Message};
use fetter_raft::sync::{lock, read as read_lock, write as write_lock};
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::proto;
use crate::proto::fetter_client::FetterClient;

/// The default time budget of one call, retries included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the node waits for a flow's result when a wait gives no bound (the server's default).
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Bound on one attempt on one node (on top of a requested wait): a node that does not answer
/// within it (frozen, partitioned) is given up for the next one.
const ATTEMPT: Duration = Duration::from_secs(5);
/// Extra time one attempt of `AddNode` / `RemoveNode` may take: the node reconfigures every
/// group (a learner catching up included) before it answers, and a retry on another node while
/// the first still works would only race it.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Flows with long event logs can be large.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// A shard map older than this is refreshed (in the background; calls use it meanwhile).
pub const ROUTES_MAX_AGE: Duration = Duration::from_secs(2);
/// How long a leader address that could not be reached is not tried first again.
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);

/// What went wrong with a call: the gRPC status of the node's answer by kind (with the node's
/// message), or a local problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Malformed JSON, unknown flow type, payload over the size limit, bad ids, bad addresses.
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown flow instance or node id.
    #[error("{0}")]
    NotFound(String),
    /// The flow exists with another input.
    #[error("{0}")]
    AlreadyExists(String),
    /// The expected epoch is stale: someone else changed the flow (gRPC `ABORTED`).
    #[error("{0}")]
    ConcurrentModification(String),
    /// The operation needs a live flow, or a node cannot be removed now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No node could serve the call within the time budget (the message lists the nodes tried).
    #[error("{0}")]
    Unavailable(String),
    /// A wait for a flow's result ran out (the flow keeps running).
    #[error("{0}")]
    Timeout(String),
    /// A value could not be encoded to or decoded from JSON locally.
    #[error("{0}")]
    Json(String),
    /// Anything else (internal errors, unimplemented operations, …).
    #[error("{0}")]
    Other(String),
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        let message = describe(&status);
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => ClientError::InvalidArgument(message),
            Code::NotFound => ClientError::NotFound(message),
            Code::AlreadyExists => ClientError::AlreadyExists(message),
            Code::Aborted => ClientError::ConcurrentModification(message),
            Code::FailedPrecondition => ClientError::FailedPrecondition(message),
            Code::Unavailable => ClientError::Unavailable(message),
            Code::DeadlineExceeded => ClientError::Timeout(message),
            _ => ClientError::Other(message),
        }
    }
}

impl From<serde_json::Error> for ClientError {
    fn from(e: serde_json::Error) -> Self {
        ClientError::Json(e.to_string())
    }
}

/// The status's message (the code's description when it has none), with the local cause of a
/// transport failure.
fn describe(status: &Status) -> String {
    let mut message = if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    };
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// Whether a call that failed with `status` should be tried on another node: the node said it
/// cannot serve now, or the failure happened in the transport (connection refused or reset).
fn is_retryable(status: &Status) -> bool {
    if status.code() == Code::Unavailable {
        return true;
    }
    if !matches!(status.code(), Code::Unknown | Code::Internal | Code::Cancelled) {
        return false;
    }
    is_transport_error(status)
}

/// Whether `status` was made locally from a transport error (the node was not reached or the
/// connection broke) rather than sent by a node: statuses a node sent have no source.
fn is_transport_error(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if cause.is::<tonic::transport::Error>() || cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// How a finished flow did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowFailure {
    /// `failed` or `cancelled`.
    pub status: String,
    /// The error's stable kind, if any.
    pub error_kind: Option<String>,
    /// The error's message, if any.
    pub error: Option<String>,
}

impl fmt::Display for FlowFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the flow {}", self.status)?;
        if let Some(kind) = &self.error_kind {
            write!(f, " ({kind})")?;
        }
        if let Some(error) = &self.error {
            write!(f, ": {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FlowFailure {}

/// Whether a flow status is final.
fn is_finished(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// The outcome of a finished flow, its output decoded.
fn outcome<O: DeserializeOwned>(flow: &proto::Flow) -> Result<Result<O, FlowFailure>, ClientError> {
    if flow.status == "succeeded" {
        let json = flow.output_json.as_deref().unwrap_or("null");
        let output = serde_json::from_str(json).map_err(|e| {
            ClientError::Json(format!(
                "the output of flow {}/{} does not decode: {e}",
                flow.flow_type, flow.instance
            ))
        })?;
        Ok(Ok(output))
    } else {
        Ok(Err(FlowFailure {
            status: flow.status.clone(),
            error_kind: flow.error_kind.clone(),
            error: flow.error.clone(),
        }))
    }
}

/// A fresh request id for one call; [`Client::call`] sends the same request, id included, on
/// every retry.
fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A mutation of `flow_type/instance` under a fresh request id.
fn mutation(flow_type: &str, instance: &str, expected_epoch: Option<u64>) -> proto::MutationRequest {
    proto::MutationRequest {
        flow: Some(flow_ref(flow_type, instance)),
        expected_epoch,
        request_id: Some(new_request_id()),
    }
}

fn flow_ref(flow_type: &str, instance: &str) -> proto::FlowRef {
    proto::FlowRef { flow_type: flow_type.to_string(), instance: instance.to_string() }
}

struct Node {
    addr: String,
    channel: Channel,
}

struct Inner {
    nodes: Vec<Node>,
    /// The node the next call tries first (the last one that answered).
    preferred: AtomicUsize,
    /// Where each shard's leader is; `None` when routing is off.
    routing: Option<Routing>,
}

/// The client's map of the cluster, for sending a flow's calls to its shard's leader.
#[derive(Default)]
struct Routing {
    map: RwLock<Option<ShardMap>>,
    /// A refresh is under way (at most one at a time).
    refreshing: AtomicBool,
    /// Channels to members' addresses the client was not given.
    channels: Mutex<HashMap<String, Channel>>,
    /// Leader addresses that could not be reached, and when.
    unreachable: Mutex<HashMap<String, Instant>>,
}

/// Every shard's leader, as a node reported it.
struct ShardMap {
    shard_count: u32,
    /// The leader's address per shard, when there is one.
    leaders: Vec<Option<String>>,
    /// Members' addresses by id (to check a leader an answer names).
    addrs: HashMap<u64, String>,
    learned: Instant,
    /// Set when the map is known to be wrong: refreshed by the next call.
    stale: bool,
}

impl ShardMap {
    /// The address of the leader of the shard `flow_type/instance` is placed on, if known.
    fn leader_addr(&self, flow_type: &str, instance: &str) -> Option<&String> {
        let flow = fetter_raft::ids::FlowId::new(flow_type, instance);
        let shard = fetter_raft::placement::shard_of(&flow, self.shard_count).0 as usize;
        self.leaders.get(shard)?.as_ref()
    }
}

/// A gRPC client of the public API on `channel`.
fn grpc(channel: Channel) -> FetterClient<Channel> {
    FetterClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| ClientError::InvalidArgument(format!("{addr:?} is not a host:port address: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // Notice a node that stops answering (frozen, partitioned) during a call.
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(false))
}

/// A client of a fetter cluster: any node answers any request (forwarding to the shard's leader);
/// calls fail over between the given nodes. Cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("addrs", &self.addrs()).field("timeout", &self.timeout).finish()
    }
}

impl Client {
    /// A client of the nodes at `addrs` (`host:port` each). Connects lazily, so it succeeds
    /// while the nodes are down; fails only on an empty list or a malformed address. Must be
    /// called within a Tokio runtime.
    pub fn connect(addrs: impl IntoIterator<Item = impl Into<String>>) -> Result<Client, ClientError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClientError::Other("Client::connect must be called within a Tokio runtime".into()));
        }
        let mut nodes = Vec::new();
        for addr in addrs {
            let addr: String = addr.into();
            let addr = addr.trim().to_string();
            if addr.is_empty() {
                return Err(ClientError::InvalidArgument("an empty node address".into()));
            }
            nodes.push(Node { channel: endpoint(&addr)?.connect_lazy(), addr });
        }
        if nodes.is_empty() {
            return Err(ClientError::InvalidArgument("no node address given".into()));
        }
        Ok(Client {
            inner: Arc::new(Inner {
                nodes,
                preferred: AtomicUsize::new(0),
                routing: Some(Routing::default()),
            }),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same nodes without routing to shard leaders: every call goes to the given nodes,
    /// which forward (a new client: connections are not shared with this one).
    pub fn without_routing(self) -> Client {
        let nodes = self
            .inner
            .nodes
            .iter()
            .map(|n| Node { addr: n.addr.clone(), channel: n.channel.clone() })
            .collect();
        Client {
            inner: Arc::new(Inner { nodes, preferred: AtomicUsize::new(0), routing: None }),
            timeout: self.timeout,
        }
    }

    /// Whether the client knows every shard's leader (routing on and a map learned).
    pub fn knows_leaders(&self) -> bool {
        self.inner.routing.as_ref().is_some_and(|r| {
            read_lock(&r.map).as_ref().is_some_and(|m| !m.stale && m.leaders.iter().all(Option::is_some))
        })
    }

    /// Where to send a call about `flow_type/instance` first: its shard's leader, when the map
    /// names one that is reachable. Starts a refresh of the map when it is missing or old.
    fn leader_of(&self, flow_type: &str, instance: &str) -> Option<(String, Channel)> {
        let routing = self.inner.routing.as_ref()?;
        let addr = {
            let map = read_lock(&routing.map);
            let fresh = map.as_ref().is_some_and(|m| !m.stale && m.learned.elapsed() < ROUTES_MAX_AGE);
            let addr = map.as_ref().and_then(|m| m.leader_addr(flow_type, instance).cloned());
            drop(map);
            if !fresh {
                self.refresh_routes();
            }
            addr?
        };
        if lock(&routing.unreachable).get(&addr).is_some_and(|at| at.elapsed() < UNREACHABLE_FOR) {
            return None;
        }
        if let Some(node) = self.inner.nodes.iter().find(|n| n.addr == addr) {
            return Some((addr, node.channel.clone()));
        }
        let mut channels = lock(&routing.channels);
        if let Some(channel) = channels.get(&addr) {
            return Some((addr, channel.clone()));
        }
        let channel = endpoint(&addr).ok()?.connect_lazy();
        channels.insert(addr.clone(), channel.clone());
        Some((addr, channel))
    }

    /// Learns the shard map again, in the background (one refresh at a time).
    fn refresh_routes(&self) {
        let Some(routing) = self.inner.routing.as_ref() else { return };
        if routing.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let client = self.clone().with_timeout(ATTEMPT);
        tokio::spawn(async move {
            if let Ok(status) = client.cluster_status().await {
                let addrs: HashMap<u64, String> =
                    status.members.iter().map(|m| (m.id, m.addr.clone())).collect();
                let mut leaders = vec![None; status.shards.len()];
                for shard in &status.shards {
                    if let Some(slot) = leaders.get_mut(shard.id as usize) {
                        *slot = shard.leader.and_then(|l| addrs.get(&l).cloned());
                    }
                }
                let map = ShardMap {
                    shard_count: status.shards.len() as u32,
                    leaders,
                    addrs,
                    learned: Instant::now(),
                    stale: false,
                };
                if map.shard_count > 0 {
                    if let Some(routing) = client.inner.routing.as_ref() {
                        *write_lock(&routing.map) = Some(map);
                    }
                }
            }
            if let Some(routing) = client.inner.routing.as_ref() {
                routing.refreshing.store(false, Ordering::Release);
            }
        });
    }

    /// An answer about a flow named its shard's leader: if the map says otherwise, it is stale.
    fn note_leader(&self, flow_type: &str, instance: &str, leader: Option<u64>) {
        let (Some(routing), Some(leader)) = (self.inner.routing.as_ref(), leader) else { return };
        let mut map = write_lock(&routing.map);
        if let Some(m) = map.as_mut() {
            let named = m.addrs.get(&leader);
            if named.is_none() || m.leader_addr(flow_type, instance) != named {
                m.stale = true;
            }
        }
    }

    /// A leader's address did not answer: try the given nodes first for a while.
    fn leader_unreachable(&self, addr: &str) {
        if let Some(routing) = self.inner.routing.as_ref() {
            lock(&routing.unreachable).insert(addr.to_string(), Instant::now());
        }
        self.mark_routes_stale();
    }

    /// The map is known to be wrong: the next call about a flow refreshes it.
    fn mark_routes_stale(&self) {
        if let Some(routing) = self.inner.routing.as_ref() {
            if let Some(m) = write_lock(&routing.map).as_mut() {
                m.stale = true;
            }
        }
    }

    /// The same client with another time budget per call, retries included (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The time budget per call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The nodes' addresses.
    pub fn addrs(&self) -> Vec<String> {
        self.inner.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// Runs one RPC, failing over between the nodes. `wait` is how long the node itself may
    /// legitimately take (a wait for a result): it extends both the attempt and the budget.
    async fn call<Req, Resp, F, Fut>(&self, request: Req, wait: Duration, rpc: F) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(FetterClient<Channel>, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        self.call_via(None, request, wait, rpc).await
    }

    /// [`Client::call`] for a call about one flow: its shard's leader first (see the module
    /// documentation), then the given nodes.
    async fn call_flow<Req, Resp, F, Fut>(
        &self,
        flow: (&str, &str),
        request: Req,
        wait: Duration,
        rpc: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(FetterClient<Channel>, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let leader = self.leader_of(flow.0, flow.1);
        self.call_via(leader, request, wait, rpc).await
    }

    /// Runs one RPC: on `first` (a shard leader's address and channel) if given, then failing
    /// over between the given nodes, all within one time budget.
    async fn call_via<Req, Resp, F, Fut>(
        &self,
        first: Option<(String, Channel)>,
        request: Req,
        wait: Duration,
        rpc: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(FetterClient<Channel>, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let nodes = &self.inner.nodes;
        let budget = if wait.is_zero() { self.timeout } else { self.timeout.max(wait + ATTEMPT) };
        let deadline = tokio::time::Instant::now() + budget;
        if let Some((addr, channel)) = first {
            match tokio::time::timeout(ATTEMPT + wait, rpc(grpc(channel), request.clone())).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if !is_retryable(&status) => return Err(status.into()),
                // It answered, unavailable (an election): the map is old; on through the nodes.
                Ok(Err(status)) if !is_transport_error(&status) => self.mark_routes_stale(),
                // Not reachable from here, or not answering: on through the given nodes.
                Ok(Err(_)) | Err(_) => self.leader_unreachable(&addr),
            }
        }
        let first = self.inner.preferred.load(Ordering::Relaxed);
        let mut backoff = BACKOFF_MIN;
        let mut tried: Vec<&str> = Vec::new();
        let mut last = String::from("no attempt made");
        for attempt in 0.. {
            let i = (first + attempt) % nodes.len();
            let node = &nodes[i];
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let per_attempt = (deadline - now).min(ATTEMPT + wait);
            match tokio::time::timeout(per_attempt, rpc(grpc(node.channel.clone()), request.clone())).await {
                Ok(Ok(response)) => {
                    self.inner.preferred.store(i, Ordering::Relaxed);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) if is_retryable(&status) => {
                    last = format!("{}: {}", node.addr, describe(&status))
                }
                Ok(Err(status)) => return Err(status.into()),
                Err(_) => last = format!("{}: no answer within {per_attempt:?}", node.addr),
            }
            if !tried.contains(&node.addr.as_str()) {
                tried.push(&node.addr);
            }
            // Later calls start with the next node (unless another call found a better one).
            let _ = self.inner.preferred.compare_exchange(
                i,
                (i + 1) % nodes.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if tokio::time::Instant::now() + backoff >= deadline {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        Err(ClientError::Unavailable(format!(
            "no node could serve the request within {budget:?} (tried {}); last error: {last}",
            if tried.is_empty() { "none".to_string() } else { tried.join(", ") }
        )))
    }

    // ---- raw RPCs ----

    /// Starts flow `flow_type/instance` with `input_json`; idempotent (the same input again is
    /// acknowledged with `created: false`). With `wait`, returns once the flow has finished or
    /// `timeout` (default 30 s) has passed (then [`ClientError::Timeout`]; the flow keeps running).
    pub async fn start_flow(
        &self,
        flow_type: &str,
        instance: &str,
        input_json: &str,
        wait: bool,
        timeout: Option<Duration>,
    ) -> Result<proto::StartFlowResponse, ClientError> {
        let request = proto::StartFlowRequest {
            flow: Some(flow_ref(flow_type, instance)),
            input_json: input_json.to_string(),
            wait,
            timeout_ms: timeout.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
        };
        let wait_for = if wait { timeout.unwrap_or(DEFAULT_WAIT) } else { Duration::ZERO };
        let response =
            self.call_flow((flow_type, instance), request, wait_for, |mut c, r| async move {
                c.start_flow(r).await
            })
            .await?;
        if let Some(flow) = &response.flow {
            self.note_leader(flow_type, instance, flow.leader_node);
        }
        Ok(response)
    }

    /// Appends message `message_type` with `payload_json` to the flow's event log, once per
    /// idempotency key (without one, once per call: the call's request id is its key).
    /// Returns the message's position in the log.
    pub async fn send_message(
        &self,
        flow_type: &str,
        instance: &str,
        message_type: &str,
        payload_json: &str,
        idempotency_key: Option<String>,
    ) -> Result<u64, ClientError> {
        let request = proto::SendMessageRequest {
            flow: Some(flow_ref(flow_type, instance)),
            message_type: message_type.to_string(),
            payload_json: payload_json.to_string(),
            idempotency_key,
            request_id: Some(new_request_id()),
        };
        let response = self
            .call_flow((flow_type, instance), request, Duration::ZERO, |mut c, r| async move {
                c.send_message(r).await
            })
            .await?;
        Ok(response.seq)
    }

    /// The flow `flow_type/instance` with its journal.
    pub async fn get_flow(&self, flow_type: &str, instance: &str) -> Result<proto::Flow, ClientError> {
        let request = flow_ref(flow_type, instance);
        let flow = self
            .call_flow((flow_type, instance), request, Duration::ZERO, |mut c, r| async move {
                c.get_flow(r).await
            })
            .await?;
        self.note_leader(flow_type, instance, flow.leader_node);
        Ok(flow)
    }

    /// One page of flows, optionally of one type and one status (`limit` 0: 100). Pass the
    /// response's `next` as `cursor` for the next page.
    pub async fn list_flows(
        &self,
        flow_type: Option<&str>,
        status: Option<&str>,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<proto::ListFlowsResponse, ClientError> {
        let request = proto::ListFlowsRequest {
            flow_type: flow_type.map(str::to_string),
            status: status.map(str::to_string),
            limit,
            cursor: cursor.map(str::to_string),
        };
        self.call(request, Duration::ZERO, |mut c, r| async move { c.list_flows(r).await }).await
    }

    /// One page of dead letters (messages from flows that their target could not take), of one
    /// target flow or of all (`limit` 0: 100). Pass the response's `next` as `cursor` for the
    /// next page.
    pub async fn list_dead_letters(
        &self,
        flow: Option<(&str, &str)>,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<proto::ListDeadLettersResponse, ClientError> {
        let request = proto::ListDeadLettersRequest {
            flow: flow.map(|(flow_type, instance)| flow_ref(flow_type, instance)),
            limit,
            cursor: cursor.map(str::to_string),
        };
        self.call(request, Duration::ZERO, |mut c, r| async move { c.list_dead_letters(r).await }).await
    }

    /// Runs the flow again (a finished one too), optionally with a new input and forgetting its
    /// recorded effects.
    pub async fn restart(
        &self,
        flow_type: &str,
        instance: &str,
        input_json: Option<&str>,
        clear_effects: bool,
        expected_epoch: Option<u64>,
    ) -> Result<proto::MutationResponse, ClientError> {
        let request = proto::RestartRequest {
            flow: Some(flow_ref(flow_type, instance)),
            expected_epoch,
            input_json: input_json.map(str::to_string),
            clear_effects,
            request_id: Some(new_request_id()),
        };
        self.call_flow((flow_type, instance), request, Duration::ZERO, |mut c, r| async move {
            c.restart(r).await
        })
        .await
    }

    /// Cancels a live flow.
    pub async fn cancel(
        &self,
        flow_type: &str,
        instance: &str,
        expected_epoch: Option<u64>,
    ) -> Result<proto::MutationResponse, ClientError> {
        let request = mutation(flow_type, instance, expected_epoch);
        self.call_flow(
            (flow_type, instance),
            request,
            Duration::ZERO,
            |mut c, r| async move { c.cancel(r).await },
        )
        .await
    }

    /// Finishes a live flow as succeeded with `output_json`.
    pub async fn mark_succeeded(
        &self,
        flow_type: &str,
        instance: &str,
        output_json: &str,
        expected_epoch: Option<u64>,
    ) -> Result<proto::MutationResponse, ClientError> {
        let request = proto::MarkSucceededRequest {
            flow: Some(flow_ref(flow_type, instance)),
            expected_epoch,
            output_json: output_json.to_string(),
            request_id: Some(new_request_id()),
        };
        self.call_flow((flow_type, instance), request, Duration::ZERO, |mut c, r| async move {
            c.mark_succeeded(r).await
        })
        .await
    }

    /// Finishes a live flow as failed for `reason`.
    pub async fn mark_failed(
        &self,
        flow_type: &str,
        instance: &str,
        reason: &str,
        expected_epoch: Option<u64>,
    ) -> Result<proto::MutationResponse, ClientError> {
        let request = proto::MarkFailedRequest {
            flow: Some(flow_ref(flow_type, instance)),
            expected_epoch,
            reason: reason.to_string(),
            request_id: Some(new_request_id()),
        };
        self.call_flow((flow_type, instance), request, Duration::ZERO, |mut c, r| async move {
            c.mark_failed(r).await
        })
        .await
    }

    /// Deletes the flow and its journal.
    pub async fn delete(
        &self,
        flow_type: &str,
        instance: &str,
        expected_epoch: Option<u64>,
    ) -> Result<proto::MutationResponse, ClientError> {
        let request = mutation(flow_type, instance, expected_epoch);
        self.call_flow(
            (flow_type, instance),
            request,
            Duration::ZERO,
            |mut c, r| async move { c.delete(r).await },
        )
        .await
    }

    /// Records `value_json` as the value effect `effect_id` returns on replay.
    pub async fn set_effect(
        &self,
        flow_type: &str,
        instance: &str,
        effect_id: &str,
        value_json: &str,
        expected_epoch: Option<u64>,
    ) -> Result<proto::MutationResponse, ClientError> {
        let request = proto::SetEffectRequest {
            flow: Some(flow_ref(flow_type, instance)),
            expected_epoch,
            effect_id: effect_id.to_string(),
            value_json: value_json.to_string(),
            request_id: Some(new_request_id()),
        };
        self.call_flow((flow_type, instance), request, Duration::ZERO, |mut c, r| async move {
            c.set_effect(r).await
        })
        .await
    }

    /// Forgets effect `effect_id`, so a replay runs it again.
    pub async fn remove_effect(
        &self,
        flow_type: &str,
        instance: &str,
        effect_id: &str,
        expected_epoch: Option<u64>,
    ) -> Result<proto::MutationResponse, ClientError> {
        let request = proto::RemoveEffectRequest {
            flow: Some(flow_ref(flow_type, instance)),
            expected_epoch,
            effect_id: effect_id.to_string(),
            request_id: Some(new_request_id()),
        };
        self.call_flow((flow_type, instance), request, Duration::ZERO, |mut c, r| async move {
            c.remove_effect(r).await
        })
        .await
    }

    /// The cluster's members and every shard's leader and replicas.
    pub async fn cluster_status(&self) -> Result<proto::ClusterStatusResponse, ClientError> {
        let request = proto::ClusterStatusRequest {};
        self.call(request, Duration::ZERO, |mut c, r| async move { c.cluster_status(r).await }).await
    }

    /// The cluster's parameters.
    pub async fn cluster_config(&self) -> Result<proto::ClusterConfig, ClientError> {
        let request = proto::GetClusterConfigRequest {};
        self.call(request, Duration::ZERO, |mut c, r| async move { c.get_cluster_config(r).await }).await
    }

    /// Changes the cluster's parameters (those given); returns them as they are now. Every node
    /// follows within a second.
    pub async fn set_cluster_config(
        &self,
        retention: Option<Duration>,
        max_payload_bytes: Option<u64>,
    ) -> Result<proto::ClusterConfig, ClientError> {
        let request = proto::SetClusterConfigRequest {
            retention_ms: retention.map(|r| u64::try_from(r.as_millis()).unwrap_or(u64::MAX)),
            max_payload_bytes,
        };
        self.call(request, Duration::ZERO, |mut c, r| async move { c.set_cluster_config(r).await }).await
    }

    /// Adds node `id` at `addr` to the cluster.
    pub async fn add_node(&self, id: u64, addr: &str) -> Result<(), ClientError> {
        let request = proto::AddNodeRequest { id, addr: addr.to_string() };
        self.call(request, MEMBERSHIP_WAIT, |mut c, r| async move { c.add_node(r).await }).await?;
        Ok(())
    }

    /// Removes node `id` from the cluster.
    pub async fn remove_node(&self, id: u64) -> Result<(), ClientError> {
        let request = proto::RemoveNodeRequest { id };
        self.call(request, MEMBERSHIP_WAIT, |mut c, r| async move { c.remove_node(r).await }).await?;
        Ok(())
    }

    /// A digest of the answering node's replica of `shard` (not forwarded: use a client of one
    /// node to ask that node).
    pub async fn shard_digest(&self, shard: u32) -> Result<proto::ShardDigestResponse, ClientError> {
        let request = proto::ShardDigestRequest { shard };
        self.call(request, Duration::ZERO, |mut c, r| async move { c.shard_digest(r).await }).await
    }

    /// Who the answering node is and what it knows of its cluster.
    pub async fn node_info(&self) -> Result<proto::NodeInfoResponse, ClientError> {
        let request = proto::NodeInfoRequest {};
        self.call(request, Duration::ZERO, |mut c, r| async move { c.node_info(r).await }).await
    }

    // ---- typed helpers ----

    /// Starts flow `F` as `instance` with `input`; `true` if it was created, `false` if it
    /// already existed with this input.
    pub async fn start<F: Flow>(&self, instance: &str, input: &F::Input) -> Result<bool, ClientError> {
        let input = serde_json::to_string(input)?;
        Ok(self.start_flow(F::TYPE, instance, &input, false, None).await?.created)
    }

    /// Starts flow `F` as `instance` (or finds it started with this input) and waits up to
    /// `timeout` for its result: its output, or how it failed. [`ClientError::Timeout`] when it
    /// has not finished by then (it keeps running).
    pub async fn run<F: Flow>(
        &self,
        instance: &str,
        input: &F::Input,
        timeout: Duration,
    ) -> Result<Result<F::Output, FlowFailure>, ClientError> {
        let input = serde_json::to_string(input)?;
        let response = self.start_flow(F::TYPE, instance, &input, true, Some(timeout)).await?;
        let flow = response
            .flow
            .ok_or_else(|| ClientError::Other(format!("the node sent no flow for {}/{instance}", F::TYPE)))?;
        if !is_finished(&flow.status) {
            return Err(ClientError::Timeout(format!(
                "flow {}/{instance} has not finished within {timeout:?} (it is {})",
                F::TYPE,
                flow.status
            )));
        }
        outcome(&flow)
    }

    /// Waits up to `timeout` for flow `F` `instance` to finish (polling it): its output, or how
    /// it failed. [`ClientError::Timeout`] when it has not finished by then.
    pub async fn await_result<F: Flow>(
        &self,
        instance: &str,
        timeout: Duration,
    ) -> Result<Result<F::Output, FlowFailure>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = |status: &str| {
            ClientError::Timeout(format!(
                "flow {}/{instance} has not finished within {timeout:?} ({status})",
                F::TYPE
            ))
        };
        let mut pause = Duration::from_millis(50);
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let flow = tokio::time::timeout(remaining, self.get_flow(F::TYPE, instance))
                .await
                .map_err(|_| timed_out("no answer"))??;
            if is_finished(&flow.status) {
                return outcome(&flow);
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(timed_out(&format!("it is {}", flow.status)));
            }
            tokio::time::sleep(pause).await;
            pause = Duration::from_millis(100);
        }
    }

    /// Sends `message` to flow `flow_type/instance`, once per `key` (a fresh key when `None`).
    /// Returns its position in the flow's event log.
    pub async fn send<M: Message>(
        &self,
        flow_type: &str,
        instance: &str,
        message: &M,
        key: Option<String>,
    ) -> Result<u64, ClientError> {
        let payload = serde_json::to_string(message)?;
        self.send_message(flow_type, instance, M::NAME, &payload, key).await
    }

    /// The flow `flow_type/instance` (the same as [`Client::get_flow`]).
    pub async fn get(&self, flow_type: &str, instance: &str) -> Result<proto::Flow, ClientError> {
        self.get_flow(flow_type, instance).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_errors_by_code_keeping_the_message() {
        let cases: Vec<(Status, ClientError)> = vec![
            (Status::invalid_argument("bad json"), ClientError::InvalidArgument("bad json".into())),
            (Status::not_found("flow a/b not found"), ClientError::NotFound("flow a/b not found".into())),
            (Status::already_exists("exists"), ClientError::AlreadyExists("exists".into())),
            (Status::aborted("stale epoch"), ClientError::ConcurrentModification("stale epoch".into())),
            (Status::failed_precondition("finished"), ClientError::FailedPrecondition("finished".into())),
            (Status::unavailable("no leader"), ClientError::Unavailable("no leader".into())),
            (Status::deadline_exceeded("not finished"), ClientError::Timeout("not finished".into())),
            (Status::internal("boom"), ClientError::Other("boom".into())),
            (Status::unimplemented("not built yet"), ClientError::Other("not built yet".into())),
            (
                Status::new(Code::PermissionDenied, ""),
                ClientError::Other(Code::PermissionDenied.description().into()),
            ),
        ];
        for (status, expected) in cases {
            assert_eq!(ClientError::from(status), expected);
        }
        assert_eq!(
            ClientError::from(Status::not_found("flow a/b not found")).to_string(),
            "flow a/b not found"
        );
    }

    #[test]
    fn only_unavailability_and_transport_failures_are_retried() {
        assert!(is_retryable(&Status::unavailable("the node is starting")));
        assert!(!is_retryable(&Status::internal("boom")));
        assert!(!is_retryable(&Status::deadline_exceeded("wait ran out")));
        assert!(!is_retryable(&Status::not_found("nope")));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let local = Status::from_error(Box::new(io));
        assert_eq!(local.code(), Code::Unknown);
        assert!(is_retryable(&local));
        assert!(describe(&local).contains("connection reset"));
    }

    #[test]
    fn failed_and_cancelled_flows_become_flow_failures() {
        let mut flow = proto::Flow {
            flow_type: "order".into(),
            instance: "o-1".into(),
            status: "succeeded".into(),
            output_json: Some("42".into()),
            ..Default::default()
        };
        assert_eq!(outcome::<u32>(&flow), Ok(Ok(42)));
        assert!(matches!(outcome::<String>(&flow), Err(ClientError::Json(_))));
        flow.status = "failed".into();
        flow.error_kind = Some("boom".into());
        flow.error = Some("it broke".into());
        let failure = FlowFailure {
            status: "failed".into(),
            error_kind: Some("boom".into()),
            error: Some("it broke".into()),
        };
        assert_eq!(failure.to_string(), "the flow failed (boom): it broke");
        assert_eq!(outcome::<u32>(&flow), Ok(Err(failure)));
        let unit = proto::Flow { status: "succeeded".into(), ..Default::default() };
        assert_eq!(outcome::<()>(&unit), Ok(Ok(())));
    }

    #[tokio::test]
    async fn connect_checks_the_addresses() {
        assert!(matches!(Client::connect(Vec::<String>::new()), Err(ClientError::InvalidArgument(_))));
        assert!(matches!(Client::connect(["bad host:1"]), Err(ClientError::InvalidArgument(_))));
        let client =
            Client::connect(["127.0.0.1:1", "127.0.0.1:2"]).map(|c| c.with_timeout(Duration::from_secs(2)));
        assert!(client.is_ok_and(|c| c.addrs().len() == 2 && c.timeout() == Duration::from_secs(2)));
    }

    #[tokio::test]
    async fn unreachable_nodes_give_unavailable_naming_them() {
        // Port 1 on loopback: connection refused.
        let Ok(client) = Client::connect(["127.0.0.1:1", "127.0.0.1:2"]) else { panic!("connect") };
        let client = client.with_timeout(Duration::from_millis(600));
        let started = std::time::Instant::now();
        let err = client.get_flow("order", "o-1").await.err();
        assert!(started.elapsed() < Duration::from_secs(3));
        match err {
            Some(ClientError::Unavailable(msg)) => {
                assert!(msg.contains("127.0.0.1:1") && msg.contains("127.0.0.1:2"), "{msg}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn connect_outside_a_runtime_is_an_error() {
        assert!(matches!(Client::connect(["127.0.0.1:1"]), Err(ClientError::Other(_))));
    }
}
