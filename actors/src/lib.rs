//! # fetter-actors — what runs
//!
//! The user-facing programming model and the machinery that drives it inside one process:
//! - [`Flow`]: a durable workflow is a type with an `async fn run(&self, ctx, input)`;
//! - [`Ctx`]: effects (at-least-once or at-most-once, errors recorded, retries), `uuid` /
//!   `now` / `random`, state values, messages (typed, selective, with timeouts, "n until a
//!   deadline"), durable sleeps and postpones, sends to other flows and child flows — each
//!   journaled in the flow's shard group and replayed; a wait for an event not yet in the log
//!   suspends the flow;
//! - [`Registry`]: the flows a node runs, by type name;
//! - [`activation`]: one activation of a flow — replay from the top against the journal, run new
//!   steps, commit the outcome; fenced activations stop without committing anything;
//! - [`shard_actor`]: the ractor `ShardActor` of a shard leader (with one `FlowActor` per active
//!   flow): activations, timers, outbox delivery, retention, fencing on lost leadership;
//! - [`control`]: the control panel (read, list and repair flows).
//!
//! Invariants: every step is committed with the activation's epoch before the flow continues;
//! a recorded step never runs again; an at-most-once effect found `Started` never runs again
//! and never returns into flow code; a panic fails only its flow.
//!
//! Still to come: locks and semaphores, and delivery to shards led by other nodes (the cluster).

pub mod activation;
pub mod bugs;
pub mod control;
mod ctx;
mod flow;
mod flow_actor;
#[cfg(feature = "test-hooks")]
pub mod hooks;
mod registry;
pub mod shard_actor;
mod task;

pub use ctx::{Ctx, Effect, Message, RetryOn, RetryPolicy, State};
pub use flow::{kind, Flow, FlowError};
pub use registry::{Registry, RegistryError};
