//! Planted bugs, for the chaos harness to prove that its checker catches them (feature
//! `chaos-bugs`: only the harness's build enables it, never a release build of the product).
//! One is turned on in a node process by `FETTER_CHAOS_BUG=<name>`:
//!
//! - `amo-rerun`: replay runs an at-most-once effect again when its outcome was not recorded
//!   (instead of failing the flow `effect_outcome_unknown`);
//! - `timer-early`: a timer is armed for a quarter of its timeout;
//! - `timer-late`: a timer is armed [`TIMER_LATE_MS`] after its deadline;
//! - `outbox-ack-first`: outbox entries (child starts and results, messages between flows) are
//!   acknowledged before the target shard has them, and a delivery that fails is not retried.
//!
//! Without the feature every bug is off and this module is empty code.

/// The names of the bugs that can be planted.
pub const BUGS: &[&str] = &["amo-rerun", "timer-early", "timer-late", "outbox-ack-first"];

/// How late the planted bug `timer-late` arms a timer.
pub const TIMER_LATE_MS: u64 = 10_000;

/// Whether the bug `name` is planted in this process.
#[cfg(feature = "chaos-bugs")]
pub fn planted(name: &str) -> bool {
    static PLANTED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PLANTED.get_or_init(|| std::env::var("FETTER_CHAOS_BUG").ok()).as_deref() == Some(name)
}

/// Whether the bug `name` is planted in this process: never, without the `chaos-bugs` feature.
#[cfg(not(feature = "chaos-bugs"))]
pub fn planted(_name: &str) -> bool {
    false
}
