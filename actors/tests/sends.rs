//! Sends between flows on a real node with two shard groups and their shard actors: nothing is
//! silently lost (letters to missing or finished flows are kept as dead letters) and a send that
//! re-runs after an operator's repair is a new delivery, while a replay delivers nothing again.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use common::{node_with_shards, Go, Shards, WAIT};
use fetter_actors::control::ControlPanel;
use fetter_actors::shard_actor::{Router, ShardActor, ShardArgs, ShardHandle};
use fetter_actors::{Ctx, Flow, FlowError, Message, Registry};
use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{FlowId, ShardId};
use fetter_raft::shard::{self, DeadLetterReason, Event, FlowStatus};
use serde::{Deserialize, Serialize};

const SHARDS: u32 = 2;

/// What a receiver waits for (it never comes in these tests).
#[derive(Serialize, Deserialize)]
struct Stop;

impl Message for Stop {
    const NAME: &'static str = "Stop";
}

/// Sends `Go` to the receiver named by its input, then succeeds.
struct Sender;

impl Flow for Sender {
    const TYPE: &'static str = "sender";
    type Input = String;
    type Output = u32;

    async fn run(&self, ctx: &Ctx, target: String) -> Result<u32, FlowError> {
        ctx.send("go", &FlowId::new("receiver", target), &Go { n: 1 }).await?;
        Ok(1)
    }
}

/// Waits for `Stop`: its event log shows what arrived.
struct Receiver;

impl Flow for Receiver {
    const TYPE: &'static str = "receiver";
    type Input = u32;
    type Output = u32;

    async fn run(&self, ctx: &Ctx, _: u32) -> Result<u32, FlowError> {
        let _: Stop = ctx.message().await?;
        Ok(0)
    }
}

struct Setup {
    node: Shards,
    panel: ControlPanel,
    actors: Vec<ShardHandle>,
}

impl Setup {
    async fn new() -> Result<Setup> {
        let node = node_with_shards(SHARDS).await?;
        let routes: HashMap<ShardId, GroupHandle> =
            node.groups.iter().enumerate().map(|(s, g)| (ShardId(s as u32), g.clone())).collect();
        let router: Arc<dyn Router> = Arc::new(routes);
        let registry = Registry::new().register(Sender)?.register(Receiver)?;
        let mut actors = Vec::new();
        for (s, group) in node.groups.iter().enumerate() {
            let args = ShardArgs::new(
                ShardId(s as u32),
                group.clone(),
                router.clone(),
                registry.clone(),
                Duration::from_secs(2),
            );
            actors.push(ShardActor::start(args).await?.0);
        }
        Ok(Setup { node, panel: ControlPanel::new(router, SHARDS), actors })
    }

    async fn stop(self) {
        for a in self.actors {
            a.stop();
        }
        self.node.node.shutdown().await;
    }

    /// Polls `check` until it holds, failing with `what` after [`WAIT`].
    async fn until<F, Fut>(&self, what: &str, mut check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check().await? {
            ensure!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn status(&self, flow: &FlowId, status: FlowStatus) -> Result<()> {
        let what = format!("{flow} is {status:?}");
        self.until(&what, || async { Ok(self.panel.get(flow).await?.record.status == status) }).await
    }

    /// The `Go` messages in `flow`'s event log.
    async fn gos(&self, flow: &FlowId) -> Result<usize> {
        let view = self.panel.get(flow).await?;
        Ok(view
            .events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Message { type_name, .. } if type_name == "Go"))
            .count())
    }

