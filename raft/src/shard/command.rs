//! What a shard group agrees on: commands, their replies, and the actions `apply` emits.

use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, FlowId, NodeId, ShardId};

/// A user payload: JSON text as bytes (inputs, outputs, effect values, messages).
pub type Payload = Vec<u8>;

/// An error recorded for a flow or an effect: a stable machine-readable kind and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Stable kind, e.g. `effect_outcome_unknown`, `replay_drift`, `panic`, `cancelled`, or a user kind.
    pub kind: String,
    /// Human-readable detail.
    pub message: String,
}

/// A flow's lifecycle status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlowStatus {
    /// Runnable: the shard leader keeps an activation for it.
    Running,
    /// Waiting for an event; costs only disk until an event or timer wakes it.
    Suspended,
    /// Not to be run before `until_ms`.
    Postponed {
        /// Earliest wall-clock time (ms since the Unix epoch) to run again.
        until_ms: u64,
    },
    /// Finished with an output.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled by an operator or a parent.
    Cancelled,
}

impl FlowStatus {
    /// Whether the flow has reached a terminal status.
    pub fn is_finished(&self) -> bool {
        matches!(self, FlowStatus::Succeeded | FlowStatus::Failed | FlowStatus::Cancelled)
    }
}

/// The stored record of one flow instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Who it is.
    pub id: FlowId,
    /// The input it was started (or last restarted) with.
    #[serde(with = "crate::codec::bytes")]
    pub input: Payload,
    /// Where it is in its life.
    pub status: FlowStatus,
    /// The current activation epoch; commands carrying another epoch are rejected.
    pub epoch: Epoch,
    /// The output, once `Succeeded`.
    #[serde(with = "crate::codec::opt_bytes")]
    pub output: Option<Payload>,
    /// The error, once `Failed` or `Cancelled`.
    pub error: Option<ErrorInfo>,
    /// The parent flow, for a child.
    pub parent: Option<FlowId>,
    /// Number of events in the flow's event log (the next event's sequence number).
    pub events_len: u64,
    /// When it was created (shard clock, ms).
    pub created_ms: u64,
    /// When it last changed (shard clock, ms).
    pub updated_ms: u64,
    /// When it finished (shard clock, ms), once finished.
    pub finished_ms: Option<u64>,
    /// This run's seed: given out by the shard (a counter, so unique in the shard) when the flow
    /// is created and when a restart clears its effects. `ctx.uuid` and `ctx.random` derive
    /// their values from it, the flow id and the step id, so they need no commit of their own.
    pub seed: u64,
}

/// What an effect is, recorded so that replay can detect drift (code asking for another kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EffectKind {
    /// `ctx.effect(..)`: user work with side effects.
    Effect,
    /// `ctx.state(..)`: a value overwritten in place.
    State,
    /// `ctx.uuid(..)`.
    Uuid,
    /// `ctx.now(..)`.
    Now,
    /// `ctx.random(..)`.
    Random,
    /// `ctx.sleep(..)`: the timer was armed.
    Sleep,
    /// `ctx.start_child(..)`: the child start was put in the outbox.
    Child,
    /// `ctx.send(..)`: the message was put in the outbox.
    Send,
}

/// Where an effect stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EffectState {
    /// At-most-once marker committed before the work ran; no outcome yet.
    Started,
    /// The work returned a value.
    Completed(#[serde(with = "crate::codec::bytes")] Payload),
    /// The work returned an error.
    Failed(ErrorInfo),
    /// An attempt of an effect with a retry policy returned an error that the policy retries:
    /// its outcome is known, so the next attempt may start (a new `Started`) at or after
    /// `retry_at_ms`. (Appended last: bincode encodes the variant's position.)
    AttemptFailed {
        /// How many attempts have failed (1-based): the failed one was attempt `attempt`.
        attempt: u32,
        /// The error that attempt returned.
        error: ErrorInfo,
        /// Wall-clock time (ms since the Unix epoch) the proposer chose for the next attempt.
        retry_at_ms: u64,
    },
}

/// One recorded effect of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectRecord {
    /// The kind of effect.
    pub kind: EffectKind,
    /// The declared type name of the value (for drift detection), e.g. `"TrackAndTrace"`.
    pub type_name: String,
    /// Its state.
    pub state: EffectState,
}

