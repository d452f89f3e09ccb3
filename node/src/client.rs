//! The typed Rust client (being written).

/// Placeholder.
pub struct Client;
