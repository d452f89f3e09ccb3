//! The receiving side: decode, check identity and group, hand the RPC to the group's Raft.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use openraft::error::RaftError;
use openraft::raft::{VoteRequest, VoteResponse};
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::proto::raft_response::Result as ProtoResult;
use super::proto::raft_transport_server::{RaftTransport, RaftTransportServer};
use super::proto::{
    ErrorCode, RaftBatch, RaftBatchResponse, RaftRequest, RaftResponse, RpcKind, TransportError,
};
use super::{Identity, MAX_BATCH_REQUESTS, MAX_MESSAGE_BYTES};
use crate::codec;
use crate::handle::GroupHandle;
use crate::ids::{GroupId, Incarnation, NodeId};
use crate::storage::WalLog;

/// Bound on a leadership transfer asked over the transport.
const TRANSFER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
use crate::sync::{read, write};
use crate::types::Raft;

/// The groups this node hosts, by id. Shared by the node (which adds groups) and the service.
#[derive(Clone, Default)]
pub struct GroupRegistry {
    inner: Arc<RwLock<HashMap<GroupId, (Raft, WalLog)>>>,
    handles: Arc<RwLock<HashMap<GroupId, GroupHandle>>>,
    lease_ms: Arc<std::sync::atomic::AtomicU64>,
    incarnations: Arc<RwLock<HashMap<NodeId, Incarnation>>>,
}

impl GroupRegistry {
    /// Records the followers' leader lease (the election timeout maximum) of this node's groups.
    pub fn set_lease(&self, lease: std::time::Duration) {
        self.lease_ms.store(lease.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }

    /// The followers' leader lease of this node's groups.
    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.lease_ms.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Registers `raft` as `group`'s instance on this node, with its log.
    pub fn insert(&self, group: GroupId, raft: Raft, log: WalLog) {
        write(&self.inner).insert(group, (raft, log));
    }

    /// Registers the handle that serves forwarded proposals and read-index requests of `group`.
    pub fn insert_handle(&self, group: GroupId, handle: GroupHandle) {
        write(&self.handles).insert(group, handle);
    }

    /// The handle of `group`, if hosted here.
    pub fn handle(&self, group: GroupId) -> Option<GroupHandle> {
        read(&self.handles).get(&group).cloned()
    }

    /// The Raft instance of `group`, if hosted here.
    pub fn get(&self, group: GroupId) -> Option<Raft> {
        read(&self.inner).get(&group).map(|(raft, _)| raft.clone())
    }

    /// Whether `group`'s replica here grants no vote (see [`WalLog::withholds_votes`]); `false`
    /// if the group is not hosted here.
    pub fn withholds_votes(&self, group: GroupId) -> bool {
        read(&self.inner).get(&group).is_some_and(|(_, log)| log.withholds_votes())
    }

    /// Removes `group` and returns its instance.
    pub fn remove(&self, group: GroupId) -> Option<Raft> {
        write(&self.handles).remove(&group);
        write(&self.inner).remove(&group).map(|(raft, _)| raft)
    }

    /// Records the incarnation of every member (as group 0 lists them): a request from one of
    /// these ids with another incarnation is refused.
    pub fn set_incarnations(&self, members: HashMap<NodeId, Incarnation>) {
        *write(&self.incarnations) = members;
    }

    /// The incarnation recorded for member `node`.
    pub fn incarnation_of(&self, node: NodeId) -> Option<Incarnation> {
        read(&self.incarnations).get(&node).copied()
    }

    /// Every hosted group.
    pub fn all(&self) -> Vec<(GroupId, Raft)> {
        read(&self.inner).iter().map(|(g, (r, _))| (*g, r.clone())).collect()
    }
}

/// The tonic service carrying Raft RPCs for every group of this node.
pub struct RaftService {
    identity: Identity,
    groups: GroupRegistry,
}

impl RaftService {
    /// A service for the node `identity` serving `groups`.
    pub fn new(identity: Identity, groups: GroupRegistry) -> Self {
        RaftService { identity, groups }
    }