/// One entry of a flow's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A message (from a client or another flow).
    Message {
        /// The message type's stable name (`Message::NAME`).
        type_name: String,
        /// JSON body.
        #[serde(with = "crate::codec::bytes")]
        payload: Payload,
        /// Idempotency key: a key already in this flow's log is acknowledged, not stored again.
        idempotency_key: Option<String>,
    },
    /// A timer of this flow fired.
    TimerFired {
        /// The timer's id (the sleep or wait that armed it).
        timer_id: String,
    },
    /// A child flow finished.
    ChildResult {
        /// The child.
        child: FlowId,
        /// Its output, or its error.
        result: Result<Payload, ErrorInfo>,
    },
}

/// A cross-shard message written by `apply` into the source shard's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboxEntry {
    /// Start `child` (idempotently) with `parent` set.
    StartChild {
        /// The child to start.
        child: FlowId,
        /// Its input.
        #[serde(with = "crate::codec::bytes")]
        input: Payload,
        /// The flow that started it.
        parent: FlowId,
    },
    /// Deliver a finished child's result into its parent's event log.
    ChildResult {
        /// The parent to deliver to.
        parent: FlowId,
        /// The child that finished.
        child: FlowId,
        /// Its output, or its error.
        result: Result<Payload, ErrorInfo>,
    },
    /// Append a message to another flow's event log.
    Message {
        /// The receiving flow.
        target: FlowId,
        /// The message type's stable name.
        type_name: String,
        /// JSON body.
        #[serde(with = "crate::codec::bytes")]
        payload: Payload,
        /// Idempotency key at the target (the sender's flow id and effect id).
        idempotency_key: Option<String>,
    },
    /// Cancel a child because its parent was cancelled.
    CancelChild {
        /// The child to cancel.
        child: FlowId,
    },
    /// Append a message from `sender` (a flow's `ctx.send`) to another flow's event log; one the
    /// target cannot take (missing or finished) is kept as a [`DeadLetter`] naming the sender.
    /// (Appended last: bincode encodes the variant's position, and stored outboxes written before
    /// it hold [`OutboxEntry::Message`], which is still delivered.)
    FlowMessage {
        /// The sending flow.
        sender: FlowId,
        /// The receiving flow.
        target: FlowId,
        /// The message type's stable name.
        type_name: String,
        /// JSON body.
        #[serde(with = "crate::codec::bytes")]
        payload: Payload,
        /// Names this send at the target: the sender, its effect id and the entry's outbox
        /// position, so a send that runs again after a repair is a new message there.
        idempotency_key: Option<String>,
    },
}

impl OutboxEntry {
    /// The flow this entry acts on at the target shard.
    pub fn target_flow(&self) -> &FlowId {
        match self {
            OutboxEntry::StartChild { child, .. } | OutboxEntry::CancelChild { child } => child,
            OutboxEntry::ChildResult { parent, .. } => parent,
            OutboxEntry::Message { target, .. } | OutboxEntry::FlowMessage { target, .. } => target,
        }
    }
}

/// Why a message became a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadLetterReason {
    /// No flow with the target's id exists on its shard (never started, or already deleted).
    NotFound,
    /// The target had finished with this status when the message arrived.
    Finished {
        /// The target's status then.
        status: FlowStatus,
    },
}

/// A message between flows that its target could not take, kept on the target's shard (bounded
/// per shard, oldest dropped first, deleted after the retention period) so that nothing sent is
/// lost without a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its arrival number on the target's shard (increasing, never reused).
    pub seq: u64,
    /// The flow it was addressed to.
    pub target: FlowId,
    /// The flow that sent it, when known (entries written before senders were recorded lack it).
    pub sender: Option<FlowId>,
    /// The message type's stable name.
    pub type_name: String,
    /// JSON body.
    #[serde(with = "crate::codec::bytes")]
    pub payload: Payload,
    /// The message's idempotency key (it names the sender's send).
    pub idempotency_key: Option<String>,
    /// Why the target did not take it.
    pub reason: DeadLetterReason,
    /// When it arrived (shard clock, ms).
    pub at_ms: u64,
}

