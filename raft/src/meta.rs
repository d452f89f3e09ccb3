//! Group 0's state machine: the cluster's identity, parameters, members and desired placement.
//!
//! Like the shard state machine it is pure over a [`Kv`]: [`apply`] reads no clock, randomness or
//! local configuration, and a rejected command changes nothing. Rows (every key starts with a
//! printable ASCII byte):
//!
//! | key | value |
//! |---|---|
//! | `C` | clock (`u64`, `max` of the batch times applied) |
//! | `B` | the [`ClusterInfo`] given by `Initialize` (to recognize a retried bootstrap) |
//! | `K` | the current [`ClusterInfo`] |
//! | `X` node | the [`Incarnation`] of a removed member (its id may not come back with another disk) |

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::{ClusterId, Incarnation, NodeId, ShardId};
use crate::kv::Overlay;
use crate::kv::{Kv, KvError, KvRead};
use crate::shard::txn;

const CLOCK: &[u8] = b"C";
const BOOTSTRAP: &[u8] = b"B";
const CLUSTER: &[u8] = b"K";
const REMOVED: u8 = b'X';
/// The members on their way out (`BTreeSet<NodeId>`), see [`MetaCommand::Leave`].
const LEAVING: &[u8] = b"L";

fn removed_key(node: NodeId) -> Vec<u8> {
    let mut key = vec![REMOVED];
    key.extend_from_slice(&node.0.to_be_bytes());
    key
}

/// A member node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id.
    pub node: NodeId,
    /// The address of its gRPC port (`host:port`).
    pub addr: String,
    /// The life of its disk: a node id that comes back with another incarnation is refused.
    pub incarnation: Incarnation,
}

/// Parameters fixed or set cluster-wide (they travel to shards inside commands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterParams {
    /// Number of shards, fixed at creation.
    pub shard_count: u32,
    /// How long a finished flow is kept (ms).
    pub retention_ms: u64,
    /// The largest user payload accepted (bytes).
    pub max_payload_bytes: u64,
    /// Replicas of each shard (fewer while the cluster has fewer nodes), fixed at creation.
    pub replicas: u32,
}

impl Default for ClusterParams {
    fn default() -> Self {
        ClusterParams {
            shard_count: 12,
            retention_ms: 7 * 24 * 60 * 60 * 1000,
            max_payload_bytes: 1 << 20,
            replicas: 3,
        }
    }
}

/// The desired placement of one shard group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlacement {
    /// The nodes that should replicate it (voters).
    pub replicas: Vec<NodeId>,
    /// The node that should lead it; one of `replicas`.
    pub preferred_leader: NodeId,
}

/// Everything group 0 knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The cluster's identity.
    pub cluster_id: ClusterId,
    /// Its parameters.
    pub params: ClusterParams,
    /// Its members, by node id.
    pub members: Vec<Member>,
    /// The desired placement of each shard that has one.
    pub placement: BTreeMap<ShardId, ShardPlacement>,
}

impl ClusterInfo {
    /// The member with id `node`.
    pub fn member(&self, node: NodeId) -> Option<&Member> {
        self.members.iter().find(|m| m.node == node)
    }
}

/// The largest payload limit a cluster may set (bytes). A proposal may carry two payloads (an
/// at-least-once result rides with the next step, which may be the flow's output) plus their
/// commands, and the handle refuses a proposal over `handle::MAX_PROPOSAL_BYTES` — a refusal
/// the flow would meet on every activation; a quarter of that leaves room for both.
pub const MAX_PAYLOAD_BYTES_LIMIT: u64 = (crate::handle::MAX_PROPOSAL_BYTES / 4) as u64;

