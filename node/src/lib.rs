//! # fetter — durable workflows-as-code
//!
//! The process side of fetter: wiring the replicated journal (`fetter-raft`) and the flow
//! runtime (`fetter-actors`) into a node, and the user API ([`prelude`]).
//!
//! Today it provides [`Engine`], one node in-process that hosts every shard of its own cluster
//! (what `shop run-batch`, the examples and their tests use). The multi-node cluster — the
//! public gRPC API, forwarding, bootstrap, the membership reconciler, the CLI and the typed
//! client — comes with the cluster issue.

mod engine;

pub use engine::{Engine, EngineConfig, Error};

/// What a flow author needs.
pub mod prelude {
    pub use fetter_actors::control::{ControlPanel, Error as ControlError, FlowView, ListQuery, Started};
    pub use fetter_actors::{kind, Ctx, Flow, FlowError, Message, Registry, RetryOn, RetryPolicy};
    pub use fetter_raft::ids::FlowId;
    pub use fetter_raft::shard::FlowStatus;
}
