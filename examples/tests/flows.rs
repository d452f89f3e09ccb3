//! The message-driven example flows end to end on an embedded engine: `order-messaging`,
//! `newsletter`, `signup` and `loan`, each on its happy path and its failure path, counted in
//! the ledger of the fake services. The tests play the services that answer with messages
//! (payments, logistics, the customer, the credit bureaus) through `ControlPanel::send_message`.
//!
//! Every wait is bounded: a condition is polled until [`WAIT`] runs out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Result};
use fetter::prelude::*;
use fetter::{Engine, EngineConfig};
use fetter_examples::fakes::{Email, Logistics, Payments};
use fetter_examples::flows::loan::{LoanDecision, LoanFlow};
use fetter_examples::flows::newsletter::NewsletterFlow;
use fetter_examples::flows::order_messaging::OrderMessagingFlow;
use fetter_examples::flows::signup::{SignupFlow, SignupOutcome};
use fetter_examples::ledger::{count, count_key, Ledger, LedgerEntry};
use serde::de::DeserializeOwned;
use serde_json::json;

/// The bound of every wait.
const WAIT: Duration = Duration::from_secs(30);
/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(5);

/// A ledger in `dir`, and its path.
fn ledger(dir: &Path) -> Result<(Ledger, PathBuf)> {
    let path = dir.join("ledger.jsonl");
    Ok((Ledger::open(&path)?, path))
}

/// An engine on `dir/data` running `registry`'s flows.
async fn engine(dir: &Path, registry: Registry) -> Result<Engine> {
    let config = EngineConfig { shards: 4, ..EngineConfig::new(dir.join("data")) };
    Ok(Engine::start(config, registry).await?)
}

async fn start(panel: &ControlPanel, flow: &FlowId, input: serde_json::Value) -> Result<()> {
    panel.start(flow, serde_json::to_vec(&input)?).await?;
    Ok(())
}

/// The flow once it has finished.
async fn finished(panel: &ControlPanel, flow: &FlowId) -> Result<FlowView> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let view = panel.get(flow).await?;
        if view.record.status.is_finished() {
            return Ok(view);
        }
        ensure!(tokio::time::Instant::now() < deadline, "{flow} still {:?}", view.record.status);
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `flow` has recorded `step` and is suspended (waiting for a message).
async fn waiting_after(panel: &ControlPanel, flow: &FlowId, step: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let view = panel.get(flow).await?;
        let recorded = view.effects.iter().any(|(id, _)| id == step);
        if recorded && view.record.status == FlowStatus::Suspended {
            return Ok(());
        }
        ensure!(!view.record.status.is_finished(), "{flow} finished before waiting after {step}: {view:?}");
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{flow} not waiting after {step}: {:?}",
            view.record.status
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the ledger holds `n` calls of `service`'s `op` by `flow` about `key`; returns its
/// entries.
async fn ledger_shows(
    path: &Path,
    (service, op, key): (&str, &str, &str),
    flow: &FlowId,
    n: usize,
) -> Result<Vec<LedgerEntry>> {
    let flow = flow.to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let entries = Ledger::read_all(path)?;
        let seen = count_key(&entries, service, op, &flow, key);
        if seen >= n {
            return Ok(entries);
        }
        ensure!(tokio::time::Instant::now() < deadline, "{flow}: {seen} of {n} {service}/{op} {key} calls");
        tokio::time::sleep(POLL).await;
    }
}

/// Sends the message `type_name` with `payload` to `flow`, once per `key`.
async fn send(
    panel: &ControlPanel,
    flow: &FlowId,
    type_name: &str,
    payload: serde_json::Value,
    key: &str,
) -> Result<u64> {
    Ok(panel.send_message(flow, type_name, serde_json::to_vec(&payload)?, Some(key.to_owned())).await?)
}

