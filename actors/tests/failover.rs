//! The runtime on a 3-node group in one process (real sled, openraft, tonic on loopback): the
//! leader of the child's shard (often the parent's too) is stopped, then a parent on shard 0
//! starts a child on shard 1; the new leaders' shard actors take over activations and outbox
//! delivery, and every step happens exactly once.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use common::{flow_on, Go, Service, WAIT};
use fetter_actors::shard_actor::{Router, ShardActor, ShardArgs, ShardHandle};
use fetter_actors::{Ctx, Flow, FlowError, Registry};
use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{ClusterId, FlowId, GroupId, NodeId, ShardId};
use fetter_raft::node::{NodeConfig, RaftNode, Timing};
use fetter_raft::shard::{self, FlowStatus, ShardCommand};

use std::sync::Mutex;

const SHARDS: u32 = 2;

/// Routes to whichever running node currently leads a shard (in-process stand-in for the
/// cluster's forwarding). While `held`, no shard is reachable: outbox entries stay pending.
#[derive(Default)]
struct LeaderRouter {
    nodes: Mutex<BTreeMap<u64, Arc<RaftNode>>>,
    held: AtomicBool,
}

impl Router for LeaderRouter {
    fn group(&self, shard: ShardId) -> Option<GroupHandle> {
        if self.held.load(Ordering::SeqCst) {
            return None;
        }
        let nodes = self.nodes.lock().ok()?;
        nodes
            .values()
            .filter_map(|n| n.group(GroupId::of_shard(shard)))
            .find(|g| g.status().borrow().is_leader)
    }
}

struct Parent {
    child: FlowId,
    work: Service,
}

impl Flow for Parent {
    const TYPE: &'static str = "parent";
    type Input = u32;
    type Output = u32;

    async fn run(&self, ctx: &Ctx, n: u32) -> Result<u32, FlowError> {
        ctx.effect("before", || self.work.call()).await?;
        ctx.start_child("child", &self.child, &n).await?;
        let out: u32 = ctx.child_result(&self.child).await?;
        Ok(out * 10)
    }
}

struct Child {
    work: Service,
}

impl Flow for Child {
    const TYPE: &'static str = "child";
    type Input = u32;
    type Output = u32;

    async fn run(&self, ctx: &Ctx, n: u32) -> Result<u32, FlowError> {
        ctx.effect("work", || self.work.call()).await?;
        Ok(n + 1)
    }
}

/// Sends `Go{1..=n}` to `to`, then finishes.
struct Sender {
    to: FlowId,
}

impl Flow for Sender {
    const TYPE: &'static str = "sender";
    type Input = u32;
    type Output = ();

    async fn run(&self, ctx: &Ctx, n: u32) -> Result<(), FlowError> {
        for i in 1..=n {
            ctx.send(format!("go-{i}"), &self.to, &Go { n: i }).await?;
        }
        Ok(())
    }
}

/// Waits for `n` `Go` messages and returns their sum.
struct Receiver {
    work: Service,
}

impl Flow for Receiver {
    const TYPE: &'static str = "receiver";
    type Input = u32;
    type Output = u32;

