//! # fetter-actors — what runs
//!
//! The user-facing programming model and the machinery that drives it inside one process:
//! - [`Flow`]: a durable workflow is a type with an `async fn run(&self, ctx, input)`;
//! - [`Ctx`]: effects (at-least-once or at-most-once, errors recorded), `uuid` / `now` /
//!   `random`, state values, messages (typed, selective, with timeouts, "n until a deadline")
//!   and durable sleeps — each journaled in the flow's shard group and replayed; a wait for an
//!   event not yet in the log suspends the flow;
//! - [`Registry`]: the flows a node runs, by type name;
//! - [`activation`]: one activation of a flow — replay from the top against the journal, run new
//!   steps, commit the outcome; fenced activations stop without committing anything.
//!
//! Invariants: every step is committed with the activation's epoch before the flow continues;
//! a recorded step never runs again; an at-most-once effect found `Started` never runs again
//! and never returns into flow code; a panic fails only its flow.
//!
//! Still to come (the runtime issue): child flows and sends, retries, postpone, and the ractor
//! `ShardActor` / `FlowActor` that activate flows, fire timers and deliver outboxes on the shard
//! leader.

pub mod activation;
pub mod control;
mod ctx;
mod flow;
mod flow_actor;
#[cfg(feature = "test-hooks")]
pub mod hooks;
mod registry;
pub mod shard_actor;

pub use ctx::{Ctx, Effect, Message, RetryOn, RetryPolicy, State};
pub use flow::{kind, Flow, FlowError};
pub use registry::{Registry, RegistryError};
