//! # fetter-chaos — seeded fault injection against real node processes
//!
//! `fetter-chaos run` starts a cluster of node processes (this program's `node` command: the
//! `shop` application, its fake services writing the run's ledger), drives a workload through the
//! public gRPC API while a seeded schedule injects faults — `kill -9`, SIGSTOP past the election
//! timeout, SIGTERM, and network partitions made by the kernel (nftables in a private network
//! namespace, every node on its own loopback address) — then heals everything, reads the final
//! state and checks the run. Everything a run saw is in its directory as JSON lines
//! ([`history`]); the [`checker`] reads only those files, so `fetter-chaos check <dir>`
//! re-checks a saved run.

pub mod checker;
pub mod history;
pub mod report;
pub mod run;
pub mod schedule;
pub mod timeline;

/// The network faults (shared with the tests).
pub use fetter_tests::net;
