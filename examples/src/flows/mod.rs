//! The seed exercises as flows.

pub mod order;