fn output<T: DeserializeOwned>(view: &FlowView) -> Result<T> {
    ensure!(
        view.record.status == FlowStatus::Succeeded,
        "{} ended {:?}: {:?}",
        view.record.id,
        view.record.status,
        view.record.error
    );
    let bytes = view.record.output.as_deref().ok_or_else(|| anyhow!("{} has no output", view.record.id))?;
    Ok(serde_json::from_slice(bytes)?)
}

/// The error kind and message of a failed flow.
fn failure(view: &FlowView) -> Result<(String, String)> {
    ensure!(view.record.status == FlowStatus::Failed, "{} ended {:?}", view.record.id, view.record.status);
    let error =
        view.record.error.clone().ok_or_else(|| anyhow!("{} failed without an error", view.record.id))?;
    Ok((error.kind, error.message))
}

// --- order-messaging ---

fn order_registry(ledger: &Ledger, shipping_deadline: Duration) -> Result<Registry> {
    let flow = OrderMessagingFlow::new(
        Payments::new(Some(ledger.clone()), 1),
        Logistics::new(Some(ledger.clone()), 1),
        Email::new(Some(ledger.clone()), 1),
        shipping_deadline,
    );
    Ok(Registry::new().register(flow)?)
}

fn order(id: &str) -> serde_json::Value {
    json!({"order_id": id, "customer_id": "c-1", "total_cents": 4200, "products": ["p-1", "p-2"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_messaging_waits_for_each_reply_and_ships_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ledger, path) = ledger(dir.path())?;
    let engine = engine(dir.path(), order_registry(&ledger, WAIT)?).await?;
    let panel = engine.panel();
    let flow = FlowId::new("order-messaging", "o-1");
    start(panel, &flow, order("o-1")).await?;

    // Payments, logistics and payments again answer each request once the flow waits for it.
    waiting_after(panel, &flow, "request-reserve").await?;
    let first = send(panel, &flow, "FundsReserved", json!({}), "reserved-o-1").await?;
    // A repeated delivery of the same reply is acknowledged, not stored again.
    ensure!(send(panel, &flow, "FundsReserved", json!({}), "reserved-o-1").await? == first);
    waiting_after(panel, &flow, "request-ship").await?;
    send(panel, &flow, "ProductsShipped", json!({"tracking_id": "parcel-77"}), "shipped-o-1").await?;
    waiting_after(panel, &flow, "request-capture").await?;
    send(panel, &flow, "FundsCaptured", json!({}), "captured-o-1").await?;

    let view = finished(panel, &flow).await?;
    let track: serde_json::Value = output(&view)?;
    ensure!(track == json!({"tracking_id": "parcel-77"}), "the tracking id of the reply: {track}");
    ensure!(view.events.len() == 3, "three replies in the log: {:?}", view.events);
    let entries = Ledger::read_all(&path)?;
    let name = flow.to_string();
    for (service, op) in [("payment", "reserve"), ("logistics", "ship"), ("payment", "capture")] {
        ensure!(count(&entries, service, op, &name) == 1, "{service}/{op} once");
    }
    ensure!(count_key(&entries, "email", "send", &name, "order-confirmation:o-1") == 1, "confirmed once");
    ensure!(count(&entries, "email", "send", &name) == 1, "no other mail");
    ensure!(count(&entries, "payment", "cancel", &name) == 0, "no refund");
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_messaging_refunds_once_when_the_shipment_fails_or_never_comes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ledger, path) = ledger(dir.path())?;
    let engine = engine(dir.path(), order_registry(&ledger, Duration::from_millis(800))?).await?;
    let panel = engine.panel();
    let failed = FlowId::new("order-messaging", "o-2");
    let silent = FlowId::new("order-messaging", "o-3");
    start(panel, &failed, order("o-2")).await?;
    start(panel, &silent, order("o-3")).await?;
    for flow in [&failed, &silent] {
        waiting_after(panel, flow, "request-reserve").await?;
        send(panel, flow, "FundsReserved", json!({}), "reserved").await?;
        waiting_after(panel, flow, "request-ship").await?;
    }
    // Logistics reports o-2 failed; o-3 never hears back.
    send(panel, &failed, "ShipmentFailed", json!({"reason": "out of stock"}), "ship-failed").await?;

    let (kind, message) = failure(&finished(panel, &failed).await?)?;
    ensure!(kind == "shipment_failed" && message == "out of stock", "{kind}: {message}");
    let (kind, _) = failure(&finished(panel, &silent).await?)?;
    ensure!(kind == "shipment_timeout", "{kind}");
    let entries = Ledger::read_all(&path)?;
    for flow in [&failed, &silent] {
        let name = flow.to_string();
        ensure!(count(&entries, "payment", "reserve", &name) == 1, "{name} reserved once");
        ensure!(count(&entries, "logistics", "ship", &name) == 1, "{name} requested shipping once");
        ensure!(count(&entries, "payment", "cancel", &name) == 1, "{name} refunded once");
        ensure!(count(&entries, "payment", "capture", &name) == 0, "{name} never captured");
        ensure!(count(&entries, "email", "send", &name) == 0, "{name} never confirmed");
    }
    engine.shutdown().await;
    Ok(())
}

// --- newsletter ---

fn recipients(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("reader-{i}@example.com")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newsletter_mails_every_recipient_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ledger, path) = ledger(dir.path())?;
    let registry = Registry::new().register(NewsletterFlow::new(Email::new(Some(ledger), 1)))?;
    let engine = engine(dir.path(), registry).await?;
    let flow = FlowId::new("newsletter", "2024-06");
    let to = recipients(50);
    start(engine.panel(), &flow, json!({"issue": "2024-06", "recipients": to})).await?;

    let view = finished(engine.panel(), &flow).await?;
    ensure!(output::<u64>(&view)? == 50, "50 sent");
    let entries = Ledger::read_all(&path)?;
    ensure!(count(&entries, "email", "send", &flow.to_string()) == 50, "50 mails in all");
    for address in &to {
        let key = format!("newsletter:{address}");
        let mails = entries.iter().filter(|e| e.service == "email" && e.op == "send" && e.key == key).count();
        ensure!(mails == 1, "{address} got {mails} mails");
    }
    engine.shutdown().await;
    Ok(())
}

