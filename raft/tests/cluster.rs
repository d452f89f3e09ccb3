//! Cluster tests of the replicated journal: 3 nodes in this process on loopback, each with its
//! own sled directory, talking real tonic.

#[path = "cluster/harness.rs"]
mod harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use std::collections::BTreeSet;

use fetter_raft::handle;
use fetter_raft::ids::{ClusterId, Epoch, FlowId, GroupId, Incarnation, NodeId, ShardId};
use fetter_raft::meta::{self, ClusterInfo, ClusterParams, Member, MetaCommand, MetaOutcome, ShardPlacement};
use fetter_raft::node::{self, NodeConfig, RaftNode};
use fetter_raft::placement;
use fetter_raft::shard::{self, EffectKind, Event, Rejection, ShardCommand, ShardOutcome};
use fetter_raft::transport::proto::raft_transport_client::RaftTransportClient;
use fetter_raft::transport::proto::{raft_response, ErrorCode, RaftBatch, RaftRequest, RpcKind};
use fetter_raft::transport::MAX_BATCH_REQUESTS;
use fetter_raft::types::{Command, Reply};
use harness::{eventually, expect_ok, flow_on, Cluster, WAIT};

fn g(shard: u32) -> GroupId {
    GroupId::of_shard(ShardId(shard))
}

fn message(i: u64) -> ShardCommand {
    ShardCommand::AppendEvent {
        flow: flow_on(0, 1, "log"),
        event: Event::Message {
            type_name: "Note".into(),
            payload: format!("{{\"i\":{i}}}").into_bytes(),
            idempotency_key: None,
        },
    }
}

/// The `Started` marker of an at-most-once effect of the log flow (new work).
fn effect_started(epoch: u64, effect_id: &str) -> ShardCommand {
    ShardCommand::EffectStarted {
        flow: flow_on(0, 1, "log"),
        epoch: Epoch(epoch),
        effect_id: effect_id.into(),
        kind: EffectKind::Effect,
        type_name: "u32".into(),
    }
}

async fn start_log_flow(c: &Cluster) -> Result<()> {
    let start = ShardCommand::Start { flow: flow_on(0, 1, "log"), input: b"{}".to_vec(), parent: None };
    expect_ok(c.propose(g(0), start).await?)?;
    Ok(())
}

