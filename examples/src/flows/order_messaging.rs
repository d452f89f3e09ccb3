//! Order processing, messaging style.
//!
//! The same order as [`crate::flows::order`], but every service answers with a message instead
//! of a return value: each step sends a request (an effect) and then waits, suspended, for the
//! reply message in the flow's event log.
//!
//! 1. `request-reserve`: [`Payments::reserve`], then wait for [`FundsReserved`];
//! 2. `request-ship` (at most once, as in `order`: a crash while requesting must never ship
//!    twice, so an interrupted request ends the flow `Failed` with `effect_outcome_unknown`):
//!    [`Logistics::ship`], then wait up to the flow's shipping deadline for [`ProductsShipped`];
//! 3. `request-capture`: [`Payments::capture`], then wait for [`FundsCaptured`];
//! 4. `email`: the order confirmation. The output is the [`TrackAndTrace`] of `ProductsShipped`.
//!
//! When logistics reports [`ShipmentFailed`], or sends nothing before the shipping deadline, or
//! refuses the request outright (the fake refuses products starting with
//! [`Logistics::FAIL_PREFIX`]), the reservation is cancelled (`refund`, once) and the flow fails:
//! kind `shipment_failed` with logistics' reason, `shipment_timeout`, or logistics' answer.
//!
//! A wait takes one message type at a time, so the flow cannot wake on "`ProductsShipped` *or*
//! `ShipmentFailed`", whichever comes first. It waits for `ProductsShipped` until the shipping
//! deadline (a durable timer, `ship-deadline`) and only then takes a `ShipmentFailed` that
//! arrived meanwhile: a failed shipment is refunded at the deadline, not at once.
//!
//! ## The messages (a public contract)
//!
//! Services (in the tests: the test itself, playing them) reply through the control panel's
//! `send_message(flow, type_name, payload, idempotency_key)`, where `flow` is
//! `order-messaging/<order id>`:
//!
//! | type name         | payload                     | after                       |
//! |-------------------|-----------------------------|-----------------------------|
//! | `FundsReserved`   | `{}`                        | the `reserve` request       |
//! | `ProductsShipped` | `{"tracking_id":"tt-o-1"}`  | the `ship` request          |
//! | `ShipmentFailed`  | `{"reason":"out of stock"}` | the `ship` request          |
//! | `FundsCaptured`   | `{}`                        | the `capture` request       |
//!
//! A reply may arrive before the flow waits for it (it stays in the log until taken); an
//! idempotency key makes a repeated delivery harmless.

use std::time::Duration;

use fetter::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fakes::{Email, Logistics, Payments, TrackAndTrace};
use crate::flows::order::Order;

/// Payments reserved the order's money.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FundsReserved {}

impl Message for FundsReserved {
    const NAME: &'static str = "FundsReserved";
}

/// Logistics shipped the order's products.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductsShipped {
    /// Where the parcel can be followed.
    pub tracking_id: String,
}

impl Message for ProductsShipped {
    const NAME: &'static str = "ProductsShipped";
}

/// Logistics could not ship the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentFailed {
    /// Why not.
    pub reason: String,
}

impl Message for ShipmentFailed {
    const NAME: &'static str = "ShipmentFailed";
}

/// Payments captured the reserved money.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FundsCaptured {}

impl Message for FundsCaptured {
    const NAME: &'static str = "FundsCaptured";
}

/// The error kind of an order whose shipment logistics reported failed.
pub const SHIPMENT_FAILED: &str = "shipment_failed";
/// The error kind of an order logistics did not answer before the shipping deadline.
pub const SHIPMENT_TIMEOUT: &str = "shipment_timeout";

/// The `order-messaging` flow and the services it sends requests to.
pub struct OrderMessagingFlow {
    payments: Payments,
    logistics: Logistics,
    email: Email,
    /// How long logistics has to answer the shipping request.
    shipping_deadline: Duration,
}

impl OrderMessagingFlow {
    /// A message-driven order flow over these services; logistics has `shipping_deadline` to
    /// report [`ProductsShipped`] before the order is refunded and fails.
    pub fn new(payments: Payments, logistics: Logistics, email: Email, shipping_deadline: Duration) -> Self {
        OrderMessagingFlow { payments, logistics, email, shipping_deadline }
    }

    /// Cancels the reservation `tx` (once) and returns `error`, the flow's failure.
    async fn refund(
        &self,
        ctx: &Ctx,
        flow: &str,
        tx: &str,
        error: FlowError,
    ) -> Result<TrackAndTrace, FlowError> {
        ctx.effect("refund", || async { self.payments.cancel(flow, tx) }).await?;
        Err(error)
    }
}

impl Flow for OrderMessagingFlow {
    const TYPE: &'static str = "order-messaging";
    type Input = Order;
    type Output = TrackAndTrace;

    async fn run(&self, ctx: &Ctx, order: Order) -> Result<TrackAndTrace, FlowError> {
        let flow = ctx.flow().to_string();
        let tx = ctx.uuid("transaction-id").await?.to_string();

        ctx.effect("request-reserve", || async {
            self.payments.reserve(&flow, &tx, &order.customer_id, order.total_cents)
        })
        .await?;
        ctx.message::<FundsReserved>().await?;

        // An error here means logistics refused the request outright; an interrupted request
        // never returns here.
        let requested = ctx
            .effect("request-ship", || async {
                self.logistics.ship(&flow, &order.order_id, &order.customer_id, &order.products).map(|_| ())
            })
            .at_most_once()
            .await;
        if let Err(refused) = requested {
            return self.refund(ctx, &flow, &tx, refused).await;
        }
        let track =
            match ctx.message_within::<ProductsShipped>("ship-deadline", self.shipping_deadline).await? {
                Some(shipped) => TrackAndTrace { tracking_id: shipped.tracking_id },
                None => {
                    // The deadline passed: a failure report that arrived meanwhile is in the log
                    // before this timer's firing, so the wait takes it if there is one.
                    let failed = ctx.message_within::<ShipmentFailed>("ship-failure", Duration::ZERO).await?;
                    let error = match failed {
                        Some(f) => FlowError::new(SHIPMENT_FAILED, f.reason),
                        None => FlowError::new(
                            SHIPMENT_TIMEOUT,
                            format!("logistics did not ship within {:?}", self.shipping_deadline),
                        ),
                    };
                    return self.refund(ctx, &flow, &tx, error).await;
                }
            };

        ctx.effect("request-capture", || async { self.payments.capture(&flow, &tx) }).await?;
        ctx.message::<FundsCaptured>().await?;

        ctx.effect("email", || async {
            self.email.send(&flow, &order.customer_id, Email::ORDER_CONFIRMATION, &order.order_id)
        })
        .await?;
        Ok(track)
    }
}
