//! The shard actor on a real single node: flows run, wait, wake and finish by themselves;
//! waiting flows have no live actor; timers fire after a restart of the node.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use common::{flow_on, node_with_shards, single_node, start, Go, Service, WAIT};
use fetter_actors::activation::Outcome;
use fetter_actors::shard_actor::{
    Params, Router, ShardActor, ShardArgs, ShardHandle, ShardMsg, ShardStats, Tuning,
};
use fetter_actors::{Ctx, Flow, FlowError, Registry, RetryPolicy};
use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{FlowId, ShardId};
use fetter_raft::shard::{self, Action, AdminOp, Event, FlowStatus, ShardCommand};

/// Waits for `Go`, then does one effect.
struct Waiter {
    work: Service,
}

impl Flow for Waiter {
    const TYPE: &'static str = "waiter";
    type Input = ();
    type Output = u32;

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<u32, FlowError> {
        let go: Go = ctx.message().await?;
        ctx.effect("work", || self.work.call()).await?;
        Ok(go.n)
    }
}

/// Sleeps, then does one effect.
struct Napper {
    work: Service,
}

impl Flow for Napper {
    const TYPE: &'static str = "napper";
    type Input = u64;
    type Output = ();

    async fn run(&self, ctx: &Ctx, ms: u64) -> Result<(), FlowError> {
        ctx.sleep("nap", Duration::from_millis(ms)).await?;
        ctx.effect("work", || self.work.call()).await?;
        Ok(())
    }
}

async fn run_actor(group: &GroupHandle, registry: Registry) -> Result<(ShardHandle, ShardStats)> {
    let router: HashMap<ShardId, GroupHandle> = HashMap::from([(ShardId(0), group.clone())]);
    run_shard(ShardId(0), group, registry, Arc::new(router)).await
}

async fn run_shard(
    shard: ShardId,
    group: &GroupHandle,
    registry: Registry,
    router: Arc<dyn Router>,
) -> Result<(ShardHandle, ShardStats)> {
    let args = ShardArgs::new(shard, group.clone(), router, registry, Duration::from_secs(2));
    Ok(ShardActor::start(args).await?)
}

async fn send_go(group: &GroupHandle, flow: &FlowId, n: u32) -> Result<()> {
    let event = Event::Message {
        type_name: "Go".into(),
        payload: serde_json::to_vec(&Go { n })?,
        idempotency_key: None,
    };
    group
        .propose_shard(ShardCommand::AppendEvent { flow: flow.clone(), event })
        .await?
        .map_err(|r| anyhow!("{r}"))?;
    Ok(())
}