/// A command to group 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Create the cluster (once). Repeating it with the same content is acknowledged.
    Initialize {
        /// The cluster's identity.
        cluster_id: ClusterId,
        /// Its parameters.
        params: ClusterParams,
        /// The first members.
        members: Vec<Member>,
        /// The first placement.
        placement: BTreeMap<ShardId, ShardPlacement>,
    },
    /// Add a member, or update the address of a member with the same incarnation.
    AddMember(Member),
    /// Remove a member (it must hold no replica in the desired placement). Idempotent.
    RemoveMember(NodeId),
    /// Set the desired placement of one shard.
    SetPlacement {
        /// The shard.
        shard: ShardId,
        /// Its placement.
        placement: ShardPlacement,
    },
    /// A member is being removed (`remove-node` has begun): the reconciler gives it no seat
    /// and no leadership from now on. `RemoveMember` ends it. (Appended after `SetParams`.)
    Leave(NodeId),
    /// Change cluster parameters (those given; the shard count is fixed at creation). Every
    /// node follows group 0's parameters.
    SetParams {
        /// How long a finished flow is kept (ms).
        retention_ms: Option<u64>,
        /// The largest user payload accepted (bytes).
        max_payload_bytes: Option<u64>,
    },
}

/// A successful outcome of a metadata command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOutcome {
    /// The cluster was created.
    Initialized,
    /// The cluster already existed with exactly this content.
    AlreadyInitialized,
    /// A new member was added.
    MemberAdded,
    /// A member's address changed.
    MemberUpdated,
    /// A member was removed.
    MemberRemoved,
    /// A shard's placement was set.
    PlacementSet,
    /// Nothing to do: the state already was what the command asks for.
    Unchanged,
    /// Cluster parameters changed.
    ParamsSet,
}

