//! A batch of orders: one child `order` flow per order (a fan-out / fan-in across the cluster).
//!
//! The flow starts every order of the batch as a child flow `order/<order_id>` — the id a CLI
//! user looks the order up by — with the order as its input, exactly as if it had been started
//! on its own (the [`Order`] contract). The children live on whichever shard their id hashes to,
//! so on any node; the starts and the results travel through the engine's outbox, exactly once.
//! All children are started first ([`Ctx::start_children`], effect id `child-<order_id>` each)
//! and only then awaited, so they run in parallel; the results are collected in the order of the
//! input.
//!
//! ## A failed child does not fail the batch
//!
//! [`Ctx::child_result`] reports a child that ended `Failed` (or `Cancelled`) as an `Err` carrying
//! the child's own recorded error, kind and message unchanged — for a shipment logistics refused,
//! kind `error` and logistics' answer as the message (the child has refunded by then). A start
//! the engine could not perform because the id `order/<order_id>` is already taken arrives the
//! same way, at once, with kind `input_mismatch` (another flow of that id has another input) or
//! `child_conflict` (it belongs to another parent or none, e.g. the order was started on its own
//! or by another batch). Every such `Err` is the child's outcome — waiting itself never returns
//! an error (the activation halts instead), and a successful output is not decoded — so the batch
//! lists it under [`BatchOutcome::failed`] and carries on; the batch succeeds once every child has
//! finished, whatever their outcomes.
//!
//! The batch itself fails, before starting any child, only when its input is unusable: an empty
//! or repeated order id (kind [`INVALID_BATCH`]). Two orders of one batch cannot share a child id.

use std::collections::BTreeSet;

use fetter::prelude::*;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::order::Order;

/// The error kind of a batch whose input is unusable (an empty or repeated order id).
pub const INVALID_BATCH: &str = "invalid_batch";

/// The input of `bulk-orders`: a public contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The batch's id, e.g. `"b-1"`; echoed in the output.
    pub batch_id: String,
    /// The orders, each exactly the input of an `order` flow; their ids must be distinct.
    pub orders: Vec<Order>,
}

/// The output of `bulk-orders`: what became of each order (a public contract).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOutcome {
    /// The batch's id, from the input.
    pub batch_id: String,
    /// The ids of the orders whose `order` flow succeeded, in input order.
    pub succeeded: Vec<String>,
    /// The orders whose `order` flow failed (or could not be started), in input order.
    pub failed: Vec<FailedOrder>,
}

/// An order of a batch that did not go through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedOrder {
    /// The order's id (its child flow is `order/<order_id>`).
    pub order_id: String,
    /// The child's error kind, e.g. `error` for a refused shipment.
    pub kind: String,
    /// The child's error message.
    pub message: String,
}

/// The `bulk-orders` flow. It calls no service itself: its children (the `order` flows) do.
#[derive(Debug, Clone, Copy, Default)]
pub struct BulkOrdersFlow;

impl BulkOrdersFlow {
    /// The bulk-orders flow.
    pub fn new() -> Self {
        BulkOrdersFlow
    }
}

/// The child flow id of an order: `order/<order_id>`.
pub fn child_of(order_id: &str) -> FlowId {
    FlowId::new("order", order_id)
}

/// Refuses a batch with an empty or repeated order id.
fn check(batch: &Batch) -> Result<(), FlowError> {
    let mut seen = BTreeSet::new();
    for order in &batch.orders {
        if order.order_id.is_empty() {
            return Err(FlowError::new(INVALID_BATCH, "an order has an empty order_id"));
        }
        if !seen.insert(order.order_id.as_str()) {
            let message = format!("order {} appears more than once", order.order_id);
            return Err(FlowError::new(INVALID_BATCH, message));
        }
    }
    Ok(())
}

impl Flow for BulkOrdersFlow {
    const TYPE: &'static str = "bulk-orders";
    type Input = Batch;
    type Output = BatchOutcome;

    async fn run(&self, ctx: &Ctx, batch: Batch) -> Result<BatchOutcome, FlowError> {
        check(&batch)?;
        // Fan out: every child is started (recorded once each) before the first is awaited.
        let children: Vec<(String, FlowId, &Order)> = batch
            .orders
            .iter()
            .map(|order| (format!("child-{}", order.order_id), child_of(&order.order_id), order))
            .collect();
        ctx.start_children(children).await?;
        // Fan in, in input order; a child that finished early has its result waiting in the log.
        let mut outcome =
            BatchOutcome { batch_id: batch.batch_id.clone(), succeeded: Vec::new(), failed: Vec::new() };
        for order in &batch.orders {
            match ctx.child_result::<IgnoredAny>(&child_of(&order.order_id)).await {
                Ok(_) => outcome.succeeded.push(order.order_id.clone()),
                Err(error) => outcome.failed.push(FailedOrder {
                    order_id: order.order_id.clone(),
                    kind: error.kind,
                    message: error.message,
                }),
            }
        }
        Ok(outcome)
    }
}
