//! Forwarding to the leader: proposals and linearizable reads that reach a replica which does
//! not lead the group travel to the leader over the Raft transport (DESIGN.md §3 "Routing").
//!
//! A forwarded proposal is proposed by the leader itself, never re-forwarded (one hop); the
//! sender follows "not leader" hints and retries within its time budget while an election runs,
//! then answers [`Error::NoLeader`]. It retries after "not leader" and after a refused or broken
//! connection (the request may have reached the old leader); a request without an answer within
//! the budget is reported as [`Error::Timeout`]. Commands sent this way must therefore be
//! idempotent — starts (same input), messages with an idempotency key, control-panel mutations
//! under a request id (`ShardCommand::AdminRequest`), outbox deliveries (numbered) — which is
//! what ingress and outbox delivery send. Activations never forward: see [`GroupHandle::propose`].

use std::time::Duration;

use tokio::time::Instant;

use super::{Error, GroupHandle, Routes};
use crate::codec;
use crate::ids::NodeId;
use crate::meta::{MetaCommand, MetaReply};
use crate::shard::{ShardAnswer, ShardCommand, ShardQuery, ShardReply};
use crate::transport::proto::raft_response::Result as ProtoResult;
use crate::transport::proto::{RaftRequest, RpcKind};
use crate::transport::CallError;
use crate::types::{Command, Reply};

/// Pause before asking again while no leader is known or reachable.
const NO_LEADER_PAUSE: Duration = Duration::from_millis(50);

/// Where to send the next attempt.
enum Target {
    Here,
    Remote(NodeId, String),
    Unknown,
}

impl GroupHandle {
    /// Proposes `command` through whichever node leads the group (this one or another, following
    /// hints), within the group's proposal budget. See the module documentation for when this is
    /// allowed instead of [`GroupHandle::propose`].
    pub async fn submit(&self, command: Command) -> Result<Reply, Error> {
        let deadline = Instant::now() + self.inner.propose_timeout;
        let command = &command;
        self.via_leader(deadline, |remote| async move {
            match remote {
                None => self.propose(command.clone()).await,
                Some((node, addr)) => self.forward(node, &addr, command, deadline).await,
            }
        })
        .await
    }

    /// Whether this node is a member (voter or learner) of the group, as far as it knows: it
    /// receives the group's log and holds its state.
    pub fn is_replica(&self) -> bool {
        let metrics = self.inner.raft.metrics().borrow().clone();
        metrics.membership_config.membership().get_node(&self.node_id().0).is_some()
    }

    /// Where proposals go while this node is not a member of the group: `routes` names the
    /// nodes that host it (the shard's placement). The first that answers forwards to its
    /// leader's hint; a route that fails is followed by the next.
    pub fn set_routes(&self, routes: Routes) {
        *crate::sync::write(&self.inner.routes) = Some(routes);
    }

    /// A node from the routes (not this one), turning through them call by call.
    fn route(&self) -> Option<(NodeId, String)> {
        let routes = crate::sync::read(&self.inner.routes).clone()?;
        let me = self.node_id();
        let nodes: Vec<(NodeId, String)> = routes().into_iter().filter(|(n, _)| *n != me).collect();
        if nodes.is_empty() {
            return None;
        }
        let turn = self.inner.next_route.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(nodes[turn % nodes.len()].clone())
    }