/// What the journal stores for `flow` besides its input (the caller's data, stored as given):
/// the recorded effects and states, and the event log.
async fn journal_bytes(panel: &ControlPanel, flow: &FlowId) -> Result<usize> {
    let view = panel.get(flow).await?;
    ensure!(view.effects.len() == 1, "{flow}: one record, the position: {:?}", view.effects);
    Ok(serde_json::to_vec(&view.effects)?.len() + serde_json::to_vec(&view.events)?.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newsletter_journal_does_not_grow_with_the_recipients() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A checkpoint after every 50 mails keeps the 10,000 to 200 journal commits; the space
    // does not depend on it.
    let flow = NewsletterFlow::new(Email::new(None, 1)).checkpoint_every(50);
    let engine = engine(dir.path(), Registry::new().register(flow)?).await?;
    let panel = engine.panel();
    let small = FlowId::new("newsletter", "small");
    let large = FlowId::new("newsletter", "large");
    start(panel, &small, json!({"issue": "small", "recipients": recipients(10)})).await?;
    start(panel, &large, json!({"issue": "large", "recipients": recipients(10_000)})).await?;
    ensure!(output::<u64>(&finished(panel, &small).await?)? == 10);
    let before = std::time::Instant::now();
    ensure!(output::<u64>(&finished(panel, &large).await?)? == 10_000);
    println!("10,000 recipients done {:?} after the 10", before.elapsed());

    let (small_bytes, large_bytes) =
        (journal_bytes(panel, &small).await?, journal_bytes(panel, &large).await?);
    println!("journal bytes: 10 recipients {small_bytes}, 10,000 recipients {large_bytes}");
    ensure!(large_bytes <= 2 * small_bytes, "{large_bytes} bytes for 10,000 vs {small_bytes} for 10");
    engine.shutdown().await;
    Ok(())
}

// --- signup ---

fn signup_registry(ledger: &Ledger) -> Result<Registry> {
    Ok(Registry::new().register(SignupFlow::new(Email::new(Some(ledger.clone()), 1)))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_verified_after_one_reminder_is_welcomed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ledger, path) = ledger(dir.path())?;
    let engine = engine(dir.path(), signup_registry(&ledger)?).await?;
    let panel = engine.panel();
    let flow = FlowId::new("signup", "c-1");
    let input = json!({"customer_id": "c-1", "email": "c1@example.com", "reminder_interval_ms": 200});
    start(panel, &flow, input).await?;

    // The customer clicks the link once the first reminder went out.
    ledger_shows(&path, ("email", "send", "reminder:c-1"), &flow, 1).await?;
    send(panel, &flow, "EmailVerified", json!({}), "verified").await?;

    let view = finished(panel, &flow).await?;
    let outcome: SignupOutcome = output(&view)?;
    ensure!(outcome == SignupOutcome { customer_id: "c-1".into(), reminders: 1 }, "{outcome:?}");
    let entries = Ledger::read_all(&path)?;
    let name = flow.to_string();
    for (template, n) in [("activation", 1), ("reminder", 1), ("welcome", 1)] {
        let sent = count_key(&entries, "email", "send", &name, &format!("{template}:c-1"));
        ensure!(sent == n, "{template}: {sent} mails, {n} expected");
    }
    ensure!(count(&entries, "email", "send", &name) == 3, "no other mail");
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_never_verified_fails_after_three_reminders() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ledger, path) = ledger(dir.path())?;
    let engine = engine(dir.path(), signup_registry(&ledger)?).await?;
    let panel = engine.panel();
    let flow = FlowId::new("signup", "c-2");
    let input = json!({"customer_id": "c-2", "email": "c2@example.com", "reminder_interval_ms": 100});
    start(panel, &flow, input).await?;

    let view = finished(panel, &flow).await?;
    let (kind, _) = failure(&view)?;
    ensure!(kind == "not_verified", "{kind}");
    for timer in ["verify-0", "verify-1", "verify-2", "verify-3"] {
        ensure!(view.effects.iter().any(|(id, _)| id == timer), "a wait {timer}: {:?}", view.effects);
    }
    let entries = Ledger::read_all(&path)?;
    let name = flow.to_string();
    for (template, n) in [("activation", 1), ("reminder", 3), ("welcome", 0)] {
        let sent = count_key(&entries, "email", "send", &name, &format!("{template}:c-2"));
        ensure!(sent == n, "{template}: {sent} mails, {n} expected");
    }
    ensure!(count(&entries, "email", "send", &name) == 4, "no other mail");
    engine.shutdown().await;
    Ok(())
}

