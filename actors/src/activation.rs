//! One activation of a flow: replay its code against its journal until it finishes, suspends or
//! is fenced.
//!
//! The caller commits `Activate{epoch}` first (the shard actor does; [`activate`] does it for a
//! single call). The driver then reads the flow and its recorded effects, runs the flow's future
//! — catching panics, so a panicking flow fails alone — and races it against the activation's
//! halt signal: a halted activation's future is dropped mid-step and never resumes.

use std::panic::AssertUnwindSafe;

use fetter_raft::handle::{self, GroupHandle};
use fetter_raft::ids::{Epoch, FlowId};
use fetter_raft::kv::KvError;
use fetter_raft::shard::{self, FlowStatus, Rejection, ShardCommand};
use futures::FutureExt;

use crate::ctx::{over_limit, Ctx, Halt};
use crate::flow::{kind, FlowError};
use crate::registry::Registry;

tokio::task_local! {
    static CURRENT: Current;
}

/// Which activation is running the code that asks: the flow and its epoch.
///
/// The epoch is a fencing token: it grows with every activation of the flow (after a failover,
/// a restart, any control-panel change), and only the activation with the current epoch can
/// commit. A service that must never act for a superseded activation can be handed the epoch
/// and refuse any call with a lower one than it has seen (the chaos harness's fake services
/// record it, to check that activations never overlap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    /// The flow being run.
    pub flow: FlowId,
    /// The activation's epoch.
    pub epoch: Epoch,
}

/// The activation whose flow code (its effects included) is calling, or `None` outside of one.
pub fn current() -> Option<Current> {
    CURRENT.try_with(Clone::clone).ok()
}

/// How an activation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The flow finished with an output (committed).
    Succeeded,
    /// The flow finished with an error (committed).
    Failed(FlowError),
    /// The activation lost the flow (newer epoch, refused or uncommitted step); nothing more was
    /// committed by it.
    Fenced(String),
    /// The flow waits for an event (committed `Suspend`); an event or a timer wakes it.
    Suspended,
    /// The flow had already finished before this activation.
    AlreadyFinished(FlowStatus),
    /// This node does not run the flow's type (a rolling deploy that adds a type): the flow
    /// stays `Running`, with a note saying so, for a leader that runs it.
    UnknownType(String),
}

/// Why an activation could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The journal could not be read or written.
    #[error(transparent)]
    Journal(#[from] handle::Error),
    /// The shard's state could not be read.
    #[error(transparent)]
    State(#[from] KvError),
    /// No such flow.
    #[error("flow {0} not found")]
    NotFound(FlowId),
}

/// Bounds an activation keeps (cluster parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest user payload (bytes) the flow may put into the log: an effect's value or
    /// error, a state, a message it sends, a child's input, its output or error. A larger one
    /// fails the flow with `payload_too_large` naming the step.
    pub max_payload_bytes: u64,
}

impl Default for Limits {
    /// The cluster default: 1 MiB.
    fn default() -> Self {
        Limits { max_payload_bytes: fetter_raft::meta::ClusterParams::default().max_payload_bytes }
    }
}

/// Commits a new activation of `flow` (stored epoch + 1) and runs it, with the default limits.
pub async fn activate(group: &GroupHandle, registry: &Registry, flow: &FlowId) -> Result<Outcome, Error> {
    activate_with(group, registry, flow, Limits::default()).await
}

/// Commits a new activation of `flow` (stored epoch + 1) and runs it within `limits`.
pub async fn activate_with(
    group: &GroupHandle,
    registry: &Registry,
    flow: &FlowId,
    limits: Limits,
) -> Result<Outcome, Error> {
    let record =
        group.read(|kv| shard::get_flow(kv, flow)).await??.ok_or_else(|| Error::NotFound(flow.clone()))?;
    if record.status.is_finished() {
        return Ok(Outcome::AlreadyFinished(record.status));
    }
    let epoch = record.epoch.next();
    match group.propose_shard(ShardCommand::Activate { flow: flow.clone(), epoch }).await? {
        Ok(_) => run(group, registry, flow, epoch, limits).await,
        Err(Rejection::FlowFinished) => Ok(Outcome::AlreadyFinished(record.status)),
        Err(r) => Ok(Outcome::Fenced(format!("activation refused: {r}"))),
    }
}

