//! Reads of a shard's state that can travel: a node that holds no replica of a shard sends
//! them to one that does ([`crate::handle::GroupHandle::query`]), which runs them linearizably.

use serde::{Deserialize, Serialize};

use super::command::{DeadLetter, EffectRecord, Event, FlowRecord};
use super::read;
use crate::ids::FlowId;
use crate::kv::{KvError, KvRead};

/// Everything about one flow, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    /// Status, input, output or error, epoch, times, parent.
    pub record: FlowRecord,
    /// Recorded effects by id.
    pub effects: Vec<(String, EffectRecord)>,
    /// The event log, with sequence numbers.
    pub events: Vec<(u64, Event)>,
    /// Armed timers: (timer id, deadline ms).
    pub timers: Vec<(String, u64)>,
    /// Why a running flow makes no progress, when known (e.g. no leader runs its type).
    pub note: Option<String>,
    /// Messages from other flows that arrived after it finished (the first `dead_letters` of
    /// the query, oldest first).
    pub dead_letters: Vec<DeadLetter>,
}

/// A read of one shard's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardQuery {
    /// Everything about `flow` ([`FlowView`]), with at most `dead_letters` of its dead letters.
    Flow {
        /// The flow.
        flow: FlowId,
        /// Dead letters in the view, at most.
        dead_letters: usize,
    },
    /// [`read::list_flows`].
    Flows {
        /// Only flows of this type.
        flow_type: Option<String>,
        /// Strictly after this flow.
        after: Option<FlowId>,
        /// At most this many.
        limit: usize,
    },
    /// [`read::dead_letters_of`].
    DeadLettersOf {
        /// The target flow.
        flow: FlowId,
        /// After this arrival number.
        after_seq: Option<u64>,
        /// At most this many.
        limit: usize,
    },
    /// [`read::dead_letters_after`].
    DeadLettersAfter {
        /// After this target and arrival number.
        after: Option<(FlowId, u64)>,
        /// At most this many.
        limit: usize,
    },
}

/// What a [`ShardQuery`] found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ShardAnswer {
    /// For [`ShardQuery::Flow`]: `None` if the flow does not exist.
    Flow(Option<Box<FlowView>>),
    /// For [`ShardQuery::Flows`].
    Flows(Vec<FlowRecord>),
    /// For the dead-letter queries.
    DeadLetters(Vec<DeadLetter>),
}

impl ShardQuery {
    /// Runs the query over a shard's state.
    pub fn run(&self, kv: &dyn KvRead) -> Result<ShardAnswer, KvError> {
        Ok(match self {
            ShardQuery::Flow { flow, dead_letters } => {
                let Some(record) = read::get_flow(kv, flow)? else { return Ok(ShardAnswer::Flow(None)) };
                ShardAnswer::Flow(Some(Box::new(FlowView {
                    record,
                    effects: read::list_effects(kv, flow)?,
                    events: read::events(kv, flow, 0, usize::MAX)?,
                    timers: read::timers_of(kv, flow)?,
                    note: read::note_of(kv, flow)?,
                    dead_letters: read::dead_letters_of(kv, flow, None, *dead_letters)?,
                })))
            }
            ShardQuery::Flows { flow_type, after, limit } => {
                ShardAnswer::Flows(read::list_flows(kv, flow_type.as_deref(), after.as_ref(), *limit)?)
            }
            ShardQuery::DeadLettersOf { flow, after_seq, limit } => {
                ShardAnswer::DeadLetters(read::dead_letters_of(kv, flow, *after_seq, *limit)?)
            }
            ShardQuery::DeadLettersAfter { after, limit } => ShardAnswer::DeadLetters(
                read::dead_letters_after(kv, after.as_ref().map(|(f, s)| (f, *s)), *limit)?,
            ),
        })
    }
}
