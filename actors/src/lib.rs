//! # fetter-actors — what runs
//!
//! The user-facing programming model and the machinery that drives it inside one process:
//! - [`Flow`]: a durable workflow is a type with an `async fn run(&self, ctx, input)`;
//! - [`Ctx`]: effects (at-least-once or at-most-once, errors recorded), `uuid` / `now` /
//!   `random`, state values — each journaled in the flow's shard group and replayed;
//! - [`Registry`]: the flows a node runs, by type name;
//! - [`activation`]: one activation of a flow — replay from the top against the journal, run new
//!   steps, commit the outcome; fenced activations stop without committing anything.
//!
//! Invariants: every step is committed with the activation's epoch before the flow continues;
//! a recorded step never runs again; an at-most-once effect found `Started` never runs again
//! and never returns into flow code; a panic fails only its flow.
//!
//! Still to come (the runtime issue): messages and timers with suspension, child flows and
//! sends, retries, and the ractor `ShardActor` / `FlowActor` that activate flows on the shard
//! leader.

pub mod activation;
mod ctx;
mod flow;
mod registry;

pub use ctx::{Ctx, Effect, State};
pub use flow::{kind, Flow, FlowError};
pub use registry::{Registry, RegistryError};
