//! The shard state machine: one per shard group, pure and deterministic.
//!
//! [`apply`] takes the state (a [`Kv`](crate::kv::Kv)), the batch timestamp chosen by the
//! proposer and one [`ShardCommand`], and returns the reply and the [`Action`]s the leader should
//! take. It reads no clock, randomness, environment or local configuration: time arrives in the
//! command batch and is made monotonic (`clock = max(clock, now_ms)`), cluster parameters arrive
//! in commands ([`ShardCommand::Configure`], [`ShardCommand::Gc`]). A rejected command changes
//! nothing.
//!
//! Layout of the rows is private to this module (see `keys`); readers use the functions here.

mod apply;
mod command;
mod keys;
mod query;
mod read;
pub(crate) mod txn;

pub use apply::{apply, apply_at};
pub use command::*;
pub use query::{FlowView, ShardAnswer, ShardQuery};
pub use read::*;