/// The dead-letter list of a shard as a whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterStats {
    /// The last arrival number assigned.
    pub last_seq: u64,
    /// Letters kept.
    pub count: u64,
    /// Stored bytes of the letters kept.
    pub bytes: u64,
    /// Letters dropped (oldest first) because the list was full.
    pub evicted: u64,
}

/// A command to a shard group. Every command from a flow's activation carries that activation's
/// epoch; commands without an epoch come from ingress, the shard leader, or the control panel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardCommand {
    /// Start a flow; idempotent (same input: the existing flow is returned; other input:
    /// `InputMismatch` and nothing changes).
    Start {
        /// Which flow.
        flow: FlowId,
        /// Its input (JSON).
        #[serde(with = "crate::codec::bytes")]
        input: Payload,
        /// Its parent, for a child started through the outbox.
        parent: Option<FlowId>,
    },
    /// Begin a new activation: accepted only when `epoch` is the stored epoch + 1 and the flow is
    /// not finished; a `Suspended`/`Postponed` flow becomes `Running`.
    Activate {
        /// Which flow.
        flow: FlowId,
        /// The new epoch (stored + 1).
        epoch: Epoch,
    },
    /// At-most-once marker committed before an attempt's work runs: accepted on an absent
    /// effect or on one whose previous attempt failed (`AttemptFailed`); rejected on `Started`
    /// (the outcome of the attempt in flight is unknown), `Completed` and `Failed`.
    EffectStarted {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The effect id.
        effect_id: String,
        /// Its kind.
        kind: EffectKind,
        /// Its declared type name.
        type_name: String,
    },
    /// Record an effect's value. Allowed when absent, `Started` or `AttemptFailed`; rejected
    /// when already `Completed`/`Failed`.
    EffectCompleted {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The effect id.
        effect_id: String,
        /// Its kind.
        kind: EffectKind,
        /// Its declared type name.
        type_name: String,
        /// The value (JSON).
        #[serde(with = "crate::codec::bytes")]
        value: Payload,
    },
    /// Record an effect's error. Same rules as `EffectCompleted`.
    EffectFailed {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The effect id.
        effect_id: String,
        /// Its kind.
        kind: EffectKind,
        /// Its declared type name.
        type_name: String,
        /// The error.
        error: ErrorInfo,
    },
    /// Set a state effect, overwriting in place (constant space in loops).
    StateSet {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The state id.
        state_id: String,
        /// Its declared type name.
        type_name: String,
        /// The value (JSON).
        #[serde(with = "crate::codec::bytes")]
        value: Payload,
    },
    /// Remove a state effect.
    StateClear {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The state id.
        state_id: String,
    },
    /// Append an event to a flow's log (ingress messages). A message whose idempotency key is
    /// already in the log is acknowledged as a duplicate and not stored again.
    AppendEvent {
        /// Which flow.
        flow: FlowId,
        /// The event.
        event: Event,
    },
    /// Suspend the activation: applied only if the log still has `events_seen` events; otherwise
    /// the reply is `Resume` and nothing changes.
    Suspend {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// How many events the activation has looked at.
        events_seen: u64,
    },
    /// Postpone the whole flow until `until_ms`: status `Postponed`, and a timer that wakes it.
    Postpone {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// Wall-clock deadline (ms since the Unix epoch).
        until_ms: u64,
    },
    /// Arm a timer of the flow (sleep, message timeout), recorded as an effect of kind `Sleep`
    /// with the deadline as its value. Idempotent for the same id and deadline.
    ArmTimer {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The timer id.
        timer_id: String,
        /// Wall-clock deadline (ms since the Unix epoch).
        deadline_ms: u64,
    },
    /// Fire a due timer (proposed by the shard leader): removes it from the index and appends
    /// `TimerFired` to the flow's log (or, for a postpone timer, makes the flow runnable).
    /// Firing a timer that is not armed is an idempotent no-op; firing early is rejected.
    FireTimer {
        /// Which flow.
        flow: FlowId,
        /// The timer id.
        timer_id: String,
    },
    /// The activation finished the flow with an output.
    Complete {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The output (JSON).
        #[serde(with = "crate::codec::bytes")]
        output: Payload,
    },
    /// The activation finished the flow with an error.
    Fail {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The error.
        error: ErrorInfo,
    },
    /// Send a message to another flow, exactly once: records the effect (kind `Send`) and writes
    /// the outbox entry in the same transaction.
    Send {
        /// The sending flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The effect id of the send.
        effect_id: String,
        /// The receiving flow.
        target: FlowId,
        /// The message type's stable name.
        type_name: String,
        /// JSON body.
        #[serde(with = "crate::codec::bytes")]
        payload: Payload,
    },
    /// Start a child flow, exactly once: records the effect (kind `Child`) and writes the outbox
    /// entry in the same transaction. Its result arrives later as a `ChildResult` event.
    StartChild {
        /// The parent flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The effect id of the start.
        effect_id: String,
        /// The child.
        child: FlowId,
        /// The child's input.
        #[serde(with = "crate::codec::bytes")]
        input: Payload,
    },
    /// Entries from another shard's outbox, numbered `first_seq`, `first_seq + 1`, … A number at
    /// or below the highest already applied from `source` is a no-op (redelivery); a gap is
    /// rejected.
    OutboxDeliver {
        /// The sending shard.
        source: ShardId,
        /// The number of the first entry.
        first_seq: u64,
        /// The entries, in order.
        entries: Vec<OutboxEntry>,
    },
    /// The target applied every entry to `target` numbered up to `upto_seq`: remove them.
    OutboxAck {
        /// The receiving shard.
        target: ShardId,
        /// Highest number applied there.
        upto_seq: u64,
    },
    /// Control panel: mutate a flow (fencing its activation with a new epoch). When
    /// `expected_epoch` is given and differs from the stored one, the reply is
    /// `ConcurrentModification` and nothing changes.
    Admin {
        /// Which flow.
        flow: FlowId,
        /// The epoch the caller read, if it wants the mutation to be conditional.
        expected_epoch: Option<Epoch>,
        /// What to do.
        op: AdminOp,
    },
    /// Retention: delete up to `max_flows` finished flows whose `finished_ms < cutoff_ms`.
    /// The cutoff (now − retention) is computed by the proposer and travels in the command.
    Gc {
        /// Delete flows finished before this time.
        cutoff_ms: u64,
        /// Bound on the work of one command.
        max_flows: u32,
    },
    /// Tell the shard who it is and how many shards the cluster has (committed first by the
    /// group's creator, from group 0's parameters). `apply` needs the shard count to route outbox
    /// entries (`placement::shard_of`) without reading local configuration; a command that must
    /// write an outbox entry before this is rejected with `Invalid("shard not configured")`.
    /// Idempotent for the same values; other values are rejected (the shard count is fixed at
    /// cluster creation).
    Configure {
        /// This shard.
        shard_id: ShardId,
        /// The cluster's shard count (`> shard_id`).
        shard_count: u32,
    },
    /// An attempt of a `Started` effect returned an error its retry policy retries: the effect
    /// becomes `AttemptFailed`, after which `EffectStarted` may start the next attempt. Rejected
    /// unless the effect is `Started`. (Appended last: bincode encodes the variant's position,
    /// and committed logs must keep decoding.)
    EffectAttemptFailed {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The effect id.
        effect_id: String,
        /// How many attempts have failed, this one included (1-based).
        attempt: u32,
        /// The attempt's error.
        error: ErrorInfo,
        /// When the next attempt may start (ms since the Unix epoch, chosen by the proposer).
        retry_at_ms: u64,
    },
    /// [`ShardCommand::Admin`] under a request id, so that a retry of a request whose answer was
    /// lost (forwarding, a client failing over) changes nothing and gets the first reply again.
    /// The first time a request id is seen, the mutation runs and its reply — an acceptance
    /// ([`ShardOutcome::Mutated`]) or a rejection — is stored with the id in the same
    /// transaction; the same id with the same command again returns the stored reply, with
    /// another command it is [`Rejection::RequestIdReused`]. Request ids are kept per shard
    /// (not per flow, so that a retried delete still finds its own) until `Gc` collects them with
    /// the finished flows of the same age, and at most [`MAX_REQUEST_IDS`] per shard (the oldest
    /// go first). (Appended last: bincode encodes the variant's position.)
    AdminRequest {
        /// The caller's id of this request (1 to [`MAX_REQUEST_ID_BYTES`] bytes), the same on
        /// every retry.
        request_id: String,
        /// Which flow.
        flow: FlowId,
        /// The epoch the caller read, if it wants the mutation to be conditional.
        expected_epoch: Option<Epoch>,
        /// What to do.
        op: AdminOp,
    },
    /// Why a `Running` flow is not making progress (e.g. the leading node does not run its flow
    /// type): kept on the flow for operators (`flow get`) until its next activation or its end.
    /// At most [`MAX_NOTE_BYTES`]. (Appended last, as above.)
    Note {
        /// Which flow.
        flow: FlowId,
        /// The activation's epoch.
        epoch: Epoch,
        /// The note.
        note: String,
    },
}

