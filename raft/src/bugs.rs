//! Whether a bug is planted in this process, for the chaos harness (feature `chaos-bugs`; the
//! list of bugs and what each does is in `fetter_actors::bugs`). The state machine's one is
//! `epoch-check`: commands of a superseded activation are applied as if it were current.
//!
//! Reading the environment inside `apply` would break determinism; it is done only in a build
//! with the feature, where every node of the harness's cluster gets the same variable.

/// Whether the bug `name` is planted in this process (`FETTER_CHAOS_BUG=<name>`).
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
