//! The sending side: openraft's network factory over lazily connected, shared tonic channels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::{Channel, Endpoint};

use super::proto::raft_response::Result as ProtoResult;
use super::proto::raft_transport_client::RaftTransportClient;
use super::proto::{RaftBatch, RaftRequest, RpcKind};
use super::{
    Identity, MAX_APPEND_BYTES, MAX_BATCH_BYTES, MAX_BATCH_REQUESTS, MAX_MESSAGE_BYTES, SOLO_REQUEST_BYTES,
};
use crate::codec;
use crate::ids::GroupId;
use crate::sync::lock;
use crate::types::TypeConfig;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Bound on requests waiting for one peer's batcher.
const MUX_QUEUE: usize = 4096;
/// Bound on batches in flight to one peer.
const MUX_IN_FLIGHT: usize = 2;
/// Bound on large requests (each in a call of its own) in flight from this node.
const LARGE_IN_FLIGHT: usize = 8;

/// A request waiting to be sent in the next batch to its peer.
struct Pending {
    request: RaftRequest,
    /// When its caller stops waiting for the reply.
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Result<ProtoResult, CallError>>,
}

impl Pending {
    /// Its caller has stopped waiting: sending it would only deliver a stale request (an
    /// AppendEntries that Raft has given up on and may have replaced by a snapshot) once the
    /// peer is reachable again.
    fn abandoned(&self) -> bool {
        self.reply.is_closed() || tokio::time::Instant::now() >= self.deadline
    }
}

/// Lazily created channels to peers, shared by every group of this node.
#[derive(Clone)]
pub struct Peers {
    identity: Identity,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    batchers: Arc<Mutex<HashMap<String, mpsc::Sender<Pending>>>>,
    large: Arc<Semaphore>,
    source_ip: Option<std::net::IpAddr>,
}

