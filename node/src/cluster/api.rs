//! The public gRPC API (`node/proto/fetter.proto`) of a cluster node, over the control panel.
//!
//! Every request is checked before anything is stored (flow type registered, JSON well formed,
//! payload within the cluster's limit, ids non-empty); refusals are gRPC statuses with a clear
//! message and never touch stored data.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use fetter_actors::control::{Error as PanelError, ListQuery, Started};
use fetter_raft::handle;
use fetter_raft::ids::{Epoch, FlowId, NodeId};
use fetter_raft::meta;
use fetter_raft::placement::shard_of;
use fetter_raft::shard::{Action, EffectKind, EffectRecord, EffectState, ErrorInfo};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::{convert, lazy_channel, node_info_over, Shared};
use crate::proto;
use crate::proto::fetter_server::{Fetter, FetterServer};

/// Bound on a request id (the shard's own bound).
const MAX_REQUEST_ID_BYTES: usize = fetter_raft::shard::MAX_REQUEST_ID_BYTES;
/// Bound on a flow type or instance name.
const MAX_NAME_BYTES: usize = 256;
/// How often `StartFlow{wait}` reads the flow again even without a wake-up.
const WAIT_RECHECK: Duration = Duration::from_secs(1);

/// Whether an applied action batch should make a `StartFlow{wait}` on `flow` look again: the
/// flow finished, or a snapshot was installed (an empty batch: the state was replaced whole).
fn wakes(batch: &[Action], flow: &FlowId) -> bool {
    batch.is_empty() || batch.iter().any(|a| matches!(a, Action::Finished { flow: f, .. } if f == flow))
}

/// The default wait of `StartFlow{wait}`.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Largest request the server decodes (payloads over the cluster's limit get a clear refusal
/// from the node up to this size; larger ones from tonic).
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// Which members answered the last ping.
#[derive(Clone, Default)]
pub struct Liveness {
    alive: Arc<RwLock<HashMap<NodeId, bool>>>,
    /// The shards each live member reported holding a replica of, at its last ping.
    hosted: Arc<RwLock<HashMap<NodeId, Vec<proto::HostedShard>>>>,
    /// Most members that answered the last ping round do not list this node: it was removed.
    removed: Arc<std::sync::atomic::AtomicBool>,
    /// This node is stopping: it answers pings "unavailable", so no one moves work to it.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Liveness {
    /// Whether `node` answered the last ping (unknown nodes are not alive).
    pub fn is_alive(&self, node: NodeId) -> bool {
        self.alive.read().map(|m| m.get(&node).copied().unwrap_or(false)).unwrap_or(false)
    }

    /// The members that answered the last ping (this node not included).
    pub fn alive_members(&self) -> Vec<NodeId> {
        self.alive
            .read()
            .map(|m| m.iter().filter(|(_, a)| **a).map(|(n, _)| *n).collect())
            .unwrap_or_default()
    }

    fn set(&self, node: NodeId, alive: bool, hosted: Vec<proto::HostedShard>) {
        if let Ok(mut m) = self.alive.write() {
            m.insert(node, alive);
        }
        if let Ok(mut m) = self.hosted.write() {
            if alive {
                m.insert(node, hosted);
            } else {
                m.remove(&node);
            }
        }
    }

    /// What the live members reported of the shards they hold replicas of.
    pub(crate) fn hosted_reports(&self) -> Vec<(NodeId, Vec<proto::HostedShard>)> {
        self.hosted.read().map(|m| m.iter().map(|(n, h)| (*n, h.clone())).collect()).unwrap_or_default()
    }