/// The longest request id a shard stores.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// How many request ids one shard keeps at most (each row is small: the id, a fingerprint, a
/// time and a reply without payloads).
pub const MAX_REQUEST_IDS: u64 = 100_000;

/// Bound on a [`ShardCommand::Note`].
pub const MAX_NOTE_BYTES: usize = 4096;

/// A control-panel mutation of one flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminOp {
    /// Run again from the top: status `Running`, new epoch; optionally with a new input and
    /// without the recorded effects (and event log).
    Restart {
        /// A replacement input.
        #[serde(with = "crate::codec::opt_bytes")]
        input: Option<Payload>,
        /// Forget recorded effects.
        clear_effects: bool,
    },
    /// Cancel the flow and (through the outbox) its children.
    Cancel,
    /// Mark it succeeded by hand.
    Succeed {
        /// The output to record.
        #[serde(with = "crate::codec::bytes")]
        output: Payload,
    },
    /// Mark it failed by hand.
    Fail {
        /// The error to record.
        error: ErrorInfo,
    },
    /// Delete it and everything it owns at once; its id becomes free.
    Delete,
    /// Set (repair) an effect.
    SetEffect {
        /// The effect id.
        effect_id: String,
        /// The record to store.
        record: EffectRecord,
    },
    /// Remove an effect so it runs again.
    RemoveEffect {
        /// The effect id.
        effect_id: String,
    },
}

