//! # fetter-chaos — multi-process fault injection
//!
//! Will run seeded, long, multi-fault scenarios against real node processes (kill -9, SIGSTOP /
//! SIGCONT, restarts, node loss and replacement) with a workload, a recorded history and a
//! checker of the contract in DESIGN.md §1 (no flow lost or run twice, at-most-once effects at
//! most once, no acknowledged message lost, locks exclusive).
//!
//! Nothing is implemented here yet.
