//! Order processing, RPC style (the talk's first exercise).
//!
//! A captured transaction id; reserve the money; ship (at most once: a crash while shipping
//! must never ship twice, so an interrupted shipment ends the flow `Failed` with
//! `effect_outcome_unknown` for an operator); capture; confirm by email. When logistics answers
//! "no", the reservation is cancelled (refund) and the flow fails with that answer.

use std::time::Duration;

use fetter::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fakes::{Email, Logistics, Payments, TrackAndTrace};

/// The input of `order` (and `order-messaging`): a public contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The order's id, e.g. `"o-1"`.
    pub order_id: String,
    /// Who pays and receives.
    pub customer_id: String,
    /// The amount.
    pub total_cents: u64,
    /// What to ship; a product id starting with `fail-ship` makes logistics refuse.
    pub products: Vec<String>,
}

/// The `order` flow and the services it calls.
pub struct OrderFlow {
    payments: Payments,
    logistics: Logistics,
    email: Email,
    /// Simulated latency of the payment and email calls (0 for instant fakes).
    latency: Duration,
    /// Simulated latency of logistics' answer to `ship` (0 by default: the at-most-once window
    /// of `ship` stays short). The call is received (and recorded) first, then answered.
    ship_latency: Duration,
}

impl OrderFlow {
    /// An order flow over these services.
    pub fn new(payments: Payments, logistics: Logistics, email: Email, latency: Duration) -> Self {
        OrderFlow { payments, logistics, email, latency, ship_latency: Duration::ZERO }
    }

    /// The same flow with logistics taking `ship_latency` to answer a shipment.
    pub fn with_ship_latency(mut self, ship_latency: Duration) -> Self {
        self.ship_latency = ship_latency;
        self
    }

    async fn pause(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

impl Flow for OrderFlow {
    const TYPE: &'static str = "order";
    type Input = Order;
    type Output = TrackAndTrace;

    async fn run(&self, ctx: &Ctx, order: Order) -> Result<TrackAndTrace, FlowError> {
        let flow = ctx.flow().to_string();
        let tx = ctx.uuid("transaction-id").await?.to_string();
        ctx.effect("reserve", || async {
            self.pause().await;
            self.payments.reserve(&flow, &tx, &order.customer_id, order.total_cents)
        })
        .await?;
        // An error here means logistics answered "no"; an interrupted call never returns here.
        let shipped = ctx
            .effect("ship", || async {
                let answer = self.logistics.ship(&flow, &order.order_id, &order.customer_id, &order.products);
                if !self.ship_latency.is_zero() {
                    tokio::time::sleep(self.ship_latency).await;
                }
                answer
            })
            .at_most_once()
            .await;
        let track = match shipped {
            Ok(track) => track,
            Err(refused) => {
                ctx.effect("refund", || async {
                    self.pause().await;
                    self.payments.cancel(&flow, &tx)
                })
                .await?;
                return Err(refused);
            }
        };
        ctx.effect("capture", || async {
            self.pause().await;
            self.payments.capture(&flow, &tx)
        })
        .await?;
        ctx.effect("email", || async {
            self.pause().await;
            self.email.send(&flow, &order.customer_id, Email::ORDER_CONFIRMATION, &order.order_id)
        })
        .await?;
        Ok(track)
    }
}
