//! Messages, timeouts and sleeps on a real single node: a wait for an event not yet in the log
//! suspends the flow; an event or a fired timer makes it runnable; a replay takes the same
//! events in the same order.

mod common;

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use common::{single_node, start, status, WAIT};
use fetter_actors::activation::{self, Outcome};
use fetter_actors::{Ctx, Flow, FlowError, Message, Registry};
use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::FlowId;
use fetter_raft::shard::{AdminOp, Event, FlowStatus, Rejection, ShardCommand, ShardOutcome};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Hello {
    name: String,
}

impl Message for Hello {
    const NAME: &'static str = "Hello";
}

#[derive(Serialize, Deserialize)]
struct Note {
    n: u32,
}

impl Message for Note {
    const NAME: &'static str = "Note";
}

async fn send<M: Message>(group: &GroupHandle, flow: &FlowId, message: &M) -> Result<ShardOutcome> {
    let event = Event::Message {
        type_name: M::NAME.into(),
        payload: serde_json::to_vec(message)?,
        idempotency_key: None,
    };
    group
        .propose_shard(ShardCommand::AppendEvent { flow: flow.clone(), event })
        .await?
        .map_err(|r| anyhow!("{r}"))
}

async fn output<T: serde::de::DeserializeOwned>(group: &GroupHandle, flow: &FlowId) -> Result<T> {
    Ok(serde_json::from_slice(status(group, flow).await?.output.as_deref().unwrap_or_default())?)
}