    /// Marks this node as stopping (see [`Liveness::stopping`]).
    pub(crate) fn set_stopping(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether this node is stopping.
    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the other members say this node was removed from the cluster (as of the last
    /// ping round).
    pub fn removed(&self) -> bool {
        self.removed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets every node that is not in `members` (a removed node is not a live member, even
    /// while its process runs).
    fn retain(&self, members: &BTreeMap<NodeId, String>) {
        if let Ok(mut m) = self.alive.write() {
            m.retain(|node, _| members.contains_key(node));
        }
        if let Ok(mut m) = self.hosted.write() {
            m.retain(|node, _| members.contains_key(node));
        }
    }
}

/// The node's state, set once it is up (requests before that are `UNAVAILABLE`).
#[derive(Clone, Default)]
pub(crate) struct Late {
    inner: Arc<OnceLock<(Arc<Shared>, u32)>>,
}

impl Late {
    pub(crate) fn set(&self, shared: Arc<Shared>, shards: u32) {
        let _ = self.inner.set((shared, shards));
    }
}

/// The service.
pub(crate) struct Api {
    late: Late,
}

impl Api {
    pub(crate) fn new(late: Late) -> Self {
        Api { late }
    }

    pub(crate) fn into_server(self) -> FetterServer<Api> {
        FetterServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    fn shared(&self) -> Result<&Arc<Shared>, Status> {
        let shared = self
            .late
            .inner
            .get()
            .map(|(s, _)| s)
            .ok_or_else(|| Status::unavailable("the node is starting"))?;
        if shared.liveness.removed() {
            // UNAVAILABLE: a client that knows other nodes goes on to them.
            return Err(Status::unavailable(format!(
                "node {} was removed from the cluster and serves nothing; ask another node (to \
                 bring this machine back, start it with an empty data directory, a new id and \
                 --join)",
                shared.node.id().0
            )));
        }
        Ok(shared)
    }
}

fn panel_status(e: PanelError) -> Status {
    match e {
        PanelError::NotFound(flow) => Status::not_found(format!("flow {flow} not found")),
        PanelError::InputMismatch(flow) => {
            Status::already_exists(format!("flow {flow} exists with a different input"))
        }
        e @ PanelError::ConcurrentModification { .. } => Status::aborted(e.to_string()),
        e @ PanelError::Finished(_) => Status::failed_precondition(e.to_string()),
        e @ (PanelError::BadJson { .. } | PanelError::RequestIdReused(_)) => {
            Status::invalid_argument(e.to_string())
        }
        PanelError::Journal(e) => journal_status(e),
        e => Status::internal(e.to_string()),
    }
}

/// The caller's request id, checked; `None` when it gave none (the control panel then makes one).
fn request_id(id: Option<String>) -> Result<Option<String>, Status> {
    match id {
        Some(id) if id.is_empty() || id.len() > MAX_REQUEST_ID_BYTES => {
            Err(Status::invalid_argument(format!("the request id must be 1 to {MAX_REQUEST_ID_BYTES} bytes")))
        }
        id => Ok(id),
    }
}

fn mutated(epoch: Option<Epoch>) -> Response<proto::MutationResponse> {
    Response::new(proto::MutationResponse { epoch: epoch.map(|e| e.0) })
}

/// Test hook: loses the answer to an applied mutation when a test asked for it (a no-op without
/// the `test-hooks` feature).
async fn answer_hook(rpc: &'static str, flow: &FlowId) -> Result<(), Status> {
    #[cfg(feature = "test-hooks")]
    crate::hooks::after_apply(rpc, flow).await?;
    #[cfg(not(feature = "test-hooks"))]
    let _ = (rpc, flow);
    Ok(())
}

pub(crate) fn journal_status(e: handle::Error) -> Status {
    match e {
        e @ (handle::Error::NoLeader { .. }
        | handle::Error::NotLeader { .. }
        | handle::Error::Unavailable { .. }
        | handle::Error::ShuttingDown(_)
        | handle::Error::NotHosted(_)) => Status::unavailable(e.to_string()),
        e @ handle::Error::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        e @ handle::Error::Internal { .. } => Status::internal(e.to_string()),
        e @ handle::Error::TooLarge { .. } => Status::invalid_argument(e.to_string()),
    }
}

impl Shared {
    fn flow_id(&self, r: Option<proto::FlowRef>) -> Result<FlowId, Status> {
        let r = r.ok_or_else(|| Status::invalid_argument("the flow (type and instance) is missing"))?;
        for (what, value) in [("flow type", &r.flow_type), ("instance", &r.instance)] {
            if value.is_empty() {
                return Err(Status::invalid_argument(format!("the {what} is empty")));
            }
            if value.len() > MAX_NAME_BYTES {
                return Err(Status::invalid_argument(format!(
                    "the {what} is {} bytes, over the limit of {MAX_NAME_BYTES}",
                    value.len()
                )));
            }
        }
        Ok(FlowId::new(r.flow_type, r.instance))
    }

    fn known_type(&self, flow: &FlowId) -> Result<(), Status> {
        if self.registry.contains(&flow.flow_type) {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "unknown flow type {:?}: this cluster runs {}",
                flow.flow_type,
                self.registry.types().join(", ")
            )))
        }
    }

    /// Refuses a payload over the limit or not JSON; returns its bytes.
    fn payload(&self, what: &str, json: String) -> Result<Vec<u8>, Status> {
        let limit = self.params.limits().max_payload_bytes;
        if json.len() as u64 > limit {
            return Err(Status::invalid_argument(format!(
                "the {what} is {} bytes, over the limit of {limit} bytes",
                json.len()
            )));
        }
        serde_json::from_str::<serde::de::IgnoredAny>(&json)
            .map_err(|e| Status::invalid_argument(format!("the {what} is not valid JSON: {e}")))?;
        Ok(json.into_bytes())
    }

    fn leader_of(&self, flow: &FlowId) -> Option<NodeId> {
        let shard = shard_of(flow, self.shards.len() as u32);
        self.shards.at(shard.0 as usize).and_then(|g| g.status().borrow().leader)
    }

    async fn view(&self, flow: &FlowId) -> Result<proto::Flow, Status> {
        let view = self.panel.get(flow).await.map_err(panel_status)?;
        Ok(convert::flow(&view, self.leader_of(flow)))
    }

    /// Waits until `flow` has finished (woken by the shard's applied actions, which every
    /// replica sees), or `timeout`. A replica that catches up by installing a snapshot applies
    /// no actions for what the snapshot holds (it announces the install with an empty batch),
    /// so that wakes the waiter too, and so does a re-read every [`WAIT_RECHECK`].
    async fn wait_finished(&self, flow: &FlowId, timeout: Duration) -> Result<proto::Flow, Status> {
        let shard = shard_of(flow, self.shards.len() as u32);
        let group = self.shards.at(shard.0 as usize).ok_or_else(|| Status::internal("no such shard"))?;
        let mut actions = group.subscribe_actions();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut first = true;
        loop {
            // The flow exists (its start was committed): a read that fails later (this node cut
            // off from the shard's leader for a while) does not end the wait, the next one may
            // succeed; only the deadline does.
            match self.view(flow).await {
                Ok(view) if matches!(view.status.as_str(), "succeeded" | "failed" | "cancelled") => {
                    return Ok(view)
                }
                Ok(_) => {}
                Err(e) if first => return Err(e),
                Err(e) => {
                    tracing::info!(%flow, error = %e.message(), "a waiting start could not read its flow; still waiting")
                }
            }
            first = false;
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "flow {flow} has not finished within {timeout:?}"
                )));
            }
            let recheck_at = deadline.min(tokio::time::Instant::now() + WAIT_RECHECK);
            // Until this flow's `Finished` action, a snapshot install, a lag, or the recheck.
            loop {
                let Ok(next) = tokio::time::timeout_at(recheck_at, actions.recv()).await else { break };
                match next {
                    Ok(batch) => {
                        if wakes(&batch, flow) {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Err(Status::unavailable("the node is shutting down"))
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Fetter for Api {
    async fn start_flow(
        &self,
        request: Request<proto::StartFlowRequest>,
    ) -> Result<Response<proto::StartFlowResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let flow = s.flow_id(r.flow)?;
        s.known_type(&flow)?;
        let input = s.payload("input", r.input_json)?;
        let created = matches!(s.panel.start(&flow, input).await.map_err(panel_status)?, Started::New);
        let view = if r.wait {
            let timeout = if r.timeout_ms == 0 { DEFAULT_WAIT } else { Duration::from_millis(r.timeout_ms) };
            s.wait_finished(&flow, timeout).await?
        } else {
            s.view(&flow).await?
        };
        Ok(Response::new(proto::StartFlowResponse { created, flow: Some(view) }))
    }

    async fn send_message(
        &self,
        request: Request<proto::SendMessageRequest>,
    ) -> Result<Response<proto::SendMessageResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let flow = s.flow_id(r.flow)?;
        if r.message_type.is_empty() || r.message_type.len() > MAX_NAME_BYTES {
            return Err(Status::invalid_argument("the message type must be 1 to 256 bytes"));
        }
        let payload = s.payload("message", r.payload_json)?;
        // Every forwarded message carries a key, so no retry appends it twice: the caller's key,
        // else its request id (the same on each of its retries), else a fresh one.
        let key = match (r.idempotency_key, request_id(r.request_id)?) {
            (Some(key), _) => key,
            (None, Some(id)) => format!("req-{id}"),
            (None, None) => format!("req-{}", uuid::Uuid::new_v4()),
        };
        let seq =
            s.panel.send_message(&flow, &r.message_type, payload, Some(key)).await.map_err(panel_status)?;
        answer_hook("send_message", &flow).await?;
        Ok(Response::new(proto::SendMessageResponse { seq }))
    }

    async fn get_flow(&self, request: Request<proto::FlowRef>) -> Result<Response<proto::Flow>, Status> {
        let s = self.shared()?;
        let flow = s.flow_id(Some(request.into_inner()))?;
        match s.view(&flow).await {
            // Letters to an id that does not exist are worth a pointer: the sender's message
            // did not vanish.
            Err(status) if status.code() == tonic::Code::NotFound => {
                let letters = s.panel.dead_letters(&flow, None, 1).await.map_err(panel_status)?;
                if letters.is_empty() {
                    Err(status)
                } else {
                    Err(Status::not_found(format!(
                        "flow {flow} not found; messages sent to it are kept as dead letters \
                         (flow dead-letters {} {})",
                        flow.flow_type, flow.instance
                    )))
                }
            }
            view => Ok(Response::new(view?)),
        }
    }

    async fn list_dead_letters(
        &self,
        request: Request<proto::ListDeadLettersRequest>,
    ) -> Result<Response<proto::ListDeadLettersResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let after = match r.cursor.as_deref() {
            None | Some("") => None,
            Some(c) => Some(
                convert::from_letter_cursor(c).ok_or_else(|| Status::invalid_argument("malformed cursor"))?,
            ),
        };
        let limit = if r.limit == 0 { 100 } else { r.limit.min(10_000) } as usize;
        let letters = match r.flow {
            Some(flow) => {
                let flow = s.flow_id(Some(flow))?;
                let after_seq = match after {
                    Some((cursor_flow, _)) if cursor_flow != flow => {
                        return Err(Status::invalid_argument("the cursor belongs to another flow"))
                    }
                    other => other.map(|(_, seq)| seq),
                };
                s.panel.dead_letters(&flow, after_seq, limit).await
            }
            None => s.panel.list_dead_letters(after, limit).await,
        }
        .map_err(panel_status)?;
        let next = if letters.len() >= limit { letters.last().map(convert::letter_cursor) } else { None };
        Ok(Response::new(proto::ListDeadLettersResponse {
            letters: letters.iter().map(convert::dead_letter).collect(),
            next,
        }))
    }

    async fn list_flows(
        &self,
        request: Request<proto::ListFlowsRequest>,
    ) -> Result<Response<proto::ListFlowsResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let status = match r.status.as_deref() {
            None | Some("") => None,
            Some(name) => Some(vec![convert::status_from_name(name).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown status {name:?} (running, suspended, postponed, succeeded, failed, cancelled)"
                ))
            })?]),
        };
        let after = match r.cursor.as_deref() {
            None | Some("") => None,
            Some(c) => {
                Some(convert::from_cursor(c).ok_or_else(|| Status::invalid_argument("malformed cursor"))?)
            }
        };
        let limit = if r.limit == 0 { 100 } else { r.limit.min(10_000) } as usize;
        let query = ListQuery { flow_type: r.flow_type.filter(|t| !t.is_empty()), status, after, limit };
        let flows = s.panel.list(&query).await.map_err(panel_status)?;
        let next = if flows.len() >= limit { flows.last().map(|f| convert::cursor(&f.id)) } else { None };
        Ok(Response::new(proto::ListFlowsResponse {
            flows: flows.iter().map(convert::summary).collect(),
            next,
        }))
    }

    async fn restart(
        &self,
        request: Request<proto::RestartRequest>,
    ) -> Result<Response<proto::MutationResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let flow = s.flow_id(r.flow)?;
        s.known_type(&flow)?;
        let input = r.input_json.map(|i| s.payload("input", i)).transpose()?;
        let id = request_id(r.request_id)?;
        let epoch = s
            .panel
            .restart(&flow, input, r.clear_effects, r.expected_epoch.map(Epoch), id.as_deref())
            .await
            .map_err(panel_status)?;
        answer_hook("restart", &flow).await?;
        Ok(mutated(epoch))
    }

    async fn cancel(
        &self,
        request: Request<proto::MutationRequest>,
    ) -> Result<Response<proto::MutationResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let flow = s.flow_id(r.flow)?;
        let id = request_id(r.request_id)?;
        let epoch =
            s.panel.cancel(&flow, r.expected_epoch.map(Epoch), id.as_deref()).await.map_err(panel_status)?;
        answer_hook("cancel", &flow).await?;
        Ok(mutated(epoch))
    }

    async fn mark_succeeded(
        &self,
        request: Request<proto::MarkSucceededRequest>,
    ) -> Result<Response<proto::MutationResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let flow = s.flow_id(r.flow)?;
        let output = s.payload("output", r.output_json)?;
        let id = request_id(r.request_id)?;
        let epoch = s
            .panel
            .succeed(&flow, output, r.expected_epoch.map(Epoch), id.as_deref())
            .await
            .map_err(panel_status)?;
        answer_hook("mark_succeeded", &flow).await?;
        Ok(mutated(epoch))
    }

    async fn mark_failed(
        &self,
        request: Request<proto::MarkFailedRequest>,
    ) -> Result<Response<proto::MutationResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let flow = s.flow_id(r.flow)?;
        if r.reason.len() as u64 > s.params.limits().max_payload_bytes {
            return Err(Status::invalid_argument("the reason is over the payload limit"));
        }
        let error = ErrorInfo { kind: "marked_failed".into(), message: r.reason };
        let id = request_id(r.request_id)?;
        let epoch = s
            .panel
            .fail(&flow, error, r.expected_epoch.map(Epoch), id.as_deref())
            .await
            .map_err(panel_status)?;
        answer_hook("mark_failed", &flow).await?;
        Ok(mutated(epoch))
    }

    async fn delete(
        &self,
        request: Request<proto::MutationRequest>,
    ) -> Result<Response<proto::MutationResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let flow = s.flow_id(r.flow)?;
        let id = request_id(r.request_id)?;
        let epoch =
            s.panel.delete(&flow, r.expected_epoch.map(Epoch), id.as_deref()).await.map_err(panel_status)?;
        answer_hook("delete", &flow).await?;
        Ok(mutated(epoch))
    }

    async fn set_effect(
        &self,
        request: Request<proto::SetEffectRequest>,
    ) -> Result<Response<proto::MutationResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let flow = s.flow_id(r.flow)?;
        if r.effect_id.is_empty() || r.effect_id.len() > MAX_NAME_BYTES {
            return Err(Status::invalid_argument("the effect id must be 1 to 256 bytes"));
        }
        let value = s.payload("effect value", r.value_json)?;
        let id = request_id(r.request_id)?;
        // Keep the recorded kind when the effect exists (a repaired `ship` stays an effect).
        let kind = match s.panel.get(&flow).await {
            Ok(view) => view.effects.iter().find(|(id, _)| *id == r.effect_id).map(|(_, e)| e.kind),
            Err(e) => return Err(panel_status(e)),
        };
        let record = EffectRecord {
            kind: kind.unwrap_or(EffectKind::Effect),
            type_name: String::new(),
            state: EffectState::Completed(value),
        };
        let epoch = s
            .panel
            .set_effect(&flow, &r.effect_id, record, r.expected_epoch.map(Epoch), id.as_deref())
            .await
            .map_err(panel_status)?;
        answer_hook("set_effect", &flow).await?;
        Ok(mutated(epoch))
    }

    async fn remove_effect(
        &self,
        request: Request<proto::RemoveEffectRequest>,
    ) -> Result<Response<proto::MutationResponse>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let flow = s.flow_id(r.flow)?;
        let id = request_id(r.request_id)?;
        let epoch = s
            .panel
            .remove_effect(&flow, &r.effect_id, r.expected_epoch.map(Epoch), id.as_deref())
            .await
            .map_err(panel_status)?;
        answer_hook("remove_effect", &flow).await?;
        Ok(mutated(epoch))
    }

    async fn cluster_status(
        &self,
        _request: Request<proto::ClusterStatusRequest>,
    ) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        let s = self.shared()?;
        let info = s.initialized_cluster().await?;
        let me = s.node.id();
        let members = info
            .members
            .iter()
            .map(|m| proto::Member {
                id: m.node.0,
                addr: m.addr.clone(),
                alive: m.node == me || s.liveness.is_alive(m.node),
            })
            .collect();
        // Shards this node holds no replica of: as their replicas reported at the last ping.
        let shards = super::view::shard_views(s)
            .into_iter()
            .enumerate()
            .map(|(k, v)| proto::ShardStatus {
                id: k as u32,
                leader: v.leader.map(|n| n.0),
                replicas: v.voters.into_iter().map(|n| n.0).collect(),
            })
            .collect();
        Ok(Response::new(proto::ClusterStatusResponse {
            cluster_id: info.cluster_id.0.clone(),
            members,
            shards,
        }))
    }

    async fn get_cluster_config(
        &self,
        _request: Request<proto::GetClusterConfigRequest>,
    ) -> Result<Response<proto::ClusterConfig>, Status> {
        let s = self.shared()?;
        let info = s.initialized_cluster().await?;
        Ok(Response::new(config_of(&info.params)))
    }

    async fn set_cluster_config(
        &self,
        request: Request<proto::SetClusterConfigRequest>,
    ) -> Result<Response<proto::ClusterConfig>, Status> {
        let s = self.shared()?;
        let r = request.into_inner();
        let command = fetter_raft::meta::MetaCommand::SetParams {
            retention_ms: r.retention_ms,
            max_payload_bytes: r.max_payload_bytes,
        };
        super::members::submit_meta(s, command).await?;
        let info = s.initialized_cluster().await?;
        Ok(Response::new(config_of(&info.params)))
    }

    async fn add_node(
        &self,
        request: Request<proto::AddNodeRequest>,
    ) -> Result<Response<proto::AddNodeResponse>, Status> {
        let (s, _) = self.late.inner.get().ok_or_else(|| Status::unavailable("starting"))?;
        let r = request.into_inner();
        if !super::is_host_port(&r.addr) {
            return Err(Status::invalid_argument(format!("{:?} is not host:port", r.addr)));
        }
        let cluster_id =
            s.node.cluster_id().ok_or_else(|| Status::unavailable("the cluster is not created yet"))?;
        super::members::add_node(s, &cluster_id.0, NodeId(r.id), &r.addr).await?;
        Ok(Response::new(proto::AddNodeResponse {}))
    }

    async fn remove_node(
        &self,
        request: Request<proto::RemoveNodeRequest>,
    ) -> Result<Response<proto::RemoveNodeResponse>, Status> {
        let s = self.shared()?;
        super::members::remove_node(s, NodeId(request.into_inner().id)).await?;
        Ok(Response::new(proto::RemoveNodeResponse {}))
    }

    async fn shard_digest(
        &self,
        request: Request<proto::ShardDigestRequest>,
    ) -> Result<Response<proto::ShardDigestResponse>, Status> {
        let s = self.shared()?;
        let shard = request.into_inner().shard;
        let group = s.shards.at(shard as usize).ok_or_else(|| {
            Status::invalid_argument(format!("no shard {shard}: the cluster has {} shards", s.shards.len()))
        })?;
        if !group.is_replica() {
            return Err(Status::failed_precondition(format!(
                "node {} holds no replica of shard {shard}",
                s.node.id().0
            )));
        }
        let d = group.state_digest().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::ShardDigestResponse {
            node_id: s.node.id().0,
            shard,
            applied_index: d.applied_index.unwrap_or(0),
            stable: d.stable,
            rows: d.rows,
            digest: format!("{:032x}", d.digest),
        }))
    }

    async fn node_info(
        &self,
        _request: Request<proto::NodeInfoRequest>,
    ) -> Result<Response<proto::NodeInfoResponse>, Status> {
        let (s, shards) = self.late.inner.get().ok_or_else(|| Status::unavailable("starting"))?;
        if s.liveness.stopping() {
            return Err(Status::unavailable(format!("node {} is stopping", s.node.id().0)));
        }
        let info = s.meta.read_local(meta::read_cluster).map_err(|e| Status::internal(e.to_string()))?;
        let members = info
            .as_ref()
            .map(|i| {
                i.members
                    .iter()
                    .map(|m| proto::Member { id: m.node.0, addr: m.addr.clone(), alive: true })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(proto::NodeInfoResponse {
            node_id: s.node.id().0,
            incarnation: s.node.identity().incarnation.0,
            // Empty while this node does not know it (a cluster being created).
            cluster_id: s.node.cluster_id().map(|c| c.0).unwrap_or_default(),
            shard_count: *shards,
            initialized: info.is_some(),
            members,
            ready: true,
            hosted: super::view::hosted(s),
        }))
    }
}