/// Waits until every flow in `flows` has `status` (bounded).
async fn all_reach(group: &GroupHandle, flows: &[FlowId], status: FlowStatus) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut behind = 0;
        for flow in flows {
            let record = group.read_local(|kv| shard::get_flow(kv, flow))?;
            if record.map(|r| r.status) != Some(status.clone()) {
                behind += 1;
            }
        }
        if behind == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow!(
                "{behind} of {} flows did not reach {status:?} within {WAIT:?}",
                flows.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_waiting_flows_have_no_live_activation_and_finish_when_their_message_arrives(
) -> Result<()> {
    let n = single_node().await?;
    let work = Service::default();
    let registry = Registry::new().register(Waiter { work: work.clone() })?;
    let (actor, stats) = run_actor(&n.group, registry).await?;
    let flows: Vec<FlowId> = (0..10_000).map(|i| FlowId::new("waiter", format!("w-{i}"))).collect();
    for flow in &flows {
        start(&n.group, flow, "null").await?;
    }
    all_reach(&n.group, &flows, FlowStatus::Suspended).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while stats.live_flows() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ensure!(stats.live_flows() == 0, "{} live activations for 10,000 waiting flows", stats.live_flows());
    for (i, flow) in flows.iter().enumerate() {
        send_go(&n.group, flow, i as u32).await?;
    }
    all_reach(&n.group, &flows, FlowStatus::Succeeded).await?;
    ensure!(work.count() == 10_000, "each flow's effect ran once: {}", work.count());
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_fires_after_the_node_restarts() -> Result<()> {
    let n = single_node().await?;
    let work = Service::default();
    let registry = Registry::new().register(Napper { work: work.clone() })?;
    let (actor, _) = run_actor(&n.group, registry.clone()).await?;
    let flow = FlowId::new("napper", "n-1");
    start(&n.group, &flow, "1500").await?;
    all_reach(&n.group, std::slice::from_ref(&flow), FlowStatus::Suspended).await?;
    // The node goes down while the flow sleeps; its in-memory timer is gone with it.
    actor.stop();
    let n = n.restart().await?;
    ensure!(work.count() == 0);
    let (actor, _) = run_actor(&n.group, registry).await?;
    all_reach(&n.group, std::slice::from_ref(&flow), FlowStatus::Succeeded).await?;
    ensure!(work.count() == 1);
    let record = n.group.read_local(|kv| shard::get_flow(kv, &flow))?.ok_or_else(|| anyhow!("flow"))?;
    let deadline =
        n.group.read_local(|kv| shard::get_effect(kv, &flow, "nap"))?.ok_or_else(|| anyhow!("nap"))?;
    let shard::EffectState::Completed(deadline) = deadline.state else { return Err(anyhow!("nap state")) };
    let deadline_ms: u64 = serde_json::from_slice(&deadline)?;
    ensure!(record.finished_ms.is_some_and(|f| f >= deadline_ms), "finished at or after the deadline");
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

/// Starts a child on the other shard and a message to a waiter there; returns the child's
/// output times ten.
struct Parent {
    child: FlowId,
    waiter: FlowId,
}

impl Flow for Parent {
    const TYPE: &'static str = "parent";
    type Input = u32;
    type Output = u32;

    async fn run(&self, ctx: &Ctx, n: u32) -> Result<u32, FlowError> {
        ctx.start_child("child", &self.child, &n).await?;
        ctx.send("poke", &self.waiter, &Go { n }).await?;
        let out: u32 = ctx.child_result(&self.child).await?;
        Ok(out * 10)
    }
}

struct Child;

impl Flow for Child {
    const TYPE: &'static str = "child";
    type Input = u32;
    type Output = u32;

    async fn run(&self, _: &Ctx, n: u32) -> Result<u32, FlowError> {
        Ok(n + 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_on_another_shard_runs_once_and_its_result_reaches_the_parent() -> Result<()> {
    let node = node_with_shards(2).await?;
    let parent = flow_on("parent", 0, 2, "p");
    let child = flow_on("child", 1, 2, "c");
    let waiter = flow_on("waiter", 1, 2, "w");
    let work = Service::default();
    let registry = Registry::new()
        .register(Parent { child: child.clone(), waiter: waiter.clone() })?
        .register(Child)?
        .register(Waiter { work: work.clone() })?;
    let router: Arc<dyn Router> =
        Arc::new(HashMap::from([(ShardId(0), node.groups[0].clone()), (ShardId(1), node.groups[1].clone())]));
    let mut actors = Vec::new();
    for (s, group) in node.groups.iter().enumerate() {
        actors.push(run_shard(ShardId(s as u32), group, registry.clone(), router.clone()).await?.0);
    }
    start(&node.groups[1], &waiter, "null").await?;
    start(&node.groups[0], &parent, "4").await?;
    all_reach(&node.groups[0], std::slice::from_ref(&parent), FlowStatus::Succeeded).await?;
    all_reach(&node.groups[1], &[child.clone(), waiter.clone()], FlowStatus::Succeeded).await?;
    let out: u32 = serde_json::from_slice(
        node.groups[0]
            .read_local(|kv| shard::get_flow(kv, &parent))?
            .and_then(|r| r.output)
            .as_deref()
            .unwrap_or_default(),
    )?;
    ensure!(out == 50, "child output 5, times ten: {out}");
    let child_record =
        node.groups[1].read_local(|kv| shard::get_flow(kv, &child))?.ok_or_else(|| anyhow!("child"))?;
    ensure!(child_record.parent.as_ref() == Some(&parent), "the child knows its parent");
    ensure!(work.count() == 1, "the message arrived once");
    // Every outbox entry was delivered and acknowledged.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut pending = 0;
        for group in &node.groups {
            pending += group.read_local(|kv| shard::outbox_targets(kv))?.len();
        }
        if pending == 0 {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "outboxes still hold entries for {pending} targets");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for actor in actors {
        actor.stop();
    }
    node.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_flows_are_collected_after_the_retention_period() -> Result<()> {
    let n = single_node().await?;
    let work = Service::default();
    let registry = Registry::new().register(Waiter { work: work.clone() })?;
    let router: Arc<dyn Router> = Arc::new(HashMap::from([(ShardId(0), n.group.clone())]));
    let mut args = ShardArgs::new(ShardId(0), n.group.clone(), router, registry, Duration::from_secs(2));
    args.params = Params::new(Duration::from_millis(300), Default::default());
    args.gc_every = Duration::from_millis(100);
    let (actor, _) = ShardActor::start(args).await?;
    let done = FlowId::new("waiter", "done");
    let waiting = FlowId::new("waiter", "waiting");
    start(&n.group, &done, "null").await?;
    start(&n.group, &waiting, "null").await?;
    all_reach(&n.group, &[done.clone(), waiting.clone()], FlowStatus::Suspended).await?;
    send_go(&n.group, &done, 1).await?;
    all_reach(&n.group, std::slice::from_ref(&done), FlowStatus::Succeeded).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while n.group.read_local(|kv| shard::get_flow(kv, &done))?.is_some() {
        ensure!(tokio::time::Instant::now() < deadline, "the finished flow was never collected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kept = n.group.read_local(|kv| shard::get_flow(kv, &waiting))?;
    ensure!(kept.map(|r| r.status) == Some(FlowStatus::Suspended), "an unfinished flow is kept");
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

/// Fails with kind "transient" `failures` times, then succeeds; or fails with kind "fatal".
#[derive(Clone)]
struct Flaky {
    calls: Arc<std::sync::atomic::AtomicU32>,
    failures: u32,
    kind: &'static str,
}

impl Flaky {
    async fn call(&self) -> Result<u32, FlowError> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n <= self.failures {
            Err(FlowError::new(self.kind, format!("attempt {n} failed")))
        } else {
            Ok(n)
        }
    }
}

struct Retrying {
    flaky: Flaky,
    policy: RetryPolicy,
}

impl Flow for Retrying {
    const TYPE: &'static str = "retrying";
    type Input = ();
    type Output = u32;

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<u32, FlowError> {
        ctx.effect("call", || self.flaky.call()).retry(self.policy.clone()).await
    }
}

async fn run_retrying(flaky: Flaky, policy: RetryPolicy, expect: FlowStatus) -> Result<(ShardStats, u32)> {
    let n = single_node().await?;
    let registry = Registry::new().register(Retrying { flaky: flaky.clone(), policy })?;
    let (actor, stats) = run_actor(&n.group, registry).await?;
    let flow = FlowId::new("retrying", "r-1");
    start(&n.group, &flow, "null").await?;
    all_reach(&n.group, std::slice::from_ref(&flow), expect).await?;
    actor.stop();
    n.node.shutdown().await;
    Ok((stats, flaky.calls.load(std::sync::atomic::Ordering::SeqCst)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_policy() -> Result<()> {
    let transient = Flaky { calls: Arc::default(), failures: 2, kind: "transient" };
    let policy = RetryPolicy::exponential(5, Duration::from_millis(10)).only(["transient"]);
    let (_, calls) = run_retrying(transient, policy.clone(), FlowStatus::Succeeded).await?;
    ensure!(calls == 3, "two failures then success: {calls} calls");

    let fatal = Flaky { calls: Arc::default(), failures: 10, kind: "fatal" };
    let (_, calls) = run_retrying(fatal, policy.clone(), FlowStatus::Failed).await?;
    ensure!(calls == 1, "a kind the policy does not retry fails at once: {calls} calls");

    let stubborn = Flaky { calls: Arc::default(), failures: 10, kind: "transient" };
    let (_, calls) = run_retrying(stubborn, policy, FlowStatus::Failed).await?;
    ensure!(calls == 5, "max attempts: {calls} calls");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backoff_suspends_the_flow_on_a_durable_timer_that_fires_after_a_restart() -> Result<()> {
    let n = single_node().await?;
    let flaky = Flaky { calls: Arc::default(), failures: 1, kind: "transient" };
    let mut policy = RetryPolicy::exponential(3, Duration::from_millis(1_500));
    policy.suspend_after = Duration::from_millis(50);
    let registry = Registry::new().register(Retrying { flaky: flaky.clone(), policy })?;
    let (actor, stats) = run_actor(&n.group, registry.clone()).await?;
    let flow = FlowId::new("retrying", "r-2");
    start(&n.group, &flow, "null").await?;
    // After the first failure the flow waits on its backoff timer, suspended, with no activation.
    all_reach(&n.group, std::slice::from_ref(&flow), FlowStatus::Suspended).await?;
    let timers = n.group.read_local(|kv| shard::timers_of(kv, &flow))?;
    let backoff_ms = timers
        .iter()
        .find(|(id, _)| id == "call#backoff-1")
        .map(|(_, at)| *at)
        .ok_or_else(|| anyhow!("a durable backoff timer: {timers:?}"))?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while stats.live_flows() > 0 {
        ensure!(tokio::time::Instant::now() < deadline, "activation still live while suspended");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The node goes down during the backoff; the retry happens after the restart.
    actor.stop();
    let n = n.restart().await?;
    ensure!(flaky.calls.load(std::sync::atomic::Ordering::SeqCst) == 1, "no retry before the restart");
    let (actor, _) = run_actor(&n.group, registry).await?;
    all_reach(&n.group, std::slice::from_ref(&flow), FlowStatus::Succeeded).await?;
    ensure!(flaky.calls.load(std::sync::atomic::Ordering::SeqCst) == 2, "one retry");
    let record = n.group.read_local(|kv| shard::get_flow(kv, &flow))?.ok_or_else(|| anyhow!("flow"))?;
    ensure!(record.finished_ms.is_some_and(|f| f >= backoff_ms), "retried at or after the backoff deadline");
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

/// Like [`Retrying`], but the effect is at-most-once: every attempt commits its `Started` marker
/// before the work runs.
struct RetryingOnce {
    flaky: Flaky,
    policy: RetryPolicy,
}

impl Flow for RetryingOnce {
    const TYPE: &'static str = "retrying-once";
    type Input = ();
    type Output = u32;

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<u32, FlowError> {
        ctx.effect("call", || self.flaky.call()).at_most_once().retry(self.policy.clone()).await
    }
}

/// Waits (bounded) until `flow` has finished, and returns its record.
async fn finished(group: &GroupHandle, flow: &FlowId) -> Result<shard::FlowRecord> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let record =
            group.read_local(|kv| shard::get_flow(kv, flow))?.ok_or_else(|| anyhow!("flow {flow}"))?;
        if record.status.is_finished() {
            return Ok(record);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{flow} not finished within {WAIT:?}: {:?}",
            record.status
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_at_most_once_effect_retries_after_a_backoff_that_suspends_the_flow() -> Result<()> {
    let n = single_node().await?;
    let flaky = Flaky { calls: Arc::default(), failures: 1, kind: "transient" };
    // 100 ms is above the suspend threshold: the backoff is a durable timer, and the attempt after
    // it runs in a new activation that replays the effect's record.
    let mut policy = RetryPolicy::exponential(3, Duration::from_millis(100));
    policy.suspend_after = Duration::from_millis(50);
    let registry = Registry::new().register(RetryingOnce { flaky: flaky.clone(), policy })?;
    let (actor, _) = run_actor(&n.group, registry).await?;
    let flow = FlowId::new("retrying-once", "o-1");
    start(&n.group, &flow, "null").await?;
    let record = finished(&n.group, &flow).await?;
    ensure!(
        record.status == FlowStatus::Succeeded,
        "one failed attempt, then success: the flow ended {:?} with {:?}",
        record.status,
        record.error
    );
    let calls = flaky.calls.load(std::sync::atomic::Ordering::SeqCst);
    ensure!(calls == 2, "the work ran once per attempt: {calls} calls");
    let backoff = n.group.read_local(|kv| shard::get_effect(kv, &flow, "call#backoff-1"))?;
    ensure!(
        backoff.is_some_and(|b| b.kind == shard::EffectKind::Sleep),
        "the backoff went through a durable timer"
    );
    let effect = n.group.read_local(|kv| shard::get_effect(kv, &flow, "call"))?;
    ensure!(
        effect.as_ref().is_some_and(|e| e.state == shard::EffectState::Completed(b"2".to_vec())),
        "the second attempt's value is the effect's outcome: {effect:?}"
    );
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

/// Postpones itself once, then does one effect.
struct Later {
    work: Service,
}

impl Flow for Later {
    const TYPE: &'static str = "later";
    type Input = u64;
    type Output = ();

    async fn run(&self, ctx: &Ctx, ms: u64) -> Result<(), FlowError> {
        ctx.postpone("not-before", Duration::from_millis(ms)).await?;
        ctx.effect("work", || self.work.call()).await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postponed_flow_runs_again_once_its_time_has_come() -> Result<()> {
    let n = single_node().await?;
    let work = Service::default();
    let registry = Registry::new().register(Later { work: work.clone() })?;
    let (actor, _) = run_actor(&n.group, registry).await?;
    let flow = FlowId::new("later", "l-1");
    start(&n.group, &flow, "400").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let until_ms = loop {
        let record = n.group.read_local(|kv| shard::get_flow(kv, &flow))?.ok_or_else(|| anyhow!("flow"))?;
        if let FlowStatus::Postponed { until_ms } = record.status {
            break until_ms;
        }
        ensure!(tokio::time::Instant::now() < deadline, "never postponed: {:?}", record.status);
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    ensure!(work.count() == 0, "nothing after the postpone ran yet");
    all_reach(&n.group, std::slice::from_ref(&flow), FlowStatus::Succeeded).await?;
    let record = n.group.read_local(|kv| shard::get_flow(kv, &flow))?.ok_or_else(|| anyhow!("flow"))?;
    ensure!(record.finished_ms.is_some_and(|f| f >= until_ms), "ran again at or after its time");
    ensure!(work.count() == 1);
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

/// Does one effect and finishes.
struct Quick {
    work: Service,
}

impl Flow for Quick {
    const TYPE: &'static str = "quick";
    type Input = ();
    type Output = u32;

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<u32, FlowError> {
        ctx.effect("work", || self.work.call()).await
    }
}

/// A shard actor with small pages, few activation slots, a short queue, a short timer horizon
/// and room for few timers: every bound is reached with a hundred flows.
async fn run_small(group: &GroupHandle, registry: Registry) -> Result<(ShardHandle, ShardStats)> {
    let router: Arc<dyn Router> = Arc::new(HashMap::from([(ShardId(0), group.clone())]));
    let mut args = ShardArgs::new(ShardId(0), group.clone(), router, registry, Duration::from_secs(2));
    args.tuning = Tuning {
        page: 10,
        max_activations: 4,
        max_queued: 8,
        timer_horizon: Duration::from_millis(800),
        timer_scan_every: Duration::from_millis(200),
        max_timers_in_memory: 20,
        max_firing: 4,
    };
    Ok(ShardActor::start(args).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_pages_of_running_flows_and_of_timers_all_finish_after_a_leader_change() -> Result<()> {
    const N: usize = 50; // five pages of ten
    let n = single_node().await?;
    let (naps, quick) = (Service::default(), Service::default());
    let registry =
        Registry::new().register(Napper { work: naps.clone() })?.register(Quick { work: quick.clone() })?;
    // The nappers suspend on timers 3 s away, beyond the horizon of 0.8 s.
    let (actor, stats) = run_small(&n.group, registry.clone()).await?;
    let nappers: Vec<FlowId> = (0..N).map(|i| FlowId::new("napper", format!("n-{i}"))).collect();
    for flow in &nappers {
        start(&n.group, flow, "3000").await?;
    }
    all_reach(&n.group, &nappers, FlowStatus::Suspended).await?;
    ensure!(stats.timers_in_memory() == 0, "timers beyond the horizon are not in memory");
    // The leader goes away; meanwhile fifty more flows are started and wait to be run.
    actor.stop();
    let quick_flows: Vec<FlowId> = (0..N).map(|i| FlowId::new("quick", format!("q-{i}"))).collect();
    for flow in &quick_flows {
        start(&n.group, flow, "null").await?;
    }
    let n = n.restart().await?;
    ensure!(quick.count() == 0 && naps.count() == 0, "nothing ran without a leader's shard actor");
    let (actor, stats) = run_small(&n.group, registry).await?;
    // Bounds hold while the new leader works through five pages of each.
    let watch = tokio::spawn({
        let stats = stats.clone();
        async move {
            let (mut live, mut timers) = (0, 0);
            loop {
                live = live.max(stats.live_flows());
                timers = timers.max(stats.timers_in_memory());
                tokio::time::sleep(Duration::from_millis(2)).await;
                if live > 4 || timers > 20 + 4 {
                    return (live, timers);
                }
            }
        }
    });
    all_reach(&n.group, &quick_flows, FlowStatus::Succeeded).await?;
    all_reach(&n.group, &nappers, FlowStatus::Succeeded).await?;
    if watch.is_finished() {
        let (live, timers) = watch.await?;
        return Err(anyhow!("bounds exceeded: {live} live activations (max 4), {timers} timers in memory (max 20 held + 4 firing)"));
    }
    watch.abort();
    ensure!(quick.count() == N as u32, "each quick flow ran once: {}", quick.count());
    ensure!(naps.count() == N as u32, "each napper woke once: {}", naps.count());
    for flow in &nappers {
        let record = n.group.read_local(|kv| shard::get_flow(kv, flow))?.ok_or_else(|| anyhow!("flow"))?;
        let nap =
            n.group.read_local(|kv| shard::get_effect(kv, flow, "nap"))?.ok_or_else(|| anyhow!("nap"))?;
        let shard::EffectState::Completed(deadline) = nap.state else { return Err(anyhow!("nap state")) };
        let deadline_ms: u64 = serde_json::from_slice(&deadline)?;
        ensure!(record.finished_ms.is_some_and(|f| f >= deadline_ms), "{flow} woke before its deadline");
    }
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_moved_earlier_fires_at_the_earlier_time() -> Result<()> {
    let n = single_node().await?;
    let work = Service::default();
    let registry = Registry::new().register(Later { work: work.clone() })?;
    let (actor, _) = run_actor(&n.group, registry).await?;
    let flow = FlowId::new("later", "moved");
    // Postponed by 20 s: within the default horizon, so its timer is held in memory.
    start(&n.group, &flow, "20000").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let record = n.group.read_local(|kv| shard::get_flow(kv, &flow))?.ok_or_else(|| anyhow!("flow"))?;
        if matches!(record.status, FlowStatus::Postponed { .. }) {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "never postponed: {:?}", record.status);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // An operator restarts it afresh with 300 ms: the same timer, now due much earlier.
    let restart = ShardCommand::Admin {
        flow: flow.clone(),
        expected_epoch: None,
        op: AdminOp::Restart { input: Some(b"300".to_vec()), clear_effects: true },
    };
    n.group.propose_shard(restart).await?.map_err(|r| anyhow!("restart: {r}"))?;
    let restarted = tokio::time::Instant::now();
    let bound = Duration::from_secs(5);
    let done = tokio::time::timeout(bound, async {
        loop {
            let record = n.group.read_local(|kv| shard::get_flow(kv, &flow))?;
            if record.is_some_and(|r| r.status == FlowStatus::Succeeded) {
                return Ok::<_, anyhow::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    ensure!(
        matches!(done, Ok(Ok(()))),
        "the flow re-postponed by 300 ms did not run within {bound:?} (it waited for the old 20 s timer)"
    );
    ensure!(restarted.elapsed() >= Duration::from_millis(300), "fired before its time");
    ensure!(work.count() == 1);
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_actor_that_panics_is_replaced_and_its_flows_finish() -> Result<()> {
    let n = single_node().await?;
    let work = Service::default();
    let registry =
        Registry::new().register(Waiter { work: work.clone() })?.register(Napper { work: work.clone() })?;
    let (actor, stats) = run_actor(&n.group, registry).await?;
    let waiters: Vec<FlowId> = (0..20).map(|i| FlowId::new("waiter", format!("w-{i}"))).collect();
    for flow in &waiters {
        start(&n.group, flow, "null").await?;
    }
    all_reach(&n.group, &waiters, FlowStatus::Suspended).await?;
    let first = actor.current().ok_or_else(|| anyhow!("no shard actor"))?;
    actor.inject_panic();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let replaced = actor.current().is_some_and(|now| now.get_id() != first.get_id());
        if replaced && stats.restarts() == 1 {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "the shard actor was not replaced within 1 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The replacement runs the shard: woken flows, new flows and timers all finish.
    for (i, flow) in waiters.iter().enumerate() {
        send_go(&n.group, flow, i as u32).await?;
    }
    let napper = FlowId::new("napper", "after-panic");
    start(&n.group, &napper, "100").await?;
    all_reach(&n.group, &waiters, FlowStatus::Succeeded).await?;
    all_reach(&n.group, std::slice::from_ref(&napper), FlowStatus::Succeeded).await?;
    ensure!(work.count() == 21, "each flow's effect ran once: {}", work.count());
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_whose_type_the_leader_does_not_run_waits_with_a_note_and_runs_under_one_that_does(
) -> Result<()> {
    let n = single_node().await?;
    let work = Service::default();
    // An older node: it runs `waiter` only; the flow is a `quick` (a rolling deploy adds it).
    let old = Registry::new().register(Waiter { work: work.clone() })?;
    let (actor, stats) = run_actor(&n.group, old).await?;
    let flow = FlowId::new("quick", "new-type");
    start(&n.group, &flow, "null").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let note = loop {
        if let Some(note) = n.group.read_local(|kv| shard::note_of(kv, &flow))? {
            break note;
        }
        ensure!(tokio::time::Instant::now() < deadline, "no note on the flow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    ensure!(note.contains("\"quick\"") && note.contains("waiter"), "the note says why: {note}");
    // It waits: still running, not activated again and again, no actor.
    let record = n.group.read_local(|kv| shard::get_flow(kv, &flow))?.ok_or_else(|| anyhow!("flow"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = n.group.read_local(|kv| shard::get_flow(kv, &flow))?.ok_or_else(|| anyhow!("flow"))?;
    ensure!(later.status == FlowStatus::Running, "it waits instead of failing: {later:?}");
    ensure!(
        later.epoch == record.epoch,
        "not activated again meanwhile: {:?} -> {:?}",
        record.epoch,
        later.epoch
    );
    ensure!(stats.live_flows() == 0, "no actor while it waits");
    // A leader that runs the type takes over: the flow runs, and the note is gone.
    actor.stop();
    let n = n.restart().await?;
    let new = Registry::new().register(Quick { work: work.clone() })?;
    let (actor, _) = run_actor(&n.group, new).await?;
    all_reach(&n.group, std::slice::from_ref(&flow), FlowStatus::Succeeded).await?;
    ensure!(work.count() == 1);
    ensure!(n.group.read_local(|kv| shard::note_of(kv, &flow))?.is_none(), "the note is cleared");
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

/// One effect whose work the test holds.
struct Held {
    work: Service,
}

impl Flow for Held {
    const TYPE: &'static str = "held";
    type Input = ();
    type Output = u32;

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<u32, FlowError> {
        ctx.effect("work", || self.work.call()).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_report_of_a_replaced_activation_never_lets_a_second_one_run() -> Result<()> {
    let n = single_node().await?;
    let (work, mut started) = Service::holding();
    let registry = Registry::new().register(Held { work: work.clone() })?;
    let (actor, stats) = run_actor(&n.group, registry).await?;
    let flow = FlowId::new("held", "h-1");
    start(&n.group, &flow, "null").await?;
    tokio::time::timeout(WAIT, started.recv()).await?.ok_or_else(|| anyhow!("work never started"))?;
    // An `Ended` of another (replaced) actor of this flow arrives late, then an `Activate`.
    let shard = actor.current().ok_or_else(|| anyhow!("no shard actor"))?;
    let stale = ractor::ActorId::Local(u64::MAX);
    shard.send_message(ShardMsg::Ended {
        flow: flow.clone(),
        actor: stale,
        outcome: Ok(Outcome::Suspended),
    })?;
    shard.send_message(ShardMsg::Actions(Arc::new(vec![Action::Activate { flow: flow.clone() }])))?;
    // The activation in flight is still the only one: no second start of the work.
    let second = tokio::time::timeout(Duration::from_millis(1_000), started.recv()).await;
    ensure!(second.is_err(), "a second activation of {flow} started its work");
    ensure!(stats.live_flows() == 1, "{} live activations of one flow", stats.live_flows());
    work.release(1);
    all_reach(&n.group, std::slice::from_ref(&flow), FlowStatus::Succeeded).await?;
    ensure!(work.count() == 1, "the work ran {} times", work.count());
    actor.stop();
    n.node.shutdown().await;
    Ok(())
}

/// Two at-least-once steps.
struct TwoSteps {
    work: Service,
}

impl Flow for TwoSteps {
    const TYPE: &'static str = "two-steps";
    type Input = ();
    type Output = ();

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<(), FlowError> {
        let _tx = ctx.uuid("tx").await?;
        ctx.effect("one", || self.work.call()).await?;
        ctx.effect("two", || self.work.call()).await?;
        Ok(())
    }
}

/// Issue 11 item 4: a flow started on its shard's leader runs its first activation without an
/// `Activate` of its own (it was committed with the start), and `ctx.uuid` costs nothing: the
/// start, `one`'s result, `two`'s result with the end — three log entries for the whole flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_started_on_the_leader_costs_one_entry_per_step_and_none_to_activate() -> Result<()> {
    let n = single_node().await?;
    let work = Service::default();
    let registry = Registry::new().register(TwoSteps { work: work.clone() })?;
    let (handle, _stats) = run_actor(&n.group, registry).await?;
    let committed = |g: &GroupHandle| {
        let g = g.clone();
        async move {
            let (read, _) = g.raft().get_read_log_id().await?;
            Ok::<u64, anyhow::Error>(read.map_or(0, |l| l.index))
        }
    };
    // Wait until the shard actor leads (its first entries are behind us).
    let warm = FlowId::new("two-steps", "warm");
    start(&n.group, &warm, "null").await?;
    finished(&n.group, &warm).await?;
    let before = committed(&n.group).await?;
    let flow = FlowId::new("two-steps", "t-1");
    start(&n.group, &flow, "null").await?;
    let record = finished(&n.group, &flow).await?;
    ensure!(record.status == FlowStatus::Succeeded, "{:?}", record.status);
    ensure!(record.epoch.0 == 1, "ran in the epoch committed with its start, not {}", record.epoch);
    let entries = committed(&n.group).await? - before;
    ensure!(entries == 3, "{entries} log entries for a start and two steps");
    ensure!(work.count() == 4, "each step ran once per flow: {}", work.count());
    handle.stop();
    n.node.shutdown().await;
    Ok(())
}