    /// Runs `attempt` on the leader this replica knows of (`None`: this node; else the leader's
    /// id and address), following "not leader" hints and retrying after a refused or broken
    /// connection, waiting out elections, until `deadline`; then [`Error::NoLeader`]. A node
    /// that is not a member of the group starts from one of its routes ([`GroupHandle::set_routes`]).
    pub(super) async fn via_leader<T, F, Fut>(&self, deadline: Instant, attempt: F) -> Result<T, Error>
    where
        F: Fn(Option<(NodeId, String)>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let group = self.inner.group;
        let mut target = self.leader_target();
        let mut last: String;
        loop {
            let outcome = match target {
                Target::Here => attempt(None).await,
                Target::Remote(node, ref addr) => attempt(Some((node, addr.clone()))).await,
                Target::Unknown => Err(Error::NotLeader { group, leader: None, leader_addr: None }),
            };
            match outcome {
                Err(Error::NotLeader { leader, leader_addr, .. }) => {
                    last = format!("not leader (hint: {leader:?})");
                    target = match (leader, leader_addr) {
                        (Some(l), _) if l == self.node_id() => Target::Here,
                        (Some(l), Some(addr)) => Target::Remote(l, addr),
                        _ => Target::Unknown,
                    };
                }
                Err(Error::Unavailable { reason, .. }) if reason.starts_with("unreachable") => {
                    last = reason;
                    target = Target::Unknown;
                }
                // A route that no longer hosts the group (its replica moved away): the next.
                Err(Error::Unavailable { reason, .. }) if !self.is_replica() => {
                    last = reason;
                    target = Target::Unknown;
                }
                Err(e @ Error::NotHosted(_)) if !self.is_replica() => {
                    last = e.to_string();
                    target = Target::Unknown;
                }
                other => return other,
            }
            if Instant::now() >= deadline {
                return Err(Error::NoLeader { group, reason: last });
            }
            if matches!(target, Target::Unknown) {
                tokio::time::sleep(NO_LEADER_PAUSE).await;
                target = self.leader_target();
            }
        }
    }

    /// Runs `query` linearizably on a replica of the group: this node's, or (on a node that holds
    /// none) one that its routes lead to.
    pub async fn query(&self, query: &ShardQuery) -> Result<ShardAnswer, Error> {
        if self.is_replica() {
            return self.query_here(query).await;
        }
        let group = self.inner.group;
        let deadline = Instant::now() + self.inner.propose_timeout;
        self.via_leader(deadline, |remote| async move {
            let Some((node, addr)) = remote else { return self.query_here(query).await };
            self.inner.forwarded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let payload = codec::encode(query)
                .map_err(|e| Error::Internal { group, reason: format!("cannot encode query: {e}") })?;
            let bytes = self.call(&addr, RpcKind::Query, payload, deadline).await?;
            codec::decode::<Result<ShardAnswer, Error>>(&bytes).map_err(|e| Error::Internal {
                group,
                reason: format!("undecodable answer from node {node}: {e}"),
            })?
        })
        .await
    }

    /// Runs `query` on this node's replica ([`Error::NotHosted`] without one).
    pub(crate) async fn query_here(&self, query: &ShardQuery) -> Result<ShardAnswer, Error> {
        let group = self.inner.group;
        self.read(|kv| query.run(kv)).await?.map_err(|e| Error::Internal { group, reason: e.to_string() })
    }

    /// [`GroupHandle::submit`] for a shard command.
    pub async fn submit_shard(&self, command: ShardCommand) -> Result<ShardReply, Error> {
        self.shard_reply(self.submit(Command::Shard(command)).await?)
    }

    /// [`GroupHandle::submit`] for a metadata command.
    pub async fn submit_meta(&self, command: MetaCommand) -> Result<MetaReply, Error> {
        self.meta_reply(self.submit(Command::Meta(command)).await?)
    }

    /// Waits until this replica has applied everything committed before the call: the leader's
    /// read index, confirmed with a quorum (asked over the transport when another node leads).
    pub(crate) async fn read_barrier(&self) -> Result<(), Error> {
        let group = self.inner.group;
        let deadline = Instant::now() + self.inner.propose_timeout;
        let index = self
            .via_leader(deadline, |remote| async move {
                match remote {
                    None => self.read_index_here().await,
                    Some((_, addr)) => self.remote_read_index(&addr, deadline).await,
                }
            })
            .await?;
        let left = deadline.saturating_duration_since(Instant::now());
        match self.inner.raft.wait(Some(left)).applied_index_at_least(index, "read").await {
            Ok(_) => Ok(()),
            Err(openraft::metrics::WaitError::Timeout(..)) => Err(Error::Timeout(group)),
            Err(openraft::metrics::WaitError::ShuttingDown) => Err(Error::ShuttingDown(group)),
        }
    }