async fn events_len(c: &Cluster, node: u64) -> Result<u64> {
    let flow = flow_on(0, 1, "log");
    let rec = c.handle(node, g(0))?.read_local(|kv| shard::get_flow(kv, &flow))?;
    Ok(rec.ok_or_else(|| anyhow!("flow missing on node {node}"))?.events_len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_reach_all_replicas() -> Result<()> {
    let c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    let leader = c.leader(g(0)).await?;
    let h = c.handle(leader, g(0))?;
    // Concurrent proposals: group commit packs them, every one gets its own reply.
    let replies = futures::future::join_all((0..200).map(|i| h.propose_shard(message(i)))).await;
    let mut seqs: Vec<u64> = Vec::new();
    for r in replies {
        match r?? {
            ShardOutcome::Appended { seq } => seqs.push(seq),
            other => return Err(anyhow!("unexpected {other:?}")),
        }
    }
    seqs.sort_unstable();
    ensure!(seqs == (0..200).collect::<Vec<_>>(), "each command applied once, in one order");
    c.converge(g(0)).await?;
    let reference = c.state(leader, g(0))?;
    for id in 1..=3 {
        ensure!(events_len(&c, id).await? == 200, "node {id} has every event");
        ensure!(c.state(id, g(0))? == reference, "node {id}'s state equals the leader's");
    }
    // Equal states have equal digests at the same index; one more command changes it.
    let digest = c.handle(leader, g(0))?.state_digest()?;
    ensure!(digest.stable && digest.rows > 0, "{digest:?}");
    for id in 1..=3 {
        let d = c.handle(id, g(0))?.state_digest()?;
        ensure!(d == digest, "node {id}'s digest {d:?} differs from the leader's {digest:?}");
    }
    expect_ok(h.propose_shard(message(200)).await?)?;
    c.converge(g(0)).await?;
    let after = c.handle(leader, g(0))?.state_digest()?;
    ensure!(after.digest != digest.digest && after.applied_index > digest.applied_index, "{after:?}");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_leader_elects_another_and_loses_nothing() -> Result<()> {
    let mut c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    for i in 0..50 {
        expect_ok(c.propose(g(0), message(i)).await?)?;
    }
    let old = c.leader(g(0)).await?;
    c.stop(old).await?;
    let new = c.leader(g(0)).await?;
    ensure!(new != old, "a new leader was elected");
    for i in 50..100 {
        expect_ok(c.propose(g(0), message(i)).await?)?;
    }
    c.converge(g(0)).await?;
    for id in c.running() {
        ensure!(events_len(&c, id).await? == 100, "node {id} lost no acknowledged command");
    }
    // The old leader comes back as a follower and catches up.
    c.restart(old).await?;
    c.converge(g(0)).await?;
    ensure!(events_len(&c, old).await? == 100);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_recovers_from_disk_and_catches_up() -> Result<()> {
    let mut c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    for i in 0..30 {
        expect_ok(c.propose(g(0), message(i)).await?)?;
    }
    c.converge(g(0)).await?;
    let leader = c.leader(g(0)).await?;
    let follower = (1..=3).find(|id| *id != leader).ok_or_else(|| anyhow!("no follower"))?;
    c.stop(follower).await?;
    for i in 30..60 {
        expect_ok(c.propose(g(0), message(i)).await?)?;
    }
    c.restart(follower).await?;
    // Straight from its sled directory it knows at least what it had before it stopped.
    let recovered = events_len(&c, follower).await?;
    ensure!(recovered >= 30, "recovered {recovered} events from disk");
    c.converge(g(0)).await?;
    ensure!(events_len(&c, follower).await? == 60, "caught up");
    ensure!(c.state(follower, g(0))? == c.state(leader, g(0))?);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_behind_purged_logs_catches_up_by_snapshot() -> Result<()> {
    // Snapshot every 20 entries and keep no log behind it.
    let mut c = Cluster::start(3, 1, 20).await?;
    start_log_flow(&c).await?;
    let leader = c.leader(g(0)).await?;
    let lagger = (1..=3).find(|id| *id != leader).ok_or_else(|| anyhow!("no follower"))?;
    c.converge(g(0)).await?;
    let lagger_applied = c.handle(lagger, g(0))?.status().borrow().last_applied.unwrap_or(0);
    c.stop(lagger).await?;
    // One entry each, so the log grows well past the snapshot threshold.
    for i in 0..120 {
        expect_ok(c.propose(g(0), message(i)).await?)?;
    }
    let h = c.handle(leader, g(0))?;
    eventually("the leader purged the entries the lagger lacks", || async {
        let purged = h.raft().metrics().borrow().purged.map(|p| p.index)?;
        (purged > lagger_applied + 1).then_some(())
    })
    .await?;
    c.restart(lagger).await?;
    c.converge(g(0)).await?;
    let lh = c.handle(lagger, g(0))?;
    ensure!(lh.raft().metrics().borrow().snapshot.is_some(), "the lagger installed a snapshot");
    drop(lh);
    ensure!(events_len(&c, lagger).await? == 120);
    ensure!(c.state(lagger, g(0))? == c.state(leader, g(0))?, "identical state after install");
    let (ld, lgd) = (c.handle(leader, g(0))?.state_digest()?, c.handle(lagger, g(0))?.state_digest()?);
    ensure!(ld == lgd, "digests after install: leader {ld:?}, lagger {lgd:?}");
    // And the installed state survives a restart.
    c.stop(lagger).await?;
    c.restart(lagger).await?;
    ensure!(events_len(&c, lagger).await? == 120, "installed snapshot survived restart");
    c.shutdown().await;
    Ok(())
}

fn complete(flow: &fetter_raft::ids::FlowId, epoch: u64, id: &str) -> ShardCommand {
    ShardCommand::EffectCompleted {
        flow: flow.clone(),
        epoch: Epoch(epoch),
        effect_id: id.into(),
        kind: EffectKind::Effect,
        type_name: "T".into(),
        value: b"1".to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_activation_fences_older_one() -> Result<()> {
    let c = Cluster::start(3, 1, 10_000).await?;
    let flow = flow_on(0, 1, "fenced");
    expect_ok(
        c.propose(g(0), ShardCommand::Start { flow: flow.clone(), input: b"{}".to_vec(), parent: None })
            .await?,
    )?;
    // The start committed the flow's first activation (epoch 1) with it: no `Activate` of its own.
    expect_ok(c.propose(g(0), complete(&flow, 1, "a")).await?)?;
    expect_ok(c.propose(g(0), ShardCommand::Activate { flow: flow.clone(), epoch: Epoch(2) }).await?)?;
    let stale = c.propose(g(0), complete(&flow, 1, "b")).await?;
    ensure!(
        stale == Err(Rejection::StaleEpoch { got: Epoch(1), current: Epoch(2) }),
        "stale activation rejected, got {stale:?}"
    );
    c.converge(g(0)).await?;
    for id in 1..=3 {
        let b = c.handle(id, g(0))?.read_local(|kv| shard::get_effect(kv, &flow, "b"))?;
        ensure!(b.is_none(), "node {id}: the stale command changed nothing");
    }
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_proposed_through_old_leader_is_fenced_after_leader_change() -> Result<()> {
    let mut c = Cluster::start(3, 1, 10_000).await?;
    let flow = flow_on(0, 1, "zombie");
    expect_ok(
        c.propose(g(0), ShardCommand::Start { flow: flow.clone(), input: b"{}".to_vec(), parent: None })
            .await?,
    )?;
    // The start committed the flow's first activation (epoch 1) with it: no `Activate` of its own.
    c.converge(g(0)).await?;
    let old = c.leader(g(0)).await?;
    let others: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    // Cut the old leader off from its quorum, then let its activation propose.
    for id in &others {
        c.stop(*id).await?;
    }
    let old_handle = c.handle(old, g(0))?;
    let before = old_handle.raft().metrics().borrow().last_log_index;
    let zombie = tokio::spawn({
        let cmd = complete(&flow, 1, "zombie-write");
        async move { old_handle.propose_shard(cmd).await }
    });
    // Its entry reaches the old leader's log but cannot commit.
    eventually("the zombie entry in the old leader's log", || async {
        let now = c.handle(old, g(0)).ok()?.raft().metrics().borrow().last_log_index;
        (now > before).then_some(())
    })
    .await?;
    c.stop(old).await?;
    let zombie_outcome = tokio::time::timeout(Duration::from_secs(30), zombie).await??;
    ensure!(zombie_outcome.is_err(), "the old leader never acknowledged the write: {zombie_outcome:?}");
    // The others elect a new leader, which activates the flow anew.
    for id in &others {
        c.restart(*id).await?;
    }
    expect_ok(c.propose(g(0), ShardCommand::Activate { flow: flow.clone(), epoch: Epoch(2) }).await?)?;
    // The old leader returns: its uncommitted entry is overwritten, never applied.
    c.restart(old).await?;
    c.converge(g(0)).await?;
    for id in 1..=3 {
        let (rec, eff) = c.handle(id, g(0))?.read_local(|kv| {
            Ok::<_, anyhow::Error>((
                shard::get_flow(kv, &flow)?,
                shard::get_effect(kv, &flow, "zombie-write")?,
            ))
        })?;
        ensure!(eff.is_none(), "node {id}: the zombie write was not applied");
        ensure!(rec.map(|r| r.epoch) == Some(Epoch(2)), "node {id}: epoch 2");
    }
    // And proposing it again (as a retrying zombie would) is rejected.
    let retry = c.propose(g(0), complete(&flow, 1, "zombie-write")).await?;
    ensure!(matches!(retry, Err(Rejection::StaleEpoch { .. })), "retry fenced: {retry:?}");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_outbox_entries_apply_exactly_once() -> Result<()> {
    let mut c = Cluster::start(3, 2, 10_000).await?;
    let sender = flow_on(0, 2, "sender");
    let receiver = flow_on(1, 2, "receiver");
    expect_ok(
        c.propose(g(1), ShardCommand::Start { flow: receiver.clone(), input: b"{}".to_vec(), parent: None })
            .await?,
    )?;
    expect_ok(
        c.propose(g(0), ShardCommand::Start { flow: sender.clone(), input: b"{}".to_vec(), parent: None })
            .await?,
    )?;
    // The start committed the flow's first activation (epoch 1) with it: no `Activate` of its own.
    for i in 0..3 {
        let send = ShardCommand::Send {
            flow: sender.clone(),
            epoch: Epoch(1),
            effect_id: format!("send-{i}"),
            target: receiver.clone(),
            type_name: "Hello".into(),
            payload: format!("{{\"i\":{i}}}").into_bytes(),
        };
        expect_ok(c.propose(g(0), send).await?)?;
    }
    let src_leader = c.leader(g(0)).await?;
    let pending = c.handle(src_leader, g(0))?.read(|kv| shard::outbox_pending(kv, ShardId(1), 100)).await??;
    ensure!(pending.len() == 3, "three outbox entries");
    let deliver = |from: usize| ShardCommand::OutboxDeliver {
        source: ShardId(0),
        first_seq: pending[from].0,
        entries: pending[from..].iter().map(|(_, e)| e.clone()).collect(),
    };
    // First delivery of the first two, as a leader that crashed before acknowledging would.
    let first = ShardCommand::OutboxDeliver {
        source: ShardId(0),
        first_seq: pending[0].0,
        entries: pending[..2].iter().map(|(_, e)| e.clone()).collect(),
    };
    ensure!(
        expect_ok(c.propose(g(1), first).await?)? == ShardOutcome::Delivered { applied: 2, duplicates: 0 }
    );
    // The target's leader changes; the source's new leader resends everything unacknowledged.
    let tgt_leader = c.leader(g(1)).await?;
    c.stop(tgt_leader).await?;
    ensure!(
        expect_ok(c.propose(g(1), deliver(0)).await?)?
            == ShardOutcome::Delivered { applied: 1, duplicates: 2 }
    );
    ensure!(
        expect_ok(c.propose(g(1), deliver(0)).await?)?
            == ShardOutcome::Delivered { applied: 0, duplicates: 3 }
    );
    let new_tgt = c.leader(g(1)).await?;
    let events = c.handle(new_tgt, g(1))?.read(|kv| shard::events(kv, &receiver, 0, 100)).await??;
    ensure!(events.len() == 3, "each message stored once, got {}", events.len());
    // The source removes what the target acknowledged.
    let upto = pending[2].0;
    expect_ok(c.propose(g(0), ShardCommand::OutboxAck { target: ShardId(1), upto_seq: upto }).await?)?;
    let src_leader = c.leader(g(0)).await?;
    let left = c.handle(src_leader, g(0))?.read(|kv| shard::outbox_pending(kv, ShardId(1), 100)).await??;
    ensure!(left.is_empty(), "acknowledged entries removed");
    c.restart(tgt_leader).await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_service_refuses_bad_requests_and_keeps_serving() -> Result<()> {
    let c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    let target = c.node(2)?;
    let addr = target.addr().to_string();
    let me = c.node(1)?;
    let ok_request = |group: u32, cluster: &str, kind: RpcKind, payload: Vec<u8>| RaftRequest {
        group,
        cluster_id: cluster.into(),
        from_node: 1,
        incarnation: me.identity().incarnation.0,
        kind: kind as i32,
        payload,
    };
    let cid = c.cluster_id.0.clone();
    let cases = [
        (ok_request(1, &cid, RpcKind::AppendEntries, vec![1, 0xff, 0xfe, 0x00]), ErrorCode::Malformed),
        (ok_request(1, &cid, RpcKind::Vote, vec![]), ErrorCode::Malformed),
        (ok_request(1, &cid, RpcKind::InstallSnapshot, vec![9; 64]), ErrorCode::Malformed),
        (ok_request(77, &cid, RpcKind::Vote, vec![]), ErrorCode::UnknownGroup),
        (ok_request(1, "someone-else", RpcKind::Vote, vec![]), ErrorCode::ForeignCluster),
        (ok_request(1, &cid, RpcKind::Unspecified, vec![]), ErrorCode::UnknownKind),
        (RaftRequest { kind: 42, ..ok_request(1, &cid, RpcKind::Vote, vec![]) }, ErrorCode::UnknownKind),
    ];
    // One by one, and all together in one batch (answers in order, each refused on its own).
    let mut raw = RaftTransportClient::new(me.peers().channel(&addr)?);
    let batch = RaftBatch { requests: cases.iter().map(|(r, _)| r.clone()).collect() };
    let batched = raw.call_batch(batch).await?.into_inner().responses;
    ensure!(batched.len() == cases.len(), "one response per request");
    for ((request, expected), batched) in cases.into_iter().zip(batched) {
        let desc = format!("group {} kind {} cluster {}", request.group, request.kind, request.cluster_id);
        let single = me.peers().call(&addr, request, Duration::from_secs(5)).await?;
        for (how, answer) in [("alone", Some(single)), ("in a batch", batched.result)] {
            match answer {
                Some(raft_response::Result::Error(e)) => ensure!(
                    e.code() == expected,
                    "{desc} {how}: expected {expected:?}, got {:?} ({})",
                    e.code(),
                    e.message
                ),
                other => return Err(anyhow!("{desc} {how}: not refused: {other:?}")),
            }
        }
    }
    let oversized =
        RaftBatch { requests: vec![ok_request(1, &cid, RpcKind::Vote, vec![]); MAX_BATCH_REQUESTS + 1] };
    let refused = raw.call_batch(oversized).await;
    ensure!(
        matches!(&refused, Err(s) if s.code() == tonic::Code::InvalidArgument),
        "an oversized batch is refused: {refused:?}"
    );
    // The node still serves: commits go on and reach it.
    for i in 0..10 {
        expect_ok(c.propose(g(0), message(i)).await?)?;
    }
    c.converge(g(0)).await?;
    ensure!(events_len(&c, 2).await? == 10);
    c.shutdown().await;
    Ok(())
}

/// Starts a node on the directory of a node just stopped, once its background tasks have let go
/// of the directory's lock; returns what the start itself says.
async fn start_unlocked(config: NodeConfig) -> Result<Result<std::sync::Arc<RaftNode>, node::Error>> {
    eventually("the stopped node's directory lock", || {
        let config = config.clone();
        async move {
            match RaftNode::start(config).await {
                Err(e) if e.to_string().contains("could not acquire lock") => None,
                other => Some(other),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_requests_until_it_knows_its_cluster_and_from_another_incarnation_of_a_member(
) -> Result<()> {
    let c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    let me = c.node(1)?;
    let cid = c.cluster_id.0.clone();
    let vote = |incarnation: u64| RaftRequest {
        group: 1,
        cluster_id: cid.clone(),
        from_node: 1,
        incarnation,
        kind: RpcKind::Vote as i32,
        payload: vec![],
    };
    let refused = |answer: raft_response::Result| match answer {
        raft_response::Result::Error(e) => Some(e.code()),
        raft_response::Result::Ok(_) => None,
    };
    // The vote's payload is empty: a request that passes the identity checks is refused as
    // malformed, one that does not as foreign or stale.
    // A node that has not learned its cluster id refuses every request, also one that carries
    // the cluster's id.
    let dir = tempfile::tempdir()?;
    let mut config =
        NodeConfig::new(NodeId(9), "127.0.0.1:0".parse()?, dir.path().join("n9"), ClusterId("x".into()));
    config.cluster_id = None;
    let fresh = RaftNode::start(config.clone()).await?;
    fresh.open_group(g(0)).await?;
    let addr = fresh.addr().to_string();
    let answer = me.peers().call(&addr, vote(me.identity().incarnation.0), Duration::from_secs(5)).await?;
    ensure!(refused(answer) == Some(ErrorCode::ForeignCluster), "an unknowing node refuses");
    // Once it learns the id, it serves it; another id is refused, also after a restart.
    fresh.learn_cluster_id(&c.cluster_id).await?;
    let answer = me.peers().call(&addr, vote(me.identity().incarnation.0), Duration::from_secs(5)).await?;
    ensure!(refused(answer) == Some(ErrorCode::Malformed), "the node serves its cluster once it knows it");
    let other = ClusterId("another".into());
    let again = fresh.learn_cluster_id(&other).await;
    ensure!(matches!(again, Err(node::Error::WrongCluster { .. })), "a second id is refused: {again:?}");
    fresh.shutdown().await;
    drop(fresh);
    let restarted = start_unlocked(config.clone()).await??;
    ensure!(restarted.cluster_id() == Some(c.cluster_id.clone()), "the learned id is durable");
    restarted.shutdown().await;
    drop(restarted);
    config.cluster_id = Some(other);
    let wrong = start_unlocked(config.clone()).await?.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(wrong.contains("another") && wrong.contains(&cid), "another cluster's start is refused: {wrong}");
    config.cluster_id = None;
    config.node_id = NodeId(8);
    let wrong = start_unlocked(config).await?.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        wrong.contains("node 9's") && wrong.contains("--id 8"),
        "another node's start is refused: {wrong}"
    );
    // A member listed with another incarnation (another disk under its id) is refused.
    let target = c.node(2)?;
    let addr = target.addr().to_string();
    let listed = me.identity().incarnation;
    target.set_member_incarnations([(NodeId(1), Incarnation(listed.0 ^ 1))].into_iter().collect());
    let answer = me.peers().call(&addr, vote(listed.0), Duration::from_secs(5)).await?;
    ensure!(refused(answer) == Some(ErrorCode::StaleIncarnation), "another incarnation is refused");
    target.set_member_incarnations([(NodeId(1), listed)].into_iter().collect());
    let answer = me.peers().call(&addr, vote(listed.0), Duration::from_secs(5)).await?;
    ensure!(refused(answer) == Some(ErrorCode::Malformed), "the listed incarnation passes");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_group_and_membership_change() -> Result<()> {
    let mut c = Cluster::start(3, 1, 10_000).await?;
    fn member(c: &Cluster, id: u64) -> Result<Member> {
        let node = c.node(id)?;
        Ok(Member {
            node: NodeId(id),
            addr: node.addr().to_string(),
            incarnation: node.identity().incarnation,
        })
    }
    let info = ClusterInfo {
        cluster_id: c.cluster_id.clone(),
        params: ClusterParams { shard_count: 1, ..ClusterParams::default() },
        members: vec![member(&c, 1)?, member(&c, 2)?, member(&c, 3)?],
        placement: [(
            ShardId(0),
            ShardPlacement { replicas: vec![NodeId(1), NodeId(2), NodeId(3)], preferred_leader: NodeId(1) },
        )]
        .into_iter()
        .collect(),
    };
    let init = MetaCommand::Initialize {
        cluster_id: info.cluster_id.clone(),
        params: info.params.clone(),
        members: info.members.clone(),
        placement: info.placement.clone(),
    };
    let meta_leader = c.leader(GroupId::META).await?;
    let reply = c.handle(meta_leader, GroupId::META)?.propose_meta(init.clone()).await?;
    ensure!(reply == Ok(MetaOutcome::Initialized), "{reply:?}");
    let again = c.handle(meta_leader, GroupId::META)?.propose_meta(init).await?;
    ensure!(again == Ok(MetaOutcome::AlreadyInitialized), "initialize is idempotent: {again:?}");
    // A shard command sent to group 0 is refused and changes nothing.
    let wrong = c.handle(meta_leader, GroupId::META)?.propose(Command::Shard(message(0))).await?;
    ensure!(wrong == Reply::WrongGroup);
    c.converge(GroupId::META).await?;
    for id in 1..=3 {
        let read = c.handle(id, GroupId::META)?.read_local(meta::read_cluster)?;
        ensure!(read.as_ref() == Some(&info), "node {id} knows the cluster");
    }

    // A fourth node joins shard 0's group: learner first, then voter, and receives the state.
    start_log_flow(&c).await?;
    for i in 0..20 {
        expect_ok(c.propose(g(0), message(i)).await?)?;
    }
    let n4 = c.add_node(4).await?;
    let leader = c.leader(g(0)).await?;
    let h = c.handle(leader, g(0))?;
    h.add_learner(NodeId(4), n4.addr().to_string()).await?;
    let voters: BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    h.change_membership(voters.clone(), false).await?;
    c.converge(g(0)).await?;
    ensure!(events_len(&c, 4).await? == 20, "the new voter has the log");
    let members: BTreeSet<NodeId> =
        c.handle(4, g(0))?.raft().metrics().borrow().membership_config.voter_ids().map(NodeId).collect();
    ensure!(members == voters, "node 4 sees itself as a voter: {members:?}");
    let added =
        c.handle(meta_leader, GroupId::META)?.propose_meta(MetaCommand::AddMember(member(&c, 4)?)).await?;
    ensure!(added == Ok(MetaOutcome::MemberAdded), "{added:?}");
    // And leaves again.
    h.change_membership((1..=3).map(NodeId).collect(), false).await?;
    let voters_now: BTreeSet<u64> = h.raft().metrics().borrow().membership_config.voter_ids().collect();
    ensure!(voters_now == (1..=3).collect::<BTreeSet<u64>>());
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_forward_proposals_and_serve_linearizable_reads() -> Result<()> {
    let mut c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    let leader = c.leader(g(0)).await?;
    let follower = c.running().into_iter().find(|id| *id != leader).ok_or_else(|| anyhow!("follower"))?;
    let h = c.handle(follower, g(0))?;
    // `propose` stays local: a follower refuses (activations must never commit elsewhere).
    match h.propose_shard(message(0)).await {
        Err(fetter_raft::handle::Error::NotLeader { leader: Some(l), .. }) => {
            ensure!(l == NodeId(leader), "the hint names the leader")
        }
        other => return Err(anyhow!("a follower's local propose must refuse, got {other:?}")),
    }
    // `submit` reaches the leader; a read on the follower right after sees the write.
    for i in 0..20 {
        expect_ok(h.submit_shard(message(i)).await?)?;
        let seen = h.read(|kv| shard::get_flow(kv, &flow_on(0, 1, "log"))).await??;
        ensure!(seen.map(|r| r.events_len) == Some(i + 1), "the follower's read is linearizable");
    }
    // The leader goes away: the follower's next submit waits for the election and follows it.
    c.stop(leader).await?;
    expect_ok(h.submit_shard(message(20)).await?)?;
    let seen = h.read(|kv| shard::get_flow(kv, &flow_on(0, 1, "log"))).await??;
    ensure!(seen.map(|r| r.events_len) == Some(21));
    c.shutdown().await;
    Ok(())
}

/// Waits until the leader behind `h` has led for longer than the lease (a leader refuses votes
/// while its own lease is fresh); returns the lease.
async fn wait_out_own_lease(h: &fetter_raft::handle::GroupHandle) -> Result<Duration> {
    let lease = Duration::from_millis(fetter_raft::node::Timing::relaxed().election_timeout_max_ms);
    let since = h.status().borrow().leading_since.ok_or_else(|| anyhow!("leading since"))?;
    tokio::time::sleep((lease + Duration::from_millis(100)).saturating_sub(since.elapsed())).await;
    Ok(lease)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_to_a_chosen_voter_within_a_round_trip() -> Result<()> {
    let c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    let old = c.leader(g(0)).await?;
    let h = c.handle(old, g(0))?;
    let lease = wait_out_own_lease(&h).await?;
    for (i, target) in c.running().into_iter().filter(|id| *id != old).enumerate() {
        let from = c.leader(g(0)).await?;
        // Asked through any node (here: the target itself, which forwards to the leader).
        let started = std::time::Instant::now();
        c.handle(target, g(0))?.move_leadership(NodeId(target), lease, Duration::from_secs(10)).await?;
        let took = started.elapsed();
        ensure!(c.leader(g(0)).await? == target, "node {target} leads after the transfer");
        ensure!(
            took < lease + Duration::from_millis(500),
            "transfer {from} -> {target} took {took:?} (lease {lease:?})"
        );
        // The new leader commits at once; the old one forwards to it.
        expect_ok(c.handle(from, g(0))?.submit_shard(message(i as u64)).await?)?;
    }
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_waits_for_at_most_once_work_in_flight_and_refuses_new_work() -> Result<()> {
    let c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    let old = c.leader(g(0)).await?;
    let h = c.handle(old, g(0))?;
    let lease = wait_out_own_lease(&h).await?;
    let target = c.running().into_iter().find(|id| *id != old).ok_or_else(|| anyhow!("a follower"))?;
    // At-most-once work is in flight here (its `Started` committed, its outcome not yet).
    let in_flight = h.at_most_once_in_flight();
    let transfer = tokio::spawn({
        let h = h.clone();
        async move { h.transfer_leadership(NodeId(target), lease, Duration::from_secs(10)).await }
    });
    // The hand-over has begun: new at-most-once work is refused ...
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let started = h.propose_shard(effect_started(1, "late")).await;
        if matches!(started, Err(handle::Error::NotLeader { .. })) {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "new at-most-once work still taken: {started:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... while the work in flight may still commit its outcome, however long it takes (within
    // the drain), and leadership stays here meanwhile.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    ensure!(!transfer.is_finished(), "the hand-over did not wait for the work in flight");
    expect_ok(h.propose_shard(message(7)).await?)?;
    ensure!(c.leader(g(0)).await? == old, "leadership moved while at-most-once work was in flight");
    drop(in_flight);
    tokio::time::timeout(WAIT, transfer).await???;
    ensure!(c.leader(g(0)).await? == target, "node {target} leads once the work in flight is done");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_leadership_transfer_leaves_the_leader_taking_proposals() -> Result<()> {
    let mut c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    let leader = c.leader(g(0)).await?;
    let h = c.handle(leader, g(0))?;
    let lease = wait_out_own_lease(&h).await?;
    // The target is gone: the handover waits for it to catch up, and its caller gives up (as an
    // RPC handler is dropped when the remote caller times out) while proposals are refused.
    let target = c.running().into_iter().find(|id| *id != leader).ok_or_else(|| anyhow!("a follower"))?;
    c.stop(target).await?;
    // Entries it never got: it cannot catch up.
    for i in 0..3 {
        expect_ok(h.propose_shard(message(100 + i)).await?)?;
    }
    let abandoned = tokio::time::timeout(
        Duration::from_millis(400),
        h.transfer_leadership(NodeId(target), lease, Duration::from_secs(30)),
    )
    .await;
    ensure!(abandoned.is_err(), "the transfer was still under way when dropped: {abandoned:?}");
    // The leader takes proposals again at once (it is still the leader: nobody else stood).
    ensure!(c.leader(g(0)).await? == leader, "leadership stayed");
    expect_ok(h.propose_shard(message(1)).await?)?;
    c.shutdown().await;
    Ok(())
}

/// Logs to the test's output, filtered by `RUST_LOG` (nothing when it is unset).
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Leadership of `group` as every running node sees it: (node, term, leader).
fn leadership(c: &Cluster, group: GroupId) -> Result<Vec<(u64, u64, Option<NodeId>)>> {
    c.running()
        .into_iter()
        .map(|id| {
            let s = c.handle(id, group)?.status().borrow().clone();
            Ok((id, s.term, s.leader))
        })
        .collect()
}

/// Issue 9, item 3: 80 concurrent messages of 900 KB (each under the API's 1 MiB payload
/// limit) to flows of one shard are all appended by the same leader in the same term, a small
/// command on that shard commits within 2 s while they are in flight, and the followers catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_never_wedge_a_shard() -> Result<()> {
    const BIG: usize = 80;
    const PAYLOAD: usize = 900 * 1024;
    const FLOWS: usize = 8;
    init_tracing();
    // Two shards: the other shard and group 0 share the per-peer batches with the busy shard.
    let c = Cluster::start(3, 2, 10_000).await?;
    let flows: Vec<_> = (0..FLOWS).map(|i| flow_on(0, 2, &format!("big{i}"))).collect();
    for f in &flows {
        let start = ShardCommand::Start { flow: f.clone(), input: b"{}".to_vec(), parent: None };
        expect_ok(c.propose(g(0), start).await?)?;
    }
    let leader = c.leader(g(0)).await?;
    let h = c.handle(leader, g(0))?;
    let before = leadership(&c, g(0))?;
    let first_index = h.raft().metrics().borrow().last_log_index.unwrap_or(0);

    let big = {
        let h = h.clone();
        let flows = flows.clone();
        tokio::spawn(async move {
            futures::future::join_all((0..BIG).map(|i| {
                let cmd = ShardCommand::AppendEvent {
                    flow: flows[i % FLOWS].clone(),
                    event: Event::Message {
                        type_name: "Blob".into(),
                        payload: vec![b'x'; PAYLOAD],
                        idempotency_key: None,
                    },
                };
                h.propose_shard(cmd)
            }))
            .await
        })
    };
    // Measure while the big ones are in flight: once the leader has appended the first of them.
    eventually("the first large entry in the leader's log", || async {
        (h.raft().metrics().borrow().last_log_index.unwrap_or(0) > first_index).then_some(())
    })
    .await?;
    let measured_in_flight = !big.is_finished();
    let small = ShardCommand::AppendEvent {
        flow: flows[0].clone(),
        event: Event::Message { type_name: "Note".into(), payload: b"{}".to_vec(), idempotency_key: None },
    };
    let started = std::time::Instant::now();
    let small_outcome = tokio::time::timeout(Duration::from_secs(2), h.propose_shard(small)).await;
    let small_latency = started.elapsed();

    let replies = tokio::time::timeout(WAIT, big)
        .await
        .map_err(|_| anyhow!("the large messages were not all answered within {WAIT:?}"))??;
    let mut appended = 0;
    let mut failures = Vec::new();
    for r in replies {
        match r {
            Ok(Ok(ShardOutcome::Appended { .. })) => appended += 1,
            other => failures.push(format!("{other:?}")),
        }
    }
    ensure!(
        appended == BIG,
        "{appended} of {BIG} large messages appended; failures: {:?}",
        failures.iter().take(3).collect::<Vec<_>>()
    );
    let small_outcome = small_outcome
        .map_err(|_| anyhow!("a small command did not commit within 2 s while large ones were in flight"))?;
    expect_ok(small_outcome?)?;
    ensure!(measured_in_flight, "the large messages were all done before the small command was proposed");
    let after = leadership(&c, g(0))?;
    ensure!(before == after, "leadership changed: before {before:?}, after {after:?}");
    c.converge(g(0)).await?;
    tracing::info!(?small_latency, "small command latency under large payloads");
    for id in 1..=3 {
        let rec = c.handle(id, g(0))?.read_local(|kv| shard::get_flow(kv, &flows[0]))?;
        let len = rec.ok_or_else(|| anyhow!("flow missing on node {id}"))?.events_len;
        ensure!(len == (BIG / FLOWS) as u64 + 1, "node {id} has {len} events of the first flow");
    }
    c.shutdown().await;
    Ok(())
}

/// A follower that missed many large entries catches up: AppendEntries carry at most
/// `MAX_APPEND_BYTES` of entries (more only split over several requests), so every request of
/// the catch-up fits the transport and the RPC timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_many_large_entries_catches_up() -> Result<()> {
    const BIG: usize = 30;
    const PAYLOAD: usize = 600 * 1024;
    init_tracing();
    let mut c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    let leader = c.leader(g(0)).await?;
    let follower = (1..=3).find(|id| *id != leader).ok_or_else(|| anyhow!("no follower"))?;
    c.stop(follower).await?;
    let h = c.handle(leader, g(0))?;
    // One at a time: each its own entry, so the follower misses many entries that do not fit
    // together into one AppendEntries.
    for i in 0..BIG {
        let cmd = ShardCommand::AppendEvent {
            flow: flow_on(0, 1, "log"),
            event: Event::Message {
                type_name: "Blob".into(),
                payload: vec![b'0' + (i % 10) as u8; PAYLOAD],
                idempotency_key: None,
            },
        };
        expect_ok(h.propose_shard(cmd).await?)?;
    }
    let before = leadership(&c, g(0))?;
    c.restart(follower).await?;
    c.converge(g(0)).await?;
    ensure!(events_len(&c, follower).await? == BIG as u64, "the follower has every large event");
    ensure!(c.state(follower, g(0))? == c.state(leader, g(0))?, "the follower's state equals the leader's");
    let after: Vec<_> = leadership(&c, g(0))?.into_iter().filter(|(id, ..)| *id != follower).collect();
    let before: Vec<_> = before.into_iter().filter(|(id, ..)| *id != follower).collect();
    ensure!(before == after, "leadership changed during the catch-up: {before:?} -> {after:?}");
    c.shutdown().await;
    Ok(())
}

/// A replica moves off a node and back: the group leaves the node's membership, the node drops
/// it (log and state deleted, calls for it refused, nothing of it after a restart), the others
/// go on committing, and when the node is added again it starts from an empty log and catches
/// up on everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_replica_leaves_nothing_behind_and_can_be_added_again() -> Result<()> {
    let mut c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    for i in 0..20 {
        expect_ok(c.propose(g(0), message(i)).await?)?;
    }
    c.converge(g(0)).await?;
    let leader = c.leader(g(0)).await?;
    let moved = (1..=3).find(|id| *id != leader).ok_or_else(|| anyhow!("no follower"))?;
    let h = c.handle(leader, g(0))?;
    let others: BTreeSet<NodeId> = (1..=3).filter(|id| *id != moved).map(NodeId).collect();
    h.change_membership(others.clone(), false).await?;

    let node = c.node(moved)?;
    node.drop_group(g(0)).await?;
    ensure!(node.group(g(0)).is_none(), "the dropped group is closed");
    let prefix = format!("g{}/", g(0).0);
    let trees: Vec<String> =
        node.store().db().tree_names().iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
    ensure!(!trees.iter().any(|n| n.starts_with(&prefix)), "its state is gone: {trees:?}");
    drop(node);
    // A call for it is refused as for any group the node does not host.
    let from = c.node(leader)?;
    let request = RaftRequest {
        group: g(0).0,
        cluster_id: c.cluster_id.0.clone(),
        from_node: leader,
        incarnation: from.identity().incarnation.0,
        kind: RpcKind::ReadIndex as i32,
        payload: Vec::new(),
    };
    match from.peers().call(&c.addrs[&moved].to_string(), request, Duration::from_secs(5)).await? {
        raft_response::Result::Error(e) => {
            ensure!(e.code() == ErrorCode::UnknownGroup, "refused as unknown: {e:?}")
        }
        other => return Err(anyhow!("a dropped group answered: {other:?}")),
    }
    // (Through the leader's handle: the harness looks for a leader on every node.)
    for i in 20..30 {
        expect_ok(h.propose_shard(message(i)).await?)?;
    }

    // A restart brings nothing of it back (the harness opens every group again, empty).
    c.stop(moved).await?;
    c.restart(moved).await?;
    let m = c.handle(moved, g(0))?.raft().metrics().borrow().clone();
    ensure!(m.last_log_index.is_none() && m.last_applied.is_none(), "a fresh log after the restart: {m:?}");

    let addr = c.addrs[&moved].to_string();
    let h = c.handle(c.leader(g(0)).await?, g(0))?;
    h.add_learner(NodeId(moved), addr).await?;
    h.change_membership((1..=3).map(NodeId).collect(), false).await?;
    c.converge(g(0)).await?;
    ensure!(events_len(&c, moved).await? == 30, "the node has every event again");
    ensure!(c.state(moved, g(0))? == c.state(leader, g(0))?);
    c.shutdown().await;
    Ok(())
}

/// Asks node `to` for its vote in `group`, for a candidate `from` (a member) far ahead in term and
/// with a log longer than anyone's.
async fn ask_vote(
    c: &Cluster,
    from: u64,
    to: u64,
    group: GroupId,
) -> Result<openraft::raft::VoteResponse<u64>> {
    use openraft::raft::{VoteRequest, VoteResponse};
    use openraft::{CommittedLeaderId, LogId, Vote};
    let node = c.node(from)?;
    let m = c.handle(from, group)?.raft().metrics().borrow().clone();
    let rpc = VoteRequest::new(
        Vote::new(m.current_term + 10, from),
        Some(LogId::new(CommittedLeaderId::new(m.current_term, from), m.last_log_index.unwrap_or(0) + 100)),
    );
    let request = RaftRequest {
        group: group.0,
        cluster_id: c.cluster_id.0.clone(),
        from_node: from,
        incarnation: node.identity().incarnation.0,
        kind: RpcKind::Vote as i32,
        payload: fetter_raft::codec::encode(&rpc)?,
    };
    match node.peers().call(&c.addrs[&to].to_string(), request, Duration::from_secs(5)).await? {
        raft_response::Result::Ok(bytes) => {
            let r: Result<VoteResponse<u64>, openraft::error::RaftError<u64>> =
                fetter_raft::codec::decode(&bytes)?;
            Ok(r?)
        }
        raft_response::Result::Error(e) => Err(anyhow!("refused: {e:?}")),
    }
}

/// A replica re-created on a node that dropped the group before grants no vote while its log is
/// empty. Its earlier replica there had acknowledged entries and forgot them with the drop; were
/// it to vote, a candidate that missed the removal of that earlier replica (openraft does not ask
/// whether a voter belongs to the candidate's configuration) could win with its stale
/// configuration. A replica that never had the group votes as Raft says (it acknowledged nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_created_replica_grants_no_vote_while_its_log_is_empty() -> Result<()> {
    let mut c = Cluster::start(3, 1, 10_000).await?;
    start_log_flow(&c).await?;
    for i in 0..5 {
        expect_ok(c.propose(g(0), message(i)).await?)?;
    }
    c.converge(g(0)).await?;
    let leader = c.leader(g(0)).await?;
    // Node 4 opens the group and belongs to no configuration: a replica that never had it.
    c.add_node(4).await?;
    let answer = ask_vote(&c, leader, 4, g(0)).await?;
    ensure!(answer.vote_granted, "a replica that never had the group votes as Raft says: {answer:?}");

    // A follower's replica moves away (dropped) and the node opens the group again, empty.
    let moved = (1..=3).find(|id| *id != leader).ok_or_else(|| anyhow!("no follower"))?;
    let h = c.handle(leader, g(0))?;
    h.change_membership((1..=3).filter(|id| *id != moved).map(NodeId).collect(), false).await?;
    c.node(moved)?.drop_group(g(0)).await?;
    c.stop(moved).await?;
    c.restart(moved).await?;
    let answer = ask_vote(&c, leader, moved, g(0)).await?;
    ensure!(!answer.vote_granted, "a re-created empty replica granted a vote: {answer:?}");
    c.shutdown().await;
    Ok(())
}

/// Snapshots of large states never stall the runtime. Several groups of one node, each holding
/// tens of MiB of state, snapshot at once on a 2-worker runtime while a ticker on the same
/// runtime records the longest gap between its ticks: it stays far below the election timeout
/// (a runtime that stalls longer makes leaders lose their quorum acknowledgement and stop their
/// flows, as `shop bench-recovery --flows 1000000` did at order 768,910 when every snapshot
/// copied and encoded its group's whole state on the async workers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_large_states_never_stall_the_runtime() -> Result<()> {
    const SHARDS: u32 = 4;
    const FLOWS_PER_SHARD: usize = 6_000;
    const INPUT: usize = 4 * 1024;
    /// The production election timeout's minimum.
    const BOUND: Duration = Duration::from_millis(300);
    init_tracing();
    let c = Cluster::start(1, SHARDS, 1_000_000).await?;
    for s in 0..SHARDS {
        let h = c.handle(1, g(s))?;
        let ids: Vec<_> = (0..)
            .map(|i| FlowId::new("big", format!("f{i}")))
            .filter(|f| placement::shard_of(f, SHARDS) == ShardId(s))
            .take(FLOWS_PER_SHARD)
            .collect();
        for chunk in ids.chunks(100) {
            let starts = chunk
                .iter()
                .map(|f| ShardCommand::Start { flow: f.clone(), input: vec![b'x'; INPUT], parent: None })
                .collect();
            for reply in h.propose_shard_all(starts).await? {
                expect_ok(reply)?;
            }
        }
    }

    let ticking = Arc::new(AtomicBool::new(true));
    let ticker = {
        let ticking = ticking.clone();
        tokio::spawn(async move {
            let mut longest = Duration::ZERO;
            let mut last = std::time::Instant::now();
            while ticking.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
                longest = longest.max(last.elapsed());
                last = std::time::Instant::now();
            }
            longest
        })
    };
    let handles: Vec<_> = (0..SHARDS).map(|s| c.handle(1, g(s))).collect::<Result<_>>()?;
    let targets: Vec<u64> =
        handles.iter().map(|h| h.raft().metrics().borrow().last_applied.map_or(0, |l| l.index)).collect();
    for h in &handles {
        h.raft().trigger().snapshot().await?;
    }
    eventually("every group built its snapshot", || async {
        handles
            .iter()
            .zip(&targets)
            .all(|(h, t)| h.raft().metrics().borrow().snapshot.map(|l| l.index) >= Some(*t))
            .then_some(())
    })
    .await?;
    ticking.store(false, Ordering::SeqCst);
    let longest = ticker.await?;
    tracing::info!(?longest, "longest gap of the ticker while snapshots were built");
    ensure!(longest < BOUND, "the runtime stalled {longest:?} while snapshots were built (bound {BOUND:?})");
    c.shutdown().await;
    Ok(())
}
