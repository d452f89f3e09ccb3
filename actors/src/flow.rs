//! The programming model: a flow is a type implementing [`Flow`], its `run` an ordinary async fn.

use std::fmt;
use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ctx::Ctx;

/// A durable workflow. Its dependencies (clients, configuration) live in the implementing value;
/// its progress lives in the journal, so `run` may be replayed from the top at any time and must
/// reach the world only through [`Ctx`].
///
/// ```ignore
/// impl Flow for Greeter {
///     const TYPE: &'static str = "greeter";
///     type Input = String;
///     type Output = String;
///     async fn run(&self, ctx: &Ctx, name: String) -> Result<String, FlowError> {
///         let id = ctx.uuid("greeting-id").await?;
///         ctx.effect("send", || async { self.mail.send(&name, id).await }).await?;
///         Ok(format!("greeted {name}"))
///     }
/// }
/// ```
pub trait Flow: Send + Sync + 'static {
    /// The stable type name flows of this type are started under (part of the public contract).
    const TYPE: &'static str;
    /// The input, as JSON.
    type Input: Serialize + DeserializeOwned + Send + 'static;
    /// The output, as JSON.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Runs (or replays) the flow.
    fn run(
        &self,
        ctx: &Ctx,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, FlowError>> + Send;
}

/// Error kinds fetter itself records; user code may use any other kind.
pub mod kind {
    /// An at-most-once effect was started but its outcome was not recorded before a crash.
    pub const EFFECT_OUTCOME_UNKNOWN: &str = "effect_outcome_unknown";
    /// The journal holds an entry the code does not match (kind or value type of an id).
    pub const REPLAY_DRIFT: &str = "replay_drift";
    /// Flow code panicked.
    pub const PANIC: &str = "panic";
    /// No flow of this type is registered on the node. Starts of such flows are refused at the
    /// API; a stored flow whose type the leading node lacks waits (with a note) instead of
    /// failing with this kind.
    pub const UNKNOWN_FLOW_TYPE: &str = "unknown_flow_type";
    /// The stored input is not valid for the flow's `Input` type.
    pub const BAD_INPUT: &str = "bad_input";
    /// The flow's output could not be encoded.
    pub const BAD_OUTPUT: &str = "bad_output";
    /// An error converted from a Rust error value with `?`.
    pub const ERROR: &str = "error";
    /// A value the flow produced (an effect's value or error, a state, a message it sends, a
    /// child's input, its output) is over the cluster's payload limit; the message names the
    /// step.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
}

/// How a flow (or an effect) failed: a stable kind and a message. Recorded in the journal, so a
/// replay returns the same error.
///
/// Any `std::error::Error` converts into it with `?` (kind [`kind::ERROR`]); use
/// [`FlowError::new`] for a kind of your own.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowError {
    /// Stable, machine-readable kind.
    pub kind: String,
    /// Human-readable detail.
    pub message: String,
}

impl FlowError {
    /// An error of `kind` with `message`.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        FlowError { kind: kind.into(), message: message.into() }
    }
}

impl fmt::Debug for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

// `FlowError` deliberately does not implement `std::error::Error`, so that this blanket
// conversion (what makes `?` work on any error inside a flow) does not overlap `From<T> for T`.
impl<E: std::error::Error> From<E> for FlowError {
    fn from(e: E) -> Self {
        FlowError::new(kind::ERROR, e.to_string())
    }
}

impl From<FlowError> for fetter_raft::shard::ErrorInfo {
    fn from(e: FlowError) -> Self {
        fetter_raft::shard::ErrorInfo { kind: e.kind, message: e.message }
    }
}

impl FlowError {
    /// The error as recorded in the journal.
    pub fn from_info(e: fetter_raft::shard::ErrorInfo) -> Self {
        FlowError { kind: e.kind, message: e.message }
    }
}
