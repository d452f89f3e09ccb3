//! # fetter — the node process
//!
//! Will own the process: configuration, wiring of `fetter-raft` and `fetter-actors`, the public
//! gRPC API and request forwarding, cluster bootstrap and the membership reconciler, the CLI,
//! the typed Rust client, tracing setup and graceful shutdown; and it will re-export the user API
//! as `fetter::prelude`.
//!
//! Nothing is implemented here yet: it grows with the runtime and cluster issues.
