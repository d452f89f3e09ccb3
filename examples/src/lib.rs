//! # fetter-examples — the seed exercises as real flows
//!
//! Will hold order processing (RPC and message-driven), the newsletter sender, customer signup,
//! the loan application and the bank transfer, each with fake external services that append
//! every call to a ledger file, and the `shop` binary (a node with these flows and the full CLI).
//!
//! Nothing is implemented here yet: the examples arrive with the flow runtime.
