//! # fetter-actors — what runs
//!
//! Will own the user-facing programming model (the `Flow` trait and `Ctx`: effects, state,
//! messages, timers, child flows) and the ractor actors that drive it inside one process: a
//! `ShardActor` per shard this node leads (activation, timers, outbox delivery, fencing on lost
//! quorum) and a `FlowActor` per active flow instance, proposing its steps to the shard's Raft
//! group through `fetter-raft`. It depends on `fetter-raft` and ractor (in-process only).
//!
//! Nothing is implemented here yet: the flow runtime is the next issue after the journal.