/// A successful outcome of a shard command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardOutcome {
    /// The flow was created.
    Started,
    /// `Start` of a flow that exists with the same input: nothing changed.
    AlreadyExists {
        /// Its current status.
        status: FlowStatus,
    },
    /// The activation with this epoch is now current.
    Activated {
        /// The new epoch.
        epoch: Epoch,
    },
    /// The event was appended at this sequence number.
    Appended {
        /// Its position in the flow's event log.
        seq: u64,
    },
    /// A message with this idempotency key was already stored: acknowledged, not stored again.
    Duplicate {
        /// The position of the stored one.
        seq: u64,
    },
    /// The flow is suspended; its activation must stop.
    Suspended,
    /// An event arrived after `events_seen`: the activation continues.
    Resume {
        /// The number of events now in the log.
        events_len: u64,
    },
    /// A timer fired (or was already gone: `fired == false`).
    TimerFired {
        /// Whether this command fired it (false: already fired or never armed).
        fired: bool,
    },
    /// Outbox entries were applied: `applied` new ones, `duplicates` already seen.
    Delivered {
        /// Entries applied by this command.
        applied: u32,
        /// Entries skipped as redeliveries.
        duplicates: u32,
    },
    /// Garbage collection deleted this many flows.
    Collected {
        /// Flows deleted.
        flows: u32,
    },
    /// The command was applied; nothing further to report.
    Done,
    /// A control-panel mutation under a request id ([`ShardCommand::AdminRequest`]) was
    /// applied. (Appended last: bincode encodes the variant's position.)
    Mutated {
        /// The flow's epoch right after the mutation; `None` after a delete.
        epoch: Option<Epoch>,
    },
}

