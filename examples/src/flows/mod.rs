//! The seed exercises as flows.

pub mod bulk_orders;
pub mod loan;
pub mod newsletter;
pub mod order;
pub mod order_messaging;
pub mod referral;
pub mod signup;