    /// The service wrapped for a tonic server, with the transport's message size limits.
    pub fn into_server(self) -> RaftTransportServer<RaftService> {
        RaftTransportServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> RaftResponse {
    RaftResponse {
        result: Some(ProtoResult::Error(TransportError { code: code as i32, message: message.into() })),
    }
}

fn reply<T: Serialize>(value: &T) -> RaftResponse {
    match codec::encode(value) {
        Ok(bytes) => RaftResponse { result: Some(ProtoResult::Ok(bytes)) },
        Err(e) => refuse(ErrorCode::Malformed, format!("cannot encode reply: {e}")),
    }
}

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, RaftResponse> {
    codec::decode(payload).map_err(|e| refuse(ErrorCode::Malformed, format!("malformed payload: {e}")))
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn call(&self, request: Request<RaftRequest>) -> Result<Response<RaftResponse>, Status> {
        Ok(Response::new(self.handle(request.into_inner()).await))
    }

    async fn call_batch(&self, request: Request<RaftBatch>) -> Result<Response<RaftBatchResponse>, Status> {
        let requests = request.into_inner().requests;
        if requests.len() > MAX_BATCH_REQUESTS {
            return Err(Status::invalid_argument(format!(
                "batch of {} requests exceeds the limit of {MAX_BATCH_REQUESTS}",
                requests.len()
            )));
        }
        // Concurrently: requests of different groups must not wait for each other.
        let responses = futures::future::join_all(requests.into_iter().map(|r| self.handle(r))).await;
        Ok(Response::new(RaftBatchResponse { responses }))
    }
}

impl RaftService {
    /// Refuses a request from another cluster (from any cluster while this node does not know
    /// its own) or from a member id whose incarnation is not the listed one. These checks come
    /// before anything reaches openraft: a log of another cluster or another disk contradicts
    /// the group's, and openraft panics on some such contradictions instead of answering them.
    fn check_sender(&self, req: &RaftRequest) -> Option<RaftResponse> {
        let me = self.identity.node_id;
        let Some(mine) = self.identity.cluster_id() else {
            tracing::debug!(
                from_node = req.from_node,
                "refused RPC: this node does not know its cluster yet"
            );
            return Some(refuse(
                ErrorCode::ForeignCluster,
                format!("node {me} does not belong to a cluster yet (it learns the id when the cluster is created)"),
            ));
        };
        if req.cluster_id != mine.0 {
            tracing::warn!(from_node = req.from_node, cluster = %req.cluster_id, "refused RPC from a foreign cluster");
            return Some(refuse(
                ErrorCode::ForeignCluster,
                format!("node {me} belongs to cluster {mine}, not {:?}", req.cluster_id),
            ));
        }
        let from = NodeId(req.from_node);
        match self.groups.incarnation_of(from) {
            Some(listed) if listed.0 != req.incarnation => {
                tracing::warn!(from_node = req.from_node, "refused RPC from another incarnation of a member");
                Some(refuse(
                    ErrorCode::StaleIncarnation,
                    format!(
                        "member {from} is incarnation {listed}, not {}: another disk under a known id",
                        Incarnation(req.incarnation)
                    ),
                ))
            }
            _ => None,
        }
    }

    /// Checks and dispatches one request; every refusal is a reply, never a panic.
    async fn handle(&self, req: RaftRequest) -> RaftResponse {
        if let Some(refusal) = self.check_sender(&req) {
            return refusal;
        }
        let group = GroupId(req.group);
        let Some(raft) = self.groups.get(group) else {
            return refuse(
                ErrorCode::UnknownGroup,
                format!("node {} does not host group {}", self.identity.node_id, req.group),
            );
        };
        match RpcKind::try_from(req.kind) {
            Ok(RpcKind::AppendEntries) => match decode(&req.payload) {
                Ok(rpc) => reply(&raft.append_entries(rpc).await),
                Err(refusal) => refusal,
            },
            Ok(RpcKind::Vote) => match decode::<VoteRequest<u64>>(&req.payload) {
                Ok(_) if self.groups.withholds_votes(group) => {
                    // A re-created replica grants no vote until it has the log (ARCHITECTURE.md,
                    // "A re-created replica does not vote while empty"): it answers with its own
                    // vote, not granted.
                    match raft.with_raft_state(|st| *st.vote_ref()).await {
                        Ok(vote) => {
                            let answer: Result<VoteResponse<u64>, RaftError<u64>> =
                                Ok(VoteResponse::new(vote, None, false));
                            reply(&answer)
                        }
                        Err(_) => refuse(ErrorCode::ShuttingDown, format!("group {group} is closing")),
                    }
                }
                Ok(rpc) => reply(&raft.vote(rpc).await),
                Err(refusal) => refusal,
            },
            Ok(RpcKind::InstallSnapshot) => match decode(&req.payload) {
                Ok(rpc) => reply(&raft.install_snapshot(rpc).await),
                Err(refusal) => refusal,
            },
            Ok(RpcKind::Propose) => match (decode(&req.payload), self.groups.handle(group)) {
                (Ok(command), Some(handle)) => reply(&handle.propose(command).await),
                (Err(refusal), _) => refusal,
                (_, None) => refuse(ErrorCode::ShuttingDown, format!("group {group} is closing")),
            },
            Ok(RpcKind::ReadIndex) => match self.groups.handle(group) {
                Some(handle) => reply(&handle.read_index_here().await),
                None => refuse(ErrorCode::ShuttingDown, format!("group {group} is closing")),
            },
            Ok(RpcKind::Elect) => match self.groups.handle(group) {
                Some(handle) => reply(&handle.elect_here().await),
                None => refuse(ErrorCode::ShuttingDown, format!("group {group} is closing")),
            },
            Ok(RpcKind::TransferLeader) => {
                match (decode::<NodeId>(&req.payload), self.groups.handle(group)) {
                    (Ok(to), Some(handle)) => {
                        let lease = self.groups.lease();
                        reply(&handle.transfer_leadership(to, lease, TRANSFER_TIMEOUT).await)
                    }
                    (Err(refusal), _) => refusal,
                    (_, None) => refuse(ErrorCode::ShuttingDown, format!("group {group} is closing")),
                }
            }
            Ok(RpcKind::Query) => match (decode(&req.payload), self.groups.handle(group)) {
                (Ok(query), Some(handle)) => reply(&handle.query_here(&query).await),
                (Err(refusal), _) => refusal,
                (_, None) => refuse(ErrorCode::ShuttingDown, format!("group {group} is closing")),
            },
            Ok(RpcKind::ChangeMembers) => match (decode(&req.payload), self.groups.handle(group)) {
                (Ok(op), Some(handle)) => reply(&handle.change_here(op).await),
                (Err(refusal), _) => refusal,
                (_, None) => refuse(ErrorCode::ShuttingDown, format!("group {group} is closing")),
            },
            Ok(RpcKind::Unspecified) | Err(_) => {
                refuse(ErrorCode::UnknownKind, format!("unknown RPC kind {}", req.kind))
            }
        }
    }
}