/// Runs the activation `epoch` that was committed with `flow`'s start and belongs to this node
/// (`Action::Started`), if the flow is still at that epoch; otherwise activates it as usual.
pub async fn run_claimed(
    group: &GroupHandle,
    registry: &Registry,
    flow: &FlowId,
    epoch: Epoch,
    limits: Limits,
) -> Result<Outcome, Error> {
    let record = group.read_local(|kv| shard::get_flow(kv, flow))?;
    match record {
        Some(r) if r.epoch == epoch && r.status == shard::FlowStatus::Running => {
            run(group, registry, flow, epoch, limits).await
        }
        _ => activate_with(group, registry, flow, limits).await,
    }
}

/// Runs the activation `epoch` of `flow`, whose `Activate` (or claimed start) is committed.
pub async fn run(
    group: &GroupHandle,
    registry: &Registry,
    flow: &FlowId,
    epoch: Epoch,
    limits: Limits,
) -> Result<Outcome, Error> {
    // The leader applied our `Activate` before replying, so its local state is current.
    let (record, effects, events) = group.read_local(|kv| -> Result<_, KvError> {
        Ok((
            shard::get_flow(kv, flow)?,
            shard::list_effects(kv, flow)?,
            shard::events(kv, flow, 0, usize::MAX)?,
        ))
    })?;
    let record = record.ok_or_else(|| Error::NotFound(flow.clone()))?;
    if record.epoch != epoch {
        return Ok(Outcome::Fenced(format!("flow is at {} not {epoch}", record.epoch)));
    }
    let ctx =
        Ctx::new(flow.clone(), epoch, group.clone(), effects, events, limits.max_payload_bytes, record.seed);
    let result = match registry.get(&flow.flow_type) {
        // Not a failure of the flow: a node that runs this type may lead the shard later (a
        // rolling deploy that adds the type). Operators see why it waits.
        None => {
            let mut types = registry.types();
            types.truncate(32);
            let note = format!(
                "waiting for a leader that runs flow type {:?} (the leader of its shard runs {})",
                flow.flow_type,
                types.join(", ")
            );
            // Characters are at most 4 bytes: this stays within the note's bound.
            let note: String = note.chars().take(shard::MAX_NOTE_BYTES / 4).collect();
            tracing::warn!(flow = %flow, epoch = %epoch, "{note}");
            let command = ShardCommand::Note { flow: flow.clone(), epoch, note };
            return match group.propose_shard(command).await {
                Ok(Ok(_)) => Ok(Outcome::UnknownType(flow.flow_type.clone())),
                Ok(Err(r)) => Ok(Outcome::Fenced(format!("note refused: {r}"))),
                Err(e) => Ok(Outcome::Fenced(format!("note not committed: {e}"))),
            };
        }
        Some(code) => {
            let current = Current { flow: flow.clone(), epoch };
            let running =
                AssertUnwindSafe(CURRENT.scope(current, code.run(ctx.clone(), record.input.clone())))
                    .catch_unwind();
            tokio::select! {
                finished = running => match finished {
                    Ok(result) => result,
                    Err(panic) => Err(FlowError::new(kind::PANIC, panic_message(panic.as_ref()))),
                },
                halt = ctx.halted() => match halt {
                    Halt::Fenced(reason) => return Ok(Outcome::Fenced(reason)),
                    Halt::Suspended => return Ok(Outcome::Suspended),
                    Halt::Fail(error) => Err(error),
                },
            }
        }
    };
    // A value over the limit never enters the log: the flow fails naming what was too large.
    let limit = limits.max_payload_bytes;
    let result = match result {
        Ok(output) => match over_limit(|| "the output of the flow".into(), output.len(), limit) {
            None => Ok(output),
            Some(too_large) => Err(too_large),
        },
        Err(error) => {
            let what = || {
                format!("the error of the flow (kind {:?})", error.kind.chars().take(64).collect::<String>())
            };
            Err(over_limit(what, error.kind.len() + error.message.len(), limit).unwrap_or(error))
        }
    };
    let (command, outcome) = match result {
        Ok(output) => (ShardCommand::Complete { flow: flow.clone(), epoch, output }, Outcome::Succeeded),
        Err(error) => {
            tracing::info!(flow = %flow, epoch = %epoch, error = %error, "flow failed");
            (
                ShardCommand::Fail { flow: flow.clone(), epoch, error: error.clone().into() },
                Outcome::Failed(error),
            )
        }
    };
    // The effect results not yet committed go into the same entry as the flow's end.
    let mut commands = ctx.take_pending();
    commands.push(command);
    match group.propose_shard_all(commands).await {
        Ok(replies) => match replies.into_iter().find_map(Result::err) {
            None => Ok(outcome),
            Some(r) => Ok(Outcome::Fenced(format!("finish refused: {r}"))),
        },
        Err(e) => Ok(Outcome::Fenced(format!("finish not committed: {e}"))),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "flow panicked".to_string()
    }
}
