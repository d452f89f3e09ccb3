//! The `order` flow end to end on an embedded engine: the happy path, and logistics saying "no"
//! (the reservation is refunded once and the flow fails with logistics' answer).

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use fetter::prelude::*;
use fetter::{Engine, EngineConfig};
use fetter_examples::fakes::{Email, Logistics, Payments};
use fetter_examples::flows::order::OrderFlow;
use fetter_examples::ledger::{count, count_key, Ledger};

async fn engine(dir: &std::path::Path) -> Result<(Engine, std::path::PathBuf)> {
    let ledger_path = dir.join("ledger.jsonl");
    let ledger = Ledger::open(&ledger_path)?;
    let flow = OrderFlow::new(
        Payments::new(Some(ledger.clone()), 1),
        Logistics::new(Some(ledger.clone()), 1),
        Email::new(Some(ledger), 1),
        Duration::ZERO,
    );
    let config = EngineConfig { shards: 4, ..EngineConfig::new(dir.join("data")) };
    Ok((Engine::start(config, Registry::new().register(flow)?).await?, ledger_path))
}

async fn finished(panel: &ControlPanel, flow: &FlowId) -> Result<FlowView> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view = panel.get(flow).await?;
        if view.record.status.is_finished() {
            return Ok(view);
        }
        ensure!(tokio::time::Instant::now() < deadline, "{flow} still {:?}", view.record.status);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_reserved_shipped_captured_and_confirmed_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (engine, ledger) = engine(dir.path()).await?;
    let flow = FlowId::new("order", "o-1");
    let input = br#"{"order_id":"o-1","customer_id":"c-1","total_cents":4200,"products":["p-1","p-2"]}"#;
    let shard = fetter::placement::shard_of(&flow, engine.groups().len() as u32).0 as usize;
    let group = engine.groups()[shard].clone();
    let committed = || async {
        let (read, _) = group.raft().get_read_log_id().await?;
        Ok::<u64, anyhow::Error>(read.map_or(0, |l| l.index))
    };
    let before = committed().await?;
    engine.panel().start(&flow, input.to_vec()).await?;
    let view = finished(engine.panel(), &flow).await?;
    ensure!(view.record.status == FlowStatus::Succeeded, "{:?}", view.record);
    // Log entries (commits) of the order: the start with its first activation; reserve's result
    // with ship's `Started`; ship's outcome; capture's result; the mail's result with the end.
    // (7 before the start carried the activation and `ctx.uuid` was derived.)
    let entries = committed().await? - before;
    ensure!(entries == 5, "{entries} log entries for one order");
    ensure!(view.record.output.as_deref() == Some(br#"{"tracking_id":"tt-o-1"}"#.as_slice()));
    let entries = Ledger::read_all(&ledger)?;
    for (service, op) in [("payment", "reserve"), ("logistics", "ship"), ("payment", "capture")] {
        ensure!(count(&entries, service, op, "order/o-1") == 1, "{service}/{op} once");
    }
    ensure!(count_key(&entries, "email", "send", "order/o-1", "order-confirmation:o-1") == 1);
    ensure!(count(&entries, "email", "send", "order/o-1") == 1, "no other mail");
    ensure!(count(&entries, "payment", "cancel", "order/o-1") == 0, "no refund");
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_shipment_refunds_once_and_fails_with_the_answer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (engine, ledger) = engine(dir.path()).await?;
    let flow = FlowId::new("order", "o-2");
    let input = br#"{"order_id":"o-2","customer_id":"c-1","total_cents":100,"products":["fail-ship-9"]}"#;
    engine.panel().start(&flow, input.to_vec()).await?;
    let view = finished(engine.panel(), &flow).await?;
    ensure!(view.record.status == FlowStatus::Failed);
    let error = view.record.error.ok_or_else(|| anyhow!("an error is recorded"))?;
    ensure!(error.message.contains("logistics"), "logistics' answer: {error:?}");
    let entries = Ledger::read_all(&ledger)?;
    ensure!(count(&entries, "payment", "reserve", "order/o-2") == 1);
    ensure!(count(&entries, "logistics", "ship", "order/o-2") == 1);
    ensure!(count(&entries, "payment", "cancel", "order/o-2") == 1, "refunded once");
    ensure!(count(&entries, "payment", "capture", "order/o-2") == 0, "never captured");
    ensure!(count(&entries, "email", "send", "order/o-2") == 0, "never confirmed");
    // Bad input is refused before anything is stored.
    let bad = engine.panel().start(&FlowId::new("order", "o-3"), b"{not json".to_vec()).await;
    ensure!(bad.is_err());
    ensure!(engine.panel().get(&FlowId::new("order", "o-3")).await.is_err());
    engine.shutdown().await;
    Ok(())
}
