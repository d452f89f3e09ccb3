//! # fetter — durable workflows-as-code
//!
//! The process side of fetter: wiring the replicated journal (`fetter-raft`) and the flow
//! runtime (`fetter-actors`) into a node, and the user API ([`prelude`]).
//!
//! - [`Engine`]: one node in-process that hosts every shard of its own cluster (what
//!   `shop run-batch`, the examples and their tests use);
//! - [`cluster`]: a node of a multi-node cluster — bootstrap, the public gRPC API
//!   (`node/proto/fetter.proto`), forwarding to shard leaders;
//! - [`Client`]: the typed Rust client of that API; [`cli`]: the command line every fetter
//!   application binary gets.

pub mod app;
pub mod cli;
pub mod client;
pub mod cluster;
mod engine;
#[cfg(feature = "test-hooks")]
pub mod hooks;
pub mod local;

pub use app::App;
pub use client::Client;
pub use engine::{Engine, EngineConfig, Error};
/// The chaos harness's planted bugs (off unless the `chaos-bugs` feature and the environment ask).
pub use fetter_actors::bugs;
/// Which activation is running the calling flow code: [`activation::current`].
pub mod activation {
    pub use fetter_actors::activation::{current, Current};
}
/// Which shard a flow lives on (stable across releases).
pub use fetter_raft::placement;

/// Generated protobuf and tonic code of the public API.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("fetter.v1");

    impl ClusterStatusResponse {
        /// Shards led per node: every live member (leading none included) and any other node
        /// named as a leader.
        pub fn leaders_per_node(&self) -> std::collections::BTreeMap<u64, usize> {
            let mut per: std::collections::BTreeMap<u64, usize> =
                self.members.iter().filter(|m| m.alive).map(|m| (m.id, 0)).collect();
            for leader in self.shards.iter().filter_map(|s| s.leader) {
                *per.entry(leader).or_default() += 1;
            }
            per
        }
    }
}

/// What a flow author needs.
pub mod prelude {
    pub use fetter_actors::control::{ControlPanel, Error as ControlError, FlowView, ListQuery, Started};
    pub use fetter_actors::{
        kind, Ctx, Flow, FlowError, Message, Registry, RegistryError, RetryOn, RetryPolicy,
    };
    pub use fetter_raft::ids::FlowId;
    pub use fetter_raft::shard::FlowStatus;
}