// --- loan ---

fn loan_registry(ledger: &Ledger) -> Result<Registry> {
    Ok(Registry::new().register(LoanFlow::with_standard_bureaus(Some(ledger.clone()), 1))?)
}

fn application(id: &str, window_ms: u64) -> serde_json::Value {
    json!({"application_id": id, "customer_id": "c-1", "amount_cents": 1_000_000, "reply_window_ms": window_ms})
}

/// Waits until `flow` asked every bureau and waits for their replies.
async fn asked_all_bureaus(panel: &ControlPanel, flow: &FlowId) -> Result<()> {
    waiting_after(panel, flow, "request-bureau-c").await
}

async fn reply(panel: &ControlPanel, flow: &FlowId, bureau: &str, approved: bool) -> Result<u64> {
    send(panel, flow, "CreditCheckOutcome", json!({"bureau": bureau, "approved": approved}), bureau).await
}

/// Each bureau was asked once about application `id` (the instance of `flow`), and no one else.
fn check_requests(path: &Path, flow: &FlowId, id: &str) -> Result<()> {
    let entries = Ledger::read_all(path)?;
    let name = flow.to_string();
    for bureau in ["bureau-a", "bureau-b", "bureau-c"] {
        let asked = count_key(&entries, "bureau", "check", &name, &format!("{bureau}:{id}"));
        ensure!(asked == 1, "{flow} asked {bureau} {asked} times");
    }
    let checks = count(&entries, "bureau", "check", &name);
    ensure!(checks == 3, "{flow}: {checks} checks in all");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loan_with_two_approvals_in_the_window_is_approved() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ledger, path) = ledger(dir.path())?;
    let engine = engine(dir.path(), loan_registry(&ledger)?).await?;
    let panel = engine.panel();
    let approved = FlowId::new("loan", "l-1");
    let vetoed = FlowId::new("loan", "l-2");
    start(panel, &approved, application("l-1", 1_000)).await?;
    start(panel, &vetoed, application("l-2", 1_000)).await?;
    asked_all_bureaus(panel, &approved).await?;
    asked_all_bureaus(panel, &vetoed).await?;
    reply(panel, &approved, "bureau-a", true).await?;
    reply(panel, &approved, "bureau-c", true).await?;
    reply(panel, &vetoed, "bureau-a", true).await?;
    reply(panel, &vetoed, "bureau-b", false).await?;

    let decision: LoanDecision = output(&finished(panel, &approved).await?)?;
    ensure!(decision == LoanDecision { approved: true, replies: 2, reason: None }, "{decision:?}");
    let decision: LoanDecision = output(&finished(panel, &vetoed).await?)?;
    let expected = LoanDecision { approved: false, replies: 2, reason: Some("rejected by bureau-b".into()) };
    ensure!(decision == expected, "{decision:?}");
    check_requests(&path, &approved, "l-1")?;
    check_requests(&path, &vetoed, "l-2")?;
    engine.shutdown().await;
    Ok(())
}