fn client(channel: Channel) -> RaftTransportClient<Channel> {
    RaftTransportClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn status_error(status: tonic::Status) -> CallError {
    match status.code() {
        tonic::Code::Unavailable => CallError::Unreachable(status.to_string()),
        tonic::Code::DeadlineExceeded => CallError::Timeout,
        _ => CallError::Failed(status.to_string()),
    }
}

impl Peers {
    /// No connections yet; they are made on first use.
    pub fn new(identity: Identity) -> Self {
        Peers {
            identity,
            channels: Arc::new(Mutex::new(HashMap::new())),
            batchers: Arc::new(Mutex::new(HashMap::new())),
            large: Arc::new(Semaphore::new(LARGE_IN_FLIGHT)),
            source_ip: None,
        }
    }

    /// Connections to peers are made from `ip` (`None`: the system's choice).
    pub fn with_source_ip(mut self, ip: Option<std::net::IpAddr>) -> Self {
        self.source_ip = ip;
        self
    }

    /// The local address of this node's connections to peers, if set.
    pub fn source_ip(&self) -> Option<std::net::IpAddr> {
        self.source_ip
    }

    /// Who this node is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The channel to `addr` (`host:port`), created lazily and reused.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = lock(&self.channels);
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .local_address(self.source_ip)
            .connect_lazy();
        channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Sends one raw request to `addr` in a call of its own (tests of the service use this).
    pub async fn call(
        &self,
        addr: &str,
        request: RaftRequest,
        timeout: Duration,
    ) -> Result<ProtoResult, CallError> {
        let channel = self.channel(addr).map_err(|e| CallError::Unreachable(e.to_string()))?;
        let response = match tokio::time::timeout(timeout, client(channel).call(request)).await {
            Err(_) => return Err(CallError::Timeout),
            Ok(Err(status)) => return Err(status_error(status)),
            Ok(Ok(r)) => r.into_inner(),
        };
        response.result.ok_or_else(|| CallError::Failed("empty response".into()))
    }

    /// Sends `request` to `addr` in the next batch to that peer (what the Raft network uses);
    /// a large request goes in a call of its own, so that it never delays or fails the others.
    pub async fn send(
        &self,
        addr: &str,
        request: RaftRequest,
        timeout: Duration,
    ) -> Result<ProtoResult, CallError> {
        if request.payload.len() > SOLO_REQUEST_BYTES {
            return match tokio::time::timeout(timeout, async {
                let _permit = self
                    .large
                    .acquire()
                    .await
                    .map_err(|_| CallError::Failed("large-call limiter closed".into()))?;
                self.call(addr, request, timeout).await
            })
            .await
            {
                Err(_) => Err(CallError::Timeout),
                Ok(result) => result,
            };
        }
        let batcher = self.batcher(addr)?;
        let (reply, rx) = oneshot::channel();
        let pending = Pending { request, deadline: tokio::time::Instant::now() + timeout, reply };
        match tokio::time::timeout(timeout, async {
            batcher.send(pending).await.map_err(|_| CallError::Failed("peer batcher stopped".into()))?;
            rx.await.map_err(|_| CallError::Failed("peer batcher dropped the request".into()))?
        })
        .await
        {
            Err(_) => Err(CallError::Timeout),
            Ok(result) => result,
        }
    }

    fn batcher(&self, addr: &str) -> Result<mpsc::Sender<Pending>, CallError> {
        let mut batchers = lock(&self.batchers);
        if let Some(tx) = batchers.get(addr) {
            if !tx.is_closed() {
                return Ok(tx.clone());
            }
        }
        let channel = self.channel(addr).map_err(|e| CallError::Unreachable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(MUX_QUEUE);
        tokio::spawn(run_batcher(client(channel), rx));
        batchers.insert(addr.to_string(), tx.clone());
        Ok(tx)
    }
}

/// Sends what is waiting for one peer as batches, at most `MUX_IN_FLIGHT` at a time. While
/// batches are in flight, new requests queue and leave together in the next one. A batch closes
/// at `MAX_BATCH_REQUESTS` requests or before the request that would take it past
/// `MAX_BATCH_BYTES` (that one opens the next batch; a batch always holds at least one). A
/// request whose caller stopped waiting while it queued (the peer did not answer in time) is
/// dropped, never sent late.
async fn run_batcher(client: RaftTransportClient<Channel>, mut rx: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(MUX_IN_FLIGHT));
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        if first.abandoned() {
            continue;
        }
        let mut bytes = first.request.payload.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_REQUESTS {
            match rx.try_recv() {
                Ok(p) if p.abandoned() => {}
                Ok(p) if bytes + p.request.payload.len() > MAX_BATCH_BYTES => {
                    carried = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.request.payload.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let mut client = client.clone();
        tokio::spawn(async move {
            // Waiters whose own timeout ran out have gone; the batch waits for the longest budget.
            let now = tokio::time::Instant::now();
            let timeout =
                batch.iter().map(|p| p.deadline.saturating_duration_since(now)).max().unwrap_or_default();
            let (requests, waiters): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.request, p.reply)).unzip();
            let count = requests.len();
            let outcome = tokio::time::timeout(timeout, client.call_batch(RaftBatch { requests })).await;
            drop(permit);
            match outcome {
                Ok(Ok(response)) if response.get_ref().responses.len() == count => {
                    for (waiter, r) in waiters.into_iter().zip(response.into_inner().responses) {
                        let _ =
                            waiter.send(r.result.ok_or_else(|| CallError::Failed("empty response".into())));
                    }
                }
                Ok(Ok(response)) => {
                    let got = response.get_ref().responses.len();
                    for waiter in waiters {
                        let _ = waiter
                            .send(Err(CallError::Failed(format!("{got} responses for {count} requests"))));
                    }
                }
                Ok(Err(status)) => {
                    let message = status.to_string();
                    let code = status.code();
                    for waiter in waiters {
                        let _ = waiter.send(Err(status_error(tonic::Status::new(code, message.clone()))));
                    }
                }
                Err(_) => {
                    for waiter in waiters {
                        let _ = waiter.send(Err(CallError::Timeout));
                    }
                }
            }
        });
    }
}

/// Why a raw call failed before producing a Raft reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The peer could not be reached (refused, down, unresolvable).
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// No answer within the RPC's time budget.
    #[error("RPC timed out")]
    Timeout,
    /// The peer answered with a transport-level error or garbage.
    #[error("RPC failed: {0}")]
    Failed(String),
}