/// Pings every member group 0 lists, every `every`, and records who answered; keeps the
/// transport's list of member incarnations up to date.
pub(crate) async fn ping_members(shared: Arc<Shared>, mut stop: watch::Receiver<bool>, every: Duration) {
    // One long-lived channel per member address: a ping is one request, not a new connection.
    let mut channels: HashMap<String, tonic::transport::Channel> = HashMap::new();
    loop {
        let info = shared.meta.read_local(meta::read_cluster).ok().flatten();
        if let Some(info) = &info {
            shared
                .node
                .set_member_incarnations(info.members.iter().map(|m| (m.node, m.incarnation)).collect());
        }
        let cluster_id = info.as_ref().map(|i| i.cluster_id.0.clone()).unwrap_or_default();
        let members: BTreeMap<NodeId, String> =
            info.map(|i| i.members.into_iter().map(|m| (m.node, m.addr)).collect()).unwrap_or_default();
        channels.retain(|addr, _| members.values().any(|a| a == addr));
        shared.liveness.retain(&members);
        let me = shared.node.id();
        let cluster_id = &cluster_id;
        let pings = members.iter().filter(|(id, _)| **id != me).map(|(id, addr)| {
            let channel = match channels.get(addr) {
                Some(c) => Ok(c.clone()),
                None => lazy_channel(addr, shared.node.peers().source_ip()).inspect(|c| {
                    channels.insert(addr.clone(), c.clone());
                }),
            };
            async move {
                // Only the member itself answers for it: a process of another cluster on its
                // address (a directory of another cluster started there) is not the member, and
                // no leadership may move to it.
                let info = match channel {
                    Ok(channel) => node_info_over(channel)
                        .await
                        .ok()
                        .filter(|i| i.node_id == id.0 && i.cluster_id == *cluster_id),
                    Err(_) => None,
                };
                // Whether the member lists this node.
                let lists_me =
                    info.as_ref().filter(|i| i.initialized).map(|i| i.members.iter().any(|m| m.id == me.0));
                let hosted = info.as_ref().map(|i| i.hosted.clone()).unwrap_or_default();
                (*id, info.is_some(), lists_me, hosted)
            }
        });
        let pings: Vec<_> = pings.collect();
        let (mut listed, mut unlisted) = (0, 0);
        for (id, alive, lists_me, hosted) in futures::future::join_all(pings).await {
            shared.liveness.set(id, alive, hosted);
            match lists_me {
                Some(true) => listed += 1,
                Some(false) => unlisted += 1,
                None => {}
            }
        }
        shared.liveness.removed.store(unlisted > listed, std::sync::atomic::Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The cluster's parameters as an API message.
fn config_of(params: &fetter_raft::meta::ClusterParams) -> proto::ClusterConfig {
    proto::ClusterConfig {
        shard_count: params.shard_count,
        retention_ms: params.retention_ms,
        max_payload_bytes: params.max_payload_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fetter_raft::shard::FlowStatus;

    #[test]
    fn a_waiting_start_wakes_on_its_flows_end_and_on_a_snapshot_install() {
        let flow = FlowId::new("order", "o-1");
        let other = FlowId::new("order", "o-2");
        let finished = |f: &FlowId| Action::Finished { flow: f.clone(), status: FlowStatus::Succeeded };
        assert!(wakes(&[finished(&flow)], &flow));
        assert!(!wakes(&[finished(&other)], &flow));
        assert!(!wakes(&[Action::Activate { flow: flow.clone() }], &flow));
        // A replica that caught up by snapshot applied no `Finished` for the flow: the empty
        // batch that announces the install must make the waiter read the flow again.
        assert!(wakes(&[], &flow));
    }
}
