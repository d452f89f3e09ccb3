//! The control panel (library API): read and repair flows wherever their shard lives.
//!
//! Every mutation of a live flow commits a new epoch, fencing its running activation; a caller
//! that passes the epoch it read gets [`Error::ConcurrentModification`] if the flow moved on
//! since. Reads are linearizable (they go through the shard leader).
//!
//! Every mutation carries a request id (the caller's, or a fresh one): the shard stores the first
//! reply under it, so a retry of a request whose answer was lost — by forwarding or by a client
//! failing over — changes nothing and gets that reply again (`ShardCommand::AdminRequest`).
//! Callers that retry must therefore pass their own id and keep it across their retries.

use std::cmp::Ordering;
use std::sync::Arc;

use fetter_raft::handle::{self, GroupHandle};
use fetter_raft::ids::{Epoch, FlowId, ShardId};
use fetter_raft::kv::KvError;
use fetter_raft::placement::shard_of;
use fetter_raft::shard::{
    self, AdminOp, DeadLetter, EffectRecord, ErrorInfo, Event, FlowRecord, FlowStatus, Payload, Rejection,
    ShardAnswer, ShardCommand, ShardOutcome, ShardQuery,
};

use crate::shard_actor::Router;

/// Why a control-panel call failed. Nothing changed when it fails.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such flow.
    #[error("flow {0} not found")]
    NotFound(FlowId),
    /// `start` of an existing flow with another input.
    #[error("input_mismatch: flow {0} exists with a different input")]
    InputMismatch(FlowId),
    /// The flow moved on since the caller read it.
    #[error("concurrent modification of {flow}: it is at {current}, the caller read {expected}")]
    ConcurrentModification {
        /// The flow.
        flow: FlowId,
        /// The epoch the caller read.
        expected: Epoch,
        /// The current epoch.
        current: Epoch,
    },
    /// The flow finished; the operation needs a live flow.
    #[error("flow {0} has already finished")]
    Finished(FlowId),
    /// A payload is not JSON.
    #[error("{what} is not valid JSON: {reason}")]
    BadJson {
        /// Which payload.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// The request id was used before for another request.
    #[error("request id {0:?} was already used for another request")]
    RequestIdReused(String),
    /// The shard refused the command for another reason.
    #[error("refused: {0}")]
    Refused(Rejection),
    /// The shard's group cannot be reached from here.
    #[error("no route to shard {0}")]
    NoRoute(ShardId),
    /// The journal did not answer.
    #[error(transparent)]
    Journal(#[from] handle::Error),
    /// The shard's state could not be read.
    #[error(transparent)]
    State(#[from] KvError),
}

/// Everything about one flow, as stored (the first [`DEAD_LETTERS_IN_VIEW`] dead letters;
/// [`ControlPanel::dead_letters`] pages through all).
pub use fetter_raft::shard::FlowView;

/// A shard answered a query with another kind of answer (a bug).
fn unexpected(answer: ShardAnswer) -> Error {
    Error::Refused(Rejection::Invalid(format!("unexpected answer to a query: {answer:?}")))
}

/// How many dead letters a [`FlowView`] carries at most.
pub const DEAD_LETTERS_IN_VIEW: usize = 100;

/// How `start` went.
#[derive(Debug, Clone, PartialEq)]
pub enum Started {
    /// A new flow.
    New,
    /// The flow existed with the same input: nothing changed.
    Existing(FlowStatus),
}

/// Which flows `list` returns.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this type.
    pub flow_type: Option<String>,
    /// Only flows in one of these statuses (compared by variant).
    pub status: Option<Vec<FlowStatus>>,
    /// Only flows after this one (the previous page's last flow).
    pub after: Option<FlowId>,
    /// At most this many.
    pub limit: usize,
}

/// The control panel over all shards reachable through a router.
#[derive(Clone)]
pub struct ControlPanel {
    router: Arc<dyn Router>,
    shard_count: u32,
}

fn json(what: &'static str, bytes: &[u8]) -> Result<(), Error> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map(|_| ())
        .map_err(|e| Error::BadJson { what, reason: e.to_string() })
}

fn same_status(a: &FlowStatus, b: &FlowStatus) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// The order flows are listed in: the shards' key order (type, then instance, shorter first).
fn listing_order(a: &FlowId, b: &FlowId) -> Ordering {
    (a.flow_type.len(), &a.flow_type, a.instance.len(), &a.instance).cmp(&(
        b.flow_type.len(),
        &b.flow_type,
        b.instance.len(),
        &b.instance,
    ))
}

impl ControlPanel {
    /// A control panel for `shard_count` shards reached through `router`.
    pub fn new(router: Arc<dyn Router>, shard_count: u32) -> Self {
        ControlPanel { router, shard_count }
    }

    fn group(&self, flow: &FlowId) -> Result<GroupHandle, Error> {
        let shard = shard_of(flow, self.shard_count);
        self.router.group(shard).ok_or(Error::NoRoute(shard))
    }

    async fn command(&self, flow: &FlowId, command: ShardCommand) -> Result<ShardOutcome, Error> {
        self.group(flow)?.submit_shard(command).await?.map_err(|r| match r {
            Rejection::FlowNotFound => Error::NotFound(flow.clone()),
            Rejection::InputMismatch => Error::InputMismatch(flow.clone()),
            Rejection::FlowFinished => Error::Finished(flow.clone()),
            Rejection::ConcurrentModification { expected, current } => {
                Error::ConcurrentModification { flow: flow.clone(), expected, current }
            }
            Rejection::RequestIdReused { request_id } => Error::RequestIdReused(request_id),
            other => Error::Refused(other),
        })
    }

    /// Starts `flow` with `input` (JSON); idempotent (see [`Started`]).
    pub async fn start(&self, flow: &FlowId, input: Payload) -> Result<Started, Error> {
        json("input", &input)?;
        match self.command(flow, ShardCommand::Start { flow: flow.clone(), input, parent: None }).await? {
            ShardOutcome::AlreadyExists { status } => Ok(Started::Existing(status)),
            _ => Ok(Started::New),
        }
    }

    /// Everything about `flow`.
    pub async fn get(&self, flow: &FlowId) -> Result<FlowView, Error> {
        let query = ShardQuery::Flow { flow: flow.clone(), dead_letters: DEAD_LETTERS_IN_VIEW };
        match self.group(flow)?.query(&query).await? {
            ShardAnswer::Flow(Some(view)) => Ok(*view),
            ShardAnswer::Flow(None) => Err(Error::NotFound(flow.clone())),
            other => Err(unexpected(other)),
        }
    }

    /// A page of flows over all shards, in listing order.
    pub async fn list(&self, query: &ListQuery) -> Result<Vec<FlowRecord>, Error> {
        let limit = query.limit.max(1);
        let mut all = Vec::new();
        for s in 0..self.shard_count {
            let group = self.router.group(ShardId(s)).ok_or(Error::NoRoute(ShardId(s)))?;
            let mut after = query.after.clone();
            let mut found = Vec::new();
            // Page through the shard until `limit` records pass the status filter.
            loop {
                let read =
                    ShardQuery::Flows { flow_type: query.flow_type.clone(), after: after.clone(), limit };
                let page = match group.query(&read).await? {
                    ShardAnswer::Flows(page) => page,
                    other => return Err(unexpected(other)),
                };
                let exhausted = page.len() < limit;
                after = page.last().map(|r| r.id.clone());
                found.extend(page.into_iter().filter(|r| {
                    query
                        .status
                        .as_ref()
                        .is_none_or(|wanted| wanted.iter().any(|w| same_status(w, &r.status)))
                }));
                if exhausted || found.len() >= limit {
                    break;
                }
            }
            all.extend(found);
        }
        all.sort_by(|a, b| listing_order(&a.id, &b.id));
        all.truncate(limit);
        Ok(all)
    }

    /// Up to `limit` dead letters addressed to `flow` (which may not exist), after arrival number
    /// `after_seq`, oldest first.
    pub async fn dead_letters(
        &self,
        flow: &FlowId,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        let limit = limit.max(1);
        match self
            .group(flow)?
            .query(&ShardQuery::DeadLettersOf { flow: flow.clone(), after_seq, limit })
            .await?
        {
            ShardAnswer::DeadLetters(letters) => Ok(letters),
            other => Err(unexpected(other)),
        }
    }

    /// A page of the dead letters of all shards: up to `limit` after `after` (the target and
    /// arrival number of the previous page's last letter), by target in listing order, then by
    /// arrival.
    pub async fn list_dead_letters(
        &self,
        after: Option<(FlowId, u64)>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        let limit = limit.max(1);
        let mut all = Vec::new();
        for s in 0..self.shard_count {
            let group = self.router.group(ShardId(s)).ok_or(Error::NoRoute(ShardId(s)))?;
            match group.query(&ShardQuery::DeadLettersAfter { after: after.clone(), limit }).await? {
                ShardAnswer::DeadLetters(letters) => all.extend(letters),
                other => return Err(unexpected(other)),
            }
        }
        all.sort_by(|a, b| listing_order(&a.target, &b.target).then(a.seq.cmp(&b.seq)));
        all.truncate(limit);
        Ok(all)
    }

    /// Runs `op` under `request_id` (a fresh one when `None`, which still makes forwarding's own
    /// retries safe); returns the flow's epoch right after the change (`None` after a delete).
    async fn admin(
        &self,
        flow: &FlowId,
        expected_epoch: Option<Epoch>,
        op: AdminOp,
        request_id: Option<&str>,
    ) -> Result<Option<Epoch>, Error> {
        let request_id = request_id.map_or_else(|| format!("panel-{}", uuid::Uuid::new_v4()), str::to_string);
        let command = ShardCommand::AdminRequest { request_id, flow: flow.clone(), expected_epoch, op };
        match self.command(flow, command).await? {
            ShardOutcome::Mutated { epoch } => Ok(epoch),
            other => Err(Error::Refused(Rejection::Invalid(format!("unexpected outcome {other:?}")))),
        }
    }

    /// Runs the flow again from the top with its recorded effects (or without them), optionally
    /// with a new input. Returns the flow's new epoch. `request_id`: see the module
    /// documentation (the same for every retry of one request).
    pub async fn restart(
        &self,
        flow: &FlowId,
        input: Option<Payload>,
        clear_effects: bool,
        expected_epoch: Option<Epoch>,
        request_id: Option<&str>,
    ) -> Result<Option<Epoch>, Error> {
        if let Some(input) = &input {
            json("input", input)?;
        }
        self.admin(flow, expected_epoch, AdminOp::Restart { input, clear_effects }, request_id).await
    }

    /// Cancels the flow and its children.
    pub async fn cancel(
        &self,
        flow: &FlowId,
        expected_epoch: Option<Epoch>,
        request_id: Option<&str>,
    ) -> Result<Option<Epoch>, Error> {
        self.admin(flow, expected_epoch, AdminOp::Cancel, request_id).await
    }

    /// Marks the flow succeeded with `output`.
    pub async fn succeed(
        &self,
        flow: &FlowId,
        output: Payload,
        expected_epoch: Option<Epoch>,
        request_id: Option<&str>,
    ) -> Result<Option<Epoch>, Error> {
        json("output", &output)?;
        self.admin(flow, expected_epoch, AdminOp::Succeed { output }, request_id).await
    }

    /// Marks the flow failed with `error`.
    pub async fn fail(
        &self,
        flow: &FlowId,
        error: ErrorInfo,
        expected_epoch: Option<Epoch>,
        request_id: Option<&str>,
    ) -> Result<Option<Epoch>, Error> {
        self.admin(flow, expected_epoch, AdminOp::Fail { error }, request_id).await
    }

    /// Deletes the flow and everything it owns; its id becomes free. Returns `None` (no epoch).
    pub async fn delete(
        &self,
        flow: &FlowId,
        expected_epoch: Option<Epoch>,
        request_id: Option<&str>,
    ) -> Result<Option<Epoch>, Error> {
        self.admin(flow, expected_epoch, AdminOp::Delete, request_id).await
    }

    /// Sets (repairs) an effect.
    pub async fn set_effect(
        &self,
        flow: &FlowId,
        effect_id: &str,
        record: EffectRecord,
        expected_epoch: Option<Epoch>,
        request_id: Option<&str>,
    ) -> Result<Option<Epoch>, Error> {
        if let shard::EffectState::Completed(value) = &record.state {
            json("effect value", value)?;
        }
        let op = AdminOp::SetEffect { effect_id: effect_id.into(), record };
        self.admin(flow, expected_epoch, op, request_id).await
    }

    /// Removes an effect so that it runs again.
    pub async fn remove_effect(
        &self,
        flow: &FlowId,
        effect_id: &str,
        expected_epoch: Option<Epoch>,
        request_id: Option<&str>,
    ) -> Result<Option<Epoch>, Error> {
        self.admin(flow, expected_epoch, AdminOp::RemoveEffect { effect_id: effect_id.into() }, request_id)
            .await
    }

    /// Appends a message to the flow's event log; with an idempotency key, once per key.
    /// Returns the message's position in the log (the first one's, for a repeated key).
    pub async fn send_message(
        &self,
        flow: &FlowId,
        type_name: &str,
        payload: Payload,
        idempotency_key: Option<String>,
    ) -> Result<u64, Error> {
        json("message", &payload)?;
        let event = Event::Message { type_name: type_name.into(), payload, idempotency_key };
        match self.command(flow, ShardCommand::AppendEvent { flow: flow.clone(), event }).await? {
            ShardOutcome::Appended { seq } | ShardOutcome::Duplicate { seq } => Ok(seq),
            other => Err(Error::Refused(Rejection::Invalid(format!("unexpected outcome {other:?}")))),
        }
    }
}
