//! The control panel against a real node with two shard groups and their shard actors.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use common::{node_with_shards, Go, Service, Shards, WAIT};
use fetter_actors::control::{ControlPanel, Error, ListQuery, Started};
use fetter_actors::shard_actor::{Router, ShardActor, ShardArgs, ShardHandle};
use fetter_actors::{Ctx, Flow, FlowError, Registry};
use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{FlowId, ShardId};
use fetter_raft::shard::{EffectKind, EffectRecord, EffectState, Event, FlowStatus};

/// Does one effect, then waits for `Go`; outputs its input plus the message.
struct Waiter {
    work: Service,
}

impl Flow for Waiter {
    const TYPE: &'static str = "waiter";
    type Input = u32;
    type Output = u32;

    async fn run(&self, ctx: &Ctx, base: u32) -> Result<u32, FlowError> {
        ctx.effect("work", || self.work.call()).await?;
        let go: Go = ctx.message().await?;
        Ok(base + go.n)
    }
}

async fn setup(work: &Service) -> Result<(Shards, ControlPanel, Vec<ShardHandle>)> {
    let node = node_with_shards(2).await?;
    let routes: HashMap<ShardId, GroupHandle> =
        node.groups.iter().enumerate().map(|(s, g)| (ShardId(s as u32), g.clone())).collect();
    let router: Arc<dyn Router> = Arc::new(routes);
    let registry = Registry::new().register(Waiter { work: work.clone() })?;
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
    Ok((node, ControlPanel::new(router, 2), actors))
}

