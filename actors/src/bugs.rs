//! Planted bugs, for the chaos harness to prove that its checker catches them (feature
//! `chaos-bugs`: only the harness's build enables it, never a release build of the product).
//! One is turned on in a node process by `FETTER_CHAOS_BUG=<name>`:
//!
//! - `amo-rerun`: replay runs an at-most-once effect again when its outcome was not recorded
//!   (instead of failing the flow `effect_outcome_unknown`);
//! - `timer-early`: a timer is armed for a quarter of its timeout;
//! - `timer-late`: a timer is armed [`TIMER_LATE_MS`] after its deadline;
//! - `outbox-ack-first`: outbox entries (child starts and results, messages between flows) are
//!   acknowledged before the target shard has them, and a delivery that fails is not retried;
//! - `epoch-check`: fencing is off. The state machine applies the commands of a superseded
//!   activation (a stale epoch) as if it were current (`fetter_raft::bugs`), and the shard actor
//!   does not stop an activation a control-panel change fenced: it starts the new one beside it.
//!   (Either half alone is masked by the other: with only the state machine's check skipped, a
//!   `ci` run with seed 11 passed.)
//! - `ack-before-flush`: the write-ahead log acknowledges appends, votes and truncations without
//!   its `fdatasync` (in `fetter_raft::storage::wal`): a power cut loses writes the node had
//!   acknowledged. A `kill -9` cannot show it (the kernel keeps a killed process's page cache), so
//!   the chaos harness does not catch this one; the power-loss test (`tests/tests/power_loss.rs`)
//!   does.
//!
//! Without the feature every bug is off and this module is empty code.

/// The names of the bugs that can be planted.
pub const BUGS: &[&str] =
    &["amo-rerun", "timer-early", "timer-late", "outbox-ack-first", "epoch-check", "ack-before-flush"];

/// How late the planted bug `timer-late` arms a timer.
pub const TIMER_LATE_MS: u64 = 10_000;

pub use fetter_raft::bugs::planted;
