//! # fetter-tests — cross-crate integration tests
//!
//! Will hold the cluster harness (`Cluster::builder().nodes(3)`) and the tests that span crates
//! (failover, messages, outbox across nodes), as one integration binary. Tests of one crate live
//! in that crate; the replicated journal's are in `raft/src` and `raft/tests`.
//!
//! Nothing is implemented here yet.