/// The sequence number of the firing of `flow`'s timer `timer_id` in its event log.
async fn timer_fired_at(panel: &ControlPanel, flow: &FlowId, timer_id: &str) -> Result<u64> {
    let events = serde_json::to_value(&panel.get(flow).await?.events)?;
    let events = events.as_array().ok_or_else(|| anyhow!("events are a list"))?;
    for event in events {
        if event[1]["TimerFired"]["timer_id"] == timer_id {
            return event[0].as_u64().ok_or_else(|| anyhow!("a sequence number: {event}"));
        }
    }
    bail!("{flow}: timer {timer_id} never fired: {events:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loan_with_one_reply_is_rejected_and_a_late_reply_never_counts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ledger, path) = ledger(dir.path())?;
    let engine = engine(dir.path(), loan_registry(&ledger)?).await?;
    let panel = engine.panel();
    let flow = FlowId::new("loan", "l-3");
    start(panel, &flow, application("l-3", 500)).await?;
    asked_all_bureaus(panel, &flow).await?;
    reply(panel, &flow, "bureau-a", true).await?;

    let decision: LoanDecision = output(&finished(panel, &flow).await?)?;
    let expected = LoanDecision {
        approved: false,
        replies: 1,
        reason: Some("only 1 of 3 bureaus replied in time".into()),
    };
    ensure!(decision == expected, "{decision:?}");
    let closed = timer_fired_at(panel, &flow, "replies").await?;

    // A finished flow takes no messages: restart it (keeping its journal) and deliver the late
    // approval while it runs again; it may finish first, then try again.
    let deadline = tokio::time::Instant::now() + WAIT;
    let late = loop {
        panel.restart(&flow, None, false, None, None).await?;
        match reply(panel, &flow, "bureau-b", true).await {
            Ok(seq) => break seq,
            Err(e) if tokio::time::Instant::now() < deadline => println!("late reply not delivered yet: {e}"),
            Err(e) => return Err(e),
        }
    };
    ensure!(late > closed, "the late reply ({late}) comes after the window closed ({closed})");
    // Replayed with the late reply in its log, the flow decides the same.
    finished(panel, &flow).await?;
    panel.restart(&flow, None, false, None, None).await?;
    let view = finished(panel, &flow).await?;
    let again: LoanDecision = output(&view)?;
    ensure!(again == expected, "after the late reply: {again:?}");
    ensure!(view.events.len() as u64 > late, "the late reply is in the log: {:?}", view.events);
    check_requests(&path, &flow, "l-3")?;
    engine.shutdown().await;
    Ok(())
}

// --- bulk-orders ---

/// A batch `batch_id` of `orders` (each an `order` input).
fn batch(batch_id: &str, orders: Vec<serde_json::Value>) -> serde_json::Value {
    json!({"batch_id": batch_id, "orders": orders})
}

/// How many `order` flows exist.
async fn order_flows(panel: &ControlPanel) -> Result<usize> {
    let query = ListQuery { flow_type: Some("order".into()), limit: 10_000, ..ListQuery::default() };
    Ok(panel.list(&query).await?.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_orders_runs_every_order_as_a_child_and_lists_the_failed_ones() -> Result<()> {
    use fetter_examples::flows::bulk_orders::{BatchOutcome, FailedOrder};

    let dir = tempfile::tempdir()?;
    let (ledger, path) = ledger(dir.path())?;
    let engine = engine(dir.path(), fetter_examples::registry(Some(ledger), 1, Duration::ZERO)?).await?;
    let panel = engine.panel();
    // 30 orders; logistics refuses the products of bo-07 and bo-19.
    let ids: Vec<String> = (1..=30).map(|i| format!("bo-{i:02}")).collect();
    let refused = ["bo-07", "bo-19"];
    let orders = ids
        .iter()
        .map(|id| {
            let mut input = order(id);
            if refused.contains(&id.as_str()) {
                input["products"] = json!(["p-1", format!("fail-ship-{id}")]);
            }
            input
        })
        .collect();
    let input = batch("b-1", orders);
    let flow = FlowId::new("bulk-orders", "b-1");
    start(panel, &flow, input.clone()).await?;

    // The batch succeeds although two orders failed; the output is the public contract.
    let view = finished(panel, &flow).await?;
    let raw: serde_json::Value = output(&view)?;
    ensure!(raw["batch_id"] == "b-1", "{raw}");
    let outcome: BatchOutcome = serde_json::from_value(raw.clone())?;
    let succeeded: Vec<String> = ids.iter().filter(|id| !refused.contains(&id.as_str())).cloned().collect();
    ensure!(outcome.succeeded == succeeded, "28 succeeded, in input order: {:?}", outcome.succeeded);
    ensure!(outcome.failed.len() == 2, "two failed: {:?}", outcome.failed);
    for (failed, id) in outcome.failed.iter().zip(refused) {
        let FailedOrder { order_id, kind, message } = failed;
        ensure!(order_id == id, "{failed:?}");
        ensure!(kind == kind::ERROR, "the child's own error kind: {failed:?}");
        ensure!(
            message.contains("logistics") && message.contains("fail-ship"),
            "logistics' answer: {failed:?}"
        );
    }
    ensure!(raw["failed"][0]["order_id"] == "bo-07" && raw["failed"][0]["kind"] == "error", "{raw}");

    // Every order is its own finished child, looked up by its order id.
    for id in &ids {
        let child = FlowId::new("order", id.as_str());
        let view = panel.get(&child).await?;
        ensure!(
            view.record.parent.as_ref() == Some(&flow),
            "{child} belongs to the batch: {:?}",
            view.record
        );
        if refused.contains(&id.as_str()) {
            let (kind, message) = failure(&view)?;
            ensure!(kind == kind::ERROR && message.contains("logistics"), "{child}: {kind}: {message}");
        } else {
            let track: serde_json::Value = output(&view)?;
            ensure!(track == json!({"tracking_id": format!("tt-{id}")}), "{child}: {track}");
        }
    }
    ensure!(order_flows(panel).await? == 30, "one child per order");

    // Each order reached logistics exactly once; the refused ones were refunded once.
    let entries = Ledger::read_all(&path)?;
    for id in &ids {
        let name = format!("order/{id}");
        ensure!(count(&entries, "logistics", "ship", &name) == 1, "{name} shipped once");
        let (refunds, captures) = if refused.contains(&id.as_str()) { (1, 0) } else { (0, 1) };
        ensure!(count(&entries, "payment", "cancel", &name) == refunds, "{name} refunds");
        ensure!(count(&entries, "payment", "capture", &name) == captures, "{name} captures");
    }
    ensure!(count(&entries, "logistics", "ship", &flow.to_string()) == 0, "the batch calls no service");

    // Starting the same batch again changes nothing: no new child, no new call.
    let again = panel.start(&flow, serde_json::to_vec(&input)?).await?;
    ensure!(matches!(again, Started::Existing(FlowStatus::Succeeded)), "{again:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(order_flows(panel).await? == 30, "no new children");
    ensure!(Ledger::read_all(&path)?.len() == entries.len(), "no new calls");
    ensure!(output::<BatchOutcome>(&finished(panel, &flow).await?)? == outcome, "the same outcome");
    engine.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_orders_with_a_repeated_order_id_fails_before_starting_any_order() -> Result<()> {
    use fetter_examples::flows::bulk_orders::INVALID_BATCH;

    let dir = tempfile::tempdir()?;
    let (ledger, path) = ledger(dir.path())?;
    let engine = engine(dir.path(), fetter_examples::registry(Some(ledger), 1, Duration::ZERO)?).await?;
    let panel = engine.panel();
    let flow = FlowId::new("bulk-orders", "b-2");
    start(panel, &flow, batch("b-2", vec![order("o-1"), order("o-2"), order("o-1")])).await?;
    let (kind, message) = failure(&finished(panel, &flow).await?)?;
    ensure!(kind == INVALID_BATCH && message.contains("o-1"), "{kind}: {message}");
    ensure!(order_flows(panel).await? == 0, "no order started");
    ensure!(Ledger::read_all(&path)?.is_empty(), "no service called");
    engine.shutdown().await;
    Ok(())
}

// --- referral → rewards (messages between flows) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrals_credit_their_rewards_account_once_each_through_the_outbox() -> Result<()> {
    use fetter_examples::flows::referral::RewardsTotal;

    let dir = tempfile::tempdir()?;
    let engine = engine(dir.path(), fetter_examples::registry(None, 1, Duration::ZERO)?).await?;
    let panel = engine.panel();
    let account = FlowId::new("rewards", "w-1");
    start(panel, &account, json!({"referrals": 3})).await?;
    // Five referrals on (most likely) other shards; the account takes the first three.
    let referrals: Vec<FlowId> = (1..=5).map(|i| FlowId::new("referral", format!("r-{i}"))).collect();
    for (i, referral) in referrals.iter().enumerate() {
        start(panel, referral, json!({"rewards": "w-1", "points": 10 * (i as u64 + 1)})).await?;
    }
    for referral in &referrals {
        let view = finished(panel, referral).await?;
        ensure!(view.record.status == FlowStatus::Succeeded, "{referral}: {:?}", view.record.status);
    }
    let total: RewardsTotal = output(&finished(panel, &account).await?)?;
    ensure!(total.from.len() == 3, "three referrals taken: {total:?}");
    let names: Vec<String> = referrals.iter().map(ToString::to_string).collect();
    let points: u64 = total
        .from
        .iter()
        .map(|from| names.iter().position(|n| n == from).map(|i| 10 * (i as u64 + 1)))
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| anyhow!("a referral not started was taken: {total:?}"))?
        .iter()
        .sum();
    ensure!(total.points == points, "the points of the referrals taken: {total:?}");
    let distinct: std::collections::BTreeSet<&String> = total.from.iter().collect();
    ensure!(distinct.len() == 3, "each referral taken once: {total:?}");
    Ok(())
}