/// Why a shard command was rejected. A rejected command changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// No such flow.
    #[error("flow not found")]
    FlowNotFound,
    /// `Start` with an input that differs from the stored one.
    #[error("input_mismatch: the flow exists with a different input")]
    InputMismatch,
    /// The command's epoch is not the current one (the activation was fenced).
    #[error("stale epoch {got} (current {current})")]
    StaleEpoch {
        /// The epoch the command carried.
        got: Epoch,
        /// The stored epoch.
        current: Epoch,
    },
    /// The flow has finished; it takes no more activation commands or events.
    #[error("flow already finished")]
    FlowFinished,
    /// An activation command for a flow that is not `Running`.
    #[error("flow is not running")]
    NotRunning,
    /// `EffectStarted` on an effect that is started or has an outcome (the at-most-once guard).
    #[error("effect {effect_id} already started or recorded")]
    EffectAlreadyStarted {
        /// The effect.
        effect_id: String,
    },
    /// A completion for an effect whose outcome is already recorded.
    #[error("effect {effect_id} already has an outcome")]
    EffectAlreadyRecorded {
        /// The effect.
        effect_id: String,
    },
    /// The stored record has another kind than the command names.
    #[error("replay_drift: effect {effect_id} is recorded as {recorded:?}, not {requested:?}")]
    KindMismatch {
        /// The effect.
        effect_id: String,
        /// What is stored.
        recorded: EffectKind,
        /// What the command asked for.
        requested: EffectKind,
    },
    /// A timer re-armed with another deadline.
    #[error("timer {timer_id} already armed for another deadline")]
    TimerConflict {
        /// The timer.
        timer_id: String,
    },
    /// `FireTimer` before its deadline (by the shard clock).
    #[error("timer not due until {deadline_ms}")]
    TimerNotDue {
        /// Its deadline.
        deadline_ms: u64,
    },
    /// Outbox entries that skip numbers.
    #[error("outbox gap from shard {source_shard}: expected {expected}, got {got}")]
    OutboxGap {
        /// The sending shard.
        source_shard: ShardId,
        /// The next number this shard expects.
        expected: u64,
        /// The number that came.
        got: u64,
    },
    /// The caller's `expected_epoch` is stale.
    #[error("concurrent modification: flow is at epoch {current}, caller read {expected}")]
    ConcurrentModification {
        /// What the caller read.
        expected: Epoch,
        /// What is stored.
        current: Epoch,
    },
    /// The command is not valid for this state (e.g. a child id equal to its parent).
    #[error("invalid command: {0}")]
    Invalid(String),
    /// `EffectAttemptFailed` for an effect with no attempt in flight (not `Started`).
    #[error("effect {effect_id} has no attempt in flight")]
    EffectNotStarted {
        /// The effect.
        effect_id: String,
    },
    /// A request id that the shard has seen with another command.
    #[error("request id {request_id:?} was already used for another request")]
    RequestIdReused {
        /// The request id.
        request_id: String,
    },
}

/// The reply to one shard command.
pub type ShardReply = Result<ShardOutcome, Rejection>;

/// Work the shard leader should do because of committed state. A pure function of the command
/// and the state; followers ignore them, and a new leader derives the same work from state by
/// paging through the running index ([`super::running_flows_after`]), the timer index
/// ([`super::timers_after`]) and the outbox ([`super::outbox_targets`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// The flow is `Running` and needs an activation (started, woken, restarted, timer due).
    Activate {
        /// Which flow.
        flow: FlowId,
    },
    /// A new event for a flow that is running (an in-memory activation may want it).
    EventAppended {
        /// Which flow.
        flow: FlowId,
        /// The new log length.
        events_len: u64,
    },
    /// The current activation was fenced (admin mutation, finish): stop it.
    Fence {
        /// Which flow.
        flow: FlowId,
    },
    /// Arm an in-memory timer for this deadline.
    ArmTimer {
        /// Which flow.
        flow: FlowId,
        /// The timer id.
        timer_id: String,
        /// Its deadline.
        deadline_ms: u64,
    },
    /// The outbox to `target` has undelivered entries.
    DeliverOutbox {
        /// The receiving shard.
        target: ShardId,
    },
    /// The flow finished.
    Finished {
        /// Which flow.
        flow: FlowId,
        /// Its final status.
        status: FlowStatus,
    },
    /// A new flow whose first activation, `epoch`, is already committed with its start and
    /// belongs to node `by` (the leader that appended the start): `by` runs it without an
    /// `Activate` of its own; any other node activates the flow as usual (the next epoch).
    Started {
        /// Which flow.
        flow: FlowId,
        /// The claimed epoch (1).
        epoch: Epoch,
        /// The node it belongs to.
        by: NodeId,
    },
}