/// Fires `flow`'s timer `timer_id` as the shard leader will: refused until due, then once.
async fn fire_when_due(group: &GroupHandle, flow: &FlowId, timer_id: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let fire = ShardCommand::FireTimer { flow: flow.clone(), timer_id: timer_id.into() };
        match group.propose_shard(fire).await? {
            Ok(ShardOutcome::TimerFired { fired: true }) => return Ok(()),
            Err(Rejection::TimerNotDue { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return Err(anyhow!("firing {timer_id}: {other:?}")),
        }
    }
}

struct Greeter;

impl Flow for Greeter {
    const TYPE: &'static str = "greeter";
    type Input = ();
    type Output = String;

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<String, FlowError> {
        let hello: Hello = ctx.message().await?;
        Ok(format!("hello, {}", hello.name))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_flow_suspends_and_its_message_wakes_it() -> Result<()> {
    let n = single_node().await?;
    let registry = Registry::new().register(Greeter)?;
    let flow = FlowId::new("greeter", "g-1");
    start(&n.group, &flow, "null").await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Suspended);
    ensure!(status(&n.group, &flow).await?.status == FlowStatus::Suspended, "suspended: costs only disk");
    send(&n.group, &flow, &Hello { name: "ada".into() }).await?;
    ensure!(status(&n.group, &flow).await?.status == FlowStatus::Running, "the message made it runnable");
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    ensure!(output::<String>(&n.group, &flow).await? == "hello, ada");
    n.node.shutdown().await;
    Ok(())
}

struct Picky;

impl Flow for Picky {
    const TYPE: &'static str = "picky";
    type Input = ();
    type Output = (String, u32, u32);

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<Self::Output, FlowError> {
        let hello: Hello = ctx.message().await?;
        let two: Note = ctx.message_matching(|n: &Note| n.n == 2).await?;
        let first: Note = ctx.message().await?;
        Ok((hello.name, two.n, first.n))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_takes_the_earliest_match_and_leaves_the_rest_for_later_waits() -> Result<()> {
    let n = single_node().await?;
    let registry = Registry::new().register(Picky)?;
    let flow = FlowId::new("picky", "p-1");
    start(&n.group, &flow, "null").await?;
    send(&n.group, &flow, &Note { n: 1 }).await?;
    send(&n.group, &flow, &Hello { name: "a".into() }).await?;
    send(&n.group, &flow, &Note { n: 2 }).await?;
    send(&n.group, &flow, &Hello { name: "b".into() }).await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    let got: (String, u32, u32) = output(&n.group, &flow).await?;
    ensure!(got == ("a".to_string(), 2, 1), "{got:?}");
    n.node.shutdown().await;
    Ok(())
}

/// The loan application's shape: take up to 3 replies until the window closes.
struct Loan;

impl Flow for Loan {
    const TYPE: &'static str = "loan";
    type Input = u64;
    type Output = Vec<u32>;

    async fn run(&self, ctx: &Ctx, window_ms: u64) -> Result<Vec<u32>, FlowError> {
        let replies: Vec<Note> = ctx.messages(3, "window", Duration::from_millis(window_ms)).await?;
        Ok(replies.into_iter().map(|r| r.n).collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_the_committed_timer_event_and_later_replies_do_not_count_on_replay() -> Result<()> {
    let n = single_node().await?;
    let registry = Registry::new().register(Loan)?;
    let flow = FlowId::new("loan", "l-1");
    start(&n.group, &flow, "300").await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Suspended);
    send(&n.group, &flow, &Note { n: 7 }).await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Suspended, "one of three");
    fire_when_due(&n.group, &flow, "window").await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    ensure!(output::<Vec<u32>>(&n.group, &flow).await? == vec![7]);

    // A reply committed after the window closed is in the log, but a replay (restart keeping the
    // journal) meets the TimerFired first and decides the same.
    let restart = ShardCommand::Admin {
        flow: flow.clone(),
        expected_epoch: None,
        op: AdminOp::Restart { input: None, clear_effects: false },
    };
    n.group.propose_shard(restart).await?.map_err(|r| anyhow!("{r}"))?;
    send(&n.group, &flow, &Note { n: 8 }).await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    ensure!(output::<Vec<u32>>(&n.group, &flow).await? == vec![7], "the late reply is not counted");
    n.node.shutdown().await;
    Ok(())
}

struct Sleeper;

impl Flow for Sleeper {
    const TYPE: &'static str = "sleeper";
    type Input = ();
    type Output = Option<String>;

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<Option<String>, FlowError> {
        ctx.sleep("nap", Duration::from_millis(200)).await?;
        let hello: Option<Hello> = ctx.message_within("hello-timeout", Duration::from_millis(100)).await?;
        Ok(hello.map(|h| h.name))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_and_a_message_timeout_fire_at_or_after_their_deadline() -> Result<()> {
    let n = single_node().await?;
    let registry = Registry::new().register(Sleeper)?;
    let flow = FlowId::new("sleeper", "s-1");
    start(&n.group, &flow, "null").await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Suspended);
    fire_when_due(&n.group, &flow, "nap").await?;
    ensure!(
        activation::activate(&n.group, &registry, &flow).await? == Outcome::Suspended,
        "now waits for hello"
    );
    fire_when_due(&n.group, &flow, "hello-timeout").await?;
    ensure!(activation::activate(&n.group, &registry, &flow).await? == Outcome::Succeeded);
    ensure!(output::<Option<String>>(&n.group, &flow).await?.is_none(), "timed out");
    n.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_committed_between_the_read_and_the_suspend_resumes_the_flow() -> Result<()> {
    let n = single_node().await?;
    let registry = Registry::new().register(Greeter)?;
    let flow = FlowId::new("greeter", "race");
    start(&n.group, &flow, "null").await?;
    // Stop the activation right after it looked at the log and found nothing, before `Suspend`.
    let (reached, release) = fetter_actors::hooks::pause_before_suspend(flow.clone());
    let activation = tokio::spawn({
        let (group, registry, flow) = (n.group.clone(), registry.clone(), flow.clone());
        async move { activation::activate(&group, &registry, &flow).await }
    });
    tokio::time::timeout(WAIT, reached.notified()).await?;
    // The message lands exactly in the window.
    let appended = send(&n.group, &flow, &Hello { name: "in-between".into() }).await?;
    ensure!(appended == ShardOutcome::Appended { seq: 0 });
    release.notify_one();
    // `Suspend{events_seen: 0}` is answered `Resume`: the same activation takes the message.
    let outcome = tokio::time::timeout(WAIT, activation).await???;
    ensure!(outcome == Outcome::Succeeded, "the activation continued: {outcome:?}");
    ensure!(output::<String>(&n.group, &flow).await? == "hello, in-between");
    n.node.shutdown().await;
    Ok(())
}