    async fn run(&self, ctx: &Ctx, n: u32) -> Result<u32, FlowError> {
        let mut sum = 0;
        for _ in 0..n {
            sum += ctx.message::<Go>().await?.n;
        }
        ctx.effect("done", || self.work.call()).await?;
        Ok(sum)
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    router: Arc<LeaderRouter>,
    actors: BTreeMap<u64, Vec<ShardHandle>>,
}

impl Cluster {
    async fn leader_of(&self, shard: u32) -> Result<GroupHandle> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(g) = self.router.group(ShardId(shard)) {
                return Ok(g);
            }
            ensure!(tokio::time::Instant::now() < deadline, "no leader of shard {shard}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The node that leads `shard` now.
    fn leader_node(&self, shard: u32) -> Option<u64> {
        let nodes = self.router.nodes.lock().ok()?;
        nodes.iter().find_map(|(id, n)| {
            n.group(GroupId::of_shard(ShardId(shard))).filter(|g| g.status().borrow().is_leader).map(|_| *id)
        })
    }

    async fn stop(&mut self, id: u64) -> Result<()> {
        for a in self.actors.remove(&id).unwrap_or_default() {
            a.stop();
        }
        let node = self.router.nodes.lock().map_err(|_| anyhow!("poisoned"))?.remove(&id);
        if let Some(node) = node {
            node.shutdown().await;
        }
        Ok(())
    }
}

async fn cluster(registry: Registry) -> Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let router = Arc::new(LeaderRouter::default());
    let mut nodes = BTreeMap::new();
    for id in 1..=3u64 {
        let mut config = NodeConfig::new(
            NodeId(id),
            "127.0.0.1:0".parse()?,
            dir.path().join(format!("n{id}")),
            ClusterId("failover".into()),
        );
        config.timing = Timing::relaxed();
        let node = RaftNode::start(config).await?;
        for s in 0..SHARDS {
            node.open_group(GroupId::of_shard(ShardId(s))).await?;
        }
        nodes.insert(id, node);
    }
    let members: BTreeMap<NodeId, String> =
        nodes.iter().map(|(id, n)| (NodeId(*id), n.addr().to_string())).collect();
    for s in 0..SHARDS {
        let group = nodes[&1].group(GroupId::of_shard(ShardId(s))).ok_or_else(|| anyhow!("group"))?;
        group.initialize(members.clone()).await?;
    }
    *router.nodes.lock().map_err(|_| anyhow!("poisoned"))? = nodes.clone();
    let mut c = Cluster { _dir: dir, router: router.clone(), actors: BTreeMap::new() };
    for s in 0..SHARDS {
        let leader = c.leader_of(s).await?;
        leader
            .propose_shard(ShardCommand::Configure { shard_id: ShardId(s), shard_count: SHARDS })
            .await?
            .map_err(|r| anyhow!("configure: {r}"))?;
    }
    // A shard actor for every group on every node; only the leaders' act.
    let dyn_router: Arc<dyn Router> = router.clone();
    for (id, node) in &nodes {
        let mut actors = Vec::new();
        for s in 0..SHARDS {
            let group = node.group(GroupId::of_shard(ShardId(s))).ok_or_else(|| anyhow!("group"))?;
            let args = ShardArgs::new(
                ShardId(s),
                group,
                dyn_router.clone(),
                registry.clone(),
                Duration::from_secs(3),
            );
            actors.push(ShardActor::start(args).await?.0);
        }
        c.actors.insert(*id, actors);
    }
    Ok(c)
}

async fn status_of(c: &Cluster, shard: u32, flow: &FlowId) -> Result<Option<shard::FlowRecord>> {
    let leader = c.leader_of(shard).await?;
    Ok(leader.read(|kv| shard::get_flow(kv, flow)).await??)
}

async fn wait_finished(c: &Cluster, shard: u32, flow: &FlowId) -> Result<shard::FlowRecord> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last: Option<String>;
    loop {
        match status_of(c, shard, flow).await {
            Ok(Some(record)) if record.status.is_finished() => return Ok(record),
            other => last = Some(format!("{other:?}")),
        }
        ensure!(tokio::time::Instant::now() < deadline, "{flow} did not finish; last seen: {last:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_start_and_result_cross_shards_once_while_leaders_are_stopped() -> Result<()> {
    let parent = flow_on("parent", 0, SHARDS, "p");
    let child = flow_on("child", 1, SHARDS, "c");
    let (parent_work, child_work) = (Service::default(), Service::default());
    let registry = Registry::new()
        .register(Parent { child: child.clone(), work: parent_work.clone() })?
        .register(Child { work: child_work.clone() })?;
    let mut c = cluster(registry).await?;
    // Stop the target shard's leader first, then start the parent: its child start must wait in
    // the outbox until shard 1 has a new leader, then be delivered once.
    let target_leader = c.leader_node(1).ok_or_else(|| anyhow!("shard 1 leader"))?;
    c.stop(target_leader).await?;
    let start = ShardCommand::Start { flow: parent.clone(), input: b"4".to_vec(), parent: None };
    c.leader_of(0).await?.propose_shard(start).await?.map_err(|r| anyhow!("{r}"))?;
    let record = wait_finished(&c, 0, &parent).await?;
    ensure!(record.status == FlowStatus::Succeeded, "{record:?}");
    ensure!(record.output.as_deref() == Some(b"50".as_slice()), "the child's result reached the parent");
    ensure!(parent_work.count() == 1 && child_work.count() == 1, "each step once");
    let child_record = wait_finished(&c, 1, &child).await?;
    ensure!(child_record.status == FlowStatus::Succeeded);
    ensure!(child_record.parent.as_ref() == Some(&parent));
    let remaining: Vec<u64> =
        c.router.nodes.lock().map_err(|_| anyhow!("poisoned"))?.keys().copied().collect();
    for id in remaining {
        c.stop(id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_survives_a_leader_change_of_the_source_shard() -> Result<()> {
    let sender = flow_on("sender", 0, SHARDS, "s");
    let receiver = flow_on("receiver", 1, SHARDS, "r");
    let receiver_work = Service::default();
    let registry = Registry::new()
        .register(Sender { to: receiver.clone() })?
        .register(Receiver { work: receiver_work.clone() })?;
    let mut c = cluster(registry).await?;
    let start = |flow: &FlowId, input: &[u8]| ShardCommand::Start {
        flow: flow.clone(),
        input: input.to_vec(),
        parent: None,
    };
    c.leader_of(1).await?.propose_shard(start(&receiver, b"3")).await?.map_err(|r| anyhow!("{r}"))?;
    // No shard is reachable: the sender finishes with its three messages committed to shard 0's
    // outbox and none delivered.
    let source = c.leader_of(0).await?;
    c.router.held.store(true, Ordering::SeqCst);
    source.propose_shard(start(&sender, b"3")).await?.map_err(|r| anyhow!("{r}"))?;
    let nodes: Vec<Arc<RaftNode>> =
        c.router.nodes.lock().map_err(|_| anyhow!("poisoned"))?.values().cloned().collect();
    let source_leader = || {
        nodes.iter().find_map(|n| {
            n.group(GroupId::of_shard(ShardId(0))).filter(|g| g.status().borrow().is_leader).map(|_| n.id())
        })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let (old_leader, pending) = loop {
        let leader = source_leader().ok_or_else(|| anyhow!("shard 0 has no leader"))?;
        let group =
            nodes.iter().find(|n| n.id() == leader).and_then(|n| n.group(GroupId::of_shard(ShardId(0))));
        let group = group.ok_or_else(|| anyhow!("group"))?;
        let sender_done =
            group.read(|kv| shard::get_flow(kv, &sender)).await??.is_some_and(|r| r.status.is_finished());
        let pending = group.read(|kv| shard::outbox_pending(kv, ShardId(1), 16)).await??.len();
        if sender_done {
            break (leader, pending);
        }
        ensure!(tokio::time::Instant::now() < deadline, "the sender did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ensure!(pending == 3, "three messages wait in the source outbox, found {pending}");
    let target = nodes
        .iter()
        .filter_map(|n| n.group(GroupId::of_shard(ShardId(1))))
        .find(|g| g.status().borrow().is_leader)
        .ok_or_else(|| anyhow!("shard 1 has no leader"))?;
    let before = target.read(|kv| shard::get_flow(kv, &receiver)).await??;
    ensure!(before.is_some_and(|r| r.events_len == 0), "nothing delivered yet");
    // The source shard's leader goes away with its outbox undelivered; the next leader of shard 0
    // delivers it.
    c.stop(old_leader.0).await?;
    c.router.held.store(false, Ordering::SeqCst);
    let record = wait_finished(&c, 1, &receiver).await?;
    ensure!(record.status == FlowStatus::Succeeded, "{record:?}");
    ensure!(record.output.as_deref() == Some(b"6".as_slice()), "each message once: {:?}", record.output);
    ensure!(record.events_len == 3, "three events in the receiver's log, got {}", record.events_len);
    ensure!(receiver_work.count() == 1);
    ensure!(c.leader_node(0) != Some(old_leader.0), "shard 0 changed leader");
    let new_source = c.leader_of(0).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !new_source.read(|kv| shard::outbox_pending(kv, ShardId(1), 16)).await??.is_empty() {
        ensure!(tokio::time::Instant::now() < deadline, "the new source leader never acknowledged delivery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let remaining: Vec<u64> =
        c.router.nodes.lock().map_err(|_| anyhow!("poisoned"))?.keys().copied().collect();
    for id in remaining {
        c.stop(id).await?;
    }
    Ok(())
}

/// Produces a value of `n` bytes in the way its input names: an effect's value, its output, or
/// a message to another flow.
struct Hog {
    to: FlowId,
}

impl Flow for Hog {
    const TYPE: &'static str = "hog";
    type Input = (String, usize);
    type Output = String;

    async fn run(&self, ctx: &Ctx, (how, n): (String, usize)) -> Result<String, FlowError> {
        match how.as_str() {
            "effect" => ctx.effect("big", || async move { Ok::<_, FlowError>("x".repeat(n)) }).await,
            "send" => {
                #[derive(serde::Serialize, serde::Deserialize)]
                struct Blob(String);
                impl fetter_actors::Message for Blob {
                    const NAME: &'static str = "Blob";
                }
                ctx.send("blob", &self.to, &Blob("x".repeat(n))).await?;
                Ok(String::new())
            }
            _ => Ok("x".repeat(n)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_values_fail_their_flow_naming_the_step_and_the_shard_keeps_serving() -> Result<()> {
    let child = flow_on("child", 0, SHARDS, "after");
    let work = Service::default();
    let registry = Registry::new()
        .register(Hog { to: flow_on("receiver", 1, SHARDS, "r") })?
        .register(Child { work: work.clone() })?;
    let c = cluster(registry).await?;
    let leader_before = c.leader_node(0);
    // 70 MiB from an effect (more than the transport carries), 2 MiB of output, 2 MiB sent.
    let cases = [
        ("effect", 70 << 20, "effect \"big\""),
        ("output", 2 << 20, "output"),
        ("send", 2 << 20, "send \"blob\""),
    ];
    for (i, (how, n, names)) in cases.iter().enumerate() {
        let hog = flow_on("hog", 0, SHARDS, &format!("h{i}"));
        let input = serde_json::to_vec(&(how, n))?;
        let start = ShardCommand::Start { flow: hog.clone(), input, parent: None };
        c.leader_of(0).await?.propose_shard(start).await?.map_err(|r| anyhow!("{r}"))?;
        let record = wait_finished(&c, 0, &hog).await?;
        let error = record.error.clone().ok_or_else(|| anyhow!("{how}: {hog} did not fail: {record:?}"))?;
        ensure!(
            error.kind == "payload_too_large" && error.message.contains(names),
            "{how}: failed with {error:?}"
        );
    }
    // The shard keeps serving, under the same leader.
    let start = ShardCommand::Start { flow: child.clone(), input: b"1".to_vec(), parent: None };
    c.leader_of(0).await?.propose_shard(start).await?.map_err(|r| anyhow!("{r}"))?;
    let record = wait_finished(&c, 0, &child).await?;
    ensure!(record.status == FlowStatus::Succeeded, "{record:?}");
    ensure!(
        c.leader_node(0) == leader_before,
        "shard 0 changed leader: {leader_before:?} -> {:?}",
        c.leader_node(0)
    );
    let mut c = c;
    let remaining: Vec<u64> =
        c.router.nodes.lock().map_err(|_| anyhow!("poisoned"))?.keys().copied().collect();
    for id in remaining {
        c.stop(id).await?;
    }
    Ok(())
}
