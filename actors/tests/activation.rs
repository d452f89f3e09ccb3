//! The programming model on a real single node: one openraft group on sled in a temp dir,
//! served over tonic on loopback. A crash is an activation task aborted mid-step; the next
//! activation replays the flow from its journal.

mod common;

use std::time::{Duration, SystemTime};

use anyhow::{anyhow, ensure, Result};
use common::{crash_during, single_node, start, status, Service, WAIT};
use fetter_actors::activation::{self, Outcome};
use fetter_actors::{kind, Ctx, Flow, FlowError, Registry, RetryPolicy};
use fetter_raft::ids::{Epoch, FlowId};
use fetter_raft::shard::{self, AdminOp, EffectState, FlowStatus, ShardCommand};
use fetter_raft::sync::now_ms;

/// reserve (at-least-once) → ship (at-most-once) → capture.
struct Order {
    reserve: Service,
    ship: Service,
    capture: Service,
}

impl Flow for Order {
    const TYPE: &'static str = "order";
    type Input = String;
    type Output = String;

    async fn run(&self, ctx: &Ctx, order: String) -> Result<String, FlowError> {
        let tx = ctx.uuid("tx").await?;
        ctx.effect("reserve", || self.reserve.call()).await?;
        ctx.effect("ship", || self.ship.call()).at_most_once().await?;
        ctx.effect("capture", || self.capture.call()).await?;
        Ok(format!("{order}:{tx}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_runs_to_completion_and_a_replay_runs_nothing_again() -> Result<()> {
    let n = single_node().await?;
    let order = Order { reserve: Service::default(), ship: Service::default(), capture: Service::default() };
    let (reserve, ship, capture) = (order.reserve.clone(), order.ship.clone(), order.capture.clone());
    let registry = Registry::new().register(order)?;
    let flow = FlowId::new("order", "o-1");
    start(&n.group, &flow, "\"o-1\"").await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    let record = status(&n.group, &flow).await?;
    ensure!(record.status == FlowStatus::Succeeded);
    let output: String = serde_json::from_slice(record.output.as_deref().unwrap_or_default())?;
    ensure!(output.starts_with("o-1:"), "{output}");
    ensure!((reserve.count(), ship.count(), capture.count()) == (1, 1, 1));

    // Restart keeping the effects: the replay returns every recorded value, runs nothing, and
    // produces the same output (the uuid included).
    let restart = ShardCommand::Admin {
        flow: flow.clone(),
        expected_epoch: None,
        op: AdminOp::Restart { input: None, clear_effects: false },
    };
    n.group.propose_shard(restart).await?.map_err(|r| anyhow!("{r}"))?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    let again: String =
        serde_json::from_slice(status(&n.group, &flow).await?.output.as_deref().unwrap_or_default())?;
    ensure!(again == output, "same output on replay: {again} vs {output}");
    ensure!((reserve.count(), ship.count(), capture.count()) == (1, 1, 1), "nothing ran twice");
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_an_at_least_once_effect_runs_it_again_and_nothing_before_it() -> Result<()> {
    let n = single_node().await?;
    let (capture, mut capture_started) = Service::holding();
    let order = Order { reserve: Service::default(), ship: Service::default(), capture: capture.clone() };
    let (reserve, ship) = (order.reserve.clone(), order.ship.clone());
    let registry = Registry::new().register(order)?;
    let flow = FlowId::new("order", "o-2");
    start(&n.group, &flow, "\"o-2\"").await?;
    crash_during(&n.group, &registry, &flow, &mut capture_started).await?;
    ensure!(capture.count() == 1 && status(&n.group, &flow).await?.status == FlowStatus::Running);
    // The next activation: reserve and ship are recorded, capture runs again.
    capture.release(1);
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    ensure!((reserve.count(), ship.count(), capture.count()) == (1, 1, 2));
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_an_at_most_once_effect_fails_the_flow_with_outcome_unknown() -> Result<()> {
    let n = single_node().await?;
    let (ship, mut ship_started) = Service::holding();
    let order = Order { reserve: Service::default(), ship: ship.clone(), capture: Service::default() };
    let capture = order.capture.clone();
    let registry = Registry::new().register(order)?;
    let flow = FlowId::new("order", "o-3");
    start(&n.group, &flow, "\"o-3\"").await?;
    crash_during(&n.group, &registry, &flow, &mut ship_started).await?;
    ship.release(10);
    let outcome = activation::activate(&n.group, &registry, &flow).await?;
    let Outcome::Failed(error) = outcome else { return Err(anyhow!("expected a failure, got {outcome:?}")) };
    ensure!(error.kind == kind::EFFECT_OUTCOME_UNKNOWN && error.message.contains("\"ship\""), "{error}");
    ensure!(ship.count() == 1, "ship ran once, never again");
    ensure!(capture.count() == 0, "the flow never continued past ship");
    let record = status(&n.group, &flow).await?;
    ensure!(record.status == FlowStatus::Failed);
    ensure!(record.error.map(|e| e.kind) == Some(kind::EFFECT_OUTCOME_UNKNOWN.to_string()));
    n.node.shutdown().await;
    Ok(())
}

/// An at-most-once effect with a retry policy: its first attempt fails with kind "transient", the
/// later ones call `then`.
struct FirstAttemptFails {
    attempts: Service,
    then: Service,
    policy: RetryPolicy,
}

impl Flow for FirstAttemptFails {
    const TYPE: &'static str = "first-attempt-fails";
    type Input = ();
    type Output = u32;

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<u32, FlowError> {
        let attempt = || async {
            if self.attempts.call().await? == 1 {
                return Err(FlowError::new("transient", "the first attempt fails"));
            }
            self.then.call().await
        };
        ctx.effect("ship", attempt).at_most_once().retry(self.policy.clone()).await
    }
}

/// Runs an activation of `flow` (a [`FirstAttemptFails`]) in a task and kills it once its failed
/// first attempt is recorded, while it sleeps its in-memory backoff; returns the recorded time of
/// the next attempt.
async fn crash_after_the_first_failed_attempt(
    n: &common::Node,
    registry: &Registry,
    flow: &FlowId,
) -> Result<u64> {
    let task = tokio::spawn({
        let (group, registry, flow) = (n.group.clone(), registry.clone(), flow.clone());
        async move { activation::activate(&group, &registry, &flow).await }
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    let retry_at_ms = loop {
        let record = n.group.read(|kv| shard::get_effect(kv, flow, "ship")).await??;
        if let Some(EffectState::AttemptFailed { attempt, error, retry_at_ms }) = record.map(|r| r.state) {
            ensure!(attempt == 1 && error.kind == "transient", "attempt {attempt}: {error:?}");
            break retry_at_ms;
        }
        ensure!(tokio::time::Instant::now() < deadline, "the failed attempt was never recorded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    task.abort();
    let _ = task.await;
    Ok(retry_at_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_that_the_redeployed_policy_does_not_retry_is_the_outcome() -> Result<()> {
    let n = single_node().await?;
    let policy = RetryPolicy::exponential(3, Duration::from_secs(1));
    let v1 = FirstAttemptFails { attempts: Service::default(), then: Service::default(), policy };
    let (attempts, then) = (v1.attempts.clone(), v1.then.clone());
    let flow = FlowId::new("first-attempt-fails", "f-3");
    start(&n.group, &flow, "null").await?;
    crash_after_the_first_failed_attempt(&n, &Registry::new().register(v1)?, &flow).await?;
    // Redeployed with a policy of one attempt: the recorded error settles the effect.
    let policy = RetryPolicy::exponential(1, Duration::from_secs(1));
    let v2 = FirstAttemptFails { attempts: attempts.clone(), then: then.clone(), policy };
    let outcome = activation::activate(&n.group, &Registry::new().register(v2)?, &flow).await?;
    ensure!(matches!(&outcome, Outcome::Failed(e) if e.kind == "transient"), "{outcome:?}");
    ensure!((attempts.count(), then.count()) == (1, 0), "no second attempt");
    let record = n.group.read(|kv| shard::get_effect(kv, &flow, "ship")).await??;
    ensure!(matches!(record.map(|r| r.state), Some(EffectState::Failed(e)) if e.kind == "transient"));
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_an_in_memory_backoff_of_an_at_most_once_effect_retries_on_replay() -> Result<()> {
    let n = single_node().await?;
    // 1 s is below the default suspend threshold (5 s): the backoff is slept in memory.
    let policy = RetryPolicy::exponential(3, Duration::from_secs(1));
    let flaky = FirstAttemptFails { attempts: Service::default(), then: Service::default(), policy };
    let (attempts, then) = (flaky.attempts.clone(), flaky.then.clone());
    let registry = Registry::new().register(flaky)?;
    let flow = FlowId::new("first-attempt-fails", "f-1");
    start(&n.group, &flow, "null").await?;
    let retry_at_ms = crash_after_the_first_failed_attempt(&n, &registry, &flow).await?;
    ensure!((attempts.count(), then.count()) == (1, 0), "no second attempt before the crash");
    // The replay knows the first attempt's outcome: it waits what is left of the backoff and
    // makes the second attempt, instead of failing with effect_outcome_unknown.
    let outcome = activation::activate(&n.group, &registry, &flow).await?;
    ensure!(outcome == Outcome::Succeeded, "{outcome:?}");
    ensure!(now_ms() >= retry_at_ms, "the second attempt came at or after the recorded retry time");
    ensure!((attempts.count(), then.count()) == (2, 1), "one attempt each");
    let record = n.group.read(|kv| shard::get_effect(kv, &flow, "ship")).await??;
    ensure!(record.map(|r| r.state) == Some(EffectState::Completed(b"1".to_vec())));
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_retried_at_most_once_attempt_fails_the_flow_with_outcome_unknown() -> Result<()> {
    let n = single_node().await?;
    let (then, mut then_started) = Service::holding();
    let policy = RetryPolicy::exponential(3, Duration::from_millis(10));
    let flaky = FirstAttemptFails { attempts: Service::default(), then: then.clone(), policy };
    let attempts = flaky.attempts.clone();
    let registry = Registry::new().register(flaky)?;
    let flow = FlowId::new("first-attempt-fails", "f-2");
    start(&n.group, &flow, "null").await?;
    // The second attempt is in flight at the crash: its outcome is unknown.
    crash_during(&n.group, &registry, &flow, &mut then_started).await?;
    then.release(10);
    let outcome = activation::activate(&n.group, &registry, &flow).await?;
    let Outcome::Failed(error) = outcome else { return Err(anyhow!("expected a failure, got {outcome:?}")) };
    ensure!(error.kind == kind::EFFECT_OUTCOME_UNKNOWN && error.message.contains("\"ship\""), "{error}");
    ensure!((attempts.count(), then.count()) == (2, 1), "no third attempt");
    n.node.shutdown().await;
    Ok(())
}

/// Records an error from its first effect, then waits in a second one.
struct Erring {
    failing: Service,
    then: Service,
}

impl Flow for Erring {
    const TYPE: &'static str = "erring";
    type Input = ();
    type Output = String;

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<String, FlowError> {
        let first = ctx
            .effect("lookup", || async {
                self.failing.call().await?;
                Err::<u32, _>(FlowError::new("not_found", "no such customer"))
            })
            .await;
        ctx.effect("then", || self.then.call()).await?;
        Ok(format!("{first:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_error_is_recorded_and_replayed_without_running_again() -> Result<()> {
    let n = single_node().await?;
    let (then, mut then_started) = Service::holding();
    let failing = Service::default();
    let registry = Registry::new().register(Erring { failing: failing.clone(), then: then.clone() })?;
    let flow = FlowId::new("erring", "e-1");
    start(&n.group, &flow, "null").await?;
    crash_during(&n.group, &registry, &flow, &mut then_started).await?;
    then.release(1);
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    ensure!(failing.count() == 1, "the failing work ran once");
    let output: String =
        serde_json::from_slice(status(&n.group, &flow).await?.output.as_deref().unwrap_or_default())?;
    ensure!(output.contains("not_found: no such customer"), "the replay saw the recorded error: {output}");
    let recorded = n.group.read(|kv| shard::get_effect(kv, &flow, "lookup")).await??;
    ensure!(matches!(recorded.map(|r| r.state), Some(EffectState::Failed(e)) if e.kind == "not_found"));
    n.node.shutdown().await;
    Ok(())
}

/// uuid / now / random, then a loop that keeps its position in a state value (the newsletter
/// pattern); step 2 is held so a crash can happen inside it. Every run reports the uuid and
/// random number it got.
struct Helpers {
    steps: Service,
    hold: Service,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, u64)>>>,
}

impl Flow for Helpers {
    const TYPE: &'static str = "helpers";
    type Input = ();
    type Output = (String, u64, u64, u32);

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<Self::Output, FlowError> {
        let id = ctx.uuid("id").await?;
        let now = ctx.now("now").await?;
        let dice = ctx.random("dice").await?;
        self.seen.lock().expect("seen lock").push((id.to_string(), dice));
        let position = ctx.state::<u32>("position");
        let mut i = position.get().await?.unwrap_or(0);
        while i < 4 {
            let service = if i == 2 { &self.hold } else { &self.steps };
            ctx.effect(format!("step-{i}"), || service.call()).await?;
            i += 1;
            position.set(&i).await?;
        }
        let ms =
            now.duration_since(SystemTime::UNIX_EPOCH).map_err(|e| FlowError::new("clock", e.to_string()))?;
        Ok((id.to_string(), ms.as_millis() as u64, dice, i))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn determinism_helpers_and_state_are_the_same_on_replay() -> Result<()> {
    let n = single_node().await?;
    let (hold, mut hold_started) = Service::holding();
    let steps = Service::default();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let registry =
        Registry::new().register(Helpers { steps: steps.clone(), hold: hold.clone(), seen: seen.clone() })?;
    let flow = FlowId::new("helpers", "h-1");
    start(&n.group, &flow, "null").await?;
    crash_during(&n.group, &registry, &flow, &mut hold_started).await?;
    let recorded = |id: &'static str| {
        let (group, flow) = (n.group.clone(), flow.clone());
        async move {
            match group.read(move |kv| shard::get_effect(kv, &flow, id)).await??.map(|r| r.state) {
                Some(EffectState::Completed(v)) => Ok::<_, anyhow::Error>(v),
                other => Err(anyhow!("{id} recorded as {other:?}")),
            }
        }
    };
    let first_now = recorded("now").await?;
    let (first_id, first_dice) = seen.lock().expect("seen lock")[0].clone();
    // uuid and random are derived from the run's seed: no step of their own in the journal.
    for derived in ["id", "dice"] {
        let row =
            n.group.read(move |kv| shard::get_effect(kv, &FlowId::new("helpers", "h-1"), derived)).await??;
        ensure!(row.is_none(), "{derived} was committed: {row:?}");
    }
    ensure!(serde_json::from_slice::<u32>(&recorded("position").await?)? == 2, "position 2 at the crash");
    hold.release(1);
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    let (id, now, dice, position): (String, u64, u64, u32) =
        serde_json::from_slice(status(&n.group, &flow).await?.output.as_deref().unwrap_or_default())?;
    ensure!(first_id == id, "the uuid of the first run");
    ensure!(serde_json::from_slice::<u64>(&first_now)? == now, "the time of the first run");
    ensure!(first_dice == dice, "the random number of the first run");
    ensure!(position == 4);
    // Steps 0, 1 and 3 ran once; step 2 (in flight at the crash) ran again.
    ensure!((steps.count(), hold.count()) == (3, 2), "{} {}", steps.count(), hold.count());
    let rows = n.group.read(|kv| shard::list_effects(kv, &flow)).await??;
    ensure!(rows.iter().filter(|(id, _)| id == "position").count() == 1, "one row for the state");
    // Another flow, and a new run of this one (a restart that clears its effects), get other
    // values; a restart that keeps the effects keeps them.
    let other = FlowId::new("helpers", "h-2");
    start(&n.group, &other, "null").await?;
    hold.release(10);
    ensure!(activation::activate(&n.group, &registry, &other).await? == Outcome::Succeeded);
    for clear_effects in [false, true] {
        let restart = ShardCommand::Admin {
            flow: flow.clone(),
            expected_epoch: None,
            op: AdminOp::Restart { input: None, clear_effects },
        };
        n.group.propose_shard(restart).await?.map_err(|r| anyhow!("{r}"))?;
        ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    }
    let seen = seen.lock().expect("seen lock").clone();
    // h-1 (crash), h-1 (replay), h-2, h-1 kept, h-1 cleared.
    ensure!(seen.len() == 5, "{seen:?}");
    ensure!(seen[2] != seen[0] && seen[2].0 != seen[0].0, "another flow, other values: {seen:?}");
    ensure!(seen[3] == seen[0], "a restart keeping the effects keeps the values: {seen:?}");
    ensure!(seen[4].0 != seen[0].0 && seen[4].1 != seen[0].1, "a new run, new values: {seen:?}");
    n.node.shutdown().await;
    Ok(())
}

struct Panicky;

impl Flow for Panicky {
    const TYPE: &'static str = "panicky";
    type Input = ();
    type Output = ();

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<(), FlowError> {
        ctx.uuid("before").await?;
        panic!("boom in flow code");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_flow_fails_alone() -> Result<()> {
    let n = single_node().await?;
    let order = Order { reserve: Service::default(), ship: Service::default(), capture: Service::default() };
    let registry = Registry::new().register(Panicky)?.register(order)?;
    let bad = FlowId::new("panicky", "p-1");
    let good = FlowId::new("order", "o-9");
    start(&n.group, &bad, "null").await?;
    start(&n.group, &good, "\"o-9\"").await?;
    let outcome = activation::activate(&n.group, &registry, &bad).await?;
    ensure!(
        matches!(&outcome, Outcome::Failed(e) if e.kind == kind::PANIC && e.message == "boom in flow code"),
        "{outcome:?}"
    );
    ensure!(activation::activate(&n.group, &registry, &good).await? == Outcome::Succeeded);
    ensure!(status(&n.group, &bad).await?.status == FlowStatus::Failed);
    n.node.shutdown().await;
    Ok(())
}

/// Version 1 records "x" as an effect; version 2 asks for a state "x".
struct DriftV1 {
    hold: Service,
}
struct DriftV2;

impl Flow for DriftV1 {
    const TYPE: &'static str = "drift";
    type Input = ();
    type Output = ();

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<(), FlowError> {
        ctx.effect("x", || async { Ok::<_, FlowError>(1u32) }).await?;
        ctx.effect("hold", || self.hold.call()).await?;
        Ok(())
    }
}

impl Flow for DriftV2 {
    const TYPE: &'static str = "drift";
    type Input = ();
    type Output = ();

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<(), FlowError> {
        ctx.state::<u32>("x").get().await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_drift_fails_the_flow_naming_the_effect() -> Result<()> {
    let n = single_node().await?;
    let (hold, mut hold_started) = Service::holding();
    let v1 = Registry::new().register(DriftV1 { hold })?;
    let flow = FlowId::new("drift", "d-1");
    start(&n.group, &flow, "null").await?;
    crash_during(&n.group, &v1, &flow, &mut hold_started).await?;
    // Redeployed with changed code.
    let v2 = Registry::new().register(DriftV2)?;
    let outcome = activation::activate(&n.group, &v2, &flow).await?;
    ensure!(
        matches!(&outcome, Outcome::Failed(e) if e.kind == kind::REPLAY_DRIFT && e.message.contains("\"x\"")),
        "{outcome:?}"
    );
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_activation_commits_nothing_more() -> Result<()> {
    let n = single_node().await?;
    let (reserve, mut reserve_started) = Service::holding();
    let order = Order { reserve: reserve.clone(), ship: Service::default(), capture: Service::default() };
    let ship = order.ship.clone();
    let registry = Registry::new().register(order)?;
    let flow = FlowId::new("order", "o-4");
    start(&n.group, &flow, "\"o-4\"").await?;
    let old = tokio::spawn({
        let (group, registry, flow) = (n.group.clone(), registry.clone(), flow.clone());
        async move { activation::activate(&group, &registry, &flow).await }
    });
    tokio::time::timeout(WAIT, reserve_started.recv())
        .await?
        .ok_or_else(|| anyhow!("reserve never started"))?;
    // A newer activation takes the flow while the old one (epoch 2: the start claimed epoch 1
    // for its leader, whose shard actor does not run in this test) is inside `reserve`.
    let newer = ShardCommand::Activate { flow: flow.clone(), epoch: Epoch(3) };
    n.group.propose_shard(newer).await?.map_err(|r| anyhow!("{r}"))?;
    reserve.release(1);
    let outcome = tokio::time::timeout(WAIT, old).await???;
    ensure!(matches!(outcome, Outcome::Fenced(_)), "{outcome:?}");
    ensure!(ship.count() == 0, "the fenced activation went no further");
    let reserve_record = n.group.read(|kv| shard::get_effect(kv, &flow, "reserve")).await??;
    ensure!(reserve_record.is_none(), "its result was refused");
    ensure!(status(&n.group, &flow).await?.epoch == Epoch(3));
    n.node.shutdown().await;
    Ok(())
}

/// Two at-least-once effects, then an at-most-once one.
struct Steps {
    first: Service,
    second: Service,
    once: Service,
}

impl Flow for Steps {
    const TYPE: &'static str = "steps";
    type Input = ();
    type Output = u32;

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<u32, FlowError> {
        let a = ctx.effect("first", || self.first.call()).await?;
        let b = ctx.effect("second", || self.second.call()).await?;
        let c = ctx.effect("once", || self.once.call()).at_most_once().await?;
        Ok(a + b + c)
    }
}

/// The index of the last committed entry (asked from Raft, not from the metrics, which lag).
async fn committed(n: &common::Node) -> Result<u64> {
    let (read_log_id, _) = n.group.raft().get_read_log_id().await?;
    Ok(read_log_id.map_or(0, |l| l.index))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_result_is_durable_before_the_next_work_starts() -> Result<()> {
    let n = single_node().await?;
    let (second, mut second_started) = Service::holding();
    let steps = Steps { first: Service::default(), second: second.clone(), once: Service::default() };
    let first = steps.first.clone();
    let registry = Registry::new().register(steps)?;
    let flow = FlowId::new("steps", "s-1");
    start(&n.group, &flow, "null").await?;
    crash_during(&n.group, &registry, &flow, &mut second_started).await?;
    // `first` was recorded before `second`'s work began, so the crash does not run it again.
    let recorded = n.group.read(|kv| shard::get_effect(kv, &flow, "first")).await??;
    ensure!(
        matches!(recorded.map(|r| r.state), Some(EffectState::Completed(_))),
        "first is committed while second runs"
    );
    second.release(10);
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    ensure!((first.count(), second.count()) == (1, 2), "only the interrupted work ran again");
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_result_shares_a_log_entry_with_the_next_step() -> Result<()> {
    let n = single_node().await?;
    let steps = Steps { first: Service::default(), second: Service::default(), once: Service::default() };
    let registry = Registry::new().register(steps)?;
    let flow = FlowId::new("steps", "s-2");
    start(&n.group, &flow, "null").await?;
    let before = committed(&n).await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    // Activate; `first` alone (before `second` runs); `second` with `once`'s Started marker;
    // `once`'s outcome (at once: at-most-once); the flow's end. Six commands, five entries.
    let entries = committed(&n).await? - before;
    ensure!(entries == 5, "{entries} entries for one activation");
    let record = status(&n.group, &flow).await?;
    ensure!(record.status == FlowStatus::Succeeded);
    let effects = n.group.read(|kv| shard::list_effects(kv, &flow)).await??;
    ensure!(effects.len() == 3, "every effect is recorded: {effects:?}");
    n.node.shutdown().await;
    Ok(())
}

/// Records, from inside its effect, the activation `current()` reports.
struct WhoAmI {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Option<activation::Current>>>>,
}

impl Flow for WhoAmI {
    const TYPE: &'static str = "who-am-i";
    type Input = String;
    type Output = u64;

    async fn run(&self, ctx: &Ctx, _: String) -> Result<u64, FlowError> {
        ctx.effect("look", || async {
            self.seen.lock().expect("seen lock").push(activation::current());
            Ok::<_, FlowError>(())
        })
        .await?;
        Ok(ctx.epoch().0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_code_sees_its_activation_and_epoch_as_a_fencing_token() -> Result<()> {
    let n = single_node().await?;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let registry = Registry::new().register(WhoAmI { seen: seen.clone() })?;
    let flow = FlowId::new("who-am-i", "w-1");
    start(&n.group, &flow, "\"w-1\"").await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    // A restart that forgets the effect runs it again, in a later activation.
    let restart = ShardCommand::Admin {
        flow: flow.clone(),
        expected_epoch: None,
        op: AdminOp::Restart { input: None, clear_effects: true },
    };
    n.group.propose_shard(restart).await?.map_err(|r| anyhow!("{r}"))?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    let seen = seen.lock().expect("seen lock").clone();
    ensure!(seen.len() == 2, "the effect ran twice: {seen:?}");
    let epochs: Vec<Epoch> = seen
        .iter()
        .map(|c| c.as_ref().filter(|c| c.flow == flow).map(|c| c.epoch).ok_or_else(|| anyhow!("{c:?}")))
        .collect::<Result<_>>()?;
    ensure!(epochs[0] < epochs[1], "the epoch grows from one activation to the next: {epochs:?}");
    let output: u64 =
        serde_json::from_slice(status(&n.group, &flow).await?.output.as_deref().unwrap_or_default())?;
    ensure!(Epoch(output) == epochs[1], "the same epoch as ctx.epoch(): {output} vs {epochs:?}");
    // Outside of a flow's code there is none.
    ensure!(activation::current().is_none());
    n.node.shutdown().await;
    Ok(())
}
