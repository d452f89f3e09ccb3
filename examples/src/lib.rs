//! # fetter-examples — the seed exercises as real flows
//!
//! The exercises of the talk fetter grew from, written as fetter flows ([`flows`]): today the
//! RPC-style order processing ([`flows::order`]); the message-driven order, the newsletter,
//! signup and the loan application follow. The `shop` binary runs them (`shop run-batch`).
//! [`flows::bulk_orders`] runs a batch of orders as child `order` flows and collects their outcomes.
//!
//! The flows call the fake external services in [`fakes`]
//! ([`fakes::Payments`], [`fakes::Logistics`], [`fakes::Email`], [`fakes::CreditBureau`]), which
//! answer instantly and deterministically, and the [`ledger::Ledger`] they append every call to.
//! The ledger is one JSON line per call, written with a single `write` on an `O_APPEND` file so
//! that several node processes can share it; tests and the demo read it back to count how often
//! each effect really reached the outside world (DESIGN.md §5).

pub mod fakes;
pub mod flows;
pub mod ledger;
pub mod shop;

use std::time::Duration;

use fetter::prelude::{Registry, RegistryError};

/// Every example flow, with fakes that write to `ledger` (if any) as node `node`; `latency`
/// delays the payment and email calls of `order`.
pub fn registry(
    ledger: Option<ledger::Ledger>,
    node: u64,
    latency: Duration,
) -> Result<Registry, RegistryError> {
    registry_with(ledger, node, latency, Duration::ZERO)
}

/// [`registry`] with logistics taking `ship_latency` to answer each shipment of `order` (a long
/// at-most-once window, for tests of leadership moves).
pub fn registry_with(
    ledger: Option<ledger::Ledger>,
    node: u64,
    latency: Duration,
    ship_latency: Duration,
) -> Result<Registry, RegistryError> {
    use fakes::{Email, Logistics, Payments};
    let order = flows::order::OrderFlow::new(
        Payments::new(ledger.clone(), node),
        Logistics::new(ledger.clone(), node),
        Email::new(ledger.clone(), node),
        latency,
    )
    .with_ship_latency(ship_latency);
    let messaging = flows::order_messaging::OrderMessagingFlow::new(
        Payments::new(ledger.clone(), node),
        Logistics::new(ledger.clone(), node),
        Email::new(ledger.clone(), node),
        Duration::from_secs(60),
    );
    Registry::new()
        .register(order)?
        .register(messaging)?
        .register(flows::newsletter::NewsletterFlow::new(Email::new(ledger.clone(), node)))?
        .register(flows::signup::SignupFlow::new(Email::new(ledger.clone(), node)))?
        .register(flows::bulk_orders::BulkOrdersFlow::new())?
        .register(flows::referral::RewardsFlow)?
        .register(flows::referral::ReferralFlow)?
        .register(flows::loan::LoanFlow::with_standard_bureaus(ledger, node))
}