    /// Whether no shard has outbox entries waiting (every send so far was delivered).
    async fn outboxes_empty(&self) -> Result<bool> {
        for group in &self.node.groups {
            if !group.read(|kv| shard::outbox_targets(kv)).await??.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_missing_and_finished_flows_are_kept_as_dead_letters() -> Result<()> {
    let t = Setup::new().await?;
    let done = FlowId::new("receiver", "done");
    let nobody = FlowId::new("receiver", "nobody");
    t.panel.start(&done, b"0".to_vec()).await?;
    t.panel.succeed(&done, b"0".to_vec(), None, None).await?;
    let to_done = FlowId::new("sender", "to-done");
    let to_nobody = FlowId::new("sender", "to-nobody");
    t.panel.start(&to_done, br#""done""#.to_vec()).await?;
    t.panel.start(&to_nobody, br#""nobody""#.to_vec()).await?;
    t.status(&to_done, FlowStatus::Succeeded).await?;
    t.status(&to_nobody, FlowStatus::Succeeded).await?;
    t.until("every send is delivered", || t.outboxes_empty()).await?;

    // The finished flow shows the letter that came too late.
    let view = t.panel.get(&done).await?;
    ensure!(view.events.is_empty(), "a finished flow takes no events: {:?}", view.events);
    ensure!(view.dead_letters.len() == 1, "{:?}", view.dead_letters);
    let letter = &view.dead_letters[0];
    ensure!(letter.target == done && letter.type_name == "Go" && letter.payload == br#"{"n":1}"#);
    ensure!(letter.reason == DeadLetterReason::Finished { status: FlowStatus::Succeeded }, "{letter:?}");
    ensure!(letter.sender.as_ref() == Some(&to_done), "{letter:?}");

    // The missing flow's letter is listed under its id, and in the listing of all.
    let letters = t.panel.dead_letters(&nobody, None, 10).await?;
    ensure!(letters.len() == 1 && letters[0].reason == DeadLetterReason::NotFound, "{letters:?}");
    ensure!(letters[0].sender.as_ref() == Some(&to_nobody), "{letters:?}");
    let all = t.panel.list_dead_letters(None, 10).await?;
    let targets: Vec<&FlowId> = all.iter().map(|l| &l.target).collect();
    ensure!(targets == [&done, &nobody], "{targets:?}");
    let rest = t.panel.list_dead_letters(Some((done.clone(), all[0].seq)), 10).await?;
    ensure!(rest.len() == 1 && rest[0].target == nobody, "the page after the first: {rest:?}");
    t.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_rerun_after_a_repair_is_delivered_again_and_a_replay_is_not() -> Result<()> {
    let t = Setup::new().await?;
    let receiver = FlowId::new("receiver", "r");
    let sender = FlowId::new("sender", "s");
    t.panel.start(&receiver, b"0".to_vec()).await?;
    t.status(&receiver, FlowStatus::Suspended).await?;
    t.panel.start(&sender, br#""r""#.to_vec()).await?;
    t.status(&sender, FlowStatus::Succeeded).await?;
    t.until("the first Go arrives", || async { Ok(t.gos(&receiver).await? == 1) }).await?;

    // A replay (a restart with the recorded effects) sends nothing again.
    let epoch = t.panel.get(&sender).await?.record.epoch;
    t.panel.restart(&sender, None, false, None, None).await?;
    t.until("the replay ends", || async {
        let rec = t.panel.get(&sender).await?.record;
        Ok(rec.status == FlowStatus::Succeeded && rec.epoch > epoch)
    })
    .await?;
    t.until("every send is delivered", || t.outboxes_empty()).await?;
    ensure!(t.gos(&receiver).await? == 1, "a replay delivered the message again");

    // The operator removes the send and restarts: the send runs again and arrives again.
    t.panel.remove_effect(&sender, "go", None, None).await?;
    t.panel.restart(&sender, None, false, None, None).await?;
    t.until("the re-run's Go arrives", || async { Ok(t.gos(&receiver).await? == 2) }).await?;

    // A restart without effects: the send runs again and arrives again.
    t.panel.restart(&sender, None, true, None, None).await?;
    t.until("the fresh run's Go arrives", || async { Ok(t.gos(&receiver).await? == 3) }).await?;
    t.status(&sender, FlowStatus::Succeeded).await?;
    t.until("every send is delivered", || t.outboxes_empty()).await?;
    ensure!(t.gos(&receiver).await? == 3);
    ensure!(t.panel.list_dead_letters(None, 10).await?.is_empty(), "nothing went to the dead letters");
    t.stop().await;
    Ok(())
}