    /// The address of `node` in the group's membership.
    pub(crate) fn addr_of(&self, node: NodeId) -> Option<String> {
        let metrics = self.inner.raft.metrics().borrow().clone();
        metrics.membership_config.membership().get_node(&node.0).map(|n| n.addr.clone())
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.peers.identity().node_id
    }

    /// The leader this replica knows of, with its address from the group's membership; on a
    /// node that is not a member, one of the routes.
    fn leader_target(&self) -> Target {
        let metrics = self.inner.raft.metrics().borrow().clone();
        let member = metrics.membership_config.membership().get_node(&self.node_id().0).is_some();
        if !member {
            return match self.route() {
                Some((node, addr)) => Target::Remote(node, addr),
                None => Target::Unknown,
            };
        }
        let Some(leader) = metrics.current_leader else { return Target::Unknown };
        if leader == self.node_id().0 {
            return Target::Here;
        }
        match metrics.membership_config.membership().get_node(&leader) {
            Some(node) => Target::Remote(NodeId(leader), node.addr.clone()),
            None => Target::Unknown,
        }
    }

    pub(crate) async fn call(
        &self,
        addr: &str,
        kind: RpcKind,
        payload: Vec<u8>,
        deadline: Instant,
    ) -> Result<Vec<u8>, Error> {
        let group = self.inner.group;
        let id = self.inner.peers.identity();
        let request = RaftRequest {
            group: group.0,
            cluster_id: id.wire_cluster_id(),
            from_node: id.node_id.0,
            incarnation: id.incarnation.0,
            kind: kind as i32,
            payload,
        };
        let budget = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        // A call of its own, never in a Raft batch: a forwarded proposal waits for its commit, and
        // heartbeats batched behind it would wait too.
        match self.inner.peers.call(addr, request, budget).await {
            Ok(ProtoResult::Ok(bytes)) => Ok(bytes),
            Ok(ProtoResult::Error(e)) => {
                Err(Error::Unavailable { group, reason: format!("{addr} refused: {}", e.message) })
            }
            Err(CallError::Unreachable(e)) => {
                Err(Error::Unavailable { group, reason: format!("unreachable: {addr}: {e}") })
            }
            Err(CallError::Timeout) => Err(Error::Timeout(group)),
            // A broken connection: the request may have reached the leader, but what is sent this
            // way is idempotent, so it is tried again (with the next leader).
            Err(CallError::Failed(e)) => {
                Err(Error::Unavailable { group, reason: format!("unreachable: {addr}: {e}") })
            }
        }
    }

    async fn forward(
        &self,
        node: NodeId,
        addr: &str,
        command: &Command,
        deadline: Instant,
    ) -> Result<Reply, Error> {
        let group = self.inner.group;
        self.inner.forwarded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let payload = codec::encode(command)
            .map_err(|e| Error::Internal { group, reason: format!("cannot encode command: {e}") })?;
        let bytes = self.call(addr, RpcKind::Propose, payload, deadline).await?;
        let outcome: Result<Reply, Error> = codec::decode(&bytes).map_err(|e| Error::Internal {
            group,
            reason: format!("undecodable reply from node {node}: {e}"),
        })?;
        outcome
    }

    async fn remote_read_index(&self, addr: &str, deadline: Instant) -> Result<Option<u64>, Error> {
        let group = self.inner.group;
        self.inner.forwarded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bytes = self.call(addr, RpcKind::ReadIndex, Vec::new(), deadline).await?;
        let outcome: Result<Option<u64>, Error> = codec::decode(&bytes)
            .map_err(|e| Error::Internal { group, reason: format!("undecodable read index: {e}") })?;
        outcome
    }
}