/// openraft's network factory for one group.
pub struct NetworkFactory {
    peers: Peers,
    group: GroupId,
}

impl NetworkFactory {
    /// A factory for `group` over the node's shared `peers`.
    pub fn new(peers: Peers, group: GroupId) -> Self {
        NetworkFactory { peers, group }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Network {
        Network { peers: self.peers.clone(), group: self.group, target, addr: node.addr.clone() }
    }
}

/// The connection of one group to one peer.
pub struct Network {
    peers: Peers,
    group: GroupId,
    target: u64,
    addr: String,
}

impl Network {
    async fn send<Req, Resp, E>(
        &self,
        kind: RpcKind,
        rpc: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = codec::encode(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let id = self.peers.identity();
        let request = RaftRequest {
            group: self.group.0,
            cluster_id: id.wire_cluster_id(),
            from_node: id.node_id.0,
            incarnation: id.incarnation.0,
            kind: kind as i32,
            payload,
        };
        let ttl = option.hard_ttl();
        // Snapshot chunks go in calls of their own: a slow install must not hold back the
        // heartbeats of every other group in the same batch.
        let outcome = if kind == RpcKind::InstallSnapshot {
            self.peers.call(&self.addr, request, ttl).await
        } else {
            self.peers.send(&self.addr, request, ttl).await
        };
        match outcome {
            Err(CallError::Unreachable(m)) => Err(RPCError::Unreachable(Unreachable::new(&Msg(m)))),
            Err(CallError::Timeout) => Err(RPCError::Timeout(Timeout {
                action: match kind {
                    RpcKind::Vote => openraft::network::RPCTypes::Vote,
                    RpcKind::InstallSnapshot => openraft::network::RPCTypes::InstallSnapshot,
                    _ => openraft::network::RPCTypes::AppendEntries,
                },
                id: id.node_id.0,
                target: self.target,
                timeout: ttl,
            })),
            Err(CallError::Failed(m)) => Err(RPCError::Network(NetworkError::new(&Msg(m)))),
            Ok(ProtoResult::Error(e)) => Err(RPCError::Network(NetworkError::new(&Msg(format!(
                "refused by node {} ({:?}): {}",
                self.target,
                e.code(),
                e.message
            ))))),
            Ok(ProtoResult::Ok(bytes)) => {
                let result: Result<Resp, RaftError<u64, E>> =
                    codec::decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
        }
    }
}

/// How many of `entries`, from the first, fit together into `budget` encoded bytes; at least
/// one (a single entry always goes). Stops measuring at the first entry that does not fit.
fn entries_within(entries: &[openraft::Entry<TypeConfig>], budget: usize) -> Result<usize, codec::Error> {
    let mut bytes = 0usize;
    for (i, entry) in entries.iter().enumerate() {
        bytes += codec::encoded_len(entry)?;
        if bytes > budget {
            return Ok(i.max(1));
        }
    }
    Ok(entries.len())
}

/// A plain message as an error (for openraft's error wrappers).
#[derive(Debug)]
struct Msg(String);

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Msg {}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        // Entries that do not fit together are refused before they are encoded: openraft then
        // sends the prefix that fits (the hint) and the rest in the next requests.
        if rpc.entries.len() > 1 {
            let fit = entries_within(&rpc.entries, MAX_APPEND_BYTES)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            if fit < rpc.entries.len() {
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit as u64)));
            }
        }
        self.send(RpcKind::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>>
    {
        self.send(RpcKind::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.send(RpcKind::Vote, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tonic::{Request, Response, Status};

    use super::*;
    use crate::ids::{Incarnation, NodeId};
    use crate::transport::proto::raft_transport_server::{RaftTransport, RaftTransportServer};
    use crate::transport::proto::{raft_response, RaftBatchResponse, RaftResponse};

    /// A peer that records the payload of every request it receives and answers only while
    /// `answering` (until then a call hangs, as to a node cut off by a partition).
    #[derive(Clone, Default)]
    struct Recorder {
        seen: Arc<Mutex<Vec<Vec<u8>>>>,
        answering: Arc<AtomicBool>,
    }

    impl Recorder {
        async fn answer(&self, requests: Vec<RaftRequest>) -> Vec<RaftResponse> {
            lock(&self.seen).extend(requests.iter().map(|r| r.payload.clone()));
            while !self.answering.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            requests
                .into_iter()
                .map(|r| RaftResponse { result: Some(raft_response::Result::Ok(r.payload)) })
                .collect()
        }
    }

    #[tonic::async_trait]
    impl RaftTransport for Recorder {
        async fn call(&self, request: Request<RaftRequest>) -> Result<Response<RaftResponse>, Status> {
            let mut responses = self.answer(vec![request.into_inner()]).await;
            responses.pop().map(Response::new).ok_or_else(|| Status::internal("no response"))
        }

        async fn call_batch(
            &self,
            request: Request<RaftBatch>,
        ) -> Result<Response<RaftBatchResponse>, Status> {
            Ok(Response::new(RaftBatchResponse {
                responses: self.answer(request.into_inner().requests).await,
            }))
        }
    }

    fn request(n: u8) -> RaftRequest {
        RaftRequest { payload: vec![n], ..Default::default() }
    }

    /// Partition test `a_waiting_start_on_a_node_cut_off_…`: requests that queued behind calls
    /// to an unreachable peer, and whose callers gave up, reached the peer once it was back (an
    /// AppendEntries from before the cut brought a flow's end that a snapshot should have).
    #[tokio::test]
    async fn a_request_whose_caller_gave_up_is_never_sent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let peer = Recorder::default();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(peer.clone()))
                .serve(addr),
        );
        let peers = Peers::new(Identity::new(NodeId(1), Incarnation(1), None));
        let addr = addr.to_string();
        // Wait for the server, with a call answered at once.
        peer.answering.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while peers.send(&addr, request(0), Duration::from_millis(500)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "the test peer never answered");
        }
        // Unreachable: MUX_IN_FLIGHT calls hang in flight (for a second), the requests behind
        // them queue, and their callers give up sooner.
        peer.answering.store(false, Ordering::SeqCst);
        lock(&peer.seen).clear();
        let mut in_flight = Vec::new();
        for n in 1..=MUX_IN_FLIGHT as u8 {
            let (peers, addr) = (peers.clone(), addr.clone());
            in_flight.push(tokio::spawn(async move {
                peers.send(&addr, request(n), Duration::from_secs(1)).await
            }));
            while lock(&peer.seen).len() < usize::from(n) {
                assert!(tokio::time::Instant::now() < deadline, "call {n} never reached the peer");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let queued = (10..16u8).map(|n| peers.send(&addr, request(n), Duration::from_millis(100)));
        for outcome in futures::future::join_all(queued).await {
            assert!(matches!(outcome, Err(CallError::Timeout)), "{outcome:?}");
        }
        for call in in_flight {
            let outcome = call.await.unwrap();
            assert!(matches!(outcome, Err(CallError::Timeout)), "{outcome:?}");
        }
        let hung: Vec<Vec<u8>> = lock(&peer.seen).clone();
        assert_eq!(hung.len(), MUX_IN_FLIGHT, "only the calls in flight reached the peer: {hung:?}");
        // Reachable again: a new request is answered, and the abandoned ones never arrive.
        peer.answering.store(true, Ordering::SeqCst);
        let fresh = peers.send(&addr, request(9), Duration::from_secs(5)).await;
        assert!(fresh.is_ok(), "{fresh:?}");
        let seen: Vec<Vec<u8>> = lock(&peer.seen).clone();
        let late: Vec<&Vec<u8>> = seen.iter().filter(|p| p.first().is_some_and(|n| *n >= 10)).collect();
        assert!(late.is_empty(), "abandoned requests were sent late: {late:?} (all seen: {seen:?})");
        server.abort();
    }
}
