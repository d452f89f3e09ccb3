//! # fetter-examples — the seed exercises as real flows
//!
//! This crate will hold the exercises of the talk fetter grew from — order processing (RPC and
//! message-driven), the newsletter sender, customer signup, the loan application and the bank
//! transfer — written as fetter flows, and the `shop` binary (a node with these flows and the
//! full CLI). The flows arrive with the flow runtime.
//!
//! What exists today is what those flows will call: the fake external services in [`fakes`]
//! ([`fakes::Payments`], [`fakes::Logistics`], [`fakes::Email`], [`fakes::CreditBureau`]), which
//! answer instantly and deterministically, and the [`ledger::Ledger`] they append every call to.
//! The ledger is one JSON line per call, written with a single `write` on an `O_APPEND` file so
//! that several node processes can share it; tests and the demo read it back to count how often
//! each effect really reached the outside world (DESIGN.md §5).

pub mod fakes;
pub mod ledger;
