//! # fetter-raft — the replicated journal
//!
//! Everything in fetter that must survive a crash and be agreed on lives here: the command enums,
//! the deterministic shard and metadata state machines, the sled-backed Raft log and state-machine
//! storage, snapshots, the openraft glue and the tonic transport that carries Raft RPCs between
//! nodes. It knows nothing of actors or flows' code.
//!
//! Main types:
//! - [`shard::ShardCommand`] / [`shard::apply`]: a shard's state machine (flows, effects, event
//!   logs, timers, outbox), pure over a [`kv::Kv`].
//! - [`meta::MetaCommand`] / [`meta::apply`]: group 0 (cluster id, members, parameters, placement).
//! - [`node::RaftNode`]: one process's Raft groups over one sled `Db`, served by one tonic service.
//! - [`handle::GroupHandle`]: propose with group commit, linearizable reads, status watch,
//!   membership changes.
//!
//! Invariants kept here:
//! - a log append is acknowledged to openraft only after the sled flush that makes it durable;
//! - one applied batch of entries is atomic, `last_applied` included (a redo record, see
//!   [`storage`]);
//! - `apply` reads no clock, randomness or environment; a rejected command changes nothing;
//! - snapshots are built from a copy taken while apply is paused and installed atomically.

pub mod bugs;
pub mod codec;
pub mod handle;
pub mod ids;
pub mod kv;
pub mod meta;
pub mod node;
pub mod placement;
pub mod shard;
pub mod storage;
pub mod sync;
pub mod transport;
pub mod types;