/// Why a metadata command was rejected. A rejected command changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaRejection {
    /// The cluster has not been initialized yet.
    #[error("cluster not initialized")]
    NotInitialized,
    /// `Initialize` of a cluster that exists with other content.
    #[error("cluster already initialized with different content")]
    AlreadyInitialized,
    /// A node id came back with another disk: it must join under a new id.
    #[error("node id {node} already used by incarnation {stored}, not {got}: rejoin under a new id")]
    NodeIdReused {
        /// The node id.
        node: NodeId,
        /// The incarnation that used it.
        stored: Incarnation,
        /// The incarnation that asked.
        got: Incarnation,
    },
    /// The same node id appears twice.
    #[error("node {node} listed twice")]
    DuplicateMember {
        /// The node id.
        node: NodeId,
    },
    /// A member cannot be removed while the placement names it.
    #[error("node {node} still replicates shards {shards:?}")]
    MemberHasReplicas {
        /// The node.
        node: NodeId,
        /// The shards that name it.
        shards: Vec<ShardId>,
    },
    /// A shard number at or above the shard count.
    #[error("shard {shard} out of range (shard count {shard_count})")]
    ShardOutOfRange {
        /// The shard.
        shard: ShardId,
        /// The cluster's shard count.
        shard_count: u32,
    },
    /// A placement without replicas.
    #[error("placement of shard {shard} has no replicas")]
    NoReplicas {
        /// The shard.
        shard: ShardId,
    },
    /// A placement that names a node twice.
    #[error("placement of shard {shard} names {node} twice")]
    DuplicateReplica {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// A placement that names a node which is not a member.
    #[error("placement of shard {shard} names {node}, which is not a member")]
    ReplicaNotMember {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// A preferred leader that is not one of the replicas.
    #[error("preferred leader {node} of shard {shard} is not one of its replicas")]
    PreferredLeaderNotReplica {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// Parameters that cannot work (e.g. zero shards).
    #[error("invalid cluster parameters: {0}")]
    InvalidParams(String),
}

/// The reply to one metadata command.
pub type MetaReply = Result<MetaOutcome, MetaRejection>;

/// Why a command did not go through.
enum Fail {
    Reject(MetaRejection),
    Kv(KvError),
}

impl From<MetaRejection> for Fail {
    fn from(r: MetaRejection) -> Self {
        Fail::Reject(r)
    }
}

impl From<KvError> for Fail {
    fn from(e: KvError) -> Self {
        Fail::Kv(e)
    }
}

/// Applies `cmd` at batch time `now_ms`. A rejection changes nothing (not even the clock);
/// `Err(_)` is a storage failure or a corrupt row.
pub fn apply(kv: &mut dyn Kv, now_ms: u64, cmd: &MetaCommand) -> Result<MetaReply, KvError> {
    let stored_clock: u64 = txn::get(&*kv, CLOCK)?.unwrap_or(0);
    let clock = stored_clock.max(now_ms);
    let (result, writes) = {
        let mut overlay = Overlay::new(&*kv);
        let result = run(&mut overlay, cmd);
        (result, overlay.into_writes())
    };
    match result {
        Ok(outcome) => {
            crate::kv::commit(kv, writes);
            if clock != stored_clock {
                txn::put(kv, CLOCK.to_vec(), &clock)?;
            }
            Ok(Ok(outcome))
        }
        Err(Fail::Reject(rejection)) => Ok(Err(rejection)),
        Err(Fail::Kv(e)) => Err(e),
    }
}

/// The cluster as group 0 knows it, once initialized.
pub fn read_cluster(kv: &dyn KvRead) -> Result<Option<ClusterInfo>, KvError> {
    txn::get(kv, CLUSTER)
}

/// The members being removed ([`MetaCommand::Leave`]).
pub fn read_leaving(kv: &dyn KvRead) -> Result<BTreeSet<NodeId>, KvError> {
    Ok(txn::get(kv, LEAVING)?.unwrap_or_default())
}

/// The batch clock of group 0 (0 before any command).
pub fn meta_clock(kv: &dyn KvRead) -> Result<u64, KvError> {
    Ok(txn::get(kv, CLOCK)?.unwrap_or(0))
}

fn run(kv: &mut dyn Kv, cmd: &MetaCommand) -> Result<MetaOutcome, Fail> {
    if let MetaCommand::Initialize { cluster_id, params, members, placement } = cmd {
        let mut members = members.clone();
        members.sort_by_key(|m| m.node);
        let info = ClusterInfo {
            cluster_id: cluster_id.clone(),
            params: params.clone(),
            members,
            placement: placement.clone(),
        };
        if let Some(initial) = txn::get::<ClusterInfo>(&*kv, BOOTSTRAP)? {
            return if initial == info {
                Ok(MetaOutcome::AlreadyInitialized)
            } else {
                Err(MetaRejection::AlreadyInitialized.into())
            };
        }
        validate(&info)?;
        txn::put(kv, BOOTSTRAP.to_vec(), &info)?;
        txn::put(kv, CLUSTER.to_vec(), &info)?;
        return Ok(MetaOutcome::Initialized);
    }
    let mut info: ClusterInfo = txn::get(&*kv, CLUSTER)?.ok_or(MetaRejection::NotInitialized)?;
    let outcome = match cmd {
        MetaCommand::Initialize { .. } => return Ok(MetaOutcome::Unchanged),
        MetaCommand::AddMember(member) => {
            let removed: Option<Incarnation> = txn::get(&*kv, &removed_key(member.node))?;
            let stored = info.member(member.node).map(|m| m.incarnation).or(removed);
            if let Some(stored) = stored.filter(|s| *s != member.incarnation) {
                return Err(MetaRejection::NodeIdReused {
                    node: member.node,
                    stored,
                    got: member.incarnation,
                }
                .into());
            }
            match info.members.iter_mut().find(|m| m.node == member.node) {
                Some(existing) if existing == member => return Ok(MetaOutcome::Unchanged),
                Some(existing) => {
                    existing.addr = member.addr.clone();
                    MetaOutcome::MemberUpdated
                }
                None => {
                    kv.delete(&removed_key(member.node));
                    info.members.push(member.clone());
                    info.members.sort_by_key(|m| m.node);
                    MetaOutcome::MemberAdded
                }
            }
        }
        MetaCommand::RemoveMember(node) => {
            let Some(member) = info.member(*node).cloned() else { return Ok(MetaOutcome::Unchanged) };
            let shards: Vec<ShardId> =
                info.placement.iter().filter(|(_, p)| p.replicas.contains(node)).map(|(s, _)| *s).collect();
            if !shards.is_empty() {
                return Err(MetaRejection::MemberHasReplicas { node: *node, shards }.into());
            }
            info.members.retain(|m| m.node != *node);
            txn::put(kv, removed_key(*node), &member.incarnation)?;
            let mut leaving = read_leaving(&*kv)?;
            if leaving.remove(node) {
                txn::put(kv, LEAVING.to_vec(), &leaving)?;
            }
            MetaOutcome::MemberRemoved
        }
        MetaCommand::SetPlacement { shard, placement } => {
            if info.placement.get(shard) == Some(placement) {
                return Ok(MetaOutcome::Unchanged);
            }
            validate_placement(&info, *shard, placement)?;
            info.placement.insert(*shard, placement.clone());
            MetaOutcome::PlacementSet
        }
        MetaCommand::Leave(node) => {
            if info.member(*node).is_none() {
                return Ok(MetaOutcome::Unchanged);
            }
            let mut leaving = read_leaving(&*kv)?;
            if !leaving.insert(*node) {
                return Ok(MetaOutcome::Unchanged);
            }
            txn::put(kv, LEAVING.to_vec(), &leaving)?;
            MetaOutcome::MemberUpdated
        }
        MetaCommand::SetParams { retention_ms, max_payload_bytes } => {
            let mut params = info.params.clone();
            if let Some(retention_ms) = retention_ms {
                params.retention_ms = *retention_ms;
            }
            if let Some(max_payload_bytes) = max_payload_bytes {
                params.max_payload_bytes = *max_payload_bytes;
            }
            if params == info.params {
                return Ok(MetaOutcome::Unchanged);
            }
            info.params = params;
            validate(&info)?;
            MetaOutcome::ParamsSet
        }
    };
    txn::put(kv, CLUSTER.to_vec(), &info)?;
    Ok(outcome)
}

fn validate(info: &ClusterInfo) -> Result<(), MetaRejection> {
    let params = &info.params;
    if params.shard_count == 0 {
        return Err(MetaRejection::InvalidParams("shard_count must be at least 1".into()));
    }
    if params.replicas == 0 {
        return Err(MetaRejection::InvalidParams("replicas must be at least 1".into()));
    }
    if params.max_payload_bytes == 0 || params.max_payload_bytes > MAX_PAYLOAD_BYTES_LIMIT {
        return Err(MetaRejection::InvalidParams(format!(
            "max_payload_bytes must be between 1 and {MAX_PAYLOAD_BYTES_LIMIT}, not {}",
            params.max_payload_bytes
        )));
    }
    if info.cluster_id.0.is_empty() {
        return Err(MetaRejection::InvalidParams("cluster id must not be empty".into()));
    }
    let mut seen = BTreeSet::new();
    for member in &info.members {
        if !seen.insert(member.node) {
            return Err(MetaRejection::DuplicateMember { node: member.node });
        }
    }
    for (shard, placement) in &info.placement {
        validate_placement(info, *shard, placement)?;
    }
    Ok(())
}

fn validate_placement(
    info: &ClusterInfo,
    shard: ShardId,
    placement: &ShardPlacement,
) -> Result<(), MetaRejection> {
    let shard_count = info.params.shard_count;
    if shard.0 >= shard_count {
        return Err(MetaRejection::ShardOutOfRange { shard, shard_count });
    }
    if placement.replicas.is_empty() {
        return Err(MetaRejection::NoReplicas { shard });
    }
    let mut seen = BTreeSet::new();
    for node in &placement.replicas {
        if !seen.insert(*node) {
            return Err(MetaRejection::DuplicateReplica { shard, node: *node });
        }
        if info.member(*node).is_none() {
            return Err(MetaRejection::ReplicaNotMember { shard, node: *node });
        }
    }
    if !placement.replicas.contains(&placement.preferred_leader) {
        return Err(MetaRejection::PreferredLeaderNotReplica { shard, node: placement.preferred_leader });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;

    fn member(node: u64, incarnation: u64) -> Member {
        Member {
            node: NodeId(node),
            addr: format!("127.0.0.1:{}", 7000 + node),
            incarnation: Incarnation(incarnation),
        }
    }

    fn placement(replicas: &[u64], leader: u64) -> ShardPlacement {
        ShardPlacement {
            replicas: replicas.iter().copied().map(NodeId).collect(),
            preferred_leader: NodeId(leader),
        }
    }

    fn init_cmd() -> MetaCommand {
        let mut placement_map = BTreeMap::new();
        for s in 0..3 {
            placement_map.insert(ShardId(s), placement(&[1, 2, 3], u64::from(s) + 1));
        }
        MetaCommand::Initialize {
            cluster_id: ClusterId("c-1".into()),
            params: ClusterParams { shard_count: 3, ..ClusterParams::default() },
            members: vec![member(3, 30), member(1, 10), member(2, 20)],
            placement: placement_map,
        }
    }

    /// Applies `cmd`; on a rejection, checks that nothing changed.
    fn run(kv: &mut MemKv, now: u64, cmd: MetaCommand) -> MetaReply {
        let before = kv.clone();
        let reply = apply(kv, now, &cmd).unwrap();
        if reply.is_err() {
            assert_eq!(*kv, before, "a rejected {cmd:?} changed the state");
        }
        reply
    }

    fn initialized() -> MemKv {
        let mut kv = MemKv::new();
        assert_eq!(run(&mut kv, 100, init_cmd()), Ok(MetaOutcome::Initialized));
        kv
    }

    #[test]
    fn defaults() {
        let p = ClusterParams::default();
        assert_eq!(
            (p.shard_count, p.retention_ms, p.max_payload_bytes, p.replicas),
            (12, 604_800_000, 1_048_576, 3)
        );
    }

    #[test]
    fn params_change_cluster_wide_within_bounds() {
        let mut kv = initialized();
        let set =
            |retention_ms, max_payload_bytes| MetaCommand::SetParams { retention_ms, max_payload_bytes };
        assert_eq!(run(&mut kv, 101, set(Some(2_000), None)), Ok(MetaOutcome::ParamsSet));
        let params = read_cluster(&kv).unwrap().unwrap().params;
        assert_eq!((params.shard_count, params.retention_ms, params.max_payload_bytes), (3, 2_000, 1 << 20));
        assert_eq!(run(&mut kv, 102, set(Some(2_000), None)), Ok(MetaOutcome::Unchanged));
        assert_eq!(run(&mut kv, 103, set(None, Some(4 << 20))), Ok(MetaOutcome::ParamsSet));
        assert!(matches!(run(&mut kv, 104, set(None, Some(0))), Err(MetaRejection::InvalidParams(_))));
        assert!(matches!(
            run(&mut kv, 105, set(Some(1), Some(64 << 20))),
            Err(MetaRejection::InvalidParams(_))
        ));
        assert_eq!(read_cluster(&kv).unwrap().unwrap().params.max_payload_bytes, 4 << 20);
        assert_eq!(run(&mut MemKv::new(), 1, set(Some(1), None)), Err(MetaRejection::NotInitialized));
    }

    #[test]
    fn a_leaving_member_is_listed_until_it_is_removed() {
        let mut kv = initialized();
        assert_eq!(run(&mut kv, 101, MetaCommand::Leave(NodeId(2))), Ok(MetaOutcome::MemberUpdated));
        assert_eq!(run(&mut kv, 102, MetaCommand::Leave(NodeId(2))), Ok(MetaOutcome::Unchanged));
        assert_eq!(run(&mut kv, 103, MetaCommand::Leave(NodeId(9))), Ok(MetaOutcome::Unchanged));
        assert_eq!(read_leaving(&kv).unwrap(), BTreeSet::from([NodeId(2)]));
        for s in 0..3 {
            let cmd = MetaCommand::SetPlacement { shard: ShardId(s), placement: placement(&[1, 3], 1) };
            assert_eq!(run(&mut kv, 104, cmd), Ok(MetaOutcome::PlacementSet));
        }
        assert_eq!(run(&mut kv, 105, MetaCommand::RemoveMember(NodeId(2))), Ok(MetaOutcome::MemberRemoved));
        assert!(read_leaving(&kv).unwrap().is_empty());
    }

    #[test]
    fn commands_before_initialize_are_rejected() {
        let mut kv = MemKv::new();
        assert_eq!(run(&mut kv, 1, MetaCommand::AddMember(member(1, 1))), Err(MetaRejection::NotInitialized));
        assert_eq!(run(&mut kv, 1, MetaCommand::RemoveMember(NodeId(1))), Err(MetaRejection::NotInitialized));
        let cmd = MetaCommand::SetPlacement { shard: ShardId(0), placement: placement(&[1], 1) };
        assert_eq!(run(&mut kv, 1, cmd), Err(MetaRejection::NotInitialized));
        assert!(kv.rows.is_empty());
        assert_eq!(read_cluster(&kv).unwrap(), None);
    }

    #[test]
    fn initialize_once_and_idempotently() {
        let mut kv = initialized();
        let info = read_cluster(&kv).unwrap().unwrap();
        assert_eq!(info.cluster_id, ClusterId("c-1".into()));
        assert_eq!(info.members.iter().map(|m| m.node.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(info.placement.len(), 3);
        assert_eq!(meta_clock(&kv).unwrap(), 100);

        // The same bootstrap again (a retry), even after later changes: acknowledged.
        assert_eq!(run(&mut kv, 101, MetaCommand::AddMember(member(4, 40))), Ok(MetaOutcome::MemberAdded));
        assert_eq!(run(&mut kv, 102, init_cmd()), Ok(MetaOutcome::AlreadyInitialized));
        // Other content: rejected.
        let MetaCommand::Initialize { members, placement, params, .. } = init_cmd() else { unreachable!() };
        let other =
            MetaCommand::Initialize { cluster_id: ClusterId("c-2".into()), params, members, placement };
        assert_eq!(run(&mut kv, 103, other), Err(MetaRejection::AlreadyInitialized));
        assert_eq!(read_cluster(&kv).unwrap().unwrap().members.len(), 4);
    }

    #[test]
    fn initialize_validates() {
        let bad = |edit: &dyn Fn(&mut ClusterInfo)| {
            let MetaCommand::Initialize { cluster_id, params, members, placement } = init_cmd() else {
                unreachable!()
            };
            let mut info = ClusterInfo { cluster_id, params, members, placement };
            edit(&mut info);
            let mut kv = MemKv::new();
            let cmd = MetaCommand::Initialize {
                cluster_id: info.cluster_id,
                params: info.params,
                members: info.members,
                placement: info.placement,
            };
            run(&mut kv, 1, cmd).unwrap_err()
        };
        assert!(matches!(bad(&|i| i.params.shard_count = 0), MetaRejection::InvalidParams(_)));
        assert!(matches!(bad(&|i| i.params.replicas = 0), MetaRejection::InvalidParams(_)));
        assert!(matches!(bad(&|i| i.cluster_id.0.clear()), MetaRejection::InvalidParams(_)));
        assert_eq!(
            bad(&|i| i.members.push(member(1, 11))),
            MetaRejection::DuplicateMember { node: NodeId(1) }
        );
        assert_eq!(
            bad(&|i| {
                i.placement.insert(ShardId(3), placement(&[1], 1));
            }),
            MetaRejection::ShardOutOfRange { shard: ShardId(3), shard_count: 3 }
        );
        assert_eq!(
            bad(&|i| {
                i.placement.insert(ShardId(0), placement(&[1, 9], 1));
            }),
            MetaRejection::ReplicaNotMember { shard: ShardId(0), node: NodeId(9) }
        );
    }

    #[test]
    fn add_member_rules() {
        let mut kv = initialized();
        assert_eq!(run(&mut kv, 2, MetaCommand::AddMember(member(4, 40))), Ok(MetaOutcome::MemberAdded));
        assert_eq!(run(&mut kv, 3, MetaCommand::AddMember(member(4, 40))), Ok(MetaOutcome::Unchanged));
        let moved = Member { addr: "10.0.0.4:7000".into(), ..member(4, 40) };
        assert_eq!(run(&mut kv, 4, MetaCommand::AddMember(moved.clone())), Ok(MetaOutcome::MemberUpdated));
        assert_eq!(read_cluster(&kv).unwrap().unwrap().member(NodeId(4)), Some(&moved));
        assert_eq!(
            run(&mut kv, 5, MetaCommand::AddMember(member(4, 41))),
            Err(MetaRejection::NodeIdReused {
                node: NodeId(4),
                stored: Incarnation(40),
                got: Incarnation(41)
            })
        );
    }

    #[test]
    fn remove_member_rules() {
        let mut kv = initialized();
        // Node 1 replicates every shard.
        assert_eq!(
            run(&mut kv, 2, MetaCommand::RemoveMember(NodeId(1))),
            Err(MetaRejection::MemberHasReplicas {
                node: NodeId(1),
                shards: vec![ShardId(0), ShardId(1), ShardId(2)]
            })
        );
        assert_eq!(run(&mut kv, 3, MetaCommand::AddMember(member(4, 40))), Ok(MetaOutcome::MemberAdded));
        assert_eq!(run(&mut kv, 4, MetaCommand::RemoveMember(NodeId(4))), Ok(MetaOutcome::MemberRemoved));
        assert_eq!(run(&mut kv, 5, MetaCommand::RemoveMember(NodeId(4))), Ok(MetaOutcome::Unchanged));
        assert!(read_cluster(&kv).unwrap().unwrap().member(NodeId(4)).is_none());
        // A removed id may come back with its disk, never with another one.
        assert_eq!(
            run(&mut kv, 6, MetaCommand::AddMember(member(4, 44))),
            Err(MetaRejection::NodeIdReused {
                node: NodeId(4),
                stored: Incarnation(40),
                got: Incarnation(44)
            })
        );
        assert_eq!(run(&mut kv, 7, MetaCommand::AddMember(member(4, 40))), Ok(MetaOutcome::MemberAdded));
    }

    #[test]
    fn set_placement_rules() {
        let mut kv = initialized();
        let set =
            |shard: u32, p: ShardPlacement| MetaCommand::SetPlacement { shard: ShardId(shard), placement: p };
        assert_eq!(run(&mut kv, 2, set(0, placement(&[1, 2], 2))), Ok(MetaOutcome::PlacementSet));
        assert_eq!(run(&mut kv, 3, set(0, placement(&[1, 2], 2))), Ok(MetaOutcome::Unchanged));
        assert_eq!(
            read_cluster(&kv).unwrap().unwrap().placement.get(&ShardId(0)),
            Some(&placement(&[1, 2], 2))
        );
        assert_eq!(
            run(&mut kv, 4, set(3, placement(&[1], 1))),
            Err(MetaRejection::ShardOutOfRange { shard: ShardId(3), shard_count: 3 })
        );
        assert_eq!(
            run(&mut kv, 4, set(1, placement(&[], 1))),
            Err(MetaRejection::NoReplicas { shard: ShardId(1) })
        );
        assert_eq!(
            run(&mut kv, 4, set(1, placement(&[1, 1], 1))),
            Err(MetaRejection::DuplicateReplica { shard: ShardId(1), node: NodeId(1) })
        );
        assert_eq!(
            run(&mut kv, 4, set(1, placement(&[1, 7], 1))),
            Err(MetaRejection::ReplicaNotMember { shard: ShardId(1), node: NodeId(7) })
        );
        assert_eq!(
            run(&mut kv, 4, set(1, placement(&[1, 2], 3))),
            Err(MetaRejection::PreferredLeaderNotReplica { shard: ShardId(1), node: NodeId(3) })
        );
        // Node 3 no longer replicates shard 0; once it leaves shards 1 and 2 it can be removed.
        assert_eq!(run(&mut kv, 5, set(1, placement(&[1, 2], 1))), Ok(MetaOutcome::PlacementSet));
        assert_eq!(run(&mut kv, 6, set(2, placement(&[1, 2], 1))), Ok(MetaOutcome::PlacementSet));
        assert_eq!(run(&mut kv, 7, MetaCommand::RemoveMember(NodeId(3))), Ok(MetaOutcome::MemberRemoved));
    }

    #[test]
    fn clock_is_monotonic_and_untouched_by_rejections() {
        let mut kv = initialized();
        run(&mut kv, 50, MetaCommand::AddMember(member(4, 40))).unwrap();
        assert_eq!(meta_clock(&kv).unwrap(), 100);
        run(&mut kv, 500, MetaCommand::AddMember(member(4, 41))).unwrap_err();
        assert_eq!(meta_clock(&kv).unwrap(), 100);
        run(&mut kv, 500, MetaCommand::AddMember(member(5, 50))).unwrap();
        assert_eq!(meta_clock(&kv).unwrap(), 500);
    }

    #[test]
    fn keys_are_printable() {
        let kv = initialized();
        let mut kv = kv;
        run(&mut kv, 2, MetaCommand::AddMember(member(4, 40))).unwrap();
        run(&mut kv, 3, MetaCommand::RemoveMember(NodeId(4))).unwrap();
        assert!(kv.rows.keys().all(|k| k.first().is_some_and(u8::is_ascii_graphic)));
    }

    #[test]
    fn same_commands_same_state() {
        let cmds = [
            init_cmd(),
            MetaCommand::AddMember(member(4, 40)),
            MetaCommand::SetPlacement { shard: ShardId(1), placement: placement(&[2, 4], 4) },
            MetaCommand::AddMember(member(4, 41)),
            MetaCommand::RemoveMember(NodeId(3)),
        ];
        let run_all = || {
            let mut kv = MemKv::new();
            let replies: Vec<MetaReply> =
                cmds.iter().enumerate().map(|(i, c)| apply(&mut kv, i as u64, c).unwrap()).collect();
            (kv, replies)
        };
        assert_eq!(run_all(), run_all());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Random bytes as commands: decoding fails cleanly or yields a command that applies cleanly.
        let mut kv = initialized();
        for len in 0..400 {
            let mut buf = vec![crate::codec::FORMAT_VERSION];
            buf.extend((0..len).map(|_| next() as u8));
            if let Ok(cmd) = crate::codec::decode::<MetaCommand>(&buf) {
                let _ = run(&mut kv, next(), cmd);
            }
        }
        // Random well-formed commands with small ids, so that they collide.
        for _ in 0..2000 {
            let node = next() % 6;
            let cmd = match next() % 5 {
                0 => MetaCommand::AddMember(member(node, next() % 3)),
                1 => MetaCommand::RemoveMember(NodeId(node)),
                2 => {
                    let replicas: Vec<u64> = (0..next() % 4).map(|_| next() % 6).collect();
                    let shard = (next() % 5) as u32;
                    MetaCommand::SetPlacement {
                        shard: ShardId(shard),
                        placement: placement(&replicas, next() % 6),
                    }
                }
                3 => init_cmd(),
                _ => MetaCommand::Initialize {
                    cluster_id: ClusterId(String::new()),
                    params: ClusterParams { shard_count: (next() % 2) as u32, ..ClusterParams::default() },
                    members: vec![],
                    placement: BTreeMap::new(),
                },
            };
            let _ = run(&mut kv, next() % 1000, cmd);
            // The invariant the rules keep: the placement only names members.
            let info = read_cluster(&kv).unwrap().unwrap();
            for p in info.placement.values() {
                assert!(p.replicas.iter().all(|n| info.member(*n).is_some()));
                assert!(p.replicas.contains(&p.preferred_leader));
            }
        }
        // Corrupt rows are an error, never a panic.
        let mut kv = initialized();
        kv.put(CLUSTER.to_vec(), vec![crate::codec::FORMAT_VERSION, 0xff, 0xff]);
        assert!(matches!(
            apply(&mut kv, 1, &MetaCommand::RemoveMember(NodeId(1))),
            Err(KvError::Corrupt { .. })
        ));
        assert!(read_cluster(&kv).is_err());
    }
}