async fn wait_status(panel: &ControlPanel, flow: &FlowId, status: FlowStatus) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = panel.get(flow).await?.record.status;
        if now == status {
            return Ok(());
        }
        ensure!(tokio::time::Instant::now() < deadline, "{flow} is {now:?}, not {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_get_and_message_with_idempotency() -> Result<()> {
    let work = Service::default();
    let (node, panel, actors) = setup(&work).await?;
    let flow = FlowId::new("waiter", "a");
    ensure!(panel.start(&flow, b"5".to_vec()).await? == Started::New);
    ensure!(panel.start(&flow, b"5".to_vec()).await? != Started::New, "idempotent start");
    ensure!(matches!(panel.start(&flow, b"6".to_vec()).await, Err(Error::InputMismatch(_))));
    ensure!(matches!(
        panel.start(&FlowId::new("waiter", "b"), b"{oops".to_vec()).await,
        Err(Error::BadJson { .. })
    ));
    ensure!(
        matches!(panel.get(&FlowId::new("waiter", "b")).await, Err(Error::NotFound(_))),
        "bad input stored nothing"
    );
    wait_status(&panel, &flow, FlowStatus::Suspended).await?;
    let view = panel.get(&flow).await?;
    ensure!(view.effects.iter().any(|(id, r)| id == "work" && r.kind == EffectKind::Effect));
    let first = panel.send_message(&flow, "Go", br#"{"n":2}"#.to_vec(), Some("k-1".into())).await?;
    let again = panel.send_message(&flow, "Go", br#"{"n":2}"#.to_vec(), Some("k-1".into())).await?;
    ensure!(first == again, "a repeated idempotency key is stored once");
    wait_status(&panel, &flow, FlowStatus::Succeeded).await?;
    let view = panel.get(&flow).await?;
    ensure!(view.record.output.as_deref() == Some(b"7".as_slice()));
    ensure!(view.events.iter().filter(|(_, e)| matches!(e, Event::Message { .. })).count() == 1);
    ensure!(work.count() == 1);
    for a in actors {
        a.stop();
    }
    node.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_over_all_shards_by_type_and_status() -> Result<()> {
    let work = Service::default();
    let (node, panel, actors) = setup(&work).await?;
    let flows: Vec<FlowId> = (0..25).map(|i| FlowId::new("waiter", format!("f-{i:02}"))).collect();
    for f in &flows {
        panel.start(f, b"0".to_vec()).await?;
    }
    for f in &flows[..5] {
        panel.cancel(f, None, None).await?;
    }
    let mut seen = Vec::new();
    let mut query = ListQuery { flow_type: Some("waiter".into()), limit: 7, ..ListQuery::default() };
    loop {
        let page = panel.list(&query).await?;
        if page.is_empty() {
            break;
        }
        query.after = page.last().map(|r| r.id.clone());
        seen.extend(page.into_iter().map(|r| r.id));
    }
    ensure!(seen == flows, "every flow once, in order, across shards and pages");
    let cancelled =
        ListQuery { status: Some(vec![FlowStatus::Cancelled]), limit: 100, ..ListQuery::default() };
    ensure!(panel.list(&cancelled).await?.len() == 5);
    for a in actors {
        a.stop();
    }
    node.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repairs_fence_the_running_activation_and_check_the_callers_epoch() -> Result<()> {
    let work = Service::default();
    let (node, panel, actors) = setup(&work).await?;
    let flow = FlowId::new("waiter", "r");
    panel.start(&flow, b"1".to_vec()).await?;
    wait_status(&panel, &flow, FlowStatus::Suspended).await?;
    let read = panel.get(&flow).await?.record.epoch;
    // Someone else restarts it with an edited input: the epoch moves on.
    panel.restart(&flow, Some(b"100".to_vec()), false, Some(read), None).await?;
    let stale = panel.restart(&flow, None, false, Some(read), None).await;
    ensure!(matches!(stale, Err(Error::ConcurrentModification { .. })), "{stale:?}");
    wait_status(&panel, &flow, FlowStatus::Suspended).await?;
    ensure!(work.count() == 1, "the restart replayed the recorded effect");
    // Repair: remove the effect, then restart; the removed effect runs again.
    panel.remove_effect(&flow, "work", None, None).await?;
    panel.restart(&flow, None, false, None, None).await?;
    wait_status(&panel, &flow, FlowStatus::Suspended).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while work.count() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(work.count() == 2, "a removed effect runs again");
    panel.send_message(&flow, "Go", br#"{"n":1}"#.to_vec(), None).await?;
    wait_status(&panel, &flow, FlowStatus::Succeeded).await?;
    ensure!(panel.get(&flow).await?.record.output.as_deref() == Some(b"101".as_slice()), "the edited input");
    // Set an effect by hand, mark failed, delete: the id is free again.
    let record = EffectRecord {
        kind: EffectKind::Effect,
        type_name: "u32".into(),
        state: EffectState::Completed(b"9".to_vec()),
    };
    panel.set_effect(&flow, "work", record, None, None).await?;
    panel.delete(&flow, None, None).await?;
    ensure!(matches!(panel.get(&flow).await, Err(Error::NotFound(_))));
    ensure!(panel.start(&flow, b"3".to_vec()).await? == Started::New, "a deleted id is free");
    ensure!(matches!(
        panel.cancel(&FlowId::new("waiter", "nobody"), None, None).await,
        Err(Error::NotFound(_))
    ));
    let bad = panel.succeed(&flow, b"not json".to_vec(), None, None).await;
    ensure!(matches!(bad, Err(Error::BadJson { .. })), "{bad:?}");
    for a in actors {
        a.stop();
    }
    node.node.shutdown().await;
    Ok(())
}

/// A control-panel mutation repeated with its request id (a retry whose first answer was lost)
/// answers the first reply and changes nothing: a second `restart --clear-effects` would run the
/// effect again, a second cancel would answer "already finished".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_id_answers_the_first_reply_and_changes_nothing() -> Result<()> {
    let work = Service::default();
    let (node, panel, actors) = setup(&work).await?;
    let flow = FlowId::new("waiter", "retried");
    panel.start(&flow, b"1".to_vec()).await?;
    wait_status(&panel, &flow, FlowStatus::Suspended).await?;
    ensure!(work.count() == 1);
    let first = panel.restart(&flow, None, true, None, Some("req-restart")).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(work.count() == 2 && panel.get(&flow).await?.record.status == FlowStatus::Suspended) {
        ensure!(tokio::time::Instant::now() < deadline, "the restarted run never waited again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = panel.get(&flow).await?;
    let again = panel.restart(&flow, None, true, None, Some("req-restart")).await?;
    ensure!(again == first, "the first reply: {first:?}, then {again:?}");
    ensure!(panel.get(&flow).await? == before, "the retry changed the flow");
    wait_status(&panel, &flow, FlowStatus::Suspended).await?;
    ensure!(work.count() == 2, "the effect ran {} times", work.count());
    let reused = panel.cancel(&flow, None, Some("req-restart")).await;
    ensure!(matches!(reused, Err(Error::RequestIdReused(_))), "{reused:?}");
    let cancelled = panel.cancel(&flow, None, Some("req-cancel")).await?;
    ensure!(panel.cancel(&flow, None, Some("req-cancel")).await? == cancelled, "a retried cancel succeeds");
    ensure!(
        matches!(panel.cancel(&flow, None, None).await, Err(Error::Finished(_))),
        "a new cancel does not"
    );
    ensure!(panel.delete(&flow, None, Some("req-delete")).await?.is_none());
    ensure!(panel.delete(&flow, None, Some("req-delete")).await?.is_none(), "a retried delete succeeds");
    for a in actors {
        a.stop();
    }
    node.node.shutdown().await;
    Ok(())
}
